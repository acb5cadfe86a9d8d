//! The storage protocol: a small set of **atomic** operations that every backend implements.
//!
//! The layer never reads a record and then writes one (a check-then-insert race would let two
//! duplicates both run). Instead each step of a request's life is one atomic call:
//!
//! | call | when | atomically |
//! |------|------|------------|
//! | [`Store::claim_as`] | before the handler runs | returns the completed record, or says the key is in flight, or takes a lease on the key for the caller's [`OwnerToken`] |
//! | [`Store::renew`] | while the handler runs | extends the lease, only if the caller still owns it |
//! | [`Store::complete`] | after the handler answered | replaces the claim by the record (with its retention TTL), only if the caller still owns the lease |
//! | [`Store::release`] | the answer is not to be kept | deletes the claim, only if the caller still owns it, so a retry can run |
//! | [`Store::wait`] | a duplicate waits for the original | resolves when the key *may* have changed (a hint; the caller claims again) |
//!
//! Nothing in this module knows about HTTP: a [`Record`] is an opaque payload plus a request
//! fingerprint, and keys are plain strings. The HTTP layer and the message-consumer adapter
//! both speak this protocol, against the same stores.
//!
//! # Leases and fencing
//!
//! A claim holds a *lease*: if its owner dies, the lease lapses and the next claim takes the
//! key over with a new [`OwnerToken`]. Every owner-checked call compares the token, so the old
//! owner, should it wake up and try to complete, gets [`StoreError::LeaseLost`] and cannot
//! overwrite the new owner's work. Stores must measure leases and retention on *their own*
//! clock (Redis TTLs, the database's `now()`), never on the clock of the calling process.
//!
//! # Writing a store
//!
//! Implement the five methods with those atomicity rules, then run the conformance suite
//! (`tower_idempotency::store::conformance`, feature `conformance`) against it. The
//! `custom_store` example is a complete store over a `Mutex<HashMap>` that passes the suite:
//!
//! ```
//! use std::time::Duration;
//! use tower_idempotency::store::{ClaimOutcome, MemoryStore, Record, Store};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_idempotency::store::StoreError> {
//! let store = MemoryStore::new();
//! let lease = Duration::from_secs(60);
//!
//! let ClaimOutcome::Claimed(token) = store.claim("tenant/POST/charges/k1", lease).await? else {
//!     unreachable!("a fresh key is always claimed");
//! };
//! // A second claim while the first runs sees it in flight.
//! assert!(matches!(store.claim("tenant/POST/charges/k1", lease).await?, ClaimOutcome::InFlight { .. }));
//!
//! let record = Record::new(Some(42), "the outcome");
//! store.complete("tenant/POST/charges/k1", &token, record, Duration::from_secs(3600)).await?;
//! match store.claim("tenant/POST/charges/k1", lease).await? {
//!     ClaimOutcome::Completed(record) => assert_eq!(record.payload(), "the outcome"),
//!     other => panic!("expected the record, got {other:?}"),
//! }
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::BoxError;

mod boxed;
pub(crate) mod clock;
#[cfg(any(feature = "redis", feature = "postgres", feature = "sqlite"))]
mod known;
mod memory;
#[cfg(feature = "postgres")]
pub(crate) mod postgres;
#[cfg(feature = "redis")]
pub(crate) mod redis;
#[cfg(any(feature = "redis", feature = "postgres", feature = "sqlite"))]
pub(crate) mod sealed;
#[cfg(feature = "sqlite")]
mod sqlite;
#[cfg(any(feature = "redis", feature = "postgres", feature = "sqlite"))]
mod waker;

#[cfg(feature = "conformance")]
#[cfg_attr(docsrs, doc(cfg(feature = "conformance")))]
pub mod conformance;
pub(crate) mod seal;

pub use boxed::BoxStore;
pub(crate) use boxed::DynStore;
pub use memory::{MemoryStore, MemoryStoreBuilder};
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use postgres::{InvalidTableName, PostgresReplication, PostgresStore};
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use redis::{RedisServerReport, RedisStore};
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub(crate) use sealed::record_from_columns;
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub use sqlite::{SqliteOpenError, SqliteStore, SqliteStoreBuilder, Synchronous};

/// Proof of owning a claim. See the [module docs](self).
///
/// Tokens are opaque 128-bit values; a store must never hand out the same token twice for
/// one key (random 128-bit values, or a counter combined with a per-process random epoch).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct OwnerToken(u128);

impl OwnerToken {
    /// Wraps a raw token value.
    pub const fn from_u128(value: u128) -> Self {
        Self(value)
    }

    /// A fresh random token (128 random bits).
    pub fn random() -> Self {
        Self(fastrand::u128(..))
    }

    /// The raw token value.
    pub const fn as_u128(&self) -> u128 {
        self.0
    }
}

impl fmt::Debug for OwnerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OwnerToken({:032x})", self.0)
    }
}

impl fmt::Display for OwnerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// What the original request produced, as a store keeps it. See the [module docs](self).
///
/// The payload is opaque to the store (the HTTP layer encodes a response into it, the consumer
/// adapter a serialised outcome); cloning a record is cheap (the payload is reference counted).
/// Two records are equal when their fingerprints and payloads are.
///
/// A record the HTTP layer makes is held in two parts until a payload is asked for: the
/// response head, encoded, and the body as the handler's own bytes (its chunks, never copied).
/// The memory store keeps it so and replays from it. [`payload`](Self::payload) builds the
/// single sealed buffer (the integrity envelope around head and body) the first time it is
/// called, and keeps it: a store that sends or writes the record (SQLite, PostgreSQL, Redis, a
/// custom store) gets the same bytes as from a record made with [`Record::new`].
#[derive(Clone)]
pub struct Record {
    fingerprint: Option<u128>,
    content: Content,
    /// The decoded form of the payload, kept by a store that hands out clones of one record
    /// (the memory store), so that its replays decode it once. See [`Memo`].
    memo: Option<Arc<Memo>>,
    /// What the decoded form takes in memory, as estimated by the adapter that wrote the
    /// record (0: it keeps none). A store that attaches a memo charges it to its capacity.
    memo_weight: u32,
    /// The payload never left this process (the memory store): its integrity envelope need
    /// not be checked when it is read, since the bytes are the ones the writer sealed.
    in_process: bool,
}

/// A record's outcome: one serialised payload, or a head and a body not yet put together.
#[derive(Clone)]
enum Content {
    Payload(Bytes),
    Parts(Arc<Parts>),
}

/// A record held in parts (see [`Record`]): what its sealed payload is made of, and that
/// payload once something asked for it.
pub(crate) struct Parts {
    magic: [u8; 2],
    /// The format version of the content (the adapter's: what its head holds depends on it).
    pub(crate) version: u8,
    /// The encoded head: what the sealed payload holds between its envelope and its body.
    pub(crate) head: Bytes,
    /// The body, as the writer gave it.
    pub(crate) body: Chunks,
    /// What the body's chunks keep allocated: their length, or more for a chunk that owns spare
    /// capacity (see `Record::holding_body`).
    body_held: usize,
    sealed: std::sync::OnceLock<Bytes>,
}

impl Parts {
    /// The length of the payload these parts seal into.
    fn payload_len(&self) -> usize {
        seal::HEADER_LEN + self.head.len() + self.body.len()
    }

    fn seal(&self) -> Bytes {
        use bytes::BufMut;
        let mut buf = seal::start(&self.magic, self.version, self.head.len() + self.body.len());
        buf.put_slice(&self.head);
        for chunk in self.body.iter() {
            buf.put_slice(chunk);
        }
        seal::finish(buf)
    }
}

/// A body as its writer produced it: no bytes, one chunk, or several (their boundaries kept).
/// Cloning shares the chunks.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Chunks {
    /// One chunk (or none: an empty one).
    One(Bytes),
    /// Several chunks, in order.
    Many(Arc<[Bytes]>),
}

impl Default for Chunks {
    fn default() -> Self {
        Chunks::One(Bytes::new())
    }
}

impl Chunks {
    /// The chunks of `pieces`, in order, empty ones left out.
    pub(crate) fn collect<'a>(pieces: impl Iterator<Item = &'a Bytes>) -> Self {
        let mut pieces = pieces.filter(|piece| !piece.is_empty());
        let Some(first) = pieces.next() else {
            return Chunks::default();
        };
        match pieces.next() {
            None => Chunks::One(first.clone()),
            Some(second) => {
                let all: Vec<Bytes> = [first.clone(), second.clone()]
                    .into_iter()
                    .chain(pieces.cloned())
                    .collect();
                Chunks::Many(all.into())
            }
        }
    }

    /// The chunks, in order.
    pub(crate) fn iter(&self) -> std::slice::Iter<'_, Bytes> {
        match self {
            Chunks::One(one) => std::slice::from_ref(one).iter(),
            Chunks::Many(many) => many.iter(),
        }
    }

    /// The body's length in bytes.
    pub(crate) fn len(&self) -> usize {
        match self {
            Chunks::One(one) => one.len(),
            Chunks::Many(many) => many.iter().map(Bytes::len).sum(),
        }
    }

    /// Whether the body has no bytes.
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The body as one buffer (a copy when it has several chunks).
    #[cfg(test)]
    pub(crate) fn to_bytes(&self) -> Bytes {
        match self {
            Chunks::One(one) => one.clone(),
            Chunks::Many(many) => many.concat().into(),
        }
    }
}

/// The decoded form of a record's payload, filled by the first replay: the adapter that wrote
/// it decodes (and checks) the payload once; later replays clone the result.
pub(crate) type Memo = std::sync::OnceLock<Arc<dyn std::any::Any + Send + Sync>>;

impl PartialEq for Record {
    fn eq(&self, other: &Self) -> bool {
        self.fingerprint == other.fingerprint && self.payload() == other.payload()
    }
}

impl Eq for Record {}

impl Record {
    /// A record of `payload`, produced by a request whose fingerprint was `fingerprint`
    /// (`None` when fingerprints are not checked).
    pub fn new(fingerprint: Option<u128>, payload: impl Into<Bytes>) -> Self {
        Self::of(fingerprint, Content::Payload(payload.into()))
    }

    /// A record held in parts: `head` and `body` are the content of an integrity envelope of
    /// `magic` and `version` (see [`seal`]), which [`payload`](Self::payload) builds when asked.
    pub(crate) fn in_parts(
        fingerprint: Option<u128>,
        (magic, version): (&[u8; 2], u8),
        head: Bytes,
        body: Chunks,
    ) -> Self {
        let parts = Parts {
            magic: *magic,
            version,
            head,
            body_held: body.len(),
            body,
            sealed: std::sync::OnceLock::new(),
        };
        Self::of(fingerprint, Content::Parts(Arc::new(parts)))
    }

    fn of(fingerprint: Option<u128>, content: Content) -> Self {
        Self {
            fingerprint,
            content,
            memo: None,
            memo_weight: 0,
            in_process: false,
        }
    }

    /// The fingerprint of the request that produced this record.
    pub fn fingerprint(&self) -> Option<u128> {
        self.fingerprint
    }

    /// The stored outcome, as one buffer. For a record the HTTP layer made (held as a head and
    /// the handler's body, see [`Record`]), the sealed payload is built by the first call and
    /// kept for the later ones (and the record's clones).
    pub fn payload(&self) -> &Bytes {
        match &self.content {
            Content::Payload(payload) => payload,
            Content::Parts(parts) => parts.sealed.get_or_init(|| parts.seal()),
        }
    }

    /// Takes the stored outcome (see [`payload`](Self::payload)).
    pub fn into_payload(self) -> Bytes {
        match self.content {
            Content::Payload(payload) => payload,
            Content::Parts(_) => self.payload().clone(),
        }
    }

    /// The length of [`payload`](Self::payload), without building it.
    pub(crate) fn payload_len(&self) -> usize {
        match &self.content {
            Content::Payload(payload) => payload.len(),
            Content::Parts(parts) => parts.payload_len(),
        }
    }

    /// What the record holds in memory beyond its own struct: its payload; or, held in parts,
    /// its head, its body's bytes, the shared allocation that holds them (with the list of
    /// chunks of a body of several), and the sealed payload if one was built. What a store
    /// that keeps records in memory charges for it.
    pub(crate) fn held_bytes(&self) -> usize {
        match &self.content {
            Content::Payload(payload) => payload.len(),
            Content::Parts(parts) => {
                let chunks = match &parts.body {
                    Chunks::One(_) => 0,
                    Chunks::Many(many) => 16 + std::mem::size_of_val::<[Bytes]>(many),
                };
                16 + std::mem::size_of::<Parts>()
                    + parts.head.len()
                    + parts.body_held
                    + chunks
                    + parts.sealed.get().map_or(0, Bytes::len)
            }
        }
    }

    /// Says that the body of this record, held in parts, keeps `held` bytes allocated (at least
    /// its length): what [`held_bytes`](Self::held_bytes) charges for it. For a record just
    /// made, before it is cloned.
    pub(crate) fn holding_body(mut self, held: usize) -> Self {
        if let Content::Parts(parts) = &mut self.content {
            if let Some(parts) = Arc::get_mut(parts) {
                parts.body_held = held.max(parts.body.len());
            }
        }
        self
    }

    /// The head and body of a record held in parts (`None`: it is one payload).
    pub(crate) fn parts(&self) -> Option<&Parts> {
        match &self.content {
            Content::Payload(_) => None,
            Content::Parts(parts) => Some(parts),
        }
    }
    /// Says that the decoded form of this record takes about `weight` bytes, and may be kept.
    pub(crate) fn with_memo_weight(mut self, weight: u32) -> Self {
        self.memo_weight = weight;
        self
    }

    /// What the decoded form would take (0: none is to be kept).
    pub(crate) fn memo_weight(&self) -> u32 {
        self.memo_weight
    }

    /// Gives this record (and the clones made from it from now on) a slot for its decoded
    /// form, if its writer asked for one.
    pub(crate) fn attach_memo(&mut self) {
        if self.memo_weight > 0 && self.memo.is_none() {
            self.memo = Some(Arc::default());
        }
    }

    /// Says that the payload is held in this process as its writer gave it (never serialised,
    /// sent or stored outside): reading it needs no integrity check.
    pub(crate) fn mark_in_process(&mut self) {
        self.in_process = true;
    }

    /// Whether the payload is held in this process as its writer gave it.
    pub(crate) fn in_process(&self) -> bool {
        self.in_process
    }

    /// The slot for the decoded form, when the store attached one.
    pub(crate) fn memo(&self) -> Option<&Memo> {
        self.memo.as_deref()
    }
}

impl fmt::Debug for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Record")
            .field(
                "fingerprint",
                &self.fingerprint.map(|v| format!("{v:032x}")),
            )
            .field("payload_len", &self.payload_len())
            .finish()
    }
}

/// A handler's progress under a key, saved so that a later run of the same key resumes instead
/// of repeating a side effect: a phase name and a small value, bound to the fingerprint of the
/// request that saved it. See [`RecoveryPoints`](crate::RecoveryPoints) for how handlers use
/// them.
///
/// A store keeps the point whole, fingerprint included, and gives it back as it was saved (the
/// conformance suite checks it): the layer compares the fingerprint with the loading request's
/// own, so that a request with another payload never resumes from another request's progress.
#[derive(Clone, PartialEq, Eq)]
pub struct RecoveryPoint {
    phase: String,
    data: Bytes,
    fingerprint: Option<u128>,
}

/// The stored form of a point: `"TP" version length xxh3` (the integrity envelope), then, in
/// version 2, `fingerprint-flag:u8 [fingerprint:u128] phase-len:u32 phase data`; version 1
/// (read only) was `phase-len:u16 phase data`, bound to no request.
#[cfg(any(feature = "redis", feature = "postgres", feature = "sqlite"))]
const POINT_MAGIC: &[u8; 2] = b"TP";
#[cfg(any(feature = "redis", feature = "postgres", feature = "sqlite"))]
const POINT_VERSION: u8 = 2;

impl RecoveryPoint {
    /// A point at `phase`, carrying `data`, bound to no request (see
    /// [`with_fingerprint`](Self::with_fingerprint)).
    pub fn new(phase: impl Into<String>, data: impl Into<Bytes>) -> Self {
        Self {
            phase: phase.into(),
            data: data.into(),
            fingerprint: None,
        }
    }

    /// This point, bound to the request whose fingerprint is `fingerprint` (`None`: to any).
    pub fn with_fingerprint(mut self, fingerprint: Option<u128>) -> Self {
        self.fingerprint = fingerprint;
        self
    }

    /// The phase the work had reached.
    pub fn phase(&self) -> &str {
        &self.phase
    }

    /// What the work saved with it.
    pub fn data(&self) -> &Bytes {
        &self.data
    }

    /// The fingerprint of the request that saved it (`None`: fingerprints are not checked, or
    /// the point was saved by a build that did not bind points).
    pub fn fingerprint(&self) -> Option<u128> {
        self.fingerprint
    }

    /// The bytes a store keeps (stores that keep points as one value use this encoding).
    #[cfg(any(feature = "redis", feature = "postgres", feature = "sqlite"))]
    pub(crate) fn encode(&self) -> Bytes {
        use bytes::BufMut;
        let phase = self.phase.as_bytes();
        // The layer refuses points over its limit (at most `u32::MAX`) before they get here;
        // a longer phase would not fit its length, and a cut one could not be resumed.
        let phase_len =
            u32::try_from(phase.len()).expect("a recovery point's phase is under 4 GiB");
        let fingerprint_len = if self.fingerprint.is_some() { 16 } else { 0 };
        let mut buf = seal::start(
            POINT_MAGIC,
            POINT_VERSION,
            1 + fingerprint_len + 4 + phase.len() + self.data.len(),
        );
        match self.fingerprint {
            Some(fingerprint) => {
                buf.put_u8(1);
                buf.put_u128(fingerprint);
            }
            None => buf.put_u8(0),
        }
        buf.put_u32(phase_len);
        buf.put_slice(phase);
        buf.put_slice(&self.data);
        seal::finish(buf)
    }

    /// Reads what [`encode`](Self::encode) wrote (this version or version 1).
    #[cfg(any(feature = "redis", feature = "postgres", feature = "sqlite"))]
    pub(crate) fn decode(stored: Bytes) -> Result<Self, StoreError> {
        use seal::Unreadable;
        let corrupt = |what: &'static str| StoreError::Corrupt(what.into());
        let version = match stored.get(..3) {
            Some([b'T', b'P', version @ (1 | POINT_VERSION)]) => *version,
            Some([b'T', b'P', version]) if *version > POINT_VERSION => {
                return Err(StoreError::UnknownFormat { version: *version })
            }
            _ => {
                return Err(StoreError::Corrupt(Box::new(Unreadable::Damaged(
                    "not a recovery point",
                ))))
            }
        };
        let content = seal::open(&stored).map_err(|error| StoreError::Corrupt(Box::new(error)))?;
        let (fingerprint, rest) = if version == 1 {
            (None, 0)
        } else {
            match content.first() {
                Some(0) => (None, 1),
                Some(1) => {
                    let bytes = content
                        .get(1..17)
                        .ok_or_else(|| corrupt("a recovery point's fingerprint is cut"))?;
                    let fingerprint = u128::from_be_bytes(bytes.try_into().expect("16 bytes"));
                    (Some(fingerprint), 17)
                }
                _ => return Err(corrupt("a recovery point's fingerprint flag is damaged")),
            }
        };
        let (len, start) = if version == 1 {
            let len = content
                .get(..2)
                .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])));
            (len, 2)
        } else {
            let len = content
                .get(rest..rest + 4)
                .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")) as usize);
            (len, rest + 4)
        };
        let end = len
            .and_then(|len| start.checked_add(len))
            .filter(|end| *end <= content.len())
            .ok_or_else(|| corrupt("a recovery point's phase is cut"))?;
        let phase = std::str::from_utf8(&content[start..end])
            .map_err(|_| corrupt("a recovery point's phase is not UTF-8"))?
            .to_owned();
        Ok(Self {
            phase,
            data: content.slice(end..),
            fingerprint,
        })
    }
}

impl fmt::Debug for RecoveryPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecoveryPoint")
            .field("phase", &self.phase)
            .field("data_len", &self.data.len())
            .field(
                "fingerprint",
                &self.fingerprint.map(|v| format!("{v:032x}")),
            )
            .finish()
    }
}

/// The answer to [`Store::claim`]. See the [module docs](self).
#[derive(Debug, Clone)]
pub enum ClaimOutcome {
    /// The caller now owns the key until its lease lapses.
    Claimed(OwnerToken),
    /// Another caller owns the key and has not finished.
    InFlight {
        /// How long the current lease still runs, when the store knows.
        lease_remaining: Option<Duration>,
    },
    /// The key was completed earlier; here is its record.
    Completed(Record),
}

/// The answer to [`Store::read_stream`]: where a key's live stream stands.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum StreamRead {
    /// The key's current owner streams: the chunks from the index asked for (possibly none
    /// new yet).
    Live(Vec<Bytes>),
    /// The key is in flight, but its current owner has appended no stream (not yet, or not
    /// at all).
    NotLive,
    /// The key was completed: its record.
    Completed(Record),
    /// The key holds nothing: released, expired, deleted, or never claimed.
    Absent,
}

/// Why a store call failed. See the [module docs](self).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The caller's lease lapsed and the key was released, completed or taken over by
    /// another owner: the owner-checked call was refused.
    #[error("the lease on this key was lost")]
    LeaseLost,
    /// The backend could not be reached or failed.
    #[error("store backend failed")]
    Backend(#[source] BoxError),
    /// What the backend holds for the key cannot be read: damaged (a changed or cut value, a
    /// malformed row). The key *was* used, so the layer never runs the handler for it (whatever
    /// its store-error policy): it answers 500 `#unreadable-record` until the record expires or
    /// an operator deletes it.
    #[error("stored record is unreadable")]
    Corrupt(#[source] BoxError),
    /// What the backend holds for the key was written in a format newer than this build reads
    /// (a later release of this crate, during a rolling upgrade). The layer never runs the
    /// handler for it: it answers 503 `#unknown-record-version` with `Retry-After`, so that the
    /// retry may reach an instance that reads it.
    #[error("stored record has format version {version}, newer than this build reads")]
    UnknownFormat {
        /// The format version found.
        version: u8,
    },
    /// The store does not implement this operation (an operator call on a custom store).
    #[error("this store does not support {0}")]
    Unsupported(&'static str),
}

/// What a store holds for a key, for operators: see [`Store::inspect`] and the
/// [`admin`](crate::admin) module.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum KeyState {
    /// Nothing (never claimed, released, or expired).
    Absent,
    /// A request holds the key now.
    InFlight {
        /// How long its lease still runs, when the store knows.
        lease_remaining: Option<Duration>,
    },
    /// The outcome is stored.
    Completed {
        /// The record.
        record: Record,
        /// How long it is still kept, when the store knows.
        expires_in: Option<Duration>,
    },
}

impl StoreError {
    /// Wraps a backend error.
    pub fn backend(error: impl Into<BoxError>) -> Self {
        Self::Backend(error.into())
    }
}

/// A storage backend for idempotency records. See the [module docs](self) for the protocol.
///
/// Every method must be atomic with respect to the others for the same key, including across
/// processes for shared stores.
pub trait Store: Send + Sync + 'static {
    /// Atomically: if `key` holds an unexpired record, return it; else if a live lease holds
    /// it, report it in flight; else (absent, expired, or a lapsed lease) take it for `token`
    /// with a lease of `lease` and return [`ClaimOutcome::Claimed`] with that same token.
    ///
    /// The caller chooses the token (128 random bits, [`OwnerToken::random`]), so that it can
    /// release a claim whose call timed out but may still land: a late write must not lock the
    /// key for a whole lease.
    fn claim_as(
        &self,
        key: &str,
        token: &OwnerToken,
        lease: Duration,
    ) -> impl Future<Output = Result<ClaimOutcome, StoreError>> + Send;

    /// [`claim_as`](Self::claim_as) answered at once, for a store that can claim without
    /// waiting: no I/O, and no lock held longer than a map operation. The layer calls it first,
    /// on the request's own task, and when it answers, a replay skips the store call's future,
    /// its timeout and the keyed request's general state. It must answer exactly as `claim_as`
    /// would (atomically, taking the key for `token` when it is free).
    ///
    /// `None`, the default, means the store cannot, and the layer calls `claim_as` instead.
    /// [`MemoryStore`] answers; the stores with a network or a file behind them do not.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_idempotency::store::{ClaimOutcome, MemoryStore, OwnerToken, Store};
    ///
    /// let store = MemoryStore::new();
    /// let token = OwnerToken::random();
    /// let lease = Duration::from_secs(30);
    /// match store.claim_now("key", &token, lease) {
    ///     Some(Ok(ClaimOutcome::Claimed(owner))) => assert_eq!(owner, token),
    ///     other => panic!("a fresh key is claimed at once: {other:?}"),
    /// }
    /// assert!(matches!(
    ///     store.claim_now("key", &OwnerToken::random(), lease),
    ///     Some(Ok(ClaimOutcome::InFlight { .. }))
    /// ));
    /// ```
    fn claim_now(
        &self,
        key: &str,
        token: &OwnerToken,
        lease: Duration,
    ) -> Option<Result<ClaimOutcome, StoreError>> {
        let _ = (key, token, lease);
        None
    }

    /// [`claim_as`](Self::claim_as) with a fresh random token.
    fn claim(
        &self,
        key: &str,
        lease: Duration,
    ) -> impl Future<Output = Result<ClaimOutcome, StoreError>> + Send {
        let token = OwnerToken::random();
        async move { self.claim_as(key, &token, lease).await }
    }

    /// Extends the lease of `token` on `key` to `lease` from now. Fails with
    /// [`StoreError::LeaseLost`] when `token` no longer owns a live lease.
    fn renew(
        &self,
        key: &str,
        token: &OwnerToken,
        lease: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Replaces the claim of `token` by `record`, kept for `ttl`. Fails with
    /// [`StoreError::LeaseLost`] when `token` no longer owns a live lease (nothing is written).
    fn complete(
        &self,
        key: &str,
        token: &OwnerToken,
        record: Record,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Deletes the claim of `token`, so the next claim runs. Fails with
    /// [`StoreError::LeaseLost`] when `token` no longer owns it (nothing is deleted).
    fn release(
        &self,
        key: &str,
        token: &OwnerToken,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Resolves when `key` may have left the in-flight state, or after a backoff; the caller
    /// then claims again. `attempt` counts the waits of this caller, from 0.
    ///
    /// The default sleeps with exponential backoff and full jitter (from 10 ms, capped at
    /// 500 ms), so waiting duplicates never poll in a tight loop. Stores that can be notified
    /// (the memory store, Redis pub/sub) override it to wake as soon as the key changes.
    fn wait(&self, key: &str, attempt: u32) -> impl Future<Output = ()> + Send {
        let _ = key;
        tokio::time::sleep(backoff_with_jitter(attempt, POLL))
    }

    /// Saves `point` as the recovery point of `key` (replacing the one before), kept for
    /// `ttl`, **only if `token` owns a live claim on `key`**: otherwise
    /// [`StoreError::LeaseLost`] and nothing is written (a holder whose lease lapsed, and whose
    /// key another run took over, cannot overwrite that run's progress). The point survives
    /// the claim lapsing and being released, so the next run of the key reads it; completing
    /// the key ends it, so that no later run of the key reads it (the stored outcome
    /// supersedes it): the completion deletes it, or makes it expire no later than the record
    /// (the Redis store on a server with `SET … IFEQ`). The Redis store does so for a claim that
    /// found, saved or loaded the point (see `docs/stores.md`).
    ///
    /// The default answers [`StoreError::Unsupported`]: the layer then tells handlers that this
    /// store keeps no recovery points. Every store of this crate implements it; the
    /// conformance suite checks it.
    fn save_point(
        &self,
        key: &str,
        token: &OwnerToken,
        point: &RecoveryPoint,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        let _ = (key, token, point, ttl);
        std::future::ready(Err(StoreError::Unsupported("recovery points")))
    }

    /// The recovery point of `key`, for the owner of a live claim on it (`token`; otherwise
    /// [`StoreError::LeaseLost`]); `None` when none was saved (or it expired). One round trip.
    /// The default answers [`StoreError::Unsupported`].
    fn load_point(
        &self,
        key: &str,
        token: &OwnerToken,
    ) -> impl Future<Output = Result<Option<RecoveryPoint>, StoreError>> + Send {
        let _ = (key, token);
        std::future::ready(Err(StoreError::Unsupported("recovery points")))
    }

    /// Appends `chunks` to the live stream of the claim `token` holds on `key`, as chunks
    /// `from..from + chunks.len()` of it, so that duplicates on other processes can follow a
    /// response while it is produced (`OnConflict::Join`, see `docs/streaming.md`). The chunks
    /// are opaque to the store (the layer frames and seals each); the first chunk of a stream
    /// (index 0) starts it and replaces any stream the key held before (a crashed owner's).
    ///
    /// Owner-checked: fails with [`StoreError::LeaseLost`] when `token` no longer owns a live
    /// claim on `key` (nothing is written). Idempotent by position: chunks below what the
    /// stream already holds are skipped (a retried append after a timeout), and `from` past
    /// its end is refused with [`StoreError::Backend`] (nothing is written). A stream of
    /// another owner (a crashed one's) holds nothing for `token`: `from` 0 replaces it, any
    /// other `from` is a gap. A stream ends with its claim:
    /// [`complete`](Self::complete) and [`release`](Self::release) (and
    /// [`delete`](Self::delete)) remove it, and it is kept no longer than `ttl` after its last
    /// append should its owner vanish. A key that never streamed costs those calls nothing
    /// (no extra command, statement or round trip).
    ///
    /// The default answers [`StoreError::Unsupported`]: duplicates on other processes then
    /// wait for the outcome instead of following it live. The memory store does too (one
    /// process: duplicates follow the stream in memory, without the store).
    fn append_stream(
        &self,
        key: &str,
        token: &OwnerToken,
        from: u64,
        chunks: &[Bytes],
        ttl: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        let _ = (key, token, from, chunks, ttl);
        std::future::ready(Err(StoreError::Unsupported("live streams")))
    }

    /// Reads the live stream of `key` from chunk `from` on, atomically with the key's state:
    /// [`StreamRead::Live`] with the chunks `from..` (none when nothing new was appended; a
    /// store may answer fewer than it holds, at least one when it holds any, and the caller
    /// reads again; this crate's stores answer at most about 1 MiB of chunks, or the one chunk
    /// from `from` when it is larger) while the current owner streams; a `from` past the end
    /// answers no chunks. [`StreamRead::NotLive`] while the key is
    /// in flight without a stream of its current owner; [`StreamRead::Completed`] with the
    /// record once the key was completed; [`StreamRead::Absent`] when the key holds nothing
    /// (released, expired, deleted). A completed record is decoded and checked as
    /// [`claim_as`](Self::claim_as) does: a damaged one is [`StoreError::Corrupt`].
    ///
    /// The default answers [`StoreError::Unsupported`]. The conformance suite's
    /// `conformance::streams` checks both calls.
    fn read_stream(
        &self,
        key: &str,
        from: u64,
    ) -> impl Future<Output = Result<StreamRead, StoreError>> + Send {
        let _ = (key, from);
        std::future::ready(Err(StoreError::Unsupported("live streams")))
    }

    /// For operators: what the store holds for `key` now. Not used by the layer; the default
    /// answers [`StoreError::Unsupported`]. Every store of this crate implements it.
    fn inspect(&self, key: &str) -> impl Future<Output = Result<KeyState, StoreError>> + Send {
        let _ = key;
        std::future::ready(Err(StoreError::Unsupported("inspect")))
    }

    /// For operators: deletes whatever the store holds for `key` (a stuck claim, a wrong
    /// record), whoever owns it; `true` when there was something. The next request with the
    /// key runs. A request that still holds a deleted claim can no longer complete it (its
    /// token no longer matches). Not used by the layer; the default answers
    /// [`StoreError::Unsupported`].
    fn delete(&self, key: &str) -> impl Future<Output = Result<bool, StoreError>> + Send {
        let _ = key;
        std::future::ready(Err(StoreError::Unsupported("delete")))
    }
}

/// Deletes expired rows with `purge` (one batch of at most the given size per call, answering
/// how many went) until a batch comes back short; failures are logged and left to the next
/// round.
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub(crate) async fn purge_in_batches<F, Fut>(purge: F)
where
    F: Fn(i64) -> Fut,
    Fut: Future<Output = Result<u64, StoreError>>,
{
    const BATCH: i64 = 1000;
    let mut purged = 0;
    loop {
        match purge(BATCH).await {
            Ok(n) if n == BATCH as u64 => purged += n,
            Ok(n) => {
                tracing::debug!(purged = purged + n, "expired idempotency records purged");
                return;
            }
            Err(error) => {
                tracing::warn!(%error, "purging expired idempotency records failed");
                return;
            }
        }
    }
}

/// Exponential backoff with full jitter: attempt `n` waits a random time up to
/// `first × 2^n` (at least a fifth of `first`), capped at `cap`. Polling a store waits
/// [`POLL`]; retrying a failed store call waits [`RETRY`].
pub(crate) fn backoff_with_jitter(attempt: u32, (first, cap): (Duration, Duration)) -> Duration {
    let ceiling = first.saturating_mul(1 << attempt.min(6)).min(cap);
    let floor = (first / 5).min(ceiling);
    floor + ceiling.mul_f64(fastrand::f64()).saturating_sub(floor)
}

/// At most what one [`Store::read_stream`] answer of this crate's stores holds: the chunks
/// from the one asked for, while they add up to no more (and always at least one, however
/// large). The reader asks again for the rest.
#[cfg(any(feature = "redis", feature = "postgres", feature = "sqlite"))]
pub(crate) const STREAM_READ_BYTES: usize = 1 << 20;

/// An append that would leave a hole in a live stream: it starts past the chunks the stream
/// holds for its owner ([`Store::append_stream`] refuses it as a backend error).
#[cfg(any(feature = "redis", feature = "postgres", feature = "sqlite"))]
#[derive(Debug, thiserror::Error)]
#[error("a live stream append from chunk {from} would leave a gap: the stream holds {held} chunks")]
pub(crate) struct StreamGap {
    /// The first chunk of the refused append.
    pub(crate) from: u64,
    /// The chunks the stream held.
    pub(crate) held: u64,
}

/// Between polls of a store for a key's end: from 10 ms, capped at 500 ms.
pub(crate) const POLL: (Duration, Duration) =
    (Duration::from_millis(10), Duration::from_millis(500));
/// Between retries of a store call that failed: from 50 ms, capped at 2 s.
pub(crate) const RETRY: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(2));

impl<T: Store> Store for Arc<T> {
    fn claim_as(
        &self,
        key: &str,
        token: &OwnerToken,
        lease: Duration,
    ) -> impl Future<Output = Result<ClaimOutcome, StoreError>> + Send {
        (**self).claim_as(key, token, lease)
    }

    fn claim_now(
        &self,
        key: &str,
        token: &OwnerToken,
        lease: Duration,
    ) -> Option<Result<ClaimOutcome, StoreError>> {
        (**self).claim_now(key, token, lease)
    }

    fn inspect(&self, key: &str) -> impl Future<Output = Result<KeyState, StoreError>> + Send {
        (**self).inspect(key)
    }

    fn delete(&self, key: &str) -> impl Future<Output = Result<bool, StoreError>> + Send {
        (**self).delete(key)
    }

    fn renew(
        &self,
        key: &str,
        token: &OwnerToken,
        lease: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        (**self).renew(key, token, lease)
    }

    fn complete(
        &self,
        key: &str,
        token: &OwnerToken,
        record: Record,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        (**self).complete(key, token, record, ttl)
    }

    fn release(
        &self,
        key: &str,
        token: &OwnerToken,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        (**self).release(key, token)
    }

    fn wait(&self, key: &str, attempt: u32) -> impl Future<Output = ()> + Send {
        (**self).wait(key, attempt)
    }

    fn save_point(
        &self,
        key: &str,
        token: &OwnerToken,
        point: &RecoveryPoint,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        (**self).save_point(key, token, point, ttl)
    }

    fn load_point(
        &self,
        key: &str,
        token: &OwnerToken,
    ) -> impl Future<Output = Result<Option<RecoveryPoint>, StoreError>> + Send {
        (**self).load_point(key, token)
    }

    fn append_stream(
        &self,
        key: &str,
        token: &OwnerToken,
        from: u64,
        chunks: &[Bytes],
        ttl: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        (**self).append_stream(key, token, from, chunks, ttl)
    }

    fn read_stream(
        &self,
        key: &str,
        from: u64,
    ) -> impl Future<Output = Result<StreamRead, StoreError>> + Send {
        (**self).read_stream(key, from)
    }
}

#[cfg(all(test, any(feature = "redis", feature = "postgres", feature = "sqlite")))]
mod point_encoding_tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip(point: &RecoveryPoint) -> RecoveryPoint {
        RecoveryPoint::decode(point.encode()).expect("a point reads back")
    }

    /// Phases around the old 16-bit length (65,535 bytes), with a multi-byte character
    /// straddling each boundary: every one comes back whole.
    #[test]
    fn a_phase_of_any_length_comes_back_whole() {
        for len in [0, 1, 65_534, 65_535, 65_536, 65_537, 131_073] {
            for filler in ["a", "é", "€", "𝄞"] {
                let mut phase = filler.repeat(len / filler.len() + 1);
                let mut end = len;
                while !phase.is_char_boundary(end) {
                    end -= 1;
                }
                phase.truncate(end);
                let point = RecoveryPoint::new(phase.clone(), "data").with_fingerprint(Some(7));
                let back = round_trip(&point);
                assert_eq!(back.phase(), phase, "{len} bytes of {filler}");
                assert_eq!(back, point);
            }
        }
    }

    /// A version 1 point (written before points were bound to their request) still reads, as a
    /// point bound to no request.
    #[test]
    fn a_version_1_point_reads_as_unbound() {
        use bytes::BufMut;
        let mut buf = seal::start(b"TP", 1, 2 + 7 + 4);
        buf.put_u16(7);
        buf.put_slice(b"charged");
        buf.put_slice(b"ch_1");
        let point = RecoveryPoint::decode(seal::finish(buf)).unwrap();
        assert_eq!(point.phase(), "charged");
        assert_eq!(point.data().as_ref(), b"ch_1");
        assert_eq!(point.fingerprint(), None);
    }

    /// Every single flipped bit of a stored point is found (the envelope's checksum covers the
    /// fingerprint and its presence, the phase's length and the data).
    #[test]
    fn every_flipped_bit_is_found() {
        for fingerprint in [None, Some(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef)] {
            let stored = RecoveryPoint::new("charged", "ch_1")
                .with_fingerprint(fingerprint)
                .encode();
            for bit in 0..stored.len() * 8 {
                let mut damaged = stored.to_vec();
                damaged[bit / 8] ^= 1 << (bit % 8);
                match RecoveryPoint::decode(Bytes::from(damaged)) {
                    Err(StoreError::Corrupt(_) | StoreError::UnknownFormat { .. }) => {}
                    other => panic!("bit {bit} flipped read as {other:?}"),
                }
            }
        }
    }

    proptest! {
        #[test]
        fn any_point_round_trips(
            phase in ".{0,300}",
            data in proptest::collection::vec(any::<u8>(), 0..300),
            fingerprint in proptest::option::of(any::<u128>()),
        ) {
            let point = RecoveryPoint::new(phase, data).with_fingerprint(fingerprint);
            prop_assert_eq!(round_trip(&point), point);
        }

        #[test]
        fn any_cut_point_is_refused(
            phase in ".{0,40}",
            data in proptest::collection::vec(any::<u8>(), 0..40),
            cut in any::<prop::sample::Index>(),
        ) {
            let stored = RecoveryPoint::new(phase, data).with_fingerprint(Some(1)).encode();
            let at = cut.index(stored.len());
            prop_assert!(RecoveryPoint::decode(stored.slice(..at)).is_err());
        }
    }
}
