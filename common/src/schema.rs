//! Table schemas as people write them (`{"fields":[{"name","type","nullable"}]}`) and as
//! Arrow sees them.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One column as written in a config file or schema JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnSpec {
    /// Column name.
    pub name: String,
    /// Type name: int8..int64, uint8..uint64, float32, float64, boolean, string, binary,
    /// date, timestamp (UTC), timestamp_ntz, decimal(p,s), array<ELEMENT>.
    #[serde(rename = "type")]
    pub data_type: String,
    /// Whether the column accepts nulls (default true).
    #[serde(default = "default_true")]
    pub nullable: bool,
}

fn default_true() -> bool {
    true
}

/// A schema as JSON: `{"fields": [...]}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchemaSpec {
    /// The columns, in order.
    pub fields: Vec<ColumnSpec>,
}

/// The name of a list's item field. Delta's array type has an anonymous element; the
/// kernel's Delta-to-Arrow conversion names it `element` (and the Parquet spec's list
/// layout does too), so the table's Arrow schema, the files workers write and what readers
/// hand back agree only with this name.
pub const LIST_ELEMENT: &str = "element";

/// The Arrow list type of `element` values (elements may be null, as in Delta by default).
pub fn list_of(element: DataType) -> DataType {
    DataType::List(Arc::new(Field::new(LIST_ELEMENT, element, true)))
}

/// Parses a type name into an Arrow type.
pub fn parse_type(name: &str) -> Result<DataType> {
    let n = name.trim().to_ascii_lowercase();
    if let Some(rest) = n.strip_prefix("array") {
        let inner = rest
            .trim_start()
            .strip_prefix('<')
            .and_then(|s| s.strip_suffix('>'))
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| {
                Error::Config(format!(
                    "bad array type '{name}': want array<ELEMENT>, e.g. array<int32>"
                ))
            })?;
        let element = parse_type(inner)
            .map_err(|e| Error::Config(format!("bad array type '{name}': element type: {e}")))?;
        return Ok(list_of(element));
    }
    let t = match n.as_str() {
        "int8" | "tinyint" | "byte" => DataType::Int8,
        "int16" | "smallint" | "short" => DataType::Int16,
        "int32" | "int" | "integer" => DataType::Int32,
        "int64" | "bigint" | "long" => DataType::Int64,
        "uint8" => DataType::UInt8,
        "uint16" => DataType::UInt16,
        "uint32" => DataType::UInt32,
        "uint64" => DataType::UInt64,
        "float32" | "float" | "real" => DataType::Float32,
        "float64" | "double" => DataType::Float64,
        "bool" | "boolean" => DataType::Boolean,
        "string" | "utf8" | "text" => DataType::Utf8,
        "binary" | "bytes" => DataType::Binary,
        "date" | "date32" => DataType::Date32,
        "timestamp" | "timestamptz" => {
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
        }
        "timestamp_ntz" => DataType::Timestamp(TimeUnit::Microsecond, None),
        _ => {
            if let Some(inner) = n.strip_prefix("decimal(").and_then(|s| s.strip_suffix(')')) {
                let mut parts = inner.split(',').map(|p| p.trim().parse::<i64>());
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(Ok(p)), Some(Ok(s)), None)
                        if (1..=38).contains(&p) && (0..=p).contains(&s) =>
                    {
                        DataType::Decimal128(p as u8, s as i8)
                    }
                    _ => {
                        return Err(Error::Config(format!(
                            "bad decimal type '{name}': want decimal(precision 1..=38, scale 0..=precision)"
                        )));
                    }
                }
            } else {
                return Err(Error::Config(format!(
                    "unknown column type '{name}' (known: int8..int64, uint8..uint64, float32, float64, boolean, string, binary, date, timestamp, timestamp_ntz, decimal(p,s), array<ELEMENT>)"
                )));
            }
        }
    };
    Ok(t)
}

/// Formats an Arrow type as a type name; unusual types fall back to Arrow's own spelling.
pub fn type_name(t: &DataType) -> String {
    match t {
        DataType::Int8 => "int8".into(),
        DataType::Int16 => "int16".into(),
        DataType::Int32 => "int32".into(),
        DataType::Int64 => "int64".into(),
        DataType::UInt8 => "uint8".into(),
        DataType::UInt16 => "uint16".into(),
        DataType::UInt32 => "uint32".into(),
        DataType::UInt64 => "uint64".into(),
        DataType::Float32 => "float32".into(),
        DataType::Float64 => "float64".into(),
        DataType::Boolean => "boolean".into(),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => "string".into(),
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView => "binary".into(),
        DataType::Date32 => "date".into(),
        DataType::Timestamp(TimeUnit::Microsecond, Some(_)) => "timestamp".into(),
        DataType::Timestamp(TimeUnit::Microsecond, None) => "timestamp_ntz".into(),
        DataType::Decimal128(p, s) => format!("decimal({p},{s})"),
        DataType::List(f) | DataType::LargeList(f) | DataType::ListView(f) => {
            format!("array<{}>", type_name(f.data_type()))
        }
        other => other.to_string(),
    }
}

impl SchemaSpec {
    /// Builds the Arrow schema.
    pub fn to_arrow(&self) -> Result<SchemaRef> {
        if self.fields.is_empty() {
            return Err(Error::Config("schema has no fields".into()));
        }
        let mut seen = std::collections::HashSet::new();
        let mut fields = Vec::with_capacity(self.fields.len());
        for c in &self.fields {
            if c.name.is_empty() || c.name.starts_with("__") {
                return Err(Error::Config(format!(
                    "bad column name '{}': must be non-empty and not start with '__'",
                    c.name
                )));
            }
            if !seen.insert(c.name.as_str()) {
                return Err(Error::Config(format!("column '{}' appears twice", c.name)));
            }
            let t = parse_type(&c.data_type)
                .map_err(|e| Error::Config(format!("column '{}': {e}", c.name)))?;
            fields.push(Field::new(&c.name, t, c.nullable));
        }
        Ok(Arc::new(Schema::new(fields)))
    }

    /// Describes an Arrow schema.
    pub fn from_arrow(schema: &Schema) -> Self {
        SchemaSpec {
            fields: schema
                .fields()
                .iter()
                .map(|f| ColumnSpec {
                    name: f.name().clone(),
                    data_type: type_name(f.data_type()),
                    nullable: f.is_nullable(),
                })
                .collect(),
        }
    }

    /// Parses schema JSON.
    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|e| Error::Config(format!("bad schema JSON: {e}")))
    }

    /// Serialises to JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("schema spec serialises")
    }
}

/// Maps the types Delta readers hand back to the canonical types Freshet stores
/// (view and large strings to Utf8, timestamps to microseconds, any list to a List whose
/// item field is [`LIST_ELEMENT`]; element nullability is kept, it is part of the type).
pub fn canonical_type(t: &DataType) -> DataType {
    match t {
        DataType::Utf8View | DataType::LargeUtf8 => DataType::Utf8,
        DataType::BinaryView | DataType::LargeBinary => DataType::Binary,
        DataType::Timestamp(_, tz) => DataType::Timestamp(TimeUnit::Microsecond, tz.clone()),
        DataType::List(f) | DataType::LargeList(f) | DataType::ListView(f) => {
            DataType::List(Arc::new(Field::new(
                LIST_ELEMENT,
                canonical_type(f.data_type()),
                f.is_nullable(),
            )))
        }
        other => other.clone(),
    }
}

/// The canonical form of a schema (see [`canonical_type`]).
pub fn canonical_schema(schema: &Schema) -> SchemaRef {
    Arc::new(Schema::new(
        schema
            .fields()
            .iter()
            .map(|f| Field::new(f.name(), canonical_type(f.data_type()), f.is_nullable()))
            .collect::<Vec<_>>(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_type_name_and_round_trips() {
        let spec = SchemaSpec::from_json(
            r#"{"fields":[{"name":"id","type":"int64","nullable":false},
            {"name":"p","type":"decimal(12,2)"},{"name":"t","type":"timestamp"},
            {"name":"s","type":"string"},{"name":"d","type":"date"}]}"#,
        )
        .unwrap();
        let schema = spec.to_arrow().unwrap();
        assert_eq!(schema.field(1).data_type(), &DataType::Decimal128(12, 2));
        assert!(!schema.field(0).is_nullable());
        assert_eq!(SchemaSpec::from_arrow(&schema), spec_with_defaults(spec));
    }

    fn spec_with_defaults(spec: SchemaSpec) -> SchemaSpec {
        spec
    }

    #[test]
    fn bad_types_and_names_are_named() {
        let e = parse_type("int128").unwrap_err().to_string();
        assert!(e.contains("int128"), "{e}");
        let e = SchemaSpec::from_json(
            r#"{"fields":[{"name":"a","type":"int64"},{"name":"a","type":"int64"}]}"#,
        )
        .unwrap()
        .to_arrow()
        .unwrap_err()
        .to_string();
        assert!(e.contains("'a' appears twice"), "{e}");
        assert!(parse_type("decimal(40,2)").is_err());
        let e = parse_type("array<int128>").unwrap_err().to_string();
        assert!(
            e.contains("'array<int128>'") && e.contains("'int128'"),
            "{e}"
        );
        let e = parse_type("array<>").unwrap_err().to_string();
        assert!(e.contains("'array<>'"), "{e}");
        let e = parse_type("array<decimal(40,2)>").unwrap_err().to_string();
        assert!(e.contains("decimal(40,2)"), "{e}");
    }

    #[test]
    fn array_types_parse_name_and_canonicalise() {
        for (name, t) in [
            ("array<int32>", list_of(DataType::Int32)),
            (
                "ARRAY<decimal(10, 2)>",
                list_of(DataType::Decimal128(10, 2)),
            ),
            (
                "array<timestamp>",
                list_of(DataType::Timestamp(
                    TimeUnit::Microsecond,
                    Some("UTC".into()),
                )),
            ),
            ("array<array<string>>", list_of(list_of(DataType::Utf8))),
        ] {
            assert_eq!(parse_type(name).unwrap(), t, "{name}");
            assert_eq!(parse_type(&type_name(&t)).unwrap(), t, "{name}");
        }
        assert_eq!(
            type_name(&list_of(DataType::Decimal128(10, 2))),
            "array<decimal(10,2)>"
        );
        // Lists named or sized differently by other writers compare equal to ours.
        let item = DataType::LargeList(Arc::new(Field::new("item", DataType::Utf8View, true)));
        assert_eq!(canonical_type(&item), list_of(DataType::Utf8));
        let strict = DataType::List(Arc::new(Field::new("item", DataType::Utf8, false)));
        assert_ne!(canonical_type(&strict), list_of(DataType::Utf8));
    }
}
