//! Object-store access for a table URI: `file://`, a local path, `s3://`, `gs://` or
//! `az://` / `abfss://` (with the standard `AWS_*`, `GOOGLE_*` or `AZURE_*` settings, from
//! the environment or from storage options).

use std::collections::HashMap;
use std::sync::Arc;

use deltalake::logstore::LogStoreRef;
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

/// Builds the Delta log store of a table.
pub fn log_store(table: &str, url: &Url, options: &StorageOptions) -> Result<LogStoreRef> {
    let mut opts = options.clone();
    // S3-compatible servers on plain HTTP (tests, MinIO) need this explicitly.
    if let Ok(endpoint) = std::env::var("AWS_ENDPOINT_URL") {
        if endpoint.starts_with("http://") {
            opts.entry("AWS_ALLOW_HTTP".into())
                .or_insert_with(|| "true".into());
        }
    }
    DeltaTableBuilder::from_url(url.clone())
        .and_then(|b| b.with_storage_options(opts).build_storage())
        .map_err(|e| Error::delta(table, e))
}

/// The object store rooted at the table's directory.
pub fn table_store(
    table: &str,
    url: &Url,
    options: &StorageOptions,
) -> Result<Arc<dyn ObjectStore>> {
    Ok(log_store(table, url, options)?.object_store(None))
}
