//! The tables a term serves: opening (creating or adopting, then recovering) one, creating
//! one at run time, pausing, the admin view, and each table's cycle loop.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use freshet_common::delta::{applied_sequence, files, open_or_create_with};
use freshet_common::error::{Error, Result};
use freshet_common::schema::SchemaSpec;
use freshet_common::table::TableDef;
use freshet_proto::admin::v1::{CycleState, TableInfo};
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};
use tokio::sync::mpsc;

use crate::stage::run_stager;
use crate::tables::TableRuntime;
use crate::term::Inner;
use crate::{Coordinator, cycle, history, recovery};

/// Marker object whose presence pauses a table (so pauses survive leader changes).
const PAUSED_MARKER: &str = "_freshet/paused";

impl Coordinator {
    /// Pauses (or resumes) a table's cycles; recorded in the table's storage so a new
    /// leader keeps it paused.
    pub async fn set_paused(&self, table: &str, paused: bool) -> Result<TableInfo> {
        let t = self.table(table)?;
        let marker = Path::from(PAUSED_MARKER);
        if paused {
            t.store
                .put(
                    &marker,
                    PutPayload::from_static(b"paused by the admin API\n"),
                )
                .await
                .map_err(|e| Error::store(&marker, e))?;
        } else {
            match t.store.delete(&marker).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(Error::store(&marker, e)),
            }
        }
        t.paused.store(paused, Ordering::SeqCst);
        tracing::info!(table = %table, paused, "table pause state changed");
        if !paused {
            t.wake.notify_one();
        }
        self.table_info(&t).await
    }

    pub(crate) async fn open_table(&self, def: TableDef) -> Result<(Arc<TableRuntime>, bool)> {
        freshet_common::prefixes::check_uri(
            &self.inner().ctx.config.storage.allowed_prefixes,
            &def.name,
            &def.uri,
        )?;
        let log = self.inner().ctx.log_store(&def)?;
        let store = log.object_store(None);
        // A table created now carries the maintenance settings from its first version.
        let properties = if self.inner.ctx.config.maintenance.enabled {
            crate::maintenance::missing_properties(
                &Default::default(),
                &self.inner.ctx.config.maintenance,
            )
        } else {
            Default::default()
        };
        let (mut delta, adopted) = open_or_create_with(&def, log, properties).await?;
        if def.merge_mode == freshet_common::table::MergeMode::DeletionVectors
            && !freshet_common::delta::deletion_vectors_enabled(&delta)
        {
            tracing::warn!(table = %def.name, "merge_mode = deletion_vectors: enabling deletion vectors on the table; readers without support for them can no longer read it");
            delta = freshet_common::delta::enable_deletion_vectors(&def, delta).await?;
        }
        let grace = Duration::from_millis(self.inner().ctx.config.cycle.orphan_grace_ms);
        let budget = self.inner().ctx.config.ingest.max_pending_bytes;
        let rec = recovery::recover(&def, &store, &delta, grace, budget).await?;
        let (tx, rx) = mpsc::channel(1024);
        let t = TableRuntime::new(def, store, delta, tx);
        t.pending.lock().expect("lock").segments = rec.pending;
        *t.producers.lock().expect("lock") = rec.producers;
        let paused = t.store.head(&Path::from(PAUSED_MARKER)).await.is_ok();
        t.paused.store(paused, Ordering::SeqCst);
        {
            let p = t.pending.lock().expect("lock");
            self.inner()
                .ctx
                .metrics
                .pending(&t.def.name, p.rows(), p.bytes());
        }
        {
            let mut tables = self.inner().tables.write().expect("lock");
            if tables.contains_key(&t.def.name) {
                return Err(Error::TableExists(t.def.name.clone()));
            }
            tables.insert(t.def.name.clone(), t.clone());
        }
        tokio::spawn(run_stager(
            t.clone(),
            rx,
            rec.next_seq,
            self.inner().ctx.clone(),
        ));
        tokio::spawn(table_loop(self.inner().clone(), t.clone()));
        // Checkpoints, log cleanup and vacuum between cycles (under the same Delta lock).
        tokio::spawn(crate::maintenance::maintenance_loop(
            self.inner().ctx.clone(),
            t.clone(),
        ));
        tokio::spawn(history::load_history(self.inner().clone(), t.clone()));
        tracing::info!(table = %t.def.name, uri = %t.def.uri, adopted, applied = rec.applied, "serving table");
        Ok((t, adopted))
    }

    /// Creates (or adopts) a table at run time and records it in the catalog.
    pub async fn create_table(&self, def: TableDef) -> Result<(TableInfo, bool)> {
        freshet_common::prefixes::check_uri(
            &self.inner().ctx.config.storage.allowed_prefixes,
            &def.name,
            &def.uri,
        )?;
        if self
            .inner
            .tables
            .read()
            .expect("lock")
            .contains_key(&def.name)
        {
            return Err(Error::TableExists(def.name.clone()));
        }
        let (t, adopted) = self.open_table(def).await?;
        if let Some(cat) = &self.inner().catalog {
            cat.save(&t.def).await?;
        }
        Ok((self.table_info(&t).await?, adopted))
    }

    /// Stops serving a table created at run time and forgets it (catalog); with
    /// `delete_data` every object under its URI is deleted. Refused for a table of the
    /// configuration file, a table a source feeds, and (without `force`) a table with
    /// acknowledged changes still pending. Returns (pending changes discarded, objects
    /// deleted).
    pub async fn drop_table(
        &self,
        name: &str,
        delete_data: bool,
        force: bool,
    ) -> Result<(u64, u64)> {
        let refuse = |message: String| Error::InvalidTable {
            table: name.to_string(),
            message,
        };
        if self.inner.ctx.config.tables.iter().any(|t| t.name == name) {
            return Err(refuse(
                "defined in the configuration file: remove it there".into(),
            ));
        }
        let t = self.table(name)?;
        {
            let sources = self.inner.sources.lock().expect("lock");
            if let Some(s) = sources
                .iter()
                .find(|s| s.def.tables.iter().any(|x| x.name == name))
            {
                return Err(refuse(format!(
                    "fed by source '{}': remove the source, or the table from its definition, first",
                    s.def.name
                )));
            }
        }
        if self.inner.catalog.is_none() {
            return Err(refuse(
                "tables are dropped from the catalog: set catalog.uri".into(),
            ));
        };
        // The table's lock: a running cycle ends first, and none starts meanwhile.
        let _delta = t.delta.lock().await;
        let pending = t.pending.lock().expect("lock").rows();
        if pending > 0 && !force {
            return Err(refuse(format!(
                "{pending} acknowledged changes are not applied yet: wait for the next cycle, or drop with force to discard them"
            )));
        }
        let deleted = self.forget_table(&t, delete_data).await?;
        tracing::info!(table = %name, pending_discarded = pending, objects_deleted = deleted, "table dropped");
        Ok((pending, deleted))
    }

    /// Stops serving `t` and forgets it (catalog); with `delete_data` deletes every object
    /// under its URI. The caller holds the table's Delta lock. Returns objects deleted.
    pub(crate) async fn forget_table(
        &self,
        t: &Arc<TableRuntime>,
        delete_data: bool,
    ) -> Result<u64> {
        let name = t.def.name.as_str();
        self.inner.ctx.fence.check().await?;
        if let Some(catalog) = &self.inner.catalog {
            catalog.remove(name).await?;
        }
        let _ = t.closed.send(true);
        self.inner.tables.write().expect("lock").remove(name);
        let mut deleted = 0u64;
        if delete_data {
            use futures::TryStreamExt;
            let objects: Vec<_> = t
                .store
                .list(None)
                .map_ok(|m| m.location)
                .try_collect()
                .await
                .map_err(|e| Error::store(&t.def.uri, e))?;
            for path in objects {
                match t.store.delete(&path).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => deleted += 1,
                    Err(e) => return Err(Error::store(&path, e)),
                }
            }
        }
        Ok(deleted)
    }

    /// A served table.
    pub fn table(&self, name: &str) -> Result<Arc<TableRuntime>> {
        self.inner
            .tables
            .read()
            .expect("lock")
            .get(name)
            .cloned()
            .ok_or_else(|| Error::TableNotFound(name.to_string()))
    }

    /// Every served table.
    pub fn tables(&self) -> Vec<Arc<TableRuntime>> {
        self.inner
            .tables
            .read()
            .expect("lock")
            .values()
            .cloned()
            .collect()
    }

    /// The admin view of a table.
    pub async fn table_info(&self, t: &TableRuntime) -> Result<TableInfo> {
        let table = t.delta.lock().await;
        let active = files(&t.def, &table)?;
        let applied = applied_sequence(&t.def, &table).await?;
        let (pending_changes, pending_bytes) = {
            let p = t.pending.lock().expect("lock");
            (p.rows(), p.bytes())
        };
        // Freshness over the last (up to) 100 committed cycles of the table.
        let lags = {
            let h = self.inner().history.lock().expect("lock");
            let mut v: Vec<u64> = h
                .iter()
                .filter(|c| {
                    c.table == t.def.name && c.state() == CycleState::Committed && c.kind.is_empty()
                })
                .take(100)
                .map(|c| c.freshness_lag_ms)
                .collect();
            v.sort_unstable();
            let pct = |p: f64| {
                if v.is_empty() {
                    0
                } else {
                    v[((v.len() - 1) as f64 * p).round() as usize]
                }
            };
            (pct(0.5), pct(0.99), v.len() as u32)
        };
        Ok(TableInfo {
            name: t.def.name.clone(),
            uri: t.def.uri.clone(),
            schema_json: SchemaSpec::from_arrow(&t.def.schema).to_json(),
            primary_key: t.def.primary_key.clone(),
            partition_columns: t.def.partition_by.clone(),
            target_file_size: t.def.target_file_size,
            version: table.version().map(|v| v as i64).unwrap_or(-1),
            num_files: active.len() as u64,
            total_bytes: active.iter().map(|f| f.size).sum(),
            total_rows: active.iter().map(|f| f.live_records().unwrap_or(0)).sum(),
            pending_changes,
            pending_bytes,
            applied_sequence: applied,
            last_cycle: t.last_cycle.lock().expect("lock").clone(),
            paused: t.paused.load(Ordering::SeqCst),
            freshness_p50_ms: lags.0,
            freshness_p99_ms: lags.1,
            freshness_window: lags.2,
            merge_mode: t.def.merge_mode.as_str().to_string(),
            deletion_vectors: freshet_common::delta::deletion_vectors_enabled(&table),
            deleted_rows: active.iter().map(|f| f.deleted_rows()).sum(),
        })
    }
}

pub(crate) async fn table_loop(inner: Arc<Inner>, t: Arc<TableRuntime>) {
    let interval = Duration::from_millis(inner.ctx.config.cycle.interval_ms.max(1));
    let mut stop = inner.ctx.stop.subscribe();
    let mut closed = t.closed.subscribe();
    let compaction = inner.ctx.config.compaction.clone();
    let mut last_compaction = std::time::Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = t.wake.notified() => {}
            _ = stop.wait_for(|s| *s) => return,
            _ = closed.wait_for(|s| *s) => return,
        }
        if t.paused.load(Ordering::SeqCst) {
            continue;
        }
        if t.pending.lock().expect("lock").segments.is_empty() {
            // Idle: fold what cycles left behind, at most every `compaction.interval_ms`.
            if compaction.enabled
                && last_compaction.elapsed() >= Duration::from_millis(compaction.interval_ms)
                && !inner.ctx.is_dead()
            {
                last_compaction = std::time::Instant::now();
                match crate::compaction::run_compaction(&inner.ctx, &t).await {
                    Ok(Some(rec)) => inner.record(&t, &rec),
                    Ok(None) => {}
                    Err(e) => tracing::warn!(table = %t.def.name, error = %e, "compaction skipped"),
                }
            }
            continue;
        }
        if inner.ctx.is_dead() || *stop.borrow() {
            return;
        }
        match cycle::run_cycle(&inner.ctx, &t).await {
            Ok(rec) => inner.record(&t, &rec),
            // A lease check that failed while the term goes on (keep-alives late, say while
            // etcd restarts) only skips this cycle; a lost term or an injected crash ends it.
            Err(Error::LeadershipLost(e)) if !inner.ctx.fence.is_lost() => {
                tracing::warn!(table = %t.def.name, error = %e, "cycle skipped: leadership not confirmed");
            }
            Err(e) => {
                tracing::error!(table = %t.def.name, error = %e, "cycle stopped the coordinator");
                return;
            }
        }
    }
}
