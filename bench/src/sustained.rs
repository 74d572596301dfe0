//! Sustained load: ingest at a fixed rate into a fresh copy of the table while cycles run
//! on their interval; measure freshness (ack -> the commit that makes the batch visible)
//! and cycle times; and read-your-writes: for every 5th batch, the time from its ack to a
//! `freshness = latest` query that returns a row it inserted (before any cycle commits it).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::data::{self, Dist, Shape, TABLE};
use crate::engines;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CyclePoint {
    /// Seconds since the start, at the commit.
    pub at_s: f64,
    pub duration_ms: f64,
    pub keys: u64,
    pub files_rewritten: u64,
    pub files_total: u64,
    pub bytes_written: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sustained {
    pub rows: u64,
    pub partitioned: bool,
    pub rate: u64,
    pub seconds: u64,
    pub workers: usize,
    pub interval_ms: u64,
    pub dist: String,
    pub batches: usize,
    pub changes_acked: u64,
    /// (seconds since start at ack, freshness ms) per batch.
    pub freshness: Vec<(f64, f64)>,
    pub cycles: Vec<CyclePoint>,
    pub freshness_p50_ms: f64,
    pub freshness_p90_ms: f64,
    pub freshness_p99_ms: f64,
    pub freshness_max_ms: f64,
    pub cycle_p50_ms: f64,
    pub cycle_p90_ms: f64,
    pub cycle_max_ms: f64,
    /// From the end of ingest to the last batch being visible.
    pub drain_ms: f64,
    pub unapplied_at_end: usize,
    pub keeps_up: bool,
    pub peak_rss_mib: f64,
    /// The largest peak RSS of a worker process.
    #[serde(default)]
    pub worker_peak_rss_mib: f64,
    /// Read-your-writes probes: ack -> a `latest` query returning the batch's first insert.
    #[serde(default)]
    pub read_your_writes_samples: usize,
    #[serde(default)]
    pub read_your_writes_p50_ms: f64,
    #[serde(default)]
    pub read_your_writes_p99_ms: f64,
    /// Probes that did not see their row (must be 0).
    #[serde(default)]
    pub read_your_writes_missed: usize,
    pub machine: serde_json::Value,
    /// The table's merge mode.
    #[serde(default)]
    pub merge_mode: String,
    /// Active files at the start and at the end.
    #[serde(default)]
    pub files_at_start: u64,
    #[serde(default)]
    pub files_at_end: u64,
    /// Bytes of the active files at the end, and of every data and DV file in the table's
    /// directory (what storage holds: active plus not yet vacuumed).
    #[serde(default)]
    pub live_bytes_at_end: u64,
    #[serde(default)]
    pub storage_bytes_at_end: u64,
    /// The vacuum retention of the run (0: none, nothing is deleted).
    #[serde(default)]
    pub vacuum_retention_s: u64,
}

/// Ack -> a `latest` read that returns the row `id` (ms), or None when it never does.
async fn probe(c: &freshet_coordinator::Coordinator, id: i64, acked: Instant) -> Option<f64> {
    use freshet_coordinator::fresh_read::Freshness;
    for _ in 0..50 {
        let ctx = c.query_session(Freshness::Latest).await.ok()?;
        let n = ctx
            .sql(&format!("SELECT count(*) FROM {TABLE} WHERE id = {id}"))
            .await
            .ok()?
            .collect()
            .await
            .ok()?;
        let seen = n.first().is_some_and(|b| {
            arrow::array::AsArray::as_primitive::<arrow::datatypes::Int64Type>(b.column(0)).value(0)
                == 1
        });
        if seen {
            return Some(acked.elapsed().as_secs_f64() * 1e3);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Bytes of the data and deletion-vector files under `dir` (the Delta log and Freshet's
/// staging area left out).
fn data_bytes(dir: &Path) -> u64 {
    fn walk(p: &Path, top: bool) -> u64 {
        let Ok(rd) = std::fs::read_dir(p) else {
            return 0;
        };
        let mut n = 0;
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if top && (name == "_delta_log" || name.starts_with("_freshet")) {
                continue;
            }
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                n += walk(&e.path(), false);
            } else {
                n += m.len();
            }
        }
        n
    }
    walk(dir, true)
}

pub async fn run(
    root: &Path,
    shape: &Shape,
    rate: u64,
    seconds: u64,
    workers: usize,
    interval_ms: u64,
    dist: Dist,
    merge_mode: freshet_common::table::MergeMode,
    vacuum_retention: Option<Duration>,
) -> Result<Sustained> {
    let base = data::ensure_base(root, shape, true).await?;
    let dir = root
        .join("runs")
        .join(format!("{}-sustained", shape.name()));
    data::copy_table(&base, &dir)?;
    let uri = dir.display().to_string();
    let def = data::table_def(&uri, shape)?;
    let (coordinator, procs) = engines::start_cluster(
        &uri,
        shape,
        workers,
        interval_ms,
        merge_mode,
        vacuum_retention,
    )
    .await?;
    let info = |c: std::sync::Arc<freshet_coordinator::Coordinator>| async move {
        let t = c.table(data::TABLE)?;
        c.table_info(&t).await
    };
    let files_at_start = info(coordinator.clone()).await?.num_files;
    let mut cycles_rx = coordinator.subscribe();
    let start = Instant::now();

    // Ingest: a batch every 100 ms, each on its own task so that a slow ack does not slow
    // the offered rate.
    let ticks_per_s = 10u64;
    let per_batch = (rate / ticks_per_s).max(1) as usize;
    let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<(u64, Instant, usize)>();
    let (ryw_tx, mut ryw_rx) = mpsc::unbounded_channel::<Option<f64>>();
    let schema = def.schema.clone();
    let c2 = coordinator.clone();
    let rows0 = shape.rows as i64;
    let ingest = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(1000 / ticks_per_s));
        let total = seconds * ticks_per_s;
        let mut handles = Vec::new();
        let mut next = rows0;
        for i in 0..total {
            tick.tick().await;
            let ch = match data::changes(&schema, next as u64, next, per_batch, dist, i + 1) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("generating changes: {e}");
                    break;
                }
            };
            let first_insert = (ch.inserts > 0).then_some(next);
            next += ch.inserts as i64;
            let req = engines::ingest_request(&ch.with_op().expect("op")).expect("request");
            let c = c2.clone();
            let tx = ack_tx.clone();
            let ryw = (i % 5 == 0).then(|| ryw_tx.clone()).zip(first_insert);
            handles.push(tokio::spawn(async move {
                match c.ingest(req).await {
                    Ok(resp) => {
                        let at = Instant::now();
                        let _ = tx.send((resp.sequence, at, per_batch));
                        if let Some((ryw, id)) = ryw {
                            let _ = ryw.send(probe(&c, id, at).await);
                        }
                    }
                    Err(e) => eprintln!("ingest: {e}"),
                }
            }));
        }
        for h in handles {
            let _ = h.await;
        }
    });

    let bar = data::progress_bar(true, seconds, &format!("sustained {rate}/s"));
    let mut acked: Vec<(u64, Instant, usize)> = Vec::new();
    let mut visible: Vec<Option<f64>> = Vec::new();
    let mut cycles = Vec::new();
    let mut ingest_done_at: Option<Instant> = None;
    let mut last_visible_at = start;
    let mut ingest = Some(ingest);
    loop {
        tokio::select! {
            Some(a) = ack_rx.recv() => {
                acked.push(a);
                visible.push(None);
            }
            rec = cycles_rx.recv() => {
                let Ok(rec) = rec else { continue };
                let now = Instant::now();
                if rec.table != TABLE || rec.state() != freshet_proto::admin::v1::CycleState::Committed { continue }
                cycles.push(CyclePoint {
                    at_s: (now - start).as_secs_f64(),
                    duration_ms: rec.duration_ms as f64,
                    keys: rec.keys,
                    files_rewritten: rec.files_rewritten,
                    files_total: rec.files_total,
                    bytes_written: rec.bytes_written,
                });
                for (i, a) in acked.iter().enumerate() {
                    if visible[i].is_none() && a.0 <= rec.last_sequence {
                        visible[i] = Some((now - a.1).as_secs_f64() * 1e3);
                        last_visible_at = now;
                    }
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        bar.set_position(start.elapsed().as_secs().min(seconds));
        if let Some(h) = &ingest
            && h.is_finished()
        {
            ingest = None;
            ingest_done_at = Some(Instant::now());
        }
        if let Some(done) = ingest_done_at {
            // Drain acks that raced the end, then wait for everything to be visible.
            while let Ok(a) = ack_rx.try_recv() {
                acked.push(a);
                visible.push(None);
            }
            let all = visible.iter().all(|v| v.is_some());
            if all || done.elapsed() > Duration::from_secs(120) {
                break;
            }
        }
    }
    bar.finish_and_clear();
    let mut ryw = Vec::new();
    let mut ryw_missed = 0;
    while let Ok(p) = ryw_rx.try_recv() {
        match p {
            Some(ms) => ryw.push(ms),
            None => ryw_missed += 1,
        }
    }
    ryw.sort_by(f64::total_cmp);
    let drain_ms = ingest_done_at
        .map(|d| last_visible_at.saturating_duration_since(d).as_secs_f64() * 1e3)
        .unwrap_or(0.0);
    let end_info = info(coordinator.clone()).await?;
    let storage_bytes = data_bytes(&dir);
    coordinator.shutdown();
    let worker_rss = procs.peak_rss_kib();
    drop(procs);
    let (_, rss) = engines::rusage();

    let freshness: Vec<(f64, f64)> = acked
        .iter()
        .zip(&visible)
        .filter_map(|(a, v)| v.map(|v| ((a.1 - start).as_secs_f64(), v)))
        .collect();
    let mut f: Vec<f64> = freshness.iter().map(|p| p.1).collect();
    f.sort_by(f64::total_cmp);
    let mut c: Vec<f64> = cycles.iter().map(|c| c.duration_ms).collect();
    c.sort_by(f64::total_cmp);
    let third = seconds as f64 / 3.0;
    let p90_of = |lo: f64, hi: f64| {
        let mut v: Vec<f64> = freshness
            .iter()
            .filter(|p| p.0 >= lo && p.0 < hi)
            .map(|p| p.1)
            .collect();
        v.sort_by(f64::total_cmp);
        pct(&v, 0.9)
    };
    let unapplied = visible.iter().filter(|v| v.is_none()).count();
    let early = p90_of(0.0, third);
    let late = p90_of(2.0 * third, seconds as f64 + 1.0);
    let keeps_up = unapplied == 0 && late <= 1.5 * early + interval_ms as f64;
    std::fs::remove_dir_all(&dir).ok();
    Ok(Sustained {
        merge_mode: merge_mode.as_str().to_string(),
        files_at_start,
        files_at_end: end_info.num_files,
        live_bytes_at_end: end_info.total_bytes,
        storage_bytes_at_end: storage_bytes,
        vacuum_retention_s: vacuum_retention.map(|d| d.as_secs()).unwrap_or(0),
        rows: shape.rows,
        partitioned: shape.partitioned,
        rate,
        seconds,
        workers,
        interval_ms,
        dist: format!("{dist:?}").to_lowercase(),
        batches: acked.len(),
        changes_acked: acked.iter().map(|a| a.2 as u64).sum(),
        freshness,
        cycles,
        freshness_p50_ms: pct(&f, 0.5),
        freshness_p90_ms: pct(&f, 0.9),
        freshness_p99_ms: pct(&f, 0.99),
        freshness_max_ms: f.last().copied().unwrap_or(0.0),
        cycle_p50_ms: pct(&c, 0.5),
        cycle_p90_ms: pct(&c, 0.9),
        cycle_max_ms: c.last().copied().unwrap_or(0.0),
        drain_ms,
        unapplied_at_end: unapplied,
        keeps_up,
        peak_rss_mib: rss as f64 / 1024.0,
        worker_peak_rss_mib: worker_rss as f64 / 1024.0,
        read_your_writes_samples: ryw.len(),
        read_your_writes_p50_ms: pct(&ryw, 0.5),
        read_your_writes_p99_ms: pct(&ryw, 0.99),
        read_your_writes_missed: ryw_missed,
        machine: crate::report::machine(),
    })
}
