//! `freshet query`: SQL over the tables, by name. Against a coordinator, through its Arrow
//! Flight SQL endpoint (the tables at their committed versions, read by the coordinator;
//! docs/query.md); with `--version` (time travel), `--table NAME=URI` or `--via-flight=false`,
//! DataFusion here over the Delta tables themselves. A coordinator without Flight SQL
//! (an older one) gets the local path, with a message.

use anyhow::Context;
use clap::Args;
use deltalake::datafusion::prelude::SessionContext;
use freshet_coordinator::flight::arrow_flight;
use freshet_proto::admin::v1::ListTablesRequest;
use futures::TryStreamExt;

use crate::output::Format;

#[derive(Args)]
pub struct QueryArgs {
    /// The SQL.
    sql: String,
    /// Read tables at this Delta version (read here, not through Flight SQL).
    #[arg(long)]
    version: Option<u64>,
    /// Tables to register as NAME=URI (without a server); otherwise the server's tables.
    #[arg(long = "table")]
    tables: Vec<String>,
    /// Ask the coordinator (Flight SQL); `--via-flight=false` reads the Delta tables here.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    via_flight: bool,
    /// `committed` (what cycles committed, what every Delta reader sees) or `latest` (also
    /// every acknowledged change not yet committed: read-your-writes; through the coordinator).
    #[arg(long, default_value = "committed", value_parser = ["committed", "latest"])]
    freshness: String,
    #[arg(short, long, value_enum, default_value_t)]
    output: Format,
}

pub async fn run(endpoint: &str, args: QueryArgs) -> anyhow::Result<()> {
    let latest = args.freshness == "latest";
    if latest && !(args.tables.is_empty() && args.version.is_none() && args.via_flight) {
        anyhow::bail!(
            "--freshness latest needs the coordinator (staged changes live there): drop --table/--version/--via-flight=false"
        );
    }
    let batches = if args.tables.is_empty() && args.version.is_none() && args.via_flight {
        match via_flight(endpoint, &args.sql, latest).await {
            Ok(b) => b,
            Err(Fallback::Local(why)) if latest => {
                anyhow::bail!("--freshness latest needs a coordinator with Flight SQL ({why})")
            }
            Err(Fallback::Local(why)) => {
                eprintln!(
                    "freshet query: the coordinator does not serve Flight SQL ({why}); reading the tables here"
                );
                local(endpoint, &args).await?
            }
            Err(Fallback::Fail(e)) => return Err(e),
        }
    } else {
        local(endpoint, &args).await?
    };
    print(&batches, args.output)
}

enum Fallback {
    /// The server has no Flight SQL service: read locally.
    Local(String),
    /// The query failed.
    Fail(anyhow::Error),
}

/// Runs `sql` through the coordinator's Flight SQL endpoint.
async fn via_flight(
    endpoint: &str,
    sql: &str,
    latest: bool,
) -> Result<Vec<arrow::array::RecordBatch>, Fallback> {
    use arrow_flight::error::FlightError;
    use arrow_flight::sql::client::FlightSqlServiceClient;
    let conn = crate::channel(endpoint).await.map_err(Fallback::Fail)?;
    let mut client = FlightSqlServiceClient::new(conn);
    if latest {
        client.set_header("x-freshet-freshness", "latest");
    }
    let fail = |e: FlightError| match &e {
        // tonic's answer for a service the server does not have: no message of ours.
        FlightError::Tonic(s)
            if s.code() == tonic::Code::Unimplemented && !s.message().contains("Freshet") =>
        {
            Fallback::Local(s.to_string())
        }
        FlightError::Tonic(s) => Fallback::Fail(anyhow::Error::new((**s).clone())),
        _ => Fallback::Fail(anyhow::anyhow!("{e}")),
    };
    let info = client.execute(sql.to_string(), None).await.map_err(fail)?;
    let mut out = Vec::new();
    for ep in info.endpoint {
        let ticket = ep
            .ticket
            .ok_or_else(|| Fallback::Fail(anyhow::anyhow!("the server sent no ticket")))?;
        let stream = client.do_get(ticket).await.map_err(fail)?;
        out.extend(stream.try_collect::<Vec<_>>().await.map_err(fail)?);
    }
    Ok(out)
}

/// DataFusion here over the Delta tables (the server's, or `--table`s).
async fn local(endpoint: &str, args: &QueryArgs) -> anyhow::Result<Vec<arrow::array::RecordBatch>> {
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
    Ok(ctx.sql(&args.sql).await?.collect().await?)
}

fn print(batches: &[arrow::array::RecordBatch], output: Format) -> anyhow::Result<()> {
    match output {
        Format::Table => println!("{}", arrow::util::pretty::pretty_format_batches(batches)?),
        Format::Json => {
            let mut w = arrow::json::ArrayWriter::new(Vec::new());
            for b in batches {
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
            for b in batches {
                w.write(b)?;
            }
        }
    }
    Ok(())
}
