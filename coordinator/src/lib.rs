//! The Freshet coordinator: validates and stages ingested changes, runs each table's merge
//! cycle (plan, dispatch to workers, one Delta commit), and serves the ingest and admin APIs.

pub mod access;
pub mod catalog;
pub mod commit;
pub mod cycle;
pub mod election;
pub mod fence;
pub mod fenced_store;
pub mod grpc;
pub mod history;
pub mod membership;
pub mod metrics;
pub mod node;
pub mod orphans;
pub mod planner;
pub mod process;
pub mod recovery;
pub mod router;
pub mod stage;
pub mod tables;
pub mod validate;

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
use freshet_common::config::Config;
use freshet_common::delta::{applied_sequence, files, open_or_create_in, producer_sequence};
use freshet_common::error::{Error, Result};
use freshet_common::schema::SchemaSpec;
use freshet_common::source::SourceConfig;
use freshet_common::storage::{log_store_wrapped, table_url};
use freshet_common::table::TableDef;
use freshet_proto::admin::v1::{CycleRecord, TableInfo};
use freshet_proto::ingest::v1::{IngestRequest, IngestResponse};
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::catalog::Catalog;
use crate::fence::Fence;
use crate::metrics::{CoordinatorMetrics, CycleLabel, TableLabel};
use crate::router::Router;
use crate::stage::{StageRequest, run_stager};
use crate::tables::TableRuntime;

/// Points where tests inject a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// Workers wrote their files; the commit has not happened.
    AfterRewrite,
    /// The commit happened; staging cleanup has not.
    AfterCommit,
}

impl std::str::FromStr for CrashPoint {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "after_rewrite" => Ok(CrashPoint::AfterRewrite),
            "after_commit" => Ok(CrashPoint::AfterCommit),
            _ => Err(Error::Config(format!(
                "unknown crash point '{s}' (after_rewrite, after_commit)"
            ))),
        }
    }
}

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

/// A change-data-capture source run by a coordinator term.
pub trait Source: Send + Sync {
    /// Its state for the admin API.
    fn info(&self) -> freshet_proto::admin::v1::SourceInfo;
    /// Asks it to stop (the term ended, or it is being replaced).
    fn stop(&self);
    /// Resolves once it has stopped.
    fn stopped(&self) -> futures::future::BoxFuture<'static, ()>;
}

/// Makes sources from their definitions (set by the binary, which knows the source
/// implementations).
pub trait SourceFactory: Send + Sync {
    /// Checks a definition against its database without changing anything (tables exist,
    /// have a key, types map); the error says what is wrong.
    fn check<'a>(
        &'a self,
        config: &'a SourceConfig,
    ) -> futures::future::BoxFuture<'a, std::result::Result<(), String>>;
    /// Starts a source; it reports and retries its own failures.
    fn start(&self, coordinator: Arc<Coordinator>, config: SourceConfig) -> Arc<dyn Source>;
}

/// Where a running source's definition comes from.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum SourceOrigin {
    /// The configuration file.
    Config,
    /// Added at run time, recorded in the catalog.
    Catalog,
}

struct RunningSource {
    def: SourceConfig,
    origin: SourceOrigin,
    source: Arc<dyn Source>,
}

impl RunningSource {
    /// Its state, with where its definition comes from.
    fn info(&self) -> freshet_proto::admin::v1::SourceInfo {
        let mut info = self.source.info();
        info.origin = match self.origin {
            SourceOrigin::Config => "config".into(),
            SourceOrigin::Catalog => "catalog".into(),
        };
        info
    }
}

/// Marker object whose presence pauses a table (so pauses survive leader changes).
const PAUSED_MARKER: &str = "_freshet/paused";

/// State shared by the coordinator's tasks.
pub struct Inner {
    /// The configuration.
    pub config: Config,
    /// Workers.
    pub router: Router,
    /// The leader epoch sent with every task (1 in embedded mode).
    pub epoch: u64,
    /// The leadership proof.
    pub fence: Arc<Fence>,
    /// This coordinator's id.
    pub node_id: String,
    /// Metrics.
    pub metrics: Arc<CoordinatorMetrics>,
    events: broadcast::Sender<CycleRecord>,
    sources: Mutex<Vec<RunningSource>>,
    factory: Option<Arc<dyn SourceFactory>>,
    tables: RwLock<BTreeMap<String, Arc<TableRuntime>>>,
    history: Mutex<VecDeque<CycleRecord>>,
    catalog: Option<Catalog>,
    crash_at: Mutex<Option<(CrashPoint, bool)>>,
    dead: AtomicBool,
    stop: watch::Sender<bool>,
}

impl Inner {
    /// A table's Delta log store, over the coordinator's bounded, fenced object store.
    pub fn log_store(&self, def: &TableDef) -> Result<deltalake::logstore::LogStoreRef> {
        let storage = &self.config.storage;
        let policy = fenced_store::RequestPolicy {
            max_attempts: storage.max_attempts,
            attempt_timeout: Duration::from_millis(storage.request_timeout_ms.max(1)),
            backoff: Duration::from_millis(100),
        };
        let mut options = storage.options.clone();
        // Retries happen in the FencedStore (which re-checks the lease between them), not
        // inside object_store, where they could go on for minutes.
        options
            .entry("max_retries".into())
            .or_insert_with(|| "0".into());
        let fence = self.fence.clone();
        let wrap: freshet_common::storage::StoreWrap = Arc::new(move |inner| {
            Arc::new(fenced_store::FencedStore::new(inner, fence.clone(), policy))
        });
        log_store_wrapped(
            &def.name,
            &table_url(&def.name, &def.uri)?,
            &options,
            Some(&wrap),
        )
    }

    /// Fails (or aborts the process) at an armed crash point.
    pub fn crash_point(&self, p: CrashPoint) -> Result<()> {
        let armed = *self.crash_at.lock().expect("lock");
        if let Some((at, abort)) = armed {
            if at == p {
                if abort {
                    eprintln!("freshet: injected crash at {p:?}");
                    std::process::abort();
                }
                self.dead.store(true, Ordering::SeqCst);
                return Err(Error::Injected(format!("{p:?}")));
            }
        }
        Ok(())
    }

    fn record(&self, t: &Arc<TableRuntime>, rec: &CycleRecord) {
        if rec.state == "noop" {
            return;
        }
        *t.last_cycle.lock().expect("lock") = Some(rec.clone());
        let keep = self.config.cycle.history.max(1);
        {
            let mut h = self.history.lock().expect("lock");
            h.push_front(rec.clone());
            h.truncate(keep);
        }
        let _ = self.events.send(rec.clone());
        let table = TableLabel {
            table: rec.table.clone(),
        };
        let m = &self.metrics;
        m.cycle_seconds
            .get_or_create(&CycleLabel {
                table: rec.table.clone(),
                state: rec.state.clone(),
            })
            .observe(rec.duration_ms as f64 / 1000.0);
        if rec.state == "committed" {
            let lag = rec.freshness_lag_ms as f64 / 1000.0;
            m.freshness_seconds.get_or_create(&table).observe(lag);
            m.freshness_lag.get_or_create(&table).set(lag);
            m.files_rewritten
                .get_or_create(&table)
                .inc_by(rec.files_rewritten);
            m.bytes_written
                .get_or_create(&table)
                .inc_by(rec.bytes_written);
        }
        let retries: u64 = rec
            .tasks
            .iter()
            .map(|x| x.attempts.saturating_sub(1) as u64)
            .sum();
        m.task_retries.get_or_create(&table).inc_by(retries);
        {
            let p = t.pending.lock().expect("lock");
            m.pending(&rec.table, p.rows(), p.bytes());
        }
        // Persist, and forget records beyond the bound.
        let drop_ids: Vec<String> = {
            let mut ids = t.history_ids.lock().expect("lock");
            ids.push_front(rec.id.clone());
            let n = ids.len().saturating_sub(keep);
            (0..n).filter_map(|_| ids.pop_back()).collect()
        };
        let (store, rec) = (t.store.clone(), rec.clone());
        tokio::spawn(async move {
            if let Err(e) = history::save(&store, &rec).await {
                tracing::warn!(error = %e, cycle_id = %rec.id, "cycle record not persisted");
            }
            for id in drop_ids {
                history::delete(&store, &id).await;
            }
        });
    }
}

/// The coordinator.
pub struct Coordinator {
    inner: Arc<Inner>,
}

impl Coordinator {
    /// Starts a coordinator: opens (creating or adopting) and recovers every configured and
    /// catalogued table, and starts their cycle loops.
    pub async fn start(config: Config) -> Result<Arc<Coordinator>> {
        Self::start_with(config, StartOptions::default()).await
    }

    /// Starts a coordinator term with the given epoch and fence.
    pub async fn start_with(config: Config, options: StartOptions) -> Result<Arc<Coordinator>> {
        let crash = match std::env::var("FRESHET_CRASH_AT") {
            Ok(s) if !s.is_empty() => Some((s.parse::<CrashPoint>()?, true)),
            _ => None,
        };
        freshet_common::secrets::validate(&config.secrets)?;
        let catalog = match &config.catalog.uri {
            Some(uri) => Some(Catalog::open(uri, &config.storage.options)?),
            None => None,
        };
        let (stop, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            router: Router::new(
                config.cycle.workers.clone(),
                config.server.max_message_bytes,
            )
            .with_tls(freshet_common::tls::ClientTls::from_config(&config.tls)?),
            epoch: options.epoch,
            fence: options.fence,
            node_id: options.node_id,
            metrics: options.metrics,
            events: broadcast::channel(256).0,
            sources: Mutex::new(Vec::new()),
            factory: options.sources,
            tables: RwLock::new(BTreeMap::new()),
            history: Mutex::new(VecDeque::new()),
            catalog,
            crash_at: Mutex::new(crash),
            dead: AtomicBool::new(false),
            stop,
            config,
        });
        let c = Arc::new(Coordinator { inner });
        let mut defs = Vec::new();
        for t in &c.inner.config.tables {
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

    /// Shared state (for the gRPC layer and tests).
    pub fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }

    /// Replaces the worker set.
    pub fn set_workers(&self, endpoints: Vec<String>) {
        self.inner.router.set_workers(endpoints);
    }

    /// Arms an in-process crash point: the cycle that reaches it fails and the coordinator
    /// stops working, leaving storage as a crash would.
    pub fn set_crash_point(&self, p: Option<CrashPoint>) {
        *self.inner.crash_at.lock().expect("lock") = p.map(|p| (p, false));
    }

    /// Stops sources, cycle loops and stagers.
    pub fn shutdown(&self) {
        for s in self.inner.sources.lock().expect("lock").iter() {
            s.source.stop();
        }
        let _ = self.inner.stop.send(true);
    }

    /// Starts the sources of the configuration file and of the catalog (called once a
    /// term's coordinator is up; sources run on the leader only).
    pub async fn start_sources(self: &Arc<Self>) -> Result<()> {
        let Some(factory) = self.inner.factory.clone() else {
            return Ok(());
        };
        let mut defs: Vec<(SourceConfig, SourceOrigin)> = self
            .inner
            .config
            .sources
            .iter()
            .map(|s| (s.clone(), SourceOrigin::Config))
            .collect();
        // The configuration file's sources start even when the catalog cannot be read.
        let mut catalog_error = None;
        let mut catalogued = Vec::new();
        if let Some(cat) = &self.inner.catalog {
            let mut wait = Duration::from_millis(200);
            for attempt in 1..=5 {
                match cat.load_sources().await {
                    Ok(s) => {
                        catalogued = s;
                        catalog_error = None;
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(attempt, error = %e, "catalog sources not readable; retrying");
                        catalog_error = Some(e);
                        tokio::time::sleep(wait).await;
                        wait *= 2;
                    }
                }
            }
        }
        {
            for s in catalogued {
                if defs.iter().any(|(d, _)| d.name == s.name) {
                    tracing::warn!(source = %s.name, "a source of the configuration file has this name; the catalog's definition is ignored");
                    continue;
                }
                defs.push((s, SourceOrigin::Catalog));
            }
        }
        for (def, origin) in defs {
            let allowed = match origin {
                SourceOrigin::Config => freshet_common::secrets::Origin::ConfigFile,
                SourceOrigin::Catalog => freshet_common::secrets::Origin::RunTime,
            };
            let bound =
                match freshet_common::secrets::bind(&def, &self.inner.config.secrets, allowed) {
                    Ok(b) => b,
                    Err(e) => {
                        // A catalogued source whose credential is no longer allowed stays off.
                        tracing::error!(source = %def.name, error = %e, "source not started");
                        continue;
                    }
                };
            tracing::info!(source = %def.name, ?origin, "starting source");
            let source = factory.start(self.clone(), bound);
            self.register_source(def, origin, source);
        }
        match catalog_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Adds a source at run time, or replaces a run-time source of the same name (say, with
    /// one more table: the added table is copied on its own, the others stream on). The
    /// definition is checked against its database and recorded in the catalog before it
    /// starts; when anything is wrong, nothing changes.
    pub async fn define_source(
        self: &Arc<Self>,
        def: SourceConfig,
    ) -> Result<freshet_proto::admin::v1::SourceInfo> {
        let invalid = |message: String| Error::InvalidSource {
            name: def.name.clone(),
            message,
        };
        let factory = self
            .inner
            .factory
            .clone()
            .ok_or_else(|| invalid("this coordinator runs no sources".into()))?;
        let Some(catalog) = &self.inner.catalog else {
            return Err(invalid(
                "sources added at run time are recorded in the catalog: set catalog.uri".into(),
            ));
        };
        def.validate().map_err(invalid)?;
        for t in &def.tables {
            let allowed = &self.inner.config.storage.allowed_prefixes;
            freshet_common::prefixes::check_uri(allowed, &t.name, &t.uri)?;
        }
        if self.inner.config.sources.iter().any(|s| s.name == def.name) {
            return Err(invalid(
                "defined in the configuration file; change it there".into(),
            ));
        }
        {
            let running = self.inner.sources.lock().expect("lock");
            for r in running.iter().filter(|r| r.def.name != def.name) {
                for t in &def.tables {
                    if r.def.tables.iter().any(|o| o.name == t.name) {
                        return Err(invalid(format!(
                            "table '{}' is already fed by source '{}'",
                            t.name, r.def.name
                        )));
                    }
                }
                if r.def.slot == def.slot {
                    return Err(invalid(format!(
                        "slot '{}' is already used by source '{}'",
                        def.slot, r.def.name
                    )));
                }
            }
        }
        // Credentials only from the coordinator's allowlist, checked before any connection.
        let bound = freshet_common::secrets::bind(
            &def,
            &self.inner.config.secrets,
            freshet_common::secrets::Origin::RunTime,
        )?;
        factory.check(&bound).await.map_err(invalid)?;
        catalog.save_source(&def).await?;
        let old = {
            let mut running = self.inner.sources.lock().expect("lock");
            running
                .iter()
                .position(|r| r.def.name == def.name)
                .map(|i| running.remove(i))
        };
        if let Some(old) = old {
            tracing::info!(source = %def.name, "replacing source");
            old.source.stop();
            if tokio::time::timeout(Duration::from_secs(60), old.source.stopped())
                .await
                .is_err()
            {
                tracing::warn!(source = %def.name, "the replaced source did not stop within 60 s");
            }
        }
        let source = factory.start(self.clone(), bound);
        Ok(self.register_source(def, SourceOrigin::Catalog, source))
    }

    fn register_source(
        &self,
        def: SourceConfig,
        origin: SourceOrigin,
        source: Arc<dyn Source>,
    ) -> freshet_proto::admin::v1::SourceInfo {
        let running = RunningSource {
            def,
            origin,
            source,
        };
        let info = running.info();
        self.inner.sources.lock().expect("lock").push(running);
        info
    }

    /// The running sources.
    pub fn sources(&self) -> Vec<freshet_proto::admin::v1::SourceInfo> {
        self.inner
            .sources
            .lock()
            .expect("lock")
            .iter()
            .map(RunningSource::info)
            .collect()
    }

    /// Resolves once [`Coordinator::shutdown`] was called.
    pub async fn stopped(&self) {
        let mut rx = self.inner.stop.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Cycle records as cycles end.
    pub fn subscribe(&self) -> broadcast::Receiver<CycleRecord> {
        self.inner.events.subscribe()
    }

    /// Pauses (or resumes) a table's cycles; recorded in the table's storage so a new
    /// leader keeps it paused.
    pub async fn set_paused(&self, table: &str, paused: bool) -> Result<TableInfo> {
        let t = self.table(table)?;
        let marker = Path::from(PAUSED_MARKER);
        if paused {
            t.store
                .put(
                    &marker,
                    PutPayload::from_static(b"paused by the admin API\n"),
                )
                .await
                .map_err(|e| Error::store(&marker, e))?;
        } else {
            match t.store.delete(&marker).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(Error::store(&marker, e)),
            }
        }
        t.paused.store(paused, Ordering::SeqCst);
        tracing::info!(table = %table, paused, "table pause state changed");
        if !paused {
            t.wake.notify_one();
        }
        self.table_info(&t).await
    }

    async fn open_table(&self, def: TableDef) -> Result<(Arc<TableRuntime>, bool)> {
        freshet_common::prefixes::check_uri(
            &self.inner.config.storage.allowed_prefixes,
            &def.name,
            &def.uri,
        )?;
        let log = self.inner.log_store(&def)?;
        let store = log.object_store(None);
        let (delta, adopted) = open_or_create_in(&def, log).await?;
        let grace = Duration::from_millis(self.inner.config.cycle.orphan_grace_ms);
        let budget = self.inner.config.ingest.max_pending_bytes;
        let rec = recovery::recover(&def, &store, &delta, grace, budget).await?;
        let (tx, rx) = mpsc::channel(1024);
        let t = TableRuntime::new(def, store, delta, tx);
        t.pending.lock().expect("lock").segments = rec.pending;
        *t.producers.lock().expect("lock") = rec.producers;
        let paused = t.store.head(&Path::from(PAUSED_MARKER)).await.is_ok();
        t.paused.store(paused, Ordering::SeqCst);
        {
            let p = t.pending.lock().expect("lock");
            self.inner.metrics.pending(&t.def.name, p.rows(), p.bytes());
        }
        {
            let mut tables = self.inner.tables.write().expect("lock");
            if tables.contains_key(&t.def.name) {
                return Err(Error::TableExists(t.def.name.clone()));
            }
            tables.insert(t.def.name.clone(), t.clone());
        }
        tokio::spawn(run_stager(t.clone(), rx, rec.next_seq, self.inner.clone()));
        tokio::spawn(table_loop(self.inner.clone(), t.clone()));
        tokio::spawn(load_history(self.inner.clone(), t.clone()));
        tracing::info!(table = %t.def.name, uri = %t.def.uri, adopted, applied = rec.applied, "serving table");
        Ok((t, adopted))
    }

    /// Creates (or adopts) a table at run time and records it in the catalog.
    pub async fn create_table(&self, def: TableDef) -> Result<(TableInfo, bool)> {
        freshet_common::prefixes::check_uri(
            &self.inner.config.storage.allowed_prefixes,
            &def.name,
            &def.uri,
        )?;
        if self
            .inner
            .tables
            .read()
            .expect("lock")
            .contains_key(&def.name)
        {
            return Err(Error::TableExists(def.name.clone()));
        }
        let (t, adopted) = self.open_table(def).await?;
        if let Some(cat) = &self.inner.catalog {
            cat.save(&t.def).await?;
        }
        Ok((self.table_info(&t).await?, adopted))
    }

    /// A served table.
    pub fn table(&self, name: &str) -> Result<Arc<TableRuntime>> {
        self.inner
            .tables
            .read()
            .expect("lock")
            .get(name)
            .cloned()
            .ok_or_else(|| Error::TableNotFound(name.to_string()))
    }

    /// Every served table.
    pub fn tables(&self) -> Vec<Arc<TableRuntime>> {
        self.inner
            .tables
            .read()
            .expect("lock")
            .values()
            .cloned()
            .collect()
    }

    /// Validates and stages a batch; returns once it is durable.
    pub async fn ingest(&self, req: IngestRequest) -> Result<IngestResponse> {
        if self.inner.dead.load(Ordering::SeqCst) {
            return Err(Error::Unavailable("coordinator stopped".into()));
        }
        let t = self.table(&req.table)?;
        let producer = producer_of(&req)?;
        if let Some((p, _)) = &producer {
            self.load_producer(&t, p).await?;
        }
        let pending_bytes = t.pending.lock().expect("lock").bytes();
        if pending_bytes > self.inner.config.ingest.max_pending_bytes {
            return Err(Error::Backpressure {
                table: t.def.name.clone(),
                message: format!(
                    "{pending_bytes} bytes pending, limit {} (ingest.max_pending_bytes)",
                    self.inner.config.ingest.max_pending_bytes
                ),
            });
        }
        let limits = self.inner.config.ingest.clone();
        let def = t.def.clone();
        let valid = tokio::task::spawn_blocking(move || validate::validate(&def, &req, &limits))
            .await
            .map_err(|e| Error::Internal(e.to_string()))??;
        let rows = valid.batch.num_rows() as u64;
        let (reply, rx) = oneshot::channel();
        t.stager
            .send(StageRequest {
                batch: valid.batch,
                reply,
                sequence: None,
                origin_ms: None,
                producer,
                open: false,
            })
            .await
            .map_err(|_| Error::Unavailable("staging stopped".into()))?;
        let staged = rx
            .await
            .map_err(|_| Error::Unavailable("staging stopped".into()))??;
        Ok(IngestResponse {
            sequence: staged.sequence,
            rows,
            upserts: valid.upserts,
            deletes: valid.deletes,
            duplicate: staged.duplicate,
        })
    }

    /// Learns a producer's last applied batch from the Delta log the first time this term
    /// sees it (what is staged and not applied, recovery and the stager know).
    async fn load_producer(&self, t: &Arc<TableRuntime>, producer: &str) -> Result<()> {
        if t.producers.lock().expect("lock").contains_key(producer) {
            return Ok(());
        }
        let delta = t.delta.lock().await;
        if let Some(last) = producer_sequence(&t.def, &delta, producer).await? {
            t.producers
                .lock()
                .expect("lock")
                .entry(producer.to_string())
                .or_insert(stage::ProducerState { last, sequence: 0 });
        }
        Ok(())
    }

    /// Stages changes that are already in the table's change schema (from a trusted source
    /// such as CDC) under the source's own `sequence`; a sequence below the table's next one
    /// was staged before and is acknowledged without staging again. Returns once durable.
    pub async fn stage_changes(
        &self,
        table: &str,
        batch: arrow::record_batch::RecordBatch,
        sequence: u64,
        origin_ms: Option<i64>,
    ) -> Result<u64> {
        self.stage_chunk(table, batch, sequence, origin_ms, false)
            .await
    }

    /// [`Coordinator::stage_changes`] for one chunk of a large source transaction: with
    /// `open`, more of the transaction follows under higher sequences, and no cycle applies
    /// any of it before its last chunk (staged with `open` false) is staged: the whole
    /// transaction becomes visible in one commit. Open chunks are not held in memory.
    pub async fn stage_chunk(
        &self,
        table: &str,
        batch: arrow::record_batch::RecordBatch,
        sequence: u64,
        origin_ms: Option<i64>,
        open: bool,
    ) -> Result<u64> {
        if self.inner.dead.load(Ordering::SeqCst) {
            return Err(Error::Unavailable("coordinator stopped".into()));
        }
        let t = self.table(table)?;
        let expected = freshet_common::changes::change_schema(&t.def);
        if batch.schema().fields() != expected.fields() {
            return Err(Error::invalid(
                table,
                format!(
                    "staged changes have schema {:?}, expected {:?}",
                    batch.schema(),
                    expected
                ),
            ));
        }
        self.wait_for_room(&t).await?;
        let (reply, rx) = oneshot::channel();
        t.stager
            .send(StageRequest {
                batch,
                reply,
                sequence: Some(sequence),
                origin_ms,
                producer: None,
                open,
            })
            .await
            .map_err(|_| Error::Unavailable("staging stopped".into()))?;
        Ok(rx
            .await
            .map_err(|_| Error::Unavailable("staging stopped".into()))??
            .sequence)
    }

    /// Back-pressure for a source: waits while the table holds more than its pending limit
    /// in memory (the source stops reading its stream meanwhile, and the database keeps the
    /// changes), so a paused table with a busy source cannot grow the coordinator.
    async fn wait_for_room(&self, t: &Arc<TableRuntime>) -> Result<()> {
        let limit = self.inner.config.ingest.max_pending_bytes;
        let mut stop = self.inner.stop.subscribe();
        let mut closed = t.closed.subscribe();
        let mut logged = false;
        loop {
            let held = t.pending.lock().expect("lock").bytes();
            if held <= limit {
                if logged {
                    tracing::info!(table = %t.def.name, "pending changes below the limit; the source reads on");
                }
                return Ok(());
            }
            if !logged {
                tracing::warn!(table = %t.def.name, held, limit, "pending changes over ingest.max_pending_bytes; the source waits");
                logged = true;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = stop.wait_for(|s| *s) => return Err(Error::Unavailable("coordinator stopped".into())),
                _ = closed.wait_for(|s| *s) => return Err(Error::Unavailable(format!("table '{}' is being replaced", t.def.name))),
            }
            if self.inner.dead.load(Ordering::SeqCst) {
                return Err(Error::Unavailable("coordinator stopped".into()));
            }
        }
    }

    /// Runs cycles until no staged segment starts below `before` (a barrier before an
    /// operation that must follow those changes).
    async fn apply_pending(&self, t: &Arc<TableRuntime>, before: u64, what: &str) -> Result<()> {
        loop {
            let pending = t
                .pending
                .lock()
                .expect("lock")
                .segments
                .iter()
                .any(|s| s.first < before);
            if !pending {
                return Ok(());
            }
            let rec = cycle::run_cycle(&self.inner, t).await?;
            self.inner.record(t, &rec);
            if rec.state == "failed" {
                return Err(Error::Internal(format!(
                    "table '{}': cycle before {what} failed: {}",
                    t.def.name, rec.error
                )));
            }
        }
    }

    /// Empties the table in one commit at `sequence` (a source's TRUNCATE): changes staged
    /// before it are applied first; a truncate already applied (txn at or above `sequence`)
    /// is not repeated.
    pub async fn truncate(&self, table: &str, sequence: u64) -> Result<i64> {
        let t = self.table(table)?;
        self.apply_pending(&t, sequence, "truncate").await?;
        let mut delta = t.delta.lock().await;
        delta
            .update_state()
            .await
            .map_err(|e| Error::delta(table, e))?;
        if applied_sequence(&t.def, &delta).await? >= sequence {
            return Ok(delta.version().map(|v| v as i64).unwrap_or(-1));
        }
        self.inner.fence.check().await?;
        let removed = files(&t.def, &delta)?;
        let actions = commit::actions(&removed, &[]);
        let id = uuid::Uuid::now_v7().to_string();
        let metrics = serde_json::json!({
            "truncate": true, "filesRemoved": removed.len(), "lastSequence": sequence,
            "epoch": self.inner.epoch, "coordinator": self.inner.node_id,
        });
        let v = commit::commit(
            &t.def,
            &mut delta,
            actions,
            sequence,
            &Default::default(),
            &id,
            metrics,
            &self.inner.fence,
        )
        .await?;
        tracing::info!(table = %table, version = v, files = removed.len(), "table truncated");
        Ok(v)
    }

    /// Adds nullable columns to a table (a source's ALTER TABLE ADD COLUMN): applies what
    /// is pending under the old schema, commits the new schema to the Delta log, records it
    /// in the catalog, and serves the table under `new_def` from then on. Existing files
    /// read the new columns as null.
    pub async fn add_columns(&self, new_def: TableDef) -> Result<()> {
        let name = new_def.name.clone();
        let t = self.table(&name)?;
        let old = &t.def;
        let prefix_ok = new_def.schema.fields().len() > old.schema.fields().len()
            && old
                .schema
                .fields()
                .iter()
                .zip(new_def.schema.fields())
                .all(|(a, b)| a.name() == b.name() && a.data_type() == b.data_type());
        let added: Vec<_> = new_def.schema.fields()
            [old.schema.fields().len().min(new_def.schema.fields().len())..]
            .iter()
            .map(|f| f.as_ref().clone().with_nullable(true))
            .collect();
        if !prefix_ok
            || new_def.primary_key != old.primary_key
            || new_def.partition_by != old.partition_by
        {
            return Err(Error::InvalidTable {
                table: name,
                message:
                    "only new nullable columns at the end can be added; keys and partitioning stay"
                        .into(),
            });
        }
        // Everything staged under the old schema goes in first.
        self.apply_pending(&t, u64::MAX, "the schema change")
            .await?;
        {
            let mut delta = t.delta.lock().await;
            delta
                .update_state()
                .await
                .map_err(|e| Error::delta(&name, e))?;
            self.inner.fence.check().await?;
            let fields: deltalake::kernel::StructType =
                (&arrow::datatypes::Schema::new(added.clone()))
                    .try_into_kernel()
                    .map_err(|e| Error::InvalidTable {
                        table: name.clone(),
                        message: format!("new columns have no Delta equivalent: {e}"),
                    })?;
            let evolved = delta
                .clone()
                .add_columns()
                .with_fields(fields.fields().cloned().collect::<Vec<_>>())
                .await
                .map_err(|e| Error::delta(&name, e))?;
            *delta = evolved;
        }
        // Serve the table under the new definition.
        let _ = t.closed.send(true);
        self.inner.tables.write().expect("lock").remove(&name);
        let mut def = new_def;
        let fields: Vec<_> = def
            .schema
            .fields()
            .iter()
            .enumerate()
            .map(|(i, f)| {
                if i >= t.def.schema.fields().len() {
                    f.as_ref().clone().with_nullable(true)
                } else {
                    f.as_ref().clone()
                }
            })
            .collect();
        def.schema = std::sync::Arc::new(arrow::datatypes::Schema::new(fields));
        let (nt, _) = self.open_table(def).await?;
        if let Some(cat) = &self.inner.catalog {
            cat.save(&nt.def).await?;
        }
        tracing::info!(table = %name, columns = ?added.iter().map(|f| f.name().clone()).collect::<Vec<_>>(), "columns added");
        Ok(())
    }

    /// Runs a cycle of the table now.
    pub async fn trigger(&self, table: &str) -> Result<CycleRecord> {
        if self.inner.dead.load(Ordering::SeqCst) {
            return Err(Error::Unavailable("coordinator stopped".into()));
        }
        let t = self.table(table)?;
        let rec = cycle::run_cycle(&self.inner, &t).await?;
        self.inner.record(&t, &rec);
        Ok(rec)
    }

    /// Recent cycles, newest first.
    pub fn cycles(&self, table: Option<&str>, limit: usize) -> Vec<CycleRecord> {
        self.inner
            .history
            .lock()
            .expect("lock")
            .iter()
            .filter(|c| table.is_none_or(|t| c.table == t))
            .take(limit)
            .cloned()
            .collect()
    }

    /// One cycle by id.
    pub fn cycle(&self, id: &str) -> Result<CycleRecord> {
        self.inner
            .history
            .lock()
            .expect("lock")
            .iter()
            .find(|c| c.id == id)
            .cloned()
            .ok_or_else(|| Error::CycleNotFound(id.to_string()))
    }

    /// The admin view of a table.
    pub async fn table_info(&self, t: &TableRuntime) -> Result<TableInfo> {
        let table = t.delta.lock().await;
        let active = files(&t.def, &table)?;
        let applied = applied_sequence(&t.def, &table).await?;
        let (pending_changes, pending_bytes) = {
            let p = t.pending.lock().expect("lock");
            (p.rows(), p.bytes())
        };
        // Freshness over the last (up to) 100 committed cycles of the table.
        let lags = {
            let h = self.inner.history.lock().expect("lock");
            let mut v: Vec<u64> = h
                .iter()
                .filter(|c| c.table == t.def.name && c.state == "committed")
                .take(100)
                .map(|c| c.freshness_lag_ms)
                .collect();
            v.sort_unstable();
            let pct = |p: f64| {
                if v.is_empty() {
                    0
                } else {
                    v[((v.len() - 1) as f64 * p).round() as usize]
                }
            };
            (pct(0.5), pct(0.99), v.len() as u32)
        };
        Ok(TableInfo {
            name: t.def.name.clone(),
            uri: t.def.uri.clone(),
            schema_json: SchemaSpec::from_arrow(&t.def.schema).to_json(),
            primary_key: t.def.primary_key.clone(),
            partition_columns: t.def.partition_by.clone(),
            target_file_size: t.def.target_file_size,
            version: table.version().map(|v| v as i64).unwrap_or(-1),
            num_files: active.len() as u64,
            total_bytes: active.iter().map(|f| f.size).sum(),
            total_rows: active.iter().map(|f| f.num_records.unwrap_or(0)).sum(),
            pending_changes,
            pending_bytes,
            applied_sequence: applied,
            last_cycle: t.last_cycle.lock().expect("lock").clone(),
            paused: t.paused.load(Ordering::SeqCst),
            freshness_p50_ms: lags.0,
            freshness_p99_ms: lags.1,
            freshness_window: lags.2,
        })
    }
}

/// The producer id and sequence of an idempotent ingest request, checked.
fn producer_of(req: &IngestRequest) -> Result<Option<(String, u64)>> {
    let bad = |message: String| Error::invalid(&req.table, message);
    match (req.producer_id.as_str(), req.producer_sequence) {
        ("", 0) => Ok(None),
        ("", _) => Err(bad(
            "producer_sequence is set but producer_id is empty".into()
        )),
        (_, 0) => Err(bad(
            "producer_id is set: producer_sequence must be 1 or more".into(),
        )),
        (p, _) if p.len() > 128 || p.chars().any(|c| c.is_control()) => Err(bad(format!(
            "producer_id must be 1-128 printable characters (got {} bytes)",
            p.len()
        ))),
        (p, s) => Ok(Some((p.to_string(), s))),
    }
}

async fn load_history(inner: Arc<Inner>, t: Arc<TableRuntime>) {
    let keep = inner.config.cycle.history.max(1);
    match history::load(&t.store, keep).await {
        Ok(records) => {
            {
                let mut ids = t.history_ids.lock().expect("lock");
                for r in &records {
                    if !ids.contains(&r.id) {
                        ids.push_back(r.id.clone());
                    }
                }
            }
            let mut last = t.last_cycle.lock().expect("lock");
            if last.is_none() {
                *last = records.first().cloned();
            }
            drop(last);
            let mut h = inner.history.lock().expect("lock");
            let mut all: Vec<CycleRecord> = h.drain(..).collect();
            for r in records {
                if !all.iter().any(|x| x.id == r.id) {
                    all.push(r);
                }
            }
            all.sort_by(|a, b| b.id.cmp(&a.id));
            all.truncate(keep);
            h.extend(all);
        }
        Err(e) => tracing::warn!(table = %t.def.name, error = %e, "cycle history not loaded"),
    }
}

async fn table_loop(inner: Arc<Inner>, t: Arc<TableRuntime>) {
    let interval = Duration::from_millis(inner.config.cycle.interval_ms.max(1));
    let mut stop = inner.stop.subscribe();
    let mut closed = t.closed.subscribe();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = t.wake.notified() => {}
            _ = stop.wait_for(|s| *s) => return,
            _ = closed.wait_for(|s| *s) => return,
        }
        if t.paused.load(Ordering::SeqCst) || t.pending.lock().expect("lock").segments.is_empty() {
            continue;
        }
        if inner.dead.load(Ordering::SeqCst) || *stop.borrow() {
            return;
        }
        match cycle::run_cycle(&inner, &t).await {
            Ok(rec) => inner.record(&t, &rec),
            // A lease check that failed while the term goes on (keep-alives late, say while
            // etcd restarts) only skips this cycle; a lost term or an injected crash ends it.
            Err(Error::LeadershipLost(e)) if !inner.fence.is_lost() => {
                tracing::warn!(table = %t.def.name, error = %e, "cycle skipped: leadership not confirmed");
            }
            Err(e) => {
                tracing::error!(table = %t.def.name, error = %e, "cycle stopped the coordinator");
                return;
            }
        }
    }
}
