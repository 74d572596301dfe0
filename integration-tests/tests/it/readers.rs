//! Other engines read Freshet's tables directly as standard Delta tables and see exactly
//! what the model says: DuckDB (its `delta` extension, loaded offline from the
//! `duckdb-ext-delta` package) and polars (`read_delta`), after cycles that updated,
//! deleted and inserted across partitions (several versions, Remove actions, split files).

use std::collections::BTreeMap;
use std::process::Command;

use freshet_integration_tests::*;
use rand::{Rng, SeedableRng};

pub(crate) const DUCKDB: &str = r#"
import json, os, sys
import duckdb, duckdb_ext
# The wheel ships the extension under duckdb_ext/extensions/<version>/<platform>/.
ext = os.path.join(list(duckdb_ext.__path__)[0], "extensions")
con = duckdb.connect()
con.execute("SET autoinstall_known_extensions = false")
con.execute("SET autoload_known_extensions = false")
con.execute(f"SET extension_directory = '{ext}'")
con.execute("LOAD delta")
rows = con.execute(f"SELECT id, v, n FROM delta_scan('{sys.argv[1]}') ORDER BY id").fetchall()
print(json.dumps([[r[0], r[1], r[2]] for r in rows]))
"#;

pub(crate) const POLARS: &str = r#"
import json, sys
import polars as pl
df = pl.read_delta(sys.argv[1]).select(["id", "v", "n"]).sort("id")
print(json.dumps(df.rows()))
"#;

/// The Python `deltalake` package (delta-rs) reading the latest version through its SQL
/// engine (`QueryBuilder`, which applies deletion vectors; its pyarrow-dataset path,
/// `to_pyarrow_table`, refuses tables with the `deletionVectors` feature).
pub(crate) const PYDELTA: &str = r#"
import json, os, sys
from deltalake import DeltaTable, QueryBuilder
import pyarrow as pa
t = pa.table(QueryBuilder().register("t", DeltaTable(sys.argv[1])).execute("select id, v, n from t order by id").read_all()).to_pylist()
print(json.dumps([[r["id"], r["v"], r["n"]] for r in t]))
sys.stdout.flush()
# deltalake's runtime threads can abort the interpreter at exit; leave at once instead.
os._exit(0)
"#;

pub(crate) fn read_with(script: &str, uri: &str, who: &str) -> BTreeMap<i64, (String, i64)> {
    let out = Command::new(python())
        .args(["-c", script, uri])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{who}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<(i64, String, i64)> = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{who}: {e}: {}", String::from_utf8_lossy(&out.stdout)));
    rows.into_iter().map(|(k, v, n)| (k, (v, n))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duckdb_and_polars_read_the_tables_as_the_model_says() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = table_config(dir.path(), "t", true, 4096);
    let c = Cluster::start(dir.path(), vec![cfg.clone()], 2).await;
    let mut ingest = c.ingest_client().await;
    let mut model = BTreeMap::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for round in 0..6 {
        let changes: Vec<Change> = (0..400)
            .map(|i| {
                let k = rng.gen_range(0..1500);
                if round > 0 && rng.gen_bool(0.2) {
                    (k, None)
                } else {
                    (k, Some((format!("r{round}-{i}"), rng.gen_range(0..10_000))))
                }
            })
            .collect();
        ingest.ingest(request("t", true, &changes)).await.unwrap();
        apply(&mut model, &changes);
        c.coordinator.trigger("t").await.unwrap();
    }
    assert_eq!(read_table(&cfg.uri).await, model);
    let duck = read_with(DUCKDB, &cfg.uri, "duckdb");
    assert_eq!(duck, model, "DuckDB's delta_scan");
    let polars = read_with(POLARS, &cfg.uri, "polars");
    assert_eq!(polars, model, "polars read_delta");
    c.stop();
}
