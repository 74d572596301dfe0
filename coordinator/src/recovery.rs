//! Recovery when a table is opened: the Delta `txn` version says which staged sequences are
//! applied; older segments are deleted, newer ones are loaded as pending; in-flight records
//! of cycles that never committed get their files swept after the grace period.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use deltalake::DeltaTable;
use freshet_common::delta::{applied_sequence, files};
use freshet_common::error::Result;
use freshet_common::staging::{delete_segment, list_segments, read_segment};
use freshet_common::table::TableDef;
use object_store::ObjectStore;

use crate::orphans;
use crate::tables::PendingSegment;

/// What recovery found.
pub struct Recovered {
    /// Segments to apply, in order.
    pub pending: Vec<PendingSegment>,
    /// The next sequence number to hand out.
    pub next_seq: u64,
    /// The applied sequence (txn version).
    pub applied: u64,
}

/// Recovers one table's staging state from its Delta log and staging log.
pub async fn recover(
    def: &TableDef,
    store: &Arc<dyn ObjectStore>,
    table: &DeltaTable,
    grace: Duration,
) -> Result<Recovered> {
    let applied = applied_sequence(def, table).await?;
    let mut pending = Vec::new();
    let mut max_seen = applied;
    for seg in list_segments(store).await? {
        max_seen = max_seen.max(seg.last);
        if seg.last <= applied {
            // Applied by a commit whose cleanup did not finish.
            delete_segment(store, &seg.path).await?;
            continue;
        }
        let batches = read_segment(store, &seg.path).await?;
        let rows = batches.iter().map(|b| b.num_rows() as u64).sum();
        pending.push(PendingSegment {
            first: seg.first,
            last: seg.last,
            path: seg.path,
            batches,
            rows,
            bytes: seg.size,
            acked_at_ms: chrono::Utc::now().timestamp_millis(),
        });
    }
    let active: HashSet<String> = files(def, table)?.into_iter().map(|f| f.path).collect();
    for rec in orphans::list_records(store).await? {
        if !rec.aborted && applied >= rec.last_sequence {
            // It committed; whatever its failed attempts left stays (harmless, unreferenced).
            orphans::sweep(
                store,
                &orphans::InflightRecord {
                    dirs: vec![],
                    ..rec
                },
                &HashSet::new(),
            )
            .await?;
        } else {
            orphans::sweep_later(store.clone(), rec, active.clone(), grace);
        }
    }
    if !pending.is_empty() {
        tracing::info!(table = %def.name, applied, segments = pending.len(), "recovered staged changes to apply");
    }
    Ok(Recovered {
        pending,
        next_seq: max_seen + 1,
        applied,
    })
}
