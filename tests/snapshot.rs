//! Snapshots end to end with the probe guest counting (`probe.count`, resources/probe):
//! a running guest is paused and written to a snapshot, and a new ember process continues
//! it, from a full snapshot, from a diff laid over one, from one snapshot twice, from
//! memory served by a userfaultfd handler; and every bad request is refused with its
//! reason, leaving the fresh ember able to load a good snapshot afterwards.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::api::{ApiVm, boot_source};
use common::netns::TestNetns;
use common::{Scratch, cannot_run, disk_image};

/// How far the probe counts: long enough to pause it midway on a loaded host.
const COUNT_TO: u64 = 150;

/// Starts ember and the counting probe with `machine` (JSON) and, with `disk`, a block
/// device the count reads every step.
fn counting_vm(machine: &str, disk: Option<&Path>, count_to: u64) -> ApiVm {
    let vm = ApiVm::start(&[]);
    let mut c = vm.client();
    let extra = format!(
        "probe.count={count_to}{}",
        if disk.is_some() { " probe.blk=1" } else { "" }
    );
    for (path, body) in [
        ("/machine-config", machine.to_owned()),
        ("/boot-source", boot_source(&extra, 2, 128)),
    ] {
        let r = c.call("PUT", path, Some(&body));
        assert_eq!(r.status, 204, "PUT {path}: {r:?}");
    }
    if let Some(disk) = disk {
        let body = serde_json::json!({
            "drive_id": "data", "path_on_host": disk,
            "is_root_device": false, "is_read_only": false,
        })
        .to_string();
        let r = c.call("PUT", "/drives/data", Some(&body));
        assert_eq!(r.status, 204, "{r:?}");
    }
    let r = c.call(
        "PUT",
        "/actions",
        Some(r#"{"action_type":"InstanceStart"}"#),
    );
    assert_eq!(r.status, 204, "{r:?}");
    vm
}

fn call_ok(vm: &ApiVm, method: &str, path: &str, body: &str) {
    let r = vm.call(method, path, Some(body));
    assert_eq!(r.status, 204, "{method} {path} {body}: {r:?}");
}

/// Waits for `PROBE COUNT n`, then pauses the VM and writes a snapshot of `kind`; returns
/// the console lines read meanwhile.
fn snapshot_at(vm: &mut ApiVm, n: u64, kind: &str, state: &Path, mem: &Path) -> String {
    let lines = vm.wait_for_line(&format!("PROBE COUNT {n}")).join("\n");
    call_ok(vm, "PATCH", "/vm", r#"{"state":"Paused"}"#);
    let body = serde_json::json!({
        "snapshot_type": kind, "snapshot_path": state, "mem_file_path": mem,
    })
    .to_string();
    call_ok(vm, "PUT", "/snapshot/create", &body);
    lines
}

/// The counts in `PROBE COUNT` lines, in order, and whether each read its disk fine.
fn counts(out: &str) -> Vec<(u64, bool)> {
    out.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("PROBE COUNT ")?;
            let mut words = rest.split_whitespace();
            let n = words.next()?.parse().ok()?;
            Some((n, words.next().is_none_or(|w| w == "blk=ok")))
        })
        .collect()
}

/// The last count the original VM printed before it was stopped, `seen` being the console
/// lines the test already read.
fn last_count(vm: ApiVm, seen: &str) -> u64 {
    let (_, out, _) = vm.terminate();
    counts(&format!("{seen}\n{out}")).last().map_or(0, |c| c.0)
}

/// Loads a snapshot in a fresh ember with `resume_vm` and waits for the guest to finish
/// counting; returns the counts it printed, having checked it continued (no reboot) and
/// ended cleanly.
fn restore_and_finish(load_body: &str, count_to: u64) -> Vec<u64> {
    let vm = ApiVm::start(&["--boot-timer"]);
    call_ok(&vm, "PUT", "/snapshot/load", load_body);
    let (code, out, err) = vm.finish();
    assert_eq!(
        code,
        Some(0),
        "the restored guest ends itself:\n{out}\n{err}"
    );
    assert!(
        !out.contains("PROBE START"),
        "a restored guest continues; it does not boot again:\n{out}"
    );
    let got = counts(&out);
    assert!(
        !got.is_empty(),
        "nothing counted after the restore:\n{out}\n{err}"
    );
    assert!(got.iter().all(|c| c.1), "a disk read failed:\n{out}");
    let numbers: Vec<u64> = got.iter().map(|c| c.0).collect();
    for w in numbers.windows(2) {
        assert_eq!(w[1], w[0] + 1, "the count goes on one by one:\n{out}");
    }
    assert_eq!(numbers.last(), Some(&count_to), "{out}");
    assert!(
        err.contains("Guest-restore-time"),
        "the restore is timed to the first console byte:\n{err}"
    );
    numbers
}

fn load_body(state: &Path, mem: &Path) -> String {
    serde_json::json!({
        "snapshot_path": state,
        "mem_backend": {"backend_type": "File", "backend_path": mem},
        "resume_vm": true,
    })
    .to_string()
}

#[test]
fn a_full_snapshot_continues_in_a_new_process_and_twice_from_one_snapshot() {
    let dir = Scratch::new("snap-full");
    let disk = disk_image(&dir, "data.img", 0, 2048);
    let (state, mem) = (dir.path("state"), dir.path("mem"));
    let mut vm = counting_vm(
        r#"{"vcpu_count":2,"mem_size_mib":128}"#,
        Some(&disk),
        COUNT_TO,
    );
    let seen = snapshot_at(&mut vm, 8, "Full", &state, &mem);
    let before = last_count(vm, &seen);
    assert!(before >= 8);

    // The files hold the guest's memory: only their owner may read them.
    for f in [&state, &mem] {
        let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", f.display());
    }
    // All of guest memory's length, but only the pages the guest used take space.
    let m = std::fs::metadata(&mem).unwrap();
    assert_eq!(m.len(), 128 << 20);
    assert!(
        m.blocks() * 512 < 64 << 20,
        "{} bytes allocated",
        m.blocks() * 512
    );

    let first = restore_and_finish(&load_body(&state, &mem), COUNT_TO);
    assert!(
        first[0] > before.saturating_sub(1) && first[0] <= before + 2,
        "the count goes on from {before}, not from {}",
        first[0]
    );
    // The snapshot is not changed by a restore that ran: a second one starts the same.
    let second = restore_and_finish(&load_body(&state, &mem), COUNT_TO);
    assert_eq!(second[0], first[0]);
}

#[test]
fn a_diff_laid_over_its_full_snapshot_continues_from_the_diff() {
    let dir = Scratch::new("snap-diff");
    let disk = disk_image(&dir, "data.img", 0, 2048);
    let (full_state, full_mem) = (dir.path("full.state"), dir.path("full.mem"));
    let (diff_state, diff_mem) = (dir.path("diff.state"), dir.path("diff.mem"));
    // The in-kernel irqchip (PIC, I/O APIC and PIT in KVM) this time.
    let mut vm = counting_vm(
        r#"{"vcpu_count":2,"mem_size_mib":128,"track_dirty_pages":true,"irqchip":"kernel"}"#,
        Some(&disk),
        COUNT_TO,
    );
    snapshot_at(&mut vm, 5, "Full", &full_state, &full_mem);
    call_ok(&vm, "PATCH", "/vm", r#"{"state":"Resumed"}"#);
    let seen = snapshot_at(&mut vm, 30, "Diff", &diff_state, &diff_mem);
    let before = last_count(vm, &seen);
    assert!(before >= 30);

    let full_blocks = std::fs::metadata(&full_mem).unwrap().blocks();
    let diff = std::fs::metadata(&diff_mem).unwrap();
    assert_eq!(diff.len(), 128 << 20, "a diff is as long as guest memory");
    assert!(
        diff.blocks() < full_blocks,
        "a diff holds only what changed: {} blocks against {full_blocks}",
        diff.blocks()
    );

    let out = std::process::Command::new(common::EMBER)
        .arg("--rebase-memory")
        .args([&full_mem, &diff_mem])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    let after = restore_and_finish(&load_body(&diff_state, &full_mem), COUNT_TO);
    assert!(
        after[0] > 30 && after[0] <= before + 2,
        "the diff's count ({before}) goes on, not the full snapshot's: {}",
        after[0]
    );
}

#[test]
fn memory_served_by_a_userfaultfd_handler_continues_the_guest() {
    let dir = Scratch::new("snap-uffd");
    let (state, mem) = (dir.path("state"), dir.path("mem"));
    let mut vm = counting_vm(r#"{"vcpu_count":2,"mem_size_mib":128}"#, None, 60);
    let seen = snapshot_at(&mut vm, 4, "Full", &state, &mem);
    let before = last_count(vm, &seen);

    let socket = dir.path("uffd.sock");
    let handler = common::uffd::UffdHandler::start(&socket, &mem);
    let body = serde_json::json!({
        "snapshot_path": state,
        "mem_backend": {"backend_type": "Uffd", "backend_path": socket},
        "resume_vm": true,
    })
    .to_string();
    let counted = restore_and_finish(&body, 60);
    assert!(counted[0] > before.saturating_sub(1) && counted[0] <= before + 2);
    let faults = handler.faults.load(std::sync::atomic::Ordering::SeqCst);
    handler.stop().expect("the handler served every fault");
    // The guest's pages came from the handler, and only the ones it touched.
    assert!(faults > 10, "{faults} pages served");
    assert!(faults < (128 << 20) / 4096, "{faults} pages served");
}

/// A snapshot to break in the tests below: state and memory files of a counting probe.
fn a_snapshot(dir: &Scratch) -> (PathBuf, PathBuf) {
    let (state, mem) = (dir.path("state"), dir.path("mem"));
    let mut vm = counting_vm(r#"{"vcpu_count":2,"mem_size_mib":128}"#, None, 60);
    snapshot_at(&mut vm, 2, "Full", &state, &mem);
    let _ = vm.terminate();
    (state, mem)
}

/// The state file with its body changed by `edit`, written back with a good checksum.
fn edited_state(from: &Path, to: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let bytes = std::fs::read(from).unwrap();
    let body = ember::snapshot::file::read(&mut &bytes[..]).unwrap();
    let mut v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    edit(&mut v);
    let mut out = Vec::new();
    ember::snapshot::file::write(&mut out, &serde_json::to_vec(&v).unwrap()).unwrap();
    std::fs::write(to, out).unwrap();
}

#[test]
fn bad_snapshot_requests_are_refused_with_their_reason_and_change_nothing() {
    let dir = Scratch::new("snap-bad");
    let (state, mem) = a_snapshot(&dir);

    // Creating: before the start, while running, a diff without tracking, an unwritable
    // path.
    let vm = ApiVm::start(&[]);
    let create = |state: &Path, kind: &str| {
        serde_json::json!({"snapshot_path": state, "mem_file_path": dir.path("m2"), "snapshot_type": kind}).to_string()
    };
    let mut c = vm.client();
    c.expect_fault(
        "PUT",
        "/snapshot/create",
        &create(&dir.path("s2"), "Full"),
        "only allowed after the microVM starts",
    );
    drop(c);
    drop(vm);
    let vm = counting_vm(r#"{"vcpu_count":1,"mem_size_mib":64}"#, None, 1000);
    let mut c = vm.client();
    c.expect_fault(
        "PUT",
        "/snapshot/create",
        &create(&dir.path("s2"), "Full"),
        "only be created while the microVM is paused",
    );
    assert!(
        !dir.path("s2").exists(),
        "no file is made for a refused request"
    );
    call_ok(&vm, "PATCH", "/vm", r#"{"state":"Paused"}"#);
    c.expect_fault(
        "PUT",
        "/snapshot/create",
        &create(&dir.path("s2"), "Diff"),
        "Diff snapshots need dirty page tracking",
    );
    c.expect_fault(
        "PUT",
        "/snapshot/create",
        &create(&dir.path("no/such/dir/state"), "Full"),
        "cannot open the snapshot state file",
    );
    drop(c);
    drop(vm);

    // Loading: broken bodies and files, each on the same fresh ember, which must then
    // still load the good snapshot.
    let truncated = dir.path("truncated");
    let whole = std::fs::read(&state).unwrap();
    std::fs::write(&truncated, &whole[..whole.len() / 2]).unwrap();
    let corrupted = dir.path("corrupted");
    let mut flipped = whole.clone();
    let at = flipped.len() - 10;
    flipped[at] ^= 0x20;
    std::fs::write(&corrupted, flipped).unwrap();
    let other_version = dir.path("other-version");
    let mut v2 = whole.clone();
    v2[8..12].copy_from_slice(&2u32.to_le_bytes());
    std::fs::write(&other_version, v2).unwrap();
    let other_cpu = dir.path("other-cpu");
    edited_state(&state, &other_cpu, |v| {
        v["host_cpu"] = "SomeOtherVendor family 0x19 model 0x1".into();
    });
    let short_mem = dir.path("short.mem");
    std::fs::write(&short_mem, vec![0u8; 1 << 20]).unwrap();
    let not_a_snapshot = dir.path("not-a-snapshot");
    std::fs::write(&not_a_snapshot, "{\"hello\": 1}").unwrap();

    let vm = ApiVm::start(&[]);
    let mut c = vm.client();
    let load = |state: &Path, mem: &Path| load_body(state, mem);
    let cases: Vec<(String, &str)> = vec![
        (
            serde_json::json!({"snapshot_path": state}).to_string(),
            "mem_backend (or the older mem_file_path) is required",
        ),
        (
            serde_json::json!({"snapshot_path": state, "mem_file_path": mem,
                "mem_backend": {"backend_type": "File", "backend_path": mem}})
            .to_string(),
            "not both",
        ),
        (
            load(&dir.path("missing"), &mem),
            "cannot open the snapshot state file",
        ),
        (
            load(&state, &dir.path("missing.mem")),
            "cannot open the snapshot memory file",
        ),
        (load(&not_a_snapshot, &mem), "not an ember snapshot"),
        (load(&truncated, &mem), "truncated"),
        (load(&corrupted, &mem), "checksum does not match"),
        (load(&other_version, &mem), "format version 2"),
        (load(&other_cpu, &mem), "taken on a different CPU"),
        (load(&state, &short_mem), "holds 1048576 bytes"),
        (
            serde_json::json!({"snapshot_path": state,
                "mem_backend": {"backend_type": "File", "backend_path": mem},
                "network_overrides": [{"iface_id": "eth9", "host_dev_name": "tap9"}]})
            .to_string(),
            "eth9",
        ),
        (
            serde_json::json!({"snapshot_path": state,
                "mem_backend": {"backend_type": "Uffd", "backend_path": dir.path("nobody.sock")}})
            .to_string(),
            "cannot reach the page-fault handler",
        ),
    ];
    for (body, want) in &cases {
        c.expect_fault("PUT", "/snapshot/load", body, want);
        let info = c.call("GET", "/", None).json();
        assert_eq!(info["state"], "Not started", "after {body}");
    }
    // After all that, the good snapshot loads (paused: resume_vm is false).
    let body = serde_json::json!({"snapshot_path": state, "mem_file_path": mem}).to_string();
    call_ok(&vm, "PUT", "/snapshot/load", &body);
    assert_eq!(c.call("GET", "/", None).json()["state"], "Paused");
    // The configuration it runs is the snapshot's.
    let config = c.call("GET", "/vm/config", None).json();
    assert_eq!(config["machine-config"]["vcpu_count"], 2);
    assert_eq!(config["machine-config"]["mem_size_mib"], 128);
    // Loaded once: a second load, and boot-time configuration, are refused.
    c.expect_fault(
        "PUT",
        "/snapshot/load",
        &body,
        "only allowed before the microVM starts",
    );
    c.expect_fault(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count":1,"mem_size_mib":64}"#,
        "only allowed before",
    );
    call_ok(&vm, "PATCH", "/vm", r#"{"state":"Resumed"}"#);
    let (code, out, err) = vm.finish();
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert_eq!(counts(&out).last().map(|c| c.0), Some(60), "{out}");

    // Configuring first forbids a load, as Firecracker does.
    let vm = ApiVm::start(&[]);
    call_ok(
        &vm,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count":1,"mem_size_mib":64}"#,
    );
    vm.client().expect_fault(
        "PUT",
        "/snapshot/load",
        &load(&state, &mem),
        "not allowed after configuring boot-specific resources",
    );
}

/// ember serving its API inside `ns`.
fn api_vm_in(ns: &TestNetns, tag: &str) -> ApiVm {
    let dir = Scratch::new(tag);
    let sock = dir.path("api.sock");
    let cmd = ns.ember_command(&["--api-sock", sock.to_str().unwrap()]);
    ApiVm::start_command(dir, sock, cmd)
}

/// The restored interface attaches to the TAP `network_overrides` names, the old one being
/// gone, with the load body a Firecracker SDK sends (`enable_diff_snapshots`,
/// `mem_backend`, `resume_vm`, `network_overrides`).
#[test]
fn network_overrides_reattach_an_interface_to_another_tap() {
    if !Path::new("/dev/net/tun").exists() {
        cannot_run("no /dev/net/tun");
        return;
    }
    let ns = match TestNetns::new("snap") {
        Ok(ns) => ns,
        Err(e) => {
            cannot_run(&format!("cannot create a network namespace: {e}"));
            return;
        }
    };
    for tap in ["tap-a", "tap-b"] {
        if let Err(e) = ns.add_tap(tap) {
            cannot_run(&format!("cannot create a TAP device: {e}"));
            return;
        }
    }
    let mut vm = api_vm_in(&ns, "snap-net");
    let dir = Scratch::new("snap-net-files");
    let (state, mem) = (dir.path("state"), dir.path("mem"));
    let uds = dir.path("v.sock");
    for (path, body) in [
        (
            "/machine-config",
            r#"{"vcpu_count":1,"mem_size_mib":128}"#.to_owned(),
        ),
        (
            "/boot-source",
            boot_source("probe.count=60 probe.net=1 probe.net.echo=0", 1, 128),
        ),
        (
            "/network-interfaces/eth0",
            r#"{"iface_id":"eth0","host_dev_name":"tap-a"}"#.to_owned(),
        ),
        (
            "/mmds/config",
            r#"{"network_interfaces":["eth0"],"version":"V2"}"#.to_owned(),
        ),
        (
            "/entropy",
            r#"{"rate_limiter":{"ops":{"size":10,"refill_time":100}}}"#.to_owned(),
        ),
        (
            "/vsock",
            serde_json::json!({"guest_cid": 7, "uds_path": uds}).to_string(),
        ),
        ("/actions", r#"{"action_type":"InstanceStart"}"#.to_owned()),
    ] {
        call_ok(&vm, "PUT", path, &body);
    }
    let seen = snapshot_at(&mut vm, 3, "Full", &state, &mem);
    let mac =
        vm.call("GET", "/vm/config", None).json()["network-interfaces"][0]["guest_mac"].clone();
    let before = last_count(vm, &seen);
    ns.delete_link("tap-a").unwrap();

    let vm = api_vm_in(&ns, "snap-net-restore");
    let body = serde_json::json!({
        "enable_diff_snapshots": true,
        "mem_backend": {"backend_type": "File", "backend_path": mem},
        "snapshot_path": state,
        "resume_vm": true,
        "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap-b"}],
    });
    call_ok(&vm, "PUT", "/snapshot/load", &body.to_string());
    let config = vm.call("GET", "/vm/config", None).json();
    let iface = &config["network-interfaces"][0];
    assert_eq!(iface["host_dev_name"], "tap-b", "{config}");
    // The snapshot fixed the MAC the guest saw (it was generated, not configured).
    assert!(mac.is_null(), "{mac}");
    assert!(iface["guest_mac"].is_string(), "{config}");
    assert_eq!(
        config["machine-config"]["track_dirty_pages"], true,
        "{config}"
    );
    // The entropy and vsock devices and the metadata service's configuration came with
    // it; the restored vsock device listens on its socket again (the old one's file was
    // left behind and is replaced).
    assert_eq!(config["vsock"]["guest_cid"], 7, "{config}");
    assert!(std::os::unix::net::UnixStream::connect(&uds).is_ok());
    assert_eq!(
        config["entropy"]["rate_limiter"]["ops"]["size"], 10,
        "{config}"
    );
    assert_eq!(config["mmds-config"]["version"], "V2", "{config}");
    assert_eq!(
        config["mmds-config"]["network_interfaces"],
        serde_json::json!(["eth0"])
    );
    let (code, out, err) = vm.finish();
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(err.contains("TAP tap-b"), "{err}");
    let got = counts(&out);
    assert!(
        got[0].0 > before.saturating_sub(1) && got[0].0 <= before + 2,
        "{out}"
    );
    assert_eq!(got.last().map(|c| c.0), Some(60), "{out}");
}

/// Leaf 7 subleaf 0 EBX of vCPU 0 as KVM held it when the snapshot was taken.
#[cfg(target_arch = "x86_64")]
fn saved_leaf7_ebx(state: &Path) -> u64 {
    let bytes = std::fs::read(state).unwrap();
    let body = ember::snapshot::file::read(&mut &bytes[..]).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    // Each entry is saved as the bytes of a kvm_cpuid_entry2: function, index, flags, eax,
    // ebx, ecx, edx as little-endian u32s.
    let entries: Vec<Vec<u8>> = serde_json::from_value(v["vcpus"][0]["cpuid"].clone()).unwrap();
    let word = |e: &[u8], at: usize| u32::from_le_bytes(e[at..at + 4].try_into().unwrap());
    let leaf7 = entries
        .iter()
        .find(|e| word(e, 0) == 7 && word(e, 4) == 0)
        .expect("leaf 7 in the saved CPUID");
    u64::from(word(leaf7, 16))
}

/// A CPU template reaches the vCPUs (as KVM reads their CPUID back into the snapshot): T2
/// hides AVX-512 and the Broadwell/Skylake additions and never adds a feature. The
/// snapshot tools print the format version and what a state file holds.
#[test]
#[cfg(target_arch = "x86_64")]
fn a_cpu_template_reaches_the_vcpus_and_snapshots_are_described() {
    use common::{assert_fails, run_ember};
    /// AVX-512 subsets and PCOMMIT.
    const AVX512: u64 = 0xdc63_0000;
    /// RDSEED, ADX, SMAP, CLFLUSHOPT, CLWB, SHA.
    const LATER: u64 = 0x219c_0000;
    const AVX2: u64 = 1 << 5;
    let dir = Scratch::new("snap-template");
    let (plain_state, _) = a_snapshot(&dir);
    let plain = saved_leaf7_ebx(&plain_state);

    let intel = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .contains("GenuineIntel");
    let (template, hidden) = if intel {
        ("T2", AVX512 | LATER)
    } else {
        ("T2A", AVX512)
    };
    let (state, mem) = (dir.path("t-state"), dir.path("t-mem"));
    let machine = format!(r#"{{"vcpu_count":2,"mem_size_mib":128,"cpu_template":"{template}"}}"#);
    let mut vm = counting_vm(&machine, None, 60);
    snapshot_at(&mut vm, 2, "Full", &state, &mem);
    let config = vm.call("GET", "/machine-config", None);
    assert_eq!(config.json()["cpu_template"], template, "{config:?}");
    let _ = vm.terminate();
    let templated = saved_leaf7_ebx(&state);
    // Some KVMs (this project's development host's nested one) answer CPUID from the host
    // whatever table the VMM sets; there the guest-visible effect is checked by the Linux
    // test in the nested host (tests/linux_guest.rs) instead.
    let supported = kvm_ioctls::Kvm::new()
        .and_then(|k| k.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES))
        .ok()
        .and_then(|c| {
            c.as_slice()
                .iter()
                .find(|e| e.function == 7 && e.index == 0)
                .map(|e| u64::from(e.ebx))
        });
    if supported != Some(plain) {
        eprintln!(
            "this KVM does not keep the CPUID a VMM sets (leaf 7 EBX {plain:#x}, supported \
             {supported:x?}): the template's effect is not checked here"
        );
    } else {
        assert_eq!(templated & !plain, 0, "{templated:#x} over {plain:#x}");
        assert_eq!(templated & hidden, 0, "{templated:#x}");
        assert_eq!(templated & AVX2, plain & AVX2, "AVX2 kept");
        if plain & hidden == 0 {
            eprintln!("this host's KVM offers none of the features the template hides");
        } else {
            assert_ne!(templated, plain);
        }
    }

    let described = run_ember(&["--describe-snapshot", state.to_str().unwrap()]);
    assert_eq!(described.code(), Some(0), "{described:#?}");
    let mut lines = described.stdout.lines();
    assert_eq!(lines.next(), Some("v1.0.0"));
    let summary = lines.next().unwrap_or_default();
    assert!(
        summary.contains("Full snapshot of 2 vCPUs and 128 MiB, 0 drives"),
        "{summary}"
    );
    let version = run_ember(&["--snapshot-version"]);
    assert_eq!(version.stdout.trim(), "v1.0.0");
    let not_one = run_ember(&["--describe-snapshot", mem.to_str().unwrap()]);
    assert_fails(&not_one, 3, "is not an ember snapshot");
}
