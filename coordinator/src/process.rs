//! The coordinator process: check the configuration against the world (etcd, object
//! store), serve gRPC and the HTTP probes, campaign for leadership (cluster mode) or lead
//! alone, and on SIGTERM step down and exit.

use std::sync::Arc;
use std::time::Duration;

use freshet_common::config::{Config, url_of};
use freshet_common::error::{Error, Result};
use freshet_common::storage::table_url;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::node::{Node, check_store};
use crate::{Coordinator, StartOptions};

/// Runs a coordinator until SIGTERM or SIGINT; `sources` makes the configured sources
/// whenever this coordinator begins leading.
pub async fn run(config: Config, sources: Option<Arc<dyn crate::SourceFactory>>) -> Result<()> {
    // Fail at start, naming the problem, rather than at the first cycle.
    // Half-configured etcd security is refused even when there is no etcd to connect to.
    config.cluster.validate()?;
    config.compaction.validate()?;
    for t in &config.tables {
        let def = t.to_def()?;
        // Outside storage.allowed_prefixes is refused before table_url creates a directory.
        freshet_common::prefixes::check_uri(&config.storage.allowed_prefixes, &def.name, &def.uri)?;
        table_url(&def.name, &def.uri)?;
    }
    let clustered = !config.cluster.etcd_endpoints.is_empty();
    if clustered && config.catalog.uri.is_none() {
        return Err(Error::Config(
            "cluster mode (cluster.etcd_endpoints set) needs catalog.uri, so that every leader \
             serves the same tables"
                .into(),
        ));
    }
    if let Some(uri) = &config.catalog.uri {
        check_store(uri, &config.storage.options)
            .await
            .map_err(|e| match e {
                Error::Config(_) => e,
                other => Error::Config(format!("catalog.uri '{uri}' does not answer: {other}")),
            })?;
    }
    // Certificates are checked before anything listens: a bad file fails the start, named.
    let tls = freshet_common::tls::ServerTls::coordinator(&config.tls)?;
    // So are the tokens and keys of [auth].
    let auth = freshet_common::auth::Authenticator::new(&config.auth).map_err(Error::from)?;
    if auth.is_none() {
        tracing::warn!(
            listen = %config.server.listen,
            "[auth] is not configured: anyone who reaches this port may ingest and administer"
        );
    }
    let listener = tokio::net::TcpListener::bind(&config.server.listen)
        .await
        .map_err(|e| {
            Error::Config(format!(
                "cannot listen on {} (server.listen): {e}",
                config.server.listen
            ))
        })?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::Internal(e.to_string()))?;
    let advertise = config
        .server
        .advertise
        .clone()
        .filter(|a| !a.is_empty())
        .unwrap_or_else(|| {
            // Followers hand this out as the leader hint: it must name the scheme clients need.
            let url = url_of(&addr.to_string());
            match &tls {
                Some(_) => url.replacen("http://", "https://", 1),
                None => url,
            }
        });
    let id = std::env::var("FRESHET_NODE_ID")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| {
            format!(
                "coordinator-{}",
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            )
        });

    let node = if clustered {
        let client = freshet_common::etcd::connect(&config.cluster).await?;
        Node::clustered(
            config.clone(),
            client,
            id.clone(),
            advertise.clone(),
            sources,
        )
    } else {
        let options = StartOptions {
            node_id: id.clone(),
            sources,
            ..Default::default()
        };
        let c = Coordinator::start_with(config.clone(), options).await?;
        c.start_sources().await?;
        Node::standalone(c, advertise.clone())
    };

    if !config.server.http_listen.is_empty() {
        let mut registry = Registry::default();
        node.metrics.register(&mut registry);
        registry.register_collector(Box::new(crate::source_metrics::SourcesCollector(
            node.clone(),
        )));
        let n = node.clone();
        let ready: freshet_common::http::ReadyCheck = Arc::new(move || {
            let n = n.clone();
            Box::pin(async move { n.ready().await })
        });
        let http = freshet_common::http::serve(
            &config.server.http_listen,
            Arc::new(registry),
            ready,
            freshet_common::tls::ServerTls::http(&config.tls)?,
        )
        .await?;
        tracing::info!(%http, "metrics and probes");
    }

    let (stop_tx, mut stop_rx) = watch::channel(false);
    let server = tokio::spawn(crate::grpc::serve_node(
        node.clone(),
        config.server.max_message_bytes,
        listener,
        tls,
        auth,
        async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        },
    ));
    tracing::info!(node = %id, %addr, %advertise, clustered, "coordinator serving");
    println!("freshet coordinator {id} listening on {addr} (advertised as {advertise})");

    shutdown_signal().await;
    tracing::info!("shutting down");
    node.shutdown().await;
    let _ = stop_tx.send(true);
    match tokio::time::timeout(Duration::from_secs(5), server).await {
        Ok(Ok(r)) => r?,
        Ok(Err(e)) => return Err(Error::Internal(format!("server task: {e}"))),
        Err(_) => tracing::warn!("gRPC server did not stop within 5s"),
    }
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("signal handler");
    let mut int = signal(SignalKind::interrupt()).expect("signal handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
