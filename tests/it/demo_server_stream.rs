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
async fn a_keyed_stream_reaches_the_client_only_once_it_is_whole_today() {
    // Today's behaviour, pinned so that the change is seen when it comes (chunked records):
    // the layer reads a storable body to its end (up to `max_response_body`) before it answers,
    // so the first byte of a keyed stream leaves when its last event was generated. Unkeyed,
    // the same route streams.
    let demo = Demo::start(&[]).await;
    let slow = r#"{"tokens": 20, "interval_ms": 20}"#;
    let keyed = demo
        .open("/completions", "gen-held", slow, &[])
        .await
        .unwrap();
    assert_eq!(
        stat(&demo, "completions_finished").await,
        1,
        "the head came after the last event"
    );
    drop(keyed);
    let request = http::Request::post(format!("{}/completions", demo.base))
        .header("authorization", "Bearer acme")
        .body(http_body_util::Full::new(bytes::Bytes::from(slow)))
        .unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let unkeyed = client.request(request).await.unwrap();
    assert_eq!(unkeyed.status(), 200);
    assert_eq!(
        stat(&demo, "completions_finished").await,
        1,
        "unkeyed, the head comes before the generation ends"
    );
    let body = unkeyed.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, events(1, 20).as_bytes());
}

#[tokio::test]
async fn a_stream_that_fails_mid_way_is_not_stored_and_its_key_is_released() {
    // Today: the layer reads the body before answering, so the client gets a 500 problem (no
    // partial stream), nothing is stored, and the retry runs the handler again.
    let demo = Demo::start(&[]).await;
    let breaks = r#"{"tokens": 100, "interval_ms": 1, "fail_after": 50}"#;
    let first = demo
        .post_to("/completions", "gen-breaks", breaks, &[])
        .await;
    assert_eq!(first.status, 500);
    assert_eq!(first.headers["content-type"], "application/problem+json");
    assert!(!first.replayed());
    let retry = demo
        .post_to("/completions", "gen-breaks", breaks, &[])
        .await;
    assert_eq!(retry.status, 500);
    assert!(!retry.replayed(), "released: the retry ran");
    assert_eq!(stat(&demo, "completions").await, 2);
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
        let whole = demo.post_to("/completions", &key, THOUSAND, &[]).await;
        assert!(whole.replayed(), "{store}");
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
