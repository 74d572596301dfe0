//! `freshet dev`: a coordinator and N workers in one process on the local filesystem, talking
//! over the same gRPC services as a cluster, with a TPC-H orders demo workload.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arrow::array::{ArrayRef, Date32Array, Decimal128Array, Int32Array, Int64Array, StringArray};
use arrow::record_batch::RecordBatch;
use clap::Args;
use freshet_common::config::Config;
use freshet_common::schema::canonical_schema;
use freshet_common::table::TableDef;
use freshet_coordinator::Coordinator;
use freshet_proto::ingest::v1::IngestRequest;
use freshet_proto::ingest::v1::ingest_request::Payload;
use freshet_proto::ingest::v1::ingest_service_client::IngestServiceClient;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tonic::transport::Channel;

use crate::output::cycle_line;

#[derive(Args)]
pub struct DevArgs {
    /// Where tables and the catalog live.
    #[arg(long, default_value = "./freshet-data")]
    data_dir: PathBuf,
    /// In-process workers.
    #[arg(long, default_value_t = 2)]
    workers: u32,
    /// Address of the gRPC server (ingest, admin).
    #[arg(long, default_value = "127.0.0.1:50051")]
    listen: String,
    /// A config file (tables, cycle settings); FRESHET__* variables apply too.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Stop after this many committed cycles.
    #[arg(long)]
    cycles: Option<u64>,
    /// Serve only: no demo table or workload.
    #[arg(long)]
    no_demo: bool,
    /// Demo changes per second.
    #[arg(long, default_value_t = 2000)]
    rate: u64,
    /// Demo table size as a TPC-H scale factor (0.1 = 150k orders).
    #[arg(long, default_value_t = 0.1)]
    scale: f64,
    /// Cycle interval in milliseconds.
    #[arg(long)]
    interval_ms: Option<u64>,
    /// Honour the `[testing]` crash and delay switches (tests only).
    #[arg(long)]
    allow_fault_injection: bool,
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    let mut config = Config::load(args.config.as_deref(), std::env::vars())?;
    crate::serve::check_test_switches(&config, args.allow_fault_injection)?;
    anyhow::ensure!(
        config.testing.store_faults.is_none(),
        "[testing] store_faults is for `freshet coordinator`/`worker` processes, not dev"
    );
    freshet_common::server::init_logging(config.log.json);
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create {}", args.data_dir.display()))?;
    let data_dir = std::fs::canonicalize(&args.data_dir)?;
    if config.catalog.uri.is_none() {
        config.catalog.uri = Some(data_dir.join("_catalog").display().to_string());
    }
    if let Some(ms) = args.interval_ms {
        config.cycle.interval_ms = ms;
    }
    let cluster = freshet_embedded::Builder::new(config)
        .workers(args.workers.max(1) as usize)
        .worker_prefix("dev-worker-")
        .listen(args.listen.clone())
        // The [[sources]] of --config (and sources added with `freshet source add`) run too.
        .sources(Some(Arc::new(freshet_source_postgres::PostgresFactory)))
        .start()
        .await?;
    let coordinator = cluster.coordinator.clone();
    let endpoints = cluster.worker_endpoints.clone();
    let endpoint = cluster.endpoint.clone();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    eprintln!(
        "freshet dev: coordinator on {endpoint}, {} workers, data in {}",
        endpoints.len(),
        data_dir.display()
    );
    // Metrics and probes like the processes serve them (a busy port only costs a warning:
    // dev is for trying things out).
    let mut registry = prometheus_client::registry::Registry::default();
    coordinator.context().metrics.register(&mut registry);
    let ready: freshet_common::http::ReadyCheck = Arc::new(|| Box::pin(async { Ok(()) }));
    let http_listen = cluster.config.server.http_listen.clone();
    match freshet_common::http::serve(&http_listen, Arc::new(registry), ready, None).await {
        Ok(http) => eprintln!("  metrics: http://{http}/metrics"),
        Err(e) => eprintln!("  metrics not served: {e}"),
    }
    let query = match coordinator.tables().first() {
        _ if !args.no_demo => "select count(*) from orders".to_string(),
        Some(t) => format!("select count(*) from {}", t.def.name),
        None => String::new(),
    };
    if !cluster.config.sources.is_empty() {
        let names: Vec<&str> = cluster
            .config
            .sources
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        eprintln!(
            "  sources: {} (their tables appear once copied: `FRESHET_ENDPOINT={endpoint} freshet source list`)",
            names.join(", ")
        );
    }
    if query.is_empty() {
        eprintln!(
            "  no tables yet: create one with `FRESHET_ENDPOINT={endpoint} freshet table create ...` (or [[tables]] in --config)"
        );
        eprintln!("  try: FRESHET_ENDPOINT={endpoint} freshet admin tables");
    } else {
        eprintln!(
            "  try: FRESHET_ENDPOINT={endpoint} freshet admin cycles   |   freshet query \"{query}\""
        );
    }

    if !args.no_demo {
        let demo = Demo::start(&coordinator, &data_dir, &endpoint, args.scale).await?;
        tokio::spawn(demo.stream(args.rate, stop_rx.clone()));
    }

    // One line per committed cycle, until Ctrl-C or --cycles.
    let mut seen = HashSet::new();
    let mut committed = 0u64;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => { eprintln!("shutting down"); break; }
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        let mut fresh: Vec<_> = coordinator
            .cycles(None, 100)
            .into_iter()
            .filter(|c| !seen.contains(&c.id))
            .collect();
        fresh.reverse();
        for c in fresh {
            seen.insert(c.id.clone());
            println!("{}", cycle_line(&c));
            if c.state() == freshet_proto::admin::v1::CycleState::Committed {
                committed += 1;
            }
        }
        if args.cycles.is_some_and(|n| committed >= n) {
            break;
        }
    }
    let _ = stop_tx.send(true);
    cluster.stop();
    Ok(())
}

/// The demo: a TPC-H orders table and a steady mix of updates, inserts and deletes.
struct Demo {
    client: IngestServiceClient<Channel>,
    keys: Vec<i64>,
    next_key: i64,
    rng: SmallRng,
}

impl Demo {
    async fn start(
        coordinator: &Arc<Coordinator>,
        data_dir: &std::path::Path,
        endpoint: &str,
        scale: f64,
    ) -> anyhow::Result<Demo> {
        let client = IngestServiceClient::connect(endpoint.to_string())
            .await?
            .max_encoding_message_size(256 << 20);
        let mut demo = Demo {
            client,
            keys: Vec::new(),
            next_key: 1,
            rng: SmallRng::seed_from_u64(42),
        };
        let generator = tpchgen::generators::OrderGenerator::new(scale, 1, 1);
        let batches: Vec<RecordBatch> = tpchgen_arrow::OrderArrow::new(generator)
            .with_batch_size(50_000)
            .collect::<Result<_, _>>()?;
        let schema = canonical_schema(&batches.first().context("no demo data")?.schema());
        if coordinator.table("orders").is_ok() {
            // Resume: the keys are whatever the table holds; new keys go above the largest.
            let generated: Vec<i64> = batches.iter().flat_map(|b| column_i64(b, 0)).collect();
            demo.next_key = generated.iter().max().copied().unwrap_or(0) * 2 + 1;
            demo.keys = generated;
            return Ok(demo);
        }
        let def = TableDef::new(
            "orders",
            &data_dir.join("orders").display().to_string(),
            schema,
            vec!["o_orderkey".into()],
            vec![],
            4 * 1024 * 1024,
        )?;
        coordinator.create_table(def).await?;
        eprintln!(
            "demo: loading {} TPC-H orders (scale {scale})",
            batches.iter().map(|b| b.num_rows()).sum::<usize>()
        );
        for b in batches {
            demo.keys.extend(column_i64(&b, 0));
            demo.send(b).await?;
        }
        demo.next_key = demo.keys.iter().max().copied().unwrap_or(0) + 1;
        Ok(demo)
    }

    async fn send(&mut self, batch: RecordBatch) -> anyhow::Result<()> {
        let bytes = freshet_common::ipc::encode(&batch.schema(), std::slice::from_ref(&batch))?;
        self.client
            .ingest(IngestRequest {
                table: "orders".into(),
                payload: Some(Payload::ArrowIpc(bytes)),
                op_column: "op".into(),
                ..Default::default()
            })
            .await
            .map_err(|s| anyhow::anyhow!("demo ingest: {}", s.message()))?;
        Ok(())
    }

    /// A batch of `n` changes: 70 % updates, 20 % inserts, 10 % deletes.
    fn changes(&mut self, n: usize) -> anyhow::Result<RecordBatch> {
        let mut keys = Vec::with_capacity(n);
        let mut ops = Vec::with_capacity(n);
        for _ in 0..n {
            let r: f64 = self.rng.r#gen();
            if r < 0.2 || self.keys.is_empty() {
                keys.push(self.next_key);
                self.keys.push(self.next_key);
                self.next_key += 1;
                ops.push("insert");
            } else if r < 0.3 {
                let i = self.rng.gen_range(0..self.keys.len());
                keys.push(self.keys.swap_remove(i));
                ops.push("delete");
            } else {
                keys.push(self.keys[self.rng.gen_range(0..self.keys.len())]);
                ops.push("update");
            }
        }
        let rng = &mut self.rng;
        let statuses = ["F", "O", "P"];
        let priorities = ["1-URGENT", "2-HIGH", "3-MEDIUM", "4-NOT SPECIFIED", "5-LOW"];
        let cols: Vec<(&str, ArrayRef)> = vec![
            ("o_orderkey", Arc::new(Int64Array::from(keys))),
            (
                "o_custkey",
                Arc::new(Int64Array::from(
                    (0..n)
                        .map(|_| rng.gen_range(1..15_000))
                        .collect::<Vec<i64>>(),
                )),
            ),
            (
                "o_orderstatus",
                Arc::new(StringArray::from(
                    (0..n)
                        .map(|_| statuses[rng.gen_range(0..3)])
                        .collect::<Vec<_>>(),
                )),
            ),
            (
                "o_totalprice",
                Arc::new(
                    Decimal128Array::from(
                        (0..n)
                            .map(|_| rng.gen_range(100_00..500_000_00i128))
                            .collect::<Vec<_>>(),
                    )
                    .with_precision_and_scale(15, 2)?,
                ),
            ),
            (
                "o_orderdate",
                Arc::new(Date32Array::from(
                    (0..n)
                        .map(|_| rng.gen_range(8_036..10_440))
                        .collect::<Vec<i32>>(),
                )),
            ),
            (
                "o_orderpriority",
                Arc::new(StringArray::from(
                    (0..n)
                        .map(|_| priorities[rng.gen_range(0..5)])
                        .collect::<Vec<_>>(),
                )),
            ),
            (
                "o_clerk",
                Arc::new(StringArray::from(
                    (0..n)
                        .map(|_| format!("Clerk#{:09}", rng.gen_range(1..1000)))
                        .collect::<Vec<_>>(),
                )),
            ),
            ("o_shippriority", Arc::new(Int32Array::from(vec![0; n]))),
            (
                "o_comment",
                Arc::new(StringArray::from(
                    (0..n)
                        .map(|i| format!("updated by the freshet demo, change {i}"))
                        .collect::<Vec<_>>(),
                )),
            ),
            ("op", Arc::new(StringArray::from(ops))),
        ];
        Ok(RecordBatch::try_from_iter(cols)?)
    }

    async fn stream(mut self, rate: u64, mut stop: tokio::sync::watch::Receiver<bool>) {
        let tick = Duration::from_millis(250);
        let per_tick = (rate / 4).max(1) as usize;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let batch = match self.changes(per_tick) {
                Ok(b) => b,
                Err(e) => {
                    eprintln!("demo: {e}");
                    return;
                }
            };
            if let Err(e) = self.send(batch).await {
                eprintln!("demo: {e}");
            }
        }
    }
}

fn column_i64(b: &RecordBatch, i: usize) -> Vec<i64> {
    use arrow::array::AsArray;
    b.column(i)
        .as_primitive::<arrow::datatypes::Int64Type>()
        .values()
        .to_vec()
}
