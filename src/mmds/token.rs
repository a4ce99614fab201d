//! Session tokens for MMDS V2.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Shortest token lifetime a guest may ask for, in seconds.
pub const MIN_TOKEN_TTL_SECONDS: u32 = 1;
/// Longest token lifetime a guest may ask for, in seconds (6 hours).
pub const MAX_TOKEN_TTL_SECONDS: u32 = 21600;
/// Bound on remembered tokens so a guest issuing tokens in a loop cannot grow host memory.
pub const MAX_LIVE_TOKENS: usize = 1024;

/// 256 bits: guessing a live token is hopeless even with many tokens alive.
const TOKEN_RANDOM_BYTES: usize = 32;

/// Errors of the token authority.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// The requested lifetime is out of range.
    #[error(
        "Invalid time to live value provided for token: {0}. Please provide a value between \
         {MIN_TOKEN_TTL_SECONDS} and {MAX_TOKEN_TTL_SECONDS}."
    )]
    InvalidTtl(u32),
    /// The kernel did not provide random bytes.
    #[error("Cannot generate an MMDS token: getrandom failed with errno {0}.")]
    Entropy(i32),
    /// The expiry does not fit the monotonic clock.
    #[error("Cannot generate an MMDS token: its expiry overflows the clock.")]
    ClockOverflow,
}

/// Issues and checks session tokens.
#[derive(Debug, Default)]
pub struct TokenAuthority {
    /// Token text to expiry time.
    tokens: HashMap<String, Instant>,
}

impl TokenAuthority {
    /// An authority with no live tokens.
    pub fn new() -> Self {
        Self::default()
    }

    /// Issues a token valid for `ttl_seconds` from `now`.
    pub fn issue(&mut self, ttl_seconds: u32, now: Instant) -> Result<String, TokenError> {
        if !(MIN_TOKEN_TTL_SECONDS..=MAX_TOKEN_TTL_SECONDS).contains(&ttl_seconds) {
            return Err(TokenError::InvalidTtl(ttl_seconds));
        }
        let expiry = now
            .checked_add(Duration::from_secs(u64::from(ttl_seconds)))
            .ok_or(TokenError::ClockOverflow)?;
        let mut random = [0u8; TOKEN_RANDOM_BYTES];
        fill_random(&mut random)?;
        let token = base64_encode(&random);
        self.make_room(now);
        self.tokens.insert(token.clone(), expiry);
        Ok(token)
    }

    /// Whether `token` was issued here and has not expired at `now`.
    pub fn is_valid(&self, token: &str, now: Instant) -> bool {
        self.tokens.get(token).is_some_and(|expiry| now < *expiry)
    }

    /// Number of remembered tokens (expired ones included until evicted).
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether no token is remembered.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Forgets every token.
    pub fn clear(&mut self) {
        self.tokens.clear();
    }

    fn make_room(&mut self, now: Instant) {
        if self.tokens.len() < MAX_LIVE_TOKENS {
            return;
        }
        self.tokens.retain(|_, expiry| now < *expiry);
        while self.tokens.len() >= MAX_LIVE_TOKENS {
            let soonest = self
                .tokens
                .iter()
                .min_by_key(|(_, expiry)| **expiry)
                .map(|(token, _)| token.clone());
            match soonest {
                Some(token) => {
                    self.tokens.remove(&token);
                }
                None => break,
            }
        }
    }
}

/// Fills `buf` from the kernel's CSPRNG.
pub(crate) fn fill_random(buf: &mut [u8]) -> Result<(), TokenError> {
    crate::host_random::fill(buf).map_err(|e| TokenError::Entropy(e.raw_os_error().unwrap_or(0)))
}

const BASE64_ALPHABET: &[u8; 64] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with `=` padding (RFC 4648 section 4).
pub(crate) fn base64_encode(bytes: &[u8]) -> String {
    let symbol = |index: u32| {
        BASE64_ALPHABET
            .get((index & 0x3f) as usize)
            .map_or('=', |b| char::from(*b))
    };
    let mut out = String::with_capacity(bytes.len().div_ceil(3).saturating_mul(4));
    for chunk in bytes.chunks(3) {
        let b0 = chunk.first().copied().map_or(0, u32::from);
        let b1 = chunk.get(1).copied().map_or(0, u32::from);
        let b2 = chunk.get(2).copied().map_or(0, u32::from);
        let group = (b0 << 16) | (b1 << 8) | b2;
        out.push(symbol(group >> 18));
        out.push(symbol(group >> 12));
        out.push(if chunk.len() > 1 {
            symbol(group >> 6)
        } else {
            '='
        });
        out.push(if chunk.len() > 2 { symbol(group) } else { '=' });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_rfc4648_vectors() {
        let vectors = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (input, expected) in vectors {
            assert_eq!(base64_encode(input.as_bytes()), expected);
        }
        assert_eq!(base64_encode(&[0xff, 0xfe, 0xfd]), "//79");
    }

    #[test]
    fn ttl_range() {
        let mut authority = TokenAuthority::new();
        let now = Instant::now();
        for bad in [0, MAX_TOKEN_TTL_SECONDS + 1, u32::MAX] {
            let err = authority.issue(bad, now).unwrap_err();
            assert_eq!(err, TokenError::InvalidTtl(bad));
            assert!(err.to_string().contains("between 1 and 21600"), "{err}");
        }
        assert!(authority.issue(MIN_TOKEN_TTL_SECONDS, now).is_ok());
        assert!(authority.issue(MAX_TOKEN_TTL_SECONDS, now).is_ok());
        assert_eq!(authority.len(), 2);
    }

    #[test]
    fn tokens_expire() {
        let mut authority = TokenAuthority::new();
        let now = Instant::now();
        let token = authority.issue(2, now).unwrap();
        assert_eq!(token.len(), 44);
        assert!(authority.is_valid(&token, now));
        assert!(authority.is_valid(&token, now + Duration::from_millis(1999)));
        assert!(!authority.is_valid(&token, now + Duration::from_secs(2)));
        assert!(!authority.is_valid("forged", now));
        assert!(!authority.is_valid("", now));
    }

    #[test]
    fn tokens_are_distinct() {
        let mut authority = TokenAuthority::new();
        let now = Instant::now();
        let a = authority.issue(10, now).unwrap();
        let b = authority.issue(10, now).unwrap();
        assert_ne!(a, b);
        authority.clear();
        assert!(authority.is_empty());
        assert!(!authority.is_valid(&a, now));
    }

    #[test]
    fn bounded_eviction_prefers_expired_then_soonest() {
        let mut authority = TokenAuthority::new();
        let now = Instant::now();
        let short = authority.issue(1, now).unwrap();
        let long_lived: Vec<String> = (0..MAX_LIVE_TOKENS - 2)
            .map(|_| authority.issue(100, now).unwrap())
            .collect();
        let medium = authority.issue(50, now).unwrap();
        assert_eq!(authority.len(), MAX_LIVE_TOKENS);

        // `short` has expired: it goes first.
        let later = now + Duration::from_secs(2);
        let fresh = authority.issue(100, later).unwrap();
        assert_eq!(authority.len(), MAX_LIVE_TOKENS);
        assert!(!authority.tokens.contains_key(&short));
        assert!(authority.is_valid(&medium, later));

        // Nothing expired: the one expiring soonest (`medium`) goes.
        let newest = authority.issue(100, later).unwrap();
        assert_eq!(authority.len(), MAX_LIVE_TOKENS);
        assert!(!authority.is_valid(&medium, later));
        assert!(authority.is_valid(&fresh, later));
        assert!(authority.is_valid(&newest, later));
        assert!(long_lived.iter().all(|t| authority.is_valid(t, later)));
    }

    #[test]
    fn fill_random_fills() {
        let mut a = [0u8; 64];
        let mut b = [0u8; 64];
        fill_random(&mut a).unwrap();
        fill_random(&mut b).unwrap();
        assert_ne!(a, b);
        fill_random(&mut []).unwrap();
    }
}
