//! Files of abandoned tasks. Before dispatching, a cycle records its id, the Delta version it
//! planned on, the sequence it would commit and the directories it writes to in
//! `_freshet/inflight/<cycle>.json`. Files a worker writes are named `fr-<cycle>-...`
//! ([`freshet_common::naming::OutputName`] builds and parses those names), so after a grace
//! period (abandoned attempts may still be writing) such files are deleted,
//! except every file the Delta log references: that is decided from the log at sweep time
//! (the Add actions of the commits after the planned version), never from what the cycle
//! believed, so a commit whose reply was lost keeps its files. When the log cannot be read
//! the sweep deletes nothing and fails (to be retried).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use deltalake::logstore::LogStore;
use freshet_common::error::{Error, Result};
use freshet_common::naming::OutputName;

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
    /// The Delta version the cycle planned on (its commit, if any, comes after it).
    #[serde(default)]
    pub read_version: Option<u64>,
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

/// The cycle's files that the Delta log references (Add actions after the planned version
/// named as the cycle's outputs); `None` when that cannot be known (no planned version, or a
/// commit in the range is gone), in which case nothing may be deleted.
pub async fn referenced_files(
    log: &dyn LogStore,
    rec: &InflightRecord,
) -> Result<Option<HashSet<String>>> {
    let Some(from) = rec.read_version else {
        return Ok(None);
    };
    let store_err = |e: deltalake::DeltaTableError| {
        Error::Unavailable(format!(
            "reading the Delta log to sweep cycle {}: {e}",
            rec.cycle_id
        ))
    };
    let latest = log.get_latest_version(from).await.map_err(store_err)?;
    let mut out = HashSet::new();
    for v in from + 1..=latest {
        let Some(bytes) = log.read_commit_entry(v).await.map_err(store_err)? else {
            return Ok(None);
        };
        for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let action: serde_json::Value = serde_json::from_slice(line).map_err(|e| {
                Error::Internal(format!("commit {v} of the Delta log is not JSON: {e}"))
            })?;
            if let Some(path) = action.pointer("/add/path").and_then(|p| p.as_str())
                && OutputName::is_of_cycle(path, &rec.cycle_id)
            {
                out.insert(path.to_string());
            }
        }
    }
    Ok(Some(out))
}

/// Deletes the cycle's files that the log does not reference, then its record.
pub async fn sweep(
    store: &Arc<dyn ObjectStore>,
    log: &dyn LogStore,
    rec: &InflightRecord,
) -> Result<usize> {
    let mut deleted = 0;
    match referenced_files(log, rec).await? {
        Some(keep) => {
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
                    if OutputName::is_of_cycle(name, &rec.cycle_id)
                        && !keep.contains(m.location.as_ref())
                    {
                        match store.delete(&m.location).await {
                            Ok(()) | Err(object_store::Error::NotFound { .. }) => deleted += 1,
                            Err(e) => return Err(Error::store(&m.location, e)),
                        }
                    }
                }
            }
        }
        None => tracing::warn!(
            cycle_id = %rec.cycle_id,
            "cannot tell from the Delta log which of the cycle's files it references; leaving them"
        ),
    }
    delete_record(store, &rec.cycle_id).await?;
    Ok(deleted)
}

/// Deletes a cycle's record (once nothing of it is left to sweep).
pub async fn delete_record(store: &Arc<dyn ObjectStore>, cycle_id: &str) -> Result<()> {
    let path = record_path(cycle_id);
    match store.delete(&path).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(Error::store(&path, e)),
    }
}

/// A cycle that ends without committing: its record is marked aborted and its files are
/// swept after `grace` (keeping whatever the log turns out to reference), in the background.
pub fn abandon(
    store: Arc<dyn ObjectStore>,
    log: Arc<dyn LogStore>,
    rec: &InflightRecord,
    grace: Duration,
) {
    let aborted = InflightRecord {
        aborted: true,
        ..rec.clone()
    };
    tokio::spawn(async move {
        if let Err(e) = write_record(&store, &aborted).await {
            tracing::warn!(cycle_id = %aborted.cycle_id, error = %e, "could not mark the in-flight record aborted");
        }
        sweep_later(store, log, aborted, grace);
    });
}

/// Sweeps after `grace`, in the background, retrying while the store or log errs.
pub fn sweep_later(
    store: Arc<dyn ObjectStore>,
    log: Arc<dyn LogStore>,
    rec: InflightRecord,
    grace: Duration,
) {
    tokio::spawn(async move {
        tokio::time::sleep(grace).await;
        let mut wait = Duration::from_secs(1);
        for _ in 0..10 {
            match sweep(&store, log.as_ref(), &rec).await {
                Ok(n) => {
                    if n > 0 {
                        tracing::info!(cycle_id = %rec.cycle_id, files = n, "deleted files of abandoned tasks");
                    }
                    return;
                }
                Err(e) => {
                    tracing::warn!(cycle_id = %rec.cycle_id, error = %e, "orphan sweep failed; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(60));
                }
            }
        }
        // The record stays: the next term's recovery sweeps it.
    });
}
