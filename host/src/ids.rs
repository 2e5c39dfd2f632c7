//! Request ids and other random names.

use rand::RngCore;

/// `n` random bytes as lower-case hex. Every HTTP request without an
/// `X-Request-Id` takes one, so it is built in one allocation.
pub fn random_hex(n: usize) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut rng = rand::rng();
    let mut out = String::with_capacity(2 * n);
    let mut chunk = [0u8; 32];
    let mut left = n;
    while left > 0 {
        let bytes = &mut chunk[..left.min(32)];
        rng.fill_bytes(bytes);
        for b in bytes.iter() {
            out.push(char::from(DIGITS[usize::from(b >> 4)]));
            out.push(char::from(DIGITS[usize::from(b & 15)]));
        }
        left -= bytes.len();
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_hex_is_lower_hex_of_the_asked_length_and_differs() {
        for n in [0, 4, 16, 33, 70] {
            let a = random_hex(n);
            assert_eq!(a.len(), 2 * n, "{a}");
            assert!(
                a.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
                "{a}"
            );
            if n >= 4 {
                assert_ne!(a, random_hex(n));
            }
        }
    }
}
