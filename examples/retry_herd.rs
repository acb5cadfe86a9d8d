//! The thundering-herd experiment behind `BENCHMARKS.md` ("Client retries: the herd"):
//! a server that is down for a while, then up, and many requests in flight through **one**
//! retrying client. It measures, in one run:
//!
//! * the arrival rate at the server per 50 ms after it recovers, with full jitter and without
//!   jitter (the budget off in both, so only the jitter differs);
//! * the attempts in all, with and without the retry budget (full jitter in both).
//!
//! ```text
//! cargo run --release --example retry_herd -- --requests 1000 --down-ms 2000
//! ```
//!
//! The plot goes to `target/retry_herd.svg` (under `CARGO_TARGET_DIR` when that is set);
//! `--svg PATH` writes it elsewhere: `--svg docs/retry_herd.svg` replaces the plot the
//! repository keeps, on purpose only.
//!
//! The server is an in-process tower service (no sockets), so what is measured is the client's
//! schedule alone: when each attempt reaches the server. It answers 503 while down and 201
//! after. The client retries up to `--attempts` times with the default backoff (100 ms base,
//! doubled per retry, 10 s cap).

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tower::{service_fn, ServiceBuilder, ServiceExt};
use tower_idempotency::client::IdempotentRetryLayer;

#[derive(Parser, Debug)]
struct Args {
    /// Requests in flight at once, all sent at the start.
    #[arg(long, default_value_t = 1000)]
    requests: usize,
    /// How long the server is down (answers 503) from the start.
    #[arg(long, default_value_t = 2000)]
    down_ms: u64,
    /// Attempts per request, the first included.
    #[arg(long, default_value_t = 10)]
    attempts: u32,
    /// Where to write the plot of arrivals per 50 ms (SVG) [`target/retry_herd.svg`, under
    /// `CARGO_TARGET_DIR` when set].
    #[arg(long)]
    svg: Option<std::path::PathBuf>,
}

const BUCKET: Duration = Duration::from_millis(50);

/// One run: when each attempt arrived (since the start), and how many requests got a 201.
struct Run {
    arrivals: Vec<Duration>,
    succeeded: usize,
}

impl Run {
    /// Attempts per 50 ms bucket, from the start.
    fn histogram(&self) -> Vec<usize> {
        let last = self.arrivals.iter().max().copied().unwrap_or_default();
        let mut buckets = vec![0; (last.as_nanos() / BUCKET.as_nanos()) as usize + 1];
        for arrival in &self.arrivals {
            buckets[(arrival.as_nanos() / BUCKET.as_nanos()) as usize] += 1;
        }
        buckets
    }

    /// The busiest 50 ms once the server is up, and when it began.
    fn peak_after(&self, up: Duration) -> (usize, Duration) {
        let first = (up.as_nanos() / BUCKET.as_nanos()) as usize;
        self.histogram()
            .iter()
            .enumerate()
            .skip(first)
            .map(|(i, n)| (*n, BUCKET * i as u32))
            .max_by_key(|(n, _)| *n)
            .unwrap_or_default()
    }
}

async fn run(layer: IdempotentRetryLayer, args: &Args) -> Run {
    let start = Instant::now();
    let down = Duration::from_millis(args.down_ms);
    let arrivals = Arc::new(Mutex::new(Vec::with_capacity(args.requests * 4)));
    let server = {
        let arrivals = arrivals.clone();
        service_fn(move |_request: Request<Full<Bytes>>| {
            let now = start.elapsed();
            arrivals.lock().unwrap().push(now);
            let status = if now < down {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::CREATED
            };
            async move {
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(status)
                        .body(Full::<Bytes>::default())
                        .unwrap(),
                )
            }
        })
    };
    let client = ServiceBuilder::new()
        .layer(layer.max_attempts(args.attempts))
        .service(server);
    let tasks: Vec<_> = (0..args.requests)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                let request = Request::post("/payments")
                    .body(Full::new(Bytes::from_static(b"{}")))
                    .unwrap();
                client.oneshot(request).await.unwrap().status()
            })
        })
        .collect();
    let mut succeeded = 0;
    for task in tasks {
        succeeded += usize::from(task.await.unwrap() == StatusCode::CREATED);
    }
    let arrivals = std::mem::take(&mut *arrivals.lock().unwrap());
    Run {
        arrivals,
        succeeded,
    }
}

/// A line chart of arrivals per 50 ms, one polyline per run.
fn svg(runs: &[(&str, &str, &Run)], down: Duration) -> String {
    let histograms: Vec<Vec<usize>> = runs.iter().map(|(_, _, run)| run.histogram()).collect();
    let buckets = histograms.iter().map(Vec::len).max().unwrap_or(1).max(1);
    let peak = histograms
        .iter()
        .flatten()
        .copied()
        .max()
        .unwrap_or(1)
        .max(1);
    let (width, height, margin) = (900.0, 360.0, 50.0);
    let x = |i: usize| margin + (width - 2.0 * margin) * i as f64 / buckets as f64;
    let y = |n: usize| height - margin - (height - 2.0 * margin) * n as f64 / peak as f64;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{margin}\" y=\"20\">attempts reaching the server per 50 ms (server down until {:.1} s)</text>\n",
        down.as_secs_f64()
    );
    let up_x = x((down.as_nanos() / BUCKET.as_nanos()) as usize);
    out += &format!(
        "<line x1=\"{up_x}\" y1=\"{margin}\" x2=\"{up_x}\" y2=\"{}\" stroke=\"gray\" stroke-dasharray=\"4\"/>\n",
        height - margin
    );
    out += &format!(
        "<line x1=\"{margin}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"black\"/>\n\
         <line x1=\"{margin}\" y1=\"{margin}\" x2=\"{margin}\" y2=\"{0}\" stroke=\"black\"/>\n\
         <text x=\"5\" y=\"{2}\">{peak}</text><text x=\"5\" y=\"{0}\">0</text>\n",
        height - margin,
        width - margin,
        margin + 4.0
    );
    let seconds = (buckets as f64 * BUCKET.as_secs_f64()).ceil() as usize;
    for s in 0..=seconds {
        let at = x(s * 20);
        if at <= width - margin {
            out += &format!(
                "<text x=\"{at}\" y=\"{}\" text-anchor=\"middle\">{s} s</text>\n",
                height - margin + 18.0
            );
        }
    }
    for (row, ((label, colour, _), histogram)) in runs.iter().zip(&histograms).enumerate() {
        let points: Vec<String> = histogram
            .iter()
            .enumerate()
            .map(|(i, n)| format!("{:.1},{:.1}", x(i), y(*n)))
            .collect();
        out += &format!(
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.5\" points=\"{}\"/>\n\
             <text x=\"{}\" y=\"{}\" fill=\"{colour}\">{label}</text>\n",
            points.join(" "),
            width - margin - 260.0,
            margin + 16.0 * row as f64
        );
    }
    out + "</svg>\n"
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let down = Duration::from_millis(args.down_ms);
    let base = || IdempotentRetryLayer::new().deadline(Duration::from_secs(60));

    let jitter = run(base().without_retry_budget(), &args).await;
    let lockstep = run(base().without_retry_budget().without_jitter(), &args).await;
    let budgeted = run(base(), &args).await;

    println!(
        "{} requests through one client, server down for {} ms, at most {} attempts each",
        args.requests, args.down_ms, args.attempts
    );
    println!();
    println!(
        "| run | attempts in all | per request | succeeded | peak per 50 ms after recovery | at |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for (name, run) in [
        ("full jitter, no budget", &jitter),
        ("no jitter, no budget", &lockstep),
        ("full jitter, budget (20 % + 10/s)", &budgeted),
    ] {
        let (peak, at) = run.peak_after(down);
        println!(
            "| {name} | {} | {:.2} | {} | {peak} | {:.2} s |",
            run.arrivals.len(),
            run.arrivals.len() as f64 / args.requests as f64,
            run.succeeded,
            at.as_secs_f64()
        );
    }
    let path = args.svg.clone().unwrap_or_else(|| {
        let target = std::env::var_os("CARGO_TARGET_DIR").unwrap_or_else(|| "target".into());
        std::path::PathBuf::from(target).join("retry_herd.svg")
    });
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).expect("create the SVG's directory");
    }
    let plot = svg(
        &[
            ("no jitter (lockstep)", "crimson", &lockstep),
            ("full jitter", "steelblue", &jitter),
            ("full jitter + budget", "seagreen", &budgeted),
        ],
        down,
    );
    std::fs::write(&path, plot).expect("write the SVG");
    println!();
    println!("plot written to {}", path.display());
}
