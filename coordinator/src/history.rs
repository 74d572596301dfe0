//! Cycle history that survives leader changes and restarts: each ended cycle's record is
//! stored as protobuf at `<table>/_freshet/cycles/<cycle-id>.pb` (ids are UUIDv7, so names
//! sort by time), at most `cycle.history` per table; older ones are deleted.

use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use prost::Message;

use freshet_common::error::{Error, Result};
use freshet_proto::admin::v1::CycleRecord;

const DIR: &str = "_freshet/cycles";

fn path_of(id: &str) -> Path {
    Path::from(format!("{DIR}/{id}.pb"))
}

/// Stores one record.
pub async fn save(store: &Arc<dyn ObjectStore>, rec: &CycleRecord) -> Result<()> {
    let path = path_of(&rec.id);
    store
        .put(&path, PutPayload::from(rec.encode_to_vec()))
        .await
        .map_err(|e| Error::store(&path, e))?;
    Ok(())
}

/// Loads the newest `keep` records of a table, newest first, and deletes older ones.
pub async fn load(store: &Arc<dyn ObjectStore>, keep: usize) -> Result<Vec<CycleRecord>> {
    let prefix = Path::from(DIR);
    let mut paths: Vec<Path> = store
        .list(Some(&prefix))
        .map_ok(|m| m.location)
        .try_collect()
        .await
        .map_err(|e| Error::store(&prefix, e))?;
    paths.sort_by(|a, b| b.as_ref().cmp(a.as_ref()));
    let old = paths.split_off(keep.min(paths.len()));
    for p in old {
        let _ = store.delete(&p).await;
    }
    let records: Vec<Option<CycleRecord>> = futures::stream::iter(paths)
        .map(|p| {
            let store = store.clone();
            async move {
                let bytes = store.get(&p).await.ok()?.bytes().await.ok()?;
                match CycleRecord::decode(bytes) {
                    Ok(r) => Some(r),
                    Err(e) => {
                        tracing::warn!(path = %p, error = %e, "skipping unreadable cycle record");
                        None
                    }
                }
            }
        })
        .buffered(32)
        .collect()
        .await;
    Ok(records.into_iter().flatten().collect())
}

/// Deletes one record.
pub async fn delete(store: &Arc<dyn ObjectStore>, id: &str) {
    let _ = store.delete(&path_of(id)).await;
}
