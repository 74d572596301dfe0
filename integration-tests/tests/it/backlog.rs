//! Memory stays bounded under a backlog: recovery keeps at most the pending limit in
//! memory and cycles take bounded work (the rest stays in the staging log until taken), and
//! a CDC source waits while its table is over the limit instead of growing the coordinator.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{ArrayRef, Int8Array, Int64Array, RecordBatch, StringArray};
use freshet_common::changes::change_schema;
use freshet_common::config::Config;
use freshet_integration_tests::*;

fn config(dir: &std::path::Path) -> Config {
    let mut config = Config::default();
    config.tables = vec![table_config(dir, "t", false, 1 << 20)];
    config.cycle.interval_ms = 3_600_000;
    config.cycle.trigger_changes = u64::MAX;
    config.cycle.orphan_grace_ms = 200;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_and_cycles_hold_a_bounded_backlog_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start_with(config(dir.path()), 1).await;
    let mut model = BTreeMap::new();
    let mut client = c.ingest_client().await;
    for b in 0..30i64 {
        let changes: Vec<Change> = (0..1000)
            .map(|i| {
                let k = b * 700 + i; // overlapping key ranges: order matters
                (k, Some((format!("b{b}-{i}"), b)))
            })
            .collect();
        client.ingest(request("t", false, &changes)).await.unwrap();
        apply(&mut model, &changes);
    }
    let info = c
        .coordinator
        .table_info(&c.coordinator.table("t").unwrap())
        .await
        .unwrap();
    let backlog = info.pending_bytes;
    assert_eq!(info.pending_changes, 30_000);
    c.stop();
    drop(c);

    // A successor whose memory budget is a quarter of the backlog.
    let mut small = config(dir.path());
    small.ingest.max_pending_bytes = backlog / 4;
    small.cycle.max_changes_bytes = backlog / 5;
    let c = Cluster::start_with(small, 1).await;
    let t = c.coordinator.table("t").unwrap();
    let info = c.coordinator.table_info(&t).await.unwrap();
    assert_eq!(
        info.pending_changes, 30_000,
        "every staged change is pending"
    );
    assert!(
        info.pending_bytes <= backlog / 4,
        "recovery holds {} bytes in memory, budget {}",
        info.pending_bytes,
        backlog / 4
    );
    let mut cycles = 0;
    loop {
        let rec = c.coordinator.trigger("t").await.unwrap();
        if rec.state == "noop" {
            break;
        }
        assert_eq!(rec.state, "committed", "{rec:?}");
        assert!(
            rec.changes < 30_000,
            "a cycle took the whole backlog: {}",
            rec.changes
        );
        cycles += 1;
        assert!(cycles < 100);
    }
    assert!(
        cycles >= 2,
        "{cycles} cycles for a backlog 5x the cycle bound"
    );
    assert_eq!(read_table(&t.def.uri).await, model);
    assert!(list_files(&dir.path().join("t/_freshet/staging")).is_empty());
    c.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_waits_while_its_table_is_over_the_pending_limit() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.ingest.max_pending_bytes = 1;
    let c = Cluster::start_with(cfg, 1).await;
    let def = c.coordinator.table("t").unwrap().def.clone();
    let uri = def.uri.clone();
    let batch = move |k: i64| {
        let cols: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from(vec![k])),
            Arc::new(StringArray::from(vec![Some("x")])),
            Arc::new(Int64Array::from(vec![Some(k)])),
            Arc::new(Int8Array::from(vec![0i8])),
        ];
        RecordBatch::try_new(change_schema(&def), cols).unwrap()
    };
    assert_eq!(
        c.coordinator
            .stage_changes("t", batch(1), 10, None)
            .await
            .unwrap(),
        10
    );
    // Now over the limit: the next transaction waits (the source stops reading).
    let coordinator = c.coordinator.clone();
    let waiting =
        tokio::spawn(async move { coordinator.stage_changes("t", batch(2), 20, None).await });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!waiting.is_finished(), "staged beyond the pending limit");
    assert_eq!(c.coordinator.trigger("t").await.unwrap().state, "committed");
    let staged = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the source goes on once the table is below its limit")
        .unwrap()
        .unwrap();
    assert_eq!(staged, 20);
    assert_eq!(c.coordinator.trigger("t").await.unwrap().state, "committed");
    assert_eq!(read_table(&uri).await.len(), 2);
    c.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_transaction_is_applied_whole_or_not_at_all_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.cycle.max_changes_bytes = 1; // every segment its own round
    let c = Cluster::start_with(cfg.clone(), 1).await;
    let def = c.coordinator.table("t").unwrap().def.clone();
    let chunk = |keys: std::ops::Range<i64>, v: &str| {
        let n = keys.clone().count();
        let cols: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from(keys.clone().collect::<Vec<_>>())),
            Arc::new(StringArray::from(vec![Some(v); n])),
            Arc::new(Int64Array::from(keys.map(Some).collect::<Vec<_>>())),
            Arc::new(Int8Array::from(vec![0i8; n])),
        ];
        RecordBatch::try_new(change_schema(&def), cols).unwrap()
    };
    let co = c.coordinator.clone();
    co.stage_chunk("t", chunk(0..100, "first"), 10, None, true)
        .await
        .unwrap();
    co.stage_chunk("t", chunk(50..150, "second"), 11, None, true)
        .await
        .unwrap();
    let t = co.table("t").unwrap();
    assert_eq!(
        co.table_info(&t).await.unwrap().pending_bytes,
        0,
        "open chunks wait in the store"
    );
    assert_eq!(
        co.trigger("t").await.unwrap().state,
        "noop",
        "no part of an open transaction"
    );
    c.stop();
    drop((c, co, t));
    let c = Cluster::start_with(cfg, 1).await;
    assert_eq!(
        c.coordinator.trigger("t").await.unwrap().state,
        "noop",
        "still open after recovery"
    );
    // The source re-sends from its confirmed position: the staged chunks are skipped, the rest
    // is staged and closes the transaction.
    let co = c.coordinator.clone();
    assert_eq!(
        co.stage_chunk("t", chunk(0..100, "first"), 10, None, true)
            .await
            .unwrap(),
        10
    );
    co.stage_chunk("t", chunk(140..160, "third"), 12, None, false)
        .await
        .unwrap();
    let rec = co.trigger("t").await.unwrap();
    assert_eq!(rec.state, "committed", "{rec:?}");
    assert_eq!(rec.changes, 220);
    let got = read_table(&def.uri).await;
    assert_eq!(got.len(), 160);
    assert_eq!(got[&10].0, "first");
    assert_eq!(
        got[&60].0, "second",
        "a later chunk wins over an earlier one"
    );
    assert_eq!(got[&145].0, "third");
    assert_eq!(co.trigger("t").await.unwrap().state, "noop");
    // The files of the earlier rounds were never committed: they are swept.
    let table_dir = std::path::Path::new(&def.uri).to_path_buf();
    let active: Vec<String> = commit_actions(&table_dir, 1)
        .iter()
        .filter_map(|a| Some(a.get("add")?.get("path")?.as_str()?.to_string()))
        .collect();
    let parquet = || {
        list_files(&table_dir)
            .into_iter()
            .filter(|f| f.ends_with(".parquet"))
            .collect::<Vec<_>>()
    };
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while parquet() != active {
        assert!(
            std::time::Instant::now() < end,
            "left: {:?}, committed: {active:?}",
            parquet()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.stop();
}
