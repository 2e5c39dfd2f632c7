//! The HTTP intake: hyper HTTP/1.1 connections in, one [`Invocation`] per
//! request, the pipeline's [`Reply`] out.
//!
//! Routing is our own rather than a framework router: the route table comes
//! from the config and is swapped whole on reload, and 404/405 answers must
//! be problem+json with `Allow` computed from that table.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body as _, Incoming};
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use crate::app::{App, Busy, Lookup};
use crate::config::{PayloadTo, percent_decode};
use crate::ids;
use crate::pipeline::{self, HttpOrigin, Invocation, Origin, Reply};
use crate::problem;

/// A bound listener: TCP, or a unix socket behind a reverse proxy.
pub enum Listener {
    Tcp(tokio::net::TcpListener),
    /// HTTPS: the handshake runs in the connection's own task.
    /// The acceptor is swapped by a reload that re-reads the PEM files.
    Tls(
        tokio::net::TcpListener,
        Arc<ArcSwap<tokio_rustls::TlsAcceptor>>,
    ),
    Unix(tokio::net::UnixListener),
}

impl Listener {
    /// The address to print: `127.0.0.1:8080` or `unix:/run/execd.sock`.
    pub fn local_addr(&self) -> String {
        match self {
            Listener::Tcp(l) | Listener::Tls(l, _) => {
                l.local_addr().map(|a| a.to_string()).unwrap_or_default()
            }
            Listener::Unix(l) => l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| format!("unix:{}", p.display())))
                .unwrap_or_else(|| "unix:?".into()),
        }
    }
}

/// What every connection shares.
pub struct Shared {
    /// The current config generation.
    pub app: Arc<ArcSwap<App>>,
    /// Cancelled when the drain deadline passes: running commands are killed.
    pub abort: CancellationToken,
    /// Requests being answered now, for the in-flight gauge.
    pub in_flight: std::sync::atomic::AtomicI64,
}

/// Serves until `shutdown` is cancelled, then stops accepting and waits for
/// open requests to finish (the caller bounds that wait with the drain
/// deadline and cancels `abort` when it passes).
pub async fn serve(listener: Listener, shared: Arc<Shared>, shutdown: CancellationToken) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let header_timeout = shared.app.load().config.limits.header_timeout;
        tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = accept(&listener) => {
                let (io, remote) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let shared = shared.clone();
                let remote: Arc<str> = remote.into();
                let graceful_watch = graceful.watcher();
                tokio::spawn(async move {
                    // A client gets the header timeout for its TLS handshake
                    // too, and the handshake never holds up the accept loop.
                    let io = match io {
                        Accepted::Plain(io) => io,
                        Accepted::Tls(tcp, acceptor) => {
                            match tokio::time::timeout(header_timeout, acceptor.accept(tcp)).await {
                                Ok(Ok(tls)) => TokioIo::new(Box::new(tls) as Box<dyn IoStream>),
                                Ok(Err(e)) => {
                                    tracing::debug!(error = %e, remote = %remote, "TLS handshake failed");
                                    return;
                                }
                                Err(_) => return,
                            }
                        }
                    };
                    let svc = hyper::service::service_fn(move |req| {
                        let shared = shared.clone();
                        let remote = remote.clone();
                        async move { Ok::<_, Infallible>(handle(&shared, req, &remote).await) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(header_timeout)
                        .serve_connection(io, svc);
                    if let Err(e) = graceful_watch.watch(conn).await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
        }
    }
    drop(listener);
    graceful.shutdown().await;
}

type Io = TokioIo<Box<dyn IoStream>>;
trait IoStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> IoStream for T {}

enum Accepted {
    Plain(Io),
    Tls(tokio::net::TcpStream, tokio_rustls::TlsAcceptor),
}

fn boxed<S: IoStream + 'static>(s: S) -> Accepted {
    Accepted::Plain(TokioIo::new(Box::new(s) as Box<dyn IoStream>))
}

async fn accept(listener: &Listener) -> std::io::Result<(Accepted, String)> {
    match listener {
        Listener::Tcp(l) => {
            let (s, addr) = l.accept().await?;
            let _ = s.set_nodelay(true);
            Ok((boxed(s), addr.to_string()))
        }
        Listener::Tls(l, acceptor) => {
            let (s, addr) = l.accept().await?;
            let _ = s.set_nodelay(true);
            Ok((
                Accepted::Tls(s, (**acceptor.load()).clone()),
                addr.to_string(),
            ))
        }
        Listener::Unix(l) => {
            let (s, _) = l.accept().await?;
            Ok((boxed(s), "unix".to_string()))
        }
    }
}

/// One request, start to finish. Never fails: every error is a reply.
pub async fn handle(
    shared: &Shared,
    req: Request<Incoming>,
    remote: &str,
) -> Response<Full<Bytes>> {
    let request_id: Arc<str> = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|s| ids::is_sane_request_id(s))
        .map(Into::into)
        .unwrap_or_else(|| ids::request_id().into());
    let app = shared.app.load_full();
    let mut record = Record::open(shared, &req, request_id.clone());
    let reply = match route_request(&app, shared, req, remote, &request_id, &record.route).await {
        Ok(reply) => reply,
        Err(reply) => reply,
    };
    record.status = Some(reply.status);
    drop(record);
    to_response(reply, &request_id)
}

/// A request's access-log line, metrics and place in the in-flight gauge,
/// written when it is dropped: when the answer is ready, or when hyper
/// drops the request because its client went away first. The latter is
/// logged and counted with status 499 (the convention nginx set), and the
/// command, if one runs, is stopped with it.
struct Record<'a> {
    shared: &'a Shared,
    started: Instant,
    method: String,
    path: String,
    request_id: Arc<str>,
    /// The route's name, once the path has matched one.
    route: std::sync::OnceLock<Arc<str>>,
    /// The answer's status; `None` while there is none.
    status: Option<u16>,
}

/// The status logged for a request whose client left before its answer.
const CLIENT_CLOSED: u16 = 499;

impl<'a> Record<'a> {
    fn open(shared: &'a Shared, req: &Request<Incoming>, request_id: Arc<str>) -> Self {
        shared
            .in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Record {
            shared,
            started: Instant::now(),
            method: req.method().as_str().to_string(),
            path: req.uri().path().to_string(),
            request_id,
            route: std::sync::OnceLock::new(),
            status: None,
        }
    }
}

impl Drop for Record<'_> {
    fn drop(&mut self) {
        self.shared
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        let elapsed = self.started.elapsed().as_secs_f64();
        let status = self.status.unwrap_or(CLIENT_CLOSED);
        let route = self.route.get().map(|r| &**r);
        let route_label = route.unwrap_or("(none)");
        crate::metrics::inc(
            "execd_http_requests_total",
            &[
                ("route", route_label),
                ("method", &self.method),
                ("status", &status.to_string()),
            ],
        );
        crate::metrics::observe(
            "execd_http_request_duration_seconds",
            &[("route", route_label)],
            elapsed,
        );
        let message = if self.status.is_some() {
            "request"
        } else {
            "request: the client closed the connection before the answer"
        };
        tracing::info!(
            route = route.unwrap_or("-"),
            request_id = %self.request_id,
            method = %self.method,
            path = %self.path,
            status,
            ms = elapsed * 1000.0,
            "{message}"
        );
    }
}

async fn route_request(
    app: &App,
    shared: &Shared,
    req: Request<Incoming>,
    remote: &str,
    request_id: &Arc<str>,
    matched: &std::sync::OnceLock<Arc<str>>,
) -> Result<Reply, Reply> {
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let (slot, params) = match app.lookup(&method, &path) {
        Lookup::Found(slot, params) => (slot, params),
        Lookup::WrongMethod(allowed) => {
            let mut r = problem::reply(
                405,
                "method-not-allowed",
                "Method not allowed",
                &format!(
                    "{method} is not served at {path}; allowed: {}",
                    allowed.join(", ")
                ),
                request_id,
            );
            r.headers.push(("allow".into(), allowed.join(", ")));
            return Err(r);
        }
        Lookup::NotFound => {
            return Err(problem::reply(
                404,
                "not-found",
                "Not found",
                &format!("no route serves {path}"),
                request_id,
            ));
        }
    };
    let route = &slot.route;
    let route_name: Arc<str> = route.name.as_str().into();
    let _ = matched.set(route_name.clone());
    let raw_query = req.uri().query().unwrap_or("").to_string();
    let query = parse_query(&raw_query).ok_or_else(|| {
        problem::reply(
            400,
            "bad-request",
            "Bad request",
            "the query string has a malformed %-escape or is not UTF-8",
            request_id,
        )
    })?;
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let protocol = match req.version() {
        hyper::Version::HTTP_10 => "HTTP/1.0",
        _ => "HTTP/1.1",
    };

    // Refuse an oversized body before reading any of it.
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > route.max_body) {
        return Err(too_large(route.max_body, request_id));
    }
    let body_timeout = app.config.limits.body_timeout;
    // A large (or unannounced) body for a command that reads stdin and has
    // no pre plugin to show it to is streamed into the command as it
    // arrives, so execd's memory does not grow with the body.
    let stream = route.command.pre.is_empty()
        && route.command.payload_to == PayloadTo::Stdin
        && !req.body().is_end_stream()
        && declared.is_none_or(|n| n > STREAM_ABOVE);
    let (body, incoming) = if stream {
        (Bytes::new(), Some(req.into_body()))
    } else {
        (
            read_body(req.into_body(), route.max_body, body_timeout, request_id).await?,
            None,
        )
    };

    // Route cap first, then the global one: a busy route cannot take every
    // global slot while it waits.
    let _route_permit = match &slot.gate {
        Some(g) => Some(g.enter().await.map_err(|b| busy(b, request_id))?),
        None => None,
    };
    let _global_permit = app.global.enter().await.map_err(|b| busy(b, request_id))?;

    let inv = Invocation {
        route: route_name.clone(),
        request_id: request_id.clone(),
        origin: Origin::Http(HttpOrigin {
            method,
            path,
            query: raw_query,
            remote_addr: remote.to_string(),
            protocol,
        }),
        headers,
        params,
        query,
        vars: Vec::new(),
        body,
    };
    let reply = match incoming {
        None => match pipeline::execute(&route.command, &app.plugins, inv, &shared.abort).await {
            Ok(done) => done.reply,
            Err(f) => f.to_reply(request_id),
        },
        Some(incoming) => {
            let abort = shared.abort.child_token();
            let (tx, rx) = tokio::sync::mpsc::channel(8);
            let feeder = tokio::spawn(feed_body(
                incoming,
                tx,
                route.max_body,
                body_timeout,
                abort.clone(),
            ));
            let result =
                pipeline::execute_with_stdin(&route.command, &app.plugins, inv, Some(rx), &abort)
                    .await;
            let (end, _held) = feeder.await.unwrap_or((BodyEnd::Complete, None));
            match end {
                BodyEnd::TooLarge => too_large(route.max_body, request_id),
                BodyEnd::Stalled => stalled(body_timeout, request_id),
                BodyEnd::Broken(e) => problem::reply(
                    400,
                    "bad-request",
                    "Bad request",
                    &format!("cannot read the request body: {e}"),
                    request_id,
                ),
                BodyEnd::Complete => match result {
                    Ok(done) => done.reply,
                    Err(f) => f.to_reply(request_id),
                },
            }
        }
    };
    Ok(reply)
}

/// Bodies up to this size are read whole (plugins and logs can see them);
/// larger ones are streamed when the route allows.
const STREAM_ABOVE: u64 = 256 * 1024;

async fn read_body(
    body: Incoming,
    limit: u64,
    idle: std::time::Duration,
    request_id: &str,
) -> Result<Bytes, Reply> {
    if body.is_end_stream() {
        return Ok(Bytes::new());
    }
    let mut body = Limited::new(body, limit as usize);
    let mut chunks: Vec<Bytes> = Vec::new();
    loop {
        let frame = match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => return Err(stalled(idle, request_id)),
            Ok(None) => break,
            Ok(Some(frame)) => frame,
        };
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    chunks.push(data);
                }
            }
            Err(e)
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some() =>
            {
                return Err(too_large(limit, request_id));
            }
            Err(e) => {
                return Err(problem::reply(
                    400,
                    "bad-request",
                    "Bad request",
                    &format!("cannot read the request body: {e}"),
                    request_id,
                ));
            }
        }
    }
    Ok(match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.pop().expect("one chunk"),
        _ => Bytes::from(chunks.concat()),
    })
}

/// How a streamed body ended.
enum BodyEnd {
    Complete,
    /// Past `max-body`: the command was stopped; the answer is 413.
    TooLarge,
    /// Nothing arrived for `body-timeout`: the command was stopped; 408.
    Stalled,
    /// The client broke off; the command was stopped.
    Broken(String),
}

/// Copies a request body into the command's stdin chunk by chunk. Past the
/// cap, or on a broken body, the command is stopped (`abort`) so it never
/// acts on a partial payload; the sender is handed back rather than dropped
/// then, so the command never sees an end of input it could mistake for a
/// complete body before it is stopped.
async fn feed_body(
    mut body: Incoming,
    tx: tokio::sync::mpsc::Sender<Bytes>,
    limit: u64,
    idle: std::time::Duration,
    abort: CancellationToken,
) -> (BodyEnd, Option<tokio::sync::mpsc::Sender<Bytes>>) {
    use http_body_util::BodyExt as _;
    let mut total = 0u64;
    loop {
        let frame = tokio::select! {
            f = tokio::time::timeout(idle, body.frame()) => match f {
                Ok(f) => f,
                Err(_) => {
                    abort.cancel();
                    return (BodyEnd::Stalled, Some(tx));
                }
            },
            // The command is done with its input: it ended, or was stopped
            // at its timeout. A client that stalls mid-body must not hold
            // the request, and its slots, open past that.
            () = tx.closed() => return (BodyEnd::Complete, None),
        };
        let Some(frame) = frame else { break };
        match frame {
            Ok(frame) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                total += data.len() as u64;
                if total > limit {
                    abort.cancel();
                    return (BodyEnd::TooLarge, Some(tx));
                }
                if tx.send(data).await.is_err() {
                    // The command stopped reading; what it does without the
                    // rest is its answer.
                    return (BodyEnd::Complete, None);
                }
            }
            Err(e) => {
                abort.cancel();
                return (BodyEnd::Broken(e.to_string()), Some(tx));
            }
        }
    }
    (BodyEnd::Complete, None)
}

fn too_large(limit: u64, request_id: &str) -> Reply {
    problem::reply(
        413,
        "payload-too-large",
        "Payload too large",
        &format!("the request body is larger than this route's max-body of {limit} bytes"),
        request_id,
    )
}

fn stalled(idle: std::time::Duration, request_id: &str) -> Reply {
    problem::reply(
        408,
        "request-timeout",
        "Request timeout",
        &format!("the request body sent nothing for {idle:?} (limits.body-timeout)"),
        request_id,
    )
}

fn busy(b: Busy, request_id: &str) -> Reply {
    let detail = match b {
        Busy::QueueFull => "too many requests are waiting; try again shortly",
        Busy::Timeout => "no command slot came free in time; try again shortly",
    };
    let mut r = problem::reply(503, "busy", "Service busy", detail, request_id);
    r.headers.push(("retry-after".into(), "1".into()));
    r
}

/// Decodes `a=1&b=x+y` (form encoding: `+` is a space).
pub fn parse_query(q: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        out.push((
            percent_decode(&k.replace('+', " "))?,
            percent_decode(&v.replace('+', " "))?,
        ));
    }
    Some(out)
}

fn to_response(reply: Reply, request_id: &str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(reply.body));
    *resp.status_mut() =
        StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = resp.headers_mut();
    let mut kept = 0;
    for (k, v) in reply.headers {
        // What a script or a plugin may set; the map itself would give up
        // (and panic) somewhere past 24,000 names.
        if kept == MAX_REPLY_HEADERS {
            tracing::warn!(
                request_id,
                "dropped the reply's headers past the first {MAX_REPLY_HEADERS}"
            );
            break;
        }
        // Framing is the server's: a script's or a plugin's own length or
        // encoding would contradict the body sent, and a client (or a
        // proxy's pooled connection) would read the next response's bytes
        // as this one's, or wait for bytes that never come.
        if is_framing(&k) {
            continue;
        }
        match (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(&v),
        ) {
            (Ok(name), Ok(value)) => {
                headers.append(name, value);
                kept += 1;
            }
            _ => tracing::warn!(request_id, header = %k, "dropped a header that is not valid HTTP"),
        }
    }
    if let Ok(v) = HeaderValue::from_str(request_id) {
        headers.insert("x-request-id", v);
    }
    resp
}

/// Most headers a reply keeps, as for a reply-socket frame.
const MAX_REPLY_HEADERS: usize = 100;

/// Headers that frame the message or manage the connection (RFC 9110
/// 7.6.1, RFC 9112 6); hyper sets what the response needs.
fn is_framing(name: &str) -> bool {
    [
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
    ]
    .iter()
    .any(|f| name.eq_ignore_ascii_case(f))
}
