//! `storage.allowed_prefixes`: the URI prefixes under which tables may live. A table URI
//! (`table create`, a source's tables, configured tables, every worker request) outside
//! them is refused before any I/O, so a caller cannot make a process touch an arbitrary
//! location its object-store credentials reach. An empty list allows anything (local dev).
//!
//! URIs are compared parsed, never as strings: scheme, host (the bucket) and port must be
//! equal and the prefix's path segments must be the leading segments of the URI's path, so
//! `s3://lake/a` covers `s3://lake/a/t` but not `s3://lake/ab` or `s3://lake2/a`. A `..` or
//! `.` segment (also percent-encoded) is refused outright rather than resolved: a URI that
//! needs resolving to be judged is not one a table should have.

use std::path::{Component, Path};

use url::Url;

use crate::error::{Error, Result};

/// The parsed list of allowed prefixes.
#[derive(Debug, Clone, Default)]
pub struct AllowedPrefixes {
    prefixes: Vec<Normalized>,
}

/// A URI reduced to what the comparison looks at.
#[derive(Debug, Clone, PartialEq)]
struct Normalized {
    scheme: String,
    host: String,
    port: Option<u16>,
    segments: Vec<String>,
}

impl AllowedPrefixes {
    /// Parses the configured prefixes; a prefix that is not a clean URI or path is a
    /// configuration error naming it.
    pub fn new(list: &[String]) -> Result<AllowedPrefixes> {
        let prefixes = list
            .iter()
            .map(|p| {
                normalize(p)
                    .map_err(|why| Error::Config(format!("storage.allowed_prefixes: '{p}': {why}")))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AllowedPrefixes { prefixes })
    }

    /// Whether any prefix is configured (none = anything is allowed).
    pub fn is_restricted(&self) -> bool {
        !self.prefixes.is_empty()
    }

    /// Refuses `uri` (of table `table`) unless it lies under one of the prefixes. Touches
    /// no file system and no store.
    pub fn check(&self, table: &str, uri: &str) -> Result<()> {
        if !self.is_restricted() {
            return Ok(());
        }
        let denied = |why: String| Error::UriNotAllowed {
            table: table.to_string(),
            uri: uri.to_string(),
            message: why,
        };
        let n = normalize(uri).map_err(denied)?;
        if self.prefixes.iter().any(|p| p.covers(&n)) {
            Ok(())
        } else {
            Err(denied(
                "it is not under any of storage.allowed_prefixes".into(),
            ))
        }
    }
}

/// Checks `uri` against the configured list in one call (parses the list each time: the
/// callers are rare admin operations).
pub fn check_uri(allowed: &[String], table: &str, uri: &str) -> Result<()> {
    AllowedPrefixes::new(allowed)?.check(table, uri)
}

impl Normalized {
    fn covers(&self, other: &Normalized) -> bool {
        self.scheme == other.scheme
            && self.host == other.host
            && self.port == other.port
            && other.segments.len() >= self.segments.len()
            && self
                .segments
                .iter()
                .zip(&other.segments)
                .all(|(a, b)| a == b)
    }
}

fn normalize(uri: &str) -> std::result::Result<Normalized, String> {
    let url = if uri.contains("://") {
        // Dot segments are checked on the raw text: URL parsing would resolve them away.
        check_segments(uri.split(['/', '\\']))?;
        Url::parse(uri).map_err(|e| format!("not a URI: {e}"))?
    } else {
        let path = Path::new(uri);
        if path
            .components()
            .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
        {
            return Err("'..' and '.' segments are not allowed".into());
        }
        // Lexically absolute (no file-system access: the path need not exist).
        let abs = std::path::absolute(path).map_err(|e| format!("not a usable path: {e}"))?;
        Url::from_directory_path(&abs).map_err(|_| "not an absolute path".to_string())?
    };
    let segments: Vec<String> = url
        .path()
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| percent_decode(s))
        .collect::<std::result::Result<_, _>>()?;
    check_segments(segments.iter().map(String::as_str))?;
    let scheme = match url.scheme() {
        // s3a is another spelling of s3 (the store treats them alike).
        "s3a" => "s3".to_string(),
        s => s.to_string(),
    };
    Ok(Normalized {
        scheme,
        host: url.host_str().unwrap_or_default().to_ascii_lowercase(),
        port: url.port(),
        segments,
    })
}

fn check_segments<'a>(segments: impl Iterator<Item = &'a str>) -> std::result::Result<(), String> {
    for s in segments {
        let decoded = percent_decode(s)?;
        if decoded == ".." || decoded == "." {
            return Err("'..' and '.' segments are not allowed".into());
        }
    }
    Ok(())
}

/// Decodes `%XX` escapes (URIs, connection strings); an error names the text.
pub(crate) fn percent_decode(s: &str) -> std::result::Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent-encoding in '{s}'"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("'{s}' is not UTF-8 once decoded"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(list: &[&str]) -> AllowedPrefixes {
        AllowedPrefixes::new(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn prefixes_compare_parsed_uris_on_segment_boundaries() {
        let a = allowed(&["s3://lake/shop", "/data/lake/", "file:///srv/t"]);
        for ok in [
            "s3://lake/shop",
            "s3://lake/shop/orders",
            "s3a://lake/shop/orders/",
            "S3://LAKE/shop/x",
            "/data/lake/orders",
            "file:///data/lake/orders",
            "/srv/t/x",
        ] {
            a.check("t", ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "s3://lake/shopping",
            "s3://lake2/shop/orders",
            "s3://lake/other",
            "gs://lake/shop/orders",
            "s3://lake/shop/../secrets",
            "s3://lake/shop/%2e%2e/secrets",
            "/data/lake/../etc",
            "/data/lake2/orders",
            "file:///data/lake/./x",
            "/data",
            "relative/dir",
        ] {
            let e = a.check("t", bad).unwrap_err();
            assert_eq!(e.code(), tonic::Code::PermissionDenied, "{bad}: {e}");
            assert!(e.to_string().contains(bad), "{e}");
        }
        assert!(AllowedPrefixes::new(&["s3://lake/../x".into()]).is_err());
        // No prefixes: anything goes (local development).
        allowed(&[]).check("t", "/anywhere/../at/all").unwrap();
    }
}
