//! The values the Redis store writes: claims and records, tagged and versioned.

use bytes::{BufMut, Bytes, BytesMut};

use crate::store::sealed::{self, HEAD_LEN};
use crate::store::{OwnerToken, Record, StoreError};

/// Format version of the claims this store writes: 2, `'C' 2 token`, a claim that a waiting
/// duplicate may mark by appending `W` (see `scripts::MARK_WAITED`), so that only a
/// waited-for completion or release publishes a wake-up; 1, as earlier releases wrote it,
/// whose owner publishes every completion and which no waiter marks (its owner compares its
/// claim byte for byte).
pub(super) const CLAIM_VERSION: u8 = 2;
/// Format version of the records this store writes: 2, the fingerprint under the record's
/// checksum (`store::sealed`); 1, the fingerprint outside it, is still read.
pub(super) const VERSION: u8 = 2;
pub(super) const CLAIM_TAG: u8 = b'C';
pub(super) const RECORD_TAG: u8 = b'R';

pub(super) fn claim_value(token: &OwnerToken) -> [u8; 18] {
    let mut out = [0u8; 18];
    out[0] = CLAIM_TAG;
    out[1] = CLAIM_VERSION;
    out[2..].copy_from_slice(&token.as_u128().to_be_bytes());
    out
}

pub(crate) fn encode_record(record: &Record) -> Bytes {
    let mut out = BytesMut::with_capacity(2 + HEAD_LEN + record.payload().len());
    let (head, len) = record_head(record);
    out.put_slice(&head[..len]);
    out.put_slice(record.payload());
    out.freeze()
}

/// What precedes a record's payload in its value: the tag, the version, the checksum and the
/// fingerprint (flag and bytes); the array and how many of its bytes are used.
fn record_head(record: &Record) -> ([u8; 2 + HEAD_LEN], usize) {
    let mut head = [0u8; 2 + HEAD_LEN];
    head[0] = RECORD_TAG;
    head[1] = VERSION;
    let (sealed, len) = sealed::head(record);
    head[2..2 + len].copy_from_slice(&sealed[..len]);
    (head, 2 + len)
}

/// A record's value (as [`encode_record`]) written straight into a command's buffer, with no
/// copy of its own: a completion sends the record as this argument.
pub(super) struct RecordArg<'a>(pub(super) &'a Record);

impl redis::ToRedisArgs for RecordArg<'_> {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        use std::io::Write;
        let (head, len) = record_head(self.0);
        let mut arg = out.writer_for_next_arg();
        // Writing into the command's buffer cannot fail.
        let _ = arg.write_all(&head[..len]);
        let _ = arg.write_all(self.0.payload());
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the Redis value is damaged: {0}")]
struct Damaged(&'static str);

/// A record's value: `'R' 2 checksum flag [fingerprint] payload` (see `store::sealed`), or
/// `'R' 1 flag [fingerprint] payload` as earlier releases wrote it. A value that is not one
/// is [`StoreError::Corrupt`] (the key was used: never a reason to run again), one of a later
/// version [`StoreError::UnknownFormat`].
pub(crate) fn decode_record(value: Vec<u8>) -> Result<Record, StoreError> {
    let value = Bytes::from(value);
    let corrupt = |why| StoreError::Corrupt(Box::new(Damaged(why)));
    if value.len() < 3 {
        return Err(corrupt("shorter than its header"));
    }
    if value[0] != RECORD_TAG {
        return Err(corrupt("not a record or a claim"));
    }
    match value[1] {
        VERSION => return sealed::open(value.slice(2..)),
        1 => {}
        0 => return Err(corrupt("format version 0")),
        version => return Err(StoreError::UnknownFormat { version }),
    }
    match value[2] {
        0 => Ok(Record::new(None, value.slice(3..))),
        1 if value.len() >= 19 => {
            let fingerprint = u128::from_be_bytes(value[3..19].try_into().expect("16 bytes"));
            Ok(Record::new(Some(fingerprint), value.slice(19..)))
        }
        1 => Err(corrupt("cut inside its fingerprint")),
        _ => Err(corrupt("unknown fingerprint flag")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_written_into_a_command_is_its_encoded_value() {
        for record in [
            Record::new(Some(0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10), "payload"),
            Record::new(None, Bytes::new()),
            Record::new(Some(7), vec![b'x'; 2000]),
        ] {
            let (mut streamed, mut copied) = (redis::cmd("X"), redis::cmd("X"));
            streamed.arg(RecordArg(&record));
            copied.arg(&encode_record(&record)[..]);
            assert_eq!(streamed.get_packed_command(), copied.get_packed_command());
        }
    }

    #[test]
    fn records_round_trip_and_unknown_versions_are_refused() {
        for record in [
            Record::new(Some(7), "payload"),
            Record::new(None, Bytes::new()),
        ] {
            assert_eq!(
                decode_record(encode_record(&record).to_vec()).unwrap(),
                record
            );
        }
        // Values of format 1, as earlier releases wrote them, still read.
        let mut earlier = b"R\x01\x01".to_vec();
        earlier.extend_from_slice(&7u128.to_be_bytes());
        earlier.extend_from_slice(b"payload");
        assert_eq!(
            decode_record(earlier).unwrap(),
            Record::new(Some(7), "payload")
        );
        assert_eq!(
            decode_record(b"R\x01\x00".to_vec()).unwrap(),
            Record::new(None, Bytes::new())
        );
        let mut future = encode_record(&Record::new(None, "x")).to_vec();
        future[1] = VERSION + 1;
        assert!(matches!(
            decode_record(future),
            Err(StoreError::UnknownFormat { version }) if version == VERSION + 1
        ));
        assert!(matches!(
            decode_record(b"R".to_vec()),
            Err(StoreError::Corrupt(_))
        ));
    }

    /// Every flipped bit after the version byte, the fingerprint's included, and every cut of
    /// a value is damage, never another record.
    #[test]
    fn every_flipped_bit_and_every_cut_is_damage() {
        for record in [
            Record::new(Some(0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10), "payload"),
            Record::new(None, "TI\x03"),
        ] {
            let value = encode_record(&record).to_vec();
            for at in 2..value.len() {
                for bit in 0..8 {
                    let mut flipped = value.clone();
                    flipped[at] ^= 1 << bit;
                    assert!(
                        matches!(decode_record(flipped), Err(StoreError::Corrupt(_))),
                        "bit {bit} of byte {at}"
                    );
                }
            }
            for cut in 0..value.len() {
                assert!(
                    matches!(
                        decode_record(value[..cut].to_vec()),
                        Err(StoreError::Corrupt(_))
                    ),
                    "cut at {cut}"
                );
            }
        }
    }
}
