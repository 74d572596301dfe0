//! PostgreSQL's `COPY ... TO STDOUT` text format, decoded into rows of text values.
//!
//! Rows end with a newline, fields are separated by tabs, `\N` is NULL, and a backslash
//! escapes the rest (`\\`, `\t`, `\n`, `\r`, `\b`, `\f`, `\v`, octal `\NNN`, hex `\xHH`).
//! A raw newline never occurs inside a value, so rows can be split before unescaping, and
//! the stream's chunks may cut rows anywhere.

use crate::error::{Result, SourceError};

/// Splits a COPY text stream into rows; feed it chunks as they arrive.
#[derive(Default)]
pub struct CopyText {
    partial: Vec<u8>,
}

/// One row: a value per column, `None` for NULL.
pub type TextRow = Vec<Option<String>>;

impl CopyText {
    /// Decodes every complete row in `chunk` (plus what an earlier chunk left incomplete).
    pub fn feed(&mut self, chunk: &[u8], columns: usize, table: &str) -> Result<Vec<TextRow>> {
        self.partial.extend_from_slice(chunk);
        let Some(last_nl) = self.partial.iter().rposition(|b| *b == b'\n') else {
            return Ok(Vec::new());
        };
        let rest = self.partial.split_off(last_nl + 1);
        let complete = std::mem::replace(&mut self.partial, rest);
        complete[..complete.len() - 1]
            .split(|b| *b == b'\n')
            .map(|line| decode_row(line, columns, table))
            .collect()
    }

    /// Fails when the stream ended inside a row.
    pub fn finish(&self, table: &str) -> Result<()> {
        if self.partial.is_empty() {
            Ok(())
        } else {
            Err(SourceError::Protocol(format!(
                "COPY of {table} ended inside a row ({} bytes left)",
                self.partial.len()
            )))
        }
    }
}

fn decode_row(line: &[u8], columns: usize, table: &str) -> Result<TextRow> {
    let row: TextRow = line
        .split(|b| *b == b'\t')
        .map(|f| decode_field(f, table))
        .collect::<Result<_>>()?;
    if row.len() != columns {
        return Err(SourceError::Protocol(format!(
            "COPY of {table}: a row has {} fields, expected {columns}",
            row.len()
        )));
    }
    Ok(row)
}

fn decode_field(f: &[u8], table: &str) -> Result<Option<String>> {
    if f == b"\\N" {
        return Ok(None);
    }
    if !f.contains(&b'\\') {
        return utf8(f.to_vec(), table).map(Some);
    }
    let mut out = Vec::with_capacity(f.len());
    let mut i = 0;
    while i < f.len() {
        if f[i] != b'\\' || i + 1 == f.len() {
            out.push(f[i]);
            i += 1;
            continue;
        }
        let c = f[i + 1];
        i += 2;
        match c {
            b'b' => out.push(8),
            b'f' => out.push(12),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(11),
            b'0'..=b'7' => {
                let mut v = (c - b'0') as u32;
                let mut n = 1;
                while n < 3 && i < f.len() && (b'0'..=b'7').contains(&f[i]) {
                    v = v * 8 + (f[i] - b'0') as u32;
                    i += 1;
                    n += 1;
                }
                out.push(v as u8);
            }
            b'x' if i < f.len() && f[i].is_ascii_hexdigit() => {
                let mut v = 0u32;
                let mut n = 0;
                while n < 2 && i < f.len() && f[i].is_ascii_hexdigit() {
                    v = v * 16 + (f[i] as char).to_digit(16).expect("hex digit");
                    i += 1;
                    n += 1;
                }
                out.push(v as u8);
            }
            other => out.push(other),
        }
    }
    utf8(out, table).map(Some)
}

fn utf8(b: Vec<u8>, table: &str) -> Result<String> {
    String::from_utf8(b).map_err(|e| {
        SourceError::Protocol(format!(
            "COPY of {table}: a value is not UTF-8 ({e}); the database encoding must be UTF8"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// PostgreSQL's escaping of a text value in COPY text output (CopyAttributeOutText).
    fn escape(v: &Option<String>) -> String {
        match v {
            None => "\\N".into(),
            Some(s) => s
                .chars()
                .map(|c| match c {
                    '\\' => "\\\\".into(),
                    '\n' => "\\n".into(),
                    '\r' => "\\r".into(),
                    '\t' => "\\t".into(),
                    '\u{8}' => "\\b".into(),
                    '\u{c}' => "\\f".into(),
                    '\u{b}' => "\\v".into(),
                    c => c.to_string(),
                })
                .collect(),
        }
    }

    #[test]
    fn decodes_nulls_escapes_and_split_rows() {
        let mut c = CopyText::default();
        let rows = c.feed(b"1\t\\N\ta\\tb\\\\c\n2\tx", 3, "t").unwrap();
        assert_eq!(
            rows,
            vec![vec![Some("1".into()), None, Some("a\tb\\c".into())]]
        );
        let rows = c.feed(b"\\ny\t\\101\\x42\n", 3, "t").unwrap();
        assert_eq!(
            rows,
            vec![vec![
                Some("2".into()),
                Some("x\ny".into()),
                Some("AB".into())
            ]]
        );
        c.finish("t").unwrap();
        // The string "\N" (escaped as \\N) is not NULL.
        let rows = c.feed(b"\\\\N\n", 1, "t").unwrap();
        assert_eq!(rows, vec![vec![Some("\\N".into())]]);
    }

    #[test]
    fn a_wrong_field_count_or_a_cut_stream_is_an_error_naming_the_table() {
        let mut c = CopyText::default();
        let e = c.feed(b"1\t2\n", 3, "public.t").unwrap_err().to_string();
        assert!(e.contains("public.t") && e.contains("2 fields"), "{e}");
        let mut c = CopyText::default();
        c.feed(b"1\t2", 2, "t").unwrap();
        assert!(c.finish("t").is_err());
    }

    proptest! {
        #[test]
        fn round_trips_whatever_the_chunking(
            rows in prop::collection::vec(
                prop::collection::vec(prop::option::of(any::<String>()), 3), 0..20),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
        ) {
            let text: String = rows
                .iter()
                .map(|r| r.iter().map(escape).collect::<Vec<_>>().join("\t") + "\n")
                .collect();
            let bytes = text.as_bytes();
            let mut at: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
            at.sort();
            let mut c = CopyText::default();
            let mut got = Vec::new();
            let mut from = 0;
            for to in at.into_iter().chain([bytes.len()]) {
                got.extend(c.feed(&bytes[from..to], 3, "t").unwrap());
                from = to;
            }
            c.finish("t").unwrap();
            prop_assert_eq!(got, rows);
        }
    }
}
