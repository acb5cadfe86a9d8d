//! The store conformance suite against the embedded `MemoryStore`.

use tower_idempotency::store::{BoxStore, MemoryStore};

tower_idempotency::store_conformance_tests!(memory_store, async { MemoryStore::new() });

/// `Arc<T>` is a store too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn arc_of_a_store_is_a_store() {
    tower_idempotency::store::conformance::run_all(&std::sync::Arc::new(MemoryStore::new())).await;
}

// A type-erased store behaves as the store it wraps.
tower_idempotency::store_conformance_tests!(boxed_memory_store, async {
    BoxStore::new(MemoryStore::new())
});

/// The memory store keeps no live streams (duplicates follow a stream in memory): the stream
/// checks say so instead of passing.
#[tokio::test]
async fn the_memory_store_says_it_keeps_no_live_streams() {
    use tower_idempotency::store::conformance::{streams, StreamSupport};
    assert_eq!(
        streams(&MemoryStore::new()).await,
        StreamSupport::Unsupported
    );
    assert_eq!(
        streams(&BoxStore::new(MemoryStore::new())).await,
        StreamSupport::Unsupported
    );
}
