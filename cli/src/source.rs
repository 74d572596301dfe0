//! `freshet source add|list|status`: the CDC sources the leader runs (defined under
//! `[[sources]]` in the coordinator's configuration, or added at run time).

use anyhow::bail;
use clap::Subcommand;
use freshet_proto::admin::v1::{
    AddSourceRequest, ListSourcesRequest, RemoveSourceRequest, ResyncTableRequest, SourceInfo,
};

use crate::output::{Format, table};

#[derive(Subcommand)]
pub enum SourceCommand {
    /// Add a source at run time, or replace a run-time source of the same name (tables it
    /// adds are copied on their own). The definition is checked against its database and
    /// recorded in the coordinator's catalog; passwords come from the leader's environment
    /// or files (`password_env` / `password_file`), never from the definition.
    Add {
        /// TOML file with one source (the keys of a `[[sources]]` entry); `-` reads stdin.
        #[arg(short, long)]
        file: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: Format,
    },
    /// Remove a source added at run time: stop it, drop its replication slot and
    /// publication, forget it. Its tables stay (drop them with `freshet table drop`).
    Remove {
        /// The source's name.
        name: String,
        /// Keep the publication (other consumers use it).
        #[arg(long)]
        keep_publication: bool,
    },
    /// Copy a source's table again from scratch and stream on (after an incompatible
    /// schema change paused it). The Delta table is deleted and re-created.
    Resync {
        /// The Freshet table.
        table: String,
    },
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
        "state": s.state, "confirmed_lsn": s.confirmed_lsn, "lag_bytes": s.lag_bytes,
        "lag_ms": s.lag_ms, "snapshot_rows": s.snapshot_rows, "transactions": s.transactions,
        "error": s.error, "tables": s.tables, "origin": s.origin,
    })
}

pub async fn run(endpoint: &str, cmd: SourceCommand) -> anyhow::Result<()> {
    let mut c = crate::admin::client(endpoint).await?;
    if let SourceCommand::Add { file, output } = cmd {
        let definition = if file == "-" {
            std::io::read_to_string(std::io::stdin())?
        } else {
            std::fs::read_to_string(&file).map_err(|e| anyhow::anyhow!("reading {file}: {e}"))?
        };
        let added = c
            .add_source(AddSourceRequest { definition })
            .await?
            .into_inner()
            .source
            .unwrap_or_default();
        eprintln!(
            "source '{}' recorded and starting (follow it with `freshet source status {}`)",
            added.name, added.name
        );
        return print(&[added], output);
    }
    if let SourceCommand::Remove {
        name,
        keep_publication,
    } = &cmd
    {
        c.remove_source(RemoveSourceRequest {
            name: name.clone(),
            keep_publication: *keep_publication,
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
        eprintln!(
            "source '{name}' removed: slot dropped{}; its tables stay served",
            if *keep_publication {
                ""
            } else {
                ", publication dropped"
            }
        );
        return Ok(());
    }
    if let SourceCommand::Resync { table } = &cmd {
        let r = c
            .resync_table(ResyncTableRequest {
                table: table.clone(),
            })
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))?
            .into_inner();
        eprintln!(
            "table '{table}' deleted; source '{}' copies it again (follow with `freshet source status {}`)",
            r.source, r.source
        );
        return Ok(());
    }
    let sources = c
        .list_sources(ListSourcesRequest {})
        .await?
        .into_inner()
        .sources;
    let (sources, output) = match cmd {
        SourceCommand::Add { .. } | SourceCommand::Remove { .. } | SourceCommand::Resync { .. } => {
            unreachable!("handled above")
        }
        SourceCommand::List { output } => (sources, output),
        SourceCommand::Status { name, output } => {
            let one: Vec<_> = sources.into_iter().filter(|s| s.name == name).collect();
            if one.is_empty() {
                bail!("no source named '{name}' (see `freshet source list`)");
            }
            (one, output)
        }
    };
    print(&sources, output)
}

fn print(sources: &[SourceInfo], output: Format) -> anyhow::Result<()> {
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
        "lag ms",
        "snapshot rows",
        "txns",
        "tables",
        "error",
    ]);
    for s in sources {
        t.add_row(vec![
            s.name.clone(),
            s.state.clone(),
            s.slot.clone(),
            s.confirmed_lsn.clone(),
            s.lag_bytes.to_string(),
            s.lag_ms.to_string(),
            s.snapshot_rows.to_string(),
            s.transactions.to_string(),
            s.tables.join(","),
            s.error.clone(),
        ]);
    }
    println!("{t}");
    Ok(())
}
