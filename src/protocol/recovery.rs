//! [`RecoveryPoints`]: a handler saves its progress under its idempotency key, so that a retry
//! after a crash resumes where the crashed run got to instead of repeating a side effect.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::store::{DynStore, OwnerToken, RecoveryPoint, Store, StoreError};

/// A handler's access to the recovery point of the key it runs under.
///
/// The layer puts one in the request's extensions (next to the
/// [`IdempotencyKey`](crate::IdempotencyKey)) of every request that runs under a claim; the
/// consumer layer makes it [`current`](Self::current) while a message handler runs. Handlers
/// that never touch it pay no store round trip.
///
/// **The model** (Brandur Leach's "atomic phases"): split the work into phases, each ending in
/// one external side effect (a charge at the payment provider, an email sent). Right after a
/// side effect, [`save`](Self::save) a point naming the phase reached and what the next phase
/// needs (the provider's charge id). A run first [`load`](Self::load)s the point: when there is
/// one, an earlier run of the same key got that far before it crashed (or failed), so this run
/// skips what the point says is done. One point per key: each save replaces the one before.
///
/// **Guarantees.** A point survives the crash of the process that saved it (its lease then
/// lapses and another run takes the key over, on any instance sharing the store) and the
/// release of a failed run (a 5xx, a panic); completing the key deletes it, and it expires
/// after the layer's TTL. A save is fenced by the claim's owner token: a run whose lease lapsed
/// and whose key another run took over gets [`RecoveryError::LeaseLost`], never overwrites the
/// newer run's point, and should stop. **Limit:** a side effect done after the last save and
/// before a crash is repeated by the retry; when the provider has idempotency keys of its own,
/// pass yours (or one derived from it) through, so that it drops the repeat.
///
/// ```
/// use axum::{extract::Extension, http::StatusCode};
/// use tower_idempotency::RecoveryPoints;
///
/// async fn create_payment(Extension(points): Extension<RecoveryPoints>) -> Result<String, StatusCode> {
///     let fail = |_| StatusCode::SERVICE_UNAVAILABLE;
///     // A run that finds a point resumes after the charge instead of charging again.
///     let charge_id = match points.load_json::<String>().await.map_err(fail)? {
///         Some((phase, charge_id)) if phase == "charged" => charge_id,
///         _ => {
///             let charge_id = charge_the_card().await;
///             points.save_json("charged", &charge_id).await.map_err(fail)?;
///             charge_id
///         }
///     };
///     Ok(format!("{{\"charge\":\"{charge_id}\"}}"))
/// }
/// # async fn charge_the_card() -> String { "ch_1".into() }
/// ```
#[derive(Clone)]
pub struct RecoveryPoints {
    /// One allocation per claimed request: the store is the last field, unsized behind the
    /// `Arc` (a boxed store would be a second one).
    inner: Arc<Inner<dyn DynStore>>,
}

struct Inner<S: ?Sized> {
    key: Arc<str>,
    token: OwnerToken,
    ttl: Duration,
    max_bytes: usize,
    timeout: Duration,
    store: S,
}

/// Why a recovery point could not be saved or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecoveryError {
    /// The point (phase and data) is over the limit (`max_recovery_point` of the settings, [`defaults::MAX_RECOVERY_POINT`](crate::defaults::MAX_RECOVERY_POINT)
    /// by default): nothing was saved. Points are progress markers, not payloads.
    #[error(
        "recovery point of {size} bytes is over the limit of {limit} bytes; nothing was saved"
    )]
    TooLarge {
        /// The point's size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// This run no longer holds its key: its lease lapsed and another run took the key over.
    /// Nothing was saved; stop, and do no further side effects.
    #[error("this run no longer holds its idempotency key (its lease lapsed and another run took it over); nothing was saved")]
    LeaseLost,
    /// The store keeps no recovery points (a custom store without `save_point`).
    #[error("the idempotency store does not keep recovery points")]
    Unsupported,
    /// The store failed or was slower than the store timeout.
    #[error("the idempotency store failed")]
    Store(#[source] StoreError),
    /// The saved data is not the JSON of the type asked for.
    #[error("the recovery point's data is not JSON of the type asked for")]
    Json(#[source] serde_json::Error),
}

impl From<super::Failure> for RecoveryError {
    fn from(failure: super::Failure) -> Self {
        match failure {
            super::Failure::Store(StoreError::LeaseLost) => RecoveryError::LeaseLost,
            super::Failure::Store(StoreError::Unsupported(_)) => RecoveryError::Unsupported,
            super::Failure::Store(error) => RecoveryError::Store(error),
            super::Failure::Timeout => {
                RecoveryError::Store(StoreError::backend("store call timed out"))
            }
        }
    }
}

tokio::task_local! {
    static CURRENT: RecoveryPoints;
}

impl RecoveryPoints {
    pub(crate) fn new<St: Store>(
        store: St,
        key: Arc<str>,
        token: OwnerToken,
        ttl: Duration,
        max_bytes: usize,
        timeout: Duration,
    ) -> Self {
        let inner: Arc<Inner<dyn DynStore>> = Arc::new(Inner {
            key,
            token,
            ttl,
            max_bytes,
            timeout,
            store,
        });
        Self { inner }
    }

    /// The recovery points of the message being handled, inside a handler run by the consumer
    /// layer (`None` elsewhere). HTTP handlers take theirs from the request extensions.
    pub fn current() -> Option<Self> {
        CURRENT.try_with(Clone::clone).ok()
    }

    /// Runs `work` with these points [`current`](Self::current).
    #[cfg(feature = "consumer")]
    pub(crate) async fn scope<F: std::future::Future>(self, work: F) -> F::Output {
        CURRENT.scope(self, work).await
    }

    /// The point an earlier run of this key saved, if any: one store round trip.
    pub async fn load(&self) -> Result<Option<RecoveryPoint>, RecoveryError> {
        let inner = &self.inner;
        let loaded = super::bounded(
            inner.timeout,
            inner.store.load_point(&inner.key, &inner.token),
        )
        .await?;
        Ok(loaded)
    }

    /// Saves the point `phase`, carrying `data`, replacing the one before: one store round
    /// trip. Refused without a write when it is over the limit, or when this run no longer
    /// holds its key.
    pub async fn save(
        &self,
        phase: impl Into<String>,
        data: impl Into<Bytes>,
    ) -> Result<(), RecoveryError> {
        let point = RecoveryPoint::new(phase, data);
        let inner = &self.inner;
        let size = point.phase().len() + point.data().len();
        if size > inner.max_bytes {
            return Err(RecoveryError::TooLarge {
                size,
                limit: inner.max_bytes,
            });
        }
        super::bounded(
            inner.timeout,
            inner
                .store
                .save_point(&inner.key, &inner.token, &point, inner.ttl),
        )
        .await?;
        Ok(())
    }

    /// [`save`](Self::save) with `value` as JSON.
    pub async fn save_json<T: Serialize + ?Sized>(
        &self,
        phase: impl Into<String>,
        value: &T,
    ) -> Result<(), RecoveryError> {
        let data = serde_json::to_vec(value).map_err(RecoveryError::Json)?;
        self.save(phase, data).await
    }

    /// [`load`](Self::load), with the data read as JSON of `T`: the phase and the value.
    pub async fn load_json<T: DeserializeOwned>(
        &self,
    ) -> Result<Option<(String, T)>, RecoveryError> {
        let Some(point) = self.load().await? else {
            return Ok(None);
        };
        let value = serde_json::from_slice(point.data()).map_err(RecoveryError::Json)?;
        Ok(Some((point.phase().to_owned(), value)))
    }
}

impl fmt::Debug for RecoveryPoints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecoveryPoints")
            .field("key", &self.inner.key)
            .field("max_bytes", &self.inner.max_bytes)
            .finish_non_exhaustive()
    }
}
