//! [`BoxStore`]: any store behind one type, chosen at run time.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::{
    ClaimOutcome, KeyState, OwnerToken, Record, RecoveryPoint, Store, StoreError, StreamRead,
};

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The object-safe twin of [`Store`], implemented for every store.
pub(crate) trait DynStore: Send + Sync + 'static {
    fn claim_as<'a>(
        &'a self,
        key: &'a str,
        token: &'a OwnerToken,
        lease: Duration,
    ) -> BoxFuture<'a, Result<ClaimOutcome, StoreError>>;
    fn claim_now(
        &self,
        key: &str,
        token: &OwnerToken,
        lease: Duration,
    ) -> Option<Result<ClaimOutcome, StoreError>>;
    fn renew<'a>(
        &'a self,
        key: &'a str,
        token: &'a OwnerToken,
        lease: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    fn complete<'a>(
        &'a self,
        key: &'a str,
        token: &'a OwnerToken,
        record: Record,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    fn release<'a>(
        &'a self,
        key: &'a str,
        token: &'a OwnerToken,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    fn wait<'a>(&'a self, key: &'a str, attempt: u32) -> BoxFuture<'a, ()>;
    fn inspect<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<KeyState, StoreError>>;
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, StoreError>>;
    fn save_point<'a>(
        &'a self,
        key: &'a str,
        token: &'a OwnerToken,
        point: &'a RecoveryPoint,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    fn load_point<'a>(
        &'a self,
        key: &'a str,
        token: &'a OwnerToken,
    ) -> BoxFuture<'a, Result<Option<RecoveryPoint>, StoreError>>;
    fn append_stream<'a>(
        &'a self,
        key: &'a str,
        token: &'a OwnerToken,
        from: u64,
        chunks: &'a [Bytes],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    fn read_stream<'a>(
        &'a self,
        key: &'a str,
        from: u64,
    ) -> BoxFuture<'a, Result<StreamRead, StoreError>>;
}

impl<St: Store> DynStore for St {
    fn claim_as<'a>(
        &'a self,
        key: &'a str,
        token: &'a OwnerToken,
        lease: Duration,
    ) -> BoxFuture<'a, Result<ClaimOutcome, StoreError>> {
        Box::pin(Store::claim_as(self, key, token, lease))
    }

    fn claim_now(
        &self,
        key: &str,
        token: &OwnerToken,
        lease: Duration,
    ) -> Option<Result<ClaimOutcome, StoreError>> {
        Store::claim_now(self, key, token, lease)
    }

    fn renew<'a>(
        &'a self,
        key: &'a str,
        token: &'a OwnerToken,
        lease: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(Store::renew(self, key, token, lease))
    }

    fn complete<'a>(
        &'a self,
        key: &'a str,
        token: &'a OwnerToken,
        record: Record,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(Store::complete(self, key, token, record, ttl))
    }

    fn release<'a>(
        &'a self,
        key: &'a str,
        token: &'a OwnerToken,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(Store::release(self, key, token))
    }

    fn inspect<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<KeyState, StoreError>> {
        Box::pin(Store::inspect(self, key))
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(Store::delete(self, key))
    }

    fn wait<'a>(&'a self, key: &'a str, attempt: u32) -> BoxFuture<'a, ()> {
        Box::pin(Store::wait(self, key, attempt))
    }

    fn save_point<'a>(
        &'a self,
        key: &'a str,
        token: &'a OwnerToken,
        point: &'a RecoveryPoint,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(Store::save_point(self, key, token, point, ttl))
    }

    fn load_point<'a>(
        &'a self,
        key: &'a str,
        token: &'a OwnerToken,
    ) -> BoxFuture<'a, Result<Option<RecoveryPoint>, StoreError>> {
        Box::pin(Store::load_point(self, key, token))
    }

    fn append_stream<'a>(
        &'a self,
        key: &'a str,
        token: &'a OwnerToken,
        from: u64,
        chunks: &'a [Bytes],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(Store::append_stream(self, key, token, from, chunks, ttl))
    }

    fn read_stream<'a>(
        &'a self,
        key: &'a str,
        from: u64,
    ) -> BoxFuture<'a, Result<StreamRead, StoreError>> {
        Box::pin(Store::read_stream(self, key, from))
    }
}

/// A type-erased store: pick the backend at run time (from configuration, a command-line
/// flag) and still name one layer type. Each call costs one boxed future.
///
/// ```
/// use tower_idempotency::store::{BoxStore, MemoryStore};
/// use tower_idempotency::IdempotencyLayer;
///
/// fn store_from_config(kind: &str) -> BoxStore {
///     match kind {
///         // "redis" => BoxStore::new(RedisStore::connect(url).await?),
///         // "postgres" => BoxStore::new(postgres_store),
///         _ => BoxStore::new(MemoryStore::new()),
///     }
/// }
/// let layer: IdempotencyLayer<BoxStore> = IdempotencyLayer::with_store(store_from_config("memory"));
/// # let _ = layer;
/// ```
#[derive(Clone)]
pub struct BoxStore {
    inner: Arc<dyn DynStore>,
    name: &'static str,
}

impl BoxStore {
    /// Erases the type of `store`.
    pub fn new<St: Store>(store: St) -> Self {
        Self {
            inner: Arc::new(store),
            name: std::any::type_name::<St>(),
        }
    }
}

impl fmt::Debug for BoxStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("BoxStore").field(&self.name).finish()
    }
}

impl Store for BoxStore {
    async fn claim_as(
        &self,
        key: &str,
        token: &OwnerToken,
        lease: Duration,
    ) -> Result<ClaimOutcome, StoreError> {
        self.inner.claim_as(key, token, lease).await
    }

    fn claim_now(
        &self,
        key: &str,
        token: &OwnerToken,
        lease: Duration,
    ) -> Option<Result<ClaimOutcome, StoreError>> {
        self.inner.claim_now(key, token, lease)
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
        self.inner.complete(key, token, record, ttl).await
    }

    async fn release(&self, key: &str, token: &OwnerToken) -> Result<(), StoreError> {
        self.inner.release(key, token).await
    }

    async fn inspect(&self, key: &str) -> Result<KeyState, StoreError> {
        self.inner.inspect(key).await
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        self.inner.delete(key).await
    }

    async fn wait(&self, key: &str, attempt: u32) {
        self.inner.wait(key, attempt).await
    }

    async fn save_point(
        &self,
        key: &str,
        token: &OwnerToken,
        point: &RecoveryPoint,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.inner.save_point(key, token, point, ttl).await
    }

    async fn load_point(
        &self,
        key: &str,
        token: &OwnerToken,
    ) -> Result<Option<RecoveryPoint>, StoreError> {
        self.inner.load_point(key, token).await
    }
    async fn append_stream(
        &self,
        key: &str,
        token: &OwnerToken,
        from: u64,
        chunks: &[Bytes],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.inner
            .append_stream(key, token, from, chunks, ttl)
            .await
    }

    async fn read_stream(&self, key: &str, from: u64) -> Result<StreamRead, StoreError> {
        self.inner.read_stream(key, from).await
    }
}
