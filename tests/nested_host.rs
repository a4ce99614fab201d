//! The nested host itself (tools/nested-host/run.sh): the real-Linux tests trust its exit
//! code, so it must pass a script's exit code through, and tell a hung nested host (which
//! says nothing about the script, and which the tests run again) from a failed script.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

use common::nested::guest_failed_before_init;

fn run(script: &str, env: &[(&str, &str)]) -> Output {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = repo.join("target/nested-host/runs");
    std::fs::create_dir_all(&dir).expect("create target/nested-host/runs");
    let path = dir.join(format!(
        "tooling-{}-{}.sh",
        std::process::id(),
        script.len()
    ));
    std::fs::write(&path, script).expect("write the script");
    let mut cmd = Command::new("bash");
    cmd.arg(repo.join("tools/nested-host/run.sh"))
        .arg("--timeout")
        .arg("300")
        .arg(&path);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run tools/nested-host/run.sh");
    let _ = std::fs::remove_file(&path);
    out
}

fn text(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn the_scripts_output_and_exit_code_come_back_and_kvm_works_inside() {
    let out = run(
        "echo \"inside: $EMBER_NESTED_HOST $(test -c /dev/kvm && echo kvm)\"\nexit 7\n",
        &[],
    );
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    assert!(text(&out).contains("inside: 1 kvm"), "{}", text(&out));
}

#[test]
fn a_lockup_of_the_nested_kernel_is_reported_as_a_hang() {
    // What the nested host's kernel prints when a CPU is stuck; a guest's line would be
    // prefixed by the test that echoes it and would not count.
    let out = run(
        "echo 'guest| [  1.0] watchdog: BUG: soft lockup - CPU#1 stuck'\nsleep 1\n\
         echo '[  12.345678] watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [vcpu0:845]'\n\
         sleep 120\n",
        &[],
    );
    assert_eq!(out.status.code(), Some(126), "{}", text(&out));
    assert!(text(&out).contains("its kernel reported a lockup"));
}

#[test]
fn a_silent_nested_host_is_reported_as_a_hang() {
    let out = run("sleep 120\n", &[("NESTED_SILENCE_S", "6")]);
    assert_eq!(out.status.code(), Some(126), "{}", text(&out));
    assert!(text(&out).contains("its console was silent for 6 s"));
}

/// The retry of a guest that triple-faulted early (an artefact of the emulated host) hinges
/// on telling where the guest got to from the nested host's console.
#[test]
fn an_early_triple_fault_or_stall_is_told_from_one_after_init() {
    let fault = "vCPU 0: triple fault (KVM_EXIT_SHUTDOWN) at rip=0xfff0";
    let boot = "guest| [    0.000000] Linux version 6.1.0-50-amd64 (debian-kernel)";
    let init = "guest| EMBER-GUEST init uptime=9.61";
    // The failure message quotes the awaited line; that is not the guest printing it.
    let quoted = "ember's console closed before \"EMBER-GUEST init\" (exit Some(5))";
    let early = [
        boot,
        "guest| [    2.07] smp: Brought up 1 node",
        quoted,
        fault,
    ]
    .join("\n");
    assert!(guest_failed_before_init(&early));
    let late = [boot, init, "guest| EMBER-TEST cmdline", fault].join("\n");
    assert!(!guest_failed_before_init(&late));
    // Two boots in one test: the first reached /init, the second faulted before its own.
    let second_early = [boot, init, boot, fault].join("\n");
    assert!(guest_failed_before_init(&second_early));
    // No triple fault: a failure of another kind, never retried as this one.
    let no_fault = [boot, quoted].join("\n");
    assert!(!guest_failed_before_init(&no_fault));
    // A guest that went silent before /init is the emulated host's too; after it, not.
    let stalled = format!(
        "{}: {} (no console line for 60s)",
        "thread 'serial' panicked at tests/common/linux.rs:160:51",
        common::nested::GUEST_STALLED
    );
    assert!(guest_failed_before_init(&[boot, &stalled].join("\n")));
    assert!(!guest_failed_before_init(
        &[boot, init, &stalled].join("\n")
    ));
}
