//! Prometheus metrics: a small registry of labelled counters and
//! histograms, rendered in the text exposition format at `/metrics`.
//!
//! Kept in-house: a handful of metric families with low-cardinality labels
//! (route, method, status class, plugin, consumer) need no more than a
//! mutex-guarded map, and the text format is simple.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Mutex, OnceLock};

/// Upper bounds (seconds) of the duration histogram buckets.
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

type Labels = Vec<(&'static str, String)>;

#[derive(Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

#[derive(Default)]
struct Families {
    counters: BTreeMap<&'static str, BTreeMap<Labels, f64>>,
    histograms: BTreeMap<&'static str, BTreeMap<Labels, Histogram>>,
}

fn families() -> &'static Mutex<Families> {
    static F: OnceLock<Mutex<Families>> = OnceLock::new();
    F.get_or_init(Default::default)
}

fn labels(l: &[(&'static str, &str)]) -> Labels {
    l.iter().map(|(k, v)| (*k, (*v).to_string())).collect()
}

/// Adds one to a counter.
pub fn inc(name: &'static str, l: &[(&'static str, &str)]) {
    add(name, l, 1.0);
}

/// Adds `by` to a counter.
pub fn add(name: &'static str, l: &[(&'static str, &str)], by: f64) {
    let mut f = families().lock().unwrap_or_else(|e| e.into_inner());
    *f.counters
        .entry(name)
        .or_default()
        .entry(labels(l))
        .or_default() += by;
}

/// Records one observation (seconds) in a histogram.
pub fn observe(name: &'static str, l: &[(&'static str, &str)], seconds: f64) {
    let mut f = families().lock().unwrap_or_else(|e| e.into_inner());
    let h = f
        .histograms
        .entry(name)
        .or_default()
        .entry(labels(l))
        .or_default();
    if h.counts.is_empty() {
        h.counts = vec![0; BUCKETS.len()];
    }
    for (i, b) in BUCKETS.iter().enumerate() {
        if seconds <= *b {
            h.counts[i] += 1;
        }
    }
    h.sum += seconds;
    h.count += 1;
}

/// The current value of a counter (tests and health checks read these).
pub fn counter_value(name: &str, l: &[(&str, &str)]) -> f64 {
    let f = families().lock().unwrap_or_else(|e| e.into_inner());
    f.counters
        .get(name)
        .and_then(|m| {
            m.iter()
                .find(|(k, _)| {
                    k.len() == l.len() && k.iter().zip(l).all(|((a, b), (c, d))| a == c && b == d)
                })
                .map(|(_, v)| *v)
        })
        .unwrap_or(0.0)
}

fn help(name: &str) -> &'static str {
    match name {
        "execd_http_requests_total" => "HTTP requests answered, by route, method and status.",
        "execd_http_request_duration_seconds" => "Time from request to response, by route.",
        "execd_command_exits_total" => "Commands that ended, by route and exit code (or signal).",
        "execd_command_timeouts_total" => "Commands stopped at their timeout, by route.",
        "execd_command_kills_total" => {
            "Commands execd killed (timeout, output cap, shutdown), by route and reason."
        }
        "execd_command_spawn_failures_total" => "Commands that could not be started, by route.",
        "execd_command_duration_seconds" => "Command run time, by route.",
        "execd_plugin_calls_total" => "Plugin calls, by plugin, phase and result.",
        "execd_plugin_call_duration_seconds" => {
            "Plugin call time (fresh instance included), by plugin and phase."
        }
        "execd_reloads_total" => "Config reloads, by result.",
        "execd_amqp_deliveries_total" => "AMQP messages received, by consumer.",
        "execd_amqp_acks_total" => "AMQP messages acknowledged, by consumer.",
        "execd_amqp_retries_total" => "AMQP messages scheduled for another attempt, by consumer.",
        "execd_amqp_dead_letters_total" => "AMQP messages dead-lettered, by consumer.",
        "execd_amqp_rejects_total" => "AMQP messages rejected or requeued, by consumer.",
        "execd_amqp_reconnects_total" => "AMQP reconnections, by consumer.",
        _ => "",
    }
}

pub fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn write_labels(out: &mut String, l: &Labels, extra: Option<(&str, &str)>) {
    if l.is_empty() && extra.is_none() {
        return;
    }
    out.push('{');
    let mut first = true;
    for (k, v) in l.iter().map(|(k, v)| (*k, v.as_str())).chain(extra) {
        if !first {
            out.push(',');
        }
        first = false;
        let _ = write!(out, "{k}=\"{}\"", escape(v));
    }
    out.push('}');
}

/// Renders every family, plus the given gauges, in the Prometheus text
/// format (version 0.0.4).
pub fn render(gauges: &[(&str, &str, f64)]) -> String {
    let mut out = String::new();
    for (name, helptext, value) in gauges {
        let _ = writeln!(
            out,
            "# HELP {name} {helptext}\n# TYPE {name} gauge\n{name} {value}"
        );
    }
    let f = families().lock().unwrap_or_else(|e| e.into_inner());
    for (name, series) in &f.counters {
        let _ = writeln!(out, "# HELP {name} {}\n# TYPE {name} counter", help(name));
        for (l, v) in series {
            out.push_str(name);
            write_labels(&mut out, l, None);
            let _ = writeln!(out, " {v}");
        }
    }
    for (name, series) in &f.histograms {
        let _ = writeln!(out, "# HELP {name} {}\n# TYPE {name} histogram", help(name));
        for (l, h) in series {
            for (i, b) in BUCKETS.iter().enumerate() {
                let _ = write!(out, "{name}_bucket");
                write_labels(&mut out, l, Some(("le", &b.to_string())));
                let _ = writeln!(out, " {}", h.counts[i]);
            }
            let _ = write!(out, "{name}_bucket");
            write_labels(&mut out, l, Some(("le", "+Inf")));
            let _ = writeln!(out, " {}", h.count);
            let _ = write!(out, "{name}_sum");
            write_labels(&mut out, l, None);
            let _ = writeln!(out, " {}", h.sum);
            let _ = write!(out, "{name}_count");
            write_labels(&mut out, l, None);
            let _ = writeln!(out, " {}", h.count);
        }
    }
    out
}
