//! # hmac-signature — verify a webhook signature (pre plugin)
//!
//! Answers `401` (problem+json) unless a header carries a valid HMAC of the
//! raw request body, as GitHub, Stripe, Shopify and most webhook senders do.
//!
//! ```yaml
//! plugins:
//!   - name: hmac-signature
//!     config:
//!       secret: "..."                  # required
//!       header: X-Hub-Signature-256    # default
//!       algorithm: sha256              # default; or sha1, sha512
//!       encoding: hex                  # default; or base64
//!       prefix: "sha256="              # default `<algorithm>=`; "" for none
//!       timestamp-header: X-Timestamp  # default none
//!       tolerance-seconds: 300         # default; max age (and clock skew)
//!       signed-payload: timestamp.body # default when timestamp-header is set,
//!                                      # otherwise `body`
//! ```
//!
//! With `signed-payload: timestamp.body` the signed string is
//! `{timestamp}.{body}` (Stripe's scheme), so a captured request cannot be
//! replayed once the timestamp is outside the tolerance. The timestamp is
//! Unix seconds; it is checked against the plugin's wall clock (WASI) even
//! when only the body is signed.
//!
//! The comparison is constant-time (`hmac`'s `verify_slice`, built on
//! `subtle`). The secret and the signature are never logged.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use execd_plugin_sdk::prelude::*;
use execd_plugin_sdk::time::unix_seconds;
use hmac::{Hmac, KeyInit, Mac};
use serde::Deserialize;

/// The plugin's configuration (see the crate docs).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Settings {
    /// The shared secret the sender signs with.
    secret: String,
    /// The header holding the signature.
    #[serde(default = "default_header")]
    header: String,
    /// The hash under the HMAC.
    #[serde(default)]
    algorithm: Algorithm,
    /// How the signature bytes are written in the header.
    #[serde(default)]
    encoding: Encoding,
    /// Text before the encoded signature; default `<algorithm>=`.
    #[serde(default)]
    prefix: Option<String>,
    /// A header holding the Unix time the sender signed at, if any.
    #[serde(default)]
    timestamp_header: Option<String>,
    /// How far the timestamp may be from now, either way.
    #[serde(default = "default_tolerance")]
    tolerance_seconds: u64,
    /// What the signature covers; default depends on `timestamp-header`.
    #[serde(default)]
    signed_payload: Option<SignedPayload>,
}

fn default_header() -> String {
    "X-Hub-Signature-256".to_owned()
}

fn default_tolerance() -> u64 {
    300
}

/// The hash functions offered. SHA-1 is there for GitHub's legacy
/// `X-Hub-Signature`; HMAC-SHA-1 is still unbroken as a MAC.
#[derive(Debug, Default, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Algorithm {
    Sha1,
    #[default]
    Sha256,
    Sha512,
}

impl Algorithm {
    fn name(self) -> &'static str {
        match self {
            Algorithm::Sha1 => "sha1",
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }
}

/// How the signature is written.
#[derive(Debug, Default, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Encoding {
    #[default]
    Hex,
    Base64,
}

/// What the signature covers.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
enum SignedPayload {
    /// The raw body.
    #[serde(rename = "body")]
    Body,
    /// `{timestamp}.{body}`.
    #[serde(rename = "timestamp.body")]
    TimestampDotBody,
}

impl Settings {
    fn prefix(&self) -> String {
        match &self.prefix {
            Some(prefix) => prefix.clone(),
            None => format!("{}=", self.algorithm.name()),
        }
    }

    fn signed_payload(&self) -> SignedPayload {
        match (self.signed_payload, &self.timestamp_header) {
            (Some(payload), _) => payload,
            (None, Some(_)) => SignedPayload::TimestampDotBody,
            (None, None) => SignedPayload::Body,
        }
    }
}

/// The plugin.
struct HmacSignature;

impl Plugin for HmacSignature {
    type Config = Settings;

    fn validate(settings: &Settings) -> Result<(), String> {
        if settings.secret.is_empty() {
            return Err("secret: must not be empty".to_owned());
        }
        if settings.header.trim().is_empty() {
            return Err("header: must not be empty".to_owned());
        }
        if settings
            .timestamp_header
            .as_deref()
            .is_some_and(|h| h.trim().is_empty())
        {
            return Err("timestamp-header: must not be empty (leave it out instead)".to_owned());
        }
        if settings.signed_payload == Some(SignedPayload::TimestampDotBody)
            && settings.timestamp_header.is_none()
        {
            return Err(
                "signed-payload: `timestamp.body` needs `timestamp-header` to name the header \
                 that carries the timestamp"
                    .to_owned(),
            );
        }
        Ok(())
    }
}

impl Pre for HmacSignature {
    fn pre(settings: &Settings, _ctx: &Context, inv: Invocation) -> Result<Decision, String> {
        Ok(match verify(settings, &inv, unix_seconds()) {
            Ok(()) => Decision::Continue(inv),
            Err(detail) => {
                info!("request rejected: {detail}");
                Decision::Reply(Reply::problem(401, "Unauthorized", &detail).with_header(
                    "WWW-Authenticate",
                    &format!("Signature header=\"{}\"", settings.header),
                ))
            }
        })
    }
}

export_plugin!(HmacSignature, pre);

/// Checks the timestamp (if configured) and the signature; the error is the
/// problem detail to send.
fn verify(settings: &Settings, inv: &Invocation, now: u64) -> Result<(), String> {
    let timestamp = match &settings.timestamp_header {
        Some(name) => Some(check_timestamp(settings, name, inv.header(name), now)?),
        None => None,
    };

    let header = &settings.header;
    let value = inv
        .header(header)
        .ok_or_else(|| format!("missing {header} header"))?
        .trim();
    let prefix = settings.prefix();
    let encoded = strip_prefix_ignore_case(value, &prefix)
        .ok_or_else(|| format!("the {header} header must start with `{prefix}`"))?;
    let signature = match settings.encoding {
        Encoding::Hex => hex::decode(encoded).ok(),
        Encoding::Base64 => STANDARD
            .decode(encoded)
            .or_else(|_| STANDARD_NO_PAD.decode(encoded))
            .ok(),
    }
    .ok_or_else(|| {
        let encoding = match settings.encoding {
            Encoding::Hex => "hex",
            Encoding::Base64 => "base64",
        };
        format!("the {header} header is not {encoding} after `{prefix}`")
    })?;

    let mut parts: Vec<&[u8]> = Vec::with_capacity(3);
    if let (SignedPayload::TimestampDotBody, Some(timestamp)) =
        (settings.signed_payload(), timestamp)
    {
        parts.extend([timestamp.as_bytes(), b"."]);
    }
    parts.push(&inv.body);

    let secret = settings.secret.as_bytes();
    let valid = match settings.algorithm {
        Algorithm::Sha1 => mac_matches::<Hmac<sha1::Sha1>>(secret, &parts, &signature),
        Algorithm::Sha256 => mac_matches::<Hmac<sha2::Sha256>>(secret, &parts, &signature),
        Algorithm::Sha512 => mac_matches::<Hmac<sha2::Sha512>>(secret, &parts, &signature),
    };
    if valid {
        Ok(())
    } else {
        Err(format!("the {header} signature does not match the body"))
    }
}

/// The timestamp header's text, once it parsed and is within the tolerance.
/// The text (not the parsed number) is what was signed.
fn check_timestamp<'a>(
    settings: &Settings,
    name: &str,
    value: Option<&'a str>,
    now: u64,
) -> Result<&'a str, String> {
    let text = value
        .ok_or_else(|| format!("missing {name} header"))?
        .trim();
    let timestamp: u64 = text
        .parse()
        .map_err(|_| format!("the {name} header must be a Unix time in whole seconds"))?;
    let tolerance = settings.tolerance_seconds;
    if timestamp.saturating_add(tolerance) < now {
        return Err(format!(
            "the {name} timestamp is {} s old, outside the {tolerance} s tolerance",
            now - timestamp
        ));
    }
    if timestamp > now.saturating_add(tolerance) {
        return Err(format!(
            "the {name} timestamp is {} s in the future, outside the {tolerance} s tolerance",
            timestamp - now
        ));
    }
    Ok(text)
}

/// `value` without `prefix`, the prefix compared ASCII case-insensitively
/// (`SHA256=` from a sender that upper-cases is still GitHub's format).
fn strip_prefix_ignore_case<'a>(value: &'a str, prefix: &str) -> Option<&'a str> {
    let head = value.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &value[prefix.len()..])
}

/// Constant-time comparison of the MAC of `parts` with `signature`.
fn mac_matches<M: Mac + KeyInit>(secret: &[u8], parts: &[&[u8]], signature: &[u8]) -> bool {
    let Ok(mut mac) = <M as KeyInit>::new_from_slice(secret) else {
        return false; // HMAC takes keys of any length; unreachable in practice
    };
    for part in parts {
        mac.update(part);
    }
    mac.verify_slice(signature).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_700_000_100;

    fn settings(json: &str) -> Settings {
        let settings = parse_config::<Settings>(json).expect("parses");
        HmacSignature::validate(&settings).expect("valid");
        settings
    }

    fn validate(json: &str) -> Result<(), String> {
        validate_config::<HmacSignature>(json)
    }

    fn request(headers: &[(&str, &str)], body: &str) -> Invocation {
        Invocation {
            headers: headers
                .iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                .collect(),
            params: vec![],
            query: vec![],
            vars: vec![],
            body: body.as_bytes().to_vec(),
        }
    }

    /// GitHub's documented example (docs: "Validating webhook deliveries").
    const GITHUB_SIG: &str =
        "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";

    #[test]
    fn github_example_verifies() {
        let s = settings(r#"{"secret": "It's a Secret to Everybody"}"#);
        let inv = request(&[("x-hub-signature-256", GITHUB_SIG)], "Hello, World!");
        assert_eq!(verify(&s, &inv, NOW), Ok(()));
    }

    #[test]
    fn a_changed_body_or_secret_fails() {
        let s = settings(r#"{"secret": "It's a Secret to Everybody"}"#);
        let inv = request(&[("X-Hub-Signature-256", GITHUB_SIG)], "Hello, World?");
        assert_eq!(
            verify(&s, &inv, NOW),
            Err("the X-Hub-Signature-256 signature does not match the body".into())
        );
        let s = settings(r#"{"secret": "It's a secret to everybody"}"#);
        let inv = request(&[("X-Hub-Signature-256", GITHUB_SIG)], "Hello, World!");
        assert!(verify(&s, &inv, NOW).is_err());
    }

    #[test]
    fn missing_malformed_and_unprefixed_headers() {
        let s = settings(r#"{"secret": "x"}"#);
        assert_eq!(
            verify(&s, &request(&[], "b"), NOW),
            Err("missing X-Hub-Signature-256 header".into())
        );
        assert_eq!(
            verify(
                &s,
                &request(&[("X-Hub-Signature-256", "757107ea")], "b"),
                NOW
            ),
            Err("the X-Hub-Signature-256 header must start with `sha256=`".into())
        );
        assert_eq!(
            verify(
                &s,
                &request(&[("X-Hub-Signature-256", "sha256=zz")], "b"),
                NOW
            ),
            Err("the X-Hub-Signature-256 header is not hex after `sha256=`".into())
        );
    }

    #[test]
    fn sha1_and_sha512_with_their_default_prefixes() {
        let s =
            settings(r#"{"secret": "whsec", "algorithm": "sha1", "header": "X-Hub-Signature"}"#);
        let inv = request(
            &[(
                "X-Hub-Signature",
                "sha1=bc23879f9fe962fba5c48c0d8144bc846b63977d",
            )],
            r#"{"a":1}"#,
        );
        assert_eq!(verify(&s, &inv, NOW), Ok(()));

        let s = settings(r#"{"secret": "whsec", "algorithm": "sha512", "prefix": ""}"#);
        let sig = "e83d8dbab75461bd95565b9850056feaa2ea6c1be80b5e7f675279d39da3e810\
                   e2cd98480b6821722606db3986b668e2f7f282ae71e441268ad01c7e0900aa65";
        let inv = request(&[("X-Hub-Signature-256", sig)], r#"{"a":1}"#);
        assert_eq!(verify(&s, &inv, NOW), Ok(()));
    }

    const STRIPE_LIKE: &str = r#"{
        "secret": "whsec", "header": "X-Signature", "encoding": "base64", "prefix": "",
        "timestamp-header": "X-Timestamp", "tolerance-seconds": 300
    }"#;
    const STRIPE_SIG: &str = "itN7oVYEiuDgpVM8dc3yb+6IsH+Ty1fuTICtsFMBIDI=";

    #[test]
    fn timestamp_dot_body_in_base64() {
        let s = settings(STRIPE_LIKE);
        let inv = request(
            &[("X-Timestamp", "1700000000"), ("X-Signature", STRIPE_SIG)],
            r#"{"a":1}"#,
        );
        assert_eq!(verify(&s, &inv, NOW), Ok(()));
        let unpadded = STRIPE_SIG.trim_end_matches('=');
        let inv = request(
            &[("X-Timestamp", "1700000000"), ("X-Signature", unpadded)],
            r#"{"a":1}"#,
        );
        assert_eq!(verify(&s, &inv, NOW), Ok(()), "padding is optional");

        // The timestamp is signed: moving it breaks the signature.
        let inv = request(
            &[("X-Timestamp", "1700000001"), ("X-Signature", STRIPE_SIG)],
            r#"{"a":1}"#,
        );
        assert_eq!(
            verify(&s, &inv, NOW),
            Err("the X-Signature signature does not match the body".into())
        );
    }

    #[test]
    fn timestamps_outside_the_tolerance_are_refused() {
        let s = settings(STRIPE_LIKE);
        let at = |ts: &str| {
            request(
                &[("X-Timestamp", ts), ("X-Signature", STRIPE_SIG)],
                r#"{"a":1}"#,
            )
        };
        assert_eq!(
            verify(&s, &at("1700000000"), 1_700_000_300),
            Ok(()),
            "300 s old is in"
        );
        assert_eq!(
            verify(&s, &at("1700000000"), 1_700_000_301),
            Err("the X-Timestamp timestamp is 301 s old, outside the 300 s tolerance".into())
        );
        assert_eq!(
            verify(&s, &at("1700000000"), 1_699_999_000),
            Err(
                "the X-Timestamp timestamp is 1000 s in the future, outside the 300 s tolerance"
                    .into()
            )
        );
        assert_eq!(
            verify(&s, &at("soon"), NOW),
            Err("the X-Timestamp header must be a Unix time in whole seconds".into())
        );
        assert_eq!(
            verify(&s, &request(&[("X-Signature", STRIPE_SIG)], ""), NOW),
            Err("missing X-Timestamp header".into())
        );
    }

    #[test]
    fn validate_names_the_field() {
        assert_eq!(
            validate(r#"{"secret": ""}"#),
            Err("secret: must not be empty".into())
        );
        let err = validate(r#"{"secret": "x", "algorithm": "md5"}"#).unwrap_err();
        assert!(err.starts_with("algorithm: unknown variant `md5`"), "{err}");
        let err = validate(r#"{"secret": "x", "signed-payload": "timestamp.body"}"#).unwrap_err();
        assert!(err.starts_with("signed-payload: "), "{err}");
        let err = validate(r#"{"secret": "x", "tolerance-seconds": -1}"#).unwrap_err();
        assert!(err.starts_with("tolerance-seconds: "), "{err}");
        let err = validate(r#"{"secret": "x", "encodng": "hex"}"#).unwrap_err();
        assert!(err.contains("unknown field `encodng`"), "{err}");
        assert!(validate("null").is_err());
        assert_eq!(validate(STRIPE_LIKE), Ok(()));
    }
}
