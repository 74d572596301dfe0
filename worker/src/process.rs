//! The worker process: serve gRPC, register in etcd (cluster mode), expose metrics and
//! probes, and on SIGTERM deregister at once, refuse new tasks, finish running ones, exit.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use freshet_common::config::{Config, url_of};
use freshet_common::error::{Error, Result};
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::registration::Registration;
use crate::{Worker, bind, serve_tls};

/// Runs a worker until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<()> {
    // Half-configured etcd security is refused even when there is no etcd to connect to.
    config.cluster.validate()?;
    let id =
        config.worker.id.clone().unwrap_or_else(|| {
            format!("worker-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
        });
    let etcd = if config.cluster.etcd_endpoints.is_empty() {
        None
    } else {
        Some(freshet_common::etcd::connect(&config.cluster).await?)
    };
    // Certificates are checked before anything listens: a bad file fails the start, named.
    let tls = freshet_common::tls::ServerTls::worker(&config.tls)?;
    let (listener, addr) = bind(&config.worker.listen).await?;
    let advertise = config
        .worker
        .advertise
        .clone()
        .filter(|a| !a.is_empty())
        .unwrap_or_else(|| {
            // Coordinators dial what is registered: it must name the scheme they need.
            let url = url_of(&addr.to_string());
            match &tls {
                Some(_) => url.replacen("http://", "https://", 1),
                None => url,
            }
        });
    let worker = Worker::new(
        id.clone(),
        config.worker.capacity,
        config.storage.options.clone(),
    );
    worker.set_allowed_prefixes(freshet_common::prefixes::AllowedPrefixes::new(
        &config.storage.allowed_prefixes,
    )?);
    if let Some(client) = &etcd {
        worker.verify_epochs_with(client.clone(), &config.cluster);
    }
    if let Some(ms) = config.testing.worker_delay_ms {
        worker.faults.delay_ms.store(ms, Ordering::SeqCst);
    }

    let (stop_tx, mut stop_rx) = watch::channel(false);
    let server = {
        let worker = worker.clone();
        let mut rx = stop_tx.subscribe();
        let max = config.server.max_message_bytes;
        tokio::spawn(async move {
            serve_tls(worker, listener, max, tls, async move {
                let _ = rx.wait_for(|s| *s).await;
            })
            .await
        })
    };
    let registration = match &etcd {
        Some(client) => Some(
            Registration::start(
                client.clone(),
                &config.cluster,
                worker.clone(),
                advertise.clone(),
            )
            .await?,
        ),
        None => None,
    };

    if !config.worker.http_listen.is_empty() {
        let mut registry = Registry::default();
        worker.metrics.register(&mut registry);
        let (etcd, reg) = (etcd.clone(), registration.clone());
        let ready: freshet_common::http::ReadyCheck = Arc::new(move || {
            let (etcd, reg) = (etcd.clone(), reg.clone());
            Box::pin(async move {
                if let Some(c) = &etcd {
                    freshet_common::etcd::ping(c).await?;
                }
                if let Some(r) = &reg {
                    if !r.is_registered() {
                        return Err("not registered in etcd".into());
                    }
                }
                Ok(())
            })
        });
        let http = freshet_common::http::serve(
            &config.worker.http_listen,
            Arc::new(registry),
            ready,
            freshet_common::tls::ServerTls::http(&config.tls)?,
        )
        .await?;
        tracing::info!(%http, "metrics and probes");
    }
    tracing::info!(worker = %id, %addr, %advertise, capacity = config.worker.capacity, "worker serving");
    println!("freshet worker {id} listening on {addr} (advertised as {advertise})");

    let signal = shutdown_signal();
    tokio::select! {
        _ = signal => {}
        _ = stop_rx.wait_for(|s| *s) => {}
    }
    // Graceful stop: leave the membership first so no new task is planned here, refuse what
    // still arrives (the coordinator retries it elsewhere), let running tasks finish.
    tracing::info!(worker = %id, in_flight = worker.in_flight(), "shutting down: deregistering and draining");
    worker.drain();
    if let Some(r) = &registration {
        r.stop().await;
    }
    let deadline = Instant::now() + Duration::from_millis(config.worker.shutdown_grace_ms);
    while worker.in_flight() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if worker.in_flight() > 0 {
        tracing::warn!(
            in_flight = worker.in_flight(),
            "grace period over; abandoning running tasks"
        );
    }
    let _ = stop_tx.send(true);
    match tokio::time::timeout(Duration::from_secs(5), server).await {
        Ok(Ok(r)) => r?,
        Ok(Err(e)) => return Err(Error::Internal(format!("worker server task: {e}"))),
        Err(_) => tracing::warn!("server did not stop within 5s"),
    }
    tracing::info!(worker = %id, "worker stopped");
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("signal handler");
        let mut int = signal(SignalKind::interrupt()).expect("signal handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
