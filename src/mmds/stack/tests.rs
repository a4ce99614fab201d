//! End-to-end tests: the test plays a guest talking to the stack with raw frames.

use std::time::Duration;

use serde_json::json;

use super::connection::{FIN_WAIT_TIMEOUT, INITIAL_RTO, MAX_RETRIES, OUR_MSS};
use super::tcp::{FIN, PSH};
use super::*;
use crate::mmds::guest_http::MAX_REQUEST_SIZE;
use crate::mmds::{DEFAULT_IPV4_ADDRESS, MmdsConfig, MmdsVersion};

const GUEST_MAC: MacAddr = [0x02, 0, 0, 0, 0, 0x01];
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const MMDS_IP: Ipv4Addr = DEFAULT_IPV4_ADDRESS;

/// An owned view of a TCP reply.
#[derive(Debug)]
struct Seg {
    src_port: u16,
    dst_port: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
    mss: Option<u16>,
    payload: Vec<u8>,
}

impl Seg {
    fn has(&self, flags: u8) -> bool {
        self.flags & flags == flags
    }
}

fn mmds(version: MmdsVersion) -> Mmds {
    let mut mmds = Mmds::new(MmdsConfig {
        version,
        ..MmdsConfig::default()
    })
    .unwrap();
    mmds.store
        .put(json!({
            "latest": {"meta-data": {"ami-id": "ami-12345678", "reservation-id": "r-1",
                                     "big": "0123456789".repeat(300)}}
        }))
        .unwrap();
    mmds
}

fn stack() -> MmdsStack {
    MmdsStack::new(MMDS_IP, MMDS_MAC)
}

#[allow(clippy::too_many_arguments)]
fn tcp_frame(
    src_port: u16,
    dst_port: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
    mss: Option<u16>,
    payload: &[u8],
) -> Vec<u8> {
    let header = SegmentHeader {
        src_port,
        dst_port,
        seq,
        ack,
        flags,
        window,
        mss,
    };
    let mut buf = vec![0u8; 100 + payload.len()];
    let len = write_tcp(
        &mut buf, GUEST_MAC, MMDS_MAC, GUEST_IP, MMDS_IP, 1, &header, payload,
    )
    .unwrap();
    buf.truncate(len);
    buf
}

fn arp_request(target: Ipv4Addr) -> Vec<u8> {
    let packet = ArpPacket {
        operation: arp::OP_REQUEST,
        sender_mac: GUEST_MAC,
        sender_ip: GUEST_IP,
        target_mac: [0; 6],
        target_ip: target,
    };
    let mut buf = vec![0u8; 60];
    let len = write_arp(&mut buf, GUEST_MAC, [0xff; 6], &packet).unwrap();
    // Minimum-size Ethernet padding must not bother the parser.
    assert_eq!(len, 42);
    buf
}

fn drain_with(stack: &mut MmdsStack, now: Instant, buf_len: usize) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    let mut buf = vec![0u8; buf_len];
    while let Some(len) = stack.write_next_frame(&mut buf, now) {
        frames.push(buf[..len].to_vec());
        assert!(frames.len() < 10_000, "reply storm");
    }
    assert!(!stack.pending_frame());
    frames
}

fn drain(stack: &mut MmdsStack, now: Instant) -> Vec<Seg> {
    drain_with(stack, now, 1514)
        .iter()
        .map(|f| parse_reply(f))
        .collect()
}

fn parse_reply(frame: &[u8]) -> Seg {
    let eth = ethernet::parse(frame).unwrap();
    assert_eq!(eth.dst, GUEST_MAC);
    assert_eq!(eth.src, MMDS_MAC);
    assert_eq!(eth.ethertype, ETHERTYPE_IPV4);
    let packet = ipv4::parse(eth.payload).unwrap();
    assert_eq!((packet.src, packet.dst), (MMDS_IP, GUEST_IP));
    let seg = tcp::parse(packet.src, packet.dst, packet.payload).unwrap();
    Seg {
        src_port: seg.src_port,
        dst_port: seg.dst_port,
        seq: seg.seq,
        ack: seg.ack,
        flags: seg.flags,
        window: seg.window,
        mss: seg.mss,
        payload: seg.payload.to_vec(),
    }
}

/// The guest side of one connection.
struct Client {
    port: u16,
    /// Next sequence number the guest sends.
    seq: u32,
    /// Next sequence number the guest expects from MMDS.
    ack: u32,
    window: u16,
}

impl Client {
    fn connect(stack: &mut MmdsStack, mmds: &mut Mmds, now: Instant, port: u16) -> Client {
        let isn = 1000u32.wrapping_mul(u32::from(port));
        Self::connect_with(stack, mmds, now, port, isn, None, 64240)
    }

    fn connect_with(
        stack: &mut MmdsStack,
        mmds: &mut Mmds,
        now: Instant,
        port: u16,
        isn: u32,
        mss: Option<u16>,
        window: u16,
    ) -> Client {
        stack.receive_frame(
            &tcp_frame(port, 80, isn, 0, SYN, window, mss, b""),
            mmds,
            now,
        );
        let replies = drain(stack, now);
        assert_eq!(replies.len(), 1);
        let syn_ack = &replies[0];
        assert_eq!(syn_ack.flags, SYN | ACK);
        assert_eq!(syn_ack.ack, isn.wrapping_add(1));
        assert_eq!(syn_ack.mss, Some(OUR_MSS));
        assert_eq!((syn_ack.src_port, syn_ack.dst_port), (80, port));
        let mut client = Client {
            port,
            seq: isn.wrapping_add(1),
            ack: syn_ack.seq.wrapping_add(1),
            window,
        };
        client.send(stack, mmds, now, ACK, b"");
        assert!(drain(stack, now).is_empty(), "a bare ACK gets no answer");
        client
    }

    fn send(
        &mut self,
        stack: &mut MmdsStack,
        mmds: &mut Mmds,
        now: Instant,
        flags: u8,
        data: &[u8],
    ) {
        let frame = tcp_frame(
            self.port,
            80,
            self.seq,
            self.ack,
            flags,
            self.window,
            None,
            data,
        );
        assert!(stack.is_for_mmds(&frame));
        stack.receive_frame(&frame, mmds, now);
        self.seq = self
            .seq
            .wrapping_add(u32::try_from(data.len()).unwrap())
            .wrapping_add(u32::from(flags & FIN != 0));
    }

    /// Sends `request` and collects the whole response, acknowledging every segment.
    /// Returns the response and whether MMDS sent a FIN after it.
    fn exchange(
        &mut self,
        stack: &mut MmdsStack,
        mmds: &mut Mmds,
        now: Instant,
        request: &str,
    ) -> (String, bool) {
        self.send(stack, mmds, now, ACK | PSH, request.as_bytes());
        let mut response = Vec::new();
        let mut fin = false;
        for _ in 0..1000 {
            let replies = drain(stack, now);
            if replies.is_empty() {
                break;
            }
            for seg in replies {
                assert_eq!(seg.ack, self.seq, "MMDS acknowledges all request bytes");
                assert!(seg.payload.len() <= usize::from(OUR_MSS));
                if seg.seq == self.ack && !seg.payload.is_empty() {
                    response.extend_from_slice(&seg.payload);
                    self.ack = self
                        .ack
                        .wrapping_add(u32::try_from(seg.payload.len()).unwrap());
                }
                if seg.has(FIN) && seg.seq.wrapping_add(seg.payload.len() as u32) == self.ack {
                    fin = true;
                    self.ack = self.ack.wrapping_add(1);
                }
            }
            self.send(stack, mmds, now, ACK, b"");
        }
        (String::from_utf8(response).unwrap(), fin)
    }
}

fn body(response: &str) -> &str {
    response.split_once("\r\n\r\n").unwrap().1
}

#[test]
fn arp_requests_for_mmds_are_answered() {
    let mut stack = stack();
    let mut mmds = mmds(MmdsVersion::V1);
    let now = Instant::now();

    let request = arp_request(MMDS_IP);
    assert!(stack.is_for_mmds(&request));
    stack.receive_frame(&request, &mut mmds, now);
    assert!(stack.pending_frame());
    let frames = drain_with(&mut stack, now, 1514);
    assert_eq!(frames.len(), 1);
    let eth = ethernet::parse(&frames[0]).unwrap();
    assert_eq!(
        (eth.dst, eth.src, eth.ethertype),
        (GUEST_MAC, MMDS_MAC, ETHERTYPE_ARP)
    );
    let reply = arp::parse(eth.payload).unwrap();
    assert_eq!(reply.operation, arp::OP_REPLY);
    assert_eq!((reply.sender_mac, reply.sender_ip), (MMDS_MAC, MMDS_IP));
    assert_eq!((reply.target_mac, reply.target_ip), (GUEST_MAC, GUEST_IP));

    let other = arp_request(Ipv4Addr::new(10, 0, 0, 1));
    assert!(!stack.is_for_mmds(&other));
    stack.receive_frame(&other, &mut mmds, now);
    assert!(!stack.pending_frame());
    assert_eq!(stack.stats().arp_replies, 1);
    assert_eq!(stack.stats().frames_dropped, 1);
}

#[test]
fn classification() {
    let stack = stack();
    let tcp = tcp_frame(1, 80, 0, 0, SYN, 0, None, b"");
    assert!(stack.is_for_mmds(&tcp));
    let mut elsewhere = tcp.clone();
    elsewhere[30..34].copy_from_slice(&[10, 0, 0, 1]);
    assert!(!stack.is_for_mmds(&elsewhere));
    let mut udp = tcp.clone();
    udp[23] = 17;
    assert!(
        stack.is_for_mmds(&udp),
        "any IPv4 protocol to MMDS is consumed"
    );
    let mut reply = arp_request(MMDS_IP);
    reply[21] = 2;
    assert!(!stack.is_for_mmds(&reply));
    let mut ipv6 = tcp.clone();
    ipv6[12..14].copy_from_slice(&[0x86, 0xdd]);
    assert!(!stack.is_for_mmds(&ipv6));
    for len in 0..tcp.len() {
        assert!(!stack.is_for_mmds(&tcp[..len.min(33)]));
    }
}

#[test]
fn v2_session_end_to_end() {
    let mut stack = stack();
    let mut mmds = mmds(MmdsVersion::V2);
    let now = Instant::now();

    stack.receive_frame(&arp_request(MMDS_IP), &mut mmds, now);
    assert_eq!(drain_with(&mut stack, now, 1514).len(), 1);

    let mut first = Client::connect(&mut stack, &mut mmds, now, 40001);
    let (response, fin) = first.exchange(
        &mut stack,
        &mut mmds,
        now,
        "PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\n\
         X-metadata-token-ttl-seconds: 21600\r\n\r\n",
    );
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    assert!(!fin);
    let token = body(&response).to_string();
    assert_eq!(token.len(), 44);

    // Same connection, keep-alive.
    let (response, fin) = first.exchange(
        &mut stack,
        &mut mmds,
        now,
        &format!("GET /latest/meta-data/ HTTP/1.1\r\nX-metadata-token: {token}\r\n\r\n"),
    );
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    assert_eq!(body(&response), "ami-id\nbig\nreservation-id");
    assert!(!fin);

    // Without the token.
    let (response, _) = first.exchange(
        &mut stack,
        &mut mmds,
        now,
        "GET /latest/meta-data/ HTTP/1.1\r\n\r\n",
    );
    assert!(
        response.starts_with("HTTP/1.1 401 Unauthorized\r\n"),
        "{response}"
    );

    // A second connection asks to close after the response.
    let mut second = Client::connect(&mut stack, &mut mmds, now, 40002);
    assert_eq!(stack.connection_count(), 2);
    let (response, fin) = second.exchange(
        &mut stack,
        &mut mmds,
        now,
        &format!(
            "GET /latest/meta-data/ami-id HTTP/1.1\r\nAccept: application/json\r\n\
             X-aws-ec2-metadata-token: {token}\r\nConnection: close\r\n\r\n"
        ),
    );
    assert_eq!(body(&response), "\"ami-12345678\"");
    assert!(fin, "MMDS closes after the response");
    // The guest's FIN ends the connection once acknowledged.
    second.send(&mut stack, &mut mmds, now, ACK | FIN, b"");
    let replies = drain(&mut stack, now);
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].flags, ACK);
    assert_eq!(replies[0].ack, second.seq);
    assert_eq!(stack.connection_count(), 1);

    // The guest closes the first one: MMDS acknowledges with its own FIN.
    first.send(&mut stack, &mut mmds, now, ACK | FIN, b"");
    let replies = drain(&mut stack, now);
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].flags, ACK | FIN);
    assert_eq!(replies[0].ack, first.seq);
    first.ack = first.ack.wrapping_add(1);
    first.send(&mut stack, &mut mmds, now, ACK, b"");
    assert!(drain(&mut stack, now).is_empty());
    assert_eq!(stack.connection_count(), 0);
    assert_eq!(stack.next_timer(), None);

    let stats = stack.stats();
    assert_eq!(stats.connections_opened, 2);
    assert_eq!(stats.frames_dropped, 0);
    assert_eq!(stats.resets_sent, 0);
}

#[test]
fn segments_respect_mss_and_window() {
    let mut stack = stack();
    let mut mmds = mmds(MmdsVersion::V1);
    let now = Instant::now();
    let mut client = Client::connect_with(&mut stack, &mut mmds, now, 40010, 1, Some(100), 300);
    client.send(
        &mut stack,
        &mut mmds,
        now,
        ACK | PSH,
        b"GET /latest/meta-data/big HTTP/1.1\r\n\r\n",
    );
    let burst = drain(&mut stack, now);
    let sent: usize = burst.iter().map(|s| s.payload.len()).sum();
    assert_eq!(sent, 300, "exactly one window in flight");
    assert!(burst.iter().all(|s| s.payload.len() <= 100));

    // Acknowledge progressively and collect everything.
    let mut response = Vec::new();
    let mut pending = burst;
    for _ in 0..200 {
        for seg in &pending {
            if seg.seq == client.ack {
                response.extend_from_slice(&seg.payload);
                client.ack = client.ack.wrapping_add(seg.payload.len() as u32);
            }
        }
        client.send(&mut stack, &mut mmds, now, ACK, b"");
        pending = drain(&mut stack, now);
        if pending.is_empty() {
            break;
        }
        let in_flight: usize = pending.iter().map(|s| s.payload.len()).sum();
        assert!(in_flight <= 300);
    }
    let response = String::from_utf8(response).unwrap();
    assert_eq!(body(&response), "0123456789".repeat(300));
    assert_eq!(stack.next_timer(), None, "everything acknowledged");
}

#[test]
fn small_buffers_shrink_segments() {
    let mut stack = stack();
    let mut mmds = mmds(MmdsVersion::V1);
    let now = Instant::now();
    let mut client = Client::connect(&mut stack, &mut mmds, now, 40011);
    client.send(
        &mut stack,
        &mut mmds,
        now,
        ACK | PSH,
        b"GET /latest HTTP/1.1\r\n\r\n",
    );
    assert!(stack.pending_frame());
    let mut tiny = [0u8; MIN_FRAME_BUFFER - 1];
    assert_eq!(stack.write_next_frame(&mut tiny, now), None);
    assert!(stack.pending_frame(), "nothing lost to a short buffer");
    let frames = drain_with(&mut stack, now, MIN_FRAME_BUFFER);
    let mut response = Vec::new();
    for frame in &frames {
        assert!(frame.len() <= MIN_FRAME_BUFFER);
        response.extend_from_slice(&parse_reply(frame).payload);
    }
    assert!(frames.len() > 10);
    assert!(
        String::from_utf8(response)
            .unwrap()
            .ends_with("\r\n\r\nmeta-data/")
    );
}

#[test]
fn unacknowledged_data_is_retransmitted_then_reset() {
    let mut stack = stack();
    let mut mmds = mmds(MmdsVersion::V1);
    let start = Instant::now();
    let mut client = Client::connect(&mut stack, &mut mmds, start, 40020);
    client.send(
        &mut stack,
        &mut mmds,
        start,
        ACK | PSH,
        b"GET /latest/meta-data/big HTTP/1.1\r\n\r\n",
    );
    let first = drain(&mut stack, start);
    let first_bytes: usize = first.iter().map(|s| s.payload.len()).sum();
    assert!(first_bytes > 3000);
    let first_seq = first[0].seq;

    let mut now = start;
    let mut retransmissions = 0;
    let mut reset = None;
    let mut expected_gap = INITIAL_RTO;
    while let Some(when) = stack.next_timer() {
        assert!(when - now >= expected_gap.min(Duration::from_secs(8)));
        now = when;
        expected_gap *= 2;
        // Polling before the deadline does nothing.
        assert!(drain(&mut stack, now - Duration::from_millis(1)).is_empty());
        let replies = drain(&mut stack, now);
        assert!(!replies.is_empty());
        if let Some(rst) = replies.iter().find(|s| s.has(RST)) {
            reset = Some(rst.seq);
            break;
        }
        // Go-back-N restarts from the first unacknowledged byte.
        assert_eq!(replies[0].seq, first_seq);
        let resent: usize = replies.iter().map(|s| s.payload.len()).sum();
        assert_eq!(resent, first_bytes, "no growth: the same response again");
        retransmissions += 1;
    }
    assert_eq!(retransmissions, MAX_RETRIES);
    assert_eq!(reset, Some(first_seq.wrapping_add(first_bytes as u32)));
    assert_eq!(stack.connection_count(), 0);
    assert_eq!(stack.next_timer(), None);
    assert_eq!(stack.stats().resets_sent, 1);
}

#[test]
fn lost_syn_ack_is_resent() {
    let mut stack = stack();
    let mut mmds = mmds(MmdsVersion::V1);
    let now = Instant::now();
    let syn = tcp_frame(40030, 80, 7, 0, SYN, 1000, Some(1460), b"");
    stack.receive_frame(&syn, &mut mmds, now);
    let first = drain(&mut stack, now);
    // The guest retransmits its SYN: the same SYN-ACK comes back.
    stack.receive_frame(&syn, &mut mmds, now);
    let again = drain(&mut stack, now);
    assert_eq!(again.len(), 1);
    assert_eq!((again[0].flags, again[0].seq), (SYN | ACK, first[0].seq));
    // Or the timer fires.
    let when = stack.next_timer().unwrap();
    let timed = drain(&mut stack, when);
    assert_eq!((timed[0].flags, timed[0].seq), (SYN | ACK, first[0].seq));
    assert_eq!(stack.connection_count(), 1);
}

#[test]
fn connection_limit() {
    let mut stack = stack();
    let mut mmds = mmds(MmdsVersion::V1);
    let now = Instant::now();
    for i in 0..=MAX_CONNECTIONS {
        let port = 50000 + u16::try_from(i).unwrap();
        stack.receive_frame(
            &tcp_frame(port, 80, 100, 0, SYN, 1000, None, b""),
            &mut mmds,
            now,
        );
    }
    let replies = drain(&mut stack, now);
    assert_eq!(replies.len(), MAX_CONNECTIONS + 1);
    let syn_acks = replies.iter().filter(|s| s.flags == SYN | ACK).count();
    let resets: Vec<&Seg> = replies.iter().filter(|s| s.has(RST)).collect();
    assert_eq!(syn_acks, MAX_CONNECTIONS);
    assert_eq!(resets.len(), 1);
    assert_eq!(resets[0].dst_port, 50000 + MAX_CONNECTIONS as u16);
    assert_eq!(resets[0].ack, 101);
    assert_eq!(stack.connection_count(), MAX_CONNECTIONS);
    assert_eq!(stack.stats().connections_refused, 1);
    // Initial sequence numbers are random, not shared.
    let mut isns: Vec<u32> = replies
        .iter()
        .filter(|s| s.has(SYN))
        .map(|s| s.seq)
        .collect();
    isns.sort_unstable();
    isns.dedup();
    assert!(isns.len() > MAX_CONNECTIONS - 2);
}

#[test]
fn stray_segments_get_resets() {
    let mut stack = stack();
    let mut mmds = mmds(MmdsVersion::V1);
    let now = Instant::now();

    stack.receive_frame(
        &tcp_frame(1234, 80, 5, 777, ACK, 100, None, b"x"),
        &mut mmds,
        now,
    );
    let replies = drain(&mut stack, now);
    assert_eq!(replies.len(), 1);
    assert_eq!((replies[0].flags, replies[0].seq), (RST, 777));

    stack.receive_frame(
        &tcp_frame(1234, 8080, 5, 0, SYN, 100, None, b""),
        &mut mmds,
        now,
    );
    let replies = drain(&mut stack, now);
    assert_eq!(replies.len(), 1);
    assert_eq!((replies[0].flags, replies[0].ack), (RST | ACK, 6));
    assert_eq!((replies[0].src_port, replies[0].dst_port), (8080, 1234));

    stack.receive_frame(
        &tcp_frame(1234, 80, 5, 0, RST, 100, None, b""),
        &mut mmds,
        now,
    );
    stack.receive_frame(
        &tcp_frame(1234, 80, 5, 0, RST | ACK, 100, None, b""),
        &mut mmds,
        now,
    );
    assert!(drain(&mut stack, now).is_empty(), "RSTs are never answered");
    assert_eq!(stack.connection_count(), 0);
    assert_eq!(stack.stats().resets_sent, 2);
}

#[test]
fn malformed_frames_are_dropped() {
    let mut stack = stack();
    let mut mmds = mmds(MmdsVersion::V1);
    let now = Instant::now();
    let good = tcp_frame(1234, 80, 5, 0, SYN, 100, None, b"");

    let mut bad_tcp_sum = good.clone();
    bad_tcp_sum[50] ^= 1;
    let mut bad_ip_sum = good.clone();
    bad_ip_sum[22] ^= 1;
    let mut udp = good.clone();
    udp[23] = 17;
    let mut options = good.clone();
    options[14] = 0x46;
    let mut elsewhere = good.clone();
    elsewhere[33] = 1;
    let frames: Vec<Vec<u8>> = vec![
        vec![],
        good[..13].to_vec(),
        good[..40].to_vec(),
        bad_tcp_sum,
        bad_ip_sum,
        udp,
        options,
        elsewhere,
        vec![0xff; 200],
    ];
    for frame in &frames {
        stack.receive_frame(frame, &mut mmds, now);
    }
    assert!(drain(&mut stack, now).is_empty());
    assert_eq!(stack.connection_count(), 0);
    let stats = stack.stats();
    assert_eq!(stats.frames_received, frames.len() as u64);
    assert_eq!(stats.frames_dropped, frames.len() as u64);
}

#[test]
fn out_of_order_data_is_dropped_and_duplicate_acked() {
    let mut stack = stack();
    let mut mmds = mmds(MmdsVersion::V1);
    let now = Instant::now();
    let mut client = Client::connect(&mut stack, &mut mmds, now, 40040);
    let request = b"GET /latest HTTP/1.1\r\n\r\n";
    let frame = tcp_frame(
        40040,
        80,
        client.seq + 4,
        client.ack,
        ACK,
        1000,
        None,
        &request[4..],
    );
    stack.receive_frame(&frame, &mut mmds, now);
    let replies = drain(&mut stack, now);
    assert_eq!(replies.len(), 1);
    assert!(replies[0].payload.is_empty());
    assert_eq!(replies[0].ack, client.seq, "duplicate ACK for the hole");

    // The retransmitted whole request, overlapping what is missing, is answered.
    let (response, _) = client.exchange(
        &mut stack,
        &mut mmds,
        now,
        std::str::from_utf8(request).unwrap(),
    );
    assert_eq!(body(&response), "meta-data/");

    // A duplicate of old data is acknowledged but not delivered again.
    let old = tcp_frame(
        40040,
        80,
        client.seq - 5,
        client.ack,
        ACK,
        1000,
        None,
        b"\r\n\r\n",
    );
    stack.receive_frame(&old, &mut mmds, now);
    let replies = drain(&mut stack, now);
    assert_eq!(replies.len(), 1);
    assert!(replies[0].payload.is_empty());
    assert_eq!(replies[0].ack, client.seq);
}

#[test]
fn requests_are_bounded() {
    let mut stack = stack();
    let mut mmds = mmds(MmdsVersion::V1);
    let now = Instant::now();
    let mut client = Client::connect(&mut stack, &mut mmds, now, 40050);
    // A head that never ends: the window closes at the request limit and MMDS answers 413.
    client.send(&mut stack, &mut mmds, now, ACK, b"GET /");
    let chunk = vec![b'a'; 1000];
    let mut status = None;
    let mut smallest_window = u16::MAX;
    for _ in 0..10 {
        client.send(&mut stack, &mut mmds, now, ACK, &chunk);
        for seg in drain(&mut stack, now) {
            // Resume from what MMDS accepted, as the guest's TCP would.
            client.seq = seg.ack;
            smallest_window = smallest_window.min(seg.window);
            if status.is_none() && seg.payload.len() >= 12 {
                status = Some(String::from_utf8_lossy(&seg.payload[..12]).to_string());
            }
        }
        if status.is_some() {
            break;
        }
    }
    assert_eq!(status.as_deref(), Some("HTTP/1.1 413"));
    assert!(usize::from(smallest_window) < 1000);
    for connection in &stack.connections {
        assert!(connection.buffered() <= MAX_REQUEST_SIZE + 200);
    }
}

#[test]
fn pipelined_requests_wait_for_acknowledgment() {
    let mut stack = stack();
    let mut mmds = mmds(MmdsVersion::V1);
    let now = Instant::now();
    let mut client = Client::connect(&mut stack, &mut mmds, now, 40060);
    let one = "GET /latest/meta-data/big HTTP/1.1\r\n\r\n";
    client.send(
        &mut stack,
        &mut mmds,
        now,
        ACK | PSH,
        one.repeat(40).as_bytes(),
    );
    // Only the first response is produced until the guest acknowledges it.
    let burst = drain(&mut stack, now);
    let bytes: usize = burst.iter().map(|s| s.payload.len()).sum();
    assert!(bytes < 3200, "{bytes}");
    assert!(drain(&mut stack, now).is_empty());
    for connection in &stack.connections {
        assert!(connection.buffered() <= MAX_REQUEST_SIZE + 3200);
    }
}

#[test]
fn zero_window_is_probed() {
    let mut stack = stack();
    let mut mmds = mmds(MmdsVersion::V1);
    let now = Instant::now();
    let mut client = Client::connect_with(&mut stack, &mut mmds, now, 40070, 1, None, 0);
    client.send(
        &mut stack,
        &mut mmds,
        now,
        ACK | PSH,
        b"GET /latest HTTP/1.1\r\n\r\n",
    );
    let replies = drain(&mut stack, now);
    assert_eq!(replies.len(), 1);
    assert!(replies[0].payload.is_empty(), "window closed: only the ACK");
    let when = stack.next_timer().expect("persist timer");
    let probe = drain(&mut stack, when);
    assert_eq!(probe.len(), 1);
    assert_eq!(probe[0].payload.len(), 1);
    // The window opens: the rest follows.
    client.window = 1000;
    client.ack = client.ack.wrapping_add(1);
    client.send(&mut stack, &mut mmds, when, ACK, b"");
    let rest = drain(&mut stack, when);
    assert!(!rest.is_empty());
    assert_eq!(rest[0].seq, client.ack);
}

#[test]
fn half_closed_guest_is_forgotten() {
    let mut stack = stack();
    let mut mmds = mmds(MmdsVersion::V1);
    let now = Instant::now();
    let mut client = Client::connect(&mut stack, &mut mmds, now, 40080);
    let (_, fin) = client.exchange(
        &mut stack,
        &mut mmds,
        now,
        "GET /latest HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    assert!(fin);
    // The guest acknowledged the FIN but never sends its own.
    assert_eq!(stack.connection_count(), 1);
    let when = stack.next_timer().unwrap();
    assert_eq!(when, now + FIN_WAIT_TIMEOUT);
    assert!(drain(&mut stack, when).is_empty());
    assert_eq!(stack.connection_count(), 0);
}

#[test]
fn guest_sequence_numbers_wrap() {
    let mut stack = stack();
    let mut mmds = mmds(MmdsVersion::V1);
    let now = Instant::now();
    let mut client =
        Client::connect_with(&mut stack, &mut mmds, now, 40090, u32::MAX - 5, None, 64240);
    let (response, _) = client.exchange(
        &mut stack,
        &mut mmds,
        now,
        "GET /latest/meta-data/ami-id HTTP/1.1\r\n\r\n",
    );
    assert_eq!(body(&response), "ami-12345678");
    assert!(client.seq < 100, "the request crossed the wrap");
}
