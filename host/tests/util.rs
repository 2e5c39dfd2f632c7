//! The harness: start execd on a config text, talk HTTP to it over a real
//! socket.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn fixture(name: &str) -> String {
    repo()
        .join("host/tests/fixtures")
        .join(name)
        .display()
        .to_string()
}

/// A daemon serving one config, in this process.
pub struct Server {
    pub addr: String,
    /// The admin listener (`/metrics`, `/healthz`, `/readyz`).
    pub admin: Option<String>,
    pub dir: tempfile::TempDir,
    running: Option<execd::daemon::Running>,
}

/// Writes `yaml` (with `{repo}` and `{fixtures}` replaced) to a fresh
/// directory and loads it as a config file.
pub fn write_config(yaml: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("execd.yaml");
    std::fs::write(&path, fill_placeholders(yaml, dir.path())).unwrap();
    (dir, path)
}

/// `{repo}`, `{fixtures}` and `{dir}` in a test config, filled in.
pub fn fill_placeholders(yaml: &str, dir: &std::path::Path) -> String {
    yaml.replace("{repo}", &repo().display().to_string())
        .replace(
            "{fixtures}",
            &repo().join("host/tests/fixtures").display().to_string(),
        )
        .replace("{dir}", &dir.display().to_string())
}

/// A TCP port nobody listens on now, for a config the binary will bind.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts a server; `routes` is the YAML of the `routes:` list (indented
/// two spaces) or a whole config when it starts with `listen:` or `-`.
pub async fn start(yaml: &str) -> Server {
    if std::env::var_os("RUST_LOG").is_none() {
        // SAFETY: set before the first subscriber is built, read only by it.
        unsafe { std::env::set_var("RUST_LOG", "warn") };
    }
    execd::telemetry::init(execd::telemetry::LogFormat::Text);
    let full = if yaml.trim_start().starts_with("listen:") || yaml.trim_start().starts_with('-') {
        yaml.to_string()
    } else {
        format!("listen: 127.0.0.1:0\nroutes:\n{yaml}")
    };
    let (dir, path) = write_config(&full);
    let mut config = execd::config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    if let execd::config::Listen::Tcp(a) = &mut config.listen {
        a.set_port(0);
    }
    // Tests run side by side: never the fixed default admin port.
    if let Some(a) = &mut config.admin {
        a.set_port(0);
    }
    let running = execd::daemon::start(config).await.unwrap();
    Server {
        addr: running.addr.clone(),
        admin: running.admin_addr.clone(),
        dir,
        running: Some(running),
    }
}

impl Server {
    pub async fn get(&self, path: &str) -> Resp {
        request(&self.addr, "GET", path, &[], b"").await
    }

    pub async fn post(&self, path: &str, body: &[u8]) -> Resp {
        request(&self.addr, "POST", path, &[], body).await
    }

    pub async fn req(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Resp {
        request(&self.addr, method, path, headers, body).await
    }

    pub fn running(&self) -> &execd::daemon::Running {
        self.running.as_ref().expect("running")
    }

    pub async fn stop(mut self, drain: Duration) {
        if let Some(r) = self.running.take() {
            r.stop(drain).await;
        }
    }
}

/// An HTTP response as a client sees it.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text()))
    }

    /// Asserts a problem+json body with this status and returns it.
    pub fn problem(&self, status: u16) -> serde_json::Value {
        assert_eq!(self.status, status, "body: {}", self.text());
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json")
        );
        let p = self.json();
        assert_eq!(p["status"], status);
        assert!(p["request_id"].as_str().is_some_and(|s| !s.is_empty()));
        assert_eq!(
            Some(p["request_id"].as_str().unwrap()),
            self.header("x-request-id")
        );
        p
    }
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`).
pub async fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Resp {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    let mut has_len = false;
    for (k, v) in headers {
        if k.eq_ignore_ascii_case("content-length") {
            has_len = true;
        }
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !has_len {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    // The server may answer (413) before reading the whole body.
    let _ = s.write_all(body).await;
    read_response(&mut s).await
}

/// `GET path` on a fresh connection to a unix-socket listener.
pub async fn unix_get(sock: &Path, path: &str) -> Resp {
    let mut s = tokio::net::UnixStream::connect(sock).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    parse_response(&raw)
}

pub async fn read_response(s: &mut tokio::net::TcpStream) -> Resp {
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut raw))
        .await
        .expect("response within 60s")
        .ok();
    parse_response(&raw)
}

pub fn parse_response(raw: &[u8]) -> Resp {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(raw)));
    let head = std::str::from_utf8(&raw[..split]).unwrap();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let body = raw[split + 4..].to_vec();
    Resp {
        status,
        headers,
        body,
    }
}

/// Percent-encodes every byte but unreserved characters.
pub fn pct(s: &[u8]) -> String {
    s.iter()
        .map(|&b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

pub fn b64(s: &str) -> Vec<u8> {
    // A small decoder: the tests only need to read what argv.php wrote.
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let mut buf = 0u32;
    let mut bits = 0;
    for c in s.bytes().filter(|&c| c != b'=') {
        let v = T.iter().position(|&t| t == c).expect("base64") as u32;
        buf = (buf << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buf >> bits) as u8);
            buf &= (1 << bits) - 1;
        }
    }
    out
}

/// Whether a process exists (zombies count: they are what we must not leave).
pub fn process_exists(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Whether any process is in the group.
pub fn group_exists(pgid: i32) -> bool {
    unsafe { libc::kill(-pgid, 0) == 0 }
}

/// Waits up to `limit` for `cond`.
pub async fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + limit;
    while std::time::Instant::now() < end {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

/// Runs async test code from a plain `#[test]` (the ones that drive the
/// binary, which need no runtime of their own), on a current-thread runtime.
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime builds")
        .block_on(future)
}

/// The execd binary serving a config, for what only a real process shows
/// (signals, exit codes, the plugin compiler child, idle behaviour, its log
/// as a file or pipe gets it). It is killed when dropped, so no daemon
/// outlives a failed test.
pub struct Binary {
    child: std::process::Child,
    pub addr: String,
    /// Where its stderr goes: a file, so it never blocks on a full pipe and
    /// can be read while it runs.
    log: tempfile::NamedTempFile,
}

impl Binary {
    /// Runs `execd serve ARGS -c CONFIG` and waits until `addr` accepts
    /// connections.
    pub fn serve(args: &[&std::ffi::OsStr], config: &Path, addr: &str) -> Binary {
        let log = tempfile::NamedTempFile::new().expect("a log file");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_execd"))
            .arg("serve")
            .args(args)
            .arg("-c")
            .arg(config)
            .stdout(std::process::Stdio::null())
            .stderr(log.reopen().expect("reopen the log file"))
            .spawn()
            .expect("start execd");
        let mut binary = Binary {
            child,
            addr: addr.to_string(),
            log,
        };
        let end = std::time::Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(addr).is_err() {
            if let Ok(Some(status)) = binary.child.try_wait() {
                panic!(
                    "execd exited with {status} before listening on {addr}:\n{}",
                    binary.log()
                );
            }
            assert!(
                std::time::Instant::now() < end,
                "execd did not listen on {addr}:\n{}",
                binary.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        binary
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What it has written to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).expect("read the log file")
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Waits for it to exit and returns the exit code.
    pub fn wait(&mut self) -> Option<i32> {
        self.child.wait().expect("wait for execd").code()
    }

    /// Sends SIGTERM and returns the exit code.
    pub fn terminate(mut self) -> Option<i32> {
        self.signal(libc::SIGTERM);
        self.wait()
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
