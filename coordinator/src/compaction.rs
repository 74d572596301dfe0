//! Background compaction: folds file groups that no change touches back into key-sorted,
//! target-size files without deleted rows.
//!
//! Cycles fold a group when they touch it (`cost`); groups left alone keep their debt:
//! deletion vectors, the small files of earlier cycles, files that deletes shrank, and the
//! overlapping files of foreign tables. When a table is idle (nothing pending, not paused)
//! and `[compaction] interval_ms` has passed since its last run, the table loop runs one
//! compaction under the table's Delta lock: it never overlaps the table's own cycles (so it
//! cannot conflict with them), and a run is bounded by `max_bytes_per_run`, so changes that
//! arrive meanwhile wait at most about one cycle's rewrite. A run is one Delta commit of
//! Remove + Add actions with `dataChange = false` (streaming readers skip it) and its own
//! `txn` (`<table app id>:compaction`), by which a lost commit reply is settled. A failed
//! run (a task, a conflict with another writer) is logged and recorded; its files are swept
//! like an abandoned cycle's, and the table's cycles go on.
//!
//! Candidates, per partition, in key order over the groups of `planner::groups`:
//! - a group of several files (DV deltas, overlapping foreign files), or one whose deleted
//!   rows reach `fold_deleted_fraction` of its rows;
//! - runs of neighbouring groups smaller than `small_fraction` of the target size, merged
//!   while the run stays within the target (files only split in cycles; this merges them).
//!   Neighbours have no group between them, so the merged range overlaps nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use freshet_common::changes::change_schema;
use freshet_common::delta::{FileEntry, files};
use freshet_common::dv;
use freshet_common::error::{Error, Result};
use freshet_common::table::partition_dir;
use freshet_proto::admin::v1::{CycleRecord, CycleState, TaskRecord};
use freshet_proto::worker::v1::{InputFile, MergeMode, RewriteRequest, TableSpec};
use tracing::Instrument;

use crate::commit;
use crate::context::TermContext;
use crate::orphans::{self, InflightRecord};
use crate::planner::groups;
use crate::tables::TableRuntime;

/// One unit of compaction: files rewritten together.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub inputs: Vec<FileEntry>,
    pub partition_values: std::collections::HashMap<String, String>,
    pub reason: String,
}

impl Candidate {
    fn bytes(&self) -> u64 {
        self.inputs.iter().map(|f| f.size).sum()
    }
    /// Debt first: most files, then most deleted rows.
    fn debt(&self) -> (usize, u64) {
        (
            self.inputs.len(),
            self.inputs.iter().map(|f| f.deleted_rows()).sum(),
        )
    }
}

/// Picks what to compact, most debt first, within `max_bytes` of inputs (at least one
/// candidate when any exists, whatever its size).
pub fn candidates(
    active: &[FileEntry],
    partition_by: &[String],
    target: u64,
    cfg: &freshet_common::config::CompactionConfig,
) -> Vec<Candidate> {
    let mut parts: std::collections::BTreeMap<Vec<(String, String)>, Vec<&FileEntry>> =
        Default::default();
    for f in active {
        let mut key: Vec<(String, String)> = partition_by
            .iter()
            .map(|c| {
                (
                    c.clone(),
                    f.partition_values.get(c).cloned().unwrap_or_default(),
                )
            })
            .collect();
        key.sort();
        parts.entry(key).or_default().push(f);
    }
    let small = (target as f64 * cfg.small_fraction) as u64;
    let mut out = Vec::new();
    for (key, pfiles) in parts {
        let pv: std::collections::HashMap<String, String> = key.into_iter().collect();
        let gs = groups(pfiles);
        let mut run: Vec<&FileEntry> = Vec::new();
        let mut run_groups = 0;
        let flush =
            |run: &mut Vec<&FileEntry>, run_groups: &mut usize, out: &mut Vec<Candidate>| {
                if *run_groups >= 2 {
                    out.push(Candidate {
                        inputs: run.iter().map(|f| (*f).clone()).collect(),
                        partition_values: pv.clone(),
                        reason: format!("merge {run_groups} small neighbouring groups"),
                    });
                }
                run.clear();
                *run_groups = 0;
            };
        for g in &gs {
            let physical: u64 = g.files.iter().map(|f| f.num_records.unwrap_or(0)).sum();
            let deleted: u64 = g.files.iter().map(|f| f.deleted_rows()).sum();
            let holey =
                deleted > 0 && deleted as f64 >= cfg.fold_deleted_fraction * physical.max(1) as f64;
            if g.files.len() >= 2 || holey {
                flush(&mut run, &mut run_groups, &mut out);
                out.push(Candidate {
                    inputs: g.files.iter().map(|f| (*f).clone()).collect(),
                    partition_values: pv.clone(),
                    reason: if g.files.len() >= 2 {
                        format!("fold a group of {} files", g.files.len())
                    } else {
                        format!("fold {deleted} deleted of {physical} rows")
                    },
                });
                continue;
            }
            let run_bytes: u64 = run.iter().map(|f| f.size).sum();
            if g.size < small && run_bytes + g.size <= target {
                run.extend(g.files.iter().copied());
                run_groups += 1;
            } else {
                flush(&mut run, &mut run_groups, &mut out);
                if g.size < small {
                    run.extend(g.files.iter().copied());
                    run_groups = 1;
                }
            }
        }
        flush(&mut run, &mut run_groups, &mut out);
    }
    out.sort_by(|a, b| b.debt().cmp(&a.debt()));
    let mut budget = cfg.max_bytes_per_run;
    let mut chosen = Vec::new();
    for c in out {
        if !chosen.is_empty() && c.bytes() > budget {
            continue;
        }
        budget = budget.saturating_sub(c.bytes());
        chosen.push(c);
    }
    chosen
}

/// Runs one compaction of the table if anything is due; the record of what it did (`None`
/// when nothing was due).
pub async fn run_compaction(
    ctx: &TermContext,
    t: &Arc<TableRuntime>,
) -> Result<Option<CycleRecord>> {
    let id = uuid::Uuid::now_v7().to_string();
    let span = tracing::info_span!("compaction", cycle_id = %id, table = %t.def.name);
    run(ctx, t, id).instrument(span).await
}

async fn run(ctx: &TermContext, t: &Arc<TableRuntime>, id: String) -> Result<Option<CycleRecord>> {
    let def = &t.def;
    let started = Instant::now();
    let mut table = t.delta.lock().await;
    table
        .update_state()
        .await
        .map_err(|e| Error::delta(&def.name, e))?;
    let active = files(def, &table)?;
    let chosen = candidates(
        &active,
        &def.partition_by,
        def.target_file_size,
        &ctx.config.compaction,
    );
    if chosen.is_empty() {
        return Ok(None);
    }
    let mut rec = CycleRecord {
        id: id.clone(),
        table: def.name.clone(),
        kind: "compaction".into(),
        started_at_ms: chrono::Utc::now().timestamp_millis(),
        delta_version: -1,
        epoch: ctx.epoch,
        coordinator: ctx.node_id.clone(),
        files_total: active.len() as u64,
        ..Default::default()
    };
    let grace = Duration::from_millis(ctx.config.cycle.orphan_grace_ms);
    let log = table.log_store();
    let mut inflight = InflightRecord {
        cycle_id: id.clone(),
        last_sequence: 0,
        dirs: chosen
            .iter()
            .map(|c| partition_dir(&def.partition_by, &c.partition_values))
            .collect(),
        aborted: false,
        read_version: table.version().map(|v| v as u64),
    };
    inflight.dirs.sort();
    inflight.dirs.dedup();
    let result = async {
        orphans::write_record(&t.store, &inflight).await?;
        let cschema = change_schema(def);
        let empty = freshet_common::ipc::encode(
            &cschema,
            &[arrow::record_batch::RecordBatch::new_empty(cschema.clone())],
        )?;
        let spec = TableSpec {
            name: def.name.clone(),
            uri: def.uri.clone(),
            schema_ipc: freshet_common::ipc::encode_schema(&def.schema)?,
            primary_key: def.primary_key.clone(),
            partition_columns: def.partition_by.clone(),
        };
        let requests: Vec<RewriteRequest> = chosen
            .iter()
            .enumerate()
            .map(|(i, c)| RewriteRequest {
                cycle_id: id.clone(),
                task_id: i as u64,
                attempt: 1,
                epoch: ctx.epoch,
                table: Some(spec.clone()),
                inputs: c
                    .inputs
                    .iter()
                    .map(|f| InputFile {
                        path: f.path.clone(),
                        size: f.size,
                        deletion_vector: f.deletion_vector.as_ref().map(dv::to_proto),
                        rewrite: true,
                    })
                    .collect(),
                partition_values: c.partition_values.clone(),
                changes_ipc: empty.clone(),
                target_file_size: def.target_file_size,
                mode: MergeMode::CopyOnWrite as i32,
            })
            .collect();
        let weights: Vec<u64> = chosen.iter().map(|c| c.bytes()).collect();
        let outcomes = ctx
            .router
            .run(
                requests,
                &weights,
                ctx.config.cycle.max_attempts,
                Duration::from_millis(ctx.config.cycle.task_timeout_ms),
            )
            .await;
        let mut removed = Vec::new();
        let mut added = Vec::new();
        let mut failed = Vec::new();
        for (i, (c, o)) in chosen.iter().zip(&outcomes).enumerate() {
            let mut tr = TaskRecord {
                task_id: i as u64,
                worker: o.worker.clone(),
                input_files: c.inputs.iter().map(|f| f.path.clone()).collect(),
                duration_ms: o.duration.as_millis() as u64,
                attempts: o.attempts,
                errors: o.errors.clone(),
                mode: "copy_on_write".into(),
                mode_reason: c.reason.clone(),
                ..Default::default()
            };
            match &o.response {
                Some(r) => {
                    tr.output_files = r.files.iter().map(|f| f.path.clone()).collect();
                    tr.rows_read = r.rows_read;
                    tr.rows_written = r.rows_written;
                    tr.bytes_read = r.bytes_read;
                    tr.bytes_written = r.bytes_written;
                    rec.bytes_read += r.bytes_read;
                    rec.bytes_written += r.bytes_written;
                    if r.rows_written != r.rows_read {
                        failed.push(format!(
                            "task {i}: read {} live rows but wrote {}",
                            r.rows_read, r.rows_written
                        ));
                    }
                    removed.extend(c.inputs.iter().cloned());
                    added.extend(r.files.iter().cloned());
                }
                None => failed.push(format!("task {i}: {}", o.errors.join("; "))),
            }
            rec.tasks.push(tr);
        }
        if !failed.is_empty() {
            return Err(Error::Internal(format!(
                "compaction: {} task(s) failed: {}",
                failed.len(),
                failed.join(" | ")
            )));
        }
        rec.files_rewritten = removed.len() as u64;
        rec.files_added = added.len() as u64;
        let metrics = serde_json::json!({
            "compaction": true,
            "filesRewritten": rec.files_rewritten, "filesAdded": rec.files_added,
            "bytesRead": rec.bytes_read, "bytesWritten": rec.bytes_written,
            "epoch": ctx.epoch, "coordinator": ctx.node_id,
        });
        let actions = commit::rearranging(commit::actions(&removed, &added, &[]));
        ctx.fence.check().await?;
        rec.delta_version =
            commit::commit_compaction(def, &mut table, actions, &id, metrics, &ctx.fence).await?;
        Ok(())
    }
    .await;
    rec.duration_ms = started.elapsed().as_millis() as u64;
    match result {
        Ok(()) => {
            rec.set_state(CycleState::Committed);
            if rec.tasks.iter().any(|t| t.attempts > 1) {
                orphans::sweep_later(t.store.clone(), log, inflight, grace);
            } else if let Err(e) = orphans::delete_record(&t.store, &id).await {
                tracing::warn!(error = %e, "compacted; could not delete the in-flight record");
            }
            tracing::info!(
                files_rewritten = rec.files_rewritten,
                files_added = rec.files_added,
                version = rec.delta_version,
                "compaction committed"
            );
        }
        Err(e) => {
            orphans::abandon(t.store.clone(), log, &inflight, grace);
            rec.set_state(CycleState::Failed);
            rec.error = e.to_string();
            tracing::warn!(error = %e, "compaction failed; the table's cycles go on");
        }
    }
    Ok(Some(rec))
}

#[cfg(test)]
mod tests {
    use super::*;
    use freshet_common::config::CompactionConfig;
    use freshet_common::key::KeyPart;
    use std::collections::HashMap;

    fn file(name: &str, lo: i64, hi: i64, size: u64, rows: u64, deleted: u64) -> FileEntry {
        FileEntry {
            path: name.into(),
            size,
            partition_values: HashMap::new(),
            num_records: Some(rows),
            range: Some((
                vec![KeyPart::Int(lo as i128)],
                vec![KeyPart::Int(hi as i128)],
            )),
            deletion_vector: (deleted > 0).then(|| deltalake::kernel::DeletionVectorDescriptor {
                storage_type: Default::default(),
                path_or_inline_dv: "x".into(),
                offset: Some(1),
                size_in_bytes: 1,
                cardinality: deleted as i64,
            }),
            stats: None,
            tags: HashMap::new(),
            modification_time: 0,
        }
    }

    fn names(c: &[Candidate]) -> Vec<Vec<String>> {
        c.iter()
            .map(|c| c.inputs.iter().map(|f| f.path.clone()).collect())
            .collect()
    }

    #[test]
    fn overlapping_groups_holey_files_and_small_neighbours_are_compacted() {
        let cfg = CompactionConfig::default();
        let target = 1000;
        let files = vec![
            file("a", 0, 9, 900, 100, 0),   // healthy
            file("b", 10, 19, 900, 100, 0), // a group with its delta file "b2"
            file("b2", 12, 15, 50, 4, 0),
            file("c", 20, 29, 900, 100, 30), // 30% deleted
            file("d", 30, 39, 100, 10, 0),   // three small neighbours
            file("e", 40, 49, 100, 10, 0),
            file("f", 50, 59, 100, 10, 0),
            file("g", 60, 69, 900, 100, 5), // healthy, few deletes
            file("h", 70, 79, 100, 10, 0),  // small, alone: nothing to merge with
        ];
        let c = candidates(&files, &[], target, &cfg);
        let mut got = names(&c);
        got.sort();
        assert_eq!(
            got,
            vec![
                vec!["b".to_string(), "b2".into()],
                vec!["c".into()],
                vec!["d".into(), "e".into(), "f".into()],
            ]
        );
        // The budget keeps the most indebted first, and at least one.
        let tight = CompactionConfig {
            max_bytes_per_run: 1,
            ..cfg.clone()
        };
        assert_eq!(names(&candidates(&files, &[], target, &tight)).len(), 1);
        // A healthy table has nothing to do.
        assert!(candidates(&files[..1], &[], target, &cfg).is_empty());
    }

    #[test]
    fn merged_neighbours_stay_within_the_target() {
        let cfg = CompactionConfig::default();
        let files: Vec<FileEntry> = (0..10)
            .map(|i| file(&format!("s{i}"), i * 10, i * 10 + 9, 300, 30, 0))
            .collect();
        for c in candidates(&files, &[], 1000, &cfg) {
            assert!(c.bytes() <= 1000, "{:?}", names(&[c.clone()]));
            assert!(c.inputs.len() >= 2);
        }
    }
}
