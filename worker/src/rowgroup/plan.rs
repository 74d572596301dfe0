//! The plan of a row-group rewrite: whether the inputs qualify (from their footers alone),
//! their row groups in key order, which changes fall in which group, and where to split the
//! output.

use std::sync::Arc;

use arrow::array::{Array, AsArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Int64Type};
use arrow::record_batch::RecordBatch;
use freshet_common::error::{Error, Result};
use freshet_common::table::TableDef;
use freshet_proto::worker::v1::RewriteRequest;
use object_store::ObjectStore;
use object_store::path::Path;
use parquet::arrow::ArrowSchemaConverter;
use parquet::arrow::arrow_reader::statistics::StatisticsConverter;
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions};
#[allow(deprecated)] // Still the simplest object_store-backed footer reader in parquet 59.
use parquet::arrow::async_reader::ParquetObjectReader;
use parquet::file::metadata::{PageIndexPolicy, RowGroupMetaData};
use parquet::schema::types::SchemaDescriptor;

use crate::format::{NAN_FREE_KEY, leaf_index};

/// One input file's metadata.
pub(super) struct Input {
    pub path: Path,
    pub size: u64,
    pub meta: ArrowReaderMetadata,
}

/// One input row group, with its exact key range.
#[derive(Debug, Clone, Copy)]
pub(super) struct Group {
    pub input: usize,
    pub index: usize,
    pub min: i64,
    pub max: i64,
}

/// What the row-group path will do.
pub(super) struct Plan {
    pub inputs: Vec<Input>,
    /// Row groups in key order.
    pub groups: Vec<Group>,
    /// Per group, the rows of the changes that fall in it (empty: copy it).
    pub touched: Vec<Vec<u32>>,
    /// Close an output file once it holds this many bytes (at a row-group boundary).
    pub split_bytes: u64,
    /// Rows in the input row groups.
    pub rows_read: u64,
}

impl Plan {
    /// Bytes of the inputs' footers, read to make the plan.
    pub fn footer_bytes(&self) -> u64 {
        self.inputs
            .iter()
            .map(|i| {
                let data_end = i
                    .meta
                    .metadata()
                    .row_groups()
                    .iter()
                    .flat_map(|rg| {
                        rg.columns()
                            .iter()
                            .map(|c| c.byte_range().0 + c.byte_range().1)
                    })
                    .max()
                    .unwrap_or(0);
                i.size.saturating_sub(data_end)
            })
            .sum()
    }
}

/// Key types the row-group path handles (read as i64 from statistics and data).
fn int_key_type(t: &DataType) -> bool {
    matches!(
        t,
        DataType::Int8
            | DataType::Int16
            | DataType::Int32
            | DataType::Int64
            | DataType::UInt8
            | DataType::UInt16
            | DataType::UInt32
            | DataType::Date32
    )
}

/// An integer (or date) column as i64s.
pub(super) fn as_i64(array: &dyn Array) -> Option<Vec<Option<i64>>> {
    let a = cast(array, &DataType::Int64).ok()?;
    Some(a.as_primitive::<Int64Type>().iter().collect())
}

/// Plans the row-group path for `changes`; `Ok(None)` when the inputs do not qualify.
pub(super) async fn plan(
    store: &Arc<dyn ObjectStore>,
    def: &TableDef,
    req: &RewriteRequest,
    changes: &RecordBatch,
) -> Result<Option<Plan>> {
    let schema = def.file_schema();
    let out_descr = ArrowSchemaConverter::new()
        .convert(&schema)
        .map_err(|e| Error::data("parquet schema", e))?;
    let (inputs, groups) = match plan_groups(store, def, req, &out_descr).await? {
        Ok(x) => x,
        Err(why) => {
            tracing::debug!(table = %def.name, %why, "row-group path not taken");
            return Ok(None);
        }
    };
    let key = &def.local_key()[0];
    let ops = changes
        .column_by_name(freshet_common::changes::OP_COLUMN)
        .ok_or_else(|| Error::Internal("changes lack __op".into()))?
        .as_primitive::<arrow::datatypes::Int8Type>();
    let deletes: Vec<bool> = (0..changes.num_rows())
        .map(|i| ops.value(i) != freshet_common::changes::OP_UPSERT)
        .collect();
    let keys: Vec<i64> = as_i64(
        changes
            .column_by_name(key)
            .ok_or_else(|| Error::Internal("changes lack the key".into()))?
            .as_ref(),
    )
    .ok_or_else(|| Error::Internal("key not an integer".into()))?
    .into_iter()
    .map(|k| k.unwrap_or_default())
    .collect();
    let touched = assign(&groups, &keys, &deletes);

    // Output size estimate, to split like the full path does.
    let in_bytes: u64 = inputs.iter().map(|i| i.size).sum();
    let rows_read: u64 = groups
        .iter()
        .map(|g| {
            inputs[g.input]
                .meta
                .metadata()
                .row_group(g.index)
                .num_rows() as u64
        })
        .sum();
    let per_row = (in_bytes as f64 / rows_read.max(1) as f64).max(1.0);
    let upserts = deletes.iter().filter(|d| !**d).count() as f64;
    let est = in_bytes as f64 + upserts * per_row * 0.2; // ~20 % of upserts are inserts
    let files = (est / def.target_file_size as f64).ceil().max(1.0);
    let split_bytes = ((est / files) as u64).max(1);
    Ok(Some(Plan {
        inputs,
        groups,
        touched,
        split_bytes,
        rows_read,
    }))
}

/// Why a task cannot take the row-group path (None: it can).
fn eligible_group(rg: &RowGroupMetaData, key_idx: usize) -> std::result::Result<(), &'static str> {
    let sorted = rg
        .sorting_columns()
        .and_then(|s| s.first())
        .is_some_and(|s| s.column_idx as usize == key_idx && !s.descending);
    if !sorted {
        return Err("row group does not declare it is sorted by the key");
    }
    for c in rg.columns() {
        let Some(s) = c.statistics() else {
            return Err("column chunk without statistics");
        };
        if s.null_count_opt().is_none() {
            return Err("column chunk without a null count");
        }
        if (s.min_bytes_opt().is_some() && !s.min_is_exact())
            || (s.max_bytes_opt().is_some() && !s.max_is_exact())
        {
            return Err("inexact (truncated) statistics");
        }
    }
    Ok(())
}

/// Loads the inputs' footers and decides whether the row-group path applies; returns the
/// inputs and their row groups in key order, or why not.
async fn plan_groups(
    store: &Arc<dyn ObjectStore>,
    def: &TableDef,
    req: &RewriteRequest,
    out_descr: &SchemaDescriptor,
) -> Result<std::result::Result<(Vec<Input>, Vec<Group>), String>> {
    let file_schema = def.file_schema();
    let local_key = def.local_key();
    if local_key.len() != 1 || req.inputs.is_empty() {
        return Ok(Err("not a single-column key, or no inputs".into()));
    }
    let key_name = &local_key[0];
    let key_field = file_schema.field_with_name(key_name).expect("key column");
    // Lists of scalars (PostgreSQL arrays) are one leaf column each: their chunks copy like
    // any other. Deeper nesting (structs, lists of lists) is left to the full path.
    let flat = |t: &DataType| match t {
        DataType::List(f) | DataType::LargeList(f) => !f.data_type().is_nested(),
        t => !t.is_nested(),
    };
    if !int_key_type(key_field.data_type())
        || !file_schema.fields().iter().all(|f| flat(f.data_type()))
    {
        return Ok(Err("key type or nested columns".into()));
    }
    // Sorting columns name the key by its leaf index.
    let key_idx = leaf_index(&file_schema, key_name).expect("key column");
    let has_floats = file_schema
        .fields()
        .iter()
        .any(|f| f.data_type().is_floating());
    let mut inputs = Vec::new();
    let mut groups = Vec::new();
    for (i, f) in req.inputs.iter().enumerate() {
        let path = Path::from(f.path.as_str());
        #[allow(deprecated)]
        let mut reader = ParquetObjectReader::new(store.clone(), path.clone());
        if f.size > 0 {
            reader = reader.with_file_size(f.size);
        }
        let meta = ArrowReaderMetadata::load_async(
            &mut reader,
            ArrowReaderOptions::new().with_page_index_policy(PageIndexPolicy::Optional),
        )
        .await
        .map_err(|e| Error::data(format!("table '{}', file {}", def.name, f.path), e))?;
        let md = meta.metadata();
        let descr = md.file_metadata().schema_descr();
        if descr.num_columns() != out_descr.num_columns()
            || (0..descr.num_columns()).any(|c| descr.column(c) != out_descr.column(c))
        {
            return Ok(Err(format!("{}: schema differs from the table's", f.path)));
        }
        if has_floats {
            let nan_free = md
                .file_metadata()
                .key_value_metadata()
                .and_then(|kv| kv.iter().find(|k| k.key == NAN_FREE_KEY))
                .and_then(|k| k.value.as_deref())
                == Some("1");
            if !nan_free {
                return Ok(Err(format!("{}: not known to be free of NaN", f.path)));
            }
        }
        let conv = StatisticsConverter::try_new(key_name, meta.schema(), descr)
            .map_err(|e| Error::data("key statistics", e))?;
        let mins = conv
            .row_group_mins(md.row_groups())
            .map_err(|e| Error::data("key statistics", e))?;
        let maxs = conv
            .row_group_maxes(md.row_groups())
            .map_err(|e| Error::data("key statistics", e))?;
        let (Some(mins), Some(maxs)) = (as_i64(&mins), as_i64(&maxs)) else {
            return Ok(Err("key statistics not integers".into()));
        };
        for (g, rg) in md.row_groups().iter().enumerate() {
            if rg.num_rows() == 0 {
                continue;
            }
            if let Err(why) = eligible_group(rg, key_idx) {
                return Ok(Err(format!("{}: {why}", f.path)));
            }
            let (Some(min), Some(max)) = (mins[g], maxs[g]) else {
                return Ok(Err("row group without key bounds".into()));
            };
            groups.push(Group {
                input: i,
                index: g,
                min,
                max,
            });
        }
        inputs.push(Input {
            path,
            size: f.size,
            meta,
        });
    }
    if groups.is_empty() {
        return Ok(Err("no rows in the inputs".into()));
    }
    groups.sort_by_key(|g| (g.min, g.max));
    if groups.windows(2).any(|w| w[0].max >= w[1].min) {
        return Ok(Err("row groups overlap in key range".into()));
    }
    Ok(Ok((inputs, groups)))
}

/// Assigns each change to the row group whose key range holds it; upserts in a gap go to
/// the group before the gap (or the first group), deletes in a gap touch nothing.
fn assign(groups: &[Group], keys: &[i64], deletes: &[bool]) -> Vec<Vec<u32>> {
    let mut per = vec![Vec::new(); groups.len()];
    for (i, &k) in keys.iter().enumerate() {
        // First group whose max >= k.
        let g = groups.partition_point(|g| g.max < k);
        if g < groups.len() && groups[g].min <= k {
            per[g].push(i as u32);
        } else if !deletes[i] {
            per[g.saturating_sub(1)].push(i as u32);
        }
    }
    per
}
