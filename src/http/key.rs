//! Parsing and validating the `Idempotency-Key` header.
//!
//! The IETF draft makes the field an RFC 8941 sf-string, so it is quoted on the wire
//! (`Idempotency-Key: "8e03978e-40d5-43e8-bc93-6894a57f9324"`); most clients send the bare
//! value. Both are accepted, and name the same key:
//!
//! * A value that starts with `"` is an sf-string: it must end with the closing `"`, may contain
//!   spaces and visible ASCII, and escapes only `\"` and `\\`.
//! * Any other value is the key verbatim, and must be visible ASCII (no spaces) without a
//!   comma (`a,b` is what a proxy makes of two merged `Idempotency-Key` fields).
//!
//! The key (after unquoting) must hold 1 to `max_len` characters [[`defaults::MAX_KEY_LEN`](crate::defaults::MAX_KEY_LEN)].
//!
//! ```
//! use tower_idempotency::IdempotencyKey;
//!
//! let bare = IdempotencyKey::parse(b"8e03978e-40d5", 255).unwrap();
//! let quoted = IdempotencyKey::parse(br#""8e03978e-40d5""#, 255).unwrap();
//! assert_eq!(bare, quoted);
//! assert_eq!(IdempotencyKey::parse(br#""a \"b\"""#, 255).unwrap().as_str(), r#"a "b""#);
//! assert!(IdempotencyKey::parse(b"", 255).is_err());
//! ```

use std::borrow::Cow;
use std::fmt;

/// A validated idempotency key: see [`IdempotencyKey::parse`] for the rules.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

/// Why an `Idempotency-Key` value was refused (each answers 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The value (or the quoted string) is empty.
    #[error("the idempotency key is empty")]
    Empty,
    /// More than the allowed number of characters.
    #[error("the idempotency key is longer than {max} characters")]
    TooLong {
        /// The limit.
        max: usize,
    },
    /// A byte outside visible ASCII (or a space outside quotes).
    #[error("the idempotency key may only contain visible ASCII characters")]
    InvalidCharacter,
    /// An sf-string without its closing quote, with text after it, or with a bad escape.
    #[error("the idempotency key is not a valid quoted string")]
    MalformedQuotedString,
    /// More than one `Idempotency-Key` field in the request.
    #[error("the request carries more than one idempotency key")]
    Multiple,
    /// A bare key with a comma: it cannot be told apart from two fields that a proxy merged
    /// into one (`a, b`). Quote a key that must contain a comma (`"a,b"`).
    #[error("the idempotency key contains a comma (send one key, or quote it as a string)")]
    Comma,
}

impl IdempotencyKey {
    /// Parses a raw header value (quoted sf-string or bare) into a key of at most `max_len`
    /// characters.
    pub fn parse(value: &[u8], max_len: usize) -> Result<Self, KeyError> {
        parse_text(value, max_len).map(Self::from_text)
    }

    /// A key from text that [`parse_text`] accepted.
    fn from_text(text: Cow<'_, str>) -> Self {
        Self(text.into_owned())
    }

    /// The key, unquoted.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// [`IdempotencyKey::parse`] without the copy: a bare key is the header's own bytes, a quoted
/// one its unquoted text.
fn parse_text(value: &[u8], max_len: usize) -> Result<Cow<'_, str>, KeyError> {
    match value.first() {
        Some(b'"') => parse_sf_string(&value[1..], max_len).map(Cow::Owned),
        _ => {
            if value.is_empty() {
                return Err(KeyError::Empty);
            }
            if !value.iter().all(|b| (0x21..=0x7e).contains(b)) {
                return Err(KeyError::InvalidCharacter);
            }
            if value.contains(&b',') {
                return Err(KeyError::Comma);
            }
            if value.len() > max_len {
                return Err(KeyError::TooLong { max: max_len });
            }
            // All visible ASCII, so valid UTF-8.
            std::str::from_utf8(value)
                .map(Cow::Borrowed)
                .map_err(|_| KeyError::InvalidCharacter)
        }
    }
}

/// What a request's key header says: the key's text is borrowed from the header when it is
/// bare (see [`HeldKey`] for why nothing copies it).
#[derive(Debug)]
pub(crate) enum KeyHeader<'a> {
    Missing,
    Present(Cow<'a, str>),
    Invalid(KeyError),
}

/// A guarded request's key until its handler runs. Most store keys end with the key itself
/// (`…|<key>`), so the key needs no copy of its own: a replay, which never hands the key to a
/// handler, copies it nowhere. A store key too long to keep whole is a digest, and then the
/// key is kept apart.
#[derive(Debug)]
pub(crate) enum HeldKey {
    /// The last this many bytes of the store key.
    Suffix(usize),
    /// The store key is a digest.
    Owned(IdempotencyKey),
}

impl HeldKey {
    /// The key, for the handler's extensions: `store_key` is the one built with it.
    pub(crate) fn into_key(self, store_key: &str) -> IdempotencyKey {
        match self {
            HeldKey::Suffix(len) => IdempotencyKey(store_key[store_key.len() - len..].to_owned()),
            HeldKey::Owned(key) => key,
        }
    }
}

/// The key of a request whose key header admission accepted, read again: for the rare path
/// that runs the handler after the store key has gone (a store error, failing open).
pub(crate) fn key_of(
    headers: &http::HeaderMap,
    name: &http::HeaderName,
    max_len: usize,
) -> Option<IdempotencyKey> {
    match read(headers, name, max_len) {
        KeyHeader::Present(key) => Some(IdempotencyKey::from_text(key)),
        _ => None,
    }
}

/// The store key of a request (see [`store_key`]) and its key as held until the handler runs.
pub(crate) fn store_key_holding(
    scope: &str,
    method: &http::Method,
    path: &str,
    key: Cow<'_, str>,
) -> (String, HeldKey) {
    let store_key = store_key(scope, method, path, &key);
    // A composite key that is not a digest ends with the key (a digest starts with `~`, which
    // no composite key does: see `protocol::composite_key`).
    let held = if store_key.starts_with('~') {
        HeldKey::Owned(IdempotencyKey::from_text(key))
    } else {
        debug_assert!(store_key.ends_with(&*key));
        HeldKey::Suffix(key.len())
    };
    (store_key, held)
}

/// The store key of an HTTP request: `scope` is what the layer's scope function returns
/// (empty without one), `path` the request path without its query, `key` the idempotency key
/// as the layer reads it (unquoted: `order-42` for `Idempotency-Key: "order-42"`).
/// Re-exported as [`admin::http_key`](crate::admin::http_key).
pub fn store_key(scope: &str, method: &http::Method, path: &str, key: &str) -> String {
    crate::protocol::composite_key("", &[scope, method.as_str(), path], key)
}

/// Up to this many header values, [`read`] scans the headers instead of looking the name up.
pub(crate) const SCANNED: usize = 8;

/// A request's `content-type` and `content-length`, found in one pass over a request with
/// few headers (two lookups hash twice; see [`read`]).
pub(crate) fn content_headers(
    headers: &http::HeaderMap,
) -> (Option<&http::HeaderValue>, Option<&http::HeaderValue>) {
    use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
    if headers.len() > SCANNED {
        return (headers.get(CONTENT_TYPE), headers.get(CONTENT_LENGTH));
    }
    let (mut content_type, mut content_length) = (None, None);
    for (name, value) in headers {
        if *name == CONTENT_TYPE {
            content_type = content_type.or(Some(value));
        } else if *name == CONTENT_LENGTH {
            content_length = content_length.or(Some(value));
        }
    }
    (content_type, content_length)
}

/// Reads the key from the request head: absent, one valid key, or why it is refused.
pub(crate) fn read<'a>(
    headers: &'a http::HeaderMap,
    name: &http::HeaderName,
    max_len: usize,
) -> KeyHeader<'a> {
    fn first_and_more<'a>(
        mut values: impl Iterator<Item = &'a http::HeaderValue>,
    ) -> (Option<&'a http::HeaderValue>, bool) {
        (values.next(), values.next().is_some())
    }
    let (value, repeated) = if headers.len() <= SCANNED {
        // A request with a few headers is scanned: comparing names is cheaper than hashing a
        // header name that is not a standard one (which `HeaderMap` does on every lookup).
        first_and_more(headers.iter().filter(|(n, _)| *n == name).map(|(_, v)| v))
    } else {
        first_and_more(headers.get_all(name).iter())
    };
    let Some(value) = value else {
        return KeyHeader::Missing;
    };
    if repeated {
        return KeyHeader::Invalid(KeyError::Multiple);
    }
    match parse_text(value.as_bytes(), max_len) {
        Ok(key) => KeyHeader::Present(key),
        Err(error) => KeyHeader::Invalid(error),
    }
}

/// Parses the rest of an sf-string after its opening quote.
fn parse_sf_string(rest: &[u8], max_len: usize) -> Result<String, KeyError> {
    let mut out = String::with_capacity(rest.len().min(max_len));
    let mut bytes = rest.iter();
    loop {
        match bytes.next() {
            None => return Err(KeyError::MalformedQuotedString),
            Some(b'"') => break,
            Some(b'\\') => match bytes.next() {
                Some(&c @ (b'"' | b'\\')) => out.push(char::from(c)),
                _ => return Err(KeyError::MalformedQuotedString),
            },
            Some(&c) if (0x20..=0x7e).contains(&c) => out.push(char::from(c)),
            Some(_) => return Err(KeyError::InvalidCharacter),
        }
        if out.len() > max_len {
            return Err(KeyError::TooLong { max: max_len });
        }
    }
    if bytes.next().is_some() {
        return Err(KeyError::MalformedQuotedString);
    }
    if out.is_empty() {
        return Err(KeyError::Empty);
    }
    Ok(out)
}

impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// `content-type` and `content-length` are found as `HeaderMap::get` finds them (the
    /// first value of each, or none), on both sides of the scan's threshold.
    #[test]
    fn content_headers_read_as_lookups_do() {
        use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
        for others in [0, 1, SCANNED - 2, SCANNED, SCANNED + 1, 40] {
            for (types, lengths) in [(0, 0), (1, 0), (0, 1), (1, 1), (2, 2)] {
                let mut headers = http::HeaderMap::new();
                for i in 0..others {
                    let other = http::HeaderName::try_from(format!("x-other-{i}")).unwrap();
                    headers.insert(other, http::HeaderValue::from_static("v"));
                }
                for i in 0..types {
                    headers.append(CONTENT_TYPE, format!("type/{i}").parse().unwrap());
                }
                for i in 0..lengths {
                    headers.append(CONTENT_LENGTH, i.into());
                }
                assert_eq!(
                    content_headers(&headers),
                    (headers.get(CONTENT_TYPE), headers.get(CONTENT_LENGTH)),
                    "{others} others, {types} types, {lengths} lengths"
                );
            }
        }
    }

    /// Whether a request with `others` unrelated headers and `keys` key headers reads as
    /// missing, present or repeated: the same on both sides of the scan's threshold.
    #[test]
    fn the_key_header_reads_the_same_in_small_and_large_requests() {
        let name = http::HeaderName::from_static("idempotency-key");
        for others in [0, 1, SCANNED - 1, SCANNED, SCANNED + 1, 40] {
            for keys in 0..3 {
                let mut headers = http::HeaderMap::new();
                for i in 0..others {
                    let other = http::HeaderName::try_from(format!("x-other-{i}")).unwrap();
                    headers.insert(other, http::HeaderValue::from_static("v"));
                }
                headers.insert(http::header::CONTENT_TYPE, "text/plain".parse().unwrap());
                for k in 0..keys {
                    headers.append(&name, format!("key-{k}").parse().unwrap());
                }
                let read = read(&headers, &name, 255);
                let case = format!("{others} other headers, {keys} key headers: {read:?}");
                match keys {
                    0 => assert!(matches!(read, KeyHeader::Missing), "{case}"),
                    1 => assert!(
                        matches!(&read, KeyHeader::Present(key) if key == "key-0"),
                        "{case}"
                    ),
                    _ => assert!(
                        matches!(read, KeyHeader::Invalid(KeyError::Multiple)),
                        "{case}"
                    ),
                }
            }
        }
    }

    #[test]
    fn rejects_each_kind_of_bad_value() {
        assert_eq!(IdempotencyKey::parse(b"a,b", 255), Err(KeyError::Comma));
        assert_eq!(
            IdempotencyKey::parse(b"\"a,b\"", 255).unwrap().as_str(),
            "a,b",
            "a quoted key may hold a comma"
        );
        assert_eq!(IdempotencyKey::parse(b"", 255), Err(KeyError::Empty));
        assert_eq!(IdempotencyKey::parse(b"\"\"", 255), Err(KeyError::Empty));
        assert_eq!(
            IdempotencyKey::parse(b"a b", 255),
            Err(KeyError::InvalidCharacter)
        );
        assert_eq!(
            IdempotencyKey::parse(b"a\tb", 255),
            Err(KeyError::InvalidCharacter)
        );
        assert_eq!(
            IdempotencyKey::parse("caf\u{e9}".as_bytes(), 255),
            Err(KeyError::InvalidCharacter)
        );
        assert_eq!(
            IdempotencyKey::parse(b"\"a\x01\"", 255),
            Err(KeyError::InvalidCharacter)
        );
        assert_eq!(
            IdempotencyKey::parse(b"\"abc", 255),
            Err(KeyError::MalformedQuotedString)
        );
        assert_eq!(
            IdempotencyKey::parse(b"\"a\\nb\"", 255),
            Err(KeyError::MalformedQuotedString)
        );
        assert_eq!(
            IdempotencyKey::parse(b"\"ab\"c", 255),
            Err(KeyError::MalformedQuotedString)
        );
        assert_eq!(
            IdempotencyKey::parse(b"\"ab\\", 255),
            Err(KeyError::MalformedQuotedString)
        );
        assert_eq!(
            IdempotencyKey::parse(&[b'k'; 256], 255),
            Err(KeyError::TooLong { max: 255 })
        );
        assert!(IdempotencyKey::parse(&[b'k'; 255], 255).is_ok());
    }

    #[test]
    fn quoted_keys_allow_spaces_and_escapes() {
        let key = IdempotencyKey::parse(br#""a b \\ \"c\"""#, 255).unwrap();
        assert_eq!(key.as_str(), r#"a b \ "c""#);
    }

    #[test]
    fn length_limit_counts_unquoted_characters() {
        let mut quoted = vec![b'"'];
        quoted.extend_from_slice(&[b'k'; 255]);
        quoted.push(b'"');
        assert!(IdempotencyKey::parse(&quoted, 255).is_ok());
        quoted.insert(1, b'k');
        assert_eq!(
            IdempotencyKey::parse(&quoted, 255),
            Err(KeyError::TooLong { max: 255 })
        );
    }

    /// Serialises `key` as an RFC 8941 sf-string.
    fn quote(key: &str) -> String {
        let mut out = String::from("\"");
        for c in key.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
        out
    }

    proptest! {
        #[test]
        fn quoted_and_bare_spellings_name_the_same_key(key in "[!#-+\\--~][!-+\\--~]{0,200}") {
            let bare = IdempotencyKey::parse(key.as_bytes(), 255).unwrap();
            let quoted = IdempotencyKey::parse(quote(&key).as_bytes(), 255).unwrap();
            prop_assert_eq!(bare.as_str(), key.as_str());
            prop_assert_eq!(bare, quoted);
        }

        #[test]
        fn any_printable_string_round_trips_through_quoting(key in "[ -~]{1,255}") {
            let parsed = IdempotencyKey::parse(quote(&key).as_bytes(), 255).unwrap();
            prop_assert_eq!(parsed.as_str(), key.as_str());
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_accepted_keys_are_valid(value in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(key) = IdempotencyKey::parse(&value, 255) {
                prop_assert!(!key.as_str().is_empty() && key.as_str().len() <= 255);
                prop_assert!(key.as_str().bytes().all(|b| (0x20..=0x7e).contains(&b)));
            }
        }
    }
}
