//! Wake-ups for duplicates that wait on another process: the shared stores publish every
//! completion and release (Redis pub/sub, PostgreSQL `NOTIFY`), one listener per store handle
//! receives them, and [`Wakers`] hands each to the local waiters of that key.
//!
//! Delivery is never needed for correctness: a waiter also wakes after a bounded time and
//! claims again, so a missed notification (a reconnect, a listener that is down) costs at most
//! that bound. While the listener is down, waiters back off with jitter as without it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;

use super::backoff_with_jitter;

/// How long a waiter sleeps when the listener is up and nothing arrives: the cost of one
/// missed notification.
const LISTENING_BOUND: Duration = Duration::from_secs(2);

/// The local waiters of one store handle (and its clones), by key.
#[derive(Default)]
pub(crate) struct Wakers {
    waiters: Mutex<HashMap<String, watch::Sender<()>>>,
    /// Whether the listener is subscribed now.
    listening: AtomicBool,
}

impl Wakers {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, watch::Sender<()>>> {
        self.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes every local waiter of `key` (the payload of a notification).
    pub(crate) fn wake(&self, key: &str) {
        if let Some(sender) = self.map().remove(key) {
            let _ = sender.send(());
        }
    }

    pub(crate) fn set_listening(&self, listening: bool) {
        self.listening.store(listening, Ordering::SeqCst);
    }

    pub(crate) fn is_listening(&self) -> bool {
        self.listening.load(Ordering::SeqCst)
    }

    /// Waits until `key` is notified, or the bound for `attempt` passes.
    pub(crate) async fn wait(&self, key: &str, attempt: u32) {
        if !self.is_listening() {
            tokio::time::sleep(backoff_with_jitter(attempt)).await;
            return;
        }
        let mut receiver = {
            let mut map = self.map();
            if map.len() >= 1024 {
                // Waiters that timed out leave their entry behind: drop the unwatched ones.
                map.retain(|_, sender| sender.receiver_count() > 0);
            }
            map.entry(key.to_owned())
                .or_insert_with(|| watch::channel(()).0)
                .subscribe()
        };
        let bound = LISTENING_BOUND + Duration::from_millis(fastrand::u64(0..250));
        let _ = tokio::time::timeout(bound, receiver.changed()).await;
    }
}
