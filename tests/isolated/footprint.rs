//! The memory store's capacity is honest: a full store's resident memory stays within 1.25×
//! of its configured capacity, for small and large records, and for recovery points (one
//! tenant's failed runs filling the store). One test per binary run (a test
//! binary of its own), so no other test's allocations blur the measurement.

use std::time::Duration;

use bytes::Bytes;
use tower_idempotency::store::{ClaimOutcome, MemoryStore, Record, RecoveryPoint, Store};

/// Resident set size of this process, in bytes (Linux).
fn rss() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// Fills a store of `capacity` bytes with three times as many records of `payload` bytes as
/// fit (so it evicts for two thirds of the run), and returns the growth of the resident set.
/// With `points`, each key's run saves a recovery point of `payload` bytes and fails (its
/// claim released) instead of completing: one tenant filling the store with failed runs.
async fn growth_of_a_full_store(capacity: u64, payload: usize, points: bool) -> (u64, MemoryStore) {
    let store = MemoryStore::builder().max_bytes(capacity).build();
    let before = rss().expect("/proc/self/statm");
    let records = (3 * capacity / (payload as u64 + 64)) as usize;
    for i in 0..records {
        let key = format!("tenant-{:08}|POST|/payments|{i:032}", i % 1000);
        let ClaimOutcome::Claimed(token) =
            store.claim(&key, Duration::from_secs(60)).await.unwrap()
        else {
            unreachable!()
        };
        let bytes = Bytes::from(vec![(i % 251) as u8; payload]);
        if points {
            let point = RecoveryPoint::new("charged", bytes);
            let ttl = Duration::from_secs(3600);
            store.save_point(&key, &token, &point, ttl).await.unwrap();
            store.release(&key, &token).await.unwrap();
            continue;
        }
        store
            .complete(
                &key,
                &token,
                Record::new(Some(i as u128), bytes),
                Duration::from_secs(3600),
            )
            .await
            .unwrap();
    }
    let count = store.record_count();
    assert!(count > 0 && (count as usize) < records, "the store evicted");
    (rss().unwrap().saturating_sub(before), store)
}

const CAPACITY: u64 = 64 * 1024 * 1024;

/// One measurement, in this process: run by `a_full_store_stays_within_its_capacity` in a
/// fresh process of this binary per record size (`FOOTPRINT_PAYLOAD` set), so that memory
/// freed by one case cannot hide the next one's growth.
#[tokio::test(flavor = "current_thread")]
async fn measure_one_record_size() {
    let Some(payload) = std::env::var("FOOTPRINT_PAYLOAD").ok() else {
        return; // only as a child of the test below
    };
    let payload: usize = payload.parse().unwrap();
    let points = std::env::var("FOOTPRINT_POINTS").is_ok();
    let (growth, store) = growth_of_a_full_store(CAPACITY, payload, points).await;
    println!("FOOTPRINT {payload} {} {growth}", store.record_count());
}

#[test]
fn a_full_store_stays_within_its_capacity() {
    let mut report = Vec::new();
    let mut worst: f64 = 0.0;
    let cases = [
        (100usize, false),
        (100 * 1024, false),
        (100, true),
        (60 * 1024, true),
    ];
    for (payload, points) in cases {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap());
        child
            .args([
                "--exact",
                "footprint::measure_one_record_size",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("FOOTPRINT_PAYLOAD", payload.to_string());
        if points {
            // Recovery points of failed runs, charged to the same capacity.
            child.env("FOOTPRINT_POINTS", "1");
        }
        let output = child.output().unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let line = stdout
            .lines()
            .find_map(|l| l.split_once("FOOTPRINT ").map(|(_, rest)| rest))
            .unwrap_or_else(|| {
                panic!(
                    "no measurement: {stdout} {}",
                    String::from_utf8_lossy(&output.stderr)
                )
            });
        let fields: Vec<u64> = line.split(' ').map(|f| f.parse().unwrap()).collect();
        let (held, growth) = (fields[1], fields[2]);
        let ratio = growth as f64 / CAPACITY as f64;
        worst = worst.max(ratio);
        report.push(format!(
            "{payload} B {}: {held} held, RSS +{:.1} MiB for a {} MiB capacity ({ratio:.2}x)",
            if points { "points" } else { "records" },
            growth as f64 / (1 << 20) as f64,
            CAPACITY >> 20
        ));
    }
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{}", report.join("\n"));
    assert!(worst <= 1.25, "{}", report.join("; "));
}
