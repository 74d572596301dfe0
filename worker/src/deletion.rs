//! Deletion-vector mode: the inputs stay in place. Only their key columns are read; every
//! live row whose key a change names is marked deleted in the input's deletion vector (its
//! old one plus the new rows, written to one DV file per task), and the upserted rows go to
//! new key-sorted files. Rows that did not change are neither read in full nor rewritten,
//! so the task costs a key-column scan plus the changed rows, whatever the input size.
//!
//! Inputs flagged `rewrite` (the group's small files, by the cost model's choice per file)
//! are instead read whole and merged with the changes into the new files, so a group does
//! not gather a small file per cycle: it stays at its large files plus one small one.
//!
//! The coordinator sends every file whose key range covers a changed key (the file group,
//! see `coordinator::planner`), so each changed key's live row, if any, is among the rows
//! scanned here; finding a key live twice means the table broke the one-live-row
//! invariant, and the task fails rather than guess which row is right.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{ArrayRef, AsArray};
use arrow::compute::cast;
use arrow::datatypes::Int8Type;
use arrow::record_batch::RecordBatch;
use arrow::row::{RowConverter, SortField};
use freshet_common::changes::{OP_COLUMN, OP_UPSERT};
use freshet_common::dv::{self, DvFileWriter};
use freshet_common::error::{Error, Result};
use freshet_common::merge::apply_changes;
use freshet_common::table::TableDef;
use freshet_proto::worker::v1::{InputDeletions, RewriteRequest};
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use parquet::arrow::ProjectionMask;
use parquet::arrow::async_reader::{AsyncFileReader, ParquetRecordBatchStreamBuilder};
use roaring::RoaringTreemap;

use crate::format::{FileFormat, READ_BATCH_ROWS};
use crate::output::Outcome;

/// Runs a deletion-vector task (the request has inputs).
pub async fn rewrite(
    store: &Arc<dyn ObjectStore>,
    def: &TableDef,
    req: &RewriteRequest,
    changes: &RecordBatch,
    format: FileFormat,
) -> Result<Outcome> {
    let local_key = def.local_key();
    let key_types = def.local_key_types();
    let converter = RowConverter::new(
        key_types
            .iter()
            .map(|t| SortField::new(t.clone()))
            .collect(),
    )
    .map_err(|e| Error::data("key rows", e))?;
    let change_keys = converter
        .convert_columns(
            &local_key
                .iter()
                .map(|k| changes.column_by_name(k).expect("key column").clone())
                .collect::<Vec<_>>(),
        )
        .map_err(|e| Error::data("key rows", e))?;
    let index: HashMap<&[u8], usize> = (0..changes.num_rows())
        .map(|i| (change_keys.row(i).data(), i))
        .collect();
    let ops = changes
        .column_by_name(OP_COLUMN)
        .expect("op column")
        .as_primitive::<Int8Type>();
    // Where each changed key's live row was found (input, row), if anywhere.
    let mut found: Vec<Option<usize>> = vec![None; changes.num_rows()];
    let mut done = Outcome::default();
    let mut dvs = DvFileWriter::new();
    let mut deletions = Vec::new();

    for (n, input) in req.inputs.iter().enumerate() {
        if input.rewrite {
            continue;
        }
        let context = format!("table '{}', file {}", def.name, input.path);
        let old = match &input.deletion_vector {
            Some(d) => dv::read(store, &dv::from_proto(d, &context)?, &context).await?,
            None => RoaringTreemap::new(),
        };
        let mut deleted = RoaringTreemap::new();
        let (batches, bytes) = read_keys(store, def, &input.path, &local_key).await?;
        done.bytes_read += bytes;
        let mut row: u64 = 0;
        for b in batches {
            let arrays = local_key
                .iter()
                .zip(&key_types)
                .map(|(k, t)| {
                    let c = b
                        .column_by_name(k)
                        .ok_or_else(|| Error::data(&context, format!("no key column '{k}'")))?;
                    if c.data_type() == t {
                        Ok(c.clone())
                    } else {
                        cast(c, t).map_err(|e| Error::data(&context, e))
                    }
                })
                .collect::<Result<Vec<ArrayRef>>>()?;
            let rows = converter
                .convert_columns(&arrays)
                .map_err(|e| Error::data(&context, e))?;
            for r in 0..b.num_rows() {
                let at = row + r as u64;
                if old.contains(at) {
                    continue;
                }
                done.counts.rows_read += 1;
                if let Some(&i) = index.get(rows.row(r).data()) {
                    if let Some(prev) = found[i] {
                        return Err(Error::InvalidTable {
                            table: def.name.clone(),
                            message: format!(
                                "a key is live twice, in {} and in {} (row {at}); the table breaks the one-live-row-per-key invariant",
                                req.inputs[prev].path, input.path
                            ),
                        });
                    }
                    found[i] = Some(n);
                    deleted.insert(at);
                }
            }
            row += b.num_rows() as u64;
        }
        if !deleted.is_empty() {
            let rows_deleted = deleted.len();
            let all = &old | &deleted;
            let descriptor = dvs.add(&all)?;
            deletions.push(InputDeletions {
                path: input.path.clone(),
                deletion_vector: Some(dv::to_proto(&descriptor)),
                rows_deleted,
            });
        }
    }
    // Keys whose live row is in a file left in place: upserts replace it (a new version in
    // the new files), deletes are done by the deletion vector.
    let (mut dv_updated, mut dv_deleted) = (0u64, 0u64);
    for (i, at) in found.iter().enumerate() {
        if at.is_some() {
            if ops.value(i) == OP_UPSERT {
                dv_updated += 1;
            } else {
                dv_deleted += 1;
            }
        }
    }
    if !deletions.is_empty() {
        let path = Path::from(dvs.relative_path().as_str());
        let bytes = dvs.into_bytes();
        done.bytes_written += bytes.len() as u64;
        store
            .put(&path, PutPayload::from(bytes))
            .await
            .map_err(|e| Error::store(&path, e))?;
        done.deletion_vector_file = path.to_string();
        done.deletions = deletions;
    }
    // The inputs to rewrite, merged with every change: a key found above is in none of
    // them, so its upsert comes out as a new row and its delete as nothing.
    let rewritten: Vec<&freshet_proto::worker::v1::InputFile> =
        req.inputs.iter().filter(|i| i.rewrite).collect();
    let (existing, bytes) = crate::rewrite::read_inputs(store, def, &rewritten).await?;
    done.bytes_read += bytes;
    let (merged, counts) = apply_changes(&def.file_schema(), &def.local_key(), &existing, changes)?;
    drop(existing);
    done.counts.rows_read += counts.rows_read;
    done.counts.updated = counts.updated + dv_updated;
    done.counts.deleted = counts.deleted + dv_deleted;
    done.counts.inserted = counts.inserted - dv_updated;
    if merged.num_rows() > 0 {
        let per_file = crate::rewrite::rows_per_file(def, format, &merged, &counts, bytes)?;
        crate::rewrite::write_split(store, def, req, format, &merged, per_file, &mut done).await?;
    }
    Ok(done)
}

/// Ranges of one object, fetched on demand and counted (the bytes a task really read).
struct RangeReader {
    store: Arc<dyn ObjectStore>,
    path: Path,
    size: u64,
    fetched: Arc<std::sync::atomic::AtomicU64>,
}

impl AsyncFileReader for RangeReader {
    fn get_bytes(
        &mut self,
        range: std::ops::Range<u64>,
    ) -> futures::future::BoxFuture<'_, parquet::errors::Result<bytes::Bytes>> {
        use futures::FutureExt;
        async move {
            let b = self
                .store
                .get_range(&self.path, range)
                .await
                .map_err(|e| parquet::errors::ParquetError::External(Box::new(e)))?;
            self.fetched
                .fetch_add(b.len() as u64, std::sync::atomic::Ordering::Relaxed);
            Ok(b)
        }
        .boxed()
    }

    fn get_metadata<'a>(
        &'a mut self,
        _options: Option<&'a parquet::arrow::arrow_reader::ArrowReaderOptions>,
    ) -> futures::future::BoxFuture<
        'a,
        parquet::errors::Result<Arc<parquet::file::metadata::ParquetMetaData>>,
    > {
        use futures::FutureExt;
        async move {
            let size = self.size;
            let md = parquet::file::metadata::ParquetMetaDataReader::new()
                .with_prefetch_hint(Some(64 * 1024))
                .load_and_finish(&mut *self, size)
                .await?;
            Ok(Arc::new(md))
        }
        .boxed()
    }
}

/// The key columns of a data file, and the bytes fetched (footer and key column chunks).
async fn read_keys(
    store: &Arc<dyn ObjectStore>,
    def: &TableDef,
    path: &str,
    key: &[String],
) -> Result<(Vec<RecordBatch>, u64)> {
    let context = || format!("table '{}', file {path}", def.name);
    let location = Path::from(path);
    let meta = store
        .head(&location)
        .await
        .map_err(|e| Error::store(&location, e))?;
    let fetched = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let reader = RangeReader {
        store: store.clone(),
        path: location,
        size: meta.size,
        fetched: fetched.clone(),
    };
    let builder = ParquetRecordBatchStreamBuilder::new(reader)
        .await
        .map_err(|e| Error::data(context(), e))?;
    let schema = builder.parquet_schema();
    let leaves: Vec<usize> = (0..schema.num_columns())
        .filter(|&i| key.iter().any(|k| schema.column(i).path().string() == *k))
        .collect();
    if leaves.len() != key.len() {
        return Err(Error::data(
            context(),
            format!("the file lacks a key column of ({})", key.join(", ")),
        ));
    }
    let mask = ProjectionMask::leaves(schema, leaves);
    let stream = builder
        .with_projection(mask)
        .with_batch_size(READ_BATCH_ROWS)
        .build()
        .map_err(|e| Error::data(context(), e))?;
    let batches: Vec<RecordBatch> = stream
        .try_collect()
        .await
        .map_err(|e| Error::data(context(), e))?;
    Ok((batches, fetched.load(std::sync::atomic::Ordering::Relaxed)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rewrite::rewrite;
    use arrow::array::{Array, Int8Array, Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Int64Type, Schema};
    use freshet_proto::worker::v1::{InputFile, MergeMode, OutputFile, RewriteResponse, TableSpec};
    use object_store::memory::InMemory;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    type Model = BTreeMap<i64, Option<String>>;

    fn def(target: u64) -> TableDef {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("v", DataType::Utf8, true),
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

    /// A change per key: `Some(v)` upserts, `None` deletes.
    fn request(
        def: &TableDef,
        inputs: Vec<InputFile>,
        ch: &BTreeMap<i64, Option<Option<String>>>,
        mode: MergeMode,
    ) -> RewriteRequest {
        let s = freshet_common::changes::change_schema(def);
        let b = RecordBatch::try_new(
            s.clone(),
            vec![
                Arc::new(Int64Array::from_iter_values(ch.keys().copied())),
                Arc::new(StringArray::from(
                    ch.values().map(|v| v.clone().flatten()).collect::<Vec<_>>(),
                )),
                Arc::new(Int8Array::from(
                    ch.values()
                        .map(|v| if v.is_some() { 0 } else { 1 })
                        .collect::<Vec<_>>(),
                )),
            ],
        )
        .unwrap();
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
            changes_ipc: freshet_common::ipc::encode(&s, &[b]).unwrap(),
            target_file_size: def.target_file_size,
            mode: mode as i32,
        }
    }

    /// The live rows of a file group: each file's rows minus its deletion vector.
    async fn live(store: &Arc<dyn ObjectStore>, files: &[InputFile]) -> Vec<(i64, Option<String>)> {
        let mut out = Vec::new();
        for f in files {
            let bytes = freshet_common::storage::read_existing(store, &Path::from(f.path.as_str()))
                .await
                .unwrap();
            let deleted = match &f.deletion_vector {
                Some(d) => dv::read(store, &dv::from_proto(d, "t").unwrap(), "t")
                    .await
                    .unwrap(),
                None => RoaringTreemap::new(),
            };
            let mut row = 0u64;
            for b in ParquetRecordBatchReaderBuilder::try_new(bytes)
                .unwrap()
                .build()
                .unwrap()
            {
                let b = b.unwrap();
                let ids = b.column(0).as_primitive::<Int64Type>();
                let vs = b.column(1).as_string::<i32>();
                for i in 0..b.num_rows() {
                    if !deleted.contains(row) {
                        out.push((
                            ids.value(i),
                            (!vs.is_null(i)).then(|| vs.value(i).to_string()),
                        ));
                    }
                    row += 1;
                }
            }
        }
        out.sort();
        out
    }

    /// The group after a task: inputs left in place with their new deletion vectors
    /// (copy-on-write and inputs flagged `rewrite` drop out), plus the outputs.
    fn group_after(
        inputs: &[InputFile],
        resp: &RewriteResponse,
        mode: MergeMode,
    ) -> Vec<InputFile> {
        let mut out: Vec<InputFile> = if mode == MergeMode::DeletionVectors {
            inputs
                .iter()
                .filter(|f| !f.rewrite)
                .map(|f| {
                    let mut f = f.clone();
                    if let Some(d) = resp.deletions.iter().find(|d| d.path == f.path) {
                        f.deletion_vector = d.deletion_vector.clone();
                    }
                    f
                })
                .collect()
        } else {
            Vec::new()
        };
        out.extend(resp.files.iter().map(|f: &OutputFile| InputFile {
            path: f.path.clone(),
            size: f.size,
            deletion_vector: None,
            rewrite: false,
        }));
        out
    }

    fn changes() -> impl Strategy<Value = BTreeMap<i64, Option<Option<String>>>> {
        proptest::collection::btree_map(
            -10i64..260,
            proptest::option::weighted(0.7, proptest::option::of("[a-z]{0,5}")),
            0..40,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 32, .. ProptestConfig::default() })]
        // Rounds of changes over a group, each round copy-on-write, deletion vectors on
        // every file, or per file at random (some files rewritten, others given DVs): the
        // group's live rows always equal a BTreeMap model, and the counts say what happened.
        #[test]
        fn deletion_vector_rounds_equal_the_model(
            base in proptest::collection::btree_map(0i64..250, proptest::option::of("[a-z]{0,5}"), 1..120),
            rounds in proptest::collection::vec((changes(), 0u8..3, any::<u64>()), 1..6),
            small_files in any::<bool>(),
        ) {
            tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
                let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
                let d = def(if small_files { 1024 } else { 1 << 30 });
                let ch: BTreeMap<i64, Option<Option<String>>> = base.iter().map(|(k, v)| (*k, Some(v.clone()))).collect();
                let resp = rewrite(&store, &request(&d, vec![], &ch, MergeMode::CopyOnWrite), "w").await.unwrap();
                let mut group = group_after(&[], &resp, MergeMode::CopyOnWrite);
                let mut model: Model = base.clone();
                for (ch, how, bits) in rounds {
                    // Copy-on-write; deletion vectors on every input; or per file at random.
                    let mode = if how == 0 { MergeMode::CopyOnWrite } else { MergeMode::DeletionVectors };
                    for (i, f) in group.iter_mut().enumerate() {
                        f.rewrite = how == 2 && (bits >> (i % 64)) & 1 == 1;
                    }
                    // Keys whose live row is in a file left in place: those a DV must mark.
                    let in_place: Vec<InputFile> = group.iter().filter(|f| !f.rewrite).cloned().collect();
                    let in_place: std::collections::BTreeSet<i64> = live(&store, &in_place).await.into_iter().map(|r| r.0).collect();
                    let resp = rewrite(&store, &request(&d, group.clone(), &ch, mode), "w").await.unwrap();
                    let (mut ins, mut upd, mut del) = (0, 0, 0);
                    for (k, c) in &ch {
                        match (c, model.contains_key(k)) {
                            (Some(v), true) => { upd += 1; model.insert(*k, v.clone()); }
                            (Some(v), false) => { ins += 1; model.insert(*k, v.clone()); }
                            (None, true) => { del += 1; model.remove(k); }
                            (None, false) => {}
                        }
                    }
                    prop_assert_eq!((resp.rows_inserted, resp.rows_updated, resp.rows_deleted), (ins, upd, del));
                    if mode == MergeMode::DeletionVectors {
                        // Deletions only on inputs left in place, one per changed key found there.
                        let marked: u64 = resp.deletions.iter().map(|d| d.rows_deleted).sum();
                        prop_assert_eq!(marked, ch.keys().filter(|k| in_place.contains(k)).count() as u64);
                        prop_assert!(resp.deletions.iter().all(|d| group.iter().any(|f| f.path == d.path && !f.rewrite)));
                        if group.iter().all(|f| !f.rewrite) {
                            prop_assert_eq!(resp.rows_written, ch.values().filter(|c| c.is_some()).count() as u64);
                        }
                    }
                    group = group_after(&group, &resp, mode);
                    let want: Vec<(i64, Option<String>)> = model.iter().map(|(k, v)| (*k, v.clone())).collect();
                    prop_assert_eq!(live(&store, &group).await, want);
                }
                Ok(())
            })?;
        }
    }

    #[tokio::test]
    async fn a_key_live_in_two_files_fails_the_task() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let d = def(1 << 30);
        let mut group = Vec::new();
        for v in ["a", "b"] {
            let ch = BTreeMap::from([(7, Some(Some(v.to_string())))]);
            let resp = rewrite(
                &store,
                &request(&d, vec![], &ch, MergeMode::CopyOnWrite),
                "w",
            )
            .await
            .unwrap();
            group.extend(group_after(&[], &resp, MergeMode::CopyOnWrite));
        }
        let ch = BTreeMap::from([(7, None)]);
        let e = rewrite(
            &store,
            &request(&d, group, &ch, MergeMode::DeletionVectors),
            "w",
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(e.contains("live twice"), "{e}");
    }
}
