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

/// A series' labels as they appear between the braces of the text format
/// (`route="GET /x",status="200"`): the key each series is kept under, so
/// recording into an existing series needs no allocation.
type Labels = String;

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

fn write_labels(out: &mut String, l: &[(&str, &str)]) {
    for (i, (k, v)) in l.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(k);
        out.push_str("=\"");
        escape_into(out, v);
        out.push('"');
    }
}

/// Runs `f` with `l` rendered as a series key, in a per-thread buffer, so
/// that the registry's lock is not held while it is written.
fn with_key<R>(l: &[(&str, &str)], f: impl FnOnce(&str) -> R) -> R {
    thread_local! {
        static KEY: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
    }
    KEY.with_borrow_mut(|key| {
        key.clear();
        write_labels(key, l);
        f(key)
    })
}

/// Runs `f` on the series `key` of `map`, created with `V::default()` the
/// first time.
fn with_series<V: Default>(map: &mut BTreeMap<Labels, V>, key: &str, f: impl FnOnce(&mut V)) {
    match map.get_mut(key) {
        Some(v) => f(v),
        None => f(map.entry(key.to_owned()).or_default()),
    }
}

/// Adds one to a counter.
pub fn inc(name: &'static str, l: &[(&'static str, &str)]) {
    add(name, l, 1.0);
}

/// Adds `by` to a counter.
pub fn add(name: &'static str, l: &[(&'static str, &str)], by: f64) {
    with_key(l, |key| {
        let mut f = families().lock().unwrap_or_else(|e| e.into_inner());
        with_series(f.counters.entry(name).or_default(), key, |v| *v += by);
    });
}

/// Records one observation (seconds) in a histogram.
pub fn observe(name: &'static str, l: &[(&'static str, &str)], seconds: f64) {
    with_key(l, |key| {
        let mut f = families().lock().unwrap_or_else(|e| e.into_inner());
        with_series(f.histograms.entry(name).or_default(), key, |h| {
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
        });
    });
}

/// The current value of a counter (tests and health checks read these).
pub fn counter_value(name: &str, l: &[(&str, &str)]) -> f64 {
    let mut key = String::new();
    write_labels(&mut key, l);
    let f = families().lock().unwrap_or_else(|e| e.into_inner());
    f.counters
        .get(name)
        .and_then(|m| m.get(&key))
        .copied()
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

/// A label value escaped for the text format.
pub fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    escape_into(&mut out, v);
    out
}

fn escape_into(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// `name{labels}` or `name{labels,extra}` (just `name` when there are none).
fn write_series(out: &mut String, name: &str, suffix: &str, l: &str, extra: Option<(&str, &str)>) {
    out.push_str(name);
    out.push_str(suffix);
    if l.is_empty() && extra.is_none() {
        return;
    }
    out.push('{');
    out.push_str(l);
    if let Some((k, v)) = extra {
        if !l.is_empty() {
            out.push(',');
        }
        let _ = write!(out, "{k}=\"{v}\"");
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
            write_series(&mut out, name, "", l, None);
            let _ = writeln!(out, " {v}");
        }
    }
    for (name, series) in &f.histograms {
        let _ = writeln!(out, "# HELP {name} {}\n# TYPE {name} histogram", help(name));
        for (l, h) in series {
            for (i, b) in BUCKETS.iter().enumerate() {
                write_series(&mut out, name, "_bucket", l, Some(("le", &b.to_string())));
                let _ = writeln!(out, " {}", h.counts[i]);
            }
            write_series(&mut out, name, "_bucket", l, Some(("le", "+Inf")));
            let _ = writeln!(out, " {}", h.count);
            write_series(&mut out, name, "_sum", l, None);
            let _ = writeln!(out, " {}", h.sum);
            write_series(&mut out, name, "_count", l, None);
            let _ = writeln!(out, " {}", h.count);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_render_in_the_text_format() {
        // Names of their own: the registry is global to the test binary.
        inc(
            "test_metrics_total",
            &[("route", "GET /a \"b\""), ("status", "200")],
        );
        add(
            "test_metrics_total",
            &[("route", "GET /a \"b\""), ("status", "200")],
            2.0,
        );
        inc(
            "test_metrics_total",
            &[("route", "x\\y\nz"), ("status", "500")],
        );
        inc("test_metrics_plain_total", &[]);
        observe("test_metrics_seconds", &[("route", "r")], 0.003);
        observe("test_metrics_seconds", &[("route", "r")], 7.0);
        assert_eq!(
            counter_value(
                "test_metrics_total",
                &[("route", "GET /a \"b\""), ("status", "200")]
            ),
            3.0
        );
        assert_eq!(
            counter_value("test_metrics_total", &[("route", "nope")]),
            0.0
        );
        let text = render(&[("test_metrics_gauge", "A gauge.", 4.0)]);
        for line in [
            "# TYPE test_metrics_gauge gauge\ntest_metrics_gauge 4\n",
            "test_metrics_total{route=\"GET /a \\\"b\\\"\",status=\"200\"} 3\n",
            "test_metrics_total{route=\"x\\\\y\\nz\",status=\"500\"} 1\n",
            "test_metrics_plain_total 1\n",
            "test_metrics_seconds_bucket{route=\"r\",le=\"0.0025\"} 0\n",
            "test_metrics_seconds_bucket{route=\"r\",le=\"0.005\"} 1\n",
            "test_metrics_seconds_bucket{route=\"r\",le=\"10\"} 2\n",
            "test_metrics_seconds_bucket{route=\"r\",le=\"+Inf\"} 2\n",
            "test_metrics_seconds_sum{route=\"r\"} 7.003\n",
            "test_metrics_seconds_count{route=\"r\"} 2\n",
        ] {
            assert!(text.contains(line), "{line:?} not in:\n{text}");
        }
    }
}
