//! Issue 42, case 8: what keeping replayed records decoded (`keep_decoded`) costs a memory
//! store that is full, against `keep_decoded(false)`, for the same records through the layer:
//! the resident memory it grows to, as a multiple of its capacity, and the keys it evicts (each
//! a handler run again on a later retry). Each case runs in a fresh process of this binary
//! (`DECODED_CASE` set), so that memory one case freed cannot hide the next one's growth.
//!
//! `cargo test --all-features --test isolated decoded -- --nocapture` prints the figures.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, Request, Response, StatusCode};
use axum::routing::post;
use axum::Router;
use tower::{Service, ServiceExt};
use tower_idempotency::store::MemoryStore;
use tower_idempotency::IdempotencyLayer;

/// Resident set size of this process, in bytes (Linux).
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

const CAPACITY: u64 = 16 * 1024 * 1024;
const RECORDS: u64 = 16_000;

/// A small answer, as a payments API gives: a JSON body of 90 bytes and six headers.
fn handler(runs: Arc<AtomicU64>) -> Router {
    let handler = move |headers: HeaderMap| {
        let runs = runs.clone();
        async move {
            runs.fetch_add(1, Ordering::Relaxed);
            let key = headers["idempotency-key"].to_str().unwrap().to_owned();
            let body = format!(
                "{{\"id\":\"pay_{key}\",\"amount\":1000,\"currency\":\"usd\",\"status\":\"succeeded\"}}"
            );
            Response::builder()
                .status(StatusCode::CREATED)
                .header("content-type", "application/json")
                .header("location", format!("/payments/pay_{key}"))
                .header("x-request-id", format!("req-{key}-5f0c6a1e9b7d"))
                .header("x-ratelimit-remaining", "4999")
                .header("x-ratelimit-limit", "5000")
                .header("etag", format!("\"{key}\""))
                .body(Body::from(body))
                .unwrap()
        }
    };
    Router::new().route("/payments", post(handler))
}

/// One pass over `records` keys (a first request or a retry of each).
async fn pass<S>(app: &S, records: u64)
where
    S: Service<Request<Body>, Error = Infallible> + Clone,
{
    for i in 0..records {
        let request = Request::post("/payments")
            .header("idempotency-key", format!("order-{i:010}"))
            .header("content-type", "application/json")
            .body(Body::from("{\"amount\":1000,\"currency\":\"usd\"}"))
            .unwrap();
        let _ = app.clone().oneshot(request).await;
    }
}

/// The measurement of one setting, in this process: run by
/// `keep_decoded_on_a_full_store_against_off` as a child with `DECODED_CASE` set.
#[tokio::test(flavor = "current_thread")]
async fn measure_one_case() {
    let Ok(case) = std::env::var("DECODED_CASE") else {
        return; // only as a child of the tests below
    };
    let (keep, capacity, records) = match case.as_str() {
        "full-on" => (Some(true), CAPACITY, RECORDS),
        "full-off" => (Some(false), CAPACITY, RECORDS),
        "full-default" => (None, CAPACITY, RECORDS),
        // Room for every record: what a decoded form takes, with nothing evicted.
        "roomy-on" => (Some(true), 256 * 1024 * 1024, 50_000),
        "roomy-off" => (Some(false), 256 * 1024 * 1024, 50_000),
        other => panic!("unknown case {other}"),
    };
    let mut builder = MemoryStore::builder().max_bytes(capacity);
    if let Some(keep) = keep {
        builder = builder.keep_decoded(keep);
    }
    let store = builder.build();
    let runs = Arc::new(AtomicU64::new(0));
    let app = tower::Layer::layer(
        &IdempotencyLayer::with_store(store.clone()),
        handler(runs.clone()),
    );
    let before = rss();
    pass(&app, records).await;
    let (filled, charged_filled) = (rss() - before, store.weighted_size());
    pass(&app, records).await;
    pass(&app, records).await;
    let (replayed, charged_replayed) = (rss() - before, store.weighted_size());
    let held = store.record_count();
    // A later retry of every key: each key evicted runs again.
    pass(&app, records).await;
    // Every run after the first pass: retries (the two replays and the later one) whose key
    // had been evicted.
    let rerun = runs.load(Ordering::Relaxed) - records;
    println!(
        "DECODED {case} {capacity} {records} {held} {filled} {replayed} {charged_filled} {charged_replayed} {rerun}"
    );
}

/// Runs `case` in a child process; its figures.
fn run(case: &str) -> Vec<u64> {
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "decoded::measure_one_case",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("DECODED_CASE", case)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("DECODED ").map(|(_, rest)| rest))
        .unwrap_or_else(|| {
            panic!(
                "no measurement: {stdout} {}",
                String::from_utf8_lossy(&output.stderr)
            )
        });
    line.split(' ')
        .skip(1)
        .map(|f| f.parse().unwrap())
        .collect()
}

fn say(line: String) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// What a decoded form takes, per record, when nothing is evicted: the growth of the resident
/// set from the replays, against what the store charges for it.
#[test]
fn a_decoded_form_is_charged_what_it_takes() {
    let [on, off] = ["roomy-on", "roomy-off"].map(run);
    let records = on[1];
    assert_eq!(on[2], records, "nothing evicted");
    let per_record = |f: &[u64]| (f[4] as f64 - f[3] as f64) / records as f64;
    let taken = per_record(&on) - per_record(&off);
    let charged = (on[6] - on[5]) as f64 / records as f64;
    say(format!(
        "decoded form: {taken:.0} B per record in RSS (replays on minus off), {charged:.0} B charged"
    ));
    assert!(
        charged >= taken * 0.9,
        "a decoded form takes {taken:.0} B and is charged {charged:.0} B"
    );
}

/// A full store's figures, for `cases`: resident memory as a multiple of the capacity, and
/// handler runs again over three retries of every key (each key evicted before its retry; an
/// LRU cache scanned in order evicts the keys about to be retried once it overflows).
fn full_store(cases: &[&str]) -> (Vec<(f64, u64, u64)>, String) {
    let mut report = Vec::new();
    let mut figures = Vec::new();
    for case in cases {
        let f = run(case);
        let (capacity, records, held, filled, replayed, rerun) =
            (f[0], f[1], f[2], f[3], f[4], f[7]);
        let ratio = replayed as f64 / capacity as f64;
        report.push(format!(
            "{case}: {records} records, {held} held ({} evicted), RSS +{:.1} MiB filled, +{:.1} MiB after two replays ({ratio:.2}x a {} MiB capacity), charged {:.1} MiB, {rerun} handler runs again over three retries of each key",
            records - held,
            filled as f64 / (1 << 20) as f64,
            replayed as f64 / (1 << 20) as f64,
            capacity >> 20,
            f[6] as f64 / (1 << 20) as f64,
        ));
        figures.push((ratio, held, rerun));
    }
    let report = report.join("\n");
    say(report.clone());
    (figures, report)
}

/// With decoded forms kept, a full store replayed twice stays within 1.15 times its capacity
/// in resident memory: each is charged what it takes.
#[test]
fn keep_decoded_stays_within_its_capacity() {
    let (figures, report) = full_store(&["full-off", "full-on"]);
    for (ratio, _, _) in figures {
        assert!(ratio <= 1.15, "{report}");
    }
}

/// The default store evicts no more keys than one without decoded forms (charging them would
/// evict more, and not charging them overshoots the capacity: the default keeps none), and
/// runs no more retries again (within 2 %: see below).
#[test]
fn the_default_evicts_no_more_keys_than_without_decoded_forms() {
    let (figures, report) = full_store(&["full-off", "full-default"]);
    let [(_, off_held, off_rerun), (ratio, held, rerun)] = figures[..] else {
        unreachable!()
    };
    // The two stores are alike (the default keeps no decoded forms), but each spreads its keys
    // over its shards with a hasher seeded at random, so which keys the clock evicts first,
    // and so how many retries run again, differs by about 1 % from store to store.
    let slack = off_rerun / 50;
    assert!(held >= off_held && rerun <= off_rerun + slack, "{report}");
    assert!(ratio <= 1.15, "{report}");
}
