//! ember's entry point: flags, logging, then one microVM until it stops.

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use ember::api::{
    self,
    server::{ApiHandle, ApiServer},
};
use ember::seccomp::{self, Filters, SeccompError};
use ember::{cli, config, exit_code, logger, vmm};
use vmm::{ApiEndpoint, VmmOptions};
use vmm_sys_util::eventfd::EventFd;

use cli::Cli;
use config::{LoggerConfig, MetricsConfig, VmConfig};
use ember::metrics::METRICS;

fn main() -> ExitCode {
    let started = Instant::now();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() {
                exit_code::BAD_ARGUMENTS
            } else {
                0
            };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    if let Some(version) = &cli.firecracker_compat_version {
        ember::version::set_firecracker_compat(version.clone());
    }
    if cli.version {
        println!("{}", ember::version::version_line());
        return ExitCode::SUCCESS;
    }
    if cli.snapshot_version {
        println!(
            "{}",
            ember::snapshot::file::version_name(ember::snapshot::file::FORMAT_VERSION)
        );
        return ExitCode::SUCCESS;
    }
    if let Some(path) = &cli.describe_snapshot {
        return ExitCode::from(describe_snapshot(path));
    }
    if let Some(files) = &cli.rebase_memory {
        return ExitCode::from(rebase_memory(files));
    }
    let code = run(cli, started);
    // The log's last lines (why ember stops) are worth a short wait; a destination that
    // does not take them must not keep the process alive.
    logger::flush(LOG_FLUSH_LIMIT);
    ExitCode::from(code)
}

/// `--metadata PATH`: the file's JSON.
fn read_metadata(path: &std::path::Path) -> Result<serde_json::Value, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read --metadata {}: {e}", path.display()))?;
    serde_json::from_str(&text)
        .map_err(|e| format!("--metadata {} is not valid JSON: {e}", path.display()))
}

/// `--describe-snapshot PATH`: the state file's format version and what it holds.
fn describe_snapshot(path: &std::path::Path) -> u8 {
    let described = std::fs::File::open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))
        .and_then(|mut f| {
            ember::snapshot::file::describe(&mut std::io::BufReader::new(&mut f))
                .map_err(|e| format!("{}: {e}", path.display()))
        });
    match described {
        Ok(text) => {
            println!("{text}");
            0
        }
        Err(e) => {
            eprintln!("ember: {e}");
            exit_code::BAD_CONFIGURATION
        }
    }
}

/// `--rebase-memory BASE DIFF`: the diff's pages written over the base, in place.
fn rebase_memory(files: &[std::path::PathBuf]) -> u8 {
    let [base, diff] = files else {
        eprintln!("ember: --rebase-memory takes two files: BASE DIFF");
        return exit_code::BAD_ARGUMENTS;
    };
    let open = |path: &std::path::Path, write: bool| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))
    };
    let result = open(base, true).and_then(|b| {
        let d = open(diff, false)?;
        ember::snapshot::memory::rebase(&b, &d).map_err(|e| e.to_string())
    });
    match result {
        Ok(bytes) => {
            println!(
                "{}: {} MiB from {} laid over it",
                base.display(),
                bytes >> 20,
                diff.display()
            );
            0
        }
        Err(e) => {
            eprintln!("ember: {e}");
            exit_code::BAD_CONFIGURATION
        }
    }
}

/// How long ember waits at exit for the API thread to remove its socket file.
const API_CLOSE_LIMIT: std::time::Duration = std::time::Duration::from_millis(500);

/// How long ember waits at exit for its log to be written.
const LOG_FLUSH_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Reports a fatal error as one log line, and on stderr too when the log goes elsewhere.
fn fail(code: u8, msg: impl std::fmt::Display) -> u8 {
    log::error!("{msg}");
    if !logger::errors_reach_stderr() {
        let line = format!("ember: {msg}");
        if !logger::to_stderr(&line) {
            eprintln!("{line}");
        }
    }
    code
}

fn run(cli: Cli, started: Instant) -> u8 {
    if let Err(e) = logger::init(&cli.id) {
        eprintln!("ember: {e}");
        return exit_code::VMM_ERROR;
    }
    let flags_logger = LoggerConfig {
        log_path: cli.log_path.as_ref().map(|p| p.display().to_string()),
        level: cli.level,
        show_level: cli.show_level.then_some(true),
        show_log_origin: cli.show_log_origin.then_some(true),
        module: cli.module.clone(),
    };
    if let Err(e) = logger::configure(&flags_logger) {
        return fail(exit_code::BAD_CONFIGURATION, e);
    }
    for flag in cli.not_yet_effective() {
        log::warn!("{flag} is accepted but not yet effective in this version of ember");
    }
    let seccomp = match seccomp_filters(&cli) {
        Ok(f) => f,
        Err(e) => return fail(exit_code::BAD_CONFIGURATION, e),
    };

    let metadata = match &cli.metadata {
        Some(path) => match read_metadata(path) {
            Ok(v) => Some(v),
            Err(e) => return fail(exit_code::BAD_CONFIGURATION, e),
        },
        None => None,
    };

    let config = match &cli.config_file {
        Some(path) => match VmConfig::from_file(&path.display().to_string()) {
            Ok(c) => Some(c),
            Err(e) => return fail(exit_code::BAD_CONFIGURATION, e),
        },
        None => None,
    };

    // Signals are blocked before any thread exists so every thread inherits the mask and
    // only the vmm thread's signalfd sees them.
    if let Err(e) = vmm::signals::block_termination_signals() {
        return fail(exit_code::VMM_ERROR, e);
    }
    let (api, api_thread) = if cli.no_api {
        (None, None)
    } else {
        match start_api(&cli, started, &seccomp) {
            Ok((api, thread)) => (Some(api), Some(thread)),
            Err(e) => return fail(exit_code::HOST_UNSUITABLE, e),
        }
    };
    let opts = VmmOptions {
        instance_id: cli.id.clone(),
        boot_timer_start: cli.boot_timer.then_some(started),
        config,
        metrics: cli.metrics_path.as_ref().map(|p| MetricsConfig {
            metrics_path: p.display().to_string(),
            emit_id: false,
            properties: None,
        }),
        api,
        seccomp,
        enable_pci: cli.enable_pci,
        mmds_size_limit: cli.mmds_size_limit.unwrap_or(cli.http_api_max_payload_size),
        metadata,
    };
    let result = vmm::run_vmm(opts);
    if let Some(thread) = api_thread {
        thread.close(API_CLOSE_LIMIT);
    }
    match result {
        Ok(exit) => {
            if exit.code == exit_code::GUEST_SHUTDOWN {
                log::info!("microVM stopped: {}", exit.reason);
                exit.code
            } else {
                fail(
                    exit.code,
                    format!("microVM stopped: {} (exit code {})", exit.reason, exit.code),
                )
            }
        }
        Err(e) => fail(e.exit_code(), e),
    }
}

/// The filters the flags ask for: the built-in ones, the user's, or none (a warning).
fn seccomp_filters(cli: &Cli) -> Result<Filters, SeccompError> {
    let filters = if cli.no_seccomp {
        log::warn!("--no-seccomp: ember's threads run without seccomp filters");
        Filters::none()
    } else if let Some(path) = &cli.seccomp_filter {
        let f = Filters::from_json_file(path)?;
        log::info!("seccomp filters from {}", path.display());
        f
    } else {
        Filters::built_in()?
    };
    if filters.is_enabled() {
        seccomp::install_sigsys_handler()?;
    }
    Ok(filters)
}

#[derive(Debug, thiserror::Error)]
enum ApiStartError {
    #[error("{0}")]
    Socket(#[from] api::socket::SocketError),
    #[error("cannot start the API server: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Spawn(#[from] api::server::SpawnError),
}

/// Binds the API socket and starts the API thread; returns the vmm thread's end.
fn start_api(
    cli: &Cli,
    started: Instant,
    seccomp: &Filters,
) -> Result<(ApiEndpoint, ApiHandle), ApiStartError> {
    let (listener, socket_file) = api::socket::bind(&cli.api_sock)?;
    let wakeup = EventFd::new(libc::EFD_NONBLOCK)?;
    let (tx, rx) = std::sync::mpsc::channel();
    let server = ApiServer::new(
        listener,
        cli.http_api_max_payload_size,
        tx,
        wakeup.try_clone()?,
    )?;
    let thread = server.spawn(seccomp, socket_file)?;
    METRICS
        .api_server
        .process_startup_time_us
        .set(started.elapsed().as_micros() as u64);
    log::info!("API server listening on {}", cli.api_sock.display());
    Ok((
        ApiEndpoint {
            requests: rx,
            wakeup,
        },
        thread,
    ))
}
