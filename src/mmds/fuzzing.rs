//! Entry points for the fuzz crate. Not part of the device API.
//!
//! The harnesses check invariants with assertions on purpose: a failed assertion is how
//! a fuzzer reports a bug.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use serde_json::json;

use super::stack::{
    MAX_CONNECTIONS, MIN_FRAME_BUFFER, MMDS_MAC, MmdsStack, MmdsStackStats, ethernet, ipv4, tcp,
};
use super::{DEFAULT_IPV4_ADDRESS, Mmds, MmdsConfig, MmdsVersion, guest_http};

/// Replies drained after one frame can never legitimately exceed this.
const MAX_REPLIES_PER_STEP: usize = 10_000;

/// Feeds `data` to a fresh stack as guest frames and drains every reply.
///
/// Layout: one flags byte (bit 0: V2, bit 1: IMDS compatibility, bit 2: repair IPv4 and
/// TCP checksums so the fuzzer reaches the TCP and HTTP code, bit 3: use the smallest
/// reply buffer), then records of `[delay, len_lo, len_hi, frame...]` where `delay` advances
/// the clock by `delay * 50` ms before the frame.
pub fn fuzz_frames(data: &[u8]) {
    run_frames(data);
}

/// Initial sequence number of every MMDS connection under fuzzing, close to the wrap so
/// sequence arithmetic across it gets exercised.
pub const FUZZ_ISN: u32 = 0xffff_ff00;

fn run_frames(data: &[u8]) -> MmdsStackStats {
    let Some((&flags, mut rest)) = data.split_first() else {
        return MmdsStackStats::default();
    };
    let config = MmdsConfig {
        version: if flags & 1 != 0 {
            MmdsVersion::V2
        } else {
            MmdsVersion::V1
        },
        imds_compat: flags & 2 != 0,
        ..MmdsConfig::default()
    };
    let Ok(mut mmds) = Mmds::new(config) else {
        return MmdsStackStats::default();
    };
    let _ = mmds.store.put(json!({
        "latest": {"meta-data": {"ami-id": "ami-12345678", "n": 1, "big": "x".repeat(8000)}}
    }));
    let repair = flags & 4 != 0;
    let mut buf = vec![
        0u8;
        if flags & 8 != 0 {
            MIN_FRAME_BUFFER
        } else {
            1514
        }
    ];
    let mut stack = MmdsStack::new(DEFAULT_IPV4_ADDRESS, MMDS_MAC);
    stack.set_fixed_isn(FUZZ_ISN);
    let mut now = Instant::now();

    while let Some((&[delay, lo, hi], tail)) = rest.split_first_chunk::<3>() {
        let len = usize::from(u16::from_le_bytes([lo, hi])).min(tail.len());
        let (frame, tail) = tail.split_at(len);
        rest = tail;
        now += Duration::from_millis(u64::from(delay) * 50);
        let mut frame = frame.to_vec();
        if repair {
            repair_checksums(&mut frame);
        }
        let _ = stack.is_for_mmds(&frame);
        stack.receive_frame(&frame, &mut mmds, now);
        drain(&mut stack, &mut buf, now);
    }
    // Run the timers out (idle keep-alive connections legitimately have none).
    for _ in 0..64 {
        let Some(when) = stack.next_timer() else {
            break;
        };
        now = now.max(when);
        drain(&mut stack, &mut buf, now);
    }
    assert!(stack.connection_count() <= MAX_CONNECTIONS);
    stack.stats()
}

/// Feeds `data` to the HTTP layer as the bytes of one connection.
pub fn fuzz_http(data: &[u8]) {
    let mut mmds = Mmds::default();
    let _ = mmds.store.put(json!({"a": {"b": "c"}}));
    let mut rest = data;
    let now = Instant::now();
    while let guest_http::Parsed::Complete(reply) = guest_http::handle(rest, &mut mmds, now) {
        assert!(reply.consumed > 0 && reply.consumed <= rest.len());
        rest = rest.get(reply.consumed..).unwrap_or_default();
        if reply.close {
            break;
        }
    }
}

fn drain(stack: &mut MmdsStack, buf: &mut [u8], now: Instant) {
    for _ in 0..MAX_REPLIES_PER_STEP {
        let Some(len) = stack.write_next_frame(buf, now) else {
            return;
        };
        let frame = buf.get(..len).unwrap_or_default();
        check_reply(frame);
    }
    panic!("the stack kept producing replies");
}

/// Every reply must be well formed.
fn check_reply(frame: &[u8]) {
    let eth = ethernet::parse(frame).unwrap_or_else(|e| panic!("bad reply: {e}"));
    if eth.ethertype == ethernet::ETHERTYPE_IPV4 {
        let packet = ipv4::parse(eth.payload).unwrap_or_else(|e| panic!("bad reply: {e}"));
        tcp::parse(packet.src, packet.dst, packet.payload)
            .unwrap_or_else(|e| panic!("bad reply: {e}"));
    }
}

/// Rewrites the IPv4 header and TCP checksums of a frame in place when its layout allows.
pub fn repair_checksums(frame: &mut [u8]) {
    let ip_start = ethernet::HEADER_LEN;
    if frame.get(12..14) != Some(&ethernet::ETHERTYPE_IPV4.to_be_bytes()[..]) {
        return;
    }
    let Some(header) = frame.get_mut(ip_start..ip_start + ipv4::HEADER_LEN) else {
        return;
    };
    if let Some(field) = header.get_mut(10..12) {
        field.fill(0);
    }
    let sum = ipv4::checksum(header).to_be_bytes();
    if let Some(field) = header.get_mut(10..12) {
        field.copy_from_slice(&sum);
    }
    let octets = |at: usize| header.get(at..).and_then(|b| b.first_chunk::<4>()).copied();
    let total = header
        .get(2..)
        .and_then(|b| b.first_chunk::<2>())
        .map_or(0, |b| usize::from(u16::from_be_bytes(*b)));
    let (Some(src), Some(dst)) = (octets(12), octets(16)) else {
        return;
    };
    let (src, dst) = (Ipv4Addr::from(src), Ipv4Addr::from(dst));
    let protocol = header.get(9).copied();
    let tcp_start = ip_start + ipv4::HEADER_LEN;
    let tcp_end = ip_start.saturating_add(total);
    if protocol != Some(ipv4::PROTOCOL_TCP) || tcp_end < tcp_start + tcp::HEADER_LEN {
        return;
    }
    let Some(segment) = frame.get_mut(tcp_start..tcp_end) else {
        return;
    };
    if let Some(field) = segment.get_mut(16..18) {
        field.fill(0);
    }
    let Ok(sum) = tcp::segment_checksum(src, dst, segment) else {
        return;
    };
    if let Some(field) = segment.get_mut(16..18) {
        field.copy_from_slice(&sum.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn harnesses_accept_anything() {
        fuzz_frames(&[]);
        fuzz_frames(&[0xff]);
        fuzz_frames(&[7, 1, 200, 0, 1, 2, 3]);
        fuzz_http(b"GET / HTTP/1.1\r\n\r\nGET /a HTTP/1.1\r\n\r\nPUT");
        fuzz_http(&[0xff; 5000]);
    }

    #[test]
    fn harness_drives_a_request() {
        // A SYN with checksums left zero; the harness repairs them (flag bit 2).
        let mut syn = vec![0u8; 54];
        syn[..6].copy_from_slice(&MMDS_MAC);
        syn[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        syn[12..14].copy_from_slice(&[8, 0]);
        syn[14] = 0x45;
        syn[17] = 40;
        syn[22] = 64;
        syn[23] = 6;
        syn[26..30].copy_from_slice(&[10, 0, 0, 2]);
        syn[30..34].copy_from_slice(&[169, 254, 169, 254]);
        syn[34..36].copy_from_slice(&4000u16.to_be_bytes());
        syn[36..38].copy_from_slice(&80u16.to_be_bytes());
        syn[46] = 0x50;
        syn[47] = tcp::SYN;
        syn[48..50].copy_from_slice(&1000u16.to_be_bytes());

        let mut repaired = syn.clone();
        repair_checksums(&mut repaired);
        let eth = ethernet::parse(&repaired).unwrap();
        let packet = ipv4::parse(eth.payload).unwrap();
        assert!(tcp::parse(packet.src, packet.dst, packet.payload).is_ok());

        let mut data = vec![4u8, 0];
        data.extend_from_slice(&u16::try_from(syn.len()).unwrap().to_le_bytes());
        data.extend_from_slice(&syn);
        fuzz_frames(&data);
    }

    /// A deterministic stand-in for the fuzzer: mutations of a valid guest transcript.
    #[test]
    fn mutated_transcripts_do_not_panic() {
        let mut transcript = Vec::new();
        let mut frame = |flags: u8, seq: u32, ack: u32, payload: &[u8]| {
            let mut buf = vec![0u8; 54 + payload.len()];
            buf[..6].copy_from_slice(&MMDS_MAC);
            buf[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
            buf[12..14].copy_from_slice(&[8, 0]);
            buf[14] = 0x45;
            buf[16..18].copy_from_slice(&u16::try_from(40 + payload.len()).unwrap().to_be_bytes());
            buf[22] = 64;
            buf[23] = 6;
            buf[26..30].copy_from_slice(&[10, 0, 0, 2]);
            buf[30..34].copy_from_slice(&[169, 254, 169, 254]);
            buf[34..36].copy_from_slice(&4000u16.to_be_bytes());
            buf[36..38].copy_from_slice(&80u16.to_be_bytes());
            buf[38..42].copy_from_slice(&seq.to_be_bytes());
            buf[42..46].copy_from_slice(&ack.to_be_bytes());
            buf[46] = 0x50;
            buf[47] = flags;
            buf[48..50].copy_from_slice(&2000u16.to_be_bytes());
            buf[54..].copy_from_slice(payload);
            transcript.push(3);
            transcript.extend_from_slice(&u16::try_from(buf.len()).unwrap().to_le_bytes());
            transcript.extend_from_slice(&buf);
        };
        let get = b"PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 9\r\n\r\n\
                    GET /latest/meta-data/big HTTP/1.1\r\n\r\n";
        let ours = FUZZ_ISN.wrapping_add(1);
        frame(tcp::SYN, 10, 0, b"");
        frame(tcp::ACK, 11, ours, b"");
        frame(tcp::ACK | tcp::PSH, 11, ours, get);
        // The token response is 109 bytes; acknowledging it lets the second request run.
        frame(tcp::ACK, 11 + get.len() as u32, ours.wrapping_add(109), b"");
        frame(
            tcp::ACK | tcp::FIN,
            11 + get.len() as u32,
            ours.wrapping_add(109),
            b"",
        );

        // Unmutated, the transcript gets the token and the first window of the 8 KB value.
        let mut data = vec![4];
        data.extend_from_slice(&transcript);
        let stats = run_frames(&data);
        assert_eq!(stats.frames_dropped, 0);
        assert_eq!(stats.connections_opened, 1);
        assert!(stats.frames_sent > 8, "{stats:?}");

        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..1500 {
            let mut data = vec![(round % 16) as u8 | 4];
            data.extend_from_slice(&transcript);
            let mutations = 1 + next() % 4;
            for _ in 0..mutations {
                let at = 1 + (next() as usize) % (data.len() - 1);
                data[at] = next() as u8;
            }
            fuzz_frames(&data);
        }
    }
}
