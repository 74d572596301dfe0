//! The `freshet` command: embedded dev mode, the coordinator and worker processes, tables,
//! ingest, query and admin. `main.rs` and the `freshet-coordinator` / `freshet-worker`
//! binaries are thin wrappers over [`run`].

mod admin;
mod dev;
mod ingest;
mod output;
mod query;
mod serve;
mod source;
mod table;

use std::ffi::OsString;

use clap::{Parser, Subcommand};

/// Freshet keeps Delta Lake tables fresh: only the Parquet files that changes touch are
/// rewritten, in one atomic commit, every few seconds.
#[derive(Parser)]
#[command(name = "freshet", version)]
struct Cli {
    /// The coordinator's gRPC endpoint (any coordinator: followers name the leader).
    #[arg(
        long,
        global = true,
        env = "FRESHET_ENDPOINT",
        default_value = "http://127.0.0.1:50051"
    )]
    endpoint: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a coordinator and N workers in one process on the local filesystem, with a demo.
    Dev(dev::DevArgs),
    /// Run a coordinator (leader-elected through etcd when cluster.etcd_endpoints is set).
    Coordinator(serve::ServeArgs),
    /// Run a worker (registers in etcd when cluster.etcd_endpoints is set).
    Worker(serve::ServeArgs),
    /// Manage tables.
    #[command(subcommand)]
    Table(table::TableCommand),
    /// Send Parquet, CSV or NDJSON files as changes through the ingest API.
    Ingest(ingest::IngestArgs),
    /// Run SQL over the tables with DataFusion.
    Query(query::QueryArgs),
    /// CDC sources (defined under [[sources]] in the coordinator's configuration).
    #[command(subcommand)]
    Source(source::SourceCommand),
    /// Inspect and steer tables, cycles, workers and the leader through the admin API.
    #[command(subcommand)]
    Admin(admin::AdminCommand),
}

/// Runs the command line `args` (the first is the program name).
pub async fn run(args: impl IntoIterator<Item = OsString>) -> anyhow::Result<()> {
    let cli = Cli::parse_from(args);
    match cli.command {
        Command::Dev(args) => dev::run(args).await,
        Command::Coordinator(args) => serve::coordinator(args).await,
        Command::Worker(args) => serve::worker(args).await,
        Command::Table(cmd) => table::run(&admin::leader_endpoint(&cli.endpoint).await, cmd).await,
        Command::Ingest(args) => {
            ingest::run(&admin::leader_endpoint(&cli.endpoint).await, args).await
        }
        Command::Query(args) => {
            query::run(&admin::leader_endpoint(&cli.endpoint).await, args).await
        }
        Command::Source(cmd) => {
            source::run(&admin::leader_endpoint(&cli.endpoint).await, cmd).await
        }
        Command::Admin(cmd) => {
            let endpoint = if cmd.any_coordinator() {
                cli.endpoint.clone()
            } else {
                admin::leader_endpoint(&cli.endpoint).await
            };
            admin::run(&endpoint, cmd).await
        }
    }
}

/// Runs `freshet <sub> <the process's own arguments>` (for the alias binaries).
pub async fn run_as(sub: &str) -> anyhow::Result<()> {
    let mut args: Vec<OsString> = std::env::args_os().collect();
    let program = args.first().cloned().unwrap_or_else(|| "freshet".into());
    args.splice(0..1.min(args.len()), [program, sub.into()]);
    run(args).await
}
