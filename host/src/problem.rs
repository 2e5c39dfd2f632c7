//! Errors that execd itself produces, as `application/problem+json`
//! (RFC 9457), always carrying the request id.

use bytes::Bytes;
use serde_json::{Value, json};

use crate::pipeline::Reply;

pub const CONTENT_TYPE: &str = "application/problem+json";

/// A problem reply. `kind` becomes the type URI `urn:execd:problem:KIND`,
/// stable for clients to match on.
pub fn reply(status: u16, kind: &str, title: &str, detail: &str, request_id: &str) -> Reply {
    let body = json!({
        "type": format!("urn:execd:problem:{kind}"),
        "title": title,
        "status": status,
        "detail": detail,
        "request_id": request_id,
    });
    Reply {
        status,
        headers: vec![("content-type".into(), CONTENT_TYPE.into())],
        body: Bytes::from(body.to_string()),
    }
}

/// Adds an extension member to a problem reply built by [`reply`].
pub fn with_field(mut r: Reply, key: &str, value: impl Into<Value>) -> Reply {
    if let Ok(Value::Object(mut map)) = serde_json::from_slice::<Value>(&r.body) {
        map.insert(key.to_string(), value.into());
        r.body = Bytes::from(Value::Object(map).to_string());
    }
    r
}
