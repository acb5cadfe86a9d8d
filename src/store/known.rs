//! [`KnownTokens`]: the claims of this process that did something a fresh key never does
//! (saved a recovery point, appended a live stream), so that only their completions and
//! releases pay for undoing it.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use super::{OwnerToken, StoreError};

/// A set of owner tokens, shared by a store and its clones. Each claim leaves it on its
/// completion or release (done, or refused for a lapsed lease; see [`settle`](Self::settle)).
/// Asking about a token while the set is empty (every fresh key's case, unless some claim of
/// the process streams or keeps a point right now) reads one atomic counter: no lock, no
/// hashing, no allocation.
#[derive(Default)]
pub(crate) struct KnownTokens {
    set: Mutex<HashSet<u128>>,
    /// The set's length, kept beside it: the caller that added its own token did so before
    /// asking (the same task), so it sees a length above zero.
    len: AtomicUsize,
}

impl KnownTokens {
    fn set(&self) -> MutexGuard<'_, HashSet<u128>> {
        self.set.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_empty(&self) -> bool {
        self.len.load(Ordering::Acquire) == 0
    }

    /// Remembers `token`.
    pub(crate) fn add(&self, token: &OwnerToken) {
        let mut set = self.set();
        set.insert(token.as_u128());
        self.len.store(set.len(), Ordering::Release);
    }

    /// Whether `token` was remembered (and not settled since).
    pub(crate) fn has(&self, token: &OwnerToken) -> bool {
        !self.is_empty() && self.set().contains(&token.as_u128())
    }

    /// Forgets `token` once `result` ended its claim (done, or a lapsed lease); a store error
    /// leaves it, for the call's retry.
    pub(crate) fn settle<T>(&self, token: &OwnerToken, result: &Result<T, StoreError>) {
        if matches!(result, Ok(_) | Err(StoreError::LeaseLost)) && !self.is_empty() {
            let mut set = self.set();
            set.remove(&token.as_u128());
            self.len.store(set.len(), Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_known_from_its_add_to_its_settlement_and_errors_keep_it() {
        let known = KnownTokens::default();
        let (a, b) = (OwnerToken::from_u128(1), OwnerToken::from_u128(2));
        assert!(!known.has(&a));
        known.add(&a);
        assert!(known.has(&a) && !known.has(&b));
        known.settle(&a, &Err::<(), _>(StoreError::backend("a blip")));
        assert!(known.has(&a), "a store error leaves it for the retry");
        known.settle(&b, &Ok(()));
        assert!(known.has(&a));
        known.settle(&a, &Err::<(), _>(StoreError::LeaseLost));
        assert!(!known.has(&a));
        known.add(&b);
        known.settle(&b, &Ok(()));
        assert!(!known.has(&b) && known.is_empty());
    }
}
