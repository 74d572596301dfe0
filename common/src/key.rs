//! Primary keys: comparable values, read from Arrow arrays and from Delta statistics,
//! written to and read from JSON (the exact key range Freshet keeps in each file's tags).

use arrow::array::{Array, AsArray};
use arrow::datatypes::{
    DataType, Date32Type, Decimal128Type, Int8Type, Int16Type, Int32Type, Int64Type, TimeUnit,
    TimestampMicrosecondType, TimestampMillisecondType, TimestampNanosecondType,
    TimestampSecondType, UInt8Type, UInt16Type, UInt32Type, UInt64Type,
};
use serde_json::Value;

use crate::error::{Error, Result};

/// One column of a key. Every column of one key position holds the same variant.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KeyPart {
    /// Integers, dates, timestamps (microseconds) and decimals (unscaled).
    Int(i128),
    /// Booleans.
    Bool(bool),
    /// Strings.
    Str(String),
    /// Binary values.
    Bytes(Vec<u8>),
}

/// A primary key: one part per key column, compared lexicographically.
pub type Key = Vec<KeyPart>;

/// Whether a column of this type can be part of a primary key.
pub fn key_type_supported(t: &DataType) -> bool {
    matches!(
        t,
        DataType::Int8
            | DataType::Int16
            | DataType::Int32
            | DataType::Int64
            | DataType::UInt8
            | DataType::UInt16
            | DataType::UInt32
            | DataType::UInt64
            | DataType::Date32
            | DataType::Timestamp(_, _)
            | DataType::Decimal128(_, _)
            | DataType::Boolean
            | DataType::Utf8
            | DataType::LargeUtf8
            | DataType::Utf8View
            | DataType::Binary
            | DataType::LargeBinary
            | DataType::BinaryView
    )
}

/// Reads the key part at `row` of `array` (which must be non-null there).
pub fn key_part(array: &dyn Array, row: usize) -> KeyPart {
    match array.data_type() {
        DataType::Int8 => KeyPart::Int(array.as_primitive::<Int8Type>().value(row) as i128),
        DataType::Int16 => KeyPart::Int(array.as_primitive::<Int16Type>().value(row) as i128),
        DataType::Int32 => KeyPart::Int(array.as_primitive::<Int32Type>().value(row) as i128),
        DataType::Int64 => KeyPart::Int(array.as_primitive::<Int64Type>().value(row) as i128),
        DataType::UInt8 => KeyPart::Int(array.as_primitive::<UInt8Type>().value(row) as i128),
        DataType::UInt16 => KeyPart::Int(array.as_primitive::<UInt16Type>().value(row) as i128),
        DataType::UInt32 => KeyPart::Int(array.as_primitive::<UInt32Type>().value(row) as i128),
        DataType::UInt64 => KeyPart::Int(array.as_primitive::<UInt64Type>().value(row) as i128),
        DataType::Date32 => KeyPart::Int(array.as_primitive::<Date32Type>().value(row) as i128),
        DataType::Timestamp(unit, _) => {
            let micros = match unit {
                TimeUnit::Second => {
                    array.as_primitive::<TimestampSecondType>().value(row) as i128 * 1_000_000
                }
                TimeUnit::Millisecond => {
                    array.as_primitive::<TimestampMillisecondType>().value(row) as i128 * 1_000
                }
                TimeUnit::Microsecond => {
                    array.as_primitive::<TimestampMicrosecondType>().value(row) as i128
                }
                TimeUnit::Nanosecond => {
                    array.as_primitive::<TimestampNanosecondType>().value(row) as i128 / 1_000
                }
            };
            KeyPart::Int(micros)
        }
        DataType::Decimal128(_, _) => {
            KeyPart::Int(array.as_primitive::<Decimal128Type>().value(row))
        }
        DataType::Boolean => KeyPart::Bool(array.as_boolean().value(row)),
        DataType::Utf8 => KeyPart::Str(array.as_string::<i32>().value(row).to_string()),
        DataType::LargeUtf8 => KeyPart::Str(array.as_string::<i64>().value(row).to_string()),
        DataType::Utf8View => KeyPart::Str(array.as_string_view().value(row).to_string()),
        DataType::Binary => KeyPart::Bytes(array.as_binary::<i32>().value(row).to_vec()),
        DataType::LargeBinary => KeyPart::Bytes(array.as_binary::<i64>().value(row).to_vec()),
        DataType::BinaryView => KeyPart::Bytes(array.as_binary_view().value(row).to_vec()),
        other => panic!("unsupported key type {other} (tables are validated on creation)"),
    }
}

/// Reads the key of `row` from the key columns.
pub fn key_at(columns: &[&dyn Array], row: usize) -> Key {
    columns.iter().map(|c| key_part(*c, row)).collect()
}

/// Encodes a key as a JSON array (integers as strings, to keep i128 exact).
pub fn key_to_json(key: &Key) -> String {
    let parts: Vec<Value> = key
        .iter()
        .map(|p| match p {
            KeyPart::Int(i) => Value::String(i.to_string()),
            KeyPart::Bool(b) => Value::Bool(*b),
            KeyPart::Str(s) => Value::String(s.clone()),
            KeyPart::Bytes(b) => Value::String(hex(b)),
        })
        .collect();
    Value::Array(parts).to_string()
}

/// Decodes a key written by [`key_to_json`], given the key columns' types.
pub fn key_from_json(text: &str, types: &[DataType]) -> Result<Key> {
    let bad = || Error::Internal(format!("bad key JSON '{text}'"));
    let v: Value = serde_json::from_str(text).map_err(|_| bad())?;
    let arr = v.as_array().ok_or_else(bad)?;
    if arr.len() != types.len() {
        return Err(bad());
    }
    arr.iter()
        .zip(types)
        .map(|(v, t)| {
            Ok(match t {
                DataType::Boolean => KeyPart::Bool(v.as_bool().ok_or_else(bad)?),
                DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
                    KeyPart::Str(v.as_str().ok_or_else(bad)?.to_string())
                }
                DataType::Binary | DataType::LargeBinary | DataType::BinaryView => {
                    KeyPart::Bytes(unhex(v.as_str().ok_or_else(bad)?).ok_or_else(bad)?)
                }
                _ => KeyPart::Int(v.as_str().ok_or_else(bad)?.parse().map_err(|_| bad())?),
            })
        })
        .collect()
}

/// Which end of a range a statistics value bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// A minimum.
    Lower,
    /// A maximum.
    Upper,
}

/// Reads a key part from a Delta statistics value (minValues / maxValues), widened so it
/// stays a valid bound despite the truncation other writers apply: strings of 32 or more
/// characters and timestamps at millisecond precision. `None` means "no usable bound".
pub fn key_part_from_stat(v: &Value, t: &DataType, bound: Bound) -> Option<KeyPart> {
    match t {
        DataType::Boolean => v.as_bool().map(KeyPart::Bool),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
            let s = v.as_str()?;
            // A truncated maximum is a prefix of the true maximum: not an upper bound.
            if bound == Bound::Upper && s.chars().count() >= 32 {
                None
            } else {
                Some(KeyPart::Str(s.to_string()))
            }
        }
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView => None,
        DataType::Date32 => {
            let d = chrono::NaiveDate::parse_from_str(v.as_str()?, "%Y-%m-%d").ok()?;
            let epoch = chrono::NaiveDate::from_ymd_opt(1970, 1, 1)?;
            Some(KeyPart::Int((d - epoch).num_days() as i128))
        }
        DataType::Timestamp(_, _) => {
            let s = v.as_str()?;
            let micros = chrono::DateTime::parse_from_rfc3339(s)
                .map(|d| d.timestamp_micros())
                .or_else(|_| {
                    chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
                        .map(|d| d.and_utc().timestamp_micros())
                })
                .ok()? as i128;
            Some(KeyPart::Int(match bound {
                Bound::Lower => micros,
                Bound::Upper => micros + 999,
            }))
        }
        DataType::Decimal128(_, scale) => {
            let f = v.as_f64()?;
            let unscaled = f * 10f64.powi(*scale as i32);
            Some(KeyPart::Int(match bound {
                Bound::Lower => unscaled.floor() as i128 - 1,
                Bound::Upper => unscaled.ceil() as i128 + 1,
            }))
        }
        _ => {
            if let Some(i) = v.as_i64() {
                Some(KeyPart::Int(i as i128))
            } else {
                v.as_u64().map(|u| KeyPart::Int(u as i128))
            }
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{BinaryArray, Int64Array, StringArray};

    #[test]
    fn keys_round_trip_through_json_and_compare_lexicographically() {
        let ids = Int64Array::from(vec![5, -3]);
        let names = StringArray::from(vec!["b", "a"]);
        let raw = BinaryArray::from(vec![&b"\x00\xff"[..], &b"z"[..]]);
        let cols: Vec<&dyn Array> = vec![&ids, &names, &raw];
        let k0 = key_at(&cols, 0);
        let k1 = key_at(&cols, 1);
        assert!(k1 < k0);
        let types = [DataType::Int64, DataType::Utf8, DataType::Binary];
        assert_eq!(key_from_json(&key_to_json(&k0), &types).unwrap(), k0);
        assert_eq!(key_from_json(&key_to_json(&k1), &types).unwrap(), k1);
    }

    #[test]
    fn truncated_statistics_widen_to_valid_bounds() {
        let long = Value::String("x".repeat(32));
        assert_eq!(
            key_part_from_stat(&long, &DataType::Utf8, Bound::Upper),
            None
        );
        assert!(key_part_from_stat(&long, &DataType::Utf8, Bound::Lower).is_some());
        let ts = Value::String("2024-01-01T00:00:00.123Z".into());
        let t = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
        let lo = key_part_from_stat(&ts, &t, Bound::Lower).unwrap();
        let hi = key_part_from_stat(&ts, &t, Bound::Upper).unwrap();
        assert!(lo < hi);
    }
}
