//! The planner: a pure function from the table's files and the cycle's changes to tasks.
//!
//! Within a partition, files are grouped into runs whose key ranges overlap (files Freshet
//! writes never overlap, so each group is one file; foreign tables may have wider groups, and
//! a file without usable statistics joins every file of its partition). Each changed key goes
//! to the group whose range covers it; a key in a gap goes to a neighbouring group with room,
//! or to a new file; a delete in a gap needs no work. Rewriting a whole group in one task is
//! what keeps keys unique: no other file can hold a key of the group's range.
//!
//! With deletion vectors a group also holds the small files of earlier cycles' changed
//! rows, and a key's live row may be in any file of its group; the group is still every
//! file whose range covers the key, so a task sees every live version of its keys, whichever
//! mode (`cost`) it then runs in.

use std::collections::HashMap;

use arrow::array::{Array, AsArray, UInt32Array};
use arrow::compute::take_record_batch;
use arrow::datatypes::Int8Type;
use arrow::record_batch::RecordBatch;
use freshet_common::changes::{OP_COLUMN, OP_UPSERT, PartitionChanges};
use freshet_common::delta::FileEntry;
use freshet_common::error::{Error, Result};
use freshet_common::key::{Key, key_at};
use freshet_common::table::TableDef;

/// One unit of work: rewrite `inputs` (possibly none) with `changes`.
#[derive(Debug, Clone)]
pub struct Task {
    /// Files to rewrite; empty for a task that writes new files only.
    pub inputs: Vec<FileEntry>,
    /// The partition's values.
    pub partition_values: HashMap<String, String>,
    /// The changes routed here, one per key, sorted by local key.
    pub changes: RecordBatch,
}

impl Task {
    /// Bytes of input files (for balancing).
    pub fn input_bytes(&self) -> u64 {
        self.inputs.iter().map(|f| f.size).sum()
    }
}

/// A cycle's plan.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// The tasks.
    pub tasks: Vec<Task>,
    /// Active files in the table.
    pub files_total: u64,
    /// Files in the partitions the changes touch.
    pub files_considered: u64,
    /// Files of those that need no rewrite.
    pub files_pruned: u64,
}

/// A run of files with overlapping ranges; `range` is `None` when it covers every key.
pub struct Group<'a> {
    /// The files.
    pub files: Vec<&'a FileEntry>,
    /// The union of their key ranges.
    pub range: Option<(Key, Key)>,
    /// Their bytes.
    pub size: u64,
}

/// A partition's files grouped by overlapping key ranges, in key order (one group of all
/// files when one of them has no range).
pub fn groups<'a>(files: Vec<&'a FileEntry>) -> Vec<Group<'a>> {
    if files.is_empty() {
        return Vec::new();
    }
    if files.iter().any(|f| f.range.is_none()) {
        let size = files.iter().map(|f| f.size).sum();
        return vec![Group {
            files,
            range: None,
            size,
        }];
    }
    let mut files = files;
    files.sort_by(|a, b| {
        a.range
            .as_ref()
            .unwrap()
            .0
            .cmp(&b.range.as_ref().unwrap().0)
    });
    let mut out: Vec<Group<'a>> = Vec::new();
    for f in files {
        let (lo, hi) = f.range.clone().expect("ranged");
        if let Some(last) = out.last_mut() {
            let (_, ghi) = last.range.as_mut().expect("ranged");
            if lo <= *ghi {
                if hi > *ghi {
                    *ghi = hi;
                }
                last.files.push(f);
                last.size += f.size;
                continue;
            }
        }
        out.push(Group {
            files: vec![f],
            range: Some((lo, hi)),
            size: f.size,
        });
    }
    out
}

/// Where a key goes within a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Target {
    /// An existing group.
    Group(usize),
    /// A new file in the gap before group `n` (n = groups.len() means after the last).
    NewBefore(usize),
}

/// Plans a cycle. `files` are the table's active files, `changes` one entry per touched
/// partition (from [`freshet_common::changes::last_change_per_key`]).
pub fn plan(def: &TableDef, files: &[FileEntry], changes: Vec<PartitionChanges>) -> Result<Plan> {
    let mut plan = Plan {
        files_total: files.len() as u64,
        ..Default::default()
    };
    let local_key = def.local_key();
    for part in changes {
        let pfiles: Vec<&FileEntry> = files
            .iter()
            .filter(|f| {
                def.partition_by
                    .iter()
                    .all(|c| f.partition_values.get(c) == part.partition_values.get(c))
            })
            .collect();
        plan.files_considered += pfiles.len() as u64;
        let groups = groups(pfiles);
        let batch = &part.batch;
        let ops = batch
            .column_by_name(OP_COLUMN)
            .expect("op column")
            .as_primitive::<Int8Type>()
            .clone();
        let key_cols: Vec<&dyn Array> = local_key
            .iter()
            .map(|k| batch.column_by_name(k).expect("key column").as_ref())
            .collect();

        let mut routed: std::collections::BTreeMap<Target, Vec<u32>> = Default::default();
        // Upserts in the gap before group n, in key order.
        let mut gaps: std::collections::BTreeMap<usize, Vec<u32>> = Default::default();
        for i in 0..batch.num_rows() {
            let key = key_at(&key_cols, i);
            if groups.len() == 1 && groups[0].range.is_none() {
                routed.entry(Target::Group(0)).or_default().push(i as u32);
                continue;
            }
            // First group whose upper bound is >= key.
            let idx = groups.partition_point(|g| g.range.as_ref().expect("ranged").1 < key);
            if idx < groups.len() && groups[idx].range.as_ref().expect("ranged").0 <= key {
                routed.entry(Target::Group(idx)).or_default().push(i as u32);
            } else if ops.value(i) == OP_UPSERT {
                gaps.entry(idx).or_default().push(i as u32);
            }
            // A delete in a gap needs no work: no file holds the key.
        }
        // Gap keys: a prefix extends the group before the gap while it has room; the rest
        // go all to the group after it (if it has room for them) or all to a new file. Any
        // other split would make ranges overlap.
        let target_size = def.target_file_size;
        let row_size = |g: usize| {
            groups[g]
                .files
                .iter()
                .map(|f| f.size / f.num_records.unwrap_or(1).max(1))
                .max()
                .unwrap_or(1)
                .max(1)
        };
        for (idx, rows) in gaps {
            let mut rest: &[u32] = &rows;
            if idx > 0 {
                let room = target_size.saturating_sub(groups[idx - 1].size) / row_size(idx - 1);
                let take = (room as usize).min(rest.len());
                if take > 0 {
                    routed
                        .entry(Target::Group(idx - 1))
                        .or_default()
                        .extend_from_slice(&rest[..take]);
                }
                rest = &rest[take..];
            }
            if rest.is_empty() {
                continue;
            }
            let fits_next = idx < groups.len()
                && groups[idx].size + rest.len() as u64 * row_size(idx) <= target_size;
            let target = if fits_next {
                Target::Group(idx)
            } else {
                Target::NewBefore(idx)
            };
            let entry = routed.entry(target).or_default();
            entry.extend_from_slice(rest);
            entry.sort_unstable();
        }
        for (target, rows) in routed {
            let mut rows = rows;
            rows.sort_unstable();
            let changes = take_record_batch(batch, &UInt32Array::from(rows))
                .map_err(|e| Error::data("take", e))?;
            let inputs = match target {
                Target::Group(g) => groups[g].files.iter().map(|f| (*f).clone()).collect(),
                Target::NewBefore(_) => Vec::new(),
            };
            plan.tasks.push(Task {
                inputs,
                partition_values: part.partition_values.clone(),
                changes,
            });
        }
    }
    let rewritten: u64 = plan.tasks.iter().map(|t| t.inputs.len() as u64).sum();
    plan.files_pruned = plan.files_considered - rewritten;
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int8Array, Int64Array};
    use arrow::datatypes::{DataType, Field, Schema};
    use freshet_common::key::KeyPart;
    use proptest::prelude::*;
    use std::sync::Arc;

    fn def() -> TableDef {
        TableDef::new(
            "t",
            "memory:///t",
            Arc::new(Schema::new(vec![
                Field::new("id", DataType::Int64, false),
                Field::new("v", DataType::Int64, true),
            ])),
            vec!["id".into()],
            vec![],
            1024,
        )
        .unwrap()
    }

    fn file(name: &str, lo: i64, hi: i64, size: u64) -> FileEntry {
        FileEntry {
            path: name.into(),
            size,
            partition_values: HashMap::new(),
            num_records: Some(10),
            range: Some((
                vec![KeyPart::Int(lo as i128)],
                vec![KeyPart::Int(hi as i128)],
            )),
            deletion_vector: None,
            stats: None,
            tags: HashMap::new(),
            modification_time: 0,
        }
    }

    fn changes(keys: &[(i64, bool)]) -> Vec<PartitionChanges> {
        let mut keys = keys.to_vec();
        keys.sort();
        keys.dedup_by_key(|k| k.0);
        let d = def();
        let batch = RecordBatch::try_new(
            freshet_common::changes::change_schema(&d),
            vec![
                Arc::new(Int64Array::from(
                    keys.iter().map(|k| k.0).collect::<Vec<_>>(),
                )),
                Arc::new(Int64Array::from(vec![None; keys.len()])),
                Arc::new(Int8Array::from(
                    keys.iter()
                        .map(|k| if k.1 { 0 } else { 1 })
                        .collect::<Vec<_>>(),
                )),
            ],
        )
        .unwrap();
        vec![PartitionChanges {
            partition_values: HashMap::new(),
            batch,
        }]
    }

    #[test]
    fn keys_route_to_the_covering_file_only() {
        let files = vec![
            file("a", 0, 9, 2000),
            file("b", 10, 19, 2000),
            file("c", 20, 29, 2000),
        ];
        let p = plan(&def(), &files, changes(&[(12, true), (15, false)])).unwrap();
        assert_eq!(p.tasks.len(), 1);
        assert_eq!(p.tasks[0].inputs[0].path, "b");
        assert_eq!((p.files_considered, p.files_pruned), (3, 2));
    }

    #[test]
    fn gaps_go_to_a_neighbour_with_room_or_a_new_file() {
        // "a" is small: the insert at 12 extends it; "b"/"c" are full: 45 gets a new file.
        let files = vec![
            file("a", 0, 9, 10),
            file("b", 20, 29, 2000),
            file("c", 30, 39, 2000),
        ];
        let p = plan(
            &def(),
            &files,
            changes(&[(12, true), (45, true), (50, false)]),
        )
        .unwrap();
        let mut inputs: Vec<Vec<String>> = p
            .tasks
            .iter()
            .map(|t| t.inputs.iter().map(|f| f.path.clone()).collect())
            .collect();
        inputs.sort();
        assert_eq!(inputs, vec![vec![], vec!["a".to_string()]]);
    }

    #[test]
    fn overlapping_files_are_rewritten_together() {
        let files = vec![
            file("a", 0, 15, 2000),
            file("b", 10, 19, 2000),
            file("c", 30, 39, 2000),
        ];
        let p = plan(&def(), &files, changes(&[(5, true)])).unwrap();
        assert_eq!(p.tasks.len(), 1);
        assert_eq!(p.tasks[0].inputs.len(), 2);
        let mut unknown = file("u", 0, 0, 5);
        unknown.range = None;
        let files = vec![file("a", 0, 9, 2000), unknown, file("c", 30, 39, 2000)];
        let p = plan(&def(), &files, changes(&[(35, false)])).unwrap();
        assert_eq!(
            p.tasks[0].inputs.len(),
            3,
            "a file without stats may hold any key"
        );
    }

    proptest! {
        // Postconditions: every change lands in at most one task; a key inside a file's range
        // lands in that file's task; deletes only go where a file may hold the key.
        #[test]
        fn every_key_is_routed_once_and_to_its_file(
            bounds in proptest::collection::btree_set(0i64..200, 0..12),
            keys in proptest::collection::vec((0i64..220, any::<bool>()), 1..40),
        ) {
            let b: Vec<i64> = bounds.into_iter().collect();
            let files: Vec<FileEntry> = b.chunks(2).filter(|c| c.len() == 2).enumerate()
                .map(|(i, c)| file(&format!("f{i}"), c[0], c[1], 500 + (i as u64 * 300))).collect();
            let ch = changes(&keys);
            let total = ch[0].batch.num_rows();
            let p = plan(&def(), &files, ch).unwrap();
            let mut seen = std::collections::HashSet::new();
            for t in &p.tasks {
                let ids = t.changes.column(0).as_primitive::<arrow::datatypes::Int64Type>();
                let ops = t.changes.column(2).as_primitive::<Int8Type>();
                for i in 0..ids.len() {
                    let k = ids.value(i);
                    prop_assert!(seen.insert(k), "key {} routed twice", k);
                    let covering: Vec<&FileEntry> = files.iter().filter(|f| {
                        let (lo, hi) = f.range.clone().unwrap();
                        lo <= vec![KeyPart::Int(k as i128)] && vec![KeyPart::Int(k as i128)] <= hi
                    }).collect();
                    if let Some(f) = covering.first() {
                        prop_assert!(t.inputs.iter().any(|x| x.path == f.path));
                    } else {
                        prop_assert_eq!(ops.value(i), OP_UPSERT, "a delete of an absent key became work");
                    }
                }
            }
            prop_assert!(seen.len() <= total);
            // After the rewrite, every partition's files still have disjoint key ranges:
            // each task's output spans its inputs' ranges plus its upserted keys.
            let mut spans: Vec<(i64, i64)> = Vec::new();
            let rewritten: std::collections::HashSet<String> = p.tasks.iter().flat_map(|t| t.inputs.iter().map(|f| f.path.clone())).collect();
            let int = |k: &freshet_common::key::Key| match &k[0] { KeyPart::Int(i) => *i as i64, _ => unreachable!() };
            for f in files.iter().filter(|f| !rewritten.contains(&f.path)) {
                let (lo, hi) = f.range.clone().unwrap();
                spans.push((int(&lo), int(&hi)));
            }
            for t in &p.tasks {
                let ids = t.changes.column(0).as_primitive::<arrow::datatypes::Int64Type>();
                let ops = t.changes.column(2).as_primitive::<Int8Type>();
                let mut lo = i64::MAX;
                let mut hi = i64::MIN;
                for f in &t.inputs {
                    let (a, b) = f.range.clone().unwrap();
                    lo = lo.min(int(&a));
                    hi = hi.max(int(&b));
                }
                for i in 0..ids.len() {
                    if ops.value(i) == OP_UPSERT {
                        lo = lo.min(ids.value(i));
                        hi = hi.max(ids.value(i));
                    }
                }
                if lo <= hi {
                    spans.push((lo, hi));
                }
            }
            spans.sort();
            for w in spans.windows(2) {
                prop_assert!(w[0].1 < w[1].0, "ranges overlap after the cycle: {:?} {:?}", w[0], w[1]);
            }
        }
    }
}
