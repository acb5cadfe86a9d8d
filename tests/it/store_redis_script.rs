//! `RedisStore` claiming with its Lua script, as it does on a server before Redis 7.0 (which
//! refuses `SET … NX GET`): the conformance suite and the shared-store cases against a real
//! Redis, so that the fallback stays as correct as the plain command.

use crate::support;

use support::servers::redis_url;
use tower_idempotency::store::{RedisStore, Store};

async fn store() -> Option<RedisStore> {
    let url = redis_url()?;
    let store = RedisStore::connect(&url).await.expect("connect to redis");
    Some(store.claiming_by_script())
}

// The conformance suite and the cases of shared stores, on `store()`.
shared_store_suite!();

/// How often the server ran `command`.
async fn calls(url: &str, command: &str) -> u64 {
    support::servers::command_calls(url, command).await.0
}

/// The switch really selects the script: a claim is a plain `SET` without it, the script
/// with it (on a server this test owns, so that no other test's calls are counted).
#[tokio::test]
async fn a_claim_is_one_plain_set_and_the_fallback_is_the_script() {
    let Some(server) = support::servers::own_redis("count the commands of") else {
        return;
    };
    let url = server.url();
    let lease = std::time::Duration::from_secs(60);
    // Counted around each claim: connecting sends a `SET` of its own (the `IFEQ` probe).
    let plain = RedisStore::connect(&url).await.unwrap();
    let (set, evalsha) = (calls(&url, "set").await, calls(&url, "evalsha").await);
    plain.claim("by-set", lease).await.unwrap();
    assert_eq!(
        (
            calls(&url, "set").await - set,
            calls(&url, "evalsha").await - evalsha
        ),
        (1, 0)
    );
    let scripted = RedisStore::connect(&url)
        .await
        .unwrap()
        .claiming_by_script();
    let set = calls(&url, "set").await;
    scripted.claim("by-script", lease).await.unwrap();
    // The script ran one SET; EVALSHA is counted twice on a server that did not know the
    // script yet (the client loads it after the first `NOSCRIPT`).
    assert_eq!(calls(&url, "set").await - set, 1);
    assert!(calls(&url, "evalsha").await >= 1);
}
