//! What deletion vectors cost readers: a full scan of a table after rounds of uniform
//! deletion-vector cycles, against the same table once compaction folded it, in one run.

use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::data::{self, Dist, Shape, TABLE};
use crate::engines;

/// The measurement.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScanCost {
    pub rows: u64,
    pub rounds: usize,
    pub changes_per_round: usize,
    /// Files, and rows deleted by DVs, before compaction.
    pub files_with_dvs: u64,
    pub deleted_rows: u64,
    /// Files after compaction.
    pub files_compacted: u64,
    /// Median full-scan seconds (every column of every live row, hashed).
    pub scan_with_dvs_s: f64,
    pub scan_compacted_s: f64,
    /// scan_with_dvs_s / scan_compacted_s.
    pub ratio: f64,
    /// Both scans saw the same rows.
    pub same_contents: bool,
}

async fn timed_scan(def: &freshet_common::table::TableDef, repeat: usize) -> Result<(f64, String)> {
    let mut times = Vec::new();
    let mut fp = String::new();
    for _ in 0..repeat {
        let t = Instant::now();
        fp = engines::fingerprint(def).await?.1;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Ok((times[times.len() / 2], fp))
}

/// Runs `rounds` cycles of `changes` uniform changes with deletion vectors, scans, compacts
/// until nothing is due, scans again.
pub async fn run(
    root: &Path,
    shape: &Shape,
    rounds: usize,
    changes: usize,
    workers: usize,
) -> Result<ScanCost> {
    let base = data::ensure_base(root, shape, true).await?;
    let dir = root.join("runs").join(format!("{}-scan", shape.name()));
    data::copy_table(&base, &dir)?;
    let uri = dir.display().to_string();
    let def = data::table_def(&uri, shape)?;
    let (coordinator, _procs) = engines::start_cluster(
        &uri,
        shape,
        workers,
        3_600_000,
        freshet_common::table::MergeMode::DeletionVectors,
        None,
    )
    .await?;
    let mut next = shape.rows as i64;
    let bar = data::progress_bar(true, rounds as u64, "deletion-vector cycles");
    for i in 0..rounds {
        let ch = data::changes(
            &def.schema,
            shape.rows,
            next,
            changes,
            Dist::Uniform,
            7_000 + i as u64,
        )?;
        next += ch.inserts as i64;
        coordinator
            .ingest(engines::ingest_request(&ch.with_op()?)?)
            .await?;
        let r = coordinator.trigger(TABLE).await?;
        anyhow::ensure!(r.state == "committed", "cycle {}: {}", r.id, r.error);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let info = |c: &std::sync::Arc<freshet_coordinator::Coordinator>| {
        let c = c.clone();
        async move {
            let t = c.table(TABLE)?;
            c.table_info(&t).await
        }
    };
    let before = info(&coordinator).await?;
    let (scan_dv, fp_dv) = timed_scan(&def, 3).await?;
    for _ in 0..64 {
        match coordinator.compact(TABLE).await? {
            Some(r) if r.state == "committed" => continue,
            Some(r) => anyhow::bail!("compaction failed: {}", r.error),
            None => break,
        }
    }
    let after = info(&coordinator).await?;
    let (scan_compacted, fp_compacted) = timed_scan(&def, 3).await?;
    std::fs::remove_dir_all(&dir).ok();
    Ok(ScanCost {
        rows: shape.rows,
        rounds,
        changes_per_round: changes,
        files_with_dvs: before.num_files,
        deleted_rows: before.deleted_rows,
        files_compacted: after.num_files,
        scan_with_dvs_s: scan_dv,
        scan_compacted_s: scan_compacted,
        ratio: scan_dv / scan_compacted.max(1e-9),
        same_contents: fp_dv == fp_compacted,
    })
}

/// The result as a markdown table.
pub fn markdown(r: &ScanCost) -> String {
    format!(
        "| rows | DV rounds × changes | files (DVs) | rows deleted by DVs | files compacted | scan with DVs s | scan compacted s | ratio | same contents |\n|---|---|---|---|---|---|---|---|---|\n| {} | {} × {} | {} | {} | {} | {:.2} | {:.2} | {:.2}x | {} |\n",
        r.rows,
        r.rounds,
        r.changes_per_round,
        r.files_with_dvs,
        r.deleted_rows,
        r.files_compacted,
        r.scan_with_dvs_s,
        r.scan_compacted_s,
        r.ratio,
        if r.same_contents { "yes" } else { "NO" }
    )
}
