//! Fingerprint throughput: the streaming request-body hash against one contiguous xxh3-128.

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use tower_idempotency::__bench::{hash_streamed, parts, Chunks};
use xxhash_rust::xxh3::xxh3_128;

const SIZES: [usize; 6] = [
    64,
    1024,
    16 * 1024,
    64 * 1024,
    1024 * 1024,
    16 * 1024 * 1024,
];

/// Hyper hands bodies over in chunks of up to its read buffer (8 KiB to 400 KiB, usually
/// 16 KiB on loopback); 16 KiB is the realistic case.
const CHUNK: usize = 16 * 1024;

fn chunks(data: &Bytes, chunk: usize) -> Vec<Bytes> {
    (0..data.len())
        .step_by(chunk)
        .map(|at| data.slice(at..(at + chunk).min(data.len())))
        .collect()
}

fn fingerprint(c: &mut Criterion) {
    let mut group = c.benchmark_group("fingerprint");
    for size in SIZES {
        let data = Bytes::from((0..size).map(|i| (i * 31 % 251) as u8).collect::<Vec<u8>>());
        let streamed = chunks(&data, CHUNK);
        group.throughput(Throughput::Bytes(size as u64));
        if size >= 1024 * 1024 {
            group.sample_size(20);
        }
        group.bench_with_input(
            BenchmarkId::new("contiguous_xxh3_128", size),
            &data,
            |b, data| b.iter(|| xxh3_128(std::hint::black_box(data))),
        );
        group.bench_with_input(
            BenchmarkId::new("xxh3_update_16KiB_chunks", size),
            &streamed,
            |b, chunks| {
                b.iter(|| {
                    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
                    for chunk in chunks {
                        hasher.update(std::hint::black_box(chunk));
                    }
                    hasher.digest128()
                })
            },
        );
        let head = parts();
        group.bench_with_input(
            BenchmarkId::new("streamed_16KiB_chunks", size),
            &streamed,
            |b, chunks| {
                // The body itself (a client's chunks) is set up outside the timing.
                b.iter_batched(
                    || Chunks::new(chunks),
                    |body| hash_streamed(&head, body),
                    BatchSize::SmallInput,
                )
            },
        );
    }
    group.finish();
}

criterion_group!(benches, fingerprint);
criterion_main!(benches);
