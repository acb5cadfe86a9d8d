//! A record's fingerprint under the same checksum as its payload, as the out-of-process stores
//! keep it.
//!
//! The adapters seal their payloads (`store::seal`), but the fingerprint a replay is
//! compared with lives beside the payload (a SQL column, a field of the Redis value): outside
//! that envelope, a NULL read as "no fingerprint" replayed a stored success to another payload,
//! and a flipped bit answered the original payload 422. So the stores write both under one
//! checksum:
//!
//! ```text
//! checksum:u64 flag:u8 [fingerprint:16] payload
//! ```
//!
//! `flag` is 1 when a fingerprint follows, 0 when the record has none; `checksum` is the
//! XXH3-64 of the payload, seeded with the XXH3-64 of `flag [fingerprint]`, so that the
//! payload is hashed where it lies (a completion streams it into the command without a copy).
//! A cut value, a flipped bit anywhere, a fingerprint set or cleared: every one is damage.
//!
//! The Redis store writes this after `'R' 2` (its value's tag and format version). A SQL row
//! keeps it in its payload column after a three-byte header: the payload's own first two
//! bytes (its adapter's magic, `"TS"` for a shorter payload) and `ROW_VERSION` (`0xF0`).
//! Mirroring the magic is what keeps rolling upgrades as `docs/stores.md` promises: an
//! instance of an earlier release hands the column to its adapter, which reads a version
//! above any it knows and answers 503 `#unknown-record-version`, never 500 and never a
//! replay. The fingerprint column is still written (operators read it, and so did earlier
//! releases); a reader requires it to equal the sealed copy. The version byte lies outside
//! the checksum, as in every envelope: changed, a row reads as a newer format (503) or as the
//! earlier layout, whose adapter then finds a version it does not know; never as the record.

use bytes::Bytes;

use super::{Record, StoreError};

/// The format version of a sealed SQL row, in the payload column's third byte. Adapters
/// number their formats from 1 and are far below it; `0xF1..=0xFF` are kept for later row
/// formats, which this build reports as [`StoreError::UnknownFormat`].
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub(crate) const ROW_VERSION: u8 = 0xF0;

/// The longest head: checksum, flag, fingerprint.
pub(crate) const HEAD_LEN: usize = 8 + 1 + 16;

#[derive(Debug, thiserror::Error)]
#[error("the stored record is damaged: {0}")]
struct Damaged(&'static str);

fn corrupt(why: &'static str) -> StoreError {
    StoreError::Corrupt(Box::new(Damaged(why)))
}

fn checksum(fingerprint_part: &[u8], payload: &[u8]) -> u64 {
    use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};
    xxh3_64_with_seed(payload, xxh3_64(fingerprint_part))
}

/// What precedes the payload: `checksum flag [fingerprint]`, and how many of the array's bytes
/// are used.
pub(crate) fn head(record: &Record) -> ([u8; HEAD_LEN], usize) {
    let mut head = [0u8; HEAD_LEN];
    let len = match record.fingerprint() {
        Some(fingerprint) => {
            head[8] = 1;
            head[9..].copy_from_slice(&fingerprint.to_be_bytes());
            HEAD_LEN
        }
        None => 9,
    };
    let sum = checksum(&head[8..len], record.payload());
    head[..8].copy_from_slice(&sum.to_be_bytes());
    (head, len)
}

/// Reads what [`head`] and the payload make: the record, or why it is damaged.
pub(crate) fn open(sealed: Bytes) -> Result<Record, StoreError> {
    let flag = *sealed
        .get(8)
        .ok_or_else(|| corrupt("cut inside its head"))?;
    let (fingerprint, payload_at) = match flag {
        0 => (None, 9),
        1 => {
            let bytes = sealed
                .get(9..HEAD_LEN)
                .ok_or_else(|| corrupt("cut inside its fingerprint"))?;
            let fingerprint = u128::from_be_bytes(bytes.try_into().expect("16 bytes"));
            (Some(fingerprint), HEAD_LEN)
        }
        _ => return Err(corrupt("unknown fingerprint flag")),
    };
    let sum = u64::from_be_bytes(sealed[..8].try_into().expect("8 bytes"));
    if checksum(&sealed[8..payload_at], &sealed[payload_at..]) != sum {
        return Err(corrupt("its checksum does not match"));
    }
    Ok(Record::new(fingerprint, sealed.slice(payload_at..)))
}

/// The first two bytes of a sealed row: the payload's own (see the module docs).
#[cfg(any(feature = "postgres", feature = "sqlite"))]
fn row_magic(payload: &[u8]) -> [u8; 2] {
    match payload {
        [a, b, ..] => [*a, *b],
        _ => *b"TS",
    }
}

/// The payload column of a completed SQL row: `magic ROW_VERSION checksum flag [fingerprint]
/// payload`.
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub(crate) fn row_payload(record: &Record) -> Vec<u8> {
    let (head, len) = head(record);
    let payload = record.payload();
    let mut out = Vec::with_capacity(3 + len + payload.len());
    out.extend_from_slice(&row_magic(payload));
    out.push(ROW_VERSION);
    out.extend_from_slice(&head[..len]);
    out.extend_from_slice(payload);
    out
}

/// A completed row's record, from its `fingerprint` and `payload` columns.
///
/// A sealed row (written from this release on) must check, and its fingerprint column must
/// equal the sealed copy: a NULL, a flipped bit, a value of another length are damage. A row
/// of the earlier layout (the adapter's payload as is) is read as before, its fingerprint from
/// its column: 16 bytes or NULL (no fingerprint). A completed row always has a payload.
/// Anything else is [`StoreError::Corrupt`], never a reason to run the key again.
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub(crate) fn record_from_columns(
    fingerprint: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
) -> Result<Record, StoreError> {
    let column = match fingerprint {
        None => None,
        Some(bytes) => {
            Some(u128::from_be_bytes(bytes.as_slice().try_into().map_err(
                |_| corrupt("the row's fingerprint is not 16 bytes"),
            )?))
        }
    };
    let payload = payload.ok_or_else(|| corrupt("the completed row has no payload"))?;
    match payload.get(2) {
        Some(&ROW_VERSION) => {
            let payload = Bytes::from(payload);
            let record = open(payload.slice(3..))?;
            if payload[..2] != row_magic(record.payload()) {
                return Err(corrupt("its header does not match its payload"));
            }
            if record.fingerprint() != column {
                return Err(corrupt(
                    "the fingerprint column does not match the sealed fingerprint",
                ));
            }
            Ok(record)
        }
        Some(&version) if version > ROW_VERSION => Err(StoreError::UnknownFormat { version }),
        _ => Ok(Record::new(column, payload)),
    }
}

/// Checks a row that is not completed: a claim's row never holds a fingerprint or a payload
/// (claims write NULLs, only a completion writes them), so one that does is a completed row
/// whose flag was cleared, damage rather than a claim to wait for until the record's TTL.
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub(crate) fn check_in_flight(
    fingerprint: &Option<Vec<u8>>,
    payload: &Option<Vec<u8>>,
) -> Result<(), StoreError> {
    match (fingerprint, payload) {
        (None, None) => Ok(()),
        _ => Err(corrupt("a row in flight holds a completion's columns")),
    }
}

#[cfg(all(test, any(feature = "postgres", feature = "sqlite")))]
mod tests {
    use super::*;

    fn records() -> Vec<Record> {
        vec![
            Record::new(
                Some(0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10),
                "TI\x03payload",
            ),
            Record::new(None, "TC\x01{}"),
            Record::new(Some(7), Bytes::new()),
            Record::new(None, "x"),
        ]
    }

    fn columns(record: &Record) -> (Option<Vec<u8>>, Vec<u8>) {
        (
            record.fingerprint().map(|f| f.to_be_bytes().to_vec()),
            row_payload(record),
        )
    }

    #[test]
    fn sealed_rows_round_trip() {
        for record in records() {
            let (fingerprint, payload) = columns(&record);
            let read = record_from_columns(fingerprint, Some(payload)).unwrap();
            assert_eq!(read, record);
            assert_eq!(read.payload(), record.payload());
        }
    }

    /// Every cut, every flipped bit of the payload column but its version byte, and every
    /// change of the fingerprint column (NULL, set, a flipped bit, another length) is damage.
    #[test]
    fn every_change_of_a_sealed_row_is_damage() {
        for record in records() {
            let (fingerprint, payload) = columns(&record);
            // A cut inside the three-byte header leaves a column of the earlier layout, whose
            // 0 to 2 bytes no adapter reads as a record.
            for cut in 3..payload.len() {
                assert!(
                    matches!(
                        record_from_columns(fingerprint.clone(), Some(payload[..cut].to_vec())),
                        Err(StoreError::Corrupt(_))
                    ),
                    "cut at {cut}"
                );
            }
            for at in (0..payload.len()).filter(|at| *at != 2) {
                for bit in 0..8 {
                    let mut flipped = payload.clone();
                    flipped[at] ^= 1 << bit;
                    assert!(
                        matches!(
                            record_from_columns(fingerprint.clone(), Some(flipped)),
                            Err(StoreError::Corrupt(_))
                        ),
                        "{record:?}: bit {bit} of byte {at}"
                    );
                }
            }
            let mut changed = vec![None, Some(vec![0; 16]), Some(vec![0; 15])];
            if let Some(bytes) = &fingerprint {
                for at in 0..16 {
                    let mut flipped = bytes.clone();
                    flipped[at] ^= 0x40;
                    changed.push(Some(flipped));
                }
            }
            for column in changed.into_iter().filter(|c| *c != fingerprint) {
                assert!(
                    matches!(
                        record_from_columns(column.clone(), Some(payload.clone())),
                        Err(StoreError::Corrupt(_))
                    ),
                    "{record:?} with the fingerprint column {column:?}"
                );
            }
        }
    }

    /// The version byte is outside the checksum (as in every envelope): changed, the row is
    /// read as a newer format or as the earlier layout, whose payload its adapter then refuses
    /// (a version it does not know); never as this record.
    #[test]
    fn a_changed_version_byte_is_never_read_as_the_record() {
        let record = records().remove(0);
        let (fingerprint, payload) = columns(&record);
        for bit in 0..8 {
            let mut flipped = payload.clone();
            flipped[2] ^= 1 << bit;
            match record_from_columns(fingerprint.clone(), Some(flipped)) {
                Err(StoreError::UnknownFormat { version }) => assert!(version > ROW_VERSION),
                Ok(read) => assert_ne!(read.payload(), record.payload()),
                other => panic!("bit {bit}: {other:?}"),
            }
        }
    }

    /// Rows of the earlier layout read as they always did: the fingerprint from its column,
    /// NULL as none.
    #[test]
    fn rows_of_the_earlier_layout_read_as_before() {
        let payload = b"TI\x03\x00\x00\x00\x00rest".to_vec();
        let read = record_from_columns(Some(vec![1; 16]), Some(payload.clone())).unwrap();
        assert_eq!(read.fingerprint(), Some(u128::from_be_bytes([1; 16])));
        assert_eq!(read.payload(), &payload[..]);
        let read = record_from_columns(None, Some(payload.clone())).unwrap();
        assert_eq!(read.fingerprint(), None);
        assert!(matches!(
            record_from_columns(None, None),
            Err(StoreError::Corrupt(_))
        ));
        let mut newer = payload;
        newer[2] = ROW_VERSION + 1;
        assert!(matches!(
            record_from_columns(None, Some(newer)),
            Err(StoreError::UnknownFormat { version }) if version == ROW_VERSION + 1
        ));
    }

    /// An instance of an earlier release hands a sealed row's payload column to its adapter:
    /// the adapter's magic with a version above any it knows, so it answers "newer format".
    #[test]
    fn earlier_releases_read_a_sealed_row_as_a_newer_format() {
        let record = Record::new(Some(1), "TI\x03rest");
        let payload = row_payload(&record);
        assert_eq!(&payload[..3], b"TI\xf0");
    }
}
