//! Read-your-writes (merge-on-read of staged changes): a read with `Freshness::Latest`
//! right after each acknowledgement sees exactly the acknowledged state, while cycles commit
//! concurrently; `Committed` sees only what cycles committed.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::{DataType, Int64Type};
use freshet_common::config::Config;
use freshet_coordinator::fresh_read::Freshness;
use freshet_integration_tests::*;
use rand::{Rng, SeedableRng};

fn rows(batches: &[RecordBatch]) -> BTreeMap<i64, (String, i64)> {
    let mut out = BTreeMap::new();
    for b in batches {
        let ids = b.column(0).as_primitive::<Int64Type>();
        let vs = arrow::compute::cast(b.column(1), &DataType::Utf8).unwrap();
        let vs = vs.as_string::<i32>();
        let ns = b.column(2).as_primitive::<Int64Type>();
        for i in 0..b.num_rows() {
            let prev = out.insert(ids.value(i), (vs.value(i).to_string(), ns.value(i)));
            assert!(prev.is_none(), "key {} appears twice", ids.value(i));
        }
    }
    out
}

async fn read(c: &Cluster, freshness: Freshness) -> BTreeMap<i64, (String, i64)> {
    let ctx = c.coordinator.query_session(freshness).await.unwrap();
    let batches = ctx
        .sql("SELECT id, v, n FROM t")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    rows(&batches)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_after_each_acknowledgement_sees_exactly_the_acknowledged_state() {
    for partitioned in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        let mut table = table_config(dir.path(), "t", partitioned, 2048);
        // The partitioned run commits with deletion vectors: the committed snapshot a
        // `latest` read starts from then has DVs to honour.
        if partitioned {
            table.merge_mode = Some(freshet_common::table::MergeMode::DeletionVectors);
        }
        config.tables = vec![table];
        // Cycles commit on their own while the test reads.
        config.cycle.interval_ms = 150;
        config.catalog.uri = Some(dir.path().join("_catalog").display().to_string());
        let c = Cluster::start_with(config, 2).await;
        let mut ingest = c.ingest_client().await;
        let mut model = BTreeMap::new();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7 + partitioned as u64);
        let mut latencies = Vec::new();
        for round in 0..60 {
            let n = rng.gen_range(1..40);
            let changes: Vec<Change> = (0..n)
                .map(|i| {
                    let k = rng.gen_range(0..300);
                    if rng.gen_bool(0.25) {
                        (k, None)
                    } else {
                        (k, Some((format!("r{round}-{i}"), rng.gen_range(0..1000))))
                    }
                })
                .collect();
            ingest
                .ingest(request("t", partitioned, &changes))
                .await
                .unwrap();
            apply(&mut model, &changes);
            let t0 = Instant::now();
            let seen = read(&c, Freshness::Latest).await;
            latencies.push(t0.elapsed());
            assert_eq!(seen, model, "round {round} (partitioned: {partitioned})");
        }
        // Committed catches up once cycles ran; until then it may lag, never lead.
        wait_until(
            "the cycles to commit everything",
            Duration::from_secs(60),
            || async { (read(&c, Freshness::Committed).await == model).then_some(()) },
        )
        .await;
        latencies.sort();
        eprintln!(
            "read-your-writes (partitioned: {partitioned}): ack-to-visible read p50 {:?}, p99 {:?}",
            latencies[latencies.len() / 2],
            latencies[latencies.len() * 99 / 100]
        );
        c.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_reads_do_not_see_staged_changes() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start(
        dir.path(),
        vec![table_config(dir.path(), "t", false, 2048)],
        1,
    )
    .await;
    let mut ingest = c.ingest_client().await;
    ingest
        .ingest(request(
            "t",
            false,
            &[(1, Some(("a".into(), 1))), (2, Some(("b".into(), 2)))],
        ))
        .await
        .unwrap();
    c.coordinator.trigger("t").await.unwrap();
    ingest
        .ingest(request(
            "t",
            false,
            &[(1, None), (3, Some(("c".into(), 3)))],
        ))
        .await
        .unwrap();
    let committed = read(&c, Freshness::Committed).await;
    assert_eq!(committed.keys().copied().collect::<Vec<_>>(), vec![1, 2]);
    let latest = read(&c, Freshness::Latest).await;
    assert_eq!(latest.keys().copied().collect::<Vec<_>>(), vec![2, 3]);
    c.stop();
}

/// Over Flight SQL: `x-freshet-freshness: latest` sees an acknowledged change at once;
/// without the header the same query sees what is committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flight_sql_clients_ask_for_latest_with_a_header() {
    use arrow_flight::sql::client::FlightSqlServiceClient;
    use futures::TryStreamExt;
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start(
        dir.path(),
        vec![table_config(dir.path(), "t", false, 2048)],
        1,
    )
    .await;
    c.ingest_client()
        .await
        .ingest(request(
            "t",
            false,
            &[(1, Some(("a".into(), 1))), (2, Some(("b".into(), 2)))],
        ))
        .await
        .unwrap();
    let ch = tonic::transport::Channel::from_shared(c.endpoint.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let count = |latest: bool| {
        let ch = ch.clone();
        async move {
            let mut f = FlightSqlServiceClient::new(ch);
            if latest {
                f.set_header("x-freshet-freshness", "latest");
            }
            let info = f
                .execute("SELECT count(*) FROM t".into(), None)
                .await
                .unwrap();
            let mut n = 0;
            for ep in info.endpoint {
                let batches: Vec<RecordBatch> = f
                    .do_get(ep.ticket.unwrap())
                    .await
                    .unwrap()
                    .try_collect()
                    .await
                    .unwrap();
                n += batches[0].column(0).as_primitive::<Int64Type>().value(0);
            }
            n
        }
    };
    assert_eq!(
        count(true).await,
        2,
        "acknowledged, not committed: visible with latest"
    );
    // The CLI asks the same with --freshness latest.
    let endpoint = c.endpoint.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(freshet_bin())
            .args(["--endpoint", &endpoint, "query", "--freshness", "latest"])
            .args(["SELECT count(*) AS n FROM t", "-o", "json"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("\"n\": 2") || text.contains("\"n\":2"),
        "{text}"
    );
    assert_eq!(count(false).await, 0, "committed: nothing yet");
    c.coordinator.trigger("t").await.unwrap();
    assert_eq!(count(false).await, 2);
    // A bad value is refused naming the header.
    let mut f = FlightSqlServiceClient::new(ch.clone());
    f.set_header("x-freshet-freshness", "soonish");
    let e = f.execute("SELECT 1".into(), None).await.unwrap_err();
    assert!(e.to_string().contains("x-freshet-freshness"), "{e}");
    c.stop();
}

/// Time travel over Flight SQL: `"t@v1"` reads version 1, `"t@<time>"` the version committed
/// by then; an unknown version is refused naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flight_sql_reads_older_versions_by_number_and_time() {
    use arrow_flight::sql::client::FlightSqlServiceClient;
    use futures::TryStreamExt;
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start(
        dir.path(),
        vec![table_config(dir.path(), "t", false, 2048)],
        1,
    )
    .await;
    let mut ingest = c.ingest_client().await;
    ingest
        .ingest(request("t", false, &[(1, Some(("a".into(), 1)))]))
        .await
        .unwrap();
    c.coordinator.trigger("t").await.unwrap(); // version 1: one row
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let between = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    ingest
        .ingest(request(
            "t",
            false,
            &[(2, Some(("b".into(), 2))), (3, Some(("c".into(), 3)))],
        ))
        .await
        .unwrap();
    c.coordinator.trigger("t").await.unwrap(); // version 2: three rows
    let ch = tonic::transport::Channel::from_shared(c.endpoint.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let count = |sql: String| {
        let ch = ch.clone();
        async move {
            let mut f = FlightSqlServiceClient::new(ch);
            let info = f.execute(sql, None).await?;
            let mut n = 0;
            for ep in info.endpoint {
                let batches: Vec<RecordBatch> =
                    f.do_get(ep.ticket.unwrap()).await?.try_collect().await?;
                n += batches[0].column(0).as_primitive::<Int64Type>().value(0);
            }
            Ok::<i64, arrow_flight::error::FlightError>(n)
        }
    };
    assert_eq!(count("SELECT count(*) FROM t".into()).await.unwrap(), 3);
    assert_eq!(
        count(r#"SELECT count(*) FROM "t@v1""#.into())
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        count(r#"SELECT count(*) FROM "t@v0""#.into())
            .await
            .unwrap(),
        0
    );
    let at = between.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    assert_eq!(
        count(format!(r#"SELECT count(*) FROM "t@{at}""#))
            .await
            .unwrap(),
        1,
        "as of {at}"
    );
    // Both versions in one query.
    assert_eq!(
        count(r#"SELECT count(*) FROM t WHERE id NOT IN (SELECT id FROM "t@v1")"#.into())
            .await
            .unwrap(),
        2
    );
    let e = count(r#"SELECT count(*) FROM "t@v99""#.into())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("t@v99"), "{e}");
    c.stop();
}
