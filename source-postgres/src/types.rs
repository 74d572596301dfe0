//! PostgreSQL types to Arrow, and PostgreSQL's text form of values to Arrow arrays.
//!
//! | PostgreSQL | Arrow (Delta) |
//! |---|---|
//! | int2, int4, int8 | Int16, Int32, Int64 |
//! | numeric(p,s) | Decimal128(p,s) |
//! | numeric (unbounded) | Utf8 (its exact text) |
//! | real, double precision | Float32, Float64 |
//! | boolean | Boolean |
//! | text, varchar, char, name, uuid, json, jsonb, enums, time, anything else | Utf8 (text form) |
//! | date | Date32 |
//! | timestamp | Timestamp(µs) |
//! | timestamptz | Timestamp(µs, UTC) |
//! | bytea | Binary |
//! | an array of any of these (`int4[]`, `numeric(10,2)[]`, `text[]`, enum arrays, ...) | List of the element's type (item field `element`, elements nullable) |
//!
//! Arrays are one-dimensional in Delta: a multi-dimensional value is an error naming the
//! table, column and value (see [`crate::array`]). Domains over array types, and arrays of
//! `box` (whose elements are separated by `;`), stay text.

use std::sync::Arc;

use arrow::array::{ArrayRef, BinaryBuilder, ListArray, StringArray};
use arrow::buffer::{NullBuffer, OffsetBuffer};
use arrow::compute::{CastOptions, cast_with_options};
use arrow::datatypes::{DataType, TimeUnit};
use arrow::util::display::FormatOptions;

use crate::error::{Result, SourceError};

/// The Arrow type of a PostgreSQL column: by type OID and modifier, and for an array column
/// by the element type (`elem_oid` not 0; an array column's modifier is its element's).
pub fn column_type(type_oid: u32, type_mod: i32, elem_oid: u32) -> DataType {
    if elem_oid != 0 {
        freshet_common::schema::list_of(arrow_type(elem_oid, type_mod))
    } else {
        arrow_type(type_oid, type_mod)
    }
}

/// The Arrow type of a scalar PostgreSQL type (by type OID and modifier).
pub fn arrow_type(type_oid: u32, type_mod: i32) -> DataType {
    match type_oid {
        21 => DataType::Int16,
        23 => DataType::Int32,
        20 => DataType::Int64,
        700 => DataType::Float32,
        701 => DataType::Float64,
        16 => DataType::Boolean,
        1082 => DataType::Date32,
        1114 => DataType::Timestamp(TimeUnit::Microsecond, None),
        1184 => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        17 => DataType::Binary,
        1700 if type_mod >= 4 => {
            let m = type_mod - 4;
            let (p, s) = ((m >> 16) & 0xffff, m & 0xffff);
            if (1..=38).contains(&p) && s <= p {
                DataType::Decimal128(p as u8, s as i8)
            } else {
                DataType::Utf8
            }
        }
        _ => DataType::Utf8,
    }
}

/// The Freshet schema type name of an Arrow type produced by [`arrow_type`].
pub fn type_name(t: &DataType) -> String {
    match t {
        DataType::Int16 => "int16".into(),
        DataType::Int32 => "int32".into(),
        DataType::Int64 => "int64".into(),
        DataType::Float32 => "float32".into(),
        DataType::Float64 => "float64".into(),
        DataType::Boolean => "boolean".into(),
        DataType::Date32 => "date".into(),
        DataType::Timestamp(_, None) => "timestamp_ntz".into(),
        DataType::Timestamp(_, Some(_)) => "timestamp".into(),
        DataType::Binary => "binary".into(),
        DataType::Decimal128(p, s) => format!("decimal({p},{s})"),
        DataType::List(f) => format!("array<{}>", type_name(f.data_type())),
        _ => "string".into(),
    }
}

/// Builds an array of `to` from PostgreSQL text values (`None` = NULL); errors name the
/// table, column and offending value.
pub fn array_from_text(
    values: &[Option<&str>],
    to: &DataType,
    table: &str,
    column: &str,
) -> Result<ArrayRef> {
    let bad = |message: String| SourceError::Value {
        table: table.into(),
        column: column.into(),
        message,
    };
    match to {
        DataType::List(field) => {
            let mut lengths = Vec::with_capacity(values.len());
            let mut elements: Vec<Option<String>> = Vec::new();
            for v in values {
                let parsed = match v {
                    Some(text) => crate::array::parse(text).map_err(bad)?,
                    None => Vec::new(),
                };
                lengths.push(parsed.len());
                elements.extend(parsed);
            }
            // Elements convert exactly as scalars of the element type do.
            let refs: Vec<Option<&str>> = elements.iter().map(|e| e.as_deref()).collect();
            let items =
                array_from_text(&refs, field.data_type(), table, column).map_err(|e| match e {
                    SourceError::Value { message, .. } => bad(format!("array element: {message}")),
                    other => other,
                })?;
            let nulls = NullBuffer::from(values.iter().map(Option::is_some).collect::<Vec<_>>());
            let list = ListArray::try_new(
                field.clone(),
                OffsetBuffer::from_lengths(lengths),
                items,
                Some(nulls).filter(|n| n.null_count() > 0),
            )
            .map_err(|e| bad(e.to_string()))?;
            Ok(Arc::new(list))
        }
        DataType::Utf8 => Ok(Arc::new(StringArray::from(values.to_vec()))),
        DataType::Binary => {
            let mut b = BinaryBuilder::new();
            for v in values {
                match v {
                    None => b.append_null(),
                    Some(s) => b.append_value(decode_bytea(s).map_err(bad)?),
                }
            }
            Ok(Arc::new(b.finish()))
        }
        DataType::Boolean => {
            let v: Vec<Option<bool>> = values
                .iter()
                .map(|v| match v {
                    None => Ok(None),
                    Some("t" | "true") => Ok(Some(true)),
                    Some("f" | "false") => Ok(Some(false)),
                    Some(o) => Err(bad(format!("'{o}' is not a boolean"))),
                })
                .collect::<Result<_>>()?;
            Ok(Arc::new(arrow::array::BooleanArray::from(v)))
        }
        DataType::Float32 | DataType::Float64 => {
            // PostgreSQL spells the specials Infinity, -Infinity and NaN.
            let norm: Vec<Option<String>> = values
                .iter()
                .map(|v| {
                    v.map(|s| match s {
                        "Infinity" => "inf".to_string(),
                        "-Infinity" => "-inf".to_string(),
                        "NaN" => "NaN".to_string(),
                        o => o.to_string(),
                    })
                })
                .collect();
            cast_text(&StringArray::from(norm), to).map_err(bad)
        }
        DataType::Timestamp(_, Some(_)) => {
            // The session runs in UTC, so values end in +00 (or +00:00 for old servers).
            let norm: Vec<Option<String>> = values.iter().map(|v| v.map(normalize_tz)).collect();
            cast_text(&StringArray::from(norm), to).map_err(bad)
        }
        _ => cast_text(&StringArray::from(values.to_vec()), to).map_err(bad),
    }
}

fn normalize_tz(s: &str) -> String {
    // "2024-01-02 03:04:05.123+00" -> "2024-01-02T03:04:05.123+00:00"
    let s = s.replacen(' ', "T", 1);
    match s.rfind(['+', '-']) {
        Some(i) if i > 10 && s.len() - i == 3 => format!("{s}:00"),
        _ => s,
    }
}

fn cast_text(a: &StringArray, to: &DataType) -> std::result::Result<ArrayRef, String> {
    let opts = CastOptions {
        safe: false,
        format_options: FormatOptions::default(),
    };
    cast_with_options(a, to, &opts).map_err(|e| e.to_string())
}

fn decode_bytea(s: &str) -> std::result::Result<Vec<u8>, String> {
    let hex = s
        .strip_prefix("\\x")
        .ok_or_else(|| format!("bytea value not in hex format: '{s}'"))?;
    (0..hex.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(hex.get(i..i + 2).unwrap_or("zz"), 16)
                .map_err(|_| format!("bad hex in bytea '{s}'"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{Decimal128Type, Int16Type, TimestampMicrosecondType};

    #[test]
    fn types_map_and_text_converts() {
        assert_eq!(
            arrow_type(1700, ((12 << 16) | 2) + 4),
            DataType::Decimal128(12, 2)
        );
        assert_eq!(arrow_type(1700, -1), DataType::Utf8);
        assert_eq!(arrow_type(2950, -1), DataType::Utf8);
        let a = array_from_text(&[Some("-32768"), None], &DataType::Int16, "t", "c").unwrap();
        assert_eq!(a.as_primitive::<Int16Type>().value(0), -32768);
        assert!(a.is_null(1));
        let a = array_from_text(&[Some("12.34")], &DataType::Decimal128(12, 2), "t", "c").unwrap();
        assert_eq!(a.as_primitive::<Decimal128Type>().value(0), 1234);
        let tz = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
        let a = array_from_text(&[Some("2024-01-02 03:04:05.000006+00")], &tz, "t", "c").unwrap();
        assert_eq!(
            a.as_primitive::<TimestampMicrosecondType>().value(0),
            1_704_164_645_000_006
        );
        let a = array_from_text(&[Some("\\x00ff")], &DataType::Binary, "t", "c").unwrap();
        assert_eq!(a.as_binary::<i32>().value(0), &[0u8, 255]);
        let e = array_from_text(&[Some("x")], &DataType::Int32, "t", "c").unwrap_err();
        assert!(e.to_string().contains("column 'c'"), "{e}");
        let a = array_from_text(
            &[Some("Infinity"), Some("NaN")],
            &DataType::Float64,
            "t",
            "c",
        )
        .unwrap();
        assert!(
            a.as_primitive::<arrow::datatypes::Float64Type>()
                .value(0)
                .is_infinite()
        );
    }

    #[test]
    fn arrays_become_lists_of_the_element_type() {
        use freshet_common::schema::list_of;
        // numeric(10,2)[]: the modifier is the element's.
        let t = column_type(1231, ((10 << 16) | 2) + 4, 1700);
        assert_eq!(t, list_of(DataType::Decimal128(10, 2)));
        assert_eq!(type_name(&t), "array<decimal(10,2)>");
        assert_eq!(column_type(23, -1, 0), DataType::Int32);

        let t = column_type(1007, -1, 23);
        let a = array_from_text(&[Some("{1,NULL,-3}"), None, Some("{}")], &t, "t", "c").unwrap();
        let l = a.as_list::<i32>();
        assert_eq!((l.len(), l.null_count()), (3, 1));
        let first = l.value(0);
        let first = first.as_primitive::<arrow::datatypes::Int32Type>();
        assert_eq!(
            first.iter().collect::<Vec<_>>(),
            vec![Some(1), None, Some(-3)]
        );
        assert_eq!(l.value(2).len(), 0);
        assert!(!l.is_null(2), "an empty array is not NULL");

        let tz = list_of(DataType::Timestamp(
            TimeUnit::Microsecond,
            Some("UTC".into()),
        ));
        let a = array_from_text(
            &[Some(r#"{"2024-01-02 03:04:05.000006+00"}"#)],
            &tz,
            "t",
            "c",
        )
        .unwrap();
        assert_eq!(
            a.as_list::<i32>()
                .value(0)
                .as_primitive::<TimestampMicrosecondType>()
                .value(0),
            1_704_164_645_000_006
        );
        let bytes = list_of(DataType::Binary);
        let a = array_from_text(&[Some(r#"{"\\x00ff",NULL}"#)], &bytes, "t", "c").unwrap();
        assert_eq!(
            a.as_list::<i32>().value(0).as_binary::<i32>().value(0),
            &[0u8, 255]
        );
        let bools = list_of(DataType::Boolean);
        let a = array_from_text(&[Some("{t,f}")], &bools, "t", "c").unwrap();
        assert!(a.as_list::<i32>().value(0).as_boolean().value(0));

        let e = array_from_text(
            &[Some("{{1,2},{3,4}}")],
            &list_of(DataType::Int32),
            "s.t",
            "c",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("'s.t'") && e.contains("'c'") && e.contains("{{1,2},{3,4}}"),
            "{e}"
        );
        let e = array_from_text(&[Some("{1,x}")], &list_of(DataType::Int32), "s.t", "c")
            .unwrap_err()
            .to_string();
        assert!(e.contains("'c'") && e.contains("array element"), "{e}");
    }
}
