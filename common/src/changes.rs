//! The shape of changes once validated: the table's columns plus `__op`, and the
//! last-writer-wins reduction of staged changes to one change per key.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, UInt32Array};
use arrow::compute::{concat_batches, take_record_batch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use arrow::row::{RowConverter, SortField};

use crate::error::{Error, Result};
use crate::table::{TableDef, partition_value};

/// Column holding a change's operation (int8).
pub const OP_COLUMN: &str = "__op";
/// Column holding a change's staging sequence (uint64) in staging segments.
pub const SEQ_COLUMN: &str = "__seq";
/// Insert or replace the row with this key.
pub const OP_UPSERT: i8 = 0;
/// Delete the row with this key.
pub const OP_DELETE: i8 = 1;

/// The schema of validated changes: the table's columns (non-key columns nullable, since a
/// delete carries only its key) plus `__op`.
pub fn change_schema(def: &TableDef) -> SchemaRef {
    let mut fields: Vec<Field> = def
        .schema
        .fields()
        .iter()
        .map(|f| {
            let nullable = !def.primary_key.contains(f.name());
            f.as_ref().clone().with_nullable(nullable)
        })
        .collect();
    fields.push(Field::new(OP_COLUMN, DataType::Int8, false));
    Arc::new(Schema::new(fields))
}

/// The schema of a staging segment: [`change_schema`] plus `__seq`.
pub fn staging_schema(def: &TableDef) -> SchemaRef {
    let mut fields: Vec<Field> = change_schema(def)
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields.push(Field::new(SEQ_COLUMN, DataType::UInt64, false));
    Arc::new(Schema::new(fields))
}

/// The changes of one partition, one per key, sorted by the local key.
#[derive(Debug, Clone)]
pub struct PartitionChanges {
    /// Partition values (column -> value); empty for unpartitioned tables.
    pub partition_values: HashMap<String, String>,
    /// Changes in [`change_schema`] (no `__seq`), sorted by local key.
    pub batch: RecordBatch,
}

/// Reduces staged changes (in staging order) to the last change per primary key, grouped
/// by partition and sorted by local key. Returns the partitions and the number of input rows.
pub fn last_change_per_key(
    def: &TableDef,
    staged: &[RecordBatch],
) -> Result<Vec<PartitionChanges>> {
    let schema = change_schema(def);
    let projected: Vec<RecordBatch> = staged
        .iter()
        .map(|b| {
            let cols: Vec<ArrayRef> = schema
                .fields()
                .iter()
                .map(|f| {
                    b.column_by_name(f.name()).cloned().ok_or_else(|| {
                        Error::Internal(format!("staged batch lacks column '{}'", f.name()))
                    })
                })
                .collect::<Result<_>>()?;
            RecordBatch::try_new(schema.clone(), cols).map_err(|e| Error::data("staged batch", e))
        })
        .collect::<Result<_>>()?;
    if projected.iter().all(|b| b.num_rows() == 0) {
        return Ok(Vec::new());
    }
    let all =
        concat_batches(&schema, &projected).map_err(|e| Error::data("concatenating changes", e))?;

    // Sort order: partition columns first, then the local key; that is the whole primary key.
    let mut order_cols: Vec<String> = def.partition_by.clone();
    order_cols.extend(def.local_key());
    let converter = RowConverter::new(
        order_cols
            .iter()
            .map(|c| {
                SortField::new(
                    schema
                        .field_with_name(c)
                        .expect("key column")
                        .data_type()
                        .clone(),
                )
            })
            .collect(),
    )
    .map_err(|e| Error::data("row converter", e))?;
    let arrays: Vec<ArrayRef> = order_cols
        .iter()
        .map(|c| all.column_by_name(c).expect("key").clone())
        .collect();
    let rows = converter
        .convert_columns(&arrays)
        .map_err(|e| Error::data("key rows", e))?;

    // Later rows win: remember the last index of every key.
    let mut last: HashMap<arrow::row::Row<'_>, u32> = HashMap::with_capacity(all.num_rows());
    for i in 0..all.num_rows() {
        last.insert(rows.row(i), i as u32);
    }
    let mut winners: Vec<u32> = last.into_values().collect();
    winners.sort_unstable_by(|a, b| rows.row(*a as usize).cmp(&rows.row(*b as usize)));
    let sorted =
        take_record_batch(&all, &UInt32Array::from(winners)).map_err(|e| Error::data("take", e))?;

    // Split into runs of equal partition values.
    let part_arrays: Vec<&dyn Array> = def
        .partition_by
        .iter()
        .map(|c| sorted.column_by_name(c).expect("partition column").as_ref())
        .collect();
    let mut out = Vec::new();
    let mut start = 0;
    let n = sorted.num_rows();
    let values_at =
        |i: usize| -> Vec<String> { part_arrays.iter().map(|a| partition_value(*a, i)).collect() };
    while start < n {
        let v = values_at(start);
        let mut end = start + 1;
        while end < n && values_at(end) == v {
            end += 1;
        }
        out.push(PartitionChanges {
            partition_values: def.partition_by.iter().cloned().zip(v).collect(),
            batch: sorted.slice(start, end - start),
        });
        start = end;
    }
    Ok(out)
}
