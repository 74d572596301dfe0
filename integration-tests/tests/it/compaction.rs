//! Background compaction: groups that deletion-vector cycles left with small files and
//! deleted rows, and small neighbouring files that deletes left, are folded back into
//! key-sorted files without deleted rows; the table equals the model before and after, the
//! commit only rearranges (`dataChange = false`, its own txn), and the table loop does it
//! by itself once the table is idle.

use std::collections::BTreeMap;
use std::time::Duration;

use freshet_common::table::MergeMode;
use freshet_integration_tests::*;
use rand::{Rng, SeedableRng};

async fn files_of(c: &Cluster, name: &str) -> Vec<freshet_common::delta::FileEntry> {
    let t = c.coordinator.table(name).unwrap();
    let mut d = t.delta.lock().await;
    d.update_state().await.unwrap();
    freshet_common::delta::files(&t.def, &d).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_folds_deletion_vectors_and_small_files_and_changes_no_row() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = table_config(dir.path(), "t", false, 48 * 1024);
    cfg.merge_mode = Some(MergeMode::DeletionVectors);
    let c = Cluster::start(dir.path(), vec![cfg.clone()], 2).await;
    let mut ingest = c.ingest_client().await;
    let mut model = BTreeMap::new();
    let base: Vec<Change> = (0..10_000)
        .map(|i| (i, Some((format!("b{i}"), i))))
        .collect();
    ingest.ingest(request("t", false, &base)).await.unwrap();
    c.coordinator.trigger("t").await.unwrap();
    apply(&mut model, &base);
    let base_files = files_of(&c, "t").await.len();
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for round in 0..4 {
        let changes: Vec<Change> = (0..120)
            .map(|i| {
                let k = rng.gen_range(0..10_500);
                if rng.gen_bool(0.3) {
                    (k, None)
                } else {
                    (k, Some((format!("r{round}-{i}"), i)))
                }
            })
            .collect();
        ingest.ingest(request("t", false, &changes)).await.unwrap();
        apply(&mut model, &changes);
        let r = c.coordinator.trigger("t").await.unwrap();
        assert_eq!(r.state, "committed", "{}", r.error);
    }
    let before = files_of(&c, "t").await;
    assert!(before.len() > base_files, "DV cycles added small files");
    assert!(before.iter().any(|f| f.deletion_vector.is_some()));

    let rec = c.coordinator.compact("t").await.unwrap().expect("due");
    assert_eq!(rec.state, "committed", "{}", rec.error);
    assert_eq!(rec.kind, "compaction");
    assert!(rec.tasks.iter().all(|t| t.mode == "copy_on_write"));
    assert_eq!(read_table(&cfg.uri).await, model);
    let after = files_of(&c, "t").await;
    assert!(
        after.len() < before.len(),
        "{} files before, {} after",
        before.len(),
        after.len()
    );
    assert!(
        after.iter().all(|f| f.deletion_vector.is_none()),
        "every DV folded (the budget covers this table)"
    );
    // Disjoint ranges again, as copy-on-write leaves them.
    let mut ranges: Vec<_> = after.iter().map(|f| f.range.clone().unwrap()).collect();
    ranges.sort();
    for w in ranges.windows(2) {
        assert!(
            w[0].1 < w[1].0,
            "overlap after compaction: {:?} {:?}",
            w[0],
            w[1]
        );
    }
    // The commit rearranges only, under its own txn.
    let actions = commit_actions(&dir.path().join("t"), rec.delta_version);
    for a in &actions {
        for kind in ["add", "remove"] {
            if let Some(x) = a.get(kind) {
                assert_eq!(x["dataChange"], false, "{a}");
            }
        }
    }
    assert!(actions.iter().any(|a| {
        a.get("txn")
            .is_some_and(|t| t["appId"] == "freshet:t:compaction")
    }));
    // Nothing left to do; cycles go on as before.
    assert!(c.coordinator.compact("t").await.unwrap().is_none());
    ingest
        .ingest(request("t", false, &[(3, Some(("after".into(), 3)))]))
        .await
        .unwrap();
    apply(&mut model, &[(3, Some(("after".into(), 3)))]);
    c.coordinator.trigger("t").await.unwrap();
    assert_eq!(read_table(&cfg.uri).await, model);
    c.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_table_is_compacted_by_the_table_loop() {
    let dir = tempfile::tempdir().unwrap();
    // Copy-on-write: deletes leave many small files, which compaction merges.
    let mut cfg = table_config(dir.path(), "t", false, 16 * 1024);
    cfg.merge_mode = Some(MergeMode::CopyOnWrite);
    let mut config = freshet_common::config::Config::default();
    config.tables = vec![cfg.clone()];
    config.cycle.interval_ms = 100;
    config.cycle.orphan_grace_ms = 200;
    config.compaction.interval_ms = 300;
    config.catalog.uri = Some(dir.path().join("_catalog").display().to_string());
    let c = Cluster::start_with(config, 2).await;
    let mut events = c.coordinator.subscribe();
    let mut ingest = c.ingest_client().await;
    let mut model = BTreeMap::new();
    let rows: Vec<Change> = (0..6_000)
        .map(|i| (i, Some((format!("v{i}"), i))))
        .collect();
    ingest.ingest(request("t", false, &rows)).await.unwrap();
    apply(&mut model, &rows);
    wait_until("the load's cycle", Duration::from_secs(60), || {
        let r = events.try_recv().ok();
        async move { r.filter(|r| r.kind.is_empty() && r.state == "committed") }
    })
    .await;
    // Delete 90% of the rows: every file shrinks to a tenth.
    let deletes: Vec<Change> = (0..6_000)
        .filter(|i| i % 10 != 0)
        .map(|i| (i, None))
        .collect();
    ingest.ingest(request("t", false, &deletes)).await.unwrap();
    apply(&mut model, &deletes);
    let rec = wait_until("a compaction", Duration::from_secs(60), || {
        let r = events.try_recv().ok();
        async move { r.filter(|r| r.kind == "compaction") }
    })
    .await;
    assert_eq!(rec.state, "committed", "{}", rec.error);
    assert!(
        rec.tasks
            .iter()
            .any(|t| t.mode_reason.contains("small neighbouring"))
    );
    assert!(rec.files_added < rec.files_rewritten, "{rec:?}");
    assert_eq!(read_table(&cfg.uri).await, model);
    c.stop();
}
