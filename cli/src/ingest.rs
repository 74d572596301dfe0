//! `freshet ingest`: send Parquet, CSV or NDJSON files through the ingest API in batches.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use clap::Args;
use freshet_common::schema::SchemaSpec;
use freshet_proto::admin::v1::GetTableRequest;
use freshet_proto::ingest::v1::IngestRequest;
use freshet_proto::ingest::v1::ingest_request::Payload;
use freshet_proto::ingest::v1::ingest_service_client::IngestServiceClient;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Args)]
pub struct IngestArgs {
    /// The table.
    #[arg(long)]
    table: String,
    /// The column holding each row's op (upsert, insert, update, delete, c, r, u, d);
    /// without it every row is an upsert.
    #[arg(long, default_value = "op")]
    op_column: String,
    /// Rows per batch.
    #[arg(long, default_value_t = 50_000)]
    batch_rows: usize,
    /// Producer id for idempotent ingest (default: a new random id per run). Every batch is
    /// sent with it and its number, so a batch retried after a lost reply is applied once.
    #[arg(long, env = "FRESHET_PRODUCER_ID")]
    producer_id: Option<String>,
    /// First batch number (to resume a run under the same --producer-id).
    #[arg(long, default_value_t = 1)]
    first_batch: u64,
    /// Attempts per batch when the coordinator is unavailable or the reply is lost.
    #[arg(long, default_value_t = 8)]
    attempts: u32,
    /// Files: .parquet, .csv, .ndjson / .jsonl / .json.
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

/// The table's columns in the order (and subset) the CSV header names them.
fn csv_schema(path: &PathBuf, schema: &Schema) -> anyhow::Result<Arc<Schema>> {
    use std::io::BufRead;
    let mut header = String::new();
    std::io::BufReader::new(std::fs::File::open(path)?).read_line(&mut header)?;
    let mut fields = Vec::new();
    for name in header.trim_end_matches(['\r', '\n']).split(',') {
        let name = name.trim().trim_matches('"');
        match schema.field_with_name(name) {
            Ok(f) => fields.push(f.clone()),
            Err(_) => bail!(
                "{}: CSV column '{name}' is not a column of the table (columns: {})",
                path.display(),
                schema
                    .fields()
                    .iter()
                    .map(|f| f.name().as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
    Ok(Arc::new(Schema::new(fields)))
}

fn read_file(
    path: &PathBuf,
    schema: Arc<Schema>,
    batch_rows: usize,
) -> anyhow::Result<Vec<RecordBatch>> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let batches: Vec<RecordBatch> = match ext.as_str() {
        "parquet" => parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)?
            .with_batch_size(batch_rows)
            .build()?
            .collect::<Result<_, _>>()?,
        "csv" => arrow::csv::ReaderBuilder::new(csv_schema(path, &schema)?)
            .with_header(true)
            .with_batch_size(batch_rows)
            .build(f)?
            .collect::<Result<_, _>>()?,
        "ndjson" | "jsonl" | "json" => arrow::json::ReaderBuilder::new(schema)
            .with_batch_size(batch_rows)
            .build(std::io::BufReader::new(f))?
            .collect::<Result<_, _>>()?,
        other => bail!(
            "{}: unknown file type '.{other}' (want .parquet, .csv, .ndjson)",
            path.display()
        ),
    };
    Ok(batches)
}

pub async fn run(endpoint: &str, args: IngestArgs) -> anyhow::Result<()> {
    let mut admin = crate::admin::client(endpoint).await?;
    let info = admin
        .get_table(GetTableRequest {
            name: args.table.clone(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner()
        .table
        .context("no table in reply")?;
    let table_schema = SchemaSpec::from_json(&info.schema_json)?.to_arrow()?;
    let mut fields: Vec<Field> = table_schema
        .fields()
        .iter()
        .map(|f| f.as_ref().clone().with_nullable(true))
        .collect();
    fields.push(Field::new(&args.op_column, DataType::Utf8, true));
    let read_schema = Arc::new(Schema::new(fields));
    let mut client = IngestServiceClient::new(crate::channel(endpoint).await?)
        .max_encoding_message_size(256 * 1024 * 1024);
    let mut total = 0u64;
    let producer_id = args
        .producer_id
        .clone()
        .unwrap_or_else(|| format!("freshet-ingest-{}", uuid::Uuid::new_v4()));
    let mut batch_no = args.first_batch.max(1);
    let mut duplicates = 0u64;
    for path in &args.files {
        let batches = read_file(path, read_schema.clone(), args.batch_rows)?;
        let rows: u64 = batches.iter().map(|b| b.num_rows() as u64).sum();
        let bar = ProgressBar::new(rows).with_message(path.display().to_string());
        bar.set_style(
            ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} rows ({per_sec}, {eta})")?
                .progress_chars("=> "),
        );
        for b in batches {
            // CSV/NDJSON: drop an op column that the file does not have.
            let b = if b
                .column_by_name(&args.op_column)
                .is_some_and(|c| c.null_count() == c.len())
            {
                let mut b = b;
                let i = b.schema().index_of(&args.op_column)?;
                b.remove_column(i);
                b
            } else {
                b
            };
            let bytes = freshet_common::ipc::encode(&b.schema(), std::slice::from_ref(&b))?;
            let req = IngestRequest {
                table: args.table.clone(),
                payload: Some(Payload::ArrowIpc(bytes)),
                op_column: args.op_column.clone(),
                producer_id: producer_id.clone(),
                producer_sequence: batch_no,
            };
            // Retried with the same producer sequence: applied once whatever the failures.
            let mut attempt = 1;
            let resp = loop {
                match client.ingest(req.clone()).await {
                    Ok(r) => break r.into_inner(),
                    Err(s)
                        if attempt < args.attempts
                            && matches!(
                                s.code(),
                                tonic::Code::Unavailable
                                    | tonic::Code::Unknown
                                    | tonic::Code::DeadlineExceeded
                                    | tonic::Code::Internal
                            ) =>
                    {
                        bar.println(format!(
                            "{}: batch {batch_no}: {} (attempt {attempt}, retrying)",
                            path.display(),
                            s.message()
                        ));
                        tokio::time::sleep(std::time::Duration::from_millis(250 << attempt.min(6)))
                            .await;
                        attempt += 1;
                    }
                    Err(s) => bail!(
                        "{}: batch {batch_no} (producer '{producer_id}'): {}",
                        path.display(),
                        s.message()
                    ),
                }
            };
            duplicates += resp.duplicate as u64;
            batch_no += 1;
            bar.inc(resp.rows);
            total += resp.rows;
        }
        bar.finish();
    }
    eprintln!(
        "ingested {total} rows into '{}' as producer '{producer_id}', batches {}..{}{}",
        args.table,
        args.first_batch.max(1),
        batch_no.saturating_sub(1),
        if duplicates > 0 {
            format!(" ({duplicates} already staged before)")
        } else {
            String::new()
        }
    );
    Ok(())
}
