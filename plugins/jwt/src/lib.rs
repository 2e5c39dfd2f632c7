//! # jwt — verify a JSON Web Token (pre plugin)
//!
//! Answers `401` (problem+json, with an RFC 6750 `WWW-Authenticate: Bearer`
//! challenge) unless the request carries a valid JWT; on success copies the
//! configured claims into variables and runs the command.
//!
//! ```yaml
//! plugins:
//!   - name: jwt
//!     config:
//!       secret: "at least 32 bytes of secret ......"   # for HS256
//!       public-key: |                                  # for RS256: PEM,
//!         -----BEGIN PUBLIC KEY-----                   # SPKI or PKCS#1
//!         ...                                          # (BEGIN RSA PUBLIC KEY)
//!       algorithms: [RS256]     # default: HS256 if `secret`, RS256 if `public-key`
//!       issuer: https://issuer.example   # default: not checked
//!       audience: [execd, api]           # string or list; default: not checked
//!       leeway-seconds: 60               # default; clock skew allowed on exp/nbf
//!       require-exp: true                # default
//!       header: Authorization            # default
//!       scheme: Bearer                   # default; null: the header is the bare token
//!       claims:                          # claim -> variable; default none
//!         sub: user_id
//!         email: email
//! ```
//!
//! Security choices:
//!
//! - The token's `alg` must be in `algorithms`; `none` and anything else are
//!   refused before any key is touched. Each algorithm has its own key
//!   (HS256 only ever uses `secret`, RS256 only `public-key`), so an RS256
//!   public key can never be used as an HMAC secret (algorithm confusion).
//! - Every key named in the config must be used by a listed algorithm, and
//!   every listed algorithm must have its key: a half-configured verifier
//!   fails at load, not on the first request.
//! - HS256 secrets shorter than 32 bytes and RSA keys shorter than 2048 bits
//!   are refused (RFC 7518 §3.2, NIST SP 800-131A).
//! - The PEM key is parsed by `config.validate`, so a bad key stops start-up.
//! - The signature is checked before any claim is looked at; a token with a
//!   `crit` header is refused (RFC 7515 §4.1.11: no extensions understood).
//!
//! Claims that are strings become variables as they are; numbers and
//! booleans as their JSON text (`42`, `true`); arrays and objects as compact
//! JSON. A mapped claim missing from the token sets no variable.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use execd_plugin_sdk::prelude::*;
use execd_plugin_sdk::time::unix_seconds;
use hmac::{Hmac, KeyInit, Mac};
use rsa::pkcs1::DecodeRsaPublicKey;
use rsa::pkcs8::DecodePublicKey;
use rsa::signature::Verifier as _;
use rsa::traits::PublicKeyParts;
use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::Sha256;

/// The plugin's configuration (see the crate docs).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Settings {
    /// The HS256 secret.
    #[serde(default)]
    secret: Option<String>,
    /// The RS256 public key, PEM.
    #[serde(default)]
    public_key: Option<String>,
    /// The accepted `alg` values; default from the keys given.
    #[serde(default)]
    algorithms: Option<Vec<Algorithm>>,
    /// The required `iss`, if any.
    #[serde(default)]
    issuer: Option<String>,
    /// Accepted `aud` values; the token must name at least one.
    #[serde(default)]
    audience: Option<OneOrMany>,
    /// Clock skew tolerated on `exp` and `nbf`.
    #[serde(default = "default_leeway")]
    leeway_seconds: u64,
    /// Refuse tokens without `exp` (tokens that never expire).
    #[serde(default = "default_true")]
    require_exp: bool,
    /// The header holding the token.
    #[serde(default = "default_header")]
    header: String,
    /// The auth scheme before the token; `null` for a bare token.
    #[serde(default = "default_scheme")]
    scheme: Option<String>,
    /// Claim name -> variable name.
    #[serde(default)]
    claims: BTreeMap<String, String>,
}

fn default_leeway() -> u64 {
    60
}

fn default_true() -> bool {
    true
}

fn default_header() -> String {
    "Authorization".to_owned()
}

fn default_scheme() -> Option<String> {
    Some("Bearer".to_owned())
}

/// A string or a list of strings (`audience`).
#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "a string or a list of strings")]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn as_slice(&self) -> &[String] {
        match self {
            OneOrMany::One(one) => std::slice::from_ref(one),
            OneOrMany::Many(many) => many,
        }
    }
}

/// The signature algorithms this plugin implements. `none` is not one:
/// an unsigned token is never valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
enum Algorithm {
    HS256,
    RS256,
}

impl Algorithm {
    fn name(self) -> &'static str {
        match self {
            Algorithm::HS256 => "HS256",
            Algorithm::RS256 => "RS256",
        }
    }
}

/// The keys and algorithm allow-list, checked and parsed from [`Settings`].
struct Keys {
    algorithms: Vec<Algorithm>,
    secret: Option<Vec<u8>>,
    public_key: Option<rsa::pkcs1v15::VerifyingKey<Sha256>>,
}

/// RFC 7518 §3.2: an HS256 key must be at least as long as the hash.
const MIN_SECRET_BYTES: usize = 32;
/// NIST SP 800-131A: RSA below 2048 bits is disallowed for signatures.
const MIN_RSA_BITS: usize = 2048;

impl Keys {
    /// Builds the verifier; the error names the field at fault.
    fn new(settings: &Settings) -> Result<Keys, String> {
        let secret = match &settings.secret {
            Some(secret) if secret.len() < MIN_SECRET_BYTES => {
                return Err(format!(
                    "secret: must be at least {MIN_SECRET_BYTES} bytes for HS256 (RFC 7518 §3.2); \
                     this one has {}",
                    secret.len()
                ));
            }
            Some(secret) => Some(secret.as_bytes().to_vec()),
            None => None,
        };
        let public_key = match &settings.public_key {
            Some(pem) => Some(parse_public_key(pem).map_err(|err| format!("public-key: {err}"))?),
            None => None,
        };

        let algorithms = match &settings.algorithms {
            Some(list) if list.is_empty() => {
                return Err("algorithms: list at least one (HS256, RS256)".to_owned());
            }
            Some(list) => list.clone(),
            None => {
                let mut derived = Vec::new();
                if secret.is_some() {
                    derived.push(Algorithm::HS256);
                }
                if public_key.is_some() {
                    derived.push(Algorithm::RS256);
                }
                if derived.is_empty() {
                    return Err(
                        "secret or public-key: give `secret` (HS256) or `public-key` (RS256)"
                            .to_owned(),
                    );
                }
                derived
            }
        };
        // A missing key is the likelier mistake, so it is reported first.
        for (alg, field, present) in [
            (Algorithm::HS256, "secret", secret.is_some()),
            (Algorithm::RS256, "public-key", public_key.is_some()),
        ] {
            if algorithms.contains(&alg) && !present {
                return Err(format!(
                    "{field}: required because algorithms lists {}",
                    alg.name()
                ));
            }
        }
        for (alg, field, present) in [
            (Algorithm::HS256, "secret", secret.is_some()),
            (Algorithm::RS256, "public-key", public_key.is_some()),
        ] {
            if present && !algorithms.contains(&alg) {
                return Err(format!(
                    "{field}: given, but algorithms does not list {}",
                    alg.name()
                ));
            }
        }
        Ok(Keys {
            algorithms,
            secret,
            public_key,
        })
    }
}

/// Parses an RSA public key from PEM: SPKI (`BEGIN PUBLIC KEY`) or PKCS#1
/// (`BEGIN RSA PUBLIC KEY`), and refuses short keys.
fn parse_public_key(pem: &str) -> Result<rsa::pkcs1v15::VerifyingKey<Sha256>, String> {
    let pem = pem.trim();
    let key = if pem.starts_with("-----BEGIN RSA PUBLIC KEY-----") {
        rsa::PublicKey::from_pkcs1_pem(pem)
            .map_err(|err| format!("not a PKCS#1 RSA public key: {err}"))?
    } else if pem.starts_with("-----BEGIN PUBLIC KEY-----") {
        rsa::PublicKey::from_public_key_pem(pem)
            .map_err(|err| format!("not an RSA public key (SPKI): {err}"))?
    } else {
        return Err(
            "expected a PEM block starting `-----BEGIN PUBLIC KEY-----` or \
             `-----BEGIN RSA PUBLIC KEY-----`"
                .to_owned(),
        );
    };
    let bits = key.size() * 8;
    if bits < MIN_RSA_BITS {
        return Err(format!(
            "the RSA key has {bits} bits; at least {MIN_RSA_BITS} are required"
        ));
    }
    Ok(rsa::pkcs1v15::VerifyingKey::new(key))
}

/// The plugin.
struct Jwt;

impl Plugin for Jwt {
    type Config = Settings;

    fn validate(settings: &Settings) -> Result<(), String> {
        Keys::new(settings)?;
        if settings.header.trim().is_empty() {
            return Err("header: must not be empty".to_owned());
        }
        if let Some(audience) = &settings.audience
            && audience.as_slice().is_empty()
        {
            return Err("audience: list at least one, or leave it out".to_owned());
        }
        for (claim, var) in &settings.claims {
            check_var_name(var).map_err(|err| format!("claims.{claim}: {err}"))?;
        }
        Ok(())
    }
}

impl Pre for Jwt {
    fn pre(settings: &Settings, _ctx: &Context, inv: Invocation) -> Result<Decision, String> {
        let keys = Keys::new(settings)?;
        Ok(decide(settings, &keys, inv, unix_seconds()))
    }
}

export_plugin!(Jwt, pre);

/// Why a request was refused: the problem detail, and whether a token was
/// presented (RFC 6750 says to add `error="invalid_token"` only then).
#[derive(Debug, PartialEq)]
struct Refusal {
    detail: String,
    token_presented: bool,
}

/// The whole plugin: find the token, verify it, map claims or answer 401.
fn decide(settings: &Settings, keys: &Keys, mut inv: Invocation, now: u64) -> Decision {
    let result = token(settings, &inv).and_then(|token| {
        verify(settings, keys, token, now).map_err(|detail| Refusal {
            detail,
            token_presented: true,
        })
    });
    match result {
        Ok(claims) => {
            for (claim, var) in &settings.claims {
                if let Some(value) = claims.get(claim) {
                    inv.set_var_json(var, value);
                }
            }
            Decision::Continue(inv)
        }
        Err(refusal) => {
            info!("request rejected: {}", refusal.detail);
            let challenge = if refusal.token_presented {
                format!(
                    "Bearer realm=\"execd\", error=\"invalid_token\", error_description=\"{}\"",
                    refusal.detail.replace(['"', '\\'], "'")
                )
            } else {
                "Bearer realm=\"execd\"".to_owned()
            };
            Decision::Reply(
                Reply::problem(401, "Unauthorized", &refusal.detail)
                    .with_header("WWW-Authenticate", &challenge),
            )
        }
    }
}

/// The token text from the configured header.
fn token<'a>(settings: &Settings, inv: &'a Invocation) -> Result<&'a str, Refusal> {
    let missing = |detail: String| Refusal {
        detail,
        token_presented: false,
    };
    let header = &settings.header;
    let value = inv
        .header(header)
        .ok_or_else(|| missing(format!("missing {header} header")))?
        .trim();
    let token = match &settings.scheme {
        Some(scheme) => value
            .split_once(char::is_whitespace)
            .filter(|(given, _)| given.eq_ignore_ascii_case(scheme))
            .map(|(_, token)| token.trim())
            .ok_or_else(|| missing(format!("the {header} header must read `{scheme} <token>`")))?,
        None => value,
    };
    if token.is_empty() {
        return Err(missing(format!("missing token in the {header} header")));
    }
    Ok(token)
}

/// Verifies `token` and returns its claims; the error is the problem detail.
fn verify(
    settings: &Settings,
    keys: &Keys,
    token: &str,
    now: u64,
) -> Result<Map<String, Value>, String> {
    let mut parts = token.split('.');
    let (Some(header_b64), Some(payload_b64), Some(signature_b64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("malformed token: expected three dot-separated parts".to_owned());
    };

    let header =
        decode_object(header_b64).map_err(|err| format!("malformed token header: {err}"))?;
    let algorithm = match header.get("alg") {
        Some(Value::String(alg)) => alg.as_str(),
        _ => return Err("malformed token header: no `alg`".to_owned()),
    };
    if algorithm.eq_ignore_ascii_case("none") {
        return Err("unsigned tokens (alg none) are not accepted".to_owned());
    }
    let Some(algorithm) = keys
        .algorithms
        .iter()
        .copied()
        .find(|a| a.name() == algorithm)
    else {
        let allowed: Vec<&str> = keys.algorithms.iter().map(|a| a.name()).collect();
        return Err(format!(
            "algorithm {algorithm} is not accepted (accepted: {})",
            allowed.join(", ")
        ));
    };
    if header.contains_key("crit") {
        return Err(
            "the token has critical header parameters (crit) that are not supported".to_owned(),
        );
    }

    let signature = URL_SAFE_NO_PAD
        .decode(signature_b64)
        .map_err(|_| "malformed token: the signature is not base64url".to_owned())?;
    let signing_input = &token[..header_b64.len() + 1 + payload_b64.len()];
    if !signature_matches(keys, algorithm, signing_input.as_bytes(), &signature) {
        return Err("bad signature".to_owned());
    }

    let claims =
        decode_object(payload_b64).map_err(|err| format!("malformed token claims: {err}"))?;
    check_claims(settings, &claims, now)?;
    Ok(claims)
}

/// Base64url (unpadded, as JWS requires), then a JSON object.
fn decode_object(segment: &str) -> Result<Map<String, Value>, String> {
    let bytes = URL_SAFE_NO_PAD
        .decode(segment)
        .map_err(|_| "not base64url".to_owned())?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err("not a JSON object".to_owned()),
        Err(err) => Err(format!("not JSON: {err}")),
    }
}

/// Checks the signature with the key that belongs to `algorithm`, and only
/// that key. Both comparisons are constant-time (`hmac`'s `verify_slice`;
/// RSA verification involves no secret).
fn signature_matches(keys: &Keys, algorithm: Algorithm, input: &[u8], signature: &[u8]) -> bool {
    match algorithm {
        Algorithm::HS256 => {
            let Some(secret) = &keys.secret else {
                return false;
            };
            let Ok(mut mac) = <Hmac<Sha256> as KeyInit>::new_from_slice(secret) else {
                return false;
            };
            mac.update(input);
            mac.verify_slice(signature).is_ok()
        }
        Algorithm::RS256 => {
            let Some(key) = &keys.public_key else {
                return false;
            };
            let Ok(signature) = rsa::pkcs1v15::Signature::try_from(signature) else {
                return false;
            };
            key.verify(input, &signature).is_ok()
        }
    }
}

/// The registered claims: `exp`, `nbf`, `iss`, `aud` (RFC 7519 §4.1).
fn check_claims(settings: &Settings, claims: &Map<String, Value>, now: u64) -> Result<(), String> {
    let leeway = settings.leeway_seconds as f64;
    let now = now as f64;
    let numeric = |name: &str| match claims.get(name) {
        None => Ok(None),
        Some(value) => value
            .as_f64()
            .map(Some)
            .ok_or_else(|| format!("the {name} claim is not a number")),
    };

    match numeric("exp")? {
        Some(exp) if now > exp + leeway => {
            return Err(format!("token expired {} s ago", (now - exp) as u64));
        }
        None if settings.require_exp => return Err("token has no exp claim".to_owned()),
        _ => {}
    }
    if let Some(nbf) = numeric("nbf")?
        && now + leeway < nbf
    {
        return Err(format!(
            "token not valid yet (nbf is {} s from now)",
            (nbf - now) as u64
        ));
    }

    if let Some(issuer) = &settings.issuer {
        match claims.get("iss") {
            None => return Err("token has no iss claim".to_owned()),
            Some(Value::String(iss)) if iss == issuer => {}
            Some(_) => return Err("wrong issuer".to_owned()),
        }
    }

    if let Some(audience) = &settings.audience {
        let accepted = audience.as_slice();
        let matches = |aud: &Value| {
            aud.as_str()
                .is_some_and(|aud| accepted.iter().any(|a| a == aud))
        };
        match claims.get("aud") {
            None => return Err("token has no aud claim".to_owned()),
            Some(Value::Array(list)) if list.iter().any(matches) => {}
            Some(one @ Value::String(_)) if matches(one) => {}
            Some(_) => return Err("wrong audience".to_owned()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPKI: &str = include_str!("../testdata/spki.pem");
    const PKCS1: &str = include_str!("../testdata/pkcs1.pem");
    const SMALL: &str = include_str!("../testdata/small-1024.pem");
    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    // Made with openssl from a throwaway 2048-bit key whose public half is
    // testdata/spki.pem (and pkcs1.pem); the private key was discarded.
    // Claims: sub user-1, email a@example.com, iss https://issuer.example,
    // aud execd, exp 1700003600, iat 1700000000, admin true, n 42,
    // roles ["r1","r2"].
    const RS256_TOKEN: &str = "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJ1c2VyLTEiLCJlbWFpbCI6ImFAZXhhbXBsZS5jb20iLCJpc3MiOiJodHRwczovL2lzc3Vlci5leGFtcGxlIiwiYXVkIjoiZXhlY2QiLCJleHAiOjE3MDAwMDM2MDAsImlhdCI6MTcwMDAwMDAwMCwiYWRtaW4iOnRydWUsIm4iOjQyLCJyb2xlcyI6WyJyMSIsInIyIl19.Gbhfz9h5edc9IbOkX_zPJSxOWn968r1pXWIL5Hhd6OORtZI-9ZTjIjVALKtQIlDmfS6df8kNWfds07bqrpOJnyva73O5Y6mPgjlLTbqvz_Co8M8xuVAKKYGIzoCanzD_IDO9rH1e8rTEASKDqkitRZWadhdMPJBaf4jO7r5l5aW9w9tZx5O2LTws5YGsJAMBfYuFjy2gTIvZJR-PZjjHln5kD4U5Twk9VbPiPch5eh_039on18HKfqECm6FO1-82iOOESW1tuSudPdR9rJe7UhZMygT9STuin4dhmaPyIxT29UgZiHG6rttG56UcsgQLTg4ciBvtn_RgRwBFecTtcQ";
    // Python's hmac: HS256 with SECRET over {"sub":"user-2","exp":1700003600}.
    const HS256_TOKEN: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJ1c2VyLTIiLCJleHAiOjE3MDAwMDM2MDB9.t5mLfUda8RsiPnK-OAMbiJ2BCZo6TE_Y7hRe6ODQSkI";
    // The RS256 token's claims, re-signed HS256 with the bytes of spki.pem
    // as the HMAC secret: the classic algorithm-confusion forgery.
    const CONFUSED_TOKEN: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJ1c2VyLTEiLCJlbWFpbCI6ImFAZXhhbXBsZS5jb20iLCJpc3MiOiJodHRwczovL2lzc3Vlci5leGFtcGxlIiwiYXVkIjoiZXhlY2QiLCJleHAiOjE3MDAwMDM2MDAsImlhdCI6MTcwMDAwMDAwMCwiYWRtaW4iOnRydWUsIm4iOjQyLCJyb2xlcyI6WyJyMSIsInIyIl19.8En2U_32WA-mm8BbGmNtUv-yGIXT1FReqAdss33WnIk";
    const NONE_TOKEN: &str = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ1c2VyLTEiLCJlbWFpbCI6ImFAZXhhbXBsZS5jb20iLCJpc3MiOiJodHRwczovL2lzc3Vlci5leGFtcGxlIiwiYXVkIjoiZXhlY2QiLCJleHAiOjE3MDAwMDM2MDAsImlhdCI6MTcwMDAwMDAwMCwiYWRtaW4iOnRydWUsIm4iOjQyLCJyb2xlcyI6WyJyMSIsInIyIl19.";

    /// Well before the tokens' exp (1700003600).
    const NOW: u64 = 1_700_000_100;

    fn rsa_settings(extra: &str) -> String {
        let pem = serde_json::to_string(SPKI).unwrap();
        format!(r#"{{"public-key": {pem}{extra}}}"#)
    }

    fn validate(json: &str) -> Result<(), String> {
        validate_config::<Jwt>(json)
    }

    /// Runs the plugin logic on a request with `Authorization: <auth>`.
    fn run(json: &str, auth: Option<&str>, now: u64) -> Decision {
        validate(json).expect("valid config");
        let settings = parse_config::<Settings>(json).unwrap();
        let keys = Keys::new(&settings).unwrap();
        let inv = Invocation {
            headers: auth
                .map(|a| vec![("authorization".to_owned(), a.to_owned())])
                .unwrap_or_default(),
            params: vec![],
            query: vec![],
            vars: vec![],
            body: vec![],
        };
        decide(&settings, &keys, inv, now)
    }

    fn refusal(decision: Decision) -> (String, String) {
        match decision {
            Decision::Reply(reply) => {
                assert_eq!(reply.status, 401);
                let body: Value = serde_json::from_slice(&reply.body).unwrap();
                (
                    body["detail"].as_str().unwrap().to_owned(),
                    reply.header("www-authenticate").unwrap().to_owned(),
                )
            }
            Decision::Continue(_) => panic!("expected a 401"),
        }
    }

    fn detail(decision: Decision) -> String {
        refusal(decision).0
    }

    fn accepted(decision: Decision) -> Invocation {
        match decision {
            Decision::Continue(inv) => inv,
            Decision::Reply(reply) => panic!("refused: {}", String::from_utf8_lossy(&reply.body)),
        }
    }

    #[test]
    fn rs256_with_spki_and_pkcs1_keys_maps_claims() {
        let claims = r#", "claims": {"sub": "user_id", "email": "email", "admin": "admin",
                        "n": "n", "roles": "roles", "absent": "absent"}"#;
        let inv = accepted(run(
            &rsa_settings(claims),
            Some(&format!("Bearer {RS256_TOKEN}")),
            NOW,
        ));
        assert_eq!(inv.var("user_id"), Some("user-1"));
        assert_eq!(inv.var("email"), Some("a@example.com"));
        assert_eq!(inv.var("admin"), Some("true"));
        assert_eq!(inv.var("n"), Some("42"));
        assert_eq!(inv.var("roles"), Some(r#"["r1","r2"]"#));
        assert_eq!(inv.var("absent"), None);

        let pkcs1 = serde_json::to_string(PKCS1).unwrap();
        let json = format!(r#"{{"public-key": {pkcs1}}}"#);
        accepted(run(&json, Some(&format!("bearer {RS256_TOKEN}")), NOW));
    }

    #[test]
    fn hs256_token_from_another_implementation_verifies() {
        let json = format!(r#"{{"secret": "{SECRET}", "claims": {{"sub": "user"}}}}"#);
        let inv = accepted(run(&json, Some(&format!("Bearer {HS256_TOKEN}")), NOW));
        assert_eq!(inv.var("user"), Some("user-2"));
    }

    #[test]
    fn a_tampered_token_has_a_bad_signature() {
        let json = rsa_settings("");
        // Flip one character of the payload (the `sub` value).
        let tampered = RS256_TOKEN.replacen("eyJzdWIiOiJ1c2VyLTEi", "eyJzdWIiOiJ1c2VyLTIi", 1);
        assert_ne!(tampered, RS256_TOKEN);
        let (detail, challenge) = refusal(run(&json, Some(&format!("Bearer {tampered}")), NOW));
        assert_eq!(detail, "bad signature");
        assert_eq!(
            challenge,
            r#"Bearer realm="execd", error="invalid_token", error_description="bad signature""#
        );
        let json = format!(r#"{{"secret": "{}"}}"#, SECRET.replace('0', "1"));
        assert_eq!(detail_of(&json, HS256_TOKEN), "bad signature");
    }

    fn detail_of(json: &str, token: &str) -> String {
        detail(run(json, Some(&format!("Bearer {token}")), NOW))
    }

    #[test]
    fn refuses_alg_none_and_algorithm_confusion() {
        let json = rsa_settings("");
        assert_eq!(
            detail_of(&json, NONE_TOKEN),
            "unsigned tokens (alg none) are not accepted"
        );
        assert_eq!(
            detail_of(&json, CONFUSED_TOKEN),
            "algorithm HS256 is not accepted (accepted: RS256)"
        );
        // Even with HS256 allowed, it is checked with `secret`, never the PEM.
        let both = rsa_settings(&format!(
            r#", "secret": "{SECRET}", "algorithms": ["RS256", "HS256"]"#
        ));
        assert_eq!(detail_of(&both, CONFUSED_TOKEN), "bad signature");
        accepted(run(&both, Some(&format!("Bearer {RS256_TOKEN}")), NOW));
    }

    #[test]
    fn expiry_and_leeway() {
        let json = rsa_settings("");
        // exp 1700003600 + 60 s leeway.
        accepted(run(
            &json,
            Some(&format!("Bearer {RS256_TOKEN}")),
            1_700_003_660,
        ));
        assert_eq!(
            detail(run(
                &json,
                Some(&format!("Bearer {RS256_TOKEN}")),
                1_700_003_700
            )),
            "token expired 100 s ago"
        );
        let strict = rsa_settings(r#", "leeway-seconds": 0"#);
        assert_eq!(
            detail(run(
                &strict,
                Some(&format!("Bearer {RS256_TOKEN}")),
                1_700_003_601
            )),
            "token expired 1 s ago"
        );
    }

    #[test]
    fn registered_claims_without_signatures() {
        // check_claims runs on verified claims; drive it directly.
        let settings = |extra: &str| parse_config::<Settings>(&rsa_settings(extra)).unwrap();
        let claims = |json: &str| match serde_json::from_str::<Value>(json).unwrap() {
            Value::Object(map) => map,
            _ => unreachable!(),
        };
        let s = settings("");
        assert_eq!(
            check_claims(&s, &claims("{}"), NOW),
            Err("token has no exp claim".into())
        );
        let lax = settings(r#", "require-exp": false"#);
        assert_eq!(check_claims(&lax, &claims("{}"), NOW), Ok(()));
        assert_eq!(
            check_claims(&lax, &claims(r#"{"exp": "soon"}"#), NOW),
            Err("the exp claim is not a number".into())
        );
        assert_eq!(
            check_claims(&lax, &claims(r#"{"nbf": 1700000500}"#), NOW),
            Err("token not valid yet (nbf is 400 s from now)".into())
        );
        assert_eq!(
            check_claims(&lax, &claims(r#"{"nbf": 1700000150}"#), NOW),
            Ok(()),
            "leeway"
        );

        let iss = settings(r#", "require-exp": false, "issuer": "https://issuer.example""#);
        assert_eq!(
            check_claims(&iss, &claims("{}"), NOW),
            Err("token has no iss claim".into())
        );
        assert_eq!(
            check_claims(&iss, &claims(r#"{"iss": "https://evil.example"}"#), NOW),
            Err("wrong issuer".into())
        );

        let aud = settings(r#", "require-exp": false, "audience": ["api", "execd"]"#);
        assert_eq!(
            check_claims(&aud, &claims(r#"{"aud": "execd"}"#), NOW),
            Ok(())
        );
        assert_eq!(
            check_claims(&aud, &claims(r#"{"aud": ["x", "api"]}"#), NOW),
            Ok(())
        );
        assert_eq!(
            check_claims(&aud, &claims(r#"{"aud": ["x"]}"#), NOW),
            Err("wrong audience".into())
        );
        assert_eq!(
            check_claims(&aud, &claims("{}"), NOW),
            Err("token has no aud claim".into())
        );
    }

    #[test]
    fn issuer_and_audience_on_a_real_token() {
        let ok = rsa_settings(r#", "issuer": "https://issuer.example", "audience": "execd""#);
        accepted(run(&ok, Some(&format!("Bearer {RS256_TOKEN}")), NOW));
        let wrong = rsa_settings(r#", "audience": "other""#);
        assert_eq!(detail_of(&wrong, RS256_TOKEN), "wrong audience");
    }

    #[test]
    fn missing_and_malformed_tokens() {
        let json = rsa_settings("");
        let (detail, challenge) = refusal(run(&json, None, NOW));
        assert_eq!(detail, "missing Authorization header");
        assert_eq!(
            challenge, r#"Bearer realm="execd""#,
            "no error code without a token"
        );
        assert_eq!(
            self::detail(run(&json, Some("Basic dXNlcjpwYXNz"), NOW)),
            "the Authorization header must read `Bearer <token>`"
        );
        assert_eq!(
            detail_of(&json, "a.b"),
            "malformed token: expected three dot-separated parts"
        );
        assert_eq!(
            detail_of(&json, "a.b.c.d.e"),
            "malformed token: expected three dot-separated parts"
        );
        assert_eq!(
            detail_of(&json, "!!.e30.x"),
            "malformed token header: not base64url"
        );
        let crit = format!(
            "{}.e30.",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","crit":["b64"]}"#)
        );
        assert_eq!(
            detail_of(&json, &crit),
            "the token has critical header parameters (crit) that are not supported"
        );
    }

    #[test]
    fn bare_token_in_a_custom_header() {
        let json =
            format!(r#"{{"secret": "{SECRET}", "header": "Authorization", "scheme": null}}"#);
        accepted(run(&json, Some(HS256_TOKEN), NOW));
    }

    #[test]
    fn validate_refuses_weak_or_half_configured_verifiers() {
        assert_eq!(
            validate("{}"),
            Err("secret or public-key: give `secret` (HS256) or `public-key` (RS256)".into())
        );
        assert!(
            validate(r#"{"secret": "short"}"#)
                .unwrap_err()
                .starts_with("secret: must be at least 32 bytes")
        );
        let err = validate(&format!(
            r#"{{"secret": "{SECRET}", "algorithms": ["none"]}}"#
        ))
        .unwrap_err();
        assert!(
            err.starts_with("algorithms[0]: unknown variant `none`"),
            "{err}"
        );
        assert_eq!(
            validate(&format!(
                r#"{{"secret": "{SECRET}", "algorithms": ["RS256"]}}"#
            )),
            Err("public-key: required because algorithms lists RS256".into())
        );
        assert_eq!(
            validate(&rsa_settings(&format!(r#", "secret": "{SECRET}""#))),
            Ok(()),
            "both keys without `algorithms` derive both algorithms"
        );
        assert_eq!(
            validate(&rsa_settings(r#", "algorithms": ["HS256"]"#)),
            Err("secret: required because algorithms lists HS256".into())
        );
        assert_eq!(
            validate(&rsa_settings(&format!(
                r#", "secret": "{SECRET}", "algorithms": ["RS256"]"#
            ))),
            Err("secret: given, but algorithms does not list HS256".into())
        );
        let err = validate(
            r#"{"public-key": "-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----"}"#,
        )
        .unwrap_err();
        assert!(
            err.starts_with("public-key: not an RSA public key (SPKI)"),
            "{err}"
        );
        let err = validate(r#"{"public-key": "ssh-rsa AAAA"}"#).unwrap_err();
        assert!(err.starts_with("public-key: expected a PEM block"), "{err}");
        let small = serde_json::to_string(SMALL).unwrap();
        assert_eq!(
            validate(&format!(r#"{{"public-key": {small}}}"#)),
            Err("public-key: the RSA key has 1024 bits; at least 2048 are required".into())
        );
        let err = validate(&rsa_settings(r#", "claims": {"sub": "user id"}"#)).unwrap_err();
        assert!(err.starts_with("claims.sub: "), "{err}");
        let err = validate(&rsa_settings(r#", "audience": 5"#)).unwrap_err();
        assert!(
            err.starts_with("audience: ") && err.contains("a string or a list of strings"),
            "{err}"
        );
        assert_eq!(validate(&rsa_settings("")), Ok(()));
    }
}
