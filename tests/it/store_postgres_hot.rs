//! The PostgreSQL fresh key's writes: a completion is a HOT update (no index touched), a claim
//! is a plain insert, `NOTIFY` goes out only for keys a process waits on, and a fleet of old
//! and new processes shares one table during a rolling upgrade.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support;

use support::servers::postgres_url;
use tower_idempotency::store::conformance::fresh_key;
use tower_idempotency::store::{ClaimOutcome, PostgresStore, Record, Store};

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(600);

async fn store_on(url: &str, table: &str) -> PostgresStore {
    let store = PostgresStore::connect(url)
        .await
        .expect("connect to postgres")
        .with_table(table)
        .unwrap();
    store.migrate().await.expect("migrate");
    store
}

async fn client_on(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

/// Claims and completes a fresh key with a 1 KB answer; the key.
async fn fresh_key_completed(store: &PostgresStore, prefix: &str) -> String {
    let key = fresh_key(prefix);
    let ClaimOutcome::Claimed(token) = store.claim(&key, LEASE).await.unwrap() else {
        panic!("a fresh key is claimed")
    };
    store
        .complete(&key, &token, Record::new(Some(7), vec![b'x'; 1024]), TTL)
        .await
        .unwrap();
    key
}

/// `(n_tup_upd, n_tup_hot_upd)` of `table`, once the store's sessions reported at least
/// `updates` updates (a session reports its counts about a second after it goes idle).
async fn updates_of(client: &tokio_postgres::Client, table: &str, updates: i64) -> (i64, i64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let row = client
            .query_one(
                "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = $1",
                &[&table],
            )
            .await
            .unwrap();
        let counts: (i64, i64) = (row.get(0), row.get(1));
        if counts.0 >= updates || Instant::now() > deadline {
            return counts;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A fresh key's completion changes no indexed column, and the table leaves room in each page
/// for the completed row: PostgreSQL updates it in place (HOT), writing no index entry.
#[tokio::test]
async fn a_fresh_keys_completion_is_a_hot_update() {
    let Some(url) = postgres_url() else { return };
    let table = "hot_completions";
    let store = store_on(&url, table).await;
    let keys = 200;
    for _ in 0..keys {
        fresh_key_completed(&store, "hot").await;
    }
    // Sessions that end report their counts at once.
    drop(store);
    let client = client_on(&url).await;
    let (updates, hot) = updates_of(&client, table, keys).await;
    assert_eq!(updates, keys, "one update per fresh key: its completion");
    assert_eq!(hot, updates, "every completion is a HOT update");

    // Concurrent fresh keys still land their completions in their own page, nearly always.
    let store = store_on(&url, table).await;
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                for _ in 0..25 {
                    fresh_key_completed(&store, "hot-concurrent").await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    drop(store);
    let concurrent = 16 * 25;
    let (updates, hot) = updates_of(&client, table, keys + concurrent).await;
    assert_eq!(updates, keys + concurrent);
    println!("concurrent: {} of {concurrent} completions HOT", hot - keys);
    assert!(hot - keys >= concurrent * 9 / 10, "{hot} of {updates} HOT");
}

/// A connection in `LISTEN` on `channel`, forwarding the payloads it receives.
async fn listen(url: &str, channel: &str) -> tokio::sync::mpsc::UnboundedReceiver<String> {
    let (client, mut connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
    let (ready, subscribed) = tokio::sync::oneshot::channel();
    let channel = channel.to_owned();
    tokio::spawn(async move {
        let driver = tokio::spawn(async move {
            while let Some(Ok(message)) =
                std::future::poll_fn(|cx| connection.poll_message(cx)).await
            {
                if let tokio_postgres::AsyncMessage::Notification(note) = message {
                    if sender.send(note.payload().to_owned()).is_err() {
                        return;
                    }
                }
            }
        });
        client
            .batch_execute(&format!("LISTEN \"{channel}\""))
            .await
            .unwrap();
        let _ = ready.send(());
        let _ = driver.await;
        drop(client);
    });
    subscribed.await.unwrap();
    receiver
}

/// Has `waiter` wait on a key `completer` completes, until the completion's notification
/// reaches `seen` (the waiter's listener is then up and the waiter was woken by it): the key.
async fn a_woken_wait(
    completer: &PostgresStore,
    waiter: &PostgresStore,
    seen: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    others: &mut Vec<String>,
) -> String {
    for _ in 0..50 {
        let key = fresh_key("woken");
        let ClaimOutcome::Claimed(token) = completer.claim(&key, LEASE).await.unwrap() else {
            panic!()
        };
        let waiting = tokio::spawn({
            let (waiter, key) = (waiter.clone(), key.clone());
            async move {
                let started = Instant::now();
                waiter.wait(&key, 3).await;
                started.elapsed()
            }
        });
        // The waiter is registered (and, once its listener is up, flagged the key) before the
        // completion: a flag set after it is the race test's case, not this one's.
        tokio::time::sleep(Duration::from_millis(100)).await;
        completer
            .complete(&key, &token, Record::new(None, "done"), TTL)
            .await
            .unwrap();
        waiting.await.unwrap();
        let deadline = tokio::time::sleep(Duration::from_millis(500));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                note = seen.recv() => {
                    let note = note.unwrap();
                    if note == key {
                        return key;
                    }
                    others.push(note);
                }
                _ = &mut deadline => break,
            }
        }
    }
    panic!("no waited key was ever notified")
}

/// A completion nobody waits on sends no `NOTIFY` (a fresh key's third statement and its
/// transaction): counted on a `LISTEN` connection of the test's own, whose notifications
/// arrive in commit order, so a notification of the unwaited key would come before the
/// waited key's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_notify_without_a_waiter() {
    let Some(url) = postgres_url() else { return };
    let table = "no_notify";
    let completer = store_on(&url, table).await;
    let waiter = store_on(&url, table).await;
    let mut seen = listen(&url, "no_notify_wake").await;
    let mut others = Vec::new();
    // Warm the waiter's listener up: a waited key is notified once it listens.
    a_woken_wait(&completer, &waiter, &mut seen, &mut others).await;
    others.clear();
    let unwaited: Vec<String> = {
        let mut keys = Vec::new();
        for _ in 0..20 {
            keys.push(fresh_key_completed(&completer, "unwaited").await);
        }
        keys
    };
    let waited = a_woken_wait(&completer, &waiter, &mut seen, &mut others).await;
    assert!(
        others.iter().all(|key| key.starts_with("woken")),
        "only waited keys are notified, not {:?} (waited: {waited})",
        others
            .iter()
            .filter(|key| unwaited.contains(key))
            .collect::<Vec<_>>()
    );
}

/// A duplicate that starts waiting just as the completion commits still wakes at once: its
/// flag either reaches the row before the completion (which then notifies) or finds the key
/// completed (and it returns without waiting). A lost wake-up would cost the listening bound
/// (2 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_waiter_racing_the_completion_is_never_left_waiting() {
    let Some(url) = postgres_url() else { return };
    let table = "waiter_race";
    let completer = store_on(&url, table).await;
    let waiter = store_on(&url, table).await;
    let mut seen = listen(&url, "waiter_race_wake").await;
    a_woken_wait(&completer, &waiter, &mut seen, &mut Vec::new()).await;
    let mut waited = 0;
    for round in 0..40 {
        let key = fresh_key("race");
        let ClaimOutcome::Claimed(token) = completer.claim(&key, LEASE).await.unwrap() else {
            panic!()
        };
        let barrier = Arc::new(tokio::sync::Barrier::new(2));
        let duplicate = tokio::spawn({
            let (waiter, key, barrier) = (waiter.clone(), key.clone(), barrier.clone());
            async move {
                barrier.wait().await;
                let started = Instant::now();
                let mut waits = 0;
                loop {
                    match waiter.claim(&key, LEASE).await.unwrap() {
                        ClaimOutcome::Completed(_) => return (started.elapsed(), waits),
                        ClaimOutcome::InFlight { .. } => waiter.wait(&key, 3).await,
                        ClaimOutcome::Claimed(_) => panic!("the key is held"),
                    }
                    waits += 1;
                }
            }
        });
        barrier.wait().await;
        // Spread the completion over the duplicate's claim and flag.
        tokio::time::sleep(Duration::from_micros(fastrand_u64(round) % 3000)).await;
        completer
            .complete(&key, &token, Record::new(None, "done"), TTL)
            .await
            .unwrap();
        let (took, waits) = duplicate.await.unwrap();
        waited += waits;
        assert!(
            took < Duration::from_millis(1500),
            "round {round}: the duplicate took {took:?} ({waits} waits): a lost wake-up"
        );
    }
    println!("{waited} waits in 40 rounds");
}

fn fastrand_u64(seed: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    nanos.wrapping_mul(6364136223846793005).wrapping_add(seed)
}

/// The statements of the previous release (0.x before HOT completions), as its code ran them on
/// the table `rolling`: the old processes of a fleet being upgraded.
mod old {
    pub const SCHEMA: &str = "DROP TABLE IF EXISTS rolling, rolling_points;
        CREATE TABLE IF NOT EXISTS rolling (
            key         text        PRIMARY KEY,
            owner       bytea,
            completed   boolean     NOT NULL DEFAULT false,
            fingerprint bytea,
            payload     bytea,
            expires_at  timestamptz NOT NULL,
            created_at  timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX IF NOT EXISTS rolling_expires_at ON rolling (expires_at);
        CREATE TABLE IF NOT EXISTS rolling_points (
            key         text        PRIMARY KEY,
            point       bytea       NOT NULL,
            expires_at  timestamptz NOT NULL
        );
        CREATE INDEX IF NOT EXISTS rolling_expires_at_points ON rolling_points (expires_at);";
    /// `migrate`'s check that the schema is current.
    pub const CHECK: &str = "SELECT to_regclass($1) IS NOT NULL AND to_regclass($2) IS NOT NULL \
        AND NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = $3 AND tgrelid = to_regclass($1))";
    pub const CLAIM: &str = "WITH ins AS (\
        INSERT INTO rolling (key, owner, completed, fingerprint, payload, expires_at) \
        VALUES ($1, $2, false, NULL, NULL, now() + $3::bigint * interval '1 millisecond') \
        ON CONFLICT (key) DO NOTHING RETURNING key) \
        SELECT true, NULL::boolean, NULL::bytea, NULL::bytea, NULL::bigint FROM ins \
        UNION ALL \
        SELECT false, completed, fingerprint, payload, \
        (extract(epoch FROM expires_at - now()) * 1000)::bigint \
        FROM rolling WHERE key = $1 AND expires_at > now() AND NOT EXISTS (SELECT 1 FROM ins)";
    pub const TAKE_OVER: &str = "UPDATE rolling SET owner = $2, completed = false, \
        fingerprint = NULL, payload = NULL, \
        expires_at = now() + $3::bigint * interval '1 millisecond' \
        WHERE key = $1 AND expires_at <= now() RETURNING key";
    pub const COMPLETE: &str = "WITH done AS (UPDATE rolling SET completed = true, owner = NULL, \
        fingerprint = $3, payload = $4, expires_at = now() + $5::bigint * interval '1 millisecond' \
        WHERE key = $1 AND owner = $2 AND NOT completed AND expires_at > now() \
        RETURNING key), \
        dropped AS (DELETE FROM rolling_points p USING done WHERE p.key = done.key) \
        SELECT 1 FROM done";
    pub const RELEASE: &str = "DELETE FROM rolling \
        WHERE key = $1 AND owner = $2 AND NOT completed AND expires_at > now()";
    pub const NOTIFY: &str = "SELECT set_config('synchronous_commit', 'off', true), \
        pg_notify('rolling_wake', key) FROM unnest($1::text[]) AS key";
    pub const PURGE: &str = "DELETE FROM rolling WHERE key IN \
        (SELECT key FROM rolling WHERE expires_at <= now() LIMIT $1 FOR UPDATE SKIP LOCKED)";
}

/// An old process: the previous release's statements over a connection.
struct OldProcess(tokio_postgres::Client);

impl OldProcess {
    const OWNER: [u8; 16] = [9; 16];

    /// The claim statement's row: `Some(true)` claimed, `Some(false)` found (its `completed`
    /// and fingerprint are in `found`), `None` the key's row expired (the caller takes over).
    async fn claim(&self, key: &str, lease_ms: i64) -> Option<tokio_postgres::Row> {
        let owner = &Self::OWNER[..];
        self.0
            .query_opt(old::CLAIM, &[&key, &owner, &lease_ms])
            .await
            .unwrap()
    }

    async fn claimed(&self, key: &str, lease_ms: i64) -> bool {
        match self.claim(key, lease_ms).await {
            Some(row) => row.get::<_, bool>(0),
            None => {
                let owner = &Self::OWNER[..];
                self.0
                    .query_opt(old::TAKE_OVER, &[&key, &owner, &lease_ms])
                    .await
                    .unwrap()
                    .is_some()
            }
        }
    }

    /// `Some(completed)` of the key's live row as its claim statement reports it.
    async fn found(&self, key: &str) -> Option<bool> {
        let row = self.claim(key, 30_000).await?;
        assert!(!row.get::<_, bool>(0), "{key} exists");
        row.get(1)
    }

    async fn complete(&self, key: &str, (fingerprint, payload): &(Vec<u8>, Vec<u8>)) -> bool {
        let owner = &Self::OWNER[..];
        let done = self
            .0
            .query_opt(
                old::COMPLETE,
                &[&key, &owner, fingerprint, payload, &600_000i64],
            )
            .await
            .unwrap()
            .is_some();
        let keys = vec![key.to_owned()];
        self.0.execute(old::NOTIFY, &[&keys]).await.unwrap();
        done
    }

    async fn release(&self, key: &str) -> u64 {
        let owner = &Self::OWNER[..];
        self.0.execute(old::RELEASE, &[&key, &owner]).await.unwrap()
    }

    async fn purge(&self) -> u64 {
        self.0.execute(old::PURGE, &[&1000i64]).await.unwrap()
    }
}

/// A record's `(fingerprint, payload)` columns in the row format both releases write, made by
/// this release's store on `table`: what an old process completes its keys with.
async fn seeded_record(
    url: &str,
    admin: &tokio_postgres::Client,
    table: &str,
) -> (Vec<u8>, Vec<u8>) {
    let seed = store_on(url, table).await;
    let seeded = fresh_key_completed(&seed, "seed").await;
    let row = admin
        .query_one(
            &format!("SELECT fingerprint, payload FROM {table} WHERE key = $1"),
            &[&seeded],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

async fn count(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

/// During a rolling upgrade, processes of the previous release and of this one serve from one
/// table: the new `migrate` runs while old processes hold claims, and afterwards each side's
/// claims, completions, replays, releases and purges work on the other's rows (the previous
/// release's statements are kept here as SQL text, as its code runs them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_and_new_processes_share_one_table_during_a_rolling_upgrade() {
    let Some(url) = postgres_url() else { return };
    let admin = client_on(&url).await;
    admin.batch_execute(old::SCHEMA).await.unwrap();
    let old = OldProcess(client_on(&url).await);
    let record = seeded_record(&url, &admin, "rolling_seed").await;

    // Before the upgrade: the old fleet's rows, one claim still running.
    assert!(old.claimed("old-running", 30_000).await);
    assert!(old.claimed("old-done", 30_000).await);
    assert!(old.complete("old-done", &record).await);
    assert!(old.claimed("old-lapsed", 1).await);
    assert!(old.claimed("old-purged", 1).await);

    // The first new process migrates while the old ones serve.
    let new = PostgresStore::connect(&url)
        .await
        .unwrap()
        .with_table("rolling")
        .unwrap();
    new.migrate().await.unwrap();
    new.migrate().await.unwrap();
    let current: bool = admin
        .query_one(
            old::CHECK,
            &[&"rolling", &"rolling_points", &"rolling_drop_point"],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        current,
        "an old process starting now finds the schema current"
    );
    let fillfactor = count(
        &admin,
        "SELECT coalesce(max(split_part(o, '=', 2)::bigint), 100) \
         FROM pg_class, unnest(reloptions) o WHERE relname = 'rolling' AND o LIKE 'fillfactor=%'",
    )
    .await;
    assert!(fillfactor < 100, "fillfactor {fillfactor}");
    let indexed_expiry = count(
        &admin,
        "SELECT count(*) FROM pg_index i JOIN pg_attribute a \
         ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey) \
         WHERE i.indrelid = 'rolling'::regclass AND a.attname = 'expires_at'",
    )
    .await;
    assert_eq!(indexed_expiry, 0, "no index on a column completions change");

    // Old rows, new code: a replay, a duplicate in flight, a take-over of a lapsed claim.
    match new.claim("old-done", LEASE).await.unwrap() {
        ClaimOutcome::Completed(replayed) => {
            assert_eq!(replayed.payload(), &vec![b'x'; 1024][..]);
        }
        other => panic!("old record replayed by the new code: {other:?}"),
    }
    assert!(matches!(
        new.claim("old-running", LEASE).await.unwrap(),
        ClaimOutcome::InFlight { .. }
    ));
    assert!(matches!(
        new.claim("old-lapsed", LEASE).await.unwrap(),
        ClaimOutcome::Claimed(_)
    ));
    // The old claim completes after the migration; the new code replays it.
    assert!(old.complete("old-running", &record).await);
    assert!(matches!(
        new.claim("old-running", LEASE).await.unwrap(),
        ClaimOutcome::Completed(_)
    ));

    // New rows, old code: in flight, then completed, then released.
    let ClaimOutcome::Claimed(token) = new.claim("new-key", LEASE).await.unwrap() else {
        panic!()
    };
    assert_eq!(old.found("new-key").await, Some(false), "in flight");
    new.complete("new-key", &token, Record::new(Some(7), "new"), TTL)
        .await
        .unwrap();
    assert_eq!(old.found("new-key").await, Some(true), "completed");
    let ClaimOutcome::Claimed(token) = new.claim("new-released", LEASE).await.unwrap() else {
        panic!()
    };
    new.release("new-released", &token).await.unwrap();
    assert!(old.claimed("new-released", 30_000).await);
    assert_eq!(old.release("new-released").await, 1);

    // Claims of the old code after the migration, replayed by the new code.
    assert!(old.claimed("old-after", 30_000).await);
    assert!(matches!(
        new.claim("old-after", LEASE).await.unwrap(),
        ClaimOutcome::InFlight { .. }
    ));
    assert!(old.complete("old-after", &record).await);
    assert!(matches!(
        new.claim("old-after", LEASE).await.unwrap(),
        ClaimOutcome::Completed(_)
    ));
    // A lapsed new claim is taken over by the old code.
    new.claim("new-lapsed", Duration::from_millis(1))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(old.claimed("new-lapsed", 30_000).await);

    // Purges: each side's purge deletes the other's expired rows, and only expired ones.
    let live = count(&admin, "SELECT count(*) FROM rolling").await;
    assert!(old.claimed("old-expiring", 1).await);
    new.claim("new-expiring", Duration::from_millis(1))
        .await
        .unwrap();
    let ClaimOutcome::Claimed(token) = new.claim("new-done-expiring", LEASE).await.unwrap() else {
        panic!()
    };
    new.complete(
        "new-done-expiring",
        &token,
        Record::new(None, "short"),
        Duration::from_millis(1),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    // `old-purged` expired before the migration.
    assert_eq!(
        old.purge().await,
        4,
        "the old purge deletes every expired row"
    );
    assert_eq!(
        count(&admin, "SELECT count(*) FROM rolling").await,
        live - 1
    );
    assert!(old.claimed("old-expiring", 1).await);
    new.claim("new-expiring", Duration::from_millis(1))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    while new.purge_expired(1000).await.unwrap() > 0 {}
    assert_eq!(
        count(&admin, "SELECT count(*) FROM rolling").await,
        live - 1,
        "the new purge deleted both sides' expired rows and nothing live"
    );
    for key in ["old-done", "old-running", "old-after", "new-key"] {
        assert!(
            !matches!(
                new.inspect(key).await.unwrap(),
                tower_idempotency::store::KeyState::Absent
            ),
            "{key} survived the purges"
        );
    }
}

/// WAL bytes, WAL records and write transactions (transaction ids assigned) the server counted
/// so far, once every session but `admin`'s ended or 3 s passed (a session reports its WAL
/// records as it ends, or within about a second of going idle).
async fn server_counts(admin: &tokio_postgres::Client) -> (i64, i64, i64) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while count(
        admin,
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'",
    )
    .await
        > 1
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let row = admin
        .query_one(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint, \
             (SELECT wal_records FROM pg_stat_wal), \
             pg_snapshot_xmax(pg_current_snapshot())::text::bigint",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

/// What a fresh key (claim, then completion of a 1 KB answer, nobody waiting) costs the server,
/// by the previous release's statements on its schema and by this release's on schema 4, on a
/// server of the test's own (nothing else writes): printed for `BENCHMARKS.md`, and the new
/// path writes less WAL in fewer transactions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_and_transactions_per_fresh_key_before_and_after() {
    let Some(server) = support::servers::own_postgres("count its WAL") else {
        return;
    };
    let url = server.url();
    let admin = client_on(&url).await;
    admin.batch_execute(old::SCHEMA).await.unwrap();
    let record = seeded_record(&url, &admin, "wal_seed").await;
    // Nothing but the statements writes WAL meanwhile.
    let quiet = |table: &str| format!("ALTER TABLE {table} SET (autovacuum_enabled = false)");
    admin.batch_execute(&quiet("rolling")).await.unwrap();
    let keys = 500;
    let per_key = |(b0, r0, x0): (i64, i64, i64), (b1, r1, x1): (i64, i64, i64)| {
        let n = keys as f64;
        (
            (b1 - b0) as f64 / n,
            (r1 - r0) as f64 / n,
            (x1 - x0) as f64 / n,
        )
    };

    let old_process = OldProcess(client_on(&url).await);
    let before = server_counts(&admin).await;
    for i in 0..keys {
        let key = format!("old-{i}");
        assert!(old_process.claimed(&key, 30_000).await);
        assert!(old_process.complete(&key, &record).await);
    }
    drop(old_process);
    let old = per_key(before, server_counts(&admin).await);

    let new = store_on(&url, "wal_new").await;
    admin.batch_execute(&quiet("wal_new")).await.unwrap();
    let before = server_counts(&admin).await;
    for _ in 0..keys {
        fresh_key_completed(&new, "new").await;
    }
    drop(new);
    let new = per_key(before, server_counts(&admin).await);
    println!(
        "per fresh key, previous release: {:.0} WAL bytes, {:.1} WAL records, {:.1} write transactions; \
         this release: {:.0} WAL bytes, {:.1} WAL records, {:.1} write transactions",
        old.0, old.1, old.2, new.0, new.1, new.2
    );
    assert!(new.0 < old.0, "WAL bytes {new:?} against {old:?}");
    assert!(new.2 < old.2, "transactions {new:?} against {old:?}");
}

/// A table in a schema of its own (`schema.table`): the upgrade drops that schema's index on
/// `expires_at` and creates the purge's index beside the table, and a second `migrate` finds it
/// current (it returns while another session holds the table's strongest lock).
#[tokio::test]
async fn a_schema_qualified_table_is_upgraded_too() {
    let Some(url) = postgres_url() else { return };
    let admin = client_on(&url).await;
    admin
        .batch_execute(
            "DROP SCHEMA IF EXISTS upg CASCADE; CREATE SCHEMA upg;
             CREATE TABLE upg.records (key text PRIMARY KEY, owner bytea,
                 completed boolean NOT NULL DEFAULT false, fingerprint bytea, payload bytea,
                 expires_at timestamptz NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
             CREATE INDEX upg_records_expires_at ON upg.records (expires_at);
             CREATE TABLE upg.records_points (key text PRIMARY KEY, point bytea NOT NULL,
                 expires_at timestamptz NOT NULL);
             CREATE INDEX upg_records_expires_at_points ON upg.records_points (expires_at);",
        )
        .await
        .unwrap();
    let store = store_on(&url, "upg.records").await;
    let indexes: Vec<String> = admin
        .query(
            "SELECT indexname FROM pg_indexes WHERE schemaname = 'upg' AND tablename = 'records' \
             ORDER BY indexname",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(indexes, ["records_pkey", "upg_records_purge_at"]);
    let key = fresh_key_completed(&store, "schema").await;
    assert!(matches!(
        store.claim(&key, LEASE).await.unwrap(),
        ClaimOutcome::Completed(_)
    ));
    migrate_while_locked(&url, &store, "upg.records").await;
}

/// Runs `store.migrate()` while another session holds the strongest lock on `table`: it must
/// return, reading the catalog only (the schema is current).
pub(crate) async fn migrate_while_locked(url: &str, store: &PostgresStore, table: &str) {
    let mut locker = client_on(url).await;
    let holder = locker.transaction().await.unwrap();
    holder
        .batch_execute(&format!("LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), store.migrate())
        .await
        .expect("migrate waited for the table lock: the schema is current, it reads the catalog")
        .unwrap();
    holder.rollback().await.unwrap();
}

/// An upgrade that cannot lock the live table soon (a long transaction reads it) gives up
/// after its `lock_timeout` instead of queueing every claim behind its lock, and succeeds when
/// run again.
#[tokio::test]
async fn an_upgrade_blocked_by_a_long_transaction_gives_up_and_can_be_run_again() {
    let Some(url) = postgres_url() else { return };
    let mut admin = client_on(&url).await;
    admin
        .batch_execute(
            "DROP TABLE IF EXISTS lockwait, lockwait_points;
             CREATE TABLE lockwait (key text PRIMARY KEY, owner bytea,
                 completed boolean NOT NULL DEFAULT false, fingerprint bytea, payload bytea,
                 expires_at timestamptz NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
             CREATE INDEX lockwait_expires_at ON lockwait (expires_at);
             CREATE TABLE lockwait_points (key text PRIMARY KEY, point bytea NOT NULL,
                 expires_at timestamptz NOT NULL);",
        )
        .await
        .unwrap();
    let store = PostgresStore::connect(&url)
        .await
        .unwrap()
        .with_table("lockwait")
        .unwrap();
    let reader = admin.transaction().await.unwrap();
    reader
        .batch_execute("LOCK TABLE lockwait IN ACCESS SHARE MODE")
        .await
        .unwrap();
    let started = Instant::now();
    let blocked = store.migrate().await;
    assert!(blocked.is_err(), "{blocked:?}");
    assert!(started.elapsed() < Duration::from_secs(15));
    reader.rollback().await.unwrap();
    store.migrate().await.unwrap();
    fresh_key_completed(&store, "lockwait").await;
}
