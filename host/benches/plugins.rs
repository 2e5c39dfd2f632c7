//! Per-call cost of plugins on the real host: a fresh instance per call,
//! as in production. `cargo bench -p execd --bench plugins` prints µs per
//! call for one plugin and for a chain of three.
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
    let hostile_ok =
        Plugin::load(&spec("noop", "hostile", serde_json::json!({"mode": "ok"}))).unwrap();

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
    async fn call(p: &Plugin, info: &CallInfo<'_>, inv: &wit::Invocation) -> wit::Invocation {
        match p.call_pre(info, inv).await.unwrap() {
            wit::Decision::Continue(next) => next,
            wit::Decision::Reply(r) => panic!("plugin {} answered {}", p.spec.name, r.status),
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (info, inv) = (&info, &inv);
    let (api_key, json_map, hostile_ok) = (&api_key, &json_map, &hostile_ok);
    let (noop, one, chain) = rt.block_on(async {
        let noop = measure(rounds, per_round, || async move {
            call(hostile_ok, info, inv).await;
        })
        .await;
        let one = measure(rounds, per_round, || async move {
            call(api_key, info, inv).await;
        })
        .await;
        let chain = measure(rounds, per_round, || async move {
            let a = call(api_key, info, inv).await;
            let b = call(json_map, info, &a).await;
            call(hostile_ok, info, &b).await;
        })
        .await;
        (noop, one, chain)
    });
    println!("plugin call, fresh instance per call (median of {rounds} x {per_round}):");
    println!("  no-op plugin (hostile mode ok)   {noop:8.2} µs/call");
    println!("  api-key                          {one:8.2} µs/call");
    println!(
        "  chain api-key -> json-map -> ok  {chain:8.2} µs/chain ({:.2} µs/plugin)",
        chain / 3.0
    );
}
