//! A `redis-server` of the test's own on a free loopback port, never a
//! shared one; stopped when dropped.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader, Lines};

pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// A fresh server; `None` (the test skipped, with how to install one:
    /// [`super::skip`]) when there is no `redis-server`; under CI a missing
    /// one fails the test.
    pub fn start() -> Option<RedisServer> {
        if Command::new("redis-server").arg("--version").stdout(Stdio::null()).status().is_err() {
            let hint = "redis-server is not installed: `apt-get install redis-server` (Debian/Ubuntu) \
                        or `brew install redis`; .ci/run installs it";
            super::skip(hint);
            return None;
        }
        let port = free_port_outside_the_ephemeral_range();
        let mut server = RedisServer { child: None, port, dir: tempfile::tempdir().unwrap() };
        server.restart();
        Some(server)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// `MONITOR` on a connection of its own: every command the server runs
    /// from now on, one line each, `<time> [<db> <client address>] "<NAME>"
    /// "<argument>" …`.
    pub async fn monitor(&self) -> Lines<BufReader<tokio::net::TcpStream>> {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.expect("redis answers");
        stream.write_all(b"MONITOR\r\n").await.unwrap();
        let mut lines = BufReader::new(stream).lines();
        assert_eq!(lines.next_line().await.unwrap().as_deref(), Some("+OK"), "MONITOR is on");
        lines
    }

    /// Stops the server (as a crash would: its state is gone).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it (again) on the same port and waits until it answers.
    pub fn restart(&mut self) {
        self.stop();
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.dir.path().join("redis.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.answers() {
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not answer within 10s: {}",
                self.port,
                std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn answers(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        let mut answer = [0u8; 7];
        stream.write_all(b"PING\r\n").is_ok() && stream.read_exact(&mut answer).is_ok() && &answer == b"+PONG\r\n"
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A free loopback port below the range the kernel picks clients' ports
/// from: while a test has its server stopped, a client reconnecting to it
/// could otherwise be given that very port as its own (a TCP connection to
/// itself), and the server could not start again.
fn free_port_outside_the_ephemeral_range() -> u16 {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let low: u16 = range.split_whitespace().next().and_then(|p| p.parse().ok()).unwrap_or(32768);
    let (first, span) = (low.saturating_sub(12_000).max(1024), 10_000.min(low.saturating_sub(1024)).max(1));
    // Spread over the span by process and time, so tests running at once
    // rarely try the same ports.
    let seed = std::process::id() as u64
        ^ std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    for i in 0..u64::from(span) {
        let port = first + ((seed.wrapping_mul(2_654_435_761).wrapping_add(i * 7919)) % u64::from(span)) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
