//! Delta per-file statistics (`numRecords`, `minValues`, `maxValues`, `nullCount`),
//! computed exactly from the rows written. Readers such as DataFusion answer `count(*)`
//! from `numRecords` and prune with min/max, so these must be right, not approximate.

use arrow::array::{Array, AsArray};
use arrow::compute::{max, max_string, min, min_string};
use arrow::datatypes::*;
use arrow::record_batch::RecordBatch;
use serde_json::{Map, Value};

/// Strings longer than this get a truncated minimum and no maximum.
const MAX_STRING_STAT: usize = 32;

fn date_string(days: i32) -> String {
    (chrono::NaiveDate::from_ymd_opt(1970, 1, 1).expect("epoch")
        + chrono::Duration::days(days as i64))
    .format("%Y-%m-%d")
    .to_string()
}

fn timestamp_string(micros: i64, utc: bool, round_up: bool) -> Option<String> {
    // Delta keeps millisecond precision: round the minimum down and the maximum up.
    let millis = if round_up {
        micros.div_euclid(1000) + i64::from(micros.rem_euclid(1000) != 0)
    } else {
        micros.div_euclid(1000)
    };
    let dt = chrono::DateTime::from_timestamp_millis(millis)?;
    Some(if utc {
        dt.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
    } else {
        dt.naive_utc().format("%Y-%m-%dT%H:%M:%S%.3f").to_string()
    })
}

fn to_micros(unit: &TimeUnit, v: i64) -> i64 {
    match unit {
        TimeUnit::Second => v.saturating_mul(1_000_000),
        TimeUnit::Millisecond => v.saturating_mul(1_000),
        TimeUnit::Microsecond => v,
        TimeUnit::Nanosecond => v.div_euclid(1_000),
    }
}

/// Min and max of one column as Delta statistics values (`None` when not collected).
fn min_max(array: &dyn Array) -> (Option<Value>, Option<Value>) {
    macro_rules! prim {
        ($t:ty) => {{
            let a = array.as_primitive::<$t>();
            (min(a).map(Value::from), max(a).map(Value::from))
        }};
    }
    match array.data_type() {
        DataType::Int8 => prim!(Int8Type),
        DataType::Int16 => prim!(Int16Type),
        DataType::Int32 => prim!(Int32Type),
        DataType::Int64 => prim!(Int64Type),
        DataType::UInt8 => prim!(UInt8Type),
        DataType::UInt16 => prim!(UInt16Type),
        DataType::UInt32 => prim!(UInt32Type),
        DataType::UInt64 => prim!(UInt64Type),
        DataType::Float32 | DataType::Float64 => {
            let a = arrow::compute::cast(array, &DataType::Float64).expect("float cast");
            let a = a.as_primitive::<Float64Type>();
            // NaN makes min/max meaningless for pruning: collect nothing then.
            if a.iter().flatten().any(f64::is_nan) {
                return (None, None);
            }
            let f =
                |v: Option<f64>| v.and_then(|v| serde_json::Number::from_f64(v).map(Value::Number));
            (f(min(a)), f(max(a)))
        }
        DataType::Decimal128(_, scale) => {
            let a = array.as_primitive::<Decimal128Type>();
            let f = |v: Option<i128>| {
                let v = v?;
                // Only where the JSON number is exact.
                if v.unsigned_abs() >= (1u128 << 53) {
                    return None;
                }
                let x = v as f64 / 10f64.powi(*scale as i32);
                serde_json::Number::from_f64(x).map(Value::Number)
            };
            (f(min(a)), f(max(a)))
        }
        DataType::Date32 => {
            let a = array.as_primitive::<Date32Type>();
            (
                min(a).map(|d| Value::from(date_string(d))),
                max(a).map(|d| Value::from(date_string(d))),
            )
        }
        DataType::Timestamp(unit, tz) => {
            let a = arrow::compute::cast(array, &DataType::Int64).expect("timestamp cast");
            let a = a.as_primitive::<Int64Type>();
            let utc = tz.is_some();
            (
                min(a)
                    .and_then(|v| timestamp_string(to_micros(unit, v), utc, false))
                    .map(Value::from),
                max(a)
                    .and_then(|v| timestamp_string(to_micros(unit, v), utc, true))
                    .map(Value::from),
            )
        }
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
            let a = arrow::compute::cast(array, &DataType::Utf8).expect("string cast");
            let a = a.as_string::<i32>();
            let lo = min_string(a)
                .map(|s| Value::from(s.chars().take(MAX_STRING_STAT).collect::<String>()));
            let hi = max_string(a)
                .filter(|s| s.chars().count() <= MAX_STRING_STAT)
                .map(Value::from);
            (lo, hi)
        }
        _ => (None, None),
    }
}

/// The Delta `stats` JSON for a file holding `batch` (partition columns excluded).
pub fn file_stats(batch: &RecordBatch) -> Value {
    let mut mins = Map::new();
    let mut maxs = Map::new();
    let mut nulls = Map::new();
    for (field, col) in batch.schema().fields().iter().zip(batch.columns()) {
        if field.data_type().is_nested() {
            continue;
        }
        nulls.insert(field.name().clone(), Value::from(col.null_count() as u64));
        let (lo, hi) = min_max(col.as_ref());
        if let (Some(lo), Some(hi)) = (lo.clone(), hi) {
            mins.insert(field.name().clone(), lo);
            maxs.insert(field.name().clone(), hi);
        } else if let Some(lo) = lo {
            mins.insert(field.name().clone(), lo);
        }
    }
    serde_json::json!({
        "numRecords": batch.num_rows() as u64,
        "minValues": mins,
        "maxValues": maxs,
        "nullCount": nulls,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray, TimestampMicrosecondArray};
    use std::sync::Arc;

    #[test]
    fn stats_are_exact_and_bounds_stay_valid() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("s", DataType::Utf8, true),
            Field::new(
                "t",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                true,
            ),
        ]));
        let long = "y".repeat(40);
        let b = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from(vec![3, 1, 2])),
                Arc::new(StringArray::from(vec![
                    Some("b"),
                    None,
                    Some(long.as_str()),
                ])),
                Arc::new(
                    TimestampMicrosecondArray::from(vec![Some(1_500), None, Some(2_001)])
                        .with_timezone("UTC"),
                ),
            ],
        )
        .unwrap();
        let s = file_stats(&b);
        assert_eq!(s["numRecords"], 3);
        assert_eq!(s["minValues"]["id"], 1);
        assert_eq!(s["maxValues"]["id"], 3);
        assert_eq!(s["nullCount"]["s"], 1);
        assert_eq!(s["minValues"]["s"], "b");
        assert!(
            s["maxValues"].get("s").is_none(),
            "a long max string is not a valid bound"
        );
        assert_eq!(s["minValues"]["t"], "1970-01-01T00:00:00.001Z");
        assert_eq!(s["maxValues"]["t"], "1970-01-01T00:00:00.003Z");
    }
}
