//! Table definitions: name, location, schema, primary key, partitioning, file size.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Date32Type, Field, Schema, SchemaRef};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::key::key_type_supported;
use crate::schema::{ColumnSpec, SchemaSpec};

/// Default target size of a data file: 32 MiB.
pub const DEFAULT_TARGET_FILE_SIZE: u64 = 32 * 1024 * 1024;

/// How cycles apply changes to the files they touch (docs/merge-on-read.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MergeMode {
    /// The cost model chooses per file group: deletion vectors where the table's protocol
    /// has them (tables Freshet creates do), else copy-on-write.
    #[default]
    Auto,
    /// Always rewrite the touched files (readers without deletion-vector support can read
    /// the table).
    CopyOnWrite,
    /// Deletion vectors wherever a group has files (folded back by copy-on-write when a
    /// group grows too many files or deleted rows); the table's protocol gets the feature.
    DeletionVectors,
}

impl MergeMode {
    /// The configuration spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            MergeMode::Auto => "auto",
            MergeMode::CopyOnWrite => "copy_on_write",
            MergeMode::DeletionVectors => "deletion_vectors",
        }
    }

    /// Parses the configuration spelling (empty means `auto`); `table` names the table in
    /// the error.
    pub fn parse(s: &str, table: &str) -> Result<MergeMode> {
        match s {
            "" | "auto" => Ok(MergeMode::Auto),
            "copy_on_write" => Ok(MergeMode::CopyOnWrite),
            "deletion_vectors" => Ok(MergeMode::DeletionVectors),
            other => Err(Error::InvalidTable {
                table: table.to_string(),
                message: format!(
                    "merge_mode '{other}' is not one of auto, copy_on_write, deletion_vectors"
                ),
            }),
        }
    }
}

/// A table as written in the config file (or sent to CreateTable).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableConfig {
    /// The table's name (letters, digits, `_`, `-`).
    pub name: String,
    /// The Delta table's URI: `file:///...`, `s3://bucket/prefix`, or a local path.
    pub uri: String,
    /// The columns, in order.
    pub columns: Vec<ColumnSpec>,
    /// Primary key columns, in key order.
    pub primary_key: Vec<String>,
    /// Partition columns: a subset of the primary key.
    #[serde(default)]
    pub partition_by: Vec<String>,
    /// Target size of a data file in bytes (default 32 MiB).
    #[serde(default)]
    pub target_file_size: Option<u64>,
    /// How cycles apply changes (default `auto`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge_mode: Option<MergeMode>,
}

/// A validated table definition.
#[derive(Debug, Clone, PartialEq)]
pub struct TableDef {
    /// The table's name.
    pub name: String,
    /// The Delta table's URI.
    pub uri: String,
    /// The full Arrow schema (partition columns included), key columns non-nullable.
    pub schema: SchemaRef,
    /// Primary key columns, in key order.
    pub primary_key: Vec<String>,
    /// Partition columns.
    pub partition_by: Vec<String>,
    /// Target size of a data file in bytes.
    pub target_file_size: u64,
    /// How cycles apply changes.
    pub merge_mode: MergeMode,
}

impl TableConfig {
    /// Validates the configuration into a definition.
    pub fn to_def(&self) -> Result<TableDef> {
        let schema = SchemaSpec {
            fields: self.columns.clone(),
        }
        .to_arrow()
        .map_err(|e| Error::InvalidTable {
            table: self.name.clone(),
            message: e.to_string(),
        })?;
        TableDef::new(
            &self.name,
            &self.uri,
            schema,
            self.primary_key.clone(),
            self.partition_by.clone(),
            self.target_file_size.unwrap_or(DEFAULT_TARGET_FILE_SIZE),
        )
        .map(|d| d.with_merge_mode(self.merge_mode.unwrap_or_default()))
    }
}

impl TableDef {
    /// Builds and validates a definition. Key columns become non-nullable.
    pub fn new(
        name: &str,
        uri: &str,
        schema: SchemaRef,
        primary_key: Vec<String>,
        partition_by: Vec<String>,
        target_file_size: u64,
    ) -> Result<Self> {
        let bad = |message: String| Error::InvalidTable {
            table: name.to_string(),
            message,
        };
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(bad(format!(
                "bad table name '{name}': use letters, digits, '_' and '-'"
            )));
        }
        if uri.trim().is_empty() {
            return Err(bad("the table has no uri".into()));
        }
        if primary_key.is_empty() {
            return Err(bad(
                "the primary key is empty; name at least one column".into()
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for k in &primary_key {
            if !seen.insert(k) {
                return Err(bad(format!("primary key column '{k}' is listed twice")));
            }
            let field = schema.field_with_name(k).map_err(|_| {
                bad(format!(
                    "primary key column '{k}' is not a column of the schema"
                ))
            })?;
            if !key_type_supported(field.data_type()) {
                return Err(bad(format!(
                    "primary key column '{k}' has type {}, which cannot be a key (floats and nested types cannot)",
                    field.data_type()
                )));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for p in &partition_by {
            if !seen.insert(p) {
                return Err(bad(format!("partition column '{p}' is listed twice")));
            }
            if !primary_key.contains(p) {
                return Err(bad(format!(
                    "partition column '{p}' is not part of the primary key ({}); partition columns must be a subset of the primary key, so that an update never moves a row between partitions",
                    primary_key.join(", ")
                )));
            }
            let t = schema
                .field_with_name(p)
                .expect("key column exists")
                .data_type();
            if !matches!(
                t,
                DataType::Int8
                    | DataType::Int16
                    | DataType::Int32
                    | DataType::Int64
                    | DataType::UInt8
                    | DataType::UInt16
                    | DataType::UInt32
                    | DataType::UInt64
                    | DataType::Utf8
                    | DataType::Date32
                    | DataType::Boolean
            ) {
                return Err(bad(format!(
                    "partition column '{p}' has type {t}; partition columns must be integers, strings, dates or booleans"
                )));
            }
        }
        if partition_by.len() == schema.fields().len() {
            return Err(bad(
                "every column is a partition column; keep at least one data column".into(),
            ));
        }
        if target_file_size < 1024 {
            return Err(bad(format!(
                "target_file_size {target_file_size} is below 1024 bytes"
            )));
        }
        let fields: Vec<Field> = schema
            .fields()
            .iter()
            .map(|f| {
                let f = f.as_ref().clone();
                if primary_key.contains(f.name()) {
                    f.with_nullable(false)
                } else {
                    f
                }
            })
            .collect();
        Ok(TableDef {
            name: name.to_string(),
            uri: uri.trim().to_string(),
            schema: Arc::new(Schema::new(fields)),
            primary_key,
            partition_by,
            target_file_size,
            merge_mode: MergeMode::Auto,
        })
    }

    /// The definition with another merge mode.
    pub fn with_merge_mode(mut self, mode: MergeMode) -> Self {
        self.merge_mode = mode;
        self
    }

    /// The Delta `txn` application id under which Freshet records applied sequences.
    pub fn app_id(&self) -> String {
        format!("freshet:{}", self.name)
    }

    /// The key columns that are not partition columns: the order of rows within a file.
    pub fn local_key(&self) -> Vec<String> {
        self.primary_key
            .iter()
            .filter(|k| !self.partition_by.contains(k))
            .cloned()
            .collect()
    }

    /// The schema of the data files: the table's columns minus partition columns.
    pub fn file_schema(&self) -> SchemaRef {
        Arc::new(Schema::new(
            self.schema
                .fields()
                .iter()
                .filter(|f| !self.partition_by.contains(f.name()))
                .map(|f| f.as_ref().clone())
                .collect::<Vec<_>>(),
        ))
    }

    /// Types of the local key columns, in key order.
    pub fn local_key_types(&self) -> Vec<DataType> {
        self.local_key()
            .iter()
            .map(|k| {
                self.schema
                    .field_with_name(k)
                    .expect("key column")
                    .data_type()
                    .clone()
            })
            .collect()
    }

    /// The configuration form of this definition.
    pub fn to_config(&self) -> TableConfig {
        TableConfig {
            name: self.name.clone(),
            uri: self.uri.clone(),
            columns: SchemaSpec::from_arrow(&self.schema).fields,
            primary_key: self.primary_key.clone(),
            partition_by: self.partition_by.clone(),
            target_file_size: Some(self.target_file_size),
            merge_mode: Some(self.merge_mode),
        }
    }
}

/// Formats the partition value at `row` as Delta writes it in `partitionValues`.
pub fn partition_value(array: &dyn Array, row: usize) -> String {
    match array.data_type() {
        DataType::Date32 => {
            let days = array.as_primitive::<Date32Type>().value(row);
            let d = chrono::NaiveDate::from_ymd_opt(1970, 1, 1).expect("epoch")
                + chrono::Duration::days(days as i64);
            d.format("%Y-%m-%d").to_string()
        }
        _ => arrow::util::display::array_value_to_string(array, row).unwrap_or_default(),
    }
}

/// The directory of a partition, Hive style (`a=1/b=x/`), with unsafe characters replaced
/// (the Delta log, not the path, is authoritative for partition values).
pub fn partition_dir(partition_by: &[String], values: &HashMap<String, String>) -> String {
    let mut dir = String::new();
    for col in partition_by {
        let v = values.get(col).map(String::as_str).unwrap_or("");
        let safe: String = v
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "_.-".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        dir.push_str(col);
        dir.push('=');
        dir.push_str(&safe);
        if safe != v || v.is_empty() {
            // Keep distinct values in distinct directories after the replacement.
            let h = v.bytes().fold(0xcbf29ce484222325u64, |h, b| {
                (h ^ b as u64).wrapping_mul(0x100000001b3)
            });
            dir.push_str(&format!("-{:08x}", h as u32));
        }
        dir.push('/');
    }
    dir
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, true),
            Field::new("region", DataType::Utf8, true),
            Field::new("price", DataType::Float64, true),
        ]))
    }

    #[test]
    fn partition_columns_must_be_part_of_the_key() {
        let e = TableDef::new(
            "t",
            "file:///x",
            schema(),
            vec!["id".into()],
            vec!["region".into()],
            1 << 20,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("partition column 'region' is not part of the primary key"),
            "{e}"
        );
        let ok = TableDef::new(
            "t",
            "file:///x",
            schema(),
            vec!["region".into(), "id".into()],
            vec!["region".into()],
            1 << 20,
        )
        .unwrap();
        assert_eq!(ok.local_key(), vec!["id".to_string()]);
        assert!(!ok.schema.field_with_name("id").unwrap().is_nullable());
        assert_eq!(ok.file_schema().fields().len(), 2);
    }

    #[test]
    fn bad_keys_are_refused_with_the_column_named() {
        let e = TableDef::new("t", "u", schema(), vec!["nope".into()], vec![], 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(e.contains("'nope' is not a column"), "{e}");
        let e = TableDef::new("t", "u", schema(), vec!["price".into()], vec![], 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(e.contains("'price' has type Float64"), "{e}");
        let e = TableDef::new("t", "u", schema(), vec![], vec![], 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(e.contains("primary key is empty"), "{e}");
    }

    #[test]
    fn partition_dirs_are_safe_and_distinct() {
        let cols = vec!["r".to_string()];
        let a = partition_dir(&cols, &HashMap::from([("r".into(), "a/b".into())]));
        let b = partition_dir(&cols, &HashMap::from([("r".into(), "a_b".into())]));
        assert!(!a.contains("a/b"));
        assert_ne!(a, b);
        assert_eq!(b, "r=a_b/");
    }
}
