//! Deterministic data: the `orders` table and its change batches.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use arrow::array::{
    ArrayRef, BooleanArray, Date32Array, Decimal128Array, Float32Array, Float64Array, Int8Array,
    Int32Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use freshet_common::changes::OP_COLUMN;
use freshet_common::schema::ColumnSpec;
use freshet_common::table::{TableConfig, TableDef};
use freshet_proto::worker::v1::{RewriteRequest, TableSpec};
use rand::rngs::SmallRng;
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// The table's name.
pub const TABLE: &str = "orders";
/// Fixed seed of everything generated.
pub const SEED: u64 = 0x5eed_f7e5_0e7d_2026;
/// The partition values.
pub const REGIONS: [&str; 8] = [
    "af-south",
    "ap-east",
    "ap-south",
    "eu-central",
    "eu-west",
    "me-central",
    "us-east",
    "us-west",
];
const STATUS: [&str; 6] = [
    "pending",
    "processing",
    "shipped",
    "delivered",
    "cancelled",
    "returned",
];
const WORDS: [&str; 16] = [
    "fast", "fragile", "gift", "leave", "at", "door", "call", "before", "delivery", "express",
    "wrap", "please", "ring", "bell", "back", "office",
];

/// What a base table is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Shape {
    pub rows: u64,
    pub partitioned: bool,
    pub target_file_size: u64,
}

impl Shape {
    pub fn name(&self) -> String {
        format!(
            "orders-{}-{}-{}",
            self.rows,
            if self.partitioned { "part" } else { "flat" },
            self.target_file_size
        )
    }
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The region of an id: a hash, not correlated with the id.
pub fn region_of(id: i64) -> &'static str {
    REGIONS[(splitmix(id as u64 ^ SEED) % 8) as usize]
}

/// The column list (with the op column excluded).
pub fn columns(partitioned: bool) -> Vec<ColumnSpec> {
    let c = |n: &str, t: &str, nullable: bool| ColumnSpec {
        name: n.into(),
        data_type: t.into(),
        nullable,
    };
    let _ = partitioned; // the same 15 columns either way; only the partitioning differs
    let mut v = vec![c("id", "int64", false), c("region", "string", false)];
    v.extend([
        c("customer_id", "int64", false),
        c("quantity", "int32", false),
        c("price", "float64", false),
        c("discount", "float32", false),
        c("amount", "decimal(12,2)", false),
        c("status", "string", false),
        c("product", "string", false),
        c("comment", "string", true),
        c("created_at", "timestamp", false),
        c("updated_at", "timestamp", false),
        c("priority", "boolean", false),
        c("ship_date", "date", true),
        c("version", "int64", false),
    ]);
    v
}

pub fn table_config(uri: &str, shape: &Shape) -> TableConfig {
    TableConfig {
        name: TABLE.into(),
        uri: uri.into(),
        columns: columns(shape.partitioned),
        primary_key: if shape.partitioned {
            vec!["region".into(), "id".into()]
        } else {
            vec!["id".into()]
        },
        partition_by: if shape.partitioned {
            vec!["region".into()]
        } else {
            vec![]
        },
        target_file_size: Some(shape.target_file_size),
        // The base table keeps the classic protocol (MERGE and the full rewrite run on it as
        // on any Delta table); a deletion-vector run turns the feature on in its copy.
        merge_mode: Some(freshet_common::table::MergeMode::CopyOnWrite),
    }
}

pub fn table_def(uri: &str, shape: &Shape) -> Result<TableDef> {
    Ok(table_config(uri, shape).to_def()?)
}

/// Rows for `ids`, at `version` (0: the initial load; updates use a later version).
pub fn rows(schema: &SchemaRef, ids: &[i64], version: i64) -> Result<RecordBatch> {
    let n = ids.len();
    let mut customer = Vec::with_capacity(n);
    let mut qty = Vec::with_capacity(n);
    let mut price = Vec::with_capacity(n);
    let mut disc = Vec::with_capacity(n);
    let mut amount = Vec::with_capacity(n);
    let mut status = Vec::with_capacity(n);
    let mut product = Vec::with_capacity(n);
    let mut comment: Vec<Option<String>> = Vec::with_capacity(n);
    let mut created = Vec::with_capacity(n);
    let mut updated = Vec::with_capacity(n);
    let mut prio = Vec::with_capacity(n);
    let mut ship: Vec<Option<i32>> = Vec::with_capacity(n);
    const T0: i64 = 1_577_836_800_000_000; // 2020-01-01
    for &id in ids {
        let mut r = SmallRng::seed_from_u64(splitmix(
            id as u64 ^ (version as u64).rotate_left(32) ^ SEED,
        ));
        customer.push(r.gen_range(1..2_000_000i64));
        let q = r.gen_range(1..100i32);
        qty.push(q);
        let p = (r.gen_range(100..100_000i64)) as f64 / 100.0;
        price.push(p);
        disc.push(r.gen_range(0..30) as f32 / 100.0);
        amount.push(q as i128 * (p * 100.0).round() as i128);
        status.push(STATUS[r.gen_range(0..STATUS.len())]);
        let plen = r.gen_range(4..28);
        product.push(format!(
            "product-{}",
            (0..plen)
                .map(|_| (b'a' + r.gen_range(0..26u8)) as char)
                .collect::<String>()
        ));
        if r.gen_bool(0.2) {
            comment.push(None);
        } else {
            let words = r.gen_range(0..14);
            comment.push(Some(
                (0..words)
                    .map(|_| WORDS[r.gen_range(0..WORDS.len())])
                    .collect::<Vec<_>>()
                    .join(" "),
            ));
        }
        let c = T0 + id * 3_000_000 + r.gen_range(0..3_000_000);
        created.push(c);
        updated.push(c + version * 60_000_000 + r.gen_range(0..1_000_000));
        prio.push(r.gen_bool(0.1));
        ship.push(if r.gen_bool(0.7) {
            Some((c / 86_400_000_000) as i32 + r.gen_range(1..10))
        } else {
            None
        });
    }
    let mut cols: HashMap<&str, ArrayRef> = HashMap::new();
    cols.insert("id", Arc::new(Int64Array::from(ids.to_vec())));
    cols.insert(
        "region",
        Arc::new(StringArray::from(
            ids.iter().map(|i| region_of(*i)).collect::<Vec<_>>(),
        )),
    );
    cols.insert("customer_id", Arc::new(Int64Array::from(customer)));
    cols.insert("quantity", Arc::new(Int32Array::from(qty)));
    cols.insert("price", Arc::new(Float64Array::from(price)));
    cols.insert("discount", Arc::new(Float32Array::from(disc)));
    cols.insert(
        "amount",
        Arc::new(Decimal128Array::from(amount).with_precision_and_scale(12, 2)?),
    );
    cols.insert("status", Arc::new(StringArray::from(status)));
    cols.insert("product", Arc::new(StringArray::from(product)));
    cols.insert("comment", Arc::new(StringArray::from(comment)));
    cols.insert(
        "created_at",
        Arc::new(TimestampMicrosecondArray::from(created).with_timezone("UTC")),
    );
    cols.insert(
        "updated_at",
        Arc::new(TimestampMicrosecondArray::from(updated).with_timezone("UTC")),
    );
    cols.insert("priority", Arc::new(BooleanArray::from(prio)));
    cols.insert("ship_date", Arc::new(Date32Array::from(ship)));
    cols.insert("version", Arc::new(Int64Array::from(vec![version; n])));
    let arrays = schema
        .fields()
        .iter()
        .map(|f| {
            cols.remove(f.name().as_str())
                .with_context(|| format!("no generator for column {}", f.name()))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(RecordBatch::try_new(schema.clone(), arrays)?)
}

/// Key distribution of a change batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Dist {
    /// Updates and deletes hit the newest ids.
    Recent,
    /// Updates and deletes hit random existing ids.
    Uniform,
}

/// A change batch: table columns plus `deleted` (bool), one row per key.
pub struct Changes {
    pub batch: RecordBatch,
    pub deleted: Vec<bool>,
    #[allow(dead_code)]
    pub updates: usize,
    pub inserts: usize,
    pub deletes: usize,
}

/// 70 % updates of existing ids, 20 % inserts of new ids, 10 % deletes; ids in 0..rows exist.
/// `next_id` is the first id not in the table; `salt` varies batches of one run.
pub fn changes(
    schema: &SchemaRef,
    rows: u64,
    next_id: i64,
    n: usize,
    dist: Dist,
    salt: u64,
) -> Result<Changes> {
    let mut r = SmallRng::seed_from_u64(SEED ^ splitmix(n as u64) ^ (dist as u64) << 40 ^ salt);
    let inserts = n / 5;
    let deletes = n / 10;
    let updates = n - inserts - deletes;
    let existing = updates + deletes;
    let (lo, span) = match dist {
        // The newest ids: a window of 10x the batch's existing keys.
        Dist::Recent => {
            let span = ((existing as u64) * 10).max(1000).min(rows);
            (rows - span, span)
        }
        Dist::Uniform => (0, rows),
    };
    if existing as u64 > span {
        bail!("{existing} existing keys do not fit in {span} ids");
    }
    let picked = sample(&mut r, span as usize, existing);
    let mut ids: Vec<i64> = picked.iter().map(|i| (lo + i as u64) as i64).collect();
    let mut deleted = vec![false; updates];
    deleted.extend(std::iter::repeat_n(true, deletes));
    ids.extend(next_id..next_id + inserts as i64);
    deleted.extend(std::iter::repeat_n(false, inserts));
    let version = 1 + (salt as i64 % 1000);
    let batch = self::rows(schema, &ids, version)?;
    Ok(Changes {
        batch,
        deleted,
        updates,
        inserts,
        deletes,
    })
}

impl Changes {
    /// The batch with an `op` column ("upsert" / "delete") for Freshet's ingest API.
    pub fn with_op(&self) -> Result<RecordBatch> {
        let mut fields: Vec<Field> = self
            .batch
            .schema()
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        fields.push(Field::new("op", DataType::Utf8, false));
        let mut cols = self.batch.columns().to_vec();
        cols.push(Arc::new(StringArray::from(
            self.deleted
                .iter()
                .map(|d| if *d { "delete" } else { "upsert" })
                .collect::<Vec<_>>(),
        )));
        Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), cols)?)
    }

    /// The batch with a `deleted` boolean column (MERGE source, full rewrite).
    pub fn with_deleted(&self) -> Result<RecordBatch> {
        let mut fields: Vec<Field> = self
            .batch
            .schema()
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        fields.push(Field::new("deleted", DataType::Boolean, false));
        let mut cols = self.batch.columns().to_vec();
        cols.push(Arc::new(BooleanArray::from(self.deleted.clone())));
        Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), cols)?)
    }
}

/// Ids of the base table per region (or all ids in one group when unpartitioned).
fn groups(shape: &Shape) -> Vec<(Option<&'static str>, Vec<i64>)> {
    if shape.partitioned {
        let mut m: Vec<Vec<i64>> = vec![Vec::new(); REGIONS.len()];
        for id in 0..shape.rows as i64 {
            let r = region_of(id);
            let i = REGIONS.iter().position(|x| *x == r).expect("region");
            m[i].push(id);
        }
        REGIONS.iter().copied().map(Some).zip(m).collect()
    } else {
        vec![(None, (0..shape.rows as i64).collect())]
    }
}

/// Creates (or reuses) the base table under `root` and returns its directory. Files are
/// written by Freshet's own worker code (sorted by key, ~target size), committed in one
/// Delta version with Freshet's key-range tags.
pub async fn ensure_base(root: &Path, shape: &Shape, progress: bool) -> Result<PathBuf> {
    let dir = root.join(shape.name());
    let marker = dir.join("bench-base.json");
    if let Ok(text) = std::fs::read_to_string(&marker)
        && serde_json::from_str::<Shape>(&text).ok().as_ref() == Some(shape)
    {
        return Ok(dir);
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    let uri = dir.display().to_string();
    let def = table_def(&uri, shape)?;
    let options = Default::default();
    let (mut table, _) = freshet_common::delta::open_or_create(&def, &options).await?;
    let url = freshet_common::storage::table_url(TABLE, &uri)?;
    let store = freshet_common::storage::table_store(TABLE, &url, &options)?;
    let spec = TableSpec {
        name: TABLE.into(),
        uri: uri.clone(),
        schema_ipc: freshet_common::ipc::encode_schema(&def.schema)?,
        primary_key: def.primary_key.clone(),
        partition_columns: def.partition_by.clone(),
    };
    let change_schema = freshet_common::changes::change_schema(&def);
    let bar = progress_bar(progress, shape.rows, "generating base table");
    let mut outputs = Vec::new();
    // At most this many rows per write call (memory); ids are sequential, so the files of
    // successive calls have disjoint key ranges.
    const CALL_ROWS: usize = 1_500_000;
    let mut task = 0;
    for (region, ids) in groups(shape) {
        for chunk in ids.chunks(CALL_ROWS) {
            let batch = rows(&def.schema, chunk, 0)?;
            let mut cols = batch.columns().to_vec();
            cols.push(Arc::new(Int8Array::from(vec![0i8; chunk.len()])));
            let with_op = RecordBatch::try_new(change_schema.clone(), cols)?;
            debug_assert_eq!(
                with_op.schema().field(with_op.num_columns() - 1).name(),
                OP_COLUMN
            );
            task += 1;
            let req = RewriteRequest {
                cycle_id: "load".into(),
                task_id: task,
                attempt: 1,
                epoch: 0,
                table: Some(spec.clone()),
                inputs: vec![],
                partition_values: region
                    .map(|r| HashMap::from([("region".to_string(), r.to_string())]))
                    .unwrap_or_default(),
                changes_ipc: freshet_common::ipc::encode(&change_schema, &[with_op])?,
                target_file_size: shape.target_file_size,
                mode: Default::default(),
            };
            let resp = freshet_worker::rewrite::rewrite(&store, &req, "bench-load").await?;
            outputs.extend(resp.files);
            bar.inc(chunk.len() as u64);
        }
    }
    let actions = freshet_coordinator::commit::actions(&[], &outputs, &[]);
    freshet_coordinator::commit::commit(
        &def,
        &mut table,
        actions,
        0,
        &Default::default(),
        "bench-load",
        serde_json::json!({}),
        &freshet_coordinator::fence::Fence::none(),
    )
    .await?;
    bar.finish_and_clear();
    std::fs::write(&marker, serde_json::to_string(shape)?)?;
    Ok(dir)
}

/// A fresh copy of a base table: data files hard-linked (they are immutable), the rest copied.
pub fn copy_table(from: &Path, to: &Path) -> Result<()> {
    if to.exists() {
        std::fs::remove_dir_all(to)?;
    }
    fn walk(from: &Path, to: &Path) -> Result<()> {
        std::fs::create_dir_all(to)?;
        for e in std::fs::read_dir(from)? {
            let e = e?;
            let p = e.path();
            let t = to.join(e.file_name());
            if p.is_dir() {
                walk(&p, &t)?;
            } else if p.extension().is_some_and(|x| x == "parquet") {
                std::fs::hard_link(&p, &t).or_else(|_| std::fs::copy(&p, &t).map(|_| ()))?;
            } else {
                std::fs::copy(&p, &t)?;
            }
        }
        Ok(())
    }
    walk(from, to)
}

pub fn progress_bar(show: bool, len: u64, msg: &str) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(len);
    b.set_style(
        indicatif::ProgressStyle::with_template("{msg:28} [{bar:40}] {pos}/{len} {elapsed}")
            .expect("template")
            .progress_chars("=> "),
    );
    b.set_message(msg.to_string());
    b
}

/// The Arrow types used for comparing contents (partition values read back as strings).
pub fn canonical_schema(def: &TableDef) -> SchemaRef {
    Arc::new(Schema::new(
        def.schema
            .fields()
            .iter()
            .map(|f| match f.data_type() {
                DataType::Timestamp(_, _) => Field::new(
                    f.name(),
                    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                    true,
                ),
                t => Field::new(f.name(), t.clone(), true),
            })
            .collect::<Vec<_>>(),
    ))
}
