//! The integrity envelope of a stored outcome: every adapter's payload (an HTTP response, a
//! consumer's outcome) is written inside it, so that a record damaged or cut in the store is
//! refused instead of replayed.
//!
//! ```text
//! magic:[u8; 2] version:u8 length:u32 xxh3_64:u64 content
//! ```
//!
//! `length` is the length of `content` and `xxh3_64` its 64-bit XXH3 hash (both big-endian).
//! A checksum, not a signature: it finds damage (a cut value, flipped bits, a wrong restore),
//! not a forgery by someone who can write to the store.

use bytes::{BufMut, Bytes, BytesMut};

use super::StoreError;

/// How many bytes the envelope adds before the content.
pub(crate) const HEADER_LEN: usize = 2 + 1 + 4 + 8;

/// Why a stored outcome cannot be replayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Unreadable {
    /// The bytes are not what this crate wrote, or were changed since (cut, flipped, mixed
    /// up): the key was used, but its outcome is lost.
    #[error("stored record is damaged: {0}")]
    Damaged(&'static str),
    /// The record was written in a format newer than this build reads (a later release, during
    /// a rolling upgrade): an instance of that release can answer it.
    #[error("stored record has format version {0}, newer than this build reads")]
    Newer(u8),
}

/// A buffer that already holds the envelope's header for `content_len` bytes of content; the
/// caller writes the content, then [`finish`]es it.
pub(crate) fn start(magic: &[u8; 2], version: u8, content_len: usize) -> BytesMut {
    let mut buf = BytesMut::with_capacity(HEADER_LEN + content_len);
    buf.put_slice(magic);
    buf.put_u8(version);
    buf.put_u32(0);
    buf.put_u64(0);
    buf
}

/// Writes the length and checksum of what was written after the header.
pub(crate) fn finish(mut buf: BytesMut) -> Bytes {
    let content = &buf[HEADER_LEN..];
    let len = u32::try_from(content.len()).expect("a stored outcome is under 4 GiB");
    let hash = xxhash_rust::xxh3::xxh3_64(content);
    buf[3..7].copy_from_slice(&len.to_be_bytes());
    buf[7..15].copy_from_slice(&hash.to_be_bytes());
    buf.freeze()
}

/// The content of an envelope whose magic and version were already read: checks its length
/// and checksum. (Used by what reads records from outside the process: the consumer's and the
/// out-of-process stores' recovery points.)
#[cfg(any(
    feature = "consumer",
    feature = "redis",
    feature = "postgres",
    feature = "sqlite"
))]
pub(crate) fn open(payload: &Bytes) -> Result<Bytes, Unreadable> {
    Ok(payload.slice(check(payload, true)?..))
}

/// Checks an envelope in place, as [`open`] does, the checksum only when `checksum` is set (a
/// payload that never left the process, the memory store's, cannot have been damaged between
/// its writer and here): where its content starts (it runs to the end). A reader of the
/// content borrows the payload instead of holding a slice of it (a slice is an atomic
/// increment and decrement).
pub(crate) fn check(payload: &[u8], checksum: bool) -> Result<usize, Unreadable> {
    if payload.len() < HEADER_LEN {
        return Err(Unreadable::Damaged("shorter than its header"));
    }
    let len = u32::from_be_bytes(payload[3..7].try_into().expect("4 bytes")) as usize;
    let hash = u64::from_be_bytes(payload[7..15].try_into().expect("8 bytes"));
    let content = &payload[HEADER_LEN..];
    if content.len() != len {
        return Err(Unreadable::Damaged("its length does not match"));
    }
    if checksum && xxhash_rust::xxh3::xxh3_64(content) != hash {
        return Err(Unreadable::Damaged("its checksum does not match"));
    }
    Ok(HEADER_LEN)
}

/// What a store error says of the record, when it is unreadable rather than unreachable: the
/// key was used, so the caller must not run the work.
pub(crate) fn unreadable(error: &StoreError) -> Option<Unreadable> {
    match error {
        StoreError::Corrupt(_) => Some(Unreadable::Damaged("damaged in the store")),
        StoreError::UnknownFormat { version } => Some(Unreadable::Newer(*version)),
        _ => None,
    }
}

/// Logs an unreadable record, with what was found. A damaged record is an error every time (an
/// operator must look: `admin` can inspect and delete it); one from a newer release is a
/// warning, once per record (`identity`: a hash of its key or bytes) in an hour, since it is
/// expected for the minutes of a rolling upgrade and would otherwise log on every retry.
pub(crate) fn report(identity: u64, unreadable: Unreadable, cause: &dyn std::fmt::Display) {
    match unreadable {
        Unreadable::Damaged(why) => tracing::error!(
            outcome = "unreadable_record",
            reason = why,
            %cause,
            "the stored record of this key cannot be read; the handler is not run (500)"
        ),
        Unreadable::Newer(version) => {
            use std::sync::LazyLock;
            static LOGGED: LazyLock<moka::sync::Cache<u64, ()>> = LazyLock::new(|| {
                moka::sync::Cache::builder()
                    .max_capacity(10_000)
                    .time_to_live(std::time::Duration::from_secs(3600))
                    .build()
            });
            if LOGGED.entry(identity).or_insert(()).is_fresh() {
                tracing::warn!(
                    outcome = "unknown_record_version",
                    version,
                    "the stored record of this key was written by a newer release; answered \
                     503 with Retry-After so that an up-to-date instance answers the retry \
                     (logged once per key and hour)"
                );
            }
        }
    }
}

/// A 64-bit identity of a key or a record, for [`report`].
pub(crate) fn identity(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed(content: &[u8]) -> Bytes {
        let mut buf = start(b"XY", 1, content.len());
        buf.put_slice(content);
        finish(buf)
    }

    #[test]
    fn round_trips() {
        let payload = sealed(b"hello");
        assert_eq!(&payload[..3], b"XY\x01");
        assert_eq!(open(&payload).unwrap(), "hello");
        assert_eq!(open(&sealed(b"")).unwrap(), "");
    }

    #[test]
    fn every_cut_and_every_flipped_bit_is_refused() {
        let payload = sealed(b"{\"id\":\"pay_1\",\"amount\":1000}");
        for cut in 0..payload.len() {
            assert!(open(&payload.slice(..cut)).is_err(), "cut at {cut}");
        }
        for at in 3..payload.len() {
            for bit in 0..8 {
                let mut flipped = payload.to_vec();
                flipped[at] ^= 1 << bit;
                assert!(
                    open(&Bytes::from(flipped)).is_err(),
                    "bit {bit} of byte {at}"
                );
            }
        }
    }

    /// Without the checksum (a payload that never left the process), the length still
    /// guards the content: every cut is refused.
    #[test]
    fn unchecked_opening_still_refuses_every_cut() {
        let payload = sealed(b"{\"id\":\"pay_1\"}");
        let start = check(&payload, false).unwrap();
        assert_eq!(&payload[start..], b"{\"id\":\"pay_1\"}");
        for cut in 0..payload.len() {
            assert!(check(&payload[..cut], false).is_err());
        }
    }
}
