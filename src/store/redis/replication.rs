//! Waiting for replicas (`WAIT`) on connections of their own, so that a replica that stops
//! acknowledging delays only the calls that wait for it (see `RedisStore::with_min_replicas`).
//!
//! `WAIT` blocks the connection it is sent on until the replicas acknowledge that client's
//! writes (or its timeout passes), and a server answers a client's commands in order: sent on
//! the store's shared, multiplexed connection, it would hold up every other call behind it,
//! replays included. So each `WAIT` goes on a connection of its own, taken from a small pool.
//!
//! `WAIT` waits for the replication offset of the client it is sent by: on Valkey 8.1, the
//! offset after that client's last write (on Redis 7.0, after its last command of any kind), so
//! a connection that only waits has nothing to wait for and is answered at once (both seen
//! with a replica frozen by `SIGSTOP`). So the `WAIT` follows
//! a write of its own on the same connection, a key of one millisecond in the record's hash
//! slot: replication is one ordered stream, so once the replicas acknowledged that write they
//! also hold every write the master acknowledged before it, the caller's record among them.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, SingleNodeRoutingInfo, SlotAddr};
use redis::Value;

use super::connection::{Connection, SentinelLink};
use super::{millis, StoreError};

/// Connections open for `WAIT` at most, per store (and its clones): a call that finds them all
/// busy waits for one, within its timeout.
const CONNECTIONS: usize = 16;

/// How to open a connection of its own to the server the store writes to.
#[derive(Clone)]
pub(super) enum Opener {
    /// One server, by its URL.
    Server(Arc<redis::Client>),
    /// A cluster: a cluster connection of its own (connections of its own to every master).
    Cluster(Arc<redis::cluster::ClusterClient>),
    /// The master the store's connection was opened to (the Sentinels named it).
    Sentinel(Arc<SentinelLink>),
}

enum WaitConnection {
    Server(MultiplexedConnection),
    Cluster(ClusterConnection),
}

/// The replicas every claim, completion and recovery point waits for, and the connections the
/// `WAIT`s run on.
pub(super) struct Replicas {
    pub(super) wanted: u32,
    pub(super) timeout: Duration,
    opener: Option<Opener>,
    idle: Mutex<Vec<WaitConnection>>,
    permits: tokio::sync::Semaphore,
}

#[derive(Debug, thiserror::Error)]
#[error("{acked} of the {wanted} required Redis replicas acknowledged the write in time")]
pub(super) struct NotReplicated {
    pub(super) acked: i64,
    pub(super) wanted: u32,
}

impl Replicas {
    /// `opener` is `None` for a store over a bare connection manager: its `WAIT`s run on its
    /// shared connection (see `RedisStore::with_min_replicas`).
    pub(super) fn new(wanted: u32, timeout: Duration, opener: Option<Opener>) -> Self {
        Self {
            wanted,
            timeout,
            opener,
            idle: Mutex::new(Vec::new()),
            permits: tokio::sync::Semaphore::new(CONNECTIONS),
        }
    }

    fn check(&self, acked: i64) -> Result<(), StoreError> {
        if acked >= i64::from(self.wanted) {
            Ok(())
        } else {
            Err(StoreError::backend(NotReplicated {
                acked,
                wanted: self.wanted,
            }))
        }
    }

    /// Waits until the replicas acknowledged every write the master acknowledged before this
    /// call, at most the timeout (plus round trips): writes `marker` (a key in the record's
    /// hash slot, gone a millisecond later) on a connection of its own, then `WAIT`s there.
    /// Without an opener, `WAIT`s on `shared`, for the writes made on it.
    pub(super) async fn acknowledged(
        &self,
        marker: &[u8],
        shared: &Connection,
    ) -> Result<(), StoreError> {
        let Some(opener) = &self.opener else {
            let acked: i64 = redis::cmd("WAIT")
                .arg(self.wanted)
                .arg(millis(self.timeout))
                .query_async(&mut shared.clone())
                .await
                .map_err(StoreError::backend)?;
            return self.check(acked);
        };
        let deadline = Instant::now() + self.timeout;
        let not_in_time = || {
            StoreError::backend(NotReplicated {
                acked: 0,
                wanted: self.wanted,
            })
        };
        let _permit = tokio::time::timeout_at(deadline.into(), self.permits.acquire())
            .await
            .map_err(|_| not_in_time())?
            .map_err(StoreError::backend)?;
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let pooled = idle.is_some();
        let mut connection = match idle {
            Some(connection) => connection,
            None => self.open(opener, deadline).await?,
        };
        let mut reply = self.marked_wait(&mut connection, marker, deadline).await;
        // A pooled connection may have died while idle (the server restarted, a failover): one
        // more try on a new one, so that each idle connection does not fail a call of its own.
        if pooled
            && matches!(&reply, Err(Attempt::Failed(e)) if e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error())
        {
            connection = self.open(opener, deadline).await?;
            reply = self.marked_wait(&mut connection, marker, deadline).await;
        }
        let acked = match reply {
            Ok(acked) => acked,
            Err(Attempt::Late) => return Err(not_in_time()),
            Err(Attempt::Failed(error)) => return Err(StoreError::backend(error)),
        };
        // Only a connection that answered goes back to the pool (one that failed or timed out
        // may be dead, or still blocked).
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(connection);
        self.check(acked)
    }

    async fn open(&self, opener: &Opener, deadline: Instant) -> Result<WaitConnection, StoreError> {
        tokio::time::timeout_at(deadline.into(), open(opener))
            .await
            .map_err(|_| {
                StoreError::backend(NotReplicated {
                    acked: 0,
                    wanted: self.wanted,
                })
            })?
            .map_err(StoreError::backend)
    }

    /// `SET marker "" PX 1`, then `WAIT` until `deadline`, on `connection`: how many replicas
    /// acknowledged.
    async fn marked_wait(
        &self,
        connection: &mut WaitConnection,
        marker: &[u8],
        deadline: Instant,
    ) -> Result<i64, Attempt> {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut pipe = redis::pipe();
        pipe.cmd("SET").arg(marker).arg("").arg("PX").arg(1);
        pipe.cmd("WAIT").arg(self.wanted).arg(millis(left));
        let sent = async {
            match connection {
                WaitConnection::Server(c) => pipe.query_async::<Vec<Value>>(c).await,
                WaitConnection::Cluster(c) => {
                    let route = SingleNodeRoutingInfo::SpecificNode(Route::with_key(
                        marker,
                        SlotAddr::Master,
                    ));
                    c.route_pipeline(pipe, 0, 2, route).await
                }
            }
        };
        // The connection has no response timeout of its own (a `WAIT` may take its whole
        // timeout): a server that stops answering altogether is given a second more.
        let reply = tokio::time::timeout(left + Duration::from_secs(1), sent)
            .await
            .map_err(|_| Attempt::Late)?
            .map_err(Attempt::Failed)?;
        match reply.get(1) {
            Some(Value::Int(acked)) => Ok(*acked),
            _ => Err(Attempt::Failed(redis::RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "unexpected reply to WAIT",
                format!("{reply:?}"),
            )))),
        }
    }
}

/// Why a marked `WAIT` did not answer.
enum Attempt {
    /// Not within its timeout (and a second more).
    Late,
    Failed(redis::RedisError),
}

async fn open(opener: &Opener) -> redis::RedisResult<WaitConnection> {
    // No response timeout: the caller bounds each `WAIT` by its own.
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(None);
    Ok(match opener {
        Opener::Server(client) => WaitConnection::Server(
            client
                .get_multiplexed_async_connection_with_config(&config)
                .await?,
        ),
        Opener::Cluster(client) => WaitConnection::Cluster(client.get_async_connection().await?),
        Opener::Sentinel(link) => {
            let client = link.master().ok_or_else(|| {
                redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "no Redis master named by Sentinel yet",
                ))
            })?;
            WaitConnection::Server(
                client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?,
            )
        }
    })
}
