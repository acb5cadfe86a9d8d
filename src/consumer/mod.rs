//! Idempotent message consumers (feature `consumer`): the same guarantee for event pipelines.
//!
//! Brokers deliver at least once: after a consumer crash, a rebalance or a missed ack, the same
//! message arrives again, and a handler that charges a card must not charge twice.
//! [`IdempotentConsumerLayer`] wraps any `Service<M>` (your handler) and drives the same
//! claim → complete | release protocol, against the same [`Store`](crate::store::Store)s, as the HTTP layer:
//!
//! | delivery | what happens | the service answers |
//! |---|---|---|
//! | first | key claimed (lease renewed while the handler runs), handler run, its outcome stored (serde JSON) for the TTL | `Delivery::Processed(outcome)` |
//! | redelivery after completion | handler **not** run | `Delivery::Duplicate(outcome)`, the stored outcome |
//! | redelivery while the first still runs | handler not run | `Delivery::InProgress`: nack / requeue it [or, with `OnConflict::Wait`, wait for the outcome] |
//! | handler error | claim released, so the broker's redelivery runs it again | `Err(ConsumerError::Handler)` |
//! | handler error that [`final_errors`] says is final | the error's text is stored as the outcome | `Err(ConsumerError::Handler)`, then `Delivery::DuplicateFailed(text)` on redelivery |
//! | same key, other fingerprint | handler not run | `Err(ConsumerError::KeyReused)` |
//! | store down or slow | handler not run | `Err(ConsumerError::Store)`: do not ack |
//! | handler panics | claim released, so the redelivery runs it again | `Err(ConsumerError::Panicked)` |
//! | the delivery's future is dropped after the claim (a timeout around it, the loop moved on) | the handler finishes in the background and its outcome is stored | (nothing: the caller is gone); the redelivery gets `Delivery::Duplicate` |
//!
//! A message names its key (and, optionally, a scope and a fingerprint) through a closure or
//! by implementing [`IdempotentMessage`]:
//!
//! ```
//! use std::convert::Infallible;
//! use serde::{Deserialize, Serialize};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_idempotency::consumer::{Delivery, IdempotentConsumerLayer};
//!
//! #[derive(Clone)]
//! struct PaymentRequested { event_id: String, amount: u64 }
//!
//! #[derive(Serialize, Deserialize, Debug, PartialEq)]
//! struct Charged { charge_id: String }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let consumer = ServiceBuilder::new()
//!     .layer(IdempotentConsumerLayer::new(|m: &PaymentRequested| m.event_id.clone()))
//!     .service(service_fn(|m: PaymentRequested| async move {
//!         Ok::<_, Infallible>(Charged { charge_id: format!("ch_{}", m.amount) })
//!     }));
//!
//! let event = PaymentRequested { event_id: "evt_1".into(), amount: 500 };
//! let first = consumer.clone().oneshot(event.clone()).await.unwrap();
//! assert_eq!(first, Delivery::Processed(Charged { charge_id: "ch_500".into() }));
//! let again = consumer.clone().oneshot(event).await.unwrap();
//! assert_eq!(again, Delivery::Duplicate(Charged { charge_id: "ch_500".into() }));
//! # }
//! ```
//!
//! `examples/stream_consumer.rs` runs a consumer group on a Redis Stream with this layer and the
//! Redis store; the guide `docs/consumers.md` shows how to adapt it to Kafka, NATS or RabbitMQ.
//!
//! [`final_errors`]: IdempotentConsumerLayer::final_errors

mod error;
pub(crate) mod identity;
mod layer;
mod service;

pub use error::{ConsumerError, Delivery};
pub use identity::{FromMessage, IdempotentMessage, Identify, Identity};
pub use layer::IdempotentConsumerLayer;
pub use service::{ConsumerFuture, IdempotentConsumer};
