//! Validation of ingested batches: the whole batch is checked before anything is staged,
//! and every error names the row (0-based) and the column.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Int8Array, RecordBatch, StringArray};
use arrow::compute::{CastOptions, cast_with_options, concat_batches};
use arrow::datatypes::{DataType, Field, Schema};
use freshet_common::changes::{OP_DELETE, OP_UPSERT, change_schema};
use freshet_common::config::IngestConfig;
use freshet_common::error::{Error, Result};
use freshet_common::ipc::{DecodeError, DecodeLimits, Exceeded, decode_bounded};
use freshet_common::table::TableDef;
use freshet_proto::ingest::v1::IngestRequest;
use freshet_proto::ingest::v1::ingest_request::Payload;

/// Ops accepted, case-insensitively.
pub const KNOWN_OPS: &str = "upsert, insert, update, delete, c, r, u, d";

/// A validated batch in [`change_schema`] form.
#[derive(Debug, Clone)]
pub struct ValidBatch {
    /// The changes.
    pub batch: RecordBatch,
    /// Rows that upsert.
    pub upserts: u64,
    /// Rows that delete.
    pub deletes: u64,
}

fn parse_op(op: &str) -> Option<i8> {
    match op.to_ascii_lowercase().as_str() {
        "upsert" | "insert" | "update" | "c" | "r" | "u" => Some(OP_UPSERT),
        "delete" | "d" => Some(OP_DELETE),
        _ => None,
    }
}

/// Validates an ingest request for `def` into a batch of changes.
pub fn validate(def: &TableDef, req: &IngestRequest, limits: &IngestConfig) -> Result<ValidBatch> {
    let table = &def.name;
    let op_column = if req.op_column.is_empty() {
        "op"
    } else {
        req.op_column.as_str()
    };
    let batch = match &req.payload {
        None => {
            return Err(Error::invalid(
                table,
                "the request has no payload (arrow_ipc or json_rows)",
            ));
        }
        Some(Payload::ArrowIpc(bytes)) => {
            check_size(def, bytes.len(), limits)?;
            // The decoded size is bounded too: compression can make a small payload huge.
            let bounds = DecodeLimits::new(limits.max_batch_bytes, limits.max_batch_rows);
            let (schema, batches) =
                decode_bounded(bytes, &bounds).map_err(|e| refused_payload(table, e))?;
            concat_batches(&schema, &batches)
                .map_err(|e| Error::invalid(table, format!("payload: {e}")))?
        }
        Some(Payload::JsonRows(text)) => {
            check_size(def, text.len(), limits)?;
            json_to_batch(def, text, op_column)?
        }
    };
    if batch.num_rows() > limits.max_batch_rows {
        return Err(Error::TooLarge {
            table: table.clone(),
            message: format!(
                "{} rows, limit {} (ingest.max_batch_rows)",
                batch.num_rows(),
                limits.max_batch_rows
            ),
        });
    }
    validate_batch(def, &batch, op_column)
}

/// The error for an Arrow payload [`decode_bounded`] refused, naming the setting it exceeds.
fn refused_payload(table: &str, e: DecodeError) -> Error {
    match e {
        DecodeError::OverLimit { what, .. } => {
            let setting = match what {
                Exceeded::DecodedBytes => " (ingest.max_batch_bytes)",
                Exceeded::Rows => " (ingest.max_batch_rows)",
                Exceeded::Messages => "",
            };
            Error::TooLarge {
                table: table.to_string(),
                message: format!("payload {e}{setting}"),
            }
        }
        DecodeError::Invalid(_) => Error::invalid(
            table,
            format!("payload is not a valid Arrow IPC stream: {e}"),
        ),
    }
}

fn check_size(def: &TableDef, len: usize, limits: &IngestConfig) -> Result<()> {
    if len > limits.max_batch_bytes {
        return Err(Error::TooLarge {
            table: def.name.clone(),
            message: format!(
                "payload is {len} bytes, limit {} (ingest.max_batch_bytes)",
                limits.max_batch_bytes
            ),
        });
    }
    Ok(())
}

/// Checks an Arrow batch (table columns plus an optional op column) and converts it.
pub fn validate_batch(def: &TableDef, batch: &RecordBatch, op_column: &str) -> Result<ValidBatch> {
    let table = &def.name;
    let n = batch.num_rows();
    for f in batch.schema().fields() {
        if f.name() != op_column && def.schema.field_with_name(f.name()).is_err() {
            return Err(Error::invalid(
                table,
                format!(
                    "unknown column '{}' (table columns: {}; op column: '{op_column}')",
                    f.name(),
                    def.schema
                        .fields()
                        .iter()
                        .map(|f| f.name().as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
    }
    // Ops first: which rows are deletes decides which nulls are allowed.
    let ops: Int8Array = match batch.column_by_name(op_column) {
        None => Int8Array::from(vec![OP_UPSERT; n]),
        Some(col) => {
            let strings = cast_with_options(col, &DataType::Utf8, &CastOptions::default())
                .map_err(|_| {
                    Error::invalid(
                        table,
                        format!(
                            "op column '{op_column}' has type {}, expected a string",
                            col.data_type()
                        ),
                    )
                })?;
            let strings = strings.as_string::<i32>();
            let mut ops = Vec::with_capacity(n);
            for i in 0..n {
                if strings.is_null(i) {
                    return Err(Error::invalid(
                        table,
                        format!("row {i}: op column '{op_column}' is null"),
                    ));
                }
                let op = strings.value(i);
                ops.push(parse_op(op).ok_or_else(|| {
                    Error::invalid(table, format!("row {i}: column '{op_column}' has unknown op '{op}' (known: {KNOWN_OPS})"))
                })?);
            }
            Int8Array::from(ops)
        }
    };
    let out_schema = change_schema(def);
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(out_schema.fields().len());
    for field in def.schema.fields() {
        let name = field.name();
        let is_key = def.primary_key.contains(name);
        let col = match batch.column_by_name(name) {
            None if is_key => {
                return Err(Error::invalid(
                    table,
                    format!("missing primary key column '{name}'"),
                ));
            }
            None if !field.is_nullable() => {
                return Err(Error::invalid(
                    table,
                    format!("missing column '{name}', which is not nullable"),
                ));
            }
            None => arrow::array::new_null_array(field.data_type(), n),
            Some(c) if c.data_type() == field.data_type() => c.clone(),
            Some(c) => convert(c, field, table)?,
        };
        if col.null_count() > 0 {
            for i in 0..n {
                if col.is_null(i) {
                    if is_key {
                        return Err(Error::invalid(
                            table,
                            format!("row {i}: primary key column '{name}' is null"),
                        ));
                    }
                    if !field.is_nullable() && ops.value(i) == OP_UPSERT {
                        return Err(Error::invalid(
                            table,
                            format!(
                                "row {i}: column '{name}' is null but the column is not nullable"
                            ),
                        ));
                    }
                }
            }
        }
        columns.push(col);
    }
    let deletes = ops.iter().filter(|o| *o == Some(OP_DELETE)).count() as u64;
    columns.push(Arc::new(ops));
    let batch = RecordBatch::try_new(out_schema, columns)
        .map_err(|e| Error::invalid(table, e.to_string()))?;
    Ok(ValidBatch {
        batch,
        upserts: n as u64 - deletes,
        deletes,
    })
}

/// Converts a column to the table's type where no information is lost.
fn convert(col: &ArrayRef, field: &Field, table: &str) -> Result<ArrayRef> {
    use DataType::*;
    let from = col.data_type();
    let to = field.data_type();
    let widening = match (from, to) {
        (Int8, Int16 | Int32 | Int64) | (Int16, Int32 | Int64) | (Int32, Int64) => true,
        (UInt8, UInt16 | UInt32 | UInt64 | Int16 | Int32 | Int64)
        | (UInt16, UInt32 | UInt64 | Int32 | Int64)
        | (UInt32, UInt64 | Int64) => true,
        (Float32, Float64) => true,
        (Int8 | Int16 | Int32 | UInt8 | UInt16, Float64) => true,
        (Utf8View | LargeUtf8, Utf8) | (BinaryView | LargeBinary, Binary) => true,
        (Dictionary(_, v), _) if v.as_ref() == to => true,
        (Timestamp(_, a), Timestamp(_, b)) => a.is_some() == b.is_some(),
        (Int64 | Int32, Decimal128(_, _)) => true,
        (Decimal128(_, _), Decimal128(_, _)) => true,
        (Date64, Date32) => true,
        // A list from another writer (item field named "item", large offsets, view strings).
        (List(a) | LargeList(a), List(b)) => {
            freshet_common::schema::canonical_type(a.data_type())
                == freshet_common::schema::canonical_type(b.data_type())
                && (b.is_nullable() || !a.is_nullable())
        }
        _ => false,
    };
    if !widening {
        return Err(Error::invalid(
            table,
            format!("column '{}' has type {from}, expected {to}", field.name()),
        ));
    }
    // Checked conversion: an overflow or a lost digit is an error, not a silent change.
    cast_with_options(
        col,
        to,
        &CastOptions {
            safe: false,
            ..Default::default()
        },
    )
    .map_err(|e| {
        Error::invalid(
            table,
            format!(
                "column '{}': cannot convert {from} to {to} without loss: {e}",
                field.name()
            ),
        )
    })
}

/// Parses JSON rows (an array of objects, or one object per line) into Arrow, naming the
/// row of the first problem.
fn json_to_batch(def: &TableDef, text: &str, op_column: &str) -> Result<RecordBatch> {
    let table = &def.name;
    let trimmed = text.trim_start();
    let rows: Vec<serde_json::Value> = if trimmed.starts_with('[') {
        serde_json::from_str(trimmed)
            .map_err(|e| Error::invalid(table, format!("malformed JSON: {e}")))?
    } else {
        trimmed
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str(l).map_err(|e| {
                    Error::invalid(table, format!("line {}: malformed JSON: {e}", i + 1))
                })
            })
            .collect::<Result<_>>()?
    };
    let mut fields: Vec<Field> = def
        .schema
        .fields()
        .iter()
        .map(|f| f.as_ref().clone().with_nullable(true))
        .collect();
    fields.push(Field::new(op_column, DataType::Utf8, true));
    let schema = Arc::new(Schema::new(fields));
    for (i, row) in rows.iter().enumerate() {
        let obj = row
            .as_object()
            .ok_or_else(|| Error::invalid(table, format!("row {i}: not a JSON object")))?;
        for k in obj.keys() {
            if schema.field_with_name(k).is_err() {
                return Err(Error::invalid(
                    table,
                    format!("row {i}: unknown column '{k}'"),
                ));
            }
        }
    }
    let decode = |rows: &[serde_json::Value]| -> std::result::Result<Option<RecordBatch>, arrow::error::ArrowError> {
        let mut decoder = arrow::json::ReaderBuilder::new(schema.clone())
            .with_batch_size(rows.len().max(1))
            .build_decoder()?;
        decoder.serialize(rows)?;
        decoder.flush()
    };
    let has_op = rows.iter().any(|r| r.get(op_column).is_some());
    let drop_op = |b: RecordBatch| -> RecordBatch {
        if has_op {
            b
        } else {
            // No row names an op: every row is an upsert, as with Arrow batches.
            let idx = b.schema().index_of(op_column).expect("op column");
            let mut b = b;
            b.remove_column(idx);
            b
        }
    };
    match decode(&rows) {
        Ok(Some(b)) => Ok(drop_op(b)),
        Ok(None) => Ok(drop_op(RecordBatch::new_empty(schema.clone()))),
        Err(e) => {
            // Find the row at fault for the message.
            for (i, row) in rows.iter().enumerate() {
                if let Err(e) = decode(std::slice::from_ref(row)) {
                    return Err(Error::invalid(table, format!("row {i}: {e}")));
                }
            }
            Err(Error::invalid(table, format!("malformed rows: {e}")))
        }
    }
}

/// Builds an op column for callers that send Arrow data (the CLI, tests).
pub fn op_array(ops: &[&str]) -> StringArray {
    StringArray::from(ops.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};

    fn def() -> TableDef {
        TableDef::new(
            "t",
            "memory:///t",
            Arc::new(Schema::new(vec![
                Field::new("id", DataType::Int64, false),
                Field::new("name", DataType::Utf8, false),
                Field::new("note", DataType::Utf8, true),
            ])),
            vec!["id".into()],
            vec![],
            1 << 20,
        )
        .unwrap()
    }

    fn json(text: &str) -> Result<ValidBatch> {
        let req = IngestRequest {
            table: "t".into(),
            payload: Some(Payload::JsonRows(text.into())),
            op_column: String::new(),
            ..Default::default()
        };
        validate(&def(), &req, &IngestConfig::default())
    }

    #[test]
    fn json_rows_validate_with_ops_and_defaults() {
        let v = json(
            r#"[{"id":1,"name":"a","op":"C"},{"id":2,"op":"d"},{"id":3,"name":"c","op":"upsert"}]"#,
        )
        .unwrap();
        assert_eq!((v.upserts, v.deletes), (2, 1));
        assert_eq!(v.batch.num_rows(), 3);
    }

    #[test]
    fn errors_name_row_and_column() {
        let cases = [
            (
                r#"[{"id":1,"name":"a","op":"merge"}]"#,
                "row 0: column 'op' has unknown op 'merge'",
            ),
            (
                r#"[{"id":1,"name":"a"},{"name":"b"}]"#,
                "row 1: primary key column 'id' is null",
            ),
            (
                r#"[{"id":1,"name":"a"},{"id":2}]"#,
                "row 1: column 'name' is null but the column is not nullable",
            ),
            (
                r#"[{"id":1,"name":"a","op":"u"},{"id":2,"name":"b"}]"#,
                "row 1: op column 'op' is null",
            ),
            (
                r#"[{"id":1,"name":"a","colour":"red"}]"#,
                "row 0: unknown column 'colour'",
            ),
            (r#"[{"id":1,"name":"a"},{"id":"x","name":"b"}]"#, "row 1:"),
            (r#"[{"id":1,"#, "malformed JSON"),
            (r#"[1]"#, "row 0: not a JSON object"),
        ];
        for (input, want) in cases {
            let e = json(input).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{input}");
            assert!(e.to_string().contains(want), "{input}: {e}");
        }
    }

    #[test]
    fn arrow_types_are_checked_and_widened_without_loss() {
        let d = def();
        let b = RecordBatch::try_from_iter(vec![
            (
                "id",
                Arc::new(arrow::array::Int32Array::from(vec![1])) as ArrayRef,
            ),
            ("name", Arc::new(StringArray::from(vec!["a"])) as ArrayRef),
        ])
        .unwrap();
        assert!(validate_batch(&d, &b, "op").is_ok());
        let b = RecordBatch::try_from_iter(vec![
            ("id", Arc::new(StringArray::from(vec!["1"])) as ArrayRef),
            ("name", Arc::new(StringArray::from(vec!["a"])) as ArrayRef),
        ])
        .unwrap();
        let e = validate_batch(&d, &b, "op").unwrap_err().to_string();
        assert!(
            e.contains("column 'id' has type Utf8, expected Int64"),
            "{e}"
        );
        let b = RecordBatch::try_from_iter(vec![(
            "name",
            Arc::new(StringArray::from(vec!["a"])) as ArrayRef,
        )])
        .unwrap();
        let e = validate_batch(&d, &b, "op").unwrap_err().to_string();
        assert!(e.contains("missing primary key column 'id'"), "{e}");
        let _ = Int64Array::from(vec![1]);
    }

    #[test]
    fn lists_from_other_writers_convert_and_wrong_elements_are_refused() {
        use arrow::array::{Int32Builder, ListBuilder, StringBuilder};
        let d = TableDef::new(
            "t",
            "memory:///t",
            Arc::new(Schema::new(vec![
                Field::new("id", DataType::Int64, false),
                Field::new(
                    "nums",
                    freshet_common::schema::parse_type("array<int32>").unwrap(),
                    true,
                ),
            ])),
            vec!["id".into()],
            vec![],
            1 << 20,
        )
        .unwrap();
        // Arrow's default item name is "item"; the table's is "element".
        let mut nums = ListBuilder::new(Int32Builder::new());
        nums.append_value([Some(1), None]);
        nums.append_null();
        let b = RecordBatch::try_from_iter(vec![
            ("id", Arc::new(Int64Array::from(vec![1, 2])) as ArrayRef),
            ("nums", Arc::new(nums.finish()) as ArrayRef),
        ])
        .unwrap();
        let v = validate_batch(&d, &b, "op").unwrap();
        assert_eq!(
            v.batch.schema().field(1).data_type(),
            d.schema.field(1).data_type()
        );
        assert_eq!(v.batch.column(1).as_list::<i32>().value(0).len(), 2);
        let mut strs = ListBuilder::new(StringBuilder::new());
        strs.append_value([Some("1")]);
        let b = RecordBatch::try_from_iter(vec![
            ("id", Arc::new(Int64Array::from(vec![1])) as ArrayRef),
            ("nums", Arc::new(strs.finish()) as ArrayRef),
        ])
        .unwrap();
        let e = validate_batch(&d, &b, "op").unwrap_err().to_string();
        assert!(e.contains("column 'nums'"), "{e}");
    }

    #[test]
    fn compressed_payloads_are_bounded_by_their_decoded_size() {
        // 100,000 zeros: 800 KB once decoded, a few KB LZ4-compressed.
        let b = RecordBatch::try_from_iter(vec![(
            "id",
            Arc::new(Int64Array::from(vec![0i64; 100_000])) as ArrayRef,
        )])
        .unwrap();
        let bytes = freshet_common::ipc::encode(&b.schema(), &[b]).unwrap();
        let req = |bytes: Vec<u8>| IngestRequest {
            table: "t".into(),
            payload: Some(Payload::ArrowIpc(bytes)),
            op_column: String::new(),
            ..Default::default()
        };
        let limits = IngestConfig {
            max_batch_bytes: 100_000,
            ..Default::default()
        };
        assert!(bytes.len() < limits.max_batch_bytes);
        let e = validate(&def(), &req(bytes.clone()), &limits).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        let e = e.to_string();
        assert!(
            e.contains("payload declares 800256 bytes once decoded")
                && e.contains("limit 100000 (ingest.max_batch_bytes)"),
            "{e}"
        );
        // A length prefix that understates what its buffer decompresses to.
        let mut forged = bytes;
        let at = forged
            .windows(8)
            .position(|w| w == 800_000i64.to_le_bytes())
            .unwrap();
        forged[at..at + 8].copy_from_slice(&8i64.to_le_bytes());
        let e = validate(&def(), &req(forged), &IngestConfig::default()).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(
            e.to_string()
                .contains("declares 8 bytes once decompressed but decompresses to 800000"),
            "{e}"
        );
    }

    #[test]
    fn size_limits_are_resource_exhausted() {
        let req = IngestRequest {
            table: "t".into(),
            payload: Some(Payload::JsonRows("[]".repeat(10))),
            op_column: String::new(),
            ..Default::default()
        };
        let limits = IngestConfig {
            max_batch_bytes: 5,
            ..Default::default()
        };
        let e = validate(&def(), &req, &limits).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.to_string().contains("max_batch_bytes"));
    }
}
