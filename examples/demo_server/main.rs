//! A payments API guarded by `tower-idempotency`: the project's demo and its outside contract.
//!
//! ```text
//! cargo run --example demo_server -- [--addr HOST:PORT] [--store memory|sqlite://PATH|…] [--ttl SECS]
//!     [--lease SECS] [--on-conflict reject|wait|join] [--require-key] [--drain-timeout SECS]
//! ```
//!
//! On `SIGTERM` or `SIGINT` (Ctrl-C) it shuts down gracefully: it stops accepting connections,
//! refuses new keyed requests with 503, lets in-flight requests answer and detached work
//! finish, and releases whatever claims are still held after `--drain-timeout` seconds; then
//! it exits 0.
//!
//! * `POST /payments` (needs `Authorization: Bearer <tenant>`; keys are scoped per tenant):
//!   `{"amount": u64, "currency": str}` → 201 with the payment. `"delay_ms": n` makes the
//!   handler sleep, `"fail": true` makes it answer 500 after the charge, on a key's first run
//!   (a retry with the same payload resumes from its recovery point and succeeds).
//! * `GET /payments/{id}` (the payment's own tenant: anonymous 401, another tenant 404),
//!   `GET /stats` (`{"executions": N, "provider_charges": M}`: how often the POST handler
//!   started, and how often it charged the simulated payment provider).
//!
//! The payment handler models a real one: it charges a simulated payment provider (a charge id
//! `ch_…`, returned in the payment), saves a recovery point right after the charge, then sleeps
//! `delay_ms` and answers. A run that finds a point (an earlier run crashed or failed after
//! charging) reuses its charge instead of charging again. `"crash_after_charge": true` aborts
//! the process right after the point is saved, on a key's first run only (a crash test).
//! * `POST /bare/payments`: the same handler without the layer (for load comparisons).
//! * `POST /completions` (the same authentication and layer as `POST /payments`): a simulated
//!   generation answered as `text/event-stream`, one event per token (`id: N`, 1-based, and
//!   `data: tok-N`), every `"interval_ms"` (default 2). `{"tokens": n}` (default 20, at most
//!   1,000,000); `"delay_ms": n` sleeps before the answer; `"fail": true` answers 500 instead;
//!   `"fail_after": n` ends the stream with an error after `n` events (a generation that breaks
//!   mid-stream). `GET /stats` counts them: `completions` (the handler started),
//!   `completions_finished` (a generation sent its last event).
//! * With `--limit-routes`, `POST /limit/replay/payments` and `POST /limit/fresh/payments`: the
//!   same handler with exactly the store round trips the layer needs on each path, and nothing
//!   else (see `limit.rs`; for `benches/http.sh`).

mod limit;

use std::collections::{HashMap, VecDeque};
use std::future::{Future, IntoFuture};
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use clap::{Parser, ValueEnum};
use serde::Deserialize;
use serde_json::{json, Value};
use tower::ServiceBuilder;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_idempotency::store::{
    BoxStore, MemoryStore, PostgresStore, RedisStore, SqliteStore, Synchronous,
};
use tower_idempotency::{IdempotencyLayer, OnConflict, RecoveryError, RecoveryPoints, Settings};

#[derive(Parser, Debug)]
#[command(about = "Demo payments API behind tower-idempotency")]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:3000")]
    addr: SocketAddr,
    /// Where records live: `memory`, `sqlite://PATH[?synchronous=normal|full]` (a file that
    /// survives restarts; `full` survives a power loss too),
    /// `redis://HOST:PORT`, `redis+cluster://HOST:PORT[,HOST:PORT…]` (one or more seed nodes of a
    /// Redis Cluster), `redis+sentinel://HOST:PORT[,HOST:PORT…]/MASTER_NAME` (the master Redis
    /// Sentinel names, followed across failovers) or `postgres://USER@HOST:PORT/DB`.
    #[arg(long, default_value = "memory")]
    store: String,
    /// How long responses are kept for replay, in seconds [the library's default, `defaults::TTL`].
    #[arg(long)]
    ttl: Option<u64>,
    /// How long a claim lasts without renewal (`Settings::lease`), in seconds [the library's
    /// default, `defaults::LEASE`]. `--lock-ttl`, its former name, still works.
    #[arg(long, alias = "lock-ttl")]
    lease: Option<u64>,
    /// What a duplicate gets while the original runs: `reject` (409), `wait` (up to 30 s for
    /// its end, then its replay) or `join` (as `wait`, and a duplicate of a streaming original
    /// follows its stream live: every event so far, then each as it is produced).
    #[arg(long, value_enum, default_value_t = Conflict::Reject)]
    on_conflict: Conflict,
    /// Refuse keyless POSTs with 400.
    #[arg(long)]
    require_key: bool,
    /// Redis: replicas that must acknowledge every claim and completion (`WAIT`, 500 ms) before
    /// the handler runs; 0 replicates asynchronously, as Redis does.
    #[arg(long, default_value_t = 0)]
    min_replicas: u32,
    /// Capacity of the memory store, in MiB of records [library default: 64].
    #[arg(long)]
    memory_mib: Option<u64>,
    /// Fault injection: after `POST /payments` ran (and its response was stored), close the
    /// connection without answering this fraction of the time (0.0 to 1.0).
    #[arg(long, default_value_t = 0.0)]
    drop_responses: f64,
    /// On SIGTERM/SIGINT, how long in-flight and detached requests may run on before their
    /// claims are released, in seconds.
    #[arg(long, default_value_t = 30)]
    drain_timeout: u64,
    /// Append each charge of the simulated payment provider to this file (one id a line).
    #[arg(long)]
    provider_ledger: Option<std::path::PathBuf>,
    /// Charge without recovery points (every run charges; for load comparisons).
    #[arg(long)]
    no_recovery_points: bool,
    /// How many payments `GET /payments/{id}` remembers (the oldest are forgotten first).
    #[arg(long, default_value_t = 100_000)]
    max_payments: usize,
    /// Serve the store's limit routes `POST /limit/{replay,fresh}/payments` (for benches).
    #[arg(long)]
    limit_routes: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Conflict {
    Reject,
    Wait,
    Join,
}

#[derive(Clone)]
struct AppState {
    executions: Arc<AtomicU64>,
    /// `POST /completions`: handlers started, and generations that sent their last event.
    completions: Arc<AtomicU64>,
    completions_finished: Arc<AtomicU64>,
    provider: Arc<Provider>,
    recovery_points: bool,
    payments: Arc<Mutex<Payments>>,
    /// The store's raw connection for the limit routes (`--limit-routes`).
    limit: Option<limit::Limit>,
}

/// The payments made, at most `max` (the oldest are forgotten first): a demo must not grow
/// without bound under a load test.
struct Payments {
    by_id: HashMap<String, Value>,
    order: VecDeque<String>,
    max: usize,
}

impl Payments {
    fn insert(&mut self, id: String, payment: Value) {
        if self.order.len() >= self.max {
            if let Some(oldest) = self.order.pop_front() {
                self.by_id.remove(&oldest);
            }
        }
        self.order.push_back(id.clone());
        self.by_id.insert(id, payment);
    }
}

#[derive(Clone)]
struct Tenant(String);

#[derive(Deserialize)]
struct NewPayment {
    amount: u64,
    currency: String,
    #[serde(default)]
    delay_ms: u64,
    #[serde(default)]
    fail: bool,
    #[serde(default)]
    crash_after_charge: bool,
}

/// The simulated payment provider: counts charges, and appends each charge id to the ledger
/// file when there is one (so that a test sees charges across a crash of the demo).
struct Provider {
    charges: AtomicU64,
    ledger: Option<Mutex<std::fs::File>>,
}

impl Provider {
    fn charge(&self) -> String {
        let id = format!("ch_{}", uuid::Uuid::new_v4().simple());
        self.charges.fetch_add(1, Ordering::SeqCst);
        if let Some(ledger) = &self.ledger {
            let mut ledger = ledger.lock().unwrap();
            writeln!(ledger, "{id}").expect("write the provider ledger");
        }
        id
    }
}

fn problem(status: StatusCode, title: &str, detail: &str) -> Response {
    let body =
        json!({"type": "about:blank", "title": title, "status": status.as_u16(), "detail": detail});
    let mut response = (status, body.to_string()).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    response
}

/// The 500 a `"fail": true` asks for.
fn simulated_failure() -> Response {
    let body = Json(json!({"error": "simulated failure"}));
    (StatusCode::INTERNAL_SERVER_ERROR, body).into_response()
}

/// Authentication: runs before the idempotency layer and tells it the tenant.
/// The tenant named by `Authorization: Bearer <tenant>`.
fn bearer(request: &Request) -> Option<String> {
    request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
}

async fn authenticate(mut request: Request, next: Next) -> Response {
    match bearer(&request) {
        Some(tenant) => {
            request.extensions_mut().insert(Tenant(tenant));
            next.run(request).await
        }
        None => problem(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "Send Authorization: Bearer <tenant>.",
        ),
    }
}

async fn create_payment(
    State(state): State<AppState>,
    tenant: Option<Extension<Tenant>>,
    points: Option<Extension<RecoveryPoints>>,
    body: Bytes,
) -> Response {
    state.executions.fetch_add(1, Ordering::SeqCst);
    let payment: NewPayment = match serde_json::from_slice(&body) {
        Ok(payment) => payment,
        Err(error) => {
            return problem(
                StatusCode::BAD_REQUEST,
                "Invalid payment",
                &error.to_string(),
            );
        }
    };
    let points = points.filter(|_| state.recovery_points);
    let (charge, resumed) = match charge(&state.provider, points, payment.crash_after_charge).await
    {
        Ok(charged) => charged,
        Err(error) => {
            return problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "Payment not completed",
                &error.to_string(),
            );
        }
    };
    if payment.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(payment.delay_ms)).await;
    }
    // A simulated failure after the charge, on a key's first run: a retry with the same
    // payload resumes from the recovery point and succeeds without charging again.
    if payment.fail && !resumed {
        return simulated_failure();
    }
    let id = format!("pay_{}", uuid::Uuid::new_v4().simple());
    let tenant = tenant.map(|Extension(Tenant(t))| t).unwrap_or_default();
    let record = json!({"id": id, "amount": payment.amount, "currency": payment.currency,
        "tenant": tenant, "charge": charge});
    state
        .payments
        .lock()
        .unwrap()
        .insert(id.clone(), record.clone());
    let mut response = (StatusCode::CREATED, Json(record)).into_response();
    response.headers_mut().insert(
        header::LOCATION,
        HeaderValue::try_from(format!("/payments/{id}")).expect("ids are ASCII"),
    );
    response
}

/// A payment, to its own tenant (the authentication middleware refused anonymous reads with
/// 401): another tenant's payment is 404, as if it did not exist.
async fn get_payment(
    State(state): State<AppState>,
    Extension(Tenant(tenant)): Extension<Tenant>,
    Path(id): Path<String>,
) -> Response {
    let payments = state.payments.lock().unwrap();
    match payments.by_id.get(&id) {
        Some(payment) if payment["tenant"] == tenant.as_str() => {
            Json(payment.clone()).into_response()
        }
        _ => problem(StatusCode::NOT_FOUND, "Not found", "No such payment."),
    }
}

/// Charges the provider once per key: a run that finds the recovery point of an earlier run of
/// its key (which crashed or failed after charging) reuses that charge. The charge id, and
/// whether it was resumed from a point.
async fn charge(
    provider: &Provider,
    points: Option<Extension<RecoveryPoints>>,
    crash_after_charge: bool,
) -> Result<(String, bool), RecoveryError> {
    let Some(Extension(points)) = points else {
        return Ok((provider.charge(), false));
    };
    // Before the charge an error is safe to answer: nothing happened yet. (A point saved by a
    // request with another payload is `KeyReused`, which the layer answers 422.)
    if let Some((phase, charge)) = points.load_json::<String>().await? {
        if phase == "charged" {
            return Ok((charge, true));
        }
    }
    let charge = provider.charge();
    // After the charge, finish whatever happens: the stored outcome is what keeps a retry from
    // charging again; the point only matters should this process die before it is stored.
    if let Err(error) = points.save_json("charged", &charge).await {
        tracing::warn!(%error, "recovery point not saved after the charge; finishing the payment");
    }
    if crash_after_charge {
        // The first run of this key only: a retry finds the point above and goes on.
        std::process::abort();
    }
    Ok((charge, false))
}

/// `POST /limit/{replay,fresh}/payments`: the handler with only the store round trips the
/// layer needs on that path (see `limit.rs`). A replay of a key not stored yet runs the fresh
/// path, which stores it.
async fn limit_payment(
    Path(path): Path<String>,
    State(state): State<AppState>,
    tenant: Option<Extension<Tenant>>,
    headers: header::HeaderMap,
    body: Bytes,
) -> Response {
    let Some(limit) = state.limit.clone() else {
        return problem(
            StatusCode::NOT_FOUND,
            "No limit route",
            "Start with --limit-routes.",
        );
    };
    let failed = |error: Box<dyn std::error::Error + Send + Sync>| {
        problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "Store failed",
            &error.to_string(),
        )
    };
    let key = headers
        .get("idempotency-key")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    if path == "replay" {
        match limit.read(key.clone()).await {
            Ok(Some(stored)) => {
                let json = [(header::CONTENT_TYPE, "application/json")];
                return (StatusCode::CREATED, json, stored).into_response();
            }
            Ok(None) => {}
            Err(error) => return failed(error),
        }
    }
    if let Err(error) = limit.claim(key.clone()).await {
        return failed(error);
    }
    let response = create_payment(State(state), tenant, None, body).await;
    let (response, stored) = match limit::buffered(response).await {
        Ok(buffered) => buffered,
        Err(error) => return failed(error),
    };
    match limit.complete(key, stored).await {
        Ok(()) => response,
        Err(error) => failed(error),
    }
}

async fn stats(State(state): State<AppState>) -> Json<Value> {
    Json(json!({
        "executions": state.executions.load(Ordering::SeqCst),
        "provider_charges": state.provider.charges.load(Ordering::SeqCst),
        "completions": state.completions.load(Ordering::SeqCst),
        "completions_finished": state.completions_finished.load(Ordering::SeqCst),
    }))
}

#[derive(Deserialize)]
struct NewCompletion {
    #[serde(default = "default_tokens")]
    tokens: u32,
    #[serde(default = "default_interval_ms")]
    interval_ms: u64,
    #[serde(default)]
    delay_ms: u64,
    #[serde(default)]
    fail: bool,
    #[serde(default)]
    fail_after: Option<u32>,
}

fn default_tokens() -> u32 {
    20
}

fn default_interval_ms() -> u64 {
    2
}

/// `POST /completions`: a simulated generation streamed as server-sent events.
async fn create_completion(State(state): State<AppState>, body: Bytes) -> Response {
    state.completions.fetch_add(1, Ordering::SeqCst);
    let parsed = serde_json::from_slice::<NewCompletion>(&body)
        .map_err(|error| error.to_string())
        .and_then(|completion| match completion.tokens {
            0..=1_000_000 => Ok(completion),
            _ => Err("At most 1000000 tokens.".to_owned()),
        });
    let completion = match parsed {
        Ok(completion) => completion,
        Err(detail) => return problem(StatusCode::BAD_REQUEST, "Invalid completion", &detail),
    };
    if completion.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(completion.delay_ms)).await;
    }
    if completion.fail {
        return simulated_failure();
    }
    let generation = Generation {
        next: 1,
        tokens: completion.tokens,
        interval: Duration::from_millis(completion.interval_ms),
        tick: None,
        fail_after: completion.fail_after,
        finished: state.completions_finished.clone(),
    };
    let mut response = Response::new(axum::body::Body::new(generation));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// The body of a simulated generation: one event every `interval`, produced only as the body is
/// polled (as a real generation behind a streamed body is: whoever reads the body drives it).
struct Generation {
    next: u32,
    tokens: u32,
    interval: Duration,
    tick: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    fail_after: Option<u32>,
    finished: Arc<AtomicU64>,
}

impl http_body::Body for Generation {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        use std::task::Poll;
        let this = &mut *self;
        if this.fail_after == Some(this.next - 1) {
            return Poll::Ready(Some(Err("simulated failure mid-stream".into())));
        }
        if this.next > this.tokens {
            if this.next == this.tokens + 1 {
                this.next += 1;
                this.finished.fetch_add(1, Ordering::SeqCst);
            }
            return Poll::Ready(None);
        }
        if !this.interval.is_zero() {
            let interval = this.interval;
            let tick = this
                .tick
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(interval)));
            std::task::ready!(tick.as_mut().poll(cx));
            this.tick = None;
        }
        let n = this.next;
        this.next += 1;
        let event = format!("id: {n}\ndata: tok-{n}\n\n");
        Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from(event)))))
    }
}

/// The store named on the command line.
async fn open_store(args: &Args) -> Result<BoxStore, Box<dyn std::error::Error>> {
    let (spec, memory_mib) = (args.store.as_str(), args.memory_mib);
    let replicated =
        |store: RedisStore| store.with_min_replicas(args.min_replicas, Duration::from_millis(500));
    if spec == "memory" {
        let mut builder = MemoryStore::builder();
        if let Some(mib) = memory_mib {
            builder = builder.max_bytes(mib * 1024 * 1024);
        }
        Ok(BoxStore::new(builder.build()))
    } else if let Some(rest) = spec.strip_prefix("sqlite://") {
        let (path, synchronous) = match rest.split_once('?') {
            None => (rest, Synchronous::Normal),
            Some((path, "synchronous=normal")) => (path, Synchronous::Normal),
            Some((path, "synchronous=full")) => (path, Synchronous::Full),
            Some((_, query)) => {
                return Err(
                    format!("unknown option {query:?}: use ?synchronous=normal|full").into(),
                )
            }
        };
        let store = SqliteStore::builder(path).synchronous(synchronous);
        Ok(BoxStore::new(store.open().await?))
    } else if let Some(rest) = spec.strip_prefix("redis+sentinel://") {
        let (nodes, master) = rest
            .split_once('/')
            .ok_or("use redis+sentinel://HOST:PORT[,HOST:PORT…]/MASTER_NAME")?;
        let nodes: Vec<String> = nodes.split(',').map(|n| format!("redis://{n}")).collect();
        Ok(BoxStore::new(replicated(
            RedisStore::connect_sentinel(nodes, master).await?,
        )))
    } else if let Some(nodes) = spec.strip_prefix("redis+cluster://") {
        let nodes: Vec<String> = nodes.split(',').map(|n| format!("redis://{n}")).collect();
        Ok(BoxStore::new(replicated(
            RedisStore::connect_cluster(nodes).await?,
        )))
    } else if spec.starts_with("redis://") || spec.starts_with("rediss://") {
        Ok(BoxStore::new(replicated(RedisStore::connect(spec).await?)))
    } else if spec.starts_with("postgres://") || spec.starts_with("postgresql://") {
        let store = PostgresStore::connect(spec).await?;
        store.migrate().await?;
        Ok(BoxStore::new(store))
    } else {
        Err(format!(
            "unsupported --store {spec:?}: use memory, sqlite://PATH, redis://…, redis+cluster://HOST:PORT[,…], redis+sentinel://HOST:PORT[,…]/MASTER or postgres://…"
        )
        .into())
    }
}

fn idempotency_layer(args: &Args, store: BoxStore) -> IdempotencyLayer<BoxStore> {
    let mut settings = Settings::new(store);
    if let Some(ttl) = args.ttl {
        settings = settings.ttl(Duration::from_secs(ttl));
    }
    if let Some(lease) = args.lease {
        settings = settings.lease(Duration::from_secs(lease));
    }
    match args.on_conflict {
        Conflict::Reject => {}
        Conflict::Wait => {
            settings = settings.on_conflict(OnConflict::Wait(Duration::from_secs(30)))
        }
        Conflict::Join => {
            settings = settings.on_conflict(OnConflict::Join(Duration::from_secs(30)))
        }
    }
    IdempotencyLayer::with_settings(settings)
        .scope(|parts| parts.extensions.get::<Tenant>().map(|t| t.0.clone()))
        .require_key(args.require_key)
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("demo_server: {}", sentence(&*error));
            std::process::ExitCode::FAILURE
        }
    }
}

/// An error and its causes, as one line: `what failed: why: why that`.
fn sentence(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // Some errors repeat their cause in their own message.
        if !out.contains(&cause_text) {
            out.push_str(": ");
            out.push_str(&cause_text);
        }
        source = cause.source();
    }
    out
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let store = open_store(&args)
        .await
        .map_err(|error| format!("cannot use --store {}: {}", args.store, sentence(&*error)))?;
    let state = AppState {
        executions: Arc::default(),
        completions: Arc::default(),
        completions_finished: Arc::default(),
        provider: Arc::new(Provider {
            charges: AtomicU64::new(0),
            ledger: match &args.provider_ledger {
                Some(path) => Some(Mutex::new(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(path)
                        .map_err(|error| {
                            format!("cannot open --provider-ledger {}: {error}", path.display())
                        })?,
                )),
                None => None,
            },
        }),
        recovery_points: !args.no_recovery_points,
        payments: Arc::new(Mutex::new(Payments {
            by_id: HashMap::new(),
            order: VecDeque::new(),
            max: args.max_payments.max(1),
        })),
        limit: match args.limit_routes {
            true => limit::Limit::open(&args.store)
                .await
                .map_err(|error| format!("cannot open the limit routes' connection: {error}"))?,
            false => None,
        },
    };
    let idempotency = idempotency_layer(&args, store);
    let drain = idempotency.settings().drain_handle();
    let guarded = ServiceBuilder::new()
        .layer(middleware::from_fn(authenticate))
        .layer(idempotency);
    let app = Router::new()
        .route("/payments", post(create_payment).layer(guarded.clone()))
        .route("/completions", post(create_completion).layer(guarded))
        .route(
            "/payments/{id}",
            get(get_payment).layer(middleware::from_fn(authenticate)),
        )
        .route(
            "/bare/payments",
            post(create_payment).layer(middleware::from_fn(authenticate)),
        )
        .route(
            "/limit/{path}/payments",
            post(limit_payment).layer(middleware::from_fn(authenticate)),
        )
        .route("/stats", get(stats))
        .layer(DefaultBodyLimit::max(16 * 1024 * 1024 + 64 * 1024))
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
                .layer(PropagateRequestIdLayer::x_request_id()),
        )
        .with_state(state);

    let listener = tokio::net::TcpListener::bind(args.addr).await?;
    let addr = listener.local_addr()?;
    println!("listening on http://{addr}");
    std::io::stdout().flush()?;
    // The shutdown sequence, with or without `--drop-responses`: on the signal, refuse new
    // keyed requests and stop accepting; let in-flight requests answer (bounded by the drain
    // timeout); then wait for detached work and release whatever claims are still held at the
    // deadline.
    let signalled = Arc::new(tokio::sync::Notify::new());
    let shutdown = {
        let (drain, signalled) = (drain.clone(), signalled.clone());
        async move {
            shutdown_signal().await;
            drain.start();
            signalled.notify_one();
        }
    };
    let mut server = if args.drop_responses > 0.0 {
        tokio::spawn(serve_dropping_responses(
            listener,
            app,
            args.drop_responses,
            shutdown,
        ))
    } else {
        tokio::spawn(
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .into_future(),
        )
    };
    tokio::select! {
        served = &mut server => return Ok(served??),
        () = signalled.notified() => {}
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.drain_timeout);
    eprintln!(
        "shutting down: draining for at most {} s",
        args.drain_timeout
    );
    if tokio::time::timeout_at(deadline, server).await.is_err() {
        eprintln!("connections still open at the drain deadline");
    }
    let report = drain
        .drain(deadline.saturating_duration_since(tokio::time::Instant::now()))
        .await;
    eprintln!(
        "drained in {:?}: {} claims released, {} could not be released",
        report.waited(),
        report.released().len(),
        report.not_released().len()
    );
    Ok(())
}

/// SIGTERM (orchestrators: Kubernetes, systemd, Docker) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// The answer that was lost on its way back.
#[derive(Debug)]
struct DroppedResponse;

impl std::fmt::Display for DroppedResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("response dropped on purpose (--drop-responses)")
    }
}

impl std::error::Error for DroppedResponse {}

/// Serves `app`, but closes the connection instead of answering a `POST /payments` with
/// probability `fraction`: hyper drops a connection whose service fails, so the client sees
/// the connection close with no response, after the handler ran and its outcome was stored.
/// When `shutdown` completes it stops accepting and waits for its connections to finish their
/// requests (as `axum::serve`'s graceful shutdown does).
async fn serve_dropping_responses(
    listener: tokio::net::TcpListener,
    app: Router,
    fraction: f64,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tower::ServiceExt;

    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => accepted?.0,
            () = &mut shutdown => break,
        };
        let app = app.clone();
        let service =
            hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                let app = app.clone();
                let droppable = request.method() == axum::http::Method::POST
                    && request.uri().path() == "/payments";
                async move {
                    let response = match app.oneshot(request.map(axum::body::Body::new)).await {
                        Ok(response) => response,
                        Err(never) => match never {},
                    };
                    if droppable && fastrand::f64() < fraction {
                        return Err(DroppedResponse);
                    }
                    Ok(response)
                }
            });
        let connection = graceful.watch(
            builder
                .serve_connection(TokioIo::new(stream), service)
                .into_owned(),
        );
        tokio::spawn(async move {
            let _ = connection.await;
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}
