//! End to end through the real gRPC services and the `freshet` binary: create a table, ingest
//! JSON and Arrow batches, run cycles, query with `freshet query`, and read the same table
//! with an independent Delta reader (Python `deltalake`): both must equal the model.

use std::collections::BTreeMap;
use std::process::Command;

use freshet_integration_tests::*;
use freshet_proto::admin::v1::{GetTableRequest, ListCyclesRequest, TriggerCycleRequest};
use freshet_proto::ingest::v1::IngestRequest;
use freshet_proto::ingest::v1::ingest_request::Payload;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_cycle_query_and_an_independent_reader_agree() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = table_config(dir.path(), "t", true, 2048);
    let c = Cluster::start(dir.path(), vec![cfg.clone()], 2).await;
    let mut ingest = c.ingest_client().await;
    let mut admin = c.admin_client().await;
    let mut model = BTreeMap::new();
    for round in 0..4i64 {
        let changes: Vec<Change> = (0..150)
            .map(|i| {
                let k = (i * 7 + round * 13) % 300;
                (
                    k,
                    if (i + round) % 6 == 0 {
                        None
                    } else {
                        Some((format!("r{round}-{k}"), k * round))
                    },
                )
            })
            .collect();
        ingest.ingest(request("t", true, &changes)).await.unwrap();
        apply(&mut model, &changes);
        // JSON rows too, with Debezium ops.
        let json = format!(
            r#"[{{"id": {}, "region": "{}", "v": "json", "n": 1, "op": "c"}}, {{"id": 3, "region": "eu", "op": "D"}}]"#,
            1000 + round,
            region_of(1000 + round)
        );
        ingest
            .ingest(IngestRequest {
                table: "t".into(),
                payload: Some(Payload::JsonRows(json)),
                op_column: String::new(),
                ..Default::default()
            })
            .await
            .unwrap();
        apply(
            &mut model,
            &[(1000 + round, Some(("json".into(), 1))), (3, None)],
        );
        let rec = admin
            .trigger_cycle(TriggerCycleRequest { table: "t".into() })
            .await
            .unwrap()
            .into_inner()
            .cycle
            .unwrap();
        assert_eq!(rec.state, "committed", "{}", rec.error);
        assert!(!rec.phases.is_empty() && !rec.tasks.is_empty());
    }
    let info = admin
        .get_table(GetTableRequest { name: "t".into() })
        .await
        .unwrap()
        .into_inner()
        .table
        .unwrap();
    assert_eq!(info.total_rows as usize, model.len());
    assert_eq!(info.pending_changes, 0);
    let cycles = admin
        .list_cycles(ListCyclesRequest {
            table: "t".into(),
            limit: 10,
        })
        .await
        .unwrap()
        .into_inner()
        .cycles;
    assert_eq!(cycles.len(), 4);
    assert_eq!(cycles[0].delta_version, info.version);

    // `freshet query` through the binary, as a user would.
    let out = Command::new(freshet_bin())
        .args([
            "query",
            "-o",
            "json",
            "--endpoint",
            &c.endpoint,
            "select id, v, n from t order by id",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let queried: BTreeMap<i64, (String, i64)> = rows
        .iter()
        .map(|r| {
            (
                r["id"].as_i64().unwrap(),
                (
                    r["v"].as_str().unwrap().to_string(),
                    r["n"].as_i64().unwrap(),
                ),
            )
        })
        .collect();
    assert_eq!(queried, model, "freshet query equals the model");

    // An independent reader: the Python deltalake package.
    let script = r#"
import json, sys
import pyarrow as pa
from deltalake import DeltaTable, QueryBuilder
# The SQL engine: the pyarrow-dataset path refuses tables with deletion vectors, which
# tables Freshet creates may carry (merge_mode = auto).
t = pa.table(QueryBuilder().register("t", DeltaTable(sys.argv[1])).execute("select id, v, n from t").read_all()).to_pylist()
print(json.dumps(sorted([[r["id"], r["v"], r["n"]] for r in t])))
sys.stdout.flush()
# deltalake's runtime threads can abort the interpreter at exit; leave at once instead.
import os; os._exit(0)
"#;
    let out = Command::new(python())
        .args(["-c", script, &cfg.uri])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python deltalake: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<(i64, String, i64)> = serde_json::from_slice(&out.stdout).unwrap();
    let read: BTreeMap<i64, (String, i64)> =
        rows.into_iter().map(|(k, v, n)| (k, (v, n))).collect();
    assert_eq!(
        read, model,
        "the Python deltalake reader sees what freshet query sees"
    );

    // Time travel: version 1 is the first cycle.
    let out = Command::new(freshet_bin())
        .args([
            "query",
            "-o",
            "csv",
            "--version",
            "0",
            "--endpoint",
            &c.endpoint,
            "select count(*) as c from t",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "c\n0");
    c.stop();
}
