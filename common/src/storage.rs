//! Object-store access for a table URI: `file://`, a local path, `s3://`, `gs://` or
//! `az://` / `abfss://` (with the standard `AWS_*`, `GOOGLE_*` or `AZURE_*` settings, from
//! the environment or from storage options).

use std::collections::HashMap;
use std::sync::Arc;

use deltalake::logstore::{LogStoreRef, StorageConfig, logstore_with, object_store_factories};
use deltalake::{DeltaTableBuilder, ObjectStore};
use url::Url;

use crate::error::{Error, Result};

/// Storage options (object_store keys such as `aws_endpoint`), passed to every store.
pub type StorageOptions = HashMap<String, String>;

/// Parses a table URI; local paths become `file://` URLs and their directory is created.
pub fn table_url(table: &str, uri: &str) -> Result<Url> {
    let url = deltalake::ensure_table_uri(uri).map_err(|e| Error::InvalidTable {
        table: table.to_string(),
        message: format!("bad uri '{uri}': {e}"),
    })?;
    match url.scheme() {
        "file" | "s3" | "s3a" | "memory" | "gs" | "az" | "abfs" | "abfss" | "azure" => Ok(url),
        other => Err(Error::InvalidTable {
            table: table.to_string(),
            message: format!(
                "unsupported uri scheme '{other}' in '{uri}' (supported: file://, s3://, gs://, az://, abfss://, local paths)"
            ),
        }),
    }
}

/// Reads a whole object; `None` when it does not exist.
pub async fn read_object(
    store: &Arc<dyn ObjectStore>,
    path: &object_store::path::Path,
) -> Result<Option<bytes::Bytes>> {
    use object_store::ObjectStoreExt;
    match store.get(path).await {
        Ok(g) => Ok(Some(g.bytes().await.map_err(|e| Error::store(path, e))?)),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(Error::store(path, e)),
    }
}

/// Reads a whole object that must exist.
pub async fn read_existing(
    store: &Arc<dyn ObjectStore>,
    path: &object_store::path::Path,
) -> Result<bytes::Bytes> {
    read_object(store, path).await?.ok_or_else(|| {
        Error::store(
            path,
            object_store::Error::NotFound {
                path: path.to_string(),
                source: "object vanished".into(),
            },
        )
    })
}

/// Wraps a table's root object store (below Delta's per-table prefix), e.g. with the
/// coordinator's fenced retries.
pub type StoreWrap = Arc<dyn Fn(Arc<dyn ObjectStore>) -> Arc<dyn ObjectStore> + Send + Sync>;

/// Builds the Delta log store of a table.
pub fn log_store(table: &str, url: &Url, options: &StorageOptions) -> Result<LogStoreRef> {
    log_store_wrapped(table, url, options, None)
}

/// Builds the Delta log store of a table over a wrapped root store: the fault plan its
/// options name ([`crate::faults::FAULTS_OPTION`], tests only), then `wrap`.
pub fn log_store_wrapped(
    table: &str,
    url: &Url,
    options: &StorageOptions,
    wrap: Option<&StoreWrap>,
) -> Result<LogStoreRef> {
    let mut opts = options.clone();
    let plan = match opts.remove(crate::faults::FAULTS_OPTION) {
        Some(name) => Some(crate::faults::lookup(&name).ok_or_else(|| {
            Error::Config(format!(
                "storage option {} names fault plan '{name}', which is not registered",
                crate::faults::FAULTS_OPTION
            ))
        })?),
        None => None,
    };
    // S3-compatible servers on plain HTTP (tests, MinIO) need this explicitly.
    if let Ok(endpoint) = std::env::var("AWS_ENDPOINT_URL") {
        if endpoint.starts_with("http://") {
            opts.entry("AWS_ALLOW_HTTP".into())
                .or_insert_with(|| "true".into());
        }
    }
    if plan.is_none() && wrap.is_none() {
        return DeltaTableBuilder::from_url(url.clone())
            .and_then(|b| b.with_storage_options(opts).build_storage())
            .map_err(|e| Error::delta(table, e));
    }
    let config = StorageConfig::parse_options(opts).map_err(|e| Error::delta(table, e))?;
    let scheme = Url::parse(&format!("{}://", url.scheme())).map_err(|e| Error::InvalidTable {
        table: table.to_string(),
        message: format!("bad uri '{url}': {e}"),
    })?;
    let factory = object_store_factories()
        .get(&scheme)
        .map(|f| f.value().clone())
        .ok_or_else(|| Error::InvalidTable {
            table: table.to_string(),
            message: format!("no object store for '{url}'"),
        })?;
    let (mut root, _) = factory
        .parse_url_opts(url, &config)
        .map_err(|e| Error::delta(table, e))?;
    if let Some(plan) = plan {
        root = Arc::new(crate::faults::FaultStore::new(root, plan));
    }
    if let Some(wrap) = wrap {
        root = wrap(root);
    }
    logstore_with(root, url, config).map_err(|e| Error::delta(table, e))
}

/// The object store rooted at the table's directory.
pub fn table_store(
    table: &str,
    url: &Url,
    options: &StorageOptions,
) -> Result<Arc<dyn ObjectStore>> {
    Ok(log_store(table, url, options)?.object_store(None))
}
