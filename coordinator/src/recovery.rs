//! Recovery when a table is opened: the Delta `txn` version says which staged sequences are
//! applied; older segments are deleted, newer ones are loaded as pending; in-flight records
//! of cycles that never committed get their files swept after the grace period.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use deltalake::DeltaTable;
use freshet_common::delta::{applied_sequence, producer_sequence};
use freshet_common::error::Result;
use freshet_common::staging::{
    batch_sequence, delete_segment, list_segments, read_segment_contents,
};
use freshet_common::table::TableDef;
use object_store::ObjectStore;

use crate::orphans;
use crate::tables::PendingSegment;
use crate::tables::ProducerState;

/// What recovery found.
pub struct Recovered {
    /// Segments to apply, in order.
    pub pending: Vec<PendingSegment>,
    /// The next sequence number to hand out.
    pub next_seq: u64,
    /// The applied sequence (txn version).
    pub applied: u64,
    /// Idempotent-ingest producers with batches pending, at their last staged batch.
    pub producers: HashMap<String, ProducerState>,
}

/// Recovers one table's staging state from its Delta log and staging log.
/// Segments are read one at a time; at most `memory_budget` bytes of their batches stay in
/// memory, the rest is read again by the cycle that takes it.
pub async fn recover(
    def: &TableDef,
    store: &Arc<dyn ObjectStore>,
    table: &DeltaTable,
    grace: Duration,
    memory_budget: u64,
) -> Result<Recovered> {
    let mut held = 0u64;
    let applied = applied_sequence(def, table).await?;
    let mut pending = Vec::new();
    let mut max_seen = applied;
    let mut producers: HashMap<String, ProducerState> = HashMap::new();
    for seg in list_segments(store).await? {
        max_seen = max_seen.max(seg.last);
        if seg.last <= applied {
            // Applied by a commit whose cleanup did not finish.
            delete_segment(store, &seg.path).await?;
            continue;
        }
        let contents = read_segment_contents(store, &seg.path).await?;
        let (mut batches, marks) = (contents.batches, contents.marks);
        // A producer's batch staged twice (its first write took effect but the reply was
        // lost, so it was retried) is applied once: the later copy is dropped.
        let mut repeated = HashSet::new();
        let mut kept = Vec::new();
        for m in marks {
            let known = match producers.get(&m.producer) {
                Some(p) => Some(p.last),
                None => producer_sequence(def, table, &m.producer).await?,
            };
            if known.is_some_and(|last| m.producer_sequence <= last) {
                repeated.insert(m.sequence);
                continue;
            }
            producers.insert(
                m.producer.clone(),
                ProducerState {
                    last: m.producer_sequence,
                    sequence: m.sequence,
                },
            );
            kept.push(m);
        }
        if !repeated.is_empty() {
            tracing::info!(table = %def.name, segment = %seg.path, batches = repeated.len(), "dropping repeated producer batches");
            batches.retain(|b| batch_sequence(b).is_none_or(|s| !repeated.contains(&s)));
        }
        let rows = batches.iter().map(|b| b.num_rows() as u64).sum();
        let bytes: u64 = batches
            .iter()
            .map(|b| b.get_array_memory_size() as u64)
            .sum();
        let keep = held + bytes <= memory_budget;
        if keep {
            held += bytes;
        }
        pending.push(PendingSegment {
            first: seg.first,
            last: seg.last,
            path: seg.path,
            batches: keep.then_some(batches),
            skip: repeated.into_iter().collect(),
            open: contents.open,
            rows,
            bytes,
            acked_at_ms: chrono::Utc::now().timestamp_millis(),
            producers: kept,
        });
    }
    // Every recorded cycle is swept after the grace period; the log decides which of its
    // files are referenced (a committed cycle keeps them, an abandoned one loses them).
    for rec in orphans::list_records(store).await? {
        orphans::sweep_later(store.clone(), table.log_store(), rec, grace);
    }
    if !pending.is_empty() {
        tracing::info!(table = %def.name, applied, segments = pending.len(), "recovered staged changes to apply");
    }
    Ok(Recovered {
        pending,
        next_seq: max_seen + 1,
        applied,
        producers,
    })
}
