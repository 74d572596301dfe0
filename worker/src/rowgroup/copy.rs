//! Fetching an input row group's bytes, and copying an untouched one into the output file
//! byte for byte: its encoded column chunks, page indexes and statistics.

use std::sync::Arc;

use bytes::{Buf, Bytes};
use freshet_common::error::{Error, Result};
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::column::writer::ColumnCloseResult;
use parquet::errors::ParquetError;
use parquet::file::page_index::column_index::ColumnIndexMetaData;
use parquet::file::reader::{ChunkReader, Length};

use super::plan::{Group, Input};
use super::writer::Output;

/// The bytes of one row group (a contiguous range of the file), readable as the file.
pub(super) struct RangeBytes {
    start: u64,
    pub data: Bytes,
    file_len: u64,
}

impl Length for RangeBytes {
    fn len(&self) -> u64 {
        self.file_len
    }
}

impl RangeBytes {
    fn offset(&self, start: u64, length: usize) -> parquet::errors::Result<usize> {
        let off = start
            .checked_sub(self.start)
            .map(|o| o as usize)
            .filter(|o| o + length <= self.data.len())
            .ok_or_else(|| {
                ParquetError::General(format!(
                    "read of {length} bytes at {start} outside the fetched range {}+{}",
                    self.start,
                    self.data.len()
                ))
            })?;
        Ok(off)
    }
}

impl ChunkReader for RangeBytes {
    type T = bytes::buf::Reader<Bytes>;

    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        let off = self.offset(start, 0)?;
        Ok(self.data.slice(off..).reader())
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<Bytes> {
        let off = self.offset(start, length)?;
        Ok(self.data.slice(off..off + length))
    }
}

/// Reads the bytes of row group `g` (all its column chunks, one ranged get).
pub(super) async fn fetch(
    store: &Arc<dyn ObjectStore>,
    input: &Input,
    g: &Group,
) -> Result<RangeBytes> {
    let rg = input.meta.metadata().row_group(g.index);
    let (start, end) = rg
        .columns()
        .iter()
        .map(|c| {
            let (s, l) = c.byte_range();
            (s, s + l)
        })
        .fold((u64::MAX, 0), |(a, b), (s, e)| (a.min(s), b.max(e)));
    let data = store
        .get_range(&input.path, start..end)
        .await
        .map_err(|e| Error::store(&input.path, e))?;
    Ok(RangeBytes {
        start,
        data,
        file_len: input.size.max(end),
    })
}

/// Appends untouched row group `g` to the output as it is encoded, after the rows merged
/// so far (in key order).
pub(super) async fn copy_group(
    out: &mut Output<'_>,
    input: &Input,
    g: &Group,
    chunk: &RangeBytes,
) -> Result<()> {
    out.flush_pending(true)?;
    out.maybe_roll().await?;
    let md = input.meta.metadata();
    let rg = md.row_group(g.index);
    let f = out.file()?;
    let pe = |e| Error::data("row group copy", e);
    let mut w = f.writer.next_row_group().map_err(pe)?;
    for (c, col) in rg.columns().iter().enumerate() {
        let close = ColumnCloseResult {
            bytes_written: col.compressed_size() as u64,
            rows_written: rg.num_rows() as u64,
            metadata: col.clone(),
            bloom_filter: None,
            column_index: md
                .column_index()
                .map(|ci| ci[g.index][c].clone())
                .filter(|ci| !matches!(ci, ColumnIndexMetaData::NONE)),
            offset_index: md.offset_index().map(|oi| oi[g.index][c].clone()),
        };
        w.append_column(chunk, close).map_err(pe)?;
    }
    w.close().map_err(pe)?;
    out.done.groups_copied += 1;
    Ok(())
}
