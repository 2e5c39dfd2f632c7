//! # response-shape — shape the reply (post plugin)
//!
//! Maps the command's exit code to an HTTP status, adds headers, and can
//! wrap the output in a JSON envelope, so that a legacy script that only
//! prints and exits answers like an API.
//!
//! ```yaml
//! plugins:
//!   - name: response-shape
//!     config:
//!       mode: envelope       # default; or passthrough (body untouched)
//!       data: auto           # default; json | text (envelope mode only)
//!       status-map:          # exit code -> HTTP status; default none
//!         "0": 200
//!         "3": 404
//!         "*": 502           # any other failure: non-zero exit or a signal
//!         "timeout": 504     # the run hit its timeout
//!       headers:             # set on every reply (replacing same-named)
//!         Cache-Control: no-store
//! ```
//!
//! The envelope is
//! `{"status": 404, "data": ..., "exit_code": 3, "timed_out": false, "request_id": "..."}`
//! with `Content-Type: application/json`; `status` is the status the reply
//! is sent with. `data` is the command's output (stdout, or what it wrote to
//! the reply socket): with `data: json` it must be JSON (otherwise the reply
//! is a `502` problem: the command broke its contract); with `text` it is a
//! string (invalid UTF-8 replaced); with `auto` it is embedded as JSON when
//! it parses as JSON, and as a string otherwise.
//!
//! Status: an exact exit-code entry wins; then `*` for any failure that is
//! not a timeout; a timeout only changes with a `timeout` entry (so a
//! timed-out run keeps the host's `504` unless mapped). With no matching
//! entry the incoming status is kept.

use std::collections::BTreeMap;

use execd_plugin_sdk::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The plugin's configuration (see the crate docs).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Settings {
    /// Wrap the output, or leave the body alone.
    #[serde(default)]
    mode: Mode,
    /// Headers set on every reply.
    #[serde(default)]
    headers: BTreeMap<String, String>,
    /// `"<exit code>"`, `"*"` or `"timeout"` -> HTTP status.
    #[serde(default)]
    status_map: BTreeMap<String, u16>,
    /// How the output is embedded in the envelope.
    #[serde(default)]
    data: DataMode,
}

/// Whether the body is wrapped.
#[derive(Debug, Default, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Mode {
    #[default]
    Envelope,
    Passthrough,
}

/// How the output becomes the envelope's `data`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum DataMode {
    #[default]
    Auto,
    Json,
    Text,
}

/// `status-map`, parsed: the keys are text in YAML/JSON, numbers here.
#[derive(Debug, Default, PartialEq)]
struct StatusMap {
    exact: BTreeMap<i32, u16>,
    any_failure: Option<u16>,
    timeout: Option<u16>,
}

impl StatusMap {
    fn new(raw: &BTreeMap<String, u16>) -> Result<StatusMap, String> {
        let mut map = StatusMap::default();
        for (key, &status) in raw {
            if !(100..=599).contains(&status) {
                return Err(format!(
                    "status-map.{key}: {status} is not an HTTP status (100-599)"
                ));
            }
            match key.as_str() {
                "*" => map.any_failure = Some(status),
                "timeout" => map.timeout = Some(status),
                code => {
                    let code = code.parse::<i32>().map_err(|_| {
                        format!(
                            "status-map.{key}: keys are exit codes (\"0\", \"3\"), \"*\" \
                             (any other failure) or \"timeout\""
                        )
                    })?;
                    map.exact.insert(code, status);
                }
            }
        }
        Ok(map)
    }

    /// The status for `outcome`, or `incoming` when nothing maps it.
    fn status(&self, outcome: &Outcome, incoming: u16) -> u16 {
        if outcome.timed_out {
            return self.timeout.unwrap_or(incoming);
        }
        let mapped = match outcome.exit_code {
            Some(code) => {
                self.exact
                    .get(&code)
                    .copied()
                    .or(if code != 0 { self.any_failure } else { None })
            }
            None => self.any_failure,
        };
        mapped.unwrap_or(incoming)
    }
}

/// The JSON envelope, fields in the documented order.
#[derive(Serialize)]
struct Envelope<'a> {
    status: u16,
    data: Value,
    exit_code: Option<i32>,
    timed_out: bool,
    request_id: &'a str,
}

/// The plugin.
struct ResponseShape;

impl Plugin for ResponseShape {
    type Config = Settings;

    fn validate(settings: &Settings) -> Result<(), String> {
        StatusMap::new(&settings.status_map)?;
        for (name, value) in &settings.headers {
            let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
            if name.is_empty() || !name.chars().all(token) {
                return Err(format!("headers.{name}: not a valid HTTP header name"));
            }
            if value.contains(['\r', '\n', '\0']) {
                return Err(format!(
                    "headers.{name}: the value must not contain CR, LF or NUL"
                ));
            }
        }
        if settings.mode == Mode::Passthrough && settings.data != DataMode::Auto {
            return Err("data: only applies to mode envelope".to_owned());
        }
        Ok(())
    }
}

impl Post for ResponseShape {
    fn post(
        settings: &Settings,
        ctx: &Context,
        _inv: &Invocation,
        outcome: &Outcome,
        reply: Reply,
    ) -> Result<Reply, String> {
        let map = StatusMap::new(&settings.status_map)?;
        Ok(shape(settings, &map, &ctx.request_id, outcome, reply))
    }
}

export_plugin!(ResponseShape, post);

/// The whole plugin.
fn shape(
    settings: &Settings,
    map: &StatusMap,
    request_id: &str,
    outcome: &Outcome,
    mut reply: Reply,
) -> Reply {
    reply.status = map.status(outcome, reply.status);
    if settings.mode == Mode::Envelope {
        reply = match embed(settings.data, &reply.body) {
            Ok(data) => {
                let envelope = Envelope {
                    status: reply.status,
                    data,
                    exit_code: outcome.exit_code,
                    timed_out: outcome.timed_out,
                    request_id,
                };
                let body = serde_json::to_vec(&envelope).expect("an envelope always serializes");
                reply.set_body(body);
                reply.set_header("Content-Type", "application/json");
                reply
            }
            Err(detail) => {
                warn!("{detail}");
                Reply::problem(502, "Bad Gateway", &detail)
            }
        };
    }
    for (name, value) in &settings.headers {
        reply.set_header(name, value);
    }
    reply
}

/// The output as the envelope's `data`.
fn embed(mode: DataMode, output: &[u8]) -> Result<Value, String> {
    let text = || Value::String(String::from_utf8_lossy(output).into_owned());
    match mode {
        DataMode::Text => Ok(text()),
        DataMode::Auto => Ok(serde_json::from_slice(output).unwrap_or_else(|_| text())),
        DataMode::Json => serde_json::from_slice(output)
            .map_err(|err| format!("the command's output is not JSON: {err}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn validate(json: &str) -> Result<(), String> {
        validate_config::<ResponseShape>(json)
    }

    fn outcome(exit_code: Option<i32>, timed_out: bool) -> Outcome {
        Outcome {
            exit_code,
            signal: if exit_code.is_none() { Some(9) } else { None },
            timed_out,
            duration_us: 1_000,
            via_reply_socket: false,
            stderr_tail: String::new(),
        }
    }

    fn run(config: Value, outcome: &Outcome, status: u16, body: &str) -> Reply {
        let json = config.to_string();
        validate(&json).expect("valid config");
        let settings = parse_config::<Settings>(&json).unwrap();
        let map = StatusMap::new(&settings.status_map).unwrap();
        let reply = Reply::new(status)
            .with_header("Content-Type", "text/plain")
            .with_header("Content-Length", &body.len().to_string())
            .with_body(body.as_bytes().to_vec());
        shape(&settings, &map, "req-1", outcome, reply)
    }

    fn body(reply: &Reply) -> Value {
        serde_json::from_slice(&reply.body).unwrap()
    }

    #[test]
    fn envelope_embeds_json_output_as_json() {
        let reply = run(
            json!({}),
            &outcome(Some(0), false),
            200,
            r#"{"items": [1, 2]}"#,
        );
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("content-type"), Some("application/json"));
        assert_eq!(
            reply.header("content-length"),
            Some(reply.body.len().to_string().as_str())
        );
        let text = String::from_utf8(reply.body.clone()).unwrap();
        assert_eq!(
            text,
            r#"{"status":200,"data":{"items":[1,2]},"exit_code":0,"timed_out":false,"request_id":"req-1"}"#,
            "fields in the documented order"
        );
    }

    #[test]
    fn auto_falls_back_to_text_and_text_mode_always_uses_it() {
        let reply = run(json!({}), &outcome(Some(0), false), 200, "plain words\n");
        assert_eq!(body(&reply)["data"], "plain words\n");
        let reply = run(
            json!({"data": "text"}),
            &outcome(Some(0), false),
            200,
            "[1]",
        );
        assert_eq!(body(&reply)["data"], "[1]");
        let reply = run(json!({}), &outcome(Some(0), false), 200, "");
        assert_eq!(body(&reply)["data"], "");
    }

    #[test]
    fn json_mode_turns_non_json_output_into_502() {
        let reply = run(
            json!({"data": "json", "headers": {"X-Api": "v1"}}),
            &outcome(Some(0), false),
            200,
            "oops",
        );
        assert_eq!(reply.status, 502);
        assert_eq!(
            reply.header("content-type"),
            Some("application/problem+json")
        );
        assert_eq!(
            body(&reply)["detail"],
            "the command's output is not JSON: expected value at line 1 column 1"
        );
        assert_eq!(
            reply.header("x-api"),
            Some("v1"),
            "headers apply to the problem too"
        );
    }

    #[test]
    fn status_map_by_exit_code_star_and_timeout() {
        let config = json!({"status-map": {"0": 201, "3": 404, "*": 502}});
        let status = |o: &Outcome, incoming| run(config.clone(), o, incoming, "x").status;
        assert_eq!(status(&outcome(Some(0), false), 200), 201);
        assert_eq!(status(&outcome(Some(3), false), 500), 404);
        assert_eq!(status(&outcome(Some(1), false), 500), 502);
        assert_eq!(status(&outcome(Some(-1), false), 500), 502);
        assert_eq!(
            status(&outcome(None, false), 500),
            502,
            "a signal is a failure"
        );
        assert_eq!(
            status(&outcome(None, true), 504),
            504,
            "a timeout keeps 504 unless mapped"
        );

        let reply = run(
            json!({"status-map": {"timeout": 503}}),
            &outcome(None, true),
            504,
            "partial",
        );
        assert_eq!(reply.status, 503);
        assert_eq!(
            body(&reply),
            json!({"status": 503, "data": "partial", "exit_code": null, "timed_out": true, "request_id": "req-1"})
        );

        let unmapped = run(
            json!({"status-map": {"3": 404}}),
            &outcome(Some(0), false),
            200,
            "x",
        );
        assert_eq!(
            unmapped.status, 200,
            "0 is not a failure for `*` or anything else"
        );
    }

    #[test]
    fn passthrough_keeps_the_body_and_sets_headers() {
        let reply = run(
            json!({"mode": "passthrough", "status-map": {"2": 422}, "headers": {"Content-Type": "text/csv", "X-A": "1"}}),
            &outcome(Some(2), false),
            500,
            "a,b\n",
        );
        assert_eq!(reply.status, 422);
        assert_eq!(reply.body, b"a,b\n");
        assert_eq!(reply.header("content-type"), Some("text/csv"));
        assert_eq!(reply.header("X-A"), Some("1"));
        assert_eq!(
            reply.headers.len(),
            3,
            "Content-Type replaced, not repeated"
        );
    }

    #[test]
    fn validate_names_the_field() {
        assert_eq!(
            validate(r#"{"status-map": {"x": 200}}"#),
            Err(r#"status-map.x: keys are exit codes ("0", "3"), "*" (any other failure) or "timeout""#.into())
        );
        assert_eq!(
            validate(r#"{"status-map": {"1": 99}}"#),
            Err("status-map.1: 99 is not an HTTP status (100-599)".into())
        );
        assert!(
            validate(r#"{"status-map": {"1": "x"}}"#)
                .unwrap_err()
                .starts_with("status-map.1: ")
        );
        assert!(
            validate(r#"{"mode": "wrap"}"#)
                .unwrap_err()
                .starts_with("mode: unknown variant `wrap`")
        );
        assert!(
            validate(r#"{"data": "xml"}"#)
                .unwrap_err()
                .starts_with("data: unknown variant `xml`")
        );
        assert_eq!(
            validate(r#"{"headers": {"Bad Name": "x"}}"#),
            Err("headers.Bad Name: not a valid HTTP header name".into())
        );
        assert_eq!(
            validate(r#"{"headers": {"X": "a\r\nInjected: 1"}}"#),
            Err("headers.X: the value must not contain CR, LF or NUL".into())
        );
        assert_eq!(
            validate(r#"{"mode": "passthrough", "data": "json"}"#),
            Err("data: only applies to mode envelope".into())
        );
        assert_eq!(validate("null"), Ok(()), "no config: every default");
        assert_eq!(validate("{}"), Ok(()));
    }
}
