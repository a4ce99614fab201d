//! The `net.*` checks: what a virtio-net device must do for the guest, run on the first
//! network device the `virtio` check found when `probe.net` asks for one.
//!
//! The probe sends a frame, then answers the frames the test sends it (EtherType 0x88b5,
//! IEEE 802 local experimental, which no host stack sends by itself) with an echo, then
//! sends a burst as fast as the transmit queue takes it. The test on the TAP's side checks
//! what arrives there.

use crate::cmdline::{Cmdline, parse_u64};
use crate::cpu;
use crate::line::Detail;
use crate::report::Report;
use crate::timeout::Deadline;
use crate::virtio_net::{self, ETH_HDR_LEN, Net, NetError, REQUEST_TICKS};

/// The EtherType of every frame the probe sends and of those it answers.
pub const ETHERTYPE: u16 = 0x88b5;
const BROADCAST: [u8; 6] = [0xff; 6];
const TX_PAYLOAD: &[u8] = b"EMBER-PROBE-TX 1";
const ECHO_PREFIX: &[u8] = b"EMBER-PROBE-ECHO ";
const BURST_PREFIX: &[u8] = b"EMBER-PROBE-BURST ";
/// How long each echo waits for its frame: about 7-34 s (13 s at 2.6 GHz), time for a test
/// to take a TAP away and bring it back in between.
const ECHO_TICKS: u64 = 1 << 35;
const DEFAULT_ECHO: u64 = 1;
const DEFAULT_BURST: u64 = 0;

/// Whether `probe.net` asks for the network checks (a number of at least 1).
pub fn wanted(cmdline: &Cmdline) -> bool {
    cmdline
        .get(b"probe.net")
        .and_then(parse_u64)
        .is_some_and(|n| n >= 1)
}

/// Runs the checks on the network device at `base`: `net.init`, `net.tx`, one `net.echo`
/// per `probe.net.echo` (default 1) and, with `probe.net.burst=N` (N >= 1), `net.burst`.
/// The device is left running, as the block devices are (see `blkcheck::run`).
#[inline(never)]
pub fn run(report: &mut Report, cmdline: &Cmdline, base: u64) {
    let mut net = None;
    let mut echo = DEFAULT_ECHO;
    let mut burst = DEFAULT_BURST;
    report.check(b"net.init", |d| {
        let (Some(e), Some(b)) = (
            option(cmdline, b"probe.net.echo", DEFAULT_ECHO, d),
            option(cmdline, b"probe.net.burst", DEFAULT_BURST, d),
        ) else {
            return false;
        };
        (echo, burst) = (e, b);
        let Some(device) = Net::init(base, d) else {
            return false;
        };
        d.str(b"mac=");
        mac(d, &device.mac);
        d.str(b" link=").dec(u64::from(device.link_up));
        if !device.link_up {
            d.str(b" link down");
            return false;
        }
        net = Some(device);
        true
    });
    // Nothing else can work on a device that did not initialise.
    let Some(mut net) = net else {
        return;
    };
    report.check(b"net.tx", |d| {
        let sent = net
            .send(&BROADCAST, ETHERTYPE, &[TX_PAYLOAD])
            .and_then(|slot| net.wait_sent(slot));
        match sent {
            Ok(()) => true,
            Err(e) => {
                e.describe(d);
                false
            }
        }
    });
    for n in 1..=echo {
        report.check(b"net.echo", |d| echo_one(&mut net, n, d));
    }
    if burst > 0 {
        report.check(b"net.burst", |d| send_burst(&mut net, burst, d));
    }
}

/// A numeric option, `default` when absent; None (with the reason in `d`) when malformed.
fn option(cmdline: &Cmdline, key: &[u8], default: u64, d: &mut Detail) -> Option<u64> {
    match cmdline.get(key) {
        None => Some(default),
        Some(value) => {
            let parsed = parse_u64(value);
            if parsed.is_none() {
                d.str(key).byte(b'=').str(value).str(b" is not a number");
            }
            parsed
        }
    }
}

fn mac(d: &mut Detail, mac: &[u8; 6]) {
    for (i, &b) in mac.iter().enumerate() {
        if i > 0 {
            d.byte(b':');
        }
        d.hex2(b);
    }
}

/// Waits for the next frame of ETHERTYPE (others are counted and skipped) and answers its
/// sender with `EMBER-PROBE-ECHO ` and the frame's payload.
#[inline(never)]
fn echo_one(net: &mut Net, n: u64, d: &mut Detail) -> bool {
    d.str(b"n=").dec(n);
    let start = cpu::rdtsc();
    let mut ignored = 0u64;
    let frame = loop {
        let elapsed = cpu::rdtsc().wrapping_sub(start);
        let result = if elapsed >= ECHO_TICKS {
            Err(NetError::Timeout)
        } else {
            net.receive(ECHO_TICKS - elapsed)
        };
        match result {
            Ok(frame) => {
                let bytes = virtio_net::frame(frame.len);
                let ethertype = bytes
                    .get(12..ETH_HDR_LEN)
                    .map(|t| u16::from_be_bytes([t[0], t[1]]));
                if ethertype == Some(ETHERTYPE) {
                    break frame;
                }
                ignored += 1;
            }
            Err(NetError::Timeout) => {
                d.str(b" timeout: no frame of EtherType ")
                    .hex(u64::from(ETHERTYPE))
                    .str(b" came");
                if ignored > 0 {
                    d.str(b" ignored=").dec(ignored);
                }
                return false;
            }
            Err(e) => {
                d.byte(b' ');
                e.describe(d);
                return false;
            }
        }
    };
    let bytes = virtio_net::frame(frame.len);
    let payload = &bytes[ETH_HDR_LEN..];
    d.str(b" len=")
        .dec(payload.len() as u64)
        .str(b" bufs=")
        .dec(u64::from(frame.num_buffers));
    if ignored > 0 {
        d.str(b" ignored=").dec(ignored);
    }
    if frame.num_buffers == 0 {
        d.str(b" num_buffers is 0");
        return false;
    }
    if frame.truncated {
        d.str(b" frame longer than the probe's buffer");
        return false;
    }
    let mut sender = [0u8; 6];
    sender.copy_from_slice(&bytes[6..12]);
    let sent = net
        .send(&sender, ETHERTYPE, &[ECHO_PREFIX, payload])
        .and_then(|slot| net.wait_sent(slot));
    if let Err(e) = sent {
        d.str(b" echo: ");
        e.describe(d);
        return false;
    }
    true
}

/// Sends `count` frames `EMBER-PROBE-BURST <i>` (i from 1) as fast as the transmit queue
/// takes them, reusing each buffer as soon as the device returns it.
#[inline(never)]
fn send_burst(net: &mut Net, count: u64, d: &mut Detail) -> bool {
    let mut sent = 0;
    let mut deadline = Deadline::after(REQUEST_TICKS);
    let mut result = Ok(());
    while sent < count {
        match net.send_batch(&BROADCAST, ETHERTYPE, sent + 1, count - sent, |i, line| {
            line.str(BURST_PREFIX).dec(i);
        }) {
            Ok(0) if deadline.expired() => {
                result = Err(NetError::Timeout);
                break;
            }
            Ok(0) => {}
            Ok(queued) => {
                sent += queued;
                deadline = Deadline::after(REQUEST_TICKS);
            }
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    if result.is_ok() {
        result = net.drain_tx();
    }
    d.str(b"sent=").dec(sent);
    match result {
        Ok(()) => true,
        Err(e) => {
            d.str(b" in_flight=")
                .dec(u64::from(net.tx_in_flight()))
                .byte(b' ');
            e.describe(d);
            false
        }
    }
}
