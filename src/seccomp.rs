//! Seccomp filters for ember's threads: the vmm thread (event loop and device emulation),
//! the API thread and every vCPU thread each run under their own allow-list.
//!
//! The built-in filters are written in seccompiler's JSON format
//! (`resources/seccomp/<target>.json`), compiled to BPF by `build.rs` and embedded in the
//! binary; `--seccomp-filter FILE` replaces them with the user's JSON, compiled at start.
//! Each thread installs its own filter (no TSYNC): what one thread may call says nothing
//! about another. A call outside the list traps: the SIGSYS handler logs the system call's
//! number, counts it, and the process dies of SIGSYS.

use std::cell::Cell;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};

use seccompiler::{BpfProgram, sock_filter};

use crate::metrics::METRICS;

/// The filters compiled at build time: for each thread kind, its name's length and name,
/// then the instruction count and the instructions (8 bytes each, little-endian).
static BUILT_IN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/seccomp_filters.bin"));

/// The kinds of thread that run under a filter, by their names in the filter file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    Vmm,
    Api,
    Vcpu,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 3] = [ThreadKind::Vmm, ThreadKind::Api, ThreadKind::Vcpu];

    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Api => "api",
            ThreadKind::Vcpu => "vcpu",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot read the seccomp filter file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "the seccomp filter file {path} is not a filter in seccompiler's JSON format (ember \
         compiles the JSON itself; a precompiled BPF file is not accepted): {source}"
    )]
    Parse {
        path: String,
        source: seccompiler::Error,
    },
    #[error("the seccomp filter file {path} has no filter for the {kind:?} threads")]
    MissingKind { path: String, kind: &'static str },
    #[error("the seccomp filter for the {0:?} threads is empty")]
    Empty(&'static str),
    #[error(
        "this build of ember has no built-in seccomp filters for its target; run with \
         --seccomp-filter FILE or --no-seccomp"
    )]
    NoBuiltIn,
    #[error("the built-in seccomp filters are damaged (a build problem)")]
    BadBuiltIn,
    #[error("cannot install the seccomp filter for the {kind:?} thread: {source}")]
    Install {
        kind: &'static str,
        source: seccompiler::Error,
    },
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(std::io::Error),
}

/// One filter per thread kind, or none at all (`--no-seccomp`).
#[derive(Clone, Debug, Default)]
pub struct Filters {
    programs: HashMap<ThreadKind, BpfProgram>,
}

impl Filters {
    /// No filters: every thread runs unconfined.
    pub fn none() -> Self {
        Filters::default()
    }

    /// The filters embedded at build time.
    pub fn built_in() -> Result<Self, SeccompError> {
        if BUILT_IN.is_empty() {
            return Err(SeccompError::NoBuiltIn);
        }
        let mut map = decode(BUILT_IN).ok_or(SeccompError::BadBuiltIn)?;
        Self::from_map(&mut map, "the built-in filters")
    }

    /// The filters in a JSON file in seccompiler's format, with one filter per thread kind.
    pub fn from_json_file(path: &Path) -> Result<Self, SeccompError> {
        let shown = path.display().to_string();
        let file = std::fs::File::open(path).map_err(|source| SeccompError::Read {
            path: shown.clone(),
            source,
        })?;
        let arch = seccompiler::TargetArch::try_from(std::env::consts::ARCH).map_err(|source| {
            SeccompError::Parse {
                path: shown.clone(),
                source: source.into(),
            }
        })?;
        let mut map = seccompiler::compile_from_json(std::io::BufReader::new(file), arch).map_err(
            |source| SeccompError::Parse {
                path: shown.clone(),
                source,
            },
        )?;
        Self::from_map(&mut map, &shown)
    }

    fn from_map(map: &mut HashMap<String, BpfProgram>, path: &str) -> Result<Self, SeccompError> {
        let mut programs = HashMap::new();
        for kind in ThreadKind::ALL {
            let program = map
                .remove(kind.name())
                .ok_or_else(|| SeccompError::MissingKind {
                    path: path.to_owned(),
                    kind: kind.name(),
                })?;
            if program.is_empty() {
                return Err(SeccompError::Empty(kind.name()));
            }
            programs.insert(kind, program);
        }
        Ok(Filters { programs })
    }

    pub fn is_enabled(&self) -> bool {
        !self.programs.is_empty()
    }

    /// Installs `kind`'s filter on the calling thread (nothing without filters).
    pub fn install(&self, kind: ThreadKind) -> Result<(), SeccompError> {
        let Some(program) = self.programs.get(&kind) else {
            return Ok(());
        };
        remember_thread_name(kind.name());
        seccompiler::apply_filter(program).map_err(|source| SeccompError::Install {
            kind: kind.name(),
            source,
        })?;
        FILTERED.with(|f| f.set(true));
        log::debug!("seccomp filter installed on the {} thread", kind.name());
        Ok(())
    }
}

/// Reads the build-time encoding (see [`BUILT_IN`]).
fn decode(mut bytes: &[u8]) -> Option<HashMap<String, BpfProgram>> {
    fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, rest) = bytes.split_at_checked(n)?;
        *bytes = rest;
        Some(head)
    }
    fn take_u32(bytes: &mut &[u8]) -> Option<u32> {
        Some(u32::from_le_bytes(take(bytes, 4)?.try_into().ok()?))
    }
    let mut map = HashMap::new();
    while !bytes.is_empty() {
        let name_len = take_u32(&mut bytes)? as usize;
        let name = std::str::from_utf8(take(&mut bytes, name_len)?).ok()?;
        let count = take_u32(&mut bytes)? as usize;
        let mut program = Vec::with_capacity(count);
        for _ in 0..count {
            let i = take(&mut bytes, 8)?;
            program.push(sock_filter {
                code: u16::from_le_bytes([i[0], i[1]]),
                jt: i[2],
                jf: i[3],
                k: u32::from_le_bytes([i[4], i[5], i[6], i[7]]),
            });
        }
        map.insert(name.to_owned(), program);
    }
    Some(map)
}

/// Whether the calling thread runs under a seccomp filter: code that would make calls the
/// filters do not allow (a library's teardown) can leave that work to the kernel instead.
pub fn thread_is_filtered() -> bool {
    FILTERED.with(|f| f.get())
}

thread_local! {
    static FILTERED: Cell<bool> = const { Cell::new(false) };
    /// The name of the thread, kept when its filter is installed, for the SIGSYS handler.
    static THREAD_NAME: Cell<([u8; 16], usize)> = const { Cell::new(([0; 16], 0)) };
}

/// Keeps the calling thread's name (at most 16 bytes) where the SIGSYS handler finds it.
fn remember_thread_name(fallback: &str) {
    let current = std::thread::current();
    let name = current.name().unwrap_or(fallback).as_bytes();
    let mut buf = [0u8; 16];
    let n = name.len().min(buf.len());
    buf[..n].copy_from_slice(&name[..n]);
    THREAD_NAME.with(|c| c.set((buf, n)));
}

/// Where the SIGSYS handler writes its line besides stderr: the log file, when there is one.
static LOG_FD: AtomicI32 = AtomicI32::new(-1);

/// Where the SIGSYS handler writes a last metrics line: the metrics file, when there is one.
static METRICS_FD: AtomicI32 = AtomicI32::new(-1);

/// Tells the SIGSYS handler which descriptor the log goes to (-1: stderr only).
pub fn set_log_fd(fd: i32) {
    LOG_FD.store(fd, Ordering::Relaxed);
}

/// Tells the SIGSYS handler which descriptor metrics go to (-1: none).
pub fn set_metrics_fd(fd: i32) {
    METRICS_FD.store(fd, Ordering::Relaxed);
}

/// Installs the handler that makes a filter violation visible. Called once, before any
/// filter is installed.
pub fn install_sigsys_handler() -> Result<(), SeccompError> {
    // SAFETY: a zeroed sigaction is a valid starting point; the handler is async-signal-safe
    // (see `on_sigsys`), and SA_SIGINFO matches its signature.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(SeccompError::Handler(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// `si_syscall` of a seccomp SIGSYS: after `si_signo`, `si_errno`, `si_code` (and padding),
/// `si_call_addr` (a pointer), then the system call number (`int`).
fn trapped_syscall(info: &libc::siginfo_t) -> i32 {
    #[repr(C)]
    struct SigsysInfo {
        signo: i32,
        errno: i32,
        code: i32,
        call_addr: *const libc::c_void,
        syscall: i32,
        arch: u32,
    }
    // SAFETY: for SIGSYS with SYS_SECCOMP the kernel fills the `_sigsys` member, laid out as
    // above; siginfo_t is larger than this prefix.
    unsafe { (*(info as *const libc::siginfo_t).cast::<SigsysInfo>()).syscall }
}

/// Writes `bytes` to `fd` with one plain `write` (no allocation, no lock), so the line is
/// not split by other threads' output.
fn write_raw(fd: i32, bytes: &[u8]) {
    // SAFETY: writes from a live buffer; a failure is ignored, there is nothing to do.
    unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
}

/// Joins `parts` into `buf` (cut at its end) and returns the joined bytes.
fn join<'a>(parts: &[&[u8]], buf: &'a mut [u8]) -> &'a [u8] {
    let mut n = 0;
    for p in parts {
        let take = p.len().min(buf.len() - n);
        buf[n..n + take].copy_from_slice(&p[..take]);
        n += take;
    }
    &buf[..n]
}

/// Formats `n` in decimal into `buf`, returning the digits.
fn decimal(mut n: u32, buf: &mut [u8; 10]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// The SIGSYS handler. It may run with any lock held by the thread that trapped (an
/// allocator's, the logger's), so it only uses atomics and raw `write`s, then lets the
/// signal's default action end the process.
extern "C" fn on_sigsys(_signo: i32, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let (code, syscall) = unsafe { ((*info).si_code, trapped_syscall(&*info)) };
    // SYS_SECCOMP: only a filter's trap is reported as one.
    if code == 1 {
        METRICS.seccomp.num_faults.inc();
        let mut digits = [0u8; 10];
        let number = decimal(syscall.max(0) as u32, &mut digits);
        // Read from the thread's own storage: asking the kernel would be one more system
        // call the filter may refuse.
        let (name, name_len) = THREAD_NAME.with(Cell::get);
        let mut buf = [0u8; 160];
        let line = join(
            &[
                b"ember: seccomp: the ",
                &name[..name_len],
                b" thread made system call ",
                number,
                b", which its filter does not allow; ember stops\n",
            ],
            &mut buf,
        );
        write_raw(2, line);
        let log = LOG_FD.load(Ordering::Relaxed);
        if log > 2 {
            write_raw(log, line);
        }
        // The regular flush allocates and takes locks: a last line of its own instead.
        let metrics = METRICS_FD.load(Ordering::Relaxed);
        if metrics > 2 {
            write_raw(metrics, b"{\"seccomp\":{\"num_faults\":1}}\n");
        }
    }
    // SAFETY: restoring the default action and re-raising: the signal is delivered when
    // this handler returns and kills the whole process, as SECCOMP_RET_KILL_PROCESS would.
    unsafe {
        libc::signal(libc::SIGSYS, libc::SIG_DFL);
        libc::raise(libc::SIGSYS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_filters_decode_for_every_thread_kind() {
        let filters = Filters::built_in().expect("built-in filters");
        for kind in ThreadKind::ALL {
            let p = &filters.programs[&kind];
            assert!(p.len() > 10, "{kind:?}: {} instructions", p.len());
        }
    }

    #[test]
    fn a_truncated_encoding_is_refused() {
        assert!(decode(&BUILT_IN[..BUILT_IN.len() - 3]).is_none());
        assert!(decode(&[]).is_some_and(|m| m.is_empty()));
    }

    #[test]
    fn join_cuts_at_the_buffer_end() {
        let mut b = [0u8; 5];
        assert_eq!(join(&[b"ab", b"cd"], &mut b), b"abcd");
        assert_eq!(join(&[b"abc", b"def"], &mut b), b"abcde");
    }

    #[test]
    fn decimal_formats_numbers() {
        let mut b = [0u8; 10];
        assert_eq!(decimal(0, &mut b), b"0");
        assert_eq!(decimal(59, &mut b), b"59");
        assert_eq!(decimal(u32::MAX, &mut b), b"4294967295");
    }

    #[test]
    fn files_without_a_thread_kind_or_not_json_are_refused() {
        let dir = std::env::temp_dir().join(format!("ember-seccomp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let partial = dir.join("partial.json");
        std::fs::write(
            &partial,
            r#"{"vmm":{"default_action":"trap","filter_action":"allow","filter":[{"syscall":"read"}]},
                "api":{"default_action":"trap","filter_action":"allow","filter":[{"syscall":"read"}]}}"#,
        )
        .unwrap();
        let e = Filters::from_json_file(&partial).unwrap_err();
        assert!(
            matches!(e, SeccompError::MissingKind { kind: "vcpu", .. }),
            "{e}"
        );
        let garbage = dir.join("garbage.json");
        std::fs::write(&garbage, b"\x7fELF not json").unwrap();
        let e = Filters::from_json_file(&garbage).unwrap_err();
        assert!(matches!(e, SeccompError::Parse { .. }), "{e}");
        let e = Filters::from_json_file(&dir.join("absent.json")).unwrap_err();
        assert!(matches!(e, SeccompError::Read { .. }), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
