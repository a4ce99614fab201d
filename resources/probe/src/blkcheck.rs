//! The `blk<n>.*` checks: what a virtio-blk device must do for the guest, run on every block
//! device the `virtio` check found (n counts block devices in command-line order).
//!
//! The test fills each disk's sector 0 with a known pattern and may pass the drive's ID, so
//! the probe can tell that it reads the right file; it then writes, refuses writes on
//! read-only disks, refuses reads past the end, and raises an interrupt for every request.

use crate::cmdline::Cmdline;
use crate::line::{Detail, Line};
use crate::report::Report;
use crate::transport::Transport;
use crate::virtio_blk::{
    self, Blk, DATA_SIZE, DATA_WORDS, ID_LEN, Request, S_IOERR, S_OK, SECTOR_SIZE,
};

/// Sector 0 starts with this, the device index in decimal, then '.' up to HEADER_LEN.
const DISK_MAGIC: &[u8] = b"EMBER-DISK-";
const HEADER_LEN: usize = 16;
const HEADER_WORDS: usize = HEADER_LEN / 8;
const SECTOR_WORDS: usize = SECTOR_SIZE / 8;
/// The write check covers sectors 1..=8 in one request, as Linux would merge them.
const WRITE_FIRST: u64 = 1;
const WRITE_SECTORS: u64 = (DATA_SIZE / SECTOR_SIZE) as u64;

/// Runs the checks on block device `n` behind `device`. The device is left running, as Linux
/// leaves devices at a reboot: resetting it would be cleaner, but a VMM need not support
/// a reset after DRIVER_OK (it may set DEVICE_NEEDS_RESET instead), and the probe would
/// wait for it in vain. Each device has its own rings, so none sees another's requests.
#[inline(never)]
pub fn run(report: &mut Report, cmdline: &Cmdline, n: usize, device: Transport) {
    let mut blk = None;
    report.check(name(n, b"init").as_bytes(), |d| {
        blk = Blk::init(device, n, d);
        if let Some(blk) = &blk {
            d.str(b"cap=")
                .dec(blk.capacity)
                .str(b" ro=")
                .dec(u64::from(blk.read_only))
                .str(b" flush=")
                .dec(u64::from(blk.flush))
                .str(b" qmax=")
                .dec(u64::from(blk.queue_max));
        }
        blk.is_some()
    });
    // Nothing else can work on a device that did not initialise.
    let Some(mut blk) = blk else {
        return;
    };
    report.check(name(n, b"id").as_bytes(), |d| id(&mut blk, cmdline, n, d));
    report.check(name(n, b"read0").as_bytes(), |d| read0(&mut blk, n, d));
    if blk.read_only {
        report.check(name(n, b"readonly").as_bytes(), |d| readonly(&mut blk, d));
    } else {
        report.check(name(n, b"write").as_bytes(), |d| write(&mut blk, n, d));
    }
    report.check(name(n, b"eod").as_bytes(), |d| eod(&mut blk, d));
    report.check(name(n, b"irq").as_bytes(), |d| {
        d.str(b"acks=").dec(blk.acks);
        let ok = blk.requests > 0 && blk.acks == blk.requests;
        if !ok {
            d.str(b" requests=").dec(blk.requests);
        }
        ok
    });
}

fn name(n: usize, what: &[u8]) -> Line<32> {
    let mut line = Line::new();
    line.str(b"blk").dec(n as u64).byte(b'.').str(what);
    line
}

/// Sends a request that must succeed; otherwise says why, after `step`, and returns false.
fn expect_ok(blk: &mut Blk, step: &[u8], request: Request, d: &mut Detail) -> bool {
    match blk.request(request) {
        Ok(S_OK) => true,
        Ok(status) => {
            d.str(step).str(b" status=");
            virtio_blk::describe_status(d, status);
            false
        }
        Err(error) => {
            d.str(step).str(b": ");
            error.describe(d);
            false
        }
    }
}

/// GET_ID: a NUL-padded string of up to 20 bytes, `probe.blk<n>.id` if the test passed one.
#[inline(never)]
fn id(blk: &mut Blk, cmdline: &Cmdline, n: usize, d: &mut Detail) -> bool {
    // 0xff marks bytes the device did not write: all 20 must be, the tail as NULs.
    virtio_blk::fill_data(0, ID_LEN, 0xff);
    if !expect_ok(blk, b"get_id", Request::get_id(), d) {
        return false;
    }
    let mut reply = [0u8; ID_LEN];
    for (i, byte) in reply.iter_mut().enumerate() {
        *byte = virtio_blk::data(i);
    }
    let len = reply.iter().position(|&b| b == 0).unwrap_or(ID_LEN);
    let id = &reply[..len];
    // Spaces too show as '?', to keep the detail one word; the comparison below sees them.
    let printable = |b: &u8| (0x21..0x7f).contains(b);
    d.str(b"id=");
    for b in id {
        d.byte(if printable(b) { *b } else { b'?' });
    }
    let mut ok = true;
    // An ASCII string, so no control or 8-bit bytes (0xff: bytes the device did not write).
    if !id.iter().all(|b| *b == b' ' || printable(b)) {
        d.str(b" not printable ASCII");
        ok = false;
    }
    if let Some(at) = reply[len..].iter().position(|&b| b != 0) {
        d.str(b" not NUL-padded at ").dec((len + at) as u64);
        ok = false;
    }
    let mut key = Line::<32>::new();
    key.str(b"probe.blk").dec(n as u64).str(b".id");
    if let Some(want) = cmdline.get(key.as_bytes())
        && want != id
    {
        d.str(b" want=").str(want);
        ok = false;
    }
    ok
}

/// Eight bytes counting up from `first`, wrapping at 256, lowest address first: both of the
/// test's patterns are such runs, so they are built and compared a word at a time.
fn ramp(first: usize) -> u64 {
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    let a = (first as u8 as u64) * 0x0101_0101_0101_0101;
    let b = 0x0706_0504_0302_0100;
    // Bytewise a + b mod 256: the low 7 bits of each byte add without carrying into the
    // next byte (at most 0x7f + 0x07), then each top bit is the xor of the three inputs.
    ((a & LOW7) + (b & LOW7)) ^ ((a ^ b) & !LOW7)
}

/// Word `j` of sector 0 of disk `n` as the test writes it: the header, then byte k = k + n.
fn sector0_word(header: &[u64; HEADER_WORDS], n: usize, j: usize) -> u64 {
    match header.get(j) {
        Some(&word) => word,
        None => ramp(8 * j + n),
    }
}

/// Word `j` of the write check's data (from sector WRITE_FIRST) on disk `n`: byte k of
/// sector s is s * 7 + k + n * 13.
fn written_word(n: usize, j: usize) -> u64 {
    let s = WRITE_FIRST as usize + j / SECTOR_WORDS;
    ramp(s * 7 + 8 * (j % SECTOR_WORDS) + n * 13)
}

/// The first byte of the data buffer's `words` words from word `start` that differs from
/// `want(word)`, as (byte offset from `start`, got, want).
fn mismatch(start: usize, words: usize, want: impl Fn(usize) -> u64) -> Option<(usize, u8, u8)> {
    (0..words).find_map(|j| {
        let (got, want) = (virtio_blk::data_word(start + j), want(j));
        let byte = ((got ^ want).trailing_zeros() / 8) as usize;
        let shift = 8 * byte;
        (got != want).then_some((8 * j + byte, (got >> shift) as u8, (want >> shift) as u8))
    })
}

fn describe_mismatch(d: &mut Detail, (at, got, want): (usize, u8, u8)) {
    d.str(b"at=")
        .dec(at as u64)
        .str(b" got=")
        .hex_byte(got)
        .str(b" want=")
        .hex_byte(want);
}

#[inline(never)]
fn read0(blk: &mut Blk, n: usize, d: &mut Detail) -> bool {
    if blk.capacity == 0 {
        d.str(b"cap=0");
        return false;
    }
    let mut text = Line::<HEADER_LEN>::new();
    text.str(DISK_MAGIC).dec(n as u64);
    while text.len() < HEADER_LEN {
        text.byte(b'.');
    }
    let mut header = [0; HEADER_WORDS];
    for (word, bytes) in header.iter_mut().zip(text.as_bytes().chunks_exact(8)) {
        let mut le = [0; 8];
        le.copy_from_slice(bytes);
        *word = u64::from_le_bytes(le);
    }
    // Zeroed first, so a device that writes nothing cannot pass on stale data.
    virtio_blk::fill_data(0, SECTOR_SIZE, 0);
    if !expect_ok(blk, b"in", Request::read(0, 0, SECTOR_SIZE), d) {
        return false;
    }
    match mismatch(0, SECTOR_WORDS, |j| sector0_word(&header, n, j)) {
        Some(found) => {
            describe_mismatch(d, found);
            false
        }
        None => true,
    }
}

/// Writes sectors 1..=8 in one request, flushes if the device offers it, reads them back.
#[inline(never)]
fn write(blk: &mut Blk, n: usize, d: &mut Detail) -> bool {
    d.str(b"sectors=")
        .dec(WRITE_FIRST)
        .byte(b'-')
        .dec(WRITE_FIRST + WRITE_SECTORS - 1)
        .str(b" flushed=")
        .dec(u64::from(blk.flush));
    if blk.capacity < WRITE_FIRST + WRITE_SECTORS {
        d.str(b" cap=").dec(blk.capacity).str(b" too small");
        return false;
    }
    for j in 0..DATA_WORDS {
        virtio_blk::set_data_word(j, written_word(n, j));
    }
    if !expect_ok(blk, b" out", Request::write(WRITE_FIRST, 0, DATA_SIZE), d) {
        return false;
    }
    if blk.flush && !expect_ok(blk, b" flush", Request::flush(), d) {
        return false;
    }
    // Zeroed first, so a device that writes nothing cannot pass on what we wrote.
    virtio_blk::fill_data(0, DATA_SIZE, 0);
    if !expect_ok(blk, b" in", Request::read(WRITE_FIRST, 0, DATA_SIZE), d) {
        return false;
    }
    match mismatch(0, DATA_WORDS, |j| written_word(n, j)) {
        Some((at, got, want)) => {
            d.str(b" sector=")
                .dec(WRITE_FIRST + (at / SECTOR_SIZE) as u64)
                .byte(b' ');
            describe_mismatch(d, (at % SECTOR_SIZE, got, want));
            false
        }
        None => true,
    }
}

/// On a read-only disk a write must fail with IOERR and change nothing (virtio 5.2.6.2).
#[inline(never)]
fn readonly(blk: &mut Blk, d: &mut Detail) -> bool {
    const SECTOR: u64 = 1;
    // Where in the data buffer, in words: the sector as read, as written, as read again.
    const ORIGINAL: usize = 0;
    const ATTEMPT: usize = SECTOR_WORDS;
    const AFTER: usize = 2 * SECTOR_WORDS;
    if blk.capacity <= SECTOR {
        d.str(b"cap=").dec(blk.capacity).str(b" too small");
        return false;
    }
    if !expect_ok(
        blk,
        b"in",
        Request::read(SECTOR, 8 * ORIGINAL, SECTOR_SIZE),
        d,
    ) {
        return false;
    }
    // The complement of every byte, so a write that went through would show. The buffer for
    // the read-back starts the same, so a read that writes nothing would show too.
    for j in 0..SECTOR_WORDS {
        let flipped = !virtio_blk::data_word(ORIGINAL + j);
        virtio_blk::set_data_word(ATTEMPT + j, flipped);
        virtio_blk::set_data_word(AFTER + j, flipped);
    }
    match blk.request(Request::write(SECTOR, 8 * ATTEMPT, SECTOR_SIZE)) {
        Ok(S_IOERR) => {}
        Ok(status) => {
            d.str(b"out status=");
            virtio_blk::describe_status(d, status);
            return false;
        }
        Err(error) => {
            d.str(b"out: ");
            error.describe(d);
            return false;
        }
    }
    d.str(b"refused=ioerr");
    if !expect_ok(
        blk,
        b" in",
        Request::read(SECTOR, 8 * AFTER, SECTOR_SIZE),
        d,
    ) {
        return false;
    }
    match mismatch(AFTER, SECTOR_WORDS, |j| virtio_blk::data_word(ORIGINAL + j)) {
        Some(found) => {
            d.str(b" sector 1 read back different: ");
            describe_mismatch(d, found);
            false
        }
        None => true,
    }
}

/// A read one sector past the end must fail with IOERR. The spec forbids the driver to send
/// it (5.2.6.1); the probe does so on purpose, as a hostile guest would.
#[inline(never)]
fn eod(blk: &mut Blk, d: &mut Detail) -> bool {
    match blk.request(Request::read(blk.capacity, 0, SECTOR_SIZE)) {
        Ok(status) => {
            d.str(b"status=");
            virtio_blk::describe_status(d, status);
            status == S_IOERR
        }
        Err(error) => {
            error.describe(d);
            false
        }
    }
}
