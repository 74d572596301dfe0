//! `freshet coordinator` and `freshet worker`: the cluster processes. Configuration comes
//! from the TOML file, then `FRESHET__SECTION__KEY` variables, then these flags.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use freshet_common::config::Config;

/// Flags shared by the coordinator and worker processes.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The TOML configuration file (see docs/configuration.md).
    #[arg(long, short, env = "FRESHET_CONFIG")]
    config: Option<PathBuf>,
    /// gRPC listen address (server.listen or worker.listen).
    #[arg(long)]
    listen: Option<String>,
    /// HTTP address for /metrics, /livez, /readyz (server.http_listen or worker.http_listen).
    #[arg(long)]
    http_listen: Option<String>,
    /// URL others use to reach this process (server.advertise or worker.advertise).
    #[arg(long)]
    advertise: Option<String>,
    /// etcd endpoints, comma-separated (cluster.etcd_endpoints).
    #[arg(long, value_delimiter = ',')]
    etcd: Option<Vec<String>>,
    /// Cluster name (cluster.name).
    #[arg(long)]
    cluster: Option<String>,
    /// JSON log lines (log.json).
    #[arg(long)]
    log_json: bool,
    /// Honour the `[testing]` switches (fault injection into every object store, crash
    /// points, worker delays; tests and chaos runs only). Without this flag a configuration
    /// that sets one is refused.
    #[arg(long)]
    allow_fault_injection: bool,
}

impl ServeArgs {
    fn load(&self) -> anyhow::Result<Config> {
        let mut c = Config::load(self.config.as_deref(), std::env::vars())
            .context("invalid configuration")?;
        if let Some(e) = &self.etcd {
            c.cluster.etcd_endpoints = e.clone();
        }
        if let Some(n) = &self.cluster {
            c.cluster.name = n.clone();
        }
        if self.log_json {
            c.log.json = true;
        }
        check_test_switches(&c, self.allow_fault_injection)?;
        if let Some(spec) = c.testing.store_faults.take() {
            anyhow::ensure!(
                self.allow_fault_injection,
                "invalid configuration: [testing] store_faults is set; fault injection is for tests \
                 and needs --allow-fault-injection"
            );
            spec.validate()
                .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
            eprintln!(
                "freshet: FAULT INJECTION ON: every object store of this process injects faults ({} rules)",
                spec.rules.len()
            );
            freshet_common::faults::register(
                "process",
                freshet_common::faults::FaultPlan::new(spec),
            );
            c.storage.options.insert(
                freshet_common::faults::FAULTS_OPTION.into(),
                "process".into(),
            );
        }
        Ok(c)
    }
}

/// Refuses the `[testing]` crash and delay switches unless the process was started with
/// `--allow-fault-injection`, and says loudly when one is on.
pub(crate) fn check_test_switches(c: &Config, allowed: bool) -> anyhow::Result<()> {
    for (key, set) in [
        ("crash_at", c.testing.crash_at.is_some()),
        ("worker_delay_ms", c.testing.worker_delay_ms.is_some()),
    ] {
        anyhow::ensure!(
            !set || allowed,
            "invalid configuration: [testing] {key} is set; test switches need \
             --allow-fault-injection"
        );
        if set {
            eprintln!("freshet: TEST SWITCH ON: [testing] {key}");
        }
    }
    Ok(())
}

/// Runs a coordinator process.
pub async fn coordinator(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = args.load()?;
    if let Some(l) = &args.listen {
        config.server.listen = l.clone();
    }
    if let Some(h) = &args.http_listen {
        config.server.http_listen = h.clone();
    }
    if let Some(a) = &args.advertise {
        config.server.advertise = Some(a.clone());
    }
    freshet_common::server::init_logging(config.log.json);
    tracing::debug!(?config, "configuration");
    freshet_coordinator::process::run(
        config,
        Some(std::sync::Arc::new(
            freshet_source_postgres::PostgresFactory,
        )),
    )
    .await
    .context("coordinator failed")
}

/// Runs a worker process.
pub async fn worker(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = args.load()?;
    if let Some(l) = &args.listen {
        config.worker.listen = l.clone();
    }
    if let Some(h) = &args.http_listen {
        config.worker.http_listen = h.clone();
    }
    if let Some(a) = &args.advertise {
        config.worker.advertise = Some(a.clone());
    }
    freshet_common::server::init_logging(config.log.json);
    tracing::debug!(?config, "configuration");
    freshet_worker::process::run(config)
        .await
        .context("worker failed")
}
