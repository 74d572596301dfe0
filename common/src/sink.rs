//! What a change-data-capture source and the coordinator that runs it see of each other.
//!
//! A source writes through a [`ChangeSink`] (staging changes and chunks of large
//! transactions, TRUNCATE, ADD COLUMN, creating or adopting its tables, pausing one, and a
//! small per-table marker of its own), so a source crate depends on `freshet-common` only.
//! The coordinator implements the sink; the binary hands the coordinator a
//! [`SourceFactory`], which starts [`Source`]s with the coordinator as their sink.

use std::sync::Arc;

use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use bytes::Bytes;
use futures::future::BoxFuture;

use crate::error::Result;
use crate::source::SourceConfig;
use crate::table::TableDef;

/// Where a source's changes go: the tables of a coordinator term.
///
/// Sequences are the source's own (every call for one table uses a higher one than the
/// last, except when the source re-sends after a restart: a sequence staged or applied
/// before is acknowledged without staging it again).
#[async_trait]
pub trait ChangeSink: Send + Sync {
    /// Stages changes already in the table's change schema (its columns, then the op
    /// column) under `sequence`; with `open`, they are a chunk of a large source
    /// transaction that continues under higher sequences, and nothing of it is applied
    /// before its last chunk (staged with `open` false) is staged. Returns once durable
    /// (the staged sequence). Waits while the table holds more than its pending limit.
    async fn stage_chunk(
        &self,
        table: &str,
        batch: RecordBatch,
        sequence: u64,
        origin_ms: Option<i64>,
        open: bool,
    ) -> Result<u64>;

    /// [`ChangeSink::stage_chunk`] of a whole transaction (or a snapshot chunk).
    async fn stage_changes(
        &self,
        table: &str,
        batch: RecordBatch,
        sequence: u64,
        origin_ms: Option<i64>,
    ) -> Result<u64> {
        self.stage_chunk(table, batch, sequence, origin_ms, false)
            .await
    }

    /// Empties the table at `sequence`, after what was staged before it (a TRUNCATE); one
    /// already applied is not repeated.
    async fn truncate(&self, table: &str, sequence: u64) -> Result<()>;

    /// Adds the nullable columns `def` has at the end beyond the table's current ones (an
    /// ALTER TABLE ADD COLUMN), after what was staged under the old columns.
    async fn add_columns(&self, def: TableDef) -> Result<()>;

    /// Serves the table `def` describes: creates it, or adopts the Delta table at its URI,
    /// or (already served) leaves it. Returns the definition it is served under, which may
    /// differ from `def` (the source reconciles the two).
    async fn ensure_table(&self, def: TableDef) -> Result<TableDef>;

    /// The definition a table is served under now.
    fn table_def(&self, table: &str) -> Result<TableDef>;

    /// Pauses (or resumes) a table's cycles (a source pauses a table whose source changed
    /// in a way it cannot mirror).
    async fn set_paused(&self, table: &str, paused: bool) -> Result<()>;

    /// The source's marker kept with the table (`None`: none was written).
    async fn read_marker(&self, table: &str) -> Result<Option<Bytes>>;

    /// Writes (replaces) the source's marker kept with the table: a small object, say what
    /// its snapshot of the table was, that survives restarts and leader changes.
    async fn write_marker(&self, table: &str, marker: Bytes) -> Result<()>;
}

/// A change-data-capture source run by a coordinator term.
pub trait Source: Send + Sync {
    /// Its state for the admin API.
    fn info(&self) -> freshet_proto::admin::v1::SourceInfo;
    /// Asks it to stop (the term ended, or it is being replaced).
    fn stop(&self);
    /// Resolves once it has stopped.
    fn stopped(&self) -> BoxFuture<'static, ()>;
}

/// Makes sources from their definitions (set by the binary, which knows the source
/// implementations).
pub trait SourceFactory: Send + Sync {
    /// Checks a definition against its database without changing anything (tables exist,
    /// have a key, types map); the error says what is wrong.
    fn check<'a>(
        &'a self,
        config: &'a SourceConfig,
    ) -> BoxFuture<'a, std::result::Result<(), String>>;
    /// Starts a source writing into `sink`; it reports and retries its own failures.
    fn start(&self, sink: Arc<dyn ChangeSink>, config: SourceConfig) -> Arc<dyn Source>;
    /// Releases what a removed source holds in its database (a PostgreSQL source: its
    /// replication slot, which would otherwise keep WAL forever, and its publication
    /// unless `keep_publication`). Called after the source stopped.
    fn release<'a>(
        &'a self,
        config: &'a SourceConfig,
        keep_publication: bool,
    ) -> BoxFuture<'a, std::result::Result<(), String>>;
}
