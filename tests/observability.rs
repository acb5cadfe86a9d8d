//! Every outcome is visible in `tracing`, as an event with an `outcome` field.

mod support;

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

#[tokio::test(flavor = "current_thread")]
async fn each_outcome_is_traced() {
    let outcomes = Outcomes::default();
    let subscriber = tracing_subscriber::registry()
        .with(outcomes.clone())
        .with(tracing_subscriber::filter::LevelFilter::TRACE);
    let _guard = tracing::subscriber::set_default(subscriber);
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
        request(Some("big"), BODY, &[("x-response-bytes", "2000000")]),
    )
    .await;
    assert_eq!(outcomes.take(), ["claimed", "body_omitted", "stored"]);
    store.set(Fault::Fail);
    send(&mut app, request(Some("s"), BODY, &[])).await;
    assert_eq!(outcomes.take(), ["store_error"]);
}
