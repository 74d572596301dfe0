//! Reading a PostgreSQL table's shape: columns with their types, and the primary key (or
//! the REPLICA IDENTITY index). A table without either is refused.

use tokio_postgres::Client;

use crate::error::{Result, SourceError};
use crate::types::arrow_type;

/// A column of a source table.
#[derive(Debug, Clone, PartialEq)]
pub struct PgColumn {
    /// Name.
    pub name: String,
    /// Type OID.
    pub type_oid: u32,
    /// Type modifier.
    pub type_mod: i32,
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
                data_type: crate::types::type_name(&arrow_type(c.type_oid, c.type_mod)),
                nullable: !(c.not_null || self.key.contains(&c.name)),
            })
            .collect()
    }
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
    let columns: Vec<PgColumn> = rows
        .iter()
        .map(|r| PgColumn {
            name: r.get(0),
            type_oid: r.get::<_, i64>(1) as u32,
            type_mod: r.get::<_, i64>(2) as i32,
            not_null: r.get(3),
            type_name: r.get(4),
        })
        .collect();
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
