//! `entropy`: the virtio-rng device, and how fast the guest may draw from it.

use serde::{Deserialize, Serialize};

use super::rate_limiter::{RateLimiterConfig, RateLimiterError};

/// The `PUT /entropy` body and config-file key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EntropyConfig {
    /// `bandwidth` in bytes, `ops` in requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EntropyError {
    #[error("entropy.rate_limiter: {0}")]
    RateLimiter(#[from] RateLimiterError),
}

impl EntropyConfig {
    pub fn validate(&self) -> Result<(), EntropyError> {
        if let Some(rl) = &self.rate_limiter {
            rl.validate()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_checked() {
        let none: EntropyConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(none, EntropyConfig::default());
        assert_eq!(none.validate(), Ok(()));
        let limited: EntropyConfig = serde_json::from_str(
            r#"{"rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 100}}}"#,
        )
        .unwrap();
        assert_eq!(limited.validate(), Ok(()));
        let zero: EntropyConfig =
            serde_json::from_str(r#"{"rate_limiter": {"ops": {"size": 10, "refill_time": 0}}}"#)
                .unwrap();
        assert!(
            zero.validate()
                .unwrap_err()
                .to_string()
                .contains("refill_time")
        );
        assert!(serde_json::from_str::<EntropyConfig>(r#"{"rate": 1}"#).is_err());
    }
}
