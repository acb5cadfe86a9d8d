//! The values the Redis store writes: claims and records, tagged and versioned.

use bytes::{BufMut, Bytes, BytesMut};

use crate::store::{OwnerToken, Record, StoreError};

/// Format version of the values this store writes.
pub(super) const VERSION: u8 = 1;
pub(super) const CLAIM_TAG: u8 = b'C';
pub(super) const RECORD_TAG: u8 = b'R';

pub(super) fn claim_value(token: &OwnerToken) -> [u8; 18] {
    let mut out = [0u8; 18];
    out[0] = CLAIM_TAG;
    out[1] = VERSION;
    out[2..].copy_from_slice(&token.as_u128().to_be_bytes());
    out
}

pub(crate) fn encode_record(record: &Record) -> Bytes {
    let mut out = BytesMut::with_capacity(19 + record.payload().len());
    out.put_u8(RECORD_TAG);
    out.put_u8(VERSION);
    match record.fingerprint() {
        Some(fingerprint) => {
            out.put_u8(1);
            out.put_u128(fingerprint);
        }
        None => out.put_u8(0),
    }
    out.put_slice(record.payload());
    out.freeze()
}

#[derive(Debug, thiserror::Error)]
#[error("the Redis value is damaged: {0}")]
struct Damaged(&'static str);

/// Fewer replicas than required acknowledged a write in time.
/// A record's value, `'R' version fingerprint-flag [fingerprint] payload`. A value that is not
/// one is [`StoreError::Corrupt`] (the key was used: never a reason to run again), one of a
/// later version [`StoreError::UnknownFormat`].
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
        VERSION => {}
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
}
