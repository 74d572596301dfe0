//! Exactly once across crashes: a crash (a) after staging, (b) after workers wrote files
//! but before the commit, (c) after the commit but before staging cleanup. After a restart
//! the table equals the model of every acknowledged change, applied once.

use std::collections::BTreeMap;

use freshet_coordinator::CrashPoint;
use freshet_integration_tests::*;

async fn crash_and_recover(point: Option<CrashPoint>) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = table_config(dir.path(), "t", true, 4096);
    let c = Cluster::start(dir.path(), vec![cfg.clone()], 2).await;
    let mut model = BTreeMap::new();
    let first: Vec<Change> = (0..200).map(|i| (i, Some((format!("a{i}"), i)))).collect();
    c.ingest_client()
        .await
        .ingest(request("t", true, &first))
        .await
        .unwrap();
    apply(&mut model, &first);
    assert_eq!(c.coordinator.trigger("t").await.unwrap().state, "committed");

    // Changes that are acknowledged, then the crash.
    let second: Vec<Change> = (100..300)
        .map(|i| {
            (
                i,
                if i % 5 == 0 {
                    None
                } else {
                    Some((format!("b{i}"), -i))
                },
            )
        })
        .collect();
    let ack = c
        .ingest_client()
        .await
        .ingest(request("t", true, &second))
        .await
        .unwrap()
        .into_inner();
    assert!(ack.sequence > 0);
    apply(&mut model, &second);
    let version_before =
        deltalake::DeltaTable::try_from_url(deltalake::ensure_table_uri(&cfg.uri).unwrap())
            .await
            .unwrap()
            .version();
    if let Some(p) = point {
        c.coordinator.set_crash_point(Some(p));
        let err = c.coordinator.trigger("t").await.unwrap_err();
        assert!(err.to_string().contains("injected"), "{err}");
    }
    let staged_before = list_files(&dir.path().join("t/_freshet/staging"));
    assert!(
        !staged_before.is_empty(),
        "the acknowledged batch is in the staging log"
    );
    let c = c.restart().await;

    let applied = c.coordinator.trigger("t").await.unwrap();
    let table_dir = dir.path().join("t");
    match point {
        Some(CrashPoint::AfterCommit) => {
            // Already committed: recovery sees the txn and applies nothing twice.
            assert_eq!(applied.state, "noop", "{applied:?}");
            let v =
                deltalake::DeltaTable::try_from_url(deltalake::ensure_table_uri(&cfg.uri).unwrap())
                    .await
                    .unwrap()
                    .version();
            assert_eq!(
                v,
                version_before.map(|v| v + 1),
                "exactly one commit for the batch"
            );
        }
        _ => {
            assert_eq!(applied.state, "committed", "{}", applied.error);
            assert_eq!(applied.last_sequence, ack.sequence);
            assert!(removed_paths(&table_dir, applied.delta_version).len() > 0);
        }
    }
    assert_eq!(read_table(&cfg.uri).await, model);
    // The staging log holds nothing applied.
    assert!(list_files(&table_dir.join("_freshet/staging")).is_empty());
    if point == Some(CrashPoint::AfterRewrite) {
        // Files the crashed cycle wrote are never referenced and are swept after the grace period.
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        let active: std::collections::HashSet<String> = {
            let t = c.coordinator.table("t").unwrap();
            let table = freshet_common::delta::open(&t.def, &Default::default())
                .await
                .unwrap();
            freshet_common::delta::files(&t.def, &table)
                .unwrap()
                .into_iter()
                .map(|f| f.path)
                .collect()
        };
        let mut removed = std::collections::HashSet::new();
        for v in 0..=applied.delta_version {
            removed.extend(removed_paths(&table_dir, v));
        }
        for f in list_files(&table_dir) {
            if f.ends_with(".parquet") {
                assert!(
                    active.contains(&f) || removed.contains(&f),
                    "orphan file left behind: {f}"
                );
            }
        }
        assert!(list_files(&table_dir.join("_freshet/inflight")).is_empty());
    }
    c.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_staging_before_the_cycle() {
    crash_and_recover(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_rewrite_before_commit() {
    crash_and_recover(Some(CrashPoint::AfterRewrite)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_commit_before_cleanup() {
    crash_and_recover(Some(CrashPoint::AfterCommit)).await;
}

/// A real process killed by abort() at the crash point, restarted, converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_process_after_commit_converges() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let endpoint = format!("http://127.0.0.1:{port}");
    let spawn = |crash: Option<&str>| {
        let mut cmd = std::process::Command::new(freshet_bin());
        cmd.args(["dev", "--no-demo", "--data-dir"])
            .arg(&data)
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--interval-ms",
                "3600000",
            ]);
        cmd.env("FRESHET__CYCLE__ORPHAN_GRACE_MS", "100");
        if let Some(c) = crash {
            cmd.arg("--allow-fault-injection")
                .env("FRESHET__TESTING__CRASH_AT", c);
        }
        cmd.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        cmd.spawn().unwrap()
    };
    let wait_ready = || async {
        for _ in 0..100 {
            if freshet_proto::admin::v1::admin_service_client::AdminServiceClient::connect(
                endpoint.clone(),
            )
            .await
            .is_ok()
            {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("freshet dev did not start");
    };
    let mut child = spawn(Some("after_commit"));
    wait_ready().await;
    let cfg = table_config(&data, "t", false, 1 << 20);
    let mut admin = freshet_proto::admin::v1::admin_service_client::AdminServiceClient::connect(
        endpoint.clone(),
    )
    .await
    .unwrap();
    let def = cfg.to_def().unwrap();
    admin
        .create_table(freshet_proto::admin::v1::CreateTableRequest {
            name: "t".into(),
            uri: cfg.uri.clone(),
            schema_json: freshet_common::schema::SchemaSpec::from_arrow(&def.schema).to_json(),
            primary_key: vec!["id".into()],
            partition_by: vec![],
            target_file_size: 1 << 20,
            merge_mode: Default::default(),
        })
        .await
        .unwrap();
    let changes: Vec<Change> = (0..100).map(|i| (i, Some((format!("x{i}"), i)))).collect();
    let mut ingest =
        freshet_proto::ingest::v1::ingest_service_client::IngestServiceClient::connect(
            endpoint.clone(),
        )
        .await
        .unwrap();
    ingest.ingest(request("t", false, &changes)).await.unwrap();
    // The cycle commits, then the process aborts before cleaning the staging log.
    assert!(
        admin
            .trigger_cycle(freshet_proto::admin::v1::TriggerCycleRequest { table: "t".into() })
            .await
            .is_err()
    );
    let status = child.wait().unwrap();
    assert!(!status.success(), "the process crashed");
    assert!(
        !list_files(&data.join("t/_freshet/staging")).is_empty(),
        "cleanup did not happen before the crash"
    );

    let mut child = spawn(None);
    wait_ready().await;
    // Recovery recognised the applied segment (from the txn) and removed it.
    assert!(list_files(&data.join("t/_freshet/staging")).is_empty());
    let mut model = BTreeMap::new();
    apply(&mut model, &changes);
    assert_eq!(read_table(&cfg.uri).await, model);
    let v = deltalake::DeltaTable::try_from_url(deltalake::ensure_table_uri(&cfg.uri).unwrap())
        .await
        .unwrap()
        .version();
    assert_eq!(v, Some(1), "created at version 0, one commit for the batch");
    child.kill().unwrap();
    let _ = child.wait();
}
