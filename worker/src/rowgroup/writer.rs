//! Output files being assembled from copied and re-encoded row groups, closed at a
//! row-group boundary once big enough, described from their footers.

use std::sync::Arc;

use arrow::array::ArrayRef;
use arrow::compute::{concat, concat_batches};
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use freshet_common::error::{Error, Result};
use freshet_common::key::{KeyPart, key_to_json};
use freshet_common::stats::file_stats;
use freshet_common::table::TableDef;
use freshet_proto::worker::v1::RewriteRequest;
use object_store::ObjectStore;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::statistics::StatisticsConverter;
use parquet::arrow::arrow_writer::{ArrowRowGroupWriterFactory, compute_leaves};
use parquet::file::metadata::ParquetMetaData;
use parquet::file::writer::SerializedFileWriter;

use super::plan::as_i64;
use crate::format::{FileFormat, has_nan, nan_free_marker};
use crate::output::{Described, Outcome};

/// An output file being assembled.
pub(super) struct OpenFile {
    pub writer: SerializedFileWriter<Vec<u8>>,
    factory: ArrowRowGroupWriterFactory,
    nan_free: bool,
}

pub(super) struct Output<'a> {
    def: &'a TableDef,
    req: &'a RewriteRequest,
    format: FileFormat,
    schema: SchemaRef,
    store: &'a Arc<dyn ObjectStore>,
    dir: String,
    has_floats: bool,
    open: Option<OpenFile>,
    /// Re-encoded rows not yet written as a row group.
    pending: Vec<RecordBatch>,
    pending_rows: usize,
    /// Close a file once it holds this many bytes (at a row-group boundary).
    split_bytes: u64,
    pub done: Outcome,
}

impl<'a> Output<'a> {
    pub fn new(
        store: &'a Arc<dyn ObjectStore>,
        def: &'a TableDef,
        req: &'a RewriteRequest,
        format: FileFormat,
        split_bytes: u64,
    ) -> Self {
        let schema = def.file_schema();
        Output {
            def,
            req,
            format,
            has_floats: schema.fields().iter().any(|f| f.data_type().is_floating()),
            schema,
            store,
            dir: freshet_common::table::partition_dir(&def.partition_by, &req.partition_values),
            open: None,
            pending: Vec::new(),
            pending_rows: 0,
            split_bytes: split_bytes.max(1),
            done: Outcome::default(),
        }
    }

    pub fn file(&mut self) -> Result<&mut OpenFile> {
        if self.open.is_none() {
            let props = self.format.writer_props(self.def);
            // Sized for a whole file up front: growing it would copy it again and again.
            let buf = Vec::with_capacity(self.def.target_file_size as usize + (1 << 20));
            let (writer, factory) = ArrowWriter::try_new(buf, self.schema.clone(), Some(props))
                .and_then(|w| w.into_serialized_writer())
                .map_err(|e| Error::data("parquet writer", e))?;
            self.open = Some(OpenFile {
                writer,
                factory,
                nan_free: true,
            });
        }
        Ok(self.open.as_mut().expect("open"))
    }

    fn written(&self) -> u64 {
        self.open
            .as_ref()
            .map(|f| f.writer.bytes_written() as u64)
            .unwrap_or(0)
    }

    /// Adds merged rows (in key order, after everything added before); they are written
    /// as whole row groups as they accumulate.
    pub async fn add_rows(&mut self, merged: RecordBatch) -> Result<()> {
        if merged.num_rows() == 0 {
            return Ok(());
        }
        if self.pending_rows == 0 {
            self.maybe_roll().await?;
        }
        self.pending_rows += merged.num_rows();
        self.pending.push(merged);
        self.flush_pending(false)
    }

    /// Encodes `batch` as one row group of the open file.
    fn encode_group(&mut self, batch: &RecordBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let nan = self.has_floats && has_nan(batch);
        let schema = self.schema.clone();
        let f = self.file()?;
        f.nan_free &= !nan;
        let pe = |e| Error::data("parquet encode", e);
        let idx = f.writer.flushed_row_groups().len();
        let mut writers = f.factory.create_column_writers(idx).map_err(pe)?;
        let mut it = writers.iter_mut();
        for (field, col) in schema.fields().iter().zip(batch.columns()) {
            for leaf in compute_leaves(field, col).map_err(pe)? {
                it.next()
                    .ok_or_else(|| Error::Internal("column writers exhausted".into()))?
                    .write(&leaf)
                    .map_err(pe)?;
            }
        }
        let mut rg = f.writer.next_row_group().map_err(pe)?;
        for w in writers {
            w.close()
                .map_err(pe)?
                .append_to_row_group(&mut rg)
                .map_err(pe)?;
        }
        rg.close().map_err(pe)?;
        self.done.groups_rewritten += 1;
        Ok(())
    }

    /// Writes whole row groups from the pending rows; with `all`, the rest too.
    pub fn flush_pending(&mut self, all: bool) -> Result<()> {
        let per_group = self.format.row_group_rows;
        if self.pending_rows == 0 || (!all && self.pending_rows < per_group) {
            return Ok(());
        }
        let rows =
            concat_batches(&self.schema, &self.pending).map_err(|e| Error::data("concat", e))?;
        self.pending.clear();
        self.pending_rows = 0;
        let n = rows.num_rows();
        let mut start = 0;
        while n - start >= per_group {
            self.encode_group(&rows.slice(start, per_group))?;
            start += per_group;
        }
        if start < n {
            if all {
                self.encode_group(&rows.slice(start, n - start))?;
            } else {
                self.pending.push(rows.slice(start, n - start));
                self.pending_rows = n - start;
            }
        }
        Ok(())
    }

    /// Closes the open file at a row-group boundary once it is big enough.
    pub async fn maybe_roll(&mut self) -> Result<()> {
        if self.pending_rows == 0 && self.written() >= self.split_bytes {
            self.close_file().await?;
        }
        Ok(())
    }

    /// Finishes the open file (if it has rows), puts it and records it.
    pub async fn close_file(&mut self) -> Result<()> {
        self.flush_pending(true)?;
        let Some(mut f) = self.open.take() else {
            return Ok(());
        };
        if f.writer.flushed_row_groups().is_empty() {
            return Ok(());
        }
        if f.nan_free {
            f.writer.append_key_value_metadata(nan_free_marker());
        }
        let pe = |e| Error::data("parquet close", e);
        let meta = f.writer.finish().map_err(pe)?;
        let bytes = std::mem::take(f.writer.inner_mut());
        let (stats, num_records, min_key, max_key) =
            stats_from_footer(self.def, &self.schema, &meta)?;
        let file = Described {
            num_records,
            stats_json: stats.to_string(),
            min_key_json: key_to_json(&vec![KeyPart::Int(min_key as i128)]),
            max_key_json: key_to_json(&vec![KeyPart::Int(max_key as i128)]),
        };
        self.done
            .put_file(self.store, self.req, &self.dir, bytes, file)
            .await
    }
}

/// The Delta stats of a written file from its footer: min/max of every column from the row
/// groups' exact statistics, null counts and row counts summed. Gives the same JSON as
/// [`file_stats`] over the file's rows (min/max are exact, NaN-free floats).
pub fn stats_from_footer(
    def: &TableDef,
    schema: &SchemaRef,
    meta: &ParquetMetaData,
) -> Result<(serde_json::Value, u64, i64, i64)> {
    let descr = meta.file_metadata().schema_descr();
    let rgs = meta.row_groups();
    let se = |e| Error::data("footer statistics", e);
    let mut cols: Vec<ArrayRef> = Vec::new();
    let mut fields = Vec::new();
    let mut nulls = serde_json::Map::new();
    for field in schema.fields() {
        // Like `file_stats` (and deltalake): no statistics for nested columns; their leaf
        // chunks count element nulls, not row nulls.
        if field.data_type().is_nested() {
            continue;
        }
        // Min/max columns are nullable even where the table's are not.
        fields.push(field.as_ref().clone().with_nullable(true));
        let conv = StatisticsConverter::try_new(field.name(), schema, descr).map_err(se)?;
        let mins = conv.row_group_mins(rgs).map_err(se)?;
        let maxs = conv.row_group_maxes(rgs).map_err(se)?;
        let nc = conv.row_group_null_counts(rgs).map_err(se)?;
        nulls.insert(
            field.name().clone(),
            serde_json::Value::from(nc.iter().flatten().sum::<u64>()),
        );
        cols.push(concat(&[mins.as_ref(), maxs.as_ref()]).map_err(|e| Error::data("concat", e))?);
    }
    let loose = Arc::new(arrow::datatypes::Schema::new(fields));
    let bounds = RecordBatch::try_new(loose, cols).map_err(|e| Error::data("bounds", e))?;
    let mut stats = file_stats(&bounds);
    let num_records: u64 = rgs.iter().map(|r| r.num_rows() as u64).sum();
    stats["numRecords"] = serde_json::Value::from(num_records);
    stats["nullCount"] = serde_json::Value::Object(nulls);
    let key = &def.local_key()[0];
    let k = bounds.schema().index_of(key).expect("key column");
    let n = rgs.len();
    let keys = as_i64(bounds.column(k).as_ref()).unwrap_or_default();
    let min_key = keys.first().copied().flatten().unwrap_or_default();
    let max_key = keys.get(2 * n - 1).copied().flatten().unwrap_or_default();
    Ok((stats, num_records, min_key, max_key))
}
