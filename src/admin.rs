//! Operator tools: find the store key of a request, see what the store holds for it, and
//! delete it when a key is stuck or a record is wrong.
//!
//! The layer stores each request under a composite key built from the scope (tenant), the
//! method, the path and the idempotency key; [`http_key`] builds it exactly as the layer does
//! (including the digest of keys over 256 bytes), and `consumer_key` (feature `consumer`) as
//! the consumer layer does. [`Store::inspect`] and [`Store::delete`] work on every store of this crate.
//!
//! ```
//! use http::Method;
//! use tower_idempotency::admin;
//! use tower_idempotency::store::{KeyState, MemoryStore, Store};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_idempotency::store::StoreError> {
//! let store = MemoryStore::new();
//! let key = admin::http_key("acme", &Method::POST, "/payments", "order-42");
//! match store.inspect(&key).await? {
//!     KeyState::Absent => println!("never seen, released or expired"),
//!     KeyState::InFlight { lease_remaining } => println!("running; lease {lease_remaining:?}"),
//!     KeyState::Completed { record, expires_in } => println!(
//!         "answered {:?}, kept for {expires_in:?}",
//!         admin::response_status(&record)
//!     ),
//!     _ => {}
//! }
//! // A stuck claim or a wrong record: the next request with this key runs again.
//! store.delete(&key).await?;
//! # Ok(()) }
//! ```
//!
//! [`Store::inspect`]: crate::store::Store::inspect
//! [`Store::delete`]: crate::store::Store::delete

use http::StatusCode;

use crate::store::Record;

pub use crate::http::http_key;

#[cfg(feature = "consumer")]
#[cfg_attr(docsrs, doc(cfg(feature = "consumer")))]
pub use crate::consumer::identity::store_key as consumer_key;

/// The status of the response an HTTP record holds, if it is one (a consumer's record is not).
pub fn response_status(record: &Record) -> Option<StatusCode> {
    crate::http::stored_status(record)
}
