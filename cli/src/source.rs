//! `freshet source list|status`: the CDC sources the leader runs (defined under
//! `[[sources]]` in the coordinator's configuration).

use anyhow::bail;
use clap::Subcommand;
use freshet_proto::admin::v1::{ListSourcesRequest, SourceInfo};

use crate::output::{Format, table};

#[derive(Subcommand)]
pub enum SourceCommand {
    /// List sources with their state, confirmed LSN and lag.
    List {
        #[arg(short, long, value_enum, default_value_t)]
        output: Format,
    },
    /// Show one source.
    Status {
        /// The source's name.
        name: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: Format,
    },
}

fn json(s: &SourceInfo) -> serde_json::Value {
    serde_json::json!({
        "name": s.name, "kind": s.kind, "slot": s.slot, "publication": s.publication,
        "state": s.state, "confirmedLsn": s.confirmed_lsn, "lagBytes": s.lag_bytes,
        "snapshotRows": s.snapshot_rows, "transactions": s.transactions, "error": s.error,
        "tables": s.tables,
    })
}

pub async fn run(endpoint: &str, cmd: SourceCommand) -> anyhow::Result<()> {
    let mut c = crate::admin::client(endpoint).await?;
    let sources = c
        .list_sources(ListSourcesRequest {})
        .await?
        .into_inner()
        .sources;
    let (sources, output) = match cmd {
        SourceCommand::List { output } => (sources, output),
        SourceCommand::Status { name, output } => {
            let one: Vec<_> = sources.into_iter().filter(|s| s.name == name).collect();
            if one.is_empty() {
                bail!("no source named '{name}' (see `freshet source list`)");
            }
            (one, output)
        }
    };
    if output == Format::Json {
        let v: Vec<_> = sources.iter().map(json).collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let mut t = table(&[
        "source",
        "state",
        "slot",
        "confirmed LSN",
        "lag bytes",
        "snapshot rows",
        "txns",
        "tables",
        "error",
    ]);
    for s in &sources {
        t.add_row(vec![
            s.name.clone(),
            s.state.clone(),
            s.slot.clone(),
            s.confirmed_lsn.clone(),
            s.lag_bytes.to_string(),
            s.snapshot_rows.to_string(),
            s.transactions.to_string(),
            s.tables.join(","),
            s.error.clone(),
        ]);
    }
    println!("{t}");
    Ok(())
}
