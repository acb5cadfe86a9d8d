//! [`RedisStore`]: records shared by every instance of a service, in Redis (feature `redis`).

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, Script, ServerErrorKind, ToRedisArgs, Value};

use super::known::KnownTokens;
use super::waker::Wake;
use super::{
    ClaimOutcome, KeyState, OwnerToken, Record, RecoveryPoint, Store, StoreError, StreamRead,
    STREAM_READ_BYTES,
};

mod codec;
mod connection;
mod replication;
mod scripts;
mod server_report;

use codec::{claim_value, RecordArg, CLAIM_TAG};
pub(crate) use codec::{decode_record, encode_record};
use connection::{Connection, SentinelLink};
use replication::{Opener, Replicas};
use scripts::{
    Scripts, APPEND_STREAM, CLAIM, COMPLETE, INSPECT, LOAD_POINT, MARK_WAITED, READ_STREAM,
    RELEASE, RENEW, SAVE_POINT,
};
pub use server_report::RedisServerReport;

/// A store in Redis, for a fleet of instances: every instance sees the same claims and
/// records. See the [module docs](super) for the protocol.
///
/// * **Client:** the `redis` crate (1.x) with its tokio [`ConnectionManager`], chosen because
///   it multiplexes every call over one connection and reconnects by itself after the server
///   goes away, so a restarted Redis needs no restart of the application.
/// * **Atomicity:** a claim is `SET key claim NX PX lease GET`, one plain command that also
///   returns the record (so a replay is one round trip; a claim found in flight costs a
///   second, `PTTL`). Servers before Redis 7.0 refuse that form; the store then claims with a
///   Lua script that does the same, from the first refusal on. Renew, complete and
///   release are Lua compare-and-set scripts against the owner token, so a process whose lease
///   lapsed can never overwrite the work of the process that took over. On a server whose
///   `SET` takes `IFEQ` (Valkey 8.1, Redis 8.4 and later), a completion is instead one round
///   trip of plain commands with the same owner check, `SET key record PX ttl IFEQ claim`,
///   cheaper for the server; it falls back on the script in the same way (not on a cluster).
/// * **Clocks:** leases and retention are Redis TTLs (`PX`), measured by the server.
/// * **Layout:** one Redis key per record, `<prefix><key>` [prefix `idempotency:`], so every
///   operation touches one key (one hash slot): Redis Cluster works, through
///   [`connect_cluster`](Self::connect_cluster). Values are binary, tagged and versioned; an
///   unknown version is reported as [`StoreError::Corrupt`], never misread. A key's recovery
///   point is a key of its own in the record's hash slot, named by the whole record key (so no
///   other key, whatever its braces, reaches it); so is its live stream, a list (see
///   [`Store::append_stream`] and `docs/stores.md`, "Live streams").
/// * **Configuration:** requires `maxmemory-policy noeviction` (checked at connect; refused by
///   [`connect_strict`](Self::connect_strict)) and, to survive a restart, persistence.
/// * **Waiting duplicates** are woken by Redis pub/sub: a duplicate about to wait marks the
///   claim (a script appends a byte to its value), and the completion or release of a marked
///   claim publishes the key on `<prefix>wake`; one subscriber connection per store (shared by
///   its clones, opened on the first wait) wakes the local waiters of that key. A claim nobody
///   waits for publishes nothing. A missed message costs at most about 2 s; while the
///   subscriber is down, waiters back off with jitter (and mark nothing).
/// * **Commands a fresh key sends:** its claim's `SET` and its completion's write, one round
///   trip each, two writes. On Redis before 8.4 (and on a Cluster) the completion is the
///   script: its `GET` (the owner check), `SET`, and `DEL` of the key's recovery point (a
///   `DEL` of a key that is not there writes nothing), so a point a crashed run left ends with
///   the record's write, in one atomic step, whether or not the retry loaded it. On a server
///   whose `SET` takes `IFEQ`, the completion is `SET … IFEQ`, and the claim's `SET` goes
///   with an `EXISTS` of the point key in the same round trip (a read): a claim that found a
///   point, or saved or loaded one, or appended a live stream, completes through the script,
///   which ends them. The wake-up's `PUBLISH` goes only when a duplicate marked the claim.
///   **A replay** is the claim's round trip: its `SET` alone (with the `EXISTS` on an `IFEQ`
///   server).
///
/// ```no_run
/// use tower_idempotency::{store::RedisStore, IdempotencyLayer};
///
/// # async fn f() -> Result<(), tower_idempotency::store::StoreError> {
/// let store = RedisStore::connect("redis://127.0.0.1:6379").await?;
/// let layer = IdempotencyLayer::with_store(store);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    connection: Connection,
    /// Replicas that must acknowledge a claim, a completion and a recovery point (`WAIT`), how
    /// long to wait, and the connections the `WAIT`s run on (shared by clones).
    replicas: Option<Arc<Replicas>>,
    /// How to open connections of its own to the same server, for `WAIT`s (`None` over a bare
    /// connection manager).
    opener: Option<Opener>,
    prefix: Arc<str>,
    scripts: Arc<Scripts>,
    /// For the pub/sub subscriber (`None` over a bare connection manager: no wake-ups). Behind
    /// an `Arc`: the store is cloned for every keyed request, and a client owns its host name.
    client: Option<Arc<redis::Client>>,
    wake: Arc<Wake>,
    /// The claims, by owner token, that know a recovery point (their claim found one, or they
    /// saved or loaded one through this store and its clones): their completion goes through
    /// the script, whose owner check guards its `DEL` of the point; any other completion sends
    /// no command for a point.
    points: Arc<KnownTokens>,
    /// The claims that appended a live stream through this store and its clones: likewise,
    /// only their completions and releases delete a stream.
    streams: Arc<KnownTokens>,
}

impl RedisStore {
    /// Connects to `url` (`redis://host:port/db`) with the default prefix `idempotency:`, and
    /// checks the server's configuration (see [`check_config`](Self::check_config)): an
    /// eviction policy that can delete claims or records is logged at error level with the fix,
    /// a server without persistence at warn level. Fails when the server cannot be reached.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(StoreError::backend)?;
        let connection = ConnectionManager::new_with_config(client.clone(), Self::manager_config())
            .await
            .map_err(StoreError::backend)?;
        let store = Self::new(connection).with_client(client);
        match store.check_config().await {
            Ok(config) => config.report(),
            Err(error) => {
                tracing::warn!(%error, "could not read the Redis configuration (CONFIG GET is disabled?); make sure maxmemory-policy is noeviction")
            }
        }
        store.probe_conditional_set().await;
        Ok(store)
    }

    /// [`connect`](Self::connect), but refuses a server whose `maxmemory-policy` can evict
    /// keys (anything but `noeviction`), or whose configuration cannot be read: under memory
    /// pressure such a server deletes claims (a duplicate then runs) and records (a retry runs
    /// again).
    pub async fn connect_strict(url: &str) -> Result<Self, StoreError> {
        let store = Self::connect(url).await?;
        let config = store.check_config().await?;
        if config.can_evict() {
            return Err(StoreError::backend(format!(
                "Redis maxmemory-policy is {:?}: it can evict idempotency claims and records; set it to noeviction",
                config.maxmemory_policy
            )));
        }
        Ok(store)
    }

    /// A store that connects on first use: it never fails for want of a server (only for a
    /// malformed `url`), so a service can start while its Redis is still coming up; requests
    /// get 503 (or fail open) until the server answers, as during an outage. The configuration
    /// check runs in the background once the server is reachable.
    pub fn connect_lazy(url: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(StoreError::backend)?;
        let connection =
            ConnectionManager::new_lazy_with_config(client.clone(), Self::manager_config())
                .map_err(StoreError::backend)?;
        let store = Self::new(connection).with_client(client);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let checker = store.clone();
            runtime.spawn(async move {
                for _ in 0..120 {
                    if let Ok(config) = checker.check_config().await {
                        config.report();
                        checker.probe_conditional_set().await;
                        return;
                    }
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            });
        }
        Ok(store)
    }

    /// Connects to a Redis Cluster through any of its nodes (`redis://host:port` each; one is
    /// enough, more survive one being down at start). Every operation touches one key, so one
    /// hash slot; the cluster client follows `MOVED` and `ASK` redirections (resharding) and
    /// reconnects to a master that restarted. Completions and releases are published with
    /// `PUBLISH`, which a cluster forwards to every node, and one subscriber (on the first
    /// node) wakes waiting duplicates.
    pub async fn connect_cluster<I, S>(nodes: I) -> Result<Self, StoreError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let nodes: Vec<String> = nodes.into_iter().map(|n| n.as_ref().to_owned()).collect();
        let first = nodes
            .first()
            .ok_or_else(|| StoreError::backend("connect_cluster needs at least one node"))?;
        let subscriber = redis::Client::open(first.as_str()).map_err(StoreError::backend)?;
        let client = redis::cluster::ClusterClient::builder(nodes.clone())
            .connection_timeout(Duration::from_secs(2))
            .response_timeout(Duration::from_secs(5))
            .retries(3)
            .build()
            .map_err(StoreError::backend)?;
        let connection = client
            .get_async_connection()
            .await
            .map_err(StoreError::backend)?;
        // `WAIT`s get cluster connections of their own, without the 5 s response timeout (each
        // is bounded by its own timeout).
        let waits = redis::cluster::ClusterClient::builder(nodes.clone())
            .connection_timeout(Duration::from_secs(2))
            .retries(3)
            .build()
            .map_err(StoreError::backend)?;
        let mut store = Self::over(Connection::Cluster(connection)).with_client(subscriber);
        store.opener = Some(Opener::Cluster(Arc::new(waits)));
        match store.check_config().await {
            Ok(config) => config.report(),
            Err(error) => {
                tracing::warn!(%error, "could not read the Redis configuration (CONFIG GET is disabled?); make sure maxmemory-policy is noeviction on every node")
            }
        }
        Ok(store)
    }

    /// Connects to the master that Redis Sentinel names `master_name`, through any of
    /// `sentinels` (`redis://host:port` each), and follows failovers: after a connection fails
    /// or the server answers that it is now a replica (`READONLY`), the next call asks the
    /// Sentinels for the new master, without a restart. Calls during the switch fail as store
    /// errors (503, the handler not run). Waiting duplicates back off instead of being woken
    /// (no pub/sub subscriber). Fails when no Sentinel names a reachable master.
    pub async fn connect_sentinel<I, S>(sentinels: I, master_name: &str) -> Result<Self, StoreError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let sentinels: Vec<String> = sentinels
            .into_iter()
            .map(|s| s.as_ref().to_owned())
            .collect();
        let client = redis::sentinel::SentinelClient::build(
            sentinels,
            master_name.to_owned(),
            None,
            redis::sentinel::SentinelServerType::Master,
        )
        .map_err(StoreError::backend)?;
        let link = Arc::new(SentinelLink {
            sentinel: tokio::sync::Mutex::new(client),
            current: std::sync::Mutex::new(None),
            master: std::sync::Mutex::new(None),
        });
        link.connection().await.map_err(StoreError::backend)?;
        let mut store = Self::over(Connection::Sentinel(link.clone()));
        store.opener = Some(Opener::Sentinel(link));
        match store.check_config().await {
            Ok(config) => config.report(),
            Err(error) => {
                tracing::warn!(%error, "could not read the Redis configuration (CONFIG GET is disabled?); make sure maxmemory-policy is noeviction")
            }
        }
        store.probe_conditional_set().await;
        Ok(store)
    }

    /// Learns at once whether the server's `SET` takes `IFEQ` (otherwise the first completion
    /// does): a `SET` of a probe key that writes nothing (`IFEQ` compares with a value no claim
    /// or record has, and the probe key is no scoped key). A server that refuses the form
    /// answers a syntax error: then claims send their `SET` alone, since every completion goes
    /// through the script, which ends the key's point. Any other answer leaves it to the
    /// first completion.
    async fn probe_conditional_set(&self) {
        if !self.scripts.conditional_set.load(Ordering::Relaxed) {
            return;
        }
        let probe: Result<Value, _> = redis::cmd("SET")
            .arg(Prefixed(&self.prefix, "\u{0}ifeq-probe"))
            .arg("\u{0}")
            .arg("PX")
            .arg(1)
            .arg("IFEQ")
            .arg("\u{0}never a claim or a record")
            .query_async(&mut self.connection.clone())
            .await;
        if let Err(error) = probe {
            if error.code() == Some("ERR")
                && error.detail().is_some_and(|d| d.contains("syntax error"))
            {
                tracing::info!(%error, "this Redis refuses SET IFEQ (before Valkey 8.1 and Redis 8.4): completions use a Lua script");
                self.scripts.conditional_set.store(false, Ordering::Relaxed);
            }
        }
    }

    fn manager_config() -> ConnectionManagerConfig {
        ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500))
    }

    /// Reads what of the server's configuration matters to idempotency: its eviction policy
    /// and whether it persists its data.
    pub async fn check_config(&self) -> Result<RedisServerReport, StoreError> {
        let mut connection = self.connection.clone();
        let get = |name: &'static str| {
            let mut cmd = redis::cmd("CONFIG");
            cmd.arg("GET").arg(name);
            cmd
        };
        let policy: Vec<String> = get("maxmemory-policy")
            .query_async(&mut connection)
            .await
            .map_err(StoreError::backend)?;
        let appendonly: Vec<String> = get("appendonly")
            .query_async(&mut connection)
            .await
            .map_err(StoreError::backend)?;
        let save: Vec<String> = get("save")
            .query_async(&mut connection)
            .await
            .map_err(StoreError::backend)?;
        let value = |pair: &[String]| pair.get(1).cloned().unwrap_or_default();
        Ok(RedisServerReport {
            maxmemory_policy: value(&policy),
            appendonly: value(&appendonly) == "yes",
            snapshots: !value(&save).trim().is_empty(),
        })
    }

    /// A store over an existing connection manager. It has no client to open a subscriber
    /// with, so its waiting duplicates back off instead of being woken: prefer
    /// [`connect`](Self::connect).
    pub fn new(connection: ConnectionManager) -> Self {
        Self::over(Connection::Single(connection))
    }

    fn over(connection: Connection) -> Self {
        // A cluster keeps the completion script (see `complete_conditional`).
        let conditional_set = !matches!(connection, Connection::Cluster(_));
        Self {
            connection,
            replicas: None,
            opener: None,
            client: None,
            wake: Arc::default(),
            points: Arc::default(),
            streams: Arc::default(),
            prefix: Arc::from("idempotency:"),
            scripts: Arc::new(Scripts {
                plain_claim: std::sync::atomic::AtomicBool::new(true),
                conditional_set: std::sync::atomic::AtomicBool::new(conditional_set),
                claim: Script::new(CLAIM),
                renew: Script::new(RENEW),
                complete: Script::new(COMPLETE),
                release: Script::new(RELEASE),
                save_point: Script::new(SAVE_POINT),
                load_point: Script::new(LOAD_POINT),
                mark_waited: Script::new(MARK_WAITED),
                append_stream: Script::new(APPEND_STREAM),
                read_stream: Script::new(READ_STREAM),
            }),
        }
    }

    fn with_client(mut self, client: redis::Client) -> Self {
        let client = Arc::new(client);
        if matches!(self.connection, Connection::Single(_)) {
            self.opener = Some(Opener::Server(client.clone()));
        }
        self.client = Some(client);
        self
    }

    /// The channel completions and releases are published on.
    fn channel(&self) -> String {
        format!("{}{WAKE_CHANNEL}", self.prefix)
    }

    /// Starts this handle's subscriber, once: it wakes local waiters from the channel, and
    /// resubscribes (after a pause) whenever its connection drops.
    fn start_subscriber(&self) {
        let Some(client) = &self.client else { return };
        let (client, channel) = (client.clone(), self.channel());
        self.wake
            .start("the Redis wake-up subscriber", move |listener| {
                let (client, channel) = (client.clone(), channel.clone());
                async move {
                    use futures_util::StreamExt;
                    let Ok(mut pubsub) = client.get_async_pubsub().await else {
                        return;
                    };
                    if pubsub.subscribe(&channel).await.is_err() || !listener.subscribed() {
                        return;
                    }
                    let mut messages = pubsub.on_message();
                    while let Some(message) = messages.next().await {
                        if let Ok(key) = message.get_payload::<String>() {
                            if !listener.wake(&key) {
                                return;
                            }
                        }
                    }
                }
            });
    }

    /// Makes every claim, every completion and every recovery point saved wait until
    /// `replicas` replicas have it (`WAIT replicas timeout`), at most `timeout` \[off: Redis
    /// replicates asynchronously, and a failover can lose the last claims, records and points,
    /// letting a duplicate run\].
    ///
    /// * A claim not acknowledged in time is released and fails as a store error: the request
    ///   answers 503 with `Retry-After` and the handler does not run (fail closed).
    /// * A completion not acknowledged in time fails as a store error after it was written: the
    ///   layer retries it like any store blip (the claim kept and renewed) until it is
    ///   acknowledged or the lease runs out; duplicates get 409 meanwhile.
    /// * A recovery point not acknowledged in time fails as a store error after it was written
    ///   ([`RecoveryPoints::save`](crate::RecoveryPoints::save) returns the error): the point may
    ///   or may not survive a failover.
    /// * What is waited for: the replicas' acknowledgement of every write the master acknowledged
    ///   before the wait began, the call's own among them. Replays, renewals, releases and reads
    ///   do not wait.
    /// * Each `WAIT` runs on a connection of its own (a pool of at most 16 per store, shared by
    ///   its clones), never on the store's shared connection: a replica that stops
    ///   acknowledging delays only the calls that wait for it, each by at most `timeout` (plus
    ///   round trips), while replays and other calls go on. A store made by
    ///   [`new`](Self::new) has no client to open connections with: its `WAIT`s run on its
    ///   shared connection and hold up every call behind them for up to `timeout`.
    /// * On a cluster, the `WAIT` runs on the master of the key's hash slot.
    ///
    /// What it guarantees: a claim that the handler ran under, and each point it saved, are on
    /// `replicas` replicas, so a failover that promotes one of them still holds them (a
    /// duplicate gets 409, not a second run; the retry after the lease finds the point). What it
    /// cannot: a completion lost in a failover leaves the key claimed on the new master until
    /// the lease lapses, and the retry after that runs again from its last acknowledged point.
    pub fn with_min_replicas(mut self, replicas: u32, timeout: Duration) -> Self {
        self.replicas =
            (replicas > 0).then(|| Arc::new(Replicas::new(replicas, timeout, self.opener.clone())));
        self
    }

    /// Waits until the configured number of replicas acknowledged every write the master
    /// acknowledged before this call (see [`with_min_replicas`](Self::with_min_replicas)).
    async fn replicated(&self, key: &str) -> Result<(), StoreError> {
        let Some(replicas) = &self.replicas else {
            return Ok(());
        };
        let cluster = matches!(self.connection, Connection::Cluster(_));
        let marker = slot_key_of(&self.prefix, key, b"wait", cluster);
        replicas.acknowledged(&marker, &self.connection).await
    }

    /// Prefixes every Redis key \[`idempotency:`\] (and the wake-up channel, `<prefix>wake`).
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = Arc::from(prefix.into());
        self
    }

    /// Makes this store (and its clones) claim with the Lua script, as it does on a server
    /// before Redis 7.0, so that this crate's tests can run the script against a newer one.
    #[doc(hidden)]
    pub fn claiming_by_script(self) -> Self {
        self.scripts.plain_claim.store(false, Ordering::Relaxed);
        self
    }

    /// A claim in one plain command: `SET key claim NX PX lease GET` sets a free key and
    /// answers nil, or leaves a taken key alone and answers its value (the record, or another
    /// owner's claim). Cheaper for the server than the claim script (no script to run, as
    /// `INFO commandstats` shows), and a replay is this one round trip. A claim in
    /// flight costs a second one, `PTTL`, for the lease left (a hint for `Retry-After`).
    /// `None` when the server refuses that form of `SET` (before Redis 7.0).
    async fn claim_plain(
        &self,
        key: &str,
        token: &OwnerToken,
        lease: Duration,
    ) -> Result<Option<ClaimOutcome>, StoreError> {
        // Sized once: a command grown argument by argument reallocates its buffer each time.
        let mut set = redis::Cmd::with_capacity(7, 96 + self.prefix.len() + key.len());
        set.arg("SET")
            .arg(Prefixed(&self.prefix, key))
            .arg(&claim_value(token)[..])
            .arg("NX")
            .arg("PX")
            .arg(millis(lease))
            .arg("GET");
        let mut connection = self.connection.clone();
        // On a server whose completion may be a plain `SET … IFEQ` (which cannot end a point),
        // the claim's round trip also reads whether the key has a recovery point (a read:
        // nothing written or synced), so that a claim that inherits a crashed run's point
        // completes through the script, which ends it in the same atomic step as the record's
        // write, whether or not the run loads it. Elsewhere the completion is always the
        // script, which always ends the point: the claim is its `SET` alone.
        let check_point = self.scripts.conditional_set.load(Ordering::Relaxed);
        let sent = if check_point {
            let mut exists = redis::Cmd::with_capacity(2, 16 + self.prefix.len() + key.len() + 8);
            exists.arg("EXISTS").arg(self.point_key(key));
            let mut pipe = redis::Pipeline::with_capacity(2);
            pipe.add_command(set).add_command(exists);
            pipe.query_async::<(Option<Vec<u8>>, i64)>(&mut connection)
                .await
        } else {
            set.query_async::<Option<Vec<u8>>>(&mut connection)
                .await
                .map(|previous| (previous, 0))
        };
        let (previous, point) = match sent {
            Ok(replies) => replies,
            Err(error) if refused_command(&error) => {
                tracing::info!(%error, "this Redis refuses SET NX GET (before 7.0): claims use a Lua script");
                return Ok(None);
            }
            Err(error) => return Err(StoreError::backend(error)),
        };
        Ok(Some(match previous {
            None => {
                if point > 0 {
                    self.points.add(token);
                }
                ClaimOutcome::Claimed(*token)
            }
            // Anything but a claim is a record, or damaged (which decoding reports).
            Some(value) if value.first() != Some(&CLAIM_TAG) => {
                ClaimOutcome::Completed(decode_record(value)?)
            }
            Some(_) => {
                let pttl: i64 = redis::cmd("PTTL")
                    .arg(Prefixed(&self.prefix, key))
                    .query_async(&mut connection)
                    .await
                    .map_err(StoreError::backend)?;
                ClaimOutcome::InFlight {
                    lease_remaining: u64::try_from(pttl).ok().map(Duration::from_millis),
                }
            }
        }))
    }

    /// A claim without waiting for replicas: one `SET … NX PX … GET` (or the script on servers
    /// before 7.0).
    async fn claim_unreplicated(
        &self,
        key: &str,
        token: &OwnerToken,
        lease: Duration,
    ) -> Result<ClaimOutcome, StoreError> {
        let token = *token;
        if self.scripts.plain_claim.load(Ordering::Relaxed) {
            if let Some(outcome) = self.claim_plain(key, &token, lease).await? {
                return Ok(outcome);
            }
            self.scripts.plain_claim.store(false, Ordering::Relaxed);
        }
        let reply: Value = self
            .scripts
            .claim
            .key(self.redis_key(key))
            .arg(&claim_value(&token)[..])
            .arg(millis(lease))
            .invoke_async(&mut self.connection.clone())
            .await
            .map_err(StoreError::backend)?;
        let Value::Array(items) = reply else {
            return Err(unexpected(&reply));
        };
        match items.as_slice() {
            [Value::Int(0)] => Ok(ClaimOutcome::Claimed(token)),
            [Value::Int(1), Value::Int(pttl)] => Ok(ClaimOutcome::InFlight {
                lease_remaining: u64::try_from(*pttl).ok().map(Duration::from_millis),
            }),
            [Value::Int(2), Value::BulkString(value)] => {
                Ok(ClaimOutcome::Completed(decode_record(value.clone())?))
            }
            _ => Err(unexpected(&Value::Array(items))),
        }
    }

    /// A completion in plain commands, on a server whose `SET` takes `IFEQ` (Valkey 8.1 and
    /// Redis 8.4 on): one round trip, cheaper for the server than the completion script (no
    /// script entry, and each command runs once instead of through `redis.call`).
    ///
    /// `SET key record PX ttl IFEQ claim`: the fence; it writes only over the caller's own
    /// claim as written, not over one a waiting duplicate marked: that completion goes to the
    /// script, which also publishes the wake-up. A claim that knows a recovery point (its
    /// claim found one, or it saved or loaded one) never comes here: the script ends the point
    /// inside the same fence, in the same atomic step as the record's write.
    ///
    /// `Ok(true)` when the record was written. `Ok(false)` when the completion script must
    /// decide: the value was not the caller's claim as written (a duplicate waits, a
    /// completion retried after it was written, or a lapsed lease: the script tells which),
    /// the server refused `IFEQ` (then every later completion goes to the script at once), or
    /// any other answer of the server's (the script's call reports it, through the same error
    /// handling as every other call).
    async fn complete_conditional(
        &self,
        key: &str,
        token: &OwnerToken,
        record: &Record,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        // Every reply is kept, none marked `ignore()`d: redis-rs keeps those marks in a hashed
        // set that every pipeline builds and searches, which costs more than picking the reply
        // by its place.
        let mut pipe = redis::Pipeline::with_capacity(1);
        pipe.ignore_errors();
        // Sized once (one grown argument by argument reallocates its buffer each time); the
        // record is most of it.
        let named = self.prefix.len() + key.len();
        let mut set = redis::Cmd::with_capacity(7, 128 + named + record.payload().len());
        set.arg("SET")
            .arg(Prefixed(&self.prefix, key))
            .arg(RecordArg(record))
            .arg("PX")
            .arg(millis(ttl))
            .arg("IFEQ")
            .arg(&claim_value(token)[..]);
        pipe.add_command(set);
        let reply: Vec<Value> = pipe
            .query_async(&mut self.connection.clone())
            .await
            .map_err(StoreError::backend)?;
        match reply.last() {
            Some(Value::Okay) => Ok(true),
            Some(Value::ServerError(error)) if refuses_ifeq(error) => {
                tracing::info!(error = %redis::RedisError::from(error.clone()), "this Redis refuses SET IFEQ (before Valkey 8.1 and Redis 8.4): completions use a Lua script");
                self.scripts.conditional_set.store(false, Ordering::Relaxed);
                Ok(false)
            }
            _ => Ok(false),
        }
    }

    /// Marks `key`'s claim as waited for (see `MARK_WAITED`): `true` while the key is in
    /// flight, `false` once it is not (claim again).
    async fn mark_waited(&self, key: &str) -> Result<bool, StoreError> {
        let marked: i64 = self
            .scripts
            .mark_waited
            .key(self.redis_key(key))
            .invoke_async(&mut self.connection.clone())
            .await
            .map_err(StoreError::backend)?;
        Ok(marked == 1)
    }

    /// What the store holds for `key`: `GET` and `PTTL` in one script.
    async fn inspect_key(&self, key: &str) -> Result<KeyState, StoreError> {
        let reply: Value = Script::new(INSPECT)
            .key(self.redis_key(key))
            .invoke_async(&mut self.connection.clone())
            .await
            .map_err(StoreError::backend)?;
        let Value::Array(items) = &reply else {
            return Err(unexpected(&reply));
        };
        let remaining = match items.get(1) {
            Some(Value::Int(ms)) => u64::try_from(*ms).ok().map(Duration::from_millis),
            _ => None,
        };
        match items.first() {
            Some(Value::BulkString(value)) if value.first() == Some(&CLAIM_TAG) => {
                Ok(KeyState::InFlight {
                    lease_remaining: remaining,
                })
            }
            Some(Value::BulkString(value)) => Ok(KeyState::Completed {
                record: decode_record(value.clone())?,
                expires_in: remaining,
            }),
            _ => Ok(KeyState::Absent),
        }
    }

    fn redis_key(&self, key: &str) -> String {
        let mut out = String::with_capacity(self.prefix.len() + key.len());
        out.push_str(&self.prefix);
        out.push_str(key);
        out
    }

    /// The Redis key of `key`'s recovery point: its own (no other key's point key, and no
    /// record key), in the same hash slot as the record's; see `slot_key_of`.
    fn point_key(&self, key: &str) -> Vec<u8> {
        let cluster = matches!(self.connection, Connection::Cluster(_));
        slot_key_of(&self.prefix, key, b"point", cluster)
    }

    /// The Redis key of `key`'s live stream (a list): its own, in the record's hash slot,
    /// named by the whole record key, as [`point_key`](Self::point_key).
    fn stream_key(&self, key: &str) -> Vec<u8> {
        let cluster = matches!(self.connection, Connection::Cluster(_));
        slot_key_of(&self.prefix, key, b"stream", cluster)
    }

    /// The keys beside `key`'s record that the end of `token`'s claim deletes: its recovery
    /// point's when `point`, its live stream's when it appended one (none for a fresh key, and
    /// no allocation).
    fn ended_with(&self, key: &str, token: &OwnerToken, point: bool) -> Vec<Vec<u8>> {
        let stream = self.streams.has(token);
        if !point && !stream {
            return Vec::new();
        }
        let mut keys = Vec::with_capacity(2);
        if point {
            keys.push(self.point_key(key));
        }
        if stream {
            keys.push(self.stream_key(key));
        }
        keys
    }

    async fn owner_checked(
        &self,
        script: &Script,
        key: &str,
        token: &OwnerToken,
        args: impl ToRedisArgs,
    ) -> Result<(), StoreError> {
        self.owner_checked_with(script, key, &[], token, 0, args)
            .await
    }

    /// Runs an owner-checked script on `key` (and `others`, keys in the same slot), with the
    /// owner's token and `args` (about `size` bytes) as its arguments. The `EVALSHA` is built
    /// here, each argument written once into the command: `ScriptInvocation` copies every
    /// argument into a vector of its own first (a completion's whole record, once more).
    async fn owner_checked_with(
        &self,
        script: &Script,
        key: &str,
        others: &[Vec<u8>],
        token: &OwnerToken,
        size: usize,
        args: impl ToRedisArgs,
    ) -> Result<(), StoreError> {
        let mut eval = redis::Cmd::with_capacity(8, 160 + key.len() + self.prefix.len() + size);
        eval.arg("EVALSHA")
            .arg(script.get_hash())
            .arg(1 + others.len())
            .arg(Prefixed(&self.prefix, key));
        for other in others {
            eval.arg(other);
        }
        eval.arg(&claim_value(token)[..]).arg(args);
        let mut connection = self.connection.clone();
        let done: i64 = match eval.query_async(&mut connection).await {
            // Not in the server's script cache (a restarted or new server): load it, once more.
            Err(error) if error.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                script
                    .prepare_invoke()
                    .load_async(&mut connection)
                    .await
                    .map_err(StoreError::backend)?;
                eval.query_async(&mut connection).await
            }
            done => done,
        }
        .map_err(StoreError::backend)?;
        if done == 1 {
            Ok(())
        } else {
            Err(StoreError::LeaseLost)
        }
    }
}

/// A Redis key written as one argument from its prefix and the store's key, without building
/// the `String`.
struct Prefixed<'a>(&'a str, &'a str);

impl ToRedisArgs for Prefixed<'_> {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        use std::io::Write;
        let mut arg = out.writer_for_next_arg();
        // Writing into the command's buffer cannot fail.
        let _ = arg.write_all(self.0.as_bytes());
        let _ = arg.write_all(self.1.as_bytes());
    }
}

/// A key of the store's own beside the record key `R` = `<prefix><key>`, for `kind` (`point`:
/// its recovery point; `wait`: the marker a `WAIT` follows): `{S}:<kind>`, the byte 0xFF, then
/// `R` whole, where `S` names `R`'s hash slot.
///
/// * Bound to its record key: `R` follows the first 0xFF byte, which no UTF-8 text holds, so
///   the first 0xFF sits at the same place in two equal keys and their `R`s are equal. Keys that
///   share a hash tag (tenants' keys both holding `{T}`, or a key whose tag is another key's
///   whole record key) get distinct points.
/// * Never a record key (nor a key of another store's prefix): every record key is UTF-8.
/// * In the record's slot, so that one script reaches both on a cluster: `S` is `R`'s hash tag
///   when it has a valid one, else `R` itself, which Redis then hashes whole, as it hashes `R`.
///   But a tag cannot hold a `}`: for a record key with no valid tag and a `}` (`…{}…`,
///   `…}…`), `S` is instead a short text of that slot's on a cluster (see `slot_tag`), and
///   elsewhere, where slots do not matter, `R`.
///
/// Written out, not formatted, and without the record key built first: every completion names
/// it.
fn slot_key_of(prefix: &str, key: &str, kind: &[u8], cluster: bool) -> Vec<u8> {
    let record_len = prefix.len() + key.len();
    let mut out = Vec::with_capacity(1 + 2 * record_len + kind.len() + 3);
    // `{R`, then cut to `{S` when `R` has a tag.
    out.push(b'{');
    out.extend_from_slice(prefix.as_bytes());
    out.extend_from_slice(key.as_bytes());
    match hash_tag(&out[1..]) {
        Some(tag) => {
            out.truncate(1 + tag.end);
            out.drain(1..1 + tag.start);
        }
        None if cluster && memchr::memchr(b'}', &out[1..]).is_some() => {
            let slot = crc16(&out[1..]) % SLOTS;
            out.truncate(1);
            out.extend_from_slice(slot_tag(slot).as_bytes());
        }
        None => {}
    }
    out.extend_from_slice(b"}:");
    out.extend_from_slice(kind);
    out.push(0xff);
    out.extend_from_slice(prefix.as_bytes());
    out.extend_from_slice(key.as_bytes());
    out
}

/// Where the hash tag of a Redis key is: the text between its first `{` and the next `}`, when
/// not empty (what Redis Cluster hashes instead of the whole key).
fn hash_tag(key: &[u8]) -> Option<std::ops::Range<usize>> {
    let open = memchr::memchr(b'{', key)?;
    let close = open + 1 + memchr::memchr(b'}', &key[open + 1..])?;
    (close > open + 1).then_some(open + 1..close)
}

/// The hash slots of a Redis Cluster.
const SLOTS: u16 = 16_384;

/// The CRC16 (XMODEM) that Redis Cluster hashes keys with, modulo [`SLOTS`].
fn crc16(bytes: &[u8]) -> u16 {
    bytes.iter().fold(0u16, |crc, &byte| {
        (0..8).fold(crc ^ (u16::from(byte) << 8), |crc, _| {
            if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            }
        })
    })
}

/// A hash tag of `slot`'s: the smallest number whose decimal text Redis hashes to that slot.
/// Each of the 16,384 slots has one below 200,000; the table (64 KiB) is built on the first use,
/// by a key that has no tag of its own but holds a `}` on a cluster (a few milliseconds).
fn slot_tag(slot: u16) -> String {
    static TAGS: std::sync::OnceLock<Vec<u32>> = std::sync::OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        let mut tags = vec![u32::MAX; usize::from(SLOTS)];
        let mut left = tags.len();
        let mut n = 0u32;
        while left > 0 {
            let tag = &mut tags[usize::from(crc16(n.to_string().as_bytes()) % SLOTS)];
            if *tag == u32::MAX {
                *tag = n;
                left -= 1;
            }
            n += 1;
        }
        tags
    });
    tags[usize::from(slot % SLOTS)].to_string()
}

/// Whether the server refused a command it does not know in this form (an older Redis), as
/// opposed to failing to answer.
fn refused_command(error: &redis::RedisError) -> bool {
    !(error.is_io_error()
        || error.is_timeout()
        || error.is_connection_dropped()
        || error.is_connection_refusal())
        && error.code() == Some("ERR")
}

/// Whether the server refused `SET … IFEQ` as a form it does not know: what a server before
/// Valkey 8.1 and Redis 8.4 answers (`ERR syntax error`). Any other refusal (an out-of-range
/// TTL, say) is left to the completion script to report.
fn refuses_ifeq(error: &redis::ServerError) -> bool {
    error.code() == "ERR" && error.details().is_some_and(|d| d.contains("syntax error"))
}

/// The wake-up channel's name after the store's prefix.
const WAKE_CHANNEL: &str = "wake";

/// Milliseconds, at least 1 (Redis refuses a zero `PX`), written as a number argument (no
/// `String` per call).
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis().max(1)).unwrap_or(u64::MAX)
}

fn unexpected(value: &Value) -> StoreError {
    StoreError::backend(format!("unexpected reply from the claim script: {value:?}"))
}

impl Store for RedisStore {
    async fn claim_as(
        &self,
        key: &str,
        token: &OwnerToken,
        lease: Duration,
    ) -> Result<ClaimOutcome, StoreError> {
        let outcome = self.claim_unreplicated(key, token, lease).await?;
        if let ClaimOutcome::Claimed(token) = &outcome {
            if let Err(error) = self.replicated(key).await {
                // Fail closed: the handler must not run under a claim a failover could lose.
                let _ = self.release(key, token).await;
                return Err(error);
            }
        }
        Ok(outcome)
    }

    async fn inspect(&self, key: &str) -> Result<KeyState, StoreError> {
        self.inspect_key(key).await
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let mut del = redis::cmd("DEL");
        del.arg(self.redis_key(key))
            .arg(self.point_key(key))
            .arg(self.stream_key(key));
        let deleted: i64 = del
            .query_async(&mut self.connection.clone())
            .await
            .map_err(StoreError::backend)?;
        Ok(deleted > 0)
    }

    async fn renew(
        &self,
        key: &str,
        token: &OwnerToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.owner_checked(&self.scripts.renew, key, token, millis(lease))
            .await
    }

    async fn complete(
        &self,
        key: &str,
        token: &OwnerToken,
        record: Record,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let written = async {
            // A claim that knows a point, or appended a stream, completes through the script,
            // which ends them only if the claim is still the caller's, in the same atomic step
            // as the record's write: plain commands cannot, and ending them unfenced would cut
            // short a successor's point or stream after a lapsed lease. The script always
            // ends the key's point (a `DEL` of a key that is not there writes nothing: no log
            // entry, no sync, nothing replicated), so a claim on a server without `IFEQ`,
            // which never asked whether it inherited one, ends it too.
            if !self.points.has(token)
                && !self.streams.has(token)
                && self.scripts.conditional_set.load(Ordering::Relaxed)
                && self.complete_conditional(key, token, &record, ttl).await?
            {
                return Ok(());
            }
            let ended = self.ended_with(key, token, true);
            self.owner_checked_with(
                &self.scripts.complete,
                key,
                &ended,
                token,
                record.payload().len(),
                (
                    RecordArg(&record),
                    millis(ttl),
                    Prefixed(&self.prefix, WAKE_CHANNEL),
                ),
            )
            .await
        }
        .await;
        self.points.settle(token, &written);
        self.streams.settle(token, &written);
        written?;
        // Written; not acknowledged by the replicas in time, it fails as a store error and the
        // layer retries it (a second completion with the same record succeeds).
        self.replicated(key).await
    }

    async fn save_point(
        &self,
        key: &str,
        token: &OwnerToken,
        point: &RecoveryPoint,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let value = point.encode();
        self.owner_checked_with(
            &self.scripts.save_point,
            key,
            &[self.point_key(key)],
            token,
            value.len(),
            (&value[..], millis(ttl)),
        )
        .await?;
        self.points.add(token);
        // Written; not acknowledged by the replicas in time, it fails as a store error: the
        // handler is told, and the point may be lost in a failover.
        self.replicated(key).await
    }

    async fn load_point(
        &self,
        key: &str,
        token: &OwnerToken,
    ) -> Result<Option<RecoveryPoint>, StoreError> {
        let reply: Value = self
            .scripts
            .load_point
            .key(self.redis_key(key))
            .key(self.point_key(key))
            .arg(&claim_value(token)[..])
            .invoke_async(&mut self.connection.clone())
            .await
            .map_err(StoreError::backend)?;
        match reply {
            Value::Array(items) => match items.as_slice() {
                [Value::Int(1), Value::BulkString(point)] => {
                    self.points.add(token);
                    Ok(Some(RecoveryPoint::decode(Bytes::from(point.clone()))?))
                }
                [Value::Int(1)] | [Value::Int(1), Value::Nil] => Ok(None),
                [Value::Int(0)] => Err(StoreError::LeaseLost),
                _ => Err(unexpected(&Value::Array(items))),
            },
            other => Err(unexpected(&other)),
        }
    }

    async fn release(&self, key: &str, token: &OwnerToken) -> Result<(), StoreError> {
        let released = self
            .owner_checked_with(
                &self.scripts.release,
                key,
                &self.ended_with(key, token, false),
                token,
                0,
                Prefixed(&self.prefix, WAKE_CHANNEL),
            )
            .await;
        self.points.settle(token, &released);
        self.streams.settle(token, &released);
        released
    }

    async fn append_stream(
        &self,
        key: &str,
        token: &OwnerToken,
        from: u64,
        chunks: &[Bytes],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let mut invocation = self.scripts.append_stream.key(self.redis_key(key));
        invocation
            .key(self.stream_key(key))
            .arg(&claim_value(token)[..])
            .arg(from)
            .arg(millis(ttl));
        for chunk in chunks {
            invocation.arg(&chunk[..]);
        }
        let held: i64 = invocation
            .invoke_async(&mut self.connection.clone())
            .await
            .map_err(StoreError::backend)?;
        match held {
            -1 => Err(StoreError::LeaseLost),
            held if held < -1 => Err(StoreError::backend(super::StreamGap {
                from,
                held: (-2 - held).unsigned_abs(),
            })),
            _ => {
                self.streams.add(token);
                Ok(())
            }
        }
    }

    async fn read_stream(&self, key: &str, from: u64) -> Result<StreamRead, StoreError> {
        let reply: Value = self
            .scripts
            .read_stream
            .key(self.redis_key(key))
            .key(self.stream_key(key))
            .arg(from)
            .arg(STREAM_READ_BYTES)
            .invoke_async(&mut self.connection.clone())
            .await
            .map_err(StoreError::backend)?;
        let Value::Array(items) = reply else {
            return Err(unexpected(&reply));
        };
        let mut items = items.into_iter();
        match (items.next(), items.len()) {
            (Some(Value::Int(0)), 0) => Ok(StreamRead::Absent),
            (Some(Value::Int(2)), 0) => Ok(StreamRead::NotLive),
            (Some(Value::Int(1)), 1) => match items.next() {
                Some(Value::BulkString(value)) => Ok(StreamRead::Completed(decode_record(value)?)),
                other => Err(unexpected(&other.unwrap_or(Value::Nil))),
            },
            (Some(Value::Int(3)), _) => items
                .map(|item| match item {
                    Value::BulkString(chunk) => Ok(Bytes::from(chunk)),
                    other => Err(unexpected(&other)),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(StreamRead::Live),
            (first, _) => Err(unexpected(&first.unwrap_or(Value::Nil))),
        }
    }

    /// Waits for the key's claim to end: registers this waiter, then marks the claim (so that
    /// its completion or release publishes), then waits for the notification, at most about
    /// 2 s. In that order, a completion that lands while the duplicate starts waiting either
    /// comes after the mark (and publishes, to a waiter already registered) or before it (the
    /// mark finds no claim, and the caller claims again at once). While the subscriber is down,
    /// or the mark fails, the waiter backs off instead.
    async fn wait(&self, key: &str, attempt: u32) {
        self.start_subscriber();
        let wakers = &self.wake.wakers;
        if !wakers.is_listening() {
            return wakers.wait(key, attempt).await;
        }
        let waiter = wakers.register(&self.redis_key(key));
        match self.mark_waited(key).await {
            Ok(true) => {
                super::waker::Wakers::wait_on(waiter, super::waker::listening_bound()).await
            }
            Ok(false) => {}
            Err(_) => tokio::time::sleep(super::backoff_with_jitter(attempt, super::POLL)).await,
        }
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_error(reply: &[u8]) -> redis::RedisError {
        redis::parse_redis_value(reply)
            .unwrap()
            .extract_error()
            .unwrap_err()
    }

    #[test]
    fn a_recovery_points_key_is_tagged_with_its_records_hash_slot_and_names_the_record() {
        let point = |(prefix, key), cluster| slot_key_of(prefix, key, b"point", cluster);
        // The separator is the byte 0xFF (no UTF-8 text holds it), not a character.
        let expected = |tag: &str, record: &str| {
            [
                format!("{{{tag}}}:point").as_bytes(),
                b"\xff",
                record.as_bytes(),
            ]
            .concat()
        };
        // The hashed part of the record's key as the point's hash tag (one slot for both),
        // then the whole record key (one point per record).
        for cluster in [true, false] {
            assert_eq!(
                point(("idempotency:", "k"), cluster),
                expected("idempotency:k", "idempotency:k")
            );
            assert_eq!(
                point(("idempotency:", "{user-7}:k"), cluster),
                expected("user-7", "idempotency:{user-7}:k")
            );
            assert_eq!(
                point(("tenant-{7}:", "k"), cluster),
                expected("7", "tenant-{7}:k")
            );
            // An unclosed `{` is no tag: the whole key is hashed, and is the point's tag.
            assert_eq!(
                point(("idempotency:", "{k"), cluster),
                expected("idempotency:{k", "idempotency:{k")
            );
        }
        // A slot part holding `}` cannot be a tag: on a cluster, a number of the same slot's is;
        // elsewhere the slot does not matter.
        for (prefix, key) in [("idempotency:", "{}k"), ("id}empotency:", "k")] {
            let record = format!("{prefix}{key}");
            let tag = slot_tag(crc16(record.as_bytes()) % SLOTS);
            assert!(tag.bytes().all(|b| b.is_ascii_digit()), "{tag}");
            assert_eq!(point((prefix, key), true), expected(&tag, &record));
            assert_eq!(point((prefix, key), false), expected(&record, &record));
        }
    }

    #[test]
    fn every_slot_has_a_tag_and_the_slots_are_redis_clusters() {
        use redis::cluster_routing::Slot;
        for slot in 0..SLOTS {
            let tag = slot_tag(slot);
            assert_eq!(crc16(tag.as_bytes()) % SLOTS, slot);
            assert_eq!(Slot::for_key(&tag), Slot::new(slot).unwrap());
        }
        // Redis's own test vector.
        assert_eq!(crc16(b"123456789"), 0x31c3);
    }

    #[cfg(feature = "conformance")]
    #[test]
    fn no_two_record_keys_share_a_slot_key_and_none_is_a_record_key() {
        use redis::cluster_routing::Slot;
        let mut keys = crate::store::conformance::adversarial_keys("5f3a");
        keys.extend(["".into(), "}".into(), "{".into(), "{}".into(), "}{".into()]);
        for cluster in [false, true] {
            let mut seen = std::collections::HashMap::new();
            for key in &keys {
                let record = format!("idempotency:{key}");
                for kind in [&b"point"[..], b"wait", b"stream"] {
                    let derived = slot_key_of("idempotency:", key, kind, cluster);
                    assert!(std::str::from_utf8(&derived).is_err(), "{key:?}: UTF-8");
                    // Outside a cluster, a key with no tag but a `}` may be in another slot.
                    if cluster || !record.contains('}') {
                        assert_eq!(
                            Slot::for_key(&derived),
                            Slot::for_key(&record),
                            "{key:?}: in the record's slot"
                        );
                    }
                    if let Some(other) = seen.insert(derived, (key, kind)) {
                        panic!("{key:?} and {other:?} share a key");
                    }
                }
            }
            assert_eq!(seen.len(), 3 * keys.len());
        }
    }

    #[test]
    fn only_a_syntax_error_says_the_server_has_no_set_ifeq() {
        let answer = |reply: &[u8]| match redis::parse_redis_value(reply).unwrap() {
            Value::ServerError(error) => error,
            other => panic!("{other:?}"),
        };
        // What Redis 7.0 answers to `SET k v PX 1 IFEQ c`.
        assert!(refuses_ifeq(&answer(b"-ERR syntax error\r\n")));
        for reply in [
            &b"-ERR invalid expire time in 'set' command\r\n"[..],
            b"-READONLY You can't write against a read only replica.\r\n",
            b"-OOM command not allowed when used memory > 'maxmemory'\r\n",
        ] {
            assert!(!refuses_ifeq(&answer(reply)), "{reply:?}");
        }
    }

    #[test]
    fn an_older_servers_refusal_of_set_nx_get_falls_back_but_an_outage_does_not() {
        // What Redis 6.2 and 6.0 answer to `SET k v NX PX 1 GET`.
        for reply in [
            &b"-ERR syntax error\r\n"[..],
            b"-ERR GET option cannot be used with NX\r\n",
        ] {
            assert!(refused_command(&server_error(reply)), "{reply:?}");
        }
        // Failures to answer, or answers about the data, are errors, not refusals.
        for reply in [
            &b"-LOADING Redis is loading the dataset in memory\r\n"[..],
            b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n",
            b"-OOM command not allowed when used memory > 'maxmemory'\r\n",
            b"-READONLY You can't write against a read only replica.\r\n",
        ] {
            assert!(!refused_command(&server_error(reply)), "{reply:?}");
        }
        let io = redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(!refused_command(&io));
    }
}
