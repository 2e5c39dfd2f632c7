//! Configuration: one YAML file, read into a located node tree, validated
//! into the compiled form the daemon serves from.
//!
//! Two shapes load: the original route list (a YAML sequence of routes) and
//! the full form, a mapping with `listen`, `limits`, `routes`, `plugins` and
//! `amqp`. Every error is collected with file, line, column and field before
//! anything starts; a config that loads is a config that can be served.

pub mod amqp;
mod node;
mod read;
pub mod template;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use node::{ConfigError, ConfigErrors, Kind, Node, Pos};
pub use read::{EnvLookup, interpolate, parse_duration, parse_size};

/// A plugin's `memory` when its entry names none.
pub const DEFAULT_PLUGIN_MEMORY: u64 = 16 * 1024 * 1024;
use read::{Fields, Reader};
pub use template::{Part, Placeholder, Word};

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this was loaded from, as given.
    pub source: PathBuf,
    pub listen: Listen,
    /// The admin listener (`/metrics`, `/healthz`, `/readyz`); `None` when
    /// `admin: off`.
    pub admin: Option<SocketAddr>,
    /// Serve HTTPS on `listen` with these PEM files.
    pub tls: Option<TlsFiles>,
    pub limits: Limits,
    pub routes: Vec<Arc<Route>>,
    /// Plugins by name, in file order.
    pub plugins: Vec<PluginSpec>,
    /// The RabbitMQ worker intake; `None` when the file has no `amqp:`.
    pub amqp: Option<amqp::AmqpConfig>,
}

/// Where the HTTP intake listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Tcp(SocketAddr),
    /// `unix:/run/execd.sock`, for running behind a reverse proxy.
    Unix(PathBuf),
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Tcp(a) => write!(f, "{a}"),
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Certificate chain and private key (PEM) for HTTPS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// The server's TLS settings from the PEM files (rustls with the ring
    /// provider; TLS 1.2 and 1.3).
    pub fn server_config(&self) -> anyhow::Result<rustls::ServerConfig> {
        use anyhow::Context as _;
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&self.cert)
            .with_context(|| format!("cannot read {}", self.cert.display()))?
            .collect::<Result<_, _>>()
            .with_context(|| format!("{} is not a PEM certificate chain", self.cert.display()))?;
        if certs.is_empty() {
            anyhow::bail!("{} holds no certificate", self.cert.display());
        }
        let key = PrivateKeyDer::from_pem_file(&self.key)
            .with_context(|| format!("{} is not a PEM private key", self.key.display()))?;
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the certificate and key do not go together")
    }
}

/// Daemon-wide limits; routes may lower or raise the per-request ones.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body accepted (413 beyond).
    pub max_body: u64,
    /// Largest command output kept (an error beyond, never a truncation).
    pub max_output: u64,
    /// Commands running at once across all routes.
    pub max_concurrency: usize,
    /// Requests allowed to wait for a free slot; beyond this, 503.
    pub queue: usize,
    /// How long a request may wait in the queue before a 503.
    pub queue_timeout: Duration,
    /// Time a client has to send its request headers.
    pub header_timeout: Duration,
    /// Longest a request body may go without sending a byte (408 then).
    pub body_timeout: Duration,
    /// On shutdown, how long running commands may take to finish.
    pub drain_timeout: Duration,
    /// Between SIGTERM and SIGKILL when a command is stopped.
    pub kill_grace: Duration,
    /// Default command timeout for routes that name none.
    pub timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body: 10 * 1024 * 1024,
            max_output: 16 * 1024 * 1024,
            max_concurrency: 64,
            queue: 256,
            queue_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(30),
            kill_grace: Duration::from_secs(2),
            timeout: Duration::from_secs(30),
        }
    }
}

/// How the payload reaches the command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadTo {
    /// Written to the command's standard input.
    Stdin,
    /// Fills the `$body` placeholder (one argv element).
    Body,
    /// Put in an environment variable (`payload-env`, default `EXECD_BODY`).
    Env,
    /// Written to a private temporary file, its path in `EXECD_BODY_FILE` and
    /// `${body_file}`; removed afterwards.
    File,
    /// Not passed at all.
    None,
}

/// How the command's stdout becomes a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputMode {
    /// stdout is the body; status from the exit code.
    Raw,
    /// CGI style: `Status:` and other headers, a blank line, then the body.
    Cgi,
}

/// What to run and how; shared by routes and queue consumers.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandSpec {
    /// argv templates; the first is the program.
    pub argv: Vec<Word>,
    /// The program, resolved against PATH at load.
    pub program: PathBuf,
    /// Working directory; the config file's directory when not given.
    pub wd: PathBuf,
    /// Extra environment, on top of PATH and the request metadata.
    pub env: Vec<(String, String)>,
    pub timeout: Duration,
    pub kill_grace: Duration,
    pub payload_to: PayloadTo,
    /// Variable name for `payload-to: env`.
    pub payload_env: String,
    pub max_output: u64,
    pub output: OutputMode,
    /// Put stderr into failure responses (off: stderr only goes to the log).
    pub expose_stderr: bool,
    /// Offer the script a reply socket (`EXECD_REPLY_SOCKET`).
    pub reply_socket: bool,
    /// Plugin names, in order.
    pub pre: Vec<String>,
    pub post: Vec<String>,
    /// How the outcome becomes a reply.
    pub reply: ReplyShape,
    /// Who the command runs as and what it may use; `None` keeps the fast
    /// spawn path (no work in the child before exec).
    pub lockdown: Option<Lockdown>,
}

/// Privileges and resource limits applied in the child before exec.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lockdown {
    /// `user:`, resolved to a uid at load.
    pub uid: Option<u32>,
    /// `group:` (or the user's primary group), resolved at load.
    pub gid: Option<u32>,
    /// RLIMIT_CPU, seconds.
    pub cpu_seconds: Option<u64>,
    /// RLIMIT_AS, bytes.
    pub address_space: Option<u64>,
    /// RLIMIT_NOFILE.
    pub open_files: Option<u64>,
    /// RLIMIT_NPROC (counted per user, so it bites only with `user:`;
    /// root ignores it).
    pub processes: Option<u64>,
}

/// How a command's ending becomes a reply (HTTP response or RPC reply).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyShape {
    pub content_type: String,
    /// Status on exit 0.
    pub status: u16,
    /// Exit code -> status; codes listed here are answers (stdout is the
    /// body), not failures.
    pub exit_status: BTreeMap<i32, u16>,
    /// Status for an unlisted non-zero exit.
    pub failure_status: u16,
}

/// One HTTP route.
#[derive(Debug, Clone)]
pub struct Route {
    /// `GET /templates`, for logs and plugin context.
    pub name: String,
    pub url: UrlPattern,
    /// Upper-case method names; never empty.
    pub methods: Vec<String>,
    pub command: CommandSpec,
    pub max_body: u64,
    /// Commands of this route running at once (none: only the global cap).
    pub max_concurrency: Option<usize>,
    /// Where the route was defined, for messages.
    pub pos: Pos,
}

/// A url like `/templates/{id}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlPattern {
    pub text: String,
    pub segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Lit(String),
    Param(String),
}

impl UrlPattern {
    /// Matches a request path; returns the `{param}` values.
    pub fn matches(&self, path: &str) -> Option<Vec<(String, String)>> {
        let trimmed = path.strip_prefix('/')?;
        let trimmed = trimmed.strip_suffix('/').unwrap_or(trimmed);
        let parts: Vec<&str> = if trimmed.is_empty() {
            Vec::new()
        } else {
            trimmed.split('/').collect()
        };
        if parts.len() != self.segments.len() {
            return None;
        }
        let mut params = Vec::new();
        for (seg, part) in self.segments.iter().zip(parts) {
            match seg {
                Segment::Lit(l) if l == part => {}
                Segment::Lit(_) => return None,
                Segment::Param(name) => {
                    let value = percent_decode(part)?;
                    if value.is_empty() {
                        return None;
                    }
                    params.push((name.clone(), value));
                }
            }
        }
        Some(params)
    }
}

/// Decodes `%XX` escapes; `None` for a bad escape or non-UTF-8 result.
pub fn percent_decode(s: &str) -> Option<String> {
    if !s.contains('%') {
        return Some(s.to_string());
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// What a plugin failure does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// Fail the call closed (HTTP 500; AMQP failure policy).
    Deny,
    /// Log it and go on as if the plugin were not there.
    Skip,
}

/// A plugin entry under `plugins:`.
#[derive(Debug, Clone)]
pub struct PluginSpec {
    pub name: String,
    pub path: PathBuf,
    /// The entry's `config`, as JSON text.
    pub config: String,
    pub timeout: Duration,
    pub memory: u64,
    pub on_error: OnError,
    pub pos: Pos,
}

const METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let file: Arc<str> = path.display().to_string().into();
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: file.clone(),
            pos: Pos { line: 0, column: 0 },
            field: String::new(),
            message: format!("cannot read config file: {e}"),
        }])
    })?;
    let base = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let env = |name: &str| std::env::var(name).ok();
    from_text(path, &text, &base, &env)
}

/// Validates config text. `base` is the directory relative paths start
/// from; `env` supplies `${NAME}` values.
pub fn from_text(
    path: &Path,
    text: &str,
    base: &Path,
    env: EnvLookup<'_>,
) -> Result<Config, ConfigErrors> {
    let file: Arc<str> = path.display().to_string().into();
    let root = node::parse(&file, text).map_err(|e| ConfigErrors(vec![e]))?;
    let mut r = Reader::new(file, env);
    let base = std::fs::canonicalize(base).unwrap_or_else(|_| base.to_path_buf());
    let config = compile(&mut r, &root, path, &base);
    if r.errors.is_empty() {
        Ok(config.expect("no errors means a config"))
    } else {
        r.errors
            .sort_by_key(|e| (e.pos.line, e.pos.column, e.message.clone()));
        r.errors.dedup();
        Err(ConfigErrors(r.errors))
    }
}

fn compile(r: &mut Reader<'_>, root: &Node, path: &Path, base: &Path) -> Option<Config> {
    let mut limits = Limits::default();
    let mut listen = Listen::Tcp("127.0.0.1:8080".parse().expect("valid address"));
    let mut admin = Some("127.0.0.1:9090".parse().expect("valid address"));
    let mut tls = None;
    let mut plugins = Vec::new();
    let mut amqp_node = None;
    let routes_node = match &root.kind {
        Kind::Seq(_) => Some(root),
        Kind::Map(_) => {
            let mut f = r.map(root, "")?;
            if let Some(n) = f.get("listen")
                && let Some(l) = read_listen(r, n, "listen")
            {
                listen = l;
            }
            if let Some(n) = f.get("limits") {
                read_limits(r, n, &mut limits);
            }
            if let Some(n) = f.get("plugins") {
                plugins = read_plugins(r, n, base);
            }
            amqp_node = f.get("amqp");
            let routes = f.get("routes");
            // A worker-only file (just `amqp:`) serves no routes.
            if routes.is_none() && amqp_node.is_none() {
                r.error(root.pos, "routes", "missing field `routes`: list the HTTP routes to serve (may be empty: `routes: []`)");
            }
            if let Some(n) = f.get("admin") {
                admin = read_admin(r, n);
            }
            if let Some(n) = f.get("tls") {
                tls = read_tls(r, n, base);
                if matches!(listen, Listen::Unix(_)) {
                    r.error(
                        n.pos,
                        "tls",
                        "HTTPS needs a TCP `listen:`; behind a unix socket, the reverse proxy in front terminates TLS",
                    );
                }
            }
            f.finish(
                r,
                &[
                    "listen", "admin", "tls", "limits", "routes", "plugins", "amqp",
                ],
            );
            routes
        }
        Kind::Null => {
            r.error(
                root.pos,
                "",
                "the config file is empty; expected a list of routes or a mapping with `routes:`",
            );
            None
        }
        other => {
            r.error(
                root.pos,
                "",
                format!(
                    "expected a list of routes or a mapping with `routes:`, found {}",
                    other.describe()
                ),
            );
            None
        }
    };
    let plugin_names: Vec<&str> = plugins
        .iter()
        .map(|p: &PluginSpec| p.name.as_str())
        .collect();
    let mut routes = Vec::new();
    if let Some(node) = routes_node {
        match &node.kind {
            Kind::Seq(items) => {
                for (i, item) in items.iter().enumerate() {
                    let field = if matches!(root.kind, Kind::Seq(_)) {
                        format!("[{i}]")
                    } else {
                        format!("routes[{i}]")
                    };
                    if let Some(route) = read_route(r, item, &field, base, &limits, &plugin_names) {
                        routes.push(route);
                    }
                }
            }
            Kind::Null => {}
            other => r.error(
                node.pos,
                "routes",
                format!("expected a list of routes, found {}", other.describe()),
            ),
        }
    }
    check_overlaps(r, &routes);
    let amqp = amqp_node.and_then(|n| amqp::read_amqp(r, n, base, &limits, &plugin_names));
    Some(Config {
        source: path.to_path_buf(),
        listen,
        admin,
        tls,
        limits,
        routes: routes.into_iter().map(Arc::new).collect(),
        plugins,
        amqp,
    })
}

fn read_tls(r: &mut Reader<'_>, n: &Node, base: &Path) -> Option<TlsFiles> {
    let mut f = r.map(n, "tls")?;
    let file = |r: &mut Reader<'_>, f: &mut Fields<'_>, key: &str| -> Option<PathBuf> {
        let field = f.field(key);
        match f.get(key) {
            None => {
                r.error(n.pos, &field, format!("missing field `{key}` (a PEM file)"));
                None
            }
            Some(v) => {
                let p = base.join(r.string(v, &field)?);
                if !p.is_file() {
                    r.error(v.pos, &field, format!("no file at {}", p.display()));
                    return None;
                }
                Some(p)
            }
        }
    };
    let cert = file(r, &mut f, "cert");
    let key = file(r, &mut f, "key");
    f.finish(r, &["cert", "key"]);
    let files = TlsFiles {
        cert: cert?,
        key: key?,
    };
    // Read now, so that `execd check` catches what `serve` would refuse.
    if let Err(e) = files.server_config() {
        r.error(n.pos, "tls", format!("{e:#}"));
        return None;
    }
    Some(files)
}

fn read_admin(r: &mut Reader<'_>, n: &Node) -> Option<SocketAddr> {
    if matches!(n.kind, Kind::Bool(false)) {
        return None;
    }
    let s = r.scalar_text(n, "admin")?;
    if s == "off" {
        return None;
    }
    match s.parse() {
        Ok(a) => Some(a),
        Err(_) => {
            r.error(
                n.pos,
                "admin",
                format!("{s:?} is not an address; expected e.g. \"127.0.0.1:9090\", or off"),
            );
            None
        }
    }
}

fn read_listen(r: &mut Reader<'_>, n: &Node, field: &str) -> Option<Listen> {
    let s = r.scalar_text(n, field)?;
    if let Some(p) = s.strip_prefix("unix:") {
        return Some(Listen::Unix(PathBuf::from(p)));
    }
    match s.parse::<SocketAddr>() {
        Ok(a) => Some(Listen::Tcp(a)),
        Err(_) => {
            r.error(
                n.pos,
                field,
                format!("{s:?} is not an address; expected e.g. \"127.0.0.1:8080\", \"[::]:80\" or \"unix:/run/execd.sock\""),
            );
            None
        }
    }
}

fn read_limits(r: &mut Reader<'_>, n: &Node, limits: &mut Limits) {
    let Some(mut f) = r.map(n, "limits") else {
        return;
    };
    if let Some(v) = f.get("max-body") {
        limits.max_body = r.size(v, &f.field("max-body")).unwrap_or(limits.max_body);
    }
    if let Some(v) = f.get("max-output") {
        limits.max_output = r
            .size(v, &f.field("max-output"))
            .unwrap_or(limits.max_output);
    }
    if let Some(v) = f.get("max-concurrency") {
        limits.max_concurrency = r
            .int(v, &f.field("max-concurrency"), 1, 100_000)
            .map_or(limits.max_concurrency, |x| x as usize);
    }
    if let Some(v) = f.get("queue") {
        limits.queue = r
            .int(v, &f.field("queue"), 0, 1_000_000)
            .map_or(limits.queue, |x| x as usize);
    }
    // `true`: a deadline that 0 would make every request miss.
    for (key, slot, positive) in [
        ("queue-timeout", &mut limits.queue_timeout, false),
        ("header-timeout", &mut limits.header_timeout, true),
        ("body-timeout", &mut limits.body_timeout, true),
        ("drain-timeout", &mut limits.drain_timeout, false),
        ("kill-grace", &mut limits.kill_grace, false),
        ("timeout", &mut limits.timeout, true),
    ] {
        let Some(v) = f.get(key) else { continue };
        let d = if positive {
            r.timeout(v, &f.field(key))
        } else {
            r.duration(v, &f.field(key))
        };
        if let Some(d) = d {
            *slot = d;
        }
    }
    f.finish(
        r,
        &[
            "max-body",
            "max-output",
            "max-concurrency",
            "queue",
            "queue-timeout",
            "header-timeout",
            "body-timeout",
            "drain-timeout",
            "kill-grace",
            "timeout",
        ],
    );
}

fn read_plugins(r: &mut Reader<'_>, n: &Node, base: &Path) -> Vec<PluginSpec> {
    let mut out = Vec::new();
    let Kind::Map(entries) = &n.kind else {
        r.error(
            n.pos,
            "plugins",
            format!(
                "expected a mapping of plugin names to entries, found {}",
                n.kind.describe()
            ),
        );
        return out;
    };
    for (name, kpos, v) in entries {
        let field = format!("plugins.{name}");
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            r.error(
                *kpos,
                &field,
                "a plugin name may hold letters, digits, `-` and `_` only",
            );
            continue;
        }
        let Some(mut f) = r.map(v, &field) else {
            continue;
        };
        let path = match f.get("path") {
            Some(p) => r.string(p, &f.field("path")).map(|s| base.join(s)),
            None => {
                r.error(
                    v.pos,
                    &f.field("path"),
                    "missing field `path`: the plugin's .wasm file",
                );
                None
            }
        };
        if let (Some(p), Some(pn)) = (&path, f.get("path"))
            && !p.is_file()
        {
            r.error(
                pn.pos,
                &f.field("path"),
                format!("no plugin file at {}", p.display()),
            );
        }
        let config = f
            .get("config")
            .map(|c| interpolate_json(r, c, &f.field("config")))
            .unwrap_or(serde_json::Value::Null);
        let timeout = f
            .get("timeout")
            .and_then(|t| r.timeout(t, &f.field("timeout")))
            .unwrap_or(Duration::from_millis(100));
        let memory = f
            .get("memory")
            .and_then(|m| r.size(m, &f.field("memory")))
            .unwrap_or(DEFAULT_PLUGIN_MEMORY);
        let on_error = match f.get("on-error") {
            None => OnError::Deny,
            Some(e) => match r.string(e, &f.field("on-error")).as_deref() {
                Some("deny") => OnError::Deny,
                Some("skip") => OnError::Skip,
                Some(other) => {
                    r.error(
                        e.pos,
                        &f.field("on-error"),
                        format!("{other:?}: expected deny or skip"),
                    );
                    OnError::Deny
                }
                None => OnError::Deny,
            },
        };
        f.finish(r, &["path", "config", "timeout", "memory", "on-error"]);
        if let Some(path) = path {
            out.push(PluginSpec {
                name: name.clone(),
                path,
                config: config.to_string(),
                timeout,
                memory,
                on_error,
                pos: *kpos,
            });
        }
    }
    out
}

/// A plugin's YAML config as JSON, with `${ENV}` taken in its strings so
/// secrets stay out of the file.
fn interpolate_json(r: &mut Reader<'_>, n: &Node, field: &str) -> serde_json::Value {
    match &n.kind {
        Kind::Str(_) => r
            .string(n, field)
            .map(serde_json::Value::String)
            .unwrap_or(serde_json::Value::Null),
        Kind::Seq(items) => serde_json::Value::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, x)| interpolate_json(r, x, &format!("{field}[{i}]")))
                .collect(),
        ),
        Kind::Map(entries) => serde_json::Value::Object(
            entries
                .iter()
                .map(|(k, _, v)| (k.clone(), interpolate_json(r, v, &format!("{field}.{k}"))))
                .collect(),
        ),
        _ => n.to_json(),
    }
}

const ROUTE_KEYS: &[&str] = &[
    "url",
    "method",
    "cmd",
    "shell",
    "wd",
    "env",
    "content-type",
    "timeout",
    "kill-grace",
    "payload-to",
    "payload-env",
    "escape-shell-args",
    "max-concurrency",
    "max-body",
    "max-output",
    "status",
    "exit-status",
    "output",
    "expose-stderr",
    "reply-socket",
    "pre",
    "post",
    "user",
    "group",
    "rlimits",
];

fn read_route(
    r: &mut Reader<'_>,
    n: &Node,
    field: &str,
    base: &Path,
    limits: &Limits,
    plugin_names: &[&str],
) -> Option<Route> {
    let mut f = r.map(n, field)?;
    let errors_before = r.errors.len();
    let url = match f.get("url") {
        Some(u) => r
            .string(u, &f.field("url"))
            .and_then(|s| match parse_url(&s) {
                Ok(p) => Some(p),
                Err(e) => {
                    r.error(u.pos, &f.field("url"), e);
                    None
                }
            }),
        None => {
            r.error(
                n.pos,
                &f.field("url"),
                "missing field `url`, e.g. `url: /templates`",
            );
            None
        }
    };
    let methods = match f.get("method") {
        None => vec!["GET".to_string()],
        Some(m) => {
            let list = r.string_list(m, &f.field("method")).unwrap_or_default();
            let mut methods = Vec::new();
            for (s, pos) in list {
                let up = s.to_ascii_uppercase();
                if METHODS.contains(&up.as_str()) {
                    if !methods.contains(&up) {
                        methods.push(up);
                    }
                } else {
                    r.error(
                        pos,
                        &f.field("method"),
                        format!(
                            "unknown method {s:?}; expected one of {}",
                            METHODS.join(", ")
                        ),
                    );
                }
            }
            if methods.is_empty() {
                methods.push("GET".into());
            }
            methods
        }
    };
    let command = read_command(r, &mut f, n, base, limits, plugin_names);
    let max_body = f
        .get("max-body")
        .and_then(|v| r.size(v, &f.field("max-body")))
        .unwrap_or(limits.max_body);
    let max_concurrency = f
        .get("max-concurrency")
        .and_then(|v| r.int(v, &f.field("max-concurrency"), 1, 100_000))
        .map(|v| v as usize);
    // Placeholders must name things this route can supply.
    if let (Some(url), Some(cmd)) = (&url, &command) {
        for word in &cmd.argv {
            for ph in word.placeholders() {
                if let Placeholder::Path(p) = ph
                    && !url.segments.contains(&Segment::Param(p.clone()))
                {
                    let pos = f.get("cmd").map_or(n.pos, |c| c.pos);
                    r.error(
                        pos,
                        &f.field("cmd"),
                        format!(
                            "${{path.{p}}} names no `{{{p}}}` segment of url {}",
                            url.text
                        ),
                    );
                }
            }
        }
    }
    f.finish(r, ROUTE_KEYS);
    if r.errors.len() > errors_before {
        return None;
    }
    let url = url?;
    let command = command?;
    Some(Route {
        name: format!("{} {}", methods.join("|"), url.text),
        url,
        methods,
        command,
        max_body,
        max_concurrency,
        pos: n.pos,
    })
}

/// The command fields shared by routes and consumers.
pub(super) fn read_command(
    r: &mut Reader<'_>,
    f: &mut Fields<'_>,
    n: &Node,
    base: &Path,
    limits: &Limits,
    plugin_names: &[&str],
) -> Option<CommandSpec> {
    let errors_before = r.errors.len();
    let shell = f
        .get("shell")
        .and_then(|s| r.bool(s, &f.field("shell")))
        .unwrap_or(false);
    if let Some(e) = f.get("escape-shell-args") {
        // Kept for the original route list: placeholders are always exactly
        // one argument, so the answer is always yes.
        if r.bool(e, &f.field("escape-shell-args")) == Some(false) {
            r.error(
                e.pos,
                &f.field("escape-shell-args"),
                "placeholders are always passed as single, unexpanded arguments; \
                 `false` cannot be honoured (remove the key, or use `shell: true` and read \
                 the request from the environment)",
            );
        }
    }
    let payload_to = match f.get("payload-to") {
        None => PayloadTo::Stdin,
        Some(p) => match r.string(p, &f.field("payload-to")).as_deref() {
            Some("stdin") => PayloadTo::Stdin,
            Some("body") | Some("arg") => PayloadTo::Body,
            Some("env") => PayloadTo::Env,
            Some("file") => PayloadTo::File,
            Some("none") => PayloadTo::None,
            Some(other) => {
                r.error(
                    p.pos,
                    &f.field("payload-to"),
                    format!("{other:?}: expected stdin, body, env, file or none"),
                );
                PayloadTo::Stdin
            }
            None => PayloadTo::Stdin,
        },
    };
    let payload_env = f
        .get("payload-env")
        .and_then(|p| r.string(p, &f.field("payload-env")))
        .unwrap_or_else(|| "EXECD_BODY".to_string());
    let cmd_node = f.get("cmd");
    let argv = match cmd_node {
        None => {
            r.error(
                n.pos,
                &f.field("cmd"),
                "missing field `cmd`: the command to run, e.g. `cmd: php script.php`",
            );
            None
        }
        Some(c) => r.template_text(c, &f.field("cmd")).and_then(|text| {
            if shell {
                if text.contains("${") || text.contains("$body") {
                    // A shell would re-parse the request; values go through
                    // the environment instead.
                    let placeholder = template::parse_command(&text)
                        .ok()
                        .is_some_and(|w| w.iter().any(|w| w.placeholders().next().is_some()));
                    if placeholder {
                        r.error(
                            c.pos,
                            &f.field("cmd"),
                            "placeholders are not allowed with `shell: true`: the shell would \
                             parse request data as code. Read it from the environment \
                             (\"$QUERY_STRING\", \"$EXECD_BODY\" with payload-to: env) instead",
                        );
                        return None;
                    }
                }
                Some(vec![
                    Word(vec![Part::Lit("/bin/sh".into())]),
                    Word(vec![Part::Lit("-c".into())]),
                    Word(vec![Part::Lit(text.replace("$$", "$"))]),
                ])
            } else {
                match template::parse_command(&text) {
                    Ok(words) => Some(words),
                    Err(e) => {
                        r.error(c.pos, &f.field("cmd"), e);
                        None
                    }
                }
            }
        }),
    };
    let mut program = None;
    if let (Some(argv), Some(c)) = (&argv, cmd_node) {
        match argv[0].literal() {
            None => r.error(
                c.pos,
                &f.field("cmd"),
                "the program (first word of cmd) must be fixed text, not a placeholder",
            ),
            Some(p) => match resolve_program(p, base) {
                Ok(path) => program = Some(path),
                Err(e) => r.error(c.pos, &f.field("cmd"), e),
            },
        }
        let has_body = argv
            .iter()
            .any(|w| w.placeholders().any(|p| *p == Placeholder::Body));
        if has_body && payload_to != PayloadTo::Body {
            r.error(
                c.pos,
                &f.field("cmd"),
                "$body is used in cmd but payload-to is not `body`; add `payload-to: body`",
            );
        }
        let has_file = argv
            .iter()
            .any(|w| w.placeholders().any(|p| *p == Placeholder::BodyFile));
        if has_file && payload_to != PayloadTo::File {
            r.error(
                c.pos,
                &f.field("cmd"),
                "${body_file} is used in cmd but payload-to is not `file`; add `payload-to: file`",
            );
        }
    }
    let wd = match f.get("wd") {
        None => base.to_path_buf(),
        Some(w) => match r.string(w, &f.field("wd")) {
            Some(s) => {
                let p = base.join(s);
                if !p.is_dir() {
                    r.error(
                        w.pos,
                        &f.field("wd"),
                        format!(
                            "working directory {} does not exist or is not a directory",
                            p.display()
                        ),
                    );
                }
                p
            }
            None => base.to_path_buf(),
        },
    };
    let env = match f.get("env") {
        None => Vec::new(),
        Some(e) => {
            let field = f.field("env");
            let pairs = r.pairs(e, &field).unwrap_or_default();
            let mut env = Vec::new();
            for (k, v, pos) in pairs {
                if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
                    r.error(
                        pos,
                        &format!("{field}.{k}"),
                        "not a valid environment variable name",
                    );
                } else {
                    env.push((k, v));
                }
            }
            env
        }
    };
    let timeout = f
        .get("timeout")
        .and_then(|t| r.timeout(t, &f.field("timeout")))
        .unwrap_or(limits.timeout);
    let kill_grace = f
        .get("kill-grace")
        .and_then(|t| r.duration(t, &f.field("kill-grace")))
        .unwrap_or(limits.kill_grace);
    let max_output = f
        .get("max-output")
        .and_then(|v| r.size(v, &f.field("max-output")))
        .unwrap_or(limits.max_output);
    let output = match f.get("output") {
        None => OutputMode::Raw,
        Some(o) => match r.string(o, &f.field("output")).as_deref() {
            Some("raw") | Some("stdout") => OutputMode::Raw,
            Some("cgi") => OutputMode::Cgi,
            Some(other) => {
                r.error(
                    o.pos,
                    &f.field("output"),
                    format!("{other:?}: expected raw or cgi"),
                );
                OutputMode::Raw
            }
            None => OutputMode::Raw,
        },
    };
    let expose_stderr = f
        .get("expose-stderr")
        .and_then(|v| r.bool(v, &f.field("expose-stderr")))
        .unwrap_or(false);
    let reply_socket = f
        .get("reply-socket")
        .and_then(|v| r.bool(v, &f.field("reply-socket")))
        .unwrap_or(false);
    let lockdown = read_lockdown(r, f);
    let mut phases = [Vec::new(), Vec::new()];
    for (key, out) in ["pre", "post"].into_iter().zip(phases.iter_mut()) {
        if let Some(p) = f.get(key) {
            let field = f.field(key);
            for (name, pos) in r.string_list(p, &field).unwrap_or_default() {
                if plugin_names.contains(&name.as_str()) {
                    out.push(name);
                } else {
                    let known = if plugin_names.is_empty() {
                        "no plugins are defined under `plugins:`".to_string()
                    } else {
                        format!("defined: {}", plugin_names.join(", "))
                    };
                    r.error(pos, &field, format!("unknown plugin {name:?}; {known}"));
                }
            }
        }
    }
    let content_type = f
        .get("content-type")
        .and_then(|c| r.string(c, &f.field("content-type")))
        .unwrap_or_else(|| "text/plain; charset=utf-8".to_string());
    let status = f
        .get("status")
        .and_then(|s| r.int(s, &f.field("status"), 100, 599))
        .map_or(200, |s| s as u16);
    let mut exit_status = BTreeMap::new();
    let mut failure_status = 500;
    if let Some(m) = f.get("exit-status") {
        let field = f.field("exit-status");
        if let Kind::Map(entries) = &m.kind {
            for (k, kpos, v) in entries {
                let status = r
                    .int(v, &format!("{field}.{k}"), 100, 599)
                    .map(|s| s as u16);
                if k == "*" {
                    if let Some(s) = status {
                        failure_status = s;
                    }
                } else if let Ok(code) = k.parse::<i32>() {
                    if let Some(s) = status {
                        exit_status.insert(code, s);
                    }
                } else {
                    r.error(
                        *kpos,
                        &field,
                        format!("{k:?} is not an exit code; expected a number or \"*\""),
                    );
                }
            }
        } else {
            r.error(m.pos, &field, format!("expected a mapping of exit codes to statuses, e.g. {{1: 400, \"*\": 500}}, found {}", m.kind.describe()));
        }
    }
    let [pre, post] = phases;
    if r.errors.len() > errors_before {
        return None;
    }
    Some(CommandSpec {
        argv: argv?,
        program: program?,
        wd,
        env,
        timeout,
        kill_grace,
        payload_to,
        payload_env,
        max_output,
        output,
        expose_stderr,
        reply_socket,
        pre,
        post,
        reply: ReplyShape {
            content_type,
            status,
            exit_status,
            failure_status,
        },
        lockdown,
    })
}

/// `user`, `group` and `rlimits` of a route or consumer.
fn read_lockdown(r: &mut Reader<'_>, f: &mut Fields<'_>) -> Option<Lockdown> {
    let mut l = Lockdown::default();
    let is_root = unsafe { libc::geteuid() } == 0;
    if let Some(u) = f.get("user") {
        let field = f.field("user");
        if let Some(name) = r.scalar_text(u, &field) {
            match lookup_user(&name) {
                Some((uid, gid)) => {
                    if !is_root && uid != unsafe { libc::geteuid() } {
                        r.error(
                            u.pos,
                            &field,
                            format!("running commands as {name:?} needs execd to run as root"),
                        );
                    }
                    l.uid = Some(uid);
                    l.gid = Some(gid);
                }
                None => r.error(
                    u.pos,
                    &field,
                    format!("no user named {name:?} on this system"),
                ),
            }
        }
    }
    if let Some(g) = f.get("group") {
        let field = f.field("group");
        if let Some(name) = r.scalar_text(g, &field) {
            match lookup_group(&name) {
                Some(gid) => {
                    if !is_root && gid != unsafe { libc::getegid() } {
                        r.error(
                            g.pos,
                            &field,
                            format!(
                                "running commands in group {name:?} needs execd to run as root"
                            ),
                        );
                    }
                    l.gid = Some(gid);
                }
                None => r.error(
                    g.pos,
                    &field,
                    format!("no group named {name:?} on this system"),
                ),
            }
        }
    }
    if let Some(n) = f.get("rlimits") {
        let field = f.field("rlimits");
        if let Some(mut rf) = r.map(n, &field) {
            if let Some(v) = rf.get("cpu") {
                l.cpu_seconds = r.duration(v, &rf.field("cpu")).map(|d| d.as_secs().max(1));
            }
            if let Some(v) = rf.get("memory") {
                l.address_space = r.size(v, &rf.field("memory"));
            }
            if let Some(v) = rf.get("open-files") {
                l.open_files = r
                    .int(v, &rf.field("open-files"), 3, 1 << 20)
                    .map(|x| x as u64);
            }
            if let Some(v) = rf.get("processes") {
                l.processes = r
                    .int(v, &rf.field("processes"), 1, 1 << 20)
                    .map(|x| x as u64);
            }
            rf.finish(r, &["cpu", "memory", "open-files", "processes"]);
        }
    }
    (l != Lockdown::default()).then_some(l)
}

/// uid and primary gid of a user name (or a numeric uid).
fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let cname = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; 16384];
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwnam_r writes into pwd and buf, both live and sized as told.
    let rc = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc == 0 && !result.is_null() {
        return Some((pwd.pw_uid, pwd.pw_gid));
    }
    let uid: u32 = name.parse().ok()?;
    Some((uid, uid))
}

/// gid of a group name (or a numeric gid).
fn lookup_group(name: &str) -> Option<u32> {
    let cname = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; 16384];
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::group = std::ptr::null_mut();
    // SAFETY: getgrnam_r writes into grp and buf, both live and sized as told.
    let rc = unsafe {
        libc::getgrnam_r(
            cname.as_ptr(),
            &mut grp,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc == 0 && !result.is_null() {
        return Some(grp.gr_gid);
    }
    name.parse().ok()
}

/// Finds the program: a path with a `/` is taken relative to the config
/// directory; a bare name is looked up in PATH once, at load.
fn resolve_program(p: &str, base: &Path) -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |path: &Path| {
        path.metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if p.contains('/') {
        let path = base.join(p);
        if executable(&path) {
            return Ok(path);
        }
        return Err(format!(
            "program {} does not exist or is not executable",
            path.display()
        ));
    }
    let path_var =
        std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    for dir in std::env::split_paths(&path_var) {
        let candidate = dir.join(p);
        if executable(&candidate) {
            return Ok(candidate);
        }
    }
    Err(format!(
        "program {p:?} is not found in PATH ({})",
        path_var.to_string_lossy()
    ))
}

fn parse_url(s: &str) -> Result<UrlPattern, String> {
    if !s.starts_with('/') {
        return Err(format!("{s:?} must start with `/`"));
    }
    if s.contains('?') || s.contains('#') {
        return Err(format!("{s:?}: a route url is a path, without `?` or `#`"));
    }
    let trimmed = s.trim_start_matches('/').trim_end_matches('/');
    let mut segments = Vec::new();
    if !trimmed.is_empty() {
        for seg in trimmed.split('/') {
            if seg.is_empty() {
                return Err(format!("{s:?} has an empty segment (`//`)"));
            }
            if let Some(name) = seg.strip_prefix('{').and_then(|x| x.strip_suffix('}')) {
                if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(format!(
                        "bad parameter `{seg}` in {s:?}: use {{name}} with letters, digits and _"
                    ));
                }
                if segments.contains(&Segment::Param(name.to_string())) {
                    return Err(format!("parameter {{{name}}} appears twice in {s:?}"));
                }
                segments.push(Segment::Param(name.to_string()));
            } else if seg.contains('{') || seg.contains('}') {
                return Err(format!(
                    "segment `{seg}` in {s:?}: a parameter must be a whole segment, like /items/{{id}}"
                ));
            } else {
                segments.push(Segment::Lit(seg.to_string()));
            }
        }
    }
    Ok(UrlPattern {
        text: s.to_string(),
        segments,
    })
}

/// Two routes with the same url shape and a common method: the second could
/// never answer.
fn check_overlaps(r: &mut Reader<'_>, routes: &[Route]) {
    for (i, a) in routes.iter().enumerate() {
        for b in &routes[..i] {
            let same_shape = a.url.segments.len() == b.url.segments.len()
                && a.url
                    .segments
                    .iter()
                    .zip(&b.url.segments)
                    .all(|(x, y)| match (x, y) {
                        (Segment::Lit(p), Segment::Lit(q)) => p == q,
                        (Segment::Param(_), Segment::Param(_)) => true,
                        _ => false,
                    });
            if same_shape && let Some(m) = a.methods.iter().find(|m| b.methods.contains(m)) {
                r.error(
                    a.pos,
                    "url",
                    format!(
                        "{m} {} is already served by the route at line {} ({})",
                        a.url.text, b.pos.line, b.name
                    ),
                );
            }
        }
    }
}
