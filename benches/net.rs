//! Network device path benchmark: `cargo bench --bench net` (as root: it makes a private
//! network namespace with a TAP device in it, and deletes it at the end).
//!
//! ember's virtio-net model runs with no vCPU: the benchmark plays the guest driver. The
//! baseline, measured in the same run on the same TAP (a second descriptor of the same open
//! TAP), is raw `write`/`read` of the same frames from and into the same guest memory. See
//! "Performance method" in the design notes.
//!
//! - **TX** (guest to TAP): a batch of chains (one buffer each: header and frame) is queued,
//!   the device gets one notification (`process_queue`), and the batch comes back; the
//!   baseline writes the same buffers to the TAP one `write` each. The host stack drops the
//!   frames (they are addressed to nobody), the same work on both sides.
//! - **RX** (TAP to guest): a batch of frames is put into the TAP's queue untimed (an
//!   `AF_PACKET` socket sending on the TAP); then the device is told the TAP is readable and
//!   fills the guest's receive chains; the baseline `read`s the same frames straight into
//!   the same guest buffers.
//!
//! Frame sizes: 64 and 1500 bytes, and 64 KiB (the TAP's MTU is raised so one frame carries
//! it, as a TSO frame would). Figures are medians over all batches of all runs, frames per
//! second and bytes per second, and the ratio device/baseline; the target for 1500-byte
//! frames is >= 0.85. Every frame the device delivers or sends is counted; a batch that
//! does not complete is an error (exit non-zero). Missing the target is reported, not an
//! error. Environment: `EMBER_BENCH_RUNS` (default 20), `EMBER_BENCH_BATCH` (default 64).
//! Without `--bench` (a `cargo test --all-targets` run) it makes one small run.

mod common;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Result, env_number, exit_code, invoked_as_bench, runs_from_env};
use ember::devices::virtio::net::tap::{Tap, VNET_HDR_LEN};
use ember::devices::virtio::net::{Net, NetConfig};
use ember::devices::virtio::{VirtioDevice, VirtioInterrupt, VirtioInterruptType};
use ember::memory::GuestMemoryMmap;
use ember_virtq_driver::{Desc, QueueDriver};
use event_manager::EventSet;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

const TAP: &str = "embench0";
const QUEUE: u16 = 256;
const RX_RINGS: u64 = 0;
const TX_RINGS: u64 = 0x1_0000;
const BUFFERS: u64 = 0x10_0000;
/// Room per frame in guest memory: header and the largest frame, page aligned.
const SLOT: u64 = 0x1_1000;
const TARGET_1500: f64 = 0.85;
/// `VIRTIO_F_VERSION_1` and `VIRTIO_NET_F_MRG_RXBUF`.
const FEATURES: u64 = (1 << 32) | (1 << 15);
const ETH_P_ALL: u16 = 0x0003;

struct NoInterrupt;

impl VirtioInterrupt for NoInterrupt {
    fn trigger(&self, _kind: VirtioInterruptType) {}
}

/// The namespace the benchmark runs in; deleted when dropped.
struct Netns(String);

impl Netns {
    /// Makes a namespace and moves this thread into it (everything runs on this thread).
    fn enter() -> Result<Self> {
        let name = format!("ember-bench-{}", std::process::id());
        run(&["ip", "netns", "add", &name])?;
        let ns = Netns(name);
        let path = format!("/var/run/netns/{}", ns.0);
        let f = std::fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
        // SAFETY: setns on this thread with a namespace fd we hold.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(format!("setns: {}", std::io::Error::last_os_error()));
        }
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run(&["ip", "netns", "del", &self.0]);
    }
}

fn run(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args[0]))?;
    if !out.status.success() {
        return Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// In this thread's namespace: `ip link` and friends run as child processes, which start
/// in the namespace of the thread that forks them.
fn ip(args: &[&str]) -> Result<()> {
    let mut all = vec!["ip"];
    all.extend_from_slice(args);
    run(&all)
}

/// A raw socket that sends frames out of the TAP, towards whoever reads the TAP.
fn packet_socket(ifindex: i32) -> Result<OwnedFd> {
    // SAFETY: creates a socket; checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            i32::from(ETH_P_ALL.to_be()),
        )
    };
    if fd < 0 {
        return Err(format!("AF_PACKET: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: a fresh fd.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: plain data.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = ifindex;
    // SAFETY: a sockaddr_ll of the size given.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc != 0 {
        return Err(format!("bind: {}", std::io::Error::last_os_error()));
    }
    Ok(fd)
}

fn ethernet_frame(len: usize, seq: u32) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[..6].copy_from_slice(&[0x06, 0xee, 0, 0, 0, 1]); // nobody's address
    f[6..12].copy_from_slice(&[0x06, 0xee, 0, 0, 0, 2]);
    f[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
    for (i, b) in f[14..].iter_mut().enumerate() {
        *b = (i as u32 ^ seq) as u8;
    }
    f
}

struct Rig {
    mem: GuestMemoryMmap,
    net: Net,
    /// The same TAP, for the baseline.
    raw: OwnedFd,
    tap_fd: RawFd,
    sender: OwnedFd,
}

impl Rig {
    fn new() -> Result<Self> {
        ip(&["tuntap", "add", "dev", TAP, "mode", "tap"])?;
        // Without IPv6 the host stack sends nothing on the TAP by itself (no router or
        // multicast listener messages), so every frame read is one of the benchmark's.
        run(&[
            "sysctl",
            "-q",
            "-w",
            &format!("net.ipv6.conf.{TAP}.disable_ipv6=1"),
        ])?;
        // Room for a 64 KiB frame, and for a whole batch of them in the TAP's queue.
        ip(&[
            "link",
            "set",
            TAP,
            "mtu",
            "65521",
            "txqueuelen",
            "4096",
            "up",
        ])?;
        let tap = Tap::open(TAP).map_err(|e| e.to_string())?;
        // SAFETY: dup of a descriptor we hold; checked.
        let raw = unsafe { libc::dup(tap.as_raw_fd()) };
        if raw < 0 {
            return Err(format!("dup: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: a fresh fd.
        let raw = unsafe { OwnedFd::from_raw_fd(raw) };
        let tap_fd = tap.as_raw_fd();
        let name = std::ffi::CString::new(TAP).map_err(|e| e.to_string())?;
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
        let sender = packet_socket(ifindex)?;
        let net = Net::with_tap(
            NetConfig {
                id: "bench".into(),
                tap_name: TAP.into(),
                mac: [0x06, 0xee, 0, 0, 0, 3],
                mtu: None,
                rx_rate_limiter: None,
                tx_rate_limiter: None,
                mmds: None,
            },
            tap,
        )
        .map_err(|e| e.to_string())?;
        let mem_size = (BUFFERS + SLOT * u64::from(QUEUE)) as usize;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mem_size)])
            .map_err(|e| e.to_string())?;
        Ok(Rig {
            mem,
            net,
            raw,
            tap_fd,
            sender,
        })
    }

    fn activate(&mut self) -> Result<(QueueDriver, QueueDriver)> {
        self.net.reset();
        let rx = QueueDriver::new(&self.mem, RX_RINGS, QUEUE);
        let tx = QueueDriver::new(&self.mem, TX_RINGS, QUEUE);
        self.net
            .activate(
                self.mem.clone(),
                FEATURES,
                vec![rx.device_queue(), tx.device_queue()],
                Arc::new(NoInterrupt),
            )
            .map_err(|e| e.to_string())?;
        Ok((rx, tx))
    }

    fn slot(i: usize) -> u64 {
        BUFFERS + SLOT * i as u64
    }

    fn host_ptr(&self, addr: u64, len: usize) -> Result<*mut u8> {
        let s = self
            .mem
            .get_slice(GuestAddress(addr), len)
            .map_err(|e| e.to_string())?;
        Ok(s.ptr_guard_mut().as_ptr())
    }

    /// Puts `batch` frames of `len` bytes into the TAP's queue, untimed.
    fn fill_tap(&self, frames: &[Vec<u8>]) -> Result<()> {
        for f in frames {
            // SAFETY: sends from a live buffer.
            let n = unsafe { libc::send(self.sender.as_raw_fd(), f.as_ptr().cast(), f.len(), 0) };
            if n as usize != f.len() {
                return Err(format!("send: {}", std::io::Error::last_os_error()));
            }
        }
        Ok(())
    }

    /// One TX batch through the device; returns the time of the device's work.
    fn device_tx(&mut self, tx: &mut QueueDriver, frames: &[Vec<u8>]) -> Result<Duration> {
        for (i, f) in frames.iter().enumerate() {
            let at = Self::slot(i);
            self.mem
                .write_slice(&[0u8; VNET_HDR_LEN], GuestAddress(at))
                .map_err(|e| e.to_string())?;
            self.mem
                .write_slice(f, GuestAddress(at + VNET_HDR_LEN as u64))
                .map_err(|e| e.to_string())?;
            tx.add_chain(
                &self.mem,
                &[Desc {
                    addr: at,
                    len: (VNET_HDR_LEN + f.len()) as u32,
                    write: false,
                }],
            );
        }
        let start = Instant::now();
        self.net.process_tx();
        let took = start.elapsed();
        let used = tx.take_used(&self.mem);
        if used.len() != frames.len() {
            return Err(format!(
                "{} of {} TX chains came back",
                used.len(),
                frames.len()
            ));
        }
        Ok(took)
    }

    /// The same frames written raw from the same guest memory.
    fn baseline_tx(&self, frames: &[Vec<u8>]) -> Result<Duration> {
        let mut ptrs = Vec::with_capacity(frames.len());
        for (i, f) in frames.iter().enumerate() {
            let len = VNET_HDR_LEN + f.len();
            ptrs.push((self.host_ptr(Self::slot(i), len)?, len));
        }
        let start = Instant::now();
        for &(p, len) in &ptrs {
            // SAFETY: writes from guest memory we own, within its bounds.
            let n = unsafe { libc::write(self.raw.as_raw_fd(), p.cast(), len) };
            if n as usize != len {
                return Err(format!("raw write: {}", std::io::Error::last_os_error()));
            }
        }
        Ok(start.elapsed())
    }

    /// One RX batch through the device.
    fn device_rx(&mut self, rx: &mut QueueDriver, frames: &[Vec<u8>]) -> Result<Duration> {
        for (i, f) in frames.iter().enumerate() {
            rx.add_chain(
                &self.mem,
                &[Desc {
                    addr: Self::slot(i),
                    len: (VNET_HDR_LEN + f.len().max(1514)) as u32,
                    write: true,
                }],
            );
        }
        self.fill_tap(frames)?;
        let start = Instant::now();
        self.net.process_event(self.tap_fd, EventSet::IN);
        let took = start.elapsed();
        let used = rx.take_used(&self.mem);
        if used.len() != frames.len() {
            return Err(format!(
                "{} of {} frames reached the guest",
                used.len(),
                frames.len()
            ));
        }
        for ((_, len), f) in used.iter().zip(frames) {
            if *len as usize != VNET_HDR_LEN + f.len() {
                return Err(format!("a {}-byte frame came back as {len}", f.len()));
            }
        }
        Ok(took)
    }

    fn baseline_rx(&self, frames: &[Vec<u8>]) -> Result<Duration> {
        let mut ptrs = Vec::with_capacity(frames.len());
        for (i, f) in frames.iter().enumerate() {
            let len = VNET_HDR_LEN + f.len().max(1514);
            ptrs.push((self.host_ptr(Self::slot(i), len)?, len));
        }
        self.fill_tap(frames)?;
        let start = Instant::now();
        for (&(p, len), f) in ptrs.iter().zip(frames) {
            // SAFETY: reads into guest memory we own, within its bounds.
            let n = unsafe { libc::read(self.raw.as_raw_fd(), p.cast(), len) };
            if n as usize != VNET_HDR_LEN + f.len() {
                return Err(format!(
                    "raw read: {n}: {}",
                    std::io::Error::last_os_error()
                ));
            }
        }
        Ok(start.elapsed())
    }
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}

fn bench() -> Result<()> {
    let full = invoked_as_bench();
    let runs = if full { runs_from_env(20)? } else { 1 };
    let batch = env_number("EMBER_BENCH_BATCH", 64)? as usize;
    if batch == 0 || batch > usize::from(QUEUE) {
        return Err(format!("EMBER_BENCH_BATCH must be 1-{QUEUE}"));
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("needs root (a network namespace and a TAP device)".into());
    }
    let _ns = Netns::enter()?;
    let mut rig = Rig::new()?;
    println!("net bench: {runs} runs, batches of {batch} frames, TAP {TAP} in a private namespace");
    println!(
        "{:<6} {:<5} {:>12} {:>12} {:>11} {:>11} {:>7}",
        "dir", "size", "device f/s", "raw f/s", "device MB/s", "raw MB/s", "ratio"
    );
    let mut misses = Vec::new();
    // 65 535: the largest frame a TAP with the largest MTU (65 521) carries, header included.
    for size in [64usize, 1500, 65_535] {
        let frames: Vec<Vec<u8>> = (0..batch).map(|i| ethernet_frame(size, i as u32)).collect();
        for dir in ["tx", "rx"] {
            let (mut dev, mut raw) = (Vec::new(), Vec::new());
            for run in 0..runs + 1 {
                let (mut rxq, mut txq) = rig.activate()?;
                // Alternate which goes first, so neither always finds warm caches.
                let device_first = run % 2 == 0;
                let mut times = [Duration::ZERO; 2];
                for step in 0..2 {
                    let device = (step == 0) == device_first;
                    times[usize::from(!device)] = match (dir, device) {
                        ("tx", true) => rig.device_tx(&mut txq, &frames)?,
                        ("tx", false) => rig.baseline_tx(&frames)?,
                        (_, true) => rig.device_rx(&mut rxq, &frames)?,
                        (_, false) => rig.baseline_rx(&frames)?,
                    };
                }
                // The first run warms up and is not counted.
                if run > 0 {
                    dev.push(times[0]);
                    raw.push(times[1]);
                }
            }
            let (d, r) = (median(&mut dev), median(&mut raw));
            let per_s = |t: Duration| batch as f64 / t.as_secs_f64();
            let mb_s = |t: Duration| (batch * size) as f64 / t.as_secs_f64() / 1e6;
            let ratio = r.as_secs_f64() / d.as_secs_f64();
            let mark = if size == 1500 {
                if ratio >= TARGET_1500 {
                    " PASS"
                } else {
                    misses.push(format!("{dir} 1500 B: {ratio:.2}"));
                    " MISS"
                }
            } else {
                ""
            };
            println!(
                "{dir:<6} {size:<5} {:>12.0} {:>12.0} {:>11.1} {:>11.1} {ratio:>7.2}{mark}",
                per_s(d),
                per_s(r),
                mb_s(d),
                mb_s(r)
            );
        }
    }
    let c = rig.net.counters();
    println!(
        "device counters: tx {} frames, rx {} frames, tx_fails {}, rx_fails {}",
        c.tx_packets_count.total(),
        c.rx_packets_count.total(),
        c.tx_fails.total(),
        c.rx_fails.total()
    );
    if !misses.is_empty() {
        println!("target >= {TARGET_1500} missed: {}", misses.join(", "));
    }
    Ok(())
}

fn main() -> ExitCode {
    exit_code("net", bench())
}
