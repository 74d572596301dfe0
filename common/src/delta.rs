//! Delta log access: create or adopt a table, list its files with key ranges, read the
//! applied staging sequence back from the `txn` action.

use std::collections::HashMap;

use deltalake::DeltaTable;
use deltalake::kernel::StructType;
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::key::{Bound, Key, key_from_json, key_part_from_stat};
use crate::schema::canonical_type;
use crate::storage::{StorageOptions, log_store, table_url};
use crate::table::TableDef;
use deltalake::logstore::LogStoreRef;

/// Tag on Freshet's Add actions holding the file's smallest local key (JSON).
pub const TAG_MIN_KEY: &str = "freshet.minKey";
/// Tag on Freshet's Add actions holding the file's largest local key (JSON).
pub const TAG_MAX_KEY: &str = "freshet.maxKey";

/// The table property that turns deletion vectors on (the protocol gets the
/// `deletionVectors` reader and writer feature with it).
pub const ENABLE_DELETION_VECTORS: &str = "delta.enableDeletionVectors";

/// Whether the table may carry deletion vectors.
pub fn deletion_vectors_enabled(table: &DeltaTable) -> bool {
    table
        .snapshot()
        .map(|s| s.table_config().enable_deletion_vectors == Some(true))
        .unwrap_or(false)
}

/// Turns deletion vectors on for an existing table (one metadata and protocol commit;
/// readers without deletion-vector support can no longer read it).
pub async fn enable_deletion_vectors(def: &TableDef, table: DeltaTable) -> Result<DeltaTable> {
    table
        .set_tbl_properties()
        .with_properties(HashMap::from([(
            ENABLE_DELETION_VECTORS.to_string(),
            "true".to_string(),
        )]))
        .await
        .map_err(|e| Error::delta(&def.name, e))
}

/// An active data file as the planner sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct FileEntry {
    /// Path relative to the table root.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Partition values (column -> value).
    pub partition_values: HashMap<String, String>,
    /// Rows in the file, when the log says.
    pub num_records: Option<u64>,
    /// The file's local-key range: exact from Freshet's tags, or conservative from the
    /// column statistics; `None` when unknown (the file may hold any key).
    pub range: Option<(Key, Key)>,
    /// The file's deletion vector: rows of it that are no longer part of the table.
    pub deletion_vector: Option<deltalake::kernel::DeletionVectorDescriptor>,
    /// The Add action's `stats` JSON, `tags` and modification time, carried over when the
    /// file is re-added with a new deletion vector.
    pub stats: Option<String>,
    pub tags: HashMap<String, Option<String>>,
    pub modification_time: i64,
}

impl FileEntry {
    /// Rows its deletion vector deletes.
    pub fn deleted_rows(&self) -> u64 {
        self.deletion_vector
            .as_ref()
            .map(|d| d.cardinality.max(0) as u64)
            .unwrap_or(0)
    }

    /// Live rows (rows minus deleted ones), when the log says.
    pub fn live_records(&self) -> Option<u64> {
        self.num_records
            .map(|n| n.saturating_sub(self.deleted_rows()))
    }
}

/// Opens the table, or creates it when the location holds no Delta table.
/// Returns the table and whether an existing table was adopted.
pub async fn open_or_create(
    def: &TableDef,
    options: &StorageOptions,
) -> Result<(DeltaTable, bool)> {
    let url = table_url(&def.name, &def.uri)?;
    open_or_create_in(def, log_store(&def.name, &url, options)?).await
}

/// [`open_or_create`] on a given log store (say, one over a wrapped object store).
pub async fn open_or_create_in(def: &TableDef, store: LogStoreRef) -> Result<(DeltaTable, bool)> {
    open_or_create_with(def, store, Default::default()).await
}

/// [`open_or_create_in`], a table created now getting the table properties `properties`
/// (maintenance settings, so no later commit has to add them).
pub async fn open_or_create_with(
    def: &TableDef,
    store: LogStoreRef,
    properties: std::collections::HashMap<String, String>,
) -> Result<(DeltaTable, bool)> {
    let mut table = DeltaTable::new(store);
    match table.load().await {
        Ok(()) => {
            check_adoptable(def, &table)?;
            Ok((table, true))
        }
        Err(deltalake::DeltaTableError::NotATable(_)) => {
            let mut properties = properties;
            if def.merge_mode != crate::table::MergeMode::CopyOnWrite {
                properties.insert(ENABLE_DELETION_VECTORS.to_string(), "true".to_string());
            }
            let schema: StructType =
                def.schema
                    .as_ref()
                    .try_into_kernel()
                    .map_err(|e| Error::InvalidTable {
                        table: def.name.clone(),
                        message: format!("schema has no Delta equivalent: {e}"),
                    })?;
            let table = table
                .create()
                .with_table_name(&def.name)
                .with_columns(schema.fields().cloned())
                .with_partition_columns(def.partition_by.clone())
                .with_configuration(properties.into_iter().map(|(k, v)| (k, Some(v))))
                .with_comment(format!(
                    "Freshet table, primary key ({})",
                    def.primary_key.join(", ")
                ))
                .await
                .map_err(|e| Error::delta(&def.name, e))?;
            Ok((table, false))
        }
        Err(e) => Err(Error::delta(&def.name, e)),
    }
}

/// Opens an existing table (at its latest version).
pub async fn open(def: &TableDef, options: &StorageOptions) -> Result<DeltaTable> {
    let url = table_url(&def.name, &def.uri)?;
    let mut table = DeltaTable::new(log_store(&def.name, &url, options)?);
    table.load().await.map_err(|e| Error::delta(&def.name, e))?;
    Ok(table)
}

/// Refuses to adopt a Delta table whose schema or partitioning differs from the definition.
fn check_adoptable(def: &TableDef, table: &DeltaTable) -> Result<()> {
    let bad = |message: String| Error::InvalidTable {
        table: def.name.clone(),
        message: format!(
            "existing Delta table at '{}' cannot be adopted: {message}",
            def.uri
        ),
    };
    let snapshot = table.snapshot().map_err(|e| Error::delta(&def.name, e))?;
    let existing = snapshot.snapshot().arrow_schema();
    let mut problems = Vec::new();
    for f in def.schema.fields() {
        match existing.field_with_name(f.name()) {
            Err(_) => problems.push(format!("column '{}' is missing", f.name())),
            Ok(e) => {
                if canonical_type(e.data_type()) != canonical_type(f.data_type()) {
                    problems.push(format!(
                        "column '{}' is {} in the table but {} in the definition",
                        f.name(),
                        e.data_type(),
                        f.data_type()
                    ));
                } else if !def.primary_key.contains(f.name()) && e.is_nullable() != f.is_nullable()
                {
                    problems.push(format!(
                        "column '{}' is {} in the table but {} in the definition",
                        f.name(),
                        if e.is_nullable() {
                            "nullable"
                        } else {
                            "not nullable"
                        },
                        if f.is_nullable() {
                            "nullable"
                        } else {
                            "not nullable"
                        },
                    ));
                }
            }
        }
    }
    for e in existing.fields() {
        if def.schema.field_with_name(e.name()).is_err() {
            problems.push(format!(
                "the table has column '{}' that the definition lacks",
                e.name()
            ));
        }
    }
    let parts = snapshot.metadata().partition_columns();
    if parts != &def.partition_by {
        problems.push(format!(
            "the table is partitioned by [{}] but the definition by [{}]",
            parts.join(", "),
            def.partition_by.join(", ")
        ));
    }
    if let Some(mode) = snapshot
        .metadata()
        .configuration()
        .get("delta.columnMapping.mode")
    {
        if mode != "none" {
            problems.push(format!("column mapping mode '{mode}' is not supported"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(bad(problems.join("; ")))
    }
}

/// The highest staging sequence applied to the table (0 when none).
pub async fn applied_sequence(def: &TableDef, table: &DeltaTable) -> Result<u64> {
    let snapshot = table.snapshot().map_err(|e| Error::delta(&def.name, e))?;
    let v = snapshot
        .transaction_version(table.log_store().as_ref(), def.app_id())
        .await
        .map_err(|e| Error::delta(&def.name, e))?;
    Ok(v.unwrap_or(0).max(0) as u64)
}

/// The Delta `txn` app id recording an idempotent-ingest producer's last applied batch.
pub fn producer_app_id(def: &TableDef, producer: &str) -> String {
    format!("{}:producer:{producer}", def.app_id())
}

/// The producer's last batch sequence applied to the table (none when never seen).
pub async fn producer_sequence(
    def: &TableDef,
    table: &DeltaTable,
    producer: &str,
) -> Result<Option<u64>> {
    let snapshot = table.snapshot().map_err(|e| Error::delta(&def.name, e))?;
    let v = snapshot
        .transaction_version(table.log_store().as_ref(), producer_app_id(def, producer))
        .await
        .map_err(|e| Error::delta(&def.name, e))?;
    Ok(v.map(|v| v.max(0) as u64))
}

/// Lists the active files with their key ranges.
pub fn files(def: &TableDef, table: &DeltaTable) -> Result<Vec<FileEntry>> {
    let snapshot = table.snapshot().map_err(|e| Error::delta(&def.name, e))?;
    let key_cols = def.local_key();
    let key_types = def.local_key_types();
    let mut out = Vec::new();
    for view in snapshot.log_data().iter() {
        #[allow(deprecated)]
        let add = view.add_action();
        let tags = add.tags.unwrap_or_default();
        let tagged = match (tags.get(TAG_MIN_KEY), tags.get(TAG_MAX_KEY)) {
            (Some(Some(lo)), Some(Some(hi))) => {
                match (key_from_json(lo, &key_types), key_from_json(hi, &key_types)) {
                    (Ok(lo), Ok(hi)) => Some((lo, hi)),
                    _ => None,
                }
            }
            _ => None,
        };
        let range = tagged.or_else(|| {
            let stats: Value = serde_json::from_str(add.stats.as_deref()?).ok()?;
            let bound = |field: &str, b: Bound| -> Option<Key> {
                key_cols
                    .iter()
                    .zip(&key_types)
                    .map(|(c, t)| key_part_from_stat(stats.get(field)?.get(c)?, t, b))
                    .collect()
            };
            Some((
                bound("minValues", Bound::Lower)?,
                bound("maxValues", Bound::Upper)?,
            ))
        });
        out.push(FileEntry {
            path: add.path.clone(),
            size: add.size.max(0) as u64,
            partition_values: add
                .partition_values
                .iter()
                .map(|(k, v)| (k.clone(), v.clone().unwrap_or_default()))
                .collect(),
            num_records: view.num_records().map(|n| n as u64),
            range,
            deletion_vector: add.deletion_vector.clone(),
            stats: add.stats.clone(),
            tags,
            modification_time: add.modification_time,
        });
    }
    Ok(out)
}
