//! A whole Freshet cluster in one process: `workers` in-process workers and a coordinator,
//! each on its own loopback gRPC port, TLS when the configuration sets `[tls]`. One builder
//! for `freshet dev` and the test harness, so both run the same wiring as the processes.

use std::sync::Arc;

use freshet_common::config::Config;
use freshet_common::error::Result;
use freshet_coordinator::{Coordinator, SourceFactory, StartOptions};
use freshet_worker::Worker;
use tokio::sync::watch;

/// How to start an embedded cluster.
pub struct Builder {
    config: Config,
    workers: usize,
    worker_capacity: Option<u32>,
    worker_prefix: String,
    listen: String,
    sources: Option<Arc<dyn SourceFactory>>,
    external: Option<Vec<String>>,
}

/// A running embedded cluster; [`Embedded::stop`] stops it (storage stays as a crash would
/// leave it).
pub struct Embedded {
    /// The coordinator.
    pub coordinator: Arc<Coordinator>,
    /// Its gRPC endpoint (`http://` or, with `[tls]`, `https://`).
    pub endpoint: String,
    /// The workers.
    pub workers: Vec<Arc<Worker>>,
    /// Their endpoints.
    pub worker_endpoints: Vec<String>,
    /// The configuration it runs with (worker endpoints filled in).
    pub config: Config,
    stop: watch::Sender<bool>,
}

impl Builder {
    /// A cluster of `config`, with 1 worker, the coordinator on a free loopback port.
    pub fn new(config: Config) -> Self {
        Builder {
            config,
            workers: 1,
            worker_capacity: None,
            worker_prefix: "w".into(),
            listen: "127.0.0.1:0".into(),
            sources: None,
            external: None,
        }
    }

    /// Uses workers that run elsewhere (say, processes the benchmark measures) at these
    /// endpoints instead of starting any in this process.
    pub fn external_workers(mut self, endpoints: Vec<String>) -> Self {
        self.external = Some(endpoints);
        self
    }

    /// The number of workers (at least 1).
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n.max(1);
        self
    }

    /// Each worker's task slots (default: `worker.capacity`).
    pub fn worker_capacity(mut self, slots: u32) -> Self {
        self.worker_capacity = Some(slots);
        self
    }

    /// Worker ids are `<prefix><i>`.
    pub fn worker_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.worker_prefix = prefix.into();
        self
    }

    /// The coordinator's gRPC address.
    pub fn listen(mut self, addr: impl Into<String>) -> Self {
        self.listen = addr.into();
        self
    }

    /// Runs sources made by `factory` (the configuration's and the catalog's are started).
    pub fn sources(mut self, factory: Option<Arc<dyn SourceFactory>>) -> Self {
        self.sources = factory;
        self
    }

    /// Starts the workers, then the coordinator and its sources, then serves its gRPC.
    pub async fn start(self) -> Result<Embedded> {
        let mut config = self.config;
        let (stop, stop_rx) = watch::channel(false);
        let tls = freshet_common::tls::ServerTls::worker(&config.tls)?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let capacity = self.worker_capacity.unwrap_or(config.worker.capacity);
        let mut workers = Vec::new();
        let mut endpoints = self.external.clone().unwrap_or_default();
        let in_process = if self.external.is_some() {
            0
        } else {
            self.workers
        };
        for i in 0..in_process {
            let (listener, addr) = freshet_worker::bind("127.0.0.1:0").await?;
            let w = Worker::new(
                format!("{}{i}", self.worker_prefix),
                capacity,
                config.storage.options.clone(),
            );
            let mut rx = stop_rx.clone();
            tokio::spawn(freshet_worker::serve_tls(
                w.clone(),
                listener,
                config.server.max_message_bytes,
                tls.clone(),
                async move {
                    let _ = rx.wait_for(|s| *s).await;
                },
            ));
            workers.push(w);
            endpoints.push(format!("{scheme}://{addr}"));
        }
        config.cycle.workers = endpoints.clone();
        let options = StartOptions {
            sources: self.sources,
            ..Default::default()
        };
        let coordinator = Coordinator::start_with(config.clone(), options).await?;
        coordinator.start_sources().await?;
        let (listener, addr) = freshet_worker::bind(&self.listen).await?;
        let mut rx = stop_rx.clone();
        tokio::spawn(freshet_coordinator::grpc::serve(
            coordinator.clone(),
            listener,
            async move {
                let _ = rx.wait_for(|s| *s).await;
            },
        ));
        let endpoint = if config.tls.enabled() {
            format!("https://{addr}")
        } else {
            format!("http://{addr}")
        };
        Ok(Embedded {
            coordinator,
            endpoint,
            workers,
            worker_endpoints: endpoints,
            config,
            stop,
        })
    }
}

impl Embedded {
    /// Stops the coordinator (sources, cycle loops, stagers) and every gRPC server.
    pub fn stop(&self) {
        self.coordinator.shutdown();
        let _ = self.stop.send(true);
    }

    /// Resolves once [`Embedded::stop`] was called.
    pub async fn stopped(&self) {
        let mut rx = self.stop.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }
}
