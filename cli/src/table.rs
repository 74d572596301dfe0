//! `freshet table create`: define (or adopt) a table at run time.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Subcommand;
use freshet_common::schema::{SchemaSpec, canonical_schema};
use freshet_proto::admin::v1::{AlterTableRequest, CreateTableRequest, DropTableRequest};

use crate::output::table_json;

#[derive(Subcommand)]
pub enum TableCommand {
    /// Create a Delta table (or adopt an existing one with the same schema) and serve it.
    Create {
        /// The table's name.
        name: String,
        /// The Delta table's URI (file://, s3://, or a local path).
        #[arg(long)]
        uri: String,
        /// Take the schema from this Parquet file.
        #[arg(long, conflicts_with = "schema")]
        like: Option<PathBuf>,
        /// Take the schema from this JSON file ({"fields":[{"name","type","nullable"}]}).
        #[arg(long)]
        schema: Option<PathBuf>,
        /// Primary key columns, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        primary_key: Vec<String>,
        /// Partition columns (a subset of the key), comma-separated.
        #[arg(long, value_delimiter = ',')]
        partition_by: Vec<String>,
        /// Target file size in bytes (default: the server's, 32 MiB).
        #[arg(long, default_value_t = 0)]
        target_file_size: u64,
        /// How cycles apply changes: auto (the cost model picks deletion vectors or
        /// copy-on-write per file group), copy_on_write, or deletion_vectors. A table created
        /// with auto or deletion_vectors gets the Delta `deletionVectors` feature (reader 3 /
        /// writer 7): readers without deletion-vector support cannot read it. An adopted
        /// table keeps copy-on-write under auto.
        #[arg(long, default_value = "auto", value_parser = ["auto", "copy_on_write", "deletion_vectors"])]
        merge_mode: String,
    },
    /// Add nullable columns at the end of a table fed by the ingest API (existing rows read
    /// them as null).
    Alter {
        /// The table's name.
        name: String,
        /// A column to add, as NAME:TYPE (types as in schemas: int64, string, decimal(12,2),
        /// timestamp, array<int32>, ...); repeat for several.
        #[arg(long = "add-column", required = true)]
        add_column: Vec<String>,
    },
    /// Stop serving a table created at run time and forget it (its data stays unless
    /// --delete-data).
    Drop {
        /// The table's name.
        name: String,
        /// Also delete every object under the table's URI (data, Delta log, staged changes).
        #[arg(long)]
        delete_data: bool,
        /// Drop even though acknowledged changes are still pending (they are discarded).
        #[arg(long)]
        force: bool,
    },
}

pub async fn run(endpoint: &str, cmd: TableCommand) -> anyhow::Result<()> {
    match cmd {
        TableCommand::Create {
            name,
            uri,
            like,
            schema,
            primary_key,
            partition_by,
            target_file_size,
            merge_mode,
        } => {
            let spec = match (like, schema) {
                (Some(p), None) => {
                    let f = std::fs::File::open(&p)
                        .with_context(|| format!("cannot open {}", p.display()))?;
                    let b =
                        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
                            .with_context(|| format!("{} is not a Parquet file", p.display()))?;
                    SchemaSpec::from_arrow(&canonical_schema(b.schema()))
                }
                (None, Some(p)) => {
                    let text = std::fs::read_to_string(&p)
                        .with_context(|| format!("cannot read {}", p.display()))?;
                    SchemaSpec::from_json(&text)?
                }
                _ => bail!("give the schema with --like FILE.parquet or --schema FILE.json"),
            };
            let mut c = crate::admin::client(endpoint).await?;
            let resp = c
                .create_table(CreateTableRequest {
                    name,
                    uri,
                    schema_json: spec.to_json(),
                    primary_key,
                    partition_by,
                    target_file_size,
                    merge_mode: merge_mode.clone(),
                })
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?
                .into_inner();
            let t = resp.table.context("no table in reply")?;
            println!(
                "{} table '{}' at {}",
                if resp.adopted { "adopted" } else { "created" },
                t.name,
                t.uri
            );
            if t.deletion_vectors {
                println!(
                    "note: the table has deletion vectors (Delta reader 3 / writer 7): readers without deletion-vector support cannot read it"
                );
            }
            println!("{}", serde_json::to_string_pretty(&table_json(&t))?);
        }
        TableCommand::Alter { name, add_column } => {
            let mut fields = Vec::new();
            for c in &add_column {
                let (n, t) = c.split_once(':').with_context(|| {
                    format!("--add-column '{c}': give NAME:TYPE, e.g. note:string")
                })?;
                fields.push(freshet_common::schema::ColumnSpec {
                    name: n.trim().to_string(),
                    data_type: t.trim().to_string(),
                    nullable: true,
                });
            }
            let spec = SchemaSpec { fields };
            let mut c = crate::admin::client(endpoint).await?;
            let r = c
                .alter_table(AlterTableRequest {
                    name: name.clone(),
                    add_columns_json: spec.to_json(),
                })
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?
                .into_inner();
            let t = r.table.context("no table in reply")?;
            println!("altered table '{}'", t.name);
            println!("{}", serde_json::to_string_pretty(&table_json(&t))?);
        }
        TableCommand::Drop {
            name,
            delete_data,
            force,
        } => {
            let mut c = crate::admin::client(endpoint).await?;
            let r = c
                .drop_table(DropTableRequest {
                    name: name.clone(),
                    delete_data,
                    force,
                })
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?
                .into_inner();
            println!(
                "dropped table '{name}'{}{}",
                if r.pending_discarded > 0 {
                    format!(", {} pending changes discarded", r.pending_discarded)
                } else {
                    String::new()
                },
                if delete_data {
                    format!(", {} objects deleted", r.objects_deleted)
                } else {
                    ", data kept".to_string()
                }
            );
        }
    }
    Ok(())
}
