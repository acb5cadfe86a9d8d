//! The Redis store's connections: one server, a cluster, or the master Sentinel names.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::Value;

/// One server (a reconnecting connection manager), a cluster (the cluster client follows
/// `MOVED`/`ASK` redirections and reconnects to restarted masters), or the master a set of
/// Sentinels names.
#[derive(Clone)]
pub(super) enum Connection {
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
    /// The master that Redis Sentinel names now: rediscovered after a connection fails or the
    /// server says it is a replica (a failover demoted it).
    Sentinel(Arc<SentinelLink>),
}

/// A connection to the master a set of Sentinels names.
pub(super) struct SentinelLink {
    pub(super) sentinel: tokio::sync::Mutex<redis::sentinel::SentinelClient>,
    pub(super) current: std::sync::Mutex<Option<redis::aio::MultiplexedConnection>>,
    /// The client of the master `current` was opened to: the store's `WAIT`s open their own
    /// connections to that same server (the one the store's writes went to), never asking the
    /// Sentinels for another.
    pub(super) master: std::sync::Mutex<Option<redis::Client>>,
}

impl SentinelLink {
    /// The connection to the current master, asking the Sentinels for it when there is none.
    pub(super) async fn connection(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        if let Some(connection) = self.cached() {
            return Ok(connection);
        }
        let mut sentinel = self.sentinel.lock().await;
        // Another call may have connected while this one waited for the lock.
        if let Some(connection) = self.cached() {
            return Ok(connection);
        }
        let client = sentinel.async_get_client().await?;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(5)));
        let connection = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        tracing::info!(master = ?client.get_connection_info().addr(), "connected to the Redis master named by Sentinel");
        *self.master.lock().unwrap_or_else(|p| p.into_inner()) = Some(client);
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(connection.clone());
        Ok(connection)
    }

    /// The client of the master the store's connection was last opened to.
    pub(super) fn master(&self) -> Option<redis::Client> {
        self.master
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn cached(&self) -> Option<redis::aio::MultiplexedConnection> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Forgets the connection after an error that says the master moved (or is gone): the next
    /// call asks the Sentinels again.
    fn check(&self, error: &redis::RedisError) {
        let moved = error.is_io_error()
            || error.is_connection_dropped()
            || error.is_connection_refusal()
            || error.is_timeout()
            || matches!(error.code(), Some("READONLY" | "MASTERDOWN" | "LOADING"));
        if moved {
            tracing::warn!(%error, "the Redis master is unreachable or demoted; asking Sentinel for the current one");
            *self.current.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }
}

impl redis::aio::ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
            Connection::Sentinel(link) => Box::pin(async move {
                let mut connection = link.connection().await?;
                let reply = connection.req_packed_command(cmd).await;
                if let Err(error) = &reply {
                    link.check(error);
                }
                reply
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            Connection::Sentinel(link) => Box::pin(async move {
                let mut connection = link.connection().await?;
                let reply = connection
                    .req_packed_commands(pipeline, offset, count)
                    .await;
                if let Err(error) = &reply {
                    link.check(error);
                }
                reply
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
            Connection::Sentinel(_) => 0,
        }
    }
}
