//! What ember says it is. Its own version everywhere a person reads it (logs, `--version`,
//! `GET /`), and, for clients that gate features on a Firecracker version, the version of
//! the Firecracker API description ember follows, in `GET /version`'s `firecracker_version`
//! and, when the operator asks for it (`--firecracker-compat-version`), in `--version`.

use std::sync::OnceLock;

/// ember's own version.
pub const EMBER_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The Firecracker API description ember implements (docs/api.md lists the endpoints it
/// leaves out and why).
pub const FIRECRACKER_API_VERSION: &str = "1.17.0-dev";

static COMPAT_VERSION: OnceLock<String> = OnceLock::new();

/// Makes ember answer as Firecracker `version` would (set once, from the command line).
/// Later calls change nothing.
pub fn set_firecracker_compat(version: String) {
    let _ = COMPAT_VERSION.set(version);
}

/// The Firecracker version ember reports to clients: the operator's choice, else
/// [`FIRECRACKER_API_VERSION`].
pub fn firecracker_version() -> &'static str {
    COMPAT_VERSION
        .get()
        .map_or(FIRECRACKER_API_VERSION, String::as_str)
}

/// Whether `--version` should print Firecracker's line instead of ember's.
pub fn firecracker_compat() -> bool {
    COMPAT_VERSION.get().is_some()
}

/// The `--version` output.
pub fn version_line() -> String {
    if firecracker_compat() {
        // The line version-probing clients match: "Firecracker v<major>.<minor>.<patch>".
        format!("Firecracker v{}", firecracker_version())
    } else {
        format!("ember v{EMBER_VERSION} (Firecracker API {FIRECRACKER_API_VERSION})")
    }
}

/// Checks a version given on the command line: `MAJOR.MINOR.PATCH` with an optional
/// `-suffix` of letters, digits and dots, as semantic versions are written.
pub fn parse_version(text: &str) -> Result<String, String> {
    let (core, suffix) = match text.split_once('-') {
        Some((core, suffix)) => (core, Some(suffix)),
        None => (text, None),
    };
    let numbers: Vec<&str> = core.split('.').collect();
    let numeric = numbers.len() == 3
        && numbers
            .iter()
            .all(|n| !n.is_empty() && n.len() <= 9 && n.bytes().all(|b| b.is_ascii_digit()));
    let suffix_ok = suffix.is_none_or(|s| {
        !s.is_empty() && s.len() <= 32 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.')
    });
    if numeric && suffix_ok {
        Ok(text.to_owned())
    } else {
        Err(format!(
            "{text:?} is not a version: use MAJOR.MINOR.PATCH, for example {FIRECRACKER_API_VERSION}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_checked() {
        for good in ["1.7.0", "1.17.0-dev", "10.0.12-rc.1"] {
            assert_eq!(parse_version(good).as_deref(), Ok(good));
        }
        for bad in [
            "",
            "1.7",
            "1.7.0.1",
            "v1.7.0",
            "1.x.0",
            "1.7.0-",
            "1.7.0-a b",
        ] {
            assert!(parse_version(bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse_version(FIRECRACKER_API_VERSION).is_ok());
    }

    #[test]
    fn ember_line_names_both_versions() {
        // The process-wide override is never set in unit tests.
        assert!(!firecracker_compat());
        assert_eq!(firecracker_version(), FIRECRACKER_API_VERSION);
        let line = version_line();
        assert!(line.starts_with("ember v"), "{line}");
        assert!(line.contains(FIRECRACKER_API_VERSION), "{line}");
    }
}
