//! Tools for plugin authors: run one phase of a plugin on a request read
//! from a file (`execd plugin run`), and start a new plugin crate from the
//! template (`execd plugin new`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{CallInfo, Plugin, wit};
use crate::config::{OnError, PluginSpec, Pos};

/// A request file for `execd plugin run`: the invocation, and for the post
/// phase the outcome and the reply so far. Every field may be left out.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RequestFile {
    /// `http` (default) or `amqp`.
    pub origin: Option<String>,
    pub method: Option<String>,
    pub path: Option<String>,
    pub query: Option<String>,
    pub remote_addr: Option<String>,
    pub queue: Option<String>,
    pub routing_key: Option<String>,
    pub exchange: Option<String>,
    /// Headers as `[["name", "value"], ...]` (order and repeats kept) or a map.
    pub headers: Option<Value>,
    pub params: Vec<(String, String)>,
    pub vars: Vec<(String, String)>,
    /// The body as text...
    pub body: Option<String>,
    /// ...or as a JSON value, sent as its compact text.
    pub body_json: Option<Value>,
    pub route: Option<String>,
    pub request_id: Option<String>,
    /// Post phase: how the command ended.
    pub exit_code: Option<i32>,
    pub timed_out: bool,
    pub duration_ms: Option<u64>,
    /// Post phase: the reply so far (default 200 with `stdout`).
    pub status: Option<u16>,
    pub stdout: Option<String>,
    pub reply_headers: Option<Value>,
}

fn header_list(v: &Option<Value>) -> anyhow::Result<Vec<(String, String)>> {
    match v {
        None => Ok(Vec::new()),
        Some(Value::Object(m)) => Ok(m
            .iter()
            .map(|(k, v)| {
                (
                    k.to_ascii_lowercase(),
                    v.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| v.to_string()),
                )
            })
            .collect()),
        Some(v) => serde_json::from_value(v.clone())
            .context("headers: expected a map or a list of [name, value] pairs"),
    }
}

/// Which phase `plugin run` calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Phase {
    Pre,
    Post,
}

/// Loads a plugin, runs one phase on the request file, and returns the
/// decision as JSON.
pub fn run(
    wasm: &Path,
    config: &str,
    request: &Path,
    phase: Option<Phase>,
    timeout: Duration,
    memory: u64,
) -> anyhow::Result<Value> {
    let config_value: Value = serde_json::from_str(config).context("--config is not JSON")?;
    let spec = PluginSpec {
        name: wasm
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "plugin".into()),
        path: wasm.to_path_buf(),
        config: config_value.to_string(),
        timeout,
        memory,
        on_error: OnError::Deny,
        pos: Pos::default(),
    };
    let plugin = Plugin::load(&spec)?;
    let text = std::fs::read_to_string(request)
        .with_context(|| format!("cannot read {}", request.display()))?;
    let req: RequestFile = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a request file", request.display()))?;
    let phase = match phase {
        Some(p) => p,
        None if plugin.has_pre() => Phase::Pre,
        None => Phase::Post,
    };
    let origin = match req.origin.as_deref().unwrap_or("http") {
        "http" => wit::Origin::Http(wit::HttpOrigin {
            method: req.method.clone().unwrap_or_else(|| "GET".into()),
            path: req.path.clone().unwrap_or_else(|| "/".into()),
            query: req.query.clone().unwrap_or_default(),
            remote_addr: req
                .remote_addr
                .clone()
                .unwrap_or_else(|| "127.0.0.1:1".into()),
        }),
        "amqp" => wit::Origin::Amqp(wit::AmqpOrigin {
            exchange: req.exchange.clone().unwrap_or_default(),
            routing_key: req.routing_key.clone().unwrap_or_default(),
            queue: req.queue.clone().unwrap_or_default(),
            redelivered: false,
            attempt: 1,
            reply_to: None,
            correlation_id: None,
            message_id: None,
        }),
        other => bail!("origin {other:?}: expected http or amqp"),
    };
    let query = req
        .query
        .as_deref()
        .map(|q| crate::intake::http::parse_query(q).unwrap_or_default())
        .unwrap_or_default();
    let body = match (&req.body, &req.body_json) {
        (Some(b), _) => b.clone().into_bytes(),
        (None, Some(v)) => v.to_string().into_bytes(),
        (None, None) => Vec::new(),
    };
    let inv = wit::Invocation {
        headers: header_list(&req.headers)?,
        params: req.params.clone(),
        query,
        vars: req.vars.clone(),
        body,
    };
    let route: Arc<str> = req
        .route
        .clone()
        .unwrap_or_else(|| "plugin run".into())
        .into();
    let rid: Arc<str> = req
        .request_id
        .clone()
        .unwrap_or_else(crate::ids::request_id)
        .into();
    let info = CallInfo {
        route: &route,
        request_id: &rid,
        origin,
    };
    match phase {
        Phase::Pre => {
            if !plugin.has_pre() {
                bail!("{} has no pre phase", wasm.display());
            }
            match super::block_on(plugin.call_pre(&info, &inv))? {
                wit::Decision::Continue(next) => Ok(json!({
                    "decision": "continue",
                    "invocation": invocation_json(&next),
                })),
                wit::Decision::Reply(r) => {
                    Ok(json!({"decision": "reply", "reply": reply_json(&r)}))
                }
            }
        }
        Phase::Post => {
            if !plugin.has_post() {
                bail!("{} has no post phase", wasm.display());
            }
            let outcome = wit::Outcome {
                exit_code: if req.timed_out {
                    None
                } else {
                    Some(req.exit_code.unwrap_or(0))
                },
                signal: None,
                timed_out: req.timed_out,
                duration_us: req.duration_ms.unwrap_or(10) * 1000,
                via_reply_socket: false,
                stderr_tail: String::new(),
            };
            let reply = wit::Reply {
                status: req.status.unwrap_or(200),
                headers: header_list(&req.reply_headers)?,
                body: req.stdout.clone().unwrap_or_default().into_bytes(),
            };
            let r = super::block_on(plugin.call_post(&info, &inv, &outcome, &reply))?;
            Ok(json!({"decision": "reply", "reply": reply_json(&r)}))
        }
    }
}

fn body_json(b: &[u8]) -> Value {
    match std::str::from_utf8(b) {
        Ok(s) => Value::String(s.to_string()),
        Err(_) => json!({"base64": b64(b)}),
    }
}

fn b64(b: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in b.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &x)| acc | (x as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn invocation_json(i: &wit::Invocation) -> Value {
    json!({
        "headers": i.headers,
        "params": i.params,
        "query": i.query,
        "vars": i.vars,
        "body": body_json(&i.body),
    })
}

fn reply_json(r: &wit::Reply) -> Value {
    json!({"status": r.status, "headers": r.headers, "body": body_json(&r.body)})
}

const TEMPLATE_CARGO: &str = include_str!("../../../plugins/template/Cargo.toml");
const TEMPLATE_LIB: &str = include_str!("../../../plugins/template/src/lib.rs");

/// Where the SDK was when this execd was built; used when it still exists.
fn built_in_sdk() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/sdk");
    p.is_dir().then(|| p.canonicalize().unwrap_or(p))
}

/// Creates `dir/name` from the plugin template. `sdk` is the Cargo
/// dependency spec of the SDK (e.g. `{ path = "../execd/plugins/sdk" }`).
pub fn new(name: &str, dir: &Path, sdk: Option<&str>) -> anyhow::Result<PathBuf> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
    {
        bail!("{name:?}: a plugin name may hold lower-case letters, digits, `-` and `_`");
    }
    let sdk = match sdk {
        Some(s) => s.to_string(),
        None => match built_in_sdk() {
            Some(p) => format!("{{ path = {:?} }}", p.display().to_string()),
            None => bail!(
                "the plugin SDK is not where this execd was built; pass --sdk '{{ path = \"/path/to/execd/plugins/sdk\" }}'"
            ),
        },
    };
    let root = dir.join(name);
    if root.exists() {
        bail!("{} already exists", root.display());
    }
    std::fs::create_dir_all(root.join("src"))?;
    std::fs::write(
        root.join("Cargo.toml"),
        TEMPLATE_CARGO
            .replace("{{name}}", name)
            .replace("{{sdk}}", &sdk),
    )?;
    std::fs::write(
        root.join("src/lib.rs"),
        TEMPLATE_LIB.replace("{{name}}", name),
    )?;
    Ok(root)
}
