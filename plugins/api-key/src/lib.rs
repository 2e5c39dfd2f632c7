//! # api-key — require an API key (pre plugin)
//!
//! Answers `401` with an `application/problem+json` body and a
//! `WWW-Authenticate` header unless the request carries one of the configured
//! keys; on success the command runs, with the variable `api_key_id` naming
//! which key was used.
//!
//! ```yaml
//! plugins:
//!   - name: api-key
//!     config:
//!       keys:
//!         - "k-3f9a..."                        # id: its index, "0"
//!         - { key: "k-77b1...", id: alice }    # id: "alice"
//!       header: X-Api-Key      # default; `Authorization` when `scheme` is set
//!       query: api_key         # also accept ?api_key=...; default: none
//!       scheme: Bearer         # read `<header>: Bearer <key>`; default: none
//!       id-var: api_key_id     # default; null: set no variable
//!       hide-credentials: false  # true: strip the key before the command runs
//! ```
//!
//! The header wins over the query parameter when both are present. Keys are
//! compared in constant time (SHA-256 of both sides, then `subtle`), against
//! every configured key, so neither the key's length nor how much of it
//! matched shows in the timing. The key itself is never logged.

use execd_plugin_sdk::prelude::*;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, de::value::MapAccessDeserializer};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The plugin's configuration (see the crate docs).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Settings {
    /// The accepted keys; at least one.
    keys: Vec<KeyEntry>,
    /// The header holding the key; default `X-Api-Key`, or `Authorization`
    /// when `scheme` is set.
    #[serde(default)]
    header: Option<String>,
    /// A query parameter that may hold the key instead, if any.
    #[serde(default)]
    query: Option<String>,
    /// An auth scheme (`Bearer`): the header then reads `<scheme> <key>`.
    #[serde(default)]
    scheme: Option<String>,
    /// The variable that receives the matching key's id; `null` for none.
    #[serde(default = "default_id_var")]
    id_var: Option<String>,
    /// Remove the key from the headers and query before the command runs,
    /// so that the script never sees it (it would otherwise reach the
    /// command's environment and could end up in its logs).
    #[serde(default)]
    hide_credentials: bool,
}

fn default_id_var() -> Option<String> {
    Some("api_key_id".to_owned())
}

/// One accepted key: a bare string, or `{ key, id }` to name its holder.
#[derive(Debug)]
struct KeyEntry {
    /// The secret itself.
    key: String,
    /// What `id-var` is set to when this key matches, if named.
    id: Option<String>,
}

/// The object form of a key entry.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NamedKey {
    key: String,
    id: String,
}

/// A key entry is a string or an object; a hand-written visitor so that a
/// wrong shape gets a message saying both forms, not serde's "did not match
/// any variant of untagged enum".
impl<'de> Deserialize<'de> for KeyEntry {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<KeyEntry, D::Error> {
        struct EntryVisitor;

        impl<'de> Visitor<'de> for EntryVisitor {
            type Value = KeyEntry;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a key string or an object `{ key, id }`")
            }

            fn visit_str<E: de::Error>(self, key: &str) -> Result<KeyEntry, E> {
                Ok(KeyEntry {
                    key: key.to_owned(),
                    id: None,
                })
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<KeyEntry, A::Error> {
                let named = NamedKey::deserialize(MapAccessDeserializer::new(map))?;
                Ok(KeyEntry {
                    key: named.key,
                    id: Some(named.id),
                })
            }
        }

        deserializer.deserialize_any(EntryVisitor)
    }
}

impl Settings {
    /// The header the key is read from.
    fn header(&self) -> &str {
        match (&self.header, &self.scheme) {
            (Some(header), _) => header,
            (None, Some(_)) => "Authorization",
            (None, None) => "X-Api-Key",
        }
    }

    /// The `WWW-Authenticate` challenge: the scheme when there is one,
    /// otherwise a non-standard `ApiKey` challenge that says where to send it.
    fn challenge(&self) -> String {
        match &self.scheme {
            Some(scheme) => format!("{scheme} realm=\"execd\""),
            None => {
                let mut challenge = format!("ApiKey header=\"{}\"", self.header());
                if let Some(query) = &self.query {
                    challenge.push_str(&format!(", query=\"{query}\""));
                }
                challenge
            }
        }
    }
}

/// The plugin.
struct ApiKey;

impl Plugin for ApiKey {
    type Config = Settings;

    fn validate(settings: &Settings) -> Result<(), String> {
        if settings.keys.is_empty() {
            return Err("keys: list at least one key".to_owned());
        }
        for (i, entry) in settings.keys.iter().enumerate() {
            if entry.key.is_empty() {
                return Err(format!("keys[{i}]: the key must not be empty"));
            }
            if entry.id.as_deref() == Some("") {
                return Err(format!("keys[{i}].id: must not be empty"));
            }
            if let Some(j) = settings.keys[..i].iter().position(|e| e.key == entry.key) {
                return Err(format!("keys[{i}]: the same key as keys[{j}]"));
            }
        }
        for (field, value) in [
            ("header", &settings.header),
            ("query", &settings.query),
            ("scheme", &settings.scheme),
        ] {
            if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                return Err(format!("{field}: must not be empty (leave it out instead)"));
            }
        }
        if settings
            .scheme
            .as_deref()
            .is_some_and(|s| s.contains(char::is_whitespace))
        {
            return Err("scheme: must be one word, like `Bearer`".to_owned());
        }
        if let Some(var) = &settings.id_var {
            check_var_name(var).map_err(|err| format!("id-var: {err}"))?;
        }
        Ok(())
    }
}

impl Pre for ApiKey {
    fn pre(settings: &Settings, _ctx: &Context, inv: Invocation) -> Result<Decision, String> {
        Ok(decide(settings, inv))
    }
}

export_plugin!(ApiKey, pre);

/// Why a request was turned away.
#[derive(Debug, PartialEq)]
enum Rejection {
    /// No key anywhere it was looked for.
    Missing,
    /// The header is there but not in the `<scheme> <key>` form.
    WrongScheme,
    /// A key that is not one of the configured keys.
    Invalid,
}

/// The whole plugin: authenticate, then continue or answer 401.
fn decide(settings: &Settings, mut inv: Invocation) -> Decision {
    match authenticate(settings, &inv) {
        Ok(index) => {
            if let Some(var) = &settings.id_var {
                let entry = &settings.keys[index];
                let id = entry.id.clone().unwrap_or_else(|| index.to_string());
                inv.set_var(var, &id);
            }
            if settings.hide_credentials {
                inv.remove_header(settings.header());
                if let Some(query) = &settings.query {
                    inv.remove_query_param(query);
                }
            }
            Decision::Continue(inv)
        }
        Err(rejection) => {
            let detail = match rejection {
                Rejection::Missing => match &settings.query {
                    Some(query) => format!(
                        "missing API key: send it in the {} header or the {query} query parameter",
                        settings.header()
                    ),
                    None => format!(
                        "missing API key: send it in the {} header",
                        settings.header()
                    ),
                },
                Rejection::WrongScheme => format!(
                    "the {} header must read `{} <key>`",
                    settings.header(),
                    settings.scheme.as_deref().unwrap_or_default()
                ),
                Rejection::Invalid => "invalid API key".to_owned(),
            };
            info!("request rejected: {detail}");
            Decision::Reply(
                Reply::problem(401, "Unauthorized", &detail)
                    .with_header("WWW-Authenticate", &settings.challenge()),
            )
        }
    }
}

/// The index of the configured key the request presents.
fn authenticate(settings: &Settings, inv: &Invocation) -> Result<usize, Rejection> {
    let presented = match inv.header(settings.header()) {
        Some(value) => match &settings.scheme {
            Some(scheme) => strip_scheme(value, scheme).ok_or(Rejection::WrongScheme)?,
            None => value.trim(),
        },
        None => settings
            .query
            .as_deref()
            .and_then(|name| inv.query_param(name))
            .ok_or(Rejection::Missing)?,
    };
    if presented.is_empty() {
        return Err(Rejection::Missing);
    }
    find_key(&settings.keys, presented).ok_or(Rejection::Invalid)
}

/// `Bearer abc` -> `abc` (scheme compared case-insensitively, RFC 9110).
fn strip_scheme<'a>(value: &'a str, scheme: &str) -> Option<&'a str> {
    let (given, rest) = value.trim().split_once(char::is_whitespace)?;
    given.eq_ignore_ascii_case(scheme).then(|| rest.trim())
}

/// Constant-time search: hashes level the lengths, every key is compared,
/// and the loop never exits early.
fn find_key(keys: &[KeyEntry], presented: &str) -> Option<usize> {
    let presented = Sha256::digest(presented.as_bytes());
    let mut found = None;
    for (i, entry) in keys.iter().enumerate() {
        let expected = Sha256::digest(entry.key.as_bytes());
        if bool::from(expected.as_slice().ct_eq(presented.as_slice())) {
            found = Some(i);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn settings(json: &str) -> Settings {
        let settings = parse_config::<Settings>(json).expect("parses");
        ApiKey::validate(&settings).expect("valid");
        settings
    }

    fn validate(json: &str) -> Result<(), String> {
        validate_config::<ApiKey>(json)
    }

    fn request(headers: &[(&str, &str)], query: &[(&str, &str)]) -> Invocation {
        let pairs = |list: &[(&str, &str)]| {
            list.iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                .collect()
        };
        Invocation {
            headers: pairs(headers),
            params: vec![],
            query: pairs(query),
            vars: vec![],
            body: vec![],
        }
    }

    fn rejected(decision: Decision) -> (Reply, Value) {
        match decision {
            Decision::Reply(reply) => {
                let body = serde_json::from_slice(&reply.body).unwrap();
                (reply, body)
            }
            Decision::Continue(_) => panic!("expected a 401 reply"),
        }
    }

    fn accepted(decision: Decision) -> Invocation {
        match decision {
            Decision::Continue(inv) => inv,
            Decision::Reply(reply) => panic!("rejected: {}", String::from_utf8_lossy(&reply.body)),
        }
    }

    const KEYS: &str = r#"{"keys": ["k-zero", {"key": "k-alice", "id": "alice"}]}"#;

    #[test]
    fn accepts_each_key_and_names_it() {
        let s = settings(KEYS);
        let inv = accepted(decide(&s, request(&[("x-api-key", "k-zero")], &[])));
        assert_eq!(inv.var("api_key_id"), Some("0"));
        assert_eq!(inv.header("X-Api-Key"), Some("k-zero"), "kept by default");
        let inv = accepted(decide(&s, request(&[("X-API-KEY", "k-alice")], &[])));
        assert_eq!(inv.var("api_key_id"), Some("alice"));
    }

    #[test]
    fn rejects_a_wrong_key_with_401_problem_and_challenge() {
        let s = settings(KEYS);
        let (reply, body) = rejected(decide(&s, request(&[("X-Api-Key", "k-alicE")], &[])));
        assert_eq!(reply.status, 401);
        assert_eq!(
            reply.header("content-type"),
            Some("application/problem+json")
        );
        assert_eq!(
            reply.header("www-authenticate"),
            Some(r#"ApiKey header="X-Api-Key""#)
        );
        assert_eq!(body["detail"], "invalid API key");
        assert_eq!(body["status"], 401);
    }

    #[test]
    fn a_prefix_of_a_key_is_not_the_key() {
        let s = settings(KEYS);
        let (_, body) = rejected(decide(&s, request(&[("X-Api-Key", "k-zer")], &[])));
        assert_eq!(body["detail"], "invalid API key");
    }

    #[test]
    fn rejects_a_missing_key_saying_where_to_put_it() {
        let s = settings(r#"{"keys": ["k"], "query": "api_key"}"#);
        let (reply, body) = rejected(decide(&s, request(&[], &[("other", "k")])));
        assert_eq!(
            body["detail"],
            "missing API key: send it in the X-Api-Key header or the api_key query parameter"
        );
        assert_eq!(
            reply.header("WWW-Authenticate"),
            Some(r#"ApiKey header="X-Api-Key", query="api_key""#)
        );
        let (_, body) = rejected(decide(&s, request(&[("X-Api-Key", "")], &[])));
        assert!(
            body["detail"]
                .as_str()
                .unwrap()
                .starts_with("missing API key")
        );
    }

    #[test]
    fn query_parameter_and_hiding_credentials() {
        let s = settings(r#"{"keys": ["k"], "query": "api_key", "hide-credentials": true}"#);
        let inv = accepted(decide(&s, request(&[], &[("api_key", "k"), ("page", "2")])));
        assert_eq!(inv.query_param("api_key"), None);
        assert_eq!(inv.query_param("page"), Some("2"));
        let inv = accepted(decide(&s, request(&[("X-Api-Key", "k")], &[])));
        assert_eq!(inv.header("X-Api-Key"), None);
    }

    #[test]
    fn the_header_wins_over_the_query() {
        let s = settings(r#"{"keys": ["k"], "query": "api_key"}"#);
        let (_, body) = rejected(decide(
            &s,
            request(&[("X-Api-Key", "bad")], &[("api_key", "k")]),
        ));
        assert_eq!(body["detail"], "invalid API key");
    }

    #[test]
    fn bearer_scheme_reads_authorization() {
        let s = settings(r#"{"keys": ["tok"], "scheme": "Bearer", "id-var": null}"#);
        let inv = accepted(decide(
            &s,
            request(&[("authorization", "bearer  tok")], &[]),
        ));
        assert!(inv.vars.is_empty(), "id-var null sets nothing");
        let (reply, body) = rejected(decide(&s, request(&[("Authorization", "Basic tok")], &[])));
        assert_eq!(
            body["detail"],
            "the Authorization header must read `Bearer <key>`"
        );
        assert_eq!(
            reply.header("WWW-Authenticate"),
            Some(r#"Bearer realm="execd""#)
        );
        let (_, body) = rejected(decide(&s, request(&[("Authorization", "tok")], &[])));
        assert_eq!(
            body["detail"],
            "the Authorization header must read `Bearer <key>`"
        );
    }

    #[test]
    fn validate_names_the_field() {
        assert_eq!(
            validate(r#"{"keys": []}"#),
            Err("keys: list at least one key".into())
        );
        assert_eq!(
            validate(r#"{"keys": ["a", ""]}"#),
            Err("keys[1]: the key must not be empty".into())
        );
        assert_eq!(
            validate(r#"{"keys": ["a", {"key": "a", "id": "x"}]}"#),
            Err("keys[1]: the same key as keys[0]".into())
        );
        let err = validate(r#"{"keys": [{"key": "a", "name": "x"}]}"#).unwrap_err();
        assert!(
            err.starts_with("keys[0]") && err.contains("unknown field `name`"),
            "{err}"
        );
        let err = validate(r#"{"keys": [7]}"#).unwrap_err();
        assert!(err.contains("a key string or an object"), "{err}");
        let err = validate(r#"{"keys": ["a"], "headr": "X"}"#).unwrap_err();
        assert!(err.contains("unknown field `headr`"), "{err}");
        assert!(
            validate(r#"{"keys": ["a"], "id-var": "bad name"}"#)
                .unwrap_err()
                .starts_with("id-var: ")
        );
        assert!(validate(r#"{"keys": ["a"], "scheme": "Bearer x"}"#).is_err());
        assert!(
            validate("null")
                .unwrap_err()
                .starts_with("configuration is missing")
        );
        assert_eq!(validate(KEYS), Ok(()));
    }
}
