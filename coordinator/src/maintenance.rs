//! Table maintenance on the leader, per table, between cycles: the `delta.*` retention
//! settings written into the table, checkpoints, expired log cleanup and vacuum
//! (docs/maintenance.md).
//!
//! - **Settings.** `[maintenance]` gives `delta.checkpointInterval`,
//!   `delta.logRetentionDuration` and `delta.deletedFileRetentionDuration`; a table that
//!   lacks one gets it written (one metadata commit, on the first run). A table's own
//!   property wins. From then on deltalake's commit path (the cycle's commit) writes a
//!   checkpoint every `delta.checkpointInterval` commits; maintenance writes one only when
//!   the newest lags that far behind (a failed post-commit hook, an adopted table).
//! - **Log cleanup.** Log entries older than `delta.logRetentionDuration` and older than a
//!   checkpoint the retained versions can be read from (deltalake's
//!   `cleanup_expired_logs_for`).
//! - **Vacuum.** Data files removed from the table longer ago than
//!   `delta.deletedFileRetentionDuration`, and files no version tracks that are older than
//!   that (deltalake's full vacuum, planned as a dry run so that it commits nothing);
//!   never a file the current version or a tombstone within the retention references, never
//!   anything under `_delta_log/` or `_freshet/` (hidden: the staging log, in-flight and
//!   cycle records). The deletes go through the term's fenced store after etcd confirmed
//!   the leadership, so a deposed leader deletes nothing.
//!
//! A run holds the table's Delta handle (the cycle lock) while it reads the log, writes the
//! settings and the checkpoint, cleans the log and plans the vacuum, so it never overlaps a
//! cycle of the table; the deletes run after it let go. A failed run is logged and recorded,
//! and the next run tries again; it never stops the table's cycles.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::{Duration, Instant};

use deltalake::DeltaTable;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::operations::vacuum::VacuumMode;
use deltalake::table::config::TablePropertiesExt as _;
use deltalake::table::state::DeltaTableState;
use freshet_common::error::{Error, Result};
use freshet_proto::admin::v1::{MaintenanceRun, TableMaintenance};
use futures::StreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};

use crate::Coordinator;
use crate::context::TermContext;
use crate::metrics::TableLabel;
use crate::tables::TableRuntime;

/// The table property of the checkpoint interval.
pub const CHECKPOINT_INTERVAL: &str = "delta.checkpointInterval";
/// The table property of the log retention.
pub const LOG_RETENTION: &str = "delta.logRetentionDuration";
/// The table property of the deleted-file retention.
pub const DELETED_FILE_RETENTION: &str = "delta.deletedFileRetentionDuration";

/// Runs kept per table for the admin API.
const KEEP_RUNS: usize = 20;
/// Below this retention a warning is logged: readers of older versions may still need the
/// files vacuum deletes.
const SHORT_RETENTION: Duration = Duration::from_secs(3600);
/// Prefixes vacuum never touches, whatever deltalake decides.
const PROTECTED: &[&str] = &["_delta_log", "_freshet"];

/// What the admin API shows of a table's maintenance in this term.
#[derive(Default)]
struct State {
    runs: VecDeque<MaintenanceRun>,
    checkpoint_interval: u64,
    log_retention_ms: u64,
    deleted_file_retention_ms: u64,
    files_vacuumed_total: u64,
    bytes_freed_total: u64,
    warned_short_retention: bool,
    /// Deletion-vector files no active file references, and when this term first saw
    /// them so (see [`dv_files_due`]).
    dv_unreferenced: HashMap<String, Instant>,
}

type Registry = Mutex<Vec<(Weak<TableRuntime>, Arc<Mutex<State>>)>>;

/// Per table runtime (a replaced runtime starts afresh; dead entries are pruned).
static REGISTRY: LazyLock<Registry> = LazyLock::new(Default::default);

fn state_of(t: &Arc<TableRuntime>) -> Arc<Mutex<State>> {
    let mut r = REGISTRY.lock().expect("lock");
    r.retain(|(w, _)| w.strong_count() > 0);
    if let Some((_, s)) = r
        .iter()
        .find(|(w, _)| std::ptr::eq(w.as_ptr(), Arc::as_ptr(t)))
    {
        return s.clone();
    }
    let s = Arc::new(Mutex::new(State::default()));
    r.push((Arc::downgrade(t), s.clone()));
    s
}

/// A Delta interval property value ("interval 7 days") for a duration.
pub fn delta_interval(d: Duration) -> String {
    let ms = d.as_millis() as u64;
    for (unit, size) in [
        ("days", 86_400_000u64),
        ("hours", 3_600_000),
        ("minutes", 60_000),
        ("seconds", 1000),
    ] {
        if ms > 0 && ms % size == 0 {
            return format!("interval {} {unit}", ms / size);
        }
    }
    format!("interval {ms} milliseconds")
}

/// The `delta.*` settings of `[maintenance]` that the table's configuration lacks.
pub fn missing_properties(
    table_config: &HashMap<String, String>,
    cfg: &freshet_common::config::MaintenanceConfig,
) -> HashMap<String, String> {
    [
        (CHECKPOINT_INTERVAL, cfg.checkpoint_interval.to_string()),
        (LOG_RETENTION, delta_interval(cfg.log_retention.0)),
        (
            DELETED_FILE_RETENTION,
            delta_interval(cfg.deleted_file_retention.0),
        ),
    ]
    .into_iter()
    .filter(|(k, _)| !table_config.contains_key(*k))
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// The table's maintenance loop: a run every `maintenance.interval_ms` until the term
/// stops or the runtime is replaced.
pub(crate) async fn maintenance_loop(ctx: Arc<TermContext>, t: Arc<TableRuntime>) {
    let cfg = ctx.config.maintenance.clone();
    if !cfg.enabled {
        return;
    }
    let interval = Duration::from_millis(cfg.interval_ms.max(1));
    let mut stop = ctx.stop.subscribe();
    let mut closed = t.closed.subscribe();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.wait_for(|s| *s) => return,
            _ = closed.wait_for(|s| *s) => return,
        }
        if ctx.is_dead() || *stop.borrow() || ctx.fence.is_lost() {
            return;
        }
        run(&ctx, &t).await;
    }
}

/// One maintenance run of a table, recorded (an error is in the record, not returned).
pub async fn run(ctx: &TermContext, t: &Arc<TableRuntime>) -> MaintenanceRun {
    let started = Instant::now();
    let mut rec = MaintenanceRun {
        started_at_ms: chrono::Utc::now().timestamp_millis(),
        table_version: -1,
        checkpoint_version: -1,
        epoch: ctx.epoch,
        ..Default::default()
    };
    let state = state_of(t);
    let outcome = run_inner(ctx, t, &mut rec, &state).await;
    rec.duration_ms = started.elapsed().as_millis() as u64;
    let label = TableLabel {
        table: t.def.name.clone(),
    };
    let m = &ctx.metrics;
    m.vacuumed_files
        .get_or_create(&label)
        .inc_by(rec.files_vacuumed);
    m.vacuumed_bytes
        .get_or_create(&label)
        .inc_by(rec.bytes_freed);
    m.log_entries_removed
        .get_or_create(&label)
        .inc_by(rec.log_entries_removed);
    if rec.checkpoint_written {
        m.checkpoints_written.get_or_create(&label).inc();
    }
    match outcome {
        Ok(()) => tracing::info!(
            table = %t.def.name,
            version = rec.table_version,
            checkpoint = rec.checkpoint_version,
            checkpoint_written = rec.checkpoint_written,
            log_entries_removed = rec.log_entries_removed,
            files_vacuumed = rec.files_vacuumed,
            bytes_freed = rec.bytes_freed,
            ms = rec.duration_ms,
            "table maintenance"
        ),
        Err(e) => {
            m.maintenance_failures.get_or_create(&label).inc();
            tracing::warn!(table = %t.def.name, error = %e, "table maintenance failed; the next run tries again");
            rec.error = e.to_string();
        }
    }
    let mut s = state.lock().expect("lock");
    s.files_vacuumed_total += rec.files_vacuumed;
    s.bytes_freed_total += rec.bytes_freed;
    s.runs.push_front(rec.clone());
    s.runs.truncate(KEEP_RUNS);
    rec
}

async fn run_inner(
    ctx: &TermContext,
    t: &Arc<TableRuntime>,
    rec: &mut MaintenanceRun,
    state: &Arc<Mutex<State>>,
) -> Result<()> {
    ctx.check_alive()?;
    ctx.fence.check_local()?;
    let name = &t.def.name;
    let derr = |e| Error::delta(name, e);
    let cfg = &ctx.config.maintenance;

    // Under the cycle lock: settings, checkpoint, log cleanup, the vacuum plan.
    let doomed = {
        let mut table = t.delta.lock().await;
        table.update_state().await.map_err(derr)?;

        let config = table
            .snapshot()
            .map_err(derr)?
            .metadata()
            .configuration()
            .clone();
        let missing = missing_properties(&config, cfg);
        if !missing.is_empty() {
            // A commit: leadership confirmed against etcd first, as before a cycle's.
            ctx.fence.check().await?;
            let props = CommitProperties::default()
                .with_metadata([(
                    "freshet.maintenance".to_string(),
                    serde_json::json!({ "epoch": ctx.epoch, "coordinator": ctx.node_id }),
                )])
                .with_max_retries(0);
            table
                .clone()
                .set_tbl_properties()
                .with_properties(missing.clone())
                .with_raise_if_not_exists(false)
                .with_commit_properties(props)
                .await
                .map_err(derr)?;
            table.update_state().await.map_err(derr)?;
            let mut set: Vec<String> = missing.iter().map(|(k, v)| format!("{k}={v}")).collect();
            set.sort();
            tracing::info!(table = %name, properties = ?set, "maintenance settings written into the table");
            rec.properties_set = set;
        }

        let snapshot = table.snapshot().map_err(derr)?;
        let props = snapshot.table_config();
        let interval = props.checkpoint_interval().get();
        let log_retention = props.log_retention_duration();
        let file_retention = props.deleted_file_retention_duration();
        {
            let mut s = state.lock().expect("lock");
            s.checkpoint_interval = interval;
            s.log_retention_ms = log_retention.as_millis() as u64;
            s.deleted_file_retention_ms = file_retention.as_millis() as u64;
            if file_retention < SHORT_RETENTION && !s.warned_short_retention {
                s.warned_short_retention = true;
                tracing::warn!(
                    table = %name,
                    retention_ms = file_retention.as_millis() as u64,
                    "delta.deletedFileRetentionDuration is below 1 h: vacuum deletes removed files that readers of older versions (time travel, long queries) may still need"
                );
            }
        }
        let version = table
            .version()
            .ok_or_else(|| Error::Internal(format!("table {name}: no version loaded")))?;
        rec.table_version = version as i64;

        // Checkpoint, when the newest lags `interval` commits behind.
        let mut checkpoint = last_checkpoint(&t.store).await?;
        let due = match checkpoint {
            Some(c) => version >= c + interval,
            None => version + 1 >= interval,
        };
        let mut changed = false;
        if due {
            ctx.fence.check_local()?;
            deltalake::checkpoints::create_checkpoint(&table, None)
                .await
                .map_err(derr)?;
            checkpoint = Some(version);
            rec.checkpoint_written = true;
            changed = true;
        }
        rec.checkpoint_version = checkpoint.map(|c| c as i64).unwrap_or(-1);

        // Expired log entries: only below a checkpoint the retained versions read from.
        if checkpoint.is_some() {
            ctx.fence.check_local()?;
            let cutoff = chrono::Utc::now().timestamp_millis() - log_retention.as_millis() as i64;
            let log = table.log_store();
            let removed = deltalake::checkpoints::cleanup_expired_logs_for(
                version,
                log.as_ref(),
                cutoff,
                None,
            )
            .await
            .map_err(derr)?;
            rec.log_entries_removed = removed as u64;
            changed |= removed > 0;
        }
        if changed {
            // The loaded state may name log files that are gone now: read it afresh.
            reload(&mut table, version).await.map_err(derr)?;
        }

        // Vacuum, planned only: deltalake's vacuum would add two commits.
        let (_, plan) = table
            .clone()
            .vacuum()
            .with_mode(VacuumMode::Full)
            .with_retention_period(
                chrono::Duration::from_std(file_retention)
                    .map_err(|e| Error::Internal(format!("retention: {e}")))?,
            )
            .with_enforce_retention_duration(false)
            .with_dry_run(true)
            .await
            .map_err(derr)?;
        let planned: Vec<Path> = plan
            .files_deleted
            .iter()
            .map(|p| Path::parse(p).unwrap_or_else(|_| Path::from(p.as_str())))
            .filter(|p| !protected(p))
            .collect();
        let mut s = state.lock().expect("lock");
        dv_files_due(
            &mut s.dv_unreferenced,
            planned,
            Instant::now(),
            file_retention,
        )
    };

    if doomed.is_empty() {
        return Ok(());
    }
    // Deletes: only a confirmed leader, and each through the fenced store.
    ctx.fence.check().await?;
    let store = t.store.clone();
    let mut deletes = futures::stream::iter(doomed)
        .map(|p| {
            let store = store.clone();
            async move { delete_one(&store, &p).await }
        })
        .buffer_unordered(8);
    let mut first_error = None;
    while let Some(r) = deletes.next().await {
        match r {
            Ok(Some(size)) => {
                rec.files_vacuumed += 1;
                rec.bytes_freed += size;
            }
            Ok(None) => {}
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Whether a path is a deletion-vector file.
fn is_dv_file(p: &Path) -> bool {
    p.filename()
        .is_some_and(|n| n.starts_with("deletion_vector_") && n.ends_with(".bin"))
}

/// What of deltalake's vacuum plan may go now. Data files go as planned (their Remove
/// actions carry the time they left the table). A DV file has no such time: the Remove that
/// replaced its DV is not visible in deltalake's tombstones, and its modification time says
/// when it was written, not when the table stopped using it, so time travel to a version
/// within the retention may still need it. It goes only once this term has seen it
/// unreferenced for a whole retention period (a new leader starts counting afresh: later,
/// never earlier).
fn dv_files_due(
    seen: &mut HashMap<String, Instant>,
    planned: Vec<Path>,
    now: Instant,
    retention: Duration,
) -> Vec<Path> {
    let mut still = HashMap::new();
    let mut due = Vec::new();
    for p in planned {
        if !is_dv_file(&p) {
            due.push(p);
            continue;
        }
        let first = seen.get(p.as_ref()).copied().unwrap_or(now);
        if now.duration_since(first) >= retention {
            due.push(p);
        } else {
            still.insert(p.as_ref().to_string(), first);
        }
    }
    // Forget what is referenced again or gone: the map stays bounded.
    *seen = still;
    due
}

fn protected(p: &Path) -> bool {
    let s = p.as_ref();
    PROTECTED
        .iter()
        .any(|x| s == *x || s.starts_with(&format!("{x}/")))
}

/// Deletes one file; its size, or `None` when it was gone already.
async fn delete_one(store: &Arc<dyn ObjectStore>, p: &Path) -> Result<Option<u64>> {
    let size = match store.head(p).await {
        Ok(m) => m.size,
        Err(object_store::Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(Error::store(p, e)),
    };
    match store.delete(p).await {
        Ok(()) => Ok(Some(size)),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(Error::store(p, e)),
    }
}

/// The version of the newest checkpoint, from `_delta_log/_last_checkpoint`.
async fn last_checkpoint(store: &Arc<dyn ObjectStore>) -> Result<Option<u64>> {
    let path = Path::from("_delta_log/_last_checkpoint");
    let Some(bytes) = freshet_common::storage::read_object(store, &path).await? else {
        return Ok(None);
    };
    Ok(serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v["version"].as_u64()))
}

async fn reload(table: &mut DeltaTable, version: u64) -> deltalake::DeltaResult<()> {
    let log = table.log_store();
    match DeltaTableState::try_new(log.as_ref(), Some(version)).await {
        Ok(s) => {
            table.state = Some(s);
            Ok(())
        }
        Err(e) => {
            // The next user (a cycle refreshes first) loads it from scratch.
            table.state = None;
            Err(e)
        }
    }
}

impl Coordinator {
    /// Runs maintenance of a table now (what the table's maintenance task does every
    /// `maintenance.interval_ms`) and returns the run's record.
    pub async fn run_maintenance(&self, table: &str) -> Result<MaintenanceRun> {
        self.inner().ctx.check_alive()?;
        let t = self.table(table)?;
        Ok(run(&self.inner().ctx, &t).await)
    }

    /// The maintenance of a table (or of every table when `table` is empty): settings in
    /// force and the last runs, newest first.
    pub fn maintenance(&self, table: &str) -> Result<Vec<TableMaintenance>> {
        let tables = if table.is_empty() {
            self.tables()
        } else {
            vec![self.table(table)?]
        };
        let cfg = &self.inner().ctx.config.maintenance;
        Ok(tables
            .iter()
            .map(|t| {
                let st = state_of(t);
                let s = st.lock().expect("lock");
                let or = |v: u64, d: u64| if v == 0 { d } else { v };
                TableMaintenance {
                    table: t.def.name.clone(),
                    interval_ms: if cfg.enabled { cfg.interval_ms } else { 0 },
                    checkpoint_interval: or(s.checkpoint_interval, cfg.checkpoint_interval),
                    log_retention_ms: or(
                        s.log_retention_ms,
                        cfg.log_retention.0.as_millis() as u64,
                    ),
                    deleted_file_retention_ms: or(
                        s.deleted_file_retention_ms,
                        cfg.deleted_file_retention.0.as_millis() as u64,
                    ),
                    runs: s.runs.iter().cloned().collect(),
                    files_vacuumed_total: s.files_vacuumed_total,
                    bytes_freed_total: s.bytes_freed_total,
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_are_written_in_the_largest_exact_unit() {
        assert_eq!(
            delta_interval(Duration::from_secs(7 * 86400)),
            "interval 7 days"
        );
        assert_eq!(
            delta_interval(Duration::from_secs(5400)),
            "interval 90 minutes"
        );
        assert_eq!(
            delta_interval(Duration::from_millis(1500)),
            "interval 1500 milliseconds"
        );
        assert_eq!(delta_interval(Duration::ZERO), "interval 0 milliseconds");
    }

    #[test]
    fn only_missing_properties_are_written() {
        let cfg = freshet_common::config::MaintenanceConfig::default();
        let all = missing_properties(&HashMap::new(), &cfg);
        assert_eq!(all[CHECKPOINT_INTERVAL], "10");
        assert_eq!(all[LOG_RETENTION], "interval 30 days");
        assert_eq!(all[DELETED_FILE_RETENTION], "interval 7 days");
        let own = HashMap::from([(DELETED_FILE_RETENTION.to_string(), "interval 1 days".into())]);
        let some = missing_properties(&own, &cfg);
        assert_eq!(some.len(), 2);
        assert!(
            !some.contains_key(DELETED_FILE_RETENTION),
            "the table's own wins"
        );
    }

    use std::collections::BTreeMap;

    use arrow::datatypes::{DataType, Field, Schema};
    use bytes::Bytes;
    use freshet_common::config::{Config, HumanDuration};
    use freshet_common::table::TableDef;
    use freshet_proto::worker::v1::OutputFile;

    use crate::commit::{actions, commit};
    use crate::fence::Fence;
    use crate::metrics::CoordinatorMetrics;
    use crate::router::Router;
    use crate::testing::CrashSwitch;

    fn def(dir: &std::path::Path) -> TableDef {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("v", DataType::Utf8, true),
        ]));
        TableDef::new(
            "t",
            dir.to_str().unwrap(),
            schema,
            vec!["id".into()],
            vec![],
            1 << 20,
        )
        .unwrap()
    }

    fn ctx(fence: Fence) -> TermContext {
        let mut config = Config::default();
        config.maintenance.deleted_file_retention = HumanDuration(Duration::from_millis(1));
        config.maintenance.checkpoint_interval = 2;
        TermContext::new(
            config,
            Router::new(vec![], 1 << 20),
            1,
            Arc::new(fence),
            "n".into(),
            Arc::new(CoordinatorMetrics::default()),
            CrashSwitch::default(),
        )
    }

    fn output(name: &str) -> OutputFile {
        OutputFile {
            path: name.into(),
            size: 100,
            num_records: 1,
            stats_json: r#"{"numRecords":1}"#.into(),
            min_key_json: r#"["1"]"#.into(),
            max_key_json: r#"["1"]"#.into(),
            ..Default::default()
        }
    }

    /// A table runtime of `ctx` over the table in `dir`.
    async fn runtime(ctx: &TermContext, d: &TableDef) -> Arc<TableRuntime> {
        let log = ctx.log_store(d).unwrap();
        let store = log.object_store(None);
        let (delta, _) = freshet_common::delta::open_or_create_in(d, log)
            .await
            .unwrap();
        TableRuntime::new(d.clone(), store, delta, tokio::sync::mpsc::channel(1).0)
    }

    async fn exists(store: &Arc<dyn ObjectStore>, p: &str) -> bool {
        store.head(&Path::from(p)).await.is_ok()
    }

    #[tokio::test]
    async fn a_deposed_leader_deletes_nothing_and_the_leader_vacuums_only_expired_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = def(dir.path());
        let leader = ctx(Fence::none());
        let t = runtime(&leader, &d).await;
        let store = t.store.clone();
        let (a, b) = ("fr-c1-0-1-a.parquet", "fr-c2-0-1-b.parquet");
        for p in [
            a,
            b,
            "_freshet/staging/00000001-00000001.arrow",
            "_freshet/cycles/c1.pb",
        ] {
            store
                .put(&Path::from(p), Bytes::from(vec![7u8; 100]).into())
                .await
                .unwrap();
        }
        {
            let mut table = t.delta.lock().await;
            let none = BTreeMap::new();
            let m = serde_json::json!({});
            commit(
                &d,
                &mut table,
                actions(&[], &[output(a)], &[]),
                1,
                &none,
                "c1",
                m.clone(),
                &Fence::none(),
            )
            .await
            .unwrap();
            let old = freshet_common::delta::files(&d, &table).unwrap();
            commit(
                &d,
                &mut table,
                actions(&old, &[output(b)], &[]),
                2,
                &none,
                "c2",
                m,
                &Fence::none(),
            )
            .await
            .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;

        // Deposed: the term is over, nothing runs and nothing is deleted.
        let lost = Fence::lease_only(Duration::from_secs(30));
        lost.lose();
        let deposed = ctx(lost);
        let td = runtime(&deposed, &d).await;
        let r = run(&deposed, &td).await;
        assert!(r.error.contains("term ended"), "{r:?}");
        assert_eq!((r.files_vacuumed, r.properties_set.len()), (0, 0), "{r:?}");
        // And a delete through a store whose lease ran out is refused by the store itself.
        let expired = ctx(Fence::lease_only(Duration::ZERO));
        let te = runtime(&expired, &d).await;
        assert!(delete_one(&te.store, &Path::from(a)).await.is_err());
        assert!(exists(&store, a).await, "the deposed leader deleted a file");

        // The leader: settings written, a checkpoint, the removed file vacuumed; the live
        // file, the staging log and the cycle records stay.
        let r = run(&leader, &t).await;
        assert!(r.error.is_empty(), "{r:?}");
        assert_eq!(r.properties_set.len(), 3, "{r:?}");
        assert_eq!((r.files_vacuumed, r.bytes_freed), (1, 100), "{r:?}");
        assert!(r.checkpoint_version >= 2, "{r:?}");
        assert!(exists(&store, "_delta_log/_last_checkpoint").await);
        assert!(!exists(&store, a).await);
        for p in [
            b,
            "_freshet/staging/00000001-00000001.arrow",
            "_freshet/cycles/c1.pb",
        ] {
            assert!(exists(&store, p).await, "{p} was deleted");
        }
        // The next run has nothing to write and nothing to delete.
        let r = run(&leader, &t).await;
        assert!(r.error.is_empty() && r.properties_set.is_empty(), "{r:?}");
        assert_eq!(r.files_vacuumed, 0, "{r:?}");
        let table = t.delta.lock().await;
        assert_eq!(
            table.snapshot().unwrap().metadata().configuration()[DELETED_FILE_RETENTION],
            "interval 1 milliseconds"
        );
    }

    #[test]
    fn dv_files_wait_a_retention_period_after_they_are_first_seen_unreferenced() {
        let mut seen = HashMap::new();
        let t0 = Instant::now();
        let day = Duration::from_secs(86_400);
        let dv = Path::from("deletion_vector_0b1c.bin");
        let data = Path::from("part-0001.parquet");
        let plan = || vec![dv.clone(), data.clone()];
        assert_eq!(dv_files_due(&mut seen, plan(), t0, day), vec![data.clone()]);
        assert_eq!(
            dv_files_due(&mut seen, plan(), t0 + day / 2, day),
            vec![data.clone()],
            "seen unreferenced for half the retention: kept"
        );
        assert_eq!(dv_files_due(&mut seen, plan(), t0 + day, day), plan());
        // Referenced again in between (not in the plan): the clock starts over.
        let mut seen = HashMap::new();
        dv_files_due(&mut seen, plan(), t0, day);
        dv_files_due(&mut seen, vec![], t0 + day / 2, day);
        assert!(dv_files_due(&mut seen, plan(), t0 + day, day).len() == 1);
    }

    #[test]
    fn the_staging_log_and_the_delta_log_are_never_vacuumed() {
        for p in [
            "_freshet/staging/1-2.arrow",
            "_freshet/cycles/x.pb",
            "_delta_log/00.json",
            "_freshet",
        ] {
            assert!(protected(&Path::from(p)), "{p}");
        }
        for p in [
            "fr-1-2-3-x.parquet",
            "region=eu/fr-1.parquet",
            "_freshetx/a",
        ] {
            assert!(!protected(&Path::from(p)), "{p}");
        }
    }
}
