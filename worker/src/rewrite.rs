//! One task: read the input files, apply the changes, write new files split at the target
//! size, and describe them (size, partition values, stats, exact key range).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use arrow::record_batch::RecordBatch;
use freshet_common::error::{Error, Result};
use freshet_common::key::{key_at, key_to_json};
use freshet_common::merge::{MergeCounts, apply_changes, conform, split_points};
use freshet_common::stats::file_stats;
use freshet_common::table::{TableDef, partition_dir};
use freshet_proto::worker::v1::{OutputFile, RewriteRequest, RewriteResponse};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, Encoding};
use parquet::file::metadata::{KeyValue, SortingColumn};
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;

/// Rows per Parquet row group.
pub const ROW_GROUP_ROWS: usize = 64 * 1024;

static ROW_GROUP_ROWS_NOW: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(ROW_GROUP_ROWS);

/// Rows per row group in files written now ([`ROW_GROUP_ROWS`]; tests make it small).
pub fn row_group_rows() -> usize {
    ROW_GROUP_ROWS_NOW.load(std::sync::atomic::Ordering::Relaxed)
}

/// Sets the rows per row group (tests: several row groups from a few rows).
pub fn set_row_group_rows(n: usize) {
    ROW_GROUP_ROWS_NOW.store(n.max(1), std::sync::atomic::Ordering::Relaxed);
}

/// Writer settings of every file Freshet writes: SNAPPY, 64k-row row groups, exact
/// (untruncated) statistics, and `sorting_columns` naming the key, which is what lets a
/// later rewrite copy untouched row groups (see `rowgroup`).
pub fn writer_props(def: &TableDef) -> WriterProperties {
    let schema = def.file_schema();
    let sorting = def
        .local_key()
        .iter()
        .filter_map(|k| leaf_index(&schema, k))
        .map(|i| SortingColumn {
            column_idx: i as i32,
            descending: false,
            nulls_first: false,
        })
        .collect();
    let mut b = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(row_group_rows()))
        .set_statistics_truncate_length(None)
        .set_sorting_columns(Some(sorting))
        // Dictionary encoding is most of the cost of writing a file (every value hashed and
        // interned); a small dictionary page limit lets high-cardinality columns fall back
        // to plain early while low-cardinality ones keep their dictionaries.
        .set_dictionary_page_size_limit(DICTIONARY_PAGE_LIMIT);
    // Key columns are unique and, in Freshet's files, sorted: a dictionary never pays off,
    // and integer keys delta-encode to a few bits per row.
    for k in def.local_key() {
        let path = ColumnPath::from(k.as_str());
        b = b.set_column_dictionary_enabled(path.clone(), false);
        if schema
            .field_with_name(&k)
            .is_ok_and(|f| f.data_type().is_integer())
        {
            b = b.set_column_encoding(path, Encoding::DELTA_BINARY_PACKED);
        }
    }
    b.build()
}

/// Dictionary page size at which a column chunk falls back to plain encoding.
const DICTIONARY_PAGE_LIMIT: usize = 64 * 1024;

/// Parquet leaf columns an Arrow type is stored in (a list of scalars: one).
pub fn leaf_count(t: &arrow::datatypes::DataType) -> usize {
    use arrow::datatypes::DataType;
    match t {
        DataType::List(f)
        | DataType::LargeList(f)
        | DataType::ListView(f)
        | DataType::LargeListView(f)
        | DataType::FixedSizeList(f, _)
        | DataType::Map(f, _) => leaf_count(f.data_type()),
        DataType::Struct(fs) => fs.iter().map(|f| leaf_count(f.data_type())).sum(),
        _ => 1,
    }
}

/// The Parquet leaf column index of top-level column `name`: `sorting_columns` and column
/// chunks count leaves, not fields, and nested columns before the key shift them.
pub fn leaf_index(schema: &arrow::datatypes::Schema, name: &str) -> Option<usize> {
    let i = schema.index_of(name).ok()?;
    Some(
        schema.fields()[..i]
            .iter()
            .map(|f| leaf_count(f.data_type()))
            .sum(),
    )
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
        .with_batch_size(ROW_GROUP_ROWS)
        .build()
        .map_err(|e| Error::data(ctx(), e))?;
    let schema = def.file_schema();
    let batches = reader
        .map(|b| conform(&b.map_err(|e| Error::data(ctx(), e))?, &schema, &ctx()))
        .collect::<Result<Vec<_>>>()?;
    Ok((batches, size))
}

fn encode_parquet(def: &TableDef, batch: &RecordBatch) -> Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(def.target_file_size as usize + (1 << 20));
    let mut w = ArrowWriter::try_new(&mut buf, batch.schema(), Some(writer_props(def)))
        .map_err(|e| Error::data("parquet writer", e))?;
    w.write(batch)
        .map_err(|e| Error::data("parquet write", e))?;
    if !crate::rowgroup::has_nan(batch) {
        w.append_key_value_metadata(KeyValue::new(
            crate::rowgroup::NAN_FREE_KEY.to_string(),
            "1".to_string(),
        ));
    }
    w.close().map_err(|e| Error::data("parquet close", e))?;
    Ok(buf)
}

/// Runs one rewrite task against the table's object store, its changes decoding to at most
/// the default `server.max_message_bytes`.
pub async fn rewrite(
    store: &Arc<dyn ObjectStore>,
    req: &RewriteRequest,
    worker_id: &str,
) -> Result<RewriteResponse> {
    rewrite_with(store, req, worker_id, true).await
}

/// [`rewrite`], refusing changes that decode to more than `max_decoded_bytes`.
pub async fn rewrite_within(
    store: &Arc<dyn ObjectStore>,
    req: &RewriteRequest,
    worker_id: &str,
    max_decoded_bytes: usize,
) -> Result<RewriteResponse> {
    rewrite_inner(store, req, worker_id, true, max_decoded_bytes).await
}

/// [`rewrite`], with the row-group path allowed or not (tests compare both).
pub async fn rewrite_with(
    store: &Arc<dyn ObjectStore>,
    req: &RewriteRequest,
    worker_id: &str,
    row_groups: bool,
) -> Result<RewriteResponse> {
    let max = freshet_common::config::ServerConfig::default().max_message_bytes;
    rewrite_inner(store, req, worker_id, row_groups, max).await
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

async fn rewrite_inner(
    store: &Arc<dyn ObjectStore>,
    req: &RewriteRequest,
    worker_id: &str,
    row_groups: bool,
    max_decoded_bytes: usize,
) -> Result<RewriteResponse> {
    let started = Instant::now();
    let def = table_def(req)?;
    let file_schema = def.file_schema();
    let local_key = def.local_key();

    let change_batches = decode_changes(&def, &req.changes_ipc, max_decoded_bytes)?;
    let changes = arrow::compute::concat_batches(
        &freshet_common::changes::change_schema(&def),
        &change_batches
            .iter()
            .map(|b| {
                conform(
                    b,
                    &freshet_common::changes::change_schema(&def),
                    "task changes",
                )
            })
            .collect::<Result<Vec<_>>>()?,
    )
    .map_err(|e| Error::data("task changes", e))?;

    let fast = if row_groups {
        crate::rowgroup::try_rewrite(store, &def, req, &changes).await?
    } else {
        None
    };
    if let Some(done) = fast {
        return Ok(RewriteResponse {
            files: done.files,
            rows_read: done.counts.rows_read,
            rows_written: done.rows_written,
            rows_inserted: done.counts.inserted,
            rows_updated: done.counts.updated,
            rows_deleted: done.counts.deleted,
            bytes_read: done.bytes_read,
            bytes_written: done.bytes_written,
            duration_ms: started.elapsed().as_millis() as u64,
            worker_id: worker_id.to_string(),
        });
    }

    let mut existing = Vec::new();
    let mut bytes_read = 0;
    for input in &req.inputs {
        let (batches, size) = read_file(store, &def, &input.path).await?;
        existing.extend(batches);
        bytes_read += size;
    }
    let (merged, counts): (RecordBatch, MergeCounts) =
        apply_changes(&file_schema, &local_key, &existing, &changes)?;
    drop(existing);

    // Rows per file from the input's bytes per row, or from encoding a sample.
    let n = merged.num_rows();
    let bytes_per_row = if counts.rows_read > 0 && bytes_read > 0 {
        (bytes_read as f64 / counts.rows_read as f64).max(1.0)
    } else if n > 0 {
        let sample = merged.slice(0, n.min(8192));
        (encode_parquet(&def, &sample)?.len() as f64 / sample.num_rows() as f64).max(1.0)
    } else {
        1.0
    };
    let rows_per_file = ((def.target_file_size as f64 / bytes_per_row) as usize).max(1);
    let files = n.div_ceil(rows_per_file).max(1);
    let per_file = n.div_ceil(files).max(1);

    let partition_values: HashMap<String, String> = req.partition_values.clone();
    let dir = partition_dir(&def.partition_by, &partition_values);
    let mut out = Vec::new();
    let mut bytes_written = 0;
    for (start, len) in split_points(n, per_file) {
        let chunk = merged.slice(start, len);
        let bytes = encode_parquet(&def, &chunk)?;
        let size = bytes.len() as u64;
        let name = format!(
            "{dir}fr-{}-{}-{}-{}.parquet",
            req.cycle_id,
            req.task_id,
            req.attempt,
            uuid::Uuid::new_v4().simple()
        );
        let path = Path::from(name.as_str());
        store
            .put(&path, PutPayload::from(bytes))
            .await
            .map_err(|e| Error::store(&path, e))?;
        bytes_written += size;
        let key_cols: Vec<&dyn arrow::array::Array> = local_key
            .iter()
            .map(|k| chunk.column_by_name(k).expect("key column").as_ref())
            .collect();
        out.push(OutputFile {
            path: name,
            size,
            partition_values: partition_values.clone(),
            num_records: len as u64,
            stats_json: file_stats(&chunk).to_string(),
            min_key_json: key_to_json(&key_at(&key_cols, 0)),
            max_key_json: key_to_json(&key_at(&key_cols, len - 1)),
            modification_time: now_ms(),
        });
    }
    Ok(RewriteResponse {
        files: out,
        rows_read: counts.rows_read,
        rows_written: n as u64,
        rows_inserted: counts.inserted,
        rows_updated: counts.updated,
        rows_deleted: counts.deleted,
        bytes_read,
        bytes_written,
        duration_ms: started.elapsed().as_millis() as u64,
        worker_id: worker_id.to_string(),
    })
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
