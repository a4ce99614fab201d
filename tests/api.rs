//! The REST API end to end: the real binary, the real socket, real HTTP clients (a Rust
//! client and curl), and the probe guest booted through the API only.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::api::*;
use common::*;

#[test]
fn firecracker_client_flow_boots_the_probe() {
    let mut vm = ApiVm::start(&[]);
    let mut c = vm.client();
    let info = c.call("GET", "/", None);
    assert_eq!(info.status, 200);
    assert_eq!(info.json()["state"], "Not started");
    assert_eq!(info.json()["app_name"], "ember");
    assert_eq!(info.json()["id"], "anonymous-instance");
    let version = c.call("GET", "/version", None).json();
    assert_eq!(
        version["firecracker_version"],
        ember::version::FIRECRACKER_API_VERSION
    );
    assert_eq!(version["ember_version"], env!("CARGO_PKG_VERSION"));
    // Before any configuration every section is there, as null, empty or defaults.
    let empty = c.call("GET", "/vm/config", None).json();
    assert_eq!(
        empty,
        serde_json::json!({
            "balloon": null, "drives": [], "cpu-config": null, "logger": null,
            "boot-source": {"kernel_image_path": "", "initrd_path": null, "boot_args": null},
            "machine-config": {"vcpu_count": 1, "mem_size_mib": 128, "smt": false,
                "track_dirty_pages": false, "huge_pages": "None"},
            "metrics": null, "memory-hotplug": null, "mmds-config": null,
            "network-interfaces": [], "pmem": [], "vsock": null, "entropy": null,
        })
    );

    let drive_path = disk_image(&vm.dir, "disk.img", 0, 2048);
    let steps = [
        ("PUT", "/boot-source".to_owned(), boot_source("probe.blk=1 probe.blk0.id=rootfs", 2, 256)),
        ("PUT", "/machine-config".to_owned(), r#"{"vcpu_count": 2, "mem_size_mib": 256, "smt": false}"#.to_owned()),
        (
            "PUT",
            "/drives/rootfs".to_owned(),
            serde_json::json!({"drive_id": "rootfs", "path_on_host": drive_path, "is_root_device": true, "is_read_only": false}).to_string(),
        ),
    ];
    for (method, path, body) in &steps {
        let r = c.call(method, path, Some(body));
        assert_eq!(r.status, 204, "{method} {path}: {r:?}");
    }
    let config = c.call("GET", "/vm/config", None).json();
    assert_eq!(config["machine-config"]["vcpu_count"], 2);
    assert_eq!(config["machine-config"]["mem_size_mib"], 256);
    assert_eq!(config["drives"][0]["drive_id"], "rootfs");
    assert_eq!(config["drives"][0]["cache_type"], "Unsafe");
    let config = c.call("GET", "/vm/config", None).json();
    assert_eq!(config["network-interfaces"], serde_json::json!([]));
    assert_eq!(
        config["boot-source"]["boot_args"],
        probe_args(2, 256, "probe.blk=1 probe.blk0.id=rootfs")
    );
    let mc = c.call("GET", "/machine-config", None).json();
    assert_eq!(mc["vcpu_count"], 2);

    let r = c.call(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    );
    assert_eq!(r.status, 204, "{r:?}");
    // The drive is the guest's /dev/vda: the probe's block checks pass too.
    let lines = vm.wait_for_line("PROBE DONE");
    assert!(
        lines.contains(&format!(
            "PROBE DONE pass={} fail=0",
            PROBE_CHECKS + 1 + PROBE_CHECKS_PER_BLOCK_DEVICE
        )),
        "{lines:#?}"
    );
    // The probe resets the VM; ember exits 0 and removes its socket.
    let sock = vm.sock.clone();
    let (code, _, err) = vm.finish();
    assert_eq!(code, Some(0), "{err}");
    assert!(!sock.exists(), "the API socket is removed on exit");
}

#[test]
fn pause_and_resume_keep_the_guest_state() {
    let mut vm = ApiVm::start(&[]);
    boot_waiting_probe(&mut vm);
    let r = vm.call("PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert_eq!(r.status, 204, "{r:?}");
    assert_eq!(vm.call("GET", "/", None).json()["state"], "Paused");
    // A byte sent while paused waits in the UART: the paused guest cannot read it.
    vm.send_console(b"Z");
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(vm.call("GET", "/", None).json()["state"], "Paused");
    assert!(
        vm.child.try_wait().unwrap().is_none(),
        "ember exited while paused"
    );
    let r = vm.call("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#));
    assert_eq!(r.status, 204, "{r:?}");
    // Resumed where it was: still polling the serial port, it now sees the byte.
    let lines = vm.wait_for_line("PROBE GOT");
    assert_eq!(lines.last().unwrap(), "PROBE GOT 0x5a");
    let (code, _, err) = vm.finish();
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("microVM paused") && err.contains("microVM resumed"),
        "{err}"
    );
}

#[test]
fn pre_and_post_boot_rules() {
    let mut vm = ApiVm::start(&[]);
    let mut c = vm.client();
    for (method, path, body, what) in [
        (
            "PATCH",
            "/vm",
            r#"{"state": "Paused"}"#,
            "PATCH /vm is only allowed after",
        ),
        (
            "PUT",
            "/actions",
            r#"{"action_type": "SendCtrlAltDel"}"#,
            "SendCtrlAltDel is only allowed after",
        ),
        (
            "PATCH",
            "/drives/a",
            r#"{"drive_id": "a"}"#,
            "PATCH /drives is only allowed after",
        ),
        (
            "PATCH",
            "/network-interfaces/a",
            r#"{"iface_id": "a"}"#,
            "PATCH /network-interfaces is only allowed after",
        ),
        (
            "PUT",
            "/actions",
            r#"{"action_type": "InstanceStart"}"#,
            "no boot source",
        ),
        (
            "PUT",
            "/actions",
            r#"{"action_type": "FlushMetrics"}"#,
            "PUT /metrics first",
        ),
    ] {
        c.expect_fault(method, path, body, what);
    }
    drop(c);
    boot_waiting_probe(&mut vm);
    let mut c = vm.client();
    for (method, path, body, what) in [
        (
            "PUT",
            "/boot-source",
            boot_source("", 1, 128),
            "PUT /boot-source is only allowed before",
        ),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 1, "mem_size_mib": 128}"#.into(),
            "only allowed before",
        ),
        (
            "PATCH",
            "/machine-config",
            r#"{"vcpu_count": 1}"#.into(),
            "only allowed before",
        ),
        (
            "PUT",
            "/drives/a",
            r#"{"drive_id": "a", "is_root_device": false, "path_on_host": "/x"}"#.into(),
            "only allowed before",
        ),
        // The running vmm thread may not open files (seccomp), as in Firecracker.
        (
            "PUT",
            "/logger",
            r#"{"log_path": "/tmp/ember-late.log"}"#.into(),
            "PUT /logger is only allowed before",
        ),
        (
            "PUT",
            "/metrics",
            r#"{"metrics_path": "/tmp/ember-late.metrics"}"#.into(),
            "PUT /metrics is only allowed before",
        ),
        (
            "PUT",
            "/actions",
            r#"{"action_type": "InstanceStart"}"#.into(),
            "InstanceStart is only allowed before",
        ),
    ] {
        c.expect_fault(method, path, &body, what);
    }
    // SendCtrlAltDel reaches the i8042 (this probe does not read its keyboard; the counter
    // shows it; send_ctrl_alt_del_reaches_the_guest_keyboard checks the guest's side).
    let r = c.call(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "SendCtrlAltDel"}"#),
    );
    assert_eq!(r.status, 204, "{r:?}");
    let prom = c.call("GET", "/metrics/prometheus", None);
    assert!(
        prom.body.contains("\nember_i8042_ctrl_alt_del_count 1\n"),
        "{}",
        prom.body
    );
    assert_eq!(c.call("GET", "/", None).json()["state"], "Running");
    drop(c);
    let (code, _, _) = vm.terminate();
    assert_eq!(code, Some(143));
}

#[test]
fn metrics_flush_and_prometheus() {
    let vm = ApiVm::start(&["--id", "metrics-vm"]);
    let metrics = vm.dir.path("metrics.json");
    let mut c = vm.client();
    let r = c.call(
        "PUT",
        "/metrics",
        Some(&serde_json::json!({"metrics_path": metrics, "emit_id": true}).to_string()),
    );
    assert_eq!(r.status, 204, "{r:?}");
    let again = c.call(
        "PUT",
        "/metrics",
        Some(&serde_json::json!({"metrics_path": metrics}).to_string()),
    );
    assert_eq!(again.status, 400);
    assert!(again.fault().contains("already initialized"));
    c.call("GET", "/", None);
    c.call("PUT", "/boot-source", Some("{\"kernel_image_path\": 3}"));
    let r = c.call(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "FlushMetrics"}"#),
    );
    assert_eq!(r.status, 204, "{r:?}");
    let text = std::fs::read_to_string(&metrics).unwrap();
    let line: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(line["id"], "metrics-vm");
    assert_eq!(line["get_api_requests"]["instance_info_count"], 1);
    assert_eq!(line["put_api_requests"]["metrics_count"], 2);
    assert_eq!(line["put_api_requests"]["metrics_fails"], 1);
    assert_eq!(line["put_api_requests"]["actions_count"], 1);
    for group in [
        "vcpu",
        "block",
        "net",
        "seccomp",
        "signals",
        "latencies_us",
        "uart",
        "api_server",
    ] {
        assert!(line[group].is_object(), "{group} missing: {line}");
    }
    assert!(
        line["api_server"]["process_startup_time_us"]
            .as_u64()
            .unwrap()
            > 0
    );
    // A body that failed to parse never reached the VMM: it is not a boot_source request.
    assert_eq!(line["put_api_requests"]["boot_source_count"], 0);

    let prom = c.call("GET", "/metrics/prometheus", None);
    assert_eq!(prom.status, 200);
    assert!(
        prom.header("content-type")
            .unwrap()
            .starts_with("text/plain")
    );
    assert!(prom.body.contains("# TYPE ember_put_api_requests_actions_count counter\nember_put_api_requests_actions_count 1\n"), "{}", prom.body);
    drop(c);
    let (code, _, _) = vm.terminate();
    assert_eq!(code, Some(143));
}

/// The VM's configuration, to check a bad request left it unchanged.
fn snapshot(vm: &ApiVm) -> serde_json::Value {
    let r = vm.call("GET", "/vm/config", None);
    assert_eq!(r.status, 200);
    r.json()
}

#[test]
fn bad_requests_get_400_and_change_nothing() {
    let vm = ApiVm::start(&[]);
    let mut c = vm.client();
    c.call(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 2, "mem_size_mib": 256}"#),
    );
    let before = snapshot(&vm);
    let cases: &[(&str, &str, &str, &str)] = &[
        (
            "PUT",
            "/machine-config",
            "{\"vcpu_count\": 2,",
            "EOF while parsing",
        ),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": "two", "mem_size_mib": 128}"#,
            "invalid type: string \"two\"",
        ),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 2, "mem_size_mib": 128, "cpus": 1}"#,
            "unknown field `cpus`",
        ),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 2}"#,
            "missing field `mem_size_mib`",
        ),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 0, "mem_size_mib": 128}"#,
            "vcpu_count must be between 1 and 32, got 0",
        ),
        (
            "PATCH",
            "/machine-config",
            r#"{"vcpu_count": 33}"#,
            "got 33",
        ),
        ("PUT", "/boot-source", "", "the request has no body"),
        (
            "PUT",
            "/boot-source",
            r#"{"kernel_image_path": "/nonexistent/vmlinux"}"#,
            "cannot open kernel image /nonexistent/vmlinux",
        ),
        (
            "PUT",
            "/boot-source",
            r#"{"kernel_image_path": "/tmp"}"#,
            "kernel image /tmp is a directory, not a regular file",
        ),
        (
            "PUT",
            "/drives/data",
            r#"{"drive_id": "data", "is_root_device": false, "path_on_host": "/nonexistent/disk"}"#,
            "drive \"data\": cannot open backing file /nonexistent/disk",
        ),
        (
            "PUT",
            "/drives/root",
            r#"{"drive_id": "other", "is_root_device": true, "path_on_host": "/x"}"#,
            "differs from the id in the body",
        ),
        (
            "PUT",
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth1", "host_dev_name": "tap0"}"#,
            "differs from the id in the body",
        ),
        (
            "PUT",
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "zz"}"#,
            "not a MAC address",
        ),
        (
            "PUT",
            "/actions",
            r#"{"action_type": "Reboot"}"#,
            "unknown action_type",
        ),
        (
            "GET",
            "/nowhere",
            "",
            "invalid request method and/or path: GET /nowhere",
        ),
        (
            "PUT",
            "/balloon",
            r#"{"amount_mib": 1}"#,
            "not supported by ember yet",
        ),
        ("PUT", "/vsock", r#"{}"#, "missing field `guest_cid`"),
        (
            "PUT",
            "/vsock",
            r#"{"guest_cid": 2, "uds_path": "/tmp/v.sock"}"#,
            "vsock.guest_cid must be 3 or more",
        ),
        (
            "PUT",
            "/entropy",
            r#"{"rate_limiter": {"ops": {"size": 5, "refill_time": 0}}}"#,
            "ops.refill_time must be greater than 0",
        ),
        ("PUT", "/entropy", r#"{"rate": 1}"#, "unknown field `rate`"),
        (
            "PUT",
            "/snapshot/create",
            r#"{}"#,
            "missing field `snapshot_path`",
        ),
        (
            "PUT",
            "/snapshot/create",
            r#"{"snapshot_path": "/s", "mem_file_path": "/m"}"#,
            "only allowed after the microVM starts",
        ),
        (
            "PUT",
            "/logger",
            r#"{"level": "Loud"}"#,
            "log level \"Loud\"",
        ),
    ];
    for (method, path, body, want) in cases {
        c.expect_fault(method, path, body, want);
    }
    // Unknown methods are refused too, on the same connection.
    for method in ["DELETE", "POST", "OPTIONS"] {
        let r = c.call(method, "/machine-config", None);
        assert_eq!(r.status, 400, "{method}");
        assert!(
            r.fault()
                .contains(&format!("HTTP method {method} is not supported"))
        );
    }
    assert_eq!(
        snapshot(&vm),
        before,
        "a refused request changed the configuration"
    );
    drop(c);
    vm.terminate();
}

#[test]
fn oversized_body_and_header() {
    let vm = ApiVm::start(&["--http-api-max-payload-size", "1000"]);
    let mut c = vm.client();
    let big = format!("{{\"kernel_image_path\": \"{}\"}}", "a".repeat(1000));
    let r = c.call("PUT", "/boot-source", Some(&big));
    assert_eq!(r.status, 413, "{r:?}");
    assert!(
        r.fault().contains("larger than the limit of 1000 bytes"),
        "{}",
        r.fault()
    );
    assert_eq!(r.header("connection"), Some("close"));

    let mut c = vm.client();
    let head = format!("GET / HTTP/1.1\r\nX-Long: {}\r\n\r\n", "h".repeat(9000));
    c.send_raw(head.as_bytes());
    let r = c.read();
    assert_eq!(r.status, 400);
    assert!(
        r.fault().contains("request head is larger than 8192 bytes"),
        "{}",
        r.fault()
    );

    let mut c = vm.client();
    c.send_raw(
        b"PUT /boot-source HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    );
    let r = c.read();
    assert_eq!(r.status, 400);
    assert!(r.fault().contains("chunked"), "{}", r.fault());

    let mut c = vm.client();
    c.send_raw(b"\x16\x03\x01 garbage\r\n\r\n");
    assert_eq!(c.read().status, 400);
    // The server is still fine.
    assert_eq!(vm.call("GET", "/", None).status, 200);
    vm.terminate();
}

#[test]
fn split_writes_silent_and_vanishing_clients() {
    let vm = ApiVm::start(&[]);
    // A request dribbled out a few bytes at a time.
    let mut slow = vm.client();
    let bytes = request_bytes(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 3, "mem_size_mib": 192}"#),
    );
    for chunk in bytes.chunks(3) {
        slow.send_raw(chunk);
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(slow.read().status, 204);
    // A client that connects and says nothing, and one that leaves mid-request.
    let _silent = UnixStream::connect(&vm.sock).unwrap();
    {
        let mut gone = UnixStream::connect(&vm.sock).unwrap();
        gone.write_all(b"PUT /machine-config HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"vcpu")
            .unwrap();
    }
    // Others are served at once, and the half request changed nothing.
    let t = Instant::now();
    let mc = vm.call("GET", "/machine-config", None).json();
    assert!(t.elapsed() < Duration::from_secs(2));
    assert_eq!(
        (mc["vcpu_count"].as_u64(), mc["mem_size_mib"].as_u64()),
        (Some(3), Some(192))
    );

    // A request that stalls is answered with 408 after the request timeout.
    let mut stalled = vm.client();
    stalled.send_raw(b"GET / HTTP/1.1\r\nHost: x\r\n");
    let r = stalled.read();
    assert_eq!(r.status, 408, "{r:?}");
    assert!(r.fault().contains("did not arrive within 5 s"));
    vm.terminate();
}

#[test]
fn keep_alive_pipelining_and_many_clients() {
    let vm = ApiVm::start(&[]);
    // 1000 requests on one connection, all written before any answer is read.
    let mut c = vm.client();
    let mut batch = Vec::new();
    for i in 0..1000 {
        if i % 2 == 0 {
            batch.extend(request_bytes("GET", "/", None));
        } else {
            batch.extend(request_bytes(
                "PATCH",
                "/machine-config",
                Some(&format!("{{\"mem_size_mib\": {}}}", 128 + i)),
            ));
        }
    }
    let writer = {
        let mut s = c.stream().try_clone().unwrap();
        std::thread::spawn(move || s.write_all(&batch).unwrap())
    };
    for i in 0..1000 {
        let r = c.read();
        let want = if i % 2 == 0 { 200 } else { 204 };
        assert_eq!(r.status, want, "request {i}: {r:?}");
    }
    writer.join().unwrap();
    assert_eq!(
        c.call("GET", "/machine-config", None).json()["mem_size_mib"],
        128 + 999
    );

    // 64 clients at once, each with a few requests.
    let sock = vm.sock.clone();
    let clients: Vec<_> = (0..64)
        .map(|_| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let mut c = ApiClient::connect(&sock);
                for _ in 0..5 {
                    let r = c.call("GET", "/", None);
                    assert_eq!(r.status, 200);
                    assert_eq!(r.json()["state"], "Not started");
                }
            })
        })
        .collect();
    for t in clients {
        t.join().expect("client thread");
    }
    assert_eq!(vm.call("GET", "/", None).status, 200);
    vm.terminate();
}

#[test]
fn connection_close_and_http10() {
    let vm = ApiVm::start(&[]);
    let mut s = UnixStream::connect(&vm.sock).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut all = String::new();
    s.read_to_string(&mut all).unwrap();
    assert!(
        all.starts_with("HTTP/1.1 200 OK\r\n") && all.contains("Connection: close"),
        "{all}"
    );
    vm.terminate();
}

#[test]
fn socket_in_use_and_stale_socket() {
    let vm = ApiVm::start(&[]);
    let sock = vm.sock.to_str().unwrap().to_owned();
    let r = run_ember(&["--api-sock", &sock]);
    assert_eq!(r.code(), Some(4), "{r:?}");
    assert!(
        r.stderr.contains("is in use by another process"),
        "{}",
        r.stderr
    );
    assert_eq!(
        vm.call("GET", "/", None).status,
        200,
        "the first ember still serves"
    );
    vm.terminate();

    // A socket file nobody listens on is replaced.
    let dir = Scratch::new("stale");
    let stale = dir.path("api.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let vm = ApiVm::start_at(dir, stale, &[]);
    assert_eq!(vm.call("GET", "/", None).status, 200);
    vm.terminate();
}

fn curl(sock: &std::path::Path, args: &[&str]) -> (String, String) {
    let out = std::process::Command::new("curl")
        .args([
            "--silent",
            "--show-error",
            "--unix-socket",
            sock.to_str().unwrap(),
        ])
        .args(["--write-out", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (body.to_owned(), code.to_owned())
}

#[test]
fn curl_sequence_from_the_readme() {
    if std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_err()
    {
        cannot_run("curl is not installed");
        return;
    }
    let mut vm = ApiVm::start(&[]);
    let sock = vm.sock.clone();
    // A body over 1 KiB makes curl ask for 100 Continue; the server must answer it at once.
    let long_args = probe_args(1, 128, &format!("pad={}", "p".repeat(1500)));
    let boot =
        serde_json::json!({"kernel_image_path": probe_elf(), "boot_args": long_args}).to_string();
    let t = Instant::now();
    let (_, code) = curl(
        &sock,
        &[
            "-X",
            "PUT",
            "http://localhost/boot-source",
            "-H",
            "Content-Type: application/json",
            "-d",
            &boot,
        ],
    );
    assert_eq!(code, "204");
    assert!(
        t.elapsed() < Duration::from_millis(900),
        "curl waited for 100 Continue"
    );
    let (_, code) = curl(
        &sock,
        &[
            "-X",
            "PUT",
            "http://localhost/machine-config",
            "-d",
            r#"{"vcpu_count": 1, "mem_size_mib": 128}"#,
        ],
    );
    assert_eq!(code, "204");
    let (body, code) = curl(&sock, &["http://localhost/machine-config"]);
    assert_eq!(code, "200");
    assert!(body.contains("\"mem_size_mib\":128"), "{body}");
    let (body, code) = curl(
        &sock,
        &["-X", "PUT", "http://localhost/machine-config", "-d", "{"],
    );
    assert_eq!(code, "400");
    assert!(body.contains("fault_message"), "{body}");
    let (_, code) = curl(
        &sock,
        &[
            "-X",
            "PUT",
            "http://localhost/actions",
            "-d",
            r#"{"action_type": "InstanceStart"}"#,
        ],
    );
    assert_eq!(code, "204");
    let lines = vm.wait_for_line("PROBE DONE");
    assert!(
        lines.contains(&format!("PROBE DONE pass={PROBE_CHECKS} fail=0")),
        "{lines:#?}"
    );
    let (code, _, err) = vm.finish();
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn config_file_and_api_together() {
    // --config-file with the API boots at once and still serves requests.
    let dir = Scratch::new("cfg-api");
    let config = dir.write(
        "vm.json",
        config_json(
            &probe_elf(),
            1,
            128,
            &probe_args(1, 128, "probe.wait=serial"),
        ),
    );
    let mut vm = ApiVm::start(&["--config-file", config.to_str().unwrap()]);
    vm.wait_for_line("PROBE DONE");
    assert_eq!(vm.call("GET", "/", None).json()["state"], "Running");
    let cfg = vm.call("GET", "/vm/config", None).json();
    assert_eq!(
        cfg["boot-source"]["kernel_image_path"],
        probe_elf().to_str().unwrap()
    );
    vm.send_console(b"q");
    let (code, _, err) = vm.finish();
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn logger_and_metrics_path_flag() {
    let dir = Scratch::new("logger");
    let metrics = dir.path("metrics.fifo-or-file");
    let vm = ApiVm::start(&["--metrics-path", metrics.to_str().unwrap()]);
    let log = dir.path("ember.log");
    let r = vm.call(
        "PUT",
        "/logger",
        Some(
            &serde_json::json!({"log_path": log, "level": "Debug", "show_level": true}).to_string(),
        ),
    );
    assert_eq!(r.status, 204, "{r:?}");
    // Later records go to the file, with the level shown.
    let r = vm.call(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 64}"#),
    );
    assert_eq!(r.status, 204);
    let r = vm.call(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "FlushMetrics"}"#),
    );
    assert_eq!(r.status, 204, "metrics from --metrics-path: {r:?}");
    let line: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(&metrics)
            .unwrap()
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(line["put_api_requests"]["logger_count"], 1);
    assert_eq!(line["put_api_requests"]["machine_cfg_count"], 1);
    let (code, _, _) = vm.terminate();
    assert_eq!(code, Some(143));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains(":Info] received signal 15"), "{text}");
    // The final flush on exit counted the signal.
    let last: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(&metrics)
            .unwrap()
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(last["signals"]["sigterm"], 1);
}

#[test]
fn vm_prepared_ahead_of_instance_start() {
    let mut vm = ApiVm::start(&["--level", "Debug"]);
    // Left idle, ember prepares a VM for the default memory size.
    vm.wait_for_log("prepared a VM with 128 MiB of memory ahead of start");
    let mut c = vm.client();
    // vCPUs are made at start, so changing them keeps the prepared VM.
    assert_eq!(
        c.call("PATCH", "/machine-config", Some(r#"{"vcpu_count": 2}"#))
            .status,
        204
    );
    assert_eq!(
        c.call("PUT", "/boot-source", Some(&boot_source("", 2, 128)))
            .status,
        204
    );
    assert_eq!(
        c.call(
            "PUT",
            "/actions",
            Some(r#"{"action_type": "InstanceStart"}"#)
        )
        .status,
        204
    );
    let lines = vm.wait_for_line("PROBE DONE");
    assert!(
        lines.contains(&format!("PROBE DONE pass={PROBE_CHECKS} fail=0")),
        "{lines:#?}"
    );
    let (code, _, err) = vm.finish();
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("using the VM and memory prepared ahead of start"),
        "{err}"
    );
}

#[test]
fn patch_drive_after_boot_swaps_the_backing_file() {
    let mut vm = ApiVm::start(&[]);
    let first = disk_image(&vm.dir, "first.img", 0, 64);
    let second = vm.dir.write("second.img", vec![0u8; 128 * 512]);
    let mut c = vm.client();
    let drive =
        serde_json::json!({"drive_id": "data", "path_on_host": first, "is_root_device": false});
    assert_eq!(
        c.call("PUT", "/drives/data", Some(&drive.to_string()))
            .status,
        204
    );
    drop(c);
    boot_waiting_probe_with(
        &mut vm,
        "probe.blk=1",
        PROBE_CHECKS + 1 + PROBE_CHECKS_PER_BLOCK_DEVICE,
    );
    let mut c = vm.client();
    let patch = serde_json::json!({"drive_id": "data", "path_on_host": second});
    let r = c.call("PATCH", "/drives/data", Some(&patch.to_string()));
    assert_eq!(r.status, 204, "{r:?}");
    let config = c.call("GET", "/vm/config", None).json();
    assert_eq!(
        config["drives"][0]["path_on_host"],
        second.to_str().unwrap()
    );
    // Rate limits: the bucket given replaces, the other one stays.
    for limits in [
        serde_json::json!({"ops": {"size": 100, "refill_time": 1000}}),
        serde_json::json!({"bandwidth": {"size": 1048576, "refill_time": 100}}),
    ] {
        let body = serde_json::json!({"drive_id": "data", "rate_limiter": limits});
        let r = c.call("PATCH", "/drives/data", Some(&body.to_string()));
        assert_eq!(r.status, 204, "{r:?}");
    }
    let config = c.call("GET", "/vm/config", None).json();
    assert_eq!(config["drives"][0]["rate_limiter"]["ops"]["size"], 100);
    assert_eq!(
        config["drives"][0]["rate_limiter"]["bandwidth"]["size"],
        1048576
    );
    let zero_refill = serde_json::json!({"drive_id": "data", "rate_limiter": {"ops": {"size": 1, "refill_time": 0}}});
    let r = c.call("PATCH", "/drives/data", Some(&zero_refill.to_string()));
    assert_eq!(r.status, 400);
    assert!(r.fault().contains("refill_time"), "{}", r.fault());
    let bad = serde_json::json!({"drive_id": "data", "path_on_host": "/nonexistent/disk"});
    let r = c.call("PATCH", "/drives/data", Some(&bad.to_string()));
    assert_eq!(r.status, 400);
    assert!(
        r.fault()
            .contains("cannot open backing file /nonexistent/disk"),
        "{}",
        r.fault()
    );
    // With and without a new file (the API thread asks about the drive before opening).
    for body in [
        serde_json::json!({"drive_id": "other"}),
        serde_json::json!({"drive_id": "other", "path_on_host": second}),
    ] {
        let r = c.call("PATCH", "/drives/other", Some(&body.to_string()));
        assert_eq!(r.status, 400);
        assert!(
            r.fault().contains("drive \"other\" does not exist"),
            "{}",
            r.fault()
        );
    }
    drop(c);
    let (_, _, err) = vm.terminate();
    assert!(err.contains("drive \"data\": now backed by"), "{err}");
}

#[test]
fn send_ctrl_alt_del_reaches_the_guest_keyboard() {
    let mut vm = ApiVm::start(&[]);
    let mut c = vm.client();
    let r = c.call(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 2, "mem_size_mib": 256}"#),
    );
    assert_eq!(r.status, 204, "{r:?}");
    let r = c.call(
        "PUT",
        "/boot-source",
        Some(&boot_source("probe.wait=kbd", 2, 256)),
    );
    assert_eq!(r.status, 204, "{r:?}");
    let r = c.call(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    );
    assert_eq!(r.status, 204, "{r:?}");
    let lines = vm.wait_for_line("PROBE DONE");
    assert!(
        lines.contains(&format!("PROBE DONE pass={PROBE_CHECKS} fail=0")),
        "{lines:#?}"
    );
    // The probe now polls the i8042; the scancodes come only from this call.
    let r = c.call(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "SendCtrlAltDel"}"#),
    );
    assert_eq!(r.status, 204, "{r:?}");
    drop(c);
    let lines = vm.wait_for_line("PROBE KBD");
    assert_eq!(
        lines.last().unwrap(),
        "PROBE KBD 14 11 e0 71 e0 f0 71 f0 11 f0 14",
        "{lines:#?}"
    );
    // Having read them, the probe resets the VM: a clean exit.
    let (code, _, err) = vm.finish();
    assert_eq!(code, Some(0), "{err}");
}

/// Version-gated clients: `GET /version` names the Firecracker API version ember follows
/// (or the operator's choice) beside ember's own; `--version` answers as Firecracker only
/// when asked to.
#[test]
fn versions_answer_for_version_gated_clients() {
    let fc = ember::version::FIRECRACKER_API_VERSION;
    let own = run_ember(&["--version"]);
    assert_eq!(
        own.stdout.trim(),
        format!(
            "ember v{} (Firecracker API {fc})",
            env!("CARGO_PKG_VERSION")
        )
    );
    let compat = run_ember(&["--firecracker-compat-version", "--version"]);
    assert_eq!(compat.stdout.trim(), format!("Firecracker v{fc}"));
    let chosen = run_ember(&["--version", "--firecracker-compat-version", "1.10.1"]);
    assert_eq!(chosen.stdout.trim(), "Firecracker v1.10.1");
    assert_fails(
        &run_ember(&["--firecracker-compat-version", "ten", "--version"]),
        2,
        "\"ten\" is not a version",
    );

    let vm = ApiVm::start(&["--firecracker-compat-version", "1.10.1"]);
    let version = vm.call("GET", "/version", None).json();
    assert_eq!(version["firecracker_version"], "1.10.1");
    assert_eq!(version["ember_version"], env!("CARGO_PKG_VERSION"));
    let info = vm.call("GET", "/", None).json();
    assert_eq!(info["vmm_version"], env!("CARGO_PKG_VERSION"));
    let _ = vm.terminate();

    // Instance ids as Firecracker's launchers accept them.
    assert_fails(
        &run_ember(&["--id", "vm_1", "--version"]),
        2,
        "invalid character '_' at position 2",
    );
}

/// The metadata document through the API: `--metadata` starts it, PUT replaces it,
/// PATCH merges into it (null deletes), GET shows it; a document over `--mmds-size-limit`
/// is refused and changes nothing; `PUT /mmds/config` needs interfaces that exist, shows
/// in `GET /vm/config`, and is pre-boot only.
#[test]
fn mmds_document_and_configuration_through_the_api() {
    let dir = Scratch::new("mmds-api");
    let metadata = dir.write(
        "md.json",
        r#"{"latest": {"meta-data": {"ami-id": "ami-1"}}}"#,
    );
    let vm = ApiVm::start(&[
        "--metadata",
        metadata.to_str().unwrap(),
        "--mmds-size-limit",
        "200",
    ]);
    let ok = |method: &str, path: &str, body: &str| {
        let r = vm.call(method, path, Some(body));
        assert_eq!(r.status, 204, "{method} {path} {body}: {r:?}");
    };
    let refused = |method: &str, path: &str, body: &str, why: &str| {
        let r = vm.call(method, path, Some(body));
        assert_eq!(r.status, 400, "{method} {path} {body}: {r:?}");
        let fault = r.json()["fault_message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(
            fault.contains(why),
            "{method} {path}: {fault} lacks {why:?}"
        );
    };
    let get = || vm.call("GET", "/mmds", None).json();
    assert_eq!(
        get(),
        serde_json::json!({"latest": {"meta-data": {"ami-id": "ami-1"}}})
    );
    ok("PUT", "/mmds", r#"{"a": {"b": "c", "d": "e"}, "f": 1}"#);
    ok(
        "PATCH",
        "/mmds",
        r#"{"a": {"b": null, "x": "y"}, "g": [1, 2]}"#,
    );
    assert_eq!(
        get(),
        serde_json::json!({"a": {"d": "e", "x": "y"}, "f": 1, "g": [1, 2]})
    );
    let big = format!(r#"{{"blob": "{}"}}"#, "x".repeat(300));
    refused("PUT", "/mmds", &big, "limit of 200 bytes");
    refused("PATCH", "/mmds", &big, "limit of 200 bytes");
    refused("PUT", "/mmds", "[1]", "must be a JSON object");
    assert_eq!(get()["f"], 1, "a refused document changes nothing");

    refused(
        "PUT",
        "/mmds/config",
        r#"{"network_interfaces": ["eth0"]}"#,
        "network interface \"eth0\" does not exist",
    );
    refused(
        "PUT",
        "/mmds/config",
        r#"{"network_interfaces": []}"#,
        "at least one network interface",
    );
    let tap_free_iface = r#"{"iface_id": "eth0", "host_dev_name": "tap-mmds-api"}"#;
    ok("PUT", "/network-interfaces/eth0", tap_free_iface);
    refused(
        "PUT",
        "/mmds/config",
        r#"{"network_interfaces": ["eth0"], "ipv4_address": "10.0.0.1"}"#,
        "link-local",
    );
    refused(
        "PUT",
        "/mmds/config",
        r#"{"network_interfaces": ["eth0"], "version": "V3"}"#,
        "unknown variant",
    );
    ok(
        "PUT",
        "/mmds/config",
        r#"{"network_interfaces": ["eth0"], "version": "V2", "ipv4_address": "169.254.170.2"}"#,
    );
    ok(
        "PUT",
        "/entropy",
        r#"{"rate_limiter": {"bandwidth": {"size": 4096, "refill_time": 100}}}"#,
    );
    ok(
        "PUT",
        "/vsock",
        r#"{"vsock_id": "1", "guest_cid": 52, "uds_path": "/tmp/ember-test-v.sock"}"#,
    );
    let config = vm.call("GET", "/vm/config", None).json();
    assert_eq!(
        config["entropy"]["rate_limiter"]["bandwidth"]["size"], 4096,
        "{config}"
    );
    assert_eq!(config["vsock"]["guest_cid"], 52, "{config}");
    assert_eq!(config["vsock"]["uds_path"], "/tmp/ember-test-v.sock");
    assert_eq!(
        config["mmds-config"],
        serde_json::json!({"version": "V2", "network_interfaces": ["eth0"],
                           "ipv4_address": "169.254.170.2", "imds_compat": false})
    );
    let m = vm.call("GET", "/metrics/prometheus", None).body;
    assert!(m.contains("ember_put_api_requests_mmds_fails 1"), "{m}");
    assert!(m.contains("ember_patch_api_requests_mmds_count 2"), "{m}");
    let _ = vm.terminate();

    let bad = dir.write("bad.json", "{not json");
    assert_fails(
        &run_ember(&[
            "--metadata",
            bad.to_str().unwrap(),
            "--api-sock",
            "/nonexistent/x",
        ]),
        3,
        "is not valid JSON",
    );
}

/// The configuration flow of the firecracker-python SDK (0.0.5), request for request:
/// boot source, root drive, machine, network interface, MMDS config (V2, its address, the
/// interface) and document, vsock, start, then pause and resume. Where the guest is not
/// needed it is checked from the host: the configuration as GET /vm/config reports it,
/// and vsock's socket, which takes a `CONNECT` and, the probe having no vsock driver to
/// ask, closes the connection.
#[test]
fn a_firecracker_sdk_configuration_flow_runs_unchanged() {
    use common::netns::TestNetns;
    let ns = match TestNetns::new("sdk") {
        Ok(ns) => ns,
        Err(e) => {
            cannot_run(&format!("cannot create a network namespace: {e}"));
            return;
        }
    };
    if let Err(e) = ns.add_tap("tap-sdk") {
        cannot_run(&format!("cannot create a TAP device: {e}"));
        return;
    }
    let dir = Scratch::new("sdk");
    let sock = dir.path("api.sock");
    let uds = dir.path("v.sock");
    let disk = disk_image(&dir, "rootfs.ext4", 0, 2048);
    let cmd = ns.ember_command(&["--api-sock", sock.to_str().unwrap()]);
    let vm = ApiVm::start_command(Scratch::new("sdk-api"), sock, cmd);
    let steps = [
        (
            "PUT",
            "/boot-source",
            serde_json::json!({
                "kernel_image_path": probe_elf(),
                "boot_args": probe_args(2, 256, "probe.count=400"),
            }),
        ),
        (
            "PUT",
            "/drives/rootfs",
            serde_json::json!({
                "drive_id": "rootfs", "path_on_host": disk,
                "is_root_device": true, "is_read_only": false,
            }),
        ),
        (
            "PUT",
            "/machine-config",
            serde_json::json!({"vcpu_count": 2, "mem_size_mib": 256}),
        ),
        (
            "PUT",
            "/network-interfaces/eth0",
            serde_json::json!({
                "iface_id": "eth0", "guest_mac": "06:00:AC:10:00:02", "host_dev_name": "tap-sdk",
            }),
        ),
        (
            "PUT",
            "/mmds/config",
            serde_json::json!({
                "version": "V2", "ipv4_address": "169.254.169.254", "network_interfaces": ["eth0"],
            }),
        ),
        (
            "PUT",
            "/mmds",
            serde_json::json!({
                "latest": {"meta-data": {"instance-id": "vm-sdk", "local-hostname": "sdk-host"}},
            }),
        ),
        (
            "PUT",
            "/vsock",
            serde_json::json!({"guest_cid": 3, "uds_path": uds}),
        ),
        (
            "PUT",
            "/actions",
            serde_json::json!({"action_type": "InstanceStart"}),
        ),
        ("PATCH", "/vm", serde_json::json!({"state": "Paused"})),
        ("PATCH", "/vm", serde_json::json!({"state": "Resumed"})),
    ];
    for (method, path, body) in &steps {
        let r = vm.call(method, path, Some(&body.to_string()));
        assert_eq!(r.status, 204, "{method} {path}: {r:?}");
    }
    let config = vm.call("GET", "/vm/config", None).json();
    assert_eq!(
        config["network-interfaces"][0]["guest_mac"],
        "06:00:ac:10:00:02"
    );
    assert_eq!(config["mmds-config"]["version"], "V2");
    assert_eq!(config["vsock"]["guest_cid"], 3);
    assert_eq!(
        vm.call("GET", "/mmds", None).json()["latest"]["meta-data"]["instance-id"],
        "vm-sdk"
    );
    assert_eq!(vm.call("GET", "/", None).json()["state"], "Running");

    // The host side of vsock: ember listens on uds_path; with no guest driver to ask, the
    // host's connection is closed without an answer.
    let mut host = UnixStream::connect(&uds).expect("ember listens on uds_path");
    host.write_all(b"CONNECT 52\n").unwrap();
    host.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    let _ = host.read_to_end(&mut answer);
    assert!(answer.is_empty(), "{:?}", String::from_utf8_lossy(&answer));
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "the connection was never closed"
    );
    let metrics = vm.call("GET", "/metrics/prometheus", None).body;
    assert!(
        metrics.contains("ember_put_api_requests_vsock_count 1"),
        "{metrics}"
    );
    let _ = vm.terminate();
}
