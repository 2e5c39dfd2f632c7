//! Request ids and other random names.

use rand::RngCore;

/// `n` random bytes as lower-case hex.
pub fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A new request id: 16 random bytes in hex.
pub fn request_id() -> String {
    random_hex(16)
}

/// Whether a client-sent `X-Request-Id` is safe to adopt: short, and only
/// characters that cannot break a log line or a header.
pub fn is_sane_request_id(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}
