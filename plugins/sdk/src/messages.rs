//! Helper methods on the contract's records: the vocabulary plugins share.

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::headers::HeaderList;
use crate::types::{AmqpOrigin, Context, HttpOrigin, Invocation, Origin, Reply};

/// The media type of RFC 9457 problem details.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// The value of the first pair named exactly `name`.
fn lookup<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// Keeps `Content-Length` true after a body changed, when there was one.
/// The command (and the HTTP client, for a reply) would otherwise read a
/// stale length; a header that was absent stays absent.
fn update_content_length(headers: &mut Vec<(String, String)>, len: usize) {
    if headers.get_header("content-length").is_some() {
        headers.set_header("Content-Length", &len.to_string());
    }
}

/// Checks that `name` can be a variable name: it must survive the trip to
/// `${var.NAME}` in `cmd` and to the environment variable `EXECD_VAR_NAME`
/// (upper-cased, `-` and `.` become `_`). Allowed: ASCII letters, digits,
/// `_`, `-` and `.`, starting with a letter or `_`. Plugins call this from
/// [`Plugin::validate`](crate::Plugin::validate) for every variable name
/// their config names, so a bad one stops start-up.
pub fn check_var_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    match chars.next() {
        None => Err("a variable name must not be empty".to_owned()),
        Some(first) if !(first.is_ascii_alphabetic() || first == '_') => Err(format!(
            "variable name {name:?} must start with a letter or `_`"
        )),
        Some(_) => {
            match chars.find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))) {
                Some(bad) => Err(format!(
                    "variable name {name:?} may only hold ASCII letters, digits, `_`, `-` and `.`, not {bad:?}"
                )),
                None => Ok(()),
            }
        }
    }
}

impl Context {
    /// The HTTP request facts, when the call came in over HTTP.
    pub fn http(&self) -> Option<&HttpOrigin> {
        match &self.origin {
            Origin::Http(http) => Some(http),
            Origin::Amqp(_) => None,
        }
    }

    /// The AMQP delivery facts, when the call came from a queue.
    pub fn amqp(&self) -> Option<&AmqpOrigin> {
        match &self.origin {
            Origin::Amqp(amqp) => Some(amqp),
            Origin::Http(_) => None,
        }
    }
}

impl Invocation {
    /// The first header named `name`, compared case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get_header(name)
    }

    /// Replaces every header named `name` with one `name: value`.
    pub fn set_header(&mut self, name: &str, value: &str) {
        self.headers.set_header(name, value);
    }

    /// Removes every header named `name`; returns how many went.
    pub fn remove_header(&mut self, name: &str) -> usize {
        self.headers.remove_header(name)
    }

    /// The first query parameter named exactly `name` (decoded).
    pub fn query_param(&self, name: &str) -> Option<&str> {
        lookup(&self.query, name)
    }

    /// Removes every query parameter named exactly `name`; returns how many
    /// went. Use it to keep a credential sent in the query from reaching the
    /// command.
    pub fn remove_query_param(&mut self, name: &str) -> usize {
        let before = self.query.len();
        self.query.retain(|(n, _)| n != name);
        before - self.query.len()
    }

    /// The path parameter named `name` (a `{name}` segment of the route url).
    pub fn param(&self, name: &str) -> Option<&str> {
        lookup(&self.params, name)
    }

    /// The variable named `name`, as set by an earlier plugin.
    pub fn var(&self, name: &str) -> Option<&str> {
        lookup(&self.vars, name)
    }

    /// Sets variable `name` (replacing an earlier value). It fills
    /// `${var.NAME}` in the route's `cmd` and reaches the command as
    /// `EXECD_VAR_NAME`.
    pub fn set_var(&mut self, name: &str, value: &str) {
        self.vars.retain(|(n, _)| n != name);
        self.vars.push((name.to_owned(), value.to_owned()));
    }

    /// Sets variable `name` from a JSON value: a string as it is (no quotes),
    /// anything else as compact JSON text (`42`, `true`, `null`, `{"a":1}`).
    pub fn set_var_json(&mut self, name: &str, value: &Value) {
        match value {
            Value::String(text) => self.set_var(name, text),
            other => self.set_var(name, &other.to_string()),
        }
    }

    /// Parses the body as JSON into `T`.
    ///
    /// On failure returns the reply to send: a 400 problem whose detail is
    /// `request body is not JSON: <error with line and column>` (or
    /// `request body does not match the expected shape: ...` when it is JSON
    /// of the wrong shape), ready for `Decision::Reply`.
    pub fn json_body<T: DeserializeOwned>(&self) -> Result<T, Reply> {
        serde_json::from_slice(&self.body).map_err(|err| {
            let detail = if err.is_data() {
                format!("request body does not match the expected shape: {err}")
            } else {
                format!("request body is not JSON: {err}")
            };
            Reply::problem(400, "Bad Request", &detail)
        })
    }

    /// Replaces the body, keeping `Content-Length` true if it was present.
    pub fn set_body(&mut self, body: Vec<u8>) {
        update_content_length(&mut self.headers, body.len());
        self.body = body;
    }
}

impl Reply {
    /// An empty reply with `status`.
    pub fn new(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// A reply whose body is `value` as JSON (`application/json`).
    ///
    /// Serializing a `serde_json::Value` or a derived struct cannot fail; a
    /// type that can (a map with non-string keys) yields a 500 problem
    /// instead, so this always returns something to send.
    pub fn json<T: Serialize + ?Sized>(status: u16, value: &T) -> Reply {
        match serde_json::to_vec(value) {
            Ok(body) => Reply::new(status)
                .with_header("Content-Type", "application/json")
                .with_body(body),
            Err(err) => Reply::problem(
                500,
                "Internal Server Error",
                &format!("the plugin could not serialize its reply: {err}"),
            ),
        }
    }

    /// A plain-text reply (`text/plain; charset=utf-8`).
    pub fn text(status: u16, text: &str) -> Reply {
        Reply::new(status)
            .with_header("Content-Type", "text/plain; charset=utf-8")
            .with_body(text.as_bytes().to_vec())
    }

    /// An RFC 9457 problem-details reply (`application/problem+json`) with
    /// the members `type` (`about:blank`: the status says it all), `title`
    /// (short, the same for every occurrence, e.g. `Unauthorized`), `status`
    /// and `detail` (this occurrence, e.g. `the API key is invalid`).
    pub fn problem(status: u16, title: &str, detail: &str) -> Reply {
        /// The members in the RFC's order, which a `json!` map would sort.
        #[derive(Serialize)]
        struct Problem<'a> {
            r#type: &'a str,
            title: &'a str,
            status: u16,
            detail: &'a str,
        }
        let problem = Problem {
            r#type: "about:blank",
            title,
            status,
            detail,
        };
        let body = serde_json::to_vec(&problem).expect("strings and a number always serialize");
        Reply::new(status)
            .with_header("Content-Type", PROBLEM_JSON)
            .with_body(body)
    }

    /// Builder form of [`Reply::set_header`].
    #[must_use]
    pub fn with_header(mut self, name: &str, value: &str) -> Reply {
        self.set_header(name, value);
        self
    }

    /// Builder form of [`Reply::set_body`].
    #[must_use]
    pub fn with_body(mut self, body: Vec<u8>) -> Reply {
        self.set_body(body);
        self
    }

    /// The first header named `name`, compared case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get_header(name)
    }

    /// Replaces every header named `name` with one `name: value`.
    pub fn set_header(&mut self, name: &str, value: &str) {
        self.headers.set_header(name, value);
    }

    /// Removes every header named `name`; returns how many went.
    pub fn remove_header(&mut self, name: &str) -> usize {
        self.headers.remove_header(name)
    }

    /// Replaces the body, keeping `Content-Length` true if it was present.
    pub fn set_body(&mut self, body: Vec<u8>) {
        update_content_length(&mut self.headers, body.len());
        self.body = body;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    fn invocation() -> Invocation {
        Invocation {
            headers: vec![
                ("content-type".into(), "application/json".into()),
                ("Content-Length".into(), "7".into()),
            ],
            params: vec![("id".into(), "42".into())],
            query: vec![("api_key".into(), "k".into()), ("page".into(), "2".into())],
            vars: vec![],
            body: br#"{"a":1}"#.to_vec(),
        }
    }

    #[test]
    fn var_names() {
        for good in ["user_id", "_x", "a.b-c", "Z9"] {
            assert_eq!(check_var_name(good), Ok(()), "{good}");
        }
        for bad in ["", "9lives", "-x", "a b", "a$b", "ü"] {
            assert!(check_var_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn problem_has_the_rfc_9457_members() {
        let reply = Reply::problem(401, "Unauthorized", "the API key is invalid");
        assert_eq!(reply.status, 401);
        assert_eq!(reply.header("content-type"), Some(PROBLEM_JSON));
        assert_eq!(
            String::from_utf8(reply.body).unwrap(),
            r#"{"type":"about:blank","title":"Unauthorized","status":401,"detail":"the API key is invalid"}"#
        );
    }

    #[test]
    fn json_reply_serializes_and_sets_content_type() {
        let reply = Reply::json(201, &serde_json::json!({"ok": true}));
        assert_eq!(reply.status, 201);
        assert_eq!(reply.header("Content-Type"), Some("application/json"));
        assert_eq!(reply.body, br#"{"ok":true}"#);
    }

    #[test]
    fn text_reply() {
        let reply = Reply::text(200, "hi");
        assert_eq!(reply.body, b"hi");
        assert_eq!(
            reply.header("content-type"),
            Some("text/plain; charset=utf-8")
        );
    }

    #[test]
    fn lookups_and_vars() {
        let mut inv = invocation();
        assert_eq!(inv.header("Content-Type"), Some("application/json"));
        assert_eq!(inv.param("id"), Some("42"));
        assert_eq!(inv.query_param("page"), Some("2"));
        assert_eq!(inv.remove_query_param("api_key"), 1);
        assert_eq!(inv.query_param("api_key"), None);

        inv.set_var("user", "a");
        inv.set_var("user", "b");
        assert_eq!(inv.vars, vec![("user".to_owned(), "b".to_owned())]);
        inv.set_var_json("n", &serde_json::json!(7));
        inv.set_var_json("s", &serde_json::json!("text"));
        inv.set_var_json("o", &serde_json::json!({"k": [1]}));
        assert_eq!(inv.var("n"), Some("7"));
        assert_eq!(inv.var("s"), Some("text"));
        assert_eq!(inv.var("o"), Some(r#"{"k":[1]}"#));
    }

    #[test]
    fn set_body_keeps_content_length_true() {
        let mut inv = invocation();
        inv.set_body(b"{}".to_vec());
        assert_eq!(inv.header("content-length"), Some("2"));

        let mut reply = Reply::new(200);
        reply.set_body(b"abc".to_vec());
        assert_eq!(reply.header("content-length"), None, "absent stays absent");
    }

    #[test]
    fn json_body_parses_or_answers_400() {
        #[derive(Debug, Deserialize)]
        struct Body {
            a: u32,
        }
        let mut inv = invocation();
        assert_eq!(inv.json_body::<Body>().unwrap().a, 1);

        inv.body = b"{\"a\":".to_vec();
        let reply = inv.json_body::<Value>().unwrap_err();
        assert_eq!(reply.status, 400);
        let body: Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(
            body["detail"],
            "request body is not JSON: EOF while parsing a value at line 1 column 5"
        );

        inv.body = br#"{"a":"x"}"#.to_vec();
        let reply = inv.json_body::<Body>().unwrap_err();
        let body: Value = serde_json::from_slice(&reply.body).unwrap();
        assert!(
            body["detail"]
                .as_str()
                .unwrap()
                .starts_with("request body does not match the expected shape: invalid type"),
            "{body}"
        );
    }
}
