//! What of the Redis server's configuration matters to idempotency.

/// What [`RedisStore::check_config`](super::RedisStore::check_config) read from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisServerReport {
    /// `maxmemory-policy`: only `noeviction` never deletes a claim or a record.
    pub maxmemory_policy: String,
    /// `appendonly yes`: writes survive a restart.
    pub appendonly: bool,
    /// `save` has snapshot points: writes up to the last snapshot survive a restart.
    pub snapshots: bool,
}

impl RedisServerReport {
    /// Whether the server may delete keys under memory pressure. `allkeys-*` policies evict
    /// any key; `volatile-*` ones evict keys with a TTL, which every claim and record has.
    pub fn can_evict(&self) -> bool {
        self.maxmemory_policy != "noeviction"
    }

    /// Logs what this configuration risks.
    pub(super) fn report(&self) {
        if self.can_evict() {
            tracing::error!(
                maxmemory_policy = %self.maxmemory_policy,
                "Redis can evict idempotency claims and records under memory pressure: an evicted \
                 claim lets a duplicate run, an evicted record lets a retry run again. Fix: \
                 CONFIG SET maxmemory-policy noeviction (and in redis.conf), or a dedicated Redis"
            );
        }
        if !self.appendonly && !self.snapshots {
            tracing::warn!(
                "Redis keeps no data on disk (appendonly no, no save points): a restart loses \
                 every claim and record, so retries after it run again. Fix: appendonly yes"
            );
        }
    }
}
