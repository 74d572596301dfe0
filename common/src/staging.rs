//! The staging log: durable, sequenced batches of changes in the table's object store,
//! at `_freshet/staging/<first seq>-<last seq>.arrow` (Arrow IPC stream, [`staging_schema`]).
//! A segment holds one group commit (one or more batches); it is written with put-if-absent
//! and deleted once a Delta commit with a `txn` version at or above its last sequence exists.
//!
//! [`staging_schema`]: crate::changes::staging_schema

use std::sync::Arc;

use arrow::record_batch::RecordBatch;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use crate::error::{Error, Result};

/// Directory of staging segments, relative to the table root.
pub const STAGING_DIR: &str = "_freshet/staging";

/// Schema metadata key of a segment listing its producer marks (JSON).
pub const PRODUCERS_METADATA: &str = "freshet.producers";
/// Schema metadata key set ("true") on a segment that ends inside a source transaction
/// staged in chunks: the transaction's later chunks follow in later segments.
pub const OPEN_METADATA: &str = "freshet.open";

/// What a segment holds.
#[derive(Debug, Clone, Default)]
pub struct SegmentContents {
    /// Its batches (without the segment's metadata).
    pub batches: Vec<RecordBatch>,
    /// Its idempotent-ingest batches.
    pub marks: Vec<ProducerMark>,
    /// It ends inside a chunked transaction.
    pub open: bool,
}

/// An idempotent-ingest batch in a segment: its staging sequence and the producer's own.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProducerMark {
    /// The batch's staging sequence.
    pub sequence: u64,
    /// The producer's id.
    pub producer: String,
    /// The producer's sequence for the batch.
    pub producer_sequence: u64,
}

/// A segment as listed in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    /// First sequence in the segment.
    pub first: u64,
    /// Last sequence in the segment.
    pub last: u64,
    /// Path relative to the table root.
    pub path: Path,
    /// Size in bytes.
    pub size: u64,
}

/// The path of the segment holding sequences `first..=last`.
pub fn segment_path(first: u64, last: u64) -> Path {
    Path::from(format!("{STAGING_DIR}/{first:020}-{last:020}.arrow"))
}

/// Parses a segment file name into its sequence range.
pub fn parse_segment_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(".arrow")?;
    let (a, b) = stem.split_once('-')?;
    let (a, b) = (a.parse().ok()?, b.parse().ok()?);
    (a <= b).then_some((a, b))
}

/// Writes a segment; fails if one with that name but other contents exists (sequences
/// are never reused). One with the same contents is ours, from an attempt whose outcome
/// was unknown (a source re-sending what was staged): the write is done.
pub async fn write_segment(
    store: &Arc<dyn ObjectStore>,
    first: u64,
    last: u64,
    bytes: Vec<u8>,
) -> Result<Path> {
    let path = segment_path(first, last);
    let opts = PutOptions {
        mode: PutMode::Create,
        ..Default::default()
    };
    let payload = bytes::Bytes::from(bytes);
    match store
        .put_opts(&path, PutPayload::from(payload.clone()), opts)
        .await
    {
        Ok(_) => Ok(path),
        Err(e @ object_store::Error::AlreadyExists { .. }) => {
            if crate::storage::read_object(store, &path).await?.as_ref() == Some(&payload) {
                Ok(path)
            } else {
                Err(Error::store(&path, e))
            }
        }
        Err(e) => Err(Error::store(&path, e)),
    }
}

/// Reads a segment's batches.
pub async fn read_segment(store: &Arc<dyn ObjectStore>, path: &Path) -> Result<Vec<RecordBatch>> {
    Ok(read_segment_contents(store, path).await?.batches)
}

/// Reads a segment: its batches (without the segment's metadata), producer marks and
/// whether it ends inside a chunked transaction.
pub async fn read_segment_contents(
    store: &Arc<dyn ObjectStore>,
    path: &Path,
) -> Result<SegmentContents> {
    let bytes = crate::storage::read_existing(store, path).await?;
    let context = || format!("reading staging segment {path}");
    let (schema, batches) = crate::ipc::decode(&bytes).map_err(|e| Error::data(context(), e))?;
    let marks = match schema.metadata().get(PRODUCERS_METADATA) {
        Some(json) => serde_json::from_str(json).map_err(|e| Error::data(context(), e))?,
        None => Vec::new(),
    };
    let plain = Arc::new(arrow::datatypes::Schema::new(schema.fields().clone()));
    let batches = batches
        .into_iter()
        .map(|b| RecordBatch::try_new(plain.clone(), b.columns().to_vec()))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::data(context(), e))?;
    let open = schema
        .metadata()
        .get(OPEN_METADATA)
        .is_some_and(|v| v == "true");
    Ok(SegmentContents {
        batches,
        marks,
        open,
    })
}

/// The staging sequence of a staged batch (every row of one batch has the same).
pub fn batch_sequence(b: &RecordBatch) -> Option<u64> {
    use arrow::array::AsArray;
    let col = b.column_by_name(crate::changes::SEQ_COLUMN)?;
    let seqs = col.as_primitive_opt::<arrow::datatypes::UInt64Type>()?;
    (!seqs.is_empty()).then(|| seqs.value(0))
}

/// Lists the segments, in sequence order.
pub async fn list_segments(store: &Arc<dyn ObjectStore>) -> Result<Vec<SegmentInfo>> {
    let prefix = Path::from(STAGING_DIR);
    let metas: Vec<_> = store
        .list(Some(&prefix))
        .try_collect()
        .await
        .map_err(|e| Error::store(&prefix, e))?;
    let mut out: Vec<SegmentInfo> = metas
        .into_iter()
        .filter_map(|m| {
            let (first, last) = parse_segment_name(m.location.filename()?)?;
            Some(SegmentInfo {
                first,
                last,
                path: m.location,
                size: m.size,
            })
        })
        .collect();
    out.sort_by_key(|s| s.first);
    Ok(out)
}

/// Deletes a segment (missing is fine: deletion is idempotent).
pub async fn delete_segment(store: &Arc<dyn ObjectStore>, path: &Path) -> Result<()> {
    match store.delete(path).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(Error::store(path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_round_trip() {
        let p = segment_path(7, 12);
        assert_eq!(parse_segment_name(p.filename().unwrap()), Some((7, 12)));
        assert_eq!(parse_segment_name("junk.arrow"), None);
        assert_eq!(
            parse_segment_name("00000000000000000009-00000000000000000003.arrow"),
            None
        );
    }

    #[tokio::test]
    async fn segments_are_put_if_absent() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ObjectStore> =
            Arc::new(object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap());
        write_segment(&store, 1, 2, b"a".to_vec()).await.unwrap();
        assert!(write_segment(&store, 1, 2, b"b".to_vec()).await.is_err());
        let listed = list_segments(&store).await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!((listed[0].first, listed[0].last), (1, 2));
        delete_segment(&store, &listed[0].path).await.unwrap();
        delete_segment(&store, &listed[0].path).await.unwrap();
        assert!(list_segments(&store).await.unwrap().is_empty());
    }
}
