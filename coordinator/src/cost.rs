//! The per-group cost model: copy-on-write or deletion vectors for each task.
//!
//! A task's inputs are a file group (every file whose key range covers one of its keys).
//! Copy-on-write re-encodes the whole group now and leaves it clean: one or a few
//! key-sorted files, no deleted rows. Deletion vectors cost a scan of the group's key
//! columns plus the changed rows now, and leave debt: one more small file in the group, and
//! deleted rows that every reader still decodes and drops. The debt is paid by folding: once
//! a group holds [`FOLD_FILES`] files or [`FOLD_DELETED`] of its rows are deleted, the next
//! task on it is copy-on-write, which rewrites the group into target-size files (inline
//! compaction; `compaction` folds groups that no change touches).
//!
//! In `auto` mode two more rules favour copy-on-write where its price is small: a group
//! below [`SMALL_GROUP_BYTES`] (re-encoding it costs about what a DV task costs), and a
//! task changing at least [`COW_CHANGED`] of the group's live rows (most of the group is
//! re-encoded for its own sake). The choice and its reason go into the cycle record.

use freshet_common::table::MergeMode;

use crate::planner::Task;

/// A group with this many files is folded (rewritten) by the next task on it.
pub const FOLD_FILES: usize = 8;
/// A group with this share of its rows deleted (after the task) is folded.
pub const FOLD_DELETED: f64 = 0.25;
/// `auto`: a group smaller than this is rewritten (re-encoding it is cheap).
pub const SMALL_GROUP_BYTES: u64 = 4 * 1024 * 1024;
/// `auto`: a task changing this share of the group's live rows rewrites it.
pub const COW_CHANGED: f64 = 0.10;

/// How a task applies its changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Rewrite the inputs.
    CopyOnWrite,
    /// Deletion vectors on the inputs left in place (some small ones may be rewritten),
    /// changed rows to new files.
    DeletionVectors,
}

impl Mode {
    /// The record's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::CopyOnWrite => "copy_on_write",
            Mode::DeletionVectors => "deletion_vectors",
        }
    }
}

/// A task's mode, per input whether it is rewritten, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub mode: Mode,
    /// Per input (in the task's order): rewritten (true) or left in place with a deletion
    /// vector (false). All true under copy-on-write.
    pub rewrite: Vec<bool>,
    pub reason: String,
    /// This choice folds the group (copy-on-write because of its debt), subject to the
    /// cycle's fold budget.
    pub fold: bool,
}

fn cow(task: &Task, reason: String) -> Choice {
    Choice {
        mode: Mode::CopyOnWrite,
        rewrite: vec![true; task.inputs.len()],
        reason,
        fold: false,
    }
}

/// A file below this share of the target size is "small": in deletion-vector mode it is
/// rewritten with the changes rather than given a deletion vector.
pub const SMALL_FILE: f64 = 0.125;

/// Chooses a task's mode. `dv_enabled`: the table's protocol has deletion vectors.
/// `uncommitted`: the group holds a file written earlier in this cycle (a multi-round
/// cycle), which is rewritten rather than given a deletion vector before its first commit.
pub fn choose(
    table_mode: MergeMode,
    dv_enabled: bool,
    task: &Task,
    uncommitted: bool,
    target_file_size: u64,
) -> Choice {
    if task.inputs.is_empty() {
        return cow(task, "new file: no existing file holds these keys".into());
    }
    match table_mode {
        MergeMode::CopyOnWrite => return cow(task, "table merge_mode = copy_on_write".into()),
        _ if !dv_enabled => {
            return cow(task, "the table's protocol has no deletion vectors".into());
        }
        _ => {}
    }
    if uncommitted {
        return cow(task, "the group holds a file this cycle wrote".into());
    }
    let files = task.inputs.len();
    let physical: u64 = task.inputs.iter().map(|f| f.num_records.unwrap_or(0)).sum();
    let deleted: u64 = task.inputs.iter().map(|f| f.deleted_rows()).sum();
    let live = physical.saturating_sub(deleted);
    let bytes: u64 = task.inputs.iter().map(|f| f.size).sum();
    let changed = task.changes.num_rows() as u64;
    if files >= FOLD_FILES {
        let mut c = cow(
            task,
            format!("fold: the group has {files} files (>= {FOLD_FILES})"),
        );
        c.fold = true;
        return c;
    }
    // At most `changed` more rows deleted after this task.
    let deleted_after = (deleted + changed.min(live)) as f64 / physical.max(1) as f64;
    if deleted > 0 && deleted_after >= FOLD_DELETED {
        let mut c = cow(
            task,
            format!(
                "fold: {:.0}% of the group's rows deleted (>= {:.0}%)",
                deleted_after * 100.0,
                FOLD_DELETED * 100.0
            ),
        );
        c.fold = true;
        return c;
    }
    if table_mode == MergeMode::Auto {
        if bytes < SMALL_GROUP_BYTES {
            return cow(
                task,
                format!("small group: {bytes} bytes (< {SMALL_GROUP_BYTES})"),
            );
        }
        let share = changed as f64 / live.max(1) as f64;
        if share >= COW_CHANGED {
            return cow(
                task,
                format!(
                    "{changed} of {live} live rows changed ({:.1}% >= {:.0}%)",
                    share * 100.0,
                    COW_CHANGED * 100.0
                ),
            );
        }
    }
    deletion_vectors(
        task,
        target_file_size,
        format!(
            "{changed} of {live} live rows changed in {files} file(s) of {bytes} bytes; {deleted} rows deleted already"
        ),
    )
}

/// Deletion vectors on the group's large files; its small files (below [`SMALL_FILE`] of
/// the target) are rewritten with the changes, so the group keeps one small file, not one
/// per cycle.
fn deletion_vectors(task: &Task, target_file_size: u64, reason: String) -> Choice {
    let small = (target_file_size as f64 * SMALL_FILE) as u64;
    let rewrite: Vec<bool> = task.inputs.iter().map(|f| f.size < small).collect();
    if rewrite.iter().all(|r| *r) {
        return cow(
            task,
            format!("every file of the group is small (< {small} bytes)"),
        );
    }
    let n = rewrite.iter().filter(|r| **r).count();
    Choice {
        mode: Mode::DeletionVectors,
        reason: if n > 0 {
            format!("{reason}; {n} small file(s) rewritten")
        } else {
            reason
        },
        rewrite,
        fold: false,
    }
}

/// Chooses every task of a cycle: [`choose`] per task, then at most `max(1, tasks / 8)`
/// folds per cycle (most deleted rows first), so groups that reach their limits together
/// (uniform changes touch every group alike) fold over several cycles instead of
/// rewriting the whole table in one; the others stay on deletion vectors this cycle.
pub fn choose_all(
    table_mode: MergeMode,
    dv_enabled: bool,
    tasks: &[Task],
    uncommitted: &[bool],
    target_file_size: u64,
) -> Vec<Choice> {
    let mut out: Vec<Choice> = tasks
        .iter()
        .zip(uncommitted)
        .map(|(t, u)| choose(table_mode, dv_enabled, t, *u, target_file_size))
        .collect();
    let grouped = tasks.iter().filter(|t| !t.inputs.is_empty()).count();
    let budget = grouped.div_ceil(FOLDS_PER_CYCLE_DIVISOR).max(1);
    let mut folds: Vec<usize> = (0..out.len()).filter(|&i| out[i].fold).collect();
    let debt = |t: &Task| {
        let physical: u64 = t.inputs.iter().map(|f| f.num_records.unwrap_or(0)).sum();
        let deleted: u64 = t.inputs.iter().map(|f| f.deleted_rows()).sum();
        (deleted as f64 / physical.max(1) as f64, t.inputs.len())
    };
    folds.sort_by(|&a, &b| {
        debt(&tasks[b])
            .partial_cmp(&debt(&tasks[a]))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    for &i in folds.iter().skip(budget) {
        let reason = format!(
            "fold deferred ({budget} per cycle): {}",
            out[i].reason.trim_start_matches("fold: ")
        );
        out[i] = deletion_vectors(&tasks[i], target_file_size, reason);
    }
    out
}

/// A cycle folds at most one group in this many (at least one).
pub const FOLDS_PER_CYCLE_DIVISOR: usize = 8;

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int8Array, Int64Array};
    use arrow::datatypes::{DataType, Field, Schema};
    use arrow::record_batch::RecordBatch;
    use freshet_common::delta::FileEntry;
    use std::collections::HashMap;
    use std::sync::Arc;

    fn task(files: &[(u64, u64, u64)], changes: usize) -> Task {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("__op", DataType::Int8, false),
        ]));
        Task {
            inputs: files
                .iter()
                .enumerate()
                .map(|(i, &(size, rows, deleted))| FileEntry {
                    path: format!("f{i}"),
                    size,
                    partition_values: HashMap::new(),
                    num_records: Some(rows),
                    range: None,
                    deletion_vector: (deleted > 0).then(|| {
                        deltalake::kernel::DeletionVectorDescriptor {
                            storage_type: Default::default(),
                            path_or_inline_dv: "x".into(),
                            offset: Some(1),
                            size_in_bytes: 1,
                            cardinality: deleted as i64,
                        }
                    }),
                    stats: None,
                    tags: HashMap::new(),
                    modification_time: 0,
                })
                .collect(),
            partition_values: HashMap::new(),
            changes: RecordBatch::try_new(
                schema,
                vec![
                    Arc::new(Int64Array::from_iter_values(0..changes as i64)),
                    Arc::new(Int8Array::from(vec![0; changes])),
                ],
            )
            .unwrap(),
        }
    }

    const MB: u64 = 1024 * 1024;

    #[test]
    fn the_rules_in_order() {
        use MergeMode::*;
        let c = |m, dv, t: &Task| choose(m, dv, t, false, 64 * MB).mode;
        let big = task(&[(64 * MB, 1_000_000, 0)], 1_000);
        assert_eq!(c(Auto, true, &big), Mode::DeletionVectors);
        assert_eq!(c(Auto, false, &big), Mode::CopyOnWrite, "no DV feature");
        assert_eq!(c(CopyOnWrite, true, &big), Mode::CopyOnWrite);
        assert_eq!(
            choose(Auto, true, &big, true, 64 * MB).mode,
            Mode::CopyOnWrite
        );
        assert_eq!(c(Auto, true, &task(&[], 5)), Mode::CopyOnWrite, "new file");
        // Auto rewrites small groups and heavily changed ones; forced DVs do not.
        let small = task(&[(MB, 10_000, 0)], 10);
        assert_eq!(c(Auto, true, &small), Mode::CopyOnWrite);
        assert_eq!(
            choose(DeletionVectors, true, &small, false, 4 * MB).mode,
            Mode::DeletionVectors
        );
        let heavy = task(&[(64 * MB, 1_000_000, 0)], 200_000);
        assert_eq!(c(Auto, true, &heavy), Mode::CopyOnWrite);
        assert_eq!(c(DeletionVectors, true, &heavy), Mode::DeletionVectors);
        // Folding applies to both.
        let many = task(&[(64 * MB, 1_000_000, 0); FOLD_FILES], 10);
        assert_eq!(c(DeletionVectors, true, &many), Mode::CopyOnWrite);
        let holey = task(&[(64 * MB, 1_000_000, 240_000)], 20_000);
        let choice = choose(DeletionVectors, true, &holey, false, 64 * MB);
        assert_eq!(choice.mode, Mode::CopyOnWrite);
        assert!(choice.reason.contains("fold"), "{}", choice.reason);
        let few_holes = task(&[(64 * MB, 1_000_000, 1_000)], 1_000);
        assert_eq!(c(DeletionVectors, true, &few_holes), Mode::DeletionVectors);
        // Per file: the group's small file is rewritten, its large one gets a DV.
        let base_and_delta = task(&[(64 * MB, 1_000_000, 1_000), (MB, 10_000, 0)], 1_000);
        let choice = choose(DeletionVectors, true, &base_and_delta, false, 64 * MB);
        assert_eq!(
            (choice.mode, choice.rewrite.clone()),
            (Mode::DeletionVectors, vec![false, true])
        );
        assert!(
            choice.reason.contains("1 small file(s) rewritten"),
            "{}",
            choice.reason
        );
        // Only small files: copy-on-write.
        let smalls = task(&[(MB, 10_000, 0), (MB, 10_000, 0)], 10);
        assert_eq!(c(DeletionVectors, true, &smalls), Mode::CopyOnWrite);
    }

    #[test]
    fn folds_are_spread_over_cycles() {
        use MergeMode::*;
        // 16 groups all due to fold at once: 2 fold now (the most deleted), 14 wait.
        let tasks: Vec<Task> = (0..16u64)
            .map(|i| task(&[(64 * MB, 1_000_000, 300_000 + i * 1_000)], 1_000))
            .collect();
        let choices = choose_all(DeletionVectors, true, &tasks, &[false; 16], 64 * MB);
        let folded: Vec<usize> = (0..16)
            .filter(|&i| choices[i].mode == Mode::CopyOnWrite)
            .collect();
        assert_eq!(folded, vec![14, 15]);
        assert!(
            choices[0].reason.starts_with("fold deferred"),
            "{}",
            choices[0].reason
        );
        // A single group always may fold.
        let one = choose_all(DeletionVectors, true, &tasks[..1], &[false], 64 * MB);
        assert_eq!(one[0].mode, Mode::CopyOnWrite);
    }
}
