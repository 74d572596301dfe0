//! Object-store faults (errors, lost replies, unreadable logs) injected under a real
//! cluster by the fault-injecting store: nothing acknowledged is lost, nothing applied
//! twice, and no file the Delta log references is ever deleted.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{ArrayRef, Int8Array, Int64Array, RecordBatch, StringArray};
use freshet_common::changes::change_schema;
use freshet_common::config::Config;
use freshet_common::faults::{self, FaultKind, FaultPlan, FaultRule, FaultSpec, Op};
use freshet_integration_tests::*;

/// A cluster whose object stores go through a fresh fault plan (disabled until the test
/// turns it on).
async fn faulty_cluster(
    dir: &std::path::Path,
    rules: Vec<FaultRule>,
) -> (Cluster, Arc<FaultPlan>, freshet_common::table::TableConfig) {
    let plan = FaultPlan::new(FaultSpec { seed: 11, rules });
    plan.set_enabled(false);
    let name = uuid::Uuid::new_v4().to_string();
    faults::register(&name, plan.clone());
    let cfg = table_config(dir, "t", false, 1 << 20);
    let mut config = Config::default();
    config.tables = vec![cfg.clone()];
    config.cycle.interval_ms = 3_600_000;
    config.cycle.trigger_changes = u64::MAX;
    config.cycle.orphan_grace_ms = 200;
    config.storage.request_timeout_ms = 2_000;
    config
        .storage
        .options
        .insert(faults::FAULTS_OPTION.into(), name);
    (Cluster::start_with(config, 1).await, plan, cfg)
}

/// A batch in the table's change schema (as a CDC source stages it).
fn change_batch(c: &Cluster, rows: &[(i64, &str)]) -> RecordBatch {
    let def = c.coordinator.table("t").unwrap().def.clone();
    let cols: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from(
            rows.iter().map(|r| r.0).collect::<Vec<_>>(),
        )),
        Arc::new(StringArray::from(
            rows.iter().map(|r| Some(r.1)).collect::<Vec<_>>(),
        )),
        Arc::new(Int64Array::from(
            rows.iter().map(|r| Some(r.0)).collect::<Vec<_>>(),
        )),
        Arc::new(Int8Array::from(vec![0i8; rows.len()])),
    ];
    RecordBatch::try_new(change_schema(&def), cols).unwrap()
}

/// Every file any version of the log adds exists (nothing referenced was deleted).
fn referenced_files_exist(table_dir: &std::path::Path) {
    let log = table_dir.join("_delta_log");
    for entry in std::fs::read_dir(&log).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "json") {
            for line in std::fs::read_to_string(&p).unwrap().lines() {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                if let Some(path) = v
                    .get("add")
                    .and_then(|a| a.get("path"))
                    .and_then(|p| p.as_str())
                {
                    assert!(
                        table_dir.join(path).exists(),
                        "{} references {path}, which was deleted",
                        p.display()
                    );
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_resending_after_a_failed_staging_write_is_staged_not_skipped() {
    let dir = tempfile::tempdir().unwrap();
    // Every attempt of one staging write fails (the coordinator's own retries included).
    let (c, plan, cfg) = faulty_cluster(
        dir.path(),
        vec![FaultRule {
            ops: vec![Op::PutIfAbsent],
            path_contains: "_freshet/staging".into(),
            error_rate: 1.0,
            max_faults: Some(4),
            ..Default::default()
        }],
    )
    .await;
    plan.set_enabled(true);
    let batch = change_batch(&c, &[(1, "one"), (2, "two")]);
    let e = c
        .coordinator
        .stage_changes("t", batch.clone(), 1000, None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("not acknowledged"), "{e}");
    assert_eq!(plan.total(FaultKind::Error), 4);
    // The source re-sends the same transaction under the same sequence: it must be staged.
    assert_eq!(
        c.coordinator
            .stage_changes("t", batch, 1000, None)
            .await
            .unwrap(),
        1000
    );
    assert_eq!(c.coordinator.trigger("t").await.unwrap().state, "committed");
    let table = read_table(&cfg.uri).await;
    assert_eq!(
        table,
        BTreeMap::from([(1, ("one".to_string(), 1)), (2, ("two".to_string(), 2))]),
        "the re-sent transaction is in the table"
    );
    // And a sequence that is really staged is still recognised as such.
    let again = change_batch(&c, &[(1, "stale")]);
    assert_eq!(
        c.coordinator
            .stage_changes("t", again, 1000, None)
            .await
            .unwrap(),
        1000
    );
    assert_eq!(c.coordinator.trigger("t").await.unwrap().state, "noop");
    c.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_outcome_is_unknown_never_loses_its_files() {
    let dir = tempfile::tempdir().unwrap();
    // The commit's put-if-absent takes effect but its reply is lost, and then the log cannot
    // be read for a while: the cycle cannot know whether it committed.
    let (c, plan, cfg) = faulty_cluster(
        dir.path(),
        vec![
            FaultRule {
                ops: vec![Op::PutIfAbsent],
                path_contains: "_delta_log/".into(),
                lost_reply_rate: 1.0,
                max_faults: Some(1),
                ..Default::default()
            },
            FaultRule {
                ops: vec![Op::Get, Op::GetRange, Op::Head, Op::List],
                path_contains: "_delta_log".into(),
                error_rate: 1.0,
                max_faults: Some(16),
                armed_by: Some(0),
                ..Default::default()
            },
        ],
    )
    .await;
    let changes: Vec<Change> = (0..50).map(|i| (i, Some((format!("v{i}"), i)))).collect();
    let mut model = BTreeMap::new();
    apply(&mut model, &changes);
    c.ingest_client()
        .await
        .ingest(request("t", false, &changes))
        .await
        .unwrap();
    plan.set_enabled(true);
    let rec = c.coordinator.trigger("t").await.unwrap();
    assert!(plan.total(FaultKind::LostReply) == 1, "{:?}", plan.counts());
    // Whatever the cycle concluded, the sweeper (grace 200 ms) must not delete what the log
    // references.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    plan.set_enabled(false);
    referenced_files_exist(&dir.path().join("t"));
    assert_eq!(
        rec.state, "committed",
        "the log settles the outcome: {rec:?}"
    );
    // A restarted coordinator applies nothing twice and the table equals the model.
    let c = c.restart().await;
    let after = c.coordinator.trigger("t").await.unwrap();
    assert_eq!(after.state, "noop", "{after:?}");
    assert_eq!(read_table(&cfg.uri).await, model);
    referenced_files_exist(&dir.path().join("t"));
    c.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_retried_after_a_lost_reply_is_applied_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    // The staging write takes effect but its reply is lost, and reading it back fails: the
    // producer is told the batch was not acknowledged although it is durable.
    let (c, plan, cfg) = faulty_cluster(
        dir.path(),
        vec![
            FaultRule {
                ops: vec![Op::PutIfAbsent],
                path_contains: "_freshet/staging".into(),
                lost_reply_rate: 1.0,
                max_faults: Some(1),
                ..Default::default()
            },
            FaultRule {
                ops: vec![Op::Get],
                path_contains: "_freshet/staging".into(),
                error_rate: 1.0,
                max_faults: Some(4),
                ..Default::default()
            },
        ],
    )
    .await;
    let mut client = c.ingest_client().await;
    let with_key = |changes: &[Change], pseq: u64| {
        let mut r = request("t", false, changes);
        r.producer_id = "loader-1".into();
        r.producer_sequence = pseq;
        r
    };
    let first: Vec<Change> = vec![(1, Some(("A".into(), 1))), (2, Some(("A".into(), 2)))];
    let second: Vec<Change> = vec![(1, None)];
    plan.set_enabled(true);
    let e = client.ingest(with_key(&first, 1)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert_eq!(plan.total(FaultKind::LostReply), 1);
    plan.set_enabled(false);
    // The producer goes on, then retries the unacknowledged batch late.
    let r2 = client
        .ingest(with_key(&second, 2))
        .await
        .unwrap()
        .into_inner();
    assert!(!r2.duplicate);
    let r1 = client
        .ingest(with_key(&first, 1))
        .await
        .unwrap()
        .into_inner();
    assert!(
        r1.duplicate,
        "the first batch was durable: its retry is a duplicate"
    );
    assert_eq!(c.coordinator.trigger("t").await.unwrap().state, "committed");
    let mut model = BTreeMap::new();
    apply(&mut model, &first);
    apply(&mut model, &second);
    assert_eq!(
        read_table(&cfg.uri).await,
        model,
        "each batch applied once, in order"
    );

    // Across a restart the producer's sequences are still known (from the Delta log).
    let c = c.restart().await;
    let mut client = c.ingest_client().await;
    assert!(
        client
            .ingest(with_key(&first, 1))
            .await
            .unwrap()
            .into_inner()
            .duplicate
    );
    assert!(
        client
            .ingest(with_key(&second, 2))
            .await
            .unwrap()
            .into_inner()
            .duplicate
    );
    let e = client.ingest(with_key(&second, 4)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("expected 3"), "{}", e.message());
    assert_eq!(c.coordinator.trigger("t").await.unwrap().state, "noop");
    assert_eq!(read_table(&cfg.uri).await, model);
    c.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freshet_ingest_sends_producer_sequences_so_a_rerun_stages_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (c, _plan, cfg) = faulty_cluster(dir.path(), vec![]).await;
    let file = dir.path().join("rows.ndjson");
    std::fs::write(
        &file,
        "{\"id\": 1, \"v\": \"a\", \"n\": 1}\n{\"id\": 2, \"v\": \"b\", \"n\": 2}\n",
    )
    .unwrap();
    let run = || {
        let out = std::process::Command::new(freshet_bin())
            .args(["ingest", "--endpoint", &c.endpoint, "--table", "t"])
            .args(["--producer-id", "nightly-load", "--batch-rows", "1"])
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let first = run();
    assert!(
        first.contains("batches 1..2") && !first.contains("already"),
        "{first}"
    );
    // The same load again (say, after a crash of the loader): nothing is staged twice.
    let again = run();
    assert!(again.contains("2 already staged before"), "{again}");
    let t = c.coordinator.table("t").unwrap();
    assert_eq!(
        c.coordinator.table_info(&t).await.unwrap().pending_changes,
        2
    );
    assert_eq!(c.coordinator.trigger("t").await.unwrap().state, "committed");
    assert_eq!(read_table(&cfg.uri).await.len(), 2);
    c.stop();
}
