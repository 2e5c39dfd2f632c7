//! The real plugins (built for wasm32-wasip2 by `make plugins`) on the real
//! wasmtime host, end to end through HTTP.

use std::time::{Duration, Instant};

use crate::util::*;

/// Path of a built plugin; `make test` builds them first.
pub fn wasm(name: &str) -> String {
    let p = repo().join("plugins/dist").join(format!("{name}.wasm"));
    assert!(
        p.is_file(),
        "{} is missing: run `make plugins` (make test does)",
        p.display()
    );
    p.display().to_string()
}

fn plugins_yaml(entries: &[(&str, &str, &str)]) -> String {
    let mut s = String::from("plugins:\n");
    for (name, file, rest) in entries {
        s.push_str(&format!("  {name}:\n    path: {}\n{rest}", wasm(file)));
    }
    s
}

#[tokio::test]
async fn hostile_plugin_cannot_hang_exhaust_or_escape() {
    let yaml = format!(
        "listen: 127.0.0.1:0\n{}routes:\n{}",
        plugins_yaml(&[
            (
                "loop",
                "hostile",
                "    timeout: 50ms\n    config: {mode: loop}\n"
            ),
            (
                "sleep",
                "hostile",
                "    timeout: 50ms\n    config: {mode: sleep}\n"
            ),
            (
                "alloc",
                "hostile",
                "    memory: 8MiB\n    config: {mode: alloc}\n"
            ),
            ("trap", "hostile", "    config: {mode: trap}\n"),
            ("fails", "hostile", "    config: {mode: error}\n"),
            (
                "skipped",
                "hostile",
                "    on-error: skip\n    config: {mode: error}\n"
            ),
            ("file", "hostile", "    config: {mode: file}\n"),
            ("env", "hostile", "    config: {mode: env}\n"),
            ("socket", "hostile", "    config: {mode: socket}\n"),
        ]),
        [
            "loop", "sleep", "alloc", "trap", "fails", "skipped", "file", "env", "socket"
        ]
        .iter()
        .map(|p| format!("  - url: /{p}\n    pre: [{p}]\n    cmd: /bin/echo ran\n"))
        .collect::<String>()
            + "  - url: /ok\n    cmd: /bin/echo ok\n"
    );
    let server = start(&yaml).await;
    let healthy = |s: &Server| {
        let addr = s.addr.clone();
        async move {
            let r = request(&addr, "GET", "/ok", &[], b"").await;
            assert_eq!(
                (r.status, r.text().as_str()),
                (200, "ok\n"),
                "daemon unhealthy after a hostile call"
            );
        }
    };

    // A loop is stopped by the epoch; an hour's sleep is one host call,
    // where no guest code runs for the epoch to stop, and the deadline
    // holds all the same.
    for mode in ["loop", "sleep"] {
        let started = Instant::now();
        let p = server.get(&format!("/{mode}")).await.problem(500);
        assert_eq!(p["type"], "urn:execd:problem:plugin-failed");
        assert!(
            started.elapsed() < Duration::from_millis(50 + 450),
            "{mode} stopped after {:?}",
            started.elapsed()
        );
        healthy(&server).await;
    }

    server.get("/alloc").await.problem(500);
    healthy(&server).await;
    server.get("/trap").await.problem(500);
    healthy(&server).await;
    server.get("/fails").await.problem(500);
    let r = server.get("/skipped").await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "ran\n"),
        "on-error: skip runs the command"
    );

    // Each attempt to reach outside is denied, and the plugin says so.
    for mode in ["file", "env", "socket"] {
        let r = server.get(&format!("/{mode}")).await;
        assert_eq!(r.status, 200, "{mode}: {}", r.text());
        let out = r.json();
        let results = out["results"]
            .as_array()
            .unwrap_or_else(|| panic!("{mode}: {out}"));
        assert!(!results.is_empty(), "{mode}: no attempts made");
        for attempt in results {
            assert_eq!(attempt["ok"], false, "{mode}: {attempt} was allowed");
        }
        healthy(&server).await;
    }
    assert!(
        !std::path::Path::new("/tmp/execd-hostile-canary").exists(),
        "a plugin wrote a file"
    );
    // The loop is still stopped after many calls: nothing wedged.
    for _ in 0..5 {
        server.get("/loop").await.problem(500);
    }
    healthy(&server).await;
}

/// The error of building a config that loads but whose plugins do not fit.
fn build_error(yaml: &str) -> String {
    let (_dir, path) = write_config(yaml);
    let config = execd::config::load(&path).unwrap();
    execd::app::App::build(std::sync::Arc::new(config))
        .err()
        .expect("must fail")
        .to_string()
}

#[tokio::test]
async fn bad_plugin_config_stops_loading_with_the_plugins_message() {
    let yaml = format!(
        "listen: 127.0.0.1:0\n{}routes: []\n",
        plugins_yaml(&[("auth", "api-key", "    config: {keys: [], header: 7}\n")])
    );
    let err = build_error(&yaml);
    assert!(
        err.contains("execd.yaml:3:3: plugins.auth: config rejected by the plugin"),
        "{err}"
    );
}

#[tokio::test]
async fn a_plugin_listed_under_a_phase_it_lacks_is_a_config_error() {
    let yaml = format!(
        "listen: 127.0.0.1:0\n{}routes:\n  - url: /a\n    post: [auth]\n    cmd: /bin/true\n",
        plugins_yaml(&[("auth", "api-key", "    config: {keys: [k]}\n")])
    );
    let err = build_error(&yaml);
    assert!(err.contains("plugin auth has no post phase"), "{err}");
    // A queue consumer's plugins are checked the same way; at run time the
    // phase would fail after the command ran, for every message.
    let yaml = format!(
        "listen: 127.0.0.1:0\n{}routes: []\namqp:\n  url: amqp://127.0.0.1:5672/%2f\n  consumers:\n    - queue: jobs\n      post: [auth]\n      cmd: /bin/true\n",
        plugins_yaml(&[("auth", "api-key", "    config: {keys: [k]}\n")])
    );
    let err = build_error(&yaml);
    assert!(
        err.contains("execd.yaml:10:7: post: consumer jobs: plugin auth has no post phase"),
        "{err}"
    );
}

#[tokio::test]
async fn api_key_guards_a_route() {
    let yaml = format!(
        "listen: 127.0.0.1:0\n{}routes:\n  - url: /secret\n    pre: [auth]\n    cmd: php {{fixtures}}/argv.php\n",
        plugins_yaml(&[(
            "auth",
            "api-key",
            "    config:\n      keys: [{key: k-123, id: alice}, k-456]\n"
        )])
    );
    let server = start(&yaml).await;
    let r = server.get("/secret").await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert!(r.header("www-authenticate").is_some());
    assert_eq!(
        server
            .req("GET", "/secret", &[("X-Api-Key", "wrong")], b"")
            .await
            .status,
        401
    );
    let r = server
        .req("GET", "/secret", &[("X-Api-Key", "k-123")], b"")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["env"]["EXECD_VAR_API_KEY_ID"], "alice");
    assert_eq!(
        server
            .req("GET", "/secret", &[("X-Api-Key", "k-456")], b"")
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn json_map_picks_fields_and_rejects_missing_ones() {
    let yaml = format!(
        "listen: 127.0.0.1:0\n{}routes:\n  - url: /m\n    method: POST\n    pre: [map]\n    cmd: php {{fixtures}}/argv.php ${{var.user}}\n",
        plugins_yaml(&[(
            "map",
            "json-map",
            "    config:\n      fields:\n        user: {pointer: /user/id, required: true}\n        tag: {pointer: /tag, default: none}\n      body: {who: \"${/user/id}\", all: \"${/user}\"}\n"
        )])
    );
    let server = start(&yaml).await;
    let r = server.post("/m", br#"{"user":{"id":"u-7","n":1}}"#).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let out = r.json();
    assert_eq!(
        b64(out["argv"][0].as_str().unwrap()),
        b"u-7",
        "${{var.user}} filled from /user/id"
    );
    assert_eq!(out["env"]["EXECD_VAR_TAG"], "none");
    let body: serde_json::Value =
        serde_json::from_slice(&b64(out["stdin"].as_str().unwrap())).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"who": "u-7", "all": {"id": "u-7", "n": 1}})
    );
    let p = server.post("/m", br#"{"user":{}}"#).await.problem(400);
    assert!(p["detail"].as_str().unwrap().contains("/user/id"), "{p}");
    let p = server.post("/m", b"{not json").await.problem(400);
    assert!(p["detail"].as_str().unwrap().contains("not JSON"), "{p}");
}

/// json-map is built without WASI and serves small calls from its initial
/// memory (640 KiB, `plugins/.cargo/config.toml`); a 1.3 MB body has to
/// grow it, and every byte must come through the move from one allocator to
/// the other. Parsing and writing that much JSON takes tens of
/// milliseconds, more on a loaded machine, so the deadline is raised from
/// the default 100 ms: this is about memory, not time.
#[tokio::test]
async fn json_map_rewrites_a_body_larger_than_its_initial_memory() {
    let yaml = format!(
        "listen: 127.0.0.1:0\n{}routes:\n  - url: /m\n    method: POST\n    pre: [map]\n    cmd: php {{fixtures}}/argv.php ${{var.user}}\n",
        plugins_yaml(&[(
            "map",
            "json-map",
            "    memory: 64MiB\n    timeout: 10s\n    config:\n      fields:\n        user: {pointer: /user/id, required: true}\n      body: {who: \"${/user/id}\", rows: \"${/rows}\"}\n"
        )])
    );
    let server = start(&yaml).await;
    let rows: Vec<serde_json::Value> = (0..12_000)
        .map(|i| serde_json::json!({"n": i, "text": format!("row {i} {}", "of the large body ".repeat(5))}))
        .collect();
    let sent = serde_json::json!({"user": {"id": "u-big"}, "rows": rows});
    let bytes = serde_json::to_vec(&sent).unwrap();
    assert!(bytes.len() > 1_000_000, "{} bytes", bytes.len());
    let r = server.post("/m", &bytes).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let out = r.json();
    assert_eq!(b64(out["argv"][0].as_str().unwrap()), b"u-big");
    let body: serde_json::Value =
        serde_json::from_slice(&b64(out["stdin"].as_str().unwrap())).unwrap();
    assert_eq!(body, serde_json::json!({"who": "u-big", "rows": rows}));
}

/// The shipped plugins are built without WASI: they import the contract
/// and, the two that check timestamps, WASI's wall clock alone.
#[test]
fn shipped_plugins_import_the_contract_and_at_most_the_clock() {
    let engine = wasmtime::Engine::default();
    let imports = |name: &str| -> Vec<String> {
        let component = wasmtime::component::Component::from_file(&engine, wasm(name)).unwrap();
        component
            .component_type()
            .imports(&engine)
            .map(|(import, _)| import.to_string())
            .collect()
    };
    for (name, reads_the_clock) in [
        ("api-key", false),
        ("json-map", false),
        ("response-shape", false),
        ("jwt", true),
        ("hmac-signature", true),
    ] {
        let found = imports(name);
        let beyond_the_contract: Vec<&String> = found
            .iter()
            .filter(|i| !i.starts_with("execd:plugin/"))
            .collect();
        match beyond_the_contract.as_slice() {
            [] => assert!(!reads_the_clock, "{name} imports no clock: {found:?}"),
            [clock] => assert!(
                reads_the_clock && clock.starts_with("wasi:clocks/wall-clock@"),
                "{name} imports {found:?}"
            ),
            _ => panic!("{name} imports {found:?}"),
        }
    }
    // The hostile test plugin keeps all of WASI, to prove the sandbox
    // holds against it; this is what the check above tells apart.
    let hostile = imports("hostile");
    assert!(
        hostile.iter().filter(|i| i.starts_with("wasi:")).count() > 10,
        "{hostile:?}"
    );
}

#[tokio::test]
async fn response_shape_wraps_output_in_an_envelope() {
    let yaml = format!(
        "listen: 127.0.0.1:0\n{}routes:\n  - url: /e\n    post: [shape]\n    cmd: {{fixtures}}/exit.sh hi ${{query.code}}\n",
        plugins_yaml(&[(
            "shape",
            "response-shape",
            "    config:\n      mode: envelope\n      headers: {X-Shaped: \"yes\"}\n      status-map: {\"0\": 200, \"3\": 404, \"*\": 502}\n"
        )])
    );
    let server = start(&yaml).await;
    let r = server.get("/e?code=0").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-shaped"), Some("yes"));
    let env = r.json();
    assert_eq!(env["data"], "out:hi\n");
    assert_eq!(env["exit_code"], 0);
    assert_eq!(env["request_id"].as_str(), r.header("x-request-id"));
    let r = server.get("/e?code=3").await;
    assert_eq!((r.status, r.json()["exit_code"].as_i64()), (404, Some(3)));
    assert_eq!(server.get("/e?code=9").await.status, 502);
}

/// Runs the openssl command line: an independent implementation to sign
/// with, so the plugins are checked against something other than themselves.
fn openssl(args: &[&str], input: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut child = std::process::Command::new("openssl")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("openssl");
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "openssl {args:?} failed");
    out.stdout
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn b64url(b: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in b.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &x)| acc | (x as u32) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn hmac_signature_checks_github_style_signatures() {
    let yaml = format!(
        "listen: 127.0.0.1:0\n{}routes:\n  - url: /hook\n    method: POST\n    pre: [sig, stamped]\n    cmd: /bin/cat\n  - url: /gh\n    method: POST\n    pre: [sig]\n    cmd: /bin/cat\n",
        plugins_yaml(&[
            (
                "sig",
                "hmac-signature",
                "    config: {secret: \"${EXECD_TEST_HOOK_SECRET:-s3cr3t}\"}\n"
            ),
            (
                "stamped",
                "hmac-signature",
                "    config: {secret: other, header: X-Sig, prefix: \"\", encoding: base64, timestamp-header: X-Timestamp, tolerance-seconds: 60, signed-payload: timestamp.body}\n"
            ),
        ])
    );
    let server = start(&yaml).await;
    let body = br#"{"action":"opened"}"#;
    let sig = format!(
        "sha256={}",
        hex(&openssl(
            &["dgst", "-sha256", "-hmac", "s3cr3t", "-binary"],
            body
        ))
    );
    let r = server
        .req("POST", "/gh", &[("X-Hub-Signature-256", &sig)], body)
        .await;
    assert_eq!(
        (r.status, r.body.as_slice()),
        (200, &body[..]),
        "{}",
        r.text()
    );
    let mut tampered = body.to_vec();
    tampered[3] ^= 1;
    assert_eq!(
        server
            .req("POST", "/gh", &[("X-Hub-Signature-256", &sig)], &tampered)
            .await
            .status,
        401
    );
    assert_eq!(
        server.post("/gh", body).await.status,
        401,
        "a missing signature is refused"
    );

    // Timestamped, base64: fresh passes, stale is refused as a replay.
    let sign = |ts: u64| {
        let mut payload = format!("{ts}.").into_bytes();
        payload.extend_from_slice(body);
        let raw = openssl(&["dgst", "-sha256", "-hmac", "other", "-binary"], &payload);
        openssl(&["base64", "-A"], &raw)
    };
    let ts = now();
    let s = String::from_utf8(sign(ts)).unwrap();
    let fresh = [
        ("X-Hub-Signature-256", sig.as_str()),
        ("X-Sig", s.as_str()),
        ("X-Timestamp", &ts.to_string()),
    ];
    assert_eq!(server.req("POST", "/hook", &fresh, body).await.status, 200);
    let old = ts - 3600;
    let s = String::from_utf8(sign(old)).unwrap();
    let stale = [
        ("X-Hub-Signature-256", sig.as_str()),
        ("X-Sig", s.as_str()),
        ("X-Timestamp", &old.to_string()),
    ];
    let r = server.req("POST", "/hook", &stale, body).await;
    assert_eq!(r.status, 401);
    assert!(
        r.text().contains("tolerance") || r.text().contains("timestamp"),
        "{}",
        r.text()
    );
}

#[tokio::test]
async fn jwt_verifies_hs256_and_rs256_and_exposes_claims() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key.pem");
    let key_s = key.display().to_string();
    openssl(&["genrsa", "-out", &key_s, "2048"], b"");
    let public = String::from_utf8(openssl(&["rsa", "-in", &key_s, "-pubout"], b"")).unwrap();
    let indented: String = public.lines().map(|l| format!("        {l}\n")).collect();
    let yaml = format!(
        "listen: 127.0.0.1:0\n{}routes:\n  - url: /hs\n    pre: [hs]\n    cmd: php {{fixtures}}/argv.php\n  - url: /rs\n    pre: [rs]\n    cmd: php {{fixtures}}/argv.php\n",
        plugins_yaml(&[
            (
                "hs",
                "jwt",
                "    config:\n      secret: hs-secret-of-at-least-32-bytes-long\n      algorithms: [HS256]\n      issuer: execd-tests\n      audience: api\n      claims: {sub: user_id, role: role}\n"
            ),
            (
                "rs",
                "jwt",
                &format!(
                    "    config:\n      algorithms: [RS256]\n      public-key: |\n{indented}      claims: {{sub: user_id}}\n"
                )
            ),
        ])
    );
    let server = start(&yaml).await;
    let token = |alg: &str, claims: serde_json::Value, sign: &dyn Fn(&[u8]) -> Vec<u8>| {
        let head = b64url(format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#).as_bytes());
        let body = b64url(claims.to_string().as_bytes());
        let input = format!("{head}.{body}");
        let sig = b64url(&sign(input.as_bytes()));
        format!("Bearer {input}.{sig}")
    };
    let hs = |data: &[u8]| {
        openssl(
            &[
                "dgst",
                "-sha256",
                "-hmac",
                "hs-secret-of-at-least-32-bytes-long",
                "-binary",
            ],
            data,
        )
    };
    let rs = |data: &[u8]| openssl(&["dgst", "-sha256", "-sign", &key_s], data);
    let good = serde_json::json!({"sub": "u-1", "role": "admin", "iss": "execd-tests", "aud": "api", "exp": now() + 300});

    let r = server
        .req(
            "GET",
            "/hs",
            &[("Authorization", &token("HS256", good.clone(), &hs))],
            b"",
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["env"]["EXECD_VAR_USER_ID"], "u-1");
    assert_eq!(r.json()["env"]["EXECD_VAR_ROLE"], "admin");

    let expired =
        serde_json::json!({"sub": "u-1", "iss": "execd-tests", "aud": "api", "exp": now() - 3600});
    let r = server
        .req(
            "GET",
            "/hs",
            &[("Authorization", &token("HS256", expired, &hs))],
            b"",
        )
        .await;
    assert_eq!(r.status, 401);
    assert!(r.text().contains("expired"), "{}", r.text());
    let wrong_iss =
        serde_json::json!({"sub": "u-1", "iss": "someone", "aud": "api", "exp": now() + 300});
    assert_eq!(
        server
            .req(
                "GET",
                "/hs",
                &[("Authorization", &token("HS256", wrong_iss, &hs))],
                b""
            )
            .await
            .status,
        401
    );
    let forged = |_: &[u8]| b"not a signature".to_vec();
    assert_eq!(
        server
            .req(
                "GET",
                "/hs",
                &[("Authorization", &token("HS256", good.clone(), &forged))],
                b""
            )
            .await
            .status,
        401
    );
    // alg none and algorithm confusion are refused.
    let none = |_: &[u8]| Vec::new();
    assert_eq!(
        server
            .req(
                "GET",
                "/hs",
                &[("Authorization", &token("none", good.clone(), &none))],
                b""
            )
            .await
            .status,
        401
    );
    assert_eq!(server.get("/hs").await.status, 401);

    let r = server
        .req(
            "GET",
            "/rs",
            &[("Authorization", &token("RS256", good.clone(), &rs))],
            b"",
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["env"]["EXECD_VAR_USER_ID"], "u-1");
    // An HS256 token signed with the public key as secret must not pass.
    let confused = |data: &[u8]| openssl(&["dgst", "-sha256", "-hmac", &public, "-binary"], data);
    assert_eq!(
        server
            .req(
                "GET",
                "/rs",
                &[("Authorization", &token("HS256", good, &confused))],
                b""
            )
            .await
            .status,
        401
    );
}

/// Runs `execd serve --plugin-cache CACHE` on a config with an api-key
/// route until it answers, checks the plugin guards the route, and stops
/// it.
fn serve_with_cache(cache: &std::path::Path) {
    let port = free_port();
    let (_dir, path) = write_config(&format!(
        "listen: 127.0.0.1:{port}
admin: off
plugins:
  auth:
    path: {}
    config: {{keys: [k-cached]}}
routes:
  - url: /guarded
    pre: [auth]
    cmd: /bin/echo in
",
        wasm("api-key")
    ));
    let execd = Binary::serve(
        &["--plugin-cache".as_ref(), cache.as_os_str()],
        &path,
        &format!("127.0.0.1:{port}"),
    );
    let addr = &execd.addr;
    block_on(async {
        let denied = request(addr, "GET", "/guarded", &[], b"").await;
        assert_eq!(denied.status, 401);
        let allowed = request(addr, "GET", "/guarded", &[("x-api-key", "k-cached")], b"").await;
        assert_eq!((allowed.status, allowed.text().as_str()), (200, "in\n"));
    });
    assert_eq!(execd.terminate(), Some(0));
}

fn cached_files(cache: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .collect()
}

#[test]
fn plugin_cache_keeps_compiled_plugins_between_starts() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");

    serve_with_cache(&cache);
    let files = cached_files(&cache);
    assert_eq!(files.len(), 1, "one compiled plugin kept: {files:?}");
    let mode = std::fs::metadata(&cache).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "the cache is private");
    let written = std::fs::metadata(&files[0]).unwrap().modified().unwrap();

    // The second start loads it instead of compiling (the file is not
    // written again) and the plugin works the same.
    serve_with_cache(&cache);
    assert_eq!(
        std::fs::metadata(&files[0]).unwrap().modified().unwrap(),
        written,
        "the cached plugin was reused"
    );

    // A damaged file is compiled again, not trusted.
    std::fs::write(&files[0], b"not a compiled plugin").unwrap();
    serve_with_cache(&cache);
    assert!(std::fs::read(&files[0]).unwrap().len() > 1000, "rewritten");

    // A cache others may write to is refused: it holds native code.
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_execd"))
        .args(["serve", "--plugin-cache"])
        .arg(&cache)
        .args(["-c", "/nonexistent.yaml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("writable by it alone"), "{err}");
}

/// The binary compiles plugins in a child process; what the child reports
/// still lands on the right plugin, with the file, line and field, and a
/// good plugin compiled in the same batch is unaffected.
#[test]
fn check_names_the_plugin_that_does_not_compile() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.wasm");
    std::fs::write(&bad, b"\0asm\x01\0\0\0 truncated").unwrap();
    let (_cfg_dir, path) = write_config(&format!(
        "plugins:
  good:
    path: {}
    config: {{keys: [k]}}
  bad:
    path: {}
routes:
  - url: /guarded
    pre: [good]
    cmd: /bin/true
",
        wasm("api-key"),
        bad.display()
    ));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_execd"))
        .args(["check", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("1 error in config"), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "execd.yaml:5:3: plugins.bad: cannot load {} as a WebAssembly component",
            bad.display()
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("plugins.good"), "{stderr}");
}

/// Context switches of every thread of a process so far.
fn context_switches(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .flat_map(|s| {
            s.lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

/// An idle daemon with plugins stays asleep: the ticker that enforces
/// plugin deadlines runs only around plugin calls (ticking every 2 ms, it
/// alone made about 500 context switches a second). And the first call
/// after the idle spell still has its deadline enforced.
#[test]
fn an_idle_daemon_sleeps_and_deadlines_hold_after_it() {
    let port = free_port();
    let (_dir, path) = write_config(&format!(
        "listen: 127.0.0.1:{port}
admin: off
{}routes:
  - url: /loop
    pre: [loop]
    cmd: /bin/echo ran
",
        plugins_yaml(&[(
            "loop",
            "hostile",
            "    timeout: 50ms\n    config: {mode: loop}\n"
        )])
    ));
    let execd = Binary::serve(&[], &path, &format!("127.0.0.1:{port}"));
    let (pid, addr) = (execd.pid(), &execd.addr);
    block_on(async {
        // Loading ran the plugin (its config check); let the ticker wind
        // down, then watch the idle daemon.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let before = context_switches(pid);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let idle = context_switches(pid) - before;
        assert!(
            idle < 200,
            "{idle} context switches in 2 s of idling (ticking would be about 1000)"
        );
        let started = Instant::now();
        let r = request(addr, "GET", "/loop", &[], b"").await;
        assert_eq!(r.status, 500, "{}", r.text());
        assert!(
            started.elapsed() < Duration::from_millis(50 + 450),
            "the loop was stopped after {:?}",
            started.elapsed()
        );
    });
    assert_eq!(execd.terminate(), Some(0));
}

/// A plugin that floods the log gets 20 lines a call, each cut at 2048
/// characters, and one warning that says the rest were dropped; the
/// request itself goes on.
#[test]
fn a_flooding_plugin_is_held_to_its_log_limits() {
    let yaml = format!(
        "listen: 127.0.0.1:0\n{}routes:\n  - url: /log\n    pre: [flood]\n    cmd: /bin/echo ran\n",
        plugins_yaml(&[("flood", "hostile", "    config: {mode: log}\n")])
    );
    let (_dir, path) = write_config(&yaml);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_execd"))
        .args(["run", "-c"])
        .arg(&path)
        .args(["GET", "/log"])
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ran\n");
    let from_plugin: Vec<&str> = stderr.lines().filter(|l| l.contains("flood")).collect();
    let long = from_plugin
        .iter()
        .find(|l| l.contains('é'))
        .unwrap_or_else(|| panic!("no long line in {stderr}"));
    assert_eq!(long.matches('é').count(), 2048, "{long}");
    let short = from_plugin
        .iter()
        .filter(|l| l.contains("hostile log line"))
        .count();
    assert_eq!(short, 19, "20 lines in all: {stderr}");
    let warnings = from_plugin
        .iter()
        .filter(|l| l.contains("WARN") && l.contains("plugin log limit reached"))
        .count();
    assert_eq!(warnings, 1, "{stderr}");
}

/// A plugin's log line may quote what a client sent (jwt names the
/// token's algorithm when it refuses it): a newline in it is escaped, so a
/// client cannot write a line that passes for one of execd's own.
#[test]
fn a_client_cannot_forge_log_lines_through_a_plugin() {
    let yaml = format!(
        "listen: 127.0.0.1:0\n{}routes:\n  - url: /t\n    pre: [auth]\n    cmd: /bin/echo ran\n",
        plugins_yaml(&[(
            "auth",
            "jwt",
            "    config: {secret: log-test-secret-of-at-least-32-bytes}\n"
        )])
    );
    let (_dir, path) = write_config(&yaml);
    let forged = "FORGED INFO execd::intake::http: request status=200";
    let token = format!(
        "{}.{}.c2ln",
        b64url(format!(r#"{{"alg":"x\n{forged}","typ":"JWT"}}"#).as_bytes()),
        b64url(br#"{"sub":"u"}"#)
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_execd"))
        .args(["run", "-c"])
        .arg(&path)
        .args(["GET", "/t", "-H"])
        .arg(format!("Authorization: Bearer {token}"))
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.lines().all(|l| !l.starts_with("FORGED")),
        "a forged line: {stderr}"
    );
    let refusal = stderr
        .lines()
        .find(|l| l.contains("request rejected"))
        .unwrap_or_else(|| panic!("no refusal logged: {stderr}"));
    assert!(
        refusal.contains(&format!("x\\n{forged}")) && refusal.contains(r#"plugin="auth""#),
        "{refusal}"
    );
}

/// More plugin calls at once than the instance pool holds (256): the
/// calls past the bound wait for a slot, within their deadline, and end
/// as timeouts like the rest; none fails as a trap for want of a slot.
/// (The 5 s deadline keeps all 300 in flight together, even in a debug
/// build where each instantiation is slow. The daemon runs as its own
/// process: the bound is process-wide, and would hold up the plugin calls
/// of the tests running beside this one.)
#[test]
fn more_calls_than_the_pool_holds_wait_instead_of_failing() {
    let (port, admin) = (free_port(), free_port());
    let yaml = format!(
        "listen: 127.0.0.1:{port}\nadmin: 127.0.0.1:{admin}\nlimits: {{max-concurrency: 400}}\n{}routes:\n  - url: /nap\n    pre: [nap-pool]\n    cmd: /bin/true\n",
        plugins_yaml(&[(
            "nap-pool",
            "hostile",
            "    config: {mode: sleep}\n    timeout: 5s\n"
        )])
    );
    let (_dir, path) = write_config(&yaml);
    let addr = format!("127.0.0.1:{port}");
    let execd = Binary::serve(&[], &path, &addr);
    let calls = 300;
    block_on(async {
        let answers = futures_util::future::join_all((0..calls).map(|_| {
            let addr = addr.clone();
            tokio::spawn(async move { request(&addr, "GET", "/nap", &[], b"").await.status })
        }))
        .await;
        assert!(answers.iter().all(|s| *s.as_ref().unwrap() == 500));
        let m = crate::ops::scrape(&format!("127.0.0.1:{admin}")).await;
        let count = |result: &str| {
            crate::ops::get(
                &m,
                &format!(
                    r#"execd_plugin_calls_total{{plugin="nap-pool",phase="pre",result="{result}"}}"#
                ),
            )
        };
        assert_eq!((count("timeout"), count("trap")), (calls as f64, 0.0));
    });
    assert_eq!(execd.terminate(), Some(0));
}
