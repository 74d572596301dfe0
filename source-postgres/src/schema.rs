//! Reading a PostgreSQL table's shape: columns with their types, and the primary key (or
//! the REPLICA IDENTITY index). A table without either is refused.

use std::collections::HashMap;

use tokio_postgres::Client;

use crate::error::{Result, SourceError};
use crate::types::column_type;

/// A column of a source table.
#[derive(Debug, Clone, PartialEq)]
pub struct PgColumn {
    /// Name.
    pub name: String,
    /// Type OID.
    pub type_oid: u32,
    /// Type modifier.
    pub type_mod: i32,
    /// For an array column, the element type OID (see [`array_elements`]); else 0.
    pub elem_oid: u32,
    /// NOT NULL.
    pub not_null: bool,
    /// The SQL type name (`format_type`), for casts in lookups.
    pub type_name: String,
}

/// A source table's shape.
#[derive(Debug, Clone)]
pub struct PgTable {
    /// `schema.table`.
    pub qualified: String,
    /// Columns in order.
    pub columns: Vec<PgColumn>,
    /// Key columns.
    pub key: Vec<String>,
}

impl PgTable {
    /// The Freshet column specs (key columns non-nullable).
    pub fn column_specs(&self) -> Vec<freshet_common::schema::ColumnSpec> {
        self.columns
            .iter()
            .map(|c| freshet_common::schema::ColumnSpec {
                name: c.name.clone(),
                data_type: crate::types::type_name(&column_type(
                    c.type_oid, c.type_mod, c.elem_oid,
                )),
                nullable: !(c.not_null || self.key.contains(&c.name)),
            })
            .collect()
    }
}

/// The element type of each array type among `type_oids` (types that are not arrays are
/// absent). Looked up in `pg_type` rather than a fixed table, so that arrays of enums and
/// other user types are lists too. An array is what PostgreSQL itself calls one: a
/// varlena type with an element type. Domains over arrays are not (they stay text), nor are
/// arrays whose element delimiter is not a comma (`box[]`), which the text parser would
/// split wrongly.
pub async fn array_elements(client: &Client, type_oids: &[u32]) -> Result<HashMap<u32, u32>> {
    let oids: Vec<i64> = type_oids.iter().map(|o| *o as i64).collect();
    let rows = client
        .query(
            "SELECT t.oid::int8, t.typelem::int8 FROM pg_type t \
             JOIN pg_type e ON e.oid = t.typelem \
             WHERE t.oid::int8 = ANY($1) AND t.typlen = -1 AND t.typtype <> 'd' \
             AND e.typdelim = ','",
            &[&oids],
        )
        .await
        .map_err(SourceError::pg("reading array element types"))?;
    Ok(rows
        .iter()
        .map(|r| (r.get::<_, i64>(0) as u32, r.get::<_, i64>(1) as u32))
        .collect())
}

/// Describes `schema.table`.
pub async fn describe(client: &Client, schema: &str, table: &str) -> Result<PgTable> {
    let qualified = format!("{schema}.{table}");
    let rows = client
        .query(
            "SELECT a.attname::text, a.atttypid::int8, a.atttypmod::int8, a.attnotnull, \
             format_type(a.atttypid, a.atttypmod) \
             FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped \
             ORDER BY a.attnum",
            &[&schema, &table],
        )
        .await
        .map_err(SourceError::pg(format!("describing {qualified}")))?;
    if rows.is_empty() {
        return Err(SourceError::Table {
            table: qualified,
            message: "no such table in PostgreSQL".into(),
        });
    }
    let mut columns: Vec<PgColumn> = rows
        .iter()
        .map(|r| PgColumn {
            name: r.get(0),
            type_oid: r.get::<_, i64>(1) as u32,
            type_mod: r.get::<_, i64>(2) as i32,
            elem_oid: 0,
            not_null: r.get(3),
            type_name: r.get(4),
        })
        .collect();
    let oids: Vec<u32> = columns.iter().map(|c| c.type_oid).collect();
    let elems = array_elements(client, &oids).await?;
    for c in &mut columns {
        c.elem_oid = elems.get(&c.type_oid).copied().unwrap_or(0);
    }
    // The primary key, else the REPLICA IDENTITY USING INDEX index.
    let key_rows = client
        .query(
            "SELECT a.attname::text FROM pg_index i \
             JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
             JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) ON true \
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum \
             WHERE n.nspname = $1 AND c.relname = $2 AND (i.indisprimary OR i.indisreplident) \
             ORDER BY i.indisprimary DESC, k.ord",
            &[&schema, &table],
        )
        .await
        .map_err(SourceError::pg(format!("reading the key of {qualified}")))?;
    let mut key: Vec<String> = Vec::new();
    for r in key_rows {
        let name: String = r.get(0);
        if !key.contains(&name) {
            key.push(name);
        }
    }
    if key.is_empty() {
        return Err(SourceError::Table {
            table: qualified,
            message: "has no primary key (or REPLICA IDENTITY USING INDEX): rows could not be \
                      matched to changes; add a primary key"
                .into(),
        });
    }
    Ok(PgTable {
        qualified,
        columns,
        key,
    })
}
