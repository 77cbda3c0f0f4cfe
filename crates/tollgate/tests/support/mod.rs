//! Test support: a private `redis-server` per test, on a free port.
//!
//! Tests that need Redis start their own server and fail loudly when they cannot: they
//! never skip. `./scripts/test.sh` installs `redis-server` when it is missing.
#![allow(dead_code, unreachable_pub)]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `redis-server` child process, killed when dropped.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: std::path::PathBuf,
}

/// The lowest port handed out; a cluster node also listens on its port + 10,000 (the
/// cluster bus), and Redis refuses ports above 55,535 in cluster mode.
const FIRST_PORT: u32 = 10_000;
/// Ports handed out lie in `FIRST_PORT .. FIRST_PORT + SPAN`, so a node's bus port stays
/// below 32,768, where Linux starts the ephemeral ports it gives outgoing connections
/// (a bus port taken by some client's socket made a node exit at start).
const SPAN: u32 = 12_768;

/// A port on 127.0.0.1 that is free now, with its cluster bus port (+10,000) free too.
///
/// Ports are handed out in turn from a per-process starting point, so tests running in
/// parallel in one process never get the same port, and test processes started one after
/// another rarely meet.
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let start = std::process::id().wrapping_mul(2_654_435_761) % SPAN;
    let _ = NEXT.compare_exchange(u32::MAX, start, Ordering::Relaxed, Ordering::Relaxed);
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed) % SPAN;
        let port = u16::try_from(FIRST_PORT + n).expect("ports fit in u16");
        let bus = port + 10_000;
        let both_free = TcpListener::bind(("127.0.0.1", port)).is_ok()
            && TcpListener::bind(("127.0.0.1", bus)).is_ok();
        if both_free {
            return port;
        }
    }
    panic!(
        "no free port pair (p, p + 10000) for p in {FIRST_PORT}..{}",
        FIRST_PORT + SPAN
    );
}

/// Whether a Redis server on `port` answers PING (a bare TCP connect could reach a
/// server that is about to exit).
fn answers_ping(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = c.set_read_timeout(Some(Duration::from_secs(1)));
    let mut buf = [0u8; 7];
    c.write_all(b"PING\r\n").is_ok() && c.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

impl RedisServer {
    /// A server not yet started: a free port and an empty directory of its own, named
    /// `tollgate-{kind}-{port}-{pid}`.
    fn unstarted(kind: &str) -> RedisServer {
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("tollgate-{kind}-{port}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create a directory for redis-server");
        RedisServer {
            child: None,
            port,
            dir,
        }
    }

    /// Start a server on a free port and wait until it answers.
    pub fn start() -> RedisServer {
        let mut s = RedisServer::unstarted("redis");
        s.restart();
        s
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Start (again) on the same port.
    pub fn restart(&mut self) {
        self.start_with(&[]);
    }

    /// A server listening for TLS only (a self-signed certificate made with `openssl`),
    /// and on a unix socket; `url()` is then its `rediss://` URL.
    pub fn start_tls_and_unix() -> (RedisServer, String, String) {
        let mut s = RedisServer::unstarted("tls");
        let port = s.port;
        let cert = s.dir.join("cert.pem");
        let key = s.dir.join("key.pem");
        let ok = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=localhost",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("openssl makes a test certificate");
        assert!(ok.success(), "openssl failed");
        let socket = s.dir.join("redis.sock");
        let (cert, key, sock) = (
            cert.to_string_lossy().into_owned(),
            key.to_string_lossy().into_owned(),
            socket.to_string_lossy().into_owned(),
        );
        s.start_with(&[
            "--tls-port",
            &port.to_string(),
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &cert,
            "--tls-auth-clients",
            "no",
            "--unixsocket",
            &sock,
            "--port",
            "0",
        ]);
        let tls = format!("rediss://127.0.0.1:{port}/#insecure");
        let unix = format!("unix://{sock}");
        (s, tls, unix)
    }

    fn start_with(&mut self, extra: &[&str]) {
        if let Err(e) = self.try_start_with(extra) {
            panic!("{e}");
        }
    }

    /// Start `redis-server` and wait until it answers PING; on failure, say why, with the
    /// end of its log.
    fn try_start_with(&mut self, extra: &[&str]) -> Result<(), String> {
        let log = self.dir.join("redis.log");
        // A TLS-only server does not speak plain RESP: a TCP connect is the check there.
        let tls = extra.contains(&"--tls-port");
        // Options given twice: the later wins, so `extra` may override the port.
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir.to_str().expect("utf-8 temp dir"),
                "--logfile",
                log.to_str().expect("utf-8 temp dir"),
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start redis-server ({e}): install it (apt-get install -y redis-server) \
                     or run ./scripts/test.sh, which does"
                )
            });
        self.child = Some(child);
        let tail = || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(5)..].join("\n")
        };
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return Err(format!(
                    "redis-server on port {} exited ({status}) at start:\n{}",
                    self.port,
                    tail()
                ));
            }
            let up = if tls {
                std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            } else {
                answers_ping(self.port)
            };
            if up {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Err(format!(
            "redis-server did not answer on port {} within 10 s:\n{}",
            self.port,
            tail()
        ))
    }

    /// Kill the server (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A three-node Redis Cluster (masters only), each node a child process.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Start three nodes in cluster mode, join them, and wait until every slot is served.
    ///
    /// A node or the join can fail for reasons outside the test (a port taken between
    /// choosing and binding it); the whole cluster is then started again on new ports,
    /// up to three times, and the last failure is reported in full.
    pub fn start() -> RedisCluster {
        let mut last = String::new();
        for attempt in 1..=3 {
            match Self::try_start() {
                Ok(c) => return c,
                Err(e) => {
                    eprintln!("Redis Cluster start, attempt {attempt} of 3, failed: {e}");
                    last = e;
                }
            }
        }
        panic!("the Redis Cluster did not start in 3 attempts; the last failure: {last}");
    }

    fn try_start() -> Result<RedisCluster, String> {
        let mut nodes = Vec::new();
        for _ in 0..3 {
            let mut s = RedisServer::unstarted("cluster");
            s.try_start_with(&[
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ])?;
            nodes.push(s);
        }
        let mut args: Vec<String> = vec!["--cluster".into(), "create".into()];
        args.extend(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)));
        args.extend([
            "--cluster-replicas".into(),
            "0".into(),
            "--cluster-yes".into(),
        ]);
        // redis-cli waits for the nodes to join without ever giving up: bounded here.
        let out = output_within(
            Command::new("redis-cli").args(&args),
            Duration::from_secs(30),
        )?;
        if !out.status.success() {
            return Err(format!(
                "redis-cli --cluster create failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let t = Instant::now();
        'wait: while t.elapsed() < Duration::from_secs(20) {
            for n in &nodes {
                let info = output_within(
                    Command::new("redis-cli").args(["-p", &n.port.to_string(), "cluster", "info"]),
                    Duration::from_secs(5),
                )?;
                if !String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                    std::thread::sleep(Duration::from_millis(50));
                    continue 'wait;
                }
            }
            return Ok(RedisCluster { nodes });
        }
        Err("the Redis Cluster did not reach cluster_state:ok within 20 s".into())
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }
}

/// Run a command to its end, killing it if it takes longer than `limit`; its output is
/// small (pipes are read once it has exited).
fn output_within(cmd: &mut Command, limit: Duration) -> Result<std::process::Output, String> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?} ({e}); install redis-tools"));
    let t = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if t.elapsed() < limit => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let out = child.wait_with_output().map_err(|e| e.to_string())?;
                return Err(format!(
                    "{cmd:?} did not finish within {limit:?}: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
        }
    }
    child.wait_with_output().map_err(|e| e.to_string())
}
