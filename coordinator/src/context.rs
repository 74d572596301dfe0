//! What a coordinator term's cycles and stagers need, and nothing more: settings, the
//! worker router, the leader epoch and fence, metrics, the stop signal and test switches.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use freshet_common::config::Config;
use freshet_common::error::{Error, Result};
use freshet_common::storage::{log_store_wrapped, table_url};
use freshet_common::table::TableDef;
use tokio::sync::watch;

use crate::fence::Fence;
use crate::fenced_store;
use crate::metrics::CoordinatorMetrics;
use crate::router::Router;
use crate::testing::{CrashPoint, CrashSwitch};

/// The shared context of one coordinator term.
pub struct TermContext {
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
    /// Turns true when the term stops.
    pub stop: watch::Sender<bool>,
    /// The armed crash point (tests).
    pub crash: CrashSwitch,
    /// The memory every query of the term shares (`query.max_memory_bytes`).
    pub query_pool: Arc<dyn datafusion::execution::memory_pool::MemoryPool>,
    /// Set once an injected crash stopped the term's work.
    dead: AtomicBool,
}

impl TermContext {
    /// A context; the term is running.
    pub fn new(
        config: Config,
        router: Router,
        epoch: u64,
        fence: Arc<Fence>,
        node_id: String,
        metrics: Arc<CoordinatorMetrics>,
        crash: CrashSwitch,
    ) -> Self {
        let query_pool = Arc::new(datafusion::execution::memory_pool::FairSpillPool::new(
            config.query.max_memory_bytes.max(1 << 20),
        ));
        TermContext {
            query_pool,
            config,
            router,
            epoch,
            fence,
            node_id,
            metrics,
            stop: watch::channel(false).0,
            crash,
            dead: AtomicBool::new(false),
        }
    }

    /// Whether an injected crash stopped the term's work.
    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }

    /// UNAVAILABLE once an injected crash stopped the term's work.
    pub fn check_alive(&self) -> Result<()> {
        if self.is_dead() {
            return Err(Error::Unavailable("coordinator stopped".into()));
        }
        Ok(())
    }

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
        if let Some(abort) = self.crash.armed(p) {
            if abort {
                eprintln!("freshet: injected crash at {p:?}");
                std::process::abort();
            }
            self.dead.store(true, Ordering::SeqCst);
            return Err(Error::Injected(format!("{p:?}")));
        }
        Ok(())
    }
}
