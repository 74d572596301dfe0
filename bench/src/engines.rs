//! The three contenders, each run in its own process (`run-one`) on its own table copy:
//! a Freshet cycle (coordinator in the process, N worker processes over loopback gRPC), delta-rs MERGE,
//! and a full rewrite (read all, apply, write all).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use arrow::array::RecordBatch;
use arrow::row::{RowConverter, SortField};
use deltalake::DeltaTable;
use deltalake::datafusion::prelude::{SessionContext, col};
use deltalake::protocol::SaveMode;
use freshet_common::config::Config;
use freshet_common::table::TableDef;
use freshet_coordinator::Coordinator;
use freshet_proto::ingest::v1::IngestRequest;
use freshet_proto::ingest::v1::ingest_request::Payload;
use serde::{Deserialize, Serialize};

use crate::data::{self, Changes, Dist, Shape, TABLE};
use crate::procs::WorkerProcs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// One Freshet cycle, copy-on-write.
    Freshet,
    /// One Freshet cycle with deletion vectors (merge_mode = deletion_vectors).
    #[value(name = "freshet-dv")]
    #[serde(rename = "freshet-dv")]
    FreshetDv,
    /// delta-rs MERGE.
    Merge,
    /// Read everything, apply, write everything.
    Full,
}

impl Engine {
    /// The name on the command line and in results.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Freshet => "freshet",
            Engine::FreshetDv => "freshet-dv",
            Engine::Merge => "merge",
            Engine::Full => "full",
        }
    }
}

/// What one run measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunResult {
    pub engine: String,
    pub workers: usize,
    pub rows: u64,
    pub partitioned: bool,
    pub changes: usize,
    pub dist: String,
    /// From having the batch in memory to the commit (Freshet: ingest + cycle).
    pub wall_ms: f64,
    /// Freshet: the cycle alone (trigger to commit); others: same as wall.
    pub cycle_ms: f64,
    /// Freshet: durable staging of the batch (ingest acknowledgement).
    pub ingest_ms: f64,
    /// User + system CPU over the measured section (Freshet: coordinator + workers).
    pub cpu_s: f64,
    /// Peak RSS of the process (before the contents check); for Freshet, the coordinator's.
    pub peak_rss_mib: f64,
    /// Freshet: the largest peak RSS of a worker process.
    #[serde(default)]
    pub worker_peak_rss_mib: f64,
    pub files_rewritten: u64,
    pub files_total: u64,
    pub files_added: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// bytes written / (changed rows x the table's average bytes per row).
    pub write_amplification: f64,
    pub rows_after: u64,
    /// Order-independent hash of the table's rows after the run.
    pub fingerprint: String,
    pub notes: String,
}

/// CPU seconds (user + system) and peak RSS (KiB) of this process.
pub fn rusage() -> (f64, u64) {
    // SAFETY: getrusage fills the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    (t(u.ru_utime) + t(u.ru_stime), u.ru_maxrss as u64)
}

/// Resets this process's peak RSS (VmHWM), so what follows is measured on its own (the
/// setup before — generating the batch, opening the table — does not count).
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// This process's peak RSS (KiB) since start or the last [`reset_peak_rss`].
pub fn peak_rss_kib() -> u64 {
    crate::procs::vm_hwm_kib("self").unwrap_or_else(|| rusage().1)
}

/// Path -> size of the table's current files.
async fn file_sizes(def: &TableDef) -> Result<HashMap<String, u64>> {
    let table = freshet_common::delta::open(def, &Default::default()).await?;
    Ok(freshet_common::delta::files(def, &table)?
        .into_iter()
        .map(|f| (f.path, f.size))
        .collect())
}

/// Canonical rows hashed one by one and summed: equal tables give equal fingerprints
/// whatever their file layout and row order.
pub async fn fingerprint(def: &TableDef) -> Result<(u64, String)> {
    let table = freshet_common::delta::open(def, &Default::default()).await?;
    let ctx = SessionContext::new();
    table.update_datafusion_session(&ctx.state())?;
    ctx.register_table("t", table.table_provider().await?)?;
    let canon = data::canonical_schema(def);
    let cols: Vec<String> = canon
        .fields()
        .iter()
        .map(|f| format!("\"{}\"", f.name()))
        .collect();
    let df = ctx
        .sql(&format!("select {} from t", cols.join(", ")))
        .await?;
    let mut stream = df.execute_stream().await?;
    let conv = RowConverter::new(
        canon
            .fields()
            .iter()
            .map(|f| SortField::new(f.data_type().clone()))
            .collect(),
    )?;
    let (mut n, mut sum, mut xor) = (0u64, 0u64, 0u64);
    use futures::StreamExt;
    while let Some(b) = stream.next().await {
        let b = b?;
        let arrays = canon
            .fields()
            .iter()
            .zip(b.columns())
            .map(|(f, c)| arrow::compute::cast(c, f.data_type()))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let rows = conv.convert_columns(&arrays)?;
        for r in rows.iter() {
            let mut h = std::hash::DefaultHasher::new();
            r.as_ref().hash(&mut h);
            let v = h.finish();
            sum = sum.wrapping_add(v);
            xor ^= v.rotate_left(17);
            n += 1;
        }
    }
    Ok((n, format!("{n}:{sum:016x}{xor:016x}")))
}

/// Starts an embedded coordinator with `workers` in-process workers (loopback gRPC).
pub async fn start_cluster(
    uri: &str,
    shape: &Shape,
    workers: usize,
    interval_ms: u64,
    merge_mode: freshet_common::table::MergeMode,
    vacuum_retention: Option<std::time::Duration>,
) -> Result<(Arc<Coordinator>, WorkerProcs)> {
    let mut config = Config::default();
    if let Some(r) = vacuum_retention {
        // Maintenance every 10 s, deleting what left the table `r` ago.
        config.maintenance.interval_ms = 10_000;
        config.maintenance.deleted_file_retention = freshet_common::config::HumanDuration(r);
    }
    let mut table = data::table_config(uri, shape);
    table.merge_mode = Some(merge_mode);
    config.tables = vec![table];
    config.cycle.interval_ms = interval_ms;
    config.cycle.trigger_changes = u64::MAX;
    config.catalog.uri = Some(format!("{uri}/_freshet_catalog"));
    config.ingest.max_batch_rows = 10_000_000;
    config.ingest.max_batch_bytes = 1 << 30;
    let procs = WorkerProcs::spawn(workers)?;
    let cluster = freshet_embedded::Builder::new(config)
        .external_workers(procs.endpoints())
        .start()
        .await?;
    Ok((cluster.coordinator.clone(), procs))
}

pub fn ingest_request(batch: &RecordBatch) -> Result<IngestRequest> {
    Ok(IngestRequest {
        table: TABLE.into(),
        payload: Some(Payload::ArrowIpc(freshet_common::ipc::encode(
            &batch.schema(),
            std::slice::from_ref(batch),
        )?)),
        op_column: "op".into(),
        ..Default::default()
    })
}

async fn run_freshet(
    uri: &str,
    shape: &Shape,
    ch: &Changes,
    workers: usize,
    merge_mode: freshet_common::table::MergeMode,
    r: &mut RunResult,
) -> Result<()> {
    let (coordinator, procs) =
        start_cluster(uri, shape, workers, 3_600_000, merge_mode, None).await?;
    let req = ingest_request(&ch.with_op()?)?;
    let (cpu0, _) = rusage();
    let wcpu0 = procs.cpu_s();
    let t0 = Instant::now();
    coordinator.ingest(req).await?;
    let t1 = Instant::now();
    let rec = coordinator.trigger(TABLE).await?;
    let t2 = Instant::now();
    let (cpu1, _) = rusage();
    let wcpu1 = procs.cpu_s();
    r.worker_peak_rss_mib = procs.peak_rss_kib() as f64 / 1024.0;
    if rec.state() != freshet_proto::admin::v1::CycleState::Committed {
        bail!("cycle {}: {} {}", rec.id, rec.state, rec.error);
    }
    r.wall_ms = (t2 - t0).as_secs_f64() * 1e3;
    r.ingest_ms = (t1 - t0).as_secs_f64() * 1e3;
    r.cycle_ms = (t2 - t1).as_secs_f64() * 1e3;
    r.cpu_s = (cpu1 - cpu0) + (wcpu1 - wcpu0);
    r.files_rewritten = rec.files_rewritten;
    r.files_total = rec.files_total;
    r.files_added = rec.files_added;
    r.bytes_read = rec.bytes_read;
    r.bytes_written = rec.bytes_written;
    let phases: Vec<String> = rec
        .phases
        .iter()
        .map(|p| format!("{} {:.0} ms", p.name, p.duration_us as f64 / 1e3))
        .collect();
    r.notes.push_str(&format!(
        "cycle {} ms: {}",
        rec.duration_ms,
        phases.join(", ")
    ));
    coordinator.shutdown();
    drop(procs);
    Ok(())
}

fn merge_source(
    ctx: &SessionContext,
    ch: &Changes,
) -> Result<deltalake::datafusion::prelude::DataFrame> {
    Ok(ctx.read_batch(ch.with_deleted()?)?)
}

async fn run_merge(def: &TableDef, ch: &Changes, r: &mut RunResult) -> Result<()> {
    let table: DeltaTable = freshet_common::delta::open(def, &Default::default()).await?;
    let ctx = SessionContext::new();
    let source = merge_source(&ctx, ch)?;
    let (cpu0, _) = rusage();
    let t0 = Instant::now();
    let predicate = if def.partition_by.is_empty() {
        "target.id = source.id".to_string()
    } else {
        "target.region = source.region AND target.id = source.id".to_string()
    };
    let names: Vec<String> = def
        .schema
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let (_, metrics) = table
        .merge(source, predicate)
        .with_source_alias("source")
        .with_target_alias("target")
        .when_matched_delete(|d| {
            d.predicate(col("source.deleted").eq(deltalake::datafusion::prelude::lit(true)))
        })?
        .when_matched_update(|mut u| {
            u = u.predicate(col("source.deleted").eq(deltalake::datafusion::prelude::lit(false)));
            for n in &names {
                u = u.update(n.as_str(), col(format!("source.{n}")));
            }
            u
        })?
        .when_not_matched_insert(|mut i| {
            i = i.predicate(col("source.deleted").eq(deltalake::datafusion::prelude::lit(false)));
            for n in &names {
                i = i.set(n.as_str(), col(format!("source.{n}")));
            }
            i
        })?
        .await?;
    let t1 = Instant::now();
    let (cpu1, _) = rusage();
    r.wall_ms = (t1 - t0).as_secs_f64() * 1e3;
    r.cycle_ms = r.wall_ms;
    r.cpu_s = cpu1 - cpu0;
    r.notes.push_str(&format!(
        "scanned {} files, skipped {}; inserted {} updated {} deleted {} copied {} rows",
        metrics.num_target_files_scanned,
        metrics.num_target_files_skipped_during_scan,
        metrics.num_target_rows_inserted,
        metrics.num_target_rows_updated,
        metrics.num_target_rows_deleted,
        metrics.num_target_rows_copied
    ));
    Ok(())
}

async fn run_full(def: &TableDef, ch: &Changes, r: &mut RunResult) -> Result<()> {
    let table: DeltaTable = freshet_common::delta::open(def, &Default::default()).await?;
    let ctx = SessionContext::new();
    let (cpu0, _) = rusage();
    let t0 = Instant::now();
    table.update_datafusion_session(&ctx.state())?;
    ctx.register_table("t", table.table_provider().await?)?;
    ctx.register_batch("c", ch.with_deleted()?)?;
    let cols: Vec<String> = def
        .schema
        .fields()
        .iter()
        .map(|f| format!("\"{}\"", f.name()))
        .collect();
    let tcols: Vec<String> = cols.iter().map(|c| format!("t.{c}")).collect();
    let key = if def.partition_by.is_empty() {
        "t.id = c.id"
    } else {
        "t.region = c.region AND t.id = c.id"
    };
    let sql = format!(
        "select {} from t left anti join c on {key} union all select {} from c where not c.deleted",
        tcols.join(", "),
        cols.join(", ")
    );
    let df = ctx.sql(&sql).await?;
    // Read all and apply (in memory), then write all.
    let batches: Vec<RecordBatch> = df.collect().await?;
    let mut w = table
        .write(batches)
        .with_save_mode(SaveMode::Overwrite)
        .with_target_file_size(std::num::NonZeroU64::new(def.target_file_size));
    if !def.partition_by.is_empty() {
        w = w.with_partition_columns(def.partition_by.clone());
    }
    w.await?;
    let t1 = Instant::now();
    let (cpu1, _) = rusage();
    r.wall_ms = (t1 - t0).as_secs_f64() * 1e3;
    r.cycle_ms = r.wall_ms;
    r.cpu_s = cpu1 - cpu0;
    Ok(())
}

/// Runs one engine on the table at `dir` (consumed: it is changed) and measures it.
pub async fn run_one(
    dir: &Path,
    shape: &Shape,
    engine: Engine,
    changes: usize,
    dist: Dist,
    workers: usize,
) -> Result<RunResult> {
    let uri = dir.display().to_string();
    let def = data::table_def(&uri, shape)?;
    let ch = data::changes(&def.schema, shape.rows, shape.rows as i64, changes, dist, 0)?;
    let before = file_sizes(&def).await?;
    let total_bytes: u64 = before.values().sum();
    let mut r = RunResult {
        engine: engine.name().to_string(),
        workers: if matches!(engine, Engine::Freshet | Engine::FreshetDv) {
            workers
        } else {
            0
        },
        rows: shape.rows,
        partitioned: shape.partitioned,
        changes,
        dist: format!("{dist:?}").to_lowercase(),
        ..Default::default()
    };
    if !reset_peak_rss() {
        r.notes.push_str("(peak RSS includes the setup) ");
    }
    match engine {
        Engine::Freshet => {
            let mode = freshet_common::table::MergeMode::CopyOnWrite;
            run_freshet(&uri, shape, &ch, workers, mode, &mut r).await?
        }
        Engine::FreshetDv => {
            let mode = freshet_common::table::MergeMode::DeletionVectors;
            run_freshet(&uri, shape, &ch, workers, mode, &mut r).await?
        }
        Engine::Merge => run_merge(&def, &ch, &mut r).await?,
        Engine::Full => run_full(&def, &ch, &mut r).await?,
    }
    r.peak_rss_mib = peak_rss_kib() as f64 / 1024.0;
    let after = file_sizes(&def).await?;
    if !matches!(engine, Engine::Freshet | Engine::FreshetDv) {
        let removed: Vec<&String> = before.keys().filter(|p| !after.contains_key(*p)).collect();
        let added: Vec<&String> = after.keys().filter(|p| !before.contains_key(*p)).collect();
        r.files_total = before.len() as u64;
        r.files_rewritten = removed.len() as u64;
        r.files_added = added.len() as u64;
        // What must at least be read: the rewritten files (MERGE also scans the files
        // that survive pruning; see notes).
        r.bytes_read = removed.iter().map(|p| before[*p]).sum();
        r.bytes_written = added.iter().map(|p| after[*p]).sum();
    }
    let per_row = total_bytes as f64 / shape.rows.max(1) as f64;
    r.write_amplification = r.bytes_written as f64 / (changes as f64 * per_row).max(1.0);
    let (n, fp) = fingerprint(&def).await?;
    r.rows_after = n;
    r.fingerprint = fp;
    let expected = shape.rows + ch.inserts as u64 - ch.deletes as u64;
    if n != expected {
        r.notes
            .push_str(&format!(" | ROW COUNT {n} != expected {expected}"));
    }
    Ok(r)
}

/// Spawns `run-one` in a child process of this binary and reads its JSON result.
pub fn spawn_one(
    dir: &Path,
    shape: &Shape,
    engine: Engine,
    changes: usize,
    dist: Dist,
    workers: usize,
) -> Result<RunResult> {
    let exe = std::env::current_exe()?;
    let out = std::process::Command::new(exe)
        .arg("run-one")
        .arg("--dir")
        .arg(dir)
        .arg("--rows")
        .arg(shape.rows.to_string())
        .arg(if shape.partitioned {
            "--partitioned=true"
        } else {
            "--partitioned=false"
        })
        .arg("--target-file-size")
        .arg(shape.target_file_size.to_string())
        .arg("--engine")
        .arg(engine.name())
        .arg("--changes")
        .arg(changes.to_string())
        .arg("--dist")
        .arg(format!("{dist:?}").to_lowercase())
        .arg("--workers")
        .arg(workers.to_string())
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("spawning run-one")?;
    if !out.status.success() {
        bail!("run-one {engine:?} failed ({})", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .context("run-one printed no result")?;
    Ok(serde_json::from_str(line)?)
}
