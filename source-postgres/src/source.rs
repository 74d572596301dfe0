//! The source itself: set up the publication and slot, take the initial snapshot of every
//! table, then poll the slot (`pg_logical_slot_peek_binary_changes`, pgoutput) and stage
//! each committed transaction into Freshet under a sequence derived from its commit LSN,
//! advancing the slot only past what is durably staged.
//!
//! Sequences: `commit_lsn << 16 | n`, where `n` orders the pieces of one transaction for one
//! table (rows, a TRUNCATE, more rows). The snapshot of a slot created at `L0` is staged at
//! `L0 << 16 | 1..`, after a truncate at `L0 << 16`, so it sorts before every streamed
//! transaction (all commit after `L0`). This needs LSNs below 2^47 (128 TiB of WAL).
//!
//! The seam: the slot is created first (consistent point `L0`), then the snapshot is read
//! in a REPEATABLE READ transaction whose `pg_current_snapshot()` is recorded. A streamed
//! transaction whose xid that snapshot already sees is skipped; every other one is applied,
//! so nothing is missed or applied twice.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::{ArrayRef, Int8Array};
use arrow::datatypes::{DataType, SchemaRef};
use arrow::record_batch::RecordBatch;
use freshet_common::changes::{OP_DELETE, OP_UPSERT, change_schema};
use freshet_common::schema::SchemaSpec;
use freshet_common::table::{DEFAULT_TARGET_FILE_SIZE, TableDef};
use freshet_coordinator::Coordinator;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_postgres::{Client, NoTls};

use crate::config::{SourceConfig, SourceTable};
use crate::error::{Result, SourceError};
use crate::pgoutput::{Message, Value, decode, format_lsn, parse_lsn};
use crate::schema::{PgTable, describe};
use crate::types::array_from_text;

/// Where the source stands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceStatus {
    /// `starting`, `snapshotting`, `streaming` or `error`.
    pub state: String,
    /// The slot's confirmed position.
    pub confirmed_lsn: u64,
    /// WAL bytes between the server's current position and the confirmed one.
    pub lag_bytes: u64,
    /// The server position up to which the last complete poll read (everything committed
    /// before it is staged).
    pub polled_lsn: u64,
    /// Rows copied by the snapshot so far.
    pub snapshot_rows: u64,
    /// Transactions applied since start.
    pub transactions: u64,
    /// The error, in state `error`.
    pub error: String,
}

/// A running source.
pub struct PostgresSource {
    status: Arc<Mutex<SourceStatus>>,
    stop: watch::Sender<bool>,
    /// The configuration.
    pub config: SourceConfig,
}

impl PostgresSource {
    /// Where the source stands.
    pub fn status(&self) -> SourceStatus {
        self.status.lock().expect("lock").clone()
    }

    /// Stops polling.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

impl freshet_coordinator::Source for PostgresSource {
    fn info(&self) -> freshet_proto::admin::v1::SourceInfo {
        let s = self.status();
        freshet_proto::admin::v1::SourceInfo {
            name: self.config.name.clone(),
            kind: "postgres".into(),
            slot: self.config.slot.clone(),
            publication: self.config.publication.clone(),
            state: s.state,
            confirmed_lsn: format_lsn(s.confirmed_lsn),
            lag_bytes: s.lag_bytes,
            snapshot_rows: s.snapshot_rows,
            transactions: s.transactions,
            error: s.error,
            tables: self.config.tables.iter().map(|t| t.name.clone()).collect(),
        }
    }

    fn stop(&self) {
        PostgresSource::stop(self);
    }
}

/// A source that could not start: shown in the admin API with its error.
pub struct FailedSource {
    /// Its configuration.
    pub config: SourceConfig,
    /// Why it failed.
    pub error: String,
}

impl freshet_coordinator::Source for FailedSource {
    fn info(&self) -> freshet_proto::admin::v1::SourceInfo {
        freshet_proto::admin::v1::SourceInfo {
            name: self.config.name.clone(),
            kind: self.config.kind.clone(),
            slot: self.config.slot.clone(),
            publication: self.config.publication.clone(),
            state: "error".into(),
            error: self.error.clone(),
            tables: self.config.tables.iter().map(|t| t.name.clone()).collect(),
            ..Default::default()
        }
    }

    fn stop(&self) {}
}

/// The coordinator hook that starts every configured source on a new term.
pub fn starter() -> freshet_coordinator::SourceStarter {
    Arc::new(|c: Arc<Coordinator>| {
        Box::pin(async move {
            let configs = c.inner().config.sources.clone();
            for cfg in configs {
                match start(cfg.clone(), c.clone()).await {
                    Ok(s) => {
                        tracing::info!(source = %cfg.name, "source started");
                        c.add_source(Arc::new(s));
                    }
                    Err(e) => {
                        tracing::error!(source = %cfg.name, error = %e, "source could not start");
                        c.add_source(Arc::new(FailedSource {
                            config: cfg,
                            error: e.to_string(),
                        }));
                    }
                }
            }
        })
    })
}

/// What is recorded beside a table once its snapshot is staged.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct SnapshotMarker {
    source: String,
    slot: String,
    consistent_lsn: u64,
    xmin: u64,
    xmax: u64,
    xip: Vec<u64>,
}

impl SnapshotMarker {
    /// Whether the snapshot already contains transaction `xid` (32-bit, from pgoutput).
    fn sees(&self, xid: u32) -> bool {
        // Compare in the snapshot's epoch (no wraparound between slot and snapshot).
        let full = (self.xmin & !0xffff_ffff) | xid as u64;
        full < self.xmin || (full < self.xmax && !self.xip.contains(&full))
    }
}

const MARKER: &str = "_freshet/source.json";

fn seq(lsn: u64, n: u64) -> u64 {
    (lsn << 16) | n
}

struct Mirror {
    cfg: SourceTable,
    pg: PgTable,
    schema: SchemaRef,
    types: Vec<DataType>,
    key_idx: Vec<usize>,
}

/// A change row: op and values in PostgreSQL column order.
type Row = (i8, Vec<Value>);

impl Mirror {
    fn batch(&self, rows: &[Row]) -> Result<RecordBatch> {
        let mut cols: Vec<ArrayRef> = Vec::with_capacity(self.types.len() + 1);
        for (i, t) in self.types.iter().enumerate() {
            let vals: Vec<Option<&str>> = rows
                .iter()
                .map(|(_, v)| match v.get(i).unwrap_or(&Value::Null) {
                    Value::Text(s) => Ok(Some(s.as_str())),
                    Value::Null => Ok(None),
                    Value::Unchanged => Err(SourceError::Value {
                        table: self.pg.qualified.clone(),
                        column: self.pg.columns[i].name.clone(),
                        message: "unchanged TOASTed value without an old value (set REPLICA IDENTITY FULL on the table)".into(),
                    }),
                })
                .collect::<Result<_>>()?;
            cols.push(array_from_text(
                &vals,
                t,
                &self.pg.qualified,
                &self.pg.columns[i].name,
            )?);
        }
        cols.push(std::sync::Arc::new(Int8Array::from(
            rows.iter().map(|r| r.0).collect::<Vec<_>>(),
        )));
        RecordBatch::try_new(self.schema.clone(), cols)
            .map_err(|e| SourceError::Protocol(format!("{}: {e}", self.pg.qualified)))
    }

    fn key_of<'a>(&self, v: &'a [Value]) -> Vec<&'a Value> {
        self.key_idx.iter().map(|i| &v[*i]).collect()
    }
}

async fn connect(config: &SourceConfig) -> Result<Client> {
    let pg = crate::config::pg_config(config)?;
    let (client, conn) = pg.connect(NoTls).await.map_err(SourceError::pg(format!(
        "connecting source '{}'",
        config.name
    )))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::warn!(error = %e, "postgres connection ended");
        }
    });
    client
        .batch_execute(
            "SET TIME ZONE 'UTC'; SET extra_float_digits = 3; SET DateStyle = 'ISO, YMD'",
        )
        .await
        .map_err(SourceError::pg("session settings"))?;
    Ok(client)
}

/// Starts a source: checks and maps its tables (creating the Freshet tables), ensures the
/// publication, then snapshots (when needed) and streams in the background.
pub async fn start(config: SourceConfig, coordinator: Arc<Coordinator>) -> Result<PostgresSource> {
    let client = connect(&config).await?;
    let mut mirrors = Vec::new();
    for t in &config.tables {
        let (schema, table) = t.qualified();
        let pg = describe(&client, &schema, &table).await?;
        let spec = SchemaSpec {
            fields: pg.column_specs(),
        };
        let arrow_schema = spec.to_arrow()?;
        let def = TableDef::new(
            &t.name,
            &t.uri,
            arrow_schema,
            pg.key.clone(),
            t.partition_by.clone(),
            t.target_file_size.unwrap_or(DEFAULT_TARGET_FILE_SIZE),
        )?;
        match coordinator.create_table(def.clone()).await {
            Ok(_) | Err(freshet_common::error::Error::TableExists(_)) => {}
            Err(e) => return Err(e.into()),
        }
        let def = coordinator.table(&t.name)?.def.clone();
        let types = def
            .schema
            .fields()
            .iter()
            .map(|f| f.data_type().clone())
            .collect();
        let key_idx = pg
            .key
            .iter()
            .map(|k| {
                pg.columns
                    .iter()
                    .position(|c| &c.name == k)
                    .expect("key column")
            })
            .collect();
        mirrors.push(Mirror {
            cfg: t.clone(),
            schema: change_schema(&def),
            pg,
            types,
            key_idx,
        });
    }
    ensure_publication(&client, &config, &mirrors).await?;
    let status = Arc::new(Mutex::new(SourceStatus {
        state: "starting".into(),
        ..Default::default()
    }));
    let (stop, stop_rx) = watch::channel(false);
    let run_status = status.clone();
    let run_config = config.clone();
    tokio::spawn(async move {
        let r = run(
            &run_config,
            &coordinator,
            client,
            mirrors,
            &run_status,
            stop_rx,
        )
        .await;
        if let Err(e) = r {
            tracing::error!(source = %run_config.name, error = %e, "source stopped");
            let mut s = run_status.lock().expect("lock");
            s.state = "error".into();
            s.error = e.to_string();
        }
    });
    Ok(PostgresSource {
        status,
        stop,
        config,
    })
}

async fn ensure_publication(
    client: &Client,
    config: &SourceConfig,
    mirrors: &[Mirror],
) -> Result<()> {
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&config.publication],
        )
        .await
        .map_err(SourceError::pg("reading publications"))?
        .is_some();
    let quoted: Vec<String> = mirrors
        .iter()
        .map(|m| {
            let (s, t) = m.cfg.qualified();
            format!("\"{s}\".\"{t}\"")
        })
        .collect();
    if !exists {
        client
            .batch_execute(&format!(
                "CREATE PUBLICATION {} FOR TABLE {}",
                config.publication,
                quoted.join(", ")
            ))
            .await
            .map_err(SourceError::pg("creating the publication"))?;
        return Ok(());
    }
    let published: Vec<String> = client
        .query(
            "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = $1",
            &[&config.publication],
        )
        .await
        .map_err(SourceError::pg("reading the publication"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for (m, q) in mirrors.iter().zip(&quoted) {
        if !published.contains(&m.pg.qualified) {
            client
                .batch_execute(&format!(
                    "ALTER PUBLICATION {} ADD TABLE {q}",
                    config.publication
                ))
                .await
                .map_err(SourceError::pg("adding a table to the publication"))?;
        }
    }
    Ok(())
}

async fn read_marker(coordinator: &Coordinator, m: &Mirror) -> Result<Option<SnapshotMarker>> {
    let t = coordinator.table(&m.cfg.name)?;
    let b = freshet_common::storage::read_object(&t.store, &Path::from(MARKER)).await?;
    Ok(b.and_then(|b| serde_json::from_slice(&b).ok()))
}

async fn write_marker(
    coordinator: &Coordinator,
    m: &Mirror,
    marker: &SnapshotMarker,
) -> Result<()> {
    let t = coordinator.table(&m.cfg.name)?;
    let body = serde_json::to_vec_pretty(marker).expect("json");
    t.store
        .put(&Path::from(MARKER), PutPayload::from(body))
        .await
        .map_err(|e| freshet_common::error::Error::store(MARKER, e))?;
    Ok(())
}

async fn run(
    config: &SourceConfig,
    coordinator: &Arc<Coordinator>,
    client: Client,
    mut mirrors: Vec<Mirror>,
    status: &Arc<Mutex<SourceStatus>>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let slot_lsn: Option<String> = client
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&config.slot],
        )
        .await
        .map_err(SourceError::pg("reading the slot"))?
        .and_then(|r| r.get(0));
    let mut markers = Vec::new();
    for m in &mirrors {
        markers.push(
            read_marker(coordinator, m)
                .await?
                .filter(|x| x.slot == config.slot),
        );
    }
    let marker = if slot_lsn.is_some() && markers.iter().all(|m| m.is_some()) {
        markers[0].clone().expect("all present")
    } else {
        // No slot, or a snapshot that did not finish: start over from a new slot.
        if slot_lsn.is_some() {
            tracing::warn!(slot = %config.slot, "snapshot incomplete; dropping the slot and starting over");
            client
                .execute("SELECT pg_drop_replication_slot($1)", &[&config.slot])
                .await
                .map_err(SourceError::pg("dropping the slot"))?;
        }
        status.lock().expect("lock").state = "snapshotting".into();
        snapshot(config, coordinator, &mirrors, status).await?
    };
    status.lock().expect("lock").state = "streaming".into();
    stream(
        config,
        coordinator,
        &client,
        &mut mirrors,
        &marker,
        status,
        &mut stop,
    )
    .await
}

async fn snapshot(
    config: &SourceConfig,
    coordinator: &Arc<Coordinator>,
    mirrors: &[Mirror],
    status: &Arc<Mutex<SourceStatus>>,
) -> Result<SnapshotMarker> {
    let slot_client = connect(config).await?;
    let l0: String = slot_client
        .query_one(
            "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&config.slot],
        )
        .await
        .map_err(SourceError::pg("creating the replication slot"))?
        .get(0);
    let l0 = parse_lsn(&l0)?;
    let mut client = connect(config).await?;
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(SourceError::pg("starting the snapshot transaction"))?;
    let snap: String = tx
        .query_one("SELECT pg_current_snapshot()::text", &[])
        .await
        .map_err(SourceError::pg("reading the snapshot"))?
        .get(0);
    let mut parts = snap.split(':');
    let num = |s: Option<&str>| s.and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    let xmin = num(parts.next());
    let xmax = num(parts.next());
    let xip = parts
        .next()
        .unwrap_or("")
        .split(',')
        .filter_map(|x| x.parse().ok())
        .collect();
    let marker = SnapshotMarker {
        source: config.name.clone(),
        slot: config.slot.clone(),
        consistent_lsn: l0,
        xmin,
        xmax,
        xip,
    };
    tracing::info!(source = %config.name, slot = %config.slot, lsn = %format_lsn(l0), snapshot = %snap, "slot created; copying tables");
    for m in mirrors {
        // Whatever an interrupted earlier snapshot left goes first.
        coordinator.truncate(&m.cfg.name, seq(l0, 0)).await?;
        let count: i64 = tx
            .query_one(
                &format!("SELECT count(*) FROM {}", quote(&m.pg.qualified)),
                &[],
            )
            .await
            .map_err(SourceError::pg(format!("counting {}", m.pg.qualified)))?
            .get(0);
        let batch_rows = config
            .snapshot_batch_rows
            .max(1)
            .max((count as usize).div_ceil(60_000));
        let cols: Vec<String> =
            m.pg.columns
                .iter()
                .map(|c| format!("\"{}\"::text", c.name.replace('"', "\"\"")))
                .collect();
        tx.batch_execute(&format!(
            "DECLARE freshet_snapshot NO SCROLL CURSOR FOR SELECT {} FROM {}",
            cols.join(", "),
            quote(&m.pg.qualified)
        ))
        .await
        .map_err(SourceError::pg(format!("reading {}", m.pg.qualified)))?;
        let mut chunk = 0u64;
        let mut copied = 0u64;
        loop {
            let rows = tx
                .query(&format!("FETCH {batch_rows} FROM freshet_snapshot"), &[])
                .await
                .map_err(SourceError::pg(format!("reading {}", m.pg.qualified)))?;
            if rows.is_empty() {
                break;
            }
            let change_rows: Vec<Row> = rows
                .iter()
                .map(|r| {
                    let vals = (0..m.pg.columns.len())
                        .map(|i| match r.get::<_, Option<String>>(i) {
                            Some(s) => Value::Text(s),
                            None => Value::Null,
                        })
                        .collect();
                    (OP_UPSERT, vals)
                })
                .collect();
            chunk += 1;
            coordinator
                .stage_changes(&m.cfg.name, m.batch(&change_rows)?, seq(l0, chunk), None)
                .await?;
            copied += change_rows.len() as u64;
            status.lock().expect("lock").snapshot_rows += change_rows.len() as u64;
            tracing::info!(table = %m.cfg.name, copied, of = count, "snapshot progress");
        }
        tx.batch_execute("CLOSE freshet_snapshot")
            .await
            .map_err(SourceError::pg("closing the cursor"))?;
    }
    tx.commit()
        .await
        .map_err(SourceError::pg("ending the snapshot"))?;
    for m in mirrors {
        write_marker(coordinator, m, &marker).await?;
    }
    Ok(marker)
}

fn quote(qualified: &str) -> String {
    qualified
        .split('.')
        .map(|p| format!("\"{}\"", p.replace('"', "\"\"")))
        .collect::<Vec<_>>()
        .join(".")
}

/// Evolves a mirrored table for columns added at the end in PostgreSQL. A column added
/// with a default that existing rows take (`atthasmissing`) would need every existing Delta
/// row rewritten: refused (the table is paused) rather than left null.
async fn evolve(
    client: &Client,
    coordinator: &Arc<Coordinator>,
    m: &mut Mirror,
    oid: u32,
    columns: &[crate::pgoutput::RelationColumn],
) -> Result<()> {
    let added: Vec<&crate::pgoutput::RelationColumn> =
        columns[m.pg.columns.len()..].iter().collect();
    let names: Vec<String> = added.iter().map(|c| c.name.clone()).collect();
    let with_default: Vec<String> = client
        .query(
            "SELECT attname::text FROM pg_attribute WHERE attrelid = $1::int8::oid AND atthasmissing AND attname = ANY($2)",
            &[&(oid as i64), &names],
        )
        .await
        .map_err(SourceError::pg("reading added columns"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if !with_default.is_empty() {
        let _ = coordinator.set_paused(&m.cfg.name, true).await;
        return Err(SourceError::Table {
            table: m.pg.qualified.clone(),
            message: format!(
                "column(s) {} were added with a default that existing rows take; Freshet would have to rewrite every row, so the table '{}' is paused and the source stopped",
                with_default.join(", "),
                m.cfg.name
            ),
        });
    }
    let mut pg = m.pg.clone();
    for c in &added {
        pg.columns.push(crate::schema::PgColumn {
            name: c.name.clone(),
            type_oid: c.type_oid,
            type_mod: c.type_mod,
            not_null: false,
            type_name: String::new(),
        });
    }
    let current = coordinator.table(&m.cfg.name)?.def.clone();
    let spec = SchemaSpec {
        fields: pg.column_specs(),
    };
    let def = TableDef::new(
        &current.name,
        &current.uri,
        spec.to_arrow()?,
        current.primary_key.clone(),
        current.partition_by.clone(),
        current.target_file_size,
    )?;
    coordinator.add_columns(def).await?;
    let def = coordinator.table(&m.cfg.name)?.def.clone();
    m.types = def
        .schema
        .fields()
        .iter()
        .map(|f| f.data_type().clone())
        .collect();
    m.schema = change_schema(&def);
    m.pg = pg;
    tracing::info!(table = %m.cfg.name, added = ?names, "schema evolved");
    Ok(())
}

/// Fills unchanged TOASTed values (pgoutput's `u`, sent without the old row unless the
/// table has REPLICA IDENTITY FULL) from the row as PostgreSQL holds it now. The value may
/// be newer than this transaction's; every later change of the row follows in the stream,
/// so the Delta table converges to PostgreSQL's content. A row deleted since reads as null
/// until its delete arrives.
async fn fill_unchanged(client: &Client, m: &Mirror, new: &mut [Value]) -> Result<()> {
    let missing: Vec<usize> = (0..new.len())
        .filter(|j| new[*j] == Value::Unchanged)
        .collect();
    let cols: Vec<String> = missing
        .iter()
        .map(|j| format!("\"{}\"::text", m.pg.columns[*j].name.replace('"', "\"\"")))
        .collect();
    let mut params: Vec<String> = Vec::new();
    let mut conds: Vec<String> = Vec::new();
    for (n, k) in m.key_idx.iter().enumerate() {
        let c = &m.pg.columns[*k];
        let Value::Text(v) = &new[*k] else {
            return Err(SourceError::Protocol(format!(
                "{}: update without its key value",
                m.pg.qualified
            )));
        };
        params.push(v.clone());
        conds.push(format!(
            "\"{}\" = ${}::text::{}",
            c.name.replace('"', "\"\""),
            n + 1,
            c.type_name
        ));
    }
    let sql = format!(
        "SELECT {} FROM {} WHERE {}",
        cols.join(", "),
        quote(&m.pg.qualified),
        conds.join(" AND ")
    );
    let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
        .iter()
        .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync))
        .collect();
    let row = client
        .query_opt(&sql, &refs)
        .await
        .map_err(SourceError::pg(format!(
            "reading unchanged values of {}",
            m.pg.qualified
        )))?;
    for (n, j) in missing.iter().enumerate() {
        new[*j] = match &row {
            Some(r) => match r.get::<_, Option<String>>(n) {
                Some(s) => Value::Text(s),
                None => Value::Null,
            },
            None => Value::Null,
        };
    }
    Ok(())
}

/// One decoded transaction's work, in order.
enum Event {
    Rows(usize, Vec<Row>),
    Truncate(usize),
}

async fn stream(
    config: &SourceConfig,
    coordinator: &Arc<Coordinator>,
    client: &Client,
    mirrors: &mut [Mirror],
    marker: &SnapshotMarker,
    status: &Arc<Mutex<SourceStatus>>,
    stop: &mut watch::Receiver<bool>,
) -> Result<()> {
    let by_name: HashMap<String, usize> = mirrors
        .iter()
        .enumerate()
        .map(|(i, m)| (m.pg.qualified.clone(), i))
        .collect();
    let mut relations: HashMap<u32, usize> = HashMap::new();
    let start: Option<String> = client
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&config.slot],
        )
        .await
        .map_err(SourceError::pg("reading the slot"))?
        .get(0);
    status.lock().expect("lock").confirmed_lsn =
        start.and_then(|x| parse_lsn(&x).ok()).unwrap_or(0);
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        // Read up to the server's flushed position as of now; when everything up to it was
        // returned (fewer rows than the limit), the slot can be confirmed up to it even if
        // the tail held no change for this publication.
        let upto: String = client
            .query_one("SELECT pg_current_wal_flush_lsn()::text", &[])
            .await
            .map_err(SourceError::pg("reading the server position"))?
            .get(0);
        let upto = parse_lsn(&upto)?;
        const LIMIT: i32 = 20_000;
        let rows = client
            .query(
                "SELECT data FROM pg_logical_slot_peek_binary_changes($1, $2::text::pg_lsn, $3, \
                 'proto_version', '1', 'publication_names', $4)",
                &[&config.slot, &format_lsn(upto), &LIMIT, &config.publication],
            )
            .await
            .map_err(SourceError::pg("reading the slot"))?;
        let drained = rows.len() < LIMIT as usize;
        tracing::debug!(upto = %format_lsn(upto), rows = rows.len(), "slot polled");
        let mut events: Vec<Event> = Vec::new();
        let mut xid = 0u32;
        let mut commit_ts = 0i64;
        let mut last_end = None;
        for r in &rows {
            let data: &[u8] = r.get(0);
            match decode(data)? {
                Message::Begin {
                    xid: x,
                    commit_ts: ts,
                    ..
                } => {
                    xid = x;
                    commit_ts = ts;
                    events.clear();
                }
                Message::Relation {
                    oid,
                    namespace,
                    name,
                    columns,
                    ..
                } => {
                    let q = format!("{namespace}.{name}");
                    let Some(&i) = by_name.get(q.as_str()) else {
                        continue;
                    };
                    let m = &mirrors[i];
                    let common = columns.iter().zip(&m.pg.columns).all(|(a, b)| {
                        a.name == b.name && a.type_oid == b.type_oid && a.type_mod == b.type_mod
                    });
                    if common && columns.len() > m.pg.columns.len() {
                        // ALTER TABLE ADD COLUMN: evolve the Delta table first.
                        evolve(client, coordinator, &mut mirrors[i], oid, &columns).await?;
                    } else if !common {
                        // A dropped, renamed or retyped column: writing on would be wrong.
                        let table = mirrors[i].cfg.name.clone();
                        let _ = coordinator.set_paused(&table, true).await;
                        return Err(SourceError::Table {
                            table: q,
                            message: format!(
                                "its columns changed incompatibly in PostgreSQL (now: {}); the Freshet table '{table}' is paused and the source stopped before writing anything under the new shape",
                                columns
                                    .iter()
                                    .map(|c| c.name.as_str())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        });
                    }
                    // Fewer columns than known: an older shape replayed; rows are padded.
                    relations.insert(oid, i);
                }
                Message::Insert { oid, new } => {
                    push(&mut events, &relations, oid, (OP_UPSERT, new))
                }
                Message::Update { oid, old, new } => {
                    let Some(&i) = relations.get(&oid) else {
                        continue;
                    };
                    let m = &mirrors[i];
                    let mut new = new;
                    if let Some(old) = &old {
                        // A changed key is a delete of the old key plus an insert.
                        if m.key_of(old) != m.key_of(&new) {
                            push(&mut events, &relations, oid, (OP_DELETE, old.clone()));
                        }
                        // Unchanged TOASTed values keep the old value (sent with REPLICA IDENTITY FULL).
                        for (j, v) in new.iter_mut().enumerate() {
                            if *v == Value::Unchanged && !matches!(old[j], Value::Unchanged) {
                                *v = old[j].clone();
                            }
                        }
                    }
                    if new.contains(&Value::Unchanged) {
                        fill_unchanged(client, m, &mut new).await?;
                    }
                    push(&mut events, &relations, oid, (OP_UPSERT, new));
                }
                Message::Delete { oid, old } => {
                    push(&mut events, &relations, oid, (OP_DELETE, old))
                }
                Message::Truncate { oids } => {
                    for oid in oids {
                        if let Some(&i) = relations.get(&oid) {
                            events.push(Event::Truncate(i));
                        }
                    }
                }
                Message::Commit {
                    commit_lsn,
                    end_lsn,
                    ..
                } => {
                    if !marker.sees(xid) {
                        // PostgreSQL's epoch is 2000-01-01; freshness starts at the source commit.
                        let origin_ms = Some(commit_ts / 1000 + 946_684_800_000);
                        apply(
                            coordinator,
                            mirrors,
                            std::mem::take(&mut events),
                            commit_lsn,
                            origin_ms,
                        )
                        .await?;
                        status.lock().expect("lock").transactions += 1;
                    }
                    events.clear();
                    last_end = Some(end_lsn);
                }
                Message::Other(_) => {}
            }
        }
        // Only now, with every transaction up to it durably staged, and only to the end of a
        // commit record: a position inside one would make PostgreSQL skip that transaction.
        let confirmed = status.lock().expect("lock").confirmed_lsn;
        if let Some(target) = last_end.filter(|t| *t > confirmed) {
            let at: Option<String> = client
                .query_one(
                    "SELECT (pg_replication_slot_advance($1, $2::text::pg_lsn)).end_lsn::text",
                    &[&config.slot, &format_lsn(target)],
                )
                .await
                .map_err(SourceError::pg("confirming the slot position"))?
                .get(0);
            let at = at.and_then(|x| parse_lsn(&x).ok()).unwrap_or(target);
            status.lock().expect("lock").confirmed_lsn = at;
        }
        {
            // Lag: 0 when everything readable up to this poll's server position was staged.
            let mut s = status.lock().expect("lock");
            if drained {
                s.lag_bytes = 0;
                s.polled_lsn = upto;
            } else {
                s.lag_bytes = upto.saturating_sub(s.confirmed_lsn);
            }
        }
        if rows.is_empty() {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(config.poll_ms)) => {}
                _ = stop.wait_for(|s| *s) => return Ok(()),
            }
        }
    }
}

fn push(events: &mut Vec<Event>, relations: &HashMap<u32, usize>, oid: u32, row: Row) {
    let Some(&i) = relations.get(&oid) else {
        return;
    };
    if let Some(Event::Rows(j, rows)) = events.last_mut() {
        if *j == i {
            rows.push(row);
            return;
        }
    }
    events.push(Event::Rows(i, vec![row]));
}

async fn apply(
    coordinator: &Coordinator,
    mirrors: &[Mirror],
    events: Vec<Event>,
    commit_lsn: u64,
    origin_ms: Option<i64>,
) -> Result<()> {
    // Per table: rows accumulate until a TRUNCATE of that table or the end of the transaction.
    let mut pending: BTreeMap<usize, Vec<Row>> = BTreeMap::new();
    let mut n: HashMap<usize, u64> = HashMap::new();
    let mut next = |t: usize| {
        let e = n.entry(t).or_insert(0);
        *e += 1;
        seq(commit_lsn, *e)
    };
    for ev in events {
        match ev {
            Event::Rows(t, rows) => pending.entry(t).or_default().extend(rows),
            Event::Truncate(t) => {
                if let Some(rows) = pending.remove(&t) {
                    let m = &mirrors[t];
                    coordinator
                        .stage_changes(&m.cfg.name, m.batch(&rows)?, next(t), origin_ms)
                        .await?;
                }
                coordinator.truncate(&mirrors[t].cfg.name, next(t)).await?;
            }
        }
    }
    for (t, rows) in pending {
        let m = &mirrors[t];
        coordinator
            .stage_changes(&m.cfg.name, m.batch(&rows)?, next(t), origin_ms)
            .await?;
    }
    Ok(())
}
