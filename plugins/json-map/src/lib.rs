//! # json-map — map a JSON request body (pre plugin)
//!
//! Picks values out of the JSON request body into variables (so `cmd` can
//! say `${var.user_id}` and the script sees `EXECD_VAR_USER_ID`), and can
//! rewrite the body into the shape the script expects.
//!
//! ```yaml
//! plugins:
//!   - name: json-map
//!     config:
//!       fields:
//!         user_id: { pointer: /user/id, required: true }
//!         locale:  { pointer: /prefs/locale, default: "en" }
//!         tags:    { pointer: /tags }           # optional: unset if absent
//!       body:                                   # optional: the new body
//!         id: "${/user/id}"
//!         items: "${/order/items}"
//!         source: api
//! ```
//!
//! - `pointer` is an RFC 6901 JSON pointer into the body (`""` is the whole
//!   body). A string becomes the variable as it is; any other value as
//!   compact JSON text (`42`, `true`, `null`, `["a","b"]`).
//! - `required: true`: a missing value answers `400` with the detail
//!   `missing required field /user/id` (every missing one is named).
//!   Otherwise `default` (any JSON value; `null` means none) is used, or the
//!   variable is left unset.
//! - `body`: a JSON template. A string that is exactly `"${<pointer>}"` is
//!   replaced by the value found there, of any type (`null` when absent);
//!   everything else is kept as written. The new body is sent as compact
//!   JSON with `Content-Type: application/json` (and a `Content-Length`
//!   that stays true, if the request had one).
//!
//! A body that is not JSON answers `400` with the detail
//! `request body is not JSON: <error> at line L column C`.

use std::collections::BTreeMap;

use execd_plugin_sdk::prelude::*;
use serde::Deserialize;
use serde_json::Value;

/// The plugin's configuration (see the crate docs).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    /// Variable name -> where its value comes from.
    #[serde(default)]
    fields: BTreeMap<String, Field>,
    /// The template of the new body, if the body is to be rewritten.
    #[serde(default)]
    body: Option<Value>,
}

/// One variable's source.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Field {
    /// RFC 6901 pointer into the request body.
    pointer: String,
    /// Answer 400 when the value is absent.
    #[serde(default)]
    required: bool,
    /// The value when absent (and not required); `null` means none.
    #[serde(default)]
    default: Option<Value>,
}

/// The plugin.
struct JsonMap;

impl Plugin for JsonMap {
    type Config = Settings;

    fn validate(settings: &Settings) -> Result<(), String> {
        if settings.fields.is_empty() && settings.body.is_none() {
            return Err(
                "fields or body: give at least one; without them the plugin does nothing"
                    .to_owned(),
            );
        }
        for (var, field) in &settings.fields {
            check_var_name(var).map_err(|err| format!("fields.{var}: {err}"))?;
            check_pointer(&field.pointer).map_err(|err| format!("fields.{var}.pointer: {err}"))?;
            if field.required && field.default.is_some() {
                return Err(format!(
                    "fields.{var}: `default` is never used when `required` is true; drop one"
                ));
            }
        }
        if let Some(template) = &settings.body {
            check_template(template, "body")?;
        }
        Ok(())
    }
}

impl Pre for JsonMap {
    fn pre(settings: &Settings, _ctx: &Context, inv: Invocation) -> Result<Decision, String> {
        Ok(map(settings, inv))
    }
}

export_plugin!(JsonMap, pre);

/// The whole plugin: parse, pick, rewrite.
fn map(settings: &Settings, mut inv: Invocation) -> Decision {
    let body: Value = match inv.json_body() {
        Ok(body) => body,
        Err(reply) => return Decision::Reply(reply),
    };

    let mut missing = Vec::new();
    for (var, field) in &settings.fields {
        match (body.pointer(&field.pointer), &field.default) {
            (Some(value), _) | (None, Some(value)) => inv.set_var_json(var, value),
            (None, None) if field.required => missing.push(field.pointer.as_str()),
            (None, None) => {}
        }
    }
    if !missing.is_empty() {
        let detail = match missing.as_slice() {
            [one] => format!("missing required field {one}"),
            many => format!("missing required fields {}", many.join(", ")),
        };
        return Decision::Reply(Reply::problem(400, "Bad Request", &detail));
    }

    if let Some(template) = &settings.body {
        let rewritten = render(template, &body);
        inv.set_body(rewritten.to_string().into_bytes());
        inv.set_header("Content-Type", "application/json");
    }
    Decision::Continue(inv)
}

/// The pointer of a `"${/a/b}"` template string, if it is one.
fn placeholder(text: &str) -> Option<&str> {
    text.strip_prefix("${")?.strip_suffix('}')
}

/// The template with every placeholder replaced by its value in `body`.
fn render(template: &Value, body: &Value) -> Value {
    match template {
        Value::String(text) => match placeholder(text) {
            Some(pointer) => body.pointer(pointer).cloned().unwrap_or(Value::Null),
            None => template.clone(),
        },
        Value::Array(items) => Value::Array(items.iter().map(|item| render(item, body)).collect()),
        Value::Object(members) => Value::Object(
            members
                .iter()
                .map(|(key, value)| (key.clone(), render(value, body)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// RFC 6901 syntax: empty, or `/`-separated tokens where `~` is only ever
/// followed by `0` or `1`. (serde_json's lookup just finds nothing for a bad
/// pointer; checking at load turns a typo into a start-up error.)
fn check_pointer(pointer: &str) -> Result<(), String> {
    if !pointer.is_empty() && !pointer.starts_with('/') {
        return Err(format!(
            "{pointer:?} is not a JSON pointer: it must start with `/` (or be \"\" for the whole body)"
        ));
    }
    let mut chars = pointer.chars();
    while let Some(c) = chars.next() {
        if c == '~' && !matches!(chars.next(), Some('0' | '1')) {
            return Err(format!(
                "{pointer:?} is not a JSON pointer: `~` must be followed by 0 (for ~) or 1 (for /)"
            ));
        }
    }
    Ok(())
}

/// Checks every placeholder's pointer; `path` names where in the template.
fn check_template(template: &Value, path: &str) -> Result<(), String> {
    match template {
        Value::String(text) => match placeholder(text) {
            Some(pointer) => check_pointer(pointer).map_err(|err| format!("{path}: {err}")),
            None => Ok(()),
        },
        Value::Array(items) => items
            .iter()
            .enumerate()
            .try_for_each(|(i, item)| check_template(item, &format!("{path}[{i}]"))),
        Value::Object(members) => members
            .iter()
            .try_for_each(|(key, value)| check_template(value, &format!("{path}.{key}"))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn validate(json: &str) -> Result<(), String> {
        validate_config::<JsonMap>(json)
    }

    fn run(config: Value, body: &str) -> Decision {
        let json = config.to_string();
        validate(&json).expect("valid config");
        let settings = parse_config::<Settings>(&json).unwrap();
        let inv = Invocation {
            headers: vec![
                (
                    "Content-Type".into(),
                    "application/x-www-form-urlencoded".into(),
                ),
                ("Content-Length".into(), body.len().to_string()),
            ],
            params: vec![],
            query: vec![],
            vars: vec![],
            body: body.as_bytes().to_vec(),
        };
        map(&settings, inv)
    }

    fn continued(decision: Decision) -> Invocation {
        match decision {
            Decision::Continue(inv) => inv,
            Decision::Reply(reply) => panic!("replied: {}", String::from_utf8_lossy(&reply.body)),
        }
    }

    fn problem(decision: Decision) -> (u16, String) {
        match decision {
            Decision::Reply(reply) => {
                let body: Value = serde_json::from_slice(&reply.body).unwrap();
                (reply.status, body["detail"].as_str().unwrap().to_owned())
            }
            Decision::Continue(_) => panic!("expected a problem reply"),
        }
    }

    const ORDER: &str = r#"{"user": {"id": "u-7", "age": 41, "admin": false},
                            "order": {"items": [{"sku": "a"}, {"sku": "b"}], "note": null},
                            "a/b": {"~x": 1}}"#;

    #[test]
    fn fields_become_text_variables() {
        let inv = continued(run(
            json!({"fields": {
                "user_id": {"pointer": "/user/id", "required": true},
                "age": {"pointer": "/user/age"},
                "admin": {"pointer": "/user/admin"},
                "items": {"pointer": "/order/items"},
                "note": {"pointer": "/order/note"},
                "escaped": {"pointer": "/a~1b/~0x"},
                "locale": {"pointer": "/prefs/locale", "default": "en"},
                "absent": {"pointer": "/nope"},
            }}),
            ORDER,
        ));
        assert_eq!(inv.var("user_id"), Some("u-7"));
        assert_eq!(inv.var("age"), Some("41"));
        assert_eq!(inv.var("admin"), Some("false"));
        assert_eq!(inv.var("items"), Some(r#"[{"sku":"a"},{"sku":"b"}]"#));
        assert_eq!(inv.var("note"), Some("null"), "present but null is present");
        assert_eq!(inv.var("escaped"), Some("1"));
        assert_eq!(inv.var("locale"), Some("en"));
        assert_eq!(inv.var("absent"), None);
        assert_eq!(
            inv.header("content-type"),
            Some("application/x-www-form-urlencoded"),
            "body untouched"
        );
        assert_eq!(inv.body, ORDER.as_bytes());
    }

    #[test]
    fn missing_required_fields_answer_400_naming_each_pointer() {
        let config = json!({"fields": {
            "user_id": {"pointer": "/user/id", "required": true},
            "email": {"pointer": "/user/email", "required": true},
        }});
        assert_eq!(
            problem(run(config.clone(), r#"{"user": {"id": 1}}"#)),
            (400, "missing required field /user/email".to_owned())
        );
        assert_eq!(
            problem(run(config, "{}")),
            (
                400,
                "missing required fields /user/email, /user/id".to_owned()
            )
        );
    }

    #[test]
    fn a_body_that_is_not_json_answers_400_with_line_and_column() {
        let config = json!({"fields": {"x": {"pointer": "/x"}}});
        assert_eq!(
            problem(run(config.clone(), "{\n  \"x\": 1,\n}")),
            (
                400,
                "request body is not JSON: trailing comma at line 3 column 1".to_owned()
            )
        );
        assert_eq!(
            problem(run(config, "<a/>")),
            (
                400,
                "request body is not JSON: expected value at line 1 column 1".to_owned()
            )
        );
    }

    #[test]
    fn body_template_replaces_exact_placeholders_with_any_type() {
        let inv = continued(run(
            json!({"body": {
                "id": "${/user/id}",
                "age": "${/user/age}",
                "items": "${/order/items}",
                "first": ["${/order/items/0/sku}", "literal", 3, {"deep": "${/user/admin}"}],
                "missing": "${/nope}",
                "whole": "${}",
                "not-a-placeholder": "id is ${/user/id}",
            }}),
            r#"{"user": {"id": "u-7", "age": 41, "admin": false}, "order": {"items": [{"sku": "a"}]}}"#,
        ));
        let body: Value = serde_json::from_slice(&inv.body).unwrap();
        assert_eq!(
            body,
            json!({
                "id": "u-7",
                "age": 41,
                "items": [{"sku": "a"}],
                "first": ["a", "literal", 3, {"deep": false}],
                "missing": null,
                "whole": {"user": {"id": "u-7", "age": 41, "admin": false}, "order": {"items": [{"sku": "a"}]}},
                "not-a-placeholder": "id is ${/user/id}",
            })
        );
        assert_eq!(inv.header("Content-Type"), Some("application/json"));
        assert_eq!(
            inv.header("Content-Length"),
            Some(inv.body.len().to_string().as_str())
        );
    }

    #[test]
    fn validate_names_the_field() {
        assert!(validate("{}").unwrap_err().starts_with("fields or body: "));
        assert_eq!(
            validate(r#"{"fields": {"x": {"pointer": "user/id"}}}"#),
            Err(r#"fields.x.pointer: "user/id" is not a JSON pointer: it must start with `/` (or be "" for the whole body)"#.into())
        );
        assert!(
            validate(r#"{"fields": {"x": {"pointer": "/a~2"}}}"#)
                .unwrap_err()
                .starts_with("fields.x.pointer: ")
        );
        assert!(
            validate(r#"{"fields": {"bad var": {"pointer": "/a"}}}"#)
                .unwrap_err()
                .starts_with("fields.bad var: ")
        );
        assert!(
            validate(r#"{"fields": {"x": {"pointer": "/a", "required": true, "default": 1}}}"#)
                .unwrap_err()
                .starts_with("fields.x: `default` is never used")
        );
        let err = validate(r#"{"fields": {"x": {"pointer": "/a", "requird": true}}}"#).unwrap_err();
        assert!(
            err.starts_with("fields.x.requird: unknown field `requird`"),
            "{err}"
        );
        assert_eq!(
            validate(r#"{"body": {"a": [1, {"b": "${x}"}]}}"#),
            Err(r#"body.a[1].b: "x" is not a JSON pointer: it must start with `/` (or be "" for the whole body)"#.into())
        );
        assert_eq!(
            validate(r#"{"body": {"a": "${/x}"}, "fields": {"x": {"pointer": ""}}}"#),
            Ok(())
        );
    }
}
