//! Recovery points: a retry after a crash (or a failed run) resumes from the point the earlier
//! run saved instead of repeating its side effect. In process through the layer and the
//! consumer, and with real demo processes crashed by `kill -9` and by `abort()` on every store.

use crate::support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::routing::post;
use axum::{Extension, Router};
use support::demo::Demo;
use support::servers::{postgres_url, redis_url, TempDir};
use support::{request, send, Fault, FaultyStore};
use tower_idempotency::store::{
    ClaimOutcome, KeyState, MemoryStore, OwnerToken, Record, RecoveryPoint, Store, StoreError,
};
use tower_idempotency::{IdempotencyLayer, RecoveryError, RecoveryPoints, Settings};

/// What the handler found and did, per run.
#[derive(Clone, Default)]
struct Runs(Arc<Mutex<Vec<String>>>);

/// A handler that reports the point it found, then saves `x-save` (when given) and answers
/// `x-status`.
fn app<St: Store + Clone>(layer: IdempotencyLayer<St>, runs: Runs) -> support::App<St> {
    let handler = move |Extension(points): Extension<RecoveryPoints>,
                        headers: axum::http::HeaderMap| {
        let runs = runs.clone();
        async move {
            let header = |name: &str| headers.get(name).map(|v| v.to_str().unwrap().to_owned());
            if let Some(phase) = header("x-save-first") {
                let saved = points.save(phase, "data").await;
                runs.0.lock().unwrap().push(match saved {
                    Ok(()) => "save-first saved".to_owned(),
                    Err(error) => format!("save-first error: {error:?}"),
                });
                return (axum::http::StatusCode::CREATED, "{}");
            }
            let found = match points.load().await {
                Ok(Some(point)) => format!(
                    "{}={}",
                    point.phase(),
                    String::from_utf8_lossy(point.data())
                ),
                Ok(None) => "none".to_owned(),
                Err(error) => format!("load error: {error}"),
            };
            let saved = match header("x-save-bytes") {
                Some(n) => match points.save("big", vec![b'x'; n.parse().unwrap()]).await {
                    Ok(()) => "saved".to_owned(),
                    Err(error @ RecoveryError::TooLarge { .. }) => format!("refused: {error}"),
                    Err(error) => format!("error: {error}"),
                },
                None => match header("x-save") {
                    Some(phase) => match points.save(phase, "data").await {
                        Ok(()) => "saved".to_owned(),
                        Err(error) => format!("error: {error:?}"),
                    },
                    None => "nothing".to_owned(),
                },
            };
            runs.0.lock().unwrap().push(format!("{found}; {saved}"));
            if header("x-panic").is_some() {
                panic!("the handler failed after its side effect");
            }
            let status = header("x-status").map_or(201, |s| s.parse().unwrap());
            (axum::http::StatusCode::from_u16(status).unwrap(), "{}")
        }
    };
    let router = Router::new().route("/payments", post(handler));
    tower::Layer::layer(&layer, router)
}

#[tokio::test]
async fn a_point_saved_by_a_failed_run_is_read_by_the_retry() {
    let runs = Runs::default();
    let mut app = app(IdempotencyLayer::new(), runs.clone());
    let failed = send(
        &mut app,
        request(
            Some("k"),
            "{}",
            &[("x-save", "charged"), ("x-status", "500")],
        ),
    )
    .await;
    assert_eq!(failed.status, 500);
    let retry = send(&mut app, request(Some("k"), "{}", &[])).await;
    assert_eq!(retry.status, 201);
    assert!(send(&mut app, request(Some("k"), "{}", &[]))
        .await
        .replayed());
    let runs = runs.0.lock().unwrap().clone();
    assert_eq!(runs, ["none; saved", "charged=data; nothing"]);
}

/// An oversized point is refused whole (nothing saved, nothing cut); since the run had done
/// its side effect, its 500 is kept (replayed) rather than the key released.
#[tokio::test]
async fn an_oversized_point_is_refused_and_the_run_is_kept() {
    let runs = Runs::default();
    let layer = IdempotencyLayer::with_settings(Settings::default().max_recovery_point(1000));
    let mut app = app(layer, runs.clone());
    let failed = send(
        &mut app,
        request(
            Some("k"),
            "{}",
            &[("x-save-bytes", "2000"), ("x-status", "500")],
        ),
    )
    .await;
    assert_eq!(failed.status, 500);
    let retry = send(&mut app, request(Some("k"), "{}", &[])).await;
    assert_eq!(retry.status, 500);
    assert!(retry.replayed(), "the failed save kept the run's answer");
    let runs = runs.0.lock().unwrap().clone();
    assert_eq!(runs.len(), 1, "the handler ran once: {runs:?}");
    assert!(
        runs[0].contains("refused: recovery point of 2003 bytes is over the limit of 1000 bytes"),
        "{runs:?}"
    );
}

/// A request that reuses a key with another payload never sees the point an earlier run of
/// the key saved: 422 `#key-reused`, whatever the handler answered, and the point stays for
/// the request that saved it.
#[tokio::test]
async fn a_point_is_refused_to_a_request_with_another_payload() {
    let runs = Runs::default();
    let mut app = app(IdempotencyLayer::new(), runs.clone());
    let original = r#"{"amount": 1, "currency": "usd"}"#;
    let failed = send(
        &mut app,
        request(
            Some("k"),
            original,
            &[("x-save", "charged"), ("x-status", "500")],
        ),
    )
    .await;
    assert_eq!(failed.status, 500);
    let other = send(
        &mut app,
        request(Some("k"), r#"{"amount": 500, "currency": "eur"}"#, &[]),
    )
    .await;
    assert_eq!(other.status, 422);
    assert_eq!(
        other.json()["type"].as_str().unwrap(),
        tower_idempotency::problem::ProblemKind::KeyReused.type_uri()
    );
    let retry = send(&mut app, request(Some("k"), original, &[])).await;
    assert_eq!(retry.status, 201, "the original payload resumes");
    let runs = runs.0.lock().unwrap().clone();
    assert_eq!(runs.len(), 3);
    assert!(
        runs[1].starts_with("load error: this idempotency key's recovery point belongs to a request with another payload"),
        "{runs:?}"
    );
    assert_eq!(runs[2], "charged=data; nothing", "{runs:?}");
}

/// A run that saves without loading first cannot overwrite the point of a request with
/// another payload.
#[tokio::test]
async fn a_save_never_overwrites_another_payloads_point() {
    let runs = Runs::default();
    let mut app = app(IdempotencyLayer::new(), runs.clone());
    let original = r#"{"amount": 1}"#;
    let failed = send(
        &mut app,
        request(
            Some("k"),
            original,
            &[("x-save", "charged"), ("x-status", "500")],
        ),
    )
    .await;
    assert_eq!(failed.status, 500);
    // This run's handler saves before it loads.
    let overwrite = send(
        &mut app,
        request(
            Some("k"),
            r#"{"amount": 2}"#,
            &[("x-save-first", "shipped")],
        ),
    )
    .await;
    assert_eq!(overwrite.status, 422);
    let retry = send(&mut app, request(Some("k"), original, &[])).await;
    assert_eq!(retry.status, 201);
    let runs = runs.0.lock().unwrap().clone();
    assert!(
        runs[1].starts_with("save-first error: KeyReused"),
        "{runs:?}"
    );
    assert_eq!(
        runs[2], "charged=data; nothing",
        "the original's point: {runs:?}"
    );
}

/// When a save fails after the side effect, the key is kept: the handler's 503 is stored and
/// replayed, and the retry does not run the side effect again.
#[tokio::test]
async fn a_failed_save_keeps_the_runs_answer_instead_of_releasing_the_key() {
    let runs = Runs::default();
    let store = FaultyStore::new();
    store.set(Fault::FailPointSaves);
    let mut app = app(IdempotencyLayer::with_store(store), runs.clone());
    let failed = send(
        &mut app,
        request(
            Some("k"),
            "{}",
            &[("x-save", "charged"), ("x-status", "503")],
        ),
    )
    .await;
    assert_eq!(failed.status, 503);
    let retry = send(&mut app, request(Some("k"), "{}", &[])).await;
    assert_eq!(retry.status, 503);
    assert!(retry.replayed());
    assert_eq!(runs.0.lock().unwrap().len(), 1, "the handler ran once");
}

/// A panic after a failed save stores 500 `#progress-unsaved`: no retry runs the work again.
#[tokio::test]
async fn a_panic_after_a_failed_save_is_kept_as_progress_unsaved() {
    let runs = Runs::default();
    let store = FaultyStore::new();
    store.set(Fault::FailPointSaves);
    let mut app = app(IdempotencyLayer::with_store(store), runs.clone());
    let failed = send(
        &mut app,
        request(Some("k"), "{}", &[("x-save", "charged"), ("x-panic", "1")]),
    )
    .await;
    assert_eq!(failed.status, 500);
    let kind = tower_idempotency::problem::ProblemKind::ProgressUnsaved;
    assert_eq!(failed.json()["type"].as_str().unwrap(), kind.type_uri());
    let retry = send(&mut app, request(Some("k"), "{}", &[])).await;
    assert!(retry.replayed());
    assert_eq!(retry.json()["type"].as_str().unwrap(), kind.type_uri());
    assert_eq!(runs.0.lock().unwrap().len(), 1, "the handler ran once");
}

#[tokio::test]
async fn a_store_without_points_says_so() {
    let runs = Runs::default();
    let mut app = app(
        IdempotencyLayer::with_store(FaultyStore::new()),
        runs.clone(),
    );
    send(&mut app, request(Some("k"), "{}", &[("x-save", "charged")])).await;
    let runs = runs.0.lock().unwrap().clone();
    assert_eq!(
        runs,
        ["load error: the idempotency store does not keep recovery points; error: Unsupported"]
    );
}

/// A message handler that crashed after its side effect (here: failed after saving) resumes
/// from its point on redelivery.
#[tokio::test]
async fn a_consumer_resumes_from_its_point_on_redelivery() {
    use tower::{service_fn, BoxError, ServiceExt};
    use tower_idempotency::consumer::{ConsumerError, IdempotentConsumerLayer, Identity};
    let effects = Arc::new(Mutex::new(0));
    let handler = service_fn({
        let effects = effects.clone();
        move |fail: bool| {
            let effects = effects.clone();
            async move {
                let points = RecoveryPoints::current().expect("inside the consumer layer");
                if points.load().await?.is_none() {
                    *effects.lock().unwrap() += 1;
                    points.save("shipped", "parcel-1").await?;
                }
                if fail {
                    return Err::<u32, BoxError>("the warehouse answered 500".into());
                }
                Ok(*effects.lock().unwrap())
            }
        }
    });
    let layer = IdempotentConsumerLayer::new(|_: &bool| Identity::new("order-1"));
    let consumer = tower::Layer::layer(&layer, handler);
    assert!(matches!(
        consumer.clone().oneshot(true).await,
        Err(ConsumerError::Handler(_))
    ));
    let redelivered = consumer.oneshot(false).await.unwrap();
    assert!(redelivered.ran());
    assert_eq!(*effects.lock().unwrap(), 1, "shipped once");
    assert!(RecoveryPoints::current().is_none(), "only inside a handler");
}

/// A store with one flaw in its recovery points, to show that a conformance check finds it;
/// claims and records are the memory store's, per key.
#[derive(Clone)]
struct FlawedPointStore {
    inner: MemoryStore,
    points: Arc<Mutex<HashMap<String, RecoveryPoint>>>,
    flaw: Flaw,
}

#[derive(Clone, Copy, PartialEq)]
enum Flaw {
    /// Saves ignore the owner token.
    Unfenced,
    /// Each point is kept under its key's Redis hash tag alone (the text between the first `{`
    /// and the next `}`, when not empty), as the Redis store once named point keys: keys
    /// sharing a tag share a point.
    NamedByTag,
}

impl FlawedPointStore {
    fn new(flaw: Flaw) -> Self {
        Self {
            inner: MemoryStore::new(),
            points: Arc::default(),
            flaw,
        }
    }

    fn point_key(&self, key: &str) -> String {
        if self.flaw == Flaw::Unfenced {
            return key.to_owned();
        }
        let tag = key.find('{').and_then(|open| {
            let rest = &key[open + 1..];
            rest.find('}')
                .filter(|&close| close > 0)
                .map(|close| &rest[..close])
        });
        format!("{{{}}}:point", tag.unwrap_or(key))
    }
}

impl Store for FlawedPointStore {
    async fn claim_as(
        &self,
        key: &str,
        token: &OwnerToken,
        lease: Duration,
    ) -> Result<ClaimOutcome, StoreError> {
        self.inner.claim_as(key, token, lease).await
    }
    async fn renew(
        &self,
        key: &str,
        token: &OwnerToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.inner.renew(key, token, lease).await
    }
    async fn complete(
        &self,
        key: &str,
        token: &OwnerToken,
        record: Record,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.inner.complete(key, token, record, ttl).await?;
        if self.flaw == Flaw::NamedByTag {
            self.points.lock().unwrap().remove(&self.point_key(key));
        }
        Ok(())
    }
    async fn release(&self, key: &str, token: &OwnerToken) -> Result<(), StoreError> {
        self.inner.release(key, token).await
    }
    async fn inspect(&self, key: &str) -> Result<KeyState, StoreError> {
        self.inner.inspect(key).await
    }
    async fn save_point(
        &self,
        key: &str,
        token: &OwnerToken,
        point: &RecoveryPoint,
        _ttl: Duration,
    ) -> Result<(), StoreError> {
        if self.flaw != Flaw::Unfenced {
            // Fenced: only the claim's owner saves (the memory store's read checks the owner
            // without renewing the lease).
            self.inner.load_point(key, token).await?;
        }
        self.points
            .lock()
            .unwrap()
            .insert(self.point_key(key), point.clone());
        Ok(())
    }
    async fn load_point(
        &self,
        key: &str,
        token: &OwnerToken,
    ) -> Result<Option<RecoveryPoint>, StoreError> {
        if self.flaw == Flaw::Unfenced {
            self.inner
                .renew(key, token, Duration::from_secs(30))
                .await?;
        } else {
            self.inner.load_point(key, token).await?;
        }
        Ok(self
            .points
            .lock()
            .unwrap()
            .get(&self.point_key(key))
            .cloned())
    }
}

#[tokio::test]
async fn the_fencing_check_fails_on_a_store_that_ignores_the_owner() {
    use tower_idempotency::store::conformance;
    let store = FlawedPointStore::new(Flaw::Unfenced);
    let check = tokio::spawn(async move {
        conformance::recovery_points_are_fenced_by_the_owner(&store).await;
    });
    let failed = check.await.expect_err("the check must fail");
    assert!(failed.is_panic());
    // And the fencing store passes it.
    conformance::recovery_points_are_fenced_by_the_owner(&MemoryStore::new()).await;
}

#[tokio::test]
async fn the_adversarial_keys_check_fails_on_a_store_that_names_points_by_hash_tag() {
    use tower_idempotency::store::conformance;
    let store = FlawedPointStore::new(Flaw::NamedByTag);
    let check = tokio::spawn(async move {
        conformance::adversarial_keys_share_nothing(&store).await;
    });
    let failed = check.await.expect_err("the check must fail");
    assert!(failed.is_panic());
    // The other point checks do not notice: each uses one fresh key.
    let store = FlawedPointStore::new(Flaw::NamedByTag);
    conformance::recovery_points_survive_a_release(&store).await;
    conformance::recovery_points_are_fenced_by_the_owner(&store).await;
    // And the memory store passes it.
    conformance::adversarial_keys_share_nothing(&MemoryStore::new()).await;
}

// Real processes: the demo charges its simulated provider, saves a point, and crashes.

const LEDGER: &str = "ledger.txt";

fn charges(dir: &TempDir) -> Vec<String> {
    std::fs::read_to_string(dir.path().join(LEDGER))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn demo_args<'a>(store: &'a str, ledger: &'a str) -> Vec<&'a str> {
    vec![
        "--store",
        store,
        "--lock-ttl",
        "1",
        "--provider-ledger",
        ledger,
    ]
}

/// Retries `body` until the original's lease lapsed (409 until then): the answer.
async fn retry_after_the_lease(demo: &Demo, key: &str, body: &str) -> support::demo::Reply {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let reply = demo
            .try_post("acme", key, body)
            .await
            .expect("the restarted demo answers");
        if reply.status != 409 {
            return reply;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the lease never lapsed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The demo charges, saves its point and dies (`crash`: abort() by the fault flag, or
/// `kill -9` during the delay after the charge); a new demo on the same store answers the
/// retry with the first charge, and charges nothing.
async fn a_crash_after_the_charge_does_not_charge_again(store: &str, kill_9: bool) {
    let dir = TempDir::new("recovery");
    let ledger = dir.path().join(LEDGER).display().to_string();
    let key = tower_idempotency::store::conformance::fresh_key("crash").replace('/', "-");
    let body = if kill_9 {
        r#"{"amount": 1000, "currency": "usd", "delay_ms": 2000}"#
    } else {
        r#"{"amount": 1000, "currency": "usd", "crash_after_charge": true}"#
    };
    let mut first = Demo::start(&demo_args(store, &ledger)).await;
    if kill_9 {
        let sent = tokio::spawn({
            let (base, key, body) = (first.base.clone(), key.clone(), body.to_owned());
            async move {
                let _ = support::demo::try_post_to(&base, "acme", &key, &body).await;
            }
        });
        while charges(&dir).is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The point is saved right after the charge is written.
        tokio::time::sleep(Duration::from_millis(200)).await;
        first.kill();
        let _ = sent.await;
    } else {
        let crashed = first.try_post("acme", &key, body).await;
        assert!(
            crashed.is_err(),
            "the demo aborted mid-request: {:?}",
            crashed.map(|r| r.status)
        );
    }
    assert_eq!(charges(&dir).len(), 1, "the first run charged");
    let second = Demo::start(&demo_args(store, &ledger)).await;
    // Another payload under the crashed run's key never inherits its charge.
    let other = retry_after_the_lease(&second, &key, r#"{"amount": 9, "currency": "eur"}"#).await;
    assert_eq!(
        other.status,
        422,
        "{:?}",
        String::from_utf8_lossy(&other.body)
    );
    let retry = retry_after_the_lease(&second, &key, body).await;
    assert_eq!(retry.status, 201, "{:?}", retry.body);
    let payment: serde_json::Value = serde_json::from_slice(&retry.body).unwrap();
    let ledger = charges(&dir);
    assert_eq!(ledger.len(), 1, "charged once in all: {ledger:?}");
    assert_eq!(
        payment["charge"], ledger[0],
        "the retry reuses the first charge"
    );
    assert_eq!(second.stats().await["provider_charges"], 0);
    let again = second.try_post("acme", &key, body).await.unwrap();
    assert!(again.replayed());
    assert_eq!(again.body, retry.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_crash_after_the_charge_does_not_charge_again() {
    let Some(url) = redis_url() else { return };
    a_crash_after_the_charge_does_not_charge_again(&url, false).await;
    a_crash_after_the_charge_does_not_charge_again(&url, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_crash_after_the_charge_does_not_charge_again() {
    let Some(url) = postgres_url() else { return };
    a_crash_after_the_charge_does_not_charge_again(&url, false).await;
    a_crash_after_the_charge_does_not_charge_again(&url, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_crash_after_the_charge_does_not_charge_again() {
    let dir = TempDir::new("recovery-sqlite");
    let store = format!("sqlite://{}", dir.path().join("db.sqlite").display());
    a_crash_after_the_charge_does_not_charge_again(&store, false).await;
    a_crash_after_the_charge_does_not_charge_again(&store, true).await;
}

/// Issue 42, case 1, with real processes on Redis: tenant acme's key `order-{T}` charges, saves
/// its point and the demo aborts; tenant mallory's fresh request with the key `x-{T}` (the same
/// hash tag) charges for itself instead of answering with acme's charge; and acme's retry
/// resumes from its own point, so each payment is charged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_another_tenants_key_sharing_a_hash_tag_never_finds_the_point() {
    let Some(url) = redis_url() else { return };
    let dir = TempDir::new("recovery-tags");
    let ledger = dir.path().join(LEDGER).display().to_string();
    let tag = format!("{:016x}", fastrand::u64(..));
    let (acme_key, mallory_key) = (format!("order-{{{tag}}}"), format!("x-{{{tag}}}"));
    let acme_body = r#"{"amount": 1000, "currency": "usd", "crash_after_charge": true}"#;
    let first = Demo::start(&demo_args(&url, &ledger)).await;
    assert!(first.try_post("acme", &acme_key, acme_body).await.is_err());
    assert_eq!(charges(&dir).len(), 1, "acme was charged");
    let second = Demo::start(&demo_args(&url, &ledger)).await;
    let mallory = second
        .try_post(
            "mallory",
            &mallory_key,
            r#"{"amount": 1000, "currency": "usd"}"#,
        )
        .await
        .unwrap();
    assert_eq!(mallory.status, 201, "{:?}", mallory.body);
    let mallory: serde_json::Value = serde_json::from_slice(&mallory.body).unwrap();
    let ledger = charges(&dir);
    assert_eq!(
        ledger.len(),
        2,
        "mallory's payment charged for itself: {ledger:?}"
    );
    assert_eq!(
        mallory["charge"], ledger[1],
        "mallory got its own charge, not acme's ({})",
        ledger[0]
    );
    let retry = retry_after_the_lease(&second, &acme_key, acme_body).await;
    assert_eq!(retry.status, 201, "{:?}", retry.body);
    let acme: serde_json::Value = serde_json::from_slice(&retry.body).unwrap();
    assert_eq!(
        acme["charge"], ledger[0],
        "acme's retry resumed from its point"
    );
    assert_eq!(charges(&dir).len(), 2, "charged once each");
}

/// On the memory store a restart loses everything, so there: a run that failed after charging
/// (500, its key released) leaves its point to the retry in the same process.
#[tokio::test]
async fn memory_a_failed_run_after_the_charge_does_not_charge_again() {
    let dir = TempDir::new("recovery-memory");
    let ledger = dir.path().join(LEDGER).display().to_string();
    let demo = Demo::start(&demo_args("memory", &ledger)).await;
    let failed = demo
        .post(
            "acme",
            Some("pay-1"),
            r#"{"amount": 5, "currency": "usd", "fail": true}"#,
        )
        .await;
    assert_eq!(failed.status, 500);
    // The same payload: `fail` fails a key's first run only.
    let body = r#"{"amount": 5, "currency": "usd", "fail": true}"#;
    let retry = demo.post("acme", Some("pay-1"), body).await;
    assert_eq!(retry.status, 201);
    let payment: serde_json::Value = serde_json::from_slice(&retry.body).unwrap();
    assert_eq!(charges(&dir), [payment["charge"].as_str().unwrap()]);
    assert_eq!(demo.stats().await["provider_charges"], 1);
    assert!(demo.post("acme", Some("pay-1"), body).await.replayed());
}

/// A run that charged and failed leaves its point bound to its payload: a request with the
/// same key and another payload is refused 422 and charges nothing; the original payload's
/// retry then resumes from the point (one charge in all).
async fn a_point_never_serves_another_payload(store: &str) {
    let dir = TempDir::new("recovery-payload");
    let ledger = dir.path().join(LEDGER).display().to_string();
    let demo = Demo::start(&demo_args(store, &ledger)).await;
    let key = tower_idempotency::store::conformance::fresh_key("payload").replace('/', "-");
    let original = r#"{"amount": 1, "currency": "usd", "fail": true}"#;
    let failed = demo.post("acme", Some(&key), original).await;
    assert_eq!(failed.status, 500);
    assert_eq!(charges(&dir).len(), 1);
    let other = demo
        .post("acme", Some(&key), r#"{"amount": 500, "currency": "eur"}"#)
        .await;
    assert_eq!(
        other.status,
        422,
        "{:?}",
        String::from_utf8_lossy(&other.body)
    );
    assert_eq!(charges(&dir).len(), 1, "the other payload charged nothing");
    let retry = demo.post("acme", Some(&key), original).await;
    assert_eq!(
        retry.status,
        201,
        "{:?}",
        String::from_utf8_lossy(&retry.body)
    );
    let payment: serde_json::Value = serde_json::from_slice(&retry.body).unwrap();
    assert_eq!(charges(&dir), [payment["charge"].as_str().unwrap()]);
    assert_eq!(payment["amount"], 1);
}

#[tokio::test]
async fn memory_a_point_never_serves_another_payload() {
    a_point_never_serves_another_payload("memory").await;
}

#[tokio::test]
async fn sqlite_a_point_never_serves_another_payload() {
    let dir = TempDir::new("recovery-payload-sqlite");
    let store = format!("sqlite://{}", dir.path().join("db.sqlite").display());
    a_point_never_serves_another_payload(&store).await;
}

#[tokio::test]
async fn redis_a_point_never_serves_another_payload() {
    let Some(url) = redis_url() else { return };
    a_point_never_serves_another_payload(&url).await;
}

#[tokio::test]
async fn postgres_a_point_never_serves_another_payload() {
    let Some(url) = postgres_url() else { return };
    a_point_never_serves_another_payload(&url).await;
}

/// A redelivery with another payload never sees the point a message handler saved: it is
/// refused with `KeyReused`, and the original's redelivery resumes from the point.
#[tokio::test]
async fn a_consumer_redelivery_with_another_payload_is_refused() {
    use tower::{service_fn, BoxError, ServiceExt};
    use tower_idempotency::consumer::{ConsumerError, IdempotentConsumerLayer, Identity};
    let effects = Arc::new(Mutex::new(0));
    let handler = service_fn({
        let effects = effects.clone();
        move |(_amount, fail): (u32, bool)| {
            let effects = effects.clone();
            async move {
                let points = RecoveryPoints::current().expect("inside the consumer layer");
                if points.load().await?.is_none() {
                    *effects.lock().unwrap() += 1;
                    points.save("shipped", "parcel-1").await?;
                }
                if fail {
                    return Err::<u32, BoxError>("the warehouse answered 500".into());
                }
                Ok(*effects.lock().unwrap())
            }
        }
    });
    let layer = IdempotentConsumerLayer::new(|(amount, _): &(u32, bool)| {
        Identity::new("order-1").fingerprint(&amount.to_be_bytes())
    });
    let consumer = tower::Layer::layer(&layer, handler);
    assert!(matches!(
        consumer.clone().oneshot((1, true)).await,
        Err(ConsumerError::Handler(_))
    ));
    assert!(matches!(
        consumer.clone().oneshot((500, false)).await,
        Err(ConsumerError::KeyReused)
    ));
    let redelivered = consumer.oneshot((1, false)).await.unwrap();
    assert!(redelivered.ran());
    assert_eq!(*effects.lock().unwrap(), 1, "shipped once");
}

/// A handler that loads a point while it still holds the request body unread is told to read
/// it first (the point is bound to the body's fingerprint); once read, it loads.
#[tokio::test]
async fn a_point_cannot_be_loaded_before_the_body_is_read() {
    use http_body_util::BodyExt;
    let handler = |request: axum::extract::Request| async move {
        let points = request
            .extensions()
            .get::<RecoveryPoints>()
            .unwrap()
            .clone();
        let early = points.load().await;
        assert!(
            matches!(early, Err(RecoveryError::RequestUnread)),
            "{early:?}"
        );
        request.into_body().collect().await.unwrap();
        assert!(matches!(points.load().await, Ok(None)));
        axum::http::StatusCode::CREATED
    };
    let router = Router::new().route("/payments", post(handler));
    let mut app = tower::Layer::layer(&IdempotencyLayer::new(), router);
    let answer = send(&mut app, request(Some("k"), "{\"amount\": 1}", &[])).await;
    assert_eq!(answer.status, 201);
}
