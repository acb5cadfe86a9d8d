//! The demo on `--store sqlite://PATH`, as real processes: a payment survives `kill -9` and a
//! graceful stop, two processes on one file run a payment once, and a bad path fails at start.

use crate::support;

use std::sync::Arc;

use support::demo::{start_fails, start_fails_as, Demo};
use support::servers::TempDir;

const PAYMENT: &str = r#"{"amount": 1000, "currency": "usd"}"#;

fn sqlite_arg(dir: &TempDir) -> String {
    format!("sqlite://{}", dir.path().join("idempotency.db").display())
}

/// Pays, stops the demo (`stop`), starts another on the same file: the retry replays the first
/// answer and the new process runs nothing.
async fn payment_survives_a_restart(stop: impl FnOnce(&mut Demo)) {
    let dir = TempDir::new("demo-sqlite");
    let store = sqlite_arg(&dir);
    let mut first = Demo::start(&["--store", &store]).await;
    let paid = first.post("acme", Some("restart-1"), PAYMENT).await;
    assert_eq!(paid.status, 201);
    stop(&mut first);
    let second = Demo::start(&["--store", &store]).await;
    let retry = second.post("acme", Some("restart-1"), PAYMENT).await;
    assert_eq!(retry.status, 201);
    assert!(retry.replayed(), "the retry after the restart replays");
    assert_eq!(retry.body, paid.body, "the same payment");
    assert_eq!(second.executions().await, 0, "nothing ran again");
}

#[tokio::test]
async fn a_payment_survives_kill_9() {
    payment_survives_a_restart(Demo::kill).await;
}

#[tokio::test]
async fn a_payment_survives_a_graceful_stop() {
    payment_survives_a_restart(|demo| {
        demo.signal("TERM");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if demo.exited_now() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("the demo did not stop on SIGTERM");
    })
    .await;
}

/// Two processes on one file (a pre-fork server): 50 duplicates of one payment sent at once,
/// alternately to each, run the handler once; every duplicate gets that one payment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_on_one_file_run_a_payment_once() {
    let dir = TempDir::new("demo-sqlite");
    let store = sqlite_arg(&dir);
    let args = ["--store", store.as_str(), "--on-conflict", "wait"];
    let demos = Arc::new([Demo::start(&args).await, Demo::start(&args).await]);
    let body = r#"{"amount": 7, "currency": "eur", "delay_ms": 300}"#;
    let barrier = Arc::new(tokio::sync::Barrier::new(50));
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let (demos, barrier) = (demos.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                demos[i % 2].post("acme", Some("prefork-1"), body).await
            })
        })
        .collect();
    let mut bodies = std::collections::HashSet::new();
    for task in tasks {
        let reply = task.await.unwrap();
        assert_eq!(reply.status, 201, "{:?}", reply.body);
        bodies.insert(reply.body);
    }
    assert_eq!(bodies.len(), 1, "every duplicate got the one payment");
    let runs = demos[0].executions().await + demos[1].executions().await;
    assert_eq!(runs, 1, "the handler ran once across both processes");
}

#[tokio::test]
async fn an_unopenable_path_fails_at_start_with_a_clear_message() {
    let dir = TempDir::new("demo-sqlite");
    let path = dir.path().join("missing-dir").join("db.sqlite");
    let (status, stderr) = start_fails(&["--store", &format!("sqlite://{}", path.display())]).await;
    assert!(!status.success());
    assert!(
        stderr.contains("cannot open the SQLite database") && stderr.contains("missing-dir"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
}

#[tokio::test]
async fn a_file_that_is_not_a_database_fails_at_start_with_a_clear_message() {
    let dir = TempDir::new("demo-sqlite");
    let path = dir.path().join("payments.csv");
    std::fs::write(&path, "id,amount\n".repeat(500)).unwrap();
    let (status, stderr) = start_fails(&["--store", &format!("sqlite://{}", path.display())]).await;
    assert!(!status.success());
    assert!(
        stderr.contains("payments.csv is not a SQLite database"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
}

/// A database this process may only read fails at start with a message that says so. As root
/// (which ignores file permissions) the demo runs as `nobody`, for whom the file and its
/// directory are read-only; otherwise the file and directory are made read-only.
#[tokio::test]
async fn a_read_only_database_fails_at_start_with_a_clear_message() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("demo-sqlite-ro");
    let path = dir.path().join("ro.db");
    drop(
        tower_idempotency::store::SqliteStore::open(&path)
            .await
            .unwrap(),
    );
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| out.stdout.starts_with(b"0"));
    let store = format!("sqlite://{}", path.display());
    let (status, stderr) = if root {
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        start_fails_as(Some("nobody"), &["--store", &store]).await
    } else {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444)).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o555)).unwrap();
        let failed = start_fails(&["--store", &store]).await;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        failed
    };
    assert!(!status.success());
    assert!(stderr.contains("ro.db is read-only"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
}

/// The limit routes of `benches/http.sh` (`--limit-routes`) do what the bench says they do: the
/// fresh route runs the handler and stores its body; the replay route answers a stored key
/// with those bytes without running the handler.
#[tokio::test]
async fn the_limit_routes_store_once_and_read_back() {
    let dir = TempDir::new("demo-sqlite");
    let store = sqlite_arg(&dir);
    let demo = Demo::start(&["--store", &store, "--limit-routes"]).await;
    let post = |path: &'static str, key: &'static str| {
        let request = http::Request::post(format!("{}{path}", demo.base))
            .header("authorization", "Bearer acme")
            .header("content-type", "application/json")
            .header("idempotency-key", key)
            .body(http_body_util::Full::new(bytes::Bytes::from(PAYMENT)))
            .unwrap();
        demo.send(request)
    };
    let fresh = post("/limit/fresh/payments", "limit-1").await;
    assert_eq!(fresh.status, 201);
    assert_eq!(demo.executions().await, 1);
    let stored = post("/limit/replay/payments", "limit-1").await;
    assert_eq!(stored.status, 201);
    assert_eq!(
        stored.body, fresh.body,
        "the replay route reads the stored body"
    );
    assert_eq!(demo.executions().await, 1, "reading ran nothing");
    let unseen = post("/limit/replay/payments", "limit-2").await;
    assert_eq!(unseen.status, 201);
    assert_eq!(
        demo.executions().await,
        2,
        "a key not stored yet runs the fresh path"
    );
    let again = post("/limit/fresh/payments", "limit-1").await;
    assert_eq!(
        again.status, 503,
        "a second claim of a key fails: the route is no layer"
    );
}
