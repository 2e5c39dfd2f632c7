//! HTTP behaviour a client notices: statuses, limits, problem bodies,
//! headers, environment.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::util::*;

#[tokio::test]
async fn not_found_and_wrong_method() {
    let server = start(
        r#"
  - url: /items/{id}
    method: [GET, DELETE]
    cmd: /bin/echo ${path.id}
  - url: /items/new
    method: GET
    cmd: /bin/echo new
"#,
    )
    .await;
    let p = server.get("/nothing").await.problem(404);
    assert_eq!(p["type"], "urn:execd:problem:not-found");
    let r = server.post("/items/7", b"").await;
    r.problem(405);
    assert_eq!(r.header("allow"), Some("DELETE, GET"));
    assert_eq!(server.get("/items/7").await.text(), "7\n");
    assert_eq!(
        server.get("/items/new").await.text(),
        "new\n",
        "literal beats {{param}}"
    );
    assert_eq!(
        server.get("/items/a%20b").await.text(),
        "a b\n",
        "params are decoded"
    );
}

#[tokio::test]
async fn body_over_the_cap_is_413_before_it_is_read() {
    let server = start(
        r#"
  - url: /in
    method: POST
    max-body: 1KiB
    cmd: /bin/cat
"#,
    )
    .await;
    assert_eq!(server.post("/in", &[b'a'; 1024]).await.status, 200);
    server.post("/in", &[b'a'; 1025]).await.problem(413);

    // Declared far too large: refused from the headers alone, without
    // waiting for a body that never comes.
    let started = Instant::now();
    let mut s = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    s.write_all(b"POST /in HTTP/1.1\r\nHost: t\r\nContent-Length: 10000000000\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 413"));
    assert!(started.elapsed() < Duration::from_secs(5));

    // Chunked, no length: counted as it arrives.
    let mut s = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    let mut req =
        b"POST /in HTTP/1.1\r\nHost: t\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
            .to_vec();
    for _ in 0..3 {
        req.extend_from_slice(b"200\r\n");
        req.extend_from_slice(&[b'x'; 0x200]);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    s.write_all(&req).await.unwrap();
    read_response(&mut s).await.problem(413);
}

#[tokio::test]
async fn full_queue_answers_503_with_retry_after() {
    // The route cap with no waiting room: the second concurrent request is
    // refused at once.
    let server = start(
        "listen: 127.0.0.1:0\nlimits:\n  queue: 0\nroutes:\n  - url: /slow\n    max-concurrency: 1\n    cmd: /bin/sleep 1\n  - url: /fast\n    cmd: /bin/echo fast\n",
    )
    .await;
    let addr = server.addr.clone();
    let first = tokio::spawn(async move { request(&addr, "GET", "/slow", &[], b"").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = server.get("/slow").await;
    r.problem(503);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(
        server.get("/fast").await.status,
        200,
        "other routes still served"
    );
    assert_eq!(
        first.await.unwrap().status,
        200,
        "the running request finishes"
    );
}

#[tokio::test]
async fn queued_requests_wait_for_a_slot() {
    let server = start(
        "listen: 127.0.0.1:0\nlimits:\n  queue: 4\n  max-concurrency: 1\nroutes:\n  - url: /s\n    cmd: /bin/sleep 0.3\n",
    )
    .await;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let addr = server.addr.clone();
        tasks.push(tokio::spawn(async move {
            request(&addr, "GET", "/s", &[], b"").await.status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert!(
        started.elapsed() >= Duration::from_millis(850),
        "one at a time: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn timeout_is_504() {
    let server = start(
        r#"
  - url: /sleep
    timeout: 300ms
    kill-grace: 100ms
    cmd: /bin/sleep 30
"#,
    )
    .await;
    let started = Instant::now();
    let p = server.get("/sleep").await.problem(504);
    assert_eq!(p["type"], "urn:execd:problem:command-timeout");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn exit_codes_map_to_statuses() {
    let server = start(
        r#"
  - url: /exit
    cmd: {fixtures}/exit.sh hello ${query.code}
    status: 201
    exit-status:
      3: 404
      "*": 502
  - url: /plain
    cmd: {fixtures}/exit.sh hello ${query.code}
  - url: /loud
    cmd: {fixtures}/exit.sh hello ${query.code}
    expose-stderr: true
"#,
    )
    .await;
    let r = server.get("/exit?code=0").await;
    assert_eq!((r.status, r.text().as_str()), (201, "out:hello\n"));
    let r = server.get("/exit?code=3").await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (404, "out:hello\n"),
        "a listed code answers with stdout"
    );
    let p = server.get("/exit?code=4").await.problem(502);
    assert_eq!(p["exit_code"], 4);
    let r = server.get("/plain?code=1").await;
    let p = r.problem(500);
    assert!(p.get("stderr").is_none());
    assert!(!r.text().contains("err:hello"), "stderr stays in the log");
    let p = server.get("/loud?code=1").await.problem(500);
    assert_eq!(p["stderr"], "err:hello\n");
}

#[tokio::test]
async fn cgi_output_sets_status_and_headers() {
    let server = start(
        r#"
  - url: /legacy
    method: POST
    output: cgi
    cmd: php {repo}/examples/php/legacy-cgi.php ${query.id:-}
  - url: /broken
    output: cgi
    cmd: /bin/echo no header block here
"#,
    )
    .await;
    let r = server.post("/legacy?id=42", b"").await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("x-legacy"), Some("yes"));
    assert_eq!(r.header("location"), Some("/legacy/42"));
    assert_eq!(r.json()["id"], "42");
    let r = server.post("/legacy", b"").await;
    assert_eq!((r.status, r.text().as_str()), (400, "missing id\n"));
    server.get("/broken").await.problem(502);
}

#[tokio::test]
async fn environment_is_clean_and_cgi_style() {
    // SAFETY: a variable only this test reads.
    unsafe { std::env::set_var("EXECD_TEST_DAEMON_SECRET", "hunter2") };
    let server = start(
        r#"
  - url: /env/{thing}
    method: POST
    cmd: php {fixtures}/argv.php
    env:
      APP_MODE: test
"#,
    )
    .await;
    let r = server
        .req(
            "POST",
            "/env/lamp?a=1&b=two",
            &[
                ("X-Custom", "v1"),
                ("Proxy", "http://evil:8080"),
                ("Content-Type", "text/plain"),
                ("X-Request-Id", "my-id-42"),
            ],
            b"payload",
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("x-request-id"),
        Some("my-id-42"),
        "a sane request id is honoured"
    );
    let out = r.json();
    let env = out["env"].as_object().unwrap();
    let get = |k: &str| env.get(k).and_then(|v| v.as_str()).map(str::to_string);
    assert_eq!(get("REQUEST_METHOD").as_deref(), Some("POST"));
    assert_eq!(get("QUERY_STRING").as_deref(), Some("a=1&b=two"));
    assert_eq!(get("CONTENT_TYPE").as_deref(), Some("text/plain"));
    assert_eq!(get("CONTENT_LENGTH").as_deref(), Some("7"));
    assert_eq!(get("REMOTE_ADDR").as_deref(), Some("127.0.0.1"));
    assert_eq!(get("HTTP_X_CUSTOM").as_deref(), Some("v1"));
    assert_eq!(get("EXECD_REQUEST_ID").as_deref(), Some("my-id-42"));
    assert_eq!(get("EXECD_PARAM_THING").as_deref(), Some("lamp"));
    assert_eq!(get("APP_MODE").as_deref(), Some("test"));
    assert!(get("PATH").is_some());
    assert_eq!(
        get("HTTP_PROXY"),
        None,
        "httpoxy: a Proxy header must not become HTTP_PROXY"
    );
    assert_eq!(
        get("EXECD_TEST_DAEMON_SECRET"),
        None,
        "the daemon's environment leaked"
    );
    assert_eq!(get("HOME"), None, "nothing inherited but PATH");
    assert_eq!(
        b64(out["stdin"].as_str().unwrap()),
        b"payload",
        "stdin is the default payload delivery"
    );

    // An insane request id is replaced, not echoed.
    let r = server
        .req(
            "POST",
            "/env/x",
            &[("X-Request-Id", "bad id\twith stuff")],
            b"",
        )
        .await;
    let id = r.header("x-request-id").unwrap();
    assert_eq!(id.len(), 32);
}

#[tokio::test]
async fn payload_to_env_and_file() {
    let server = start(
        r#"
  - url: /env
    method: POST
    payload-to: env
    payload-env: PAYLOAD
    cmd: php {fixtures}/argv.php
  - url: /file
    method: POST
    payload-to: file
    cmd: php {fixtures}/argv.php ${body_file}
  - url: /none
    method: POST
    payload-to: none
    cmd: php {fixtures}/argv.php
"#,
    )
    .await;
    let r = server.post("/env", b"in the env").await;
    assert_eq!(r.json()["env"]["PAYLOAD"], "in the env");
    assert_eq!(r.json()["stdin"], "");
    let r = server.post("/file", b"in a file").await;
    let out = r.json();
    let path = String::from_utf8(b64(out["argv"][0].as_str().unwrap())).unwrap();
    assert_eq!(out["env"]["EXECD_BODY_FILE"], path.as_str());
    assert!(
        !std::path::Path::new(&path).exists(),
        "the body file is removed afterwards"
    );
    let r = server.post("/none", b"dropped").await;
    assert_eq!(r.json()["stdin"], "");
    assert!(r.json()["env"].get("EXECD_BODY").is_none());
}

#[tokio::test]
async fn output_over_the_cap_is_an_error_not_a_truncation() {
    let server = start(
        r#"
  - url: /big
    max-output: 1KiB
    cmd: /usr/bin/head -c 100000 /dev/zero
  - url: /ok
    max-output: 1KiB
    cmd: /usr/bin/head -c 1024 /dev/zero
"#,
    )
    .await;
    server.get("/big").await.problem(502);
    assert_eq!(server.get("/ok").await.body.len(), 1024);
}

#[tokio::test]
async fn slow_clients_are_cut_off() {
    let server = start("listen: 127.0.0.1:0\nlimits:\n  header-timeout: 500ms\nroutes:\n  - url: /x\n    cmd: /bin/echo x\n").await;
    let mut s = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    s.write_all(b"GET /x HTTP/1.1\r\nHost: t\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("closed by the server");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(
        server.get("/x").await.status,
        200,
        "others are served meanwhile"
    );
}

#[tokio::test]
async fn keep_alive_serves_many_requests_on_one_connection() {
    let server = start("  - url: /x\n    cmd: /bin/echo x\n").await;
    let mut s = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    for i in 0..3 {
        let close = if i == 2 { "Connection: close\r\n" } else { "" };
        s.write_all(format!("GET /x HTTP/1.1\r\nHost: t\r\n{close}\r\n").as_bytes())
            .await
            .unwrap();
        let mut buf = vec![0u8; 1024];
        let n = s.read(&mut buf).await.unwrap();
        let r = parse_response(&buf[..n]);
        assert_eq!((r.status, r.text().as_str()), (200, "x\n"));
    }
}

#[tokio::test]
async fn large_bodies_stream_into_stdin_intact_and_the_cap_still_holds() {
    let server = start(
        r#"
  - url: /count
    method: POST
    max-body: 64MiB
    cmd: php -r '$$d = stream_get_contents(STDIN); echo strlen($$d), "\n", substr($$d, -8);'
  - url: /capped
    method: POST
    max-body: 1MiB
    kill-grace: 100ms
    cmd: /bin/sh -c 'cat > /dev/null; touch {dir}/canary'
"#,
    )
    .await;
    // 20 MiB through the stream: the length and the last bytes arrive.
    let body: Vec<u8> = (0..20 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let r = server.post("/count", &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let mut expected = format!("{}\n", body.len()).into_bytes();
    expected.extend_from_slice(&body[body.len() - 8..]);
    assert_eq!(
        r.body, expected,
        "length and last bytes of the streamed body"
    );

    // Chunked, no length, past the cap: 413, and the command is stopped
    // before it could act on the partial body.
    let mut s = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    s.write_all(b"POST /capped HTTP/1.1\r\nHost: t\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n").await.unwrap();
    let chunk = vec![b'x'; 64 * 1024];
    for _ in 0..24 {
        let mut c = format!("{:x}\r\n", chunk.len()).into_bytes();
        c.extend_from_slice(&chunk);
        c.extend_from_slice(b"\r\n");
        if s.write_all(&c).await.is_err() {
            break;
        }
    }
    let _ = s.write_all(b"0\r\n\r\n").await;
    read_response(&mut s).await.problem(413);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !server.dir.path().join("canary").exists(),
        "the command ran to the end on a partial body"
    );
}

#[tokio::test]
async fn a_client_that_stalls_mid_body_still_gets_the_timeout_and_frees_the_slot() {
    let server = start(
        r#"
listen: 127.0.0.1:0
limits:
  max-concurrency: 1
routes:
  - url: /cat
    method: POST
    timeout: 500ms
    kill-grace: 0s
    cmd: /bin/cat
"#,
    )
    .await;
    // A streamed body (chunked) that stops after its first chunk, on a
    // connection the client keeps open.
    let mut s = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    s.write_all(
        b"POST /cat HTTP/1.1\r\nHost: t\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    )
    .await
    .unwrap();
    let mut raw = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw)).await;
    assert!(read.is_ok(), "no answer 10 s after a 500 ms timeout");
    let p = parse_response(&raw).problem(504);
    assert_eq!(p["type"], "urn:execd:problem:command-timeout");
    // The only command slot is free again while that client still hangs on.
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        server.req("POST", "/cat", &[], b"next"),
    )
    .await
    .expect("the next request gets the slot");
    assert_eq!((r.status, r.text().as_str()), (200, "next"));
    drop(s);
}

#[tokio::test]
async fn a_script_cannot_frame_the_response_itself() {
    let server = start(
        r#"
  - url: /framed
    output: cgi
    shell: true
    cmd: "printf 'Content-Length: 3\r\nTransfer-Encoding: chunked\r\nConnection: upgrade\r\nX-Kept: yes\r\n\r\nhello world'"
"#,
    )
    .await;
    // Two requests on one keep-alive connection: the first must end where
    // its body ends, or the second reads the first's leftovers.
    let mut s = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    s.write_all(b"GET /framed HTTP/1.1\r\nHost: t\r\n\r\nGET /framed HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .expect("both answers within 10 s")
        .unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let answers: Vec<&str> = text.split("HTTP/1.1 ").filter(|a| !a.is_empty()).collect();
    assert_eq!(answers.len(), 2, "two answers in {text:?}");
    for answer in answers {
        let r = parse_response(format!("HTTP/1.1 {answer}").as_bytes());
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-length"), Some("11"), "{answer:?}");
        assert_eq!(r.header("transfer-encoding"), None);
        assert_eq!(r.header("x-kept"), Some("yes"));
        assert_eq!(r.text(), "hello world");
    }
}

#[tokio::test]
async fn values_no_environment_can_hold_are_the_clients_error() {
    let server = start(
        r#"
  - url: /p/{id}
    cmd: /usr/bin/env
  - url: /h
    cmd: /usr/bin/env
  - url: /e
    method: POST
    payload-to: env
    cmd: /bin/true
"#,
    )
    .await;
    // A NUL byte in a path parameter, which reaches the command only as
    // EXECD_PARAM_ID.
    let p = server.get("/p/a%00b").await.problem(400);
    assert!(
        p["detail"].as_str().unwrap().contains("EXECD_PARAM_ID"),
        "{p}"
    );
    // A header value over the kernel's limit for one variable.
    let big = "x".repeat(140 * 1024);
    let p = server
        .req("GET", "/h", &[("X-Big", &big)], b"")
        .await
        .problem(413);
    assert!(p["detail"].as_str().unwrap().contains("HTTP_X_BIG"), "{p}");
    // The body as EXECD_BODY: the limit is for `EXECD_BODY=<body>` whole.
    let room = 128 * 1024 - 1 - "EXECD_BODY=".len();
    assert_eq!(server.post("/e", &vec![b'a'; room]).await.status, 200);
    let p = server.post("/e", &vec![b'a'; room + 1]).await.problem(413);
    assert!(p["detail"].as_str().unwrap().contains("EXECD_BODY"), "{p}");
}

#[tokio::test]
async fn a_body_that_stops_arriving_is_a_408() {
    let server = start(
        r#"
listen: 127.0.0.1:0
limits:
  body-timeout: 500ms
routes:
  - url: /whole
    method: POST
    cmd: /bin/cat
  - url: /streamed
    method: POST
    timeout: 30s
    cmd: /bin/cat
"#,
    )
    .await;
    // Read whole: 5 of 10 announced bytes, then nothing.
    // Streamed into the command (chunked): one chunk, then nothing.
    for head in [
        &b"POST /whole HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nhello"[..],
        &b"POST /streamed HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
            [..],
    ] {
        let mut s = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
        s.write_all(head).await.unwrap();
        let t = Instant::now();
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
            .await
            .expect("an answer within 10 s")
            .unwrap();
        let p = parse_response(&raw).problem(408);
        assert!(
            p["detail"].as_str().unwrap().contains("body-timeout"),
            "{p}"
        );
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    }
    // A body that keeps coming, however slowly, is not cut off.
    let mut s = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    s.write_all(
        b"POST /whole HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: 4\r\n\r\n",
    )
    .await
    .unwrap();
    for b in [b"s", b"l", b"o", b"w"] {
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.write_all(b).await.unwrap();
    }
    let r = read_response(&mut s).await;
    assert_eq!((r.status, r.text().as_str()), (200, "slow"));
}

#[tokio::test]
async fn a_reply_cannot_carry_an_interim_status_or_unbounded_headers() {
    let server = start(
        r#"
  - url: /switch
    output: cgi
    shell: true
    cmd: "printf 'Status: 101 Switching Protocols\r\n\r\nbody'"
  - url: /many
    output: cgi
    shell: true
    cmd: "i=0; while [ $$i -lt 25000 ]; do echo \"X-H$$i: v\"; i=$$((i+1)); done; printf '\nbody'"
"#,
    )
    .await;
    // A 1xx cannot be a final answer: the script broke the CGI contract.
    let p = server.get("/switch").await.problem(502);
    assert!(p["detail"].as_str().unwrap().contains("Status"), "{p}");
    // 25,000 header lines: the answer comes, with the first 100 of them.
    let r = server.get("/many").await;
    assert_eq!((r.status, r.text().as_str()), (200, "body"));
    let set: Vec<&String> = r
        .headers
        .iter()
        .map(|(k, _)| k)
        .filter(|k| k.starts_with("x-h"))
        .collect();
    assert_eq!(set.len(), 100, "{:?}", &set[..set.len().min(5)]);
    assert_eq!(set[0], "x-h0");
}
