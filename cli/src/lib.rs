//! The `freshet` command: embedded dev mode, the coordinator and worker processes, tables,
//! ingest, query and admin. `main.rs` and the `freshet-coordinator` / `freshet-worker`
//! binaries are thin wrappers over [`run`].

// `json!` of a cycle record with its tasks nests past the default limit.
#![recursion_limit = "256"]

mod admin;
mod dev;
mod ingest;
mod output;
mod query;
mod serve;
mod source;
mod table;

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use anyhow::Context;
use freshet_common::tls::ClientTls;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

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
    /// PEM CA bundle to verify the coordinator with (needed for `https://` endpoints).
    #[arg(long, global = true, env = "FRESHET_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// PEM client certificate, for coordinators that require one (with --tls-key).
    #[arg(long, global = true, env = "FRESHET_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, global = true, env = "FRESHET_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Bearer token for coordinators with [auth] (prefer --token-file: a flag is visible
    /// in the process list).
    #[arg(
        long,
        global = true,
        env = "FRESHET_TOKEN",
        hide_env_values = true,
        conflicts_with = "token_file"
    )]
    token: Option<String>,
    /// A file holding the bearer token (surrounding whitespace ignored).
    #[arg(long, global = true, env = "FRESHET_TOKEN_FILE")]
    token_file: Option<PathBuf>,
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
    let tls = match &cli.tls_ca {
        Some(ca) => {
            let identity = cli.tls_cert.as_deref().zip(cli.tls_key.as_deref());
            let direct = Arc::new(ClientTls::new(ca, identity)?);
            // A follower names the leader by its advertised address (in Kubernetes a pod
            // IP no certificate names): the leader is verified by the name the user gave,
            // which every coordinator's certificate carries.
            let host = Endpoint::from_shared(cli.endpoint.clone())
                .ok()
                .and_then(|e| e.uri().host().map(str::to_string))
                .unwrap_or_default();
            let hinted = Arc::new(ClientTls::new(ca, identity)?.with_server_name(host.clone()));
            Some(ClientTlsPair {
                host,
                direct,
                hinted,
            })
        }
        None if cli.tls_cert.is_some() => {
            anyhow::bail!(
                "--tls-cert needs --tls-ca (FRESHET_TLS_CA) to verify the coordinator with"
            )
        }
        None => None,
    };
    *CLIENT_TLS.write().expect("lock") = tls;
    let token = match (&cli.token, &cli.token_file) {
        (Some(t), _) => Some(t.trim().to_string()),
        (None, Some(f)) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("cannot read --token-file '{}'", f.display()))?
                .trim()
                .to_string(),
        ),
        (None, None) => None,
    };
    let token = match token.filter(|t| !t.is_empty()) {
        Some(t) => Some(
            format!("Bearer {t}")
                .parse::<MetadataValue<Ascii>>()
                .context("the token has characters a header cannot carry")?,
        ),
        None => None,
    };
    *CLIENT_TOKEN.write().expect("lock") = token;
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

/// The TLS settings of this command's clients (--tls-*): one command, one set of settings,
/// used alike for the endpoint given and for a leader a follower names.
static CLIENT_TLS: RwLock<Option<ClientTlsPair>> = RwLock::new(None);

/// The TLS of this command's clients: `direct` for the endpoint given, `hinted` (verifying
/// the given endpoint's host name) for a leader a follower names by another address.
#[derive(Clone)]
struct ClientTlsPair {
    host: String,
    direct: Arc<ClientTls>,
    hinted: Arc<ClientTls>,
}

/// The `authorization` value of this command's calls (--token / --token-file).
static CLIENT_TOKEN: RwLock<Option<MetadataValue<Ascii>>> = RwLock::new(None);

/// A connection to a coordinator that sends the command's token with every call.
pub(crate) type Conn = InterceptedService<Channel, Bearer>;

/// Adds `authorization: Bearer <token>` to each call when a token was given.
#[derive(Clone)]
pub(crate) struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            r.metadata_mut().insert("authorization", v.clone());
        }
        Ok(r)
    }
}

/// A channel to a coordinator: TLS for `https://` endpoints (verified with --tls-ca, with
/// --tls-cert/--tls-key as client certificate), plaintext for `http://`.
pub(crate) async fn channel(endpoint: &str) -> anyhow::Result<Conn> {
    let hint = "set --endpoint or FRESHET_ENDPOINT";
    let ep = Endpoint::from_shared(endpoint.to_string())
        .with_context(|| format!("bad coordinator endpoint '{endpoint}' ({hint})"))?;
    let tls = CLIENT_TLS.read().expect("lock").clone();
    let connected = if endpoint.starts_with("https://") {
        let tls = tls.with_context(|| {
            format!("{endpoint} is https: give the CA bundle to verify it with (--tls-ca or FRESHET_TLS_CA)")
        })?;
        let tls = if ep.uri().host() == Some(tls.host.as_str()) {
            tls.direct
        } else {
            tls.hinted
        };
        tls.connect(ep).await
    } else {
        ep.connect().await
    };
    let ch = connected
        .with_context(|| format!("cannot reach the coordinator at {endpoint} ({hint})"))?;
    let token = CLIENT_TOKEN.read().expect("lock").clone();
    Ok(InterceptedService::new(ch, Bearer(token)))
}

/// Runs `freshet <sub> <the process's own arguments>` (for the alias binaries).
pub async fn run_as(sub: &str) -> anyhow::Result<()> {
    let mut args: Vec<OsString> = std::env::args_os().collect();
    let program = args.first().cloned().unwrap_or_else(|| "freshet".into());
    args.splice(0..1.min(args.len()), [program, sub.into()]);
    run(args).await
}
