//! Races: many duplicates at the same instant, on a multi-threaded runtime, and a client that
//! disconnects over a real socket.

use crate::support;

use std::sync::Arc;
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Barrier;
use tower_idempotency::{IdempotencyLayer, OnConflict, Settings};

const BODY: &str = r#"{"amount":100}"#;
const TASKS: usize = 64;

/// Fires `TASKS` identical requests released by one barrier; returns their answers.
async fn race(
    app: &App<tower_idempotency::store::MemoryStore>,
    key: &str,
    headers: &'static [(&'static str, &'static str)],
) -> Vec<Answer> {
    let barrier = Arc::new(Barrier::new(TASKS));
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let (mut app, barrier, key) = (app.clone(), barrier.clone(), key.to_owned());
            tokio::spawn(async move {
                let request = request(Some(&key), BODY, headers);
                barrier.wait().await;
                send(&mut app, request).await
            })
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn simultaneous_duplicates_run_the_handler_exactly_once() {
    let (app, probe) = app(IdempotencyLayer::new());
    for round in 0..20 {
        let key = format!("race-{round}");
        let answers = race(&app, &key, &[("x-delay-ms", "1")]).await;
        let created = answers
            .iter()
            .filter(|a| a.status == 201 && !a.replayed())
            .count();
        let replayed = answers.iter().filter(|a| a.replayed()).count();
        let conflicts = answers.iter().filter(|a| a.status == 409).count();
        assert_eq!(created, 1, "round {round}: exactly one original");
        assert_eq!(
            created + replayed + conflicts,
            TASKS,
            "round {round}: nothing else"
        );
        assert_eq!(probe.executions(), round + 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn simultaneous_waiting_duplicates_all_get_the_one_response() {
    let (app, probe) = app(IdempotencyLayer::with_settings(
        Settings::default().on_conflict(OnConflict::Wait(Duration::from_secs(30))),
    ));
    for round in 0..10 {
        let key = format!("wait-race-{round}");
        let answers = race(&app, &key, &[("x-delay-ms", "20")]).await;
        let original = answers
            .iter()
            .find(|a| !a.replayed())
            .expect("one original");
        assert_eq!(answers.iter().filter(|a| !a.replayed()).count(), 1);
        for answer in &answers {
            assert_eq!(answer.status, 201);
            assert_eq!(
                answer.body, original.body,
                "every duplicate gets the original's body"
            );
        }
        assert_eq!(probe.executions(), round + 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn distinct_keys_racing_each_run_once() {
    let (app, probe) = app(IdempotencyLayer::new());
    let barrier = Arc::new(Barrier::new(TASKS));
    let tasks: Vec<_> = (0..TASKS)
        .map(|i| {
            let (mut app, barrier) = (app.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                let first = send(&mut app, request(Some(&format!("key-{i}")), BODY, &[])).await;
                let again = send(&mut app, request(Some(&format!("key-{i}")), BODY, &[])).await;
                assert!(!first.replayed() && again.replayed());
                assert_eq!(first.body, again.body);
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(probe.executions(), TASKS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_request_over_tcp_gets_a_replay_on_retry() {
    let probe = Probe::default();
    let app = router(probe.clone()).layer(IdempotencyLayer::with_settings(
        Settings::default().on_conflict(OnConflict::Wait(Duration::from_secs(30))),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let raw = |hold: bool| {
        format!(
            "POST /payments HTTP/1.1\r\nhost: x\r\nidempotency-key: tcp\r\ncontent-type: application/json\r\n{}content-length: {}\r\nconnection: close\r\n\r\n{BODY}",
            if hold { "x-hold: 1\r\n" } else { "" },
            BODY.len()
        )
    };
    let mut first = tokio::net::TcpStream::connect(addr).await.unwrap();
    first.write_all(raw(true).as_bytes()).await.unwrap();
    probe.started(1).await;
    // The client gives up and closes the connection while the handler runs.
    drop(first);
    probe.release_held(1);

    let mut retry = tokio::net::TcpStream::connect(addr).await.unwrap();
    retry.write_all(raw(false).as_bytes()).await.unwrap();
    let mut answer = String::new();
    retry.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("idempotent-replayed: true"),
        "{answer}"
    );
    assert_eq!(probe.executions(), 1);
    assert_eq!(probe.finished(), 1);
    server.abort();
}
