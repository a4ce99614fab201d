//! The microVM metadata service.
//!
//! The operator sets a JSON document through the REST API; the guest reads it over HTTP
//! at a link-local address. Guest frames for that address are diverted by the net device
//! into [`stack::MmdsStack`], a small user-space ARP/IPv4/TCP stack that hands complete
//! HTTP requests to [`guest_http`], which answers from [`Mmds`].
//!
//! One [`Mmds`] (typically in an `Arc<Mutex<_>>`) is shared by the API thread and every
//! net device that allows MMDS; each device owns its own [`stack::MmdsStack`] and locks
//! the `Mmds` only while feeding a frame in.

pub mod config;
pub mod data_store;
#[doc(hidden)]
pub mod fuzzing;
pub mod guest_http;
pub mod stack;
pub mod token;

pub use config::{ConfigError, DEFAULT_IPV4_ADDRESS, MmdsConfig, MmdsVersion};
pub use data_store::{DataStoreError, MmdsStore, OutputFormat};
pub use token::{TokenAuthority, TokenError};

/// Everything a guest request is answered from.
#[derive(Debug, Default)]
pub struct Mmds {
    /// The metadata document.
    pub store: MmdsStore,
    /// Live V2 session tokens.
    pub tokens: TokenAuthority,
    config: MmdsConfig,
}

impl Mmds {
    /// A service with an empty store of the default size limit.
    pub fn new(config: MmdsConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self {
            store: MmdsStore::default(),
            tokens: TokenAuthority::new(),
            config,
        })
    }

    /// The current configuration.
    pub fn config(&self) -> &MmdsConfig {
        &self.config
    }

    /// Replaces the configuration; a version change drops all session tokens.
    pub fn set_config(&mut self, config: MmdsConfig) -> Result<(), ConfigError> {
        config.validate()?;
        if config.version != self.config.version {
            self.tokens.clear();
        }
        self.config = config;
        Ok(())
    }

    /// The configured token policy.
    pub fn version(&self) -> MmdsVersion {
        self.config.version
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::time::Instant;

    use super::*;

    #[test]
    fn config_changes() {
        let mut mmds = Mmds::default();
        assert_eq!(mmds.version(), MmdsVersion::V1);
        let now = Instant::now();
        let token = mmds.tokens.issue(60, now).unwrap();

        let v2 = MmdsConfig {
            version: MmdsVersion::V2,
            ..MmdsConfig::default()
        };
        mmds.set_config(v2.clone()).unwrap();
        assert_eq!(mmds.version(), MmdsVersion::V2);
        assert!(!mmds.tokens.is_valid(&token, now));

        let token = mmds.tokens.issue(60, now).unwrap();
        mmds.set_config(v2.clone()).unwrap();
        assert!(mmds.tokens.is_valid(&token, now));

        let bad = MmdsConfig {
            ipv4_address: Ipv4Addr::new(1, 2, 3, 4),
            ..v2
        };
        assert!(mmds.set_config(bad.clone()).is_err());
        assert!(Mmds::new(bad).is_err());
        assert_eq!(mmds.config().ipv4_address, DEFAULT_IPV4_ADDRESS);
    }
}
