//! The `freshet` command: embedded dev mode, tables, ingest, query and admin.

mod admin;
mod dev;
mod ingest;
mod output;
mod query;
mod table;

use clap::{Parser, Subcommand};

/// Freshet keeps Delta Lake tables fresh: only the Parquet files that changes touch are
/// rewritten, in one atomic commit, every few seconds.
#[derive(Parser)]
#[command(name = "freshet", version)]
struct Cli {
    /// The coordinator's gRPC endpoint.
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
    /// Manage tables.
    #[command(subcommand)]
    Table(table::TableCommand),
    /// Send Parquet, CSV or NDJSON files as changes through the ingest API.
    Ingest(ingest::IngestArgs),
    /// Run SQL over the tables with DataFusion.
    Query(query::QueryArgs),
    /// Inspect tables and cycles through the admin API.
    #[command(subcommand)]
    Admin(admin::AdminCommand),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Dev(args) => dev::run(args).await,
        Command::Table(cmd) => table::run(&cli.endpoint, cmd).await,
        Command::Ingest(args) => ingest::run(&cli.endpoint, args).await,
        Command::Query(args) => query::run(&cli.endpoint, args).await,
        Command::Admin(cmd) => admin::run(&cli.endpoint, cmd).await,
    }
}
