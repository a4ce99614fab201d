//! Block device path benchmark: `cargo bench --bench block`.
//!
//! ember's virtio-blk model is driven with no vCPU: the benchmark plays the guest driver,
//! puts descriptor chains (16-byte header, one data buffer, 1-byte status) into guest
//! memory, runs the device (`Block::process_queue`, and for the io_uring engine
//! `process_completions` until the used ring has everything back) and reads the used ring.
//! The baseline, measured in the same run on the same file, is plain `pread`/`pwrite` of
//! the same requests into the same buffers (the same guest memory pages). See "Performance
//! method" in the design notes.
//!
//! Workloads: 4 KiB random read and write (4 KiB-aligned offsets from a fixed-seed
//! xorshift), 128 KiB sequential read and write; on a file in tmpfs (`/dev/shm`) and on a
//! file on disk (`target/tmp`, the build's temporary directory). Requests go in batches of
//! the queue depth (default 64): the driver queues a batch, the device gets one
//! notification (one `process_queue` call), and the batch comes back before the next is
//! queued; the baseline issues the same batch back to back. Only the device's work is
//! timed on the device side (`process_queue` to the last used element); the test driver's
//! ring work is timed separately, as a diagnostic. A further diagnostic row times
//! single-iovec `preadv`/`pwritev`, the calls the device makes, without the device.
//!
//! Figures are per batch: the median batch time over all batches of all runs, so a batch
//! that another tenant of a shared host preempted does not move the result. Variants run in
//! a fresh random order (fixed seed) for every workload of every run, and every pass gets
//! its own offsets (new random blocks, or the next region of the file), so no variant finds
//! blocks the one before it just touched still in the CPU caches.
//!
//! Cache state: the file is written and fsynced in set-up and fits in memory, so reads are
//! served from the page cache on both sides (residency is checked with `mincore`); writes
//! are buffered on both sides; nothing is fsynced inside a timed pass, but every write pass
//! is followed by an untimed `fdatasync`, so each pass starts with the file clean.
//!
//! Every request is checked: status byte, used length, used ring complete, interrupt
//! raised; the data of one request in `SAMPLE_EVERY` is checked byte for byte (reads against
//! the file's known content; writes by reading the file back after the pass). Any failure
//! exits non-zero. Missing a throughput target does not: the ratios are reported with
//! PASS/MISS.
//!
//! Environment: `EMBER_BENCH_RUNS` (measured runs, default 50), `EMBER_BENCH_DEPTH` (queue
//! depth, 1-64, default 64), `EMBER_BENCH_FILE_MIB` (default 256), `EMBER_BENCH_RAND_OPS`
//! (4 KiB requests per pass, default 2048), `EMBER_BENCH_SEQ_MIB` (bytes per sequential
//! pass, default 64). Without `--bench` on the command line (`cargo test --all-targets`
//! runs this file too) it makes one small run, as a smoke test.

mod common;

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ember::devices::virtio::block::request::{
    SECTOR_SIZE, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use ember::devices::virtio::block::{Block, BlockConfig, QUEUE_SIZE};
use ember::devices::virtio::{VirtioDevice, VirtioInterrupt, VirtioInterruptType};
use ember::memory::GuestMemoryMmap;
use ember_virtq_driver::{Desc, QueueDriver};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use common::{MIB, Result, env_number, median, median_of_sorted, min_max};

const KIB: u64 = 1 << 10;
const DEFAULT_RUNS: usize = 50;
/// Runs discarded first, so caches, the allocator and the io_uring are warm.
const WARMUP_RUNS: usize = 2;
const DEFAULT_DEPTH: usize = 64;
/// Three descriptors per request must fit the 256-entry table with room to spare.
const MAX_DEPTH: usize = 64;
const DEFAULT_FILE_MIB: u64 = 256;
const DEFAULT_RAND_OPS: usize = 2048;
const DEFAULT_SEQ_MIB: u64 = 64;
/// One request in this many has its data checked byte for byte.
const SAMPLE_EVERY: usize = 16;
/// The largest request; each queue slot owns a data buffer this big.
const MAX_IO: u64 = 128 * KIB;
/// Anything near this is a hang, not a slow request.
const COMPLETION_TIMEOUT_MS: i32 = 10_000;

// Guest memory layout: two queues (Sync and Async device), then per-slot headers, status
// bytes and data buffers shared by the device and the baseline.
const SYNC_QUEUE_BASE: u64 = 0;
const ASYNC_QUEUE_BASE: u64 = 0x8000;
const HDR_BASE: u64 = 0x10_000;
const STATUS_BASE: u64 = 0x18_000;
const DATA_BASE: u64 = 0x100_000;

/// Every 512-byte sector of the file starts with a tag (sector number ^ TAG_MAGIC, then
/// the generation of the write pass that wrote it, 0 for set-up) and continues with a fixed
/// filler, so any sector read back can be checked against where it should have come from.
const TAG_MAGIC: u64 = 0x656d_6265_722d_626b;
const TAG_LEN: usize = 16;
const SECTOR: usize = SECTOR_SIZE as usize;

const TMPFS_MAGIC: i64 = 0x0102_1994;

fn main() -> ExitCode {
    common::exit_code("block", run())
}

fn run() -> Result<()> {
    let params = if common::invoked_as_bench() {
        Params::from_env()?
    } else {
        println!("smoke test (no --bench): one small run; the figures mean nothing");
        Params::smoke()
    };
    let disk_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    common::create_dir_all(&disk_dir)?;
    let name = format!("ember-block-bench-{}.img", std::process::id());
    let places = [
        ("tmpfs", Path::new("/dev/shm").join(&name), true),
        ("disk", disk_dir.join(&name), false),
    ];
    println!(
        "ember block device path: queue depth {}, {} runs after {} warm-up, \
         file {} MiB, {} random 4 KiB requests and {} MiB sequential per pass",
        params.depth,
        params.runs,
        params.warmup,
        params.file_bytes / MIB,
        params.rand_ops,
        params.seq_bytes / MIB
    );
    let mut summary = Vec::new();
    for (label, path, want_tmpfs) in &places {
        let result = measure_place(&params, label, path, *want_tmpfs);
        // Best effort: a leftover image is harmless and must not hide the real result.
        let _ = std::fs::remove_file(path);
        summary.extend(result?);
    }
    println!("summary (ratio = device throughput / pread-pwrite throughput, same run):");
    for line in &summary {
        println!("  {line}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Parameters

struct Params {
    runs: usize,
    warmup: usize,
    depth: usize,
    file_bytes: u64,
    rand_ops: usize,
    seq_bytes: u64,
}

impl Params {
    fn smoke() -> Self {
        Params {
            runs: 1,
            warmup: 0,
            depth: DEFAULT_DEPTH,
            file_bytes: 16 * MIB,
            rand_ops: 256,
            seq_bytes: 8 * MIB,
        }
    }

    fn from_env() -> Result<Self> {
        let p = Params {
            runs: common::runs_from_env(DEFAULT_RUNS)?,
            warmup: WARMUP_RUNS,
            depth: env_number("EMBER_BENCH_DEPTH", DEFAULT_DEPTH as u64)? as usize,
            file_bytes: env_number("EMBER_BENCH_FILE_MIB", DEFAULT_FILE_MIB)? * MIB,
            rand_ops: env_number("EMBER_BENCH_RAND_OPS", DEFAULT_RAND_OPS as u64)? as usize,
            seq_bytes: env_number("EMBER_BENCH_SEQ_MIB", DEFAULT_SEQ_MIB)? * MIB,
        };
        if p.depth > MAX_DEPTH {
            return Err(format!(
                "EMBER_BENCH_DEPTH={} is more than {MAX_DEPTH}",
                p.depth
            ));
        }
        if p.seq_bytes > p.file_bytes {
            return Err("EMBER_BENCH_SEQ_MIB is larger than EMBER_BENCH_FILE_MIB".into());
        }
        // Times are per full batch: every pass needs at least one.
        if p.rand_ops < p.depth || (p.seq_bytes / MAX_IO) < p.depth as u64 {
            return Err(format!(
                "a pass must hold at least one batch of {} requests: raise \
                 EMBER_BENCH_RAND_OPS or EMBER_BENCH_SEQ_MIB, or lower EMBER_BENCH_DEPTH",
                p.depth
            ));
        }
        Ok(p)
    }
}

// ---------------------------------------------------------------------------------------
// Workloads

#[derive(Clone, Copy, PartialEq)]
enum Workload {
    RandRead4k,
    RandWrite4k,
    SeqRead128k,
    SeqWrite128k,
}

const WORKLOADS: [Workload; 4] = [
    Workload::RandRead4k,
    Workload::RandWrite4k,
    Workload::SeqRead128k,
    Workload::SeqWrite128k,
];

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::RandRead4k => "4 KiB random read",
            Workload::RandWrite4k => "4 KiB random write",
            Workload::SeqRead128k => "128 KiB sequential read",
            Workload::SeqWrite128k => "128 KiB sequential write",
        }
    }

    fn len(self) -> u64 {
        match self {
            Workload::RandRead4k | Workload::RandWrite4k => 4 * KIB,
            Workload::SeqRead128k | Workload::SeqWrite128k => MAX_IO,
        }
    }

    fn write(self) -> bool {
        matches!(self, Workload::RandWrite4k | Workload::SeqWrite128k)
    }

    /// The target for device / baseline throughput.
    fn target(self) -> f64 {
        match self {
            Workload::RandRead4k | Workload::RandWrite4k => 0.75,
            Workload::SeqRead128k | Workload::SeqWrite128k => 0.90,
        }
    }

    /// The file offsets of pass number `pass` (counted over all passes of all variants).
    /// Every pass gets its own: random passes draw fresh offsets from a fixed-seed stream,
    /// sequential passes take the next region of the file. So no pass finds the blocks
    /// the previous pass touched still in the CPU caches, whichever variant ran it; with
    /// shared offsets the first variant of a run measured up to 1.8 times slower than the
    /// ones after it.
    fn offsets(self, p: &Params, pass: u64) -> Vec<u64> {
        match self {
            Workload::RandRead4k | Workload::RandWrite4k => {
                let blocks = p.file_bytes / self.len();
                let mut rng = XorShift::new(pass << 8 | self as u64);
                (0..p.rand_ops)
                    .map(|_| rng.next() % blocks * self.len())
                    .collect()
            }
            Workload::SeqRead128k | Workload::SeqWrite128k => {
                let ops = p.seq_bytes / self.len();
                let start = (pass * p.seq_bytes) % p.file_bytes;
                (0..ops)
                    .map(|i| (start + i * self.len()) % p.file_bytes)
                    .collect()
            }
        }
    }
}

struct XorShift(u64);

impl XorShift {
    /// Seeds through a splitmix64 step, so nearby seeds give unrelated streams.
    fn new(seed: u64) -> Self {
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        XorShift((z ^ (z >> 31)).max(1))
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Variant {
    Baseline,
    /// Diagnostic, not a baseline: the system calls the device makes (`preadv`/`pwritev`
    /// with one iovec), without the device, so the table separates the cost of the call's
    /// shape from the device's own work.
    Vectored,
    Sync,
    Async,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Baseline => "pread/pwrite",
            Variant::Vectored => "diag: preadv/pwritev",
            Variant::Sync => "device, Sync engine",
            Variant::Async => "device, Async engine",
        }
    }
}

// ---------------------------------------------------------------------------------------
// File content

fn filler() -> [u8; SECTOR - TAG_LEN] {
    std::array::from_fn(|i| ((i * 131 + 17) & 0xff) as u8)
}

fn tag(sector: u64, generation: u64) -> [u8; TAG_LEN] {
    let mut t = [0u8; TAG_LEN];
    t[..8].copy_from_slice(&(sector ^ TAG_MAGIC).to_le_bytes());
    t[8..].copy_from_slice(&generation.to_le_bytes());
    t
}

/// Checks `data` is what the file holds at `offset`: every sector's tag names its own
/// sector, with a generation `gen_ok` accepts, and the filler is intact.
fn check_content(
    data: &[u8],
    offset: u64,
    gen_ok: impl Fn(u64) -> bool,
    filler: &[u8],
) -> Result<()> {
    for (i, sector) in data.chunks(SECTOR).enumerate() {
        let number = offset / SECTOR_SIZE + i as u64;
        let word =
            |at: usize| u64::from_le_bytes(sector[at..at + 8].try_into().expect("8-byte slice"));
        let (got, generation) = (word(0) ^ TAG_MAGIC, word(8));
        if got != number || !gen_ok(generation) {
            return Err(format!(
                "sector {number} (byte offset {offset} + {}) holds sector {got} of write \
                 generation {generation}",
                i * SECTOR
            ));
        }
        if sector[TAG_LEN..] != *filler {
            return Err(format!("sector {number}: filler bytes differ"));
        }
    }
    Ok(())
}

/// Writes the whole file with generation-0 content and makes it durable.
fn create_file(path: &Path, bytes: u64) -> Result<File> {
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    let filler = filler();
    let mut chunk = Vec::with_capacity(MIB as usize);
    for offset in (0..bytes).step_by(MIB as usize) {
        chunk.clear();
        for s in 0..MIB / SECTOR_SIZE {
            chunk.extend_from_slice(&tag(offset / SECTOR_SIZE + s, 0));
            chunk.extend_from_slice(&filler);
        }
        f.write_all(&chunk)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    f.sync_all()
        .map_err(|e| format!("cannot fsync {}: {e}", path.display()))?;
    Ok(f)
}

/// Percentage of the file's pages in the page cache.
fn resident_percent(file: &File, bytes: u64) -> Result<f64> {
    let len = bytes as usize;
    // SAFETY: a fresh read-only shared mapping of the file, unmapped below; never touched.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(format!("mmap: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
    let mut vec = vec![0u8; len.div_ceil(page)];
    // SAFETY: `vec` has one byte per page of the mapping.
    let rc = unsafe { libc::mincore(addr, len, vec.as_mut_ptr()) };
    let err = std::io::Error::last_os_error();
    // SAFETY: unmapping exactly the mapping made above.
    unsafe { libc::munmap(addr, len) };
    if rc != 0 {
        return Err(format!("mincore: {err}"));
    }
    let resident = vec.iter().filter(|&&b| b & 1 == 1).count();
    Ok(100.0 * resident as f64 / vec.len() as f64)
}

/// Filesystem type and source of the mount holding `path`, from /proc/self/mounts.
fn mount_of(path: &Path) -> (String, String) {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut best: Option<(usize, String, String)> = None;
    for line in mounts.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [source, point, fstype, ..] = fields[..] else {
            continue;
        };
        if path.starts_with(point) && best.as_ref().is_none_or(|b| point.len() >= b.0) {
            best = Some((point.len(), fstype.to_owned(), source.to_owned()));
        }
    }
    best.map(|(_, t, s)| (t, s))
        .unwrap_or_else(|| ("unknown".into(), "unknown".into()))
}

fn statfs_type(path: &Path) -> Result<i64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("{} has a NUL byte", path.display()))?;
    // SAFETY: statfs writes into a zeroed struct of the right type.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid C string and `st` a valid out-pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(format!(
            "statfs {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    #[allow(clippy::unnecessary_cast)]
    Ok(st.f_type as i64)
}

// ---------------------------------------------------------------------------------------
// The rig: guest memory, the two devices and the baseline's file handle

/// A device with its queue, as a guest driver would have set it up.
struct Device {
    driver: QueueDriver,
    block: Block,
    irq: EventFd,
    /// The io_uring's completion eventfd (Async engine).
    completion: Option<RawFd>,
    /// Where the device writes the used ring's index.
    used_idx: GuestAddress,
    /// Used elements returned so far (the index the device should have reached).
    used_expected: u16,
}

fn page_align(x: u64) -> u64 {
    (x + 0xfff) & !0xfff
}

impl Device {
    fn new(mem: &GuestMemoryMmap, path: &Path, base: u64, async_io: bool) -> Result<Self> {
        let driver = QueueDriver::new(mem, base, QUEUE_SIZE);
        // The used ring's place in `QueueDriver`'s layout (descriptor table, avail ring,
        // used ring, each 4 KiB aligned); checked against its end, and again by every
        // batch, which must find exactly as many used elements as this index says.
        let size = u64::from(QUEUE_SIZE);
        let used = page_align(page_align(base + 16 * size) + 6 + 2 * size);
        if page_align(used + 6 + 8 * size) != driver.end() {
            return Err("the queue driver's ring layout is not the one assumed".into());
        }
        let mut block = Block::new(BlockConfig {
            id: "bench".into(),
            path: path.display().to_string(),
            read_only: false,
            flush: false,
            async_io,
            rate_limiter: None,
        })
        .map_err(|e| e.to_string())?;
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?;
        let irq_for_device = irq.try_clone().map_err(|e| format!("eventfd: {e}"))?;
        block
            .activate(
                mem.clone(),
                0,
                vec![driver.device_queue()],
                Arc::new(EventFdInterrupt(irq_for_device)),
            )
            .map_err(|e| format!("activate: {e:?}"))?;
        let completion = block.completion_eventfd().map(AsRawFd::as_raw_fd);
        Ok(Device {
            driver,
            block,
            irq,
            completion,
            used_idx: GuestAddress(used + 2),
            used_expected: 0,
        })
    }
}

struct Rig {
    mem: GuestMemoryMmap,
    file: File,
    depth: usize,
    sync: Device,
    /// None when the host has no io_uring.
    asynch: Option<Device>,
    /// Host addresses of the slots' data buffers, for the baseline.
    host: Vec<*mut u8>,
    filler: [u8; SECTOR - TAG_LEN],
    /// Write passes so far; each stamps its data with its own generation.
    generation: u64,
}

/// Time taken by a batch or a pass.
#[derive(Default, Clone, Copy)]
struct Timing {
    /// Device work only (notification to the last used element) or the baseline's calls.
    timed: Duration,
    /// Device work plus the test driver's ring work (chains in, used ring out).
    with_driver: Duration,
}

/// One pass: its total and its full batches.
#[derive(Default)]
struct Pass {
    total: Timing,
    batches: Vec<Timing>,
}

fn data_addr(slot: usize) -> GuestAddress {
    GuestAddress(DATA_BASE + slot as u64 * MAX_IO)
}

impl Rig {
    fn new(path: &Path, p: &Params) -> Result<Self> {
        let file = create_file(path, p.file_bytes)?;
        let mem_bytes = DATA_BASE as usize + p.depth * MAX_IO as usize;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mem_bytes)])
            .map_err(|e| format!("guest memory: {e}"))?;
        let sync = Device::new(&mem, path, SYNC_QUEUE_BASE, false)?;
        let asynch = Device::new(&mem, path, ASYNC_QUEUE_BASE, true)?;
        let asynch = asynch.block.is_async().then_some(asynch);
        let filler = filler();
        let mut host = Vec::with_capacity(p.depth);
        for slot in 0..p.depth {
            host.push(
                mem.get_host_address(data_addr(slot))
                    .map_err(|e| format!("guest memory: {e}"))?,
            );
            // Buffers start with valid filler; writes only restamp the tags.
            for s in 0..MAX_IO / SECTOR_SIZE {
                mem.write_slice(
                    &filler,
                    data_addr(slot).unchecked_add(s * SECTOR_SIZE + TAG_LEN as u64),
                )
                .map_err(|e| format!("guest memory: {e}"))?;
            }
        }
        Ok(Rig {
            mem,
            file,
            depth: p.depth,
            sync,
            asynch,
            host,
            filler,
            generation: 0,
        })
    }

    /// Runs one pass of `offsets` through `variant`; checks everything it can.
    fn pass(&mut self, variant: Variant, w: Workload, offsets: &[u64]) -> Result<Pass> {
        if w.write() {
            self.generation += 1;
        }
        let mut result = Pass::default();
        let mut written = Vec::new();
        for (b, batch) in offsets.chunks(self.depth).enumerate() {
            self.prepare(w, batch, b * self.depth, &mut written)?;
            let p = match variant {
                Variant::Baseline => self.baseline_batch(w, batch, false)?,
                Variant::Vectored => self.baseline_batch(w, batch, true)?,
                Variant::Sync | Variant::Async => self.device_batch(variant, w, batch)?,
            };
            result.total.timed += p.timed;
            result.total.with_driver += p.with_driver;
            if batch.len() == self.depth {
                result.batches.push(p);
            }
            self.check_reads(w, batch, b * self.depth)?;
        }
        if w.write() {
            // Untimed: every pass starts with the file clean.
            self.file
                .sync_data()
                .map_err(|e| format!("fdatasync: {e}"))?;
            self.check_writes(w, &written)?;
        }
        Ok(result)
    }

    /// Untimed, the same for every variant: stamps write buffers with their target
    /// sectors, poisons the tags of sampled read buffers.
    fn prepare(
        &mut self,
        w: Workload,
        batch: &[u64],
        first: usize,
        written: &mut Vec<u64>,
    ) -> Result<()> {
        for (slot, &offset) in batch.iter().enumerate() {
            let sampled = (first + slot).is_multiple_of(SAMPLE_EVERY);
            if !w.write() && !sampled {
                continue;
            }
            if w.write() && sampled {
                written.push(offset);
            }
            for s in 0..w.len() / SECTOR_SIZE {
                let t = if w.write() {
                    tag(offset / SECTOR_SIZE + s, self.generation)
                } else {
                    [0xff; TAG_LEN]
                };
                self.mem
                    .write_slice(&t, data_addr(slot).unchecked_add(s * SECTOR_SIZE))
                    .map_err(|e| format!("guest memory: {e}"))?;
            }
        }
        Ok(())
    }

    /// The baseline: the batch's requests back to back, one `pread`/`pwrite` each (or, as a
    /// diagnostic, one single-iovec `preadv`/`pwritev`).
    fn baseline_batch(&mut self, w: Workload, batch: &[u64], vectored: bool) -> Result<Timing> {
        let fd = self.file.as_raw_fd();
        let len = w.len() as usize;
        let mut failed = None;
        let start = Instant::now();
        for (slot, &offset) in batch.iter().enumerate() {
            let buf = self.host[slot];
            let iov = libc::iovec {
                iov_base: buf.cast(),
                iov_len: len,
            };
            let off = offset as libc::off_t;
            // SAFETY: `buf` is a slot's data buffer in the guest memory mapping, which
            // holds MAX_IO >= len bytes there and outlives the call.
            let n = unsafe {
                match (w.write(), vectored) {
                    (false, false) => libc::pread(fd, buf.cast(), len, off),
                    (true, false) => libc::pwrite(fd, buf.cast(), len, off),
                    (false, true) => libc::preadv(fd, &iov, 1, off),
                    (true, true) => libc::pwritev(fd, &iov, 1, off),
                }
            };
            if n != len as isize {
                failed = Some((offset, n, std::io::Error::last_os_error()));
                break;
            }
        }
        let elapsed = start.elapsed();
        if let Some((offset, n, e)) = failed {
            return Err(format!("baseline at {offset}: {n} of {len} bytes ({e})"));
        }
        Ok(Timing {
            timed: elapsed,
            with_driver: elapsed,
        })
    }

    fn device_batch(&mut self, variant: Variant, w: Workload, batch: &[u64]) -> Result<Timing> {
        let mem = &self.mem;
        let dev = match variant {
            Variant::Async => self
                .asynch
                .as_mut()
                .ok_or("the Async engine is not available")?,
            _ => &mut self.sync,
        };
        let len = w.len();
        let kind = if w.write() {
            VIRTIO_BLK_T_OUT
        } else {
            VIRTIO_BLK_T_IN
        };
        let mut slot_of_head = [usize::MAX; QUEUE_SIZE as usize];
        let guest = |e: vm_memory::GuestMemoryError| format!("guest memory: {e}");

        // The driver queues the batch.
        let t0 = Instant::now();
        for (slot, &offset) in batch.iter().enumerate() {
            let hdr = GuestAddress(HDR_BASE + 16 * slot as u64);
            let status = GuestAddress(STATUS_BASE + slot as u64);
            mem.write_obj(kind, hdr).map_err(guest)?;
            mem.write_obj(0u32, hdr.unchecked_add(4)).map_err(guest)?;
            mem.write_obj(offset / SECTOR_SIZE, hdr.unchecked_add(8))
                .map_err(guest)?;
            mem.write_obj(0xffu8, status).map_err(guest)?;
            let head = dev.driver.add_chain(
                mem,
                &[
                    Desc {
                        addr: hdr.0,
                        len: 16,
                        write: false,
                    },
                    Desc {
                        addr: data_addr(slot).0,
                        len: len as u32,
                        write: !w.write(),
                    },
                    Desc {
                        addr: status.0,
                        len: 1,
                        write: true,
                    },
                ],
            );
            slot_of_head[usize::from(head)] = slot;
        }
        dev.used_expected = dev.used_expected.wrapping_add(batch.len() as u16);

        // One notification; the device works until everything is in the used ring.
        let t1 = Instant::now();
        dev.block.process_queue();
        if let Some(fd) = dev.completion {
            loop {
                let idx: u16 = mem.read_obj(dev.used_idx).map_err(guest)?;
                if idx == dev.used_expected {
                    break;
                }
                wait_readable(fd)?;
                dev.block.process_completions();
            }
        }
        let t2 = Instant::now();

        // The driver takes the used ring.
        let used = dev.driver.take_used(mem);
        let t3 = Instant::now();

        if used.len() != batch.len() {
            return Err(format!(
                "{}: {} requests queued, {} returned in the used ring",
                variant.name(),
                batch.len(),
                used.len()
            ));
        }
        let mut seen = vec![false; batch.len()];
        let want_len = if w.write() { 1 } else { len as u32 + 1 };
        for (id, used_len) in used {
            let slot = slot_of_head
                .get(id as usize)
                .copied()
                .filter(|&s| s < batch.len() && !seen[s])
                .ok_or_else(|| format!("{}: unexpected used id {id}", variant.name()))?;
            seen[slot] = true;
            let status: u8 = mem
                .read_obj(GuestAddress(STATUS_BASE + slot as u64))
                .map_err(guest)?;
            if status != VIRTIO_BLK_S_OK || used_len != want_len {
                return Err(format!(
                    "{}: {} at {}: status {status}, used length {used_len} (want {} and \
                     {want_len})",
                    variant.name(),
                    w.name(),
                    batch[slot],
                    VIRTIO_BLK_S_OK
                ));
            }
        }
        match dev.irq.read() {
            Ok(n) if n > 0 => {}
            Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => {
                return Err(format!("irq eventfd: {e}"));
            }
            _ => return Err(format!("{}: no interrupt for a batch", variant.name())),
        }
        Ok(Timing {
            timed: t2 - t1,
            with_driver: t3 - t0,
        })
    }

    /// Sampled reads: the buffer holds exactly the file's content at that offset.
    fn check_reads(&self, w: Workload, batch: &[u64], first: usize) -> Result<()> {
        if w.write() {
            return Ok(());
        }
        let mut buf = vec![0u8; w.len() as usize];
        for (slot, &offset) in batch.iter().enumerate() {
            if !(first + slot).is_multiple_of(SAMPLE_EVERY) {
                continue;
            }
            self.mem
                .read_slice(&mut buf, data_addr(slot))
                .map_err(|e| format!("guest memory: {e}"))?;
            let newest = self.generation;
            check_content(&buf, offset, |g| g <= newest, &self.filler)
                .map_err(|e| format!("{}: the data read is wrong: {e}", w.name()))?;
        }
        Ok(())
    }

    /// Sampled writes: the file holds what this pass wrote.
    fn check_writes(&self, w: Workload, offsets: &[u64]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; w.len() as usize];
        let generation = self.generation;
        for &offset in offsets {
            self.file
                .read_exact_at(&mut buf, offset)
                .map_err(|e| format!("reading back {offset}: {e}"))?;
            check_content(&buf, offset, |g| g == generation, &self.filler)
                .map_err(|e| format!("{}: the data written is wrong: {e}", w.name()))?;
        }
        Ok(())
    }
}

fn wait_readable(fd: RawFd) -> Result<()> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: polling one valid descriptor.
        let rc = unsafe { libc::poll(&mut pfd, 1, COMPLETION_TIMEOUT_MS) };
        match rc {
            1 => return Ok(()),
            0 => return Err("an io_uring request never completed".into()),
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(format!("poll: {e}"));
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Measuring and reporting

struct Series {
    workload: Workload,
    variant: Variant,
    ops: usize,
    passes: Vec<Pass>,
}

fn measure_place(p: &Params, label: &str, path: &Path, want_tmpfs: bool) -> Result<Vec<String>> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let (fstype, source) = mount_of(dir);
    let tmpfs = statfs_type(dir)? == TMPFS_MAGIC;
    let mut rig = Rig::new(path, p)?;
    let resident_before = resident_percent(&rig.file, p.file_bytes)?;
    let mut variants = vec![Variant::Baseline, Variant::Vectored, Variant::Sync];
    if rig.asynch.is_some() {
        variants.push(Variant::Async);
    }
    let mut series: Vec<Series> = Vec::new();
    for &w in &WORKLOADS {
        for &v in &variants {
            series.push(Series {
                workload: w,
                variant: v,
                ops: 0,
                passes: Vec::new(),
            });
        }
    }
    let started = Instant::now();
    let mut rng = XorShift::new(0x5eed_b10c);
    let mut pass_number = 0;
    for run in 0..p.warmup + p.runs {
        for &w in &WORKLOADS {
            // A fresh order for every workload of every run (fixed seed), so drift on a
            // shared host and going first, last or right after a given variant fall on
            // each variant alike.
            let mut order = variants.clone();
            for i in (1..order.len()).rev() {
                order.swap(i, (rng.next() % (i as u64 + 1)) as usize);
            }
            for v in order {
                let offsets = w.offsets(p, pass_number);
                pass_number += 1;
                let pass = rig
                    .pass(v, w, &offsets)
                    .map_err(|e| format!("{label}, {}, {}: {e}", w.name(), v.name()))?;
                if run >= p.warmup {
                    let s = series
                        .iter_mut()
                        .find(|s| s.workload == w && s.variant == v)
                        .expect("a series for every workload and variant");
                    s.ops = offsets.len();
                    s.passes.push(pass);
                }
            }
        }
    }
    let elapsed = started.elapsed();
    let resident_after = resident_percent(&rig.file, p.file_bytes)?;
    println!();
    println!(
        "{label}: {} ({fstype} on {source}{}); page cache residency {resident_before:.0}% \
         before, {resident_after:.0}% after; {:.1} s",
        path.display(),
        if tmpfs { ", statfs: tmpfs" } else { "" },
        elapsed.as_secs_f64()
    );
    if tmpfs != want_tmpfs {
        println!(
            "  WARNING: this file is {}on tmpfs; the {label} figures are not what they say",
            if tmpfs { "" } else { "not " }
        );
    }
    if rig.asynch.is_none() {
        println!("  (Async engine: io_uring not available on this host, not measured)");
    }
    Ok(report(label, p.depth, &series))
}

fn report(label: &str, depth: usize, series: &[Series]) -> Vec<String> {
    println!(
        "  {:<24} {:<20} {:>7} {:>8} {:>8} {:>8} {:>8} {:>6} {:>6} {:>6} {:>11} target",
        "workload",
        "path",
        "MiB/s",
        "IOPS",
        "med us",
        "min us",
        "max us",
        "ratio",
        "+drv",
        "pass",
        "pass range",
    );
    let mut summary = Vec::new();
    for s in series {
        let batches = s.batch_times(|t| t.timed);
        let med = median(&batches);
        let (min, max) = min_max(&batches);
        let secs = med.as_secs_f64();
        let mut cols = [String::new(), String::new(), String::new(), String::new()];
        let mut verdict = String::new();
        if s.variant != Variant::Baseline {
            let base = series
                .iter()
                .find(|b| b.workload == s.workload && b.variant == Variant::Baseline)
                .expect("a baseline for every workload");
            let r = Ratios::new(base, s);
            let pass = r.batch >= s.workload.target();
            let word = if pass { "PASS" } else { "MISS" };
            let diagnostic = s.variant == Variant::Vectored;
            let vectored = series
                .iter()
                .find(|v| v.workload == s.workload && v.variant == Variant::Vectored)
                .filter(|_| !diagnostic)
                .map(|v| Ratios::new(v, s).batch);
            if let Some(v) = vectored {
                summary.push(format!(
                    "{label:<5} {:<24} {:<20} ratio {:.2} (target >= {:.2}) {word}; \
                     against preadv/pwritev {v:.2}",
                    s.workload.name(),
                    s.variant.name(),
                    r.batch,
                    s.workload.target()
                ));
            }
            cols = [
                format!("{:.2}", r.batch),
                format!("{:.2}", r.with_driver),
                format!("{:.2}", r.pass),
                format!("{:.2}-{:.2}", r.pass_min, r.pass_max),
            ];
            if !diagnostic {
                verdict = format!(">={:.2} {word}", s.workload.target());
            }
        }
        println!(
            "  {:<24} {:<20} {:>7.0} {:>8.0} {:>8} {:>8} {:>8} {:>6} {:>6} {:>6} {:>11} {verdict}",
            s.workload.name(),
            s.variant.name(),
            (depth as u64 * s.workload.len()) as f64 / secs / MIB as f64,
            depth as f64 / secs,
            us(med),
            us(min),
            us(max),
            cols[0],
            cols[1],
            cols[2],
            cols[3],
        );
    }
    println!(
        "  times are per batch of {depth} requests (median, min, max over all batches of all \
         runs); ratio: device throughput / pread-pwrite throughput = baseline median batch \
         time / device median batch time; +drv: the same with the test driver's ring work \
         counted; pass: median over runs of baseline / device time for the whole pass in the \
         same run (range: min-max over runs)"
    );
    summary
}

impl Series {
    fn batch_times(&self, f: fn(&Timing) -> Duration) -> Vec<Duration> {
        self.passes
            .iter()
            .flat_map(|p| p.batches.iter().map(f))
            .collect()
    }
}

/// Device against baseline.
struct Ratios {
    /// Median batch times.
    batch: f64,
    with_driver: f64,
    /// Whole passes, paired run by run (index i of both is the same run).
    pass: f64,
    pass_min: f64,
    pass_max: f64,
}

impl Ratios {
    fn new(base: &Series, dev: &Series) -> Self {
        let base_med = median(&base.batch_times(|t| t.timed)).as_secs_f64();
        let paired: Vec<f64> = base
            .passes
            .iter()
            .zip(&dev.passes)
            .map(|(b, d)| b.total.timed.as_secs_f64() / d.total.timed.as_secs_f64())
            .collect();
        Ratios {
            batch: base_med / median(&dev.batch_times(|t| t.timed)).as_secs_f64(),
            with_driver: base_med / median(&dev.batch_times(|t| t.with_driver)).as_secs_f64(),
            pass: median_f64(&paired),
            pass_min: paired.iter().copied().fold(f64::INFINITY, f64::min),
            pass_max: paired.iter().copied().fold(0.0, f64::max),
        }
    }
}

fn median_f64(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_unstable_by(f64::total_cmp);
    median_of_sorted(&sorted)
}

fn us(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1e6)
}

/// The device's interrupt as a plain eventfd the caller can watch.
struct EventFdInterrupt(EventFd);

impl VirtioInterrupt for EventFdInterrupt {
    fn trigger(&self, _kind: VirtioInterruptType) {
        let _ = self.0.write(1);
    }
}
