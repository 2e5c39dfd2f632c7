//! The reply socket on HTTP routes, driven by a real PHP script through the
//! PHP helper (`clients/php/execd.php`). The AMQP side is in `amqp.rs`
//! (`rpc_round_trip_through_a_php_reply_socket`).

use crate::util::*;

const ROUTES: &str = r#"
  - url: /reply
    method: POST
    reply-socket: true
    max-output: 4KiB
    expose-stderr: true
    cmd: php {fixtures}/reply-socket.php
  - url: /no-socket
    method: POST
    cmd: php {fixtures}/reply-socket.php
"#;

#[tokio::test]
async fn a_php_script_answers_with_status_headers_and_a_binary_body() {
    let s = start(ROUTES).await;
    let r = s.post("/reply", br#"{"mode": "binary"}"#).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let expected: Vec<u8> = (0..4).flat_map(|_| 0..=255u8).collect();
    assert_eq!(
        r.body, expected,
        "the body arrives byte for byte, stdout ignored"
    );
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));
    let multi: Vec<&str> = r
        .headers
        .iter()
        .filter(|(k, _)| k == "x-multi")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(multi, ["a", "b"], "a list of values repeats the header");
    assert_eq!(
        r.header("x-dir-mode"),
        Some("700"),
        "the socket's directory is private"
    );
    let socket = std::path::Path::new(r.header("x-socket").unwrap());
    assert!(socket.starts_with(std::env::temp_dir()));
    let dir = socket.parent().unwrap();
    let name = dir.file_name().unwrap().to_string_lossy();
    assert_eq!(
        name.len(),
        "execd-reply-".len() + 32,
        "128 random bits in {name}"
    );
    assert!(
        !dir.exists(),
        "{} should be gone after the request",
        dir.display()
    );
    s.stop(std::time::Duration::from_secs(5)).await;
}

#[tokio::test]
async fn without_a_reply_on_the_socket_stdout_answers() {
    let s = start(ROUTES).await;
    let r = s.post("/reply", br#"{"mode": "stdout"}"#).await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "this stdout is not the answer\n")
    );
    // A route without `reply-socket` gives the helper nothing to talk to.
    let r = s.post("/no-socket", br#"{"mode": "json"}"#).await;
    let p = r.problem(500);
    assert_eq!(p["type"], "urn:execd:problem:command-failed");
    s.stop(std::time::Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_malformed_reply_is_a_502_not_a_crash() {
    let s = start(ROUTES).await;
    let r = s.post("/reply", br#"{"mode": "garbage"}"#).await;
    let p = r.problem(502);
    assert_eq!(p["type"], "urn:execd:problem:bad-reply");
    let detail = p["detail"].as_str().unwrap();
    assert!(
        detail.contains("malformed reply: expected `EXECD-REPLY/1 <status> <body-length>` as the first line, got \"HELLO execd\\n\""),
        "{detail}"
    );
    // The daemon is still serving.
    let r = s.post("/reply", br#"{"mode": "json", "n": 1}"#).await;
    assert_eq!(r.status, 201);
    assert_eq!(r.json()["answer"], 2);
    s.stop(std::time::Duration::from_secs(5)).await;
}

#[tokio::test]
async fn an_oversized_reply_is_refused_and_the_helper_says_why() {
    let s = start(ROUTES).await;
    // max-output is 4KiB: the helper is told, throws, and the script exits 4.
    let r = s.post("/reply", br#"{"mode": "big", "size": 5000}"#).await;
    let p = r.problem(500);
    let stderr = p["stderr"].as_str().unwrap();
    assert!(
        stderr.contains("execd refused the reply: reply body of 5000 bytes is over the limit of 4096 bytes (max-output)"),
        "{stderr}"
    );
    // Up to the cap is fine.
    let r = s.post("/reply", br#"{"mode": "big", "size": 4096}"#).await;
    assert_eq!((r.status, r.body.len()), (200, 4096));
    s.stop(std::time::Duration::from_secs(5)).await;
}

#[test]
fn a_malformed_reply_leaves_a_clear_log_line() {
    let (_dir, path) = write_config(&format!("listen: 127.0.0.1:0\nroutes:{ROUTES}"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_execd"))
        .args(["run", "-c"])
        .arg(&path)
        .args(["POST", "/reply", "--body", r#"{"mode": "garbage"}"#])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stderr = strip_ansi(&String::from_utf8_lossy(&out.stderr));
    assert!(stderr.contains("HTTP 502"), "{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.contains("reply socket:"))
        .unwrap_or_else(|| panic!("no reply socket log line in {stderr}"));
    assert!(
        line.contains("WARN")
            && line.contains("malformed reply")
            && line.contains("route=POST /reply"),
        "{line}"
    );
    // The script heard the same reason.
    assert!(
        stderr.contains("execd answered: ERR malformed reply"),
        "{stderr}"
    );
}

/// Log lines without their colour codes.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // ESC [ ... final letter
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[tokio::test]
async fn a_command_run_as_another_user_can_answer_on_its_socket() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to switch users");
        return;
    }
    let s = start(
        r#"
  - url: /as-nobody
    method: POST
    user: nobody
    reply-socket: true
    expose-stderr: true
    cmd: php {fixtures}/reply-socket.php
"#,
    )
    .await;
    let r = s.post("/as-nobody", br#"{"mode": "json", "n": 41}"#).await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["answer"], 42);
    assert_eq!(r.header("x-job"), Some("priced"));
}
