//! ember's entry point: flags, logging, then one microVM until it stops.

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use ember::{cli, config, exit_code, logger, vmm};

use cli::Cli;
use config::{LoggerConfig, VmConfig};
use vmm::builder::{BuildOptions, build_microvm};

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
    if cli.version {
        println!("ember v{}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    ExitCode::from(run(cli, started))
}

/// Reports a fatal error as one log line, and on stderr too when the log goes elsewhere.
fn fail(code: u8, msg: impl std::fmt::Display) -> u8 {
    log::error!("{msg}");
    if !logger::errors_reach_stderr() {
        eprintln!("ember: {msg}");
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

    let Some(config_path) = &cli.config_file else {
        return fail(
            exit_code::BAD_ARGUMENTS,
            "the API server is not available in this version; boot with --config-file PATH --no-api",
        );
    };
    if !cli.no_api {
        log::warn!(
            "--api-sock {} is not served yet in this version; booting from the config file only",
            cli.api_sock.display()
        );
    }
    let config = match VmConfig::from_file(&config_path.display().to_string()) {
        Ok(c) => c,
        Err(e) => return fail(exit_code::BAD_CONFIGURATION, e),
    };
    if let Some(logger_config) = &config.logger
        && let Err(e) = logger::configure(logger_config)
    {
        return fail(exit_code::BAD_CONFIGURATION, e);
    }
    if config.metrics.is_some() {
        log::warn!("the metrics key is accepted but not yet effective in this version of ember");
    }
    if !config.drives.is_empty() || !config.network_interfaces.is_empty() {
        log::warn!(
            "drives and network-interfaces are validated but not yet attached in this version of ember"
        );
    }
    // validate() guarantees a boot source.
    let Some(boot) = &config.boot_source else {
        return fail(
            exit_code::BAD_CONFIGURATION,
            config::ConfigError::MissingBootSource,
        );
    };

    if let Err(e) = vmm::signals::block_termination_signals() {
        return fail(exit_code::VMM_ERROR, e);
    }
    let opts = BuildOptions {
        boot_timer_start: cli.boot_timer.then_some(started),
    };
    let microvm = match build_microvm(boot, &config.machine_config, opts) {
        Ok(vm) => vm,
        Err(e) => return fail(e.exit_code(), e),
    };
    match vmm::run(microvm) {
        Ok(exit) => {
            if exit.code == exit_code::GUEST_SHUTDOWN {
                log::info!("microVM stopped: {}", exit.reason);
            } else {
                log::error!("microVM stopped: {} (exit code {})", exit.reason, exit.code);
            }
            exit.code
        }
        Err(e) => fail(exit_code::VMM_ERROR, e),
    }
}
