//! `PostgresStore` against a real PostgreSQL server: the conformance suite and the fleet cases.

use crate::support;

use support::servers::postgres_url;
use support::shared_store;
use tower_idempotency::store::PostgresStore;

async fn store() -> Option<PostgresStore> {
    let url = postgres_url()?;
    let store = PostgresStore::connect(&url)
        .await
        .expect("connect to postgres");
    store.migrate().await.expect("migrate");
    Some(store)
}

// The conformance suite and the cases of shared stores, on `store()`.
shared_store_suite!();

#[tokio::test]
async fn the_table_name_is_configurable_and_migrate_is_idempotent() {
    use tower_idempotency::store::{ClaimOutcome, Store};
    let Some(default) = store().await else { return };
    let custom = default.clone().with_table("custom_idempotency").unwrap();
    for _ in 0..3 {
        custom.migrate().await.unwrap();
    }
    let lease = std::time::Duration::from_secs(30);
    let key = tower_idempotency::store::conformance::fresh_key("table");
    assert!(matches!(
        custom.claim(&key, lease).await.unwrap(),
        ClaimOutcome::Claimed(_)
    ));
    assert!(
        matches!(
            default.claim(&key, lease).await.unwrap(),
            ClaimOutcome::Claimed(_)
        ),
        "tables are separate"
    );
    assert!(default.clone().with_table("x; drop table y").is_err());
}

#[tokio::test]
async fn concurrent_migrations_do_not_collide() {
    let Some(store) = store().await else { return };
    let store = store.with_table("raced_migrations").unwrap();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.migrate().await })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn expired_rows_are_ignored_then_purged() {
    use std::time::Duration;
    use tower_idempotency::store::{ClaimOutcome, Record, Store};
    let Some(store) = store().await else { return };
    let store = store.with_table("purge_test").unwrap();
    store.migrate().await.unwrap();
    let key = tower_idempotency::store::conformance::fresh_key("purge");
    // A row is due for the purge after its lease and the TTL of the store's latest completion
    // (the purge's index is on a column completions never change): short ones here.
    let ClaimOutcome::Claimed(token) = store.claim(&key, Duration::from_millis(300)).await.unwrap()
    else {
        panic!()
    };
    store
        .complete(
            &key,
            &token,
            Record::new(None, "old"),
            Duration::from_millis(200),
        )
        .await
        .unwrap();
    let lapsed = tower_idempotency::store::conformance::fresh_key("purge-lapsed");
    store
        .claim(&lapsed, Duration::from_millis(200))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(store.purge_expired(1000).await.unwrap() >= 2);
    assert_eq!(store.purge_expired(1000).await.unwrap(), 0);
    assert!(matches!(
        store.claim(&key, Duration::from_secs(30)).await.unwrap(),
        ClaimOutcome::Claimed(_)
    ));
}

#[tokio::test]
async fn the_background_purger_deletes_expired_rows() {
    use std::time::Duration;
    use tower_idempotency::store::Store;
    let Some(store) = store().await else { return };
    let store = store.with_table("purger_test").unwrap();
    store.migrate().await.unwrap();
    for i in 0..10 {
        store
            .claim(
                &format!("lapsing-{i}-{}", fastrand_suffix()),
                Duration::from_millis(50),
            )
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(rows().await, 10);
    let purger = store.spawn_purger(Duration::from_millis(50));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while rows().await != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the purger did not delete the expired rows"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    purger.abort();
}

/// A plain client on the test server, beside the store's pool.
async fn raw_client() -> tokio_postgres::Client {
    let url = postgres_url().unwrap();
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

/// Rows of the purger's table, counted over a connection of its own.
async fn rows() -> i64 {
    raw_client()
        .await
        .query_one("SELECT count(*) FROM purger_test", &[])
        .await
        .unwrap()
        .get(0)
}

fn fastrand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_goes_away_and_comes_back() {
    let Some(server) = support::servers::own_postgres("stop") else {
        return;
    };
    let store = PostgresStore::connect(&server.url()).await.unwrap();
    store.migrate().await.unwrap();
    shared_store::outage_then_recovery(&store, || server.stop(), || server.restart()).await;
}

/// A service can start before its database: requests get 503 until it answers, then work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lazy_store_starts_before_postgres_and_works_once_it_is_up() {
    let Some(server) = support::servers::own_postgres("stop") else {
        return;
    };
    PostgresStore::connect(&server.url())
        .await
        .unwrap()
        .migrate()
        .await
        .unwrap();
    server.stop();
    assert!(
        PostgresStore::connect(&server.url()).await.is_err(),
        "eager connect fails"
    );
    let store =
        PostgresStore::connect_lazy(&server.url()).expect("lazy connect never needs the server");
    shared_store::a_lazy_store_works_once_its_server_is_up(store, || server.restart()).await;
}

/// `migrate()` on an up-to-date schema reads the catalog only: it returns while another
/// session holds the strongest lock on the live table (instances that start while others
/// serve traffic must not queue DDL behind, or deadlock with, claims in progress).
#[tokio::test]
async fn migrating_an_up_to_date_table_takes_no_lock_on_it() {
    let Some(store) = store().await else { return };
    let url = postgres_url().unwrap();
    crate::store_postgres_hot::migrate_while_locked(&url, &store, "idempotency_records").await;
}

/// Development builds deleted a completed key's recovery point with a trigger on the records
/// table, which cost a fifth of the write throughput. `migrate` drops it; the completion
/// statement deletes the point itself.
#[tokio::test]
async fn migrate_drops_the_recovery_point_trigger_and_completion_still_deletes_the_point() {
    use std::time::Duration;
    use tower_idempotency::store::{ClaimOutcome, Record, Store};
    let Some(store) = store().await else { return };
    let store = store.with_table("trigger_upgrade").unwrap();
    let client = raw_client().await;
    client
        .batch_execute(
            "DROP TABLE IF EXISTS trigger_upgrade, trigger_upgrade_points;
             CREATE TABLE trigger_upgrade (key text PRIMARY KEY, owner bytea,
                 completed boolean NOT NULL DEFAULT false, fingerprint bytea, payload bytea,
                 expires_at timestamptz NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
             CREATE TABLE trigger_upgrade_points (key text PRIMARY KEY, point bytea NOT NULL,
                 expires_at timestamptz NOT NULL);
             CREATE OR REPLACE FUNCTION trigger_upgrade_drop_point() RETURNS trigger
                 LANGUAGE plpgsql AS
                 $$ BEGIN DELETE FROM trigger_upgrade_points WHERE key = NEW.key; RETURN NULL; END $$;
             CREATE TRIGGER trigger_upgrade_drop_point AFTER UPDATE OF completed ON trigger_upgrade
                 FOR EACH ROW WHEN (NEW.completed AND NOT OLD.completed)
                 EXECUTE FUNCTION trigger_upgrade_drop_point();",
        )
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let triggers: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'trigger_upgrade'::regclass \
             AND NOT tgisinternal",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(triggers, 0, "migrate dropped the trigger");

    let (lease, ttl) = (Duration::from_secs(30), Duration::from_secs(60));
    let ClaimOutcome::Claimed(token) = store.claim("k", lease).await.unwrap() else {
        panic!("a fresh key is claimed")
    };
    let point = tower_idempotency::RecoveryPoint::new("charged", &b"ch_1"[..]);
    store.save_point("k", &token, &point, ttl).await.unwrap();
    let points = || async {
        client
            .query_one("SELECT count(*) FROM trigger_upgrade_points", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    assert_eq!(points().await, 1);
    store
        .complete("k", &token, Record::new(None, &b"done"[..]), ttl)
        .await
        .unwrap();
    assert_eq!(points().await, 0, "the completion deleted the point");
}

/// A store on `table`, connected as the role `name`.
async fn store_as_role(name: &str, table: &str) -> PostgresStore {
    let mut config: tokio_postgres::Config = postgres_url().unwrap().parse().unwrap();
    config.user(name);
    let manager = deadpool_postgres::Manager::new(config, tokio_postgres::NoTls);
    let pool = deadpool_postgres::Pool::builder(manager)
        .max_size(2)
        .build()
        .unwrap();
    PostgresStore::new(pool).with_table(table).unwrap()
}

/// While nearly every claim finds its key (a herd of retries), a replay or a duplicate in
/// flight is answered by one plain read, as the limit route's replay: no write statement, so
/// it costs the server a read's work, and a session that may not write (a role with `SELECT`
/// only here; a standby, a primary being demoted) still answers it. A store that has seen
/// fresh keys claims in one statement, which such a session refuses.
#[tokio::test]
async fn during_a_herd_of_retries_a_replay_is_one_plain_read() {
    use std::time::Duration;
    use tower_idempotency::store::conformance::fresh_key;
    use tower_idempotency::store::{ClaimOutcome, Record, Store};
    let Some(store) = store().await else { return };
    let table = "herd_replays";
    let store = store.with_table(table).unwrap();
    store.migrate().await.unwrap();
    let lease = Duration::from_secs(30);
    let (done, running) = (fresh_key("herd-done"), fresh_key("herd-running"));
    let ClaimOutcome::Claimed(token) = store.claim(&done, lease).await.unwrap() else {
        panic!("a fresh key is claimed")
    };
    let record = Record::new(Some(7), "stored answer");
    store
        .complete(&done, &token, record.clone(), Duration::from_secs(60))
        .await
        .unwrap();
    store.claim(&running, lease).await.unwrap();

    let role = format!("herd_replayer_{}", fastrand_suffix());
    let admin = raw_client().await;
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN; \
             GRANT SELECT, INSERT, UPDATE, DELETE ON {table}, {table}_points TO {role}"
        ))
        .await
        .unwrap();
    let replayer = store_as_role(&role, table).await;
    let mut herd = Vec::new();
    for _ in 0..60 {
        herd.push(replayer.claim(&done, lease).await);
    }
    // Reading first, a fresh key is still claimed, and a lapsed claim taken over.
    let fresh = replayer.claim(&fresh_key("herd-fresh"), lease).await;
    let lapsed = fresh_key("herd-lapsed");
    store
        .claim(&lapsed, Duration::from_millis(50))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let taken_over = replayer.claim(&lapsed, lease).await;
    admin
        .batch_execute(&format!(
            "REVOKE INSERT, UPDATE, DELETE ON {table}, {table}_points FROM {role}"
        ))
        .await
        .unwrap();
    let replayed = replayer.claim(&done, lease).await;
    let in_flight = replayer.claim(&running, lease).await;
    let cold = store_as_role(&role, table).await.claim(&done, lease).await;
    drop(replayer);
    admin
        .batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role}"))
        .await
        .unwrap();

    assert!(herd
        .iter()
        .all(|outcome| matches!(outcome, Ok(ClaimOutcome::Completed(_)))));
    assert!(matches!(fresh, Ok(ClaimOutcome::Claimed(_))), "{fresh:?}");
    assert!(
        matches!(taken_over, Ok(ClaimOutcome::Claimed(_))),
        "{taken_over:?}"
    );
    match replayed {
        Ok(ClaimOutcome::Completed(replayed)) => {
            assert_eq!(replayed.payload(), record.payload());
            assert_eq!(replayed.fingerprint(), Some(7));
        }
        other => panic!("a replay during a herd is one read: {other:?}"),
    }
    assert!(
        matches!(in_flight, Ok(ClaimOutcome::InFlight { .. })),
        "a duplicate in flight is reported by the read: {in_flight:?}"
    );
    assert!(
        cold.is_err(),
        "a store that saw no herd claims in one statement, which needs INSERT: {cold:?}"
    );
}
