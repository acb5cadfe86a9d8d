//! The stored form of an HTTP response: a small, versioned binary encoding.
//!
//! Layout of version 3, the one written (all integers big-endian):
//!
//! ```text
//! "TI" version:u8=3 length:u32 xxh3_64:u64          the integrity envelope (store::seal)
//! flags:u8 status:u16
//! header-count:u16  { name-len:u16 name value-len:u32 value }*   response headers
//! carried-count:u16 { name-len:u16 name value-len:u32 value }*   e.g. the first x-request-id
//! trailer-count:u16 { name-len:u16 name value-len:u32 value }*   when flags has TRAILERS
//! body (the rest, its end fixed by the envelope's length)
//! ```
//!
//! Version 4 is written for a body of several chunks (a stream, a handler that wrote its body
//! in parts), so that a store that serialises the record replays it as the original sent it,
//! one frame per chunk. Its head is version 3's, then a chunk table, then the chunks:
//!
//! ```text
//! ... trailers as in version 3
//! chunk-count:u32 { chunk-len:u32 }*chunk-count                  2 to MAX_BODY_CHUNKS, none empty
//! body (the chunks, one after the other, as long as the table says)
//! ```
//!
//! The table lies inside the envelope: a chunk missing, added, cut or changed, a count
//! changed, is a damaged record (the lengths must add up to the rest exactly, and the checksum
//! covers all of it). A body of at most one chunk is written as version 3, as before (the
//! common case costs nothing more), so a record of version 4 exists only for a body that had
//! several chunks. A body of more than [`MAX_BODY_CHUNKS`] chunks (a hostile stream of one-byte
//! frames) has adjacent chunks merged until at most that many remain: the table is bounded
//! (256 KiB), and so is the list of chunks a replay holds (2 MiB), and every original chunk
//! boundary kept is one the handler made.
//!
//! Versions 1 (no trailers) and 2 (trailers) are the same without the envelope (`"TI" version
//! flags status …`); they are still read, but cannot be checked: a record of those versions cut
//! inside its body in the store would replay cut. A version above 4 was written by a newer
//! release and is reported as such ([`Unreadable::Newer`]), never misread (a release before
//! version 4 reports a chunked record so: 503 `#unknown-record-version`). Decoding does not
//! copy the body: the replayed body shares the stored bytes, each chunk a slice of them.

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use crate::store::seal::{self, Unreadable};
use crate::store::{Chunks, Record};

const MAGIC: &[u8; 2] = b"TI";
/// The version written for a body of at most one chunk: 2's layout inside the integrity
/// envelope.
const VERSION: u8 = 3;
/// The version written for a body of several chunks: 3's layout with a chunk table.
const CHUNKED: u8 = 4;
/// The most chunks a record keeps: past it, adjacent chunks are merged (see the module docs).
pub(crate) const MAX_BODY_CHUNKS: usize = 65_536;
/// The response ended with trailers (gRPC's `grpc-status`, for one), stored after the carried
/// headers.
const FLAG_TRAILERS: u8 = 2;
/// The response body was too large to keep: only the status and headers were stored.
const FLAG_BODY_OMITTED: u8 = 1;

/// Any malformed field.
const MALFORMED: Unreadable = Unreadable::Damaged("a field is malformed");

/// A response as stored for replay.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StoredResponse {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    /// Request headers of the original carried into replays (`original-<name>`).
    pub(crate) carried: Vec<(HeaderName, HeaderValue)>,
    /// The body, as the handler gave it (its chunks), or a slice of the payload it was read from.
    pub(crate) body: Chunks,
    pub(crate) body_omitted: bool,
    /// The trailers the response ended with, if any.
    pub(crate) trailers: Option<HeaderMap>,
}

fn header_len(name: &HeaderName, value: &HeaderValue) -> usize {
    2 + name.as_str().len() + 4 + value.len()
}

fn put_header(buf: &mut BytesMut, name: &HeaderName, value: &HeaderValue) {
    buf.put_u16(name.as_str().len() as u16);
    buf.put_slice(name.as_str().as_bytes());
    buf.put_u32(value.len() as u32);
    buf.put_slice(value.as_bytes());
}

/// What glibc's `malloc` takes for a request of `n` bytes (see [`chunk`]).
pub(crate) const fn allocation(n: usize) -> usize {
    chunk(n)
}

/// What glibc's `malloc` takes for a request of `n` bytes: its 8-byte header, rounded up to
/// 16 bytes, at least 32 (0 for nothing allocated).
const fn chunk(n: usize) -> usize {
    if n == 0 {
        0
    } else {
        let rounded = (n + 8 + 15) & !15;
        if rounded < 32 {
            32
        } else {
            rounded
        }
    }
}

/// What a `HeaderMap::with_capacity(n)` allocates, as http 1.x sizes it: a power of two of
/// 4-byte index slots (at least `n + n / 3`), and entries for three quarters of them. An entry
/// holds a name, a value, its links (an `Option` of two `usize`) and its hash (a `u16`).
fn header_map_bytes(n: usize) -> usize {
    const ENTRY: usize = std::mem::size_of::<HeaderName>()
        + std::mem::size_of::<HeaderValue>()
        + std::mem::size_of::<Option<(usize, usize)>>()
        + 8;
    if n == 0 {
        return 0;
    }
    let slots = (n + n / 3).next_power_of_two();
    chunk(slots * 4) + chunk((slots - slots / 4) * ENTRY)
}

/// What a name takes once decoded: nothing for a name `header_name` matches directly, else
/// its copy and the shared header its bytes get when a replay first clones the map (charged
/// also for a standard name outside the list, which `http` keeps without a copy: a little
/// over, never under).
fn name_bytes(name: &HeaderName) -> usize {
    if KNOWN_NAMES.contains(&name.as_str().as_bytes()) {
        0
    } else {
        chunk(name.as_str().len()) + chunk(24)
    }
}

/// The record of a response: its head encoded, its body (`None` when it was too large to keep)
/// kept as the given chunks, not copied (see [`Record`]: the sealed payload, the head and body
/// inside the integrity envelope, is built only if a store asks for it).
///
/// Its memo weight is what the response takes in memory once decoded beyond its body and
/// header values (which share the record's bytes): the `Arc` of the decoded struct, its header
/// maps (sized as `decode_with_room` sizes them, with a replay's room in the first), the carried
/// headers' `Vec`, custom names' copies, each as the allocator rounds it. A store that keeps
/// decoded records charges it (see `Record::with_memo_weight`); `tests/isolated/decoded.rs`
/// checks it against the resident memory kept decoded forms take.
pub(crate) fn record<'a>(
    fingerprint: Option<u128>,
    status: StatusCode,
    headers: &HeaderMap,
    keep: impl Fn(&HeaderName) -> bool,
    carried: &[(HeaderName, HeaderValue)],
    body: Option<impl Iterator<Item = &'a Bytes>>,
    trailers: Option<&HeaderMap>,
) -> Record {
    // The `Arc` of the decoded response (two counts before it).
    let mut weight = chunk(16 + std::mem::size_of::<StoredResponse>());
    let kept = || headers.iter().filter(|(name, _)| keep(name));
    let head_len: usize = kept().map(|(n, v)| header_len(n, v)).sum::<usize>()
        + carried.iter().map(|(n, v)| header_len(n, v)).sum::<usize>()
        + trailers.map_or(0, |t| {
            t.iter().map(|(n, v)| header_len(n, v)).sum::<usize>()
        });
    let body = body.map(|body| coalesced(Chunks::collect(body)));
    let table = match &body {
        Some(Chunks::Many(chunks)) => Some(chunks),
        _ => None,
    };
    let table_len = table.map_or(0, |chunks| 4 + 4 * chunks.len());
    let mut buf = BytesMut::with_capacity(9 + head_len + table_len);
    let mut flags = if body.is_some() { 0 } else { FLAG_BODY_OMITTED };
    if trailers.is_some() {
        flags |= FLAG_TRAILERS;
    }
    buf.put_u8(flags);
    buf.put_u16(status.as_u16());
    let count_at = buf.len();
    buf.put_u16(0);
    let mut count = 0u16;
    let mut put = |buf: &mut BytesMut, name: &HeaderName, value: &HeaderValue| {
        put_header(buf, name, value);
        weight += name_bytes(name);
    };
    for (name, value) in kept() {
        put(&mut buf, name, value);
        count += 1;
    }
    buf[count_at..count_at + 2].copy_from_slice(&count.to_be_bytes());
    buf.put_u16(carried.len() as u16);
    for (name, value) in carried {
        put(&mut buf, name, value);
    }
    if let Some(trailers) = trailers {
        buf.put_u16(trailers.len() as u16);
        for (name, value) in trailers {
            put(&mut buf, name, value);
        }
    }
    let version = match table {
        Some(chunks) => {
            buf.put_u32(chunks.len() as u32);
            for chunk in chunks.iter() {
                buf.put_u32(chunk.len() as u32);
            }
            CHUNKED
        }
        None => VERSION,
    };
    weight += header_map_bytes(usize::from(count) + REPLAY_ADDS)
        + chunk(std::mem::size_of_val(carried))
        + trailers.map_or(0, |t| header_map_bytes(t.len()));
    Record::in_parts(
        fingerprint,
        (MAGIC, version),
        buf.freeze(),
        body.unwrap_or_default(),
    )
    .with_memo_weight(u32::try_from(weight).unwrap_or(u32::MAX))
}

/// `body` with at most [`MAX_BODY_CHUNKS`] chunks: past that count, adjacent chunks are merged
/// (copied) into runs of at least `len / (MAX_BODY_CHUNKS - 1)` bytes, each run whole chunks.
/// Every run but the last reaches that length, so there are at most `MAX_BODY_CHUNKS` of them.
fn coalesced(body: Chunks) -> Chunks {
    let Chunks::Many(chunks) = &body else {
        return body;
    };
    if chunks.len() <= MAX_BODY_CHUNKS {
        return body;
    }
    let total: usize = chunks.iter().map(Bytes::len).sum();
    let run = total.div_ceil(MAX_BODY_CHUNKS - 1);
    let mut runs = Vec::with_capacity(MAX_BODY_CHUNKS);
    let mut current = BytesMut::new();
    for chunk in chunks.iter() {
        if current.is_empty() {
            current.reserve(run.max(chunk.len()));
        }
        current.put_slice(chunk);
        if current.len() >= run {
            runs.push(current.split().freeze());
        }
    }
    if !current.is_empty() {
        runs.push(current.freeze());
    }
    Chunks::collect(runs.iter())
}

/// The sealed payload of a response (what [`record`] makes, as one buffer), and its memo
/// weight.
pub(crate) fn encode<'a>(
    status: StatusCode,
    headers: &HeaderMap,
    keep: impl Fn(&HeaderName) -> bool,
    carried: &[(HeaderName, HeaderValue)],
    body: Option<impl Iterator<Item = &'a Bytes>>,
    trailers: Option<&HeaderMap>,
) -> (Bytes, u32) {
    let record = record(None, status, headers, keep, carried, body, trailers);
    let weight = record.memo_weight();
    (record.into_payload(), weight)
}

/// Reads a record's fields from the payload, borrowed: only what a decoded response keeps (its
/// header values and body) is a slice of it.
struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
}

impl Reader<'_> {
    /// The next `n` bytes, borrowed: lengths and names are read from them without touching
    /// the record's reference count (a `Bytes` slice is an atomic increment and decrement).
    fn bytes(&mut self, n: usize) -> Result<&[u8], Unreadable> {
        let start = self.pos;
        let end = start
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or(MALFORMED)?;
        self.pos = end;
        Ok(&self.buf[start..end])
    }

    /// The next `n` bytes as a slice sharing the record (header values keep it).
    fn shared(&mut self, n: usize) -> Result<Bytes, Unreadable> {
        let start = self.pos;
        self.bytes(n)?;
        Ok(self.buf.slice(start..self.pos))
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Unreadable> {
        Ok(self.bytes(N)?.try_into().expect("N bytes"))
    }

    fn u8(&mut self) -> Result<u8, Unreadable> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, Unreadable> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, Unreadable> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn header(&mut self) -> Result<(HeaderName, HeaderValue), Unreadable> {
        let name_len = self.u16()? as usize;
        let name = header_name(self.bytes(name_len)?)?;
        let value_len = self.u32()? as usize;
        let value =
            HeaderValue::from_maybe_shared(self.shared(value_len)?).map_err(|_| MALFORMED)?;
        Ok((name, value))
    }
}

/// Defines [`header_name`] over a list of names, and the list itself for its test.
macro_rules! known_names {
    ($($bytes:literal => $name:ident,)*) => {
        /// A stored header name. The names responses carry most often are matched to `http`'s
        /// constants directly: `HeaderName::from_bytes` maps every byte through its table
        /// before it finds the same constant, a large share of a replay's decoding (measured in
        /// BENCHMARKS.md). Any other name goes through it as before.
        fn header_name(bytes: &[u8]) -> Result<HeaderName, Unreadable> {
            Ok(match bytes {
                $($bytes => http::header::$name,)*
                other => HeaderName::from_bytes(other).map_err(|_| MALFORMED)?,
            })
        }

        /// The names matched directly: decoded, they are `http`'s constants (no copy).
        const KNOWN_NAMES: &[&[u8]] = &[$($bytes),*];
    };
}

known_names! {
    b"content-type" => CONTENT_TYPE,
    b"location" => LOCATION,
    b"cache-control" => CACHE_CONTROL,
    b"etag" => ETAG,
    b"vary" => VARY,
    b"date" => DATE,
    b"last-modified" => LAST_MODIFIED,
    b"content-encoding" => CONTENT_ENCODING,
    b"content-language" => CONTENT_LANGUAGE,
    b"expires" => EXPIRES,
    b"link" => LINK,
    b"retry-after" => RETRY_AFTER,
    b"server" => SERVER,
    b"access-control-allow-origin" => ACCESS_CONTROL_ALLOW_ORIGIN,
}

impl Reader<'_> {
    /// A chunk table: its count (2 to [`MAX_BODY_CHUNKS`], as [`record`] writes it) and the
    /// chunks' lengths, none 0, all within the rest of the buffer when the body follows it
    /// (`inline`).
    fn chunk_table(&mut self, inline: bool) -> Result<Vec<usize>, Unreadable> {
        const TABLE: Unreadable = Unreadable::Damaged("its chunk table is malformed");
        let count = self.u32()? as usize;
        if !(2..=MAX_BODY_CHUNKS).contains(&count) || count * 4 > self.buf.len() - self.pos {
            return Err(TABLE);
        }
        let mut lens = Vec::with_capacity(count);
        let mut total = 0usize;
        for _ in 0..count {
            let len = self.u32()? as usize;
            total += len;
            if len == 0 || (inline && total > self.buf.len() - self.pos) {
                return Err(TABLE);
            }
            lens.push(len);
        }
        Ok(lens)
    }

    /// A count, then that many headers.
    /// A map of the next headers, with room for `extra` more (what a replay adds), so that
    /// adding them does not grow it.
    fn header_map(&mut self, extra: usize) -> Result<HeaderMap, Unreadable> {
        let count = self.u16()? as usize;
        // Each header takes at least 6 bytes: a corrupt count must not reserve more than the
        // rest could hold (nor more than a `HeaderMap` can, which would panic).
        let room = (self.buf.len() - self.pos) / 6;
        let mut map =
            HeaderMap::try_with_capacity(count.min(room) + extra).map_err(|_| MALFORMED)?;
        for _ in 0..count {
            let (name, value) = self.header()?;
            map.try_append(name, value).map_err(|_| MALFORMED)?;
        }
        Ok(map)
    }
}

/// Decodes what [`encode`] wrote (or an earlier version did), with room in its header map for
/// what a replay adds.
pub(crate) fn decode(payload: &Bytes) -> Result<StoredResponse, Unreadable> {
    decode_with_room(payload, REPLAY_ADDS, true)
}

/// A replay adds `idempotent-replayed`, the carried headers' `original-*` and perhaps the
/// omitted-body marker.
pub(crate) const REPLAY_ADDS: usize = 4;

/// Decodes, with room for `extra` more headers in the header map (a replay's, [`REPLAY_ADDS`]);
/// the integrity envelope's checksum is checked when `checksum` is set (see `seal::check`).
pub(crate) fn decode_with_room(
    payload: &Bytes,
    extra: usize,
    checksum: bool,
) -> Result<StoredResponse, Unreadable> {
    if payload.len() < 3 || &payload[..2] != MAGIC {
        return Err(Unreadable::Damaged("not a stored response"));
    }
    let version = payload[2];
    let pos = match version {
        1 | 2 => 3,
        VERSION | CHUNKED => seal::check(payload, checksum)?,
        0 => return Err(Unreadable::Damaged("version 0")),
        newer => return Err(Unreadable::Newer(newer)),
    };
    decode_content(Reader { buf: payload, pos }, version, extra, None)
}

/// Decodes a record: one held in parts from its head, its body shared as it is (no payload is
/// built, no checksum needed: its bytes never left the process); else its payload.
pub(crate) fn decode_record(
    record: &Record,
    extra: usize,
    checksum: bool,
) -> Result<StoredResponse, Unreadable> {
    match record.parts() {
        Some(parts) => decode_content(
            Reader {
                buf: &parts.head,
                pos: 0,
            },
            parts.version,
            extra,
            Some(&parts.body),
        ),
        None => decode_with_room(record.payload(), extra, checksum),
    }
}

/// Decodes the content of a record of `version` from `r`: its head, then its body (the rest of
/// the buffer, or `body` when the record keeps it apart, `r` then holding the head only).
fn decode_content(
    mut r: Reader<'_>,
    version: u8,
    extra: usize,
    body: Option<&Chunks>,
) -> Result<StoredResponse, Unreadable> {
    let flags = r.u8()?;
    let status = StatusCode::from_u16(r.u16()?).map_err(|_| MALFORMED)?;
    let headers = r.header_map(extra)?;
    let carried_count = r.u16()? as usize;
    let carried = (0..carried_count)
        .map(|_| r.header())
        .collect::<Result<_, _>>()?;
    let trailers = if version >= 2 && flags & FLAG_TRAILERS != 0 {
        Some(r.header_map(0)?)
    } else {
        None
    };
    let table = if version == CHUNKED {
        Some(r.chunk_table(body.is_none())?)
    } else {
        None
    };
    let body = match (body, table) {
        (Some(body), table) if r.pos == r.buf.len() => {
            // Held in parts: the table was made from these chunks in this process.
            if table.is_some_and(|lens| !lens.iter().copied().eq(body.iter().map(Bytes::len))) {
                return Err(MALFORMED);
            }
            body.clone()
        }
        (Some(_), _) => return Err(MALFORMED),
        (None, None) => Chunks::One(r.buf.slice(r.pos..)),
        (None, Some(lens)) => {
            let mut chunks = Vec::with_capacity(lens.len());
            for len in lens {
                chunks.push(r.shared(len)?);
            }
            if r.pos != r.buf.len() {
                return Err(Unreadable::Damaged("its chunks do not add up to its body"));
            }
            Chunks::Many(chunks.into())
        }
    };
    let body_omitted = flags & FLAG_BODY_OMITTED != 0;
    if body_omitted && !body.is_empty() {
        // `encode` writes no body for an omitted one: these bytes are not ours.
        return Err(MALFORMED);
    }
    Ok(StoredResponse {
        status,
        headers,
        carried,
        body,
        body_omitted,
        trailers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names matched without `HeaderName::from_bytes` decode to the name they spell, and
    /// the same name as `from_bytes` gives; others (custom, or not in canonical form) still
    /// go through it, and what it refuses is refused.
    #[test]
    fn stored_header_names_decode_alike_on_both_paths() {
        for &bytes in KNOWN_NAMES {
            let name = header_name(bytes).unwrap();
            assert_eq!(name.as_str().as_bytes(), bytes);
            assert_eq!(name, HeaderName::from_bytes(bytes).unwrap());
        }
        for bytes in [
            &b"x-request-id"[..],
            b"Content-Type",
            b"grpc-status",
            b"age",
        ] {
            assert_eq!(
                header_name(bytes).unwrap(),
                HeaderName::from_bytes(bytes).unwrap()
            );
        }
        for bytes in [&b""[..], b"bad name", b"a\0b", b"\xff"] {
            assert!(header_name(bytes).is_err(), "{bytes:?} accepted");
        }
    }

    /// Found by `cargo fuzz run http_record`: a header count of 35723 with nothing behind it
    /// made `HeaderMap::with_capacity` panic instead of refusing the record.
    #[test]
    fn a_corrupt_header_count_is_an_error_not_a_panic() {
        let crash = b"TI\x01\x00\x00\x8b\x8b\x8b\x8b\x8b\x8b\x8b\x00\x00II\x00\x00I";
        assert!(decode(&Bytes::from_static(crash)).is_err());
        let mut huge = b"TI\x01\x00\x00\xc8\xff\xff".to_vec();
        huge.extend(std::iter::repeat_n(0u8, 64));
        assert!(decode(&Bytes::from(huge)).is_err());
    }

    /// Found by `cargo fuzz run http_record`: a record flagged "body omitted" that still
    /// carries bytes after its head is refused (encode never writes one).
    #[test]
    fn an_omitted_body_with_bytes_behind_it_is_refused() {
        let crash = b"TI\x01\x01\x01\x01\x00\x00\x00\x00ITI\x01\x00\x01\x00\xf9I";
        assert!(decode(&Bytes::from_static(crash)).is_err());
        let crash = b"TI\x02\x01\x01\x01\x00\x00\x00\x00ITI\x01\x00\x01\x00\xf9I";
        assert!(decode(&Bytes::from_static(crash)).is_err());
    }

    #[test]
    fn round_trips_status_headers_carried_and_body() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.append("vary", HeaderValue::from_static("a"));
        headers.append("vary", HeaderValue::from_static("b"));
        let carried = vec![(
            HeaderName::from_static("x-request-id"),
            HeaderValue::from_static("r-1"),
        )];
        let body = [Bytes::from_static(b"{\"id\":"), Bytes::from_static(b"1}")];
        let payload = encode(
            StatusCode::CREATED,
            &headers,
            |_| true,
            &carried,
            Some(body.iter()),
            None,
        )
        .0;
        let decoded = decode(&payload).unwrap();
        assert_eq!(decoded.status, StatusCode::CREATED);
        assert_eq!(decoded.headers, headers);
        assert_eq!(decoded.carried, carried);
        assert_eq!(decoded.body.to_bytes(), Bytes::from_static(b"{\"id\":1}"));
        assert!(!decoded.body_omitted);
        assert_eq!(decoded.trailers, None);
    }

    #[test]
    fn trailers_round_trip() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        trailers.insert("grpc-message", HeaderValue::from_static(""));
        let body = [Bytes::from_static(b"\0\0\0\0\x02\x08\x01")];
        let decoded = decode(
            &encode(
                StatusCode::OK,
                &HeaderMap::new(),
                |_| true,
                &[],
                Some(body.iter()),
                Some(&trailers),
            )
            .0,
        )
        .unwrap();
        assert_eq!(decoded.trailers, Some(trailers));
        assert_eq!(decoded.body.to_bytes(), body[0]);
    }

    /// Records written before trailers were kept (version 1) still replay.
    #[test]
    fn version_1_records_are_still_read() {
        let v1 = b"TI\x01\x00\x00\xc9\x00\x01\x00\x0ccontent-type\x00\x00\x00\x10application/json\x00\x00{}";
        let decoded = decode(&Bytes::from_static(v1)).unwrap();
        assert_eq!(decoded.status, StatusCode::CREATED);
        assert_eq!(decoded.headers["content-type"], "application/json");
        assert_eq!(decoded.body.to_bytes(), "{}");
        assert_eq!(decoded.trailers, None);
    }

    #[test]
    fn omitted_body_is_flagged() {
        let decoded = decode(
            &encode(
                StatusCode::OK,
                &HeaderMap::new(),
                |_| true,
                &[],
                None::<std::slice::Iter<'_, Bytes>>,
                None,
            )
            .0,
        )
        .unwrap();
        assert!(decoded.body_omitted);
        assert!(decoded.body.is_empty());
    }

    #[test]
    fn unknown_versions_and_truncated_records_are_refused() {
        let payload = encode(
            StatusCode::OK,
            &HeaderMap::new(),
            |_| true,
            &[],
            Some([Bytes::from_static(b"{\"id\":1}")].iter()),
            None,
        )
        .0;
        let mut future = payload.to_vec();
        future[2] = 5;
        assert_eq!(decode(&Bytes::from(future)), Err(Unreadable::Newer(5)));
        for cut in 0..payload.len() {
            assert!(
                matches!(decode(&payload.slice(..cut)), Err(Unreadable::Damaged(_))),
                "cut at {cut}"
            );
        }
        assert!(decode(&Bytes::from_static(b"garbage that is long enough")).is_err());
    }

    /// A record cut inside its body, or with a body byte changed, is refused (version 3 carries
    /// its length and checksum); before, it replayed as a success with a cut body.
    #[test]
    fn a_damaged_body_is_refused_not_replayed() {
        let body = [Bytes::from_static(b"{\"id\":\"pay_1\",\"amount\":1000}")];
        let payload = encode(
            StatusCode::CREATED,
            &HeaderMap::new(),
            |_| true,
            &[],
            Some(body.iter()),
            None,
        )
        .0;
        let cut = payload.slice(..payload.len() - 5);
        assert!(matches!(decode(&cut), Err(Unreadable::Damaged(_))));
        let mut flipped = payload.to_vec();
        let last = flipped.len() - 1;
        flipped[last] = b']';
        assert!(matches!(
            decode(&Bytes::from(flipped)),
            Err(Unreadable::Damaged(_))
        ));
    }

    /// Records of every format version written so far replay, forever: these bytes are what
    /// each release wrote for `201`, `content-type: application/json`, a carried
    /// `x-request-id: r-1` and the body `{"id":1}` (version 2 with a `grpc-status: 0` trailer).
    #[test]
    fn golden_records_of_every_version_replay() {
        let v1: &[u8] = b"TI\x01\x00\x00\xc9\x00\x01\x00\x0ccontent-type\x00\x00\x00\x10application/json\x00\x01\x00\x0cx-request-id\x00\x00\x00\x03r-1{\"id\":1}";
        let v2: &[u8] = b"TI\x02\x02\x00\xc9\x00\x01\x00\x0ccontent-type\x00\x00\x00\x10application/json\x00\x01\x00\x0cx-request-id\x00\x00\x00\x03r-1\x00\x01\x00\x0bgrpc-status\x00\x00\x00\x010{\"id\":1}";
        let v3: &[u8] = b"TI\x03\x00\x00\x00\x46\x6e\x88\x1f\xfa\xc0\x8c\xab\x84\x00\x00\xc9\x00\x01\x00\x0ccontent-type\x00\x00\x00\x10application/json\x00\x01\x00\x0cx-request-id\x00\x00\x00\x03r-1{\"id\":1}";
        for (version, golden) in [(1, v1), (2, v2), (3, v3)] {
            let decoded = decode(&Bytes::from_static(golden))
                .unwrap_or_else(|e| panic!("version {version}: {e}"));
            assert_eq!(decoded.status, StatusCode::CREATED, "version {version}");
            assert_eq!(decoded.headers["content-type"], "application/json");
            assert_eq!(decoded.carried[0].1, "r-1");
            assert_eq!(decoded.body.to_bytes(), "{\"id\":1}", "version {version}");
            let trailers = decoded.trailers.map(|t| t["grpc-status"].clone());
            assert_eq!(
                trailers,
                (version == 2).then(|| HeaderValue::from_static("0"))
            );
        }
    }

    /// The version-4 golden record: the same response with its body written in two chunks,
    /// `{"id":` and `1}`. It replays, in its two chunks, forever; and it is what this build
    /// writes for that response, byte for byte.
    #[test]
    fn the_version_4_golden_record_replays_and_is_what_this_build_writes() {
        let v4: &[u8] = b"TI\x04\x00\x00\x00R\xc7\x0b\xfb\xbdr\x9e\xa3\xbe\x00\x00\xc9\x00\x01\x00\x0ccontent-type\x00\x00\x00\x10application/json\x00\x01\x00\x0cx-request-id\x00\x00\x00\x03r-1\x00\x00\x00\x02\x00\x00\x00\x06\x00\x00\x00\x02{\"id\":1}";
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        let carried = [(
            HeaderName::from_static("x-request-id"),
            HeaderValue::from_static("r-1"),
        )];
        let body = [Bytes::from_static(b"{\"id\":"), Bytes::from_static(b"1}")];
        let encoded = encode(
            StatusCode::CREATED,
            &headers,
            |_| true,
            &carried,
            Some(body.iter()),
            None,
        )
        .0;
        let hex: String = encoded.iter().map(|b| format!("\\x{b:02x}")).collect();
        assert_eq!(&encoded[..], v4, "{hex}");
        let decoded = decode(&Bytes::from_static(v4)).unwrap();
        assert_eq!(decoded.status, StatusCode::CREATED);
        assert_eq!(decoded.headers, headers);
        assert_eq!(decoded.carried, carried);
        assert_eq!(decoded.body, Chunks::Many(body.to_vec().into()));
    }

    /// What this build writes is the version-3 golden record above, byte for byte.
    #[test]
    fn this_build_writes_the_version_3_format() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        let carried = [(
            HeaderName::from_static("x-request-id"),
            HeaderValue::from_static("r-1"),
        )];
        let encoded = encode(
            StatusCode::CREATED,
            &headers,
            |_| true,
            &carried,
            Some([Bytes::from_static(b"{\"id\":1}")].iter()),
            None,
        )
        .0;
        let hex: String = encoded.iter().map(|b| format!("\\x{b:02x}")).collect();
        assert_eq!(&encoded[..3], b"TI\x03", "{hex}");
        assert_eq!(
            decode(&encoded).unwrap().body.to_bytes(),
            "{\"id\":1}",
            "{hex}"
        );
        assert_eq!(
            &encoded[3..15],
            &b"\x00\x00\x00\x46\x6e\x88\x1f\xfa\xc0\x8c\xab\x84"[..],
            "{hex}"
        );
    }

    fn chunked(chunks: &[&'static [u8]]) -> Bytes {
        let body: Vec<Bytes> = chunks.iter().map(|c| Bytes::from_static(c)).collect();
        encode(
            StatusCode::OK,
            &HeaderMap::new(),
            |_| true,
            &[],
            Some(body.iter()),
            None,
        )
        .0
    }

    /// A body of several chunks is written as version 4 and decodes to the same chunks, each
    /// a slice of the payload (not a copy): a store that serialises the record replays one
    /// frame per original chunk. Empty chunks are left out.
    #[test]
    fn a_body_of_several_chunks_keeps_its_boundaries() {
        let payload = chunked(&[b"data: 1\n\n", b"", b"data: 2\n\n", b"data: 3\n\n"]);
        assert_eq!(&payload[..3], b"TI\x04");
        let decoded = decode(&payload).unwrap();
        let Chunks::Many(chunks) = &decoded.body else {
            panic!("one chunk: {:?}", decoded.body)
        };
        assert_eq!(&chunks[..], ["data: 1\n\n", "data: 2\n\n", "data: 3\n\n"]);
        let range = payload.as_ptr_range();
        assert!(chunks.iter().all(|c| range.contains(&c.as_ptr())));
        // One chunk (or one and empty ones): version 3, the same bytes as before.
        assert_eq!(&chunked(&[b"", b"{}", b""])[..3], b"TI\x03");
    }

    /// Every cut of a chunked record, every byte of its chunk table or body changed, is a
    /// damaged record: checked by the checksum, and by the table alone where it is not checked
    /// (a count or a length that does not add up).
    #[test]
    fn a_damaged_chunk_table_or_chunk_is_refused() {
        let payload = chunked(&[b"data: 1\n\n", b"data: 2\n\n", b"data: 3\n\n"]);
        let table_at = payload.len() - 27 - 16;
        assert_eq!(&payload[table_at..table_at + 4], 3u32.to_be_bytes());
        for cut in 0..payload.len() {
            assert!(
                matches!(decode(&payload.slice(..cut)), Err(Unreadable::Damaged(_))),
                "cut at {cut}"
            );
        }
        for at in 3..payload.len() {
            let mut changed = payload.to_vec();
            changed[at] ^= 0x10;
            assert!(
                matches!(decode(&Bytes::from(changed)), Err(Unreadable::Damaged(_))),
                "byte {at} changed"
            );
        }
        // Unchecked (as for a payload that never left the process), the table still has to
        // add up: a count one more or one less, a length moved between chunks.
        let unchecked = |bytes: Vec<u8>| decode_with_room(&Bytes::from(bytes), 0, false);
        assert!(unchecked(payload.to_vec()).is_ok());
        for count in [2u32, 4, 0, 1, 65_537] {
            let mut changed = payload.to_vec();
            changed[table_at..table_at + 4].copy_from_slice(&count.to_be_bytes());
            assert!(unchecked(changed).is_err(), "count {count}");
        }
        let mut moved = payload.to_vec();
        moved[table_at + 7] += 1;
        moved[table_at + 11] -= 1;
        assert!(
            unchecked(moved.clone()).is_ok(),
            "the same bytes, other boundaries"
        );
        let mut shorter = moved;
        shorter[table_at + 11] -= 1;
        assert!(unchecked(shorter).is_err(), "a byte left out of the table");
    }

    /// A hostile stream of a million one-byte chunks is stored with at most `MAX_BODY_CHUNKS`
    /// chunks, each of whole original chunks, and replays byte-identical.
    #[test]
    fn a_million_tiny_chunks_are_merged_under_the_bound() {
        let tiny: Vec<Bytes> = (0..1_000_000u32)
            .map(|i| Bytes::from(vec![(i % 251) as u8]))
            .collect();
        let whole: Vec<u8> = tiny.iter().flat_map(|c| c.iter().copied()).collect();
        let record = record(
            None,
            StatusCode::OK,
            &HeaderMap::new(),
            |_| true,
            &[],
            Some(tiny.iter()),
            None,
        );
        let from_parts = decode_record(&record, 0, true).unwrap();
        assert!(from_parts.body.iter().len() <= MAX_BODY_CHUNKS);
        assert!(from_parts.body.iter().len() > MAX_BODY_CHUNKS / 2);
        let decoded = decode(record.payload()).unwrap();
        assert_eq!(decoded.body, from_parts.body);
        assert_eq!(decoded.body.to_bytes(), whole);
        // Under the bound, nothing is merged.
        let many: Vec<Bytes> = tiny[..MAX_BODY_CHUNKS].to_vec();
        let record = super::record(
            None,
            StatusCode::OK,
            &HeaderMap::new(),
            |_| true,
            &[],
            Some(many.iter()),
            None,
        );
        assert_eq!(
            decode(record.payload()).unwrap().body.iter().len(),
            MAX_BODY_CHUNKS
        );
    }

    /// A chunked record is the version a release before chunk tables reports as newer
    /// (`Unreadable::Newer`, answered 503 `#unknown-record-version`), never misreads: such a
    /// release knew versions 1 to 3 only.
    #[test]
    fn a_chunked_record_is_a_newer_version_to_earlier_releases() {
        let payload = chunked(&[b"a", b"b"]);
        assert!(
            payload[2] > 3,
            "releases before it read versions 1 to 3 only"
        );
    }

    proptest::proptest! {
        /// A chunked record with any bytes changed, cut or added, read with or without its
        /// checksum: never a panic; what decodes has chunks that are none empty, at most
        /// `MAX_BODY_CHUNKS`, and re-encode to a record that decodes the same (the fuzz
        /// target's round trip, `cargo fuzz run http_record`, which covers format 4 too).
        #[test]
        fn a_changed_chunked_record_never_panics_and_what_decodes_round_trips(
            chunks in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 1..6), 2..6),
            edits in proptest::collection::vec((proptest::num::usize::ANY, proptest::num::u8::ANY), 1..4),
            cut in proptest::option::of(proptest::num::usize::ANY),
            tail in proptest::collection::vec(proptest::num::u8::ANY, 0..6),
        ) {
            let chunks: Vec<Bytes> = chunks.into_iter().map(Bytes::from).collect();
            let payload = encode(StatusCode::OK, &HeaderMap::new(), |_| true, &[], Some(chunks.iter()), None).0;
            let mut changed = payload.to_vec();
            // Changes after the envelope (the table and body), where the checksum is all that
            // guards them when it is checked.
            for (at, byte) in edits {
                let at = 15 + at % (changed.len() - 15);
                changed[at] = byte;
            }
            if let Some(cut) = cut {
                changed.truncate(cut % (changed.len() + 1));
            }
            changed.extend_from_slice(&tail);
            crate::http::fuzz_record(&changed);
            if let Ok(stored) = decode_with_room(&Bytes::from(changed), 0, false) {
                proptest::prop_assert!(stored.body.iter().all(|c| !c.is_empty()) || stored.body.is_empty());
                proptest::prop_assert!(stored.body.iter().len() <= MAX_BODY_CHUNKS);
                let again = encode(stored.status, &stored.headers, |_| true, &stored.carried, Some(stored.body.iter()), None).0;
                proptest::prop_assert_eq!(&decode(&again).unwrap().body, &stored.body);
            }
        }

        /// A record held in parts decodes (from its head, its body shared) to what its sealed
        /// payload decodes to, checksum checked: every shape, many chunks, empty ones, an
        /// omitted body, trailers.
        #[test]
        fn a_record_in_parts_decodes_as_its_sealed_payload(
            status in 200u16..600,
            headers in proptest::collection::vec(("x-[a-z]{1,6}", "[ -~]{0,20}"), 0..5),
            carried in proptest::option::of("[ -~]{0,12}"),
            chunks in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..200), 0..5),
            omitted in proptest::bool::ANY,
            trailers in proptest::option::of(proptest::collection::vec(("t-[a-z]{1,4}", "[0-9]{0,3}"), 0..3)),
        ) {
            let map = |pairs: &[(String, String)]| {
                let mut map = HeaderMap::new();
                for (name, value) in pairs {
                    map.append(
                        HeaderName::from_bytes(name.as_bytes()).unwrap(),
                        HeaderValue::from_str(value).unwrap(),
                    );
                }
                map
            };
            let headers = map(&headers);
            let trailers = trailers.map(|t| map(&t));
            let carried: Vec<_> = carried
                .map(|v| (HeaderName::from_static("x-request-id"), HeaderValue::from_str(&v).unwrap()))
                .into_iter()
                .collect();
            let chunks: Vec<Bytes> = chunks.into_iter().map(Bytes::from).collect();
            let record = record(
                Some(7),
                StatusCode::from_u16(status).unwrap(),
                &headers,
                |_| true,
                &carried,
                (!omitted).then(|| chunks.iter()),
                trailers.as_ref(),
            );
            let from_parts = decode_record(&record, REPLAY_ADDS, true).unwrap();
            let payload = record.payload().clone();
            let several = !omitted && chunks.iter().filter(|c| !c.is_empty()).count() > 1;
            proptest::prop_assert_eq!(payload[2], if several { 4 } else { 3 });
            let from_payload = decode(&payload).unwrap();
            proptest::prop_assert_eq!(&from_parts.body, &from_payload.body, "the same chunks");
            let whole: Vec<u8> = if omitted { Vec::new() } else { chunks.concat() };
            proptest::prop_assert_eq!(from_parts.body.to_bytes(), Bytes::from(whole));
            let strip = |mut s: StoredResponse| { s.body = Chunks::default(); s };
            proptest::prop_assert_eq!(strip(from_parts), strip(from_payload));
            proptest::prop_assert_eq!(record.payload_len(), payload.len());
            // Kept: a second call builds nothing.
            proptest::prop_assert!(std::ptr::eq(record.payload().as_ptr(), payload.as_ptr()));
        }
    }
}
