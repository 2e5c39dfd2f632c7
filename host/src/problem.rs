//! Errors that execd itself produces, as `application/problem+json`
//! (RFC 9457), always carrying the request id.

use bytes::Bytes;
use serde_json::Value;

use crate::pipeline::Reply;

pub const CONTENT_TYPE: &str = "application/problem+json";

/// A problem reply. `kind` becomes the type URI `urn:execd:problem:KIND`,
/// stable for clients to match on.
pub fn reply(status: u16, kind: &str, title: &str, detail: &str, request_id: &str) -> Reply {
    /// The members in RFC 9457's order, serialized without building a map.
    #[derive(serde::Serialize)]
    struct Problem<'a> {
        #[serde(rename = "type")]
        kind: std::fmt::Arguments<'a>,
        title: &'a str,
        status: u16,
        detail: &'a str,
        request_id: &'a str,
    }
    let body = serde_json::to_vec(&Problem {
        kind: format_args!("urn:execd:problem:{kind}"),
        title,
        status,
        detail,
        request_id,
    })
    .expect("a problem serializes");
    Reply {
        status,
        headers: vec![("content-type".into(), CONTENT_TYPE.into())],
        body: Bytes::from(body),
    }
}

/// Adds a member to a problem body (execd's own, or a plugin's), or
/// replaces it. A body that is not a JSON object is left as it is.
pub fn with_field(mut r: Reply, key: &str, value: impl Into<Value>) -> Reply {
    match scan_object(&r.body, key) {
        // The usual case, a member the body lacks: spliced in after the
        // opening brace, so the body is neither rebuilt nor reordered.
        Some(Scan {
            has_key: false,
            empty,
        }) => {
            let start = r.body.iter().position(|b| *b == b'{').expect("an object");
            let mut body = Vec::with_capacity(r.body.len() + key.len() + 64);
            body.extend_from_slice(&r.body[..=start]);
            serde_json::to_writer(&mut body, key).expect("a string serializes");
            body.push(b':');
            serde_json::to_writer(&mut body, &value.into()).expect("a value serializes");
            if !empty {
                body.push(b',');
            }
            body.extend_from_slice(&r.body[start + 1..]);
            r.body = Bytes::from(body);
        }
        Some(Scan { has_key: true, .. }) => {
            if let Ok(Value::Object(mut map)) = serde_json::from_slice::<Value>(&r.body) {
                map.insert(key.to_string(), value.into());
                r.body = Bytes::from(Value::Object(map).to_string());
            }
        }
        None => {}
    }
    r
}

/// What [`scan_object`] found in a JSON object.
struct Scan {
    has_key: bool,
    empty: bool,
}

/// Checks that `body` is one JSON object and whether it has the member
/// `key`, skipping the values instead of building them.
fn scan_object(body: &[u8], key: &str) -> Option<Scan> {
    use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
    use std::fmt;

    struct IsKey<'k>(&'k str);
    impl<'de> DeserializeSeed<'de> for IsKey<'_> {
        type Value = bool;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
            d.deserialize_str(self)
        }
    }
    impl<'de> Visitor<'de> for IsKey<'_> {
        type Value = bool;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a member name")
        }
        fn visit_str<E>(self, v: &str) -> Result<bool, E> {
            Ok(v == self.0)
        }
    }

    struct Object<'k>(&'k str);
    impl<'de> Visitor<'de> for Object<'_> {
        type Value = Scan;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Scan, A::Error> {
            let mut scan = Scan {
                has_key: false,
                empty: true,
            };
            while let Some(is_key) = map.next_key_seed(IsKey(self.0))? {
                map.next_value::<IgnoredAny>()?;
                scan.has_key |= is_key;
                scan.empty = false;
            }
            Ok(scan)
        }
    }

    let mut de = serde_json::Deserializer::from_slice(body);
    let scan = de.deserialize_map(Object(key)).ok()?;
    de.end().ok()?;
    Some(scan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(r: &Reply) -> Value {
        serde_json::from_slice(&r.body).expect("JSON")
    }

    fn problem_body(text: &str) -> Reply {
        Reply {
            status: 401,
            headers: vec![("content-type".into(), CONTENT_TYPE.into())],
            body: Bytes::from(text.to_string()),
        }
    }

    #[test]
    fn a_problem_carries_its_members() {
        let r = reply(
            404,
            "not-found",
            "Not found",
            "no route serves /x \"y\"",
            "rid-1",
        );
        assert_eq!(r.status, 404);
        assert_eq!(
            body(&r),
            json!({"type": "urn:execd:problem:not-found", "title": "Not found", "status": 404,
                   "detail": "no route serves /x \"y\"", "request_id": "rid-1"})
        );
    }

    #[test]
    fn with_field_adds_a_missing_member_and_keeps_the_rest() {
        let r = with_field(
            problem_body(r#" {"title":"No","n":[1,{"a":2}]} "#),
            "request_id",
            "r\"1",
        );
        assert_eq!(
            body(&r),
            json!({"request_id": "r\"1", "title": "No", "n": [1, {"a": 2}]})
        );
        let r = with_field(problem_body("{}"), "exit_code", 3);
        assert_eq!(body(&r), json!({"exit_code": 3}));
    }

    #[test]
    fn with_field_replaces_a_member_the_body_has() {
        // Also when the name is written with an escape.
        for text in [
            r#"{"title":"No","request_id":"old"}"#,
            r#"{"title":"No","request\u005fid":"old"}"#,
        ] {
            let r = with_field(problem_body(text), "request_id", "new");
            assert_eq!(
                body(&r),
                json!({"title": "No", "request_id": "new"}),
                "{text}"
            );
        }
    }

    #[test]
    fn with_field_leaves_a_body_that_is_not_one_object() {
        for text in ["[1]", "not json", r#"{"a":1} {"b":2}"#, r#"{"a":1"#, ""] {
            let r = with_field(problem_body(text), "request_id", "x");
            assert_eq!(&r.body[..], text.as_bytes(), "{text}");
        }
    }
}
