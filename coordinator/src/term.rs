//! One coordinator term: its state, how it starts and stops. What the term does lives in
//! modules named for it: `lifecycle` (tables served), `ingest`, `sources`, `source_ops`
//! (truncate, schema changes), `history` (cycle records); `cycle` and `stage` get only the
//! [`TermContext`].

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};

use freshet_common::config::Config;
use freshet_common::error::{Error, Result};
use freshet_common::sink::{Source, SourceFactory};
use freshet_common::source::{SourceConfig, SourceInfoExt, SourceOrigin};
use freshet_proto::admin::v1::CycleRecord;
use tokio::sync::broadcast;

use crate::catalog::Catalog;
use crate::context::TermContext;
use crate::cycle;
use crate::fence::Fence;
use crate::metrics::CoordinatorMetrics;
use crate::router::Router;
use crate::tables::TableRuntime;
use crate::testing::{CrashPoint, CrashSwitch};

/// How a coordinator term starts: its epoch, its fence, and what outlives the term.
pub struct StartOptions {
    /// The leader epoch sent with every task and recorded in every commit.
    pub epoch: u64,
    /// The leadership proof checked before acknowledging and committing.
    pub fence: Arc<Fence>,
    /// This coordinator's id (recorded in cycle records).
    pub node_id: String,
    /// Metrics shared by every term of the process.
    pub metrics: Arc<CoordinatorMetrics>,
    /// Makes the term's sources (none when unset).
    pub sources: Option<Arc<dyn SourceFactory>>,
}

impl Default for StartOptions {
    fn default() -> Self {
        StartOptions {
            epoch: 1,
            fence: Arc::new(Fence::none()),
            node_id: "coordinator".into(),
            metrics: Arc::new(CoordinatorMetrics::default()),
            sources: None,
        }
    }
}

/// A source the term runs, with its definition and where that comes from.
pub(crate) struct RunningSource {
    pub(crate) def: SourceConfig,
    pub(crate) origin: SourceOrigin,
    pub(crate) source: Arc<dyn Source>,
}

impl RunningSource {
    /// Its state, with where its definition comes from.
    pub(crate) fn info(&self) -> freshet_proto::admin::v1::SourceInfo {
        let mut info = self.source.info();
        info.set_source_origin(self.origin);
        info
    }
}

/// The state of a term: its context, the tables it serves, its sources, its history.
pub struct Inner {
    /// What cycles and stagers share.
    pub ctx: Arc<TermContext>,
    pub(crate) events: broadcast::Sender<CycleRecord>,
    pub(crate) sources: Mutex<Vec<RunningSource>>,
    pub(crate) factory: Option<Arc<dyn SourceFactory>>,
    pub(crate) tables: RwLock<BTreeMap<String, Arc<TableRuntime>>>,
    pub(crate) history: Mutex<VecDeque<CycleRecord>>,
    pub(crate) catalog: Option<Catalog>,
}

/// The coordinator.
pub struct Coordinator {
    pub(crate) inner: Arc<Inner>,
}

impl Coordinator {
    /// Starts a coordinator: opens (creating or adopting) and recovers every configured and
    /// catalogued table, and starts their cycle loops.
    pub async fn start(config: Config) -> Result<Arc<Coordinator>> {
        Self::start_with(config, StartOptions::default()).await
    }

    /// Starts a coordinator term with the given epoch and fence.
    pub async fn start_with(config: Config, options: StartOptions) -> Result<Arc<Coordinator>> {
        // `[testing] crash_at` aborts the process there (crash tests of real processes);
        // the binary accepts it only with --allow-fault-injection.
        let crash = match &config.testing.crash_at {
            Some(s) => Some(s.parse::<CrashPoint>()?),
            None => None,
        };
        freshet_common::secrets::validate(&config.secrets)?;
        let catalog = match &config.catalog.uri {
            Some(uri) => Some(Catalog::open(uri, &config.storage.options)?),
            None => None,
        };
        let router = Router::new(
            config.cycle.workers.clone(),
            config.server.max_message_bytes,
        )
        .with_tls(freshet_common::tls::ClientTls::from_config(&config.tls)?);
        let ctx = Arc::new(TermContext::new(
            config,
            router,
            options.epoch,
            options.fence,
            options.node_id,
            options.metrics,
            CrashSwitch::new(crash, true),
        ));
        let inner = Arc::new(Inner {
            ctx,
            events: broadcast::channel(256).0,
            sources: Mutex::new(Vec::new()),
            factory: options.sources,
            tables: RwLock::new(BTreeMap::new()),
            history: Mutex::new(VecDeque::new()),
            catalog,
        });
        let c = Arc::new(Coordinator { inner });
        let mut defs = Vec::new();
        for t in &c.inner.ctx.config.tables {
            defs.push(t.to_def()?);
        }
        if let Some(cat) = &c.inner.catalog {
            for d in cat.load().await? {
                if !defs.iter().any(|x| x.name == d.name) {
                    defs.push(d);
                }
            }
        }
        for d in defs {
            c.open_table(d).await?;
        }
        Ok(c)
    }

    /// The term's shared context (settings, router, epoch, fence, metrics).
    pub fn context(&self) -> &Arc<TermContext> {
        &self.inner.ctx
    }

    /// The term's state (for the modules of this crate).
    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }

    /// Replaces the worker set.
    pub fn set_workers(&self, endpoints: Vec<String>) {
        self.inner.ctx.router.set_workers(endpoints);
    }

    /// Arms an in-process crash point: the cycle that reaches it fails and the coordinator
    /// stops working, leaving storage as a crash would.
    pub fn set_crash_point(&self, p: Option<CrashPoint>) {
        self.inner.ctx.crash.set(p);
    }

    /// Stops sources, cycle loops and stagers.
    pub fn shutdown(&self) {
        for s in self.inner.sources.lock().expect("lock").iter() {
            s.source.stop();
        }
        let _ = self.inner.ctx.stop.send(true);
    }

    /// Resolves once [`Coordinator::shutdown`] was called.
    pub async fn stopped(&self) {
        let mut rx = self.inner.ctx.stop.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Cycle records as cycles end.
    pub fn subscribe(&self) -> broadcast::Receiver<CycleRecord> {
        self.inner.events.subscribe()
    }

    /// Runs a cycle of the table now.
    pub async fn trigger(&self, table: &str) -> Result<CycleRecord> {
        if self.inner.ctx.is_dead() {
            return Err(Error::Unavailable("coordinator stopped".into()));
        }
        let t = self.table(table)?;
        let rec = cycle::run_cycle(&self.inner.ctx, &t).await?;
        self.inner.record(&t, &rec);
        Ok(rec)
    }

    /// Runs a compaction of the table now (whether or not it is idle); `None` when nothing
    /// is due.
    pub async fn compact(&self, table: &str) -> Result<Option<CycleRecord>> {
        if self.inner.ctx.is_dead() {
            return Err(Error::Unavailable("coordinator stopped".into()));
        }
        let t = self.table(table)?;
        let rec = crate::compaction::run_compaction(&self.inner.ctx, &t).await?;
        if let Some(r) = &rec {
            self.inner.record(&t, r);
        }
        Ok(rec)
    }
}
