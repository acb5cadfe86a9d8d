//! [`RecoveryPoints`]: a handler saves its progress under its idempotency key, so that a retry
//! after a crash resumes where the crashed run got to instead of repeating a side effect.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
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
///     // A run that finds a point resumes after the charge instead of charging again. Before
///     // any side effect, an error is safe to answer (503: nothing happened yet).
///     let loaded = points.load_json::<String>().await;
///     let charge_id = match loaded.map_err(|_| StatusCode::SERVICE_UNAVAILABLE)? {
///         Some((phase, charge_id)) if phase == "charged" => charge_id,
///         _ => {
///             let charge_id = charge_the_card().await;
///             // After the side effect, finish: the outcome the layer stores is what keeps a
///             // retry from charging again. A failed save only matters if this process dies.
///             if let Err(error) = points.save_json("charged", &charge_id).await {
///                 tracing::warn!(%error, "recovery point not saved; finishing the payment");
///             }
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
    request: RequestFingerprint,
    /// What this run learned: [`CHECKED`], [`REUSED`], [`UNSAVED`].
    state: AtomicU8,
    /// Takes the claim off a drain's list once a save failed.
    drain: Option<super::drain::KeepOnDrain>,
    store: S,
}

/// The key's point (if any) was found to be this request's own: later saves need not look.
const CHECKED: u8 = 1;
/// The key's point belongs to a request with another payload: the layer answers 422.
const REUSED: u8 = 2;
/// A save failed: a side effect of this run may be recorded nowhere, so its key is not
/// released.
const UNSAVED: u8 = 4;

/// How long a run's points are kept, how large they may be, and how long a store call may take.
pub(crate) struct PointLimits {
    pub(crate) ttl: Duration,
    pub(crate) max_bytes: usize,
    pub(crate) timeout: Duration,
}

/// The fingerprint of the request a run serves, as points are bound to it.
pub(crate) enum RequestFingerprint {
    /// Known when the run starts (the consumer's messages, a fingerprint of the head only), or
    /// `None` when fingerprints are not compared.
    Known(Option<u128>),
    /// Made as the handler reads the request body.
    Body(Arc<dyn BodyFingerprint>),
}

/// A request body's fingerprint, made as the handler reads it.
pub(crate) trait BodyFingerprint: Send + Sync {
    /// The fingerprint once the body was read to its end (a body the handler dropped unread is
    /// read out now); `None` while the handler still holds it unread, or when it failed.
    fn finished(&self) -> Pin<Box<dyn Future<Output = Option<u128>> + Send + '_>>;
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
    /// The key's recovery point was saved by a request with another payload: a side effect
    /// already happened under this key, for that request. Nothing was loaded or saved; the
    /// layer answers this request 422 `#key-reused` (the consumer layer `ConsumerError::KeyReused`)
    /// whatever the handler returns. Stop, and do no side effect.
    #[error("this idempotency key's recovery point belongs to a request with another payload; nothing was loaded or saved")]
    KeyReused,
    /// The request body is not read to its end yet, so the request's fingerprint, which points
    /// are bound to, is not known (or the body failed). Read the body before the first
    /// `load` or `save`.
    #[error("the request body must be read to its end before recovery points are used")]
    RequestUnread,
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

/// The largest point (phase and data) any limit allows: its lengths are stored in 32 bits,
/// inside an envelope whose own length is 32 bits.
const MAX_POINT: usize = u32::MAX as usize - 64;

tokio::task_local! {
    static CURRENT: RecoveryPoints;
}

impl RecoveryPoints {
    pub(crate) fn new<St: Store>(
        store: St,
        key: Arc<str>,
        token: OwnerToken,
        limits: PointLimits,
        request: RequestFingerprint,
        drain: Option<super::drain::KeepOnDrain>,
    ) -> Self {
        let PointLimits {
            ttl,
            max_bytes,
            timeout,
        } = limits;
        let inner: Arc<Inner<dyn DynStore>> = Arc::new(Inner {
            key,
            token,
            ttl,
            // A point's lengths are stored in 32 bits: no limit may let one be cut.
            max_bytes: max_bytes.min(MAX_POINT),
            timeout,
            request,
            state: AtomicU8::new(0),
            drain,
            store,
        });
        Self { inner }
    }

    /// Whether this run found the key's point bound to a request with another payload.
    pub(crate) fn reused(&self) -> bool {
        self.inner.state.load(Ordering::Acquire) & REUSED != 0
    }

    /// Whether a save of this run failed (a side effect of it may be recorded nowhere).
    pub(crate) fn unsaved(&self) -> bool {
        self.inner.state.load(Ordering::Acquire) & UNSAVED != 0
    }

    /// Whether the key's point was found to be this request's own (or absent).
    pub(crate) fn checked(&self) -> bool {
        self.inner.state.load(Ordering::Acquire) & CHECKED != 0
    }

    /// For a run whose save failed before the key's point was checked: checks it against the
    /// request's `fingerprint` (known now, the body read to its end), so that a run of another
    /// payload is refused (422) instead of having its answer stored over that point. A store
    /// that fails this check leaves the answer kept.
    pub(crate) async fn verify(&self, fingerprint: Option<u128>) {
        if !self.checked() {
            let _ = self.load_for(fingerprint).await;
        }
    }

    fn mark(&self, flag: u8) {
        self.inner.state.fetch_or(flag, Ordering::AcqRel);
        if flag == UNSAVED {
            if let Some(drain) = &self.inner.drain {
                drain.keep();
            }
        }
    }

    /// The fingerprint of the request this run serves.
    async fn request_fingerprint(&self) -> Result<Option<u128>, RecoveryError> {
        match &self.inner.request {
            RequestFingerprint::Known(fingerprint) => Ok(*fingerprint),
            RequestFingerprint::Body(body) => match body.finished().await {
                Some(fingerprint) => Ok(Some(fingerprint)),
                None => Err(RecoveryError::RequestUnread),
            },
        }
    }

    /// Reads the key's point for a request with `fingerprint`: a point saved by a request with
    /// another payload is refused (and remembered, for the layer's answer).
    async fn load_for(
        &self,
        fingerprint: Option<u128>,
    ) -> Result<Option<RecoveryPoint>, RecoveryError> {
        let inner = &self.inner;
        let loaded = super::bounded(
            inner.timeout,
            inner.store.load_point(&inner.key, &inner.token),
        )
        .await?;
        if let Some(point) = &loaded {
            if !super::same_payload(point.fingerprint(), fingerprint) {
                tracing::warn!(
                    outcome = "mismatch",
                    "the key's recovery point was saved by a request with another payload; refusing it"
                );
                self.mark(REUSED);
                return Err(RecoveryError::KeyReused);
            }
        }
        self.mark(CHECKED);
        Ok(loaded)
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

    /// The point an earlier run of this key saved, if any: one store round trip. A point saved
    /// by a request with another payload is [`RecoveryError::KeyReused`].
    pub async fn load(&self) -> Result<Option<RecoveryPoint>, RecoveryError> {
        let fingerprint = self.request_fingerprint().await?;
        self.load_for(fingerprint).await
    }

    /// Saves the point `phase`, carrying `data`, replacing the one before: one store round
    /// trip (two for a run's first save when it did not [`load`](Self::load) first: the key's
    /// point is checked to be this request's own). Refused without a write when it is over the
    /// limit, when the key's point belongs to a request with another payload, or when this run
    /// no longer holds its key.
    ///
    /// When the save fails, the layer keeps this run's outcome, whatever it is (see the type's
    /// docs): finish the work and answer.
    pub async fn save(
        &self,
        phase: impl Into<String>,
        data: impl Into<Bytes>,
    ) -> Result<(), RecoveryError> {
        let result = self.save_point(RecoveryPoint::new(phase, data)).await;
        self.noted(result)
    }

    /// Remembers a save that failed after a side effect (anything but a lost lease, whose key
    /// is another run's now, and another payload's point, which the layer answers 422).
    fn noted(&self, result: Result<(), RecoveryError>) -> Result<(), RecoveryError> {
        match &result {
            Ok(()) | Err(RecoveryError::LeaseLost | RecoveryError::KeyReused) => {}
            Err(error) => {
                tracing::error!(%error, "recovery point not saved; this run's outcome will be kept whatever it is");
                self.mark(UNSAVED);
            }
        }
        result
    }

    async fn save_point(&self, point: RecoveryPoint) -> Result<(), RecoveryError> {
        let inner = &self.inner;
        let fingerprint = self.request_fingerprint().await?;
        if !self.checked() {
            // The key's point may be another request's: never overwrite it (and say so before
            // any other refusal, so that the layer answers 422).
            self.load_for(fingerprint).await?;
        }
        let size = point.phase().len() + point.data().len();
        if size > inner.max_bytes {
            return Err(RecoveryError::TooLarge {
                size,
                limit: inner.max_bytes,
            });
        }
        let point = point.with_fingerprint(fingerprint);
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
        match serde_json::to_vec(value) {
            Ok(data) => self.save(phase, data).await,
            Err(error) => self.noted(Err(RecoveryError::Json(error))),
        }
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
