//! Tables created at run time, recorded as JSON under the catalog URI so that a restarted
//! coordinator serves them again.

use std::sync::Arc;

use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use freshet_common::error::{Error, Result};
use freshet_common::source::SourceConfig;
use freshet_common::storage::{StorageOptions, read_existing, table_store, table_url};
use freshet_common::table::{TableConfig, TableDef};

/// The run-time table catalog.
pub struct Catalog {
    store: Arc<dyn ObjectStore>,
}

impl Catalog {
    /// Opens the catalog at `uri`.
    pub fn open(uri: &str, options: &StorageOptions) -> Result<Self> {
        let url =
            table_url("catalog", uri).map_err(|e| Error::Config(format!("catalog.uri: {e}")))?;
        Ok(Catalog {
            // Retried: one transient error must not fail a term's start or stop its sources.
            store: crate::fenced_store::retrying(table_store("catalog", &url, options)?),
        })
    }

    /// Records a table.
    pub async fn save(&self, def: &TableDef) -> Result<()> {
        self.put_json(&format!("tables/{}.json", def.name), &def.to_config())
            .await
    }

    /// Forgets a table (dropped).
    pub async fn remove(&self, name: &str) -> Result<()> {
        let path = Path::from(format!("tables/{name}.json"));
        match self.store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(Error::store(&path, e)),
        }
    }

    /// Forgets a source added at run time (removed).
    pub async fn remove_source(&self, name: &str) -> Result<()> {
        let path = Path::from(format!("sources/{name}.json"));
        match self.store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(Error::store(&path, e)),
        }
    }

    /// Records a source added at run time (its definition holds no password).
    pub async fn save_source(&self, source: &SourceConfig) -> Result<()> {
        self.put_json(&format!("sources/{}.json", source.name), source)
            .await
    }

    /// Every source added at run time.
    pub async fn load_sources(&self) -> Result<Vec<SourceConfig>> {
        self.load_json("sources").await
    }

    /// Every recorded table.
    pub async fn load(&self) -> Result<Vec<TableDef>> {
        let configs: Vec<TableConfig> = self.load_json("tables").await?;
        configs.into_iter().map(|c| c.to_def()).collect()
    }

    async fn put_json(&self, path: &str, value: &impl serde::Serialize) -> Result<()> {
        let path = Path::from(path);
        let body = serde_json::to_vec_pretty(value).map_err(|e| Error::Internal(e.to_string()))?;
        self.store
            .put(&path, PutPayload::from(body))
            .await
            .map_err(|e| Error::store(&path, e))?;
        Ok(())
    }

    /// Every entry under `prefix`, parsed; a broken entry is an error naming it.
    async fn load_json<T: serde::de::DeserializeOwned>(&self, prefix: &str) -> Result<Vec<T>> {
        let prefix = Path::from(prefix);
        let metas: Vec<_> = self
            .store
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|e| Error::store(&prefix, e))?;
        let mut out = Vec::new();
        for m in metas {
            let bytes = read_existing(&self.store, &m.location).await?;
            out.push(
                serde_json::from_slice(&bytes)
                    .map_err(|e| Error::Config(format!("catalog entry {}: {e}", m.location)))?,
            );
        }
        Ok(out)
    }
}
