//! A complete `Store` for a custom backend, written from the trait's docs: the template to copy.
//!
//! The "backend" here is a `Mutex<HashMap>` with its own expiry; replace the map operations by
//! your database's atomic ones (a conditional insert, a compare-and-set on the owner token).
//! `main` runs the conformance suite against it:
//!
//! ```text
//! cargo run --example custom_store
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tower_idempotency::store::{ClaimOutcome, OwnerToken, Record, Store, StoreError};

/// One key's state. Both variants carry their own expiry: the store never relies on a
/// background sweep for correctness.
enum Entry {
    Claimed { token: OwnerToken, until: Instant },
    Completed { record: Record, until: Instant },
}

impl Entry {
    fn live(&self, now: Instant) -> bool {
        match self {
            Entry::Claimed { until, .. } | Entry::Completed { until, .. } => *until > now,
        }
    }
}

/// A store over a mutex-guarded map. Every method takes the lock once, so each is atomic.
#[derive(Clone, Default)]
pub struct HashMapStore {
    entries: Arc<Mutex<HashMap<String, Entry>>>,
}

impl HashMapStore {
    /// Checks that `token` owns a live claim on `key` and removes it.
    fn take_claim(
        map: &mut HashMap<String, Entry>,
        key: &str,
        token: &OwnerToken,
    ) -> Result<(), StoreError> {
        match map.get(key) {
            Some(Entry::Claimed {
                token: owner,
                until,
            }) if owner == token && *until > Instant::now() => {
                map.remove(key);
                Ok(())
            }
            _ => Err(StoreError::LeaseLost),
        }
    }
}

impl Store for HashMapStore {
    async fn claim_as(
        &self,
        key: &str,
        token: &OwnerToken,
        lease: Duration,
    ) -> Result<ClaimOutcome, StoreError> {
        let now = Instant::now();
        let mut map = self.entries.lock().unwrap();
        match map.get(key) {
            Some(Entry::Completed { record, until }) if *until > now => {
                return Ok(ClaimOutcome::Completed(record.clone()));
            }
            Some(Entry::Claimed { until, .. }) if *until > now => {
                return Ok(ClaimOutcome::InFlight {
                    lease_remaining: Some(*until - now),
                });
            }
            // Absent, expired, or a lapsed lease: take it.
            _ => {}
        }
        // A real backend would expire entries itself; here expired ones go on the next claim.
        map.retain(|_, entry| entry.live(now));
        let token = *token;
        map.insert(
            key.to_owned(),
            Entry::Claimed {
                token,
                until: now + lease,
            },
        );
        Ok(ClaimOutcome::Claimed(token))
    }

    async fn renew(
        &self,
        key: &str,
        token: &OwnerToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let now = Instant::now();
        match self.entries.lock().unwrap().get_mut(key) {
            Some(Entry::Claimed {
                token: owner,
                until,
            }) if owner == token && *until > now => {
                *until = now + lease;
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
        let mut map = self.entries.lock().unwrap();
        Self::take_claim(&mut map, key, token)?;
        map.insert(
            key.to_owned(),
            Entry::Completed {
                record,
                until: Instant::now() + ttl,
            },
        );
        Ok(())
    }

    async fn release(&self, key: &str, token: &OwnerToken) -> Result<(), StoreError> {
        Self::take_claim(&mut self.entries.lock().unwrap(), key, token)
    }

    // `wait` keeps its default: jittered exponential backoff. A backend that can notify
    // (LISTEN/NOTIFY, pub/sub) should wake waiters instead.
}

#[tokio::main]
#[allow(dead_code)]
async fn main() {
    tower_idempotency::store::conformance::run_all(&HashMapStore::default()).await;
    println!("HashMapStore passes the tower-idempotency store conformance suite");
}
