//! The physical limit of each store, for `benches/http.sh` (`--limit-routes`): the bare
//! handler plus exactly the store round trips the layer needs on a path, with the same client
//! crates and connection set-up as the store, and nothing else (no fingerprint, no record
//! format, no fencing, no lease renewal, no recovery point).
//!
//! * `POST /limit/replay/payments`: one read of the key (Redis `GET`; PostgreSQL and SQLite a
//!   `SELECT`), answered with the bytes read.
//! * `POST /limit/fresh/payments`: one write that claims the key (`SET NX PX`; an `INSERT`
//!   with its commit), the handler, its body read whole, one write that stores it (`SET PX`;
//!   an `UPDATE` with its commit).
//!
//! The memory store has no round trip: its limit is the bare route (`POST /bare/payments`).

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::response::Response;

/// A raw connection to the store the demo runs on.
#[derive(Clone)]
pub enum Limit {
    /// One multiplexed connection, as `RedisStore::connect` opens.
    Redis(redis::aio::MultiplexedConnection),
    /// A pool of 16 connections, as `PostgresStore::connect` opens.
    Postgres(deadpool_postgres::Pool),
    /// One connection in WAL mode with the store's pragmas, used off the runtime's threads.
    Sqlite(Arc<Mutex<rusqlite::Connection>>),
}

type Error = Box<dyn std::error::Error + Send + Sync>;

const TABLE: &str = "idempotency_limit";
// The statements, written out once (not formatted on every request: the limit pays only the
// round trip). The table is `TABLE`.
const PG_READ: &str = "SELECT payload FROM idempotency_limit WHERE key = $1 AND expires_at > now()";
const PG_CLAIM: &str = "INSERT INTO idempotency_limit (key, expires_at) \
     VALUES ($1, now() + interval '60 seconds')";
const PG_COMPLETE: &str = "UPDATE idempotency_limit SET payload = $2, \
     expires_at = now() + interval '1 day' WHERE key = $1";
const SQLITE_READ: &str = "SELECT payload FROM idempotency_limit \
     WHERE key = ?1 AND expires_at > unixepoch('subsec') * 1000";
const SQLITE_CLAIM: &str = "INSERT INTO idempotency_limit (key, expires_at) \
     VALUES (?1, unixepoch('subsec') * 1000 + 60000)";
const SQLITE_COMPLETE: &str = "UPDATE idempotency_limit SET payload = ?2, \
     expires_at = unixepoch('subsec') * 1000 + 86400000 WHERE key = ?1";

impl Limit {
    /// The limit of the store `spec` names; `None` for the stores without a round trip
    /// (memory) or that it does not model (Redis Cluster and Sentinel).
    pub async fn open(spec: &str) -> Result<Option<Self>, Error> {
        if spec.starts_with("redis://") || spec.starts_with("rediss://") {
            let client = redis::Client::open(spec)?;
            Ok(Some(Limit::Redis(
                client.get_multiplexed_async_connection().await?,
            )))
        } else if spec.starts_with("postgres://") || spec.starts_with("postgresql://") {
            let config: tokio_postgres::Config = spec.parse()?;
            let manager = deadpool_postgres::Manager::new(config, tokio_postgres::NoTls);
            let pool = deadpool_postgres::Pool::builder(manager)
                .max_size(16)
                .build()?;
            pool.get()
                .await?
                .batch_execute(&format!(
                    "CREATE TABLE IF NOT EXISTS {TABLE} (key text PRIMARY KEY, payload bytea, \
                     expires_at timestamptz NOT NULL); TRUNCATE {TABLE}"
                ))
                .await?;
            Ok(Some(Limit::Postgres(pool)))
        } else if let Some(rest) = spec.strip_prefix("sqlite://") {
            let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
            let synchronous = if query == "synchronous=full" {
                "FULL"
            } else {
                "NORMAL"
            };
            let connection = rusqlite::Connection::open(path)?;
            connection.execute_batch(&format!(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = {synchronous}; \
                 PRAGMA busy_timeout = 5000; \
                 CREATE TABLE IF NOT EXISTS {TABLE} (key TEXT PRIMARY KEY, payload BLOB, \
                 expires_at INTEGER NOT NULL); DELETE FROM {TABLE};"
            ))?;
            Ok(Some(Limit::Sqlite(Arc::new(Mutex::new(connection)))))
        } else {
            Ok(None)
        }
    }

    /// One read: the stored bytes of `key`.
    pub async fn read(&self, key: String) -> Result<Option<Bytes>, Error> {
        match self {
            Limit::Redis(connection) => {
                let value: Option<Vec<u8>> = redis::cmd("GET")
                    .arg(key)
                    .query_async(&mut connection.clone())
                    .await?;
                Ok(value.map(Bytes::from))
            }
            Limit::Postgres(pool) => {
                let client = pool.get().await?;
                let statement = client.prepare_cached(PG_READ).await?;
                let row = client.query_opt(&statement, &[&key]).await?;
                Ok(row.and_then(|row| row.get::<_, Option<Vec<u8>>>(0).map(Bytes::from)))
            }
            Limit::Sqlite(connection) => {
                let connection = connection.clone();
                let value = tokio::task::spawn_blocking(move || {
                    let connection = connection.lock().unwrap();
                    let mut statement = connection.prepare_cached(SQLITE_READ)?;
                    let mut rows = statement.query([&key])?;
                    let value = match rows.next()? {
                        Some(row) => row.get::<_, Option<Vec<u8>>>(0)?,
                        None => None,
                    };
                    Ok::<_, rusqlite::Error>(value)
                })
                .await??;
                Ok(value.map(Bytes::from))
            }
        }
    }

    /// One write with its commit: `key` claimed for 60 s.
    pub async fn claim(&self, key: String) -> Result<(), Error> {
        self.write(key, None).await
    }

    /// One write with its commit: `payload` stored under `key` for 24 h.
    pub async fn complete(&self, key: String, payload: Bytes) -> Result<(), Error> {
        self.write(key, Some(payload)).await
    }

    async fn write(&self, key: String, payload: Option<Bytes>) -> Result<(), Error> {
        match self {
            Limit::Redis(connection) => {
                let mut command = redis::cmd("SET");
                match payload {
                    None => command.arg(key).arg("c").arg("NX").arg("PX").arg(60_000),
                    Some(payload) => command
                        .arg(key)
                        .arg(payload.as_ref())
                        .arg("PX")
                        .arg(86_400_000),
                };
                let _: Option<String> = command.query_async(&mut connection.clone()).await?;
                Ok(())
            }
            Limit::Postgres(pool) => {
                let client = pool.get().await?;
                match payload {
                    None => {
                        let statement = client.prepare_cached(PG_CLAIM).await?;
                        client.execute(&statement, &[&key]).await?;
                    }
                    Some(payload) => {
                        let statement = client.prepare_cached(PG_COMPLETE).await?;
                        client
                            .execute(&statement, &[&key, &payload.as_ref()])
                            .await?;
                    }
                }
                Ok(())
            }
            Limit::Sqlite(connection) => {
                let connection = connection.clone();
                tokio::task::spawn_blocking(move || {
                    let connection = connection.lock().unwrap();
                    match payload {
                        None => connection.prepare_cached(SQLITE_CLAIM)?.execute([&key])?,
                        Some(payload) => connection
                            .prepare_cached(SQLITE_COMPLETE)?
                            .execute(rusqlite::params![key, payload.as_ref()])?,
                    };
                    Ok::<_, rusqlite::Error>(())
                })
                .await??;
                Ok(())
            }
        }
    }
}

/// `response` with its body read whole, and those bytes.
pub async fn buffered(response: Response) -> Result<(Response, Bytes), Error> {
    let (parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX).await?;
    Ok((
        Response::from_parts(parts, axum::body::Body::from(bytes.clone())),
        bytes,
    ))
}
