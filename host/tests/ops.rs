//! What operators notice: metrics that move, health endpoints, reloads
//! without downtime, a unix-socket listener.

use std::collections::HashMap;
use std::time::Duration;

use crate::util::*;

/// Scrapes `/metrics` and parses the text format into series -> value.
pub async fn scrape(admin: &str) -> HashMap<String, f64> {
    let r = request(admin, "GET", "/metrics", &[], b"").await;
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    let mut out = HashMap::new();
    for line in r.text().lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad metrics line {line:?}"));
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        out.insert(series.to_string(), v);
    }
    out
}

pub fn get(m: &HashMap<String, f64>, series: &str) -> f64 {
    m.get(series).copied().unwrap_or(0.0)
}

#[tokio::test]
async fn metrics_move_as_requests_flow() {
    let server = start(
        r#"
  - url: /m-ok
    cmd: /bin/echo ok
  - url: /m-fail
    cmd: /bin/false
  - url: /m-slow
    timeout: 100ms
    kill-grace: 0s
    cmd: /bin/sleep 5
"#,
    )
    .await;
    let admin = server.admin.clone().expect("admin listener");
    let before = scrape(&admin).await;
    for _ in 0..3 {
        server.get("/m-ok").await;
    }
    server.get("/m-fail").await;
    server.get("/m-slow").await;
    server.get("/m-none").await;
    let after = scrape(&admin).await;
    let delta = |s: &str| get(&after, s) - get(&before, s);
    assert_eq!(
        delta(r#"execd_http_requests_total{route="GET /m-ok",method="GET",status="200"}"#),
        3.0
    );
    assert_eq!(
        delta(r#"execd_http_requests_total{route="GET /m-fail",method="GET",status="500"}"#),
        1.0
    );
    assert_eq!(
        delta(r#"execd_http_requests_total{route="(none)",method="GET",status="404"}"#),
        1.0
    );
    assert_eq!(
        delta(r#"execd_command_exits_total{route="GET /m-ok",code="0"}"#),
        3.0
    );
    assert_eq!(
        delta(r#"execd_command_exits_total{route="GET /m-fail",code="1"}"#),
        1.0
    );
    assert_eq!(
        delta(r#"execd_command_timeouts_total{route="GET /m-slow"}"#),
        1.0
    );
    assert_eq!(
        delta(r#"execd_command_kills_total{route="GET /m-slow",reason="timeout"}"#),
        1.0
    );
    assert_eq!(
        delta(r#"execd_http_request_duration_seconds_count{route="GET /m-ok"}"#),
        3.0
    );
    assert!(
        get(
            &after,
            r#"execd_http_request_duration_seconds_bucket{route="GET /m-slow",le="0.05"}"#
        ) < get(
            &after,
            r#"execd_http_request_duration_seconds_bucket{route="GET /m-slow",le="+Inf"}"#
        )
    );
    assert_eq!(get(&after, "execd_http_in_flight"), 0.0);
}

#[tokio::test]
async fn health_and_readiness() {
    let server = start("  - url: /x\n    cmd: /bin/true\n").await;
    let admin = server.admin.clone().unwrap();
    let r = request(&admin, "GET", "/healthz", &[], b"").await;
    assert_eq!((r.status, r.text().as_str()), (200, "ok\n"));
    let r = request(&admin, "GET", "/readyz", &[], b"").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["ready"], true);
    assert_eq!(r.json()["routes"], 1);
    // Draining: no longer ready (the orchestrator stops sending traffic).
    server.running().shutdown.cancel();
    let r = request(&admin, "GET", "/readyz", &[], b"").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["draining"], true);
}

#[tokio::test]
async fn reload_swaps_routes_while_old_requests_finish() {
    let server =
        start("  - url: /long\n    cmd: /bin/sleep 1\n  - url: /v\n    cmd: /bin/echo one\n").await;
    let path = server.dir.path().join("execd.yaml");
    let addr = server.addr.clone();
    let long = tokio::spawn(async move { request(&addr, "GET", "/long", &[], b"").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace("/bin/echo one", "/bin/echo two")
            .replace("/long\n", "/gone\n"),
    )
    .unwrap();
    server.running().reload().await.expect("reload");
    assert_eq!(server.get("/v").await.text(), "two\n");
    assert_eq!(
        server.get("/long").await.status,
        404,
        "the route is gone for new requests"
    );
    let r = long.await.unwrap();
    assert_eq!(
        r.status, 200,
        "the request started before the reload completes on the old config"
    );

    // A broken config is refused whole; the old one keeps serving.
    std::fs::write(
        &path,
        "listen: 127.0.0.1:0\nroutes:\n  - url: /v\n    cmd: /bin/echo three\n    bogus: 1\n",
    )
    .unwrap();
    let errors = server
        .running()
        .reload()
        .await
        .expect_err("must be refused");
    assert!(
        errors.to_string().contains("unknown field `bogus`"),
        "{errors}"
    );
    assert_eq!(server.get("/v").await.text(), "two\n");
    let m = scrape(server.admin.as_deref().unwrap()).await;
    assert!(get(&m, r#"execd_reloads_total{result="error"}"#) >= 1.0);
}

#[tokio::test]
async fn unix_socket_listener_answers() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("execd.sock");
    let server = start(&format!(
        "listen: unix:{}\nadmin: off\nroutes:\n  - url: /x\n    cmd: /bin/echo via unix\n",
        sock.display()
    ))
    .await;
    assert_eq!(server.addr, format!("unix:{}", sock.display()));
    let r = unix_get(&sock, "/x").await;
    assert_eq!((r.status, r.text().as_str()), (200, "via unix\n"));
    server.stop(Duration::from_secs(1)).await;
    assert!(!sock.exists(), "the socket file is removed on shutdown");
}

#[test]
fn sighup_reloads_the_binary() {
    let port = free_port();
    let (_dir, path) = write_config(&format!(
        "listen: 127.0.0.1:{port}\nadmin: off\nroutes:\n  - url: /v\n    cmd: /bin/echo one\n"
    ));
    let execd = Binary::serve(&[], &path, &format!("127.0.0.1:{port}"));
    let addr = &execd.addr;
    block_on(async {
        assert_eq!(request(addr, "GET", "/v", &[], b"").await.text(), "one\n");
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("echo one", "echo two")).unwrap();
        execd.signal(libc::SIGHUP);
        let mut seen = String::new();
        for _ in 0..50 {
            seen = request(addr, "GET", "/v", &[], b"").await.text();
            if seen == "two\n" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(seen, "two\n", "SIGHUP did not reload");
    });
    assert_eq!(execd.terminate(), Some(0));
}

#[tokio::test]
async fn https_listener_answers_with_the_configured_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let make_cert = |cert: &std::path::Path, key: &std::path::Path| {
        let ok = std::process::Command::new("openssl")
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
            .args([
                "-addext",
                "subjectAltName=DNS:localhost,IP:127.0.0.1",
                "-keyout",
            ])
            .arg(key)
            .arg("-out")
            .arg(cert)
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(ok.success());
    };
    make_cert(&cert, &key);
    let server = start(&format!(
        "listen: 127.0.0.1:0\nadmin: off\ntls:\n  cert: {}\n  key: {}\nroutes:\n  - url: /x\n    cmd: /bin/echo secure\n",
        cert.display(),
        key.display()
    ))
    .await;
    let url = format!("https://{}/x", server.addr);
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(&cert)
        .arg(&url)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "secure\n");
    // Plain HTTP on the TLS port gets no answer, and the server goes on.
    let plain = tokio::process::Command::new("curl")
        .args(["-sS", "-m", "3"])
        .arg(format!("http://{}/x", server.addr))
        .output()
        .await
        .unwrap();
    assert!(!plain.status.success());
    let again = tokio::process::Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(&cert)
        .arg(&url)
        .output()
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&again.stdout), "secure\n");

    // A renewed certificate, written over the old files, is served after a
    // reload (SIGHUP), to new connections, without a restart.
    let renewed = dir.path().join("renewed.pem");
    make_cert(&renewed, &dir.path().join("renewed-key.pem"));
    let trusting_renewed = || {
        tokio::process::Command::new("curl")
            .args(["-sS", "--cacert"])
            .arg(&renewed)
            .arg(&url)
            .output()
    };
    assert!(!trusting_renewed().await.unwrap().status.success());
    std::fs::copy(&renewed, &cert).unwrap();
    std::fs::copy(dir.path().join("renewed-key.pem"), &key).unwrap();
    server.running().reload().await.expect("reload");
    let out = trusting_renewed().await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "secure\n");
}

#[tokio::test]
async fn a_client_that_leaves_early_is_counted_and_leaves_no_trace_in_flight() {
    let server = start(
        r#"
  - url: /m-leave
    cmd: /bin/sleep 30
"#,
    )
    .await;
    let admin = server.admin.clone().expect("admin listener");
    let series = r#"execd_http_requests_total{route="GET /m-leave",method="GET",status="499"}"#;
    let before = get(&scrape(&admin).await, series);
    let mut s = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut s, b"GET /m-leave HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut in_flight = 0.0;
    for _ in 0..100 {
        in_flight = get(&scrape(&admin).await, "execd_http_in_flight");
        if in_flight == 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(in_flight, 1.0, "the request is in flight");
    drop(s);
    let mut m = scrape(&admin).await;
    for _ in 0..100 {
        if get(&m, "execd_http_in_flight") == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        m = scrape(&admin).await;
    }
    assert_eq!(get(&m, "execd_http_in_flight"), 0.0);
    assert_eq!(get(&m, series) - before, 1.0, "counted with status 499");
}

#[tokio::test]
async fn a_reload_keeps_the_concurrency_caps_of_running_commands() {
    let server = start(
        r#"listen: 127.0.0.1:0
limits:
  queue: 0
routes:
  - url: /serial
    max-concurrency: 1
    shell: true
    cmd: "touch {dir}/started; while [ -e {dir}/hold ]; do sleep 0.02; done; echo done"
"#,
    )
    .await;
    let hold = server.dir.path().join("hold");
    std::fs::write(&hold, "").unwrap();
    let addr = server.addr.clone();
    let first = tokio::spawn(async move { request(&addr, "GET", "/serial", &[], b"").await });
    let started = server.dir.path().join("started");
    assert!(eventually(Duration::from_secs(10), || started.exists()).await);
    // While it holds the route's one slot, a second is turned away (no
    // queue).
    server.get("/serial").await.problem(503);
    // A reload that changes something else: the running command still
    // counts against the route's cap, and the global one.
    let path = server.dir.path().join("execd.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("echo done", "echo done again")).unwrap();
    server.running().reload().await.expect("reload");
    server.get("/serial").await.problem(503);
    std::fs::remove_file(&hold).unwrap();
    let r = first.await.unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "done\n"));
    let r = server.get("/serial").await;
    assert_eq!((r.status, r.text().as_str()), (200, "done again\n"));
}

#[tokio::test]
async fn a_unix_socket_in_use_is_not_taken_and_not_removed_by_another_instance() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("execd.sock");
    let config = |word: &str| {
        format!(
            "listen: unix:{}\nadmin: off\nroutes:\n  - url: /x\n    cmd: /bin/echo {word}\n",
            sock.display()
        )
    };
    let first = start(&config("first")).await;
    // A second instance on the same path while the first one answers.
    let (_d, path) = write_config(&config("second"));
    let err = execd::daemon::start(execd::config::load(&path).unwrap())
        .await
        .err()
        .expect("the socket is in use");
    assert!(
        err.to_string().contains("another process is listening"),
        "{err}"
    );
    assert_eq!(unix_get(&sock, "/x").await.text(), "first\n");
    // A restart that overlaps: the new instance binds the path anew (its
    // operator removed the file), then the old one stops.
    std::fs::remove_file(&sock).unwrap();
    let second = start(&config("second")).await;
    first.stop(Duration::from_secs(1)).await;
    assert_eq!(
        unix_get(&sock, "/x").await.text(),
        "second\n",
        "the new socket stays"
    );
    second.stop(Duration::from_secs(1)).await;
    assert!(!sock.exists(), "its own socket file is removed on shutdown");
}
