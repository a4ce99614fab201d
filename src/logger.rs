//! The human-readable log: one line per record, to stderr or to a file or named pipe.
//!
//! Lines look like `2026-11-22T02:40:12.123456Z [vm-1:vcpu0:Info:src/x.rs:12] message`;
//! the level and origin parts appear only when asked for (`--show-level`,
//! `--show-log-origin`), as orchestrators written for Firecracker expect.

use std::io::Write;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use log::{Level, LevelFilter, Log, Metadata, Record};

use crate::config::LoggerConfig;

#[derive(Debug, thiserror::Error)]
pub enum LoggerError {
    #[error("cannot open log file {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("the logger was already installed by another component")]
    AlreadyInstalled,
    #[error("cannot start the log writer thread: {0}")]
    Thread(std::io::Error),
}

struct LoggerState {
    instance_id: String,
    /// False once the log goes to a file or pipe.
    to_stderr: bool,
    show_level: bool,
    show_origin: bool,
    module: Option<String>,
}

/// What the writer thread writes.
enum Entry {
    /// A log line, to the log's destination.
    Line(String),
    /// A line for stderr whatever the log's destination (a fatal error's summary).
    Stderr(String),
}

/// Lines waiting for the writer thread at most; beyond this, lines are dropped and counted.
pub const LOG_QUEUE_LINES: usize = 4096;

/// Formatting happens on the thread that logs; writing happens on a thread of its own, so a
/// destination that blocks (a full pipe, a stalled reader, a slow disk) stalls only that
/// thread: whoever logs never waits, and a full queue drops the line and counts it.
struct EmberLogger {
    state: Mutex<LoggerState>,
    queue: SyncSender<Entry>,
    /// A destination to switch to, picked up by the writer thread before its next line.
    next_sink: Arc<Mutex<Option<Box<dyn Write + Send>>>>,
    /// Entries queued and not yet written.
    queued: Arc<Pending>,
}

/// How many entries wait for the writer, and a signal when none does (for `flush`).
#[derive(Default)]
struct Pending {
    count: Mutex<usize>,
    emptied: Condvar,
}

impl Pending {
    fn add(&self) {
        *self.count.lock().unwrap_or_else(|e| e.into_inner()) += 1;
    }

    fn done(&self) {
        let mut count = self.count.lock().unwrap_or_else(|e| e.into_inner());
        *count = count.saturating_sub(1);
        if *count == 0 {
            self.emptied.notify_all();
        }
    }
}

impl EmberLogger {
    fn enqueue(&self, entry: Entry) -> bool {
        self.queued.add();
        if self.queue.try_send(entry).is_err() {
            self.queued.done();
            crate::metrics::METRICS.vmm.log_lines_dropped.inc();
            return false;
        }
        true
    }
}

static LOGGER: OnceLock<EmberLogger> = OnceLock::new();

/// The writer thread: takes queued entries in order and writes each whole.
fn write_entries(
    entries: Receiver<Entry>,
    next_sink: Arc<Mutex<Option<Box<dyn Write + Send>>>>,
    queued: Arc<Pending>,
) {
    let mut sink: Box<dyn Write + Send> = Box::new(std::io::stderr());
    for entry in entries {
        if let Some(new) = next_sink.lock().unwrap_or_else(|e| e.into_inner()).take() {
            sink = new;
        }
        let written = match &entry {
            Entry::Line(line) => sink.write_all(line.as_bytes()).and_then(|()| sink.flush()),
            Entry::Stderr(line) => std::io::stderr().write_all(line.as_bytes()),
        };
        // A destination that fails (full disk, a pipe whose reader is gone) must not take
        // the VMM down: the line is dropped and counted.
        if written.is_err() {
            crate::metrics::METRICS.vmm.log_lines_dropped.inc();
        }
        queued.done();
    }
}

/// Installs the process logger writing to stderr. Call once, early in `main`.
pub fn init(instance_id: &str) -> Result<(), LoggerError> {
    if LOGGER.get().is_some() {
        return Err(LoggerError::AlreadyInstalled);
    }
    let (queue, entries) = sync_channel(LOG_QUEUE_LINES);
    let next_sink = Arc::new(Mutex::new(None));
    let queued = Arc::new(Pending::default());
    let (sink, count) = (next_sink.clone(), queued.clone());
    // The writer must never take a signal (ember reads termination signals through a
    // signalfd on the vmm thread): it starts with every signal blocked, whatever the mask
    // of the thread calling this.
    // SAFETY: sigfillset fills a set we own; pthread_sigmask swaps this thread's mask and
    // the old one is restored right after the spawn.
    let old_mask = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
        old
    };
    let spawned = std::thread::Builder::new()
        .name("log".into())
        .spawn(move || write_entries(entries, sink, count));
    // SAFETY: restores the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old_mask, std::ptr::null_mut()) };
    spawned.map_err(LoggerError::Thread)?;
    let logger = LOGGER.get_or_init(|| EmberLogger {
        state: Mutex::new(LoggerState {
            instance_id: instance_id.to_owned(),
            to_stderr: true,
            show_level: false,
            show_origin: false,
            module: None,
        }),
        queue,
        next_sink,
        queued,
    });
    log::set_logger(logger).map_err(|_| LoggerError::AlreadyInstalled)?;
    log::set_max_level(LevelFilter::Info);
    Ok(())
}

/// Applies a `logger` configuration (from flags, the config file or the API). Fields left
/// out keep their current value.
pub fn configure(config: &LoggerConfig) -> Result<(), LoggerError> {
    let Some(logger) = LOGGER.get() else {
        return Ok(());
    };
    let sink: Option<Box<dyn Write + Send>> = match &config.log_path {
        Some(path) => {
            // Append keeps earlier lines of a regular file an operator may be tailing.
            let file =
                crate::host_file::open_sink(std::path::Path::new(path)).map_err(|source| {
                    LoggerError::Open {
                        path: path.clone(),
                        source,
                    }
                })?;
            crate::seccomp::set_log_fd(std::os::fd::AsRawFd::as_raw_fd(&file));
            Some(Box::new(file))
        }
        None => None,
    };
    let mut state = logger.state.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(sink) = sink {
        *logger.next_sink.lock().unwrap_or_else(|e| e.into_inner()) = Some(sink);
        state.to_stderr = false;
    }
    if let Some(v) = config.show_level {
        state.show_level = v;
    }
    if let Some(v) = config.show_log_origin {
        state.show_origin = v;
    }
    if let Some(m) = &config.module {
        state.module = (!m.is_empty()).then(|| m.clone());
    }
    if let Some(level) = config.level {
        log::set_max_level(level.to_filter());
    }
    Ok(())
}

/// Writes `line` on stderr after the log lines queued before it, without waiting; false
/// when no logger runs (the caller writes it itself).
pub fn to_stderr(line: &str) -> bool {
    match LOGGER.get() {
        Some(logger) => {
            logger.enqueue(Entry::Stderr(format!("{line}\n")));
            true
        }
        None => false,
    }
}

/// Waits up to `limit` for queued lines to be written; true if all were. For the end of
/// the process: lines still queued after it are lost with the process.
pub fn flush(limit: Duration) -> bool {
    let Some(logger) = LOGGER.get() else {
        return true;
    };
    // Woken by the writer as it empties the queue: no polling, no fixed sleep at exit.
    let count = logger
        .queued
        .count
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let (count, _) = logger
        .queued
        .emptied
        .wait_timeout_while(count, limit, |c| *c > 0)
        .unwrap_or_else(|e| e.into_inner());
    *count == 0
}

/// True when error records reach stderr, where a user who ran ember by hand looks.
pub fn errors_reach_stderr() -> bool {
    let Some(logger) = LOGGER.get() else {
        return false;
    };
    let state = logger.state.lock().unwrap_or_else(|e| e.into_inner());
    state.to_stderr && state.module.is_none() && log::max_level() >= LevelFilter::Error
}

fn level_name(level: Level) -> &'static str {
    match level {
        Level::Error => "Error",
        Level::Warn => "Warn",
        Level::Info => "Info",
        Level::Debug => "Debug",
        Level::Trace => "Trace",
    }
}

/// UTC wall-clock time as RFC 3339 with microseconds.
pub fn timestamp(now: SystemTime) -> String {
    let d = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60,
        d.subsec_micros()
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

impl Log for EmberLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let line = {
            let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(module) = &state.module
                && !record
                    .module_path()
                    .unwrap_or("")
                    .starts_with(module.as_str())
            {
                return;
            }
            let thread = std::thread::current();
            let mut prefix = format!("{}:{}", state.instance_id, thread.name().unwrap_or("?"));
            if state.show_level {
                prefix.push(':');
                prefix.push_str(level_name(record.level()));
            }
            if state.show_origin {
                prefix.push_str(&format!(
                    ":{}:{}",
                    record.file().unwrap_or("?"),
                    record.line().unwrap_or(0)
                ));
            }
            format!(
                "{} [{prefix}] {}\n",
                timestamp(SystemTime::now()),
                record.args()
            )
        };
        self.enqueue(Entry::Line(line));
    }

    fn flush(&self) {
        // Lines are flushed as they are written; waiting here could block the caller.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_are_utc_rfc3339() {
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
        let t = UNIX_EPOCH + Duration::from_micros(1_795_833_612_123_456);
        assert_eq!(timestamp(t), "2026-11-28T02:40:12.123456Z");
        // A leap day.
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(timestamp(t), "2000-02-29T00:00:00.000000Z");
    }
}

/// A call site's budget of log lines, for messages a guest can trigger at will (bad
/// descriptors, unknown registers): the first [`GUEST_LINES_PER_WINDOW`] in each
/// [`GUEST_LOG_WINDOW`] are written, the rest counted, and the count reported with the
/// first line of a later window. Metrics stay exact; only the log is thinned.
pub struct LogBudget {
    state: Mutex<BudgetState>,
}

struct BudgetState {
    window_start: Option<std::time::Instant>,
    written: u32,
    suppressed: u64,
}

pub const GUEST_LINES_PER_WINDOW: u32 = 10;
pub const GUEST_LOG_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);

impl LogBudget {
    pub const fn new() -> Self {
        LogBudget {
            state: Mutex::new(BudgetState {
                window_start: None,
                written: 0,
                suppressed: 0,
            }),
        }
    }

    /// Whether a line may be written now, and how many were suppressed before it (to be
    /// mentioned in it). A line that may not is counted as dropped.
    pub fn take(&self, now: std::time::Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let expired = s
            .window_start
            .is_none_or(|start| now.saturating_duration_since(start) >= GUEST_LOG_WINDOW);
        if expired {
            s.window_start = Some(now);
            s.written = 0;
        }
        if s.written >= GUEST_LINES_PER_WINDOW {
            s.suppressed += 1;
            crate::metrics::METRICS.vmm.log_lines_dropped.inc();
            return None;
        }
        s.written += 1;
        Some(std::mem::take(&mut s.suppressed))
    }
}

impl Default for LogBudget {
    fn default() -> Self {
        Self::new()
    }
}

/// Logs like `log::log!` at `level`, within a per-call-site [`LogBudget`]: use it for every
/// message a guest or an API client can cause by repeating something, so neither can flood
/// the host's log.
#[macro_export]
macro_rules! rate_limited_log {
    ($level:expr, $($arg:tt)+) => {{
        static BUDGET: $crate::logger::LogBudget = $crate::logger::LogBudget::new();
        if log::log_enabled!($level) {
            if let Some(suppressed) = BUDGET.take(std::time::Instant::now()) {
                if suppressed > 0 {
                    log::log!(
                        $level,
                        "{} ({suppressed} more like this suppressed)",
                        format_args!($($arg)+)
                    );
                } else {
                    log::log!($level, $($arg)+);
                }
            }
        }
    }};
}

#[cfg(test)]
mod budget_tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn budget_writes_the_first_lines_then_counts_and_reports() {
        let budget = LogBudget::new();
        let t0 = Instant::now();
        let dropped_before = crate::metrics::METRICS.vmm.log_lines_dropped.total();
        for _ in 0..GUEST_LINES_PER_WINDOW {
            assert_eq!(budget.take(t0), Some(0));
        }
        for _ in 0..25 {
            assert_eq!(budget.take(t0 + Duration::from_secs(1)), None);
        }
        assert!(crate::metrics::METRICS.vmm.log_lines_dropped.total() >= dropped_before + 25);
        // The next window's first line carries the count, the second starts afresh.
        let later = t0 + GUEST_LOG_WINDOW;
        assert_eq!(budget.take(later), Some(25));
        assert_eq!(budget.take(later), Some(0));
    }
}
