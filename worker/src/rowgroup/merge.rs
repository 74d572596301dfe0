//! A touched row group: decoded, merged with the changes that fall in it.

use arrow::array::UInt32Array;
use arrow::compute::take_record_batch;
use arrow::record_batch::RecordBatch;
use freshet_common::error::{Error, Result};
use freshet_common::merge::{MergeCounts, apply_changes, conform};
use freshet_common::table::TableDef;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::copy::RangeBytes;
use super::plan::{Group, Input};
use crate::format::READ_BATCH_ROWS;

/// The rows of row group `g` with the changes at rows `touched` of `changes` applied.
pub(super) fn merge_group(
    def: &TableDef,
    input: &Input,
    g: &Group,
    chunk: RangeBytes,
    changes: &RecordBatch,
    touched: &[u32],
) -> Result<(RecordBatch, MergeCounts)> {
    let schema = def.file_schema();
    let ctx = || format!("table '{}', file {}", def.name, input.path);
    let reader = ParquetRecordBatchReaderBuilder::new_with_metadata(chunk, input.meta.clone())
        .with_row_groups(vec![g.index])
        .with_batch_size(READ_BATCH_ROWS)
        .build()
        .map_err(|e| Error::data(ctx(), e))?;
    let rows = reader
        .map(|b| conform(&b.map_err(|e| Error::data(ctx(), e))?, &schema, &ctx()))
        .collect::<Result<Vec<_>>>()?;
    let mine = take_record_batch(changes, &UInt32Array::from(touched.to_vec()))
        .map_err(|e| Error::data("take", e))?;
    apply_changes(&schema, &def.local_key(), &rows, &mine)
}
