//! `freshet-bench`: Freshet cycles against delta-rs MERGE and a full rewrite, on the same
//! deterministic data, each contender in its own process on its own copy of the table.

mod data;
mod engines;
mod procs;
mod report;
mod scan;
mod sustained;

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};

use data::{Dist, Shape};
use engines::{Engine, RunResult};

#[derive(Parser)]
#[command(
    name = "freshet-bench",
    about = "Freshet vs delta-rs MERGE vs a full rewrite"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
struct TableArgs {
    /// Rows in the base table.
    #[arg(long, default_value_t = 1_000_000)]
    rows: u64,
    /// Partition by region (8 values); `--partitioned=false` for the unpartitioned variant.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    partitioned: bool,
    /// Target file size in bytes.
    #[arg(long, default_value_t = 32 * 1024 * 1024)]
    target_file_size: u64,
    /// Where base tables and run copies live.
    #[arg(long, default_value = "/work/bench-data")]
    data: PathBuf,
}

impl TableArgs {
    fn shape(&self) -> Shape {
        Shape {
            rows: self.rows,
            partitioned: self.partitioned,
            target_file_size: self.target_file_size,
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate the base table (reused by later runs).
    Gen {
        #[command(flatten)]
        table: TableArgs,
    },
    /// Run every contender on fresh copies of the table, interleaved, and report.
    Compare {
        #[command(flatten)]
        table: TableArgs,
        /// Change batch sizes.
        #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
        changes: Vec<usize>,
        /// Key distributions.
        #[arg(long, value_delimiter = ',', default_value = "recent,uniform")]
        dist: Vec<Dist>,
        /// Worker counts for the Freshet runs (each is a run).
        #[arg(long, value_delimiter = ',', default_value = "2")]
        workers: Vec<usize>,
        /// Skip the full rewrite.
        #[arg(long)]
        no_full: bool,
        /// Results directory (JSON + markdown).
        #[arg(long, default_value = "results")]
        out: PathBuf,
    },
    /// Run one contender in this process and print its result as JSON (used by compare).
    RunOne {
        #[arg(long)]
        dir: PathBuf,
        #[command(flatten)]
        table: TableArgs,
        #[arg(long)]
        engine: Engine,
        #[arg(long)]
        changes: usize,
        #[arg(long)]
        dist: Dist,
        #[arg(long, default_value_t = 2)]
        workers: usize,
    },
    /// Ingest at a fixed rate and measure freshness and cycle times.
    Sustained {
        #[command(flatten)]
        table: TableArgs,
        /// Changes per second.
        #[arg(long, value_delimiter = ',', default_value = "5000")]
        rate: Vec<u64>,
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Cycle interval in milliseconds.
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
        /// Key distribution of the changes.
        #[arg(long, default_value = "uniform")]
        dist: Dist,
        /// The table's merge mode: copy_on_write, deletion_vectors or auto.
        #[arg(long, default_value = "copy_on_write")]
        merge_mode: String,
        /// Vacuum what left the table this many seconds ago (maintenance every 10 s); 0 keeps
        /// everything.
        #[arg(long, default_value_t = 0)]
        vacuum_retention_s: u64,
        #[arg(long, default_value = "results")]
        out: PathBuf,
    },
    /// What deletion vectors cost readers: a full scan after rounds of uniform DV cycles
    /// against the same table compacted.
    ScanCost {
        #[command(flatten)]
        table: TableArgs,
        /// Deletion-vector cycles before the first scan.
        #[arg(long, default_value_t = 10)]
        rounds: usize,
        /// Uniform changes per cycle.
        #[arg(long, default_value_t = 10_000)]
        changes: usize,
        #[arg(long, default_value_t = 2)]
        workers: usize,
        #[arg(long, default_value = "results")]
        out: PathBuf,
    },
    /// Serve one worker until killed, after printing `listening <endpoint>` (used by runs).
    #[command(hide = true)]
    ServeWorker {
        #[arg(long)]
        id: String,
    },
    /// A tiny end-to-end run (seconds, debug build): the three contenders must agree.
    Smoke {
        /// Where the tiny tables go (default: <temp dir>/freshet-bench-smoke).
        #[arg(long)]
        data: Option<PathBuf>,
    },
}

fn compare(
    table: &TableArgs,
    changes: &[usize],
    dists: &[Dist],
    workers: &[usize],
    full: bool,
    progress: bool,
) -> Result<(Vec<RunResult>, Vec<String>)> {
    let shape = table.shape();
    let rt = tokio::runtime::Runtime::new()?;
    let base = rt.block_on(data::ensure_base(&table.data, &shape, progress))?;
    drop(rt);
    let mut engines: Vec<(Engine, usize)> = workers
        .iter()
        .flat_map(|w| [(Engine::Freshet, *w), (Engine::FreshetDv, *w)])
        .collect();
    engines.push((Engine::Merge, 0));
    if full {
        engines.push((Engine::Full, 0));
    }
    let total = (changes.len() * dists.len() * engines.len()) as u64;
    let bar = data::progress_bar(progress, total, "running");
    let mut results = Vec::new();
    let mut mismatches = Vec::new();
    for &n in changes {
        for &dist in dists {
            let mut fps = Vec::new();
            for &(engine, w) in &engines {
                bar.set_message(format!("{engine:?} {n} {dist:?} w{w}"));
                let dir = table
                    .data
                    .join("runs")
                    .join(format!("{}-{engine:?}", shape.name()));
                data::copy_table(&base, &dir)?;
                let r = engines::spawn_one(&dir, &shape, engine, n, dist, w)?;
                std::fs::remove_dir_all(&dir).ok();
                fps.push((format!("{engine:?}/w{w}"), r.fingerprint.clone()));
                results.push(r);
                bar.inc(1);
            }
            if fps.iter().any(|f| f.1 != fps[0].1) {
                mismatches.push(format!("{n} {dist:?}: {fps:?}"));
            }
        }
    }
    bar.finish_and_clear();
    Ok((results, mismatches))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::ServeWorker { id } => {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(procs::serve_worker(id))?;
        }
        Cmd::Gen { table } => {
            let rt = tokio::runtime::Runtime::new()?;
            let dir = rt.block_on(data::ensure_base(&table.data, &table.shape(), true))?;
            println!("{}", dir.display());
        }
        Cmd::RunOne {
            dir,
            table,
            engine,
            changes,
            dist,
            workers,
        } => {
            let rt = tokio::runtime::Runtime::new()?;
            let r = rt.block_on(engines::run_one(
                &dir,
                &table.shape(),
                engine,
                changes,
                dist,
                workers,
            ))?;
            println!("{}", serde_json::to_string(&r)?);
        }
        Cmd::Compare {
            table,
            changes,
            dist,
            workers,
            no_full,
            out,
        } => {
            let (results, mismatches) = compare(&table, &changes, &dist, &workers, !no_full, true)?;
            std::fs::create_dir_all(&out)?;
            let stem = format!("compare-{}", table.shape().name());
            std::fs::write(
                out.join(format!("{stem}.json")),
                serde_json::to_string_pretty(&serde_json::json!({
                    "machine": report::machine(),
                    "results": results,
                    "mismatches": mismatches,
                }))?,
            )?;
            let md = report::compare_markdown(&results);
            std::fs::write(out.join(format!("{stem}.md")), &md)?;
            println!("{md}");
            if !mismatches.is_empty() {
                bail!("contents differ: {mismatches:?}");
            }
        }
        Cmd::Sustained {
            table,
            rate,
            seconds,
            workers,
            interval_ms,
            dist,
            merge_mode,
            vacuum_retention_s,
            out,
        } => {
            let merge_mode = freshet_common::table::MergeMode::parse(&merge_mode, "bench")?;
            let rt = tokio::runtime::Runtime::new()?;
            std::fs::create_dir_all(&out)?;
            for r in rate {
                let res = rt.block_on(sustained::run(
                    &table.data,
                    &table.shape(),
                    r,
                    seconds,
                    workers,
                    interval_ms,
                    dist,
                    merge_mode,
                    (vacuum_retention_s > 0)
                        .then(|| std::time::Duration::from_secs(vacuum_retention_s)),
                ))?;
                let stem = format!(
                    "sustained-{}-{r}-{}-{}",
                    table.shape().name(),
                    format!("{dist:?}").to_lowercase(),
                    merge_mode.as_str()
                );
                std::fs::write(
                    out.join(format!("{stem}.json")),
                    serde_json::to_string_pretty(&res)?,
                )?;
                std::fs::write(out.join(format!("{stem}.svg")), report::sustained_svg(&res))?;
                let md = report::sustained_markdown(&res);
                std::fs::write(out.join(format!("{stem}.md")), &md)?;
                println!("{md}");
            }
        }
        Cmd::ScanCost {
            table,
            rounds,
            changes,
            workers,
            out,
        } => {
            let rt = tokio::runtime::Runtime::new()?;
            std::fs::create_dir_all(&out)?;
            let r = rt.block_on(scan::run(
                &table.data,
                &table.shape(),
                rounds,
                changes,
                workers,
            ))?;
            let stem = format!("scan-cost-{}", table.shape().name());
            std::fs::write(
                out.join(format!("{stem}.json")),
                serde_json::to_string_pretty(&r)?,
            )?;
            let md = scan::markdown(&r);
            std::fs::write(out.join(format!("{stem}.md")), &md)?;
            println!("{md}");
        }
        Cmd::Smoke { data } => {
            let data = data.unwrap_or_else(|| std::env::temp_dir().join("freshet-bench-smoke"));
            let table = TableArgs {
                rows: 40_000,
                partitioned: true,
                target_file_size: 256 * 1024,
                data: data.clone(),
            };
            let mut all = Vec::new();
            for partitioned in [true, false] {
                let t = TableArgs {
                    partitioned,
                    ..table.clone()
                };
                let (results, mismatches) = compare(
                    &t,
                    &[500],
                    &[Dist::Recent, Dist::Uniform],
                    &[2],
                    true,
                    false,
                )?;
                if !mismatches.is_empty() {
                    bail!("smoke: contents differ: {mismatches:?}");
                }
                if let Some(r) = results.iter().find(|r| r.notes.contains("ROW COUNT")) {
                    bail!("smoke: {} {}", r.engine, r.notes);
                }
                all.extend(results);
            }
            println!("{}", report::compare_markdown(&all));
            println!("smoke: {} runs, all contenders agree", all.len());
            // A few seconds of sustained load: every acknowledged batch becomes visible.
            let rt = tokio::runtime::Runtime::new()?;
            let s = rt.block_on(sustained::run(
                &data,
                &table.shape(),
                400,
                3,
                2,
                300,
                Dist::Recent,
                // Deletion vectors under sustained load, with read-your-writes probes.
                freshet_common::table::MergeMode::DeletionVectors,
                None,
            ))?;
            println!("{}", report::sustained_markdown(&s));
            if s.read_your_writes_missed > 0 || s.read_your_writes_samples == 0 {
                bail!(
                    "smoke: {} of {} read-your-writes probes did not see their row",
                    s.read_your_writes_missed,
                    s.read_your_writes_missed + s.read_your_writes_samples
                );
            }
            if s.unapplied_at_end > 0 || s.batches == 0 {
                bail!(
                    "smoke: sustained run left {} of {} batches unapplied",
                    s.unapplied_at_end,
                    s.batches
                );
            }
            report::sustained_svg(&s);
            println!("smoke: sustained run applied all {} batches", s.batches);
        }
    }
    Ok(())
}
