//! Cluster mode against a real etcd and real processes: scale-out, graceful worker stop,
//! worker loss mid-cycle, leader loss under load, a paused (stale) leader, and bad
//! configuration at start.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use freshet_integration_tests::procs::{ProcCluster, http_get};
use freshet_integration_tests::{Change, apply, freshet_bin, read_table, request, table_config};
use freshet_proto::admin::v1::{
    GetLeaderRequest, GetTableRequest, ListCyclesRequest, PauseTableRequest, ResumeTableRequest,
    TriggerCycleRequest, WatchCyclesRequest,
};
use rand::{Rng, SeedableRng};

type Model = BTreeMap<i64, (String, i64)>;

/// Random changes over keys 0..keys: 70 % upserts of existing-ish keys, 30 % deletes.
fn changes(rng: &mut rand::rngs::StdRng, n: usize, keys: i64, tag: &str) -> Vec<Change> {
    (0..n)
        .map(|i| {
            let k = rng.gen_range(0..keys);
            if rng.gen_bool(0.3) {
                (k, None)
            } else {
                (k, Some((format!("{tag}-{i}"), rng.gen_range(0..1000))))
            }
        })
        .collect()
}

/// Epochs recorded in each Freshet commit of the table, by version.
fn commit_epochs(table_dir: &Path) -> Vec<(i64, u64)> {
    let mut out = Vec::new();
    let log = table_dir.join("_delta_log");
    let mut names: Vec<_> = std::fs::read_dir(&log)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".json"))
        .collect();
    names.sort();
    for n in names {
        let v: i64 = n.trim_end_matches(".json").parse().unwrap();
        for line in std::fs::read_to_string(log.join(&n)).unwrap().lines() {
            let a: serde_json::Value = serde_json::from_str(line).unwrap();
            if let Some(e) = a["commitInfo"]["freshet.metrics"]["epoch"].as_u64() {
                out.push((v, e));
            }
        }
    }
    out
}

fn assert_epochs_monotonic(table_dir: &Path) -> Vec<(i64, u64)> {
    let epochs = commit_epochs(table_dir);
    assert!(!epochs.is_empty(), "no Freshet commits found");
    for w in epochs.windows(2) {
        assert!(
            w[0].1 <= w[1].1,
            "version {} was committed with epoch {} after version {} with epoch {}: an old leader committed after a new one took over ({epochs:?})",
            w[1].0,
            w[1].1,
            w[0].0,
            w[0].1
        );
    }
    epochs
}

/// Waits until the leader has applied everything staged.
async fn wait_applied(c: &ProcCluster, leader: usize, table: &str, timeout: Duration) {
    let end = Instant::now() + timeout;
    loop {
        let t = c
            .admin(leader)
            .await
            .get_table(GetTableRequest { name: table.into() })
            .await
            .unwrap()
            .into_inner()
            .table
            .unwrap();
        if t.pending_changes == 0 {
            return;
        }
        assert!(
            Instant::now() < end,
            "{table}: {} changes still pending",
            t.pending_changes
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_out_spreads_tasks_and_graceful_stop_deregisters_at_once() {
    // A long lease TTL, so that "gone at once" cannot be the lease expiring.
    let mut c = ProcCluster::new("[cycle]\ninterval_ms = 300\n");
    std::fs::write(
        &c.config,
        std::fs::read_to_string(&c.config)
            .unwrap()
            .replace("lease_ttl_s = 3", "lease_ttl_s = 15"),
    )
    .unwrap();
    c.add_coordinator();
    c.add_worker(&[]);
    c.wait_ready(&c.coordinators[0], Duration::from_secs(60));
    let leader = c.wait_leader(&[], Duration::from_secs(30)).await;
    c.wait_workers(leader, 1, Duration::from_secs(30)).await;
    let cfg = table_config(&c.dir, "orders", true, 64 * 1024);
    c.create_table(leader, &cfg).await;

    let mut watch = c
        .admin(leader)
        .await
        .watch_cycles(WatchCyclesRequest {
            table: "orders".into(),
        })
        .await
        .unwrap()
        .into_inner();

    let model = Arc::new(Mutex::new(Model::new()));
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let seed: Vec<Change> = (0..3000)
        .map(|k| (k, Some((format!("seed-{k}"), k))))
        .collect();
    c.ingest_acked(&request("orders", true, &seed), Duration::from_secs(30))
        .await;
    apply(&mut model.lock().unwrap(), &seed);

    // Changes stream in while the cluster grows.
    let mut batches = Vec::new();
    for b in 0..40 {
        batches.push(changes(&mut rng, 200, 3000, &format!("b{b}")));
    }
    let mut spread_seen = false;
    let mut addrs = Vec::new();
    for (b, batch) in batches.iter().enumerate() {
        c.ingest_acked(&request("orders", true, batch), Duration::from_secs(30))
            .await;
        apply(&mut model.lock().unwrap(), batch);
        if b == 5 {
            // Scale out from one worker to three while changes keep coming.
            c.add_worker(&[]);
            c.add_worker(&[]);
        }
        if b == 10 {
            addrs = c.wait_workers(leader, 3, Duration::from_secs(30)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_applied(&c, leader, "orders", Duration::from_secs(60)).await;
    let cycles = c
        .admin(leader)
        .await
        .list_cycles(ListCyclesRequest {
            table: "orders".into(),
            limit: 200,
        })
        .await
        .unwrap()
        .into_inner()
        .cycles;
    for cy in &cycles {
        let used: std::collections::BTreeSet<&str> =
            cy.tasks.iter().map(|t| t.worker.as_str()).collect();
        if addrs.iter().all(|a| used.contains(a.as_str())) {
            spread_seen = true;
        }
    }
    assert!(
        spread_seen,
        "no cycle used all three workers {addrs:?}: {:?}",
        cycles
            .iter()
            .map(|c| c.tasks.iter().map(|t| t.worker.clone()).collect::<Vec<_>>())
            .collect::<Vec<_>>()
    );
    // Prometheus metrics on both sides.
    let m = http_get(c.coordinators[leader].http_port, "/metrics").expect("coordinator /metrics");
    for needle in [
        "freshet_cycle_duration_seconds_bucket{",
        "freshet_workers 3",
        "freshet_is_leader 1",
        "freshet_pending_bytes{table=\"orders\"}",
        "freshet_files_rewritten_total{table=\"orders\"}",
    ] {
        assert!(
            m.contains(needle),
            "coordinator metrics lack {needle}:\n{m}"
        );
    }
    let m = http_get(c.workers[1].http_port, "/metrics").expect("worker /metrics");
    assert!(
        m.contains("freshet_worker_tasks_total{outcome=\"ok\"}"),
        "{m}"
    );
    assert!(http_get(c.workers[1].http_port, "/livez").is_some());
    // The live tail saw the committed cycles.
    let rec = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("watch delivered nothing")
        .unwrap()
        .unwrap();
    assert_eq!(rec.table, "orders");

    // Graceful stop: deregistered long before the 15 s lease could expire; exits 0.
    let stopped_at = Instant::now();
    c.workers[2].proc.term();
    c.wait_workers(leader, 2, Duration::from_secs(5)).await;
    assert!(stopped_at.elapsed() < Duration::from_secs(5));
    let status = c.workers[2]
        .proc
        .wait_exit(Duration::from_secs(20))
        .expect("worker did not exit");
    assert!(status.success(), "worker exit status {status:?}");

    // Cycles go on with the remaining workers, and the table equals the model.
    let more = changes(&mut rng, 500, 3000, "after");
    c.ingest_acked(&request("orders", true, &more), Duration::from_secs(30))
        .await;
    apply(&mut model.lock().unwrap(), &more);
    wait_applied(&c, leader, "orders", Duration::from_secs(60)).await;
    assert_eq!(read_table(&cfg.uri).await, *model.lock().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_cycle_loses_nothing() {
    // Cycles only when triggered, so the kill lands inside a known cycle; workers sleep
    // 1.5 s per task so the cycle is surely running when the kill comes.
    let mut c = ProcCluster::new(
        "[cycle]\ninterval_ms = 600000\ntrigger_changes = 100000000\ntask_timeout_ms = 20000\nmax_attempts = 4\n",
    );
    c.add_coordinator();
    let slow = slow_worker_config(&c, 1500);
    for _ in 0..3 {
        c.add_worker_with(&slow, &["--allow-fault-injection"], &[]);
    }
    let leader = c.wait_leader(&[], Duration::from_secs(60)).await;
    let addrs = c.wait_workers(leader, 3, Duration::from_secs(30)).await;
    let cfg = table_config(&c.dir, "t", true, 1 << 20);
    c.create_table(leader, &cfg).await;
    let mut model = Model::new();
    let seed: Vec<Change> = (0..900).map(|k| (k, Some((format!("s{k}"), k)))).collect();
    c.ingest_acked(&request("t", true, &seed), Duration::from_secs(30))
        .await;
    apply(&mut model, &seed);
    let first = c
        .admin(leader)
        .await
        .trigger_cycle(TriggerCycleRequest { table: "t".into() })
        .await
        .unwrap()
        .into_inner()
        .cycle
        .unwrap();
    assert_eq!(first.state, "committed", "{}", first.error);

    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let batch = changes(&mut rng, 600, 900, "x");
    c.ingest_acked(&request("t", true, &batch), Duration::from_secs(30))
        .await;
    apply(&mut model, &batch);
    let mut admin = c.admin(leader).await;
    let trigger = tokio::spawn(async move {
        admin
            .trigger_cycle(TriggerCycleRequest { table: "t".into() })
            .await
    });
    // Three partitions, three tasks, one per worker: every worker is busy now.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let victim = c.workers[0].endpoint.clone();
    c.workers[0].proc.kill9();
    let cycle = trigger.await.unwrap().unwrap().into_inner().cycle.unwrap();
    assert_eq!(cycle.state, "committed", "{}", cycle.error);
    let retried: Vec<_> = cycle.tasks.iter().filter(|t| t.attempts > 1).collect();
    assert!(
        !retried.is_empty() && retried.iter().all(|t| t.worker != victim),
        "expected a task retried away from {victim}: {:?}",
        cycle
            .tasks
            .iter()
            .map(|t| (&t.worker, t.attempts, &t.errors))
            .collect::<Vec<_>>()
    );
    assert!(
        retried[0].errors.iter().any(|e| e.contains(&victim)),
        "{:?}",
        retried[0].errors
    );
    assert!(addrs.contains(&victim));
    assert_eq!(read_table(&cfg.uri).await, model);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_under_load_a_follower_takes_over_and_nothing_is_lost() {
    let mut c = ProcCluster::new("[cycle]\ninterval_ms = 300\n");
    c.add_coordinator();
    c.add_coordinator();
    c.add_worker(&[]);
    c.add_worker(&[]);
    let leader = c.wait_leader(&[], Duration::from_secs(60)).await;
    c.wait_workers(leader, 2, Duration::from_secs(30)).await;
    let cfg = table_config(&c.dir, "t", false, 256 * 1024);
    c.create_table(leader, &cfg).await;

    let mut model = Model::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let start = Instant::now();
    let mut killed_at = None;
    let mut b = 0;
    // Every batch is retried (on any coordinator) until acknowledged, then enters the model:
    // the model is exactly the acknowledged changes, in acknowledgement order.
    while start.elapsed() < Duration::from_secs(10) || killed_at.is_none() {
        let batch = changes(&mut rng, 100, 2000, &format!("b{b}"));
        c.ingest_acked(&request("t", false, &batch), Duration::from_secs(60))
            .await;
        apply(&mut model, &batch);
        b += 1;
        if killed_at.is_none() && start.elapsed() > Duration::from_secs(3) {
            c.coordinators[leader].proc.kill9();
            killed_at = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let new_leader = c.wait_leader(&[leader], Duration::from_secs(30)).await;
    let took = killed_at.unwrap().elapsed();
    assert_ne!(new_leader, leader);
    wait_applied(&c, new_leader, "t", Duration::from_secs(60)).await;
    assert_eq!(
        read_table(&cfg.uri).await,
        model,
        "the table differs from the acknowledged changes"
    );
    let epochs = assert_epochs_monotonic(Path::new(&cfg.uri));
    let distinct: std::collections::BTreeSet<u64> = epochs.iter().map(|e| e.1).collect();
    assert!(
        distinct.len() >= 2,
        "expected commits from two leaders: {epochs:?}"
    );
    // History survives the leader change: the new leader lists the old leader's cycles.
    let cycles = c
        .admin(new_leader)
        .await
        .list_cycles(ListCyclesRequest {
            table: "t".into(),
            limit: 1000,
        })
        .await
        .unwrap()
        .into_inner()
        .cycles;
    let old_epoch = *distinct.iter().next().unwrap();
    assert!(
        cycles
            .iter()
            .any(|c| c.epoch == old_epoch && c.state == "committed"),
        "no cycle of epoch {old_epoch} in the new leader's history"
    );
    let l = c
        .admin(new_leader)
        .await
        .get_leader(GetLeaderRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(l.is_leader && l.epoch > old_epoch, "{l:?}");
    eprintln!("takeover observed {took:?} after the kill (lease TTL 3 s)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_whose_lease_expired_never_commits_after_it_resumes() {
    let mut c = ProcCluster::new("[cycle]\ninterval_ms = 200\n");
    c.add_coordinator();
    c.add_coordinator();
    let slow = slow_worker_config(&c, 1200);
    c.add_worker_with(&slow, &["--allow-fault-injection"], &[]);
    c.add_worker_with(&slow, &["--allow-fault-injection"], &[]);
    let old = c.wait_leader(&[], Duration::from_secs(60)).await;
    c.wait_workers(old, 2, Duration::from_secs(30)).await;
    let cfg = table_config(&c.dir, "t", false, 1 << 20);
    c.create_table(old, &cfg).await;
    let mut model = Model::new();
    let seed: Vec<Change> = (0..500).map(|k| (k, Some((format!("s{k}"), k)))).collect();
    c.ingest_acked(&request("t", false, &seed), Duration::from_secs(30))
        .await;
    apply(&mut model, &seed);
    wait_applied(&c, old, "t", Duration::from_secs(30)).await;

    // Paused, so that the new leader will not commit (a commit of its own would make the
    // old leader's commit fail as a conflict, proving nothing about fencing). The old leader
    // runs one cycle by hand; its tasks sleep 1.2 s at the workers; it is frozen inside it.
    c.admin(old)
        .await
        .pause_table(PauseTableRequest { table: "t".into() })
        .await
        .unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let batch = changes(&mut rng, 300, 500, "p");
    c.ingest_acked(&request("t", false, &batch), Duration::from_secs(30))
        .await;
    apply(&mut model, &batch);
    let versions_before = commit_epochs(Path::new(&cfg.uri));
    let mut admin = c.admin(old).await;
    let stale_cycle = tokio::spawn(async move {
        admin
            .trigger_cycle(TriggerCycleRequest { table: "t".into() })
            .await
    });
    tokio::time::sleep(Duration::from_millis(600)).await;
    c.coordinators[old].proc.pause();

    let new = c.wait_leader(&[old], Duration::from_secs(30)).await;
    let t = c
        .admin(new)
        .await
        .get_table(GetTableRequest { name: "t".into() })
        .await
        .unwrap()
        .into_inner()
        .table
        .unwrap();
    assert!(t.paused, "the pause did not survive the leader change");
    assert_eq!(t.pending_changes, 300);

    c.coordinators[old].proc.resume();
    let answer = tokio::time::timeout(Duration::from_secs(30), stale_cycle)
        .await
        .expect("the stale leader's cycle did not end")
        .unwrap();
    match answer {
        Err(status) => assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}"),
        Ok(r) => {
            let r = r.into_inner().cycle.unwrap();
            assert_ne!(r.state, "committed", "the stale leader committed: {r:?}");
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        commit_epochs(Path::new(&cfg.uri)),
        versions_before,
        "a Delta version was committed after the old leader was frozen"
    );
    let log = c.coordinators[old].proc.log_text();
    assert!(
        log.contains("leadership lost"),
        "the old leader did not notice:\n{log}"
    );
    let l = c
        .admin(old)
        .await
        .get_leader(GetLeaderRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!l.is_leader, "the old leader still thinks it leads: {l:?}");

    // The new leader applies everything once the table is resumed.
    c.admin(new)
        .await
        .resume_table(ResumeTableRequest { table: "t".into() })
        .await
        .unwrap();
    wait_applied(&c, new, "t", Duration::from_secs(60)).await;
    assert_epochs_monotonic(Path::new(&cfg.uri));
    assert_eq!(read_table(&cfg.uri).await, model);
}

fn start_fails(config: &str, role: &str, dir: &Path) -> String {
    let p = dir.join(format!("{role}-bad.toml"));
    std::fs::write(&p, config).unwrap();
    let out = Command::new(freshet_bin())
        .args([
            role,
            "--config",
            &p.display().to_string(),
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "",
        ])
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "{role} started with a bad configuration:\n{config}"
    );
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn bad_configuration_fails_at_start_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = dir.path().join("catalog").display().to_string();
    let dead = freshet_integration_tests::procs::free_port();

    let e = start_fails("[cycle]\nintervall_ms = 5\n", "coordinator", dir.path());
    assert!(e.contains("intervall_ms"), "{e}");
    let e = start_fails("[worker]\ncapacityy = 5\n", "worker", dir.path());
    assert!(e.contains("capacityy"), "{e}");
    // etcd security without etcd: refused by both, naming the key.
    for role in ["coordinator", "worker"] {
        let e = start_fails(
            "[cluster]\netcd_ca_file = \"/etc/ca.pem\"\n",
            role,
            dir.path(),
        );
        assert!(e.contains("cluster.etcd_ca_file"), "{role}: {e}");
    }

    let unreachable = format!(
        "[cluster]\netcd_endpoints = [\"http://127.0.0.1:{dead}\"]\netcd_connect_timeout_ms = 1000\n[catalog]\nuri = \"{catalog}\"\n"
    );
    let t = Instant::now();
    let e = start_fails(&unreachable, "coordinator", dir.path());
    assert!(
        e.contains("cannot reach etcd") && e.contains(&dead.to_string()),
        "{e}"
    );
    assert!(t.elapsed() < Duration::from_secs(20));
    let e = start_fails(&unreachable, "worker", dir.path());
    assert!(
        e.contains("cannot reach etcd") && e.contains(&dead.to_string()),
        "{e}"
    );

    let e = start_fails(
        "[catalog]\nuri = \"foo://bucket/catalog\"\n",
        "coordinator",
        dir.path(),
    );
    assert!(e.contains("catalog.uri") && e.contains("foo"), "{e}");
    let e = start_fails(
        &format!("[cluster]\netcd_endpoints = [\"http://127.0.0.1:{dead}\"]\n"),
        "coordinator",
        dir.path(),
    );
    assert!(e.contains("catalog.uri"), "{e}");
}

/// The cluster's configuration plus `[testing] worker_delay_ms`: workers that wait `ms`
/// before each task (started with --allow-fault-injection).
fn slow_worker_config(c: &ProcCluster, ms: u64) -> std::path::PathBuf {
    let base = std::fs::read_to_string(&c.config).unwrap();
    let path = c.dir.join(format!("slow-worker-{ms}.toml"));
    std::fs::write(
        &path,
        format!("{base}\n[testing]\nworker_delay_ms = {ms}\n"),
    )
    .unwrap();
    path
}
