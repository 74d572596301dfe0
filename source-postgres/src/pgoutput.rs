//! A decoder of PostgreSQL's `pgoutput` logical-replication messages (protocol version 1),
//! as carried by the replication stream's XLogData messages. Values arrive in text form.

use crate::error::{Result, SourceError};

/// A column value in a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// An unchanged TOASTed value: the old value stands.
    Unchanged,
    /// The value's text form.
    Text(String),
}

/// The old tuple of an update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    /// `K`: the replica identity's columns; every other column is null, whatever its value.
    Key(Vec<Value>),
    /// `O`: the whole old row (REPLICA IDENTITY FULL).
    Row(Vec<Value>),
}

impl OldTuple {
    /// The tuple's values, in column order.
    pub fn values(&self) -> &[Value] {
        match self {
            OldTuple::Key(v) | OldTuple::Row(v) => v,
        }
    }
}

/// A column of a relation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Part of the replica identity (the key).
    pub key: bool,
    /// Column name.
    pub name: String,
    /// Type OID.
    pub type_oid: u32,
    /// Type modifier (precision/scale for numeric, length for varchar).
    pub type_mod: i32,
}

/// One decoded message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A transaction begins.
    Begin {
        /// The LSN of its commit record.
        final_lsn: u64,
        /// Commit time, microseconds since 2000-01-01.
        commit_ts: i64,
        /// Transaction id.
        xid: u32,
    },
    /// A transaction commits.
    Commit {
        /// The LSN of the commit record.
        commit_lsn: u64,
        /// The end of the commit record: where streaming resumes after it.
        end_lsn: u64,
        /// Commit time, microseconds since 2000-01-01.
        commit_ts: i64,
    },
    /// A relation's description (sent before its first change, and after DDL).
    Relation {
        /// Relation OID.
        oid: u32,
        /// Schema name.
        namespace: String,
        /// Table name.
        name: String,
        /// Replica identity setting (`d`, `n`, `f`, `i`).
        replica_identity: u8,
        /// Columns.
        columns: Vec<RelationColumn>,
    },
    /// A row was inserted.
    Insert {
        /// Relation OID.
        oid: u32,
        /// The new row.
        new: Vec<Value>,
    },
    /// A row was updated; `old` is the old key (`K`) or old row (`O`) when the key changed
    /// or the replica identity is FULL.
    Update {
        /// Relation OID.
        oid: u32,
        /// Old key or row, when sent.
        old: Option<OldTuple>,
        /// The new row.
        new: Vec<Value>,
    },
    /// A row was deleted; `old` holds its key (or the whole row with REPLICA IDENTITY FULL).
    Delete {
        /// Relation OID.
        oid: u32,
        /// Old key or row.
        old: Vec<Value>,
    },
    /// Tables were truncated.
    Truncate {
        /// Relation OIDs.
        oids: Vec<u32>,
    },
    /// Anything else (Origin, Type, Message): not needed.
    Other(u8),
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.at + n > self.b.len() {
            return Err(SourceError::Protocol(format!(
                "pgoutput message truncated at byte {} (wanted {n} more of {})",
                self.at,
                self.b.len()
            )));
        }
        let s = &self.b[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn i16(&mut self) -> Result<i16> {
        Ok(i16::from_be_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn i32(&mut self) -> Result<i32> {
        Ok(i32::from_be_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn i64(&mut self) -> Result<i64> {
        Ok(i64::from_be_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn cstr(&mut self) -> Result<String> {
        let rest = &self.b[self.at..];
        let end = rest
            .iter()
            .position(|c| *c == 0)
            .ok_or_else(|| SourceError::Protocol("unterminated string in pgoutput".into()))?;
        let s = String::from_utf8_lossy(&rest[..end]).to_string();
        self.at += end + 1;
        Ok(s)
    }
    fn tuple(&mut self) -> Result<Vec<Value>> {
        let n = self.i16()?;
        let mut out = Vec::with_capacity(n.max(0) as usize);
        for _ in 0..n {
            out.push(match self.u8()? {
                b'n' => Value::Null,
                b'u' => Value::Unchanged,
                b't' => {
                    let len = self.i32()?;
                    let bytes = self.take(len.max(0) as usize)?;
                    Value::Text(String::from_utf8_lossy(bytes).to_string())
                }
                b'b' => {
                    return Err(SourceError::Protocol(
                        "binary tuple values are not requested and not supported".into(),
                    ));
                }
                other => {
                    return Err(SourceError::Protocol(format!(
                        "unknown tuple value kind '{}'",
                        other as char
                    )));
                }
            });
        }
        Ok(out)
    }
}

/// Decodes one message.
pub fn decode(data: &[u8]) -> Result<Message> {
    let mut r = Reader { b: data, at: 0 };
    let tag = r.u8()?;
    Ok(match tag {
        b'B' => Message::Begin {
            final_lsn: r.u64()?,
            commit_ts: r.i64()?,
            xid: r.u32()?,
        },
        b'C' => {
            let _flags = r.u8()?;
            Message::Commit {
                commit_lsn: r.u64()?,
                end_lsn: r.u64()?,
                commit_ts: r.i64()?,
            }
        }
        b'R' => {
            let oid = r.u32()?;
            let namespace = r.cstr()?;
            let name = r.cstr()?;
            let replica_identity = r.u8()?;
            let n = r.i16()?;
            let mut columns = Vec::new();
            for _ in 0..n {
                let flags = r.u8()?;
                columns.push(RelationColumn {
                    key: flags & 1 == 1,
                    name: r.cstr()?,
                    type_oid: r.u32()?,
                    type_mod: r.i32()?,
                });
            }
            Message::Relation {
                oid,
                namespace,
                name,
                replica_identity,
                columns,
            }
        }
        b'I' => {
            let oid = r.u32()?;
            let n = r.u8()?;
            if n != b'N' {
                return Err(SourceError::Protocol(format!(
                    "insert without new tuple ('{}')",
                    n as char
                )));
            }
            Message::Insert {
                oid,
                new: r.tuple()?,
            }
        }
        b'U' => {
            let oid = r.u32()?;
            let mut kind = r.u8()?;
            let mut old = None;
            if kind == b'K' {
                old = Some(OldTuple::Key(r.tuple()?));
                kind = r.u8()?;
            } else if kind == b'O' {
                old = Some(OldTuple::Row(r.tuple()?));
                kind = r.u8()?;
            }
            if kind != b'N' {
                return Err(SourceError::Protocol(format!(
                    "update without new tuple ('{}')",
                    kind as char
                )));
            }
            Message::Update {
                oid,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let oid = r.u32()?;
            let _kind = r.u8()?;
            Message::Delete {
                oid,
                old: r.tuple()?,
            }
        }
        b'T' => {
            let n = r.u32()?;
            let _options = r.u8()?;
            let mut oids = Vec::new();
            for _ in 0..n {
                oids.push(r.u32()?);
            }
            Message::Truncate { oids }
        }
        other => Message::Other(other),
    })
}

/// Parses an LSN in PostgreSQL's `X/Y` text form.
pub fn parse_lsn(s: &str) -> Result<u64> {
    let (hi, lo) = s
        .split_once('/')
        .ok_or_else(|| SourceError::Protocol(format!("bad LSN '{s}'")))?;
    let hi =
        u64::from_str_radix(hi, 16).map_err(|_| SourceError::Protocol(format!("bad LSN '{s}'")))?;
    let lo =
        u64::from_str_radix(lo, 16).map_err(|_| SourceError::Protocol(format!("bad LSN '{s}'")))?;
    Ok(hi << 32 | lo)
}

/// Formats an LSN as `X/Y`.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_messages_and_lsns() {
        let mut b = vec![b'B'];
        b.extend(0x0000_0001_0000_00a0u64.to_be_bytes());
        b.extend(5i64.to_be_bytes());
        b.extend(77u32.to_be_bytes());
        assert_eq!(
            decode(&b).unwrap(),
            Message::Begin {
                final_lsn: 0x1_0000_00a0,
                commit_ts: 5,
                xid: 77
            }
        );
        let mut u = vec![b'U'];
        u.extend(16384u32.to_be_bytes());
        u.push(b'K');
        u.extend(2i16.to_be_bytes());
        u.push(b't');
        u.extend(1i32.to_be_bytes());
        u.push(b'7');
        u.push(b'n');
        u.push(b'N');
        u.extend(2i16.to_be_bytes());
        u.push(b'u');
        u.push(b'n');
        assert_eq!(
            decode(&u).unwrap(),
            Message::Update {
                oid: 16384,
                old: Some(OldTuple::Key(vec![Value::Text("7".into()), Value::Null])),
                new: vec![Value::Unchanged, Value::Null],
            }
        );
        assert!(
            decode(&u[..u.len() - 1])
                .unwrap_err()
                .to_string()
                .contains("truncated")
        );
        assert_eq!(parse_lsn("16/B374D848").unwrap(), 0x16_B374_D848);
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
        assert!(parse_lsn("nope").is_err());
    }
}
