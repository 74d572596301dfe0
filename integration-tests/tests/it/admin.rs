//! The admin API beyond tables and cycles, in process: the live tail, pause and resume
//! (which survive a restart), cycle history that survives a restart, workers and leader.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use freshet_integration_tests::*;
use freshet_proto::admin::v1::{
    GetLeaderRequest, GetTableRequest, ListCyclesRequest, ListWorkersRequest, PauseTableRequest,
    ResumeTableRequest, WatchCyclesRequest,
};

async fn pending(c: &Cluster, table: &str) -> (u64, bool) {
    let t = c
        .admin_client()
        .await
        .get_table(GetTableRequest { name: table.into() })
        .await
        .unwrap()
        .into_inner()
        .table
        .unwrap();
    (t.pending_changes, t.paused)
}

async fn wait_applied(c: &Cluster, table: &str) {
    wait_until(
        "pending changes applied",
        Duration::from_secs(30),
        || async { (pending(c, table).await.0 == 0).then_some(()) },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_pause_resume_and_history_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = table_config(dir.path(), "t", true, 1 << 20);
    let mut config = freshet_common::config::Config::default();
    config.tables = vec![cfg.clone()];
    config.cycle.interval_ms = 100;
    config.catalog.uri = Some(dir.path().join("_catalog").display().to_string());
    let c = Cluster::start_with(config, 2).await;
    let mut model = BTreeMap::new();

    let mut watch = c
        .admin_client()
        .await
        .watch_cycles(WatchCyclesRequest { table: "t".into() })
        .await
        .unwrap()
        .into_inner();
    let batch: Vec<Change> = (0..300).map(|k| (k, Some((format!("a{k}"), k)))).collect();
    c.ingest_client()
        .await
        .ingest(request("t", true, &batch))
        .await
        .unwrap();
    apply(&mut model, &batch);
    let rec = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("the live tail delivered no cycle")
        .unwrap()
        .unwrap();
    assert_eq!((rec.table.as_str(), rec.state.as_str()), ("t", "committed"));
    assert_eq!(rec.changes, 300);
    let first_id = rec.id.clone();
    wait_applied(&c, "t").await;

    // Paused: changes are staged, no cycle runs.
    let mut admin = c.admin_client().await;
    let info = admin
        .pause_table(PauseTableRequest { table: "t".into() })
        .await
        .unwrap()
        .into_inner()
        .table
        .unwrap();
    assert!(info.paused);
    let batch: Vec<Change> = (100..200).map(|k| (k, None)).collect();
    c.ingest_client()
        .await
        .ingest(request("t", true, &batch))
        .await
        .unwrap();
    apply(&mut model, &batch);
    assert!(
        tokio::time::timeout(Duration::from_millis(800), watch.message())
            .await
            .is_err(),
        "a paused table ran a cycle"
    );
    assert_eq!(pending(&c, "t").await, (100, true));
    let e = admin
        .pause_table(PauseTableRequest {
            table: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);

    // Workers and leader (static mode: one coordinator, epoch 1).
    let workers = admin
        .list_workers(ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .workers;
    assert_eq!(workers.len(), 2);
    assert!(workers.iter().map(|w| w.tasks_sent).sum::<u64>() >= 1);
    let l = admin
        .get_leader(GetLeaderRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        l.is_leader && l.epoch == 1 && l.leader == c.endpoint,
        "{l:?}"
    );

    // A restart keeps the pause and the cycle history.
    let c = c.restart().await;
    assert_eq!(pending(&c, "t").await, (100, true));
    let mut admin = c.admin_client().await;
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let cycles = admin
            .list_cycles(ListCyclesRequest {
                table: "t".into(),
                limit: 10,
            })
            .await
            .unwrap()
            .into_inner()
            .cycles;
        if cycles.iter().any(|x| x.id == first_id) {
            break;
        }
        assert!(
            Instant::now() < end,
            "cycle history lost across the restart"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    admin
        .resume_table(ResumeTableRequest { table: "t".into() })
        .await
        .unwrap();
    wait_applied(&c, "t").await;
    assert!(!pending(&c, "t").await.1);
    assert_eq!(read_table(&cfg.uri).await, model);
    c.stop();
}

/// Every key of every object in `v`, recursively.
fn keys(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                out.push(k.clone());
                keys(x, out);
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| keys(x, out)),
        _ => {}
    }
}

/// The CLI's JSON output uses one naming convention (snake_case, as the proto fields).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_json_output_is_snake_case_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start(
        dir.path(),
        vec![table_config(dir.path(), "t", false, 4096)],
        1,
    )
    .await;
    c.ingest_client()
        .await
        .ingest(request("t", false, &[(1, Some(("a".into(), 1)))]))
        .await
        .unwrap();
    let rec = c.coordinator.trigger("t").await.unwrap();
    let endpoint = c.endpoint.clone();
    let id = rec.id.clone();
    let outputs = tokio::task::spawn_blocking(move || {
        let commands: Vec<Vec<&str>> = vec![
            vec!["admin", "tables"],
            vec!["admin", "cycles"],
            vec!["admin", "cycle", &id],
            vec!["admin", "workers"],
            vec!["admin", "leader"],
            vec!["admin", "explain", "t"],
            vec!["source", "list"],
        ];
        commands
            .into_iter()
            .map(|args| {
                let o = std::process::Command::new(freshet_bin())
                    .arg("--endpoint")
                    .arg(&endpoint)
                    .args(&args)
                    .args(["-o", "json"])
                    .output()
                    .unwrap();
                assert!(
                    o.status.success(),
                    "{args:?}: {}",
                    String::from_utf8_lossy(&o.stderr)
                );
                (format!("{args:?}"), String::from_utf8(o.stdout).unwrap())
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    for (cmd, out) in outputs {
        let v: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{cmd}: {e}: {out}"));
        let mut all = Vec::new();
        keys(&v, &mut all);
        let bad: Vec<_> = all
            .iter()
            .filter(|k| {
                !k.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            })
            .collect();
        assert!(bad.is_empty(), "{cmd}: keys not snake_case: {bad:?}");
    }
    c.stop();
}
