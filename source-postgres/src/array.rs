//! PostgreSQL's text form of arrays (`array_out`): `{1,2,NULL}`, `{"a b","x\"y",NULL}`,
//! `{}`, with an optional dimension decoration (`[0:2]={1,2,3}`) for arrays whose lower
//! bound is not 1.
//!
//! Only one-dimensional values are accepted: a Delta column is a flat list, and PostgreSQL
//! does not enforce dimensions per column, so a multi-dimensional value (`{{1,2},{3,4}}`)
//! is an error naming the value rather than a silent flattening.

/// Splits an array's text form into its elements' text forms (`None` = NULL element).
/// Errors describe what is wrong; the caller adds the table and column.
pub fn parse(text: &str) -> Result<Vec<Option<String>>, String> {
    let bad = |why: &str| format!("array value '{text}': {why}");
    let mut s = text.trim();
    if s.starts_with('[') {
        // The decoration only restates bounds; the elements are what the list keeps.
        let eq = s
            .find('=')
            .ok_or_else(|| bad("dimension decoration without '='"))?;
        if s[..eq].matches('[').count() > 1 {
            return Err(bad(MULTI_DIM));
        }
        s = s[eq + 1..].trim_start();
    }
    let body = s
        .strip_prefix('{')
        .and_then(|b| b.strip_suffix('}'))
        .ok_or_else(|| bad("not enclosed in braces"))?;
    let mut out = Vec::new();
    if body.trim().is_empty() {
        return Ok(out);
    }
    let mut chars = body.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_ascii_whitespace()).is_some() {}
        match chars.peek() {
            Some('{') => return Err(bad(MULTI_DIM)),
            Some('"') => {
                chars.next();
                let mut v = String::new();
                loop {
                    match chars.next() {
                        Some('\\') => v.push(chars.next().ok_or_else(|| bad("dangling '\\'"))?),
                        Some('"') => break,
                        Some(c) => v.push(c),
                        None => return Err(bad("unterminated quoted element")),
                    }
                }
                while chars.next_if(|c| c.is_ascii_whitespace()).is_some() {}
                out.push(Some(v));
            }
            _ => {
                let mut v = String::new();
                // Escaped characters count as content even where whitespace is trimmed.
                let mut kept = 0;
                loop {
                    match chars.peek() {
                        None | Some(',') => break,
                        Some('{' | '}' | '"') => return Err(bad("unexpected brace or quote")),
                        Some('\\') => {
                            chars.next();
                            v.push(chars.next().ok_or_else(|| bad("dangling '\\'"))?);
                            kept = v.len();
                        }
                        Some(&c) => {
                            chars.next();
                            v.push(c);
                            if !c.is_ascii_whitespace() {
                                kept = v.len();
                            }
                        }
                    }
                }
                v.truncate(kept);
                if v.is_empty() {
                    return Err(bad("empty unquoted element"));
                }
                // Only an unquoted NULL is a null; "NULL" in quotes is the string.
                out.push((!v.eq_ignore_ascii_case("NULL")).then_some(v));
            }
        }
        match chars.next() {
            None => return Ok(out),
            Some(',') => {}
            Some(c) => return Err(bad(&format!("unexpected '{c}' after an element"))),
        }
    }
}

const MULTI_DIM: &str = "multi-dimensional arrays are not supported (a PostgreSQL array column \
                         is mirrored as a one-dimensional list)";

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// PostgreSQL's `array_out`: an element is quoted when it is empty, spells NULL, or
    /// holds a brace, quote, backslash, the delimiter or whitespace; quotes and backslashes
    /// inside quotes are escaped with a backslash.
    fn format(elems: &[Option<String>]) -> String {
        let parts: Vec<String> = elems
            .iter()
            .map(|e| match e {
                None => "NULL".to_string(),
                Some(v) => {
                    let quote = v.is_empty()
                        || v.eq_ignore_ascii_case("NULL")
                        || v.chars().any(|c| {
                            matches!(c, '{' | '}' | ',' | '"' | '\\' | ' ' | '\t' | '\n' | '\r')
                                || c == '\x0b'
                                || c == '\x0c'
                        });
                    if quote {
                        let mut q = String::from("\"");
                        for c in v.chars() {
                            if c == '"' || c == '\\' {
                                q.push('\\');
                            }
                            q.push(c);
                        }
                        q.push('"');
                        q
                    } else {
                        v.clone()
                    }
                }
            })
            .collect();
        format!("{{{}}}", parts.join(","))
    }

    fn s(v: &str) -> Option<String> {
        Some(v.to_string())
    }

    #[test]
    fn parses_what_postgres_prints() {
        assert_eq!(parse("{}").unwrap(), Vec::<Option<String>>::new());
        assert_eq!(parse("{1,2,NULL}").unwrap(), vec![s("1"), s("2"), None]);
        assert_eq!(
            parse(r#"{"a b","x\"y",NULL,"NULL","",c}"#).unwrap(),
            vec![s("a b"), s("x\"y"), None, s("NULL"), s(""), s("c")]
        );
        assert_eq!(
            parse(r#"{"a,b","{}","\\"}"#).unwrap(),
            vec![s("a,b"), s("{}"), s("\\")]
        );
        // bytea elements are escaped twice: array_out escapes the backslash of \x.
        assert_eq!(
            parse(r#"{"\\x00ff",NULL}"#).unwrap(),
            vec![s("\\x00ff"), None]
        );
        assert_eq!(
            parse(r#"{"2024-01-02 03:04:05+00"}"#).unwrap(),
            vec![s("2024-01-02 03:04:05+00")]
        );
        assert_eq!(
            parse("[0:2]={1,2,3}").unwrap(),
            vec![s("1"), s("2"), s("3")]
        );
        // array_in's leniency: whitespace around elements, lower-case null.
        assert_eq!(parse("{ 1 , null }").unwrap(), vec![s("1"), None]);
    }

    #[test]
    fn refuses_multi_dimensional_and_malformed_values() {
        for bad in ["{{1,2},{3,4}}", "[1:2][1:2]={{1,2},{3,4}}"] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains("multi-dimensional") && e.contains(bad), "{e}");
        }
        for bad in ["1,2", "{1,2", r#"{"a}"#, "{a\"b}", "{1,,2}", r#"{"a"b}"#] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }

    proptest! {
        #[test]
        fn round_trips_postgres_quoting(
            elems in proptest::collection::vec(
                proptest::option::of(prop_oneof![
                    "[a-z0-9]{0,4}",
                    "(?i)null",
                    r#"[ a-z{}",\\\t\n]{0,6}"#,
                    "\\PC{0,5}",
                ]),
                0..8,
            )
        ) {
            let text = format(&elems);
            prop_assert_eq!(parse(&text).unwrap(), elems, "{}", text);
        }
    }
}
