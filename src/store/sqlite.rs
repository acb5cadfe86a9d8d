//! [`SqliteStore`]: claims and records in an embedded SQLite file, so that a single-node
//! service keeps its keys across restarts (feature `sqlite`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Weak};
use std::time::{Duration, Instant};

use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension};

use bytes::Bytes;

use super::known::KnownTokens;
use super::waker::Wakers;
use super::{
    backoff_with_jitter, record_from_columns, ClaimOutcome, KeyState, OwnerToken, Record,
    RecoveryPoint, Store, StoreError, StreamGap, StreamRead, STREAM_READ_BYTES,
};

/// The schema version this build writes and reads (`PRAGMA user_version`).
const SCHEMA_VERSION: i64 = 1;

/// Milliseconds since the Unix epoch, on the host's clock, as SQLite reads it: every process
/// on the host shares it (one statement sees one `now`). A macro, so that every statement is
/// one `&'static str` (`concat!`): the statement cache is then looked up without building the
/// SQL on each call.
macro_rules! now {
    () => {
        "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)"
    };
}
const NOW: &str = now!();

/// How durable a write is when its call returns (SQLite's `PRAGMA synchronous`, in WAL mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Synchronous {
    /// `NORMAL` \[default\]: a write survives a crash of the process (`kill -9`, a panic, the
    /// OOM killer); a power loss or an operating-system crash may lose the writes of the last
    /// moments (the WAL is synced at checkpoints, not at each commit). The cost: none beyond
    /// the write itself.
    #[default]
    Normal,
    /// `FULL`: every commit is synced to disk (an `fsync` of the WAL) before the call returns,
    /// so a write also survives a power loss. The cost: one `fsync` per claim and per
    /// completion, which on most disks is the largest part of a fresh request (see
    /// `BENCHMARKS.md`).
    Full,
}

impl Synchronous {
    fn pragma(self) -> &'static str {
        match self {
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
        }
    }
}

/// Why a SQLite database could not be opened: one readable sentence each.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SqliteOpenError {
    /// The file could not be opened or created (a missing directory, no permission).
    #[error("cannot open the SQLite database {path} (does its directory exist, and may this process write there?)")]
    CannotOpen {
        /// The path given.
        path: PathBuf,
        /// What SQLite said.
        source: rusqlite::Error,
    },
    /// The file exists but is not a SQLite database.
    #[error("{path} is not a SQLite database (point the store at a new file or an existing idempotency database)")]
    NotADatabase {
        /// The path given.
        path: PathBuf,
    },
    /// The file or its directory is read-only (the store writes a WAL beside the file).
    #[error("the SQLite database {path} is read-only: the store needs to write the file and its -wal and -shm files beside it")]
    ReadOnly {
        /// The path given.
        path: PathBuf,
    },
    /// The disk is full.
    #[error("the disk holding the SQLite database {path} is full")]
    DiskFull {
        /// The path given.
        path: PathBuf,
    },
    /// The database was created by a newer version of this crate, whose schema this build
    /// does not know.
    #[error("the SQLite database {path} has schema version {found}, newer than this build of tower-idempotency reads ({SCHEMA_VERSION}): upgrade it, or use another file")]
    NewerSchema {
        /// The path given.
        path: PathBuf,
        /// The schema version found (`PRAGMA user_version`).
        found: i64,
    },
    /// Anything else SQLite refused while setting up.
    #[error("cannot set up the SQLite database {path}")]
    Other {
        /// The path given.
        path: PathBuf,
        /// What SQLite said.
        source: rusqlite::Error,
    },
}

impl SqliteOpenError {
    fn from_sqlite(path: &Path, source: rusqlite::Error) -> Self {
        let path = path.to_owned();
        match source.sqlite_error_code() {
            Some(ErrorCode::NotADatabase) => Self::NotADatabase { path },
            Some(ErrorCode::ReadOnly) => Self::ReadOnly { path },
            Some(ErrorCode::DiskFull) => Self::DiskFull { path },
            Some(ErrorCode::CannotOpen | ErrorCode::PermissionDenied) => {
                Self::CannotOpen { path, source }
            }
            _ => Self::Other { path, source },
        }
    }
}

/// A store in an embedded SQLite database file, for a service that runs on one host: its
/// claims and records survive a restart of the process (a deploy, a crash, `kill -9`), and
/// several processes on the host (a pre-fork server, two instances) share one file as one
/// store. See the [module docs](super) for the protocol.
///
/// * **Client:** `rusqlite` with SQLite bundled (no system library needed). Each handle owns
///   one connection, on a thread of its own: calls are sent to it and awaited, so the async
///   runtime never blocks on the disk (measured against `spawn_blocking` per call in
///   `BENCHMARKS.md`).
/// * **Durability:** WAL mode; [`Synchronous::Normal`] by default (survives a crash of the
///   process), [`Synchronous::Full`] to survive a power loss too.
/// * **Atomicity:** a claim that finds nothing live is one `INSERT … ON CONFLICT DO UPDATE …
///   WHERE expires_at <= now RETURNING` statement, which runs under SQLite's write lock (held
///   across processes), so exactly one claim wins across every process on the file; other
///   processes wait up to the busy timeout \[5 s\] for that lock.
///   Renew, complete and release are `UPDATE`/`DELETE … WHERE owner = token AND expires_at >
///   now`: a holder whose lease lapsed is refused ([`StoreError::LeaseLost`]).
/// * **Clocks:** leases and retention are compared with SQLite's `now` (the host's clock,
///   shared by every process on it).
/// * **Live streams** ([`Store::append_stream`]) are rows of `idempotency_streams` and
///   `idempotency_chunks`, one transaction per append and per read, so a duplicate in another
///   process on the host follows a streamed answer; only the completion and release of a claim
///   that appended one delete them.
/// * **Replays** of completed records are served from a bounded in-process cache \[16 MiB of
///   records, each kept at most 60 s\] without touching the file: completed records never
///   change. A record deleted by an operator through *another* process is still replayed here
///   until its cache entry ages out (at most 60 s); [`delete`](Store::delete) through this
///   handle takes effect at once.
/// * **Expired rows** are ignored on read and overwritten by the next claim; a background task
///   deletes them every 60 s (see [`SqliteStoreBuilder::purge_every`]).
/// * **Waiting duplicates** are woken at once when the claim ends through the same handle (or
///   its clones); a claim ended by another process is seen by backing off with jitter (10 to
///   500 ms).
/// * **Errors:** a path that cannot be opened, a read-only file, a full disk, a file that is not
///   a database and a database of a newer schema each fail [`open`](Self::open) with a
///   [`SqliteOpenError`] that says which; at request time a failing disk is a
///   [`StoreError::Backend`] (503, the handler not run), and a full one says so: the write is
///   refused whole and what was stored stays readable (`docs/stores.md`, "When the disk is
///   full").
/// * **The file itself:** a database file deleted or replaced while the store runs is noticed
///   (see `docs/stores.md`, "When the SQLite file is deleted or replaced"): every call then
///   fails closed until the process restarts.
///
/// ```no_run
/// use tower_idempotency::{store::SqliteStore, IdempotencyLayer};
///
/// # async fn f() -> Result<(), tower_idempotency::store::StoreError> {
/// let store = SqliteStore::open("/var/lib/my-service/idempotency.db").await?;
/// let layer = IdempotencyLayer::with_store(store);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    /// Which file the connection opened, to notice when the path names another (`None` where
    /// it cannot be told: not Unix, or a path that names no file).
    file: Option<FileWatch>,
    /// Jobs for the connection's thread; the thread ends when the last handle is dropped.
    jobs: mpsc::Sender<Job>,
    /// Completed records, by key, with the instant their cache entry stops being valid.
    records: moka::sync::Cache<String, Cached, ahash::RandomState>,
    cache_for: Duration,
    wakers: Wakers,
    /// The claims that appended a live stream through this handle (and its clones): only
    /// their completions and releases delete a stream.
    streams: KnownTokens,
}

/// The identity (device and inode) of the database file as opened, and whether the path was
/// last seen naming it.
///
/// A file deleted or replaced under a running store (a cleanup job, a restore, an operator's
/// `rm`) leaves the connection writing to an unlinked file, while another process that opens
/// the path creates a new database and runs every key again. So the store compares the path's
/// identity with the opened file's: in its purge loop, and before a claim that reads the file
/// when it has not looked for [`LOOK_EVERY`] (one `stat` a second at most, never one per
/// request). Once the path names another file or none, every call fails (503: the handler is
/// not run), until the process restarts on the file it should use.
struct FileWatch {
    /// The path made absolute at open (symbolic links kept, as another process would follow
    /// them), so that a process that changes its working directory still looks at the same
    /// path.
    path: PathBuf,
    identity: (u64, u64),
    since: Instant,
    /// When it last looked, in milliseconds since `since`.
    looked_at: std::sync::atomic::AtomicU64,
    lost: std::sync::atomic::AtomicBool,
}

/// How long a store goes without looking at its file before a claim looks again.
const LOOK_EVERY: Duration = Duration::from_secs(1);

#[cfg(unix)]
fn identity(metadata: &std::fs::Metadata) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    Some((metadata.dev(), metadata.ino()))
}

#[cfg(not(unix))]
fn identity(_: &std::fs::Metadata) -> Option<(u64, u64)> {
    None
}

/// The path no longer names the file the store opened.
#[derive(Debug, thiserror::Error)]
#[error("the SQLite database {path} is no longer the file this store opened ({what} while the store ran): the store refuses every call until the process is restarted, since another process may be serving a new database at that path")]
struct FileLost {
    path: PathBuf,
    what: &'static str,
}

#[derive(Clone)]
struct Cached {
    record: Record,
    valid_until: Instant,
}

/// Work for the connection's thread: it runs its statements and hands back how to answer its
/// caller, which the thread calls once the work is committed (or with the commit's error).
type Job = Box<dyn FnOnce(&mut Connection) -> Answer + Send>;
type Answer = Box<dyn FnOnce(Option<&rusqlite::Error>) + Send>;

/// The most jobs one group commit takes.
const MAX_GROUP: usize = 64;

/// Runs jobs as they come. Jobs that queued up while the last ran are run together in one
/// transaction (a group commit: one commit, and with `Synchronous::Full` one fsync, for all of
/// them); their callers are answered only once it is committed. Each job's statements are
/// atomic on their own, so grouping changes durability's cost, not what any job sees.
fn serve(connection: &mut Connection, queue: &mpsc::Receiver<Job>) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    while let Ok(job) = queue.recv() {
        group.push(job);
        while group.len() < MAX_GROUP {
            match queue.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        let mut open = group.len() > 1 && connection.execute_batch("BEGIN IMMEDIATE").is_ok();
        // Jobs before this index were in a transaction that SQLite rolled back by itself (a
        // full disk, an I/O error): what they wrote is gone. Jobs after it ran on their own.
        let mut lost_before = 0;
        let mut answers: Vec<Answer> = Vec::with_capacity(group.len());
        for job in group.drain(..) {
            answers.push(job(connection));
            if open && connection.is_autocommit() {
                open = false;
                lost_before = answers.len();
            }
        }
        let commit_failed = if open {
            let failed = connection.execute_batch("COMMIT").err();
            if failed.is_some() {
                let _ = connection.execute_batch("ROLLBACK");
                lost_before = answers.len();
            }
            failed
        } else {
            None
        };
        let rolled_back = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ABORT),
            Some("the group's transaction was rolled back".into()),
        );
        let lost = commit_failed.as_ref().unwrap_or(&rolled_back);
        for (index, answer) in answers.into_iter().enumerate() {
            answer((index < lost_before).then_some(lost));
        }
    }
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

/// Settings of a [`SqliteStore`]; see each method for its default.
#[derive(Debug, Clone)]
pub struct SqliteStoreBuilder {
    path: PathBuf,
    synchronous: Synchronous,
    busy_timeout: Duration,
    cache_bytes: u64,
    cache_for: Duration,
    purge_every: Option<Duration>,
}

impl SqliteStoreBuilder {
    /// How durable a write is \[[`Synchronous::Normal`]\].
    pub fn synchronous(mut self, synchronous: Synchronous) -> Self {
        self.synchronous = synchronous;
        self
    }

    /// How long a call waits for another process's write lock before it fails \[5 s\].
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// The in-process cache of completed records that serves replays, in bytes of payload
    /// \[16 MiB\]; 0 turns it off (every replay reads the file).
    pub fn replay_cache_bytes(mut self, bytes: u64) -> Self {
        self.cache_bytes = bytes;
        self
    }

    /// How often expired rows are deleted, in the background \[every 60 s\]; `None` never
    /// (then call [`SqliteStore::purge_expired`] yourself).
    pub fn purge_every(mut self, period: Option<Duration>) -> Self {
        self.purge_every = period;
        self
    }

    /// Opens (or creates) the database, sets it up (WAL mode, the table, its schema version)
    /// and starts its thread. Fails with a [`SqliteOpenError`] (inside
    /// [`StoreError::Backend`]) that says what is wrong with the path or the file.
    pub async fn open(self) -> Result<SqliteStore, StoreError> {
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (jobs, queue) = mpsc::channel::<Job>();
        let settings = self.clone();
        std::thread::Builder::new()
            .name("tower-idempotency-sqlite".into())
            .spawn(move || {
                let mut connection = match connect(&settings) {
                    Ok(connection) => {
                        let _ = ready_tx.send(Ok(()));
                        connection
                    }
                    Err(error) => {
                        let _ = ready_tx.send(Err(error));
                        return;
                    }
                };
                serve(&mut connection, &queue);
            })
            .map_err(StoreError::backend)?;
        ready_rx
            .await
            .map_err(|_| StoreError::backend("the SQLite thread stopped while opening"))?
            .map_err(StoreError::backend)?;
        let records = moka::sync::Cache::builder()
            .max_capacity(self.cache_bytes)
            .weigher(|key: &String, cached: &Cached| {
                u32::try_from(key.len() + cached.record.payload().len() + 64).unwrap_or(u32::MAX)
            })
            // SipHash was a tenth of a replay in the memory store: the same fast keyed hash.
            .build_with_hasher(ahash::RandomState::new());
        // The file exists now (the connection created it if it did not): its identity is the
        // opened file's.
        let file = std::path::absolute(&self.path)
            .ok()
            .and_then(|path| Some((identity(&std::fs::metadata(&path).ok()?)?, path)))
            .map(|(identity, path)| FileWatch {
                path,
                identity,
                since: Instant::now(),
                looked_at: Default::default(),
                lost: Default::default(),
            });
        let store = SqliteStore {
            inner: Arc::new(Inner {
                path: self.path,
                file,
                jobs,
                records,
                cache_for: self.cache_for,
                wakers: Wakers::default(),
                streams: KnownTokens::default(),
            }),
        };
        if let Some(period) = self.purge_every {
            spawn_purger(Arc::downgrade(&store.inner), period);
        }
        Ok(store)
    }
}

/// Opens the connection and sets the database up.
fn connect(settings: &SqliteStoreBuilder) -> Result<Connection, SqliteOpenError> {
    let path = &settings.path;
    let error = |source| SqliteOpenError::from_sqlite(path, source);
    let connection = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(error)?;
    connection
        .busy_timeout(settings.busy_timeout)
        .map_err(error)?;
    // The first statement reads the file's header: a file that is not a database fails here.
    let found: i64 = connection
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(error)?;
    if found > SCHEMA_VERSION {
        return Err(SqliteOpenError::NewerSchema {
            path: path.clone(),
            found,
        });
    }
    let mode: String = connection
        .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
        .map_err(error)?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(path = %path.display(), mode, "SQLite refused WAL mode (a network file system?); the store works, with less concurrency");
    }
    connection
        .pragma_update(None, "synchronous", settings.synchronous.pragma())
        .map_err(error)?;
    // Many processes may open a new file at once: the write lock orders them.
    connection
        .execute_batch(&format!(
            "BEGIN IMMEDIATE;
             CREATE TABLE IF NOT EXISTS idempotency_records (
                 key         TEXT    PRIMARY KEY NOT NULL,
                 owner       BLOB,
                 completed   INTEGER NOT NULL DEFAULT 0,
                 fingerprint BLOB,
                 payload     BLOB,
                 expires_at  INTEGER NOT NULL
             );
             CREATE INDEX IF NOT EXISTS idempotency_records_expires_at
                 ON idempotency_records (expires_at);
             CREATE TABLE IF NOT EXISTS idempotency_points (
                 key         TEXT    PRIMARY KEY NOT NULL,
                 point       BLOB    NOT NULL,
                 expires_at  INTEGER NOT NULL
             );
             CREATE INDEX IF NOT EXISTS idempotency_points_expires_at
                 ON idempotency_points (expires_at);
             -- Completing a key deletes its recovery point (the stored outcome supersedes it).
             -- Live streams: a row per streaming claim (its owner, length and expiry) and a row
             -- per chunk. Earlier builds (same schema version) never touch them.
             CREATE TABLE IF NOT EXISTS idempotency_streams (
                 key         TEXT    PRIMARY KEY NOT NULL,
                 owner       BLOB    NOT NULL,
                 length      INTEGER NOT NULL,
                 expires_at  INTEGER NOT NULL
             );
             CREATE TABLE IF NOT EXISTS idempotency_chunks (
                 key         TEXT    NOT NULL,
                 owner       BLOB    NOT NULL,
                 seq         INTEGER NOT NULL,
                 chunk       BLOB    NOT NULL,
                 PRIMARY KEY (key, owner, seq)
             );
             CREATE TRIGGER IF NOT EXISTS idempotency_points_drop
                 AFTER UPDATE OF completed ON idempotency_records
                 WHEN NEW.completed = 1 AND OLD.completed = 0
                 BEGIN DELETE FROM idempotency_points WHERE key = NEW.key; END;
             PRAGMA user_version = {SCHEMA_VERSION};
             COMMIT;"
        ))
        .map_err(error)?;
    Ok(connection)
}

/// Runs `work` as one transaction: its own (`BEGIN IMMEDIATE` when it writes, so that it
/// never has to upgrade a read lock; `BEGIN` when it only reads, for one snapshot), or a
/// savepoint inside the group's transaction it runs in. An error undoes all of it.
fn atomically<T>(
    connection: &mut Connection,
    writes: bool,
    work: impl FnOnce(&Connection) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    let (begin, commit, rollback) = if connection.is_autocommit() {
        let begin = if writes { "BEGIN IMMEDIATE" } else { "BEGIN" };
        (begin, "COMMIT", "ROLLBACK")
    } else {
        (
            "SAVEPOINT stream",
            "RELEASE stream",
            "ROLLBACK TO stream; RELEASE stream",
        )
    };
    connection.execute_batch(begin)?;
    match work(connection) {
        Ok(value) => match connection.execute_batch(commit) {
            Ok(()) => Ok(value),
            Err(error) => {
                let _ = connection.execute_batch(rollback);
                Err(error)
            }
        },
        Err(error) => {
            let _ = connection.execute_batch(rollback);
            Err(error)
        }
    }
}

/// Deletes `key`'s live stream, whoever streamed it.
fn drop_stream(connection: &Connection, key: &str) -> rusqlite::Result<()> {
    connection
        .prepare_cached("DELETE FROM idempotency_chunks WHERE key = ?1")?
        .execute([key])?;
    connection
        .prepare_cached("DELETE FROM idempotency_streams WHERE key = ?1")?
        .execute([key])?;
    Ok(())
}

/// What an append found.
enum Appended {
    Done,
    LeaseLost,
    Gap(i64),
}

/// What a stream read found.
enum Streamed {
    Absent,
    Row(Row, Option<Vec<Vec<u8>>>),
}

/// Deletes expired rows every `period` while the store lives.
fn spawn_purger(inner: Weak<Inner>, period: Duration) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        let mut interval = tokio::time::interval(period);
        interval.tick().await;
        loop {
            interval.tick().await;
            let Some(inner) = inner.upgrade() else { return };
            let store = SqliteStore { inner };
            if store.look_at_file(true).is_err() {
                continue;
            }
            super::purge_in_batches(|batch| store.purge_expired(batch)).await;
        }
    });
}

fn backend(error: rusqlite::Error) -> StoreError {
    use rusqlite::Error::{FromSqlConversionFailure, IntegralValueOutOfRange, InvalidColumnType};
    match error {
        // A column of another type than the store writes (SQLite keeps any type in any
        // column): the row was changed outside the store. It is damage, not an outage, so
        // that no store-error policy runs the key again.
        InvalidColumnType(..) | FromSqlConversionFailure(..) | IntegralValueOutOfRange(..) => {
            StoreError::Corrupt(Box::new(error))
        }
        _ if error.sqlite_error_code() == Some(ErrorCode::DiskFull) => {
            StoreError::backend(DiskFull(error))
        }
        _ => StoreError::backend(error),
    }
}

/// A write refused for want of space: nothing of it was kept, and what was stored before is
/// intact (SQLite rolls the transaction back).
#[derive(Debug, thiserror::Error)]
#[error("the disk holding the SQLite database is full: the write was refused and nothing of it kept (stored records stay readable); free space to resume")]
struct DiskFull(#[source] rusqlite::Error);

fn ms(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis())
        .unwrap_or(i64::MAX / 4)
        .max(1)
}

fn token_bytes(token: &OwnerToken) -> [u8; 16] {
    token.as_u128().to_be_bytes()
}

/// A live row: `(completed, fingerprint, payload, milliseconds left)`.
type Row = (bool, Option<Vec<u8>>, Option<Vec<u8>>, i64);

fn read_live(connection: &Connection, key: &str) -> rusqlite::Result<Option<Row>> {
    connection
        .prepare_cached(concat!(
            "SELECT completed, fingerprint, payload, expires_at - ",
            now!(),
            " \
             FROM idempotency_records WHERE key = ?1 AND expires_at > ",
            now!()
        ))?
        .query_row([key], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
        })
        .optional()
}

fn remaining(ms: i64) -> Option<Duration> {
    u64::try_from(ms).ok().map(Duration::from_millis)
}

/// What a claim found in the file.
enum Found {
    Claimed,
    /// Eight rounds saw the key change under them.
    KeptChanging,
    InFlight(i64),
    /// A row in flight that holds a completion's columns (see `sealed::check_in_flight`).
    Damaged(StoreError),
    Completed(Option<Vec<u8>>, Option<Vec<u8>>, i64),
}

impl SqliteStore {
    /// Opens (or creates) the database at `path` with every default; see
    /// [`builder`](Self::builder).
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::builder(path).open().await
    }

    /// Settings for the database at `path`.
    pub fn builder(path: impl AsRef<Path>) -> SqliteStoreBuilder {
        SqliteStoreBuilder {
            path: path.as_ref().to_owned(),
            synchronous: Synchronous::default(),
            busy_timeout: Duration::from_secs(5),
            cache_bytes: 16 * 1024 * 1024,
            cache_for: Duration::from_secs(60),
            purge_every: Some(Duration::from_secs(60)),
        }
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Deletes up to `batch` expired rows (records past their TTL, lapsed claims) and up to
    /// `batch` expired recovery points; returns the larger count. Call it until it returns less
    /// than `batch`.
    pub async fn purge_expired(&self, batch: i64) -> Result<u64, StoreError> {
        self.call(move |connection| {
            let mut purged = 0;
            for table in ["idempotency_records", "idempotency_points"] {
                let n = connection
                    .prepare_cached(&format!(
                        "DELETE FROM {table} WHERE rowid IN \
                         (SELECT rowid FROM {table} WHERE expires_at <= {NOW} LIMIT ?1)"
                    ))?
                    .execute([batch])?;
                purged = purged.max(n as u64);
            }
            // Streams past their expiry, and chunks of no live stream (expired, replaced).
            let n = connection
                .prepare_cached(concat!(
                    "DELETE FROM idempotency_streams WHERE rowid IN \
                     (SELECT rowid FROM idempotency_streams WHERE expires_at <= ",
                    now!(),
                    " LIMIT ?1)"
                ))?
                .execute([batch])?;
            purged = purged.max(n as u64);
            let n = connection
                .prepare_cached(concat!(
                    "DELETE FROM idempotency_chunks WHERE rowid IN \
                     (SELECT c.rowid FROM idempotency_chunks c WHERE NOT EXISTS \
                       (SELECT 1 FROM idempotency_streams s \
                        WHERE s.key = c.key AND s.owner = c.owner AND s.expires_at > ",
                    now!(),
                    ") LIMIT ?1)"
                ))?
                .execute([batch])?;
            purged = purged.max(n as u64);
            Ok(purged)
        })
        .await
    }

    /// Fails once the path was seen naming another file than the store's, or none (see
    /// [`FileWatch`]).
    fn file_lost(&self) -> Result<(), StoreError> {
        match &self.inner.file {
            Some(file) if file.lost.load(std::sync::atomic::Ordering::Relaxed) => {
                Err(self.lost("deleted or replaced"))
            }
            _ => Ok(()),
        }
    }

    fn lost(&self, what: &'static str) -> StoreError {
        StoreError::backend(FileLost {
            path: self.inner.path.clone(),
            what,
        })
    }

    /// Looks whether the path still names the store's file: always when `now`, else only
    /// when it has not looked for [`LOOK_EVERY`].
    fn look_at_file(&self, now: bool) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering::Relaxed;
        self.file_lost()?;
        let Some(file) = &self.inner.file else {
            return Ok(());
        };
        let at = u64::try_from(file.since.elapsed().as_millis()).unwrap_or(u64::MAX);
        let last = file.looked_at.load(Relaxed);
        if !now && at.saturating_sub(last) < LOOK_EVERY.as_millis() as u64 {
            return Ok(());
        }
        file.looked_at.store(at, Relaxed);
        let what = match std::fs::metadata(&file.path) {
            Ok(metadata) if identity(&metadata) == Some(file.identity) => return Ok(()),
            Ok(_) => "replaced by another file",
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => "deleted",
            Err(error) => {
                // Not a sign that the file changed (a permission, an I/O error): the calls
                // themselves will say whether the database still works.
                tracing::warn!(path = %self.inner.path.display(), %error, "cannot look at the SQLite database file");
                return Ok(());
            }
        };
        if !file.lost.swap(true, Relaxed) {
            tracing::error!(
                path = %self.inner.path.display(),
                what,
                "the SQLite database file was {what} while the store ran: every call of the \
                 store now fails (503, the handler not run) until the process is restarted, \
                 since another process may serve a new database at that path"
            );
        }
        Err(self.lost(what))
    }

    /// Runs `work` on the connection's thread.
    async fn call<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.file_lost()?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |connection| {
            let result = work(connection);
            Box::new(move |commit_failed: Option<&rusqlite::Error>| {
                let result = match commit_failed {
                    // The group's commit failed: nothing this job wrote is kept.
                    Some(error) if error.sqlite_error_code() == Some(ErrorCode::DiskFull) => Err(
                        StoreError::backend(DiskFull(rusqlite::Error::SqliteFailure(
                            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
                            Some(format!("the SQLite commit failed: {error}")),
                        ))),
                    ),
                    Some(error) => Err(StoreError::backend(format!(
                        "the SQLite commit failed: {error}"
                    ))),
                    None => result.map_err(backend),
                };
                let _ = tx.send(result);
            })
        });
        self.inner
            .jobs
            .send(job)
            .map_err(|_| StoreError::backend("the SQLite thread stopped"))?;
        rx.await
            .map_err(|_| StoreError::backend("the SQLite thread stopped"))?
    }

    fn cached(&self, key: &str) -> Option<Record> {
        let cached = self.inner.records.get(key)?;
        if Instant::now() < cached.valid_until {
            Some(cached.record)
        } else {
            self.inner.records.invalidate(key);
            None
        }
    }

    fn cache(&self, key: &str, record: &Record, left: Duration) {
        if self.inner.records.policy().max_capacity() == Some(0) {
            return;
        }
        let valid_until = Instant::now() + left.min(self.inner.cache_for);
        self.inner.records.insert(
            key.to_owned(),
            Cached {
                record: record.clone(),
                valid_until,
            },
        );
    }
}

impl Store for SqliteStore {
    async fn claim_as(
        &self,
        key: &str,
        token: &OwnerToken,
        lease: Duration,
    ) -> Result<ClaimOutcome, StoreError> {
        self.file_lost()?;
        if let Some(record) = self.cached(key) {
            return Ok(ClaimOutcome::Completed(record));
        }
        self.look_at_file(false)?;
        let (owned_key, owner, lease_ms) = (key.to_owned(), token_bytes(token), ms(lease));
        let found = self
            .call(move |connection| {
                let found = |row: Row| match row {
                    (true, fingerprint, payload, left) => {
                        Found::Completed(fingerprint, payload, left)
                    }
                    (false, fingerprint, payload, left) => {
                        match super::sealed::check_in_flight(&fingerprint, &payload) {
                            Ok(()) => Found::InFlight(left),
                            Err(damaged) => Found::Damaged(damaged),
                        }
                    }
                };
                // One statement takes the key if it is free or its row expired: atomic across
                // processes (SQLite's write lock). It answers nothing when the key is live (a
                // replay the cache did not have, a duplicate in flight): the row is then read.
                // Each round is atomic; another only follows a concurrent change.
                for _ in 0..8 {
                    let mut claim = connection.prepare_cached(concat!(
                        "INSERT INTO idempotency_records \
                             (key, owner, completed, fingerprint, payload, expires_at) \
                             VALUES (?1, ?2, 0, NULL, NULL, ",
                        now!(),
                        " + ?3) \
                             ON CONFLICT (key) DO UPDATE SET owner = excluded.owner, \
                             completed = 0, fingerprint = NULL, payload = NULL, \
                             expires_at = excluded.expires_at \
                             WHERE idempotency_records.expires_at <= ",
                        now!(),
                        " RETURNING 1"
                    ))?;
                    let mut rows =
                        claim.query(rusqlite::params![owned_key, &owner[..], lease_ms])?;
                    let taken = rows.next()?.is_some();
                    // Stepped to its end: outside a group's transaction the statement commits at
                    // its last step, and a commit that fails (a full disk) is reported there, not
                    // with the returned row. Stopping at the row answered "claimed" for a claim
                    // that was never written, and a second claim of the key ran it again.
                    while rows.next()?.is_some() {}
                    if taken {
                        return Ok(Found::Claimed);
                    }
                    if let Some(row) = read_live(connection, &owned_key)? {
                        return Ok(found(row));
                    }
                }
                Ok(Found::KeptChanging)
            })
            .await?;
        Ok(match found {
            Found::Claimed => ClaimOutcome::Claimed(*token),
            Found::KeptChanging => {
                return Err(StoreError::backend(
                    "the key kept changing while claiming it",
                ))
            }
            Found::Damaged(damaged) => return Err(damaged),
            Found::InFlight(left) => ClaimOutcome::InFlight {
                lease_remaining: remaining(left),
            },
            Found::Completed(fingerprint, payload, left) => {
                let record = record_from_columns(fingerprint, payload)?;
                self.cache(key, &record, remaining(left).unwrap_or_default());
                ClaimOutcome::Completed(record)
            }
        })
    }

    async fn renew(
        &self,
        key: &str,
        token: &OwnerToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let (key, owner, lease_ms) = (key.to_owned(), token_bytes(token), ms(lease));
        let renewed = self
            .call(move |connection| {
                connection
                    .prepare_cached(concat!(
                        "UPDATE idempotency_records SET expires_at = ",
                        now!(),
                        " + ?3 \
                         WHERE key = ?1 AND owner = ?2 AND completed = 0 AND expires_at > ",
                        now!()
                    ))?
                    .execute(rusqlite::params![key, &owner[..], lease_ms])
            })
            .await?;
        if renewed == 1 {
            Ok(())
        } else {
            Err(StoreError::LeaseLost)
        }
    }

    async fn complete(
        &self,
        key: &str,
        token: &OwnerToken,
        record: Record,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let (owned_key, owner, ttl_ms) = (key.to_owned(), token_bytes(token), ms(ttl));
        let fingerprint = record.fingerprint().map(|f| f.to_be_bytes().to_vec());
        let payload = super::sealed::row_payload(&record);
        let streamed = self.inner.streams.has(token);
        let completed = self
            .call(move |connection| {
                let update = |connection: &Connection| {
                    connection
                        .prepare_cached(concat!(
                            "UPDATE idempotency_records SET completed = 1, owner = NULL, \
                         fingerprint = ?3, payload = ?4, expires_at = ",
                            now!(),
                            " + ?5 \
                         WHERE key = ?1 AND owner = ?2 AND completed = 0 AND expires_at > ",
                            now!()
                        ))?
                        .execute(rusqlite::params![
                            owned_key,
                            &owner[..],
                            fingerprint,
                            &payload[..],
                            ttl_ms
                        ])
                };
                if !streamed {
                    return update(connection);
                }
                // A claim that streamed: its stream goes in the same transaction.
                atomically(connection, true, |connection| {
                    let completed = update(connection)?;
                    if completed == 1 {
                        drop_stream(connection, &owned_key)?;
                    }
                    Ok(completed)
                })
            })
            .await;
        let completed = completed.and_then(|n| match n {
            1 => Ok(()),
            _ => Err(StoreError::LeaseLost),
        });
        self.inner.streams.settle(token, &completed);
        completed?;
        self.cache(key, &record, ttl);
        self.inner.wakers.wake(key);
        Ok(())
    }

    async fn release(&self, key: &str, token: &OwnerToken) -> Result<(), StoreError> {
        let (owned_key, owner) = (key.to_owned(), token_bytes(token));
        let streamed = self.inner.streams.has(token);
        let released = self
            .call(move |connection| {
                let delete = |connection: &Connection| {
                    connection
                        .prepare_cached(concat!(
                            "DELETE FROM idempotency_records \
                             WHERE key = ?1 AND owner = ?2 AND completed = 0 AND expires_at > ",
                            now!()
                        ))?
                        .execute(rusqlite::params![owned_key, &owner[..]])
                };
                if !streamed {
                    return delete(connection);
                }
                atomically(connection, true, |connection| {
                    let released = delete(connection)?;
                    if released == 1 {
                        drop_stream(connection, &owned_key)?;
                    }
                    Ok(released)
                })
            })
            .await;
        let released = released.and_then(|n| match n {
            1 => Ok(()),
            _ => Err(StoreError::LeaseLost),
        });
        self.inner.streams.settle(token, &released);
        released?;
        self.inner.wakers.wake(key);
        Ok(())
    }

    /// Woken at once by a completion or release through this handle (or a clone); a claim
    /// that another process ends is seen after a jittered backoff (10 to 500 ms).
    async fn wait(&self, key: &str, attempt: u32) {
        self.inner
            .wakers
            .wait_at_most(key, backoff_with_jitter(attempt, super::POLL))
            .await;
    }

    async fn save_point(
        &self,
        key: &str,
        token: &OwnerToken,
        point: &RecoveryPoint,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let (key, owner, ttl_ms) = (key.to_owned(), token_bytes(token), ms(ttl));
        let encoded = point.encode();
        // One statement, under the write lock: the owner check and the write are atomic.
        let saved = self
            .call(move |connection| {
                connection
                    .prepare_cached(concat!(
                        "INSERT INTO idempotency_points (key, point, expires_at) \
                         SELECT key, ?3, ",
                        now!(),
                        " + ?4 FROM idempotency_records \
                         WHERE key = ?1 AND owner = ?2 AND completed = 0 AND expires_at > ",
                        now!(),
                        " \
                         ON CONFLICT (key) DO UPDATE SET point = excluded.point, \
                         expires_at = excluded.expires_at"
                    ))?
                    .execute(rusqlite::params![key, &owner[..], &encoded[..], ttl_ms])
            })
            .await?;
        if saved == 1 {
            Ok(())
        } else {
            Err(StoreError::LeaseLost)
        }
    }

    async fn load_point(
        &self,
        key: &str,
        token: &OwnerToken,
    ) -> Result<Option<RecoveryPoint>, StoreError> {
        let (key, owner) = (key.to_owned(), token_bytes(token));
        let row = self
            .call(move |connection| {
                connection
                    .prepare_cached(concat!(
                        "SELECT p.point FROM idempotency_records r \
                         LEFT JOIN idempotency_points p ON p.key = r.key AND p.expires_at > ",
                        now!(),
                        " \
                         WHERE r.key = ?1 AND r.owner = ?2 AND r.completed = 0 \
                         AND r.expires_at > ",
                        now!()
                    ))?
                    .query_row(rusqlite::params![key, &owner[..]], |row| {
                        row.get::<_, Option<Vec<u8>>>(0)
                    })
                    .optional()
            })
            .await?;
        match row {
            None => Err(StoreError::LeaseLost),
            Some(point) => point
                .map(|point| RecoveryPoint::decode(point.into()))
                .transpose(),
        }
    }

    async fn append_stream(
        &self,
        key: &str,
        token: &OwnerToken,
        from: u64,
        chunks: &[Bytes],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let (owned_key, owner, ttl_ms) = (key.to_owned(), token_bytes(token), ms(ttl));
        let at = i64::try_from(from).map_err(StoreError::backend)?;
        let chunks = chunks.to_vec();
        let appended = self
            .call(move |connection| {
                atomically(connection, true, |connection| {
                    let key = &owned_key;
                    let owns = connection
                        .prepare_cached(concat!(
                            "SELECT 1 FROM idempotency_records \
                             WHERE key = ?1 AND owner = ?2 AND completed = 0 AND expires_at > ",
                            now!()
                        ))?
                        .query_row(rusqlite::params![key, &owner[..]], |_| Ok(()))
                        .optional()?;
                    if owns.is_none() {
                        return Ok(Appended::LeaseLost);
                    }
                    let held: i64 = connection
                        .prepare_cached(concat!(
                            "SELECT length FROM idempotency_streams \
                             WHERE key = ?1 AND owner = ?2 AND expires_at > ",
                            now!()
                        ))?
                        .query_row(rusqlite::params![key, &owner[..]], |row| row.get(0))
                        .optional()?
                        .unwrap_or(0);
                    if at > held {
                        return Ok(Appended::Gap(held));
                    }
                    // Another owner's stream (a crashed one's) is replaced.
                    connection
                        .prepare_cached(
                            "DELETE FROM idempotency_chunks WHERE key = ?1 AND owner <> ?2",
                        )?
                        .execute(rusqlite::params![key, &owner[..]])?;
                    let mut insert = connection.prepare_cached(
                        "INSERT INTO idempotency_chunks (key, owner, seq, chunk) \
                         VALUES (?1, ?2, ?3, ?4) \
                         ON CONFLICT (key, owner, seq) DO UPDATE SET chunk = excluded.chunk",
                    )?;
                    let mut length = held;
                    for (seq, chunk) in (at..).zip(&chunks) {
                        if seq >= held {
                            insert.execute(rusqlite::params![key, &owner[..], seq, &chunk[..]])?;
                            length = seq + 1;
                        }
                    }
                    connection
                        .prepare_cached(concat!(
                            "INSERT INTO idempotency_streams (key, owner, length, expires_at) \
                             VALUES (?1, ?2, ?3, ",
                            now!(),
                            " + ?4) \
                             ON CONFLICT (key) DO UPDATE SET owner = excluded.owner, \
                             length = excluded.length, expires_at = excluded.expires_at"
                        ))?
                        .execute(rusqlite::params![key, &owner[..], length, ttl_ms])?;
                    Ok(Appended::Done)
                })
            })
            .await?;
        match appended {
            Appended::Done => {
                self.inner.streams.add(token);
                Ok(())
            }
            Appended::LeaseLost => Err(StoreError::LeaseLost),
            Appended::Gap(held) => Err(StoreError::backend(StreamGap {
                from,
                held: held.unsigned_abs(),
            })),
        }
    }

    async fn read_stream(&self, key: &str, from: u64) -> Result<StreamRead, StoreError> {
        self.file_lost()?;
        if let Some(record) = self.cached(key) {
            return Ok(StreamRead::Completed(record));
        }
        let owned_key = key.to_owned();
        let at = i64::try_from(from).map_err(StoreError::backend)?;
        let found = self
            .call(move |connection| {
                // One snapshot for the key's row and its stream.
                atomically(connection, false, |connection| {
                    let key = &owned_key;
                    let Some(row) = read_live(connection, key)? else {
                        return Ok(Streamed::Absent);
                    };
                    if row.0 {
                        return Ok(Streamed::Row(row, None));
                    }
                    let stream: Option<(Vec<u8>, i64)> = connection
                        .prepare_cached(concat!(
                            "SELECT s.owner, s.length FROM idempotency_streams s \
                             JOIN idempotency_records r ON r.key = s.key AND r.owner = s.owner \
                             WHERE s.key = ?1 AND s.expires_at > ",
                            now!()
                        ))?
                        .query_row([key], |row| Ok((row.get(0)?, row.get(1)?)))
                        .optional()?;
                    let Some((owner, length)) = stream else {
                        return Ok(Streamed::Row(row, None));
                    };
                    let mut chunks = Vec::new();
                    let mut size = 0;
                    let mut select = connection.prepare_cached(
                        "SELECT chunk FROM idempotency_chunks \
                         WHERE key = ?1 AND owner = ?2 AND seq >= ?3 AND seq < ?4 ORDER BY seq",
                    )?;
                    let mut rows = select.query(rusqlite::params![key, owner, at, length])?;
                    while let Some(found) = rows.next()? {
                        let chunk: Vec<u8> = found.get(0)?;
                        if !chunks.is_empty() && size + chunk.len() > STREAM_READ_BYTES {
                            break;
                        }
                        size += chunk.len();
                        chunks.push(chunk);
                    }
                    Ok(Streamed::Row(row, Some(chunks)))
                })
            })
            .await?;
        match found {
            Streamed::Absent => Ok(StreamRead::Absent),
            Streamed::Row((true, fingerprint, payload, _), _) => Ok(StreamRead::Completed(
                record_from_columns(fingerprint, payload)?,
            )),
            Streamed::Row((false, fingerprint, payload, _), chunks) => {
                super::sealed::check_in_flight(&fingerprint, &payload)?;
                Ok(match chunks {
                    None => StreamRead::NotLive,
                    Some(chunks) => StreamRead::Live(chunks.into_iter().map(Bytes::from).collect()),
                })
            }
        }
    }

    async fn inspect(&self, key: &str) -> Result<KeyState, StoreError> {
        let owned_key = key.to_owned();
        let row = self
            .call(move |connection| read_live(connection, &owned_key))
            .await?;
        Ok(match row {
            None => KeyState::Absent,
            Some((false, fingerprint, payload, left)) => {
                super::sealed::check_in_flight(&fingerprint, &payload)?;
                KeyState::InFlight {
                    lease_remaining: remaining(left),
                }
            }
            Some((true, fingerprint, payload, left)) => KeyState::Completed {
                record: record_from_columns(fingerprint, payload)?,
                expires_in: remaining(left),
            },
        })
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let owned_key = key.to_owned();
        let deleted = self
            .call(move |connection| {
                connection
                    .prepare_cached("DELETE FROM idempotency_points WHERE key = ?1")?
                    .execute([&owned_key])?;
                drop_stream(connection, &owned_key)?;
                connection
                    .prepare_cached("DELETE FROM idempotency_records WHERE key = ?1")?
                    .execute([owned_key])
            })
            .await?;
        self.inner.records.invalidate(key);
        self.inner.wakers.wake(key);
        Ok(deleted > 0)
    }
}
