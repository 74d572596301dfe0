//! Files of abandoned tasks. Before dispatching, a cycle records its id, the sequence it
//! would commit and the directories it writes to in `_freshet/inflight/<cycle>.json`. Files
//! a worker writes are named `fr-<cycle>-...`, so after a grace period (abandoned attempts may
//! still be writing) every such file that the cycle did not commit is deleted. After a crash,
//! recovery decides from the `txn` version whether each recorded cycle committed.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use freshet_common::error::{Error, Result};

/// Directory of in-flight cycle records.
pub const INFLIGHT_DIR: &str = "_freshet/inflight";

/// What a cycle may have written.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InflightRecord {
    /// The cycle.
    pub cycle_id: String,
    /// The staging sequence the cycle commits as its txn version.
    pub last_sequence: u64,
    /// Partition directories written to ("" for the table root).
    pub dirs: Vec<String>,
    /// Set when the cycle ended without committing.
    #[serde(default)]
    pub aborted: bool,
}

fn record_path(cycle_id: &str) -> Path {
    Path::from(format!("{INFLIGHT_DIR}/{cycle_id}.json"))
}

/// Writes (or rewrites) a record.
pub async fn write_record(store: &Arc<dyn ObjectStore>, rec: &InflightRecord) -> Result<()> {
    let path = record_path(&rec.cycle_id);
    let body = serde_json::to_vec(rec).map_err(|e| Error::Internal(e.to_string()))?;
    store
        .put(&path, PutPayload::from(body))
        .await
        .map_err(|e| Error::store(&path, e))?;
    Ok(())
}

/// Lists every record.
pub async fn list_records(store: &Arc<dyn ObjectStore>) -> Result<Vec<InflightRecord>> {
    let prefix = Path::from(INFLIGHT_DIR);
    let metas: Vec<_> = store
        .list(Some(&prefix))
        .try_collect()
        .await
        .map_err(|e| Error::store(&prefix, e))?;
    let mut out = Vec::new();
    for m in metas {
        let bytes = freshet_common::storage::read_existing(store, &m.location).await?;
        match serde_json::from_slice(&bytes) {
            Ok(r) => out.push(r),
            Err(e) => {
                tracing::warn!(path = %m.location, error = %e, "ignoring unreadable in-flight record")
            }
        }
    }
    Ok(out)
}

/// Deletes the cycle's files not in `keep`, then its record.
pub async fn sweep(
    store: &Arc<dyn ObjectStore>,
    rec: &InflightRecord,
    keep: &HashSet<String>,
) -> Result<usize> {
    let marker = format!("fr-{}-", rec.cycle_id);
    let mut deleted = 0;
    for dir in &rec.dirs {
        let prefix = if dir.is_empty() {
            None
        } else {
            Some(Path::from(dir.trim_end_matches('/')))
        };
        let metas: Vec<_> = store
            .list_with_delimiter(prefix.as_ref())
            .await
            .map_err(|e| Error::store(dir, e))?
            .objects;
        for m in metas {
            let name = m.location.filename().unwrap_or_default();
            if name.starts_with(&marker) && !keep.contains(m.location.as_ref()) {
                match store.delete(&m.location).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => deleted += 1,
                    Err(e) => return Err(Error::store(&m.location, e)),
                }
            }
        }
    }
    let path = record_path(&rec.cycle_id);
    match store.delete(&path).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
        Err(e) => return Err(Error::store(&path, e)),
    }
    Ok(deleted)
}

/// Sweeps after `grace`, in the background.
pub fn sweep_later(
    store: Arc<dyn ObjectStore>,
    rec: InflightRecord,
    keep: HashSet<String>,
    grace: Duration,
) {
    tokio::spawn(async move {
        tokio::time::sleep(grace).await;
        match sweep(&store, &rec, &keep).await {
            Ok(n) if n > 0 => {
                tracing::info!(cycle_id = %rec.cycle_id, files = n, "deleted files of abandoned tasks")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(cycle_id = %rec.cycle_id, error = %e, "orphan sweep failed"),
        }
    });
}
