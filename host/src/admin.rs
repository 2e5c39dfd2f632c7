//! The admin listener (default 127.0.0.1:9090): `/metrics` (Prometheus
//! text), `/healthz` (the process is alive and answering), `/readyz` (config
//! and plugins loaded, broker connected when consumers are configured, not
//! draining). Kept off the main listener so probes and scrapes never queue
//! behind requests and are never exposed where the routes are.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::intake::amqp;
use crate::intake::http::Shared;
use crate::metrics;

/// What the admin endpoints look at.
pub struct AdminState {
    pub shared: Arc<Shared>,
    /// Cancelled when the daemon starts draining: no longer ready.
    pub shutdown: CancellationToken,
    /// The AMQP consumers (an empty list when none are configured).
    pub amqp: Arc<amqp::Health>,
}

/// Serves the admin endpoints until `stop` is cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AdminState>,
    stop: CancellationToken,
) {
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => match a {
                Ok(x) => x,
                Err(_) => continue,
            },
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// A per-consumer AMQP counter: metric name, help text, and its reading.
type CounterFamily = (&'static str, &'static str, fn(&amqp::ConsumerStatus) -> u64);

fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        "content-type",
        content_type.parse().expect("valid header value"),
    );
    r
}

fn handle<B>(state: &AdminState, req: Request<B>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/healthz" => respond(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => {
            let (ready, body) = readiness(state);
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            respond(status, "application/json", body.to_string())
        }
        "/metrics" => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            render_metrics(state),
        ),
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics, /healthz, /readyz\n".into(),
        ),
    }
}

fn readiness(state: &AdminState) -> (bool, serde_json::Value) {
    let draining = state.shutdown.is_cancelled();
    let app = state.shared.app.load();
    let consumers: Vec<serde_json::Value> = state
        .amqp
        .consumers()
        .iter()
        .map(|c| {
            let s = c.snapshot();
            json!({"name": s.name, "queue": s.queue, "connected": s.connected, "last_error": s.last_error})
        })
        .collect();
    let broker_ok = state.amqp.all_connected();
    let ready = !draining && broker_ok;
    (
        ready,
        json!({
            "ready": ready,
            "draining": draining,
            "routes": app.config.routes.len(),
            "plugins": app.config.plugins.len(),
            "consumers": consumers,
        }),
    )
}

fn render_metrics(state: &AdminState) -> String {
    let app = state.shared.app.load();
    let queued: usize = app.global.queued()
        + app
            .routes
            .iter()
            .filter_map(|r| r.gate.as_ref())
            .map(|g| g.queued())
            .sum::<usize>();
    let in_flight = state.shared.in_flight.load(Ordering::Relaxed) as f64;
    let mut gauges = vec![
        (
            "execd_http_in_flight",
            "HTTP requests being answered now.",
            in_flight,
        ),
        (
            "execd_http_queued",
            "HTTP requests waiting for a command slot.",
            queued as f64,
        ),
        (
            "execd_ready",
            "1 when ready to serve (see /readyz).",
            if readiness(state).0 { 1.0 } else { 0.0 },
        ),
    ];
    let mut text = String::new();
    let consumers = state.amqp.consumers();
    if !consumers.is_empty() {
        let mut in_flight = 0usize;
        let mut connected = 0usize;
        use std::fmt::Write;
        let families: [CounterFamily; 7] = [
            (
                "execd_amqp_acks_total",
                "AMQP messages acknowledged after success, by consumer.",
                |s| s.acked,
            ),
            (
                "execd_amqp_retries_total",
                "AMQP messages scheduled for another attempt, by consumer.",
                |s| s.retried,
            ),
            (
                "execd_amqp_dead_letters_total",
                "AMQP messages dead-lettered, by consumer.",
                |s| s.dead_lettered,
            ),
            (
                "execd_amqp_rejects_total",
                "AMQP messages rejected without requeue, by consumer.",
                |s| s.rejected,
            ),
            (
                "execd_amqp_requeues_total",
                "AMQP messages put back on their queue, by consumer.",
                |s| s.requeued,
            ),
            (
                "execd_amqp_unsettled_total",
                "AMQP outcomes that could not be settled (redelivered by the broker), by consumer.",
                |s| s.unsettled,
            ),
            (
                "execd_amqp_reconnects_total",
                "AMQP reconnections after a loss, by consumer.",
                |s| s.reconnects,
            ),
        ];
        let snaps: Vec<amqp::ConsumerStatus> = consumers.iter().map(|c| c.snapshot()).collect();
        for s in &snaps {
            in_flight += s.in_flight;
            connected += usize::from(s.connected);
        }
        for (name, help, get) in families {
            let _ = writeln!(text, "# HELP {name} {help}\n# TYPE {name} counter");
            for s in &snaps {
                let _ = writeln!(
                    text,
                    "{name}{{consumer=\"{}\"}} {}",
                    metrics::escape(&s.name),
                    get(s)
                );
            }
        }
        gauges.push((
            "execd_amqp_in_flight",
            "AMQP messages whose command is running now.",
            in_flight as f64,
        ));
        gauges.push((
            "execd_amqp_consumers_connected",
            "AMQP consumers consuming now.",
            connected as f64,
        ));
    }
    let mut out = metrics::render(&gauges);
    out.push_str(&text);
    out
}
