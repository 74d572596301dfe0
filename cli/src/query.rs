//! `freshet query`: DataFusion SQL over the tables, by name, at their latest or a given version.

use anyhow::Context;
use clap::Args;
use deltalake::datafusion::prelude::SessionContext;
use freshet_proto::admin::v1::ListTablesRequest;

use crate::output::Format;

#[derive(Args)]
pub struct QueryArgs {
    /// The SQL.
    sql: String,
    /// Read tables at this Delta version.
    #[arg(long)]
    version: Option<u64>,
    /// Tables to register as NAME=URI (without a server); otherwise the server's tables.
    #[arg(long = "table")]
    tables: Vec<String>,
    #[arg(short, long, value_enum, default_value_t)]
    output: Format,
}

pub async fn run(endpoint: &str, args: QueryArgs) -> anyhow::Result<()> {
    let mut tables: Vec<(String, String)> = args
        .tables
        .iter()
        .map(|t| {
            t.split_once('=')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .context("--table wants NAME=URI")
        })
        .collect::<anyhow::Result<_>>()?;
    if tables.is_empty() {
        let mut c = crate::admin::client(endpoint).await?;
        tables = c
            .list_tables(ListTablesRequest {})
            .await?
            .into_inner()
            .tables
            .into_iter()
            .map(|t| (t.name, t.uri))
            .collect();
    }
    let ctx = SessionContext::new();
    for (name, uri) in &tables {
        let url = deltalake::ensure_table_uri(uri)?;
        let mut table = deltalake::DeltaTable::try_from_url(url).await?;
        if let Some(v) = args.version {
            table
                .load_version(v as _)
                .await
                .with_context(|| format!("table '{name}' has no version {v}"))?;
        }
        table.update_datafusion_session(&ctx.state())?;
        ctx.register_table(name.as_str(), table.table_provider().await?)?;
    }
    let batches = ctx.sql(&args.sql).await?.collect().await?;
    match args.output {
        Format::Table => println!("{}", arrow::util::pretty::pretty_format_batches(&batches)?),
        Format::Json => {
            let mut w = arrow::json::ArrayWriter::new(Vec::new());
            for b in &batches {
                w.write(b)?;
            }
            w.finish()?;
            let out = w.into_inner();
            println!(
                "{}",
                if out.is_empty() {
                    "[]".to_string()
                } else {
                    String::from_utf8(out)?
                }
            );
        }
        Format::Csv => {
            let mut w = arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(std::io::stdout());
            for b in &batches {
                w.write(b)?;
            }
        }
    }
    Ok(())
}
