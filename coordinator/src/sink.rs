//! The coordinator as the [`ChangeSink`] of the sources its term runs: each call delegates
//! to the term's own operations (`ingest`, `source_ops`, `lifecycle`).

use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use bytes::Bytes;
use freshet_common::error::{Error, Result};
use freshet_common::sink::ChangeSink;
use freshet_common::table::TableDef;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};

use crate::Coordinator;

/// Where a source's marker is kept, beside the table's Delta log.
const SOURCE_MARKER: &str = "_freshet/source.json";

#[async_trait]
impl ChangeSink for Coordinator {
    async fn stage_chunk(
        &self,
        table: &str,
        batch: RecordBatch,
        sequence: u64,
        origin_ms: Option<i64>,
        open: bool,
    ) -> Result<u64> {
        Coordinator::stage_chunk(self, table, batch, sequence, origin_ms, open).await
    }

    async fn stage_changes(
        &self,
        table: &str,
        batch: RecordBatch,
        sequence: u64,
        origin_ms: Option<i64>,
    ) -> Result<u64> {
        Coordinator::stage_changes(self, table, batch, sequence, origin_ms).await
    }

    async fn truncate(&self, table: &str, sequence: u64) -> Result<()> {
        Coordinator::truncate(self, table, sequence).await?;
        Ok(())
    }

    async fn add_columns(&self, def: TableDef) -> Result<()> {
        Coordinator::add_columns(self, def).await
    }

    async fn ensure_table(&self, def: TableDef) -> Result<TableDef> {
        let name = def.name.clone();
        match self.create_table(def).await {
            Ok(_) | Err(Error::TableExists(_)) => {}
            Err(e) => return Err(e),
        }
        Ok(self.table(&name)?.def.clone())
    }

    fn table_def(&self, table: &str) -> Result<TableDef> {
        Ok(self.table(table)?.def.clone())
    }

    async fn set_paused(&self, table: &str, paused: bool) -> Result<()> {
        Coordinator::set_paused(self, table, paused).await?;
        Ok(())
    }

    async fn read_marker(&self, table: &str) -> Result<Option<Bytes>> {
        let t = self.table(table)?;
        freshet_common::storage::read_object(&t.store, &Path::from(SOURCE_MARKER)).await
    }

    async fn write_marker(&self, table: &str, marker: Bytes) -> Result<()> {
        let t = self.table(table)?;
        t.store
            .put(&Path::from(SOURCE_MARKER), PutPayload::from(marker))
            .await
            .map_err(|e| Error::store(SOURCE_MARKER, e))?;
        Ok(())
    }
}
