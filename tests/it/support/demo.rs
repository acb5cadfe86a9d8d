//! The demo server as a child process, driven over loopback.
#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncBufReadExt, BufReader};

/// A demo process, killed on drop.
pub struct Demo {
    child: Child,
    pub base: String,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Drop for Demo {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The binary of example `name`, built by `cargo test` beside the tests (built here if not).
pub fn example_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let binary = profile_dir.join("examples").join(name);
    if !binary.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "--example", name])
            .status()
            .unwrap();
        assert!(status.success());
    }
    binary
}

fn demo_binary() -> PathBuf {
    example_binary("demo_server")
}

/// Starts `binary --addr 127.0.0.1:0 ARGS` and waits for its `listening on http://IP:PORT`
/// line: the child and its base URL.
pub async fn spawn_listening(binary: &std::path::Path, args: &[&str]) -> (Child, String) {
    let mut child = Command::new(binary)
        .args(["--addr", "127.0.0.1:0"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = tokio::process::ChildStdout::from_std(child.stdout.take().unwrap()).unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).await.unwrap();
    let Some(base) = line.trim().strip_prefix("listening on ").map(str::to_owned) else {
        // It did not start: say why (its standard error, read to the end as it exited).
        let mut why = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut why);
        panic!("{} {args:?} did not start: {why}", binary.display());
    };
    // Keep draining its standard error (logs), so that it never blocks on a full pipe.
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut stderr, &mut std::io::sink());
    });
    (child, base)
}

/// A response whose body is read as it comes.
pub type Streamed = http::Response<http_body_util::combinators::UnsyncBoxBody<Bytes, String>>;

pub struct Reply {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn replayed(&self) -> bool {
        self.headers
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true")
    }
}

impl Demo {
    pub async fn start(args: &[&str]) -> Self {
        let (child, base) = spawn_listening(&demo_binary(), args).await;
        let client = Client::builder(TokioExecutor::new()).build_http();
        Self {
            child,
            base,
            client,
        }
    }

    /// Sends a signal (`"TERM"`, `"INT"`) with `kill(1)`, as an orchestrator would.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits up to `within` for the process to exit: its exit status, or `None` if it still
    /// runs.
    pub async fn exited_within(
        &mut self,
        within: std::time::Duration,
    ) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// Whether the process has exited.
    pub fn exited_now(&mut self) -> bool {
        self.child.try_wait().unwrap().is_some()
    }

    /// SIGKILL: the process dies wherever it is, as in a crash.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub async fn post(&self, tenant: &str, key: Option<&str>, body: &str) -> Reply {
        let mut request = Request::post(format!("{}/payments", self.base))
            .header("authorization", format!("Bearer {tenant}"))
            .header("content-type", "application/json");
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        self.send(
            request
                .body(Full::new(Bytes::from(body.to_owned())))
                .unwrap(),
        )
        .await
    }

    pub async fn send(&self, request: Request<Full<Bytes>>) -> Reply {
        self.try_send(request).await.unwrap()
    }

    /// A payment POST whose connection may fail (the process crashing while it runs).
    pub async fn try_post(&self, tenant: &str, key: &str, body: &str) -> Result<Reply, String> {
        let request = Request::post(format!("{}/payments", self.base))
            .header("authorization", format!("Bearer {tenant}"))
            .header("content-type", "application/json")
            .header("idempotency-key", key)
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap();
        self.try_send(request).await
    }

    /// The demo's `/stats` document.
    pub async fn stats(&self) -> serde_json::Value {
        let reply = self
            .send(
                Request::get(format!("{}/stats", self.base))
                    .body(Full::default())
                    .unwrap(),
            )
            .await;
        serde_json::from_slice(&reply.body).unwrap()
    }

    pub async fn try_send(&self, request: Request<Full<Bytes>>) -> Result<Reply, String> {
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| e.to_string())?;
        let (parts, body) = response.into_parts();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.map_err(|e| e.to_string())?.to_bytes(),
        })
    }

    /// A keyed `POST path` as `Bearer acme` with `extra` headers, its response body left
    /// unread: the caller reads it frame by frame, or drops it mid-way (which closes the
    /// connection, as a client that gives up does).
    pub async fn open(
        &self,
        path: &str,
        key: &str,
        body: &str,
        extra: &[(&str, &str)],
    ) -> Result<Streamed, String> {
        let mut request = Request::post(format!("{}{path}", self.base))
            .header("authorization", "Bearer acme")
            .header("content-type", "application/json")
            .header("idempotency-key", key);
        for (name, value) in extra {
            request = request.header(*name, *value);
        }
        let request = request
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap();
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| e.to_string())?;
        Ok(response.map(|body| body.map_err(|e| e.to_string()).boxed_unsync()))
    }

    /// [`open`](Self::open), read to the end.
    pub async fn post_to(
        &self,
        path: &str,
        key: &str,
        body: &str,
        extra: &[(&str, &str)],
    ) -> Reply {
        let response = self.open(path, key, body, extra).await.unwrap();
        let (parts, body) = response.into_parts();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    }

    pub async fn executions(&self) -> u64 {
        let reply = self
            .send(
                Request::get(format!("{}/stats", self.base))
                    .body(Full::default())
                    .unwrap(),
            )
            .await;
        let stats: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        stats["executions"].as_u64().unwrap()
    }
}

/// Runs the demo with `args` and waits for it to exit: it must fail to start. Its exit status
/// and standard error.
pub async fn start_fails(args: &[&str]) -> (std::process::ExitStatus, String) {
    start_fails_as(None, args).await
}

/// [`start_fails`], run as `user` (with `runuser`, when the tests run as root).
pub async fn start_fails_as(
    user: Option<&str>,
    args: &[&str],
) -> (std::process::ExitStatus, String) {
    let mut command = match user {
        Some(user) => {
            let mut command = tokio::process::Command::new("runuser");
            command.args(["-u", user, "--"]).arg(demo_binary());
            command
        }
        None => tokio::process::Command::new(demo_binary()),
    };
    let output = command.args(["--addr", "127.0.0.1:0"]).args(args).output();
    let output = tokio::time::timeout(std::time::Duration::from_secs(20), output)
        .await
        .expect("the demo exits when it cannot start")
        .unwrap();
    (
        output.status,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A payment POST to the demo at `base` from a client of its own (to send from another task),
/// whose connection may fail.
pub async fn try_post_to(
    base: &str,
    tenant: &str,
    key: &str,
    body: &str,
) -> Result<StatusCode, String> {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let request = Request::post(format!("{base}/payments"))
        .header("authorization", format!("Bearer {tenant}"))
        .header("content-type", "application/json")
        .header("idempotency-key", key)
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    client
        .request(request)
        .await
        .map(|r| r.status())
        .map_err(|e| e.to_string())
}
