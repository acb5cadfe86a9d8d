//! Throwaway Redis and PostgreSQL servers for the store tests, on free loopback ports.
//!
//! `REDIS_URL` / `DATABASE_URL` are used when set. Otherwise a server is started from the
//! `redis-server` / `initdb` + `pg_ctl` binaries into a temporary directory (as the `postgres`
//! user when running as root). Without either, tests print why on stderr and skip; when `CI`
//! is set a missing server fails the test instead.
//!
//! Each server is watched by a small shell loop that stops it and deletes its temporary
//! directory once the test process is gone, so no server (and no directory) outlives its test
//! binary, even when a test fails or the binary is killed; a server dropped earlier does the
//! same at once.
#![allow(dead_code, unreachable_pub)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Skips (or, under CI, fails) for want of a server.
///
/// The notice is written to the process's standard error directly, not through `eprintln!`,
/// which the test harness captures: a skipped store test shows in `cargo test`'s output.
pub fn unavailable(what: &str) -> Option<String> {
    if std::env::var_os("CI").is_some() {
        panic!("{what} is not available and CI is set: install it (see .ci/run) or set its URL");
    }
    skip(&format!(
        "{what} is not available (install it or set its URL variable); the tests that need it pass without running"
    ));
    None
}

/// Says that a test skips, on the process's standard error directly (the harness captures
/// `eprintln!`), so that `cargo test` shows it.
pub fn skip(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED: {why}");
}

/// A Redis server this test owns (to stop, pause or reconfigure it), or `None` after saying
/// why: `REDIS_URL` names an external server, or `redis-server` is missing.
pub fn own_redis(to: &str) -> Option<RedisServer> {
    if std::env::var_os("REDIS_URL").is_some() {
        skip(&format!(
            "REDIS_URL is an external server this test cannot {to}"
        ));
        return None;
    }
    RedisServer::start().or_else(|| unavailable("redis-server").and(None))
}

/// A Valkey server this test owns (see [`RedisServer::start_valkey`]), or `None` after saying
/// why (see [`unavailable`]).
pub fn own_valkey() -> Option<RedisServer> {
    RedisServer::start_valkey().or_else(|| unavailable("valkey-server (8.1 or later)").and(None))
}

/// The URL of a Valkey server the tests of this process share, started once (see [`own_valkey`]).
pub fn valkey_url() -> Option<String> {
    static SERVER: OnceLock<Option<RedisServer>> = OnceLock::new();
    match SERVER.get_or_init(RedisServer::start_valkey) {
        Some(server) => Some(server.url()),
        None => unavailable("valkey-server (8.1 or later)"),
    }
}

/// A PostgreSQL server this test owns, or `None` after saying why (see [`own_redis`]).
pub fn own_postgres(to: &str) -> Option<PostgresServer> {
    if std::env::var_os("DATABASE_URL").is_some() {
        skip(&format!(
            "DATABASE_URL is an external server this test cannot {to}"
        ));
        return None;
    }
    PostgresServer::start().or_else(|| unavailable("PostgreSQL").and(None))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn find_binary(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<PathBuf> = entries.flatten().map(|e| e.path().join("bin")).collect();
        versions.sort();
        dirs.extend(versions.into_iter().rev());
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

fn wait_for_port(port: u16, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    false
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false)
}

/// Runs `script` under `sh`, as the `postgres` user when we are root.
fn sh(script: &str, as_postgres: bool) -> std::process::Child {
    let mut command = if as_postgres {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", "sh", "-c", script]);
        c
    } else {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    };
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Runs `stop`, then deletes `dir`, once this process is gone. The loop runs as this user
/// (only it may signal this process, and delete what it created); `stop` as the server's user.
fn watchdog(stop: &str, as_postgres: bool, dir: &Path) {
    let pid = std::process::id();
    let stop = if as_postgres {
        format!("runuser -u postgres -- sh -c '{stop}'")
    } else {
        stop.to_owned()
    };
    // Deliberately not waited for: it outlives this process to stop the server after it.
    #[allow(clippy::zombie_processes)]
    let _watchdog = sh(
        &format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {stop}; rm -rf '{}'",
            dir.display()
        ),
        false,
    );
}

/// A Redis server this test process controls.
pub struct RedisServer {
    pub port: u16,
    binary: PathBuf,
    dir: PathBuf,
    /// Whether it keeps an append-only file (so a restart keeps its keys).
    persistent: bool,
    /// Whether it runs as a cluster node.
    cluster: bool,
}

impl RedisServer {
    pub fn start() -> Option<Self> {
        Self::start_with(false)
    }

    /// A server with an append-only file fsynced on every write: a restart keeps every claim
    /// and record, as a production Redis with persistence does.
    pub fn start_persistent() -> Option<Self> {
        Self::start_with(true)
    }

    /// A Valkey server (`valkey-server`, 8.1 or later: its `SET` takes `IFEQ`, which the
    /// Redis store's completion uses when the server has it; `.ci/run` builds one).
    pub fn start_valkey() -> Option<Self> {
        Self::start_from("valkey-server", false)
    }

    fn start_with(persistent: bool) -> Option<Self> {
        Self::start_from("redis-server", persistent)
    }

    fn start_from(server: &str, persistent: bool) -> Option<Self> {
        let binary = find_binary(server)?;
        let port = free_port();
        let dir = std::env::temp_dir().join(format!(
            "tower-idempotency-redis-{port}-{}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let server = Self {
            port,
            binary,
            dir,
            persistent,
            cluster: false,
        };
        server.run();
        watchdog(
            &format!(
                "pid=$(cat {} 2>/dev/null) && kill $pid 2>/dev/null; \
                 while kill -0 $pid 2>/dev/null; do sleep 0.1; done",
                server.pidfile().display()
            ),
            false,
            &server.dir,
        );
        Some(server)
    }

    fn pidfile(&self) -> PathBuf {
        self.dir.join("redis.pid")
    }

    fn run(&self) {
        let status = Command::new(&self.binary)
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                if self.persistent { "yes" } else { "no" },
                "--appendfsync",
                "always",
            ])
            .args(if self.cluster {
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                ][..]
            } else {
                &[][..]
            })
            .args(["--daemonize", "yes", "--pidfile"])
            .arg(self.pidfile())
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "redis-server failed to start");
        assert!(
            wait_for_port(self.port, Duration::from_secs(10)),
            "redis-server did not listen"
        );
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Stops the server (its data is gone unless it is persistent).
    pub fn stop(&self) {
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "pid=$(cat {0} 2>/dev/null) || exit 0; kill $pid 2>/dev/null; \
                 while kill -0 $pid 2>/dev/null; do sleep 0.05; done",
                self.pidfile().display()
            ))
            .status();
    }

    pub fn restart(&self) {
        self.run();
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        std::fs::read_to_string(self.pidfile())
            .expect("pid file")
            .trim()
            .parse()
            .expect("a pid")
    }

    /// Freezes the server (`SIGSTOP`): connections stay open, nothing is answered until
    /// `signal(pid, "CONT")`.
    pub fn pause(&self) {
        signal(self.pid(), "STOP");
    }
}

/// Sends a signal with `kill(1)`.
pub fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name} {pid} failed");
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A port `p` such that `p` and its cluster bus port `p + 10000` are both free.
fn free_cluster_port() -> u16 {
    loop {
        let port = 20000 + (std::process::id() as u16 % 100) * 100 + fastrand_port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok()
            && TcpListener::bind(("127.0.0.1", port + 10000)).is_ok()
        {
            return port;
        }
    }
}

fn fastrand_port() -> u16 {
    use std::hash::{BuildHasher, RandomState};
    (RandomState::new().hash_one(Instant::now()) % 25000) as u16
}

/// A Redis Cluster of three masters (no replicas) on loopback, started for a test; stopped,
/// and its directories deleted, on drop (and by watchdogs should the test binary die).
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> Option<Self> {
        let binary = find_binary("redis-server")?;
        let cli = find_binary("redis-cli")?;
        let mut nodes = Vec::new();
        for _ in 0..3 {
            let port = free_cluster_port();
            let dir = std::env::temp_dir().join(format!(
                "tower-idempotency-redis-cluster-{port}-{}",
                std::process::id()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let node = RedisServer {
                port,
                binary: binary.clone(),
                dir,
                persistent: false,
                cluster: true,
            };
            node.run();
            watchdog(
                &format!(
                    "pid=$(cat {} 2>/dev/null) && kill $pid 2>/dev/null; \
                     while kill -0 $pid 2>/dev/null; do sleep 0.1; done",
                    node.pidfile().display()
                ),
                false,
                &node.dir,
            );
            nodes.push(node);
        }
        let status = Command::new(cli)
            .arg("--cluster")
            .arg("create")
            .args(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "redis-cli --cluster create failed");
        let cluster = Self { nodes };
        cluster.wait_until_ok();
        Some(cluster)
    }

    /// `redis://127.0.0.1:PORT` of every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// Waits until every node reports `cluster_state:ok`.
    pub fn wait_until_ok(&self) {
        let cli = find_binary("redis-cli").unwrap();
        // Generous: a node restarted on a loaded machine takes a while to rejoin.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ok = self.nodes.iter().all(|node| {
                Command::new(&cli)
                    .args(["-p", &node.port.to_string(), "cluster", "info"])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).contains("cluster_state:ok"))
                    .unwrap_or(false)
            });
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster never reached state ok"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// How often a Redis server ran `command` (lower case, as `INFO commandstats` names it), and
/// how often that failed (a refused form of the command among them).
pub async fn command_calls(url: &str, command: &str) -> (u64, u64) {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut raw_redis(url).await)
        .await
        .unwrap();
    let prefix = format!("cmdstat_{command}:");
    let Some(line) = info.lines().find_map(|line| line.strip_prefix(&prefix)) else {
        return (0, 0);
    };
    let field = |name: &str| {
        line.split(',')
            .find_map(|part| part.strip_prefix(name))
            .map_or(0, |n| n.parse().unwrap())
    };
    (field("calls="), field("failed_calls="))
}

/// A plain connection to the Redis at `url`, to look at or change what the store sees.
pub async fn raw_redis(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// The Redis URL the tests of this process share: `REDIS_URL`, or a server started once.
pub fn redis_url() -> Option<String> {
    if let Ok(url) = std::env::var("REDIS_URL") {
        return Some(url);
    }
    static SERVER: OnceLock<Option<RedisServer>> = OnceLock::new();
    match SERVER.get_or_init(RedisServer::start) {
        Some(server) => Some(server.url()),
        None => unavailable("redis-server (or REDIS_URL)"),
    }
}

/// A PostgreSQL cluster this test process controls.
pub struct PostgresServer {
    pub port: u16,
    pg_ctl: PathBuf,
    dir: PathBuf,
    as_postgres: bool,
}

impl PostgresServer {
    pub fn start() -> Option<Self> {
        let initdb = find_binary("initdb")?;
        let pg_ctl = find_binary("pg_ctl")?;
        let port = free_port();
        let as_postgres = is_root();
        let dir = std::env::temp_dir().join(format!(
            "tower-idempotency-pg-{port}-{}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        if as_postgres {
            let status = Command::new("chown")
                .arg("postgres")
                .arg(&dir)
                .status()
                .unwrap();
            assert!(status.success());
        }
        let data = dir.join("data");
        let init = format!(
            "{} -D {} -A trust -U postgres --no-sync >{}/initdb.log 2>&1",
            initdb.display(),
            data.display(),
            dir.display()
        );
        let status = sh(&init, as_postgres).wait().unwrap();
        assert!(
            status.success(),
            "initdb failed: see {}/initdb.log",
            dir.display()
        );
        let server = Self {
            port,
            pg_ctl,
            dir,
            as_postgres,
        };
        server.run();
        watchdog(&server.stop_command(), as_postgres, &server.dir);
        Some(server)
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn stop_command(&self) -> String {
        format!(
            "{} -D {} -m immediate stop >/dev/null 2>&1",
            self.pg_ctl.display(),
            self.data().display()
        )
    }

    fn run(&self) {
        let start = format!(
            "{} -D {} -l {}/server.log -w -o \"-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200\" start",
            self.pg_ctl.display(),
            self.data().display(),
            self.dir.display(),
            self.port,
            self.dir.display()
        );
        let status = sh(&start, self.as_postgres).wait().unwrap();
        assert!(
            status.success(),
            "pg_ctl start failed: see {}/server.log",
            self.dir.display()
        );
        assert!(wait_for_port(self.port, Duration::from_secs(20)));
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn stop(&self) {
        let _ = sh(&self.stop_command(), self.as_postgres).wait();
    }

    pub fn restart(&self) {
        self.run();
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The PostgreSQL URL the tests of this process share: `DATABASE_URL`, or a cluster started once.
pub fn postgres_url() -> Option<String> {
    if let Ok(url) = std::env::var("DATABASE_URL") {
        return Some(url);
    }
    static SERVER: OnceLock<Option<PostgresServer>> = OnceLock::new();
    match SERVER.get_or_init(PostgresServer::start) {
        Some(server) => Some(server.url()),
        None => unavailable("PostgreSQL (initdb and pg_ctl, or DATABASE_URL)"),
    }
}

/// The Redis Cluster the tests of this process share (three masters), started once; `None`
/// (after saying why) without `redis-server` and `redis-cli`.
pub fn redis_cluster_urls() -> Option<Vec<String>> {
    static CLUSTER: OnceLock<Option<RedisCluster>> = OnceLock::new();
    match CLUSTER.get_or_init(RedisCluster::start) {
        Some(cluster) => Some(cluster.urls()),
        None => {
            unavailable("redis-server and redis-cli (for a Redis Cluster)").map(|url| vec![url])
        }
    }
}

/// A temporary directory, deleted when dropped (and, should the test process die first, by a
/// watchdog once it is gone).
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(what: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!(
            "tower-idempotency-{what}-{}-{n}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        watchdog("true", false, &dir);
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A directory the tests of this process share, deleted once the process is gone.
pub fn shared_temp_dir() -> &'static Path {
    static DIR: OnceLock<TempDir> = OnceLock::new();
    DIR.get_or_init(|| TempDir::new("shared")).path()
}

/// A Redis Sentinel (`redis-server --sentinel`) watching the master `name` at `master_port`,
/// deciding with a quorum of `quorum`; stopped, and its directory deleted, on drop.
pub struct SentinelServer {
    pub port: u16,
    dir: PathBuf,
}

impl SentinelServer {
    pub fn start(name: &str, master_port: u16, quorum: u32) -> Option<Self> {
        let binary = find_binary("redis-server")?;
        let port = free_port();
        let dir = std::env::temp_dir().join(format!(
            "tower-idempotency-sentinel-{port}-{}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let pidfile = dir.join("sentinel.pid");
        let config = dir.join("sentinel.conf");
        std::fs::write(
            &config,
            format!(
                "port {port}\nbind 127.0.0.1\ndaemonize yes\npidfile {}\ndir {}\n\
                 sentinel monitor {name} 127.0.0.1 {master_port} {quorum}\n\
                 sentinel down-after-milliseconds {name} 1000\n\
                 sentinel failover-timeout {name} 10000\n",
                pidfile.display(),
                dir.display()
            ),
        )
        .unwrap();
        let server = Self { port, dir };
        watchdog(
            &format!(
                "pid=$(cat {} 2>/dev/null) && kill $pid 2>/dev/null; \
                 while kill -0 $pid 2>/dev/null; do sleep 0.1; done",
                pidfile.display()
            ),
            false,
            &server.dir,
        );
        let status = Command::new(binary)
            .arg(&config)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "redis-server --sentinel failed to start");
        assert!(
            wait_for_port(port, Duration::from_secs(10)),
            "the sentinel did not listen"
        );
        Some(server)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for SentinelServer {
    fn drop(&mut self) {
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "pid=$(cat {0} 2>/dev/null) || exit 0; kill $pid 2>/dev/null; \
                 while kill -0 $pid 2>/dev/null; do sleep 0.05; done",
                self.dir.join("sentinel.pid").display()
            ))
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A small tmpfs mounted on a fresh directory, for tests that fill a disk: unmounted and
/// deleted when dropped (a test that fails included), and by a watchdog should the test
/// process die first.
pub struct SmallDisk(PathBuf);

impl SmallDisk {
    /// Mounts a tmpfs of `size` (`mount`'s syntax: `2m`); `None`, after a `SKIPPED:` line,
    /// where mounting is not permitted (not root, a container without the capability).
    pub fn mount(size: &str) -> Option<Self> {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!(
            "tower-idempotency-small-disk-{}-{n}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output();
        match mounted {
            Ok(output) if output.status.success() => {}
            other => {
                let _ = std::fs::remove_dir(&dir);
                let why = match other {
                    Ok(output) => String::from_utf8_lossy(&output.stderr).trim().to_owned(),
                    Err(error) => error.to_string(),
                };
                skip(&format!(
                    "cannot mount a tmpfs ({why}); the full-disk test passes without running"
                ));
                return None;
            }
        }
        watchdog(&format!("umount -l '{}'", dir.display()), false, &dir);
        Some(Self(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Fills what is left of the disk with one file; returns its path (delete it to free the
    /// space).
    pub fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.0.join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        let block = vec![0x5a; 4096];
        // Whole pages, then single bytes: the disk is full to the last byte.
        while file.write_all(&block).is_ok() {}
        while file.write_all(&block[..1]).is_ok() {}
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
