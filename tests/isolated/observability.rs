//! Every outcome is visible in `tracing`, as an event with an `outcome` field.

use crate::support;

use std::sync::{Arc, Mutex};

use support::*;
use tower_idempotency::IdempotencyLayer;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

#[derive(Clone, Default)]
struct Outcomes(Arc<Mutex<Vec<String>>>);

struct OutcomeVisitor<'a>(&'a mut Option<String>);

impl Visit for OutcomeVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "outcome" {
            *self.0 = Some(value.to_owned());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "outcome" {
            *self.0 = Some(format!("{value:?}").trim_matches('"').to_owned());
        }
    }
}

impl<S: tracing::Subscriber> Layer<S> for Outcomes {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let mut outcome = None;
        event.record(&mut OutcomeVisitor(&mut outcome));
        if let Some(outcome) = outcome {
            self.0.lock().unwrap().push(outcome);
        }
    }
}

impl Outcomes {
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// Sends every event and span of this thread, at every level, to `layer` until the guard drops.
fn trace_into<L>(layer: L) -> tracing::subscriber::DefaultGuard
where
    L: Layer<tracing_subscriber::Registry> + Send + Sync + 'static,
{
    let subscriber = tracing_subscriber::registry()
        .with(layer)
        .with(tracing_subscriber::filter::LevelFilter::TRACE);
    tracing::subscriber::set_default(subscriber)
}

#[tokio::test(flavor = "current_thread")]
async fn each_outcome_is_traced() {
    let outcomes = Outcomes::default();
    let _guard = trace_into(outcomes.clone());
    let store = FaultyStore::new();
    let (mut app, probe) = app(IdempotencyLayer::with_store(store.clone()));
    const BODY: &str = "{}";

    send(&mut app, request(None, BODY, &[])).await;
    assert_eq!(outcomes.take(), ["passthrough"]);
    let original = tokio::spawn({
        let mut app = app.clone();
        async move { send(&mut app, request(Some("held"), BODY, &[("x-hold", "1")])).await }
    });
    probe.started(2).await;
    send(&mut app, request(Some("held"), BODY, &[])).await;
    assert_eq!(outcomes.take(), ["claimed", "conflict"]);
    probe.release_held(1);
    original.await.unwrap();
    assert_eq!(outcomes.take(), ["stored"]);

    send(&mut app, request(Some("k"), BODY, &[])).await;
    assert_eq!(outcomes.take(), ["claimed", "stored"]);
    send(&mut app, request(Some("k"), BODY, &[])).await;
    assert_eq!(outcomes.take(), ["replayed"]);
    send(&mut app, request(Some("k"), "other", &[])).await;
    assert_eq!(outcomes.take(), ["mismatch"]);
    send(&mut app, request(Some("bad key"), BODY, &[])).await;
    assert_eq!(outcomes.take(), ["invalid_key"]);
    send(&mut app, request(Some("e"), BODY, &[("x-status", "500")])).await;
    assert_eq!(outcomes.take(), ["claimed", "not_stored"]);
    send(
        &mut app,
        request(Some("big"), BODY, &[("x-response-bytes", "9000000")]),
    )
    .await;
    assert_eq!(outcomes.take(), ["claimed", "body_omitted", "stored"]);
    store.set(Fault::Fail);
    send(&mut app, request(Some("s"), BODY, &[])).await;
    assert_eq!(outcomes.take(), ["store_error"]);
}

/// An event's outcome, and the `key` of the `idempotency` span it happened in.
type Seen = (String, Option<String>);

/// Every event with an outcome, as [`Seen`].
#[derive(Clone, Default)]
struct InSpan(Arc<Mutex<Vec<Seen>>>);

struct KeyField(String);

struct KeyVisitor<'a>(&'a mut Option<String>);

impl Visit for KeyVisitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "key" {
            *self.0 = Some(format!("{value:?}"));
        }
    }
}

impl<S> Layer<S> for InSpan
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: Context<'_, S>,
    ) {
        let mut key = None;
        attrs.record(&mut KeyVisitor(&mut key));
        if let (Some(key), Some(span)) = (key, ctx.span(id)) {
            span.extensions_mut().insert(KeyField(key));
        }
    }

    fn on_event(&self, event: &tracing::Event<'_>, ctx: Context<'_, S>) {
        let mut outcome = None;
        event.record(&mut OutcomeVisitor(&mut outcome));
        if let Some(outcome) = outcome {
            let key = ctx.event_span(event).and_then(|span| {
                (span.name() == "idempotency")
                    .then(|| span.extensions().get::<KeyField>().map(|k| k.0.clone()))
                    .flatten()
            });
            self.0.lock().unwrap().push((outcome, key));
        }
    }
}

/// Every event of a keyed request, from its claim to its end (a stored response, a replay, a
/// panic), is logged inside the request's `idempotency` span, which names its store key.
#[tokio::test(flavor = "current_thread")]
async fn a_keyed_requests_events_are_inside_its_span() {
    let seen = InSpan::default();
    let _guard = trace_into(seen.clone());
    let (mut app, _probe) = app(IdempotencyLayer::new());
    let take = || std::mem::take(&mut *seen.0.lock().unwrap());
    let key_of = |key: &str| {
        Some(tower_idempotency::admin::http_key(
            "",
            &http::Method::POST,
            "/payments",
            key,
        ))
    };

    send(&mut app, request(Some("k"), "{}", &[])).await;
    send(&mut app, request(Some("k"), "{}", &[])).await;
    let k = key_of("k");
    assert_eq!(
        take(),
        [
            ("claimed".to_owned(), k.clone()),
            ("stored".to_owned(), k.clone()),
            ("replayed".to_owned(), k)
        ]
    );
    send(&mut app, request(Some("p"), "{}", &[("x-panic", "1")]))
        .await
        .assert_problem(500, "handler-panicked");
    let p = key_of("p");
    let events = take();
    assert!(!events.is_empty());
    for (outcome, key) in &events {
        assert_eq!(key, &p, "{outcome} logged outside its span");
    }
    assert!(
        events.iter().any(|(outcome, _)| outcome == "not_stored"),
        "{events:?}"
    );
}
