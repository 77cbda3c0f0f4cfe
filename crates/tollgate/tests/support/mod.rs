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

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

impl RedisServer {
    /// Start a server on a free port and wait until it answers.
    pub fn start() -> RedisServer {
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("tollgate-redis-{port}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create a directory for redis-server");
        let mut s = RedisServer {
            child: None,
            port,
            dir,
        };
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
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("tollgate-tls-{port}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create a directory for redis-server");
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
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
        let socket = dir.join("redis.sock");
        let mut s = RedisServer {
            child: None,
            port,
            dir,
        };
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
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!(
            "redis-server did not listen on port {} within 10 s",
            self.port
        );
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
    pub fn start() -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                let port = free_port();
                let dir = std::env::temp_dir()
                    .join(format!("tollgate-cluster-{port}-{}", std::process::id()));
                let _ = std::fs::remove_dir_all(&dir);
                std::fs::create_dir_all(&dir).expect("create a directory for redis-server");
                let mut s = RedisServer {
                    child: None,
                    port,
                    dir,
                };
                s.start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                ]);
                s
            })
            .collect();
        let mut args: Vec<String> = vec!["--cluster".into(), "create".into()];
        args.extend(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)));
        args.extend([
            "--cluster-replicas".into(),
            "0".into(),
            "--cluster-yes".into(),
        ]);
        let out = Command::new("redis-cli")
            .args(&args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run redis-cli ({e}); install redis-tools"));
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let t = Instant::now();
        'wait: while t.elapsed() < Duration::from_secs(20) {
            for n in &nodes {
                let info = Command::new("redis-cli")
                    .args(["-p", &n.port.to_string(), "cluster", "info"])
                    .output()
                    .expect("redis-cli cluster info");
                if !String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                    std::thread::sleep(Duration::from_millis(50));
                    continue 'wait;
                }
            }
            return RedisCluster { nodes };
        }
        panic!("the Redis Cluster did not reach cluster_state:ok within 20 s");
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }
}
