//! Command-line flags. Names and meanings follow Firecracker's, because orchestrators and
//! SDKs launch the binary with them unchanged.

use std::path::PathBuf;

use clap::Parser;

use crate::config::LogLevel;

/// Default for `--http-api-max-payload-size`, in bytes.
pub const DEFAULT_MAX_PAYLOAD: usize = 51_200;

#[derive(Debug, Parser)]
#[command(
    name = "ember",
    version,
    about = "ember: a KVM microVM monitor for edge hosts",
    disable_version_flag = true
)]
pub struct Cli {
    /// Path of the Unix socket the REST API listens on.
    #[arg(long, value_name = "PATH", default_value = "/run/ember.socket")]
    pub api_sock: PathBuf,

    /// MicroVM id, used in log lines and metrics: 1-64 letters, digits and hyphens.
    #[arg(long, value_name = "ID", default_value = "anonymous-instance", value_parser = parse_id)]
    pub id: String,

    /// Boot a microVM straight from this JSON config file.
    #[arg(long, value_name = "PATH")]
    pub config_file: Option<PathBuf>,

    /// Do not serve the API; requires --config-file. ember exits when the guest stops.
    #[arg(long, requires = "config_file")]
    pub no_api: bool,

    /// Write the log to this file or named pipe instead of stderr.
    #[arg(long, value_name = "PATH")]
    pub log_path: Option<PathBuf>,

    /// Log level: Error, Warning, Info, Debug, Trace or Off (case-insensitive).
    #[arg(long, value_name = "LEVEL")]
    pub level: Option<LogLevel>,

    /// Only log records whose module path starts with this.
    #[arg(long, value_name = "MODULE")]
    pub module: Option<String>,

    /// Include the level in each log line.
    #[arg(long)]
    pub show_level: bool,

    /// Include the source file and line in each log line.
    #[arg(long)]
    pub show_log_origin: bool,

    /// Write metrics to this file or named pipe.
    #[arg(long, value_name = "PATH")]
    pub metrics_path: Option<PathBuf>,

    /// Log the time from process start to the guest's first serial output.
    #[arg(long)]
    pub boot_timer: bool,

    /// Replace the built-in seccomp filters with the ones in this file.
    #[arg(long, value_name = "PATH", conflicts_with = "no_seccomp")]
    pub seccomp_filter: Option<PathBuf>,

    /// Run without seccomp filters.
    #[arg(long)]
    pub no_seccomp: bool,

    /// Largest API request body accepted, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_PAYLOAD)]
    pub http_api_max_payload_size: usize,

    /// Largest MMDS data store, in bytes (by default the API's largest request body).
    #[arg(long, value_name = "BYTES")]
    pub mmds_size_limit: Option<usize>,

    /// A JSON file whose object becomes the MMDS data store before anything else.
    #[arg(long, value_name = "PATH")]
    pub metadata: Option<PathBuf>,

    /// Give the guest a PCI root complex (ECAM, a host bridge, ACPI); docs/pci.md says which
    /// devices sit on it.
    #[arg(long)]
    pub enable_pci: bool,

    /// Wall-clock start time of the launching process, in microseconds (for the boot timer).
    #[arg(long, value_name = "US")]
    pub start_time_us: Option<u64>,

    /// CPU start time of the launching process, in microseconds.
    #[arg(long, value_name = "US")]
    pub start_time_cpu_us: Option<u64>,

    /// CPU time the parent (jailer) used, in microseconds.
    #[arg(long, value_name = "US")]
    pub parent_cpu_time_us: Option<u64>,

    /// Print the version and exit.
    #[arg(long)]
    pub version: bool,

    /// Answer as the Firecracker version VERSION (by default the API version ember follows):
    /// `--version` prints "Firecracker vVERSION" and `GET /version` reports VERSION, for
    /// clients that check the binary's version before they use it.
    #[arg(
        long,
        value_name = "VERSION",
        num_args = 0..=1,
        default_missing_value = crate::version::FIRECRACKER_API_VERSION,
        value_parser = crate::version::parse_version
    )]
    pub firecracker_compat_version: Option<String>,

    /// Print the snapshot format version this ember writes and exit.
    #[arg(long)]
    pub snapshot_version: bool,

    /// Print the format version (and what it holds) of a snapshot's state file and exit.
    #[arg(long, value_name = "PATH")]
    pub describe_snapshot: Option<PathBuf>,

    /// Lay a diff snapshot's memory file over the full (or already rebased) memory file
    /// it follows, in place, and exit: BASE then holds the memory of the diff's snapshot.
    #[arg(long, num_args = 2, value_names = ["BASE", "DIFF"])]
    pub rebase_memory: Option<Vec<PathBuf>>,
}

/// Instance ids are 1-64 ASCII letters, digits and hyphens: orchestrators use them in
/// paths (jails, sockets, cgroups), and Firecracker's launchers check the same rule.
fn parse_id(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 64 {
        return Err(format!(
            "the id must be 1-64 characters long, this one has {}",
            s.chars().count()
        ));
    }
    if let Some((position, c)) = s
        .chars()
        .enumerate()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || *c == '-'))
    {
        return Err(format!(
            "invalid character {c:?} at position {position}: use letters, digits and '-'"
        ));
    }
    Ok(s.to_owned())
}

impl Cli {
    /// Flags accepted for compatibility whose effect ember does not implement yet but whose
    /// absence changes nothing the guest or the host's safety depends on; each is logged so
    /// an operator is not misled.
    pub fn not_yet_effective(&self) -> Vec<&'static str> {
        let mut flags = Vec::new();
        if self.start_time_cpu_us.is_some() {
            flags.push("--start-time-cpu-us");
        }
        if self.parent_cpu_time_us.is_some() {
            flags.push("--parent-cpu-time-us");
        }
        flags
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("ember").chain(args.iter().copied()))
    }

    #[test]
    fn firecracker_flags_accepted() {
        let cli = parse(&[
            "--api-sock",
            "/tmp/s",
            "--id",
            "vm-1",
            "--level",
            "debug",
            "--show-level",
            "--show-log-origin",
            "--boot-timer",
            "--http-api-max-payload-size",
            "1000",
            "--mmds-size-limit",
            "10",
            "--metadata",
            "/tmp/md.json",
            "--enable-pci",
            "--start-time-us",
            "5",
            "--start-time-cpu-us",
            "6",
            "--parent-cpu-time-us",
            "7",
            "--no-seccomp",
            "--module",
            "ember::vmm",
            "--metrics-path",
            "/tmp/m",
        ])
        .unwrap();
        assert_eq!(cli.id, "vm-1");
        assert_eq!(cli.level, Some(LogLevel::Debug));
        assert_eq!(cli.http_api_max_payload_size, 1000);
        assert!(cli.enable_pci);
        assert!(cli.no_seccomp);
        assert!(!cli.not_yet_effective().contains(&"--no-seccomp"));
    }

    #[test]
    fn compat_version_defaults_to_the_followed_api() {
        let bare = parse(&["--firecracker-compat-version"]).unwrap();
        assert_eq!(
            bare.firecracker_compat_version.as_deref(),
            Some(crate::version::FIRECRACKER_API_VERSION)
        );
        let chosen = parse(&["--firecracker-compat-version", "1.7.0"]).unwrap();
        assert_eq!(chosen.firecracker_compat_version.as_deref(), Some("1.7.0"));
        assert_eq!(parse(&[]).unwrap().firecracker_compat_version, None);
    }

    #[test]
    fn no_api_needs_config_file() {
        assert!(parse(&["--no-api"]).is_err());
        assert!(parse(&["--no-api", "--config-file", "x.json"]).is_ok());
    }

    #[test]
    fn bad_values_rejected() {
        assert!(parse(&["--id", "has space"]).is_err());
        assert!(parse(&["--id", "under_score"]).is_err());
        assert!(parse(&["--id", ""]).is_err());
        assert!(parse(&["--id", &"a".repeat(65)]).is_err());
        assert!(parse(&["--id", &"a".repeat(64)]).is_ok());
        assert!(parse(&["--firecracker-compat-version", "one"]).is_err());
        assert!(parse(&["--level", "loud"]).is_err());
        assert!(parse(&["--no-seccomp", "--seccomp-filter", "f"]).is_err());
    }
}
