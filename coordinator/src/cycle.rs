//! One merge cycle of one table: pending changes → last change per key → plan → workers →
//! one Delta commit → staging cleanup, with every phase timed into a cycle record.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deltalake::kernel::DeletionVectorDescriptor;
use freshet_common::changes::{change_schema, last_change_per_key};
use freshet_common::delta::{FileEntry, applied_sequence, files};
use freshet_common::dv;
use freshet_common::error::{Error, Result};
use freshet_common::staging::{batch_sequence, delete_segment, read_segment_contents};
use freshet_common::table::partition_dir;
use freshet_proto::admin::v1::{CycleRecord, CycleState, Phase, TaskRecord};
use freshet_proto::worker::v1::{InputFile, MergeMode, OutputFile, RewriteRequest, TableSpec};
use tracing::Instrument;

use crate::commit;
use crate::context::TermContext;
use crate::cost;
use crate::orphans::{self, InflightRecord};
use crate::planner::plan;
use crate::tables::{PendingSegment, TableRuntime};
use crate::testing::CrashPoint;

struct Phases {
    list: Vec<Phase>,
    at: Instant,
}

impl Phases {
    fn new() -> Self {
        Phases {
            list: Vec::new(),
            at: Instant::now(),
        }
    }
    fn end(&mut self, name: &str) {
        let now = Instant::now();
        self.list.push(Phase {
            name: name.into(),
            duration_us: (now - self.at).as_micros() as u64,
        });
        self.at = now;
    }
}

/// Runs one cycle. A table with nothing pending gets a "noop" record (not kept in history).
pub async fn run_cycle(inner: &TermContext, t: &Arc<TableRuntime>) -> Result<CycleRecord> {
    let id = uuid::Uuid::now_v7().to_string();
    let span = tracing::info_span!("cycle", cycle_id = %id, table = %t.def.name);
    run(inner, t, id).instrument(span).await
}

async fn run(inner: &TermContext, t: &Arc<TableRuntime>, id: String) -> Result<CycleRecord> {
    let def = &t.def;
    let started = Instant::now();
    let mut rec = CycleRecord {
        id: id.clone(),
        table: def.name.clone(),
        state: CycleState::Noop.label().into(),
        outcome: CycleState::Noop as i32,
        started_at_ms: chrono::Utc::now().timestamp_millis(),
        delta_version: -1,
        epoch: inner.epoch,
        coordinator: inner.node_id.clone(),
        ..Default::default()
    };
    let mut phases = Phases::new();
    let mut table = t.delta.lock().await;

    // Phase: read pending (what recovery or the stager put there), oldest first, up to the
    // cycle's bound (at least one segment); the rest goes into the next cycle.
    let cap = inner
        .config
        .cycle
        .max_changes_bytes
        .min(inner.config.server.max_message_bytes as u64 / 2)
        .max(1);
    let (segments, more) = {
        let p = t.pending.lock().expect("lock");
        let n = select(&p.segments, cap);
        (p.segments[..n].to_vec(), n < p.segments.len())
    };
    if segments.is_empty() {
        return Ok(rec);
    }
    rec.first_sequence = segments.first().map(|s| s.first).unwrap_or(0);
    rec.last_sequence = segments.last().map(|s| s.last).unwrap_or(0);
    let oldest_ack = segments
        .iter()
        .map(|s| s.acked_at_ms)
        .min()
        .unwrap_or(rec.started_at_ms);
    phases.end("read_pending");

    let result = async {
        // Refresh the snapshot: another writer may have committed, and a retried commit
        // of ours may have landed already.
        table.update_state().await.map_err(|e| Error::delta(&def.name, e))?;
        let applied = applied_sequence(def, &table).await?;
        let todo: Vec<_> = segments.iter().filter(|s| s.last > applied).collect();
        if todo.is_empty() {
            rec.set_state(CycleState::Committed);
            rec.delta_version = table.version().map(|v| v as i64).unwrap_or(-1);
            return Ok(());
        }
        // Each idempotent producer's last batch in this cycle, recorded in the commit.
        let mut producers: std::collections::BTreeMap<String, u64> = Default::default();
        for m in todo.iter().flat_map(|s| &s.producers) {
            let v = producers.entry(m.producer.clone()).or_default();
            *v = (*v).max(m.producer_sequence);
        }
        let original = files(def, &table)?;
        let (total_bytes, total_rows) = original
            .iter()
            .fold((0u64, 0u64), |(b, r), f| (b + f.size, r + f.live_records().unwrap_or(0)));
        let dv_enabled = freshet_common::delta::deletion_vectors_enabled(&table);
        // The snapshot's entries: what a Remove must name (the deletion vector it had).
        let snapshot_entries: HashMap<String, FileEntry> = original.iter().map(|f| (f.path.clone(), f.clone())).collect();
        let read_version = table.version().map(|v| v as u64);
        let mut inflight = InflightRecord { cycle_id: id.clone(), last_sequence: rec.last_sequence, dirs: Vec::new(), aborted: false, read_version };
        let log = table.log_store();
        let grace = Duration::from_millis(inner.config.cycle.orphan_grace_ms);
        let spec = TableSpec {
            name: def.name.clone(),
            uri: def.uri.clone(),
            schema_ipc: freshet_common::ipc::encode_schema(&def.schema)?,
            primary_key: def.primary_key.clone(),
            partition_columns: def.partition_by.clone(),
        };
        let cschema = change_schema(def);

        // Rounds of at most `cap` bytes of changes (one round unless a large transaction
        // made the cycle bigger): each round rewrites what the files of the previous rounds
        // hold, so memory stays bounded; only the last round's files are committed.
        let mut current = original.clone();
        let mut removed: Vec<FileEntry> = Vec::new();
        let mut added: Vec<OutputFile> = Vec::new();
        // Files of the snapshot given a new deletion vector (the latest, when several rounds
        // touched one), re-added with it by the commit.
        let mut redeleted: BTreeMap<String, DeletionVectorDescriptor> = BTreeMap::new();
        let mut retried = false;
        let mut task_no = 0u64;
        let mut rounds = 0u32;
        for round in rounds_of(&todo, cap) {
            rounds += 1;
            let mut batches = Vec::new();
            for s in round {
                match &s.batches {
                    Some(b) => batches.extend(b.iter().cloned()),
                    // In the store only (recovery beyond its budget, open chunks): read it now.
                    None => {
                        let c = read_segment_contents(&t.store, &s.path).await?;
                        batches.extend(c.batches.into_iter().filter(|b| batch_sequence(b).is_none_or(|q| !s.skip.contains(&q))));
                    }
                }
            }
            let changes: u64 = batches.iter().map(|b| b.num_rows() as u64).sum();
            rec.changes += changes;
            let partitions = last_change_per_key(def, &batches)?;
            drop(batches);
            rec.keys += partitions.iter().map(|p| p.batch.num_rows() as u64).sum::<u64>();
            phases.end("reduce");

            let p = plan(def, &current, partitions)?;
            if rounds == 1 {
                rec.files_total = p.files_total;
                rec.files_considered = p.files_considered;
                rec.files_pruned = p.files_pruned;
            }
            phases.end("plan");

            // Record what this cycle may write before any worker writes it.
            let before = inflight.dirs.len();
            inflight.dirs.extend(p.tasks.iter().map(|t| partition_dir(&def.partition_by, &t.partition_values)));
            inflight.dirs.sort();
            inflight.dirs.dedup();
            if rounds == 1 || inflight.dirs.len() != before {
                orphans::write_record(&t.store, &inflight).await?;
            }

            let uncommitted: Vec<bool> = p.tasks.iter().map(|task| task.inputs.iter().any(|f| added.iter().any(|a| a.path == f.path))).collect();
            let choices = cost::choose_all(def.merge_mode, dv_enabled, &p.tasks, &uncommitted, def.target_file_size);
            let mut requests = Vec::with_capacity(p.tasks.len());
            let mut weights = Vec::with_capacity(p.tasks.len());
            for (task, choice) in p.tasks.iter().zip(&choices) {
                let changes_ipc = freshet_common::ipc::encode(&cschema, std::slice::from_ref(&task.changes))?;
                weights.push(task.input_bytes() + changes_ipc.len() as u64);
                requests.push(RewriteRequest {
                    cycle_id: id.clone(),
                    task_id: task_no + requests.len() as u64,
                    attempt: 1,
                    epoch: inner.epoch,
                    table: Some(spec.clone()),
                    inputs: task
                        .inputs
                        .iter()
                        .zip(&choice.rewrite)
                        .map(|(f, rewrite)| InputFile { path: f.path.clone(), size: f.size, deletion_vector: f.deletion_vector.as_ref().map(dv::to_proto), rewrite: *rewrite })
                        .collect(),
                    partition_values: task.partition_values.clone(),
                    changes_ipc,
                    target_file_size: def.target_file_size,
                    mode: match choice.mode {
                        cost::Mode::CopyOnWrite => MergeMode::CopyOnWrite as i32,
                        cost::Mode::DeletionVectors => MergeMode::DeletionVectors as i32,
                    },
                });
            }
            phases.end("prepare");

            let outcomes = inner
                .router
                .run(
                    requests,
                    &weights,
                    inner.config.cycle.max_attempts,
                    Duration::from_millis(inner.config.cycle.task_timeout_ms),
                )
                .await;
            phases.end("rewrite");

            let mut failed = Vec::new();
            let mut outputs = Vec::new();
            for ((task, o), choice) in p.tasks.iter().zip(&outcomes).zip(&choices) {
                retried |= o.attempts > 1;
                let mut tr = TaskRecord {
                    task_id: task_no,
                    worker: o.worker.clone(),
                    input_files: task.inputs.iter().map(|f| f.path.clone()).collect(),
                    changes: task.changes.num_rows() as u64,
                    duration_ms: o.duration.as_millis() as u64,
                    attempts: o.attempts,
                    errors: o.errors.clone(),
                    mode: choice.mode.as_str().to_string(),
                    mode_reason: choice.reason.clone(),
                    rewritten_files: task.inputs.iter().zip(&choice.rewrite).filter(|(_, r)| **r).map(|(f, _)| f.path.clone()).collect(),
                    ..Default::default()
                };
                match &o.response {
                    Some(r) => {
                        tr.output_files = r.files.iter().map(|f| f.path.clone()).collect();
                        tr.rows_read = r.rows_read;
                        tr.rows_written = r.rows_written;
                        tr.bytes_read = r.bytes_read;
                        tr.bytes_written = r.bytes_written;
                        rec.rows_inserted += r.rows_inserted;
                        rec.rows_updated += r.rows_updated;
                        rec.rows_deleted += r.rows_deleted;
                        rec.bytes_read += r.bytes_read;
                        rec.bytes_written += r.bytes_written;
                        outputs.extend(r.files.iter().cloned());
                        for d in &r.deletions {
                            // Only an input of the task may get a deletion vector.
                            // Only an input the task left in place may get a deletion vector.
                            let Some((input, _)) = task.inputs.iter().zip(&choice.rewrite).find(|(f, rewrite)| f.path == d.path && !**rewrite) else {
                                return Err(Error::Internal(format!("task {task_no}: worker returned a deletion vector for {}, not an input left in place", d.path)));
                            };
                            let Some(wire) = d.deletion_vector.as_ref() else {
                                return Err(Error::Internal(format!("task {task_no}: no deletion vector for {}", d.path)));
                            };
                            let descriptor = dv::from_proto(wire, &d.path)?;
                            if choice.mode != cost::Mode::DeletionVectors || input.num_records.is_some_and(|n| descriptor.cardinality.max(0) as u64 > n) {
                                return Err(Error::Internal(format!("task {task_no}: deletion vector for {} does not fit the task", d.path)));
                            }
                            tr.files_with_new_deletions.push(d.path.clone());
                            if let Some(f) = current.iter_mut().find(|f| f.path == d.path) {
                                f.deletion_vector = Some(descriptor.clone());
                            }
                            redeleted.insert(d.path.clone(), descriptor);
                        }
                    }
                    None => failed.push(format!("task {task_no}: {}", o.errors.join("; "))),
                }
                rec.tasks.push(tr);
                task_no += 1;
            }
            if !failed.is_empty() {
                orphans::abandon(t.store.clone(), log.clone(), &inflight, grace);
                return Err(Error::Internal(format!("{} task(s) failed: {}", failed.len(), failed.join(" | "))));
            }
            // The round's inputs leave the table: files of the snapshot are removed by the
            // commit; files of an earlier round were never committed (the sweep takes them).
            // (Deletion-vector tasks leave their inputs in place.)
            let rewritten = || p.tasks.iter().zip(&choices).flat_map(|(t, c)| t.inputs.iter().zip(&c.rewrite).filter(|(_, r)| **r).map(|(f, _)| f));
            let consumed: HashSet<&str> = rewritten().map(|f| f.path.as_str()).collect();
            for f in rewritten() {
                if !added.iter().any(|a| a.path == f.path) {
                    removed.push(snapshot_entries.get(&f.path).cloned().unwrap_or_else(|| f.clone()));
                    redeleted.remove(&f.path);
                }
            }
            added.retain(|a| !consumed.contains(a.path.as_str()));
            current.retain(|f| !consumed.contains(f.path.as_str()));
            for o in &outputs {
                current.push(output_entry(def, o)?);
            }
            added.extend(outputs);
        }
        if rounds > 1 {
            tracing::info!(rounds, changes = rec.changes, "a large transaction or backlog applied in rounds, one commit");
        }
        inner.crash_point(CrashPoint::AfterRewrite)?;

        rec.files_rewritten = removed.len() as u64;
        rec.files_added = added.len() as u64;
        let changed_rows = rec.rows_inserted + rec.rows_updated + rec.rows_deleted;
        let avg_row = if total_rows > 0 { total_bytes as f64 / total_rows as f64 } else { 0.0 };
        rec.write_amplification = if changed_rows > 0 && avg_row > 0.0 { rec.bytes_written as f64 / (changed_rows as f64 * avg_row) } else { 0.0 };
        let metrics = serde_json::json!({
            "changes": rec.changes, "keys": rec.keys,
            "filesRewritten": rec.files_rewritten, "filesAdded": rec.files_added,
            "rowsInserted": rec.rows_inserted, "rowsUpdated": rec.rows_updated, "rowsDeleted": rec.rows_deleted,
            "bytesRead": rec.bytes_read, "bytesWritten": rec.bytes_written,
            "firstSequence": rec.first_sequence, "lastSequence": rec.last_sequence,
            "epoch": inner.epoch, "coordinator": inner.node_id,
        });
        let redeleted: Vec<(FileEntry, DeletionVectorDescriptor)> = redeleted
            .into_iter()
            .filter_map(|(path, d)| Some((snapshot_entries.get(&path)?.clone(), d)))
            .collect();
        let actions = commit::actions(&removed, &added, &redeleted);
        // The last moment to find out that another coordinator leads now.
        inner.fence.check().await.inspect_err(|_| orphans::abandon(t.store.clone(), log.clone(), &inflight, grace))?;
        rec.delta_version = commit::commit(def, &mut table, actions, rec.last_sequence, &producers, &id, metrics, &inner.fence).await
            // Not committed (as far as the log says now): the sweep asks the log again.
            .inspect_err(|_| orphans::abandon(t.store.clone(), log.clone(), &inflight, grace))?;
        rec.set_state(CycleState::Committed);
        phases.end("commit");
        inner.crash_point(CrashPoint::AfterCommit)?;

        if retried {
            // Earlier attempts may have left files (or still be writing them).
            orphans::sweep_later(t.store.clone(), log, inflight, grace);
        } else if rounds > 1 {
            // The files of earlier rounds were rewritten by later ones and never committed;
            // no attempt can still be writing.
            orphans::sweep_later(t.store.clone(), log, inflight, Duration::ZERO);
        } else {
            // One attempt per task, all committed: no file to sweep. A record left behind is
            // swept by the next recovery, which keeps what the log references.
            if let Err(e) = orphans::delete_record(&t.store, &id).await {
                tracing::warn!(error = %e, "committed; could not delete the in-flight record");
            }
        }
        Ok(())
    }
    .await;

    match result {
        Ok(()) => {
            // Applied segments leave memory and the staging log.
            let applied_last = rec.last_sequence;
            t.pending
                .lock()
                .expect("lock")
                .segments
                .retain(|s| s.last > applied_last);
            for s in segments.iter().filter(|s| s.last <= applied_last) {
                if let Err(e) = delete_segment(&t.store, &s.path).await {
                    tracing::warn!(error = %e, "could not delete applied staging segment; recovery will");
                }
            }
            // Producers whose last batch is applied can be learnt again from the log: the
            // memory of many producers stays bounded.
            {
                let mut producers = t.producers.lock().expect("lock");
                if producers.len() > MAX_PRODUCERS_IN_MEMORY {
                    producers.retain(|_, p| p.sequence > applied_last);
                }
            }
            phases.end("cleanup");
            if more {
                // A backlog: the next bounded cycle starts at once.
                t.wake.notify_one();
            }
            rec.freshness_lag_ms =
                (chrono::Utc::now().timestamp_millis() - oldest_ack).max(0) as u64;
        }
        Err(ref e) => {
            if matches!(e, Error::Injected(_) | Error::LeadershipLost(_)) {
                return Err(result.unwrap_err());
            }
            rec.set_state(CycleState::Failed);
            rec.error = e.to_string();
            tracing::warn!(error = %e, "cycle failed");
        }
    }
    rec.phases = phases.list;
    rec.duration_ms = started.elapsed().as_millis() as u64;
    if rec.state() == CycleState::Committed {
        tracing::info!(
            version = rec.delta_version,
            changes = rec.changes,
            files_rewritten = rec.files_rewritten,
            files_total = rec.files_total,
            bytes_written = rec.bytes_written,
            ms = rec.duration_ms,
            "cycle committed"
        );
    }
    Ok(rec)
}

/// Idempotent producers remembered per table beyond which those already applied are
/// forgotten (the Delta log's txn actions still know them).
const MAX_PRODUCERS_IN_MEMORY: usize = 10_000;

/// How many of the oldest pending segments a cycle takes: up to `cap` bytes (at least one
/// segment), never ending inside a chunked transaction (whose chunks are taken together,
/// beyond the cap if need be) and never taking a transaction whose last chunk is not staged.
pub(crate) fn select(segments: &[PendingSegment], cap: u64) -> usize {
    let (mut bytes, mut boundary) = (0u64, 0usize);
    for (i, s) in segments.iter().enumerate() {
        if bytes > 0 && bytes + s.bytes > cap && boundary == i {
            break;
        }
        bytes += s.bytes;
        if !s.open {
            boundary = i + 1;
        }
    }
    boundary
}

/// Splits a cycle's segments into rounds of at most `cap` bytes (at least one segment each).
pub(crate) fn rounds_of<'a>(
    segments: &[&'a PendingSegment],
    cap: u64,
) -> Vec<Vec<&'a PendingSegment>> {
    let mut rounds: Vec<Vec<&PendingSegment>> = Vec::new();
    let mut bytes = 0u64;
    for s in segments {
        match rounds.last_mut() {
            Some(r) if bytes + s.bytes <= cap => r.push(s),
            _ => {
                rounds.push(vec![s]);
                bytes = 0;
            }
        }
        bytes += s.bytes;
    }
    rounds
}

/// A file a worker wrote, as the planner sees files (for the next round of a cycle).
fn output_entry(def: &freshet_common::table::TableDef, o: &OutputFile) -> Result<FileEntry> {
    let types = def.local_key_types();
    let key = |json: &str| {
        freshet_common::key::key_from_json(json, &types)
            .map_err(|e| Error::Internal(format!("worker output {}: bad key range: {e}", o.path)))
    };
    let num_records = serde_json::from_str::<serde_json::Value>(&o.stats_json)
        .ok()
        .and_then(|v| v.get("numRecords")?.as_u64());
    Ok(FileEntry {
        path: o.path.clone(),
        size: o.size,
        partition_values: o.partition_values.clone(),
        num_records,
        range: Some((key(&o.min_key_json)?, key(&o.max_key_json)?)),
        deletion_vector: None,
        stats: Some(o.stats_json.clone()),
        tags: HashMap::from([
            (
                freshet_common::delta::TAG_MIN_KEY.to_string(),
                Some(o.min_key_json.clone()),
            ),
            (
                freshet_common::delta::TAG_MAX_KEY.to_string(),
                Some(o.max_key_json.clone()),
            ),
        ]),
        modification_time: o.modification_time,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(first: u64, bytes: u64, open: bool) -> PendingSegment {
        PendingSegment {
            first,
            last: first,
            path: object_store::path::Path::from(format!("s{first}")),
            batches: None,
            skip: Vec::new(),
            rows: 1,
            bytes,
            acked_at_ms: 0,
            producers: Vec::new(),
            open,
        }
    }

    #[test]
    fn cycles_take_bounded_work_and_whole_transactions() {
        let closed = |n: u64| seg(n, 10, false);
        // Bounded: 25 bytes take two segments of 10.
        assert_eq!(select(&[closed(1), closed(2), closed(3)], 25), 2);
        // At least one segment, however large.
        assert_eq!(select(&[seg(1, 100, false), closed(2)], 25), 1);
        // A chunked transaction (open, open, closed) is taken whole, beyond the cap.
        let txn = [
            closed(1),
            seg(2, 10, true),
            seg(3, 10, true),
            closed(4),
            closed(5),
        ];
        assert_eq!(select(&txn, 15), 1);
        assert_eq!(select(&txn[1..], 15), 3);
        // A transaction whose last chunk is not staged yet is not taken at all.
        assert_eq!(select(&[closed(1), seg(2, 10, true)], 100), 1);
        assert_eq!(select(&[seg(2, 10, true)], 100), 0);
        // Rounds split anywhere, bounded.
        let all: Vec<_> = txn.iter().collect();
        let r = rounds_of(&all, 25);
        assert_eq!(r.iter().map(|r| r.len()).collect::<Vec<_>>(), vec![2, 2, 1]);
    }
}
