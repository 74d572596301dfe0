//! The coordinator's memory stays bounded while a paused table's PostgreSQL source keeps
//! producing (5,000 rows/s of ~1 KB), and a successor started after a kill -9 of that
//! leader recovers the backlog within the same bound; once resumed, nothing is lost.
//!
//! `FRESHET_BACKLOG_SECONDS` (default 30) sets how long the load runs before the kill;
//! docs/reliability.md has a 5-minute run.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arrow::array::AsArray;
use arrow::datatypes::Int64Type;
use freshet_integration_tests::pg::Postgres;
use freshet_integration_tests::procs::ProcCluster;
use freshet_integration_tests::*;
use freshet_proto::admin::v1::{
    GetTableRequest, ListSourcesRequest, PauseTableRequest, ResumeTableRequest,
};

/// The resident set of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

const MIB: u64 = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_cdc_table_under_load_keeps_the_coordinator_bounded_across_a_kill() {
    let seconds: u64 = std::env::var("FRESHET_BACKLOG_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let bound = 1024 * MIB;
    let limit = 32 * MIB;
    // One PostgreSQL test at a time (they share the test binary and two cores).
    let _serial = freshet_integration_tests::pg::SERIAL.lock().await;
    let pg = Postgres::start();
    pg.psql("CREATE TABLE events (id bigint PRIMARY KEY, payload text NOT NULL);");
    let tmp = tempfile::tempdir().unwrap();
    let uri = tmp.path().join("events").display().to_string();
    let mut c = ProcCluster::new(&format!(
        "[ingest]\nmax_pending_bytes = {limit}\n\n[cycle]\ninterval_ms = 200\n\n[[sources]]\nname = \"pg\"\nconnection = \"{}\"\npublication = \"freshet_pub\"\nslot = \"freshet_slot\"\n\n[[sources.tables]]\nsource = \"public.events\"\nname = \"events\"\nuri = \"{uri}\"\n",
        pg.conninfo()
    ));
    c.add_worker(&[]);
    c.add_coordinator();
    let leader = c.wait_leader(&[], Duration::from_secs(60)).await;
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let s = c
            .admin(leader)
            .await
            .list_sources(ListSourcesRequest {})
            .await
            .unwrap()
            .into_inner()
            .sources;
        if s.first().is_some_and(|s| s.state == "streaming") {
            break;
        }
        assert!(Instant::now() < end, "source not streaming: {s:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    c.admin(leader)
        .await
        .pause_table(PauseTableRequest {
            table: "events".into(),
        })
        .await
        .unwrap();

    // 5,000 rows/s of ~1 KB: 500 rows every 100 ms.
    let running = Arc::new(AtomicBool::new(true));
    let (r, port, psql) = (running.clone(), pg.port, pg.psql_bin());
    let load = std::thread::spawn(move || {
        let mut next = 0i64;
        let started = Instant::now();
        while r.load(Ordering::SeqCst) {
            pg_insert(&psql, port, next, 500);
            next += 500;
            let due = Duration::from_millis(100 * (next / 500) as u64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        next
    });

    let pid = c.coordinators[leader].proc.pid();
    let mut peak = 0u64;
    let started = Instant::now();
    let mut samples = Vec::new();
    while started.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = rss(pid);
        peak = peak.max(now);
        samples.push((started.elapsed().as_secs(), now));
    }
    let held = table_info(&c, leader).await.pending_bytes;
    eprintln!(
        "leader: peak RSS {} MiB over {seconds} s of load; {} MiB of changes held (limit {} MiB)",
        peak / MIB,
        held / MIB,
        limit / MIB
    );
    assert!(held <= limit + 8 * MIB, "{held} bytes held, limit {limit}");
    assert!(peak < bound, "leader RSS {peak} over {bound}");

    // kill -9 the leader under load; the successor recovers the backlog within the bound.
    c.coordinators[leader].proc.kill9();
    let successor = c.add_coordinator();
    let leader = c.wait_leader(&[leader], Duration::from_secs(60)).await;
    assert_eq!(leader, successor);
    let pid = c.coordinators[leader].proc.pid();
    let mut successor_peak = 0u64;
    let until = Instant::now() + Duration::from_secs(15);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(500)).await;
        successor_peak = successor_peak.max(rss(pid));
    }
    eprintln!(
        "successor: peak RSS {} MiB while recovering and streaming",
        successor_peak / MIB
    );
    assert!(
        successor_peak < bound,
        "successor RSS {successor_peak} over {bound}"
    );
    eprintln!("RSS samples of the first leader (s, MiB):");
    for (s, b) in samples.iter().step_by((samples.len() / 10).max(1)) {
        eprintln!("  {s:>5} {:>6}", b / MIB);
    }

    // Resume: everything PostgreSQL committed arrives, once.
    running.store(false, Ordering::SeqCst);
    let inserted = load.join().unwrap();
    c.admin(leader)
        .await
        .resume_table(ResumeTableRequest {
            table: "events".into(),
        })
        .await
        .unwrap();
    // The backlog drains at the cycle's pace (bounded by the small pending limit).
    let end = Instant::now() + Duration::from_secs(300 + 3 * seconds);
    loop {
        let n = count(&uri).await;
        if n == inserted {
            break;
        }
        assert!(Instant::now() < end, "{n} of {inserted} rows arrived");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    eprintln!("{inserted} rows inserted in PostgreSQL, all in Delta once");
}

fn pg_insert(psql: &std::path::Path, port: u16, from: i64, n: i64) {
    freshet_integration_tests::pg::run_sql(
        psql,
        port,
        &format!(
            "INSERT INTO events SELECT g, repeat(md5(g::text), 31) FROM generate_series({from}, {}) g;",
            from + n - 1
        ),
    );
}

async fn table_info(c: &ProcCluster, i: usize) -> freshet_proto::admin::v1::TableInfo {
    c.admin(i)
        .await
        .get_table(GetTableRequest {
            name: "events".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .table
        .unwrap()
}

async fn count(uri: &str) -> i64 {
    if !std::path::Path::new(uri)
        .join("_delta_log/00000000000000000000.json")
        .exists()
    {
        return 0;
    }
    let batches = query(uri, "select count(*) from t").await;
    batches[0].column(0).as_primitive::<Int64Type>().value(0)
}
