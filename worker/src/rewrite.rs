//! One task: decode the request, then take the row-group path (`rowgroup`) when the inputs
//! qualify, else the full path here: read the input files, apply the changes, split the
//! result at the target size, write the files and describe them (size, partition values,
//! stats, exact key range). Files are laid out by `format` and written through `output`.

use std::sync::Arc;
use std::time::Instant;

use arrow::record_batch::RecordBatch;
use freshet_common::error::{Error, Result};
use freshet_common::key::{key_at, key_to_json};
use freshet_common::merge::{MergeCounts, apply_changes, conform, split_points};
use freshet_common::stats::file_stats;
use freshet_common::table::{TableDef, partition_dir};
use freshet_proto::worker::v1::{InputFile, MergeMode, RewriteRequest, RewriteResponse};
use object_store::ObjectStore;
use object_store::path::Path;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::format::{FileFormat, READ_BATCH_ROWS};
use crate::output::{Described, Outcome};

/// How a task runs (the worker uses the defaults; tests vary them).
#[derive(Debug, Clone, Copy)]
pub struct RewriteOptions {
    /// Try the row-group path first.
    pub row_groups: bool,
    /// The layout of the files written.
    pub format: FileFormat,
    /// The task's changes may decode to at most this many bytes (`server.max_message_bytes`).
    pub max_decoded_bytes: usize,
}

impl Default for RewriteOptions {
    fn default() -> Self {
        RewriteOptions {
            row_groups: true,
            format: FileFormat::default(),
            max_decoded_bytes: freshet_common::config::ServerConfig::default().max_message_bytes,
        }
    }
}

/// Runs one rewrite task against the table's object store, its changes decoding to at most
/// the default `server.max_message_bytes`.
pub async fn rewrite(
    store: &Arc<dyn ObjectStore>,
    req: &RewriteRequest,
    worker_id: &str,
) -> Result<RewriteResponse> {
    rewrite_with(store, req, worker_id, &RewriteOptions::default()).await
}

/// [`rewrite`], refusing changes that decode to more than `max_decoded_bytes`.
pub async fn rewrite_within(
    store: &Arc<dyn ObjectStore>,
    req: &RewriteRequest,
    worker_id: &str,
    max_decoded_bytes: usize,
) -> Result<RewriteResponse> {
    let opts = RewriteOptions {
        max_decoded_bytes,
        ..Default::default()
    };
    rewrite_with(store, req, worker_id, &opts).await
}

/// [`rewrite`] with explicit options.
pub async fn rewrite_with(
    store: &Arc<dyn ObjectStore>,
    req: &RewriteRequest,
    worker_id: &str,
    opts: &RewriteOptions,
) -> Result<RewriteResponse> {
    let started = Instant::now();
    let def = table_def(req)?;
    let changes = task_changes(&def, &req.changes_ipc, opts.max_decoded_bytes)?;
    if req.mode == MergeMode::DeletionVectors as i32 && !req.inputs.is_empty() {
        let done = crate::deletion::rewrite(store, &def, req, &changes, opts.format).await?;
        return Ok(done.response(started, worker_id));
    }
    // The row-group path copies row groups verbatim, which would bring back rows that a
    // deletion vector deletes.
    let has_dv = req.inputs.iter().any(|i| i.deletion_vector.is_some());
    let fast = if opts.row_groups && !has_dv {
        crate::rowgroup::try_rewrite(store, &def, req, &changes, opts.format).await?
    } else {
        None
    };
    let done = match fast {
        Some(done) => done,
        None => full_rewrite(store, &def, req, &changes, opts.format).await?,
    };
    Ok(done.response(started, worker_id))
}

/// Decodes the table spec of a request into a definition.
pub fn table_def(req: &RewriteRequest) -> Result<TableDef> {
    let spec = req
        .table
        .as_ref()
        .ok_or_else(|| Error::invalid("?", "rewrite request without a table"))?;
    let schema = freshet_common::ipc::decode_schema(&spec.schema_ipc)?;
    TableDef::new(
        &spec.name,
        &spec.uri,
        schema,
        spec.primary_key.clone(),
        spec.partition_columns.clone(),
        req.target_file_size.max(1024),
    )
}

/// Decodes a task's changes, at most `max_decoded_bytes` of them once decompressed.
fn decode_changes(
    def: &TableDef,
    bytes: &[u8],
    max_decoded_bytes: usize,
) -> Result<Vec<RecordBatch>> {
    use freshet_common::ipc::{DecodeError, DecodeLimits, decode_bounded};
    let ctx = || format!("table '{}': task changes", def.name);
    // The column check below puts every row's one-byte op in a declared buffer, so the
    // byte bound bounds rows too.
    let limits = DecodeLimits::new(max_decoded_bytes, max_decoded_bytes);
    let batches = match decode_bounded(bytes, &limits) {
        Ok((_, batches)) => batches,
        Err(e @ DecodeError::OverLimit { .. }) => {
            return Err(Error::TooLarge {
                table: def.name.clone(),
                message: format!("task changes {e} (server.max_message_bytes)"),
            });
        }
        Err(e) => return Err(Error::data(ctx(), e)),
    };
    // Every column as the coordinator sends it: `conform` would otherwise fill a missing
    // column or widen one, allocating per declared row what no declared buffer holds.
    let schema = freshet_common::changes::change_schema(def);
    for b in &batches {
        for f in schema.fields() {
            match b.column_by_name(f.name()) {
                Some(c) if c.data_type() == f.data_type() => {}
                Some(c) => {
                    return Err(Error::data(
                        ctx(),
                        format!(
                            "column '{}' is {}, expected {}",
                            f.name(),
                            c.data_type(),
                            f.data_type()
                        ),
                    ));
                }
                None => return Err(Error::data(ctx(), format!("no column '{}'", f.name()))),
            }
        }
    }
    Ok(batches)
}

/// The task's changes as one batch in the change schema.
fn task_changes(def: &TableDef, bytes: &[u8], max_decoded_bytes: usize) -> Result<RecordBatch> {
    let schema = freshet_common::changes::change_schema(def);
    let batches = decode_changes(def, bytes, max_decoded_bytes)?
        .iter()
        .map(|b| conform(b, &schema, "task changes"))
        .collect::<Result<Vec<_>>>()?;
    arrow::compute::concat_batches(&schema, &batches).map_err(|e| Error::data("task changes", e))
}

/// The full path: every input read and merged in memory, then written split at the target
/// size.
async fn full_rewrite(
    store: &Arc<dyn ObjectStore>,
    def: &TableDef,
    req: &RewriteRequest,
    changes: &RecordBatch,
    format: FileFormat,
) -> Result<Outcome> {
    let inputs: Vec<&InputFile> = req.inputs.iter().collect();
    let (existing, bytes_read) = read_inputs(store, def, &inputs).await?;
    let (merged, counts): (RecordBatch, MergeCounts) =
        apply_changes(&def.file_schema(), &def.local_key(), &existing, changes)?;
    drop(existing);
    let per_file = rows_per_file(def, format, &merged, &counts, bytes_read)?;
    let mut done = Outcome {
        counts,
        bytes_read,
        ..Default::default()
    };
    write_split(store, def, req, format, &merged, per_file, &mut done).await?;
    Ok(done)
}

/// The live rows of `inputs` (rows their deletion vectors delete left out), and the bytes
/// read.
pub(crate) async fn read_inputs(
    store: &Arc<dyn ObjectStore>,
    def: &TableDef,
    inputs: &[&InputFile],
) -> Result<(Vec<RecordBatch>, u64)> {
    let mut existing = Vec::new();
    let mut bytes_read = 0;
    for input in inputs {
        let (batches, size) = read_file(store, def, &input.path).await?;
        bytes_read += size;
        match &input.deletion_vector {
            None => existing.extend(batches),
            Some(d) => {
                let context = format!("table '{}', file {}", def.name, input.path);
                let deleted = freshet_common::dv::read(
                    store,
                    &freshet_common::dv::from_proto(d, &context)?,
                    &context,
                )
                .await?;
                existing.extend(without_deleted(batches, &deleted, &context)?);
            }
        }
    }
    Ok((existing, bytes_read))
}

/// The batches of one file (in file order) without the rows `deleted` names.
fn without_deleted(
    batches: Vec<RecordBatch>,
    deleted: &roaring::RoaringTreemap,
    context: &str,
) -> Result<Vec<RecordBatch>> {
    let mut row = 0u64;
    let mut out = Vec::with_capacity(batches.len());
    for b in batches {
        let n = b.num_rows() as u64;
        if deleted.range_cardinality(row..row + n) == 0 {
            out.push(b);
        } else {
            let keep: arrow::array::BooleanArray =
                (row..row + n).map(|r| Some(!deleted.contains(r))).collect();
            out.push(
                arrow::compute::filter_record_batch(&b, &keep)
                    .map_err(|e| Error::data(context, e))?,
            );
        }
        row += n;
    }
    if deleted.max().is_some_and(|m| m >= row) {
        return Err(Error::data(
            context,
            format!(
                "its deletion vector names row {} of {row}",
                deleted.max().unwrap_or(0)
            ),
        ));
    }
    Ok(out)
}

async fn read_file(
    store: &Arc<dyn ObjectStore>,
    def: &TableDef,
    path: &str,
) -> Result<(Vec<RecordBatch>, u64)> {
    let location = Path::from(path);
    let ctx = || format!("table '{}', file {path}", def.name);
    let bytes = freshet_common::storage::read_existing(store, &location).await?;
    let size = bytes.len() as u64;
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
        .map_err(|e| Error::data(ctx(), e))?
        .with_batch_size(READ_BATCH_ROWS)
        .build()
        .map_err(|e| Error::data(ctx(), e))?;
    let schema = def.file_schema();
    let batches = reader
        .map(|b| conform(&b.map_err(|e| Error::data(ctx(), e))?, &schema, &ctx()))
        .collect::<Result<Vec<_>>>()?;
    Ok((batches, size))
}

/// Rows per output file, so files come out near the target size: from the input's bytes
/// per row, or from encoding a sample; the rows are then spread evenly over the files.
pub(crate) fn rows_per_file(
    def: &TableDef,
    format: FileFormat,
    merged: &RecordBatch,
    counts: &MergeCounts,
    bytes_read: u64,
) -> Result<usize> {
    let n = merged.num_rows();
    let bytes_per_row = if counts.rows_read > 0 && bytes_read > 0 {
        (bytes_read as f64 / counts.rows_read as f64).max(1.0)
    } else if n > 0 {
        let sample = merged.slice(0, n.min(8192));
        (format.encode(def, &sample)?.len() as f64 / sample.num_rows() as f64).max(1.0)
    } else {
        1.0
    };
    let rows_per_file = ((def.target_file_size as f64 / bytes_per_row) as usize).max(1);
    let files = n.div_ceil(rows_per_file).max(1);
    Ok(n.div_ceil(files).max(1))
}

/// Writes `merged` as files of `per_file` rows, each described from its rows.
pub(crate) async fn write_split(
    store: &Arc<dyn ObjectStore>,
    def: &TableDef,
    req: &RewriteRequest,
    format: FileFormat,
    merged: &RecordBatch,
    per_file: usize,
    done: &mut Outcome,
) -> Result<()> {
    let dir = partition_dir(&def.partition_by, &req.partition_values);
    let local_key = def.local_key();
    for (start, len) in split_points(merged.num_rows(), per_file) {
        let chunk = merged.slice(start, len);
        let bytes = format.encode(def, &chunk)?;
        let key_cols: Vec<&dyn arrow::array::Array> = local_key
            .iter()
            .map(|k| chunk.column_by_name(k).expect("key column").as_ref())
            .collect();
        let file = Described {
            num_records: len as u64,
            stats_json: file_stats(&chunk).to_string(),
            min_key_json: key_to_json(&key_at(&key_cols, 0)),
            max_key_json: key_to_json(&key_at(&key_cols, len - 1)),
        };
        done.put_file(store, req, &dir, bytes, file).await?;
    }
    Ok(())
}
