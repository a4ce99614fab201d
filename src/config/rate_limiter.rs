//! `rate_limiter` bodies shared by drives and network interfaces.

use serde::{Deserialize, Serialize};

/// A token bucket: `size` tokens refilled every `refill_time` milliseconds, plus a
/// one-time burst spent before the refill rate applies.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucketConfig {
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    pub refill_time: u64,
}

/// Bandwidth (bytes) and operations limits; either may be absent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiterConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucketConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucketConfig>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RateLimiterError {
    #[error("{0}.refill_time must be greater than 0 when size is greater than 0")]
    ZeroRefillTime(&'static str),
}

impl RateLimiterConfig {
    pub fn validate(&self) -> Result<(), RateLimiterError> {
        for (name, bucket) in [("bandwidth", &self.bandwidth), ("ops", &self.ops)] {
            if let Some(b) = bucket
                && b.size > 0
                && b.refill_time == 0
            {
                return Err(RateLimiterError::ZeroRefillTime(name));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_refill_rejected() {
        let r: RateLimiterConfig =
            serde_json::from_str(r#"{"ops":{"size":10,"refill_time":0}}"#).unwrap();
        assert_eq!(r.validate(), Err(RateLimiterError::ZeroRefillTime("ops")));
        let r: RateLimiterConfig = serde_json::from_str(
            r#"{"bandwidth":{"size":1000,"one_time_burst":5,"refill_time":100}}"#,
        )
        .unwrap();
        assert_eq!(r.validate(), Ok(()));
    }
}
