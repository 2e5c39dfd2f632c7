//! One path for both intakes: an [`Invocation`] goes through the route's pre
//! plugins, the command, and its post plugins, and comes out as a
//! [`Completed`] (a reply plus how the command ended) or a [`Failure`].
//!
//! Nothing here knows HTTP framing or AMQP; statuses are plain numbers that
//! the HTTP intake sends and the AMQP intake uses for RPC replies.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::config::{CommandSpec, OnError, OutputMode, Part, PayloadTo, Placeholder};
use crate::plugin::{CallInfo, Plugins, wit};
use crate::problem;
use crate::runner::{self, RunResult, RunSpec, Stdin};

/// One request or message, transport-neutral.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// Route or consumer name.
    pub route: Arc<str>,
    pub request_id: Arc<str>,
    pub origin: Origin,
    /// Headers in arrival order, names lower-case for HTTP.
    pub headers: Vec<(String, String)>,
    /// `{param}` values from the url.
    pub params: Vec<(String, String)>,
    /// Decoded query parameters in order.
    pub query: Vec<(String, String)>,
    /// Variables set by plugins.
    pub vars: Vec<(String, String)>,
    pub body: Bytes,
}

/// Where an invocation came from.
#[derive(Debug, Clone)]
pub enum Origin {
    Http(HttpOrigin),
    Amqp(AmqpOrigin),
}

#[derive(Debug, Clone)]
pub struct HttpOrigin {
    pub method: String,
    pub path: String,
    /// Raw query string, without `?`.
    pub query: String,
    /// `ip:port`, or `unix`.
    pub remote_addr: String,
    /// `HTTP/1.1` and the like.
    pub protocol: &'static str,
}

#[derive(Debug, Clone, Default)]
pub struct AmqpOrigin {
    pub exchange: String,
    pub routing_key: String,
    pub queue: String,
    pub redelivered: bool,
    pub attempt: u32,
    pub reply_to: Option<String>,
    pub correlation_id: Option<String>,
    pub message_id: Option<String>,
    pub content_type: Option<String>,
}

impl Invocation {
    /// The first header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// An answer: HTTP response or AMQP RPC reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A finished invocation.
#[derive(Debug, Clone)]
pub struct Completed {
    pub reply: Reply,
    /// How the command ended; `None` when a pre plugin answered and the
    /// command never ran.
    pub run: Option<RunResult>,
}

/// Why an invocation produced no command outcome.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// The request cannot be turned into a command (400).
    #[error("{0}")]
    BadRequest(String),
    /// The payload does not fit where the route puts it (413).
    #[error("{0}")]
    TooLarge(String),
    /// The command could not start (500).
    #[error(transparent)]
    Spawn(#[from] runner::SpawnError),
    /// A plugin failed and its policy is to deny (500).
    #[error("plugin {plugin} failed: {detail}")]
    Plugin { plugin: String, detail: String },
    /// Setting up the call failed on execd's side (500).
    #[error("{0}")]
    Internal(String),
}

impl Failure {
    /// The problem+json reply for an HTTP client.
    pub fn to_reply(&self, request_id: &str) -> Reply {
        match self {
            Failure::BadRequest(d) => {
                problem::reply(400, "bad-request", "Bad request", d, request_id)
            }
            Failure::TooLarge(d) => {
                problem::reply(413, "payload-too-large", "Payload too large", d, request_id)
            }
            Failure::Spawn(e) => {
                tracing::error!(request_id, error = %e, "command could not start");
                problem::reply(
                    500,
                    "command-not-started",
                    "Command could not start",
                    "the command could not be started; see the execd log",
                    request_id,
                )
            }
            Failure::Plugin { plugin, .. } => problem::reply(
                500,
                "plugin-failed",
                "Plugin failed",
                &format!("plugin {plugin} failed; see the execd log"),
                request_id,
            ),
            Failure::Internal(d) => {
                tracing::error!(request_id, error = %d, "internal error");
                problem::reply(
                    500,
                    "internal",
                    "Internal error",
                    "see the execd log",
                    request_id,
                )
            }
        }
    }
}

/// The largest single argv element Linux accepts (MAX_ARG_STRLEN, with its
/// terminating NUL).
const MAX_ARG: usize = 128 * 1024 - 1;

/// Runs an invocation through a route's or consumer's pre plugins, command
/// and post plugins.
pub async fn execute(
    command: &CommandSpec,
    plugins: &Arc<Plugins>,
    inv: Invocation,
    abort: &CancellationToken,
) -> Result<Completed, Failure> {
    execute_with_stdin(command, plugins, inv, None, abort).await
}

/// Like [`execute`], with the command's stdin fed from `stdin` as chunks
/// arrive (a streamed request body) instead of from `inv.body`. Only for
/// commands without pre plugins, which would need the whole body.
pub async fn execute_with_stdin(
    command: &CommandSpec,
    plugins: &Arc<Plugins>,
    mut inv: Invocation,
    stdin: Option<tokio::sync::mpsc::Receiver<Bytes>>,
    abort: &CancellationToken,
) -> Result<Completed, Failure> {
    if !command.pre.is_empty() {
        match run_pre(&command.pre, plugins, inv).await? {
            PreResult::Continue(next) => inv = *next,
            // A pre plugin answered: that answer is final; post plugins
            // shape command outcomes, and there is none.
            PreResult::Answer(reply) => return Ok(Completed { reply, run: None }),
        }
    }
    let body_file = match command.payload_to {
        PayloadTo::File => Some(BodyFile::write(
            &inv.body,
            command.lockdown.as_ref().and_then(|l| l.uid),
        )?),
        _ => None,
    };
    let mut spec = build_spec(
        command,
        &inv,
        body_file.as_ref().map(|f| f.path.clone()),
        abort,
    )?;
    if let Some(rx) = stdin {
        spec.stdin = Stdin::Stream(rx);
    }
    // The reply socket, when the command offers one (`reply-socket: true`).
    let socket = crate::reply::offer(command, &inv, &mut spec)?;
    let run = match runner::run(spec).await {
        Ok(run) => run,
        Err(e) => {
            crate::metrics::inc(
                "execd_command_spawn_failures_total",
                &[("route", &inv.route)],
            );
            return Err(e.into());
        }
    };
    drop(body_file);
    record_run(&inv.route, &run);
    let (reply, via_reply_socket) = match socket {
        Some(s) => crate::reply::settle(command, &inv, &run, s.finish().await),
        None => (shape_reply(command, &inv, &run), false),
    };
    if command.post.is_empty() {
        return Ok(Completed {
            reply,
            run: Some(run),
        });
    }
    let reply = run_post(&command.post, plugins, &inv, &run, reply, via_reply_socket).await?;
    Ok(Completed {
        reply,
        run: Some(run),
    })
}

fn record_run(route: &str, run: &RunResult) {
    use crate::metrics;
    let code = match (run.exit_code, run.signal) {
        (Some(c), _) => c.to_string(),
        (None, Some(s)) => format!("signal {s}"),
        _ => "unknown".into(),
    };
    metrics::inc(
        "execd_command_exits_total",
        &[("route", route), ("code", &code)],
    );
    metrics::observe(
        "execd_command_duration_seconds",
        &[("route", route)],
        run.duration.as_secs_f64(),
    );
    if run.timed_out {
        metrics::inc("execd_command_timeouts_total", &[("route", route)]);
    }
    for (killed, reason) in [
        (run.timed_out, "timeout"),
        (run.output_overflow, "output-cap"),
        (run.aborted, "shutdown"),
    ] {
        if killed {
            metrics::inc(
                "execd_command_kills_total",
                &[("route", route), ("reason", reason)],
            );
        }
    }
}

fn record_plugin_call<T, E: std::fmt::Display>(
    plugin: &str,
    phase: &str,
    started: std::time::Instant,
    r: &Result<T, E>,
) {
    let result = match r {
        Ok(_) => "ok".to_string(),
        Err(e) => {
            let text = e.to_string();
            if text.starts_with("timed out") {
                "timeout".into()
            } else if text.starts_with("trapped") {
                "trap".into()
            } else {
                "error".into()
            }
        }
    };
    crate::metrics::inc(
        "execd_plugin_calls_total",
        &[("plugin", plugin), ("phase", phase), ("result", &result)],
    );
    crate::metrics::observe(
        "execd_plugin_call_duration_seconds",
        &[("plugin", plugin), ("phase", phase)],
        started.elapsed().as_secs_f64(),
    );
}

/// A plugin call whose host side panicked (a bug: the guest's own faults
/// are traps, reported as plugin failures) fails the request or message as
/// an internal error instead of unwinding through its task.
async fn guarded<T>(call: impl std::future::Future<Output = T>) -> Result<T, Failure> {
    use futures_util::FutureExt;
    std::panic::AssertUnwindSafe(call)
        .catch_unwind()
        .await
        .map_err(|_| Failure::Internal("plugin call panicked".into()))
}

enum PreResult {
    Continue(Box<Invocation>),
    Answer(Reply),
}

async fn run_pre(
    names: &[String],
    plugins: &Plugins,
    mut inv: Invocation,
) -> Result<PreResult, Failure> {
    let info = CallInfo {
        route: &inv.route.clone(),
        request_id: &inv.request_id.clone(),
        origin: wit_origin(&inv.origin),
    };
    let mut current = wit_invocation(&inv);
    for name in names {
        let plugin = plugins
            .get(name)
            .ok_or_else(|| Failure::Internal(format!("plugin {name} is not loaded")))?;
        let started = std::time::Instant::now();
        let result = guarded(plugin.call_pre(&info, &current)).await?;
        record_plugin_call(name, "pre", started, &result);
        match result {
            Ok(wit::Decision::Continue(next)) => current = next,
            Ok(wit::Decision::Reply(r)) => {
                return Ok(PreResult::Answer(from_wit_reply(r, &inv.request_id)));
            }
            Err(e) => match plugin.on_error() {
                OnError::Deny => {
                    tracing::error!(plugin = %name, route = %inv.route, request_id = %inv.request_id, error = %e, "pre plugin failed; denying");
                    return Err(Failure::Plugin {
                        plugin: name.clone(),
                        detail: e.to_string(),
                    });
                }
                OnError::Skip => {
                    tracing::warn!(plugin = %name, route = %inv.route, request_id = %inv.request_id, error = %e, "pre plugin failed; skipped (on-error: skip)");
                }
            },
        }
    }
    inv.headers = current.headers;
    inv.params = current.params;
    inv.query = current.query;
    inv.vars = current.vars;
    inv.body = Bytes::from(current.body);
    Ok(PreResult::Continue(Box::new(inv)))
}

async fn run_post(
    names: &[String],
    plugins: &Plugins,
    inv: &Invocation,
    run: &RunResult,
    reply: Reply,
    via_reply_socket: bool,
) -> Result<Reply, Failure> {
    let info = CallInfo {
        route: &inv.route,
        request_id: &inv.request_id,
        origin: wit_origin(&inv.origin),
    };
    let winv = wit_invocation(inv);
    let outcome = wit::Outcome {
        exit_code: run.exit_code,
        signal: run.signal,
        timed_out: run.timed_out,
        duration_us: run.duration.as_micros() as u64,
        via_reply_socket,
        stderr_tail: String::from_utf8_lossy(&run.stderr_tail).into_owned(),
    };
    let mut current = wit::Reply {
        status: reply.status,
        headers: reply.headers,
        body: reply.body.to_vec(),
    };
    for name in names {
        let plugin = plugins
            .get(name)
            .ok_or_else(|| Failure::Internal(format!("plugin {name} is not loaded")))?;
        let started = std::time::Instant::now();
        let result = guarded(plugin.call_post(&info, &winv, &outcome, &current)).await?;
        record_plugin_call(name, "post", started, &result);
        match result {
            Ok(next) => current = next,
            Err(e) => match plugin.on_error() {
                OnError::Deny => {
                    tracing::error!(plugin = %name, route = %inv.route, request_id = %inv.request_id, error = %e, "post plugin failed; denying");
                    return Err(Failure::Plugin {
                        plugin: name.clone(),
                        detail: e.to_string(),
                    });
                }
                OnError::Skip => {
                    tracing::warn!(plugin = %name, route = %inv.route, request_id = %inv.request_id, error = %e, "post plugin failed; skipped (on-error: skip)");
                }
            },
        }
    }
    Ok(from_wit_reply(current, &inv.request_id))
}

/// The plugin-facing view of where an invocation came from.
pub fn wit_origin(origin: &Origin) -> wit::Origin {
    match origin {
        Origin::Http(h) => wit::Origin::Http(wit::HttpOrigin {
            method: h.method.clone(),
            path: h.path.clone(),
            query: h.query.clone(),
            remote_addr: h.remote_addr.clone(),
        }),
        Origin::Amqp(a) => wit::Origin::Amqp(wit::AmqpOrigin {
            exchange: a.exchange.clone(),
            routing_key: a.routing_key.clone(),
            queue: a.queue.clone(),
            redelivered: a.redelivered,
            attempt: a.attempt,
            reply_to: a.reply_to.clone(),
            correlation_id: a.correlation_id.clone(),
            message_id: a.message_id.clone(),
        }),
    }
}

/// The plugin-facing copy of an invocation.
pub fn wit_invocation(inv: &Invocation) -> wit::Invocation {
    wit::Invocation {
        headers: inv.headers.clone(),
        params: inv.params.clone(),
        query: inv.query.clone(),
        vars: inv.vars.clone(),
        body: inv.body.to_vec(),
    }
}

/// A plugin's reply as execd sends it: a status out of range becomes 500,
/// and a problem+json body gains the request id like execd's own problems.
fn from_wit_reply(r: wit::Reply, request_id: &str) -> Reply {
    let mut reply = Reply {
        // 1xx are interim answers: no final response can have one.
        status: if (200..=599).contains(&r.status) {
            r.status
        } else {
            500
        },
        headers: r
            .headers
            .into_iter()
            .filter(|(name, value)| {
                // A control character would end the header line early (a
                // newline could start a header of the plugin's choosing);
                // HTTP would drop it anyway, AMQP and `execd run` would not.
                let ok = !name.is_empty()
                    && name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
                    && !crate::reply::has_control_char(value);
                if !ok {
                    tracing::warn!(request_id, header = %name.escape_debug(), "dropped a header the plugin set: a bad name or a control character in its value");
                }
                ok
            })
            .collect(),
        body: Bytes::from(r.body),
    };
    let is_problem = reply
        .header("content-type")
        .is_some_and(|t| t.starts_with(problem::CONTENT_TYPE));
    if is_problem && !reply.body.windows(12).any(|w| w == b"\"request_id\"") {
        reply = problem::with_field(reply, "request_id", request_id);
    }
    reply
}

/// argv, environment and stdin for one invocation.
pub fn build_spec(
    command: &CommandSpec,
    inv: &Invocation,
    body_file: Option<PathBuf>,
    abort: &CancellationToken,
) -> Result<RunSpec, Failure> {
    let mut argv = Vec::with_capacity(command.argv.len());
    for word in &command.argv {
        argv.push(render_word(word, inv, body_file.as_deref())?);
    }
    let env = environment(command, inv, body_file.as_deref())?;
    let stdin = match command.payload_to {
        PayloadTo::Stdin if !inv.body.is_empty() => Stdin::Bytes(inv.body.clone()),
        _ => Stdin::Null,
    };
    Ok(RunSpec {
        program: command.program.clone(),
        argv,
        wd: command.wd.clone(),
        env,
        stdin,
        timeout: command.timeout,
        kill_grace: command.kill_grace,
        max_output: command.max_output,
        route: inv.route.clone(),
        request_id: inv.request_id.clone(),
        abort: abort.clone(),
        lockdown: command.lockdown.clone(),
    })
}

fn render_word(
    word: &crate::config::Word,
    inv: &Invocation,
    body_file: Option<&std::path::Path>,
) -> Result<OsString, Failure> {
    let mut out: Vec<u8> = Vec::new();
    for part in &word.0 {
        match part {
            Part::Lit(s) => out.extend_from_slice(s.as_bytes()),
            Part::Hole(ph, default) => {
                let value: Option<&[u8]> = match ph {
                    Placeholder::Body => Some(&inv.body),
                    Placeholder::BodyFile => body_file.map(|p| p.as_os_str().as_encoded_bytes()),
                    Placeholder::RequestId => Some(inv.request_id.as_bytes()),
                    Placeholder::Query(n) => inv
                        .query
                        .iter()
                        .find(|(k, _)| k == n)
                        .map(|(_, v)| v.as_bytes()),
                    Placeholder::Header(n) => inv.header(n).map(str::as_bytes),
                    Placeholder::Path(n) => inv
                        .params
                        .iter()
                        .find(|(k, _)| k == n)
                        .map(|(_, v)| v.as_bytes()),
                    Placeholder::Var(n) => inv
                        .vars
                        .iter()
                        .find(|(k, _)| k == n)
                        .map(|(_, v)| v.as_bytes()),
                };
                match (value, default) {
                    (Some(v), _) => out.extend_from_slice(v),
                    (None, Some(d)) => out.extend_from_slice(d.as_bytes()),
                    (None, None) => {
                        return Err(Failure::BadRequest(format!(
                            "{} is required by this route and was not given",
                            describe(ph)
                        )));
                    }
                }
            }
        }
    }
    if out.contains(&0) {
        return Err(Failure::BadRequest(
            "a value passed as a command argument contains a NUL byte, which no argument can hold"
                .into(),
        ));
    }
    if out.len() > MAX_ARG {
        return Err(Failure::TooLarge(format!(
            "a command argument would be {} bytes; the system limit for one argument is {MAX_ARG} bytes (use payload-to: stdin or file for large payloads)",
            out.len()
        )));
    }
    Ok(OsString::from_vec(out))
}

fn describe(ph: &Placeholder) -> String {
    match ph {
        Placeholder::Query(n) => format!("query parameter `{n}`"),
        Placeholder::Header(n) => format!("header `{n}`"),
        Placeholder::Path(n) => format!("path parameter `{n}`"),
        Placeholder::Var(n) => format!("variable `{n}`"),
        other => other.to_string(),
    }
}

/// The command's whole environment: PATH, request metadata in CGI names
/// (RFC 3875), execd's own variables, then the route's `env`. Nothing of
/// the daemon's environment but PATH is passed on.
fn environment(
    command: &CommandSpec,
    inv: &Invocation,
    body_file: Option<&std::path::Path>,
) -> Result<Vec<(OsString, OsString)>, Failure> {
    let mut env: Vec<(OsString, OsString)> = Vec::with_capacity(24 + inv.headers.len());
    let mut set = |k: &str, v: &str| env.push((k.into(), v.into()));
    set("PATH", &daemon_path());
    set("EXECD_REQUEST_ID", &inv.request_id);
    set("EXECD_ROUTE", &inv.route);
    match &inv.origin {
        Origin::Http(h) => {
            set("GATEWAY_INTERFACE", "CGI/1.1");
            set(
                "SERVER_SOFTWARE",
                concat!("execd/", env!("CARGO_PKG_VERSION")),
            );
            set("SERVER_PROTOCOL", h.protocol);
            set("REQUEST_METHOD", &h.method);
            set("PATH_INFO", &h.path);
            set("SCRIPT_NAME", "");
            set("QUERY_STRING", &h.query);
            let uri = if h.query.is_empty() {
                h.path.clone()
            } else {
                format!("{}?{}", h.path, h.query)
            };
            set("REQUEST_URI", &uri);
            match h.remote_addr.rsplit_once(':') {
                Some((ip, port)) => {
                    set(
                        "REMOTE_ADDR",
                        ip.trim_start_matches('[').trim_end_matches(']'),
                    );
                    set("REMOTE_PORT", port);
                }
                None => set("REMOTE_ADDR", &h.remote_addr),
            }
            // A streamed body is not in `inv.body`; its declared length is
            // the truth then.
            if !inv.body.is_empty() {
                set("CONTENT_LENGTH", &inv.body.len().to_string());
            } else if let Some(len) = inv.header("content-length") {
                set("CONTENT_LENGTH", len);
            }
            if let Some(ct) = inv.header("content-type") {
                set("CONTENT_TYPE", ct);
            }
            for (name, value) in merged_headers(&inv.headers) {
                // HTTP_PROXY from a client's `Proxy:` header would redirect
                // the script's own outbound requests (httpoxy).
                if name == "HTTP_PROXY"
                    || name == "HTTP_CONTENT_TYPE"
                    || name == "HTTP_CONTENT_LENGTH"
                {
                    continue;
                }
                set(&name, &value);
            }
        }
        Origin::Amqp(a) => {
            set("AMQP_EXCHANGE", &a.exchange);
            set("AMQP_ROUTING_KEY", &a.routing_key);
            set("AMQP_QUEUE", &a.queue);
            set("AMQP_REDELIVERED", if a.redelivered { "1" } else { "0" });
            set("AMQP_ATTEMPT", &a.attempt.to_string());
            for (k, v) in [
                ("AMQP_REPLY_TO", &a.reply_to),
                ("AMQP_CORRELATION_ID", &a.correlation_id),
                ("AMQP_MESSAGE_ID", &a.message_id),
                ("AMQP_CONTENT_TYPE", &a.content_type),
            ] {
                if let Some(v) = v {
                    set(k, v);
                }
            }
            for (name, value) in &inv.headers {
                set(&format!("AMQP_HEADER_{}", env_suffix(name)), value);
            }
        }
    }
    for (k, v) in &inv.params {
        set(&format!("EXECD_PARAM_{}", env_suffix(k)), v);
    }
    for (k, v) in &inv.vars {
        set(&format!("EXECD_VAR_{}", env_suffix(k)), v);
    }
    // Everything so far comes from the request (or a plugin): a value the
    // kernel cannot pass would fail the spawn, so it is the request's 400
    // or 413, naming the variable, rather than a failure of the daemon.
    for (name, value) in &env {
        check_env(name, value)?;
    }
    if let Some(p) = body_file {
        env.push(("EXECD_BODY_FILE".into(), p.as_os_str().to_owned()));
    }
    if command.payload_to == PayloadTo::Env {
        if inv.body.contains(&0) {
            return Err(Failure::BadRequest(
                "the body contains a NUL byte and cannot be passed in an environment variable"
                    .into(),
            ));
        }
        // The limit holds for the whole `NAME=value` string.
        let room = MAX_ARG.saturating_sub(command.payload_env.len() + 1);
        if inv.body.len() > room {
            return Err(Failure::TooLarge(format!(
                "the body is {} bytes; the environment variable {} holds at most {room} bytes (use payload-to: stdin or file)",
                inv.body.len(),
                command.payload_env
            )));
        }
        env.push((
            command.payload_env.clone().into(),
            OsString::from_vec(inv.body.to_vec()),
        ));
    }
    for (k, v) in &command.env {
        env.push((k.into(), v.into()));
    }
    Ok(env)
}

/// Refuses what `execve` cannot pass as `name=value`: a NUL byte, or more
/// than the system's limit for one string.
fn check_env(name: &OsString, value: &OsString) -> Result<(), Failure> {
    use std::os::unix::ffi::OsStrExt;
    let (name, value) = (name.as_bytes(), value.as_bytes());
    let shown = String::from_utf8_lossy(name);
    if value.contains(&0) {
        return Err(Failure::BadRequest(format!(
            "the environment variable {shown} would hold a NUL byte, which no environment variable can"
        )));
    }
    let len = name.len() + 1 + value.len();
    if len > MAX_ARG {
        return Err(Failure::TooLarge(format!(
            "the environment variable {shown} would be {len} bytes; the system limit for one is {MAX_ARG} bytes"
        )));
    }
    Ok(())
}

/// `x-forwarded-for` -> `HTTP_X_FORWARDED_FOR`; repeated headers joined
/// with `, ` as CGI asks.
fn merged_headers(headers: &[(String, String)]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::with_capacity(headers.len());
    for (k, v) in headers {
        let name = format!("HTTP_{}", env_suffix(k));
        match out.iter_mut().find(|(n, _)| *n == name) {
            Some((_, existing)) => {
                existing.push_str(", ");
                existing.push_str(v);
            }
            None => out.push((name, v.clone())),
        }
    }
    out
}

/// Upper-cased, with anything but letters and digits as `_`.
pub fn env_suffix(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

fn daemon_path() -> String {
    static PATH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".to_string())
    })
    .clone()
}

/// Turns a command's ending into the reply the route promises.
pub fn shape_reply(command: &CommandSpec, inv: &Invocation, run: &RunResult) -> Reply {
    let rid = &inv.request_id;
    let shape = &command.reply;
    if run.timed_out {
        return problem::reply(
            504,
            "command-timeout",
            "Command timed out",
            &format!(
                "the command did not finish within {:?} and was stopped",
                command.timeout
            ),
            rid,
        );
    }
    if run.aborted {
        return problem::reply(
            503,
            "shutting-down",
            "Shutting down",
            "execd is shutting down; the command was stopped",
            rid,
        );
    }
    if run.output_overflow {
        return problem::reply(
            502,
            "output-too-large",
            "Output too large",
            &format!(
                "the command wrote more than max-output ({} bytes) and was stopped",
                command.max_output
            ),
            rid,
        );
    }
    let status = match run.exit_code {
        Some(0) => Some(shape.status),
        Some(code) => shape.exit_status.get(&code).copied(),
        None => None,
    };
    let Some(status) = status else {
        let how = match (run.exit_code, run.signal) {
            (Some(c), _) => format!("the command exited with code {c}"),
            (None, Some(s)) => format!("the command was killed by signal {s}"),
            _ => "the command failed".to_string(),
        };
        let mut reply = problem::reply(
            shape.failure_status,
            "command-failed",
            "Command failed",
            &how,
            rid,
        );
        if command.expose_stderr {
            reply = problem::with_field(
                reply,
                "stderr",
                String::from_utf8_lossy(&run.stderr_tail).into_owned(),
            );
        }
        if let Some(c) = run.exit_code {
            reply = problem::with_field(reply, "exit_code", c);
        }
        return reply;
    };
    match command.output {
        OutputMode::Raw => Reply {
            status,
            headers: vec![("content-type".into(), shape.content_type.clone())],
            body: run.stdout.clone(),
        },
        OutputMode::Cgi => match parse_cgi(&run.stdout, status, &shape.content_type) {
            Ok(r) => r,
            Err(detail) => {
                tracing::warn!(route = %inv.route, request_id = %rid, "bad CGI output: {detail}");
                problem::reply(502, "bad-cgi-output", "Bad CGI output", &detail, rid)
            }
        },
    }
}

/// Parses CGI output: header lines, a blank line, the body. `Status: 404
/// Not Found` sets the status; `Location` without a status means 302.
pub fn parse_cgi(out: &Bytes, default_status: u16, default_type: &str) -> Result<Reply, String> {
    let (head_end, body_start) = find_blank_line(out).ok_or(
        "no blank line ends the header block (a CGI script prints headers, an empty line, then the body)",
    )?;
    let head = std::str::from_utf8(&out[..head_end])
        .map_err(|_| "the header block is not UTF-8".to_string())?;
    let mut status = None;
    let mut headers = Vec::new();
    let mut has_type = false;
    let mut has_location = false;
    for line in head.split('\n') {
        let line = line.trim_end_matches('\r');
        if line.is_empty() {
            continue;
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("header line {line:?} has no `:`"))?;
        let name = name.trim();
        let value = value.trim();
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!("bad header name {name:?}"));
        }
        if value.bytes().any(|b| b < 0x20 && b != b'\t') {
            return Err(format!("header {name} has a control character"));
        }
        if name.eq_ignore_ascii_case("status") {
            let code = value.split_whitespace().next().unwrap_or("");
            let code: u16 = code
                .parse()
                .ok()
                .filter(|c| (200..=599).contains(c))
                .ok_or_else(|| format!("bad Status header {value:?}"))?;
            status = Some(code);
            continue;
        }
        if name.eq_ignore_ascii_case("content-type") {
            has_type = true;
        }
        if name.eq_ignore_ascii_case("location") {
            has_location = true;
        }
        headers.push((name.to_ascii_lowercase(), value.to_string()));
    }
    if !has_type {
        headers.push(("content-type".into(), default_type.to_string()));
    }
    let status = status.unwrap_or(if has_location { 302 } else { default_status });
    Ok(Reply {
        status,
        headers,
        body: out.slice(body_start..),
    })
}

fn find_blank_line(b: &[u8]) -> Option<(usize, usize)> {
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\n' {
            if b.get(i + 1) == Some(&b'\n') {
                return Some((i, i + 2));
            }
            if b.get(i + 1) == Some(&b'\r') && b.get(i + 2) == Some(&b'\n') {
                return Some((i, i + 3));
            }
        }
        i += 1;
    }
    None
}

/// A private temporary file holding the payload; removed when dropped.
struct BodyFile {
    path: PathBuf,
}

impl BodyFile {
    /// Writes the body; `owner` is the uid the command runs as, so it can
    /// read its own (0600) file.
    fn write(body: &[u8], owner: Option<u32>) -> Result<Self, Failure> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let name = format!("execd-body-{}", crate::ids::random_hex(16));
        let path = std::env::temp_dir().join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| {
                Failure::Internal(format!("cannot create body file {}: {e}", path.display()))
            })?;
        f.write_all(body)
            .map_err(|e| Failure::Internal(format!("cannot write body file: {e}")))?;
        if let Some(uid) = owner {
            std::os::unix::fs::fchown(&f, Some(uid), None).map_err(|e| {
                Failure::Internal(format!("cannot hand the body file to uid {uid}: {e}"))
            })?;
        }
        Ok(BodyFile { path })
    }
}

impl Drop for BodyFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgi_output_sets_status_and_headers() {
        let out = Bytes::from_static(
            b"Status: 404 Not Found\r\nX-A: 1\r\nContent-Type: text/html\r\n\r\n<p>no</p>",
        );
        let r = parse_cgi(&out, 200, "text/plain").unwrap();
        assert_eq!(r.status, 404);
        assert_eq!(r.header("x-a"), Some("1"));
        assert_eq!(r.header("content-type"), Some("text/html"));
        assert_eq!(&r.body[..], b"<p>no</p>");
        let r = parse_cgi(&Bytes::from_static(b"Location: /x\n\n"), 200, "text/plain").unwrap();
        assert_eq!(r.status, 302);
        assert!(parse_cgi(&Bytes::from_static(b"just a body"), 200, "t").is_err());
        assert!(parse_cgi(&Bytes::from_static(b"Status: abc\n\n"), 200, "t").is_err());
    }

    #[test]
    fn header_names_become_cgi_names() {
        let h = vec![
            ("x-forwarded-for".to_string(), "a".to_string()),
            ("X-Forwarded-For".to_string(), "b".to_string()),
        ];
        assert_eq!(
            merged_headers(&h),
            vec![("HTTP_X_FORWARDED_FOR".to_string(), "a, b".to_string())]
        );
    }
}
