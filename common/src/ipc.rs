//! Arrow IPC encoding helpers (staging segments, task payloads, ingest batches).

use arrow::datatypes::{Schema, SchemaRef};
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::{IpcWriteOptions, StreamWriter};
use arrow::record_batch::RecordBatch;

use crate::error::{Error, Result};

/// Encodes batches as one Arrow IPC stream (LZ4-compressed bodies).
pub fn encode(schema: &Schema, batches: &[RecordBatch]) -> Result<Vec<u8>> {
    let opts = IpcWriteOptions::default()
        .try_with_compression(Some(arrow::ipc::CompressionType::LZ4_FRAME))
        .map_err(|e| Error::data("ipc options", e))?;
    let mut buf = Vec::new();
    {
        let mut w = StreamWriter::try_new_with_options(&mut buf, schema, opts)
            .map_err(|e| Error::data("encoding arrow ipc", e))?;
        for b in batches {
            w.write(b)
                .map_err(|e| Error::data("encoding arrow ipc", e))?;
        }
        w.finish()
            .map_err(|e| Error::data("encoding arrow ipc", e))?;
    }
    Ok(buf)
}

/// Decodes an Arrow IPC stream into its schema and batches.
pub fn decode(
    bytes: &[u8],
) -> std::result::Result<(SchemaRef, Vec<RecordBatch>), arrow::error::ArrowError> {
    let reader = StreamReader::try_new(std::io::Cursor::new(bytes), None)?;
    let schema = reader.schema();
    let batches = reader.collect::<std::result::Result<Vec<_>, _>>()?;
    Ok((schema, batches))
}

/// Encodes a schema alone (an IPC stream with no batches).
pub fn encode_schema(schema: &Schema) -> Result<Vec<u8>> {
    encode(schema, &[])
}

/// Decodes a schema written by [`encode_schema`].
pub fn decode_schema(bytes: &[u8]) -> Result<SchemaRef> {
    decode(bytes)
        .map(|(s, _)| s)
        .map_err(|e| Error::data("decoding arrow schema", e))
}
