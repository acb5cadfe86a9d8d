//! What a Redis server ran and wrote, for tests that count a store's commands: `INFO
//! commandstats`, `rdb_changes_since_last_save`, and their reset.

use std::collections::BTreeMap;

use super::servers::raw_redis;

/// Every command the server ran since its last `CONFIG RESETSTAT`, by name (`INFO
/// commandstats`, which counts a script's `EVALSHA` and each command it runs), without the
/// tests' own (`INFO`, `CONFIG`, `CLIENT`, `HELLO`, `SAVE`).
pub async fn commands(url: &str) -> BTreeMap<String, u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut raw_redis(url).await)
        .await
        .unwrap();
    info.lines()
        .filter_map(|line| line.strip_prefix("cmdstat_"))
        .filter_map(|line| {
            let (name, fields) = line.split_once(':')?;
            let calls = fields.split(',').find_map(|f| f.strip_prefix("calls="))?;
            Some((name.to_owned(), calls.parse().ok()?))
        })
        .filter(|(name, _)| {
            !["info", "config", "client", "hello", "save"]
                .iter()
                .any(|c| name.starts_with(c))
        })
        .collect()
}

/// Resets the command counts and the count of writes (a `SAVE` of the test's small data).
pub async fn reset_stats(url: &str) {
    let mut connection = raw_redis(url).await;
    let () = redis::cmd("SAVE")
        .query_async(&mut connection)
        .await
        .unwrap();
    let () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut connection)
        .await
        .unwrap();
}

/// The changes to the data since the last `SAVE` (`rdb_changes_since_last_save`: every write
/// that changed something, and no command that changed nothing); [`reset_stats`] saves.
pub async fn writes(url: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("persistence")
        .query_async(&mut raw_redis(url).await)
        .await
        .unwrap();
    info.lines()
        .find_map(|line| line.strip_prefix("rdb_changes_since_last_save:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap()
}
