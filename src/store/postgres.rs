//! [`PostgresStore`]: records in PostgreSQL, beside the business data (feature `postgres`).

use std::fmt;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::types::ToSql;
use tokio_postgres::NoTls;

use super::known::KnownTokens;
use super::waker::{self, Wake, Wakers};
use super::{
    record_from_columns, ClaimOutcome, KeyState, OwnerToken, Record, RecoveryPoint, Store,
    StoreError, StreamRead, STREAM_READ_BYTES,
};

/// A store in PostgreSQL. See the [module docs](super) for the protocol.
///
/// * **Client:** `tokio-postgres` with a `deadpool-postgres` pool: plain SQL, prepared and
///   cached per connection, no compile-time database needed to build; the pool replaces
///   connections that broke, so a restarted server needs no restart of the application.
/// * **Table:** one row per key [`idempotency_records`, name configurable and validated],
///   created by [`migrate`](Self::migrate) (idempotent); the SQL is [`PostgresStore::schema_sql`]
///   for teams that run their own migrations.
/// * **Atomicity:** a fresh key's claim is one plain `INSERT … ON CONFLICT DO NOTHING` (no
///   lock and no write when the key exists); a key that exists then costs a read of its live
///   row. While nearly every claim finds its key (a herd of retries), the store reads the
///   key first, so a replay or a duplicate in flight is one plain `SELECT`, at a read's cost
///   (the insert costs the server more even when it inserts nothing); it goes back to
///   inserting first once fresh keys return. A row whose lease or TTL lapsed
///   is taken over by an `UPDATE … WHERE expires_at <= now()`. Renew, complete and release
///   are `UPDATE`/`DELETE … WHERE owner = $token AND expires_at > now()`.
/// * **Live streams** ([`Store::append_stream`]) are rows of `<table>_streams` and
///   `<table>_chunks`, one statement per append and per read; only the completion and release
///   of a claim that appended one delete them (see `docs/stores.md`, "Live streams").
/// * **Clocks:** every lease and expiry is computed and compared with the database's `now()`.
/// * **Expired rows** are ignored on read and overwritten by the next claim; delete them with
///   [`purge_expired`](Self::purge_expired) on a schedule, or [`spawn_purger`](Self::spawn_purger).
/// * **HOT completions:** the completion changes no indexed column (the purge finds rows by
///   `purge_at`, set by the claim), and the table's fillfactor leaves room in the page, so
///   PostgreSQL rewrites the row in place and writes no index entry.
/// * **Waiting duplicates** are woken by `LISTEN`/`NOTIFY`: the first waiter of a key flags its
///   claim's row (once its listener is subscribed); after a completion or a release of a
///   flagged key commits, the key is notified on `<table>_wake` (batched with the keys that ended
///   meanwhile, in a transaction of its own: a notifying transaction would hold the server's
///   notification lock through its commit and serialize the commits of every completion), and
///   one connection per store (outside the pool, shared by
///   its clones, opened on the first wait) listens and wakes the local waiters of that key. A
///   missed notification costs at most about 2 s; while the listener is down, waiters back off
///   with jitter.
///
/// ```no_run
/// use tower_idempotency::{store::PostgresStore, IdempotencyLayer};
///
/// # async fn f() -> Result<(), tower_idempotency::store::StoreError> {
/// let store = PostgresStore::connect("postgres://app@127.0.0.1:5432/app").await?;
/// store.migrate().await?;
/// let layer = IdempotencyLayer::with_store(store);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    /// The rest, behind one `Arc`: the store is cloned for every claim (its guard and its
    /// recovery points each hold one).
    shared: Arc<Shared>,
}

#[derive(Clone)]
struct Shared {
    sql: Arc<Sql>,
    /// For the `LISTEN` connection (`None` over a bare pool: no wake-ups); a `Config` owns
    /// several strings.
    config: Option<Arc<tokio_postgres::Config>>,
    wake: Arc<Wake>,
    notifier: Arc<Notifier>,
    read_first: Arc<ReadFirst>,
    /// The TTL (ms) of this store's latest completion: a claim's row is first looked at by
    /// the purge after its lease and this.
    purge_hint: Arc<std::sync::atomic::AtomicI64>,
    /// The claims that appended a live stream through this store and its clones: only their
    /// completions and releases delete a stream (see `Sql::complete_streamed`).
    streams: Arc<KnownTokens>,
}

/// Whether a claim reads the key before it tries to claim it, learnt from the claims this
/// store made: while most claims find their key (a herd of retries, a redelivery storm), a
/// plain read answers each in one round trip, where inserting first costs a found key the
/// insert's round trip and then the read's; while keys are mostly fresh, inserting first saves
/// them the read's round trip. Each way costs the other kind of claim one round trip, so it
/// pays above about one replay in two: a found key counts +1 and a fresh one -1, and claims
/// read first above the midpoint. (Before the claim's insert stopped reading back, a found
/// key cost one round trip either way and the weights were +1 and -4.)
#[derive(Default)]
struct ReadFirst(std::sync::atomic::AtomicU32);

impl ReadFirst {
    const MAX: u32 = 64;

    fn enabled(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed) >= Self::MAX / 2
    }

    /// A claim found the key (completed or in flight), or (`false`) claimed it.
    fn record(&self, found: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        let _ = self.0.fetch_update(Relaxed, Relaxed, |score| {
            Some(match found {
                true => (score + 1).min(Self::MAX),
                false => score.saturating_sub(1),
            })
        });
    }
}

/// The keys whose wake-ups are still to be sent, and whether a task is sending them: one task
/// at a time, which sends whatever queued while it waited in one statement.
#[derive(Default)]
struct Notifier {
    queue: std::sync::Mutex<(Vec<String>, bool)>,
}

impl Notifier {
    fn lock(&self) -> std::sync::MutexGuard<'_, (Vec<String>, bool)> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `key`; `true` when no task is sending (the caller starts one).
    fn push(&self, key: &str) -> bool {
        let mut queue = self.lock();
        queue.0.push(key.to_owned());
        !std::mem::replace(&mut queue.1, true)
    }

    fn take(&self) -> Vec<String> {
        std::mem::take(&mut self.lock().0)
    }

    /// Ends the sending task, unless keys arrived since its last `take`.
    fn stop(&self) -> bool {
        let mut queue = self.lock();
        queue.1 = !queue.0.is_empty();
        !queue.1
    }
}

struct Sql {
    table: String,
    take_over: String,
    /// The `NOTIFY` channel of completions and releases: `<table>_wake`.
    channel: String,
    delete: String,
    /// A fresh key's claim: a plain insert, which does nothing when the key exists.
    insert: String,
    read: String,
    /// A waiter's flag on the key's live claim, which makes its completion notify.
    flag_waiter: String,
    renew: String,
    complete: String,
    release: String,
    notify: String,
    purge: String,
    /// Recovery points live in `<table>_points`, one row per key.
    points: String,
    save_point: String,
    load_point: String,
    purge_points: String,
    /// Live streams live in `<table>_streams` (one row per key: its owner, its length and
    /// when it expires) and `<table>_chunks` (one row per chunk).
    streams: String,
    chunks: String,
    append_stream: String,
    read_stream: String,
    /// The completion and release of a claim that appended a stream: the statements above,
    /// which also delete the key's stream.
    complete_streamed: String,
    release_streamed: String,
    purge_streams: String,
    purge_chunks: String,
}

/// What [`PostgresStore::check_replication`] read from the server: whether a committed claim
/// or record survives a failover to a standby.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PostgresReplication {
    /// `synchronous_commit` (`on`, `remote_apply`, `remote_write`, `local`, `off`).
    pub synchronous_commit: String,
    /// `synchronous_standby_names`: empty when no commit waits for a standby.
    pub synchronous_standby_names: String,
    /// Standbys connected now (as far as this role may see).
    pub standbys: u32,
    /// Of those, the ones commits wait for (`sync` or `quorum`).
    pub synchronous_standbys: u32,
}

impl PostgresReplication {
    /// Whether a commit returns only once a standby has it: then a failover to that standby
    /// loses no claim and no record.
    pub fn commits_wait_for_a_standby(&self) -> bool {
        !self.synchronous_standby_names.trim().is_empty()
            && matches!(
                self.synchronous_commit.as_str(),
                "on" | "remote_apply" | "remote_write"
            )
    }

    /// Logs what a failover could lose.
    fn report(&self) {
        if self.standbys > 0 && !self.commits_wait_for_a_standby() {
            tracing::warn!(
                standbys = self.standbys,
                synchronous_commit = %self.synchronous_commit,
                "PostgreSQL replicates asynchronously: a failover to a standby can lose the last \
                 committed claims and records, and a retry of such a key runs again. Fix: \
                 synchronous_standby_names (with synchronous_commit = on) for the store's \
                 database, or accept that window"
            );
        } else {
            tracing::debug!(replication = ?self, "PostgreSQL replication settings");
        }
    }
}

/// Why a table name was refused.
#[derive(Debug, thiserror::Error)]
#[error("invalid table name {0:?}: use letters, digits and underscores (optionally schema.table), at most 63 each")]
pub struct InvalidTableName(String);

fn valid_identifier(part: &str) -> bool {
    let mut chars = part.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && part.len() <= 63
}

impl Sql {
    fn new(table: &str) -> Result<Self, InvalidTableName> {
        let parts: Vec<&str> = table.split('.').collect();
        if parts.len() > 2 || !parts.iter().all(|p| valid_identifier(p)) {
            return Err(InvalidTableName(table.to_owned()));
        }
        let t = table;
        let channel = channel_of(table);
        Ok(Self {
            table: t.to_owned(),
            // With its recovery point and live stream, if any.
            delete: format!(
                "WITH point AS (DELETE FROM {t}_points WHERE key = $1), \
                 stream AS (DELETE FROM {t}_streams WHERE key = $1), \
                 chunks AS (DELETE FROM {t}_chunks WHERE key = $1) \
                 DELETE FROM {t} WHERE key = $1"
            ),
            // Fenced as `save_point`. The stream held for the owner is its row in
            // `_streams` (none: 0 chunks); an append from past it (a gap) writes nothing. The
            // chunks of another owner's stream (a crashed one's) go, the new ones are added
            // from what is held on (a retry's chunks below are skipped; the owner's own chunks
            // of a stream that expired are overwritten), and the stream's row says the new
            // length and expiry: never shorter than an append of the same owner that committed
            // meanwhile (two retries of one append, both of which saw the stream before either). Answers whether the caller owns the claim and what was held.
            append_stream: format!(
                "WITH holder AS (SELECT key FROM {t} WHERE key = $1 AND owner = $2 \
                   AND NOT completed AND expires_at > now() FOR SHARE), \
                 held AS (SELECT coalesce((SELECT length FROM {t}_streams \
                   WHERE key = $1 AND owner = $2 AND expires_at > now()), 0) AS n), \
                 go AS (SELECT held.n FROM holder, held WHERE $3 <= held.n), \
                 stale AS (DELETE FROM {t}_chunks c USING go WHERE c.key = $1 AND c.owner <> $2), \
                 added AS (INSERT INTO {t}_chunks (key, owner, seq, chunk) \
                   SELECT $1, $2, $3 + u.i - 1, u.c \
                   FROM go, unnest($4::bytea[]) WITH ORDINALITY AS u(c, i) \
                   WHERE $3 + u.i - 1 >= go.n \
                   ON CONFLICT (key, owner, seq) DO UPDATE SET chunk = excluded.chunk), \
                 head AS (INSERT INTO {t}_streams (key, owner, length, expires_at) \
                   SELECT $1, $2, greatest(go.n, $3 + cardinality($4::bytea[])), \
                     now() + $5::bigint * interval '1 millisecond' FROM go \
                   ON CONFLICT (key) DO UPDATE SET owner = excluded.owner, \
                     length = CASE WHEN {t}_streams.owner = excluded.owner \
                       AND {t}_streams.expires_at > now() \
                       THEN greatest({t}_streams.length, excluded.length) \
                       ELSE excluded.length END, \
                     expires_at = excluded.expires_at) \
                 SELECT EXISTS (SELECT 1 FROM holder), (SELECT n FROM held)"
            ),
            // One statement, one snapshot: the key's live row, and the chunks from $2 of the
            // stream of its current owner (none when that owner has no live stream), while
            // they add up to at most $3 bytes (the first one whatever its size).
            read_stream: format!(
                "SELECT r.completed, r.fingerprint, r.payload, s.length IS NOT NULL, \
                   CASE WHEN s.length IS NOT NULL THEN ARRAY( \
                     SELECT w.chunk FROM (SELECT c.chunk, c.seq, \
                         sum(octet_length(c.chunk)) OVER (ORDER BY c.seq) AS upto \
                       FROM {t}_chunks c WHERE c.key = r.key AND c.owner = s.owner \
                         AND c.seq >= $2 AND c.seq < s.length ORDER BY c.seq LIMIT 4096) w \
                     WHERE w.upto <= $3 OR w.seq = $2 ORDER BY w.seq) END \
                 FROM {t} r LEFT JOIN {t}_streams s ON s.key = r.key AND s.owner = r.owner \
                   AND NOT r.completed AND s.expires_at > now() \
                 WHERE r.key = $1 AND r.expires_at > now()"
            ),
            purge_streams: format!(
                "DELETE FROM {t}_streams WHERE key IN \
                 (SELECT key FROM {t}_streams WHERE expires_at <= now() LIMIT $1 FOR UPDATE SKIP LOCKED)"
            ),
            // Chunks of no live stream: an expired one, one replaced, or left by an append that
            // raced its claim's end.
            purge_chunks: format!(
                "DELETE FROM {t}_chunks WHERE (key, owner, seq) IN \
                 (SELECT c.key, c.owner, c.seq FROM {t}_chunks c WHERE NOT EXISTS \
                   (SELECT 1 FROM {t}_streams s WHERE s.key = c.key AND s.owner = c.owner \
                     AND s.expires_at > now()) \
                 LIMIT $1 FOR UPDATE SKIP LOCKED)"
            ),
            streams: format!("{t}_streams"),
            chunks: format!("{t}_chunks"),
            // Fenced: the owner's live claim is locked (`FOR SHARE`) for the statement, so a
            // take-over of a lapsed lease either commits first (and this finds no claim) or
            // waits for this save.
            save_point: format!(
                "WITH holder AS (SELECT key FROM {t} WHERE key = $1 AND owner = $2 \
                   AND NOT completed AND expires_at > now() FOR SHARE) \
                 INSERT INTO {t}_points (key, point, expires_at) \
                 SELECT key, $3, now() + $4::bigint * interval '1 millisecond' FROM holder \
                 ON CONFLICT (key) DO UPDATE SET point = excluded.point, expires_at = excluded.expires_at \
                 RETURNING key"
            ),
            load_point: format!(
                "SELECT p.point FROM {t} r LEFT JOIN {t}_points p \
                   ON p.key = r.key AND p.expires_at > now() \
                 WHERE r.key = $1 AND r.owner = $2 AND NOT r.completed AND r.expires_at > now()"
            ),
            purge_points: format!(
                "DELETE FROM {t}_points WHERE key IN \
                 (SELECT key FROM {t}_points WHERE expires_at <= now() LIMIT $1 FOR UPDATE SKIP LOCKED)"
            ),
            points: format!("{t}_points"),
            // A fresh key: one insert, whose `DO NOTHING` takes no lock and writes nothing when
            // the key exists (the claim then reads the row). `purge_at` (indexed, and never
            // changed by the request path) is when the purge first looks at the row: after the
            // lease and the TTL of this store's latest completion ($4), when a completion
            // with that TTL expires the row.
            insert: format!(
                "INSERT INTO {t} (key, owner, expires_at, purge_at) \
                 VALUES ($1, $2, now() + $3::bigint * interval '1 millisecond', \
                   now() + $4::bigint * interval '1 millisecond') \
                 ON CONFLICT (key) DO NOTHING"
            ),
            // Set by the first waiter, before it waits (its listener already subscribed): a
            // completion committed first leaves no live claim here and the waiter returns at
            // once; a completion committed after reads the flag and notifies. A flag already
            // set is only read. The flag need not be durable (a lost one costs the waiter its
            // polling bound), so its commit does not wait for the WAL flush.
            flag_waiter: format!(
                "WITH flagged AS (UPDATE {t} SET waiters = true \
                   WHERE key = $1 AND NOT completed AND NOT waiters AND expires_at > now() \
                   RETURNING key) \
                 SELECT set_config('synchronous_commit', 'off', true) FROM flagged \
                 UNION ALL \
                 SELECT NULL FROM {t} \
                 WHERE key = $1 AND NOT completed AND waiters AND expires_at > now()"
            ),
            // The key's row had expired (a lapsed lease, a record past its TTL): take it over.
            // Its waiter flag stays: duplicates that waited on the lapsed claim still wait.
            take_over: format!(
                "UPDATE {t} SET owner = $2, completed = false, fingerprint = NULL, payload = NULL, \
                 expires_at = now() + $3::bigint * interval '1 millisecond', \
                 purge_at = now() + $4::bigint * interval '1 millisecond' \
                 WHERE key = $1 AND expires_at <= now() RETURNING key"
            ),
            read: format!(
                "SELECT completed, fingerprint, payload, \
                 (extract(epoch FROM expires_at - now()) * 1000)::bigint \
                 FROM {t} WHERE key = $1 AND expires_at > now()"
            ),
            renew: format!(
                "UPDATE {t} SET expires_at = now() + $3::bigint * interval '1 millisecond' \
                 WHERE key = $1 AND owner = $2 AND NOT completed AND expires_at > now()"
            ),
            // Neither notifies in its own transaction: a transaction that notifies holds the
            // server's notification-queue lock through its commit (the WAL flush included), so
            // notifying completions commit one at a time. The keys are notified after the
            // commit, in batches (`Notifier`).
            // Only the keys a process waits on are notified: each statement returns the
            // key's waiter flag.
            // The completion deletes the key's recovery point (the stored outcome supersedes
            // it) in the same statement: a trigger did, at a fifth of the write throughput.
            // It changes no indexed column (`key`, `purge_at`), so PostgreSQL updates the row
            // in its page (HOT), which the table's fillfactor leaves room for.
            complete: format!(
                "WITH done AS (UPDATE {t} SET completed = true, owner = NULL, fingerprint = $3, \
                 payload = $4, expires_at = now() + $5::bigint * interval '1 millisecond' \
                 WHERE key = $1 AND owner = $2 AND NOT completed AND expires_at > now() \
                 RETURNING key, waiters), \
                 dropped AS (DELETE FROM {t}_points p USING done WHERE p.key = done.key) \
                 SELECT waiters FROM done"
            ),
            release: format!(
                "DELETE FROM {t} \
                 WHERE key = $1 AND owner = $2 AND NOT completed AND expires_at > now() \
                 RETURNING waiters"
            ),
            complete_streamed: format!(
                "WITH done AS (UPDATE {t} SET completed = true, owner = NULL, fingerprint = $3, \
                 payload = $4, expires_at = now() + $5::bigint * interval '1 millisecond' \
                 WHERE key = $1 AND owner = $2 AND NOT completed AND expires_at > now() \
                 RETURNING key, waiters), \
                 dropped AS (DELETE FROM {t}_points p USING done WHERE p.key = done.key), \
                 {ended} \
                 SELECT waiters FROM done",
                ended = ends_stream(t)
            ),
            release_streamed: format!(
                "WITH done AS (DELETE FROM {t} \
                 WHERE key = $1 AND owner = $2 AND NOT completed AND expires_at > now() \
                 RETURNING key, waiters), \
                 {ended} \
                 SELECT waiters FROM done",
                ended = ends_stream(t)
            ),
            // One transaction per batch of keys, which need not be durable (a lost wake-up
            // costs a waiter its polling bound): it does not wait for the WAL flush, so it holds
            // the queue lock for a moment only.
            notify: format!(
                "SELECT set_config('synchronous_commit', 'off', true), pg_notify('{channel}', key) \
                 FROM unnest($1::text[]) AS key"
            ),
            channel,
            // The rows due (by `purge_at`, indexed): the expired ones are deleted, the live
            // ones (a TTL longer than the claim foresaw, a renewed lease) are looked at again
            // when they expire. The purge's update is the only one that moves `purge_at`.
            purge: format!(
                "WITH due AS (SELECT key, expires_at, expires_at <= now() AS expired FROM {t} \
                   WHERE purge_at <= now() ORDER BY purge_at LIMIT $1 FOR UPDATE SKIP LOCKED), \
                 gone AS (DELETE FROM {t} r USING due WHERE r.key = due.key AND due.expired), \
                 later AS (UPDATE {t} r SET purge_at = due.expires_at FROM due \
                   WHERE r.key = due.key AND NOT due.expired) \
                 SELECT count(*) FROM due"
            ),
        })
    }
}

/// The live streams' tables: written only by claims that stream, read by duplicates that
/// follow them on other instances; earlier releases never touch them. New tables only, so
/// `migrate` creates them without locking the records' table.
fn stream_tables_sql(sql: &Sql) -> String {
    format!(
        "-- Live streams (issue 45): new tables, which earlier releases never touch.\n\
         CREATE TABLE IF NOT EXISTS {streams} (\n\
         \x20   key         text        PRIMARY KEY,\n\
         \x20   owner       bytea       NOT NULL,\n\
         \x20   length      bigint      NOT NULL,\n\
         \x20   expires_at  timestamptz NOT NULL\n\
         );\n\
         CREATE TABLE IF NOT EXISTS {chunks} (\n\
         \x20   key         text        NOT NULL,\n\
         \x20   owner       bytea       NOT NULL,\n\
         \x20   seq         bigint      NOT NULL,\n\
         \x20   chunk       bytea       NOT NULL,\n\
         \x20   PRIMARY KEY (key, owner, seq)\n\
         );",
        streams = sql.streams,
        chunks = sql.chunks,
    )
}

/// The CTEs that delete the live stream of the key a CTE `done` ended.
fn ends_stream(t: &str) -> String {
    format!(
        "stream AS (DELETE FROM {t}_streams s USING done WHERE s.key = done.key), \
         chunks AS (DELETE FROM {t}_chunks c USING done WHERE c.key = done.key)"
    )
}

/// `<table>_wake`, with `.` as `_`, at most 63 bytes (PostgreSQL's identifier limit).
fn channel_of(table: &str) -> String {
    let mut channel = format!("{}_wake", table.replace('.', "_"));
    channel.truncate(63);
    channel
}

/// The records table's fillfactor: a page's inserts stop at half of it, leaving the rest for
/// the completed rows of its claims (a 1 KB answer makes a row of about 1.2 KB), so that a
/// completion finds room in its page (a HOT update, which writes no index entry).
const FILLFACTOR: u32 = 50;

/// The names of the tables' indexes: `<table>_purge_at` (schema 4), `<table>_expires_at`
/// (schema 3, dropped), `<table>_expires_at_points`, with `.` as `_`, created in the table's
/// schema.
struct IndexNames {
    purge: String,
    /// `<table>_purge_at`, schema-qualified when the table is, for `to_regclass`.
    purge_qualified: String,
    expires_qualified: String,
    points: String,
}

impl IndexNames {
    fn of(table: &str) -> Self {
        let base = table.replace('.', "_");
        let schema = table
            .rsplit_once('.')
            .map(|(schema, _)| format!("{schema}."))
            .unwrap_or_default();
        Self {
            purge: format!("{base}_purge_at"),
            purge_qualified: format!("{schema}{base}_purge_at"),
            expires_qualified: format!("{schema}{base}_expires_at"),
            points: format!("{base}_expires_at_points"),
        }
    }
}

fn ms(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis())
        .unwrap_or(i64::MAX)
        .max(1)
}

impl PostgresStore {
    /// The table's SQL, for teams that run their own migrations. [`migrate`](Self::migrate)
    /// runs exactly this (in one transaction, with a `lock_timeout`).
    ///
    /// Schema 4 adds `purge_at` (indexed, set by the claim and moved by the purge only) and
    /// `waiters`, sets a fillfactor, and drops the index on `expires_at`: a completion then
    /// changes no indexed column and is a HOT update. The previous release's statements all
    /// run unchanged on it (see the upgrade policy in `docs/stores.md`).
    pub fn schema_sql(table: &str) -> Result<String, InvalidTableName> {
        let sql = Sql::new(table)?;
        let t = &sql.table;
        let names = IndexNames::of(t);
        Ok(format!(
            "CREATE TABLE IF NOT EXISTS {t} (\n\
             \x20   key         text        PRIMARY KEY,\n\
             \x20   owner       bytea,\n\
             \x20   completed   boolean     NOT NULL DEFAULT false,\n\
             \x20   fingerprint bytea,\n\
             \x20   payload     bytea,\n\
             \x20   expires_at  timestamptz NOT NULL,\n\
             \x20   created_at  timestamptz NOT NULL DEFAULT now(),\n\
             \x20   purge_at    timestamptz NOT NULL DEFAULT now(),\n\
             \x20   waiters     boolean     NOT NULL DEFAULT false\n\
             ) WITH (fillfactor = {FILLFACTOR});\n\
             -- Schema 4, from 3 (0.1): columns the previous release's statements leave to their\n\
             -- defaults, room in each page for a completed row, the purge's own index, and no\n\
             -- index on the column completions change (each is catalog work, or an index build\n\
             -- on a table of millions of rows: see docs/stores.md to build it concurrently first).\n\
             ALTER TABLE {t} ADD COLUMN IF NOT EXISTS purge_at timestamptz NOT NULL DEFAULT now();\n\
             ALTER TABLE {t} ADD COLUMN IF NOT EXISTS waiters boolean NOT NULL DEFAULT false;\n\
             ALTER TABLE {t} SET (fillfactor = {FILLFACTOR});\n\
             CREATE INDEX IF NOT EXISTS {purge} ON {t} (purge_at);\n\
             DROP INDEX IF EXISTS {expires};\n\
             CREATE TABLE IF NOT EXISTS {points} (\n\
             \x20   key         text        PRIMARY KEY,\n\
             \x20   point       bytea       NOT NULL,\n\
             \x20   expires_at  timestamptz NOT NULL\n\
             );\n\
             CREATE INDEX IF NOT EXISTS {points_index} ON {points} (expires_at);\n\
             {stream_tables}\n\
             -- Schema 2 (0.1 development builds) deleted points with a trigger; the completion\n\
             -- statement does it now. Dropped once, when present (a live table is locked a moment).\n\
             DO $$ BEGIN\n\
             \x20   IF EXISTS (SELECT 1 FROM pg_trigger\n\
             \x20       WHERE tgname = '{trigger}' AND tgrelid = '{t}'::regclass) THEN\n\
             \x20       DROP TRIGGER {trigger} ON {t};\n\
             \x20   END IF;\n\
             END $$;\n\
             DROP FUNCTION IF EXISTS {t}_drop_point();",
            points = sql.points,
            stream_tables = stream_tables_sql(&sql),
            purge = names.purge,
            expires = names.expires_qualified,
            points_index = names.points,
            trigger = format!("{}_drop_point", t.rsplit('.').next().unwrap_or(t)),
        ))
    }

    /// Connects a pool (16 connections) to `url` (`postgres://user:pass@host:port/db`),
    /// using the table `idempotency_records`, and checks that the server answers: a wrong URL
    /// or a server that is down fails here, at start.
    ///
    /// It also reads how the server replicates ([`check_replication`](Self::check_replication))
    /// and logs what a failover could lose: a warning when standbys exist but commits do not
    /// wait for any of them.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let store = Self::connect_lazy(url)?;
        let _connection = store.pool.get().await.map_err(StoreError::backend)?;
        match store.check_replication().await {
            Ok(replication) => replication.report(),
            Err(error) => {
                tracing::debug!(%error, "could not read the PostgreSQL replication settings")
            }
        }
        Ok(store)
    }

    /// Reads whether commits wait for a synchronous standby (`synchronous_commit`,
    /// `synchronous_standby_names`) and which standbys are connected (`pg_stat_replication`,
    /// whose rows a role without `pg_monitor` may not see).
    pub async fn check_replication(&self) -> Result<PostgresReplication, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT current_setting('synchronous_commit'), \
                        current_setting('synchronous_standby_names'), \
                        (SELECT count(*) FROM pg_stat_replication), \
                        (SELECT count(*) FROM pg_stat_replication \
                           WHERE sync_state IN ('sync', 'quorum'))",
                &[],
            )
            .await
            .map_err(StoreError::backend)?;
        Ok(PostgresReplication {
            synchronous_commit: row.get(0),
            synchronous_standby_names: row.get(1),
            standbys: u32::try_from(row.get::<_, i64>(2)).unwrap_or(u32::MAX),
            synchronous_standbys: u32::try_from(row.get::<_, i64>(3)).unwrap_or(u32::MAX),
        })
    }

    /// A pool that connects on first use: it never fails for want of a server (only for a
    /// malformed `url`), so a service can start while its database is still coming up;
    /// requests get 503 (or fail open) until the server answers, as during an outage. Run
    /// [`migrate`](Self::migrate) once it does (or migrate with your own tooling).
    pub fn connect_lazy(url: &str) -> Result<Self, StoreError> {
        let config: tokio_postgres::Config = url.parse().map_err(StoreError::backend)?;
        let listen_config = config.clone();
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(16)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(5)))
            .create_timeout(Some(Duration::from_secs(5)))
            .recycle_timeout(Some(Duration::from_secs(5)))
            .build()
            .map_err(StoreError::backend)?;
        let mut store = Self::new(pool);
        Arc::make_mut(&mut store.shared).config = Some(Arc::new(listen_config));
        Ok(store)
    }

    /// A store over an existing pool, using the table `idempotency_records`.
    ///
    /// It has no configuration to open a `LISTEN` connection with, so its waiting duplicates
    /// back off instead of being woken: prefer [`connect`](Self::connect).
    pub fn new(pool: Pool) -> Self {
        Self {
            pool,
            shared: Arc::new(Shared {
                sql: Arc::new(Sql::new("idempotency_records").expect("valid default name")),
                config: None,
                wake: Arc::default(),
                notifier: Arc::default(),
                read_first: Arc::default(),
                purge_hint: Arc::default(),
                streams: Arc::default(),
            }),
        }
    }

    /// Starts this handle's listener, once: one connection outside the pool, in `LISTEN` on
    /// the table's channel, waking local waiters; it reconnects (after a pause) whenever the
    /// connection drops.
    fn start_listener(&self) {
        let Some(config) = &self.shared.config else {
            return;
        };
        let (config, channel) = (config.clone(), self.shared.sql.channel.clone());
        self.shared
            .wake
            .start("the PostgreSQL LISTEN connection", move |listener| {
                let (config, channel) = (config.clone(), channel.clone());
                async move {
                    let Ok((client, mut connection)) = config.connect(NoTls).await else {
                        return;
                    };
                    let driver = tokio::spawn({
                        let listener = listener.clone();
                        async move {
                            while let Some(Ok(message)) =
                                std::future::poll_fn(|cx| connection.poll_message(cx)).await
                            {
                                if let tokio_postgres::AsyncMessage::Notification(note) = message {
                                    if !listener.wake(note.payload()) {
                                        return;
                                    }
                                }
                            }
                        }
                    });
                    let listen = format!("LISTEN \"{channel}\"");
                    if client.batch_execute(&listen).await.is_ok() && listener.subscribed() {
                        let _ = driver.await;
                    } else {
                        driver.abort();
                    }
                }
            });
    }

    /// Uses `table` (letters, digits, underscores; optionally `schema.table`).
    pub fn with_table(mut self, table: &str) -> Result<Self, InvalidTableName> {
        Arc::make_mut(&mut self.shared).sql = Arc::new(Sql::new(table)?);
        Ok(self)
    }

    /// Creates the tables and their indexes if they do not exist, or upgrades them (safe to
    /// run on every start, by many instances at once: it holds an advisory lock while it runs;
    /// safe while the previous release serves from the table: see `docs/stores.md`).
    ///
    /// An up-to-date schema is seen from the catalog alone (both tables and the purge's index
    /// exist, and neither the trigger of development builds nor the index on `expires_at`),
    /// so the migration of every instance that starts while others serve takes no lock on the
    /// live table (a DDL statement would, and could deadlock with a claim in progress).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let sql = Self::schema_sql(&self.shared.sql.table).expect("validated at construction");
        let client = self.client().await?;
        let t = &self.shared.sql.table;
        let trigger = format!("{}_drop_point", t.rsplit('.').next().unwrap_or(t));
        let names = IndexNames::of(t);
        // Whether the schema before live streams is current, and whether the streams' tables
        // exist: a schema missing only those gets them alone (no lock on the live table).
        let check = "SELECT to_regclass($1) IS NOT NULL AND to_regclass($2) IS NOT NULL \
                     AND NOT EXISTS (SELECT 1 FROM pg_trigger \
                                     WHERE tgname = $3 AND tgrelid = to_regclass($1)) \
                     AND to_regclass($4) IS NOT NULL AND to_regclass($5) IS NULL, \
                     to_regclass($6) IS NOT NULL AND to_regclass($7) IS NOT NULL";
        let params: [&(dyn ToSql + Sync); 7] = [
            t,
            &self.shared.sql.points,
            &trigger,
            &names.purge_qualified,
            &names.expires_qualified,
            &self.shared.sql.streams,
            &self.shared.sql.chunks,
        ];
        let current = |row: tokio_postgres::Row| (row.get::<_, bool>(0), row.get::<_, bool>(1));
        let backend = StoreError::backend;
        if current(client.query_one(check, &params).await.map_err(backend)?) == (true, true) {
            return Ok(());
        }
        // Another instance may be migrating: wait for it, then look again. A lock on the live
        // table that the schema change cannot get soon (a long transaction holds the table)
        // fails the migration rather than queueing every claim behind it.
        client
            .batch_execute(
                "BEGIN; SELECT pg_advisory_xact_lock(7346910231); SET LOCAL lock_timeout = '5s'",
            )
            .await
            .map_err(backend)?;
        let migrated = async {
            match current(client.query_one(check, &params).await?) {
                (false, _) => client.batch_execute(&sql).await?,
                (true, false) => {
                    client
                        .batch_execute(&stream_tables_sql(&self.shared.sql))
                        .await?
                }
                (true, true) => {}
            }
            client.batch_execute("COMMIT").await
        }
        .await;
        if migrated.is_err() {
            let _ = client.batch_execute("ROLLBACK").await;
        }
        migrated.map_err(backend)
    }

    /// Deletes up to `batch` expired rows (records past their TTL, lapsed claims) and up to
    /// `batch` expired recovery points; returns the larger count. Call it until it returns less
    /// than `batch`.
    ///
    /// Rows are found by `purge_at` (see [`schema_sql`](Self::schema_sql)), which a claim sets
    /// to its lease plus the TTL of this store's latest completion: a row due that is still
    /// live (a longer TTL, a renewed lease) is counted and looked at again when it expires.
    pub async fn purge_expired(&self, batch: i64) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(&self.shared.sql.purge)
            .await
            .map_err(StoreError::backend)?;
        let records = client
            .query_one(&statement, &[&batch])
            .await
            .map_err(StoreError::backend)?
            .get::<_, i64>(0)
            .unsigned_abs();
        let statement = client
            .prepare_cached(&self.shared.sql.purge_points)
            .await
            .map_err(StoreError::backend)?;
        let points = client
            .execute(&statement, &[&batch])
            .await
            .map_err(StoreError::backend)?;
        let mut streams = 0;
        for sql in [
            &self.shared.sql.purge_streams,
            &self.shared.sql.purge_chunks,
        ] {
            let statement = client
                .prepare_cached(sql)
                .await
                .map_err(StoreError::backend)?;
            let purged = client
                .execute(&statement, &[&batch])
                .await
                .map_err(StoreError::backend)?;
            streams = streams.max(purged);
        }
        Ok(records.max(points).max(streams))
    }

    /// Spawns a task that purges expired rows every `period` (opt-in); abort the handle to
    /// stop it. Failures are logged and retried at the next period.
    pub fn spawn_purger(&self, period: Duration) -> tokio::task::JoinHandle<()> {
        let store = self.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(period);
            loop {
                interval.tick().await;
                super::purge_in_batches(|batch| store.purge_expired(batch)).await;
            }
        })
    }

    /// Queues a wake-up for the waiters of `key` in every process, sent after the commit that
    /// ended the key (see [`Notifier`]).
    fn notify_later(&self, key: &str) {
        if self.shared.notifier.push(key) {
            tokio::spawn(self.clone().send_notifications());
        }
    }

    /// Sends the queued wake-ups, a batch per statement, until the queue is empty. A batch
    /// that fails is dropped (its waiters wake at their polling bound).
    async fn send_notifications(self) {
        loop {
            let keys = self.shared.notifier.take();
            if keys.is_empty() {
                if self.shared.notifier.stop() {
                    return;
                }
                continue;
            }
            let sent = async {
                let client = self.client().await?;
                let statement = client
                    .prepare_cached(&self.shared.sql.notify)
                    .await
                    .map_err(StoreError::backend)?;
                client
                    .execute(&statement, &[&keys])
                    .await
                    .map_err(StoreError::backend)
            };
            if let Err(error) = sent.await {
                tracing::debug!(%error, keys = keys.len(), "wake-up notifications not sent");
            }
        }
    }

    /// Runs a completion or a release (`sql`, which returns the key's waiter flag: the plain
    /// statement, or the one that also deletes the key's stream for a claim that appended
    /// one) for the claim's owner, and notifies the key when a process waits on it.
    async fn end(
        &self,
        (plain, streamed): (&str, &str),
        key: &str,
        token: &OwnerToken,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<(), StoreError> {
        let sql = if self.shared.streams.has(token) {
            streamed
        } else {
            plain
        };
        let ended = async {
            let client = self.client().await?;
            let row = query_opt(&client, sql, params).await?;
            Ok(row.ok_or(StoreError::LeaseLost)?.get::<_, bool>(0))
        }
        .await;
        self.shared.streams.settle(token, &ended);
        if ended? {
            self.notify_later(key);
        }
        Ok(())
    }

    /// Flags the key's live claim as waited on; `false` when no claim of the key is live.
    async fn flag_waiter(&self, key: &str) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(&self.shared.sql.flag_waiter)
            .await
            .map_err(StoreError::backend)?;
        let rows = client
            .query(&statement, &[&key])
            .await
            .map_err(StoreError::backend)?;
        Ok(!rows.is_empty())
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(StoreError::backend)
    }

    async fn owner_checked(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<(), StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(sql)
            .await
            .map_err(StoreError::backend)?;
        match client
            .execute(&statement, params)
            .await
            .map_err(StoreError::backend)?
        {
            1 => Ok(()),
            _ => Err(StoreError::LeaseLost),
        }
    }
}

/// Runs `sql` (prepared once per connection) and returns its row, if any.
async fn query_opt(
    client: &deadpool_postgres::Object,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Option<tokio_postgres::Row>, StoreError> {
    let statement = client
        .prepare_cached(sql)
        .await
        .map_err(StoreError::backend)?;
    client
        .query_opt(&statement, params)
        .await
        .map_err(StoreError::backend)
}

/// The outcome of a claim that found the key's live row, whose columns `completed`,
/// `fingerprint`, `payload` and the milliseconds left start at column `first`.
fn existing(row: &tokio_postgres::Row, first: usize) -> Result<ClaimOutcome, StoreError> {
    if row.get::<_, Option<bool>>(first) == Some(true) {
        return Ok(ClaimOutcome::Completed(record_from_columns(
            row.get(first + 1),
            row.get(first + 2),
        )?));
    }
    super::sealed::check_in_flight(&row.get(first + 1), &row.get(first + 2))?;
    let remaining: Option<i64> = row.get(first + 3);
    Ok(ClaimOutcome::InFlight {
        lease_remaining: remaining
            .and_then(|ms| u64::try_from(ms).ok())
            .map(Duration::from_millis),
    })
}

fn token_bytes(token: &OwnerToken) -> [u8; 16] {
    token.as_u128().to_be_bytes()
}

impl Store for PostgresStore {
    async fn claim_as(
        &self,
        key: &str,
        token: &OwnerToken,
        lease: Duration,
    ) -> Result<ClaimOutcome, StoreError> {
        let client = self.client().await?;
        // While most claims find their key (see `ReadFirst`), a retry of a key that exists (a
        // replay, a duplicate in flight) costs one plain read, which a session that refuses
        // writes (a standby, a primary being demoted) also answers.
        if self.shared.read_first.enabled() {
            if let Some(row) = query_opt(&client, &self.shared.sql.read, &[&key]).await? {
                self.shared.read_first.record(true);
                return existing(&row, 0);
            }
        }
        let insert = client
            .prepare_cached(&self.shared.sql.insert)
            .await
            .map_err(StoreError::backend)?;
        let token = *token;
        let owner = &token_bytes(&token)[..];
        let lease = ms(lease);
        let purge_after = lease.saturating_add(self.shared.purge_hint.load(Relaxed));
        let params: [&(dyn ToSql + Sync); 4] = [&key, &owner, &lease, &purge_after];
        // Each statement is atomic; the loop only goes round again after a concurrent change
        // (the row vanished between the insert and the read, or between two take-overs).
        for _ in 0..8 {
            if client
                .execute(&insert, &params)
                .await
                .map_err(StoreError::backend)?
                == 1
            {
                self.shared.read_first.record(false);
                return Ok(ClaimOutcome::Claimed(token));
            }
            // The key exists: its live row, or (expired) take it over unless someone else did.
            if let Some(row) = query_opt(&client, &self.shared.sql.read, &[&key]).await? {
                self.shared.read_first.record(true);
                return existing(&row, 0);
            }
            if query_opt(&client, &self.shared.sql.take_over, &params)
                .await?
                .is_some()
            {
                return Ok(ClaimOutcome::Claimed(token));
            }
        }
        Err(StoreError::backend("key kept changing while claiming it"))
    }

    async fn inspect(&self, key: &str) -> Result<KeyState, StoreError> {
        let client = self.client().await?;
        let Some(row) = query_opt(&client, &self.shared.sql.read, &[&key]).await? else {
            return Ok(KeyState::Absent);
        };
        let remaining: Option<i64> = row.get(3);
        let remaining = remaining
            .and_then(|ms| u64::try_from(ms).ok())
            .map(Duration::from_millis);
        let completed: bool = row.get(0);
        Ok(if completed {
            KeyState::Completed {
                record: record_from_columns(row.get(1), row.get(2))?,
                expires_in: remaining,
            }
        } else {
            super::sealed::check_in_flight(&row.get(1), &row.get(2))?;
            KeyState::InFlight {
                lease_remaining: remaining,
            }
        })
    }

    async fn save_point(
        &self,
        key: &str,
        token: &OwnerToken,
        point: &RecoveryPoint,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let owner = &token_bytes(token)[..];
        let encoded = point.encode();
        self.owner_checked(
            &self.shared.sql.save_point,
            &[&key, &owner, &&encoded[..], &ms(ttl)],
        )
        .await
    }

    async fn load_point(
        &self,
        key: &str,
        token: &OwnerToken,
    ) -> Result<Option<RecoveryPoint>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(&self.shared.sql.load_point)
            .await
            .map_err(StoreError::backend)?;
        let owner = &token_bytes(token)[..];
        let row = client
            .query_opt(&statement, &[&key, &owner])
            .await
            .map_err(StoreError::backend)?
            .ok_or(StoreError::LeaseLost)?;
        row.get::<_, Option<Vec<u8>>>(0)
            .map(|point| RecoveryPoint::decode(point.into()))
            .transpose()
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let deleted = client
            .execute(&self.shared.sql.delete, &[&key])
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
        let owner = &token_bytes(token)[..];
        self.owner_checked(&self.shared.sql.renew, &[&key, &owner, &ms(lease)])
            .await
    }

    async fn complete(
        &self,
        key: &str,
        token: &OwnerToken,
        record: Record,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let owner = &token_bytes(token)[..];
        let fingerprint = record.fingerprint().map(|f| f.to_be_bytes().to_vec());
        let payload = &super::sealed::row_payload(&record)[..];
        let ttl = ms(ttl);
        self.shared.purge_hint.store(ttl, Relaxed);
        let sql = &self.shared.sql;
        self.end(
            (&sql.complete, &sql.complete_streamed),
            key,
            token,
            &[&key, &owner, &fingerprint, &payload, &ttl],
        )
        .await
    }

    async fn release(&self, key: &str, token: &OwnerToken) -> Result<(), StoreError> {
        let owner = &token_bytes(token)[..];
        let sql = &self.shared.sql;
        self.end(
            (&sql.release, &sql.release_streamed),
            key,
            token,
            &[&key, &owner],
        )
        .await
    }

    async fn append_stream(
        &self,
        key: &str,
        token: &OwnerToken,
        from: u64,
        chunks: &[Bytes],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let owner = &token_bytes(token)[..];
        let at = i64::try_from(from).map_err(StoreError::backend)?;
        let chunks: Vec<&[u8]> = chunks.iter().map(|chunk| &chunk[..]).collect();
        let client = self.client().await?;
        let row = query_opt(
            &client,
            &self.shared.sql.append_stream,
            &[&key, &owner, &at, &chunks, &ms(ttl)],
        )
        .await?
        .ok_or_else(|| StoreError::backend("the stream append answered no row"))?;
        if !row.get::<_, bool>(0) {
            return Err(StoreError::LeaseLost);
        }
        let held: i64 = row.get(1);
        if at > held {
            return Err(StoreError::backend(super::StreamGap {
                from,
                held: held.unsigned_abs(),
            }));
        }
        self.shared.streams.add(token);
        Ok(())
    }

    async fn read_stream(&self, key: &str, from: u64) -> Result<StreamRead, StoreError> {
        let at = i64::try_from(from).map_err(StoreError::backend)?;
        let cap = STREAM_READ_BYTES as i64;
        let client = self.client().await?;
        let Some(row) =
            query_opt(&client, &self.shared.sql.read_stream, &[&key, &at, &cap]).await?
        else {
            return Ok(StreamRead::Absent);
        };
        if row.get::<_, bool>(0) {
            return Ok(StreamRead::Completed(record_from_columns(
                row.get(1),
                row.get(2),
            )?));
        }
        super::sealed::check_in_flight(&row.get(1), &row.get(2))?;
        if !row.get::<_, bool>(3) {
            return Ok(StreamRead::NotLive);
        }
        let chunks: Vec<Vec<u8>> = row.get(4);
        Ok(StreamRead::Live(
            chunks.into_iter().map(Bytes::from).collect(),
        ))
    }

    async fn wait(&self, key: &str, attempt: u32) {
        self.start_listener();
        let wakers = &self.shared.wake.wakers;
        if !wakers.is_listening() {
            return wakers.wait(key, attempt).await;
        }
        // Subscribed before the flag: a completion that reads the flag notifies after it.
        let woken = wakers.register(key);
        match self.flag_waiter(key).await {
            Ok(true) => Wakers::wait_on(woken, waker::listening_bound()).await,
            // The claim ended (or lapsed) already: claim again at once.
            Ok(false) => {}
            Err(error) => {
                tracing::debug!(%error, "could not flag a waiter; polling");
                drop(woken);
                tokio::time::sleep(super::backoff_with_jitter(attempt, super::POLL)).await;
            }
        }
    }
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("table", &self.shared.sql.table)
            .field("pool", &self.pool.status())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_validated() {
        for good in ["idempotency_records", "app.idem", "_t1"] {
            assert!(Sql::new(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "1abc",
            "a;drop table x",
            "a.b.c",
            "a-b",
            "\"quoted\"",
            &"x".repeat(64),
        ] {
            assert!(Sql::new(bad).is_err(), "{bad}");
        }
    }

    /// Replays `pattern` (`true`: the claim found its key) many times over a fresh policy;
    /// whether claims then read first.
    fn reads_first_after(pattern: &[bool]) -> bool {
        let policy = ReadFirst::default();
        for found in pattern.iter().cycle().take(pattern.len() * 100) {
            policy.record(*found);
        }
        policy.enabled()
    }

    #[test]
    fn claims_read_first_only_while_nearly_every_key_is_found() {
        assert!(
            !ReadFirst::default().enabled(),
            "a new store claims in one statement"
        );
        assert!(reads_first_after(&[true]), "a herd of retries");
        assert!(reads_first_after(
            &[true; 9]
                .iter()
                .chain(&[false])
                .copied()
                .collect::<Vec<_>>()
        ));
        assert!(!reads_first_after(&[false]), "fresh keys");
        assert!(
            !reads_first_after(&[true, false]),
            "half replays: the read would not pay"
        );
        assert!(
            reads_first_after(&[true, true, true, false]),
            "three replays in four: inserting first would cost each replay a round trip"
        );
        assert!(!reads_first_after(&[true, false, false]));
        // It switches after MAX / 2 found keys, and back after a few fresh ones.
        let policy = ReadFirst::default();
        (0..ReadFirst::MAX / 2).for_each(|_| policy.record(true));
        assert!(policy.enabled());
        policy.record(false);
        assert!(!policy.enabled());
    }
}
