//! `probe.count=N`: a guest that keeps working, for the snapshot tests (tests/snapshot.rs).
//! After `PROBE DONE` it counts from 1 to N, one `PROBE COUNT <n>` line per step with a
//! pause between, and resets. The count lives in guest memory and registers, so a guest
//! restored from a snapshot goes on from where it was; with a block device (`probe.blk`)
//! every step also reads sector 0 through the same virtqueue, so the restored device must
//! continue the queue where the saved one stopped, and the line says `blk=ok`.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::cmdline::{Cmdline, parse_u64};
use crate::line::{Detail, Line};
use crate::serial;
use crate::timeout;
use crate::transport::Transport;
use crate::virtio_blk::{self, Blk, Request, S_OK};
use crate::virtio_mmio::Mmio;

/// The count, in guest memory (`.bss`): what a restored guest must still have.
static COUNT: AtomicU64 = AtomicU64::new(0);
/// About 50 ms between steps at the TSC rates hosts have, unless `probe.count.gap` (TSC
/// ticks) says otherwise.
const STEP_TICKS: u64 = 1 << 27;

pub fn run(cmdline: &Cmdline, blk0: Option<u64>) {
    let Some(limit) = cmdline.get(b"probe.count").and_then(parse_u64) else {
        serial::write(b"PROBE COUNT FAIL probe.count is not a number\n");
        return;
    };
    let gap = cmdline
        .get(b"probe.count.gap")
        .and_then(parse_u64)
        .unwrap_or(STEP_TICKS);
    let mut blk = blk0.and_then(|base| {
        let mut detail = Detail::new();
        let blk = Blk::init(Transport::Mmio(Mmio::new(base)), 0, &mut detail);
        if blk.is_none() {
            serial::write(b"PROBE COUNT FAIL block device 0 would not initialise\n");
        }
        blk
    });
    loop {
        let n = COUNT.fetch_add(1, Ordering::SeqCst) + 1;
        let mut line = Line::<48>::new();
        line.str(b"PROBE COUNT ").dec(n);
        if let Some(blk) = &mut blk {
            virtio_blk::fill_data(0, 16, 0);
            let ok = matches!(blk.request(Request::read(0, 0, 512)), Ok(S_OK))
                && virtio_blk::data(0) == b'E'
                && virtio_blk::data(10) == b'-';
            line.str(if ok { b" blk=ok" } else { b" blk=FAIL" });
        }
        line.str(b"\n");
        serial::write(line.as_bytes());
        if n >= limit {
            return;
        }
        if gap > 0 {
            timeout::delay(gap);
        }
    }
}
