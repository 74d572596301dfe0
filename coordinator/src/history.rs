//! Cycle history that survives leader changes and restarts: each ended cycle's record is
//! stored as protobuf at `<table>/_freshet/cycles/<cycle-id>.pb` (ids are UUIDv7, so names
//! sort by time), at most `cycle.history` per table; older ones are deleted.

use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use prost::Message;

use freshet_common::error::{Error, Result};
use freshet_proto::admin::v1::{CycleRecord, CycleState};

use crate::Coordinator;
use crate::metrics::{CycleLabel, TableLabel};
use crate::tables::TableRuntime;
use crate::term::Inner;

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

impl Inner {
    /// Records a finished cycle: the table's last cycle, the bounded history, watchers,
    /// metrics, and the persisted record.
    pub(crate) fn record(&self, t: &Arc<TableRuntime>, rec: &CycleRecord) {
        if rec.state() == CycleState::Noop {
            return;
        }
        if rec.kind.is_empty() {
            *t.last_cycle.lock().expect("lock") = Some(rec.clone());
        }
        let keep = self.ctx.config.cycle.history.max(1);
        {
            let mut h = self.history.lock().expect("lock");
            h.push_front(rec.clone());
            h.truncate(keep);
        }
        let _ = self.events.send(rec.clone());
        let table = TableLabel {
            table: rec.table.clone(),
        };
        let m = &self.ctx.metrics;
        m.cycle_seconds
            .get_or_create(&CycleLabel {
                table: rec.table.clone(),
                state: rec.state().label().to_string(),
            })
            .observe(rec.duration_ms as f64 / 1000.0);
        // A compaction applies no changes: it says nothing about freshness.
        if rec.state() == CycleState::Committed && rec.kind.is_empty() {
            let lag = rec.freshness_lag_ms as f64 / 1000.0;
            m.freshness_seconds.get_or_create(&table).observe(lag);
            m.freshness_lag.get_or_create(&table).set(lag);
            m.files_rewritten
                .get_or_create(&table)
                .inc_by(rec.files_rewritten);
            m.bytes_written
                .get_or_create(&table)
                .inc_by(rec.bytes_written);
        }
        let retries: u64 = rec
            .tasks
            .iter()
            .map(|x| x.attempts.saturating_sub(1) as u64)
            .sum();
        m.task_retries.get_or_create(&table).inc_by(retries);
        {
            let p = t.pending.lock().expect("lock");
            m.pending(&rec.table, p.rows(), p.bytes());
        }
        // Persist, and forget records beyond the bound.
        let drop_ids: Vec<String> = {
            let mut ids = t.history_ids.lock().expect("lock");
            ids.push_front(rec.id.clone());
            let n = ids.len().saturating_sub(keep);
            (0..n).filter_map(|_| ids.pop_back()).collect()
        };
        let (store, rec) = (t.store.clone(), rec.clone());
        tokio::spawn(async move {
            if let Err(e) = save(&store, &rec).await {
                tracing::warn!(error = %e, cycle_id = %rec.id, "cycle record not persisted");
            }
            for id in drop_ids {
                delete(&store, &id).await;
            }
        });
    }
}

impl Coordinator {
    /// Recent cycles, newest first.
    pub fn cycles(&self, table: Option<&str>, limit: usize) -> Vec<CycleRecord> {
        self.inner
            .history
            .lock()
            .expect("lock")
            .iter()
            .filter(|c| table.is_none_or(|t| c.table == t))
            .take(limit)
            .cloned()
            .collect()
    }

    /// One cycle by id.
    pub fn cycle(&self, id: &str) -> Result<CycleRecord> {
        self.inner
            .history
            .lock()
            .expect("lock")
            .iter()
            .find(|c| c.id == id)
            .cloned()
            .ok_or_else(|| Error::CycleNotFound(id.to_string()))
    }
}

/// Loads a table's persisted cycle records into the term's history.
pub(crate) async fn load_history(inner: Arc<Inner>, t: Arc<TableRuntime>) {
    let keep = inner.ctx.config.cycle.history.max(1);
    match load(&t.store, keep).await {
        Ok(records) => {
            {
                let mut ids = t.history_ids.lock().expect("lock");
                for r in &records {
                    if !ids.contains(&r.id) {
                        ids.push_back(r.id.clone());
                    }
                }
            }
            let mut last = t.last_cycle.lock().expect("lock");
            if last.is_none() {
                *last = records.first().cloned();
            }
            drop(last);
            let mut h = inner.history.lock().expect("lock");
            let mut all: Vec<CycleRecord> = h.drain(..).collect();
            for r in records {
                if !all.iter().any(|x| x.id == r.id) {
                    all.push(r);
                }
            }
            all.sort_by(|a, b| b.id.cmp(&a.id));
            all.truncate(keep);
            h.extend(all);
        }
        Err(e) => tracing::warn!(table = %t.def.name, error = %e, "cycle history not loaded"),
    }
}
