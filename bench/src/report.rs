//! Markdown tables, the machine description and the SVG plot.

use std::fmt::Write;

use crate::engines::RunResult;
use crate::sustained::Sustained;

/// nproc, memory and CPU model.
pub fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default();
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0);
    serde_json::json!({
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": cpu,
        "mem_gib": (mem_kib as f64 / 1024.0 / 1024.0 * 10.0).round() / 10.0,
    })
}

fn mb(b: u64) -> String {
    format!("{:.1}", b as f64 / 1e6)
}

/// One row per run, with ratios against the MERGE run of the same batch.
pub fn compare_markdown(results: &[RunResult]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| rows | layout | changes | dist | engine | wall s | vs MERGE | cycle s | CPU s | vs MERGE | files rewritten | MB read | MB written | write amp. | peak RSS MiB (Freshet: coordinator / worker) | same contents |"
    );
    let _ = writeln!(
        s,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for r in results {
        let merge = results.iter().find(|m| {
            m.engine == "merge"
                && m.changes == r.changes
                && m.dist == r.dist
                && m.rows == r.rows
                && m.partitioned == r.partitioned
        });
        let same = merge.map(|m| m.fingerprint == r.fingerprint);
        let engine = if r.engine.starts_with("freshet") {
            format!("{} ({} w)", r.engine, r.workers)
        } else {
            r.engine.clone()
        };
        let ratio = |a: f64, b: Option<f64>| match b {
            Some(b) if a > 0.0 => format!("{:.2}x", b / a),
            _ => "-".into(),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {:.2} | {} | {:.2} | {:.1} | {} | {}/{} | {} | {} | {:.1} | {} | {} |",
            r.rows,
            if r.partitioned { "partitioned" } else { "flat" },
            r.changes,
            r.dist,
            engine,
            r.wall_ms / 1e3,
            ratio(r.wall_ms, merge.map(|m| m.wall_ms)),
            r.cycle_ms / 1e3,
            r.cpu_s,
            ratio(r.cpu_s, merge.map(|m| m.cpu_s)),
            r.files_rewritten,
            r.files_total,
            mb(r.bytes_read),
            mb(r.bytes_written),
            r.write_amplification,
            if r.engine.starts_with("freshet") {
                format!("{:.0} / {:.0}", r.peak_rss_mib, r.worker_peak_rss_mib)
            } else {
                format!("{:.0}", r.peak_rss_mib)
            },
            match same {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "-",
            }
        );
    }
    s
}

pub fn sustained_markdown(r: &Sustained) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| rate/s | seconds | workers | batches | cycles | freshness p50 / p90 / p99 / max ms | cycle p50 / p90 / max ms | drain after stop ms | keeps up | peak RSS MiB: coordinator + load generator / worker | read-your-writes p50 / p99 ms (probes) |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|");
    let _ = writeln!(
        s,
        "| {} | {} | {} | {} | {} | {:.0} / {:.0} / {:.0} / {:.0} | {:.0} / {:.0} / {:.0} | {:.0} | {} | {:.0} / {:.0} | {:.0} / {:.0} ({}) |",
        r.rate,
        r.seconds,
        r.workers,
        r.batches,
        r.cycles.len(),
        r.freshness_p50_ms,
        r.freshness_p90_ms,
        r.freshness_p99_ms,
        r.freshness_max_ms,
        r.cycle_p50_ms,
        r.cycle_p90_ms,
        r.cycle_max_ms,
        r.drain_ms,
        if r.keeps_up { "yes" } else { "no" },
        r.peak_rss_mib,
        r.worker_peak_rss_mib,
        r.read_your_writes_p50_ms,
        r.read_your_writes_p99_ms,
        r.read_your_writes_samples,
    );
    let mb = |b: u64| b as f64 / 1_048_576.0;
    let _ = writeln!(
        s,
        "\n| merge mode | files start → end | live MB at end | storage MB at end (vacuum retention {} s) | storage ÷ live |\n|---|---|---|---|---|\n| {} | {} → {} | {:.0} | {:.0} | {:.2}x |",
        r.vacuum_retention_s,
        r.merge_mode,
        r.files_at_start,
        r.files_at_end,
        mb(r.live_bytes_at_end),
        mb(r.storage_bytes_at_end),
        r.storage_bytes_at_end as f64 / r.live_bytes_at_end.max(1) as f64,
    );
    s
}

/// Cycle duration and freshness over time, as a hand-written SVG line chart.
pub fn sustained_svg(r: &Sustained) -> String {
    let (w, h, ml, mr, mt, mb) = (900.0, 420.0, 70.0, 20.0, 40.0, 50.0);
    let pw = w - ml - mr;
    let ph = h - mt - mb;
    let tmax = r
        .freshness
        .iter()
        .map(|p| p.0)
        .chain(r.cycles.iter().map(|c| c.at_s))
        .fold(1.0f64, f64::max);
    let ymax = r
        .freshness
        .iter()
        .map(|p| p.1)
        .chain(r.cycles.iter().map(|c| c.duration_ms))
        .fold(100.0f64, f64::max)
        * 1.1;
    let x = |t: f64| ml + t / tmax * pw;
    let y = |v: f64| mt + ph - v / ymax * ph;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{ml}" y="22" font-size="14">Sustained {}/s for {} s, {} workers, {} rows: freshness (ack to visible) and cycle time</text>"#,
        r.rate, r.seconds, r.workers, r.rows
    );
    // Axes and grid.
    for i in 0..=5 {
        let v = ymax * i as f64 / 5.0;
        let yy = y(v);
        let _ = writeln!(
            s,
            r##"<line x1="{ml}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{v:.0}</text>"##,
            ml + pw,
            ml - 6.0,
            yy + 4.0
        );
    }
    for i in 0..=6 {
        let t = tmax * i as f64 / 6.0;
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{t:.0}</text>"#,
            x(t),
            mt + ph + 18.0
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">seconds since start</text><text x="16" y="{:.1}" transform="rotate(-90 16 {:.1})" text-anchor="middle">milliseconds</text>"#,
        ml + pw / 2.0,
        h - 8.0,
        mt + ph / 2.0,
        mt + ph / 2.0
    );
    let _ = writeln!(
        s,
        r##"<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>"##
    );
    let poly = |pts: Vec<(f64, f64)>, color: &str| {
        let p: Vec<String> = pts
            .iter()
            .map(|(t, v)| format!("{:.1},{:.1}", x(*t), y(*v)))
            .collect();
        format!(
            r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#,
            p.join(" ")
        )
    };
    let _ = writeln!(s, "{}", poly(r.freshness.clone(), "#1f77b4"));
    let _ = writeln!(
        s,
        "{}",
        poly(
            r.cycles.iter().map(|c| (c.at_s, c.duration_ms)).collect(),
            "#d62728"
        )
    );
    let _ = writeln!(
        s,
        r##"<rect x="{:.1}" y="{:.1}" width="12" height="3" fill="#1f77b4"/><text x="{:.1}" y="{:.1}">freshness of each batch (at its ack time)</text>"##,
        ml + 10.0,
        mt + 12.0,
        ml + 26.0,
        mt + 16.0
    );
    let _ = writeln!(
        s,
        r##"<rect x="{:.1}" y="{:.1}" width="12" height="3" fill="#d62728"/><text x="{:.1}" y="{:.1}">cycle duration (at its commit)</text>"##,
        ml + 10.0,
        mt + 28.0,
        ml + 26.0,
        mt + 32.0
    );
    let _ = writeln!(s, "</svg>");
    s
}
