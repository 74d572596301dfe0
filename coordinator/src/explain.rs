//! A dry run of a table's next cycle (`freshet admin explain`): what is pending, which
//! partitions and files it touches, what is pruned and why, bytes to read and write, and
//! the tasks with the worker each would go to first. Reads only; writes nothing.

use std::sync::atomic::Ordering;

use freshet_common::changes::last_change_per_key;
use freshet_common::delta::{applied_sequence, files};
use freshet_common::error::{Error, Result};
use freshet_common::staging::{batch_sequence, read_segment_contents};
use freshet_proto::admin::v1::{ExplainCycleResponse, ExplainTask};

use crate::cycle::{rounds_of, select};
use crate::planner::plan;
use crate::{Coordinator, TermContext};

impl Coordinator {
    /// What the table's next cycle would do with what is pending now.
    pub async fn explain(&self, table: &str) -> Result<ExplainCycleResponse> {
        let t = self.table(table)?;
        let ctx: &TermContext = self.context();
        let def = &t.def;
        let mut out = ExplainCycleResponse {
            table: def.name.clone(),
            ..Default::default()
        };
        let cap = ctx
            .config
            .cycle
            .max_changes_bytes
            .min(ctx.config.server.max_message_bytes as u64 / 2)
            .max(1);
        let (segments, total) = {
            let p = t.pending.lock().expect("lock");
            let n = select(&p.segments, cap);
            (p.segments[..n].to_vec(), p.segments.len())
        };
        // The snapshot the cycle would plan against (the same lock a cycle holds, so a
        // running cycle finishes first and the answer is about the next one).
        let delta = {
            let mut d = t.delta.lock().await;
            d.update_state()
                .await
                .map_err(|e| Error::delta(&def.name, e))?;
            d.clone()
        };
        let active = files(def, &delta)?;
        out.files_total = active.len() as u64;
        let applied = applied_sequence(def, &delta).await?;
        let todo: Vec<_> = segments.iter().filter(|s| s.last > applied).collect();
        out.segments = todo.len() as u64;
        out.segments_left = (total - segments.len()) as u64;
        if t.paused.load(Ordering::SeqCst) {
            out.note = "paused: no cycle runs until the table is resumed".into();
        }
        if todo.is_empty() {
            if out.note.is_empty() {
                out.note = "nothing pending".into();
            }
            return Ok(out);
        }
        out.first_sequence = todo.first().map(|s| s.first).unwrap_or(0);
        out.last_sequence = todo.last().map(|s| s.last).unwrap_or(0);
        let rounds = rounds_of(&todo, cap);
        out.rounds = rounds.len() as u32;
        let mut batches = Vec::new();
        for s in &rounds[0] {
            match &s.batches {
                Some(b) => batches.extend(b.iter().cloned()),
                None => {
                    let c = read_segment_contents(&t.store, &s.path).await?;
                    batches.extend(
                        c.batches
                            .into_iter()
                            .filter(|b| batch_sequence(b).is_none_or(|q| !s.skip.contains(&q))),
                    );
                }
            }
        }
        out.changes = batches.iter().map(|b| b.num_rows() as u64).sum();
        let partitions = last_change_per_key(def, &batches)?;
        drop(batches);
        out.keys = partitions.iter().map(|p| p.batch.num_rows() as u64).sum();
        let p = plan(def, &active, partitions)?;
        out.files_untouched_partitions = p.files_total - p.files_considered;
        out.files_pruned_by_range = p.files_pruned;
        let weights: Vec<u64> = p
            .tasks
            .iter()
            .map(|task| task.input_bytes() + task.changes.get_array_memory_size() as u64)
            .collect();
        let workers = ctx.router.preview(&weights);
        let dv_enabled = freshet_common::delta::deletion_vectors_enabled(&delta);
        let choices = crate::cost::choose_all(
            def.merge_mode,
            dv_enabled,
            &p.tasks,
            &vec![false; p.tasks.len()],
            def.target_file_size,
        );
        for ((task, worker), choice) in p.tasks.iter().zip(workers).zip(choices) {
            let mut partition: Vec<String> = task
                .partition_values
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            partition.sort();
            out.files_to_rewrite += task.inputs.len() as u64;
            out.bytes_to_read += task.input_bytes();
            out.bytes_to_write_estimate +=
                task.input_bytes() + task.changes.get_array_memory_size() as u64;
            out.tasks.push(ExplainTask {
                partition: partition.join("/"),
                inputs: task.inputs.iter().map(|f| f.path.clone()).collect(),
                input_bytes: task.input_bytes(),
                changes: task.changes.num_rows() as u64,
                worker,
                mode: choice.mode.as_str().to_string(),
                mode_reason: choice.reason,
            });
        }
        Ok(out)
    }
}
