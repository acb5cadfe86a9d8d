//! The shared stores a bench measures when their servers are there: Redis and PostgreSQL,
//! started by `servers` (or taken from `REDIS_URL` / `DATABASE_URL`), skipped with a line
//! otherwise. Used by `stores.rs` and `consumer.rs`.

use tower_idempotency::store::{PostgresStore, RedisStore};

use crate::servers;

/// A connected `RedisStore` and a migrated `PostgresStore`, each when its server is reachable;
/// says which were skipped, under `group`.
pub fn fleet_stores(
    rt: &tokio::runtime::Runtime,
    group: &str,
) -> (Option<RedisStore>, Option<PostgresStore>) {
    // Benchmarks skip rather than fail when a server is missing, even under CI.
    std::env::remove_var("CI");
    let redis = servers::redis_url().map(|url| rt.block_on(RedisStore::connect(&url)).unwrap());
    if redis.is_none() {
        eprintln!("{group}/redis: skipped, no redis-server and no REDIS_URL");
    }
    let postgres = servers::postgres_url().map(|url| {
        rt.block_on(async {
            let store = PostgresStore::connect(&url).await.unwrap();
            store.migrate().await.unwrap();
            store
        })
    });
    if postgres.is_none() {
        eprintln!("{group}/postgres: skipped, no PostgreSQL and no DATABASE_URL");
    }
    (redis, postgres)
}
