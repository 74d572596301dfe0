//! `freshet admin explain`: a dry run of the next cycle agrees with the cycle that then
//! runs, and writes nothing.

use freshet_integration_tests::*;
use freshet_proto::admin::v1::{ExplainCycleRequest, PauseTableRequest};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_predicts_the_next_cycle_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = table_config(dir.path(), "t", true, 4096);
    let table_dir = dir.path().join("t");
    let c = Cluster::start(dir.path(), vec![cfg], 2).await;
    let mut ingest = c.ingest_client().await;
    let mut admin = c.admin_client().await;
    let explain =
        |admin: &mut freshet_proto::admin::v1::admin_service_client::AdminServiceClient<
            tonic::transport::Channel,
        >| {
            let mut a = admin.clone();
            async move {
                a.explain_cycle(ExplainCycleRequest { table: "t".into() })
                    .await
                    .unwrap()
                    .into_inner()
            }
        };
    assert_eq!(explain(&mut admin).await.note, "nothing pending");

    // Three partitions of data, several files each.
    let rows: Vec<Change> = (0..3000)
        .map(|i| (i, Some((format!("v{i}-{}", "x".repeat(40)), i))))
        .collect();
    ingest.ingest(request("t", true, &rows)).await.unwrap();
    c.coordinator.trigger("t").await.unwrap();

    // Changes to a few keys of one partition (keys with id % 3 == 0 are "eu").
    let changes: Vec<Change> = vec![
        (3, Some(("new".into(), 1))),
        (6, None),
        (9000, Some(("ins".into(), 2))),
    ];
    ingest.ingest(request("t", true, &changes)).await.unwrap();
    let before_files = list_files(&table_dir);
    let before = c
        .coordinator
        .table_info(&c.coordinator.table("t").unwrap())
        .await
        .unwrap();

    let e = explain(&mut admin).await;
    assert_eq!(e.note, "");
    assert_eq!(e.segments, 1);
    assert_eq!(e.changes, 3);
    assert_eq!(e.keys, 3);
    assert!(e.files_untouched_partitions > 0, "{e:?}");
    assert!(e.files_to_rewrite >= 1, "{e:?}");
    assert!(e.bytes_to_read > 0);
    assert!(!e.tasks.is_empty());
    for t in &e.tasks {
        assert!(t.partition.starts_with("region="), "{t:?}");
        assert!(c.worker_endpoints.contains(&t.worker), "{t:?}");
    }
    assert_eq!(
        e.files_total,
        e.files_untouched_partitions + e.files_pruned_by_range + e.files_to_rewrite
    );

    // Nothing written: same files, same version, the same pending.
    assert_eq!(list_files(&table_dir), before_files);
    let after = c
        .coordinator
        .table_info(&c.coordinator.table("t").unwrap())
        .await
        .unwrap();
    assert_eq!(
        (after.version, after.pending_changes),
        (before.version, before.pending_changes)
    );

    // The cycle that runs does what was explained.
    let rec = c.coordinator.trigger("t").await.unwrap();
    assert_eq!(rec.files_rewritten, e.files_to_rewrite);
    assert_eq!(rec.files_total, e.files_total);
    assert_eq!(rec.files_pruned, e.files_pruned_by_range);
    assert_eq!(
        rec.files_total - rec.files_considered,
        e.files_untouched_partitions
    );
    assert_eq!(rec.keys, e.keys);

    // A paused table says so.
    ingest
        .ingest(request("t", true, &[(12, None)]))
        .await
        .unwrap();
    admin
        .pause_table(PauseTableRequest { table: "t".into() })
        .await
        .unwrap();
    let e = explain(&mut admin).await;
    assert!(e.note.starts_with("paused"), "{e:?}");
    assert_eq!(e.changes, 1);
    c.stop();
}
