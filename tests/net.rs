//! virtio-net end to end: the probe guest drives the network device with a polling driver
//! while the test sits on the other side of the TAP, in a network namespace of its own,
//! with a raw packet socket: it sees what the guest sends and sends what the guest answers.
//!
//! These tests need root (network namespaces, TAP devices, packet sockets) and
//! /dev/net/tun; without them they report that they cannot run.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use common::api::{ApiClient, boot_source};
use common::netns::{PacketSocket, TEST_ETHERTYPE, TestNetns, test_frame};
use common::*;

const GUEST_MAC: [u8; 6] = [0x06, 0x00, 0xac, 0x10, 0x00, 0x02];
const GUEST_MAC_TEXT: &str = "06:00:ac:10:00:02";
/// The test's own address on the TAP's side: locally administered, unicast, made up.
const HOST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
const BROADCAST: [u8; 6] = [0xff; 6];
/// What the probe sends first, and the prefixes of its echoes and burst frames
/// (resources/probe/README.md).
const TX_PAYLOAD: &[u8] = b"EMBER-PROBE-TX 1";
const ECHO_PREFIX: &[u8] = b"EMBER-PROBE-ECHO ";
const BURST_PREFIX: &str = "EMBER-PROBE-BURST ";
/// How long the test waits for one frame from the guest, or one line from ember: the probe
/// boots in well under a second, but a loaded 2-core host can be slow.
const WAIT: Duration = Duration::from_secs(30);

/// All the probe's checks with one network device: the usual ones, `virtio`, and the net
/// checks for `echo` echoes and a burst of `burst` frames.
fn expected_checks(echo: usize, burst: usize) -> usize {
    PROBE_CHECKS + 1 + probe_net_checks(echo, burst)
}

/// A fresh namespace with TAP `tap0` in it, or None (said why) if this host cannot make one.
fn namespace_with_tap(tag: &str) -> Option<TestNetns> {
    if !Path::new("/dev/net/tun").exists() {
        cannot_run("no /dev/net/tun");
        return None;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        cannot_run("network namespaces and TAP devices need root");
        return None;
    }
    let ns = match TestNetns::new(tag) {
        Ok(ns) => ns,
        Err(e) => {
            cannot_run(&format!("cannot create a network namespace: {e}"));
            return None;
        }
    };
    if let Err(e) = ns.add_tap("tap0") {
        cannot_run(&format!("cannot create a TAP device: {e}"));
        return None;
    }
    Some(ns)
}

/// A config booting the probe with `extra` arguments and one interface on `tap0`.
fn net_config(extra: &str, guest_mac: Option<&str>, metrics: Option<&Path>) -> String {
    let mut cfg: serde_json::Value = serde_json::from_str(&config_json(
        &probe_elf(),
        1,
        128,
        &probe_args(1, 128, extra),
    ))
    .unwrap();
    let mut iface = serde_json::json!({"iface_id": "eth0", "host_dev_name": "tap0"});
    if let Some(mac) = guest_mac {
        iface["guest_mac"] = mac.into();
    }
    cfg["network-interfaces"] = serde_json::json!([iface]);
    if let Some(path) = metrics {
        cfg["metrics"] = serde_json::json!({ "metrics_path": path });
    }
    cfg.to_string()
}

/// Reads lines from `source` on a thread, as they come, into a channel.
fn line_reader(source: impl std::io::Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(source).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Lines from one of ember's outputs, read as they come, with what was read so far.
struct Lines {
    rx: Receiver<String>,
    seen: Vec<String>,
    what: &'static str,
}

impl Lines {
    fn new(rx: Receiver<String>, what: &'static str) -> Self {
        Lines {
            rx,
            seen: Vec::new(),
            what,
        }
    }

    /// Waits up to `limit` for a line containing `needle`; panics with everything read.
    fn wait_for(&mut self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            match self
                .rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(e) => panic!(
                    "no line with {needle:?} in ember's {} ({e:?}):\n{}",
                    self.what,
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// What has come so far, without waiting.
    fn so_far(&mut self) -> String {
        while let Ok(line) = self.rx.try_recv() {
            self.seen.push(line);
        }
        self.seen.join("\n")
    }

    /// Everything, once the process has exited and the reader reached the end.
    fn rest(mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        // The readers stop at the end of ember's output, which comes once it has exited.
        while let Ok(line) = self
            .rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.seen.push(line);
        }
        self.seen.iter().map(|l| format!("{l}\n")).collect()
    }
}

/// An ember running in a namespace, its console and log read as they come; killed if the
/// test ends (or panics) before ember does.
struct Ember {
    child: Child,
    stdin: Option<ChildStdin>,
    console: Lines,
    log: Lines,
}

impl Ember {
    fn spawn(ns: &TestNetns, args: &[&str]) -> Self {
        let mut child = ns
            .ember_command(args)
            .stdin(Stdio::piped())
            .spawn()
            .expect("spawn ember in the namespace");
        let stdin = child.stdin.take();
        let console = Lines::new(line_reader(child.stdout.take().unwrap()), "console");
        let log = Lines::new(line_reader(child.stderr.take().unwrap()), "log");
        Ember {
            child,
            stdin,
            console,
            log,
        }
    }

    /// ember's console and log so far, for failure messages.
    fn output(&mut self) -> String {
        let console = self.console.so_far();
        let log = self.log.so_far();
        format!("ember's console so far:\n{console}\nember's log so far:\n{log}")
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn send_console(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().expect("stdin");
        stdin.write_all(bytes).expect("write to ember's stdin");
        stdin.flush().expect("flush ember's stdin");
    }

    /// Waits for ember to exit and returns all it printed.
    fn finish(mut self) -> RunResult {
        self.stdin = None;
        let start = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait for ember") {
                break status;
            }
            if start.elapsed() > RUN_DEADLINE {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "ember did not exit within {RUN_DEADLINE:?}:\nconsole:\n{}\nlog:\n{}",
                    self.console.seen.join("\n"),
                    self.log.seen.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let console = std::mem::replace(&mut self.console, Lines::new(channel().1, "console"));
        let log = std::mem::replace(&mut self.log, Lines::new(channel().1, "log"));
        RunResult {
            status,
            stdout: console.rest(),
            stderr: log.rest(),
        }
    }
}

impl Drop for Ember {
    fn drop(&mut self) {
        if self.running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The next frame from the guest (destination, source, payload), checked for the test's
/// EtherType and the guest's source address.
fn guest_frame(
    sock: &PacketSocket,
    ember: &mut Ember,
    guest_mac: [u8; 6],
    what: &str,
) -> ([u8; 6], Vec<u8>) {
    let Some(frame) = sock.receive(WAIT) else {
        panic!(
            "no {what} frame from the guest within {WAIT:?}\n{}",
            ember.output()
        );
    };
    assert!(frame.len() >= 14, "{what}: runt frame {frame:02x?}");
    assert_eq!(
        frame[6..12],
        guest_mac,
        "{what}: source address of {frame:02x?}"
    );
    assert_eq!(
        u16::from_be_bytes([frame[12], frame[13]]),
        TEST_ETHERTYPE,
        "{what}: EtherType of {frame:02x?}"
    );
    let mut dst = [0u8; 6];
    dst.copy_from_slice(&frame[..6]);
    (dst, frame[14..].to_vec())
}

/// Waits for the probe's first frame: broadcast, `EMBER-PROBE-TX 1`.
fn expect_tx_frame(sock: &PacketSocket, ember: &mut Ember, guest_mac: [u8; 6]) {
    let (dst, payload) = guest_frame(sock, ember, guest_mac, "transmit");
    assert_eq!(dst, BROADCAST, "the transmit frame's destination");
    assert_eq!(
        payload,
        TX_PAYLOAD,
        "transmit payload {:?}",
        String::from_utf8_lossy(&payload)
    );
}

/// A payload of `len` bytes that differs from frame to frame (`seed`) and byte to byte.
fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

/// Sends `payload` to the guest.
fn inject(sock: &PacketSocket, payload: &[u8]) {
    sock.send(&test_frame(GUEST_MAC, HOST_MAC, payload))
        .expect("send a frame to the guest");
}

/// Waits for the guest's echo of `payload`, to the test's address, and compares it byte for
/// byte.
fn expect_echo(sock: &PacketSocket, ember: &mut Ember, payload: &[u8]) {
    let (dst, got) = guest_frame(sock, ember, GUEST_MAC, "echo");
    assert_eq!(dst, HOST_MAC, "the echo goes back to the sender");
    let mut want = ECHO_PREFIX.to_vec();
    want.extend_from_slice(payload);
    assert_eq!(got.len(), want.len(), "echo length");
    if let Some(at) = got.iter().zip(&want).position(|(g, w)| g != w) {
        panic!(
            "echo differs at payload byte {at}: got {:#04x}, want {:#04x}",
            got[at], want[at]
        );
    }
}

/// Sums a counter of group `group` over every line the metrics file holds.
fn metric_total(metrics: &Path, group: &str, field: &str) -> u64 {
    let text = std::fs::read_to_string(metrics).expect("read the metrics file");
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("a JSON metrics line");
            v[group][field]
                .as_u64()
                .unwrap_or_else(|| panic!("no {group}.{field} in {l}"))
        })
        .sum()
}

#[test]
fn probe_exchanges_frames_with_a_tap() {
    let Some(ns) = namespace_with_tap("frames") else {
        return;
    };
    let dir = Scratch::new("net-frames");
    let metrics = dir.path("metrics.json");
    let config = dir.write(
        "vm.json",
        net_config(
            "probe.net=1 probe.net.echo=2",
            Some(GUEST_MAC_TEXT),
            Some(&metrics),
        ),
    );
    // Open before ember starts, so the guest's first frame cannot be missed.
    let sock = ns.packet_socket("tap0").expect("packet socket on tap0");
    let mut ember = Ember::spawn(
        &ns,
        &["--no-api", "--config-file", config.to_str().unwrap()],
    );
    expect_tx_frame(&sock, &mut ember, GUEST_MAC);
    // Both at once: the second waits in the guest's receive queue while it answers the
    // first. 1400 bytes do not fit one of the probe's 1 KiB receive buffers, so the device
    // must merge two.
    let small = payload(60, 1);
    let large = payload(1400, 2);
    inject(&sock, &small);
    inject(&sock, &large);
    expect_echo(&sock, &mut ember, &small);
    expect_echo(&sock, &mut ember, &large);

    let r = ember.finish();
    r.assert_probe_passed(expected_checks(2, 0));
    for line in [
        "PROBE virtio ok blk=0 net=1".to_owned(),
        format!("PROBE net.init ok mac={GUEST_MAC_TEXT} link=1"),
        "PROBE net.tx ok".to_owned(),
        "PROBE net.echo ok n=1 len=60 bufs=1".to_owned(),
        "PROBE net.echo ok n=2 len=1400 bufs=2".to_owned(),
    ] {
        assert!(
            r.stdout.lines().any(|l| l == line),
            "no {line:?}:\n{}",
            r.stdout
        );
    }
    // The frames are counted on the interface: the transmit frame and two echoes out, two
    // frames in; and in the sum over interfaces.
    let tx = metric_total(&metrics, "net_eth0", "tx_packets_count");
    let rx = metric_total(&metrics, "net_eth0", "rx_packets_count");
    assert!(tx >= 3, "net_eth0.tx_packets_count = {tx}");
    assert!(rx >= 2, "net_eth0.rx_packets_count = {rx}");
    assert_eq!(metric_total(&metrics, "net", "tx_packets_count"), tx);
    assert_eq!(metric_total(&metrics, "net", "rx_packets_count"), rx);
    assert_eq!(metric_total(&metrics, "net_eth0", "tx_malformed_frames"), 0);
}

#[test]
fn burst_of_frames_all_arrive() {
    const BURST: usize = 200;
    let Some(ns) = namespace_with_tap("burst") else {
        return;
    };
    let dir = Scratch::new("net-burst");
    let config = dir.write(
        "vm.json",
        net_config(
            &format!("probe.net=1 probe.net.echo=0 probe.net.burst={BURST}"),
            Some(GUEST_MAC_TEXT),
            None,
        ),
    );
    let sock = ns.packet_socket("tap0").expect("packet socket on tap0");
    let mut ember = Ember::spawn(
        &ns,
        &["--no-api", "--config-file", config.to_str().unwrap()],
    );
    expect_tx_frame(&sock, &mut ember, GUEST_MAC);
    for i in 1..=BURST {
        let (dst, payload) = guest_frame(&sock, &mut ember, GUEST_MAC, &format!("burst frame {i}"));
        assert_eq!(dst, BROADCAST, "burst frame {i}'s destination");
        let text = String::from_utf8(payload.clone())
            .unwrap_or_else(|_| panic!("burst frame {i} is not text: {payload:02x?}"));
        assert_eq!(
            text,
            format!("{BURST_PREFIX}{i}"),
            "frame {i} of the burst (lost or out of order?)"
        );
    }
    let r = ember.finish();
    r.assert_probe_passed(expected_checks(0, BURST));
    assert!(
        r.stdout
            .lines()
            .any(|l| l == format!("PROBE net.burst ok sent={BURST}")),
        "{}",
        r.stdout
    );
    // Nothing more: no frame was sent twice.
    if let Some(extra) = sock.receive(Duration::from_millis(200)) {
        panic!("a frame after the burst: {extra:02x?}");
    }
}

#[test]
fn a_tap_deleted_and_recreated_under_a_running_guest() {
    let Some(ns) = namespace_with_tap("reattach") else {
        return;
    };
    let dir = Scratch::new("net-reattach");
    let config = dir.write(
        "vm.json",
        net_config("probe.net=1 probe.net.echo=2", Some(GUEST_MAC_TEXT), None),
    );
    let sock = ns.packet_socket("tap0").expect("packet socket on tap0");
    let mut ember = Ember::spawn(
        &ns,
        &["--no-api", "--config-file", config.to_str().unwrap()],
    );
    expect_tx_frame(&sock, &mut ember, GUEST_MAC);
    let first = payload(100, 3);
    inject(&sock, &first);
    expect_echo(&sock, &mut ember, &first);

    // The guest now waits (about 13 s) for its second frame.
    ns.delete_link("tap0").expect("delete tap0");
    drop(sock);
    let gone = ember.log.wait_for("TAP tap0 is gone", WAIT);
    assert!(gone.contains("\"eth0\""), "{gone}");
    assert!(ember.running(), "ember exited when its TAP went away");

    ns.add_tap("tap0").expect("create tap0 again");
    // The old socket was bound to the deleted interface.
    let sock = ns
        .packet_socket("tap0")
        .expect("packet socket on the new tap0");
    // ember looks for the TAP every second.
    ember.log.wait_for("TAP tap0 is back", WAIT);
    // ember reads what the new TAP holds once as it takes it back. Let that pass first, so
    // the frame shows that ember watches the new TAP rather than that it looked at it once.
    std::thread::sleep(Duration::from_millis(300));
    let second = payload(200, 4);
    inject(&sock, &second);
    expect_echo(&sock, &mut ember, &second);

    let r = ember.finish();
    r.assert_probe_passed(expected_checks(2, 0));
    assert!(
        r.stdout
            .lines()
            .any(|l| l == "PROBE net.echo ok n=2 len=200 bufs=1"),
        "{}",
        r.stdout
    );
    // The new TAP must be watched, not just read once when it came back.
    assert!(!r.stderr.contains("cannot watch"), "{}", r.stderr);
}

/// The MAC the probe reports in `net.init` for a boot without `guest_mac` and `--id id`,
/// checked against the source of the frame it sent.
fn generated_mac(ns: &TestNetns, dir: &Scratch, id: &str) -> [u8; 6] {
    let config = dir.write(
        "vm.json",
        net_config("probe.net=1 probe.net.echo=0", None, None),
    );
    let sock = ns.packet_socket("tap0").expect("packet socket on tap0");
    let ember = Ember::spawn(
        ns,
        &[
            "--no-api",
            "--config-file",
            config.to_str().unwrap(),
            "--id",
            id,
        ],
    );
    let frame = sock.receive(WAIT).expect("the guest's transmit frame");
    let r = ember.finish();
    r.assert_probe_passed(expected_checks(0, 0));
    let line = r
        .line_starting("PROBE net.init ok mac=")
        .unwrap_or_else(|| panic!("no net.init line:\n{}", r.stdout));
    let text = line
        .strip_prefix("PROBE net.init ok mac=")
        .and_then(|rest| rest.strip_suffix(" link=1"))
        .unwrap_or_else(|| panic!("{line:?}"));
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap_or_else(|_| panic!("{line:?}")))
        .collect();
    let mac: [u8; 6] = bytes.try_into().unwrap_or_else(|_| panic!("{line:?}"));
    assert_eq!(frame[6..12], mac, "the frame's source is the reported MAC");
    mac
}

#[test]
fn guest_mac_is_generated_when_none_is_given() {
    let Some(ns) = namespace_with_tap("mac") else {
        return;
    };
    let dir = Scratch::new("net-mac");
    let first = generated_mac(&ns, &dir, "vm-mac-test");
    // Locally administered (bit 1) and unicast (bit 0 clear).
    assert_eq!(first[0] & 3, 2, "{first:02x?}");
    let again = generated_mac(&ns, &dir, "vm-mac-test");
    assert_eq!(first, again, "the same VM id must get the same MAC");
    let other = generated_mac(&ns, &dir, "vm-mac-other");
    assert_ne!(first, other, "another VM id should get another MAC");
    assert_eq!(other[0] & 3, 2, "{other:02x?}");
}

/// Waits until ember serves the API at `sock`.
fn wait_for_api(ember: &mut Ember, sock: &Path) {
    let start = Instant::now();
    while UnixStream::connect(sock).is_err() {
        assert!(ember.running(), "ember exited before serving the API");
        assert!(start.elapsed() < WAIT, "the API socket never appeared");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Also the whole-VMM run under the default seccomp filters: API requests before and after
/// the start, block and net I/O, a drive's backing file swapped, pause and resume, metrics
/// flushed, and no thread ever trapped.
#[test]
fn api_attaches_an_interface_and_patch_updates_its_limits() {
    let Some(ns) = namespace_with_tap("api") else {
        return;
    };
    let dir = Scratch::new("net-api");
    let api_sock: PathBuf = dir.path("api.sock");
    let metrics = dir.path("metrics.json");
    let root = disk_image(&dir, "root.img", 0, 64);
    let swapped = disk_image(&dir, "swapped.img", 0, 128);
    let mut ember = Ember::spawn(
        &ns,
        &[
            "--api-sock",
            api_sock.to_str().unwrap(),
            "--metrics-path",
            metrics.to_str().unwrap(),
        ],
    );
    wait_for_api(&mut ember, &api_sock);
    let mut api = ApiClient::connect(&api_sock);
    for (method, path, body) in [
        (
            "PUT",
            "/drives/rootfs",
            serde_json::json!({"drive_id": "rootfs", "path_on_host": root,
                "is_root_device": true, "is_read_only": false})
            .to_string(),
        ),
        (
            "PUT",
            "/network-interfaces/eth0",
            format!(
                r#"{{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "{GUEST_MAC_TEXT}"}}"#
            ),
        ),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 1, "mem_size_mib": 128}"#.to_owned(),
        ),
        (
            "PUT",
            "/boot-source",
            boot_source(
                "probe.blk=1 probe.blk0.id=rootfs probe.net=1 probe.net.echo=1 probe.wait=serial",
                1,
                128,
            ),
        ),
    ] {
        let r = api.call(method, path, Some(&body));
        assert_eq!(r.status, 204, "{method} {path}: {r:?}");
    }
    let sock = ns.packet_socket("tap0").expect("packet socket on tap0");
    let r = api.call(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    );
    assert_eq!(r.status, 204, "{r:?}");

    expect_tx_frame(&sock, &mut ember, GUEST_MAC);
    let data = payload(300, 5);
    inject(&sock, &data);
    expect_echo(&sock, &mut ember, &data);
    let done = ember.console.wait_for("PROBE DONE", WAIT);
    assert_eq!(
        done,
        format!(
            "PROBE DONE pass={} fail=0",
            expected_checks(1, 0) + PROBE_CHECKS_PER_BLOCK_DEVICE
        ),
        "{}",
        ember.console.seen.join("\n")
    );

    // The guest now waits for a serial byte: the VM is running, so PATCH applies.
    let r = api.call(
        "PATCH",
        "/drives/rootfs",
        Some(&serde_json::json!({"drive_id": "rootfs", "path_on_host": swapped}).to_string()),
    );
    assert_eq!(r.status, 204, "{r:?}");
    for state in ["Paused", "Resumed"] {
        let r = api.call("PATCH", "/vm", Some(&format!(r#"{{"state": "{state}"}}"#)));
        assert_eq!(r.status, 204, "{state}: {r:?}");
    }
    let limiter = r#"{"bandwidth": {"size": 1048576, "refill_time": 100}, "ops": {"size": 1000, "refill_time": 1000}}"#;
    let r = api.call(
        "PATCH",
        "/network-interfaces/eth0",
        Some(&format!(
            r#"{{"iface_id": "eth0", "tx_rate_limiter": {limiter}}}"#
        )),
    );
    assert_eq!(r.status, 204, "{r:?}");
    let r = api.call("GET", "/vm/config", None);
    assert_eq!(r.status, 200, "{r:?}");
    let config = r.json();
    let iface = &config["network-interfaces"][0];
    assert_eq!(iface["iface_id"], "eth0", "{config}");
    assert_eq!(iface["guest_mac"], GUEST_MAC_TEXT, "{config}");
    assert_eq!(
        iface["tx_rate_limiter"],
        serde_json::from_str::<serde_json::Value>(limiter).unwrap(),
        "{config}"
    );
    // Not configured: shown as null, as every optional field of GET /vm/config is.
    assert!(iface["rx_rate_limiter"].is_null(), "{config}");
    api.expect_fault(
        "PATCH",
        "/network-interfaces/eth9",
        &format!(r#"{{"iface_id": "eth9", "tx_rate_limiter": {limiter}}}"#),
        "eth9",
    );

    let r = api.call(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "FlushMetrics"}"#),
    );
    assert_eq!(r.status, 204, "{r:?}");

    ember.send_console(b"Z");
    ember.console.wait_for("PROBE GOT 0x5a", WAIT);
    drop(api);
    let r = ember.finish();
    assert_eq!(r.code(), Some(0), "{r:#?}");
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    assert!(!r.stderr.contains("seccomp: the"), "{}", r.stderr);
    assert!(
        r.stderr.contains("drive \"rootfs\": now backed by"),
        "{}",
        r.stderr
    );
    let flushed = std::fs::read_to_string(&metrics).expect("metrics file");
    let lines: Vec<serde_json::Value> = flushed
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert!(lines.len() >= 2, "{flushed}");
    for l in &lines {
        assert_eq!(l["seccomp"]["num_faults"], 0, "{flushed}");
    }
}
