//! Helpers shared by the integration tests: config files in a scratch directory, running
//! the real `ember` binary with a deadline, and reading the probe guest's report.

#![allow(dead_code)] // each test binary uses a different subset

pub mod api;
pub mod arm64;
pub mod linux;
pub mod nested;
pub mod netns;
pub mod uffd;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub const EMBER: &str = env!("CARGO_BIN_EXE_ember");

/// Checks every probe boot runs (longmode through acpi); block devices and requests such as
/// `probe.initrd_size` add their own.
pub const PROBE_CHECKS: usize = 8;

/// Checks each virtio-blk device adds after the `virtio` check (resources/probe/README.md).
pub const PROBE_CHECKS_PER_BLOCK_DEVICE: usize = 6;

/// Checks the network device adds after the `virtio` check with `probe.net=1`
/// (resources/probe/README.md): `net.init`, `net.tx`, one `net.echo` per `probe.net.echo`
/// and `net.burst` when `probe.net.burst` is at least 1.
pub fn probe_net_checks(echo: usize, burst: usize) -> usize {
    2 + echo + usize::from(burst > 0)
}

/// How long any single ember run may take before the test calls it hung.
pub const RUN_DEADLINE: Duration = Duration::from_secs(120);

pub fn probe_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/probe")
}

pub fn probe_elf() -> PathBuf {
    probe_dir().join("probe.elf")
}

/// The probe with a PVH note: ember enters it through the PVH protocol.
pub fn probe_pvh_elf() -> PathBuf {
    probe_dir().join("probe-pvh.elf")
}

pub fn probe_bzimage() -> PathBuf {
    probe_dir().join("probe.bzimage")
}

/// Reports a test that cannot run on this host. In CI (`CI` set, as `.ci/run` does) that is
/// a failure with the reason, so a missing prerequisite never counts as a pass there;
/// elsewhere the reason is printed and the caller returns.
pub fn cannot_run(reason: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("this test cannot run here: {reason}");
    }
    eprintln!("NOT RUN (this counts as a failure in CI): {reason}");
}

/// A scratch directory removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let dir =
            std::env::temp_dir().join(format!("ember-test-{}-{name}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, contents).expect("write scratch file");
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The probe's command line for a machine of `vcpus` and `mem_mib`.
pub fn probe_args(vcpus: u8, mem_mib: usize, extra: &str) -> String {
    format!("console=ttyS0 reboot=k panic=1 probe.mem_mib={mem_mib} probe.vcpus={vcpus} {extra}")
        .trim_end()
        .to_owned()
}

/// A disk image whose sector 0 carries the probe's pattern for block device `n` (see
/// resources/probe/README.md): `EMBER-DISK-<n>` padded with '.' to 16 bytes, then byte k is
/// (k + n) & 0xff.
pub fn disk_image(dir: &Scratch, name: &str, n: usize, sectors: usize) -> PathBuf {
    let mut img = vec![0u8; sectors * 512];
    let tag = format!("EMBER-DISK-{n}");
    img[..16].fill(b'.');
    img[..tag.len()].copy_from_slice(tag.as_bytes());
    for (k, b) in img.iter_mut().enumerate().take(512).skip(16) {
        *b = ((k + n) & 0xff) as u8;
    }
    dir.write(name, img)
}

/// A config that boots `kernel` with the given machine and command line.
pub fn config_json(kernel: &Path, vcpus: u8, mem_mib: usize, boot_args: &str) -> String {
    serde_json::json!({
        "boot-source": {
            "kernel_image_path": kernel,
            "boot_args": boot_args,
        },
        "machine-config": {"vcpu_count": vcpus, "mem_size_mib": mem_mib},
    })
    .to_string()
}

/// What a finished ember run left behind.
#[derive(Debug)]
pub struct RunResult {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl RunResult {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    pub fn probe_lines(&self) -> Vec<&str> {
        self.stdout
            .lines()
            .filter(|l| l.starts_with("PROBE "))
            .collect()
    }

    /// Asserts a clean boot: exit 0, every check ok, `DONE pass=expected fail=0`.
    pub fn assert_probe_passed(&self, expected_checks: usize) {
        assert_eq!(self.code(), Some(0), "ember failed:\n{self:#?}");
        let lines = self.probe_lines();
        assert!(
            lines.first() == Some(&"PROBE START"),
            "no PROBE START:\n{}",
            self.stdout
        );
        let fails: Vec<&&str> = lines.iter().filter(|l| l.contains(" FAIL")).collect();
        assert!(
            fails.is_empty(),
            "probe checks failed: {fails:#?}\n{}",
            self.stdout
        );
        let done = format!("PROBE DONE pass={expected_checks} fail=0");
        assert!(
            lines.contains(&done.as_str()),
            "want {done:?}:\n{}",
            self.stdout
        );
        assert!(
            !self.stderr.contains("panicked"),
            "ember panicked:\n{}",
            self.stderr
        );
    }

    pub fn line_starting(&self, prefix: &str) -> Option<&str> {
        self.stdout.lines().find(|l| l.starts_with(prefix))
    }
}

/// Waits for `child` with a deadline, collecting its output; kills it if it hangs.
pub fn wait_with_deadline(mut child: Child, deadline: Duration) -> RunResult {
    let mut out = child.stdout.take().expect("stdout piped");
    let mut err = child.stderr.take().expect("stderr piped");
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for ember") {
            break status;
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let status = child.wait().expect("wait for killed ember");
            let stdout = out_reader.join().unwrap_or_default();
            let stderr = err_reader.join().unwrap_or_default();
            panic!(
                "ember did not finish within {deadline:?} ({status}):\nstdout:\n{stdout}\nstderr:\n{stderr}"
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    RunResult {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    }
}

pub fn ember_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(EMBER);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Runs ember with these arguments to completion.
pub fn run_ember(args: &[&str]) -> RunResult {
    let child = ember_command(args).spawn().expect("spawn ember");
    wait_with_deadline(child, RUN_DEADLINE)
}

/// Boots a config text with `--no-api` and waits for ember to exit.
pub fn boot_config(config: &str) -> RunResult {
    boot_config_with_flags(config, &[])
}

/// Boots a config text with `--no-api` and more flags, and waits for ember to exit.
pub fn boot_config_with_flags(config: &str, flags: &[&str]) -> RunResult {
    let dir = Scratch::new("boot");
    let path = dir.write("vm.json", config);
    let mut args = vec![
        "--no-api",
        "--config-file",
        path.to_str().expect("utf-8 path"),
    ];
    args.extend_from_slice(flags);
    run_ember(&args)
}

/// Boots the probe ELF on a machine of this shape and returns the result.
pub fn boot_probe(vcpus: u8, mem_mib: usize, extra_args: &str) -> RunResult {
    boot_config(&config_json(
        &probe_elf(),
        vcpus,
        mem_mib,
        &probe_args(vcpus, mem_mib, extra_args),
    ))
}

/// Checks that a failed run failed the way a user should see: the expected exit code, the
/// message on stderr, and no panic.
pub fn assert_fails(r: &RunResult, code: i32, message: &str) {
    assert_eq!(r.code(), Some(code), "unexpected exit code:\n{r:#?}");
    assert!(
        r.stderr.contains(message),
        "stderr lacks {message:?}:\n{}",
        r.stderr
    );
    assert!(
        !r.stderr.contains("panicked"),
        "ember panicked:\n{}",
        r.stderr
    );
    assert!(
        r.probe_lines().is_empty(),
        "the guest must not have run:\n{}",
        r.stdout
    );
}
