//! Read-your-writes: a table as acknowledged, not only as committed. With
//! [`Freshness::Latest`] a query sees the committed snapshot with the staged, not yet
//! committed changes laid over it (the last change per key; deletes hide rows), so a change
//! is visible as soon as its batch is acknowledged, before its cycle commits.
//!
//! Consistency: the pending segments are taken first, then the committed snapshot, and only
//! segments above the snapshot's applied sequence are laid over it. A segment committed in
//! between is then in the snapshot (and skipped), and a segment acknowledged after the first
//! step and already committed has a higher sequence than every one taken, so all of those
//! are skipped too: the view is always the table after some prefix of the acknowledged
//! batches, never older than what was acknowledged before the query began. A source
//! transaction staged in chunks is laid over only once its last chunk is staged.

use std::sync::Arc;

use arrow::array::{AsArray, RecordBatch};
use arrow::compute::filter_record_batch;
use datafusion::datasource::TableProvider;
use datafusion::logical_expr::JoinType;
use datafusion::prelude::{SessionContext, cast, col};
use freshet_common::changes::{OP_COLUMN, OP_UPSERT, last_change_per_key};
use freshet_common::delta::applied_sequence;
use freshet_common::error::{Error, Result};
use freshet_common::staging::{batch_sequence, read_segment_contents};

use crate::Coordinator;
use crate::tables::TableRuntime;

/// What a read sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Freshness {
    /// What the last cycle committed (what every Delta reader sees).
    #[default]
    Committed,
    /// The committed snapshot with every acknowledged change laid over it.
    Latest,
}

impl std::str::FromStr for Freshness {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "committed" => Ok(Freshness::Committed),
            "latest" => Ok(Freshness::Latest),
            _ => Err(Error::Config(format!(
                "unknown freshness '{s}' (committed, latest)"
            ))),
        }
    }
}

/// The catalog and schema the served tables are listed under (`freshet.public.orders`).
pub const QUERY_CATALOG: &str = "freshet";
/// See [`QUERY_CATALOG`].
pub const QUERY_SCHEMA: &str = "public";

fn df(table: &str) -> impl Fn(datafusion::error::DataFusionError) -> Error + '_ {
    move |e| Error::Internal(format!("table '{table}': {e}"))
}

impl Coordinator {
    /// A DataFusion session with every served table registered under its name, as
    /// `freshness` says.
    pub async fn query_session(&self, freshness: Freshness) -> Result<SessionContext> {
        let config = datafusion::prelude::SessionConfig::new()
            .with_default_catalog_and_schema(QUERY_CATALOG, QUERY_SCHEMA)
            .with_create_default_catalog_and_schema(true)
            .with_information_schema(true)
            // DataFusion 55's RepartitionExec panics ("partition not used yet") when an
            // operator fails (say, over the memory limit) while partitions are still being
            // set up; a single partition per query avoids it, and the coordinator is no
            // analytics engine (it also stages and commits).
            .with_target_partitions(1);
        // Every query of the term draws from one bounded pool.
        // No spilling: a query over the limit is refused rather than filling the
        // coordinator's local disk.
        use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
        let runtime = datafusion::execution::runtime_env::RuntimeEnvBuilder::new()
            .with_memory_pool(self.context().query_pool.clone())
            .with_disk_manager_builder(
                DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled),
            )
            .build_arc()
            .map_err(|e| Error::Internal(e.to_string()))?;
        let ctx = SessionContext::new_with_config_rt(config, runtime);
        for t in self.tables() {
            let provider = self.table_provider(&ctx, &t, freshness).await?;
            ctx.register_table(t.def.name.as_str(), provider)
                .map_err(df(&t.def.name))?;
        }
        Ok(ctx)
    }

    /// One table for `ctx` as `freshness` says.
    pub async fn table_provider(
        &self,
        ctx: &SessionContext,
        t: &Arc<TableRuntime>,
        freshness: Freshness,
    ) -> Result<Arc<dyn TableProvider>> {
        let name = t.def.name.as_str();
        // 1. The pending segments (before the snapshot: see the module doc), up to the last
        //    one that does not end inside a chunked transaction.
        let segments = if freshness == Freshness::Latest {
            let p = t.pending.lock().expect("lock");
            let end = p
                .segments
                .iter()
                .rposition(|s| !s.open)
                .map(|i| i + 1)
                .unwrap_or(0);
            p.segments[..end].to_vec()
        } else {
            Vec::new()
        };
        // 2. The committed snapshot: the table's handle when no cycle holds it, else the
        //    log's latest version.
        let delta = match t.delta.try_lock() {
            Ok(d) => d.clone(),
            Err(_) => {
                let log = self.context().log_store(&t.def)?;
                let mut d = deltalake::DeltaTable::new(log);
                d.load().await.map_err(|e| Error::delta(name, e))?;
                d
            }
        };
        delta
            .update_datafusion_session(&ctx.state())
            .map_err(|e| Error::delta(name, e))?;
        let committed = delta.table_provider().await.map_err(df(name))?;
        if segments.is_empty() {
            return Ok(committed);
        }
        let applied = applied_sequence(&t.def, &delta).await?;
        let mut batches = Vec::new();
        for s in segments.iter().filter(|s| s.last > applied) {
            match &s.batches {
                Some(b) => batches.extend(b.iter().cloned()),
                None => {
                    let c = read_segment_contents(&t.store, &s.path).await?;
                    batches.extend(
                        c.batches
                            .into_iter()
                            .filter(|b| batch_sequence(b).is_none_or(|q| !s.skip.contains(&q))),
                    );
                }
            }
        }
        if batches.is_empty() {
            return Ok(committed);
        }
        // 3. The last change per key, laid over the snapshot.
        let changes: Vec<RecordBatch> = last_change_per_key(&t.def, &batches)?
            .into_iter()
            .map(|p| p.batch)
            .collect();
        let schema = changes[0].schema();
        let changes = arrow::compute::concat_batches(&schema, &changes)
            .map_err(|e| Error::Internal(format!("table '{name}': {e}")))?;
        let ops = changes
            .column_by_name(OP_COLUMN)
            .ok_or_else(|| Error::Internal("changes without __op".into()))?
            .as_primitive::<arrow::datatypes::Int8Type>();
        let is_upsert: arrow::array::BooleanArray =
            ops.iter().map(|o| Some(o == Some(OP_UPSERT))).collect();
        let upserts = filter_record_batch(&changes, &is_upsert)
            .map_err(|e| Error::Internal(format!("table '{name}': {e}")))?;

        let key_alias: Vec<String> = t
            .def
            .primary_key
            .iter()
            .map(|k| format!("__freshet_key_{k}"))
            .collect();
        let keys = ctx
            .read_batch(changes.clone())
            .map_err(df(name))?
            .select(
                t.def
                    .primary_key
                    .iter()
                    .zip(&key_alias)
                    .map(|(k, a)| col(format!("\"{k}\"")).alias(a))
                    .collect::<Vec<_>>(),
            )
            .map_err(df(name))?;
        let committed_df = ctx.read_table(committed.clone()).map_err(df(name))?;
        let target = committed.schema();
        // Both sides in the table's column order, with the snapshot's types.
        let columns: Vec<_> = t
            .def
            .schema
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        let typed = |df: datafusion::dataframe::DataFrame| {
            df.select(
                columns
                    .iter()
                    .map(|c| {
                        let ty = target
                            .field_with_name(c)
                            .map(|f| f.data_type().clone())
                            .unwrap_or(arrow::datatypes::DataType::Null);
                        cast(col(format!("\"{c}\"")), ty).alias(c)
                    })
                    .collect::<Vec<_>>(),
            )
        };
        let pk: Vec<&str> = t.def.primary_key.iter().map(String::as_str).collect();
        let alias: Vec<&str> = key_alias.iter().map(String::as_str).collect();
        let kept = committed_df
            .join(keys, JoinType::LeftAnti, &pk, &alias, None)
            .map_err(df(name))?;
        let kept = typed(kept).map_err(df(name))?;
        let fresh = typed(ctx.read_batch(upserts).map_err(df(name))?).map_err(df(name))?;
        let view = kept.union(fresh).map_err(df(name))?;
        Ok(view.into_view())
    }
}

/// A time-travel table reference in SQL: `"orders@v12"` (version 12) or
/// `"orders@2026-12-01T10:00:00Z"` (the last version committed at or before that time).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimeTravel {
    /// The whole quoted name, as the query writes it.
    pub name: String,
    /// The served table.
    pub table: String,
    /// Which version.
    pub at: AsOf,
}

/// A version to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AsOf {
    /// A Delta version.
    Version(u64),
    /// The last version committed at or before this time.
    Time(chrono::DateTime<chrono::Utc>),
}

/// The time-travel references in `sql`: double-quoted identifiers `table@v<N>` or
/// `table@<RFC 3339 time>`. A quoted name with `@` that fits neither is an error naming it.
pub fn time_travel_refs(sql: &str) -> Result<Vec<TimeTravel>> {
    let mut out: Vec<TimeTravel> = Vec::new();
    let mut rest = sql;
    while let Some(start) = rest.find('"') {
        let after = &rest[start + 1..];
        let Some(end) = after.find('"') else { break };
        let name = &after[..end];
        rest = &after[end + 1..];
        let Some((table, spec)) = name.split_once('@') else {
            continue;
        };
        let at = if let Some(v) = spec.strip_prefix('v')
            && let Ok(v) = v.parse::<u64>()
        {
            AsOf::Version(v)
        } else if let Ok(t) = chrono::DateTime::parse_from_rfc3339(spec) {
            AsOf::Time(t.with_timezone(&chrono::Utc))
        } else {
            return Err(Error::Config(format!(
                "\"{name}\": after '@' give a version (v12) or an RFC 3339 time (2026-12-01T10:00:00Z)"
            )));
        };
        if !out.iter().any(|t| t.name == name) {
            out.push(TimeTravel {
                name: name.to_string(),
                table: table.to_string(),
                at,
            });
        }
    }
    Ok(out)
}

impl Coordinator {
    /// Registers in `ctx` every time-travel reference of `sql` (see [`time_travel_refs`]):
    /// the served table read at that version, under the quoted name the query uses.
    pub async fn register_time_travel(&self, ctx: &SessionContext, sql: &str) -> Result<()> {
        for r in time_travel_refs(sql)? {
            let t = self.table(&r.table)?;
            let log = self.context().log_store(&t.def)?;
            let mut d = deltalake::DeltaTable::new(log);
            let loaded = match &r.at {
                AsOf::Version(v) => d.load_version(*v).await,
                AsOf::Time(at) => d.load_with_datetime(*at).await,
            };
            loaded.map_err(|e| {
                Error::Config(format!(
                    "\"{}\": table '{}' has no such version: {e}",
                    r.name, r.table
                ))
            })?;
            d.update_datafusion_session(&ctx.state())
                .map_err(|e| Error::delta(&r.table, e))?;
            let provider = d.table_provider().await.map_err(df(&r.table))?;
            ctx.register_table(
                datafusion::common::TableReference::bare(r.name.as_str()),
                provider,
            )
            .map_err(df(&r.table))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_travel_names_are_parsed_and_bad_ones_named() {
        let r = time_travel_refs(
            r#"SELECT * FROM "orders@v3" o JOIN freshet.public."users@2026-12-01T10:00:00Z" u ON true WHERE o.v = 'a@b' AND "plain" = 1"#,
        )
        .unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(
            (r[0].table.as_str(), &r[0].at),
            ("orders", &AsOf::Version(3))
        );
        assert_eq!(r[1].table, "users");
        assert!(matches!(r[1].at, AsOf::Time(_)));
        let e = time_travel_refs(r#"SELECT * FROM "orders@yesterday""#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("orders@yesterday") && e.contains("RFC 3339"),
            "{e}"
        );
    }
}
