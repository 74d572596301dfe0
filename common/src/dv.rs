//! Deletion vectors in the Delta protocol's format: which rows of a data file are deleted.
//!
//! A DV is a `RoaringTreemap` of row indexes, serialized portably after a 4-byte magic. On
//! disk it sits in a `deletion_vector_<uuid>.bin` file at the table root: one version byte
//! (1), then any number of DVs, each as its size (big-endian u32, magic plus bitmap), the
//! magic (little-endian), the bitmap, and a CRC-32 (big-endian) over magic and bitmap. An
//! Add action points at one DV with a descriptor: storage type `u`, the z85-encoded uuid,
//! the DV's offset in the file, its size and its cardinality. Inline (`i`) DVs are read, not
//! written; absolute (`p`) ones are refused (a file outside the table root).
//!
//! The reader checks size, magic and CRC, so a torn or foreign file is an error naming the
//! file, never a silently wrong set of rows.

use deltalake::kernel::{DeletionVectorDescriptor, StorageType};
use roaring::RoaringTreemap;

use crate::error::{Error, Result};

/// The magic of the portable RoaringTreemap serialization (little-endian on disk).
pub const MAGIC: u32 = 1_681_511_377;
/// The version byte at the start of a DV file.
const FILE_VERSION: u8 = 1;

fn crc() -> crc::Crc<u32> {
    crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC)
}

/// A DV file being assembled: add bitmaps, then take the bytes and the descriptors.
pub struct DvFileWriter {
    bytes: Vec<u8>,
    uuid: uuid::Uuid,
}

impl Default for DvFileWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl DvFileWriter {
    /// An empty file with a fresh uuid.
    pub fn new() -> Self {
        DvFileWriter {
            bytes: vec![FILE_VERSION],
            uuid: uuid::Uuid::new_v4(),
        }
    }

    /// The file's path relative to the table root.
    pub fn relative_path(&self) -> String {
        format!("deletion_vector_{}.bin", self.uuid)
    }

    /// Appends `rows` and returns its descriptor.
    pub fn add(&mut self, rows: &RoaringTreemap) -> Result<DeletionVectorDescriptor> {
        let offset = self.bytes.len();
        let mut body = Vec::with_capacity(4 + rows.serialized_size());
        body.extend_from_slice(&MAGIC.to_le_bytes());
        rows.serialize_into(&mut body)
            .map_err(|e| Error::data("deletion vector", e))?;
        let too_big = || Error::data("deletion vector", "larger than 2 GiB");
        let size: i32 = body.len().try_into().map_err(|_| too_big())?;
        self.bytes.extend_from_slice(&(size as u32).to_be_bytes());
        self.bytes.extend_from_slice(&body);
        self.bytes
            .extend_from_slice(&crc().checksum(&body).to_be_bytes());
        Ok(DeletionVectorDescriptor {
            storage_type: StorageType::UuidRelativePath,
            path_or_inline_dv: z85::encode(self.uuid.as_bytes()),
            offset: Some(offset.try_into().map_err(|_| too_big())?),
            size_in_bytes: size,
            cardinality: rows.len() as i64,
        })
    }

    /// The file's bytes.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}

/// Where a descriptor's DV lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DvLocation {
    /// In a file at this path relative to the table root, at this offset.
    File { path: String, offset: usize },
    /// In the descriptor itself (z85-decoded bytes: magic and bitmap).
    Inline(Vec<u8>),
}

/// Resolves a descriptor to its location; `context` names the data file for errors.
pub fn locate(dv: &DeletionVectorDescriptor, context: &str) -> Result<DvLocation> {
    let bad = |m: String| Error::data(format!("deletion vector of {context}"), m);
    match dv.storage_type {
        StorageType::UuidRelativePath => {
            let s = &dv.path_or_inline_dv;
            if s.len() < 20 {
                return Err(bad(format!("path '{s}' is shorter than a z85 uuid")));
            }
            let (prefix, encoded) = s.split_at(s.len() - 20);
            let raw = z85::decode(encoded).map_err(|e| bad(format!("path '{s}': {e}")))?;
            let uuid = uuid::Uuid::from_slice(&raw).map_err(|e| bad(format!("path '{s}': {e}")))?;
            if prefix.contains("..") || prefix.starts_with('/') {
                return Err(bad(format!("prefix '{prefix}' leaves the table")));
            }
            let name = format!("deletion_vector_{uuid}.bin");
            let path = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            };
            Ok(DvLocation::File {
                path,
                offset: dv.offset.unwrap_or(1).max(0) as usize,
            })
        }
        StorageType::Inline => z85::decode(&dv.path_or_inline_dv)
            .map(DvLocation::Inline)
            .map_err(|e| bad(format!("inline: {e}"))),
        StorageType::AbsolutePath => Err(bad(format!(
            "absolute path '{}' is not supported",
            dv.path_or_inline_dv
        ))),
    }
}

/// Decodes an inline DV (magic then bitmap).
pub fn decode_inline(bytes: &[u8], context: &str) -> Result<RoaringTreemap> {
    let bad = |m: String| Error::data(format!("deletion vector of {context}"), m);
    if bytes.len() < 4 {
        return Err(bad("inline DV shorter than its magic".into()));
    }
    let magic = u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes"));
    if magic != MAGIC {
        return Err(bad(format!("magic {magic}, expected {MAGIC}")));
    }
    RoaringTreemap::deserialize_from(&bytes[4..]).map_err(|e| bad(e.to_string()))
}

/// Decodes the DV at `offset` of a DV file's `bytes`, checking its size against
/// `size_in_bytes`, its magic and its CRC.
pub fn decode_at(
    bytes: &[u8],
    offset: usize,
    size_in_bytes: usize,
    context: &str,
) -> Result<RoaringTreemap> {
    let bad = |m: String| Error::data(format!("deletion vector of {context}"), m);
    if bytes.first() != Some(&FILE_VERSION) {
        return Err(bad(format!("file version {:?}, expected 1", bytes.first())));
    }
    let end = offset
        .checked_add(4 + size_in_bytes + 4)
        .filter(|e| *e <= bytes.len() && offset >= 1)
        .ok_or_else(|| {
            bad(format!(
                "offset {offset} + size {size_in_bytes} past the file's {} bytes",
                bytes.len()
            ))
        })?;
    let size = u32::from_be_bytes(bytes[offset..offset + 4].try_into().expect("4 bytes")) as usize;
    if size != size_in_bytes {
        return Err(bad(format!(
            "size {size} in the file, {size_in_bytes} in the log"
        )));
    }
    let body = &bytes[offset + 4..end - 4];
    let stored = u32::from_be_bytes(bytes[end - 4..end].try_into().expect("4 bytes"));
    let computed = crc().checksum(body);
    if stored != computed {
        return Err(bad(format!("CRC {stored:#x}, computed {computed:#x}")));
    }
    decode_inline(body, context)
}

/// Reads the DV a descriptor points at from the table's store (paths relative to the root).
pub async fn read(
    store: &std::sync::Arc<dyn object_store::ObjectStore>,
    dv: &DeletionVectorDescriptor,
    context: &str,
) -> Result<RoaringTreemap> {
    let rows = match locate(dv, context)? {
        DvLocation::Inline(bytes) => decode_inline(&bytes, context)?,
        DvLocation::File { path, offset } => {
            let bytes = crate::storage::read_existing(
                store,
                &object_store::path::Path::from(path.as_str()),
            )
            .await?;
            decode_at(&bytes, offset, dv.size_in_bytes.max(0) as usize, context)?
        }
    };
    if rows.len() as i64 != dv.cardinality {
        return Err(Error::data(
            format!("deletion vector of {context}"),
            format!(
                "{} rows in the DV, cardinality {} in the log",
                rows.len(),
                dv.cardinality
            ),
        ));
    }
    Ok(rows)
}

/// The descriptor as carried in a worker request.
pub fn to_proto(dv: &DeletionVectorDescriptor) -> freshet_proto::worker::v1::DeletionVector {
    freshet_proto::worker::v1::DeletionVector {
        storage_type: match dv.storage_type {
            StorageType::UuidRelativePath => "u",
            StorageType::Inline => "i",
            StorageType::AbsolutePath => "p",
        }
        .to_string(),
        path_or_inline_dv: dv.path_or_inline_dv.clone(),
        offset: dv.offset.map(|o| o as i64).unwrap_or(-1),
        size_in_bytes: dv.size_in_bytes as i64,
        cardinality: dv.cardinality,
    }
}

/// A descriptor from a worker request or response; `context` names the file for errors.
pub fn from_proto(
    dv: &freshet_proto::worker::v1::DeletionVector,
    context: &str,
) -> Result<DeletionVectorDescriptor> {
    let bad = |m: String| Error::data(format!("deletion vector of {context}"), m);
    let storage_type = match dv.storage_type.as_str() {
        "u" => StorageType::UuidRelativePath,
        "i" => StorageType::Inline,
        "p" => StorageType::AbsolutePath,
        other => return Err(bad(format!("storage type '{other}'"))),
    };
    let int = |v: i64, what: &str| -> Result<i32> {
        i32::try_from(v).map_err(|_| bad(format!("{what} {v} out of range")))
    };
    Ok(DeletionVectorDescriptor {
        storage_type,
        path_or_inline_dv: dv.path_or_inline_dv.clone(),
        offset: if dv.offset < 0 {
            None
        } else {
            Some(int(dv.offset, "offset")?)
        },
        size_in_bytes: int(dv.size_in_bytes, "size")?,
        cardinality: dv.cardinality,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn written_dvs_read_back_and_damage_is_caught(
            sets in proptest::collection::vec(proptest::collection::btree_set(0u64..5_000_000, 0..300), 1..5),
            flip in any::<prop::sample::Index>(),
        ) {
            let mut w = DvFileWriter::new();
            let maps: Vec<RoaringTreemap> = sets.iter().map(|s| s.iter().copied().collect()).collect();
            let descs: Vec<_> = maps.iter().map(|m| w.add(m).unwrap()).collect();
            let path = w.relative_path();
            let bytes = w.into_bytes();
            for (m, d) in maps.iter().zip(&descs) {
                let DvLocation::File { path: p, offset } = locate(d, "f").unwrap() else { panic!() };
                prop_assert_eq!(&p, &path);
                prop_assert_eq!(d.cardinality, m.len() as i64);
                let back = decode_at(&bytes, offset, d.size_in_bytes as usize, "f").unwrap();
                prop_assert_eq!(&back, m);
                // Round trip through the wire form.
                prop_assert_eq!(&from_proto(&to_proto(d), "f").unwrap(), d);
            }
            // Any flipped byte after the version is caught (size, magic, bitmap or CRC).
            let mut bad = bytes.clone();
            let i = 1 + flip.index(bad.len() - 1);
            bad[i] ^= 0x5a;
            let d = &descs[0];
            let DvLocation::File { offset, .. } = locate(d, "f").unwrap() else { panic!() };
            let first_end = offset + 4 + d.size_in_bytes as usize + 4;
            if i < first_end {
                prop_assert!(decode_at(&bad, offset, d.size_in_bytes as usize, "f").is_err());
            }
        }
    }

    #[test]
    fn the_kernel_format_matches_a_known_file() {
        // Bytes of the protocol's layout built by hand: version, size, magic, bitmap, CRC.
        let rows: RoaringTreemap = [3u64, 7, 1 << 33].into_iter().collect();
        let mut bitmap = Vec::new();
        rows.serialize_into(&mut bitmap).unwrap();
        let mut body = MAGIC.to_le_bytes().to_vec();
        body.extend(&bitmap);
        let mut file = vec![1u8];
        file.extend((body.len() as u32).to_be_bytes());
        file.extend(&body);
        file.extend(crc().checksum(&body).to_be_bytes());
        let mut w = DvFileWriter::new();
        let d = w.add(&rows).unwrap();
        assert_eq!(w.into_bytes(), file);
        assert_eq!(
            (d.offset, d.size_in_bytes, d.cardinality),
            (Some(1), body.len() as i32, 3)
        );
    }

    #[test]
    fn absolute_and_escaping_paths_are_refused() {
        let mut d = DvFileWriter::new().add(&RoaringTreemap::new()).unwrap();
        d.path_or_inline_dv = format!("../x{}", d.path_or_inline_dv);
        assert!(
            locate(&d, "f")
                .unwrap_err()
                .to_string()
                .contains("leaves the table")
        );
        d.storage_type = StorageType::AbsolutePath;
        d.path_or_inline_dv = "s3://elsewhere/dv.bin".into();
        assert!(
            locate(&d, "f")
                .unwrap_err()
                .to_string()
                .contains("not supported")
        );
    }
}
