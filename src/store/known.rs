//! [`KnownTokens`]: the claims of this process that did something a fresh key never does
//! (saved a recovery point, appended a live stream), so that only their completions and
//! releases pay for undoing it.

use std::collections::HashSet;
use std::sync::{Mutex, MutexGuard};

use super::{OwnerToken, StoreError};

/// A set of owner tokens, shared by a store and its clones. Each claim leaves it on its
/// completion or release (done, or refused for a lapsed lease; see [`settle`](Self::settle)).
/// Asking about a token while the set is empty (every fresh key's case) takes the lock and
/// reads one length: no hashing, no allocation.
#[derive(Default)]
pub(crate) struct KnownTokens(Mutex<HashSet<u128>>);

impl KnownTokens {
    fn set(&self) -> MutexGuard<'_, HashSet<u128>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers `token`.
    pub(crate) fn add(&self, token: &OwnerToken) {
        self.set().insert(token.as_u128());
    }

    /// Whether `token` was remembered (and not settled since).
    pub(crate) fn has(&self, token: &OwnerToken) -> bool {
        let set = self.set();
        !set.is_empty() && set.contains(&token.as_u128())
    }

    /// Forgets `token` once `result` ended its claim (done, or a lapsed lease); a store error
    /// leaves it, for the call's retry.
    pub(crate) fn settle<T>(&self, token: &OwnerToken, result: &Result<T, StoreError>) {
        if matches!(result, Ok(_) | Err(StoreError::LeaseLost)) {
            let mut set = self.set();
            if !set.is_empty() {
                set.remove(&token.as_u128());
            }
        }
    }
}
