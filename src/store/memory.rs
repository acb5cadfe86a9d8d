//! The embedded store: completed records in a byte-bounded moka cache, claims in a sharded map.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ahash::RandomState;
use moka::policy::EvictionPolicy;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{ClaimOutcome, KeyState, OwnerToken, Record, RecoveryPoint, Store, StoreError};

const SHARDS: usize = 64;
/// What a stored record costs beyond its key and payload, as charged against the capacity:
/// the cache entry (key `Arc`, value, moka's node and its bookkeeping) and the allocator's
/// share once the store is full and evicting. Measured as resident memory by
/// `tests/isolated/footprint.rs` (about 580 B per 100 B record with a 63-byte key); charged a
/// little under it, so a full store of small records stays within a few percent of its capacity.
const RECORD_OVERHEAD: u64 = 560;

/// An in-process store: the default. One process only; use a shared store for a fleet.
///
/// * Completed records and recovery points live in one [moka] cache bounded by their **total
///   bytes** (keys, payloads, a point's phase and data, a fixed per-entry overhead and, for a
///   record kept decoded, what its decoded form allocates: see
///   [`keep_decoded`](MemoryStoreBuilder::keep_decoded)) [64 MiB], evicting the least recently
///   used entry first, record or point alike. A record evicted early (capacity pressure)
///   behaves like an expired one: a retry with its key runs again. Size the capacity for your
///   retention. The cache is
///   keyed by a 64-bit hash of the key under a per-store random key (hashed once per call; the
///   cache never touches key strings when it rehashes or evicts), and every read compares the
///   whole key: two keys whose hashes collide (about one chance in 10¹⁰ per 50,000 stored
///   keys, and nobody outside the process can aim for it) never see each other's record; the
///   later one replaces the earlier, like an early eviction.
/// * Claims in flight live apart from the cache, in a sharded map, so capacity pressure
///   never evicts a claim: only its lease lapsing or its owner completing or releasing it ends it.
/// * A recovery point ([`Store::save_point`]) is charged to the capacity like a record, and no
///   fixed table bounds how many there are (one tenant's failed runs cannot refuse everyone
///   else's saves). While its key's claim lives, the claim holds the point too: eviction
///   never takes it from the run (that would let a retry repeat the side effect), though its
///   entry may be evicted and its bytes then sit outside the capacity until the claim ends
///   (at most the points of the claims in flight, each within `max_recovery_point`). When the
///   claim ends without a completion (released after a failed run, or lapsed), the point goes
///   back to the cache as its most recently used entry, for the key's next run; from then on
///   it is evicted like a cold record when the store is full, and the next run then starts
///   afresh. A completion replaces it with the record. A point heavier than the whole capacity
///   is refused ([`StoreError::Backend`]): it could not be kept once the run ends.
/// * Expiry (record TTLs and leases) is measured with [`tokio::time::Instant`], so tests can
///   drive it with tokio's paused clock.
/// * Duplicates waiting for a claim ([`Store::wait`]) are woken the moment the claim ends.
///
/// Clones share the same storage.
///
/// ```
/// use tower_idempotency::store::MemoryStore;
///
/// let store = MemoryStore::builder().max_bytes(256 * 1024 * 1024).build();
/// # let _ = store;
/// ```
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// Completed records and recovery points, by the keyed 64-bit hash of their key (see
    /// [`Inner::slot`]): one byte budget for both.
    records: moka::sync::Cache<u64, Stored, RandomState>,
    /// The capacity: a point heavier than it could never be kept once its claim ends.
    max_bytes: u64,
    claims: Box<[ClaimShard]>,
    hasher: RandomState,
    /// Whether records keep their decoded form ([`MemoryStoreBuilder::keep_decoded`]).
    keep_decoded: bool,
}

#[derive(Clone)]
struct Stored {
    /// The entry's whole key: a read checks it, so two keys whose hashes collide never see
    /// each other's entry (the later one replaces the earlier, like an early eviction).
    key: Arc<str>,
    kept: Kept,
    expires_at: Instant,
}

/// What a key's cache entry holds: its outcome, or the progress of a run that did not finish.
/// One per key, so a completion (writing the record over the point) ends the point.
#[derive(Clone)]
enum Kept {
    Record(Record),
    /// A recovery point. While its key's claim lives the claim holds it too (so eviction cannot
    /// take it from that run); once the claim ends, this entry is the only copy, evicted like
    /// a cold record.
    Point(Arc<RecoveryPoint>),
}

impl Stored {
    fn record(&self) -> Option<&Record> {
        match &self.kept {
            Kept::Record(record) => Some(record),
            Kept::Point(_) => None,
        }
    }

    fn into_record(self) -> Option<Record> {
        match self.kept {
            Kept::Record(record) => Some(record),
            Kept::Point(_) => None,
        }
    }
}

/// What a recovery point's entry costs beyond its key, phase and data: the cache entry (as a
/// record's) and the point's own allocation (an `Arc` of its phase `String` and data `Bytes`).
const POINT_OVERHEAD: u64 = RECORD_OVERHEAD + 80;

/// A point's weight against the capacity. From its phase and data lengths only: what else a
/// point carries is small and fixed, inside the overhead.
fn point_weight(key: &str, point: &RecoveryPoint) -> u64 {
    key.len() as u64 + point.phase().len() as u64 + point.data().len() as u64 + POINT_OVERHEAD
}

/// What a record's slot for its decoded form takes itself (an `Arc` of a `OnceLock` of a fat
/// pointer, as glibc rounds it), charged with the decoded form's estimate.
const MEMO_SLOT: u64 = 48;

/// A shard of the claims, and how many entries were written under its lock.
struct ClaimShard {
    lock: Mutex<Shard>,
    /// Bumped (under the lock, after the write) by every write of a record or of a point whose
    /// claim ended (and every delete) for a key of this shard: a claim that read it before its
    /// lock-free look, and reads the same count once it holds the lock, knows that nothing of
    /// its shard was written in between, so its first look still stands (see `claim_as`).
    completions: AtomicU64,
}

struct Shard {
    map: HashMap<Arc<str>, Claim, RandomState>,
    /// The map's length after the last sweep of lapsed leases.
    swept_len: usize,
}

struct Claim {
    token: OwnerToken,
    deadline: Instant,
    /// Created by the first waiter; dropping it (the claim ends) wakes every waiter.
    waiters: Option<watch::Sender<()>>,
    /// The key's recovery point and when it expires: saved by this claim's run, or left by an
    /// earlier run and taken on when this claim was made. Held here for as long as the claim
    /// is in the map, so capacity pressure (which may evict the point's cache entry) never
    /// takes it from a live run; written back to the cache when the claim ends.
    point: Option<(Arc<RecoveryPoint>, Instant)>,
}

/// Builds a [`MemoryStore`].
#[derive(Debug, Clone)]
pub struct MemoryStoreBuilder {
    max_bytes: u64,
    keep_decoded: bool,
}

impl MemoryStoreBuilder {
    /// The most bytes completed records may take together [64 MiB].
    ///
    /// # Panics
    ///
    /// Below 4 KiB: such a store would keep (almost) nothing, and every retry would run again.
    pub fn max_bytes(mut self, max_bytes: u64) -> Self {
        assert!(
            max_bytes >= 4096,
            "tower-idempotency: MemoryStore max_bytes must be at least 4096, got {max_bytes}"
        );
        self.max_bytes = max_bytes;
        self
    }

    /// Keeps each record's decoded response with it, so that only its first replay decodes
    /// (and checks) the stored bytes and later ones clone a response ready to answer (off by
    /// default).
    ///
    /// A record gets its decoded form from its first replay, and is charged for it against
    /// [`max_bytes`](Self::max_bytes) from then on, what the form allocates: about 1 KiB for a
    /// small response with three headers, 1.8 KiB with six (its header map's entries and
    /// index, with room for what a replay adds), as much as or more than the record itself. A
    /// store whose records are replayed therefore holds fewer of them: a full store evicts keys
    /// that `false` would have kept, and their retries run the handler again
    /// (`tests/isolated/decoded.rs`, figures in `BENCHMARKS.md`). Turn it on for a store with
    /// room to spare whose records are replayed many times: a later replay takes about a sixth
    /// fewer instructions. `false` keeps nothing: every replay decodes the stored bytes.
    /// Records the consumer adapter writes keep nothing either way.
    pub fn keep_decoded(mut self, keep: bool) -> Self {
        self.keep_decoded = keep;
        self
    }

    /// Builds the store.
    pub fn build(self) -> MemoryStore {
        let records = moka::sync::Cache::builder()
            .max_capacity(self.max_bytes)
            // Sized for a full store of ~1 KiB records (up to 64k entries, under 1 MiB of
            // table): it grows and rehashes less once full and churning (about a tenth off a
            // first request on a full store, in `benches/layer.rs`).
            .initial_capacity(
                usize::try_from(self.max_bytes / 1536)
                    .unwrap_or(usize::MAX)
                    .min(1 << 16),
            )
            // LRU admits every new record; TinyLFU could refuse a fresh one, which would let
            // its retry run again.
            .eviction_policy(EvictionPolicy::lru())
            .weigher(|_slot: &u64, stored: &Stored| {
                let weight = match &stored.kept {
                    Kept::Record(record) => {
                        // A record gets its slot from its first replay, which fills it (see
                        // `MemoryStore::keep_decoded_form`): charged from then on.
                        let memo = record
                            .memo()
                            .map_or(0, |_| MEMO_SLOT + u64::from(record.memo_weight()));
                        stored.key.len() as u64
                            + record.held_bytes() as u64
                            + memo
                            + RECORD_OVERHEAD
                    }
                    Kept::Point(point) => point_weight(&stored.key, point),
                };
                u32::try_from(weight).unwrap_or(u32::MAX)
            })
            .expire_after(Expiry)
            .build_with_hasher(RandomState::new());
        let claims = (0..SHARDS)
            .map(|_| ClaimShard {
                lock: Mutex::new(Shard {
                    map: HashMap::with_hasher(RandomState::new()),
                    swept_len: 0,
                }),
                completions: AtomicU64::new(0),
            })
            .collect();
        MemoryStore {
            inner: Arc::new(Inner {
                records,
                max_bytes: self.max_bytes,
                claims,
                hasher: RandomState::new(),
                keep_decoded: self.keep_decoded,
            }),
        }
    }
}

impl Default for MemoryStoreBuilder {
    fn default() -> Self {
        Self {
            max_bytes: 64 * 1024 * 1024,
            keep_decoded: false,
        }
    }
}

/// Lets moka drop records once they expired (by the wall clock). Correctness does not rest
/// on it: every read checks `expires_at` itself, against tokio's clock.
struct Expiry;

impl moka::Expiry<u64, Stored> for Expiry {
    fn expire_after_create(
        &self,
        _slot: &u64,
        value: &Stored,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.expires_at.saturating_duration_since(Instant::now()))
    }

    // A record written over one that expired on tokio's clock but not yet on moka's (the
    // clocks differ under a paused test clock) must take its own expiry, not keep the old one.
    fn expire_after_update(
        &self,
        _slot: &u64,
        value: &Stored,
        _updated_at: std::time::Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.expires_at.saturating_duration_since(Instant::now()))
    }
}

impl Inner {
    /// Where `key` lives: its hash under this store's random key (so nobody outside can aim
    /// two keys at one slot), computed once per call and used by the record cache (which then
    /// never hashes, compares or rehashes key strings) and to pick the claim shard.
    fn slot(&self, key: &str) -> u64 {
        self.hasher.hash_one(key)
    }
}

impl MemoryStore {
    /// A store with the default capacity [64 MiB of records].
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// A builder to set the capacity.
    pub fn builder() -> MemoryStoreBuilder {
        MemoryStoreBuilder::default()
    }

    /// The bytes that completed records and recovery points currently take, as charged against
    /// the capacity (approximate until moka's pending maintenance has run).
    pub fn weighted_size(&self) -> u64 {
        self.inner.records.run_pending_tasks();
        self.inner.records.weighted_size()
    }

    /// How many completed records and recovery points are held (after pending maintenance).
    pub fn record_count(&self) -> u64 {
        self.inner.records.run_pending_tasks();
        self.inner.records.entry_count()
    }

    fn shard(&self, slot: u64) -> MutexGuard<'_, Shard> {
        // A panic while holding a shard lock cannot leave a shard half-updated (every update
        // is a single map operation), so a poisoned lock is safe to keep using.
        self.claim_shard(slot)
            .lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn claim_shard(&self, slot: u64) -> &ClaimShard {
        &self.inner.claims[slot as usize % SHARDS]
    }

    /// The claim, which never waits: a lock-free look for the record, then the shard lock.
    fn claim_at_once(
        &self,
        key: &str,
        token: &OwnerToken,
        lease: Duration,
    ) -> Result<ClaimOutcome, StoreError> {
        let now = Instant::now();
        let slot = self.inner.slot(key);
        let completions = &self.claim_shard(slot).completions;
        // Read before the first look: it pairs with the increment that follows every write of
        // a record or of a point left by a run (`complete`, `release`), so a write counted here
        // is one the first look sees.
        let seen = completions.load(Ordering::Acquire);
        // The replay path: no lock (but once per kept record, to give it its decoded form).
        let mut left = match self.stored(key, slot).filter(|s| s.expires_at > now) {
            Some(Stored {
                kept: Kept::Point(point),
                expires_at,
                ..
            }) => Some((point, expires_at)),
            Some(stored) => return Ok(ClaimOutcome::Completed(self.replayed(slot, stored))),
            None => None,
        };
        let mut shard = self.shard(slot);
        let lapsed = match shard.map.get(key) {
            Some(claim) if claim.deadline > now => {
                return Ok(ClaimOutcome::InFlight {
                    lease_remaining: Some(claim.deadline - now),
                });
            }
            Some(_) => true,
            None => false,
        };
        // Records and the points of ended runs are written under the shard lock, so a second
        // look now cannot miss one written between the first look and the lock; it is needed
        // only if such a write of this shard came in between (a fresh key on a full store
        // saves a cache probe that misses).
        if completions.load(Ordering::Relaxed) != seen {
            left = None;
            if let Some(stored) = self.stored(key, slot).filter(|s| s.expires_at > now) {
                match stored.kept {
                    // Not `replayed`: under the lock, a record just written has no decoded
                    // form to charge yet.
                    Kept::Record(record) => return Ok(ClaimOutcome::Completed(record)),
                    Kept::Point(point) => left = Some((point, stored.expires_at)),
                }
            }
        }
        // The claim takes on the key's point, so that no eviction can take it from this run:
        // a lapsed claim's (the latest: a point is left in the cache only when a claim ends),
        // else the one a released or swept claim left in the cache.
        // (A fresh key, the common case, has no claim to remove: no second probe of the map.)
        let point = if lapsed {
            shard.map.remove(key).and_then(|lapsed| lapsed.point)
        } else {
            left
        }
        .filter(|(_, expires_at)| *expires_at > now);
        let token = *token;
        self.sweep_if_grown(&mut shard, slot, now);
        shard.map.insert(
            Arc::from(key),
            Claim {
                token,
                deadline: super::clock::later(now, lease),
                waiters: None,
                point,
            },
        );
        Ok(ClaimOutcome::Claimed(token))
    }

    /// The entry (record or point) stored under `key`, whatever its expiry.
    fn stored(&self, key: &str, slot: u64) -> Option<Stored> {
        let stored = self.inner.records.get(&slot)?;
        (*stored.key == *key).then_some(stored)
    }

    /// The record of `stored` (a live record of its key) for a replay; on its first read with
    /// `keep_decoded`, with the slot for its decoded form that this replay is to fill. Never
    /// called under a shard lock (giving the slot takes it).
    fn replayed(&self, slot: u64, stored: Stored) -> Record {
        let Kept::Record(record) = &stored.kept else {
            unreachable!("a record's entry")
        };
        if self.inner.keep_decoded && record.memo().is_none() && record.memo_weight() > 0 {
            return self.keep_decoded_form(slot, stored);
        }
        stored.into_record().expect("a record's entry")
    }

    /// Gives `seen` its slot for a decoded form, charged to the capacity (moka weighs a value
    /// when it is written, so the record is written again, with its expiry unchanged). Under
    /// the shard lock that every write of its slot takes, and only while `seen` is still the
    /// record stored there (its key's allocation is its own): a completion or a delete that
    /// came first wins, and this replay decodes on its own. Once per replayed record, so a
    /// record never replayed costs nothing for it.
    #[cold]
    fn keep_decoded_form(&self, slot: u64, seen: Stored) -> Record {
        let _shard = self.shard(slot);
        match self.inner.records.get(&slot) {
            Some(mut current)
                if Arc::ptr_eq(&current.key, &seen.key) && current.record().is_some() =>
            {
                let Kept::Record(record) = &mut current.kept else {
                    unreachable!("checked")
                };
                if record.memo().is_some() {
                    // Another replay gave it one meanwhile: share it.
                    return record.clone();
                }
                record.attach_memo();
                let record = record.clone();
                self.inner.records.insert(slot, current);
                record
            }
            _ => seen.into_record().expect("a record's entry"),
        }
    }

    /// Checks that `token` owns a live lease on `key`, and removes that claim, handing back
    /// its key (so that the record can reuse the allocation).
    fn take_claim(
        shard: &mut Shard,
        key: &str,
        token: &OwnerToken,
    ) -> Result<(Arc<str>, Claim), StoreError> {
        match shard.map.get(key) {
            Some(claim) if claim.token == *token && claim.deadline > Instant::now() => {
                Ok(shard.map.remove_entry(key).expect("present"))
            }
            _ => Err(StoreError::LeaseLost),
        }
    }

    /// Leaves the point of an ended claim (released, or lapsed and swept) in the cache for the
    /// key's next run, as the most recently used entry; from now on it is evicted like a cold
    /// record. Under the shard lock of `key`; the caller bumps the shard's count of writes.
    fn leave_point(&self, key: Arc<str>, point: Option<(Arc<RecoveryPoint>, Instant)>) {
        let Some((point, expires_at)) = point else {
            return;
        };
        if expires_at > Instant::now() {
            let slot = self.inner.slot(&key);
            let kept = Kept::Point(point);
            let stored = Stored {
                key,
                kept,
                expires_at,
            };
            self.inner.records.insert(slot, stored);
        }
    }

    /// Drops claims whose lease lapsed, amortised: only once the map has doubled since the
    /// last sweep, so a process whose handlers died cannot grow the map without bound. Their
    /// points go back to the cache.
    fn sweep_if_grown(&self, shard: &mut Shard, slot: u64, now: Instant) {
        if shard.map.len() < (shard.swept_len * 2).max(64) {
            return;
        }
        let mut left = Vec::new();
        shard.map.retain(|key, claim| {
            let live = claim.deadline > now;
            if !live && claim.point.is_some() {
                left.push((key.clone(), claim.point.take()));
            }
            live
        });
        shard.swept_len = shard.map.len();
        if !left.is_empty() {
            for (key, point) in left {
                self.leave_point(key, point);
            }
            self.claim_shard(slot)
                .completions
                .fetch_add(1, Ordering::Release);
        }
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("records", &self.inner.records.entry_count())
            .field("weighted_size", &self.inner.records.weighted_size())
            .finish()
    }
}

impl Store for MemoryStore {
    async fn claim_as(
        &self,
        key: &str,
        token: &OwnerToken,
        lease: Duration,
    ) -> Result<ClaimOutcome, StoreError> {
        self.claim_at_once(key, token, lease)
    }

    fn claim_now(
        &self,
        key: &str,
        token: &OwnerToken,
        lease: Duration,
    ) -> Option<Result<ClaimOutcome, StoreError>> {
        Some(self.claim_at_once(key, token, lease))
    }

    async fn renew(
        &self,
        key: &str,
        token: &OwnerToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let now = Instant::now();
        let mut shard = self.shard(self.inner.slot(key));
        match shard.map.get_mut(key) {
            Some(claim) if claim.token == *token && claim.deadline > now => {
                claim.deadline = super::clock::later(now, lease);
                Ok(())
            }
            _ => Err(StoreError::LeaseLost),
        }
    }

    async fn complete(
        &self,
        key: &str,
        token: &OwnerToken,
        record: Record,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let slot = self.inner.slot(key);
        let mut shard = self.shard(slot);
        // The record takes the slot of the key's point, if any: the stored outcome supersedes it.
        let (key, _claim) = Self::take_claim(&mut shard, key, token)?;
        let mut record = record;
        record.mark_in_process();
        // With `keep_decoded`, its first replay gives it a slot for its decoded form.
        let stored = Stored {
            key,
            kept: Kept::Record(record),
            expires_at: super::clock::later(Instant::now(), ttl),
        };
        self.inner.records.insert(slot, stored);
        // After the write, under the lock: see `claim_as`.
        self.claim_shard(slot)
            .completions
            .fetch_add(1, Ordering::Release);
        Ok(())
    }

    async fn release(&self, key: &str, token: &OwnerToken) -> Result<(), StoreError> {
        let slot = self.inner.slot(key);
        let mut shard = self.shard(slot);
        let (key, claim) = Self::take_claim(&mut shard, key, token)?;
        if claim.point.is_some() {
            self.leave_point(key, claim.point);
            // After the write, under the lock: see `claim_as`.
            self.claim_shard(slot)
                .completions
                .fetch_add(1, Ordering::Release);
        }
        Ok(())
    }

    /// Kept with the claim (so no eviction takes it from the live run) and as an entry of the
    /// cache, charged to the capacity like a record (evicting the least recently used entries
    /// when the store is full). Refused with [`StoreError::Backend`] only when the point, its
    /// key and the overhead weigh more than the whole capacity: the store could not keep it
    /// once the run ends.
    async fn save_point(
        &self,
        key: &str,
        token: &OwnerToken,
        point: &RecoveryPoint,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let now = Instant::now();
        let slot = self.inner.slot(key);
        let mut shard = self.shard(slot);
        let owned = match shard.map.get_key_value(key) {
            Some((owned, claim)) if claim.token == *token && claim.deadline > now => owned.clone(),
            _ => return Err(StoreError::LeaseLost),
        };
        let weight = point_weight(key, point);
        if weight > self.inner.max_bytes {
            return Err(StoreError::backend(format!(
                "a recovery point weighing {weight} bytes (phase, data, key and the store's \
                 overhead) is larger than the memory store's whole capacity ({} bytes); \
                 nothing was saved",
                self.inner.max_bytes
            )));
        }
        let expires_at = super::clock::later(now, ttl);
        let point = Arc::new(point.clone());
        shard.map.get_mut(key).expect("checked").point = Some((point.clone(), expires_at));
        let stored = Stored {
            key: owned,
            kept: Kept::Point(point),
            expires_at,
        };
        self.inner.records.insert(slot, stored);
        Ok(())
    }

    async fn load_point(
        &self,
        key: &str,
        token: &OwnerToken,
    ) -> Result<Option<RecoveryPoint>, StoreError> {
        let now = Instant::now();
        let shard = self.shard(self.inner.slot(key));
        match shard.map.get(key) {
            Some(claim) if claim.token == *token && claim.deadline > now => Ok(claim
                .point
                .as_ref()
                .filter(|(_, expires_at)| *expires_at > now)
                .map(|(point, _)| RecoveryPoint::clone(point))),
            _ => Err(StoreError::LeaseLost),
        }
    }

    async fn inspect(&self, key: &str) -> Result<KeyState, StoreError> {
        let now = Instant::now();
        let slot = self.inner.slot(key);
        if let Some(stored) = self.stored(key, slot).filter(|s| s.expires_at > now) {
            let expires_in = Some(stored.expires_at - now);
            if let Some(record) = stored.into_record() {
                return Ok(KeyState::Completed { expires_in, record });
            }
        }
        Ok(match self.shard(slot).map.get(key) {
            Some(claim) if claim.deadline > now => KeyState::InFlight {
                lease_remaining: Some(claim.deadline - now),
            },
            _ => KeyState::Absent,
        })
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let slot = self.inner.slot(key);
        let mut shard = self.shard(slot);
        let claim = shard.map.remove(key).is_some();
        // Under the shard lock, which every write of this slot's entries takes: the record, or
        // the point a run left.
        let entry = self.stored(key, slot).is_some() && self.inner.records.remove(&slot).is_some();
        // So that a claim that saw the point before this lock does not take it on.
        self.claim_shard(slot)
            .completions
            .fetch_add(1, Ordering::Release);
        Ok(claim || entry)
    }

    async fn wait(&self, key: &str, attempt: u32) {
        let mut receiver = {
            let mut shard = self.shard(self.inner.slot(key));
            match shard.map.get_mut(key) {
                Some(claim) => match &claim.waiters {
                    Some(sender) => sender.subscribe(),
                    None => {
                        let (sender, receiver) = watch::channel(());
                        claim.waiters = Some(sender);
                        receiver
                    }
                },
                // The claim already ended: claim again at once.
                None => return,
            }
        };
        // Woken when the claim ends (its sender is dropped); the timeout covers a lease that
        // lapses without anyone ending it.
        let backstop = Duration::from_millis(250)
            .saturating_mul(attempt + 1)
            .min(Duration::from_secs(2));
        let _ = tokio::time::timeout(backstop, receiver.changed()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(60);

    async fn claimed(store: &MemoryStore, key: &str) -> OwnerToken {
        match store.claim(key, LEASE).await.unwrap() {
            ClaimOutcome::Claimed(token) => token,
            other => panic!("expected a claim, got {other:?}"),
        }
    }

    /// Claims `key` and completes it with `payload`, kept for `ttl`.
    async fn stored(
        store: &MemoryStore,
        key: &str,
        payload: impl Into<bytes::Bytes>,
        ttl: Duration,
    ) {
        let token = claimed(store, key).await;
        store
            .complete(key, &token, Record::new(None, payload), ttl)
            .await
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn records_expire_on_the_tokio_clock() {
        let store = MemoryStore::new();
        stored(&store, "k", "r", Duration::from_secs(24 * 3600)).await;
        tokio::time::advance(Duration::from_secs(24 * 3600 - 1)).await;
        assert!(matches!(
            store.claim("k", LEASE).await.unwrap(),
            ClaimOutcome::Completed(_)
        ));
        tokio::time::advance(Duration::from_secs(2)).await;
        claimed(&store, "k").await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_record_written_over_an_expired_one_gets_its_own_ttl() {
        let store = MemoryStore::new();
        stored(&store, "k", "old", Duration::from_millis(200)).await;
        tokio::time::advance(Duration::from_secs(1)).await;
        stored(&store, "k", "new", Duration::from_secs(3600)).await;
        // Past the old record's TTL on moka's (real) clock too.
        std::thread::sleep(Duration::from_millis(300));
        match store.claim("k", LEASE).await.unwrap() {
            ClaimOutcome::Completed(record) => assert_eq!(record.payload(), "new"),
            other => panic!("the new record must live for its own TTL, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_record_under_a_colliding_hash_is_not_another_keys_record() {
        let store = MemoryStore::new();
        stored(&store, "tenant-b|POST|/charges|k", "b's answer", LEASE).await;
        // What a hash collision would leave: b's record in the slot of a's key.
        let b_slot = store.inner.slot("tenant-b|POST|/charges|k");
        let b = store.inner.records.get(&b_slot).unwrap();
        store
            .inner
            .records
            .insert(store.inner.slot("tenant-a|POST|/charges|k"), b);
        let a = "tenant-a|POST|/charges|k";
        assert!(matches!(store.inspect(a).await.unwrap(), KeyState::Absent));
        assert!(!store.delete(a).await.unwrap(), "nothing of a's to delete");
        claimed(&store, a).await;
    }

    #[tokio::test(start_paused = true)]
    async fn leases_lapse_on_the_tokio_clock() {
        let store = MemoryStore::new();
        claimed(&store, "k").await;
        tokio::time::advance(LEASE - Duration::from_millis(1)).await;
        match store.claim("k", LEASE).await.unwrap() {
            ClaimOutcome::InFlight { lease_remaining } => {
                assert_eq!(lease_remaining, Some(Duration::from_millis(1)))
            }
            other => panic!("{other:?}"),
        }
        tokio::time::advance(Duration::from_millis(1)).await;
        claimed(&store, "k").await;
    }

    #[tokio::test]
    async fn capacity_bounds_records_but_never_evicts_a_claim() {
        let store = MemoryStore::builder().max_bytes(64 * 1024).build();
        let held = claimed(&store, "held").await;
        let payload = bytes::Bytes::from(vec![0u8; 1024]);
        for i in 0..1000 {
            let key = format!("record-{i}");
            stored(&store, &key, payload.clone(), LEASE).await;
        }
        assert!(
            store.weighted_size() <= 64 * 1024,
            "weighted size {}",
            store.weighted_size()
        );
        assert!(store.record_count() < 1000, "old records were evicted");
        // The most recent record survives (LRU admits new records).
        assert!(matches!(
            store.claim("record-999", LEASE).await.unwrap(),
            ClaimOutcome::Completed(_)
        ));
        // The claim in flight is untouched by capacity pressure.
        assert!(matches!(
            store.claim("held", LEASE).await.unwrap(),
            ClaimOutcome::InFlight { .. }
        ));
        store
            .complete("held", &held, Record::new(None, "done"), LEASE)
            .await
            .unwrap();
    }

    /// A claim that races the completion of its key (its lock-free look for the record before
    /// the write, its lock after it) finds the record: it never claims a completed key.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_claim_racing_a_completion_never_claims_the_completed_key() {
        const RACERS: usize = 3;
        let store = MemoryStore::new();
        let mut claimed_again = 0;
        let mut completed_seen = 0;
        for round in 0..2000 {
            let key: Arc<str> = format!("race-{round}").into();
            let owner = claimed(&store, &key).await;
            let barrier = Arc::new(tokio::sync::Barrier::new(RACERS + 1));
            let racers: Vec<_> = (0..RACERS)
                .map(|_| {
                    let (store, key, barrier) = (store.clone(), key.clone(), barrier.clone());
                    tokio::spawn(async move {
                        barrier.wait().await;
                        loop {
                            match store.claim(&key, LEASE).await.unwrap() {
                                ClaimOutcome::InFlight { .. } => tokio::task::yield_now().await,
                                ClaimOutcome::Completed(_) => return false,
                                ClaimOutcome::Claimed(_) => return true,
                            }
                        }
                    })
                })
                .collect();
            barrier.wait().await;
            store
                .complete(&key, &owner, Record::new(None, "done"), LEASE)
                .await
                .unwrap();
            for racer in racers {
                match racer.await.unwrap() {
                    true => claimed_again += 1,
                    false => completed_seen += 1,
                }
            }
        }
        assert_eq!(claimed_again, 0, "a completed key was claimed again");
        assert_eq!(completed_seen, 2000 * RACERS);
    }

    #[tokio::test(start_paused = true)]
    async fn lapsed_claims_are_swept_so_the_map_stays_bounded() {
        let store = MemoryStore::new();
        for round in 0..10 {
            for i in 0..1000 {
                claimed(&store, &format!("abandoned-{round}-{i}")).await;
            }
            tokio::time::advance(LEASE * 2).await;
        }
        let held: usize = store
            .inner
            .claims
            .iter()
            .map(|s| s.lock.lock().unwrap().map.len())
            .sum();
        assert!(held < 3000, "{held} claims held; lapsed ones must be swept");
    }

    #[tokio::test]
    async fn a_decoded_form_is_kept_unless_declined_and_charged_from_the_first_replay() {
        let payload = bytes::Bytes::from(vec![b'x'; 1000]);
        for keep in [false, true] {
            let store = MemoryStore::builder().keep_decoded(keep).build();
            let token = claimed(&store, "k").await;
            let record = Record::new(None, payload.clone()).with_memo_weight(500);
            store.complete("k", &token, record, LEASE).await.unwrap();
            let base = 1 + 1000 + RECORD_OVERHEAD;
            assert_eq!(
                store.weighted_size(),
                base,
                "a record not replayed pays nothing"
            );
            let stored_until = store.stored("k", store.inner.slot("k")).unwrap().expires_at;
            let read = || async {
                match store.claim("k", LEASE).await.unwrap() {
                    ClaimOutcome::Completed(record) => record,
                    other => panic!("{other:?}"),
                }
            };
            let (one, two) = (read().await, read().await);
            assert!(one.in_process(), "its bytes never left the process");
            if !keep {
                assert!(one.memo().is_none() && two.memo().is_none());
                assert_eq!(store.weighted_size(), base);
                continue;
            }
            let (slot_one, slot_two) = (one.memo().unwrap(), two.memo().unwrap());
            assert!(
                std::ptr::eq(slot_one, slot_two),
                "the first replay's slot is every later one's"
            );
            assert_eq!(store.weighted_size(), base + MEMO_SLOT + 500);
            read().await;
            assert_eq!(
                store.weighted_size(),
                base + MEMO_SLOT + 500,
                "charged once"
            );
            let expires_at = store.stored("k", store.inner.slot("k")).unwrap().expires_at;
            assert_eq!(
                expires_at, stored_until,
                "written again with its own expiry"
            );
        }
    }

    #[tokio::test]
    async fn keeping_a_decoded_form_never_brings_back_a_record_deleted_or_replaced() {
        let store = MemoryStore::new();
        let complete = |payload: &'static [u8]| {
            let store = store.clone();
            async move {
                let token = claimed(&store, "k").await;
                let record = Record::new(None, payload).with_memo_weight(500);
                store.complete("k", &token, record, LEASE).await.unwrap();
            }
        };
        let slot = store.inner.slot("k");
        // Deleted after a read found it: the slot is not given, the record not written again.
        complete(b"old").await;
        let seen = store.stored("k", slot).unwrap();
        assert!(store.delete("k").await.unwrap());
        let record = store.keep_decoded_form(slot, seen);
        assert!(record.memo().is_none(), "this replay decodes on its own");
        assert!(store.stored("k", slot).is_none(), "the delete stands");
        // Replaced by another record of the key meanwhile: the new one is left as it is.
        complete(b"old").await;
        let seen = store.stored("k", slot).unwrap();
        assert!(store.delete("k").await.unwrap());
        complete(b"new").await;
        let record = store.keep_decoded_form(slot, seen);
        assert_eq!(record.payload().as_ref(), b"old");
        let current = store.stored("k", slot).unwrap();
        assert_eq!(current.record().unwrap().payload().as_ref(), b"new");
        assert!(
            current.record().unwrap().memo().is_none(),
            "the new record was not replayed"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_wake_when_the_claim_ends() {
        let store = MemoryStore::new();
        let token = claimed(&store, "k").await;
        let waiter = tokio::spawn({
            let store = store.clone();
            async move { store.wait("k", 10).await }
        });
        tokio::task::yield_now().await;
        store.release("k", &token).await.unwrap();
        // Paused clock: had the waiter relied on its backstop timer, time would have to move.
        let started = Instant::now();
        waiter.await.unwrap();
        assert_eq!(started.elapsed(), Duration::ZERO);
    }
}
