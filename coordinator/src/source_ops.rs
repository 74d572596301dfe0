//! What sources do to a table besides staging changes: TRUNCATE and ADD COLUMN. Both first
//! apply what is staged before them (a barrier), so they land in order.

use std::sync::Arc;

use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
use freshet_common::delta::{applied_sequence, files};
use freshet_common::error::{Error, Result};
use freshet_common::table::TableDef;
use freshet_proto::admin::v1::CycleState;

use crate::tables::TableRuntime;
use crate::{Coordinator, commit, cycle};

impl Coordinator {
    /// Adds nullable columns at the end of a table fed by the ingest API (`freshet table
    /// alter`); a source's tables follow their database instead.
    pub async fn alter_table_add_columns(
        &self,
        name: &str,
        columns: freshet_common::schema::SchemaSpec,
    ) -> Result<freshet_proto::admin::v1::TableInfo> {
        let t = self.table(name)?;
        let refuse = |message: String| Error::InvalidTable {
            table: name.to_string(),
            message,
        };
        if let Some(s) = self
            .inner
            .sources
            .lock()
            .expect("lock")
            .iter()
            .find(|s| s.def.tables.iter().any(|x| x.name == name))
        {
            return Err(refuse(format!(
                "fed by source '{}': its columns follow the database (ALTER TABLE there)",
                s.def.name
            )));
        }
        if self.inner.ctx.config.tables.iter().any(|x| x.name == name) {
            return Err(refuse(
                "defined in the configuration file, whose [[tables]] entry gives its columns"
                    .into(),
            ));
        }
        if columns.fields.is_empty() {
            return Err(refuse("no columns to add".into()));
        }
        let added = columns.to_arrow().map_err(|e| refuse(e.to_string()))?;
        let mut fields: Vec<arrow::datatypes::Field> = t
            .def
            .schema
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        for f in added.fields() {
            if t.def.schema.field_with_name(f.name()).is_ok() {
                return Err(refuse(format!("column '{}' exists already", f.name())));
            }
            fields.push(f.as_ref().clone().with_nullable(true));
        }
        let new_def = TableDef::new(
            &t.def.name,
            &t.def.uri,
            Arc::new(arrow::datatypes::Schema::new(fields)),
            t.def.primary_key.clone(),
            t.def.partition_by.clone(),
            t.def.target_file_size,
        )?;
        self.add_columns(new_def).await?;
        let t = self.table(name)?;
        self.table_info(&t).await
    }

    /// Runs cycles until no staged segment starts below `before` (a barrier before an
    /// operation that must follow those changes).
    async fn apply_pending(&self, t: &Arc<TableRuntime>, before: u64, what: &str) -> Result<()> {
        loop {
            let pending = t
                .pending
                .lock()
                .expect("lock")
                .segments
                .iter()
                .any(|s| s.first < before);
            if !pending {
                return Ok(());
            }
            let rec = cycle::run_cycle(&self.inner().ctx, t).await?;
            self.inner().record(t, &rec);
            if rec.state() == CycleState::Failed {
                return Err(Error::Internal(format!(
                    "table '{}': cycle before {what} failed: {}",
                    t.def.name, rec.error
                )));
            }
        }
    }

    /// Empties the table in one commit at `sequence` (a source's TRUNCATE): changes staged
    /// before it are applied first; a truncate already applied (txn at or above `sequence`)
    /// is not repeated.
    pub async fn truncate(&self, table: &str, sequence: u64) -> Result<i64> {
        let t = self.table(table)?;
        self.apply_pending(&t, sequence, "truncate").await?;
        let mut delta = t.delta.lock().await;
        delta
            .update_state()
            .await
            .map_err(|e| Error::delta(table, e))?;
        if applied_sequence(&t.def, &delta).await? >= sequence {
            return Ok(delta.version().map(|v| v as i64).unwrap_or(-1));
        }
        self.inner().ctx.fence.check().await?;
        let removed = files(&t.def, &delta)?;
        let actions = commit::actions(&removed, &[], &[]);
        let id = uuid::Uuid::now_v7().to_string();
        let metrics = serde_json::json!({
            "truncate": true, "filesRemoved": removed.len(), "lastSequence": sequence,
            "epoch": self.inner().ctx.epoch, "coordinator": self.inner().ctx.node_id,
        });
        let v = commit::commit(
            &t.def,
            &mut delta,
            actions,
            sequence,
            &Default::default(),
            &id,
            metrics,
            &self.inner().ctx.fence,
        )
        .await?;
        tracing::info!(table = %table, version = v, files = removed.len(), "table truncated");
        Ok(v)
    }

    /// Adds nullable columns to a table (a source's ALTER TABLE ADD COLUMN): applies what
    /// is pending under the old schema, commits the new schema to the Delta log, records it
    /// in the catalog, and serves the table under `new_def` from then on. Existing files
    /// read the new columns as null.
    pub async fn add_columns(&self, new_def: TableDef) -> Result<()> {
        let name = new_def.name.clone();
        let t = self.table(&name)?;
        let old = &t.def;
        let prefix_ok = new_def.schema.fields().len() > old.schema.fields().len()
            && old
                .schema
                .fields()
                .iter()
                .zip(new_def.schema.fields())
                .all(|(a, b)| a.name() == b.name() && a.data_type() == b.data_type());
        let added: Vec<_> = new_def.schema.fields()
            [old.schema.fields().len().min(new_def.schema.fields().len())..]
            .iter()
            .map(|f| f.as_ref().clone().with_nullable(true))
            .collect();
        if !prefix_ok
            || new_def.primary_key != old.primary_key
            || new_def.partition_by != old.partition_by
        {
            return Err(Error::InvalidTable {
                table: name,
                message:
                    "only new nullable columns at the end can be added; keys and partitioning stay"
                        .into(),
            });
        }
        // Everything staged under the old schema goes in first.
        self.apply_pending(&t, u64::MAX, "the schema change")
            .await?;
        {
            let mut delta = t.delta.lock().await;
            delta
                .update_state()
                .await
                .map_err(|e| Error::delta(&name, e))?;
            self.inner().ctx.fence.check().await?;
            let fields: deltalake::kernel::StructType =
                (&arrow::datatypes::Schema::new(added.clone()))
                    .try_into_kernel()
                    .map_err(|e| Error::InvalidTable {
                        table: name.clone(),
                        message: format!("new columns have no Delta equivalent: {e}"),
                    })?;
            let evolved = delta
                .clone()
                .add_columns()
                .with_fields(fields.fields().cloned().collect::<Vec<_>>())
                .await
                .map_err(|e| Error::delta(&name, e))?;
            *delta = evolved;
        }
        // Serve the table under the new definition.
        let _ = t.closed.send(true);
        self.inner().tables.write().expect("lock").remove(&name);
        let mut def = new_def;
        let fields: Vec<_> = def
            .schema
            .fields()
            .iter()
            .enumerate()
            .map(|(i, f)| {
                if i >= t.def.schema.fields().len() {
                    f.as_ref().clone().with_nullable(true)
                } else {
                    f.as_ref().clone()
                }
            })
            .collect();
        def.schema = std::sync::Arc::new(arrow::datatypes::Schema::new(fields));
        let (nt, _) = self.open_table(def).await?;
        if let Some(cat) = &self.inner().catalog {
            cat.save(&nt.def).await?;
        }
        tracing::info!(table = %name, columns = ?added.iter().map(|f| f.name().clone()).collect::<Vec<_>>(), "columns added");
        Ok(())
    }
}
