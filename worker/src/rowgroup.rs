//! Copy-on-write at the row-group level.
//!
//! Files Freshet writes are sorted by key and say so (`sorting_columns` in every row
//! group), with exact (untruncated) statistics. When every input row group of a task
//! proves that (single integer key, min/max exact, groups in disjoint key ranges), the
//! rewrite streams the inputs one row group at a time: row groups that no change falls in
//! are copied into the new file byte for byte (their encoded column chunks, page indexes
//! and statistics), and only the touched row groups are decoded, merged and re-encoded.
//! A rewrite then costs about a copy of the file instead of a re-encode, and memory stays
//! bounded by a row group or two plus the output file being assembled.
//!
//! The steps: [`plan`] (from the footers: qualify, order the groups, assign the changes),
//! then per group [`copy`] (untouched) or [`merge`] (touched), into output files that
//! [`writer`] assembles. Anything the statistics cannot prove sends the task to the full
//! path in `rewrite`.

mod copy;
mod merge;
mod plan;
mod writer;

use std::sync::Arc;

use arrow::record_batch::RecordBatch;
use freshet_common::error::Result;
use freshet_common::table::TableDef;
use freshet_proto::worker::v1::RewriteRequest;
use object_store::ObjectStore;

use crate::format::FileFormat;
pub use crate::format::NAN_FREE_KEY;
pub use crate::output::Outcome;
pub use writer::stats_from_footer;

/// Tries the row-group path; `Ok(None)` when the inputs do not qualify (nothing written).
pub async fn try_rewrite(
    store: &Arc<dyn ObjectStore>,
    def: &TableDef,
    req: &RewriteRequest,
    changes: &RecordBatch,
    format: FileFormat,
) -> Result<Option<Outcome>> {
    let Some(plan) = plan::plan(store, def, req, changes).await? else {
        return Ok(None);
    };
    let mut out = writer::Output::new(store, def, req, format, plan.split_bytes);
    out.done.counts.rows_read = plan.rows_read;
    for (g, touched) in plan.groups.iter().zip(&plan.touched) {
        let input = &plan.inputs[g.input];
        let chunk = copy::fetch(store, input, g).await?;
        out.done.bytes_read += chunk.data.len() as u64;
        if touched.is_empty() {
            copy::copy_group(&mut out, input, g, &chunk).await?;
        } else {
            let (merged, counts) = merge::merge_group(def, input, g, chunk, changes, touched)?;
            out.done.counts.inserted += counts.inserted;
            out.done.counts.updated += counts.updated;
            out.done.counts.deleted += counts.deleted;
            out.add_rows(merged).await?;
        }
    }
    out.close_file().await?;
    out.done.bytes_read += plan.footer_bytes();
    Ok(Some(out.done))
}

#[cfg(test)]
mod tests {
    use super::plan::as_i64;
    use super::*;
    use crate::rewrite::{RewriteOptions, rewrite_with};
    use arrow::array::{Array, AsArray, Float64Array, Int8Array, Int64Array, StringArray};
    use arrow::compute::concat_batches;
    use arrow::datatypes::{DataType, Field, Int64Type, Schema};
    use bytes::Bytes;
    use freshet_proto::worker::v1::{InputFile, TableSpec};
    use object_store::memory::InMemory;
    use object_store::path::Path;
    use object_store::{ObjectStoreExt, PutPayload};
    use parquet::arrow::ArrowWriter;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use parquet::arrow::arrow_reader::statistics::StatisticsConverter;
    use parquet::file::metadata::ParquetMetaData;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    type Row = (Option<String>, f64);

    /// Options with the row-group path on or off and `format`.
    fn opts(row_groups: bool, format: FileFormat) -> RewriteOptions {
        RewriteOptions {
            row_groups,
            format,
            ..Default::default()
        }
    }

    fn def(target: u64) -> TableDef {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("v", DataType::Utf8, true),
            Field::new("f", DataType::Float64, false),
        ]));
        TableDef::new(
            "t",
            "memory:///t",
            schema,
            vec!["id".into()],
            vec![],
            target,
        )
        .unwrap()
    }

    fn change_batch(def: &TableDef, ch: &BTreeMap<i64, Option<Row>>) -> Vec<u8> {
        let s = freshet_common::changes::change_schema(def);
        let b = RecordBatch::try_new(
            s.clone(),
            vec![
                Arc::new(Int64Array::from(ch.keys().copied().collect::<Vec<_>>())),
                Arc::new(StringArray::from(
                    ch.values()
                        .map(|v| v.as_ref().and_then(|r| r.0.clone()))
                        .collect::<Vec<_>>(),
                )),
                Arc::new(Float64Array::from(
                    ch.values()
                        .map(|v| v.as_ref().map(|r| r.1).unwrap_or(0.0))
                        .collect::<Vec<_>>(),
                )),
                Arc::new(Int8Array::from(
                    ch.values()
                        .map(|v| if v.is_some() { 0 } else { 1 })
                        .collect::<Vec<_>>(),
                )),
            ],
        )
        .unwrap();
        freshet_common::ipc::encode(&s, &[b]).unwrap()
    }

    fn request(
        def: &TableDef,
        inputs: Vec<InputFile>,
        ch: &BTreeMap<i64, Option<Row>>,
    ) -> RewriteRequest {
        RewriteRequest {
            cycle_id: "c".into(),
            task_id: 1,
            attempt: 1,
            epoch: 1,
            table: Some(TableSpec {
                name: def.name.clone(),
                uri: def.uri.clone(),
                schema_ipc: freshet_common::ipc::encode_schema(&def.schema).unwrap(),
                primary_key: def.primary_key.clone(),
                partition_columns: vec![],
            }),
            inputs,
            partition_values: Default::default(),
            changes_ipc: change_batch(def, ch),
            target_file_size: def.target_file_size,
            mode: Default::default(),
        }
    }

    async fn read_rows(
        store: &Arc<dyn ObjectStore>,
        path: &str,
    ) -> (Vec<(i64, Row)>, Arc<ParquetMetaData>, Bytes) {
        let bytes = freshet_common::storage::read_existing(store, &Path::from(path))
            .await
            .unwrap();
        let b = ParquetRecordBatchReaderBuilder::try_new(bytes.clone()).unwrap();
        let md = b.metadata().clone();
        let mut out = Vec::new();
        for batch in b.build().unwrap() {
            let batch = batch.unwrap();
            let ids = batch.column(0).as_primitive::<Int64Type>();
            let vs = batch.column(1).as_string::<i32>();
            let fs = batch
                .column(2)
                .as_primitive::<arrow::datatypes::Float64Type>();
            for i in 0..batch.num_rows() {
                let v = (!vs.is_null(i)).then(|| vs.value(i).to_string());
                out.push((ids.value(i), (v, fs.value(i))));
            }
        }
        (out, md, bytes)
    }

    /// Writes `base` as Freshet files (through the full path, from nothing).
    async fn write_base(
        store: &Arc<dyn ObjectStore>,
        def: &TableDef,
        base: &BTreeMap<i64, Row>,
        format: FileFormat,
    ) -> Vec<InputFile> {
        let ch: BTreeMap<i64, Option<Row>> =
            base.iter().map(|(k, v)| (*k, Some(v.clone()))).collect();
        let resp = rewrite_with(store, &request(def, vec![], &ch), "w", &opts(false, format))
            .await
            .unwrap();
        resp.files
            .iter()
            .map(|f| InputFile {
                path: f.path.clone(),
                size: f.size,
                deletion_vector: None,
                rewrite: false,
            })
            .collect()
    }

    fn row() -> impl Strategy<Value = Row> {
        (proptest::option::of("[a-z]{0,6}"), -1000i32..1000).prop_map(|(v, f)| (v, f as f64 / 8.0))
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]
        // The row-group path gives the rows of the full path and of a BTreeMap model, the
        // same stats and key range, and copies untouched row groups byte for byte.
        #[test]
        fn row_group_path_equals_full_path_and_model(
            base in proptest::collection::btree_map(0i64..300, row(), 1..150),
            ch in proptest::collection::btree_map(-20i64..330, proptest::option::of(row()), 0..25),
            group_rows in 3usize..20,
            two_files in any::<bool>(),
        ) {
            tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
                let f = FileFormat::with_row_group_rows(group_rows);
                let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
                // One file, or (small target) several files with disjoint ranges.
                let d = def(if two_files { 2_000 } else { 1 << 30 });
                let inputs = write_base(&store, &d, &base, f).await;
                let d = def(1 << 30);
                let req = request(&d, inputs.clone(), &ch);
                let changes = freshet_common::ipc::decode(&req.changes_ipc).unwrap().1;
                let changes = concat_batches(&freshet_common::changes::change_schema(&d), &changes).unwrap();
                prop_assert!(try_rewrite(&store, &d, &req, &changes, f).await.unwrap().is_some(), "row-group path taken");
                let fast = rewrite_with(&store, &req, "w", &opts(true, f)).await.unwrap();
                let full = rewrite_with(&store, &req, "w", &opts(false, f)).await.unwrap();

                let mut model = base.clone();
                for (k, v) in &ch {
                    match v { Some(v) => { model.insert(*k, v.clone()); } None => { model.remove(k); } }
                }
                let model: Vec<(i64, Row)> = model.into_iter().collect();
                let mut got = Vec::new();
                for f in &fast.files { got.extend(read_rows(&store, &f.path).await.0); }
                prop_assert_eq!(&got, &model);
                let mut want = Vec::new();
                for f in &full.files { want.extend(read_rows(&store, &f.path).await.0); }
                prop_assert_eq!(&want, &model);
                prop_assert_eq!((fast.rows_inserted, fast.rows_updated, fast.rows_deleted, fast.rows_written),
                    (full.rows_inserted, full.rows_updated, full.rows_deleted, full.rows_written));
                prop_assert_eq!(fast.files.len(), full.files.len());
                for (a, b) in fast.files.iter().zip(&full.files) {
                    let sa: serde_json::Value = serde_json::from_str(&a.stats_json).unwrap();
                    let sb: serde_json::Value = serde_json::from_str(&b.stats_json).unwrap();
                    prop_assert_eq!(sa, sb);
                    prop_assert_eq!(&a.min_key_json, &b.min_key_json);
                    prop_assert_eq!(&a.max_key_json, &b.max_key_json);
                }

                // Untouched input row groups reappear byte for byte.
                let mut out_chunks: Vec<Vec<u8>> = Vec::new();
                for f in &fast.files {
                    let (_, md, bytes) = read_rows(&store, &f.path).await;
                    for rg in md.row_groups() {
                        for c in rg.columns() {
                            let (s, l) = c.byte_range();
                            out_chunks.push(bytes.slice(s as usize..(s + l) as usize).to_vec());
                        }
                    }
                }
                let mut untouched = 0;
                for input in &inputs {
                    let (_, md, bytes) = read_rows(&store, &input.path).await;
                    let fs = d.file_schema();
                    let ids = StatisticsConverter::try_new("id", &fs, md.file_metadata().schema_descr()).unwrap();
                    let mins = as_i64(&ids.row_group_mins(md.row_groups()).unwrap()).unwrap();
                    let maxs = as_i64(&ids.row_group_maxes(md.row_groups()).unwrap()).unwrap();
                    for (g, rg) in md.row_groups().iter().enumerate() {
                        let (lo, hi) = (mins[g].unwrap(), maxs[g].unwrap());
                        // Untouched: no change inside its range, and no upsert in the gap
                        // after it (gap upserts join the group before them).
                        let next_min = model_next_min(&base, hi);
                        let touched = ch.iter().any(|(k, v)| (lo..=hi).contains(k)
                            || (v.is_some() && *k > hi && next_min.is_none_or(|n| *k < n))
                            || (v.is_some() && g == 0 && *k < lo && input.path == inputs[0].path));
                        if touched { continue }
                        untouched += 1;
                        for c in rg.columns() {
                            let (s, l) = c.byte_range();
                            let src = bytes.slice(s as usize..(s + l) as usize).to_vec();
                            prop_assert!(out_chunks.contains(&src), "untouched row group {} not copied byte for byte", g);
                        }
                    }
                }
                let _ = untouched;
                Ok(())
            })?;
        }
    }

    /// The smallest base key above `k`, if any.
    fn model_next_min(base: &BTreeMap<i64, Row>, k: i64) -> Option<i64> {
        base.range(k + 1..).next().map(|(k, _)| *k)
    }

    #[tokio::test]
    async fn a_recent_batch_copies_the_older_row_groups_and_deletes_can_empty_a_group() {
        let f = FileFormat::with_row_group_rows(10);
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let d = def(1 << 30);
        let base: BTreeMap<i64, Row> = (0..100)
            .map(|k| (k, (Some(format!("v{k}")), k as f64)))
            .collect();
        let inputs = write_base(&store, &d, &base, f).await;
        // Delete the whole group 40..=49, update 95, insert 100..105 after the end.
        let mut ch: BTreeMap<i64, Option<Row>> = (40..50).map(|k| (k, None)).collect();
        ch.insert(95, Some((None, -1.0)));
        for k in 100..105 {
            ch.insert(k, Some((Some("new".into()), 0.5)));
        }
        let req = request(&d, inputs, &ch);
        let schema = d.file_schema();
        let changes = freshet_common::ipc::decode(&req.changes_ipc).unwrap().1;
        let changes =
            concat_batches(&freshet_common::changes::change_schema(&d), &changes).unwrap();
        let done = try_rewrite(&store, &d, &req, &changes, f)
            .await
            .unwrap()
            .expect("row-group path");
        assert_eq!(done.groups_copied, 8, "groups 0-3 and 5-8 copied");
        assert_eq!(done.counts.deleted, 10);
        assert_eq!(done.counts.updated, 1);
        assert_eq!(done.counts.inserted, 5);
        assert_eq!(done.files.len(), 1);
        let (rows, md, _) = read_rows(&store, &done.files[0].path).await;
        assert_eq!(rows.len(), 95);
        assert!(rows.windows(2).all(|w| w[0].0 < w[1].0), "sorted");
        assert!(
            md.row_groups()
                .iter()
                .all(|rg| rg.sorting_columns().is_some())
        );
        let _ = schema;
        // Only the copied groups' bytes and the touched group were read, not the whole file.
        assert_eq!(done.files[0].min_key_json, r#"["0"]"#);
        assert_eq!(done.files[0].max_key_json, r#"["104"]"#);
    }

    /// Rows of a table with list columns: (id, tags, nums) with tags/nums as text.
    async fn read_list_rows(store: &Arc<dyn ObjectStore>, path: &str) -> Vec<String> {
        let bytes = freshet_common::storage::read_existing(store, &Path::from(path))
            .await
            .unwrap();
        let mut out = Vec::new();
        for b in ParquetRecordBatchReaderBuilder::try_new(bytes)
            .unwrap()
            .build()
            .unwrap()
        {
            let b = b.unwrap();
            let fmt = arrow::util::display::FormatOptions::default().with_null("null");
            let cols: Vec<_> = b
                .columns()
                .iter()
                .map(|c| arrow::util::display::ArrayFormatter::try_new(c, &fmt).unwrap())
                .collect();
            for i in 0..b.num_rows() {
                out.push(
                    cols.iter()
                        .map(|c| c.value(i).to_string())
                        .collect::<Vec<_>>()
                        .join("|"),
                );
            }
        }
        out
    }

    #[tokio::test]
    async fn list_columns_take_the_row_group_path_and_match_the_full_path() {
        use arrow::array::{ListBuilder, StringBuilder};
        use freshet_common::schema::list_of;
        let f = FileFormat::with_row_group_rows(10);
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        // A list column before the key: leaf and field indexes agree only by construction.
        let schema = Arc::new(Schema::new(vec![
            Field::new("tags", list_of(DataType::Utf8), true),
            Field::new("id", DataType::Int64, false),
            Field::new("nums", list_of(DataType::Int32), true),
        ]));
        let d = TableDef::new(
            "t",
            "memory:///t",
            schema,
            vec!["id".into()],
            vec![],
            1 << 30,
        )
        .unwrap();
        let changes =
            |ids: Vec<i64>, ops: Vec<i8>| {
                let mut tags = ListBuilder::new(StringBuilder::new())
                    .with_field(Arc::new(Field::new("element", DataType::Utf8, true)));
                let mut nums = ListBuilder::new(arrow::array::Int32Builder::new())
                    .with_field(Arc::new(Field::new("element", DataType::Int32, true)));
                for &k in &ids {
                    match k % 3 {
                        0 => {
                            tags.append_null();
                            nums.append(true);
                        }
                        1 => {
                            tags.append_value([Some(format!("a{k}")), None]);
                            nums.append_value([Some(k as i32), None, Some(-1)]);
                        }
                        _ => {
                            tags.append_value([Some("x,\"y\"".to_string())]);
                            nums.append_null();
                        }
                    }
                }
                let s = freshet_common::changes::change_schema(&d);
                let b = RecordBatch::try_new(
                    s.clone(),
                    vec![
                        Arc::new(tags.finish()),
                        Arc::new(Int64Array::from(ids)),
                        Arc::new(nums.finish()),
                        Arc::new(Int8Array::from(ops)),
                    ],
                )
                .unwrap();
                freshet_common::ipc::encode(&s, &[b]).unwrap()
            };
        let req = |inputs: Vec<InputFile>, ipc: Vec<u8>| RewriteRequest {
            cycle_id: "c".into(),
            task_id: 1,
            attempt: 1,
            epoch: 1,
            table: Some(TableSpec {
                name: d.name.clone(),
                uri: d.uri.clone(),
                schema_ipc: freshet_common::ipc::encode_schema(&d.schema).unwrap(),
                primary_key: d.primary_key.clone(),
                partition_columns: vec![],
            }),
            inputs,
            partition_values: Default::default(),
            changes_ipc: ipc,
            target_file_size: d.target_file_size,
            mode: Default::default(),
        };
        let ids: Vec<i64> = (0..100).collect();
        let base = rewrite_with(
            &store,
            &req(vec![], changes(ids, vec![0; 100])),
            "w",
            &opts(false, f),
        )
        .await
        .unwrap();
        let inputs: Vec<InputFile> = base
            .files
            .iter()
            .map(|f| InputFile {
                path: f.path.clone(),
                size: f.size,
                deletion_vector: None,
                rewrite: false,
            })
            .collect();
        // Update 41 and 95, delete 42, insert 120.
        let r = req(inputs, changes(vec![41, 42, 95, 120], vec![0, 1, 0, 0]));
        let batches = freshet_common::ipc::decode(&r.changes_ipc).unwrap().1;
        let ch = concat_batches(&freshet_common::changes::change_schema(&d), &batches).unwrap();
        let done = try_rewrite(&store, &d, &r, &ch, f)
            .await
            .unwrap()
            .expect("row-group path taken with list columns");
        assert_eq!(done.groups_copied, 8);
        assert_eq!(
            (
                done.counts.updated,
                done.counts.deleted,
                done.counts.inserted
            ),
            (2, 1, 1)
        );
        let fast = rewrite_with(&store, &r, "w", &opts(true, f)).await.unwrap();
        let full = rewrite_with(&store, &r, "w", &opts(false, f))
            .await
            .unwrap();
        assert_eq!(fast.files.len(), 1);
        assert_eq!(
            read_list_rows(&store, &fast.files[0].path).await,
            read_list_rows(&store, &full.files[0].path).await
        );
        let rows = read_list_rows(&store, &fast.files[0].path).await;
        assert_eq!(rows.len(), 100);
        assert_eq!(rows[1], r#"[a1, null]|1|[1, null, -1]"#);
        assert_eq!(rows[2], r#"[x,"y"]|2|null"#);
        let sa: serde_json::Value = serde_json::from_str(&fast.files[0].stats_json).unwrap();
        let sb: serde_json::Value = serde_json::from_str(&full.files[0].stats_json).unwrap();
        assert_eq!(sa, sb);
        assert!(sa["nullCount"].get("tags").is_none(), "{sa}");
        assert!(sa["minValues"].get("nums").is_none(), "{sa}");
        assert_eq!(sa["minValues"]["id"], 0);
        assert_eq!(sa["maxValues"]["id"], 120);
    }

    #[tokio::test]
    async fn files_that_do_not_declare_their_order_take_the_full_path() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let d = def(1 << 30);
        // A foreign file: unsorted, no sorting_columns, default (truncating) statistics.
        let b = RecordBatch::try_new(
            d.file_schema(),
            vec![
                Arc::new(Int64Array::from(vec![5, 1, 3])),
                Arc::new(StringArray::from(vec![Some("e"), Some("a"), None])),
                Arc::new(Float64Array::from(vec![5.0, 1.0, 3.0])),
            ],
        )
        .unwrap();
        let mut buf = Vec::new();
        let mut w = ArrowWriter::try_new(&mut buf, d.file_schema(), None).unwrap();
        w.write(&b).unwrap();
        w.close().unwrap();
        let size = buf.len() as u64;
        store
            .put(&Path::from("foreign.parquet"), PutPayload::from(buf))
            .await
            .unwrap();
        let ch = BTreeMap::from([
            (3, Some((Some("c".to_string()), 3.5))),
            (2, Some((None, 2.0))),
        ]);
        let req = request(
            &d,
            vec![InputFile {
                path: "foreign.parquet".into(),
                size,
                deletion_vector: None,
                rewrite: false,
            }],
            &ch,
        );
        let changes = freshet_common::ipc::decode(&req.changes_ipc).unwrap().1;
        let changes =
            concat_batches(&freshet_common::changes::change_schema(&d), &changes).unwrap();
        assert!(
            try_rewrite(&store, &d, &req, &changes, FileFormat::default())
                .await
                .unwrap()
                .is_none()
        );
        let resp = crate::rewrite::rewrite(&store, &req, "w").await.unwrap();
        let (rows, _, _) = read_rows(&store, &resp.files[0].path).await;
        assert_eq!(
            rows.iter().map(|r| r.0).collect::<Vec<_>>(),
            vec![1, 2, 3, 5]
        );
    }
}
