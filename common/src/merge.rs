//! The merge kernel: applies one change per key to the rows of existing files.
//! Pure Arrow, shared by workers and tests.

use std::collections::HashMap;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, UInt32Array};
use arrow::compute::{cast, concat_batches, filter_record_batch, take_record_batch};
use arrow::datatypes::{Int8Type, SchemaRef};
use arrow::record_batch::RecordBatch;
use arrow::row::{RowConverter, Rows, SortField};

use crate::changes::{OP_COLUMN, OP_UPSERT};
use crate::error::{Error, Result};

/// What a merge did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MergeCounts {
    /// Rows read from existing files.
    pub rows_read: u64,
    /// Upserts whose key no existing row had.
    pub inserted: u64,
    /// Existing rows replaced by an upsert.
    pub updated: u64,
    /// Existing rows removed by a delete.
    pub deleted: u64,
}

/// Conforms a batch read from a data file to the file schema (column order and types);
/// columns missing from the file read as null.
pub fn conform(batch: &RecordBatch, schema: &SchemaRef, context: &str) -> Result<RecordBatch> {
    let cols: Vec<ArrayRef> = schema
        .fields()
        .iter()
        .map(|f| match batch.column_by_name(f.name()) {
            Some(c) if c.data_type() == f.data_type() => Ok(c.clone()),
            Some(c) => cast(c, f.data_type())
                .map_err(|e| Error::data(format!("{context}: column '{}'", f.name()), e)),
            None => Ok(arrow::array::new_null_array(
                f.data_type(),
                batch.num_rows(),
            )),
        })
        .collect::<Result<_>>()?;
    RecordBatch::try_new(schema.clone(), cols).map_err(|e| Error::data(context, e))
}

fn key_rows(converter: &RowConverter, batch: &RecordBatch, key: &[String]) -> Result<Rows> {
    let arrays: Vec<ArrayRef> = key
        .iter()
        .map(|k| {
            batch
                .column_by_name(k)
                .cloned()
                .ok_or_else(|| Error::Internal(format!("batch lacks key column '{k}'")))
        })
        .collect::<Result<_>>()?;
    converter
        .convert_columns(&arrays)
        .map_err(|e| Error::data("key rows", e))
}

/// Applies `changes` (one row per key, with `__op`) to `existing` rows. Both are in (or are
/// conformed to) `file_schema` (the changes may carry extra columns, which are dropped).
/// Returns all resulting rows sorted by `local_key`.
pub fn apply_changes(
    file_schema: &SchemaRef,
    local_key: &[String],
    existing: &[RecordBatch],
    changes: &RecordBatch,
) -> Result<(RecordBatch, MergeCounts)> {
    let ops = changes
        .column_by_name(OP_COLUMN)
        .ok_or_else(|| Error::Internal("changes lack __op".into()))?
        .as_primitive::<Int8Type>()
        .clone();
    // Deletes carry only their key: non-key columns may be null even where the table says
    // NOT NULL, so changes are conformed to an all-nullable copy of the schema; the upserts
    // taken into the result are checked against the real schema below.
    let relaxed: SchemaRef = std::sync::Arc::new(arrow::datatypes::Schema::new(
        file_schema
            .fields()
            .iter()
            .map(|f| f.as_ref().clone().with_nullable(true))
            .collect::<Vec<_>>(),
    ));
    let change_rows = conform(changes, &relaxed, "changes")?;

    let converter = RowConverter::new(
        local_key
            .iter()
            .map(|k| {
                file_schema
                    .field_with_name(k)
                    .map(|f| SortField::new(f.data_type().clone()))
                    .map_err(|_| Error::Internal(format!("key column '{k}' not in file schema")))
            })
            .collect::<Result<_>>()?,
    )
    .map_err(|e| Error::data("row converter", e))?;
    let new_keys = key_rows(&converter, &change_rows, local_key)?;
    let old_parts: Vec<Rows> = existing
        .iter()
        .map(|b| key_rows(&converter, b, local_key))
        .collect::<Result<_>>()?;
    if strictly_sorted(&old_parts) {
        return merge_sorted(
            file_schema,
            existing,
            &old_parts,
            &change_rows,
            &new_keys,
            &ops,
        );
    }

    // Unsorted input (files Freshet did not write): look changes up by key, then sort.
    let existing = concat_batches(file_schema, existing)
        .map_err(|e| Error::data("concatenating file rows", e))?;
    let old_keys = key_rows(&converter, &existing, local_key)?;

    let mut changed: HashMap<arrow::row::Row<'_>, (usize, bool)> =
        HashMap::with_capacity(new_keys.num_rows());
    for i in 0..new_keys.num_rows() {
        changed.insert(new_keys.row(i), (i, false));
    }
    let mut counts = MergeCounts {
        rows_read: existing.num_rows() as u64,
        ..Default::default()
    };
    let mut keep = Vec::with_capacity(existing.num_rows());
    for i in 0..existing.num_rows() {
        match changed.get_mut(&old_keys.row(i)) {
            Some((idx, seen)) => {
                *seen = true;
                if ops.value(*idx) == OP_UPSERT {
                    counts.updated += 1;
                } else {
                    counts.deleted += 1;
                }
                keep.push(false);
            }
            None => keep.push(true),
        }
    }
    let mut upserts: Vec<u32> = Vec::new();
    for (idx, seen) in changed.values() {
        if ops.value(*idx) == OP_UPSERT {
            upserts.push(*idx as u32);
            if !seen {
                counts.inserted += 1;
            }
        }
    }
    upserts.sort_unstable();
    let kept = filter_record_batch(&existing, &BooleanArray::from(keep))
        .map_err(|e| Error::data("filter", e))?;
    let added = take_record_batch(&change_rows, &UInt32Array::from(upserts))
        .map_err(|e| Error::data("take", e))?;
    let added = RecordBatch::try_new(file_schema.clone(), added.columns().to_vec())
        .map_err(|e| Error::data("upserted rows", e))?;
    let merged =
        concat_batches(file_schema, &[kept, added]).map_err(|e| Error::data("concat", e))?;

    // Sort the result by key (kept rows are usually sorted already; this keeps it simple).
    let rows = key_rows(&converter, &merged, local_key)?;
    let mut order: Vec<u32> = (0..merged.num_rows() as u32).collect();
    order.sort_by(|a, b| rows.row(*a as usize).cmp(&rows.row(*b as usize)));
    let sorted = take_record_batch(&merged, &UInt32Array::from(order))
        .map_err(|e| Error::data("take", e))?;
    Ok((sorted, counts))
}

/// Whether the keys, across the batches in order, strictly increase.
fn strictly_sorted(parts: &[Rows]) -> bool {
    let mut prev: Option<arrow::row::Row<'_>> = None;
    for p in parts {
        for r in p.iter() {
            if prev.is_some_and(|q| q >= r) {
                return false;
            }
            prev = Some(r);
        }
    }
    true
}

/// The merge of key-sorted existing rows with the changes: one pass over both in key
/// order, and every output column gathered once (`interleave`) from the existing batches
/// and the changes, without concatenating, filtering or sorting copies.
fn merge_sorted(
    file_schema: &SchemaRef,
    existing: &[RecordBatch],
    old_parts: &[Rows],
    change_rows: &RecordBatch,
    new_keys: &Rows,
    ops: &arrow::array::PrimitiveArray<Int8Type>,
) -> Result<(RecordBatch, MergeCounts)> {
    use std::cmp::Ordering;
    let mut order: Vec<usize> = (0..new_keys.num_rows()).collect();
    order.sort_by(|a, b| new_keys.row(*a).cmp(&new_keys.row(*b)));
    let changes_at = existing.len();
    let mut counts = MergeCounts {
        rows_read: existing.iter().map(|b| b.num_rows() as u64).sum(),
        ..Default::default()
    };
    let mut out: Vec<(usize, usize)> = Vec::with_capacity(counts.rows_read as usize + order.len());
    let mut old = old_parts
        .iter()
        .enumerate()
        .flat_map(|(b, p)| p.iter().enumerate().map(move |(i, r)| (b, i, r)))
        .peekable();
    let upsert = |c: usize| ops.value(c) == OP_UPSERT;
    let mut j = 0;
    loop {
        let next_change = order.get(j).map(|c| (*c, new_keys.row(*c)));
        let ord = match (old.peek(), &next_change) {
            (None, None) => break,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some((_, _, o)), Some((_, n))) => o.cmp(n),
        };
        match ord {
            Ordering::Less => {
                let (b, i, _) = old.next().expect("peeked");
                out.push((b, i));
            }
            Ordering::Greater => {
                let (c, _) = next_change.expect("compared");
                if upsert(c) {
                    out.push((changes_at, c));
                    counts.inserted += 1;
                }
                j += 1;
            }
            Ordering::Equal => {
                old.next();
                let (c, _) = next_change.expect("compared");
                if upsert(c) {
                    out.push((changes_at, c));
                    counts.updated += 1;
                } else {
                    counts.deleted += 1;
                }
                j += 1;
            }
        }
    }
    let columns: Vec<ArrayRef> = (0..file_schema.fields().len())
        .map(|k| {
            let sources: Vec<&dyn Array> = existing
                .iter()
                .map(|b| b.column(k).as_ref())
                .chain(std::iter::once(change_rows.column(k).as_ref()))
                .collect();
            arrow::compute::interleave(&sources, &out).map_err(|e| {
                Error::data(
                    format!("merging column '{}'", file_schema.field(k).name()),
                    e,
                )
            })
        })
        .collect::<Result<_>>()?;
    let merged = RecordBatch::try_new_with_options(
        file_schema.clone(),
        columns,
        &arrow::record_batch::RecordBatchOptions::new().with_row_count(Some(out.len())),
    )
    .map_err(|e| Error::data("upserted rows", e))?;
    Ok((merged, counts))
}

/// Splits sorted rows into chunks of about `rows_per_file` rows, never splitting equal keys.
pub fn split_points(num_rows: usize, rows_per_file: usize) -> Vec<(usize, usize)> {
    let per = rows_per_file.max(1);
    let mut out = Vec::new();
    let mut start = 0;
    while start < num_rows {
        let len = per.min(num_rows - start);
        out.push((start, len));
        start += len;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::changes::OP_DELETE;

    #[test]
    fn deletes_need_only_the_key_even_for_not_null_columns() {
        use arrow::datatypes::{DataType, Field, Schema};
        let file: SchemaRef = std::sync::Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("region", DataType::Utf8, false),
        ]));
        let existing = RecordBatch::try_new(
            file.clone(),
            vec![
                std::sync::Arc::new(arrow::array::Int64Array::from(vec![1, 2])),
                std::sync::Arc::new(arrow::array::StringArray::from(vec!["eu", "us"])),
            ],
        )
        .unwrap();
        let changes = RecordBatch::try_from_iter(vec![
            (
                "id",
                std::sync::Arc::new(arrow::array::Int64Array::from(vec![1, 3])) as ArrayRef,
            ),
            (
                "region",
                std::sync::Arc::new(arrow::array::StringArray::from(vec![None, Some("ap")]))
                    as ArrayRef,
            ),
            (
                OP_COLUMN,
                std::sync::Arc::new(arrow::array::Int8Array::from(vec![OP_DELETE, OP_UPSERT]))
                    as ArrayRef,
            ),
        ])
        .unwrap();
        let (out, counts) = apply_changes(&file, &["id".into()], &[existing], &changes).unwrap();
        assert_eq!(out.num_rows(), 2);
        assert_eq!(counts.deleted, 1);
        assert_eq!(out.schema(), file);
        // An upsert with a null in a NOT NULL column is still refused.
        let bad = RecordBatch::try_from_iter(vec![
            (
                "id",
                std::sync::Arc::new(arrow::array::Int64Array::from(vec![4])) as ArrayRef,
            ),
            (
                "region",
                std::sync::Arc::new(arrow::array::StringArray::from(vec![None::<&str>]))
                    as ArrayRef,
            ),
            (
                OP_COLUMN,
                std::sync::Arc::new(arrow::array::Int8Array::from(vec![OP_UPSERT])) as ArrayRef,
            ),
        ])
        .unwrap();
        assert!(apply_changes(&file, &["id".into()], &[], &bad).is_err());
    }
    use arrow::array::{Int8Array, Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use std::sync::Arc;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("v", DataType::Utf8, true),
        ]))
    }

    fn rows(map: &BTreeMap<i64, String>) -> RecordBatch {
        RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(Int64Array::from(map.keys().copied().collect::<Vec<_>>())),
                Arc::new(StringArray::from(map.values().cloned().collect::<Vec<_>>())),
            ],
        )
        .unwrap()
    }

    fn changes(ch: &BTreeMap<i64, Option<String>>) -> RecordBatch {
        let s = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("v", DataType::Utf8, true),
            Field::new(OP_COLUMN, DataType::Int8, false),
        ]));
        RecordBatch::try_new(
            s,
            vec![
                Arc::new(Int64Array::from(ch.keys().copied().collect::<Vec<_>>())),
                Arc::new(StringArray::from(ch.values().cloned().collect::<Vec<_>>())),
                Arc::new(Int8Array::from(
                    ch.values()
                        .map(|v| if v.is_some() { 0 } else { 1 })
                        .collect::<Vec<_>>(),
                )),
            ],
        )
        .unwrap()
    }

    fn to_map(b: &RecordBatch) -> Vec<(i64, String)> {
        let ids = b.column(0).as_primitive::<arrow::datatypes::Int64Type>();
        let vs = b.column(1).as_string::<i32>();
        (0..b.num_rows())
            .map(|i| (ids.value(i), vs.value(i).to_string()))
            .collect()
    }

    proptest! {
        // The kernel equals a BTreeMap model: upserts replace or insert, deletes remove,
        // the output is sorted, and the counts add up.
        // Both kernels: sorted input split into several batches (the one-pass merge), and
        // shuffled input (the lookup-and-sort fallback); changes in any order.
        #[test]
        fn merge_equals_model(
            base in proptest::collection::btree_map(0i64..64, "[a-z]{1,3}", 0..40),
            ch in proptest::collection::btree_map(0i64..64, proptest::option::of("[a-z]{1,3}"), 0..40),
            cuts in proptest::collection::vec(0usize..40, 0..4),
            shuffle_base in any::<bool>(),
            seed in any::<u64>(),
        ) {
            let all = rows(&base);
            let mut perm: Vec<u32> = (0..all.num_rows() as u32).collect();
            let mut ch_perm: Vec<u32> = (0..ch.len() as u32).collect();
            // A deterministic shuffle from the seed.
            let mut x = seed | 1;
            let mut shuffle = |v: &mut Vec<u32>| {
                for i in (1..v.len()).rev() {
                    x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                    v.swap(i, (x % (i as u64 + 1)) as usize);
                }
            };
            if shuffle_base { shuffle(&mut perm); }
            shuffle(&mut ch_perm);
            let all = take_record_batch(&all, &UInt32Array::from(perm)).unwrap();
            let ch_batch = take_record_batch(&changes(&ch), &UInt32Array::from(ch_perm)).unwrap();
            let mut at: Vec<usize> = cuts.into_iter().map(|c| c.min(all.num_rows())).collect();
            at.sort();
            let mut parts = Vec::new();
            let mut from = 0;
            for to in at.into_iter().chain([all.num_rows()]) {
                parts.push(all.slice(from, to - from));
                from = to;
            }
            let (out, counts) = apply_changes(&schema(), &["id".to_string()], &parts, &ch_batch).unwrap();
            let mut model = base.clone();
            let (mut ins, mut upd, mut del) = (0, 0, 0);
            for (k, v) in &ch {
                match v {
                    Some(v) => { if model.insert(*k, v.clone()).is_some() { upd += 1 } else { ins += 1 } }
                    None => { if model.remove(k).is_some() { del += 1 } }
                }
            }
            prop_assert_eq!(to_map(&out), model.into_iter().collect::<Vec<_>>());
            prop_assert_eq!((counts.inserted, counts.updated, counts.deleted), (ins, upd, del));
        }
    }
}
