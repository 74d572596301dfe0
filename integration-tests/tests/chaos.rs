//! The chaos run: a real etcd, two coordinator and three worker processes, every one of them
//! on a fault-injecting object store (errors and lost replies on every operation and path,
//! `_delta_log` and `_freshet/staging` included), an idempotent gRPC ingest workload and a
//! PostgreSQL table mirrored under a workload of its own, while a seeded schedule kills the
//! leader (kill -9, restart), kills workers (kill -9, restart), freezes the leader for longer
//! than its lease (SIGSTOP, SIGCONT), kills and restarts etcd (same data, same port) and
//! terminates the source's walsender. Then the workload stops, the processes are restarted
//! without fault injection, everything is applied, and:
//!
//! - the ingest table equals the model of acknowledged batches: no acknowledged batch lost
//!   (each batch writes a ledger row of its own that nothing deletes), none applied again
//!   after a newer one (each batch writes a marker row that the producer's next batch
//!   deletes: an old batch applied again brings its marker back), every data row as the
//!   model says;
//! - the mirrored table equals PostgreSQL row for row;
//! - every file any retained Delta version adds exists.
//!
//! `FRESHET_CHAOS_SECONDS` (default 60) sets the length of the fault phase,
//! `FRESHET_CHAOS_SEED` the seed of the schedule, the workloads and the store faults.
//! docs/reliability.md describes what each fault exercises.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::AsArray;
use arrow::datatypes::{DataType, Int64Type};
use freshet_integration_tests::pg::{Postgres, run_sql};
use freshet_integration_tests::procs::ProcCluster;
use freshet_integration_tests::{Change, apply, query, request};
use freshet_proto::admin::v1::admin_service_client::AdminServiceClient;
use freshet_proto::admin::v1::{GetLeaderRequest, GetTableRequest, ListSourcesRequest};
use freshet_proto::ingest::v1::ingest_service_client::IngestServiceClient;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tonic::transport::{Channel, Endpoint};

/// The lease TTL the process harness configures (`lease_ttl_s = 3`).
const LEASE_TTL: Duration = Duration::from_secs(3);
/// Producers of the ingest workload.
const PRODUCERS: usize = 3;
/// Data keys per producer (each producer owns its own range, so that the model does not
/// depend on how batches of different producers interleave).
const DATA_KEYS: usize = 1000;
/// Per producer `p` (base `p * 1_000_000`): data keys `base + 0..DATA_KEYS`, the marker of
/// batch `s` at `base + MARKER + s` (deleted by batch `s + 1`), the ledger row of batch `s`
/// at `base + LEDGER + s` (never deleted), and a counter at `base + COUNTER` (`n` = the
/// last batch).
const MARKER: i64 = 200_000;
const LEDGER: i64 = 500_000;
const COUNTER: i64 = 999_999;
/// The store faults of every coordinator and worker during the chaos phase.
const ERROR_RATE: f64 = 0.05;
const LOST_REPLY_RATE: f64 = 0.03;
/// Coordinators log every store request their fenced store retries (with the fault's text).
const COORDINATOR_LOG: &str =
    "info,deltalake_core=off,buoyant_kernel=off,freshet_coordinator::fenced_store=debug";

type Row = (String, i64);
type Model = BTreeMap<i64, Row>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    LeaderKill,
    WorkerKill,
    LeaderStop,
    EtcdRestart,
    WalsenderTerminate,
}

impl Fault {
    const ALL: [Fault; 5] = [
        Fault::LeaderKill,
        Fault::WorkerKill,
        Fault::LeaderStop,
        Fault::EtcdRestart,
        Fault::WalsenderTerminate,
    ];

    fn name(self) -> &'static str {
        match self {
            Fault::LeaderKill => "leader kill -9 + restart",
            Fault::WorkerKill => "worker kill -9 + restart",
            Fault::LeaderStop => "leader SIGSTOP > lease, SIGCONT",
            Fault::EtcdRestart => "etcd kill -9 + restart",
            Fault::WalsenderTerminate => "walsender terminated",
        }
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.trim()
                .parse()
                .unwrap_or_else(|e| panic!("{name}={v}: {e}"))
        })
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------------------
// Configuration

const TABLE: &str = "ingest";
const MIRROR: &str = "items";

fn base_config(dir: &Path, pg: &Postgres) -> String {
    format!(
        r#"[cycle]
interval_ms = 400
task_timeout_ms = 20000
max_attempts = 4
orphan_grace_ms = 3000

[storage]
request_timeout_ms = 3000

[[tables]]
name = "{TABLE}"
uri = "{ingest}"
primary_key = ["region", "id"]
partition_by = ["region"]
target_file_size = 131072
columns = [
  {{ name = "id", type = "int64", nullable = false }},
  {{ name = "region", type = "string", nullable = false }},
  {{ name = "v", type = "string" }},
  {{ name = "n", type = "int64" }},
]

[[sources]]
name = "pg"
connection = "{conn}"
publication = "freshet_pub"
slot = "freshet_slot"
poll_ms = 100
heartbeat_ms = 1000

[[sources.tables]]
source = "public.{MIRROR}"
name = "{MIRROR}"
uri = "{mirror}"
target_file_size = 131072
"#,
        ingest = dir.join(TABLE).display(),
        mirror = dir.join(MIRROR).display(),
        conn = pg.conninfo(),
    )
}

/// The fault plan of every coordinator and worker in the chaos phase (the first matching
/// rule that injects wins; a rule that matches but does not inject lets later rules try).
fn fault_rules() -> String {
    format!(
        r#"
# 0. Staging writes: lost replies (errors come from rule 4), and 15 ms more per write, so a
#    freeze or a kill often lands inside one.
[[testing.store_faults.rules]]
ops = ["put_if_absent"]
path_contains = "_freshet/staging"
lost_reply_rate = {LOST_REPLY_RATE}
latency_ms = 15

# 1. After the first fault of rule 0, the next 4 reads of the staging log fail: the
#    read-back that would settle a lost reply fails, so a durable batch is answered
#    'not acknowledged' and its producer's retry must be recognised as a duplicate.
[[testing.store_faults.rules]]
ops = ["get", "head"]
path_contains = "_freshet/staging"
error_rate = 1.0
max_faults = 4
armed_by = 0

# 2. Commits: lost replies, 15 ms more per commit.
[[testing.store_faults.rules]]
ops = ["put_if_absent"]
path_contains = "_delta_log/"
lost_reply_rate = {LOST_REPLY_RATE}
latency_ms = 15

# 3. After the first lost commit reply, the next 12 reads of the log fail (the commit's
#    outcome is unknown for a while).
[[testing.store_faults.rules]]
ops = ["get", "get_range", "head", "list"]
path_contains = "_delta_log"
error_rate = 1.0
max_faults = 12
armed_by = 2

# 4. Everything, every path (_delta_log and _freshet/staging included).
[[testing.store_faults.rules]]
error_rate = {ERROR_RATE}
lost_reply_rate = {LOST_REPLY_RATE}
"#
    )
}

/// Writes `name`'s config: the cluster's config plus, with a seed, the store faults.
fn process_config(c: &ProcCluster, name: &str, seed: Option<u64>) -> PathBuf {
    let base = std::fs::read_to_string(&c.config).unwrap();
    let Some(seed) = seed else {
        return c.config.clone();
    };
    let p = c.dir.join(format!("{name}-faults-{seed}.toml"));
    std::fs::write(
        &p,
        format!(
            "{base}\n[testing.store_faults]\nseed = {seed}\n{}",
            fault_rules()
        ),
    )
    .unwrap();
    p
}

const FAULT_FLAGS: &[&str] = &["--allow-fault-injection"];

/// A seed for one process's fault plan (TOML integers are signed 64-bit).
fn fault_seed(rng: &mut StdRng) -> u64 {
    rng.gen_range(0..1u64 << 48)
}

// ---------------------------------------------------------------------------------------
// Cluster helpers

async fn connect(ep: &str, timeout: Duration) -> Option<Channel> {
    let ch = Endpoint::from_shared(ep.to_string())
        .ok()?
        .connect_timeout(timeout)
        .timeout(timeout);
    // A frozen process accepts TCP connections but never completes the handshake.
    tokio::time::timeout(timeout, ch.connect()).await.ok()?.ok()
}

/// The coordinator that leads (the highest epoch among those claiming to), if any answers.
async fn find_leader(c: &ProcCluster) -> Option<(usize, u64)> {
    find_leader_except(c, None).await
}

/// [`find_leader`] asking every coordinator but `except` (a frozen one).
async fn find_leader_except(c: &ProcCluster, except: Option<usize>) -> Option<(usize, u64)> {
    let mut best: Option<(usize, u64)> = None;
    for (i, n) in c.coordinators.iter().enumerate() {
        if except == Some(i) {
            continue;
        }
        let Some(ch) = connect(&n.endpoint, Duration::from_millis(800)).await else {
            continue;
        };
        let r = AdminServiceClient::new(ch)
            .get_leader(GetLeaderRequest {})
            .await;
        if let Ok(r) = r {
            let r = r.into_inner();
            if r.is_leader && best.is_none_or(|b| r.epoch > b.1) {
                best = Some((i, r.epoch));
            }
        }
    }
    best
}

async fn wait_for_leader(c: &ProcCluster, timeout: Duration) -> (usize, u64) {
    let end = Instant::now() + timeout;
    loop {
        if let Some(l) = find_leader(c).await {
            return l;
        }
        assert!(
            Instant::now() < end,
            "no coordinator leads within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[derive(Debug, Default, Clone)]
struct Progress {
    ingest_pending: u64,
    ingest_applied: u64,
    mirror_pending: u64,
    mirror_applied: u64,
    source_state: String,
    source_lag: u64,
    /// Shown through `Debug` when the run does not converge.
    #[allow(dead_code)]
    source_error: String,
}

/// Tables and source as the leader reports them.
async fn progress(c: &ProcCluster, leader: usize) -> Option<Progress> {
    let ch = connect(&c.coordinators[leader].endpoint, Duration::from_secs(3)).await?;
    let mut a = AdminServiceClient::new(ch);
    let mut table = async |name: &str| {
        a.get_table(GetTableRequest { name: name.into() })
            .await
            .ok()
            .and_then(|r| r.into_inner().table)
    };
    let ingest = table(TABLE).await?;
    let mirror = table(MIRROR).await?;
    let s = a
        .list_sources(ListSourcesRequest {})
        .await
        .ok()?
        .into_inner()
        .sources
        .into_iter()
        .next()?;
    Some(Progress {
        ingest_pending: ingest.pending_changes,
        ingest_applied: ingest.applied_sequence,
        mirror_pending: mirror.pending_changes,
        mirror_applied: mirror.applied_sequence,
        source_state: s.state,
        source_lag: s.lag_bytes,
        source_error: s.error,
    })
}

/// What the liveness watchdog saw: (epoch, leader, what, seconds).
type Stalls = Vec<(u64, String, String, f64)>;

/// Watches whoever leads, every 0.5 s, for a term that goes on without doing its job:
/// - it runs no source (for 3 s or more);
/// - its source keeps failing with "staging stopped" (a table's stager is gone while the
///   term goes on; 5 s or more);
/// - a table has changes pending and its applied sequence does not move (15 s or more).
async fn liveness_watchdog(endpoints: Vec<String>, running: Arc<AtomicBool>) -> Stalls {
    // (epoch, what) -> (leader, first seen, last seen)
    let mut seen: BTreeMap<(u64, String), (String, Instant, Instant)> = BTreeMap::new();
    // (epoch, table) -> (applied sequence, since when it has not moved with changes pending)
    let mut applied: HashMap<(u64, String), (u64, Instant)> = HashMap::new();
    let mut note = |epoch: u64, what: String, ep: &str, first: Option<Instant>| {
        let now = Instant::now();
        seen.entry((epoch, what))
            .or_insert((ep.to_string(), first.unwrap_or(now), now))
            .2 = now;
    };
    while running.load(Ordering::SeqCst) {
        for ep in &endpoints {
            let Some(ch) = connect(ep, Duration::from_millis(800)).await else {
                continue;
            };
            let mut a = AdminServiceClient::new(ch);
            let Ok(l) = a.get_leader(GetLeaderRequest {}).await else {
                continue;
            };
            let l = l.into_inner();
            if !l.is_leader {
                continue;
            }
            if let Ok(r) = a.list_sources(ListSourcesRequest {}).await {
                let sources = r.into_inner().sources;
                if sources.is_empty() {
                    note(l.epoch, "runs no source".into(), ep, None);
                }
                for src in sources {
                    if src.error.contains("staging stopped") {
                        note(
                            l.epoch,
                            "its source keeps failing: staging stopped".into(),
                            ep,
                            None,
                        );
                    }
                }
            }
            for table in [TABLE, MIRROR] {
                let Ok(t) = a.get_table(GetTableRequest { name: table.into() }).await else {
                    continue;
                };
                let Some(t) = t.into_inner().table else {
                    continue;
                };
                let now = Instant::now();
                let e = applied
                    .entry((l.epoch, table.to_string()))
                    .or_insert((t.applied_sequence, now));
                if t.pending_changes == 0 || t.applied_sequence != e.0 {
                    *e = (t.applied_sequence, now);
                } else if now - e.1 >= Duration::from_secs(15) {
                    let since = e.1;
                    note(
                        l.epoch,
                        format!("table {table}: changes pending, applied sequence not moving"),
                        ep,
                        Some(since),
                    );
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    seen.into_iter()
        .map(|((e, what), (ep, first, last))| (e, ep, what, (last - first).as_secs_f64()))
        .filter(|x| {
            let min = if x.2 == "runs no source" {
                3.0
            } else if x.2.contains("staging stopped") {
                5.0
            } else {
                15.0
            };
            x.3 >= min
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// The ingest workload

/// One acknowledged batch.
#[derive(Debug, Clone)]
struct Acked {
    producer: usize,
    seq: u64,
    changes: Vec<Change>,
    /// The staging sequence in the acknowledgement (0: a duplicate whose sequence is gone).
    staging_seq: u64,
    duplicate: bool,
    attempts: u32,
}

#[derive(Debug, Default)]
struct ProducerReport {
    acked: Vec<Acked>,
    /// Failed attempts by gRPC code.
    errors: BTreeMap<String, u64>,
    hints_followed: u64,
    /// The longest a batch took from its first send to its acknowledgement.
    longest_ms: u128,
    /// That batch and its failed attempts (time since the first send, code, message).
    longest: String,
    /// FAILED_PRECONDITION answers to a batch right after an acknowledged one.
    refusals: Vec<String>,
    /// Why the producer stopped before the workload ended (it keeps what was acknowledged).
    failure: Option<String>,
}

fn batch(p: usize, seq: u64, rng: &mut StdRng) -> Vec<Change> {
    let base = p as i64 * 1_000_000;
    let n = rng.gen_range(20..60);
    let keys = rand::seq::index::sample(rng, DATA_KEYS, n);
    let mut out: Vec<Change> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let id = base + k as i64;
            if rng.gen_bool(0.25) {
                (id, None)
            } else {
                (id, Some((format!("p{p}.s{seq}.r{i}"), seq as i64)))
            }
        })
        .collect();
    let s = seq as i64;
    out.push((base + MARKER + s, Some((format!("p{p}.s{seq}.marker"), s))));
    if seq > 1 {
        out.push((base + MARKER + s - 1, None));
    }
    out.push((base + LEDGER + s, Some((format!("p{p}.s{seq}.ledger"), s))));
    out.push((base + COUNTER, Some((format!("p{p}.s{seq}.counter"), s))));
    out
}

/// Sends batches 1, 2, 3, ... with producer id `producer-p`, each retried under the same
/// producer sequence until acknowledged (following leader hints, else trying the next
/// coordinator), until `running` turns false. Gives up (returns Err) when one batch stays
/// unacknowledged for `give_up`.
async fn producer(
    p: usize,
    endpoints: Vec<String>,
    running: Arc<AtomicBool>,
    acks: Arc<Mutex<Vec<Instant>>>,
    seed: u64,
    give_up: Duration,
    t0: Instant,
) -> ProducerReport {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut report = ProducerReport::default();
    let mut channels: HashMap<usize, Channel> = HashMap::new();
    let mut at = p % endpoints.len();
    let mut seq = 1u64;
    while running.load(Ordering::SeqCst) {
        let changes = batch(p, seq, &mut rng);
        let mut req = request(TABLE, true, &changes);
        req.producer_id = format!("producer-{p}");
        req.producer_sequence = seq;
        let first_sent = Instant::now();
        let mut failures: Vec<String> = Vec::new();
        let mut attempts = 0u32;
        let mut backoff = Duration::from_millis(50);
        loop {
            attempts += 1;
            let ch = match channels.get(&at) {
                Some(ch) => ch.clone(),
                None => {
                    let ch = Endpoint::from_shared(endpoints[at].clone())
                        .unwrap()
                        .connect_timeout(Duration::from_millis(500))
                        .timeout(Duration::from_secs(5))
                        .connect_lazy();
                    channels.insert(at, ch.clone());
                    ch
                }
            };
            match IngestServiceClient::new(ch).ingest(req.clone()).await {
                Ok(r) => {
                    let r = r.into_inner();
                    report.acked.push(Acked {
                        producer: p,
                        seq,
                        changes: changes.clone(),
                        staging_seq: r.sequence,
                        duplicate: r.duplicate,
                        attempts,
                    });
                    let took = first_sent.elapsed().as_millis();
                    if took > report.longest_ms {
                        report.longest_ms = took;
                        report.longest = format!(
                            "producer-{p} batch {seq}, {attempts} attempts:\n    {}",
                            failures.join("\n    ")
                        );
                    }
                    acks.lock().unwrap().push(Instant::now());
                    break;
                }
                Err(status) => {
                    let msg: String = status.message().chars().take(140).collect();
                    failures.push(format!(
                        "{:>6} ms {:?} via {}: {msg}",
                        first_sent.elapsed().as_millis(),
                        status.code(),
                        endpoints[at]
                    ));
                    *report
                        .errors
                        .entry(format!("{:?}", status.code()))
                        .or_default() += 1;
                    match status.code() {
                        tonic::Code::InvalidArgument => {
                            report.failure = Some(format!(
                                "producer-{p} batch {seq} refused ({:?}): {}",
                                status.code(),
                                status.message(),
                            ));
                            return report;
                        }
                        tonic::Code::FailedPrecondition => {
                            // The batch follows the last acknowledged one: either the
                            // coordinator forgot an acknowledged batch (the ledger check
                            // tells) or it answered from stale state. Recorded; retried.
                            report.refusals.push(format!(
                                "{:>6.1}s producer-{p} batch {seq} (batch {} acknowledged) via {}: {}",
                                t0.elapsed().as_secs_f64(),
                                seq - 1,
                                endpoints[at],
                                status.message()
                            ));
                        }
                        _ => {}
                    }
                    let hint = status
                        .metadata()
                        .get(freshet_common::error::LEADER_METADATA)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|l| endpoints.iter().position(|e| e == l));
                    match hint {
                        Some(i) if i != at => {
                            at = i;
                            report.hints_followed += 1;
                        }
                        _ => at = (at + 1) % endpoints.len(),
                    }
                    if first_sent.elapsed() > give_up {
                        report.failure = Some(format!(
                            "producer-{p} batch {seq} not acknowledged within {give_up:?} ({attempts} attempts; last: {:?} {})",
                            status.code(),
                            status.message()
                        ));
                        return report;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(800));
                }
            }
        }
        seq += 1;
        tokio::time::sleep(Duration::from_millis(rng.gen_range(60..160))).await;
    }
    report
}

// ---------------------------------------------------------------------------------------
// The PostgreSQL workload

const PG_ROWS: &str =
    "SELECT id, concat_ws(',', grp::text, coalesce(val, 'NULL'), qty::text) FROM items ORDER BY id";
const DELTA_ROWS: &str = "SELECT id, concat_ws(',', CAST(grp AS VARCHAR), coalesce(val, 'NULL'), CAST(qty AS VARCHAR)) FROM t ORDER BY id";

/// Small transactions (inserts, upserts, updates, deletes, now and then a key change) until
/// `running` turns false; returns how many committed.
fn pg_workload(psql: PathBuf, port: u16, running: Arc<AtomicBool>, seed: u64) -> u64 {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut round = 0u64;
    while running.load(Ordering::SeqCst) {
        let r = round;
        let fresh = 20_000 + r as i64 * 4;
        let old = rng.gen_range(1..10_000i64);
        let mut sql = format!(
            "BEGIN;
             INSERT INTO items SELECT g, g % 5, 'i{r}', {r} FROM generate_series({fresh}, {fresh} + 3) g;
             INSERT INTO items VALUES ({old}, 1, 'x{r}', 0) ON CONFLICT (id) DO UPDATE SET val = 'c{r}', qty = items.qty + 1;
             UPDATE items SET qty = qty + 1, val = CASE WHEN id % 2 = 0 THEN 'u{r}' ELSE NULL END WHERE id % 97 = {m};
             DELETE FROM items WHERE id BETWEEN {d} AND {d} + {dl};",
            m = rng.gen_range(0..97),
            d = rng.gen_range(1..(20_000 + r as i64 * 4)),
            dl = rng.gen_range(0..3),
        );
        if rng.gen_bool(0.2) {
            let k = rng.gen_range(1..20_000 + r as i64 * 4);
            sql.push_str(&format!(
                "UPDATE items SET id = id + 10000000 WHERE id = {k} AND NOT EXISTS (SELECT 1 FROM items WHERE id = {k} + 10000000);"
            ));
        }
        sql.push_str("COMMIT;");
        run_sql(&psql, port, &sql);
        round += 1;
        std::thread::sleep(Duration::from_millis(rng.gen_range(40..120)));
    }
    round
}

fn pg_rows(pg: &Postgres) -> BTreeMap<i64, String> {
    pg.psql(PG_ROWS)
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (id, rest) = l.split_once('|').unwrap();
            (id.parse().unwrap(), rest.to_string())
        })
        .collect()
}

async fn delta_rows(uri: &str) -> BTreeMap<i64, String> {
    let mut out = BTreeMap::new();
    for b in query(uri, DELTA_ROWS).await {
        let ids = b.column(0).as_primitive::<Int64Type>();
        let rest = arrow::compute::cast(b.column(1), &DataType::Utf8).unwrap();
        let rest = rest.as_string::<i32>();
        for i in 0..b.num_rows() {
            out.insert(ids.value(i), rest.value(i).to_string());
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Checks

/// The ingest table, every row of every key (a key twice is a finding, not a panic).
async fn ingest_rows(uri: &str) -> BTreeMap<i64, Vec<Row>> {
    let mut out: BTreeMap<i64, Vec<Row>> = BTreeMap::new();
    for b in query(uri, "select id, v, n from t").await {
        let ids = b.column(0).as_primitive::<Int64Type>();
        let vs = arrow::compute::cast(b.column(1), &DataType::Utf8).unwrap();
        let vs = vs.as_string::<i32>();
        let ns = b.column(2).as_primitive::<Int64Type>();
        for i in 0..b.num_rows() {
            out.entry(ids.value(i))
                .or_default()
                .push((vs.value(i).to_string(), ns.value(i)));
        }
    }
    out
}

#[derive(Debug, Default)]
struct IngestVerdict {
    batches: usize,
    duplicates_acked: usize,
    /// Acknowledged batches whose ledger row is missing.
    lost: Vec<(usize, u64)>,
    /// Batches whose marker is back although the next batch (applied: its ledger row is
    /// there) deleted it: applied again after a newer batch.
    applied_twice: Vec<(usize, u64)>,
    /// Keys present more than once.
    doubled_keys: Vec<i64>,
    /// Keys whose row differs from the model: (key, model, table).
    differing: Vec<(i64, Option<Row>, Option<Row>)>,
    /// Staging sequences acknowledged to two different batches.
    reused_staging_seqs: Vec<u64>,
}

fn judge_ingest(acked: &[Acked], table: &BTreeMap<i64, Vec<Row>>) -> IngestVerdict {
    let mut v = IngestVerdict {
        batches: acked.len(),
        duplicates_acked: acked.iter().filter(|a| a.duplicate).count(),
        ..Default::default()
    };
    let mut sorted: Vec<&Acked> = acked.iter().collect();
    sorted.sort_by_key(|a| (a.producer, a.seq));
    let mut model = Model::new();
    for a in &sorted {
        apply(&mut model, &a.changes);
    }
    let first = |k: i64| table.get(&k).and_then(|r| r.first().cloned());
    let last_seq: BTreeMap<usize, u64> = sorted.iter().map(|a| (a.producer, a.seq)).collect();
    for a in &sorted {
        let base = a.producer as i64 * 1_000_000;
        let s = a.seq as i64;
        if first(base + LEDGER + s).is_none() {
            v.lost.push((a.producer, a.seq));
        }
        let next_applied = first(base + LEDGER + s + 1).is_some();
        if a.seq < last_seq[&a.producer] && next_applied && first(base + MARKER + s).is_some() {
            v.applied_twice.push((a.producer, a.seq));
        }
    }
    let keys: BTreeSet<i64> = model.keys().chain(table.keys()).copied().collect();
    for k in keys {
        if table.get(&k).is_some_and(|r| r.len() > 1) {
            v.doubled_keys.push(k);
        }
        let (want, got) = (model.get(&k).cloned(), first(k));
        if want != got {
            v.differing.push((k, want, got));
        }
    }
    let mut seen: HashMap<u64, (usize, u64)> = HashMap::new();
    for a in acked.iter().filter(|a| !a.duplicate && a.staging_seq > 0) {
        if let Some(prev) = seen.insert(a.staging_seq, (a.producer, a.seq))
            && prev != (a.producer, a.seq)
        {
            v.reused_staging_seqs.push(a.staging_seq);
        }
    }
    v
}

/// Every `*.json` of the table's Delta log, by version.
fn log_versions(table_dir: &Path) -> Vec<(i64, Vec<serde_json::Value>)> {
    let log = table_dir.join("_delta_log");
    let mut out = Vec::new();
    for e in std::fs::read_dir(&log).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(v) = name
            .strip_suffix(".json")
            .and_then(|v| v.parse::<i64>().ok())
        else {
            continue;
        };
        let actions = std::fs::read_to_string(e.path())
            .unwrap()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        out.push((v, actions));
    }
    out.sort_by_key(|x| x.0);
    out
}

#[derive(Debug, Default)]
struct LogVerdict {
    versions: usize,
    referenced: usize,
    missing_files: Vec<String>,
    /// (version, app id, txn version, previous txn version): a txn that did not move forward.
    txn_regressions: Vec<(i64, String, i64, i64)>,
    epochs: BTreeSet<u64>,
    /// (version, epoch, previous epoch).
    epoch_regressions: Vec<(i64, u64, u64)>,
}

/// Every file added by any retained version exists; each txn app id (the table's applied
/// sequence, each producer's last batch) only moves forward; epochs never go back.
fn judge_log(table_dir: &Path) -> LogVerdict {
    let mut v = LogVerdict::default();
    let mut txns: HashMap<String, i64> = HashMap::new();
    let mut last_epoch = 0u64;
    for (version, actions) in log_versions(table_dir) {
        v.versions += 1;
        for a in actions {
            if let Some(p) = a["add"]["path"].as_str() {
                v.referenced += 1;
                let decoded = p.replace("%3D", "=").replace("%20", " ");
                if !table_dir.join(p).exists() && !table_dir.join(&decoded).exists() {
                    v.missing_files.push(format!("v{version}: {p}"));
                }
            }
            if let (Some(app), Some(tv)) =
                (a["txn"]["appId"].as_str(), a["txn"]["version"].as_i64())
                && let Some(prev) = txns.insert(app.to_string(), tv)
                && tv <= prev
            {
                v.txn_regressions.push((version, app.to_string(), tv, prev));
            }
            if let Some(e) = a["commitInfo"]["freshet.metrics"]["epoch"].as_u64() {
                if e < last_epoch {
                    v.epoch_regressions.push((version, e, last_epoch));
                }
                last_epoch = last_epoch.max(e);
                v.epochs.insert(e);
            }
        }
    }
    v
}

/// Store faults the processes' logs show, by (where, op, kind): "retried" are lines of the
/// coordinator's fenced store retrying a request (one per fault); "surfaced" are other
/// coordinator lines naming a fault (a request whose attempts ran out, reported by its
/// caller); "worker task" are failed worker task attempts. The plans' own counters live
/// in the processes and are not exported, so this is a lower bound.
fn store_faults_in_logs(c: &ProcCluster) -> BTreeMap<(String, String, String), u64> {
    let mut out = BTreeMap::new();
    let mut settled = 0u64;
    for n in c.coordinators.iter().chain(&c.workers) {
        let worker = n.proc.name.starts_with("worker");
        for line in plain_log(n).lines() {
            if line.contains("an earlier attempt took effect (lost reply)") {
                settled += 1;
            }
            let Some(at) = line.find("injected fault: ") else {
                continue;
            };
            if !worker && line.contains("task attempt failed") {
                // The worker's fault, relayed (counted in the worker's log).
                continue;
            }
            let rest = &line[at + "injected fault: ".len()..];
            let op = rest.split_whitespace().next().unwrap_or("?").to_string();
            let kind = if rest.contains("reply lost") {
                "lost reply"
            } else {
                "error"
            };
            let place = if worker {
                "worker task"
            } else if line.contains("retrying") {
                "coordinator, retried"
            } else {
                "coordinator, surfaced"
            };
            *out.entry((place.to_string(), op, kind.to_string()))
                .or_default() += 1;
        }
    }
    out.insert(
        (
            "coordinator, lost put-if-absent settled by read-back".into(),
            "PutIfAbsent".into(),
            "lost reply".into(),
        ),
        settled,
    );
    out
}

/// Log lines counted after the chaos phase: (label, the message).
const LOG_EVENTS: &[(&str, &str)] = &[
    ("elections won", "elected leader; recovering tables"),
    ("leaderships lost", "leadership lost; following"),
    (
        "terms that failed to start",
        "could not start as leader; resigning",
    ),
    ("cycles failed", "cycle failed"),
    (
        "table cycle loops ended by an error",
        "cycle stopped the coordinator",
    ),
    ("source retries after 'staging stopped'", "staging stopped"),
    ("task attempts failed", "task attempt failed"),
    ("staging writes failed", "staging write failed"),
    (
        "  ... found durable afterwards",
        "a staging write reported as failed took effect",
    ),
    (
        "repeated producer batches dropped at recovery",
        "dropping repeated producer batches",
    ),
    (
        "commits with an error found in the log",
        "commit reported an error but the log has it",
    ),
    (
        "commit outcome unknown (log unreadable)",
        "commit outcome unknown",
    ),
    ("source failures (retried)", "source failed; retrying"),
    ("source streams (re)started", " streaming source="),
    (
        "leaders that ran without their source",
        "sources could not be started",
    ),
];

fn count_in_logs(c: &ProcCluster, needle: &str) -> usize {
    c.coordinators
        .iter()
        .chain(&c.workers)
        .map(|n| plain_log(n).matches(needle).count())
        .sum()
}

/// A process's log without terminal colour codes.
fn plain_log(n: &freshet_integration_tests::procs::Node) -> String {
    let text = n.proc.log_text();
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(ch) = chars.next() {
        if ch == '\u{1b}' {
            // ESC [ ... letter
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(ch);
        }
    }
    out
}

fn print_table(title: &str, rows: &[(String, String)]) {
    let w = rows.iter().map(|r| r.0.chars().count()).max().unwrap_or(0);
    let wv = rows.iter().map(|r| r.1.chars().count()).max().unwrap_or(0);
    eprintln!("\n{title}");
    eprintln!("+-{}-+-{}-+", "-".repeat(w), "-".repeat(wv));
    for (k, v) in rows {
        eprintln!(
            "| {k}{} | {}{v} |",
            " ".repeat(w - k.chars().count()),
            " ".repeat(wv - v.chars().count())
        );
    }
    eprintln!("+-{}-+-{}-+", "-".repeat(w), "-".repeat(wv));
}

// ---------------------------------------------------------------------------------------

/// The longest stretch of `[from, to]` without an acknowledgement (`acks` sorted).
fn longest_gap(acks: &[Instant], from: Instant, to: Instant) -> Duration {
    let mut prev = from;
    let mut worst = Duration::ZERO;
    for &t in acks.iter().filter(|t| **t >= from && **t <= to) {
        worst = worst.max(t - prev);
        prev = t;
    }
    worst.max(to.saturating_duration_since(prev))
}

#[derive(Default)]
struct FaultLog {
    counts: BTreeMap<Fault, u64>,
    /// Per kind, the longest time without any acknowledged batch after it.
    longest_gap: BTreeMap<Fault, Duration>,
    /// Leader freezes during which another coordinator took over.
    takeovers_during_stop: u64,
    /// Walsenders terminated (rows pg_terminate_backend answered).
    walsenders: u64,
    /// Processes that exited without being killed by the schedule (name, status, log tail).
    unexpected_exits: Vec<String>,
    timeline: Vec<String>,
}

/// The last `n` lines of a process's log, without colours and debug lines.
fn log_tail(n: &freshet_integration_tests::procs::Node, lines: usize) -> String {
    let text = plain_log(n);
    let kept: Vec<&str> = text.lines().filter(|l| !l.contains(" DEBUG ")).collect();
    kept[kept.len().saturating_sub(lines)..].join("\n")
}

/// Restarts, with a fresh fault seed, any process that exited by itself (a supervisor's
/// job), recording it as a finding.
fn revive_exited(c: &mut ProcCluster, rng: &mut StdRng, log: &mut FaultLog, t0: Instant) {
    for i in 0..c.coordinators.len() {
        if let Some(st) = c.coordinators[i].proc.try_exit() {
            let tail = log_tail(&c.coordinators[i], 15);
            log.unexpected_exits.push(format!(
                "{:>6.1}s coordinator-{i} exited by itself ({st}); last lines:\n{}",
                t0.elapsed().as_secs_f64(),
                tail
            ));
            let cfg = process_config(c, &format!("coordinator-{i}"), Some(fault_seed(rng)));
            c.restart_coordinator(i, &cfg, FAULT_FLAGS);
        }
    }
    for i in 0..c.workers.len() {
        if let Some(st) = c.workers[i].proc.try_exit() {
            let tail = log_tail(&c.workers[i], 15);
            log.unexpected_exits.push(format!(
                "{:>6.1}s worker-{i} exited by itself ({st}); last lines:\n{}",
                t0.elapsed().as_secs_f64(),
                tail
            ));
            let cfg = process_config(c, &format!("worker-{i}"), Some(fault_seed(rng)));
            c.restart_worker(i, &cfg, FAULT_FLAGS);
        }
    }
}

async fn inject(
    fault: Fault,
    c: &mut ProcCluster,
    pg: &Postgres,
    rng: &mut StdRng,
    log: &mut FaultLog,
    t0: Instant,
) {
    let at = t0.elapsed().as_secs_f64();
    let line = match fault {
        Fault::LeaderKill => {
            let (l, epoch) = wait_for_leader(c, Duration::from_secs(60)).await;
            c.coordinators[l].proc.kill9();
            let down = Duration::from_millis(rng.gen_range(300..3000));
            tokio::time::sleep(down).await;
            let cfg = process_config(c, &format!("coordinator-{l}"), Some(fault_seed(rng)));
            tokio::task::block_in_place(|| c.restart_coordinator(l, &cfg, FAULT_FLAGS));
            format!("kill -9 coordinator-{l} (leader, epoch {epoch}); restarted after {down:?}")
        }
        Fault::WorkerKill => {
            let w = rng.gen_range(0..c.workers.len());
            c.workers[w].proc.kill9();
            let down = Duration::from_millis(rng.gen_range(300..3000));
            tokio::time::sleep(down).await;
            let cfg = process_config(c, &format!("worker-{w}"), Some(fault_seed(rng)));
            tokio::task::block_in_place(|| c.restart_worker(w, &cfg, FAULT_FLAGS));
            format!("kill -9 worker-{w}; restarted after {down:?}")
        }
        Fault::LeaderStop => {
            let (l, epoch) = wait_for_leader(c, Duration::from_secs(60)).await;
            let frozen = LEASE_TTL + Duration::from_millis(rng.gen_range(1500..3500));
            c.coordinators[l].proc.pause();
            let end = Instant::now() + frozen;
            let mut took_over = None;
            while Instant::now() < end {
                if took_over.is_none()
                    && let Some((n, e)) = find_leader_except(c, Some(l)).await
                    && n != l
                    && e > epoch
                {
                    took_over = Some((n, e, Instant::now() + frozen - end));
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            c.coordinators[l].proc.resume();
            if took_over.is_some() {
                log.takeovers_during_stop += 1;
            }
            format!(
                "SIGSTOP coordinator-{l} (leader, epoch {epoch}) for {frozen:?}, SIGCONT; {}",
                match took_over {
                    Some((n, e, after)) =>
                        format!("coordinator-{n} took over (epoch {e}) {after:.1?} into the freeze"),
                    None => "no takeover seen during the freeze".into(),
                }
            )
        }
        Fault::EtcdRestart => {
            c.etcd.kill9();
            let down = Duration::from_millis(rng.gen_range(500..3500));
            tokio::time::sleep(down).await;
            tokio::task::block_in_place(|| c.etcd.restart());
            format!("kill -9 etcd; restarted (same data dir and port) after {down:?}")
        }
        Fault::WalsenderTerminate => {
            let out = pg.psql("SELECT pg_terminate_backend(pid) FROM pg_stat_replication");
            let n = out.lines().filter(|l| l.trim() == "t").count() as u64;
            log.walsenders += n;
            format!("pg_terminate_backend: {n} walsender(s) terminated")
        }
    };
    *log.counts.entry(fault).or_default() += 1;
    eprintln!("[chaos {at:>6.1}s] {line}");
    log.timeline.push(format!("{at:>6.1}s {line}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos() {
    let seconds = env_u64("FRESHET_CHAOS_SECONDS", 60);
    let seed = env_u64("FRESHET_CHAOS_SEED", 20261201);
    let t0 = Instant::now();
    eprintln!("chaos: {seconds} s of faults, seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);

    // PostgreSQL with the mirrored table.
    let pg = Postgres::start();
    pg.psql(
        "CREATE TABLE items (id bigint PRIMARY KEY, grp int NOT NULL, val text, qty bigint NOT NULL);
         INSERT INTO items SELECT g, g % 5, 'seed' || g, 0 FROM generate_series(1, 10000) g;",
    );

    // etcd, then 2 coordinators and 3 workers, each on its own fault plan.
    // The tables live in the harness's directory, which is kept when the test fails.
    let mut c = ProcCluster::new("");
    let config = std::fs::read_to_string(&c.config).unwrap() + &base_config(&c.dir, &pg);
    std::fs::write(&c.config, config).unwrap();
    for i in 0..2 {
        let cfg = process_config(&c, &format!("coordinator-{i}"), Some(fault_seed(&mut rng)));
        c.add_coordinator_with(&cfg, FAULT_FLAGS, &[("RUST_LOG", COORDINATOR_LOG)]);
    }
    for i in 0..3 {
        let cfg = process_config(&c, &format!("worker-{i}"), Some(fault_seed(&mut rng)));
        c.add_worker_with(&cfg, FAULT_FLAGS, &[]);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    for n in c.coordinators.iter_mut().chain(c.workers.iter_mut()) {
        if let Some(st) = n.proc.try_exit() {
            panic!(
                "{} did not start ({st}):\n{}",
                n.proc.name,
                n.proc.log_text()
            );
        }
    }
    let (leader, _) = wait_for_leader(&c, Duration::from_secs(60)).await;
    c.wait_workers(leader, 3, Duration::from_secs(60)).await;
    // The source has copied the table and streams.
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let (l, _) = wait_for_leader(&c, Duration::from_secs(60)).await;
        if let Some(p) = progress(&c, l).await
            && p.source_state == "streaming"
        {
            break;
        }
        assert!(Instant::now() < end, "the source does not stream");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "[chaos {:>6.1}s] cluster up, source streaming; workloads start",
        t0.elapsed().as_secs_f64()
    );

    // Workloads.
    let running = Arc::new(AtomicBool::new(true));
    let acks: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let endpoints: Vec<String> = c.coordinators.iter().map(|n| n.endpoint.clone()).collect();
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            tokio::spawn(producer(
                p,
                endpoints.clone(),
                running.clone(),
                acks.clone(),
                seed ^ (0x9e37_79b9 * (p as u64 + 1)),
                Duration::from_secs(120),
                t0,
            ))
        })
        .collect();
    let watching = Arc::new(AtomicBool::new(true));
    let watchdog = tokio::spawn(liveness_watchdog(endpoints.clone(), watching.clone()));
    let pg_running = Arc::new(AtomicBool::new(true));
    let pg_load = {
        let (psql, port, r, s) = (pg.psql_bin(), pg.port, pg_running.clone(), seed ^ 0x5eed);
        std::thread::spawn(move || pg_workload(psql, port, r, s))
    };

    // The fault schedule: every kind once (in a seeded order), then seeded picks.
    let mut faults = FaultLog::default();
    let mut order: Vec<Fault> = Fault::ALL.to_vec();
    order.shuffle(&mut rng);
    let chaos_end = Instant::now() + Duration::from_secs(seconds);
    let mut k = 0usize;
    tokio::time::sleep(Duration::from_millis(rng.gen_range(1000..2500))).await;
    while Instant::now() < chaos_end {
        let fault = if k < order.len() {
            order[k]
        } else {
            *Fault::ALL.choose(&mut rng).unwrap()
        };
        k += 1;
        let before = acks.lock().unwrap().len();
        let started = Instant::now();
        inject(fault, &mut c, &pg, &mut rng, &mut faults, t0).await;
        let gap = Duration::from_millis(rng.gen_range(1500..4000));
        tokio::time::sleep(gap).await;
        tokio::task::block_in_place(|| revive_exited(&mut c, &mut rng, &mut faults, t0));
        let (n, gap) = {
            let a = acks.lock().unwrap();
            (
                a.len() - before,
                longest_gap(&a[before..], started, Instant::now()),
            )
        };
        let worst = faults.longest_gap.entry(fault).or_default();
        *worst = (*worst).max(gap);
        let line = format!(
            "{n} batches acknowledged until the next fault; longest time without an acknowledgement {:.1} s",
            gap.as_secs_f64()
        );
        eprintln!("[chaos {:>6.1}s]   {line}", t0.elapsed().as_secs_f64());
        if let Some(l) = faults.timeline.last_mut() {
            l.push_str(&format!("\n         {line}"));
        }
    }
    let chaos_done = t0.elapsed();

    // Workloads off: each producer finishes its batch in flight (retried until acknowledged).
    running.store(false, Ordering::SeqCst);
    pg_running.store(false, Ordering::SeqCst);
    let pg_txns = pg_load.join().expect("the PostgreSQL workload failed");
    let mut reports = Vec::new();
    let mut producer_failures = Vec::new();
    for h in producers {
        let r = h.await.unwrap();
        if let Some(f) = &r.failure {
            producer_failures.push(f.clone());
        }
        reports.push(r);
    }
    eprintln!(
        "[chaos {:>6.1}s] workloads stopped",
        t0.elapsed().as_secs_f64()
    );

    // Still under store faults: does everything get applied? (Bounded; reported.)
    let under_faults_deadline = Instant::now() + Duration::from_secs(15);
    let mut converged_under_faults = None;
    let quiet = Instant::now();
    while Instant::now() < under_faults_deadline {
        if let Some((l, _)) = find_leader(&c).await
            && let Some(p) = progress(&c, l).await
            && p.ingest_pending == 0
            && p.mirror_pending == 0
            && p.source_state == "streaming"
            && p.source_lag == 0
        {
            converged_under_faults = Some(quiet.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::task::block_in_place(|| revive_exited(&mut c, &mut rng, &mut faults, t0));

    // Restart every process without fault injection and wait until everything is applied:
    // nothing pending, the source caught up, applied sequences stable, the mirror equal.
    watching.store(false, Ordering::SeqCst);
    let stalls = watchdog.await.unwrap();
    let store_faults = store_faults_in_logs(&c);
    let events: Vec<(String, String)> = LOG_EVENTS
        .iter()
        .map(|(label, needle)| (label.to_string(), count_in_logs(&c, needle).to_string()))
        .collect();
    let base = c.config.clone();
    tokio::task::block_in_place(|| {
        for i in 0..c.coordinators.len() {
            c.restart_coordinator(i, &base, &[]);
        }
        for i in 0..c.workers.len() {
            c.restart_worker(i, &base, &[]);
        }
    });
    let (leader, _) = wait_for_leader(&c, Duration::from_secs(60)).await;
    c.wait_workers(leader, 3, Duration::from_secs(60)).await;
    let mirror_uri = c.dir.join(MIRROR).display().to_string();
    let ingest_uri = c.dir.join(TABLE).display().to_string();
    let end = Instant::now() + Duration::from_secs(120);
    let mut last: Option<Progress> = None;
    let mut stable_since: Option<Instant> = None;
    let final_progress = loop {
        let (l, _) = wait_for_leader(&c, Duration::from_secs(60)).await;
        let p = progress(&c, l).await;
        if let Some(p) = &p {
            let settled = p.ingest_pending == 0
                && p.mirror_pending == 0
                && p.source_state == "streaming"
                && p.source_lag == 0;
            let same = last.as_ref().is_some_and(|q| {
                q.ingest_applied == p.ingest_applied && q.mirror_applied == p.mirror_applied
            });
            if settled && same {
                let since = *stable_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= Duration::from_secs(2)
                    && pg_rows(&pg) == delta_rows(&mirror_uri).await
                {
                    break p.clone();
                }
            } else {
                stable_since = None;
            }
        }
        if Instant::now() > end {
            panic!(
                "not converged within 120 s after the restart without faults: {p:?}\nfault timeline:\n{}",
                faults.timeline.join("\n")
            );
        }
        last = p;
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let converged_at = t0.elapsed();

    // The checks.
    let acked: Vec<Acked> = reports.iter().flat_map(|r| r.acked.clone()).collect();
    let table = ingest_rows(&ingest_uri).await;
    let ingest = judge_ingest(&acked, &table);
    let want = pg_rows(&pg);
    let got = delta_rows(&mirror_uri).await;
    let mirror_differing: Vec<_> = want
        .keys()
        .chain(got.keys())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .filter(|k| want.get(k) != got.get(k))
        .map(|k| (*k, want.get(k).cloned(), got.get(k).cloned()))
        .collect();
    let ingest_log = judge_log(Path::new(&ingest_uri));
    let mirror_log = judge_log(Path::new(&mirror_uri));

    // The figures.
    let mut rows: Vec<(String, String)> = vec![
        ("seed".into(), seed.to_string()),
        (
            "fault phase / converged at".into(),
            format!(
                "{:.0} s ({seconds} s asked) / {:.0} s",
                chaos_done.as_secs_f64(),
                converged_at.as_secs_f64()
            ),
        ),
    ];
    for f in Fault::ALL {
        rows.push((
            f.name().into(),
            format!(
                "{} (ingest stalled up to {:.1} s)",
                faults.counts.get(&f).copied().unwrap_or(0),
                faults
                    .longest_gap
                    .get(&f)
                    .copied()
                    .unwrap_or_default()
                    .as_secs_f64()
            ),
        ));
    }
    rows.push((
        "  freezes with a takeover seen".into(),
        faults.takeovers_during_stop.to_string(),
    ));
    rows.push((
        "  walsender backends terminated".into(),
        faults.walsenders.to_string(),
    ));
    rows.push((
        "processes that exited by themselves".into(),
        faults.unexpected_exits.len().to_string(),
    ));
    for ((place, op, kind), n) in &store_faults {
        rows.push((format!("store: {place}: {op} {kind}"), n.to_string()));
    }
    print_table("faults injected", &rows);
    print_table(
        "what the processes logged during the chaos phase (counted lines)",
        &events,
    );

    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for r in &reports {
        for (k, v) in &r.errors {
            *errors.entry(k.clone()).or_default() += v;
        }
    }
    let rows: Vec<(String, String)> = vec![
        ("producers".into(), PRODUCERS.to_string()),
        ("batches acknowledged".into(), ingest.batches.to_string()),
        (
            "rows acknowledged".into(),
            acked
                .iter()
                .map(|a| a.changes.len())
                .sum::<usize>()
                .to_string(),
        ),
        (
            "  acknowledged as duplicate (retry of a durable batch)".into(),
            ingest.duplicates_acked.to_string(),
        ),
        (
            "  acknowledged after retries".into(),
            acked.iter().filter(|a| a.attempts > 1).count().to_string(),
        ),
        ("failed attempts by code".into(), format!("{errors:?}")),
        (
            "leader hints followed".into(),
            reports
                .iter()
                .map(|r| r.hints_followed)
                .sum::<u64>()
                .to_string(),
        ),
        (
            "longest send-to-ack".into(),
            format!(
                "{} ms",
                reports.iter().map(|r| r.longest_ms).max().unwrap_or(0)
            ),
        ),
        (
            "FAILED_PRECONDITION answers (retried)".into(),
            reports
                .iter()
                .map(|r| r.refusals.len())
                .sum::<usize>()
                .to_string(),
        ),
        ("LOST (must be 0)".into(), ingest.lost.len().to_string()),
        (
            "APPLIED TWICE (must be 0)".into(),
            ingest.applied_twice.len().to_string(),
        ),
        (
            "keys twice in the table".into(),
            ingest.doubled_keys.len().to_string(),
        ),
        (
            "rows differing from the model".into(),
            ingest.differing.len().to_string(),
        ),
        (
            "staging sequences acknowledged twice".into(),
            ingest.reused_staging_seqs.len().to_string(),
        ),
        ("ingest table rows".into(), table.len().to_string()),
        (
            "ingest Delta versions / files added".into(),
            format!("{} / {}", ingest_log.versions, ingest_log.referenced),
        ),
        (
            "  leader epochs in commits".into(),
            ingest_log.epochs.len().to_string(),
        ),
        ("PostgreSQL transactions".into(), pg_txns.to_string()),
        ("mirrored rows (PostgreSQL)".into(), want.len().to_string()),
        (
            "mirrored rows differing".into(),
            mirror_differing.len().to_string(),
        ),
        (
            "mirror Delta versions / files added".into(),
            format!("{} / {}", mirror_log.versions, mirror_log.referenced),
        ),
        (
            "referenced files missing".into(),
            (ingest_log.missing_files.len() + mirror_log.missing_files.len()).to_string(),
        ),
        (
            "leader terms that stalled (watchdog)".into(),
            stalls.len().to_string(),
        ),
        (
            "converged under store faults".into(),
            match converged_under_faults {
                Some(d) => format!("yes, {:.1} s after the workloads stopped", d.as_secs_f64()),
                None => "no, not within 15 s".into(),
            },
        ),
        ("final state".into(), format!("{final_progress:?}")),
    ];
    print_table("outcome", &rows);
    eprintln!("\nfault timeline:\n{}", faults.timeline.join("\n"));
    if let Some(r) = reports.iter().max_by_key(|r| r.longest_ms) {
        eprintln!(
            "\nthe slowest acknowledgement ({} ms): {}",
            r.longest_ms, r.longest
        );
    }

    // The verdicts (every finding named, with its evidence).
    let mut findings = Vec::new();
    let refusals: Vec<&String> = reports.iter().flat_map(|r| &r.refusals).collect();
    if !refusals.is_empty() {
        findings.push(format!(
            "FAILED_PRECONDITION ('sequence skipped') answered for a batch right after the producer's last acknowledged one (retried; the ledger check says whether anything was lost):\n  {}",
            refusals
                .iter()
                .map(|r| r.as_str())
                .collect::<Vec<_>>()
                .join("\n  ")
        ));
    }
    if !producer_failures.is_empty() {
        findings.push(format!("producers failed: {producer_failures:#?}"));
    }
    if !faults.unexpected_exits.is_empty() {
        findings.push(format!(
            "processes exited by themselves:\n{}",
            faults.unexpected_exits.join("\n\n")
        ));
    }
    if !stalls.is_empty() {
        findings.push(format!(
            "leader terms that went on without doing their job (epoch, leader, what, seconds seen):\n{}",
            stalls
                .iter()
                .map(|s| format!("  {s:?}"))
                .collect::<Vec<_>>()
                .join("\n")
        ));
    }
    if !ingest.lost.is_empty() {
        findings.push(format!(
            "acknowledged batches lost (producer, batch): {:?}",
            ingest.lost
        ));
    }
    if !ingest.applied_twice.is_empty() {
        findings.push(format!(
            "batches applied again after a newer batch (producer, batch): {:?}",
            ingest.applied_twice
        ));
    }
    if !ingest.doubled_keys.is_empty() {
        findings.push(format!(
            "keys twice in the ingest table: {:?}",
            &ingest.doubled_keys[..ingest.doubled_keys.len().min(20)]
        ));
    }
    if !ingest.differing.is_empty() {
        findings.push(format!(
            "{} ingest rows differ from the model, first (key, model, table): {:?}",
            ingest.differing.len(),
            &ingest.differing[..ingest.differing.len().min(10)]
        ));
    }
    if !ingest.reused_staging_seqs.is_empty() {
        findings.push(format!(
            "staging sequences acknowledged to two batches: {:?}",
            ingest.reused_staging_seqs
        ));
    }
    if !mirror_differing.is_empty() {
        findings.push(format!(
            "{} mirrored rows differ from PostgreSQL, first (id, PostgreSQL, Delta): {:?}",
            mirror_differing.len(),
            &mirror_differing[..mirror_differing.len().min(10)]
        ));
    }
    for (name, l) in [(TABLE, &ingest_log), (MIRROR, &mirror_log)] {
        if !l.missing_files.is_empty() {
            findings.push(format!(
                "{name}: files referenced by the Delta log are gone: {:?}",
                l.missing_files
            ));
        }
        if !l.txn_regressions.is_empty() {
            findings.push(format!(
                "{name}: txn versions that did not move forward (version, app, txn, previous): {:?}",
                l.txn_regressions
            ));
        }
        if !l.epoch_regressions.is_empty() {
            findings.push(format!(
                "{name}: commits by an older leader after a newer one (version, epoch, previous): {:?}",
                l.epoch_regressions
            ));
        }
    }
    if std::env::var_os("FRESHET_CHAOS_KEEP").is_some() {
        eprintln!("data and logs kept in {}", c.keep().display());
    }
    if !findings.is_empty() {
        let kept = c.keep();
        panic!(
            "chaos run (seed {seed}) found {} problem(s); data and logs kept in {}:\n\n{}",
            findings.len(),
            kept.display(),
            findings.join("\n\n")
        );
    }
    assert_eq!(ingest.lost.len(), 0);
    assert_eq!(ingest.applied_twice.len(), 0);
    assert!(ingest.batches > 0, "no batch was acknowledged");
}
