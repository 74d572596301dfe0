//! Arrow IPC encoding helpers (staging segments, task payloads, ingest batches), and a
//! bounded decoder for streams from untrusted peers.

use std::fmt;

use arrow::datatypes::{Schema, SchemaRef};
use arrow::ipc as fb;
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

/// Decodes an Arrow IPC stream into its schema and batches. Trusted input only (our own
/// staging segments): untrusted streams go through [`decode_bounded`].
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

/// Decodes the schema of a stream written by [`encode_schema`] (any batches after it are
/// not read). Safe on untrusted input: its first message is checked to lie within `bytes`.
pub fn decode_schema(bytes: &[u8]) -> Result<SchemaRef> {
    let ctx = "decoding arrow schema";
    // arrow sizes its reads by the declared lengths; a forged one must not become an allocation.
    next_message(bytes, &mut 0, 1).map_err(|e| Error::data(ctx, e))?;
    unwind_to_invalid(|| StreamReader::try_new(std::io::Cursor::new(bytes), None))
        .map_err(|e| Error::data(ctx, e))?
        .map(|r| r.schema())
        .map_err(|e| Error::data(ctx, e))
}

/// What a decoded array or record batch costs beyond its buffers (array structs, `Arc`s,
/// vectors), charged so that streams of many tiny arrays cannot amplify their size.
pub const OVERHEAD_BYTES_PER_ARRAY: u64 = 128;

/// Messages [`DecodeLimits::new`] accepts: far more than a writer produces for one batch.
pub const DEFAULT_MAX_MESSAGES: usize = 1 << 16;

const CONTINUATION_MARKER: u32 = 0xFFFF_FFFF;
/// The Arrow IPC compression format's length prefix: "the buffer is stored uncompressed".
const PREFIX_UNCOMPRESSED: i64 = -1;
const PREFIX_LEN: usize = 8;

/// Bounds for decoding a stream from an untrusted peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Most bytes all buffers may take once decoded (decompressed), plus
    /// [`OVERHEAD_BYTES_PER_ARRAY`] per array and per batch.
    pub max_decoded_bytes: usize,
    /// Most rows over all record batches.
    pub max_rows: usize,
    /// Most messages (schema, dictionary batches, record batches).
    pub max_messages: usize,
}

impl DecodeLimits {
    /// Limits of `max_decoded_bytes` and `max_rows`, and [`DEFAULT_MAX_MESSAGES`].
    pub fn new(max_decoded_bytes: usize, max_rows: usize) -> Self {
        DecodeLimits {
            max_decoded_bytes,
            max_rows,
            max_messages: DEFAULT_MAX_MESSAGES,
        }
    }
}

/// The bound a stream exceeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exceeded {
    /// [`DecodeLimits::max_decoded_bytes`].
    DecodedBytes,
    /// [`DecodeLimits::max_rows`].
    Rows,
    /// [`DecodeLimits::max_messages`].
    Messages,
}

/// Why [`decode_bounded`] refused a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The stream declares more than a bound allows; refused before anything was
    /// decompressed or allocated for it.
    OverLimit {
        /// The bound.
        what: Exceeded,
        /// What the stream declares (for messages: the count when it was refused).
        declared: u64,
        /// The bound's value.
        limit: u64,
    },
    /// The stream is malformed, or a compressed buffer decompresses to another length than
    /// its prefix declares.
    Invalid(String),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::OverLimit {
                what: Exceeded::DecodedBytes,
                declared,
                limit,
            } => write!(
                f,
                "declares {declared} bytes once decoded (its buffers plus \
                 {OVERHEAD_BYTES_PER_ARRAY} per array and batch), limit {limit}"
            ),
            DecodeError::OverLimit {
                what: Exceeded::Rows,
                declared,
                limit,
            } => write!(f, "declares {declared} rows, limit {limit}"),
            DecodeError::OverLimit {
                what: Exceeded::Messages,
                limit,
                ..
            } => write!(f, "has more than {limit} Arrow IPC messages"),
            DecodeError::Invalid(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for DecodeError {}

fn invalid(message: impl Into<String>) -> DecodeError {
    DecodeError::Invalid(message.into())
}

/// Decodes an Arrow IPC stream from an untrusted peer within `limits`.
///
/// Before arrow's reader sees the bytes, every message is walked: metadata and body
/// lengths must lie within `bytes`, every buffer within its body, and the decoded sizes the
/// buffers declare (for compressed bodies, each buffer's 8-byte uncompressed-length prefix)
/// must sum to at most the limit, dictionary batches included. LZ4 buffers are then checked
/// to decompress to exactly their declared length by counting their sequences, since arrow
/// 59 trusts the prefix (it decompresses LZ4 to the end whatever the prefix says; its ZSTD
/// path stops at the declared length by itself). Only then is the stream decoded, so arrow
/// allocates no more than was declared.
pub fn decode_bounded(
    bytes: &[u8],
    limits: &DecodeLimits,
) -> std::result::Result<(SchemaRef, Vec<RecordBatch>), DecodeError> {
    check(bytes, limits)?;
    unwind_to_invalid(|| decode(bytes))?.map_err(|e| invalid(e.to_string()))
}

/// Runs arrow's reader, turning a panic into a refusal: arrow 59 panics on some malformed
/// streams (an unknown type id, a validity bitmap shorter than its array), and a malformed
/// request deserves an answer, not a dropped connection.
fn unwind_to_invalid<T>(f: impl FnOnce() -> T) -> std::result::Result<T, DecodeError> {
    quiet_panics_while_decoding();
    DECODING.with(|d| d.set(true));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    DECODING.with(|d| d.set(false));
    r.map_err(|p| {
        let what = p
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| p.downcast_ref::<&str>().copied())
            .unwrap_or("arrow's reader panicked");
        invalid(format!("malformed stream: {what}"))
    })
}

thread_local! {
    /// Set while arrow's reader runs under [`unwind_to_invalid`].
    static DECODING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Installs (once) a panic hook that stays silent for panics of arrow's reader inside
/// [`unwind_to_invalid`]: they become a refusal, and printing them (with a backtrace, when
/// `RUST_BACKTRACE` is set) would cost tens of megabytes and log noise per malformed
/// request. Every other panic goes to the previous hook.
fn quiet_panics_while_decoding() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !DECODING.with(|d| d.get()) {
                previous(info);
            }
        }));
    });
}

/// What a stream declares.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Declared {
    decoded_bytes: u64,
    rows: u64,
}

/// Checks a stream against `limits` without decompressing or allocating its contents.
fn check(bytes: &[u8], limits: &DecodeLimits) -> std::result::Result<Declared, DecodeError> {
    let mut d = Declared::default();
    // Bits per element is the least any materialised array costs (a validity bitmap), so no
    // array may declare more elements than the byte budget has bits.
    let max_elements = (limits.max_decoded_bytes as u64).saturating_mul(8);
    for_each_batch(
        bytes,
        limits.max_messages,
        |at, batch, is_dictionary, body| {
            let rows = non_negative(batch.length(), || format!("{at}: row count"))?;
            if !is_dictionary {
                d.rows = d.rows.saturating_add(rows);
            }
            let nodes = batch.nodes().map(|n| n.len()).unwrap_or(0) as u64;
            for (i, node) in batch.nodes().into_iter().flatten().enumerate() {
                let len = non_negative(node.length(), || format!("{at}: array {i} length"))?;
                non_negative(node.null_count(), || format!("{at}: array {i} null count"))?;
                if len > max_elements {
                    return Err(invalid(format!(
                        "{at}: array {i} declares {len} elements, more than the {max_elements} \
                     a {}-byte limit can hold",
                        limits.max_decoded_bytes
                    )));
                }
            }
            let buffers = batch.buffers().map(|b| b.len()).unwrap_or(0) as u64;
            let mut variadic = 0u64;
            for c in batch.variadicBufferCounts().into_iter().flatten() {
                variadic = variadic
                    .saturating_add(non_negative(c, || format!("{at}: variadic buffer count"))?);
            }
            if variadic > buffers {
                return Err(invalid(format!(
                    "{at}: declares {variadic} variadic buffers but has {buffers} buffers"
                )));
            }
            d.decoded_bytes = d
                .decoded_bytes
                .saturating_add((nodes + 1).saturating_mul(OVERHEAD_BYTES_PER_ARRAY));
            let codec = codec(&batch, at)?;
            for (i, data) in buffer_slices(&batch, body, at)? {
                let decoded = match codec {
                    None => data.len() as u64,
                    Some(_) => match prefix(data, at, i)? {
                        Prefix::Empty => 0,
                        Prefix::Stored(stored) => stored.len() as u64,
                        Prefix::Compressed(len, _) => len,
                    },
                };
                d.decoded_bytes = d.decoded_bytes.saturating_add(decoded);
            }
            Ok(())
        },
    )?;
    if d.decoded_bytes > limits.max_decoded_bytes as u64 {
        return Err(DecodeError::OverLimit {
            what: Exceeded::DecodedBytes,
            declared: d.decoded_bytes,
            limit: limits.max_decoded_bytes as u64,
        });
    }
    if d.rows > limits.max_rows as u64 {
        return Err(DecodeError::OverLimit {
            what: Exceeded::Rows,
            declared: d.rows,
            limit: limits.max_rows as u64,
        });
    }
    // Second pass, only once the declared sizes are within the limit: the prefixes must not lie.
    for_each_batch(bytes, limits.max_messages, |at, batch, _, body| {
        if codec(&batch, at)? != Some(fb::CompressionType::LZ4_FRAME) {
            return Ok(());
        }
        for (i, data) in buffer_slices(&batch, body, at)? {
            if let Prefix::Compressed(declared, frame) = prefix(data, at, i)? {
                let actual =
                    lz4_frame_len(frame).map_err(|e| invalid(format!("{at}: buffer {i}: {e}")))?;
                if actual != declared {
                    return Err(invalid(format!(
                        "{at}: buffer {i} declares {declared} bytes once decompressed but \
                         decompresses to {actual}"
                    )));
                }
            }
        }
        Ok(())
    })?;
    Ok(d)
}

/// Where in a stream a problem is, for messages.
#[derive(Debug, Clone, Copy)]
struct At {
    /// 1-based message number.
    message: usize,
}

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "message {}", self.message)
    }
}

fn non_negative(v: i64, what: impl FnOnce() -> String) -> std::result::Result<u64, DecodeError> {
    u64::try_from(v).map_err(|_| invalid(format!("{} is negative ({v})", what())))
}

/// Reads the next message of a stream at `*pos`: its flatbuffer header and its body, both
/// checked to lie within `bytes`. `None` where arrow's reader ends the stream too.
fn next_message<'a>(
    bytes: &'a [u8],
    pos: &mut usize,
    number: usize,
) -> std::result::Result<Option<(fb::Message<'a>, &'a [u8])>, DecodeError> {
    let rest = &bytes[*pos..];
    let word = |at: usize| {
        rest.get(at..at + 4)
            .map(|w| u32::from_le_bytes(w.try_into().unwrap()))
    };
    // Like arrow's reader: fewer than four bytes left, or a zero length, ends the stream.
    let Some(first) = word(0) else {
        return Ok(None);
    };
    let (len, meta_start) = if first == CONTINUATION_MARKER {
        let len = word(4).ok_or_else(|| invalid(format!("message {number}: truncated length")))?;
        (len, 8)
    } else {
        (first, 4)
    };
    let len = len as i32;
    if len == 0 {
        return Ok(None);
    }
    let len = usize::try_from(len)
        .map_err(|_| invalid(format!("message {number}: negative metadata length {len}")))?;
    let remaining = rest.len() - meta_start;
    if len > remaining {
        return Err(invalid(format!(
            "message {number}: metadata of {len} bytes but only {remaining} bytes remain"
        )));
    }
    let meta = &rest[meta_start..meta_start + len];
    let message = fb::root_as_message(meta)
        .map_err(|e| invalid(format!("message {number}: unreadable metadata: {e}")))?;
    let remaining = remaining - len;
    let body_len = message.bodyLength();
    let body_len = usize::try_from(body_len)
        .ok()
        .filter(|l| *l <= remaining)
        .ok_or_else(|| {
            invalid(format!(
                "message {number}: declares a body of {body_len} bytes but only {remaining} \
                 bytes remain"
            ))
        })?;
    let body_start = *pos + meta_start + len;
    *pos = body_start + body_len;
    Ok(Some((message, &bytes[body_start..*pos])))
}

/// Calls `f` with every record batch and dictionary batch of the stream (`true` for
/// dictionaries) and its body; refuses streams of more than `max_messages` messages.
fn for_each_batch<'a>(
    bytes: &'a [u8],
    max_messages: usize,
    mut f: impl FnMut(At, fb::RecordBatch<'a>, bool, &'a [u8]) -> std::result::Result<(), DecodeError>,
) -> std::result::Result<(), DecodeError> {
    let mut pos = 0;
    let mut number = 0;
    loop {
        number += 1;
        let Some((message, body)) = next_message(bytes, &mut pos, number)? else {
            return Ok(());
        };
        if number > max_messages {
            return Err(DecodeError::OverLimit {
                what: Exceeded::Messages,
                declared: number as u64,
                limit: max_messages as u64,
            });
        }
        let at = At { message: number };
        // Other headers (the schema) have no buffers; arrow refuses unknown ones.
        let (batch, is_dictionary) = match message.header_type() {
            fb::MessageHeader::RecordBatch => (message.header_as_record_batch(), false),
            fb::MessageHeader::DictionaryBatch => (
                message.header_as_dictionary_batch().and_then(|d| d.data()),
                true,
            ),
            _ => continue,
        };
        let batch = batch.ok_or_else(|| invalid(format!("{at}: batch header without data")))?;
        f(at, batch, is_dictionary, body)?;
    }
}

/// The codec of a batch's body, `None` when it is not compressed.
fn codec(
    batch: &fb::RecordBatch<'_>,
    at: At,
) -> std::result::Result<Option<fb::CompressionType>, DecodeError> {
    let Some(c) = batch.compression() else {
        return Ok(None);
    };
    if c.method() != fb::BodyCompressionMethod::BUFFER {
        return Err(invalid(format!(
            "{at}: unsupported body compression method"
        )));
    }
    match c.codec() {
        k @ (fb::CompressionType::LZ4_FRAME | fb::CompressionType::ZSTD) => Ok(Some(k)),
        k => Err(invalid(format!(
            "{at}: unsupported compression codec {k:?}"
        ))),
    }
}

/// The batch's buffers as slices of its body (numbered from 0), each checked to lie within it.
fn buffer_slices<'a>(
    batch: &fb::RecordBatch<'_>,
    body: &'a [u8],
    at: At,
) -> std::result::Result<Vec<(usize, &'a [u8])>, DecodeError> {
    let mut out = Vec::new();
    for (i, b) in batch.buffers().into_iter().flatten().enumerate() {
        let (offset, len) = (b.offset(), b.length());
        let range = usize::try_from(offset)
            .ok()
            .zip(usize::try_from(len).ok())
            .and_then(|(o, l)| Some(o..o.checked_add(l)?))
            .filter(|r| r.end <= body.len())
            .ok_or_else(|| {
                invalid(format!(
                    "{at}: buffer {i} (offset {offset}, {len} bytes) lies outside the \
                     message body of {} bytes",
                    body.len()
                ))
            })?;
        out.push((i, &body[range]));
    }
    Ok(out)
}

/// A buffer of a compressed body, by its length prefix.
enum Prefix<'a> {
    /// No bytes at all: an empty buffer.
    Empty,
    /// Prefix -1: the bytes after the prefix, stored as they are.
    Stored(&'a [u8]),
    /// The declared uncompressed length (0 for an empty buffer) and the compressed bytes.
    Compressed(u64, &'a [u8]),
}

fn prefix<'a>(data: &'a [u8], at: At, i: usize) -> std::result::Result<Prefix<'a>, DecodeError> {
    if data.is_empty() {
        return Ok(Prefix::Empty);
    }
    let (head, rest) = data.split_at_checked(PREFIX_LEN).ok_or_else(|| {
        invalid(format!(
            "{at}: compressed buffer {i} is {} bytes, shorter than its {PREFIX_LEN}-byte \
             length prefix",
            data.len()
        ))
    })?;
    match i64::from_le_bytes(head.try_into().unwrap()) {
        PREFIX_UNCOMPRESSED => Ok(Prefix::Stored(rest)),
        0 => Ok(Prefix::Empty),
        n => u64::try_from(n)
            .map(|n| Prefix::Compressed(n, rest))
            .map_err(|_| {
                invalid(format!(
                    "{at}: buffer {i} declares an uncompressed length of {n}"
                ))
            }),
    }
}

const LZ4_MAGIC: u32 = 0x184D_2204;
const LZ4_FLG_VERSION_MASK: u8 = 0b1100_0000;
const LZ4_FLG_VERSION: u8 = 0b0100_0000;
const LZ4_FLG_RESERVED: u8 = 0b0000_0010;
const LZ4_FLG_BLOCK_CHECKSUMS: u8 = 0b0001_0000;
const LZ4_FLG_CONTENT_SIZE: u8 = 0b0000_1000;
const LZ4_FLG_DICTIONARY_ID: u8 = 0b0000_0001;
const LZ4_BD_BLOCK_SIZE: u8 = 0b0111_0000;
const LZ4_BLOCK_STORED: u32 = 0x8000_0000;
const LZ4_MIN_MATCH: u64 = 4;

/// The length an LZ4 frame decompresses to, counted from its block headers and sequences
/// without decompressing anything. It reads a frame as arrow's decoder (`lz4_flex`'s
/// `FrameDecoder::read_to_end`) does: the first frame only, ending at the end mark or where
/// the input ends before a block header; what that decoder refuses is refused, so the count
/// is never less than what it would produce.
fn lz4_frame_len(frame: &[u8]) -> std::result::Result<u64, String> {
    if frame.len() < 7 || u32::from_le_bytes(frame[..4].try_into().unwrap()) != LZ4_MAGIC {
        return Err("not an LZ4 frame (legacy and skippable frames are not accepted)".into());
    }
    let (flg, bd) = (frame[4], frame[5]);
    if flg & LZ4_FLG_VERSION_MASK != LZ4_FLG_VERSION || flg & LZ4_FLG_RESERVED != 0 {
        return Err(format!("unsupported LZ4 frame flags {flg:#04x}"));
    }
    if flg & LZ4_FLG_DICTIONARY_ID != 0 {
        return Err("LZ4 frames with a dictionary are not supported".into());
    }
    let block_max: u64 = match bd {
        b if b & !LZ4_BD_BLOCK_SIZE != 0 => {
            return Err(format!("bad LZ4 block descriptor {bd:#04x}"));
        }
        0x40 => 64 << 10,
        0x50 => 256 << 10,
        0x60 => 1 << 20,
        0x70 => 4 << 20,
        _ => return Err(format!("unsupported LZ4 block size {bd:#04x}")),
    };
    let checksum_len = if flg & LZ4_FLG_BLOCK_CHECKSUMS != 0 {
        4
    } else {
        0
    };
    // Magic, FLG, BD, the optional content size, the header checksum.
    let content_size_len = if flg & LZ4_FLG_CONTENT_SIZE != 0 {
        8
    } else {
        0
    };
    let mut pos = 6 + content_size_len + 1;
    if pos > frame.len() {
        return Err("truncated LZ4 frame header".into());
    }
    let mut total = 0u64;
    while let Some(word) = frame.get(pos..pos + 4) {
        pos += 4;
        let word = u32::from_le_bytes(word.try_into().unwrap());
        if word == 0 {
            break; // The end mark.
        }
        let size = (word & !LZ4_BLOCK_STORED) as usize;
        if size as u64 > block_max {
            return Err(format!(
                "an LZ4 block of {size} bytes in a frame of {block_max}-byte blocks"
            ));
        }
        let block = frame
            .get(pos..pos + size)
            .ok_or_else(|| "truncated LZ4 block".to_string())?;
        pos += size + checksum_len;
        let n = if word & LZ4_BLOCK_STORED != 0 {
            if size == 0 {
                break; // lz4_flex ends its output at an empty stored block.
            }
            size as u64
        } else {
            lz4_block_len(block)?
        };
        if n > block_max {
            return Err(format!(
                "an LZ4 block decompresses to {n} bytes, more than the frame's {block_max}-byte blocks"
            ));
        }
        total += n;
    }
    Ok(total)
}

/// The length an LZ4 block decompresses to: the sum of its literal and match lengths.
fn lz4_block_len(block: &[u8]) -> std::result::Result<u64, String> {
    let truncated = || "truncated LZ4 block".to_string();
    let extended = |i: &mut usize| -> std::result::Result<u64, String> {
        let mut n = 0u64;
        loop {
            let b = *block.get(*i).ok_or_else(truncated)?;
            *i += 1;
            n += b as u64;
            if b != 0xFF {
                return Ok(n);
            }
        }
    };
    let mut i = 0;
    let mut out = 0u64;
    loop {
        let token = *block.get(i).ok_or_else(truncated)?;
        i += 1;
        let mut literals = (token >> 4) as u64;
        if literals == 15 {
            literals += extended(&mut i)?;
        }
        if literals > (block.len() - i) as u64 {
            return Err("LZ4 literals run past the end of their block".into());
        }
        i += literals as usize;
        out += literals;
        // The last sequence has literals only.
        if i == block.len() {
            return Ok(out);
        }
        let offset = block.get(i..i + 2).ok_or_else(truncated)?;
        i += 2;
        if offset == [0, 0] {
            return Err("LZ4 match offset 0".into());
        }
        let mut len = (token & 0x0F) as u64 + LZ4_MIN_MATCH;
        if len == 15 + LZ4_MIN_MATCH {
            len += extended(&mut i)?;
        }
        out += len;
        if i >= block.len() {
            return Err("LZ4 block ends with a match".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;
    use std::sync::Arc;

    use arrow::array::{ArrayRef, DictionaryArray, Int64Array, StringArray};
    use arrow::datatypes::Int32Type;
    use arrow::ipc::CompressionType;
    use proptest::prelude::*;

    use super::*;

    /// Counts the heap bytes this thread holds and their peak, so tests can show what a
    /// decode allocates (per thread: other tests run beside them).
    struct Counting;

    thread_local! {
        static LIVE: Cell<i64> = const { Cell::new(0) };
        static PEAK: Cell<i64> = const { Cell::new(0) };
    }

    fn grow(n: usize) {
        let _ = LIVE.try_with(|live| {
            let v = live.get() + n as i64;
            live.set(v);
            let _ = PEAK.try_with(|p| p.set(p.get().max(v)));
        });
    }

    fn shrink(n: usize) {
        let _ = LIVE.try_with(|live| live.set(live.get() - n as i64));
    }

    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, l: Layout) -> *mut u8 {
            let p = unsafe { System.alloc(l) };
            if !p.is_null() {
                grow(l.size());
            }
            p
        }
        unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
            let p = unsafe { System.alloc_zeroed(l) };
            if !p.is_null() {
                grow(l.size());
            }
            p
        }
        unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
            unsafe { System.dealloc(p, l) };
            shrink(l.size());
        }
        unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
            let q = unsafe { System.realloc(p, l, new) };
            if !q.is_null() {
                grow(new);
                shrink(l.size());
            }
            q
        }
    }

    #[global_allocator]
    static ALLOCATOR: Counting = Counting;

    /// Runs `f`, returning its result and the most heap it held at once beyond what was held
    /// before (what it returns included).
    fn peak_heap<T>(f: impl FnOnce() -> T) -> (T, u64) {
        let start = LIVE.with(|l| l.get());
        PEAK.with(|p| p.set(start));
        let out = f();
        (out, (PEAK.with(|p| p.get()) - start).max(0) as u64)
    }

    const MIB: usize = 1 << 20;

    fn limits(max_decoded_bytes: usize) -> DecodeLimits {
        DecodeLimits::new(max_decoded_bytes, usize::MAX)
    }

    fn zeros(rows: usize) -> RecordBatch {
        RecordBatch::try_from_iter([(
            "id",
            Arc::new(Int64Array::from(vec![0i64; rows])) as ArrayRef,
        )])
        .unwrap()
    }

    fn encode_with(batches: &[RecordBatch], compression: Option<CompressionType>) -> Vec<u8> {
        let opts = IpcWriteOptions::default()
            .try_with_compression(compression)
            .unwrap();
        let mut buf = Vec::new();
        let mut w =
            StreamWriter::try_new_with_options(&mut buf, &batches[0].schema(), opts).unwrap();
        for b in batches {
            w.write(b).unwrap();
        }
        w.finish().unwrap();
        drop(w);
        buf
    }

    /// Rewrites the length prefix `from` of the one LZ4 buffer that has it to `to`.
    fn forge_prefix(bytes: &mut [u8], from: i64, to: i64) {
        let (want, magic) = (from.to_le_bytes(), LZ4_MAGIC.to_le_bytes());
        let hits: Vec<usize> = (0..bytes.len() - 12)
            .filter(|&i| bytes[i..i + 8] == want && bytes[i + 8..i + 12] == magic)
            .collect();
        assert_eq!(hits.len(), 1, "one buffer declaring {from} bytes");
        bytes[hits[0]..hits[0] + 8].copy_from_slice(&to.to_le_bytes());
    }

    #[test]
    fn an_honest_lz4_bomb_is_refused_without_decompressing_it() {
        // 1M rows of zeros: 8 MB once decoded, a few tens of KB compressed.
        let bytes = encode(&zeros(1_000_000).schema(), &[zeros(1_000_000)]).unwrap();
        assert!(bytes.len() < 64 << 10, "{} bytes compressed", bytes.len());
        let (res, peak) = peak_heap(|| decode_bounded(&bytes, &limits(MIB)));
        assert_eq!(
            res.unwrap_err(),
            DecodeError::OverLimit {
                what: Exceeded::DecodedBytes,
                declared: 8_000_000 + 2 * OVERHEAD_BYTES_PER_ARRAY,
                limit: MIB as u64,
            }
        );
        assert!(peak < 64 << 10, "refusing allocated {peak} bytes");
        // What the unbounded decoder does with the same bytes.
        let (_, peak) = peak_heap(|| decode(&bytes).unwrap());
        assert!(peak >= 8_000_000, "decode allocated only {peak} bytes");
        // And the message says what is wrong.
        let e = decode_bounded(&bytes, &limits(MIB))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("declares 8000256 bytes once decoded") && e.contains("limit 1048576"),
            "{e}"
        );
    }

    #[test]
    fn a_zstd_bomb_is_refused_too() {
        let bytes = encode_with(&[zeros(1_000_000)], Some(CompressionType::ZSTD));
        assert!(bytes.len() < 64 << 10, "{} bytes compressed", bytes.len());
        let (res, peak) = peak_heap(|| decode_bounded(&bytes, &limits(MIB)));
        assert!(
            matches!(
                res,
                Err(DecodeError::OverLimit {
                    what: Exceeded::DecodedBytes,
                    declared: 8_000_256,
                    ..
                })
            ),
            "{res:?}"
        );
        assert!(peak < 64 << 10, "refusing allocated {peak} bytes");
    }

    #[test]
    fn a_forged_length_prefix_is_refused() {
        let honest = encode(&zeros(1_000_000).schema(), &[zeros(1_000_000)]).unwrap();
        // Declaring a terabyte: refused from the prefix alone (arrow would reserve it).
        let mut huge = honest.clone();
        forge_prefix(&mut huge, 8_000_000, 1 << 40);
        let (res, peak) = peak_heap(|| decode_bounded(&huge, &limits(64 * MIB)));
        assert!(
            matches!(
                res,
                Err(DecodeError::OverLimit { what: Exceeded::DecodedBytes, declared, .. })
                    if declared > 1 << 40
            ),
            "{res:?}"
        );
        assert!(peak < 64 << 10, "refusing allocated {peak} bytes");
        // Declaring 16 bytes of what decompresses to 8 MB: arrow would decompress it all.
        let mut small = honest.clone();
        forge_prefix(&mut small, 8_000_000, 16);
        let (res, peak) = peak_heap(|| decode_bounded(&small, &limits(MIB)));
        assert_eq!(
            res.unwrap_err(),
            DecodeError::Invalid(
                "message 2: buffer 1 declares 16 bytes once decompressed but decompresses to \
                 8000000"
                    .into()
            )
        );
        assert!(peak < 64 << 10, "refusing allocated {peak} bytes");
        let (res, peak) = peak_heap(|| decode(&small).map(|_| ()));
        assert!(
            res.is_err() && peak >= 8_000_000,
            "decode allocated {peak} bytes"
        );
        // Declaring more than it holds: arrow stops at the declared length and refuses.
        let mut more = honest;
        forge_prefix(&mut more, 8_000_000, 8_000_001);
        let e = decode_bounded(&more, &limits(64 * MIB)).unwrap_err();
        assert!(
            e.to_string()
                .contains("declares 8000001 bytes once decompressed"),
            "{e}"
        );
    }

    #[test]
    fn forged_message_and_buffer_lengths_are_refused() {
        let honest = encode(&zeros(1000).schema(), &[zeros(1000)]).unwrap();
        // The record batch's bodyLength, found by rewriting each place that holds it.
        let mut pos = 0;
        next_message(&honest, &mut pos, 1).unwrap();
        let meta_start = pos + 8;
        let (body_len, body_start) = {
            let (m, body) = next_message(&honest, &mut pos, 2).unwrap().unwrap();
            (m.bodyLength(), pos - body.len())
        };
        let forged = (meta_start..body_start - 8)
            .filter(|&i| honest[i..i + 8] == body_len.to_le_bytes())
            .map(|i| {
                let mut b = honest.clone();
                b[i..i + 8].copy_from_slice(&(1i64 << 40).to_le_bytes());
                b
            })
            .find(|b| {
                fb::root_as_message(&b[meta_start..body_start])
                    .is_ok_and(|m| m.bodyLength() == 1 << 40)
            })
            .expect("bodyLength found");
        let (res, peak) = peak_heap(|| decode_bounded(&forged, &limits(64 * MIB)));
        let e = res.unwrap_err().to_string();
        assert!(
            e.contains("message 2: declares a body of 1099511627776 bytes"),
            "{e}"
        );
        assert!(peak < 64 << 10, "refusing allocated {peak} bytes");
        // A metadata length past the end, and junk.
        let mut long_meta = honest.clone();
        long_meta[4..8].copy_from_slice(&i32::MAX.to_le_bytes());
        let e = decode_bounded(&long_meta, &limits(MIB))
            .unwrap_err()
            .to_string();
        assert!(e.contains("message 1: metadata of 2147483647 bytes"), "{e}");
        assert!(decode_schema(&long_meta).is_err());
        let e = decode_bounded(b"not arrow", &limits(MIB)).unwrap_err();
        assert!(matches!(e, DecodeError::Invalid(_)), "{e}");
    }

    #[test]
    fn dictionary_batches_count() {
        // Ten rows whose dictionary holds 10,000 long strings (~1 MB).
        let values: Vec<String> = (0..10_000).map(|i| format!("{i:0>100}")).collect();
        let dict = DictionaryArray::<Int32Type>::try_new(
            (0..10).collect(),
            Arc::new(StringArray::from(values)),
        )
        .unwrap();
        let b = RecordBatch::try_from_iter([("d", Arc::new(dict) as ArrayRef)]).unwrap();
        for compression in [None, Some(CompressionType::LZ4_FRAME)] {
            let bytes = encode_with(std::slice::from_ref(&b), compression);
            let d = check(&bytes, &limits(usize::MAX)).unwrap();
            assert!(d.decoded_bytes > 1_000_000, "{d:?}");
            assert_eq!(d.rows, 10, "dictionary entries are not rows");
            let e = decode_bounded(&bytes, &limits(d.decoded_bytes as usize - 1)).unwrap_err();
            assert!(matches!(e, DecodeError::OverLimit { .. }), "{e}");
            assert_eq!(
                decode_bounded(&bytes, &limits(d.decoded_bytes as usize)).unwrap(),
                decode(&bytes).unwrap()
            );
        }
    }

    #[test]
    fn rows_and_messages_are_capped() {
        let bytes = encode(&zeros(10).schema(), &[zeros(60), zeros(41)]).unwrap();
        let e = decode_bounded(&bytes, &DecodeLimits::new(MIB, 100)).unwrap_err();
        assert_eq!(e.to_string(), "declares 101 rows, limit 100");
        assert!(decode_bounded(&bytes, &DecodeLimits::new(MIB, 101)).is_ok());
        let many = encode(&zeros(1).schema(), &vec![zeros(1); 10]).unwrap();
        let tight = DecodeLimits {
            max_messages: 10,
            ..DecodeLimits::new(MIB, 100)
        };
        let e = decode_bounded(&many, &tight).unwrap_err();
        assert_eq!(e.to_string(), "has more than 10 Arrow IPC messages");
        let e = decode_bounded(
            &many,
            &DecodeLimits {
                max_messages: 11,
                ..tight
            },
        );
        assert_eq!(e.unwrap().1.len(), 10);
    }

    #[test]
    fn a_schema_decodes_alone() {
        let s = zeros(1).schema();
        assert_eq!(decode_schema(&encode_schema(&s).unwrap()).unwrap(), s);
    }

    /// Written by pyarrow 26 (Arrow C++, liblz4: 64 KB blocks, several per buffer), the
    /// form other clients send: 100,000 rows of `id` int64 (`i % 50`), `n` int32 (`i % 7`,
    /// null every 11th) and `d` dictionary<int32, utf8> (`cat{i % 5}`), in batches of 60,000
    /// with `IpcWriteOptions(compression="lz4")`.
    const PYARROW_LZ4: &[u8] = include_bytes!("testdata/pyarrow-lz4.arrows");

    #[test]
    fn streams_from_other_writers_count_exactly() {
        let d = check(PYARROW_LZ4, &limits(usize::MAX)).unwrap();
        assert_eq!(d.rows, 100_000);
        let exact = DecodeLimits::new(d.decoded_bytes as usize, 100_000);
        let (schema, batches) = decode_bounded(PYARROW_LZ4, &exact).unwrap();
        assert_eq!((schema, batches), decode(PYARROW_LZ4).unwrap());
        let under = DecodeLimits::new(d.decoded_bytes as usize - 1, 100_000);
        assert!(decode_bounded(PYARROW_LZ4, &under).is_err());
    }

    fn mixed(values: &[i64], texts: &[String]) -> RecordBatch {
        let n = values.len().min(texts.len());
        RecordBatch::try_from_iter([
            (
                "v",
                Arc::new(Int64Array::from_iter(
                    (0..n).map(|i| (i % 7 != 3).then_some(values[i])),
                )) as ArrayRef,
            ),
            (
                "s",
                Arc::new(StringArray::from_iter_values(&texts[..n])) as ArrayRef,
            ),
        ])
        .unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// Under the limit, every codec decodes exactly as `decode` does, and the LZ4 length
        /// count agrees with every honest prefix (any data, any compressibility).
        #[test]
        fn within_the_limit_bounded_equals_decode(
            values in prop::collection::vec(prop_oneof![Just(0i64), 0i64..4, any::<i64>()], 1..3000),
            texts in prop::collection::vec("[a-c]{0,40}|[ -~]{0,8}", 1..3000),
            repeat in 1usize..64,
            batches in 1usize..4,
        ) {
            let values: Vec<i64> = values.iter().copied().cycle().take(values.len() * repeat).collect();
            let texts: Vec<String> = texts.iter().cloned().cycle().take(texts.len() * repeat).collect();
            let b = mixed(&values, &texts);
            let bs = vec![b; batches];
            for compression in [None, Some(CompressionType::LZ4_FRAME), Some(CompressionType::ZSTD)] {
                let bytes = encode_with(&bs, compression);
                let d = check(&bytes, &limits(usize::MAX)).unwrap();
                let exact = DecodeLimits::new(d.decoded_bytes as usize, d.rows as usize);
                prop_assert_eq!(decode_bounded(&bytes, &exact).unwrap(), decode(&bytes).unwrap());
            }
        }

        /// Whatever bytes of a stream are changed, a bounded decode holds no more than the
        /// payload, the limit and arrow's LZ4 scratch buffers, and never panics.
        #[test]
        fn corrupted_streams_stay_within_the_limit(
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            codec in 0usize..3,
        ) {
            let texts: Vec<String> = (0..2000).map(|i| format!("{}", i % 13)).collect();
            let values: Vec<i64> = (0..2000).map(|i| i % 5).collect();
            let compression = [None, Some(CompressionType::LZ4_FRAME), Some(CompressionType::ZSTD)][codec];
            let mut bytes = encode_with(&[mixed(&values, &texts), mixed(&values, &texts)], compression);
            for (at, v) in edits {
                let i = at.index(bytes.len());
                bytes[i] = v;
            }
            let limit = 256 << 10;
            let (res, peak) = peak_heap(|| {
                std::panic::catch_unwind(|| decode_bounded(&bytes, &limits(limit)).map(|_| ()))
            });
            prop_assert!(res.is_ok(), "panicked");
            // lz4_flex's per-frame scratch is up to 4 MB in and 8 MB + 64 KB out, whatever the
            // buffer's size; it is freed before the next buffer.
            let bound = 2 * bytes.len() as u64 + 2 * limit as u64 + 13 * MIB as u64;
            prop_assert!(peak <= bound, "held {} bytes, bound {}", peak, bound);
        }
    }

    #[test]
    fn lz4_counts_refuse_what_lz4_flex_refuses() {
        // A frame: magic, FLG (version 1, independent blocks), BD (64 KB), header checksum.
        let frame = |blocks: &[u8]| {
            let mut f = LZ4_MAGIC.to_le_bytes().to_vec();
            f.extend([0x60, 0x40, 0x82]);
            f.extend(blocks);
            f
        };
        let block = |data: &[u8]| {
            let mut b = (data.len() as u32).to_le_bytes().to_vec();
            b.extend(data);
            b
        };
        // 3 literals "abc", then a match of 4 + 15 + 255 + 10 at offset 3, then 1 literal.
        let seq = [0x3F, b'a', b'b', b'c', 3, 0, 255, 10, 0x10, b'z'];
        assert_eq!(lz4_frame_len(&frame(&block(&seq))), Ok(3 + 284 + 1));
        // Ending after a match, a zero offset, literals past the end, a too-large block.
        for bad in [
            &seq[..8],
            &[0x30, b'a', b'b', b'c', 0, 0, 0x10, b'z'][..],
            &[0xF0, 5, b'a'][..],
        ] {
            assert!(lz4_frame_len(&frame(&block(bad))).is_err(), "{bad:?}");
        }
        let mut big = vec![0x1F, b'a', 1, 0, 255, 255];
        big.extend([255u8; 300]);
        big.extend([0, 0x10, b'z']);
        assert!(
            lz4_frame_len(&frame(&block(&big))).is_err(),
            "over 64 KB in one block"
        );
        // Stored blocks count as they are; an end mark ends the frame.
        let mut stored = (4u32 | LZ4_BLOCK_STORED).to_le_bytes().to_vec();
        stored.extend(b"abcd");
        stored.extend([0, 0, 0, 0]);
        stored.extend(block(&seq));
        assert_eq!(lz4_frame_len(&frame(&stored)), Ok(4));
        assert!(
            lz4_frame_len(b"\x02\x21\x4c\x18abcd").is_err(),
            "legacy frame"
        );
    }
}
