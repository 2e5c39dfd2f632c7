//! Per-call cost of plugins on the real host: a fresh instance per call,
//! as in production. `cargo bench -p execd --bench plugins` prints µs per
//! call for one plugin, for the chain of three a typical route runs (auth
//! and payload mapping before the command, the reply's shape after it),
//! for the two plugins that read the clock, and for a plugin that imports
//! all of WASI.
//!
//! Needs the plugins built (`make plugins`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use execd::config::{OnError, PluginSpec, Pos};
use execd::plugin::{CallInfo, Plugin, wit};

fn spec(name: &str, file: &str, config: serde_json::Value) -> PluginSpec {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../plugins/dist")
        .join(format!("{file}.wasm"));
    assert!(
        path.is_file(),
        "{} is missing: run `make plugins`",
        path.display()
    );
    PluginSpec {
        name: name.into(),
        path,
        config: config.to_string(),
        timeout: Duration::from_millis(100),
        memory: 16 * 1024 * 1024,
        on_error: OnError::Deny,
        pos: Pos::default(),
    }
}

/// Median of `rounds` batches of `per_round` awaited calls, in µs per
/// call: awaited in one task, as the daemon's request tasks do.
async fn measure<F, Fut>(rounds: usize, per_round: usize, mut f: F) -> f64
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for _ in 0..per_round {
        f().await;
    }
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        for _ in 0..per_round {
            f().await;
        }
        samples.push(t.elapsed().as_secs_f64() * 1e6 / per_round as f64);
    }
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    samples[samples.len() / 2]
}

/// Runs a plugin's pre phase and returns the invocation it goes on with.
async fn call(p: &Plugin, info: &CallInfo<'_>, inv: &wit::Invocation) -> wit::Invocation {
    match p.call_pre(info, inv).await.unwrap() {
        wit::Decision::Continue(next) => next,
        wit::Decision::Reply(r) => panic!("plugin {} answered {}", p.spec.name, r.status),
    }
}

/// [`measure`] of one plugin's pre phase on `inv`, in µs per call.
async fn per_call(
    rounds: usize,
    per_round: usize,
    p: &Plugin,
    info: &CallInfo<'_>,
    inv: &wit::Invocation,
) -> f64 {
    measure(rounds, per_round, || async move {
        call(p, info, inv).await;
    })
    .await
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this
    // too, without it, and then one short pass shows it still works.
    let quick = !std::env::args().any(|a| a == "--bench");
    let (rounds, per_round) = if quick { (3, 50) } else { (15, 2000) };
    let api_key = Plugin::load(&spec(
        "auth",
        "api-key",
        serde_json::json!({"keys": ["k-123"]}),
    ))
    .unwrap();
    let json_map = Plugin::load(&spec(
        "map",
        "json-map",
        serde_json::json!({"fields": {"user": {"pointer": "/user", "required": true}}}),
    ))
    .unwrap();
    let shape = Plugin::load(&spec(
        "shape",
        "response-shape",
        serde_json::json!({"status-map": {"0": 200, "*": 502}}),
    ))
    .unwrap();
    let hostile_ok =
        Plugin::load(&spec("noop", "hostile", serde_json::json!({"mode": "ok"}))).unwrap();
    // The two plugins that read the clock, with credentials they accept.
    let jwt_secret = "bench-secret-of-at-least-32-bytes!";
    let jwt = Plugin::load(&spec(
        "jwt",
        "jwt",
        serde_json::json!({"secret": jwt_secret}),
    ))
    .unwrap();
    let hook_secret = "bench-webhook-secret";
    let hmac_signature = Plugin::load(&spec(
        "sig",
        "hmac-signature",
        serde_json::json!({"secret": hook_secret}),
    ))
    .unwrap();

    let route: Arc<str> = "POST /bench".into();
    let rid: Arc<str> = "0123456789abcdef0123456789abcdef".into();
    let info = CallInfo {
        route: &route,
        request_id: &rid,
        origin: wit::Origin::Http(wit::HttpOrigin {
            method: "POST".into(),
            path: "/bench".into(),
            query: String::new(),
            remote_addr: "127.0.0.1:5000".into(),
        }),
    };
    let inv = wit::Invocation {
        headers: vec![
            ("host".into(), "localhost".into()),
            ("x-api-key".into(), "k-123".into()),
            ("content-type".into(), "application/json".into()),
        ],
        params: vec![],
        query: vec![],
        vars: vec![],
        body: br#"{"user":"ada"}"#.to_vec(),
    };
    let hs256 = |key: &str, data: &[u8]| {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.as_bytes());
        ring::hmac::sign(&key, data).as_ref().to_vec()
    };
    let claims = format!(r#"{{"sub":"u-1","exp":{}}}"#, u32::MAX);
    let signed = format!(
        "{}.{}",
        base64url(br#"{"alg":"HS256","typ":"JWT"}"#),
        base64url(claims.as_bytes())
    );
    let token = format!(
        "{signed}.{}",
        base64url(&hs256(jwt_secret, signed.as_bytes()))
    );
    let signature: String = hs256(hook_secret, &inv.body)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut inv_jwt = inv.clone();
    inv_jwt
        .headers
        .push(("authorization".into(), format!("Bearer {token}")));
    let mut inv_sig = inv.clone();
    inv_sig
        .headers
        .push(("x-hub-signature-256".into(), format!("sha256={signature}")));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (info, inv) = (&info, &inv);
    // What the command answered, for the post phase: a JSON body on stdout.
    let outcome = wit::Outcome {
        exit_code: Some(0),
        signal: None,
        timed_out: false,
        duration_us: 11_000,
        via_reply_socket: false,
        stderr_tail: String::new(),
    };
    let reply = wit::Reply {
        status: 200,
        headers: vec![("content-type".into(), "application/json".into())],
        body: br#"{"quote":42}"#.to_vec(),
    };
    let (outcome, reply) = (&outcome, &reply);
    let (api_key, json_map, shape, hostile_ok) = (&api_key, &json_map, &shape, &hostile_ok);
    let (jwt, hmac_signature, inv_jwt, inv_sig) = (&jwt, &hmac_signature, &inv_jwt, &inv_sig);
    let (noop, one, chain, jwt, sig) = rt.block_on(async {
        let noop = per_call(rounds, per_round, hostile_ok, info, inv).await;
        let one = per_call(rounds, per_round, api_key, info, inv).await;
        let chain = measure(rounds, per_round, || async move {
            let a = call(api_key, info, inv).await;
            let b = call(json_map, info, &a).await;
            let shaped = shape.call_post(info, &b, outcome, reply).await.unwrap();
            assert_eq!(shaped.status, 200, "response-shape kept the status");
        })
        .await;
        let jwt = per_call(rounds, per_round, jwt, info, inv_jwt).await;
        let sig = per_call(rounds, per_round, hmac_signature, info, inv_sig).await;
        (noop, one, chain, jwt, sig)
    });
    println!("plugin call, fresh instance per call (median of {rounds} x {per_round}):");
    println!("  api-key                          {one:8.2} µs/call");
    println!(
        "  chain api-key -> json-map -> response-shape {chain:8.2} µs/chain ({:.2} µs/plugin)",
        chain / 3.0
    );
    println!("  jwt (HS256)                      {jwt:8.2} µs/call");
    println!("  hmac-signature                   {sig:8.2} µs/call");
    println!("  no-op importing all of WASI (hostile mode ok) {noop:8.2} µs/call");
}

/// Base64url without padding, as JWTs use it.
fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &b)| acc | u32::from(b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
    out
}
