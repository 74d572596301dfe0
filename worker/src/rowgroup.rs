//! Copy-on-write at the row-group level.
//!
//! Files Freshet writes are sorted by key and say so (`sorting_columns` in every row
//! group), with exact (untruncated) statistics. When every input row group of a task
//! proves that (single integer key, min/max exact, groups in disjoint key ranges), the
//! rewrite streams the inputs one row group at a time: row groups that no change falls in
//! are copied into the new file byte for byte (their encoded column chunks, page indexes
//! and statistics), and only the touched row groups are decoded, merged and re-encoded.
//! A rewrite then costs about a copy of the file instead of a re-encode, and memory stays
//! bounded by a row group or two plus the output file being assembled.
//!
//! Anything the statistics cannot prove sends the task to the full path in `rewrite`.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, UInt32Array};
use arrow::compute::{cast, concat, concat_batches, take_record_batch};
use arrow::datatypes::{DataType, Int64Type, SchemaRef};
use arrow::record_batch::RecordBatch;
use bytes::{Buf, Bytes};
use freshet_common::error::{Error, Result};
use freshet_common::key::{KeyPart, key_to_json};
use freshet_common::merge::{MergeCounts, apply_changes, conform};
use freshet_common::stats::file_stats;
use freshet_common::table::{TableDef, partition_dir};
use freshet_proto::worker::v1::{OutputFile, RewriteRequest};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use parquet::arrow::ArrowSchemaConverter;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::statistics::StatisticsConverter;
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder,
};
use parquet::arrow::arrow_writer::{ArrowRowGroupWriterFactory, compute_leaves};
#[allow(deprecated)] // Still the simplest object_store-backed footer reader in parquet 59.
use parquet::arrow::async_reader::ParquetObjectReader;
use parquet::column::writer::ColumnCloseResult;
use parquet::errors::ParquetError;
use parquet::file::metadata::{KeyValue, PageIndexPolicy, ParquetMetaData, RowGroupMetaData};
use parquet::file::page_index::column_index::ColumnIndexMetaData;
use parquet::file::reader::{ChunkReader, Length};
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::types::SchemaDescriptor;

use crate::rewrite::{ROW_GROUP_ROWS, row_group_rows, writer_props};

/// File metadata key: "1" when no floating-point column of the file holds a NaN, so that
/// the row-group statistics (which skip NaN) give the same Delta stats as the data.
pub const NAN_FREE_KEY: &str = "freshet.nan_free";

/// What the row-group path did, for the response.
#[derive(Debug, Default)]
pub struct Outcome {
    pub files: Vec<OutputFile>,
    pub counts: MergeCounts,
    pub rows_written: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Row groups copied byte for byte / decoded and re-encoded.
    pub groups_copied: u64,
    pub groups_rewritten: u64,
}

/// One input file's metadata.
struct Input {
    path: Path,
    size: u64,
    meta: ArrowReaderMetadata,
}

/// One input row group, with its exact key range.
#[derive(Debug, Clone, Copy)]
struct Group {
    input: usize,
    index: usize,
    min: i64,
    max: i64,
}

/// The bytes of one row group (a contiguous range of the file), readable as the file.
struct RangeBytes {
    start: u64,
    data: Bytes,
    file_len: u64,
}

impl Length for RangeBytes {
    fn len(&self) -> u64 {
        self.file_len
    }
}

impl RangeBytes {
    fn offset(&self, start: u64, length: usize) -> parquet::errors::Result<usize> {
        let off = start
            .checked_sub(self.start)
            .map(|o| o as usize)
            .filter(|o| o + length <= self.data.len())
            .ok_or_else(|| {
                ParquetError::General(format!(
                    "read of {length} bytes at {start} outside the fetched range {}+{}",
                    self.start,
                    self.data.len()
                ))
            })?;
        Ok(off)
    }
}

impl ChunkReader for RangeBytes {
    type T = bytes::buf::Reader<Bytes>;

    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        let off = self.offset(start, 0)?;
        Ok(self.data.slice(off..).reader())
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<Bytes> {
        let off = self.offset(start, length)?;
        Ok(self.data.slice(off..off + length))
    }
}

/// Key types the row-group path handles (read as i64 from statistics and data).
fn int_key_type(t: &DataType) -> bool {
    matches!(
        t,
        DataType::Int8
            | DataType::Int16
            | DataType::Int32
            | DataType::Int64
            | DataType::UInt8
            | DataType::UInt16
            | DataType::UInt32
            | DataType::Date32
    )
}

fn as_i64(array: &dyn Array) -> Option<Vec<Option<i64>>> {
    let a = cast(array, &DataType::Int64).ok()?;
    Some(a.as_primitive::<Int64Type>().iter().collect())
}

/// Why a task cannot take the row-group path (None: it can).
fn eligible_group(rg: &RowGroupMetaData, key_idx: usize) -> std::result::Result<(), &'static str> {
    let sorted = rg
        .sorting_columns()
        .and_then(|s| s.first())
        .is_some_and(|s| s.column_idx as usize == key_idx && !s.descending);
    if !sorted {
        return Err("row group does not declare it is sorted by the key");
    }
    for c in rg.columns() {
        let Some(s) = c.statistics() else {
            return Err("column chunk without statistics");
        };
        if s.null_count_opt().is_none() {
            return Err("column chunk without a null count");
        }
        if (s.min_bytes_opt().is_some() && !s.min_is_exact())
            || (s.max_bytes_opt().is_some() && !s.max_is_exact())
        {
            return Err("inexact (truncated) statistics");
        }
    }
    Ok(())
}

/// Loads the inputs' footers and decides whether the row-group path applies; returns the
/// inputs and their row groups in key order, or why not.
async fn plan_groups(
    store: &Arc<dyn ObjectStore>,
    def: &TableDef,
    req: &RewriteRequest,
    out_descr: &SchemaDescriptor,
) -> Result<std::result::Result<(Vec<Input>, Vec<Group>), String>> {
    let file_schema = def.file_schema();
    let local_key = def.local_key();
    if local_key.len() != 1 || req.inputs.is_empty() {
        return Ok(Err("not a single-column key, or no inputs".into()));
    }
    let key_name = &local_key[0];
    let key_field = file_schema.field_with_name(key_name).expect("key column");
    // Lists of scalars (PostgreSQL arrays) are one leaf column each: their chunks copy like
    // any other. Deeper nesting (structs, lists of lists) is left to the full path.
    let flat = |t: &DataType| match t {
        DataType::List(f) | DataType::LargeList(f) => !f.data_type().is_nested(),
        t => !t.is_nested(),
    };
    if !int_key_type(key_field.data_type())
        || !file_schema.fields().iter().all(|f| flat(f.data_type()))
    {
        return Ok(Err("key type or nested columns".into()));
    }
    // Sorting columns name the key by its leaf index.
    let key_idx = crate::rewrite::leaf_index(&file_schema, key_name).expect("key column");
    let has_floats = file_schema
        .fields()
        .iter()
        .any(|f| f.data_type().is_floating());
    let mut inputs = Vec::new();
    let mut groups = Vec::new();
    for (i, f) in req.inputs.iter().enumerate() {
        let path = Path::from(f.path.as_str());
        #[allow(deprecated)]
        let mut reader = ParquetObjectReader::new(store.clone(), path.clone());
        if f.size > 0 {
            reader = reader.with_file_size(f.size);
        }
        let meta = ArrowReaderMetadata::load_async(
            &mut reader,
            ArrowReaderOptions::new().with_page_index_policy(PageIndexPolicy::Optional),
        )
        .await
        .map_err(|e| Error::data(format!("table '{}', file {}", def.name, f.path), e))?;
        let md = meta.metadata();
        let descr = md.file_metadata().schema_descr();
        if descr.num_columns() != out_descr.num_columns()
            || (0..descr.num_columns()).any(|c| descr.column(c) != out_descr.column(c))
        {
            return Ok(Err(format!("{}: schema differs from the table's", f.path)));
        }
        if has_floats {
            let nan_free = md
                .file_metadata()
                .key_value_metadata()
                .and_then(|kv| kv.iter().find(|k| k.key == NAN_FREE_KEY))
                .and_then(|k| k.value.as_deref())
                == Some("1");
            if !nan_free {
                return Ok(Err(format!("{}: not known to be free of NaN", f.path)));
            }
        }
        let conv = StatisticsConverter::try_new(key_name, meta.schema(), descr)
            .map_err(|e| Error::data("key statistics", e))?;
        let mins = conv
            .row_group_mins(md.row_groups())
            .map_err(|e| Error::data("key statistics", e))?;
        let maxs = conv
            .row_group_maxes(md.row_groups())
            .map_err(|e| Error::data("key statistics", e))?;
        let (Some(mins), Some(maxs)) = (as_i64(&mins), as_i64(&maxs)) else {
            return Ok(Err("key statistics not integers".into()));
        };
        for (g, rg) in md.row_groups().iter().enumerate() {
            if rg.num_rows() == 0 {
                continue;
            }
            if let Err(why) = eligible_group(rg, key_idx) {
                return Ok(Err(format!("{}: {why}", f.path)));
            }
            let (Some(min), Some(max)) = (mins[g], maxs[g]) else {
                return Ok(Err("row group without key bounds".into()));
            };
            groups.push(Group {
                input: i,
                index: g,
                min,
                max,
            });
        }
        inputs.push(Input {
            path,
            size: f.size,
            meta,
        });
    }
    if groups.is_empty() {
        return Ok(Err("no rows in the inputs".into()));
    }
    groups.sort_by_key(|g| (g.min, g.max));
    if groups.windows(2).any(|w| w[0].max >= w[1].min) {
        return Ok(Err("row groups overlap in key range".into()));
    }
    Ok(Ok((inputs, groups)))
}

/// Assigns each change to the row group whose key range holds it; upserts in a gap go to
/// the group before the gap (or the first group), deletes in a gap touch nothing.
fn assign(groups: &[Group], keys: &[i64], deletes: &[bool]) -> Vec<Vec<u32>> {
    let mut per = vec![Vec::new(); groups.len()];
    for (i, &k) in keys.iter().enumerate() {
        // First group whose max >= k.
        let g = groups.partition_point(|g| g.max < k);
        if g < groups.len() && groups[g].min <= k {
            per[g].push(i as u32);
        } else if !deletes[i] {
            per[g.saturating_sub(1)].push(i as u32);
        }
    }
    per
}

/// An output file being assembled.
struct OpenFile {
    writer: SerializedFileWriter<Vec<u8>>,
    factory: ArrowRowGroupWriterFactory,
    nan_free: bool,
}

struct Output<'a> {
    def: &'a TableDef,
    req: &'a RewriteRequest,
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
    done: Outcome,
}

pub(crate) fn has_nan(batch: &RecordBatch) -> bool {
    batch.columns().iter().any(|c| match c.data_type() {
        DataType::Float16 | DataType::Float32 | DataType::Float64 => {
            let a = cast(c, &DataType::Float64).expect("float cast");
            a.as_primitive::<arrow::datatypes::Float64Type>()
                .iter()
                .flatten()
                .any(f64::is_nan)
        }
        _ => false,
    })
}

impl Output<'_> {
    fn file(&mut self) -> Result<&mut OpenFile> {
        if self.open.is_none() {
            let props = writer_props(self.def);
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
    fn flush_pending(&mut self, all: bool) -> Result<()> {
        let per_group = row_group_rows();
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
    async fn maybe_roll(&mut self) -> Result<()> {
        if self.pending_rows == 0 && self.written() >= self.split_bytes {
            self.close_file().await?;
        }
        Ok(())
    }

    async fn close_file(&mut self) -> Result<()> {
        self.flush_pending(true)?;
        let Some(mut f) = self.open.take() else {
            return Ok(());
        };
        if f.writer.flushed_row_groups().is_empty() {
            return Ok(());
        }
        if f.nan_free {
            f.writer.append_key_value_metadata(KeyValue::new(
                NAN_FREE_KEY.to_string(),
                "1".to_string(),
            ));
        }
        let pe = |e| Error::data("parquet close", e);
        let meta = f.writer.finish().map_err(pe)?;
        let bytes = std::mem::take(f.writer.inner_mut());
        let size = bytes.len() as u64;
        let (stats, num_records, min_key, max_key) =
            stats_from_footer(self.def, &self.schema, &meta)?;
        let name = format!(
            "{}fr-{}-{}-{}-{}.parquet",
            self.dir,
            self.req.cycle_id,
            self.req.task_id,
            self.req.attempt,
            uuid::Uuid::new_v4().simple()
        );
        let path = Path::from(name.as_str());
        self.store
            .put(&path, PutPayload::from(bytes))
            .await
            .map_err(|e| Error::store(&path, e))?;
        self.done.bytes_written += size;
        self.done.rows_written += num_records;
        self.done.files.push(OutputFile {
            path: name,
            size,
            partition_values: self.req.partition_values.clone(),
            num_records,
            stats_json: stats.to_string(),
            min_key_json: key_to_json(&vec![KeyPart::Int(min_key as i128)]),
            max_key_json: key_to_json(&vec![KeyPart::Int(max_key as i128)]),
            modification_time: crate::rewrite::now_ms(),
        });
        Ok(())
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

/// Tries the row-group path; `Ok(None)` when the inputs do not qualify (nothing written).
pub async fn try_rewrite(
    store: &Arc<dyn ObjectStore>,
    def: &TableDef,
    req: &RewriteRequest,
    changes: &RecordBatch,
) -> Result<Option<Outcome>> {
    let schema = def.file_schema();
    let out_descr = ArrowSchemaConverter::new()
        .convert(&schema)
        .map_err(|e| Error::data("parquet schema", e))?;
    let (inputs, groups) = match plan_groups(store, def, req, &out_descr).await? {
        Ok(x) => x,
        Err(why) => {
            tracing::debug!(table = %def.name, %why, "row-group path not taken");
            return Ok(None);
        }
    };
    let key = &def.local_key()[0];
    let ops = changes
        .column_by_name(freshet_common::changes::OP_COLUMN)
        .ok_or_else(|| Error::Internal("changes lack __op".into()))?
        .as_primitive::<arrow::datatypes::Int8Type>();
    let deletes: Vec<bool> = (0..changes.num_rows())
        .map(|i| ops.value(i) != freshet_common::changes::OP_UPSERT)
        .collect();
    let keys: Vec<i64> = as_i64(
        changes
            .column_by_name(key)
            .ok_or_else(|| Error::Internal("changes lack the key".into()))?
            .as_ref(),
    )
    .ok_or_else(|| Error::Internal("key not an integer".into()))?
    .into_iter()
    .map(|k| k.unwrap_or_default())
    .collect();
    let per_group = assign(&groups, &keys, &deletes);

    // Output size estimate, to split like the full path does.
    let in_bytes: u64 = inputs.iter().map(|i| i.size).sum();
    let in_rows: u64 = groups
        .iter()
        .map(|g| {
            inputs[g.input]
                .meta
                .metadata()
                .row_group(g.index)
                .num_rows() as u64
        })
        .sum();
    let per_row = (in_bytes as f64 / in_rows.max(1) as f64).max(1.0);
    let upserts = deletes.iter().filter(|d| !**d).count() as f64;
    let est = in_bytes as f64 + upserts * per_row * 0.2; // ~20 % of upserts are inserts
    let files = (est / def.target_file_size as f64).ceil().max(1.0);
    let split_bytes = (est / files) as u64;

    let mut out = Output {
        def,
        req,
        schema: schema.clone(),
        store,
        dir: partition_dir(&def.partition_by, &req.partition_values),
        has_floats: schema.fields().iter().any(|f| f.data_type().is_floating()),
        open: None,
        pending: Vec::new(),
        pending_rows: 0,
        split_bytes: split_bytes.max(1),
        done: Outcome::default(),
    };
    out.done.counts.rows_read = in_rows;
    for (g, touched) in groups.iter().zip(&per_group) {
        let input = &inputs[g.input];
        let md = input.meta.metadata();
        let rg = md.row_group(g.index);
        let (start, end) = rg
            .columns()
            .iter()
            .map(|c| {
                let (s, l) = c.byte_range();
                (s, s + l)
            })
            .fold((u64::MAX, 0), |(a, b), (s, e)| (a.min(s), b.max(e)));
        let data = store
            .get_range(&input.path, start..end)
            .await
            .map_err(|e| Error::store(&input.path, e))?;
        out.done.bytes_read += data.len() as u64;
        let chunk = RangeBytes {
            start,
            data,
            file_len: input.size.max(end),
        };
        if touched.is_empty() {
            out.flush_pending(true)?;
            out.maybe_roll().await?;
            let f = out.file()?;
            let pe = |e| Error::data("row group copy", e);
            let mut w = f.writer.next_row_group().map_err(pe)?;
            for (c, col) in rg.columns().iter().enumerate() {
                let close = ColumnCloseResult {
                    bytes_written: col.compressed_size() as u64,
                    rows_written: rg.num_rows() as u64,
                    metadata: col.clone(),
                    bloom_filter: None,
                    column_index: md
                        .column_index()
                        .map(|ci| ci[g.index][c].clone())
                        .filter(|ci| !matches!(ci, ColumnIndexMetaData::NONE)),
                    offset_index: md.offset_index().map(|oi| oi[g.index][c].clone()),
                };
                w.append_column(&chunk, close).map_err(pe)?;
            }
            w.close().map_err(pe)?;
            out.done.groups_copied += 1;
        } else {
            let ctx = || format!("table '{}', file {}", def.name, input.path);
            let reader =
                ParquetRecordBatchReaderBuilder::new_with_metadata(chunk, input.meta.clone())
                    .with_row_groups(vec![g.index])
                    .with_batch_size(ROW_GROUP_ROWS)
                    .build()
                    .map_err(|e| Error::data(ctx(), e))?;
            let rows = reader
                .map(|b| conform(&b.map_err(|e| Error::data(ctx(), e))?, &schema, &ctx()))
                .collect::<Result<Vec<_>>>()?;
            let mine = take_record_batch(changes, &UInt32Array::from(touched.clone()))
                .map_err(|e| Error::data("take", e))?;
            let (merged, counts) = apply_changes(&schema, &def.local_key(), &rows, &mine)?;
            drop(rows);
            out.done.counts.inserted += counts.inserted;
            out.done.counts.updated += counts.updated;
            out.done.counts.deleted += counts.deleted;
            if merged.num_rows() > 0 {
                if out.pending_rows == 0 {
                    out.maybe_roll().await?;
                }
                out.pending_rows += merged.num_rows();
                out.pending.push(merged);
                out.flush_pending(false)?;
            }
        }
    }
    out.close_file().await?;
    // Footer bytes read for the plan.
    for i in &inputs {
        let data_end = i
            .meta
            .metadata()
            .row_groups()
            .iter()
            .flat_map(|rg| {
                rg.columns()
                    .iter()
                    .map(|c| c.byte_range().0 + c.byte_range().1)
            })
            .max()
            .unwrap_or(0);
        out.done.bytes_read += i.size.saturating_sub(data_end);
    }
    Ok(Some(out.done))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rewrite::{rewrite_with, set_row_group_rows};
    use arrow::array::{Float64Array, Int8Array, Int64Array, StringArray};
    use arrow::datatypes::{Field, Schema};
    use freshet_proto::worker::v1::{InputFile, TableSpec};
    use object_store::memory::InMemory;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    type Row = (Option<String>, f64);

    /// The row-group size is process-wide: tests that set it run one at a time.
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn lock() -> std::sync::MutexGuard<'static, ()> {
        LOCK.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn def(target: u64) -> TableDef {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("v", DataType::Utf8, true),
            Field::new("f", DataType::Float64, false),
        ]));
        TableDef::new(
            "t",
            "memory:///t",
            schema,
            vec!["id".into()],
            vec![],
            target,
        )
        .unwrap()
    }

    fn change_batch(def: &TableDef, ch: &BTreeMap<i64, Option<Row>>) -> Vec<u8> {
        let s = freshet_common::changes::change_schema(def);
        let b = RecordBatch::try_new(
            s.clone(),
            vec![
                Arc::new(Int64Array::from(ch.keys().copied().collect::<Vec<_>>())),
                Arc::new(StringArray::from(
                    ch.values()
                        .map(|v| v.as_ref().and_then(|r| r.0.clone()))
                        .collect::<Vec<_>>(),
                )),
                Arc::new(Float64Array::from(
                    ch.values()
                        .map(|v| v.as_ref().map(|r| r.1).unwrap_or(0.0))
                        .collect::<Vec<_>>(),
                )),
                Arc::new(Int8Array::from(
                    ch.values()
                        .map(|v| if v.is_some() { 0 } else { 1 })
                        .collect::<Vec<_>>(),
                )),
            ],
        )
        .unwrap();
        freshet_common::ipc::encode(&s, &[b]).unwrap()
    }

    fn request(
        def: &TableDef,
        inputs: Vec<InputFile>,
        ch: &BTreeMap<i64, Option<Row>>,
    ) -> RewriteRequest {
        RewriteRequest {
            cycle_id: "c".into(),
            task_id: 1,
            attempt: 1,
            epoch: 1,
            table: Some(TableSpec {
                name: def.name.clone(),
                uri: def.uri.clone(),
                schema_ipc: freshet_common::ipc::encode_schema(&def.schema).unwrap(),
                primary_key: def.primary_key.clone(),
                partition_columns: vec![],
            }),
            inputs,
            partition_values: Default::default(),
            changes_ipc: change_batch(def, ch),
            target_file_size: def.target_file_size,
        }
    }

    async fn read_rows(
        store: &Arc<dyn ObjectStore>,
        path: &str,
    ) -> (Vec<(i64, Row)>, Arc<ParquetMetaData>, Bytes) {
        let bytes = freshet_common::storage::read_existing(store, &Path::from(path))
            .await
            .unwrap();
        let b = ParquetRecordBatchReaderBuilder::try_new(bytes.clone()).unwrap();
        let md = b.metadata().clone();
        let mut out = Vec::new();
        for batch in b.build().unwrap() {
            let batch = batch.unwrap();
            let ids = batch.column(0).as_primitive::<Int64Type>();
            let vs = batch.column(1).as_string::<i32>();
            let fs = batch
                .column(2)
                .as_primitive::<arrow::datatypes::Float64Type>();
            for i in 0..batch.num_rows() {
                let v = (!vs.is_null(i)).then(|| vs.value(i).to_string());
                out.push((ids.value(i), (v, fs.value(i))));
            }
        }
        (out, md, bytes)
    }

    /// Writes `base` as Freshet files (through the full path, from nothing).
    async fn write_base(
        store: &Arc<dyn ObjectStore>,
        def: &TableDef,
        base: &BTreeMap<i64, Row>,
    ) -> Vec<InputFile> {
        let ch: BTreeMap<i64, Option<Row>> =
            base.iter().map(|(k, v)| (*k, Some(v.clone()))).collect();
        let resp = rewrite_with(store, &request(def, vec![], &ch), "w", false)
            .await
            .unwrap();
        resp.files
            .iter()
            .map(|f| InputFile {
                path: f.path.clone(),
                size: f.size,
            })
            .collect()
    }

    fn row() -> impl Strategy<Value = Row> {
        (proptest::option::of("[a-z]{0,6}"), -1000i32..1000).prop_map(|(v, f)| (v, f as f64 / 8.0))
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]
        // The row-group path gives the rows of the full path and of a BTreeMap model, the
        // same stats and key range, and copies untouched row groups byte for byte.
        #[test]
        fn row_group_path_equals_full_path_and_model(
            base in proptest::collection::btree_map(0i64..300, row(), 1..150),
            ch in proptest::collection::btree_map(-20i64..330, proptest::option::of(row()), 0..25),
            group_rows in 3usize..20,
            two_files in any::<bool>(),
        ) {
            let _guard = lock();
            tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
                set_row_group_rows(group_rows);
                let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
                // One file, or (small target) several files with disjoint ranges.
                let d = def(if two_files { 2_000 } else { 1 << 30 });
                let inputs = write_base(&store, &d, &base).await;
                let d = def(1 << 30);
                let req = request(&d, inputs.clone(), &ch);
                let changes = freshet_common::ipc::decode(&req.changes_ipc).unwrap().1;
                let changes = concat_batches(&freshet_common::changes::change_schema(&d), &changes).unwrap();
                prop_assert!(try_rewrite(&store, &d, &req, &changes).await.unwrap().is_some(), "row-group path taken");
                let fast = rewrite_with(&store, &req, "w", true).await.unwrap();
                let full = rewrite_with(&store, &req, "w", false).await.unwrap();

                let mut model = base.clone();
                for (k, v) in &ch {
                    match v { Some(v) => { model.insert(*k, v.clone()); } None => { model.remove(k); } }
                }
                let model: Vec<(i64, Row)> = model.into_iter().collect();
                let mut got = Vec::new();
                for f in &fast.files { got.extend(read_rows(&store, &f.path).await.0); }
                prop_assert_eq!(&got, &model);
                let mut want = Vec::new();
                for f in &full.files { want.extend(read_rows(&store, &f.path).await.0); }
                prop_assert_eq!(&want, &model);
                prop_assert_eq!((fast.rows_inserted, fast.rows_updated, fast.rows_deleted, fast.rows_written),
                    (full.rows_inserted, full.rows_updated, full.rows_deleted, full.rows_written));
                prop_assert_eq!(fast.files.len(), full.files.len());
                for (a, b) in fast.files.iter().zip(&full.files) {
                    let sa: serde_json::Value = serde_json::from_str(&a.stats_json).unwrap();
                    let sb: serde_json::Value = serde_json::from_str(&b.stats_json).unwrap();
                    prop_assert_eq!(sa, sb);
                    prop_assert_eq!(&a.min_key_json, &b.min_key_json);
                    prop_assert_eq!(&a.max_key_json, &b.max_key_json);
                }

                // Untouched input row groups reappear byte for byte.
                let mut out_chunks: Vec<Vec<u8>> = Vec::new();
                for f in &fast.files {
                    let (_, md, bytes) = read_rows(&store, &f.path).await;
                    for rg in md.row_groups() {
                        for c in rg.columns() {
                            let (s, l) = c.byte_range();
                            out_chunks.push(bytes.slice(s as usize..(s + l) as usize).to_vec());
                        }
                    }
                }
                let mut untouched = 0;
                for input in &inputs {
                    let (_, md, bytes) = read_rows(&store, &input.path).await;
                    let fs = d.file_schema();
                    let ids = StatisticsConverter::try_new("id", &fs, md.file_metadata().schema_descr()).unwrap();
                    let mins = as_i64(&ids.row_group_mins(md.row_groups()).unwrap()).unwrap();
                    let maxs = as_i64(&ids.row_group_maxes(md.row_groups()).unwrap()).unwrap();
                    for (g, rg) in md.row_groups().iter().enumerate() {
                        let (lo, hi) = (mins[g].unwrap(), maxs[g].unwrap());
                        // Untouched: no change inside its range, and no upsert in the gap
                        // after it (gap upserts join the group before them).
                        let next_min = model_next_min(&base, hi);
                        let touched = ch.iter().any(|(k, v)| (lo..=hi).contains(k)
                            || (v.is_some() && *k > hi && next_min.is_none_or(|n| *k < n))
                            || (v.is_some() && g == 0 && *k < lo && input.path == inputs[0].path));
                        if touched { continue }
                        untouched += 1;
                        for c in rg.columns() {
                            let (s, l) = c.byte_range();
                            let src = bytes.slice(s as usize..(s + l) as usize).to_vec();
                            prop_assert!(out_chunks.contains(&src), "untouched row group {} not copied byte for byte", g);
                        }
                    }
                }
                let _ = untouched;
                Ok(())
            })?;
        }
    }

    /// The smallest base key above `k`, if any.
    fn model_next_min(base: &BTreeMap<i64, Row>, k: i64) -> Option<i64> {
        base.range(k + 1..).next().map(|(k, _)| *k)
    }

    #[tokio::test]
    #[allow(clippy::await_holding_lock)]
    async fn a_recent_batch_copies_the_older_row_groups_and_deletes_can_empty_a_group() {
        let _guard = lock();
        set_row_group_rows(10);
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let d = def(1 << 30);
        let base: BTreeMap<i64, Row> = (0..100)
            .map(|k| (k, (Some(format!("v{k}")), k as f64)))
            .collect();
        let inputs = write_base(&store, &d, &base).await;
        // Delete the whole group 40..=49, update 95, insert 100..105 after the end.
        let mut ch: BTreeMap<i64, Option<Row>> = (40..50).map(|k| (k, None)).collect();
        ch.insert(95, Some((None, -1.0)));
        for k in 100..105 {
            ch.insert(k, Some((Some("new".into()), 0.5)));
        }
        let req = request(&d, inputs, &ch);
        let schema = d.file_schema();
        let changes = freshet_common::ipc::decode(&req.changes_ipc).unwrap().1;
        let changes =
            concat_batches(&freshet_common::changes::change_schema(&d), &changes).unwrap();
        let done = try_rewrite(&store, &d, &req, &changes)
            .await
            .unwrap()
            .expect("row-group path");
        assert_eq!(done.groups_copied, 8, "groups 0-3 and 5-8 copied");
        assert_eq!(done.counts.deleted, 10);
        assert_eq!(done.counts.updated, 1);
        assert_eq!(done.counts.inserted, 5);
        assert_eq!(done.files.len(), 1);
        let (rows, md, _) = read_rows(&store, &done.files[0].path).await;
        assert_eq!(rows.len(), 95);
        assert!(rows.windows(2).all(|w| w[0].0 < w[1].0), "sorted");
        assert!(
            md.row_groups()
                .iter()
                .all(|rg| rg.sorting_columns().is_some())
        );
        let _ = schema;
        // Only the copied groups' bytes and the touched group were read, not the whole file.
        assert_eq!(done.files[0].min_key_json, r#"["0"]"#);
        assert_eq!(done.files[0].max_key_json, r#"["104"]"#);
    }

    /// Rows of a table with list columns: (id, tags, nums) with tags/nums as text.
    async fn read_list_rows(store: &Arc<dyn ObjectStore>, path: &str) -> Vec<String> {
        let bytes = freshet_common::storage::read_existing(store, &Path::from(path))
            .await
            .unwrap();
        let mut out = Vec::new();
        for b in ParquetRecordBatchReaderBuilder::try_new(bytes)
            .unwrap()
            .build()
            .unwrap()
        {
            let b = b.unwrap();
            let fmt = arrow::util::display::FormatOptions::default().with_null("null");
            let cols: Vec<_> = b
                .columns()
                .iter()
                .map(|c| arrow::util::display::ArrayFormatter::try_new(c, &fmt).unwrap())
                .collect();
            for i in 0..b.num_rows() {
                out.push(
                    cols.iter()
                        .map(|c| c.value(i).to_string())
                        .collect::<Vec<_>>()
                        .join("|"),
                );
            }
        }
        out
    }

    #[tokio::test]
    #[allow(clippy::await_holding_lock)]
    async fn list_columns_take_the_row_group_path_and_match_the_full_path() {
        use arrow::array::{ListBuilder, StringBuilder};
        use freshet_common::schema::list_of;
        let _guard = lock();
        set_row_group_rows(10);
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        // A list column before the key: leaf and field indexes agree only by construction.
        let schema = Arc::new(Schema::new(vec![
            Field::new("tags", list_of(DataType::Utf8), true),
            Field::new("id", DataType::Int64, false),
            Field::new("nums", list_of(DataType::Int32), true),
        ]));
        let d = TableDef::new(
            "t",
            "memory:///t",
            schema,
            vec!["id".into()],
            vec![],
            1 << 30,
        )
        .unwrap();
        let changes =
            |ids: Vec<i64>, ops: Vec<i8>| {
                let mut tags = ListBuilder::new(StringBuilder::new())
                    .with_field(Arc::new(Field::new("element", DataType::Utf8, true)));
                let mut nums = ListBuilder::new(arrow::array::Int32Builder::new())
                    .with_field(Arc::new(Field::new("element", DataType::Int32, true)));
                for &k in &ids {
                    match k % 3 {
                        0 => {
                            tags.append_null();
                            nums.append(true);
                        }
                        1 => {
                            tags.append_value([Some(format!("a{k}")), None]);
                            nums.append_value([Some(k as i32), None, Some(-1)]);
                        }
                        _ => {
                            tags.append_value([Some("x,\"y\"".to_string())]);
                            nums.append_null();
                        }
                    }
                }
                let s = freshet_common::changes::change_schema(&d);
                let b = RecordBatch::try_new(
                    s.clone(),
                    vec![
                        Arc::new(tags.finish()),
                        Arc::new(Int64Array::from(ids)),
                        Arc::new(nums.finish()),
                        Arc::new(Int8Array::from(ops)),
                    ],
                )
                .unwrap();
                freshet_common::ipc::encode(&s, &[b]).unwrap()
            };
        let req = |inputs: Vec<InputFile>, ipc: Vec<u8>| RewriteRequest {
            cycle_id: "c".into(),
            task_id: 1,
            attempt: 1,
            epoch: 1,
            table: Some(TableSpec {
                name: d.name.clone(),
                uri: d.uri.clone(),
                schema_ipc: freshet_common::ipc::encode_schema(&d.schema).unwrap(),
                primary_key: d.primary_key.clone(),
                partition_columns: vec![],
            }),
            inputs,
            partition_values: Default::default(),
            changes_ipc: ipc,
            target_file_size: d.target_file_size,
        };
        let ids: Vec<i64> = (0..100).collect();
        let base = rewrite_with(&store, &req(vec![], changes(ids, vec![0; 100])), "w", false)
            .await
            .unwrap();
        let inputs: Vec<InputFile> = base
            .files
            .iter()
            .map(|f| InputFile {
                path: f.path.clone(),
                size: f.size,
            })
            .collect();
        // Update 41 and 95, delete 42, insert 120.
        let r = req(inputs, changes(vec![41, 42, 95, 120], vec![0, 1, 0, 0]));
        let batches = freshet_common::ipc::decode(&r.changes_ipc).unwrap().1;
        let ch = concat_batches(&freshet_common::changes::change_schema(&d), &batches).unwrap();
        let done = try_rewrite(&store, &d, &r, &ch)
            .await
            .unwrap()
            .expect("row-group path taken with list columns");
        assert_eq!(done.groups_copied, 8);
        assert_eq!(
            (
                done.counts.updated,
                done.counts.deleted,
                done.counts.inserted
            ),
            (2, 1, 1)
        );
        let fast = rewrite_with(&store, &r, "w", true).await.unwrap();
        let full = rewrite_with(&store, &r, "w", false).await.unwrap();
        assert_eq!(fast.files.len(), 1);
        assert_eq!(
            read_list_rows(&store, &fast.files[0].path).await,
            read_list_rows(&store, &full.files[0].path).await
        );
        let rows = read_list_rows(&store, &fast.files[0].path).await;
        assert_eq!(rows.len(), 100);
        assert_eq!(rows[1], r#"[a1, null]|1|[1, null, -1]"#);
        assert_eq!(rows[2], r#"[x,"y"]|2|null"#);
        let sa: serde_json::Value = serde_json::from_str(&fast.files[0].stats_json).unwrap();
        let sb: serde_json::Value = serde_json::from_str(&full.files[0].stats_json).unwrap();
        assert_eq!(sa, sb);
        assert!(sa["nullCount"].get("tags").is_none(), "{sa}");
        assert!(sa["minValues"].get("nums").is_none(), "{sa}");
        assert_eq!(sa["minValues"]["id"], 0);
        assert_eq!(sa["maxValues"]["id"], 120);
    }

    #[tokio::test]
    #[allow(clippy::await_holding_lock)]
    async fn files_that_do_not_declare_their_order_take_the_full_path() {
        let _guard = lock();
        set_row_group_rows(crate::rewrite::ROW_GROUP_ROWS);
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let d = def(1 << 30);
        // A foreign file: unsorted, no sorting_columns, default (truncating) statistics.
        let b = RecordBatch::try_new(
            d.file_schema(),
            vec![
                Arc::new(Int64Array::from(vec![5, 1, 3])),
                Arc::new(StringArray::from(vec![Some("e"), Some("a"), None])),
                Arc::new(Float64Array::from(vec![5.0, 1.0, 3.0])),
            ],
        )
        .unwrap();
        let mut buf = Vec::new();
        let mut w = ArrowWriter::try_new(&mut buf, d.file_schema(), None).unwrap();
        w.write(&b).unwrap();
        w.close().unwrap();
        let size = buf.len() as u64;
        store
            .put(&Path::from("foreign.parquet"), PutPayload::from(buf))
            .await
            .unwrap();
        let ch = BTreeMap::from([
            (3, Some((Some("c".to_string()), 3.5))),
            (2, Some((None, 2.0))),
        ]);
        let req = request(
            &d,
            vec![InputFile {
                path: "foreign.parquet".into(),
                size,
            }],
            &ch,
        );
        let changes = freshet_common::ipc::decode(&req.changes_ipc).unwrap().1;
        let changes =
            concat_batches(&freshet_common::changes::change_schema(&d), &changes).unwrap();
        assert!(
            try_rewrite(&store, &d, &req, &changes)
                .await
                .unwrap()
                .is_none()
        );
        let resp = crate::rewrite::rewrite(&store, &req, "w").await.unwrap();
        let (rows, _, _) = read_rows(&store, &resp.files[0].path).await;
        assert_eq!(
            rows.iter().map(|r| r.0).collect::<Vec<_>>(),
            vec![1, 2, 3, 5]
        );
    }
}
