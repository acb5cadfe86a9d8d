//! The embedded store: claims, completed records and recovery points in sharded maps, bounded
//! by their total bytes with CLOCK eviction.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ahash::RandomState;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{ClaimOutcome, KeyState, OwnerToken, Record, RecoveryPoint, Store, StoreError};

/// The most shards a store has (each a lock over its claims, entries and eviction order).
const MAX_SHARDS: u64 = 64;
/// The capacity per shard below which a store has fewer shards: a shard's eviction order is
/// exact, and the clock hand takes the oldest entry of each shard in turn, so shards holding
/// many entries each keep the store close to one least-recently-used order.
const SHARD_BYTES: u64 = 1 << 20;
/// What a stored record costs beyond its key and payload, as charged against the capacity:
/// its map entry (key `Arc`, value, stamps), its place in the eviction order, and the
/// allocator's share once the store is full and evicting. A full store of 100 B records holds
/// 1.00 times its capacity in resident memory (`tests/isolated/footprint.rs`, 2026-12-07).
const RECORD_OVERHEAD: u64 = 560;

/// An in-process store: the default. One process only; use a shared store for a fleet.
///
/// * Completed records and recovery points are bounded by their **total bytes** (keys,
///   payloads, a point's phase and data, a fixed per-entry overhead and, for a record kept
///   decoded, what its decoded form allocates: see
///   [`keep_decoded`](MemoryStoreBuilder::keep_decoded)) [64 MiB], evicting by CLOCK, record
///   or point alike: an entry is marked when written and when read; the clock hand, going
///   through each shard's entries in write order, unmarks and keeps a marked one (its second
///   chance) and evicts the first unmarked. So a new record never goes before older ones that
///   were not read since (its key's retry is still to come), and a replay gives its record
///   another chance. The store never refuses a new record to keep often-replayed ones (a
///   frequency filter such as TinyLFU would): a retry in a loop over more keys than fit runs
///   again, as with LRU. Expired entries at the front of the order go as new ones are written.
///   A record evicted early (capacity pressure) behaves like an expired one: a retry with its
///   key runs again. Size the capacity for your retention. Entries are kept by a 64-bit hash
///   of the key under a per-store random key (hashed once per call; the map never touches key
///   strings when it rehashes or evicts), and every read compares the whole key: two keys
///   whose hashes collide (about one chance in 10¹⁰ per 50,000 stored keys, and nobody outside
///   the process can aim for it) never see each other's record; the later one replaces the
///   earlier, like an early eviction.
/// * Claims in flight live beside the entries, never in the eviction order, so capacity
///   pressure never evicts a claim: only its lease lapsing or its owner completing or
///   releasing it ends it.
/// * A recovery point ([`Store::save_point`]) is charged to the capacity like a record, and no
///   fixed table bounds how many there are (one tenant's failed runs cannot refuse everyone
///   else's saves). While its key's claim lives, the claim holds the point too: eviction
///   never takes it from the run (that would let a retry repeat the side effect), though its
///   entry may be evicted and its bytes then sit outside the capacity until the claim ends
///   (at most the points of the claims in flight, each within `max_recovery_point`). When the
///   claim ends without a completion (released after a failed run, or lapsed), the point goes
///   back as the most recently written entry, for the key's next run; from then on it is
///   evicted like a cold record when the store is full, and the next run then starts afresh.
///   A completion replaces it with the record. A point heavier than the whole capacity is
///   refused ([`StoreError::Backend`]): it could not be kept once the run ends.
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
    /// Claims, records and points, by the keyed 64-bit hash of their key (see [`Inner::slot`]).
    shards: Box<[Mutex<Shard>]>,
    /// What the entries of every shard weigh together: one byte budget for records and points.
    charged: AtomicU64,
    /// The clock hand over the shards: the next shard to evict from.
    hand: AtomicUsize,
    /// The capacity.
    max_bytes: u64,
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

/// What a key's entry holds: its outcome, or the progress of a run that did not finish.
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

    /// What this entry is charged against the capacity.
    fn weight(&self) -> u64 {
        match &self.kept {
            Kept::Record(record) => {
                // A record gets its slot from its first replay, which fills it (see
                // `MemoryStore::replayed`): charged from then on.
                let memo = record
                    .memo()
                    .map_or(0, |_| MEMO_SLOT + u64::from(record.memo_weight()));
                self.key.len() as u64 + record.held_bytes() as u64 + memo + RECORD_OVERHEAD
            }
            Kept::Point(point) => point_weight(&self.key, point),
        }
    }
}

/// What a recovery point's entry costs beyond its key, phase and data: the entry (as a
/// record's) and the point's own allocations (its `Arc`, its phase `String`, its data's
/// buffer and the shared header `bytes` gives that buffer once it is cloned into the store).
/// Calibrated with `tests/isolated/footprint.rs`: 100-byte points take about 1,040 bytes of
/// resident memory each; the former `+ 80` charged 810, and the store held 1.28 times its
/// capacity (now 1.05).
const POINT_OVERHEAD: u64 = RECORD_OVERHEAD + 310;

/// A point's weight against the capacity. From its phase and data lengths only: what else a
/// point carries is small and fixed, inside the overhead.
fn point_weight(key: &str, point: &RecoveryPoint) -> u64 {
    key.len() as u64 + point.phase().len() as u64 + point.data().len() as u64 + POINT_OVERHEAD
}

/// What a record's slot for its decoded form takes itself (an `Arc` of a `OnceLock` of a fat
/// pointer, as glibc rounds it), charged with the decoded form's estimate.
const MEMO_SLOT: u64 = 48;

/// Hashes a slot (already a keyed hash) to itself.
#[derive(Default)]
struct SlotHasher(u64);

impl Hasher for SlotHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*byte);
        }
    }

    fn write_u64(&mut self, slot: u64) {
        self.0 = slot;
    }
}

/// A shard: the claims of its keys, their entries, and the order in which entries are evicted.
struct Shard {
    claims: HashMap<Arc<str>, Claim, RandomState>,
    /// The claims map's length after the last sweep of lapsed leases.
    swept_len: usize,
    /// Records and points, by slot.
    entries: HashMap<u64, Entry, BuildHasherDefault<SlotHasher>>,
    /// The entries in the order they were written, oldest first, each as its slot and stamp: a
    /// queued stamp that is no longer its slot's (the entry was replaced, deleted or evicted)
    /// is skipped, and such leftovers are dropped once they outnumber the entries.
    order: VecDeque<Queued>,
    /// The stamp of the next entry written.
    next_stamp: u64,
}

struct Entry {
    stored: Stored,
    /// Its charge, as weighed when written (or given its decoded form).
    weight: u64,
    /// Which write of its slot this is (see [`Shard::order`]).
    stamp: u64,
    /// Written or read since the clock hand last passed it: it goes to the back of the order
    /// once instead of being evicted.
    referenced: bool,
}

struct Queued {
    slot: u64,
    stamp: u64,
    /// The entry's expiry, so that an expired entry at the front goes without a map probe
    /// unless it is still there.
    expires_at: Instant,
}

impl Shard {
    /// The live (unexpired) entry of `key`, if its slot holds one of that key.
    fn live(&mut self, key: &str, slot: u64, now: Instant) -> Option<&mut Entry> {
        self.entries
            .get_mut(&slot)
            .filter(|entry| entry.stored.expires_at > now && *entry.stored.key == *key)
    }

    /// Writes `stored` at `slot` as the most recent entry, weighing `weight`; a few expired
    /// entries at the front of the order go. Returns the weight it replaced or dropped.
    fn put(&mut self, slot: u64, stored: Stored, weight: u64, now: Instant) -> u64 {
        let mut freed = 0;
        for _ in 0..2 {
            match self.order.front() {
                Some(front) if front.expires_at <= now => {
                    let front = self.order.pop_front().expect("checked");
                    freed += self.remove_queued(&front).unwrap_or(0);
                }
                _ => break,
            }
        }
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        self.order.push_back(Queued {
            slot,
            stamp,
            expires_at: stored.expires_at,
        });
        let entry = Entry {
            stored,
            weight,
            stamp,
            // Written now: used, as a read would mark it. Unmarked, a new record would be the
            // first victim of a shard whose older entries were all replayed (their second
            // chance puts them behind it), and its key's retry, which usually comes within
            // seconds, would run the handler again.
            referenced: true,
        };
        if let Some(old) = self.entries.insert(slot, entry) {
            freed += old.weight;
        }
        if self.order.len() > 2 * self.entries.len() + 32 {
            let entries = &self.entries;
            self.order
                .retain(|queued| entries.get(&queued.slot).map(|e| e.stamp) == Some(queued.stamp));
        }
        freed
    }

    /// Removes the entry `queued` names, if it is still that write of its slot; its weight.
    fn remove_queued(&mut self, queued: &Queued) -> Option<u64> {
        match self.entries.get(&queued.slot) {
            Some(entry) if entry.stamp == queued.stamp => {
                self.entries.remove(&queued.slot).map(|entry| entry.weight)
            }
            _ => None,
        }
    }

    /// Evicts one entry: the oldest expired, or neither written nor read since the hand last
    /// passed (a marked one goes to the back once, unmarked). Its weight; `None` when the shard
    /// holds no entry.
    fn evict_one(&mut self, now: Instant) -> Option<u64> {
        while let Some(queued) = self.order.pop_front() {
            match self.entries.get_mut(&queued.slot) {
                Some(entry) if entry.stamp == queued.stamp => {
                    if entry.referenced && entry.stored.expires_at > now {
                        entry.referenced = false;
                        self.order.push_back(queued);
                        continue;
                    }
                    return self.entries.remove(&queued.slot).map(|entry| entry.weight);
                }
                _ => continue,
            }
        }
        None
    }
}

struct Claim {
    token: OwnerToken,
    deadline: Instant,
    /// Created by the first waiter; dropping it (the claim ends) wakes every waiter.
    waiters: Option<watch::Sender<()>>,
    /// The key's recovery point and when it expires: saved by this claim's run, or left by an
    /// earlier run and taken on when this claim was made. Held here for as long as the claim
    /// is in the map, so capacity pressure (which may evict the point's entry) never takes it
    /// from a live run; written back as an entry when the claim ends.
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
        let shards = (self.max_bytes / SHARD_BYTES).clamp(1, MAX_SHARDS) as usize;
        // Sized for a full store of ~1 KiB records (up to 64k entries), so that a store filling
        // up rehashes less.
        let entries = usize::try_from(self.max_bytes / 1536)
            .unwrap_or(usize::MAX)
            .min(1 << 16)
            / shards;
        let shards = (0..shards)
            .map(|_| {
                Mutex::new(Shard {
                    claims: HashMap::with_hasher(RandomState::new()),
                    swept_len: 0,
                    entries: HashMap::with_capacity_and_hasher(entries, Default::default()),
                    order: VecDeque::with_capacity(entries),
                    next_stamp: 0,
                })
            })
            .collect();
        MemoryStore {
            inner: Arc::new(Inner {
                shards,
                charged: AtomicU64::new(0),
                hand: AtomicUsize::new(0),
                max_bytes: self.max_bytes,
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

impl Inner {
    /// Where `key` lives: its hash under this store's random key (so nobody outside can aim
    /// two keys at one slot), computed once per call; it picks the shard (by its middle bits:
    /// the map inside uses the low and the top ones) and keys the shard's entries.
    fn slot(&self, key: &str) -> u64 {
        self.hasher.hash_one(key)
    }

    /// Writes `stored` at `slot` in `shard` (whose lock the caller holds), charging it; the
    /// caller then calls [`evict_over`](Self::evict_over) once it dropped the lock.
    fn put(&self, shard: &mut Shard, slot: u64, stored: Stored, now: Instant) {
        let weight = stored.weight();
        let freed = shard.put(slot, stored, weight, now);
        self.charge(weight, freed);
    }

    /// Adds `added` and takes `freed` from the charge, in one atomic step.
    fn charge(&self, added: u64, freed: u64) {
        self.charged
            .fetch_add(added.wrapping_sub(freed), Ordering::Relaxed);
    }

    /// Evicts until the entries fit the capacity. Never called under a shard lock.
    fn evict_over(&self) {
        if self.charged.load(Ordering::Relaxed) > self.max_bytes {
            self.evict();
        }
    }

    /// The clock hand goes round the shards, each giving its oldest entry neither written nor
    /// read since the hand last passed, until the entries fit or no shard holds one.
    #[cold]
    fn evict(&self) {
        let now = Instant::now();
        let mut empty = 0;
        while self.charged.load(Ordering::Relaxed) > self.max_bytes && empty < self.shards.len() {
            let at = self.hand.fetch_add(1, Ordering::Relaxed) % self.shards.len();
            match lock(&self.shards[at]).evict_one(now) {
                Some(weight) => {
                    self.charge(0, weight);
                    empty = 0;
                }
                None => empty += 1,
            }
        }
    }
}

/// A shard's lock. A panic while holding it cannot leave a shard half-updated in a way that
/// breaks a promise (every update is a few map operations, charged after), so a poisoned
/// lock is safe to keep using.
fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    shard
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
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
    /// the capacity.
    pub fn weighted_size(&self) -> u64 {
        self.inner.charged.load(Ordering::Relaxed)
    }

    /// How many completed records and recovery points are held (expired ones until they are
    /// read or evicted).
    pub fn record_count(&self) -> u64 {
        self.inner
            .shards
            .iter()
            .map(|shard| lock(shard).entries.len() as u64)
            .sum()
    }

    fn shard(&self, slot: u64) -> MutexGuard<'_, Shard> {
        lock(&self.inner.shards[(slot >> 32) as usize % self.inner.shards.len()])
    }

    /// The claim, which never waits: one lock of the key's shard.
    fn claim_at_once(
        &self,
        key: &str,
        token: &OwnerToken,
        lease: Duration,
    ) -> Result<ClaimOutcome, StoreError> {
        let now = Instant::now();
        let slot = self.inner.slot(key);
        let mut guard = self.shard(slot);
        let shard = &mut *guard;
        let left = match shard.live(key, slot, now) {
            Some(entry) => match &entry.stored.kept {
                Kept::Record(_) => {
                    let (record, grew) = self.replayed(entry);
                    drop(guard);
                    if grew {
                        self.inner.evict_over();
                    }
                    return Ok(ClaimOutcome::Completed(record));
                }
                Kept::Point(point) => Some((point.clone(), entry.stored.expires_at)),
            },
            None => None,
        };
        let lapsed = match shard.claims.get(key) {
            Some(claim) if claim.deadline > now => {
                return Ok(ClaimOutcome::InFlight {
                    lease_remaining: Some(claim.deadline - now),
                });
            }
            Some(_) => true,
            None => false,
        };
        // The claim takes on the key's point, so that no eviction can take it from this run:
        // a lapsed claim's (the latest: a point is left as an entry only when a claim ends),
        // else the one a released or swept claim left as an entry.
        // (A fresh key, the common case, has no claim to remove: no second probe of the map.)
        let point = if lapsed {
            shard.claims.remove(key).and_then(|lapsed| lapsed.point)
        } else {
            left
        }
        .filter(|(_, expires_at)| *expires_at > now);
        let token = *token;
        let swept = self.sweep_if_grown(shard, now);
        shard.claims.insert(
            Arc::from(key),
            Claim {
                token,
                deadline: super::clock::later(now, lease),
                waiters: None,
                point,
            },
        );
        drop(guard);
        if swept {
            self.inner.evict_over();
        }
        Ok(ClaimOutcome::Claimed(token))
    }

    /// The record of `entry` (a live record) for a replay, marked as read; on its first read
    /// with `keep_decoded`, given the slot for its decoded form that this replay is to fill,
    /// and charged for it (then `true`: the caller evicts once it dropped the lock).
    fn replayed(&self, entry: &mut Entry) -> (Record, bool) {
        if !entry.referenced {
            entry.referenced = true;
        }
        let Kept::Record(record) = &mut entry.stored.kept else {
            unreachable!("a record's entry")
        };
        if self.inner.keep_decoded && record.memo().is_none() && record.memo_weight() > 0 {
            record.attach_memo();
            let record = record.clone();
            let weight = entry.stored.weight();
            self.inner.charge(weight, entry.weight);
            entry.weight = weight;
            return (record, true);
        }
        (record.clone(), false)
    }

    /// The entry (record or point) stored under `key`, whatever its expiry.
    #[cfg(test)]
    fn stored(&self, key: &str, slot: u64) -> Option<Stored> {
        let shard = self.shard(slot);
        let entry = shard.entries.get(&slot)?;
        (*entry.stored.key == *key).then(|| entry.stored.clone())
    }

    /// Checks that `token` owns a live lease on `key`, and removes that claim, handing back
    /// its key (so that the record can reuse the allocation).
    fn take_claim(
        shard: &mut Shard,
        key: &str,
        token: &OwnerToken,
        now: Instant,
    ) -> Result<(Arc<str>, Claim), StoreError> {
        match shard.claims.get(key) {
            Some(claim) if claim.token == *token && claim.deadline > now => {
                Ok(shard.claims.remove_entry(key).expect("present"))
            }
            _ => Err(StoreError::LeaseLost),
        }
    }

    /// Leaves the point of an ended claim (released, or lapsed and swept) as an entry for the
    /// key's next run, the most recently written; from now on it is evicted like a cold
    /// record. Under the shard lock of `key`; whether it wrote one (the caller then evicts
    /// once it dropped the lock).
    fn leave_point(
        &self,
        shard: &mut Shard,
        key: Arc<str>,
        point: Option<(Arc<RecoveryPoint>, Instant)>,
        now: Instant,
    ) -> bool {
        let Some((point, expires_at)) = point else {
            return false;
        };
        if expires_at <= now {
            return false;
        }
        let slot = self.inner.slot(&key);
        let stored = Stored {
            key,
            kept: Kept::Point(point),
            expires_at,
        };
        self.inner.put(shard, slot, stored, now);
        true
    }

    /// Drops claims whose lease lapsed, amortised: only once the map has doubled since the
    /// last sweep, so a process whose handlers died cannot grow the map without bound. Their
    /// points go back as entries (then `true`: the caller evicts once it dropped the lock).
    fn sweep_if_grown(&self, shard: &mut Shard, now: Instant) -> bool {
        if shard.claims.len() < (shard.swept_len * 2).max(64) {
            return false;
        }
        let mut left = Vec::new();
        shard.claims.retain(|key, claim| {
            let live = claim.deadline > now;
            if !live && claim.point.is_some() {
                left.push((key.clone(), claim.point.take()));
            }
            live
        });
        shard.swept_len = shard.claims.len();
        let mut wrote = false;
        for (key, point) in left {
            wrote |= self.leave_point(shard, key, point, now);
        }
        wrote
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
            .field("records", &self.record_count())
            .field("weighted_size", &self.weighted_size())
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
        match shard.claims.get_mut(key) {
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
        let now = Instant::now();
        let slot = self.inner.slot(key);
        let mut shard = self.shard(slot);
        // The record takes the slot of the key's point, if any: the stored outcome supersedes it.
        let (key, _claim) = Self::take_claim(&mut shard, key, token, now)?;
        let mut record = record;
        record.mark_in_process();
        // With `keep_decoded`, its first replay gives it a slot for its decoded form.
        let stored = Stored {
            key,
            kept: Kept::Record(record),
            expires_at: super::clock::later(now, ttl),
        };
        self.inner.put(&mut shard, slot, stored, now);
        drop(shard);
        self.inner.evict_over();
        Ok(())
    }

    async fn release(&self, key: &str, token: &OwnerToken) -> Result<(), StoreError> {
        let now = Instant::now();
        let mut shard = self.shard(self.inner.slot(key));
        let (key, claim) = Self::take_claim(&mut shard, key, token, now)?;
        if self.leave_point(&mut shard, key, claim.point, now) {
            drop(shard);
            self.inner.evict_over();
        }
        Ok(())
    }

    /// Kept with the claim (so no eviction takes it from the live run) and as an entry,
    /// charged to the capacity like a record (evicting the oldest entries when the store is
    /// full). Refused with [`StoreError::Backend`] only when the point, its key and the
    /// overhead weigh more than the whole capacity: the store could not keep it once the run
    /// ends.
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
        let owned = match shard.claims.get_key_value(key) {
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
        shard.claims.get_mut(key).expect("checked").point = Some((point.clone(), expires_at));
        let stored = Stored {
            key: owned,
            kept: Kept::Point(point),
            expires_at,
        };
        self.inner.put(&mut shard, slot, stored, now);
        drop(shard);
        self.inner.evict_over();
        Ok(())
    }

    async fn load_point(
        &self,
        key: &str,
        token: &OwnerToken,
    ) -> Result<Option<RecoveryPoint>, StoreError> {
        let now = Instant::now();
        let shard = self.shard(self.inner.slot(key));
        match shard.claims.get(key) {
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
        let mut shard = self.shard(slot);
        if let Some(entry) = shard.live(key, slot, now) {
            if let Some(record) = entry.stored.record() {
                return Ok(KeyState::Completed {
                    expires_in: Some(entry.stored.expires_at - now),
                    record: record.clone(),
                });
            }
        }
        Ok(match shard.claims.get(key) {
            Some(claim) if claim.deadline > now => KeyState::InFlight {
                lease_remaining: Some(claim.deadline - now),
            },
            _ => KeyState::Absent,
        })
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let slot = self.inner.slot(key);
        let mut shard = self.shard(slot);
        let claim = shard.claims.remove(key).is_some();
        let ours = shard
            .entries
            .get(&slot)
            .is_some_and(|entry| *entry.stored.key == *key);
        // Its place in the order is left behind, and skipped.
        let entry = ours.then(|| shard.entries.remove(&slot)).flatten();
        if let Some(entry) = &entry {
            self.inner.charge(0, entry.weight);
        }
        Ok(claim || entry.is_some())
    }

    async fn wait(&self, key: &str, attempt: u32) {
        let mut receiver = {
            let mut shard = self.shard(self.inner.slot(key));
            match shard.claims.get_mut(key) {
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
        let b = store
            .stored(
                "tenant-b|POST|/charges|k",
                store.inner.slot("tenant-b|POST|/charges|k"),
            )
            .unwrap();
        let a_slot = store.inner.slot("tenant-a|POST|/charges|k");
        let weight = b.weight();
        store
            .inner
            .put(&mut store.shard(a_slot), a_slot, b, Instant::now());
        assert_eq!(store.shard(a_slot).entries[&a_slot].weight, weight);
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
            .shards
            .iter()
            .map(|s| s.lock().unwrap().claims.len())
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

    /// What every shard's entries weigh, summed under their locks: the charge must equal it.
    fn weighed(store: &MemoryStore) -> u64 {
        let shards = &store.inner.shards;
        shards
            .iter()
            .map(|shard| {
                let shard = shard.lock().unwrap();
                let weights: u64 = shard.entries.values().map(|e| e.weight).sum();
                let stamps = shard.entries.values().map(|e| e.stored.weight());
                assert_eq!(
                    weights,
                    stamps.sum::<u64>(),
                    "each entry's weight is its own"
                );
                weights
            })
            .sum()
    }

    /// Records replaced and deleted without any eviction leave their places in the eviction
    /// order behind: they are dropped once they outnumber the entries, so the order never
    /// grows past the entries it orders.
    #[tokio::test]
    async fn the_eviction_order_stays_bounded_by_the_entries() {
        let store = MemoryStore::new();
        let point = RecoveryPoint::new("charged", "progress");
        for _ in 0..10_000 {
            let token = claimed(&store, "k").await;
            store.save_point("k", &token, &point, LEASE).await.unwrap();
            let record = Record::new(None, "answer");
            store.complete("k", &token, record, LEASE).await.unwrap();
            assert!(store.delete("k").await.unwrap());
        }
        let queued: usize = store
            .inner
            .shards
            .iter()
            .map(|s| s.lock().unwrap().order.len())
            .sum();
        assert!(queued <= 40, "{queued} places queued for one entry");
        assert_eq!(store.weighted_size(), weighed(&store));
    }

    /// Many tasks writing, replacing, deleting and evicting at once (a small store, so that
    /// every write evicts) leave a charge that is exactly what the held entries weigh, within
    /// the capacity.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn the_charge_is_exact_under_racing_writes_and_evictions() {
        const TASKS: usize = 8;
        let store = MemoryStore::builder().max_bytes(64 * 1024).build();
        let barrier = Arc::new(tokio::sync::Barrier::new(TASKS));
        let tasks: Vec<_> = (0..TASKS)
            .map(|task| {
                let (store, barrier) = (store.clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    for i in 0..500 {
                        let key = format!("task-{task}-{}", i % 97);
                        let payload = bytes::Bytes::from(vec![b'x'; 100 + i % 900]);
                        match store.claim(&key, LEASE).await.unwrap() {
                            ClaimOutcome::Claimed(token) => {
                                let record = Record::new(None, payload);
                                store.complete(&key, &token, record, LEASE).await.unwrap();
                            }
                            ClaimOutcome::Completed(_) => {
                                store.delete(&key).await.unwrap();
                            }
                            other => panic!("{other:?}"),
                        }
                        if i % 7 == 0 {
                            store
                                .delete(&format!("task-{task}-{}", i % 13))
                                .await
                                .unwrap();
                        }
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(store.weighted_size(), weighed(&store));
        assert!(
            store.weighted_size() <= 64 * 1024,
            "{}",
            store.weighted_size()
        );
        assert!(store.record_count() > 0);
    }

    /// A replayed record gets a second chance: once the hand has passed the records (the
    /// first eviction, in this one-shard store), a write that finds the store full evicts the
    /// oldest record not read since, not a replayed one.
    #[tokio::test]
    async fn a_replayed_record_outlives_an_older_one_never_read() {
        let store = MemoryStore::builder().max_bytes(16 * 1024).build();
        let payload = bytes::Bytes::from(vec![0u8; 1024]);
        let mut i = 0;
        while store.record_count() == i {
            stored(&store, &format!("r-{i}"), payload.clone(), LEASE).await;
            i += 1;
        }
        let completed = |key: &'static str| {
            let store = store.clone();
            async move {
                matches!(
                    store.inspect(key).await.unwrap(),
                    KeyState::Completed { .. }
                )
            }
        };
        // The first eviction unmarked every record and took the oldest, r-0.
        assert!(!completed("r-0").await);
        let ClaimOutcome::Completed(_) = store.claim("r-2", LEASE).await.unwrap() else {
            panic!("r-2 is stored")
        };
        stored(&store, "next-1", payload.clone(), LEASE).await;
        stored(&store, "next-2", payload.clone(), LEASE).await;
        assert!(completed("r-2").await, "the replayed record stays");
        assert!(!completed("r-1").await, "the oldest one never read goes");
        assert!(!completed("r-3").await, "and the next one never read");
    }

    /// The store never refuses a new record to keep older, often replayed ones (what a
    /// frequency-based admission filter such as TinyLFU does): a completed key whose record
    /// was refused would run its handler again on its retry, which usually comes within
    /// seconds. A full store of records replayed many times still stores each new one, and
    /// the new one's retry replays.
    #[tokio::test]
    async fn a_new_record_is_stored_even_when_every_held_one_is_replayed_often() {
        let store = MemoryStore::builder().max_bytes(64 * 1024).build();
        let payload = bytes::Bytes::from(vec![0u8; 1024]);
        let mut held = 0;
        while store.record_count() == held {
            stored(&store, &format!("hot-{held}"), payload.clone(), LEASE).await;
            held += 1;
        }
        for _ in 0..5 {
            for i in 0..held {
                // Evicted ones (the last write made room) just claim again; released below.
                if let ClaimOutcome::Claimed(token) =
                    store.claim(&format!("hot-{i}"), LEASE).await.unwrap()
                {
                    store.release(&format!("hot-{i}"), &token).await.unwrap();
                }
            }
        }
        for n in 0..50 {
            let key = format!("new-{n}");
            stored(&store, &key, payload.clone(), LEASE).await;
            match store.claim(&key, LEASE).await.unwrap() {
                ClaimOutcome::Completed(_) => {}
                other => panic!("{key}'s retry must replay, got {other:?}"),
            }
        }
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
