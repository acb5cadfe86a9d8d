// Entry points for the fuzz targets in `fuzz/` (hidden from the docs):
// not part of the public API. Each takes arbitrary bytes and must never panic; the round
// trips check that what is decoded is what was encoded.

/// Decodes a stored HTTP response (the record payload); on success, re-encodes what was
/// decoded and checks the round trip.
pub fn http_record(data: &[u8]) {
    crate::http::fuzz_record(data);
}

/// Decodes a Redis value as the Redis store reads it; on success, re-encodes the record and
/// checks the round trip.
#[cfg(feature = "redis")]
pub fn redis_value(data: &[u8]) {
    use crate::store::redis::{decode_record, encode_record};
    if let Ok(record) = decode_record(data.to_vec()) {
        let again = decode_record(encode_record(&record).to_vec()).expect("re-encoded record decodes");
        assert_eq!(again, record);
    }
}

/// Decodes a PostgreSQL row's `fingerprint` and `payload` columns (the first byte of `data`
/// says which are NULL and where the fingerprint ends); on success, writes the record as a
/// row again and checks the round trip.
#[cfg(feature = "postgres")]
pub fn postgres_columns(data: &[u8]) {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let split = usize::from(control >> 2).min(rest.len());
    let (fingerprint, payload) = rest.split_at(split);
    let fingerprint = (control & 1 == 1).then(|| fingerprint.to_vec());
    let payload = (control & 2 == 2).then(|| payload.to_vec());
    if let Ok(record) = crate::store::record_from_columns(fingerprint.clone(), payload) {
        assert_eq!(record.fingerprint().map(u128::to_be_bytes).map(Vec::from), fingerprint);
        let row = crate::store::sealed::row_payload(&record);
        let again = crate::store::record_from_columns(fingerprint, Some(row)).expect("re-encoded row decodes");
        assert_eq!(again, record);
        assert_eq!(again.payload(), record.payload());
    }
}

/// Parses a raw `Idempotency-Key` value; a parsed key re-quotes to a value that parses to the
/// same key.
pub fn key(data: &[u8]) {
    if let Ok(key) = crate::IdempotencyKey::parse(data, 255) {
        let quoted = format!(
            "\"{}\"",
            key.as_str().replace('\\', "\\\\").replace('"', "\\\"")
        );
        let again = crate::IdempotencyKey::parse(quoted.as_bytes(), 255).expect("re-quoted key parses");
        assert_eq!(again, key);
    }
}
