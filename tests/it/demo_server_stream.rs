//! The demo's streamed route, `POST /completions` (server-sent events), driven over loopback
//! as a client would: a stream the client cuts and retries, `Last-Event-ID` resumes, a stream
//! that fails mid-way. The handler runs in the demo process; `/stats` counts its runs.

use crate::support;

use std::time::Duration;

use http_body_util::BodyExt;
use support::demo::Demo;

/// 1,000 tokens, one every millisecond.
const THOUSAND: &str = r#"{"tokens": 1000, "interval_ms": 1}"#;

/// The body the demo generates for events `from..=to`.
fn events(from: u32, to: u32) -> String {
    (from..=to)
        .map(|n| format!("id: {n}\ndata: tok-{n}\n\n"))
        .collect()
}

async fn stat(demo: &Demo, name: &str) -> u64 {
    demo.stats().await[name].as_u64().unwrap()
}

/// Waits until `completions_finished` is `n` (the generation sent its last event): `/stats`
/// is the only signal the process gives.
async fn finished(demo: &Demo, n: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while stat(demo, "completions_finished").await < n {
        assert!(
            std::time::Instant::now() < deadline,
            "the generation never finished"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A retry of `key` once its record is stored: the pump stores it after the generation's last
/// event, a store round trip later, and a retry in between gets 409 (in flight).
async fn stored(demo: &Demo, key: &str, payload: &str) -> support::demo::Reply {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let reply = demo.post_to("/completions", key, payload, &[]).await;
        if reply.status != 409 || std::time::Instant::now() > deadline {
            return reply;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Reads `response` until `n` whole events (`\n\n`-terminated) have arrived, then drops it,
/// which closes the connection mid-stream. What was read.
async fn read_events_then_cut(response: support::demo::Streamed, n: usize) -> Vec<u8> {
    let mut body = response.into_body();
    let mut read = Vec::new();
    while read.windows(2).filter(|w| w == b"\n\n").count() < n {
        let frame = body.frame().await.expect("more events").unwrap();
        if let Ok(data) = frame.into_data() {
            read.extend_from_slice(&data);
        }
    }
    drop(body);
    read
}

#[tokio::test]
async fn a_stream_cut_by_the_client_at_event_300_is_replayed_whole_and_ran_once() {
    let demo = Demo::start(&[]).await;
    let first = demo
        .open("/completions", "gen-cut", THOUSAND, &[])
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["content-type"], "text/event-stream");
    let read = read_events_then_cut(first, 300).await;
    assert!(
        events(1, 1000).as_bytes().starts_with(&read),
        "what the client read is the stream's beginning"
    );
    finished(&demo, 1).await;

    let retry = demo.post_to("/completions", "gen-cut", THOUSAND, &[]).await;
    assert_eq!(retry.status, 200);
    assert!(retry.replayed());
    assert_eq!(retry.headers["content-type"], "text/event-stream");
    assert_eq!(
        retry.body,
        events(1, 1000).as_bytes(),
        "all 1,000, byte-identical"
    );
    assert_eq!(stat(&demo, "completions").await, 1, "the handler ran once");
}

#[tokio::test]
async fn a_stream_cut_before_its_first_byte_finishes_in_the_background() {
    // `curl --max-time`: the client gives up while the generation runs. The layer detaches the
    // work, which runs to its end and stores the stream.
    let demo = Demo::start(&[]).await;
    let cut = tokio::time::timeout(
        Duration::from_millis(200),
        demo.post_to("/completions", "gen-timeout", THOUSAND, &[]),
    )
    .await;
    assert!(cut.is_err(), "1,000 events at 1 ms take longer than 200 ms");
    assert_eq!(stat(&demo, "completions_finished").await, 0);
    finished(&demo, 1).await;
    let retry = demo
        .post_to("/completions", "gen-timeout", THOUSAND, &[])
        .await;
    assert!(retry.replayed());
    assert_eq!(retry.body, events(1, 1000).as_bytes());
    assert_eq!(stat(&demo, "completions").await, 1);
}

#[tokio::test]
async fn a_keyed_stream_reaches_the_client_before_its_last_event_is_produced() {
    // The layer answers the head as soon as the handler's body is not whole at once, and
    // streams each event while it keeps it for the record: the first event arrives while the
    // generation runs (200 events, 20 ms apart). The record is stored before the end arrives.
    let demo = Demo::start(&[]).await;
    let slow = r#"{"tokens": 200, "interval_ms": 20}"#;
    let keyed = demo
        .open("/completions", "gen-live", slow, &[])
        .await
        .unwrap();
    assert_eq!(keyed.status(), 200);
    assert!(!keyed.headers().contains_key("idempotent-replayed"));
    let mut body = keyed.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, events(1, 1));
    assert_eq!(
        stat(&demo, "completions_finished").await,
        0,
        "the first event came before the last was produced"
    );
    let mut rest = first.to_vec();
    rest.extend_from_slice(&body.collect().await.unwrap().to_bytes());
    assert_eq!(rest, events(1, 200).as_bytes());
    // The end came after the record was stored: the retry replays it at once.
    let retry = demo.post_to("/completions", "gen-live", slow, &[]).await;
    assert!(retry.replayed());
    assert_eq!(retry.body, events(1, 200).as_bytes());
    assert_eq!(stat(&demo, "completions").await, 1);
}

#[tokio::test]
async fn a_stream_that_fails_mid_way_is_not_stored_and_its_key_is_released() {
    // The head and the first 50 events went out already: the client sees the connection end
    // with an error (never a clean end), nothing is stored, and the retry runs the handler again.
    let demo = Demo::start(&[]).await;
    let breaks = r#"{"tokens": 100, "interval_ms": 1, "fail_after": 50}"#;
    let first = demo
        .open("/completions", "gen-breaks", breaks, &[])
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    assert!(
        first.into_body().collect().await.is_err(),
        "an error, not a clean end"
    );
    let retry = demo
        .open("/completions", "gen-breaks", breaks, &[])
        .await
        .unwrap();
    assert!(!retry.headers().contains_key("idempotent-replayed"));
    assert!(retry.into_body().collect().await.is_err());
    assert_eq!(
        stat(&demo, "completions").await,
        2,
        "released: the retry ran"
    );
    assert_eq!(stat(&demo, "completions_finished").await, 0);
}

#[tokio::test]
async fn a_retry_with_last_event_id_300_gets_the_700_events_after_it() {
    let demo = Demo::start(&[]).await;
    let first = demo
        .open("/completions", "gen-resume", THOUSAND, &[])
        .await
        .unwrap();
    let read = read_events_then_cut(first, 300).await;
    assert!(events(1, 1000).as_bytes().starts_with(&read));
    finished(&demo, 1).await;

    let resumed = demo
        .post_to(
            "/completions",
            "gen-resume",
            THOUSAND,
            &[("last-event-id", "300")],
        )
        .await;
    assert_eq!(resumed.status, 200);
    assert!(
        resumed.replayed(),
        "a replay: the fingerprint ignores the header"
    );
    assert_eq!(resumed.headers["content-type"], "text/event-stream");
    assert_eq!(resumed.headers["cache-control"], "no-cache");
    assert_eq!(
        resumed.body,
        events(301, 1000).as_bytes(),
        "exactly 301..1000"
    );
    assert_eq!(
        resumed.headers["content-length"],
        resumed.body.len().to_string().as_str()
    );
    assert_eq!(stat(&demo, "completions").await, 1, "the handler ran once");

    // The last event: nothing after it. An unknown id, an empty one: the whole stream.
    let at_end = demo
        .post_to(
            "/completions",
            "gen-resume",
            THOUSAND,
            &[("last-event-id", "1000")],
        )
        .await;
    assert!(at_end.replayed());
    assert_eq!(at_end.status, 200);
    assert!(at_end.body.is_empty());
    for unknown in ["1001", "0300", "tok-3", ""] {
        let whole = demo
            .post_to(
                "/completions",
                "gen-resume",
                THOUSAND,
                &[("last-event-id", unknown)],
            )
            .await;
        assert!(whole.replayed());
        assert_eq!(
            whole.body,
            events(1, 1000).as_bytes(),
            "Last-Event-ID {unknown:?}"
        );
    }
    assert_eq!(stat(&demo, "completions").await, 1);
}

#[tokio::test]
async fn last_event_id_has_no_effect_on_a_first_run_nor_on_a_response_that_is_no_stream() {
    let demo = Demo::start(&[]).await;
    let small = r#"{"tokens": 5, "interval_ms": 0}"#;
    let first = demo
        .post_to(
            "/completions",
            "gen-first",
            small,
            &[("last-event-id", "3")],
        )
        .await;
    assert!(!first.replayed());
    assert_eq!(
        first.body,
        events(1, 5).as_bytes(),
        "the first run is whole"
    );

    let payment = r#"{"amount": 1000, "currency": "usd"}"#;
    let paid = demo
        .post_to("/payments", "pay-sse", payment, &[("last-event-id", "1")])
        .await;
    assert_eq!(paid.status, 201);
    let again = demo
        .post_to("/payments", "pay-sse", payment, &[("last-event-id", "1")])
        .await;
    assert!(again.replayed());
    assert_eq!(again.body, paid.body, "JSON is no event stream: ignored");
}

#[tokio::test]
async fn a_stream_past_max_stored_body_replays_its_head_only_and_last_event_id_changes_nothing() {
    // 400,000 events are about 11 MB, past the 8 MiB bound: the record keeps status and
    // headers only.
    let demo = Demo::start(&[]).await;
    let large = r#"{"tokens": 400000, "interval_ms": 0}"#;
    let first = demo.post_to("/completions", "gen-large", large, &[]).await;
    assert_eq!(first.status, 200);
    assert_eq!(
        first.body,
        events(1, 400_000).as_bytes(),
        "the first run is whole"
    );
    for extra in [&[][..], &[("last-event-id", "5")][..]] {
        let retry = demo
            .post_to("/completions", "gen-large", large, extra)
            .await;
        assert_eq!(retry.status, 200);
        assert!(retry.replayed());
        assert_eq!(retry.headers["idempotent-body-omitted"], "true");
        assert!(!retry.headers.contains_key("content-type"));
        assert!(retry.body.is_empty());
    }
    assert_eq!(stat(&demo, "completions").await, 1);
}

/// On `store`, two demo processes: the first generates 1,000 events for a client that cuts at
/// event 300; the second replays them whole and resumes after `Last-Event-ID: 300`. The
/// handler ran once, in the first.
async fn cut_and_resume_across_instances(store: &str) {
    let args = ["--store", store];
    let (first, second) = (Demo::start(&args).await, Demo::start(&args).await);
    let key = format!("gen-{}", uuid::Uuid::new_v4().simple());
    let response = first
        .open("/completions", &key, THOUSAND, &[])
        .await
        .unwrap();
    read_events_then_cut(response, 300).await;
    finished(&first, 1).await;
    for demo in [&first, &second] {
        let whole = stored(demo, &key, THOUSAND).await;
        assert!(whole.replayed(), "{store}: {}", whole.status);
        assert_eq!(whole.body, events(1, 1000).as_bytes(), "{store}");
        let resumed = demo
            .post_to("/completions", &key, THOUSAND, &[("last-event-id", "300")])
            .await;
        assert!(resumed.replayed(), "{store}");
        assert_eq!(resumed.headers["content-type"], "text/event-stream");
        assert_eq!(resumed.body, events(301, 1000).as_bytes(), "{store}");
    }
    assert_eq!(stat(&first, "completions").await, 1);
    assert_eq!(stat(&second, "completions").await, 0);
}

#[tokio::test]
async fn a_cut_stream_resumes_from_another_instance_on_sqlite() {
    let dir = support::servers::TempDir::new("demo-sse");
    let store = format!("sqlite://{}", dir.path().join("idempotency.db").display());
    cut_and_resume_across_instances(&store).await;
}

#[tokio::test]
async fn a_cut_stream_resumes_from_another_instance_on_redis() {
    let Some(url) = support::servers::redis_url() else {
        return;
    };
    cut_and_resume_across_instances(&url).await;
}

#[tokio::test]
async fn a_cut_stream_resumes_from_another_instance_on_postgres() {
    let Some(url) = support::servers::postgres_url() else {
        return;
    };
    cut_and_resume_across_instances(&url).await;
}

#[tokio::test]
async fn a_duplicate_that_waited_for_the_stream_resumes_after_its_last_event_id() {
    // `--on-conflict wait`: the duplicate arrives while the generation runs, waits for its
    // end, and gets the events after its `Last-Event-ID` from the record just stored.
    let demo = Demo::start(&["--on-conflict", "wait"]).await;
    let slow = r#"{"tokens": 1000, "interval_ms": 1, "delay_ms": 300}"#;
    let original = demo.open("/completions", "gen-wait", slow, &[]);
    let original = async { original.await.unwrap().into_body().collect().await };
    let waiter = async {
        while stat(&demo, "completions").await < 1 {
            tokio::task::yield_now().await;
        }
        demo.post_to(
            "/completions",
            "gen-wait",
            slow,
            &[("last-event-id", "990")],
        )
        .await
    };
    let (original, waited) = tokio::join!(original, waiter);
    assert_eq!(original.unwrap().to_bytes(), events(1, 1000).as_bytes());
    assert!(waited.replayed());
    assert_eq!(waited.body, events(991, 1000).as_bytes());
    assert_eq!(stat(&demo, "completions").await, 1);
}

/// Starts a keyed generation of `tokens` events on `demo` and reads its head: from then on its
/// stream is live in the demo process, and duplicates may join it.
async fn live_original(demo: &Demo, key: &str, payload: &str) -> support::demo::Streamed {
    let original = demo.open("/completions", key, payload, &[]).await.unwrap();
    assert_eq!(original.status(), 200);
    original
}

/// Reads a joined duplicate whole: its head and the body, or the body's error.
async fn joined(
    base: String,
    key: String,
    payload: &'static str,
    extra: Vec<(&'static str, String)>,
    barrier: std::sync::Arc<tokio::sync::Barrier>,
    heads: Option<std::sync::Arc<tokio::sync::Barrier>>,
) -> (http::HeaderMap, Result<bytes::Bytes, String>) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let mut request = http::Request::post(format!("{base}/completions"))
        .header("authorization", "Bearer acme")
        .header("content-type", "application/json")
        .header("idempotency-key", key);
    for (name, value) in extra {
        request = request.header(name, value);
    }
    let request = request
        .body(http_body_util::Full::new(bytes::Bytes::from(payload)))
        .unwrap();
    barrier.wait().await;
    let response = client.request(request).await.unwrap();
    if let Some(heads) = heads {
        heads.wait().await;
    }
    let (parts, body) = response.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|e| e.to_string());
    (parts.headers, body)
}

/// `n` duplicates of `key` sent at once (a barrier), each read whole by a task of its own;
/// each waits at `heads` once it has its head.
fn joiners(
    demo: &Demo,
    key: &str,
    payload: &'static str,
    n: usize,
    heads: Option<std::sync::Arc<tokio::sync::Barrier>>,
) -> Vec<tokio::task::JoinHandle<(http::HeaderMap, Result<bytes::Bytes, String>)>> {
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(n));
    (0..n)
        .map(|_| {
            tokio::spawn(joined(
                demo.base.clone(),
                key.to_owned(),
                payload,
                vec![],
                barrier.clone(),
                heads.clone(),
            ))
        })
        .collect()
}

#[tokio::test]
async fn fifty_duplicates_join_a_live_stream_and_get_the_identical_bytes_while_it_ran_once() {
    let demo = Demo::start(&["--on-conflict", "join"]).await;
    const SLOW: &str = r#"{"tokens": 300, "interval_ms": 10}"#;
    let original = live_original(&demo, "gen-join", SLOW).await;
    let heads = std::sync::Arc::new(tokio::sync::Barrier::new(51));
    let joiners = joiners(&demo, "gen-join", SLOW, 50, Some(heads.clone()));
    // Every joiner has its head while the generation runs: joined, not waiting for the end.
    heads.wait().await;
    assert_eq!(stat(&demo, "completions_finished").await, 0, "joined live");
    let whole = original.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(whole, events(1, 300).as_bytes());
    for joiner in joiners {
        let (headers, body) = joiner.await.unwrap();
        assert_eq!(headers["idempotent-replayed"], "true");
        assert_eq!(headers["content-type"], "text/event-stream");
        assert_eq!(body.unwrap(), whole, "the identical byte sequence");
    }
    assert_eq!(stat(&demo, "completions").await, 1, "the handler ran once");
}

#[tokio::test]
async fn joiners_of_a_stream_that_fails_see_an_error_and_nothing_is_stored() {
    let demo = Demo::start(&["--on-conflict", "join"]).await;
    const BREAKS: &str = r#"{"tokens": 300, "interval_ms": 5, "fail_after": 150}"#;
    let original = live_original(&demo, "gen-join-breaks", BREAKS).await;
    let joiners = joiners(&demo, "gen-join-breaks", BREAKS, 10, None);
    assert!(original.into_body().collect().await.is_err());
    for joiner in joiners {
        let (headers, body) = joiner.await.unwrap();
        assert_eq!(headers["idempotent-replayed"], "true");
        assert!(body.is_err(), "a joiner sees the failure, not a clean end");
    }
    assert_eq!(stat(&demo, "completions").await, 1);
    // Nothing was stored and the key is free: the retry runs again.
    let retry = demo
        .open("/completions", "gen-join-breaks", BREAKS, &[])
        .await
        .unwrap();
    assert!(!retry.headers().contains_key("idempotent-replayed"));
    assert!(retry.into_body().collect().await.is_err());
    assert_eq!(stat(&demo, "completions").await, 2);
}

#[tokio::test]
async fn a_joiner_with_another_payload_gets_422() {
    let demo = Demo::start(&["--on-conflict", "join"]).await;
    let original = live_original(&demo, "gen-join-422", THOUSAND).await;
    let other = demo
        .post_to(
            "/completions",
            "gen-join-422",
            r#"{"tokens": 999, "interval_ms": 1}"#,
            &[],
        )
        .await;
    assert_eq!(other.status, 422);
    drop(original);
    assert_eq!(stat(&demo, "completions").await, 1);
}

#[tokio::test]
async fn a_joiner_with_last_event_id_gets_the_events_after_it() {
    let demo = Demo::start(&["--on-conflict", "join"]).await;
    const SLOW: &str = r#"{"tokens": 300, "interval_ms": 5}"#;
    let original = live_original(&demo, "gen-join-resume", SLOW).await;
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(3));
    let tail = |id: &str| {
        tokio::spawn(joined(
            demo.base.clone(),
            "gen-join-resume".into(),
            SLOW,
            vec![("last-event-id", id.to_owned())],
            barrier.clone(),
            None,
        ))
    };
    // An id produced already (most likely), one still to come, one no event has.
    let (early, late, unknown) = (tail("2"), tail("290"), tail("tok-3"));
    let whole = original.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(whole, events(1, 300).as_bytes());
    let (_, early) = early.await.unwrap();
    assert_eq!(early.unwrap(), events(3, 300).as_bytes());
    let (headers, late) = late.await.unwrap();
    assert!(!headers.contains_key("content-length"));
    assert_eq!(late.unwrap(), events(291, 300).as_bytes());
    let (_, unknown) = unknown.await.unwrap();
    assert_eq!(unknown.unwrap(), whole, "an unknown id: the whole stream");
    assert_eq!(stat(&demo, "completions").await, 1);
}

/// On `store`, two demo processes joining live (`--on-conflict join`).
async fn two_joining(store: &str) -> (Demo, Demo) {
    let args = ["--store", store, "--on-conflict", "join"];
    (Demo::start(&args).await, Demo::start(&args).await)
}

/// On `store`: the original streams 1,000 events on the first instance; 10 duplicates sent at
/// once to the second each have their head while the generation still runs, then get the
/// identical byte sequence. The handler ran once, on the first.
async fn joiners_on_another_instance_follow_the_stream_live(store: &str) {
    let (first, second) = two_joining(store).await;
    const SLOW: &str = r#"{"tokens": 1000, "interval_ms": 3}"#;
    let key = format!("gen-{}", uuid::Uuid::new_v4().simple());
    let original = live_original(&first, &key, SLOW).await;
    let heads = std::sync::Arc::new(tokio::sync::Barrier::new(11));
    let joiners = joiners(&second, &key, SLOW, 10, Some(heads.clone()));
    heads.wait().await;
    assert_eq!(
        stat(&first, "completions_finished").await,
        0,
        "{store}: joined live, not after the end"
    );
    let whole = original.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(whole, events(1, 1000).as_bytes());
    for joiner in joiners {
        let (headers, body) = joiner.await.unwrap();
        assert_eq!(headers["idempotent-replayed"], "true", "{store}");
        assert_eq!(headers["content-type"], "text/event-stream", "{store}");
        assert_eq!(body.unwrap(), whole, "{store}: the identical byte sequence");
    }
    assert_eq!(stat(&first, "completions").await, 1, "{store}");
    assert_eq!(stat(&second, "completions").await, 0, "{store}");
}

#[tokio::test]
async fn joiners_on_another_instance_follow_the_stream_live_on_sqlite() {
    let dir = support::servers::TempDir::new("demo-join");
    let store = format!("sqlite://{}", dir.path().join("idempotency.db").display());
    joiners_on_another_instance_follow_the_stream_live(&store).await;
}

#[tokio::test]
async fn joiners_on_another_instance_follow_the_stream_live_on_redis() {
    let Some(url) = support::servers::redis_url() else {
        return;
    };
    joiners_on_another_instance_follow_the_stream_live(&url).await;
}

#[tokio::test]
async fn joiners_on_another_instance_follow_the_stream_live_on_postgres() {
    let Some(url) = support::servers::postgres_url() else {
        return;
    };
    joiners_on_another_instance_follow_the_stream_live(&url).await;
}

/// On `store`: a stream that fails mid-way on the first instance, followed by 10 joiners on
/// the second: every joiner's body fails (never a clean end), nothing is stored (a retry on the
/// second runs the handler there).
async fn joiners_on_another_instance_see_the_failure(store: &str) {
    let (first, second) = two_joining(store).await;
    // 1.5 s before the failure: every joiner has its head before it.
    const BREAKS: &str = r#"{"tokens": 300, "interval_ms": 10, "fail_after": 150}"#;
    let key = format!("gen-{}", uuid::Uuid::new_v4().simple());
    let original = live_original(&first, &key, BREAKS).await;
    let heads = std::sync::Arc::new(tokio::sync::Barrier::new(11));
    let joiners = joiners(&second, &key, BREAKS, 10, Some(heads.clone()));
    heads.wait().await;
    assert!(original.into_body().collect().await.is_err());
    for joiner in joiners {
        let (headers, body) = joiner.await.unwrap();
        assert_eq!(headers["idempotent-replayed"], "true", "{store}: joined");
        assert!(
            body.is_err(),
            "{store}: a joiner sees the failure, not a clean end"
        );
    }
    assert_eq!(stat(&first, "completions").await, 1);
    assert_eq!(stat(&second, "completions").await, 0);
    let retry = second
        .open("/completions", &key, BREAKS, &[])
        .await
        .unwrap();
    assert!(
        !retry.headers().contains_key("idempotent-replayed"),
        "{store}"
    );
    assert!(retry.into_body().collect().await.is_err());
    assert_eq!(
        stat(&second, "completions").await,
        1,
        "{store}: nothing was stored"
    );
}

#[tokio::test]
async fn joiners_on_another_instance_see_the_failure_on_sqlite() {
    let dir = support::servers::TempDir::new("demo-join-fails");
    let store = format!("sqlite://{}", dir.path().join("idempotency.db").display());
    joiners_on_another_instance_see_the_failure(&store).await;
}

#[tokio::test]
async fn joiners_on_another_instance_see_the_failure_on_redis() {
    let Some(url) = support::servers::redis_url() else {
        return;
    };
    joiners_on_another_instance_see_the_failure(&url).await;
}

#[tokio::test]
async fn joiners_on_another_instance_see_the_failure_on_postgres() {
    let Some(url) = support::servers::postgres_url() else {
        return;
    };
    joiners_on_another_instance_see_the_failure(&url).await;
}

/// A duplicate of another tenant, whose tenant and key differ from the original's by `{`, `}`
/// or `|`, never sees the original's stream from another instance: its own request runs.
#[tokio::test]
async fn another_tenants_key_never_joins_a_stream_on_another_instance() {
    let Some(url) = support::servers::redis_url() else {
        return;
    };
    let (first, second) = two_joining(&url).await;
    const SLOW: &str = r#"{"tokens": 300, "interval_ms": 5}"#;
    const SHORT: &str = r#"{"tokens": 3, "interval_ms": 1}"#;
    let original = live_original(&first, "a|{b}", SLOW).await;
    let others = [
        ("acme|a", "{b}"),
        ("acme{", "a|{b}"),
        ("acme}", "a|{b}"),
        ("acme", "a|{b"),
    ];
    for (tenant, key) in others {
        let request = http::Request::post(format!("{}/completions", second.base))
            .header("authorization", format!("Bearer {tenant}"))
            .header("content-type", "application/json")
            .header("idempotency-key", key)
            .body(http_body_util::Full::new(bytes::Bytes::from(SHORT)))
            .unwrap();
        let reply = second.send(request).await;
        assert!(!reply.replayed(), "{tenant} {key}: {}", reply.status);
        assert_eq!(reply.body, events(1, 3).as_bytes(), "{tenant} {key}");
    }
    assert_eq!(stat(&second, "completions").await, 4, "each ran its own");
    let whole = original.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(whole, events(1, 300).as_bytes());
    assert_eq!(stat(&first, "completions").await, 1);
}
