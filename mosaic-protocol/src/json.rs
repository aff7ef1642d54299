//! JSON text in, numbers unchanged.
//!
//! Every number a device or Hive sends must arrive at the far end as the same
//! number. `serde_json` (built with `float_roundtrip` in this workspace) reads every
//! float exactly and every integer in `i64::MIN..=u64::MAX` exactly, but it turns an
//! integer literal outside that range into the nearest float without a word: AMQP
//! has no wider integer, so such a number cannot travel unchanged. [`parse_exact`]
//! parses with `serde_json` and then refuses those literals, anywhere in the text,
//! with [`Error::OutOfRange`]; [`check_integers`] is the scan alone, for callers
//! that deserialize into their own types.
//!
//! ```
//! use mosaic_protocol::json::{Error, parse_exact};
//!
//! assert_eq!(parse_exact("[18446744073709551615]").unwrap()[0], u64::MAX);
//! assert!(matches!(parse_exact("[18446744073709551616]"), Err(Error::OutOfRange(_))));
//! // Digits inside strings are text, not numbers.
//! assert!(parse_exact(r#"{"n":"99999999999999999999999"}"#).is_ok());
//! ```

use serde::Serialize;
use serde_json::Value;

/// Longest prefix of an offending literal that error messages quote.
const QUOTED_DIGITS: usize = 32;

/// An integer literal outside `i64::MIN..=u64::MAX`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "integer {quoted} at byte {offset} is outside the range numbers are carried in \
     (-9223372036854775808 to 18446744073709551615); send it as a string"
)]
pub struct OutOfRange {
    /// Byte offset of the literal in the text.
    pub offset: usize,
    /// Length of the literal, in bytes.
    pub len: usize,
    /// The literal, or its first digits followed by `…` and its length when long.
    quoted: String,
}

/// Why text was refused by [`parse_exact`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Not valid JSON.
    #[error("{0}")]
    Syntax(#[from] serde_json::Error),
    /// Valid JSON with an integer that cannot travel unchanged.
    #[error(transparent)]
    OutOfRange(#[from] OutOfRange),
}

/// Parses JSON text exactly: floats to the nearest `f64` (correctly rounded),
/// integers in `i64::MIN..=u64::MAX` as integers, and any other integer literal
/// refused with [`Error::OutOfRange`].
pub fn parse_exact(text: &str) -> Result<Value, Error> {
    let value = serde_json::from_str(text)?;
    check_integers(text.as_bytes())?;
    Ok(value)
}

/// Scans JSON text once for integer literals (number tokens without `.`, `e` or `E`)
/// outside `i64::MIN..=u64::MAX`; the first one found is the error.
///
/// String contents, escapes included, are skipped. The scan never fails on text
/// that is not JSON (it reports what it finds), so call it on text a JSON parser
/// accepted when the answer matters.
pub fn check_integers(text: &[u8]) -> Result<(), OutOfRange> {
    let mut i = 0;
    while i < text.len() {
        match text[i] {
            b'"' => {
                i += 1;
                while i < text.len() {
                    match text[i] {
                        b'\\' => i += 2,
                        b'"' => break,
                        _ => i += 1,
                    }
                }
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                let mut integer = true;
                i += 1;
                while i < text.len() {
                    match text[i] {
                        b'0'..=b'9' => {}
                        b'.' | b'e' | b'E' | b'+' | b'-' => integer = false,
                        _ => break,
                    }
                    i += 1;
                }
                let literal = &text[start..i];
                if integer && !integer_in_range(literal) {
                    return Err(out_of_range(start, literal));
                }
            }
            _ => i += 1,
        }
    }
    Ok(())
}

/// Whether an integer literal (`-`? digits) lies in `i64::MIN..=u64::MAX`.
fn integer_in_range(literal: &[u8]) -> bool {
    let (negative, digits) = match literal.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, literal),
    };
    let first = digits
        .iter()
        .position(|&d| d != b'0')
        .unwrap_or(digits.len());
    let digits = &digits[first..];
    let limit: &[u8] = if negative {
        b"9223372036854775808"
    } else {
        b"18446744073709551615"
    };
    digits.len() < limit.len() || (digits.len() == limit.len() && digits <= limit)
}

fn out_of_range(offset: usize, literal: &[u8]) -> OutOfRange {
    // The literal is ASCII (`-` and digits).
    let text = String::from_utf8_lossy(literal);
    let quoted = if literal.len() > QUOTED_DIGITS {
        format!("{}… ({} characters)", &text[..QUOTED_DIGITS], literal.len())
    } else {
        text.into_owned()
    };
    OutOfRange {
        offset,
        len: literal.len(),
        quoted,
    }
}

/// How many bytes `value` takes as compact JSON text, without building the text.
pub fn text_len<T: Serialize + ?Sized>(value: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing to a counter cannot fail, and JSON values and maps always serialize.
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn the_edges_of_the_range() {
        for ok in [
            "18446744073709551615",
            "-9223372036854775808",
            "0",
            "-0",
            "9223372036854775808",
            "[1,-1,{\"a\":12}]",
            "1e400000000000000000000",
            "-1.5e-99999999999999999999999",
            "123456789012345678901234567890.5",
        ] {
            assert!(check_integers(ok.as_bytes()).is_ok(), "{ok}");
        }
        for bad in [
            "18446744073709551616",
            "-9223372036854775809",
            "100000000000000000000",
            "[0,{\"k\":[1,2,-99999999999999999999]}]",
        ] {
            assert!(check_integers(bad.as_bytes()).is_err(), "{bad}");
            assert!(
                matches!(parse_exact(bad), Err(Error::OutOfRange(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_error_names_the_literal_and_where_it_is() {
        let e = check_integers(br#"{"a": 18446744073709551616}"#).unwrap_err();
        assert_eq!((e.offset, e.len), (6, 20));
        assert!(e.to_string().contains("18446744073709551616"), "{e}");
        let long = format!("[{}]", "9".repeat(5000));
        let e = check_integers(long.as_bytes()).unwrap_err();
        let message = e.to_string();
        assert!(message.contains("5000 characters"), "{message}");
        assert!(message.len() < 300, "{message}");
    }

    #[test]
    fn strings_and_escapes_are_skipped() {
        for ok in [
            r#""99999999999999999999999""#,
            r#"{"99999999999999999999999":1}"#,
            r#"["\"99999999999999999999999"]"#,
            r#"["\\", 1]"#,
            r#"["\u0022", 2]"#,
            r#"["é99999999999999999999999🦀"]"#,
        ] {
            assert!(parse_exact(ok).is_ok(), "{ok}");
        }
        assert!(parse_exact(r#"["\\", 99999999999999999999999]"#).is_err());
        assert!(parse_exact(r#"["\"", 99999999999999999999999]"#).is_err());
    }

    #[test]
    fn not_json_is_a_syntax_error() {
        assert!(matches!(parse_exact("{"), Err(Error::Syntax(_))));
        // The scan alone terminates on anything.
        for junk in ["\"", "\"\\", "-", "--", "1e", "\"abc\\\""] {
            let _ = check_integers(junk.as_bytes());
        }
    }

    #[test]
    fn floats_are_read_exactly() {
        // Without `float_roundtrip`, serde_json reads these one bit off.
        for text in [
            "1.0715660391465826e-75",
            "2.2250738585072011e-308",
            "-1.81996730402717e-179",
        ] {
            let v = parse_exact(text).unwrap();
            let exact: f64 = text.parse().unwrap();
            assert_eq!(v.as_f64().unwrap().to_bits(), exact.to_bits(), "{text}");
        }
        let v = parse_exact("[-0.0, 5e-324, 1.7976931348623157e308, 0.30000000000000004]").unwrap();
        assert_eq!(v[0].as_f64().unwrap().to_bits(), (-0.0f64).to_bits());
        assert_eq!(v[1].as_f64(), Some(5e-324));
        assert_eq!(v[2].as_f64(), Some(f64::MAX));
        assert_eq!(v[3].as_f64(), Some(0.1 + 0.2));
    }

    #[test]
    fn text_len_is_the_length_of_the_text() {
        let v = json!({"a": [1, 2.5, null, "é\"x"], "b": {"c": u64::MAX}});
        assert_eq!(text_len(&v), serde_json::to_string(&v).unwrap().len());
        assert_eq!(text_len(&json!({})), 2);
    }

    /// A JSON tree whose integer literals are written as text, so the generator can
    /// write literals serde_json would never produce (out of range ones).
    #[derive(Debug, Clone)]
    enum Node {
        Integer(i128),
        Digits(bool, String),
        Float(f64),
        Text(String),
        Array(Vec<Node>),
        Object(Vec<(String, Node)>),
    }

    impl Node {
        fn write(&self, out: &mut String) {
            match self {
                Node::Integer(i) => out.push_str(&i.to_string()),
                Node::Digits(negative, digits) => {
                    if *negative {
                        out.push('-');
                    }
                    out.push_str(digits);
                }
                Node::Float(f) => out.push_str(&serde_json::to_string(f).unwrap()),
                Node::Text(s) => out.push_str(&serde_json::to_string(s).unwrap()),
                Node::Array(items) => {
                    out.push('[');
                    for (n, item) in items.iter().enumerate() {
                        if n > 0 {
                            out.push_str(", ");
                        }
                        item.write(out);
                    }
                    out.push(']');
                }
                Node::Object(entries) => {
                    out.push('{');
                    for (n, (k, v)) in entries.iter().enumerate() {
                        if n > 0 {
                            out.push(',');
                        }
                        out.push_str(&serde_json::to_string(k).unwrap());
                        out.push(':');
                        v.write(out);
                    }
                    out.push('}');
                }
            }
        }

        fn out_of_range(&self) -> bool {
            match self {
                Node::Integer(i) => *i < i128::from(i64::MIN) || *i > i128::from(u64::MAX),
                Node::Digits(..) => true,
                Node::Float(_) | Node::Text(_) => false,
                Node::Array(items) => items.iter().any(Node::out_of_range),
                Node::Object(entries) => entries.iter().any(|(_, v)| v.out_of_range()),
            }
        }
    }

    /// Strings made to trip a careless scanner: digits, quotes, backslashes.
    fn tricky_text() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "[0-9\"\\\\e.+-]{0,40}",
            "\\\\*\"?[0-9]{19,30}\\\\*",
        ]
    }

    fn node() -> impl Strategy<Value = Node> {
        let integer = prop_oneof![
            any::<i64>().prop_map(i128::from),
            any::<u64>().prop_map(i128::from),
            (i128::from(i64::MIN) - 3..=i128::from(i64::MIN) + 3),
            (i128::from(u64::MAX) - 3..=i128::from(u64::MAX) + 3),
            any::<i128>(),
        ];
        let leaf = prop_oneof![
            3 => integer.prop_map(Node::Integer),
            1 => (any::<bool>(), "[1-9][0-9]{20,60}").prop_map(|(n, d)| Node::Digits(n, d)),
            2 => any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Node::Float),
            3 => tricky_text().prop_map(Node::Text),
        ];
        leaf.prop_recursive(6, 64, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Node::Array),
                prop::collection::vec((tricky_text(), inner), 0..6).prop_map(Node::Object),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        /// Refused exactly when some integer literal is out of range; accepted text
        /// parses to the same integers.
        #[test]
        fn refuses_exactly_the_out_of_range_integers(tree in node()) {
            let mut text = String::new();
            tree.write(&mut text);
            let result = parse_exact(&text);
            if tree.out_of_range() {
                prop_assert!(matches!(result, Err(Error::OutOfRange(_))), "{text}: {result:?}");
            } else {
                prop_assert!(result.is_ok(), "{text}: {result:?}");
            }
        }

        #[test]
        fn every_integer_in_range_is_kept(i in prop_oneof![
            any::<i64>().prop_map(i128::from),
            any::<u64>().prop_map(i128::from),
        ]) {
            let text = format!("[{i}]");
            let v = parse_exact(&text).unwrap();
            let n = &v[0];
            let back = n.as_i64().map(i128::from).or_else(|| n.as_u64().map(i128::from));
            prop_assert_eq!(back, Some(i));
        }

        #[test]
        fn every_integer_out_of_range_is_refused(i in prop_oneof![
            i128::MIN..i128::from(i64::MIN),
            i128::from(u64::MAX) + 1..=i128::MAX,
        ]) {
            let text = format!(r#"{{"k":"{i}","v":{i}}}"#);
            let e = check_integers(text.as_bytes()).unwrap_err();
            prop_assert_eq!(&text[e.offset..e.offset + e.len], i.to_string());
        }

        #[test]
        fn the_scan_never_panics(bytes in any::<Vec<u8>>()) {
            let _ = check_integers(&bytes);
        }
    }
}
