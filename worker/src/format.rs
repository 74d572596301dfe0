//! The format of every file a worker writes, in one place: writer properties (SNAPPY, exact
//! statistics, `sorting_columns` naming the key, encodings), the rows per row group (a
//! parameter, [`FileFormat`]), and the NaN-free marker the row-group path relies on. Names
//! come from [`freshet_common::naming`].

use arrow::array::AsArray;
use arrow::compute::cast;
use arrow::datatypes::{DataType, Schema};
use arrow::record_batch::RecordBatch;
use freshet_common::error::{Error, Result};
use freshet_common::table::TableDef;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, Encoding};
use parquet::file::metadata::{KeyValue, SortingColumn};
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;

/// Rows per Parquet row group by default.
pub const ROW_GROUP_ROWS: usize = 64 * 1024;

/// Rows per batch when reading a file back.
pub const READ_BATCH_ROWS: usize = ROW_GROUP_ROWS;

/// Dictionary page size at which a column chunk falls back to plain encoding.
const DICTIONARY_PAGE_LIMIT: usize = 64 * 1024;

/// File metadata key: "1" when no floating-point column of the file holds a NaN, so that
/// the row-group statistics (which skip NaN) give the same Delta stats as the data.
pub const NAN_FREE_KEY: &str = "freshet.nan_free";

/// How files are laid out: the settings that vary (tests make row groups small).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileFormat {
    /// Rows per row group in files written.
    pub row_group_rows: usize,
}

impl Default for FileFormat {
    fn default() -> Self {
        FileFormat {
            row_group_rows: ROW_GROUP_ROWS,
        }
    }
}

impl FileFormat {
    /// The format with `n` rows per row group (at least 1).
    pub fn with_row_group_rows(n: usize) -> Self {
        FileFormat {
            row_group_rows: n.max(1),
        }
    }

    /// Writer settings of every file Freshet writes: SNAPPY, row groups of
    /// [`FileFormat::row_group_rows`], exact (untruncated) statistics, and
    /// `sorting_columns` naming the key, which is what lets a later rewrite copy untouched
    /// row groups (see `rowgroup`).
    pub fn writer_props(&self, def: &TableDef) -> WriterProperties {
        let schema = def.file_schema();
        let sorting = def
            .local_key()
            .iter()
            .filter_map(|k| leaf_index(&schema, k))
            .map(|i| SortingColumn {
                column_idx: i as i32,
                descending: false,
                nulls_first: false,
            })
            .collect();
        let mut b = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_row_count(Some(self.row_group_rows))
            .set_statistics_truncate_length(None)
            .set_sorting_columns(Some(sorting))
            // Dictionary encoding is most of the cost of writing a file (every value hashed
            // and interned); a small dictionary page limit lets high-cardinality columns
            // fall back to plain early while low-cardinality ones keep their dictionaries.
            .set_dictionary_page_size_limit(DICTIONARY_PAGE_LIMIT);
        // Key columns are unique and, in Freshet's files, sorted: a dictionary never pays
        // off, and integer keys delta-encode to a few bits per row.
        for k in def.local_key() {
            let path = ColumnPath::from(k.as_str());
            b = b.set_column_dictionary_enabled(path.clone(), false);
            if schema
                .field_with_name(&k)
                .is_ok_and(|f| f.data_type().is_integer())
            {
                b = b.set_column_encoding(path, Encoding::DELTA_BINARY_PACKED);
            }
        }
        b.build()
    }

    /// Encodes `batch` as one whole file (marked NaN-free when it is).
    pub fn encode(&self, def: &TableDef, batch: &RecordBatch) -> Result<Vec<u8>> {
        let mut buf = Vec::with_capacity(def.target_file_size as usize + (1 << 20));
        let mut w = ArrowWriter::try_new(&mut buf, batch.schema(), Some(self.writer_props(def)))
            .map_err(|e| Error::data("parquet writer", e))?;
        w.write(batch)
            .map_err(|e| Error::data("parquet write", e))?;
        if !has_nan(batch) {
            w.append_key_value_metadata(nan_free_marker());
        }
        w.close().map_err(|e| Error::data("parquet close", e))?;
        Ok(buf)
    }
}

/// The file metadata entry saying no floating-point value of the file is NaN.
pub fn nan_free_marker() -> KeyValue {
    KeyValue::new(NAN_FREE_KEY.to_string(), "1".to_string())
}

/// Whether any floating-point column of `batch` holds a NaN.
pub fn has_nan(batch: &RecordBatch) -> bool {
    batch.columns().iter().any(|c| match c.data_type() {
        DataType::Float16 | DataType::Float32 | DataType::Float64 => {
            let a = cast(c, &DataType::Float64).expect("float cast");
            a.as_primitive::<arrow::datatypes::Float64Type>()
                .iter()
                .flatten()
                .any(f64::is_nan)
        }
        _ => false,
    })
}

/// Parquet leaf columns an Arrow type is stored in (a list of scalars: one).
pub fn leaf_count(t: &DataType) -> usize {
    match t {
        DataType::List(f)
        | DataType::LargeList(f)
        | DataType::ListView(f)
        | DataType::LargeListView(f)
        | DataType::FixedSizeList(f, _)
        | DataType::Map(f, _) => leaf_count(f.data_type()),
        DataType::Struct(fs) => fs.iter().map(|f| leaf_count(f.data_type())).sum(),
        _ => 1,
    }
}

/// The Parquet leaf column index of top-level column `name`: `sorting_columns` and column
/// chunks count leaves, not fields, and nested columns before the key shift them.
pub fn leaf_index(schema: &Schema, name: &str) -> Option<usize> {
    let i = schema.index_of(name).ok()?;
    Some(
        schema.fields()[..i]
            .iter()
            .map(|f| leaf_count(f.data_type()))
            .sum(),
    )
}
