//! The source itself: set up the publication and slot, take the initial snapshot of every
//! table, then stream the slot over PostgreSQL's logical replication protocol
//! (`START_REPLICATION ... LOGICAL`, pgoutput, through `pgwire-replication`) and stage each
//! committed transaction into Freshet under a sequence derived from its commit LSN,
//! reporting the slot's flush position only past what is durably staged (see [`stream`]).
//!
//! Sequences: `commit_lsn << 16 | n`, where `n` orders the pieces of one transaction for one
//! table (rows, a TRUNCATE, more rows). This needs LSNs below 2^47 (128 TiB of WAL).
//!
//! The seam, per table (see [`snapshot`]): the server's WAL insert position `L` is read,
//! every transaction that has an xid then is waited for (including one whose commit record
//! is written but that still waits, e.g. for a synchronous standby), then the table is
//! copied in a REPEATABLE READ transaction whose `pg_current_snapshot()` is recorded beside
//! it, and staged at `(L - 1) << 16 | k` after a truncate. Every transaction committed
//! before `L` is in that snapshot. A streamed transaction whose xid the snapshot already
//! sees is skipped for that table; every other one commits at or after `L`, sorts after
//! the copy and is applied, so nothing is missed or applied twice.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, Int8Array};
use arrow::datatypes::{DataType, SchemaRef};
use arrow::record_batch::RecordBatch;
use freshet_common::changes::{OP_UPSERT, change_schema};
use freshet_common::schema::SchemaSpec;
use freshet_common::sink::{ChangeSink, Source, SourceFactory};
use freshet_common::source::{SourceInfoExt, SourceState};
use freshet_common::table::{DEFAULT_TARGET_FILE_SIZE, TableDef};
use futures::StreamExt;
use pgwire_replication::{
    FeedbackObserver, Lsn, ReplicationClient, ReplicationEvent, ReplicationMetrics,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_postgres::{Client, NoTls};

use crate::assembly::{CHUNK_BYTES, Row, Step, Txn, appended, relation_change, seq};
use crate::config::{SourceConfig, SourceTable};
use crate::copy::CopyText;
use crate::error::{Result, SourceError};
use crate::pgoutput::{Message, Value, decode, format_lsn, parse_lsn};
use crate::schema::{PgTable, describe};
use crate::types::array_from_text;

/// Where the source stands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceStatus {
    /// Starting, snapshotting, streaming, or failed (and retrying).
    pub state: SourceState,
    /// The slot's confirmed position.
    pub confirmed_lsn: u64,
    /// WAL bytes between the server's current position and the confirmed one.
    pub lag_bytes: u64,
    /// The server position up to which everything committed is staged: the end of the
    /// last staged commit, or the WAL position of the last server keepalive received
    /// between transactions (the walsender had decoded everything before it).
    pub polled_lsn: u64,
    /// Milliseconds the source is behind: the age of the newest source commit read (or of
    /// the last moment it was caught up, if newer) while a backlog remains; 0 when caught
    /// up (everything the server had flushed one status interval earlier is staged).
    pub lag_ms: u64,
    /// Rows copied by the snapshot so far.
    pub snapshot_rows: u64,
    /// Transactions applied since start.
    pub transactions: u64,
    /// Times the source failed and started again.
    pub retries: u64,
    /// The error, in state `error` (the last one while it retries).
    pub error: String,
}

/// A running source.
pub struct PostgresSource {
    status: Arc<Mutex<SourceStatus>>,
    stop: watch::Sender<bool>,
    done: watch::Receiver<bool>,
    /// The configuration.
    pub config: SourceConfig,
}

impl PostgresSource {
    /// Where the source stands.
    pub fn status(&self) -> SourceStatus {
        self.status.lock().expect("lock").clone()
    }

    /// Stops streaming.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

impl Source for PostgresSource {
    fn info(&self) -> freshet_proto::admin::v1::SourceInfo {
        let s = self.status();
        let mut info = freshet_proto::admin::v1::SourceInfo {
            name: self.config.name.clone(),
            kind: "postgres".into(),
            slot: self.config.slot.clone(),
            publication: self.config.publication.clone(),
            confirmed_lsn: format_lsn(s.confirmed_lsn),
            lag_bytes: s.lag_bytes,
            lag_ms: s.lag_ms,
            snapshot_rows: s.snapshot_rows,
            transactions: s.transactions,
            error: s.error,
            tables: self.config.tables.iter().map(|t| t.name.clone()).collect(),
            ..Default::default()
        };
        info.set_source_state(s.state);
        info
    }

    fn stop(&self) {
        PostgresSource::stop(self);
    }

    fn stopped(&self) -> futures::future::BoxFuture<'static, ()> {
        let mut done = self.done.clone();
        Box::pin(async move {
            let _ = done.wait_for(|d| *d).await;
        })
    }
}

/// Makes PostgreSQL sources for the coordinator.
pub struct PostgresFactory;

impl SourceFactory for PostgresFactory {
    fn check<'a>(
        &'a self,
        config: &'a SourceConfig,
    ) -> futures::future::BoxFuture<'a, std::result::Result<(), String>> {
        Box::pin(async move { check(config).await.map_err(|e| e.to_string()) })
    }

    fn start(&self, sink: Arc<dyn ChangeSink>, config: SourceConfig) -> Arc<dyn Source> {
        Arc::new(launch(config, sink))
    }

    fn release<'a>(
        &'a self,
        config: &'a SourceConfig,
        keep_publication: bool,
    ) -> futures::future::BoxFuture<'a, std::result::Result<(), String>> {
        Box::pin(async move {
            release(config, keep_publication)
                .await
                .map_err(|e| e.to_string())
        })
    }
}

/// Drops a removed source's replication slot (waiting up to 30 s for its walsender to let
/// go of it) and, unless `keep_publication`, its publication. Either may already be gone.
pub async fn release(config: &SourceConfig, keep_publication: bool) -> Result<()> {
    let client = connect(config).await?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let row = client
            .query_opt(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                &[&config.slot],
            )
            .await
            .map_err(SourceError::pg("reading the slot"))?;
        match row {
            None => break,
            Some(r) if !r.get::<_, bool>(0) => {
                client
                    .execute("SELECT pg_drop_replication_slot($1)", &[&config.slot])
                    .await
                    .map_err(SourceError::pg("dropping the replication slot"))?;
                tracing::info!(source = %config.name, slot = %config.slot, "replication slot dropped");
                break;
            }
            Some(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            Some(_) => {
                return Err(SourceError::Config(format!(
                    "source '{}': slot '{}' is still in use by another connection; drop it with pg_drop_replication_slot once it is free",
                    config.name, config.slot
                )));
            }
        }
    }
    if !keep_publication {
        client
            .batch_execute(&format!(
                "DROP PUBLICATION IF EXISTS {}",
                quote_ident(&config.publication)
            ))
            .await
            .map_err(SourceError::pg("dropping the publication"))?;
        tracing::info!(source = %config.name, publication = %config.publication, "publication dropped");
    }
    Ok(())
}

/// Checks a source against its database without changing anything: it connects, and
/// every table exists, has a key and maps to a valid Freshet table.
pub async fn check(config: &SourceConfig) -> Result<()> {
    let client = connect(config).await?;
    for t in &config.tables {
        describe_table(&client, t).await?;
    }
    Ok(())
}

/// The PostgreSQL table as it is now, and the Freshet table that mirrors that shape.
async fn describe_table(client: &Client, t: &SourceTable) -> Result<(PgTable, TableDef)> {
    let (schema, table) = t.qualified();
    let pg = describe(client, &schema, &table).await?;
    let spec = SchemaSpec {
        fields: pg.column_specs(),
    };
    let def = TableDef::new(
        &t.name,
        &t.uri,
        spec.to_arrow()?,
        pg.key.clone(),
        t.partition_by.clone(),
        t.target_file_size.unwrap_or(DEFAULT_TARGET_FILE_SIZE),
    )?;
    Ok((pg, def))
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
    /// Whether the snapshot already contains the transaction with 64-bit id `xid` (the
    /// snapshot's bounds are 64-bit too: `pg_current_snapshot()`).
    fn sees(&self, xid: u64) -> bool {
        xid < self.xmin || (xid < self.xmax && !self.xip.contains(&xid))
    }
}

/// The 64-bit transaction id whose low 32 bits are `xid` (as pgoutput sends it), taking
/// the epoch from `reference`, a 64-bit xid read from the server (its next xid) at about
/// the time `xid` was decoded: the candidate nearest to it.
///
/// Like PostgreSQL's `FullTransactionIdFromAllowableAt`, this relies on every xid still
/// to be decoded lying less than 2^31 behind the server's next xid (wraparound protection;
/// the slot's `catalog_xmin` holds `datfrozenxid` back). Unlike it, `xid` may also be a
/// little *newer* than `reference` (assigned after the reference was read), as long as it
/// is less than 2^31 newer.
fn full_xid(xid: u32, reference: u64) -> u64 {
    let delta = xid.wrapping_sub(reference as u32) as i32 as i64;
    let full = reference as i64 + delta;
    // Nearest would be before xid 0: only the first epoch can hold it.
    if full < 0 {
        (full + (1 << 32)) as u64
    } else {
        full as u64
    }
}

/// The server's next 64-bit transaction id (nothing is assigned by reading it).
async fn next_full_xid(client: &Client) -> Result<u64> {
    let v: i64 = client
        .query_one(
            "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::int8",
            &[],
        )
        .await
        .map_err(SourceError::pg("reading the next transaction id"))?
        .get(0);
    Ok(v as u64)
}

struct Mirror {
    cfg: SourceTable,
    pg: PgTable,
    /// The change schema of the Freshet table: its columns, then the op column.
    schema: SchemaRef,
    key_idx: Vec<usize>,
    /// The WAL position read after `pg` was described: a transaction committed before it
    /// may show an older, shorter shape (it ran before a column was added); one committed
    /// at or after it cannot, so a shape missing columns of `pg` there is a drop.
    shape_lsn: u64,
}

/// A column as a relation change is judged by: name, type and type modifier.
type ColumnShape<'a> = (&'a str, u32, i32);

fn relation_shape(columns: &[crate::pgoutput::RelationColumn]) -> Vec<ColumnShape<'_>> {
    columns
        .iter()
        .map(|c| (c.name.as_str(), c.type_oid, c.type_mod))
        .collect()
}

fn table_shape(pg: &PgTable) -> Vec<ColumnShape<'_>> {
    pg.columns
        .iter()
        .map(|c| (c.name.as_str(), c.type_oid, c.type_mod))
        .collect()
}

impl Mirror {
    fn batch(&self, rows: &[Row]) -> Result<RecordBatch> {
        let fields = self.schema.fields();
        let mut cols: Vec<ArrayRef> = Vec::with_capacity(fields.len());
        for (i, f) in fields[..fields.len() - 1].iter().enumerate() {
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
                f.data_type(),
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
}

/// The query connection, over a stream opened with the source's TLS settings (see
/// `crate::transport`; tokio-postgres itself does no TLS here).
async fn connect(config: &SourceConfig) -> Result<Client> {
    let mut pg = crate::config::pg_config(config)?;
    let tls = crate::config::tls(config)?;
    let opened = crate::transport::open(config, &pg, &tls).await?;
    pg.ssl_mode(tokio_postgres::config::SslMode::Disable);
    let (peer, refused) = (opened.peer, opened.refused);
    let (client, conn) = pg.connect_raw(opened.stream, NoTls).await.map_err(|e| {
        let other = SourceError::pg(format!("connecting source '{}' to {peer}", config.name))(e);
        crate::transport::Opened::refusal(&config.name, &peer, &refused, other)
    })?;
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
/// publication, then snapshots (when needed) and streams in the background. Errors in the
/// setup are returned; later errors put the source in state `error` and it retries.
pub async fn start(config: SourceConfig, sink: Arc<dyn ChangeSink>) -> Result<PostgresSource> {
    let prepared = prepare(&config, &*sink).await?;
    Ok(supervise(config, sink, Some(prepared)))
}

/// Starts a source that never fails here: whatever goes wrong (PostgreSQL down, a refused
/// table, a lost connection) shows as state `error` and is retried with a backoff (1 s
/// doubling to 60 s) until the source is stopped.
pub fn launch(config: SourceConfig, sink: Arc<dyn ChangeSink>) -> PostgresSource {
    supervise(config, sink, None)
}

fn supervise(
    config: SourceConfig,
    sink: Arc<dyn ChangeSink>,
    prepared: Option<(Client, Vec<Mirror>)>,
) -> PostgresSource {
    let status = Arc::new(Mutex::new(SourceStatus {
        state: SourceState::Starting,
        ..Default::default()
    }));
    let (stop, mut stop_rx) = watch::channel(false);
    let (done_tx, done) = watch::channel(false);
    let run_status = status.clone();
    let run_config = config.clone();
    tokio::spawn(async move {
        let mut prepared = prepared;
        let mut backoff = Duration::from_secs(1);
        loop {
            let run_stop = stop_rx.clone();
            let attempt = async {
                let (client, mirrors) = match prepared.take() {
                    Some(p) => p,
                    None => prepare(&run_config, &*sink).await?,
                };
                run(&run_config, &*sink, client, mirrors, &run_status, run_stop).await
            };
            let r = tokio::select! {
                r = attempt => r,
                _ = stop_rx.wait_for(|s| *s) => Ok(()),
            };
            let Err(e) = r else { break };
            tracing::error!(source = %run_config.name, error = %e, retry_in_s = backoff.as_secs(), "source failed; retrying");
            {
                let mut s = run_status.lock().expect("lock");
                s.state = SourceState::Error;
                s.error = e.to_string();
                s.retries += 1;
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop_rx.wait_for(|s| *s) => break,
            }
            backoff = (backoff * 2).min(Duration::from_secs(60));
        }
        let _ = done_tx.send(true);
    });
    PostgresSource {
        status,
        stop,
        done,
        config,
    }
}

/// Connects, describes and maps every table (creating missing Freshet tables, evolving
/// ones whose PostgreSQL table gained columns meanwhile) and ensures the publication.
async fn prepare(config: &SourceConfig, sink: &dyn ChangeSink) -> Result<(Client, Vec<Mirror>)> {
    let client = connect(config).await?;
    let mut mirrors = Vec::new();
    for t in &config.tables {
        let (pg, def) = describe_table(&client, t).await?;
        let current = sink.ensure_table(def.clone()).await?;
        let mut m = Mirror {
            cfg: t.clone(),
            schema: change_schema(&current),
            key_idx: Vec::new(),
            pg,
            shape_lsn: 0,
        };
        reconcile(&client, sink, &mut m, &current, &def).await?;
        m.key_idx =
            m.pg.key
                .iter()
                .map(|k| {
                    m.pg.columns
                        .iter()
                        .position(|c| &c.name == k)
                        .expect("key column")
                })
                .collect();
        mirrors.push(m);
    }
    // Read after every table was described (see `Mirror::shape_lsn`).
    let described: String = client
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .map_err(SourceError::pg("reading the server position"))?
        .get(0);
    let described = parse_lsn(&described)?;
    for m in &mut mirrors {
        m.shape_lsn = described;
    }
    ensure_publication(&client, config, &mirrors).await?;
    Ok((client, mirrors))
}

/// Checks the existing Delta table against the PostgreSQL table as it is now. Columns
/// added in PostgreSQL while the source was away are evolved like a streamed ADD COLUMN;
/// anything else that differs (dropped, renamed, retyped columns, another key) pauses the
/// table and fails, before anything is written.
async fn reconcile(
    client: &Client,
    sink: &dyn ChangeSink,
    m: &mut Mirror,
    current: &TableDef,
    wanted: &TableDef,
) -> Result<()> {
    let columns_of = |d: &TableDef| -> Vec<(String, DataType)> {
        d.schema
            .fields()
            .iter()
            .map(|f| (f.name().clone(), f.data_type().clone()))
            .collect()
    };
    let (have, want) = (columns_of(current), columns_of(wanted));
    let same_key = current.primary_key == wanted.primary_key;
    let added = appended(&have, &want).filter(|_| same_key);
    if added == Some(0) {
        return Ok(());
    }
    if added.is_none() {
        let _ = sink.set_paused(&m.cfg.name, true).await;
        let show = |v: &[(String, DataType)]| {
            v.iter()
                .map(|(n, t)| format!("{n} {}", crate::types::type_name(t)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(SourceError::Table {
            table: m.pg.qualified.clone(),
            message: format!(
                "its columns ({}; key {}) no longer match the Delta table '{}' ({}; key {}); the table is paused",
                show(&want),
                wanted.primary_key.join(", "),
                m.cfg.name,
                show(&have),
                current.primary_key.join(", ")
            ),
        });
    }
    let full = m.pg.clone();
    let columns: Vec<crate::pgoutput::RelationColumn> = full
        .columns
        .iter()
        .map(|c| crate::pgoutput::RelationColumn {
            name: c.name.clone(),
            type_oid: c.type_oid,
            type_mod: c.type_mod,
            key: false,
        })
        .collect();
    let oid: i64 = client
        .query_one(
            "SELECT $1::text::regclass::oid::int8",
            &[&quote(&m.pg.qualified)],
        )
        .await
        .map_err(SourceError::pg(format!("looking up {}", m.pg.qualified)))?
        .get(0);
    m.pg.columns.truncate(have.len());
    evolve(client, sink, m, oid as u32, &columns).await?;
    m.pg = full;
    Ok(())
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
            format!("{}.{}", quote_ident(&s), quote_ident(&t))
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

async fn read_marker(sink: &dyn ChangeSink, m: &Mirror) -> Result<Option<SnapshotMarker>> {
    let b = sink.read_marker(&m.cfg.name).await?;
    Ok(b.and_then(|b| serde_json::from_slice(&b).ok()))
}

async fn write_marker(sink: &dyn ChangeSink, m: &Mirror, marker: &SnapshotMarker) -> Result<()> {
    let body = serde_json::to_vec_pretty(marker).expect("json");
    sink.write_marker(&m.cfg.name, body.into()).await?;
    Ok(())
}

async fn run(
    config: &SourceConfig,
    sink: &dyn ChangeSink,
    client: Client,
    mut mirrors: Vec<Mirror>,
    status: &Arc<Mutex<SourceStatus>>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let slot_exists = client
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
            &[&config.slot],
        )
        .await
        .map_err(SourceError::pg("reading the slot"))?
        .is_some();
    let mut markers: Vec<Option<SnapshotMarker>> = Vec::new();
    if slot_exists {
        for m in &mirrors {
            markers.push(
                read_marker(sink, m)
                    .await?
                    .filter(|x| x.slot == config.slot),
            );
        }
    } else {
        // A new slot: every table is copied again, whatever an earlier slot left.
        let l0: String = client
            .query_one(
                "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&config.slot],
            )
            .await
            .map_err(SourceError::pg("creating the replication slot"))?
            .get(0);
        tracing::info!(source = %config.name, slot = %config.slot, lsn = %l0, "replication slot created");
        markers = mirrors.iter().map(|_| None).collect();
    }
    let missing: Vec<usize> = (0..mirrors.len())
        .filter(|i| markers[*i].is_none())
        .collect();
    if !missing.is_empty() {
        status.lock().expect("lock").state = SourceState::Snapshotting;
        for i in missing {
            markers[i] = Some(snapshot(config, sink, &mirrors[i], status).await?);
            if *stop.borrow() {
                return Ok(());
            }
        }
    }
    let markers: Vec<SnapshotMarker> = markers.into_iter().map(|m| m.expect("set")).collect();
    {
        let mut s = status.lock().expect("lock");
        s.state = SourceState::Streaming;
        s.error.clear();
    }
    stream(
        config,
        sink,
        &client,
        &mut mirrors,
        &markers,
        status,
        &mut stop,
    )
    .await
}

/// Waits until every transaction that has an xid now has ended: those still running,
/// and those that wrote their commit record but have not yet left the running set (a
/// commit waiting for a synchronous standby is one; its commit is in the WAL, but
/// snapshots still count it as running). See [`snapshot`] for why. It also makes a table
/// just added to the publication published in every transaction its snapshot does not
/// see (one that began before the `ALTER PUBLICATION` could otherwise have its changes to
/// the table decoded as unpublished).
async fn wait_for_older_transactions(client: &Client) -> Result<()> {
    let bound = |f: &'static str| async move {
        let v: i64 = client
            .query_one(
                &format!("SELECT {f}(pg_current_snapshot())::text::int8"),
                &[],
            )
            .await
            .map_err(SourceError::pg("reading running transactions"))?
            .get(0);
        Ok::<_, SourceError>(v)
    };
    let horizon = bound("pg_snapshot_xmax").await?;
    let mut waited = 0u64;
    loop {
        let xmin = bound("pg_snapshot_xmin").await?;
        if xmin >= horizon {
            return Ok(());
        }
        if waited % 50 == 0 && waited > 0 {
            tracing::info!(
                waiting_for_xid = xmin,
                "the copy waits for transactions that had an xid when it began (a long transaction, or a commit waiting for a synchronous standby)"
            );
        }
        waited += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Copies one table under its own REPEATABLE READ snapshot (COPY, staged in chunks) and
/// records the snapshot beside it, staged at `(L - 1) << 16 | k` where `L` is the server's
/// WAL insert position read first. The seam needs both halves of:
///
/// - every transaction the snapshot misses commits (its commit record starts) at or after
///   `L`, so it is streamed and sorts after the copy; and
/// - every transaction committed before `L` is in the snapshot.
///
/// A snapshot counts as running every transaction still in the server's running set,
/// and a transaction writes its commit record *before* it leaves that set (a synchronous
/// commit waits for its standby in between, for as long as the standby takes). So after
/// reading `L` the copy first waits until every transaction that had an xid at that
/// moment has ended ([`wait_for_older_transactions`]). Then a transaction committed before
/// `L` had its xid before `L` was read, has ended and is visible to the snapshot taken
/// next; and one the snapshot misses got its xid after `L` was read, so its commit record
/// follows `L`.
async fn snapshot(
    config: &SourceConfig,
    sink: &dyn ChangeSink,
    m: &Mirror,
    status: &Arc<Mutex<SourceStatus>>,
) -> Result<SnapshotMarker> {
    let mut client = connect(config).await?;
    let l: String = client
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .map_err(SourceError::pg("reading the server position"))?
        .get(0);
    let base = parse_lsn(&l)?.saturating_sub(1);
    // Only after `L` (see above).
    wait_for_older_transactions(&client).await?;
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(SourceError::pg("starting the snapshot transaction"))?;
    let row = tx
        .query_one(
            "SELECT pg_current_snapshot()::text, \
             (SELECT greatest(reltuples, 0)::int8 FROM pg_class WHERE oid = $1::text::regclass)",
            &[&quote(&m.pg.qualified)],
        )
        .await
        .map_err(SourceError::pg(format!(
            "starting the snapshot of {}",
            m.pg.qualified
        )))?;
    let snap: String = row.get(0);
    let estimate: i64 = row.get(1);
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
        consistent_lsn: base,
        xmin,
        xmax,
        xip,
    };
    tracing::info!(source = %config.name, table = %m.cfg.name, lsn = %format_lsn(base), snapshot = %snap, estimated_rows = estimate, "copying table");
    // Whatever an interrupted earlier copy left goes first.
    sink.truncate(&m.cfg.name, seq(base, 0)).await?;
    // At most ~60k chunks, so chunk numbers stay inside the sequence's 16 bits.
    let batch_rows = config
        .snapshot_batch_rows
        .max(1)
        .max((estimate.max(0) as usize).div_ceil(60_000));
    let cols: Vec<String> = m.pg.columns.iter().map(|c| quote_ident(&c.name)).collect();
    let copy = tx
        .copy_out(&format!(
            "COPY {} ({}) TO STDOUT",
            quote(&m.pg.qualified),
            cols.join(", ")
        ))
        .await
        .map_err(SourceError::pg(format!("copying {}", m.pg.qualified)))?;
    futures::pin_mut!(copy);
    let mut decoder = CopyText::default();
    let mut rows: Vec<Row> = Vec::new();
    let mut chunk = 0u64;
    let mut copied = 0u64;
    let ncols = m.pg.columns.len();
    loop {
        let next = copy
            .next()
            .await
            .transpose()
            .map_err(SourceError::pg(format!("copying {}", m.pg.qualified)))?;
        let ended = next.is_none();
        if let Some(bytes) = next {
            for r in decoder.feed(&bytes, ncols, &m.pg.qualified)? {
                let vals = r
                    .into_iter()
                    .map(|v| v.map(Value::Text).unwrap_or(Value::Null))
                    .collect();
                rows.push((OP_UPSERT, vals));
            }
        } else {
            decoder.finish(&m.pg.qualified)?;
        }
        while rows.len() >= batch_rows || (ended && !rows.is_empty()) {
            let take = rows.len().min(batch_rows);
            let part: Vec<Row> = rows.drain(..take).collect();
            chunk += 1;
            if chunk >= 1 << 16 {
                return Err(SourceError::Table {
                    table: m.pg.qualified.clone(),
                    message: "the snapshot needs more than 65535 chunks; raise snapshot_batch_rows"
                        .into(),
                });
            }
            sink.stage_changes(&m.cfg.name, m.batch(&part)?, seq(base, chunk), None)
                .await?;
            copied += part.len() as u64;
            status.lock().expect("lock").snapshot_rows += part.len() as u64;
            tracing::info!(table = %m.cfg.name, copied, estimated = estimate, "snapshot progress");
        }
        if ended {
            break;
        }
    }
    tx.commit()
        .await
        .map_err(SourceError::pg("ending the snapshot"))?;
    write_marker(sink, m, &marker).await?;
    tracing::info!(table = %m.cfg.name, rows = copied, "table copied");
    Ok(marker)
}

/// `schema.table` as a quoted SQL identifier.
fn quote(qualified: &str) -> String {
    qualified
        .split('.')
        .map(quote_ident)
        .collect::<Vec<_>>()
        .join(".")
}

/// One quoted SQL identifier.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Evolves a mirrored table for columns added at the end in PostgreSQL. A column added
/// with a default that existing rows take (`atthasmissing`) would need every existing Delta
/// row rewritten: refused (the table is paused) rather than left null.
async fn evolve(
    client: &Client,
    sink: &dyn ChangeSink,
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
        let _ = sink.set_paused(&m.cfg.name, true).await;
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
    let oids: Vec<u32> = added.iter().map(|c| c.type_oid).collect();
    let elems = crate::schema::array_elements(client, &oids).await?;
    for c in &added {
        pg.columns.push(crate::schema::PgColumn {
            name: c.name.clone(),
            type_oid: c.type_oid,
            type_mod: c.type_mod,
            elem_oid: elems.get(&c.type_oid).copied().unwrap_or(0),
            not_null: false,
            type_name: String::new(),
        });
    }
    let current = sink.table_def(&m.cfg.name)?;
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
    sink.add_columns(def).await?;
    m.schema = change_schema(&sink.table_def(&m.cfg.name)?);
    m.pg = pg;
    tracing::info!(table = %m.cfg.name, added = ?names, "schema evolved");
    Ok(())
}

/// Fills unchanged TOASTed values (pgoutput's `u`, sent without the old value unless the
/// table has REPLICA IDENTITY FULL) from the row as PostgreSQL holds it now under the new
/// key, once transaction `xid` (which made this change) is visible. `false`: no row has
/// that key any more.
///
/// Why the current row: the old value is not in the stream (a key-only old tuple carries
/// nulls outside the key), and Freshet's own copy of the old key's row is split between
/// staged segments and Delta files that the source cannot read by key. The current row is
/// exact for an unchanged column *if* it is read after `xid` is visible: before that (its
/// commit record is in the WAL, so it can be decoded, while it still waits, e.g. for a
/// synchronous standby) a key change's new key does not exist yet for other sessions.
/// Read after, the value is this transaction's or a later one's, and every later change
/// of the row follows in the stream, so the table converges to PostgreSQL's content. A
/// row that is gone was deleted or moved by such a later transaction.
async fn fill_unchanged(client: &Client, m: &Mirror, xid: u64, new: &mut [Value]) -> Result<bool> {
    let missing: Vec<usize> = (0..new.len())
        .filter(|j| new[*j] == Value::Unchanged)
        .collect();
    let cols: Vec<String> = missing
        .iter()
        .enumerate()
        .map(|(n, j)| format!("{}::text AS c{n}", quote_ident(&m.pg.columns[*j].name)))
        .collect();
    let mut params: Vec<String> = vec![xid.to_string()];
    let mut conds: Vec<String> = Vec::new();
    for k in &m.key_idx {
        let c = &m.pg.columns[*k];
        let Value::Text(v) = &new[*k] else {
            return Err(SourceError::Protocol(format!(
                "{}: update without its key value",
                m.pg.qualified
            )));
        };
        params.push(v.clone());
        conds.push(format!(
            "{} = ${}::text::{}",
            quote_ident(&c.name),
            params.len(),
            c.type_name
        ));
    }
    // One statement, one snapshot: whether `xid` is visible, and the row as of then.
    let sql = format!(
        "SELECT v.visible, r.found, {} FROM \
         (SELECT pg_visible_in_snapshot($1::text::xid8, pg_current_snapshot()) AS visible) v \
         LEFT JOIN LATERAL (SELECT true AS found, {} FROM {} WHERE {}) r ON v.visible",
        (0..missing.len())
            .map(|n| format!("r.c{n}"))
            .collect::<Vec<_>>()
            .join(", "),
        cols.join(", "),
        quote(&m.pg.qualified),
        conds.join(" AND ")
    );
    let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
        .iter()
        .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync))
        .collect();
    let started = Instant::now();
    let mut logged = Instant::now();
    let row = loop {
        let row = client
            .query_one(&sql, &refs)
            .await
            .map_err(SourceError::pg(format!(
                "reading unchanged values of {}",
                m.pg.qualified
            )))?;
        if row.get::<_, bool>(0) {
            break row;
        }
        if logged.elapsed() >= Duration::from_secs(10) {
            logged = Instant::now();
            tracing::info!(table = %m.cfg.name, xid, waited_s = started.elapsed().as_secs(), "waiting for a decoded transaction to become visible (a synchronous standby?)");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    if row.get::<_, Option<bool>>(1).is_none() {
        return Ok(false);
    }
    for (n, j) in missing.iter().enumerate() {
        new[*j] = match row.get::<_, Option<String>>(n + 2) {
            Some(s) => Value::Text(s),
            None => Value::Null,
        };
    }
    Ok(true)
}

/// Carries out a transaction's staging steps (see `crate::assembly`) in order; each
/// returns once durable.
async fn run_steps(
    sink: &dyn ChangeSink,
    mirrors: &[Mirror],
    steps: Vec<Step>,
    origin_ms: Option<i64>,
) -> Result<()> {
    for step in steps {
        match step {
            Step::Stage {
                table,
                sequence,
                rows,
                open,
            } => {
                let m = &mirrors[table];
                sink.stage_chunk(&m.cfg.name, m.batch(&rows)?, sequence, origin_ms, open)
                    .await?;
            }
            Step::Truncate { table, sequence } => {
                sink.truncate(&mirrors[table].cfg.name, sequence).await?;
            }
        }
    }
    Ok(())
}

/// Streams the slot over the replication protocol (`START_REPLICATION ... LOGICAL` from the
/// slot's confirmed position, pgoutput `proto_version 1` for the configured publication)
/// and stages each transaction at its commit, in commit order.
///
/// The position reported to PostgreSQL (standby status update, which moves the slot's
/// `confirmed_flush_lsn`) only ever advances to
/// - the end of a commit record, once that transaction (and so every one before it: they
///   are handled in order) is durably staged, i.e. after `apply` returned; or
/// - the WAL position of a server keepalive received outside a transaction (the heartbeat,
///   at most every `heartbeat_ms`). A logical walsender sends as `wal_end` the end of the
///   last record it decoded (`sentPtr`), after the output of every transaction committed
///   before it: all of those were received, and staged, before the keepalive is handled.
///   A transaction sent after it commits at or after that position, so PostgreSQL (which
///   skips only commits before the confirmed position) replays it after a restart.
///
/// Never a position inside a transaction. The stream's connection failing is an error: the
/// supervisor retries, and streaming resumes from the slot's confirmed position.
async fn stream(
    config: &SourceConfig,
    sink: &dyn ChangeSink,
    client: &Client,
    mirrors: &mut [Mirror],
    markers: &[SnapshotMarker],
    status: &Arc<Mutex<SourceStatus>>,
    stop: &mut watch::Receiver<bool>,
) -> Result<()> {
    let by_name: HashMap<String, usize> = mirrors
        .iter()
        .enumerate()
        .map(|(i, m)| (m.pg.qualified.clone(), i))
        .collect();
    let mut relations: HashMap<u32, usize> = HashMap::new();
    // Per mirror, the columns of the last relation message of this session.
    let mut shapes: HashMap<usize, Vec<crate::pgoutput::RelationColumn>> = HashMap::new();
    if !slot_free(client, config, stop).await? {
        return Ok(());
    }
    let start: Option<String> = client
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&config.slot],
        )
        .await
        .map_err(SourceError::pg("reading the slot"))?
        .get(0);
    let start = start.and_then(|x| parse_lsn(&x).ok()).unwrap_or(0);
    {
        // Everything committed before the confirmed position is staged.
        let mut s = status.lock().expect("lock");
        s.confirmed_lsn = start;
        s.polled_lsn = s.polled_lsn.max(start);
    }
    // The status shows what was reported to PostgreSQL, as soon as it is written.
    let metrics: Arc<std::sync::OnceLock<Arc<ReplicationMetrics>>> = Arc::default();
    let observer = {
        let metrics = metrics.clone();
        let status = status.clone();
        FeedbackObserver::new(move |_| {
            if let Some(m) = metrics.get() {
                let sent = m.last_applied_lsn().as_u64();
                let mut s = status.lock().expect("lock");
                s.confirmed_lsn = s.confirmed_lsn.max(sent);
            }
        })
    };
    // pgwire-replication connects to a relay socket carrying the connection opened here
    // with the source's TLS settings (see `crate::transport`).
    let opened = {
        let pg = crate::config::pg_config(config)?;
        let tls = crate::config::tls(config)?;
        crate::transport::open(config, &pg, &tls).await?
    };
    let (peer, refused) = (opened.peer, opened.refused);
    let failed = |context: &str| {
        let context = format!("{context} {peer}");
        let (peer, refused) = (&peer, &refused);
        move |e| {
            let other = SourceError::repl(context)(e);
            crate::transport::Opened::refusal(&config.name, peer, refused, other)
        }
    };
    let relay_dir = crate::transport::relay(opened.stream).map_err(|e| SourceError::Connect {
        name: config.name.clone(),
        host: peer.clone(),
        message: format!("cannot open the replication relay socket: {e}"),
    })?;
    let mut repl_config = crate::config::replication_config(config, start, &relay_dir)?;
    repl_config.feedback_observer = Some(observer);
    let mut repl = ReplicationClient::connect(repl_config)
        .await
        .map_err(failed("connecting to"))?;
    let _ = metrics.set(repl.metrics());
    tokio::select! {
        r = repl.wait_started() => r.map_err(failed("starting replication on"))?,
        _ = stop.wait_for(|s| *s) => return Ok(()),
    }
    tracing::info!(source = %config.name, slot = %config.slot, from = %format_lsn(start), "streaming");

    // The highest position handed to the client for reporting.
    let mut reported = start;
    let confirm = |repl: &ReplicationClient, reported: &mut u64, lsn: u64| {
        if lsn > *reported {
            repl.update_applied_lsn(Lsn(lsn));
            *reported = lsn;
        }
    };
    // The transaction being received: its 64-bit xid.
    let mut open: Option<u64> = None;
    // Its commit position (from its Begin).
    let mut open_lsn: u64 = 0;
    // Where 32-bit xids from the stream take their epoch from (see `full_xid`): the
    // server's next xid, read again at every status refresh.
    let mut xid_reference = next_full_xid(client).await?;
    // The transaction being assembled (staged in chunks when it is large).
    let mut txn = Txn::new(0, CHUNK_BYTES);
    // The newest keepalive position received outside a transaction (safe to confirm).
    let mut heartbeat_at = start;
    let mut last_heartbeat = Instant::now();
    // Lag: the server's flushed position at the previous status refresh, the newest
    // source commit read, and when everything was last read.
    let mut server_before: Option<u64> = None;
    let mut last_commit_ms: Option<i64> = None;
    let mut caught_up_ms = now_ms();
    let every = Duration::from_millis(config.poll_ms.max(10));
    let mut next_tick = tokio::time::Instant::now();
    loop {
        if tokio::time::Instant::now() >= next_tick {
            next_tick = tokio::time::Instant::now() + every;
            // Heartbeat: while the mirrored tables are idle, move the slot past the
            // server's other WAL so PostgreSQL can recycle it.
            if heartbeat_at > reported
                && last_heartbeat.elapsed() >= Duration::from_millis(config.heartbeat_ms)
            {
                confirm(&repl, &mut reported, heartbeat_at);
                last_heartbeat = Instant::now();
            }
            let row = client
                .query_one(
                    "SELECT pg_current_wal_flush_lsn()::text, \
                     pg_snapshot_xmax(pg_current_snapshot())::text::int8",
                    &[],
                )
                .await
                .map_err(SourceError::pg("reading the server position"))?;
            let server = parse_lsn(row.get(0))?;
            xid_reference = row.get::<_, i64>(1) as u64;
            let sent = repl.metrics().last_applied_lsn().as_u64();
            let mut s = status.lock().expect("lock");
            s.confirmed_lsn = s.confirmed_lsn.max(sent);
            // Caught up: everything the server had flushed at the previous refresh (one
            // interval ago) was read and staged.
            if let Some(before) = server_before {
                if s.polled_lsn >= before {
                    s.lag_bytes = 0;
                    s.lag_ms = 0;
                    caught_up_ms = now_ms();
                } else {
                    s.lag_bytes = server.saturating_sub(s.confirmed_lsn);
                    let newest = last_commit_ms.unwrap_or(0).max(caught_up_ms);
                    s.lag_ms = (now_ms() - newest).max(0) as u64;
                }
            }
            server_before = Some(server);
        }
        let ev = if repl.is_running() {
            tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => {
                    repl.stop();
                    return Ok(());
                }
                ev = repl.recv() => ev,
                _ = tokio::time::sleep_until(next_tick) => continue,
            }
        } else {
            // The session ended: what it buffered, then its outcome (not raced with the
            // timer, so the worker's error is reported rather than lost mid-join).
            repl.recv().await
        };
        let ev = ev.map_err(SourceError::repl("streaming"))?;
        let Some(ev) = ev else {
            if *stop.borrow() {
                return Ok(());
            }
            return Err(SourceError::Protocol(
                "the server ended the replication stream".into(),
            ));
        };
        match ev {
            ReplicationEvent::Begin { xid, final_lsn, .. } => {
                open = Some(full_xid(xid, xid_reference));
                open_lsn = final_lsn.as_u64();
                txn = Txn::new(open_lsn, CHUNK_BYTES);
            }
            ReplicationEvent::XLogData { data, .. } => {
                // A large transaction is staged in chunks as it arrives (bounded memory);
                // the coordinator applies it in one commit once its last chunk is staged.
                if let Some(xid) = open {
                    let chunk = txn.message(data.len(), |t| markers[t].sees(xid));
                    run_steps(sink, mirrors, chunk, None).await?;
                }
                match decode(&data)? {
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
                        let rel = relation_shape(&columns);
                        let known = table_shape(&m.pg);
                        // Within this session, every relation message must extend the last
                        // one; a shorter shape than known is an older one replayed only
                        // before the table was described.
                        let last = shapes.get(&i).map(|last| relation_shape(last));
                        let replayed = open_lsn < m.shape_lsn;
                        let added = relation_change(&known, last.as_deref(), &rel, replayed);
                        let Some(added) = added else {
                            // A dropped (the last one too), renamed or retyped column: writing
                            // on would be wrong.
                            let table = mirrors[i].cfg.name.clone();
                            let dropped: Vec<&str> = known
                                .iter()
                                .filter(|k| !rel.iter().any(|r| r.0 == k.0))
                                .map(|k| k.0)
                                .collect();
                            let _ = sink.set_paused(&table, true).await;
                            return Err(SourceError::Table {
                                table: q,
                                message: format!(
                                    "its columns changed incompatibly in PostgreSQL (now: {}{}); the Freshet table '{table}' is paused and the source stopped before writing anything under the new shape",
                                    columns
                                        .iter()
                                        .map(|c| c.name.as_str())
                                        .collect::<Vec<_>>()
                                        .join(", "),
                                    if dropped.is_empty() {
                                        String::new()
                                    } else {
                                        format!("; dropped: {}", dropped.join(", "))
                                    }
                                ),
                            });
                        };
                        if added > 0 {
                            // ALTER TABLE ADD COLUMN: evolve the Delta table first.
                            evolve(client, sink, &mut mirrors[i], oid, &columns).await?;
                        }
                        shapes.insert(i, columns);
                        // Fewer columns than known: an older shape replayed; rows are padded.
                        relations.insert(oid, i);
                    }
                    Message::Insert { oid, new } => {
                        if let Some(&i) = relations.get(&oid) {
                            txn.insert(i, new);
                        }
                    }
                    Message::Update { oid, old, new } => {
                        let Some(&i) = relations.get(&oid) else {
                            continue;
                        };
                        let m = &mirrors[i];
                        // A changed key is a delete of the old key plus an insert; unchanged
                        // TOASTed values come from a whole old row, or else from the table.
                        let Some(mut new) = txn.update(i, &m.key_idx, old, new) else {
                            continue;
                        };
                        let Some(xid) = open else {
                            return Err(SourceError::Protocol(
                                "an update outside a transaction".into(),
                            ));
                        };
                        if fill_unchanged(client, m, xid, &mut new).await? {
                            txn.upsert(i, new);
                        } else {
                            // The row is gone: a later transaction, still to come in the
                            // stream, deleted it or moved it to another key. A delete
                            // (which needs the key only) converges the same way.
                            for v in new.iter_mut() {
                                if *v == Value::Unchanged {
                                    *v = Value::Null;
                                }
                            }
                            txn.delete(i, new);
                        }
                    }
                    Message::Delete { oid, old } => {
                        if let Some(&i) = relations.get(&oid) {
                            txn.delete(i, old);
                        }
                    }
                    Message::Truncate { oids } => {
                        for oid in oids {
                            if let Some(&i) = relations.get(&oid) {
                                txn.truncate(i);
                            }
                        }
                    }
                    // Begin and Commit arrive as their own events; the rest is not needed.
                    Message::Begin { .. } | Message::Commit { .. } | Message::Other(_) => {}
                }
            }
            ReplicationEvent::Commit {
                lsn,
                end_lsn,
                commit_time_micros,
            } => {
                let Some(xid) = open.take() else {
                    return Err(SourceError::Protocol(format!(
                        "a commit at {} without its begin",
                        format_lsn(lsn.as_u64())
                    )));
                };
                // PostgreSQL's epoch is 2000-01-01; freshness starts at the source commit.
                let origin_ms = commit_time_micros / 1000 + 946_684_800_000;
                debug_assert_eq!(txn.commit_lsn(), lsn.as_u64());
                // Each table skips what its own snapshot already holds.
                let steps = std::mem::replace(&mut txn, Txn::new(0, CHUNK_BYTES))
                    .commit(lsn.as_u64(), |t| markers[t].sees(xid));
                if !steps.is_empty() {
                    run_steps(sink, mirrors, steps, Some(origin_ms)).await?;
                    status.lock().expect("lock").transactions += 1;
                }
                last_commit_ms = Some(origin_ms);
                // Only now, with the transaction durably staged, and only to the end of its
                // commit record.
                let end = end_lsn.as_u64();
                confirm(&repl, &mut reported, end);
                heartbeat_at = heartbeat_at.max(end);
                let mut s = status.lock().expect("lock");
                s.polled_lsn = s.polled_lsn.max(end);
            }
            // Inside a transaction a keepalive's position may precede its commit: not used.
            ReplicationEvent::KeepAlive { wal_end, .. } if open.is_none() => {
                let at = wal_end.as_u64();
                heartbeat_at = heartbeat_at.max(at);
                let mut s = status.lock().expect("lock");
                s.polled_lsn = s.polled_lsn.max(at);
            }
            // Logical decoding messages (pg_logical_emit_message) are not mirrored.
            // (pgwire-replication always asks for them: `messages 'true'`.)
            _ => {}
        }
    }
}

/// Waits (up to 30 s) until no other connection streams from the slot: after a restart,
/// the previous session's walsender may still hold it for a moment. `false`: stopped.
async fn slot_free(
    client: &Client,
    config: &SourceConfig,
    stop: &mut watch::Receiver<bool>,
) -> Result<bool> {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let pid: Option<i32> = client
            .query_one(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
                &[&config.slot],
            )
            .await
            .map_err(SourceError::pg("reading the slot"))?
            .get(0);
        let Some(pid) = pid else {
            return Ok(true);
        };
        if Instant::now() >= end {
            return Err(SourceError::Protocol(format!(
                "the replication slot '{}' is in use by another connection (PID {pid})",
                config.slot
            )));
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = stop.wait_for(|s| *s) => return Ok(false),
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marker(xmin: u64, xmax: u64, xip: Vec<u64>) -> SnapshotMarker {
        SnapshotMarker {
            source: "s".into(),
            slot: "slot".into(),
            consistent_lsn: 0,
            xmin,
            xmax,
            xip,
        }
    }

    #[test]
    fn xids_take_the_epoch_nearest_the_reference() {
        let e = |epoch: u64, xid: u64| epoch << 32 | xid;
        // Same epoch, either side of the reference.
        assert_eq!(full_xid(100, e(7, 200)), e(7, 100));
        assert_eq!(full_xid(300, e(7, 200)), e(7, 300));
        // The counter wrapped after the reference was read: the next epoch.
        assert_eq!(full_xid(5, e(7, 0xffff_fff0)), e(8, 5));
        // An xid from before the wrap, decoded after it: the previous epoch.
        assert_eq!(full_xid(0xffff_fff0, e(8, 5)), e(7, 0xffff_fff0));
        // Up to 2^31 behind.
        assert_eq!(full_xid(6, e(8, 0x8000_0005)), e(8, 6));
        // Epoch 0 has no epoch before it.
        assert_eq!(full_xid(0xffff_ff00, 1000), 0xffff_ff00);
    }

    #[test]
    fn a_transaction_after_the_xid_wraps_is_not_seen_by_an_older_snapshot() {
        let epoch7 = 7u64 << 32;
        let m = marker(
            epoch7 | 0xffff_ff00,
            epoch7 | 0xffff_ff10,
            vec![epoch7 | 0xffff_ff05],
        );
        // Decoded a little after the wrap (the server's next xid is in epoch 8).
        let reference = 8u64 << 32 | 100;
        let sees = |xid: u32| m.sees(full_xid(xid, reference));
        // xid 5 of epoch 8 began after the snapshot.
        assert!(!sees(5));
        // So did one just before the wrap, at or above the snapshot's xmax.
        assert!(!sees(0xffff_ff10));
        assert!(!sees(0xffff_fff0));
        // Running when the snapshot was taken: not in it.
        assert!(!sees(0xffff_ff05));
        // Ended before the snapshot: in it.
        assert!(sees(0xffff_fe00));
        assert!(sees(0xffff_ff0a));
    }
}
