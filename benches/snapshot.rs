//! Snapshots: `cargo bench --bench snapshot`.
//!
//! - Restore: `PUT /snapshot/load` (with `resume_vm`) to the restored guest's first serial
//!   byte, for a 128 MiB and a 2 GiB guest (the probe counting as fast as the UART takes
//!   its lines, so its next byte follows at once). Baseline, measured in the same run:
//!   a fresh ember of the same size spawned to the probe's first serial byte. The target
//!   is a restore time flat in guest size (the ratio 2 GiB / 128 MiB near 1) and below a
//!   fresh start.
//! - Create: writing a full snapshot of 1 GiB of guest memory whose every page holds
//!   data (`snapshot::memory::write_full`, in this process), against writing the same
//!   bytes to a file with one `write` per MiB: the floor of any memory dump.
//!
//! `EMBER_BENCH_RUNS` sets the number of measured runs (default 10). Without `--bench` (a
//! `cargo test --all-targets` run) it makes one run of each, as a smoke test. A restore
//! whose guest does not go on counting fails the benchmark.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{
    MIB, Result, Running, create_temp_dir, exit_code, explain, invoked_as_bench, median, probe_elf,
    ratio, ratio_row, remove_dir_on_success, runs_from_env, time_header, time_row,
};

const SIZES_MIB: [u64; 2] = [128, 2048];
const CREATE_MIB: u64 = 1024;

/// One HTTP request on a fresh connection to `sock`; the status code.
fn call(sock: &Path, method: &str, path: &str, body: &str) -> Result<u16> {
    let mut s =
        UnixStream::connect(sock).map_err(|e| format!("connect {}: {e}", sock.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| format!("send {method} {path}: {e}"))?;
    let mut reader = BufReader::new(s);
    let mut status = String::new();
    reader
        .read_line(&mut status)
        .map_err(|e| format!("answer to {method} {path}: {e}"))?;
    let code = status
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad answer to {method} {path}: {status:?}"))?;
    if code >= 300 {
        let mut rest = String::new();
        let _ = reader.read_to_string(&mut rest);
        return Err(format!("{method} {path} {body}: {code} {rest}"));
    }
    Ok(code)
}

/// ember serving its API at `dir/api.sock`, its console on a pipe.
fn serve(dir: &Path, log: &Path) -> Result<(Running, PathBuf)> {
    let sock = dir.join("api.sock");
    let _ = std::fs::remove_file(&sock);
    let mut cmd = common::ember_command(log, Stdio::null())?;
    cmd.arg("--api-sock").arg(&sock);
    let child = Running::spawn(&mut cmd)?;
    let start = Instant::now();
    while UnixStream::connect(&sock).is_err() {
        if start.elapsed() > Duration::from_secs(20) {
            return Err(explain("the API socket never appeared", "", log));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok((child, sock))
}

/// Reads the console until `prefix` starts a line; true if it did before it closed.
fn read_until(out: &mut impl BufRead, prefix: &str) -> bool {
    let mut line = String::new();
    loop {
        line.clear();
        match out.read_line(&mut line) {
            Ok(0) | Err(_) => return false,
            Ok(_) if line.starts_with(prefix) => return true,
            Ok(_) => {}
        }
    }
}

/// Boots the counting probe with `mem_mib`, pauses it mid-count and writes a full snapshot
/// into `dir`; returns the state and memory files.
fn make_snapshot(dir: &Path, mem_mib: u64) -> Result<(PathBuf, PathBuf)> {
    let log = dir.join(format!("create-{mem_mib}.log"));
    let (mut child, sock) = serve(dir, &log)?;
    let args = format!(
        "console=ttyS0 reboot=k panic=1 probe.mem_mib={mem_mib} probe.vcpus=1 probe.count=4000000000 probe.count.gap=0"
    );
    let boot = serde_json::json!({"kernel_image_path": probe_elf()?, "boot_args": args});
    let machine = serde_json::json!({"vcpu_count": 1, "mem_size_mib": mem_mib});
    call(&sock, "PUT", "/machine-config", &machine.to_string())?;
    call(&sock, "PUT", "/boot-source", &boot.to_string())?;
    call(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type":"InstanceStart"}"#,
    )?;
    let mut out = BufReader::new(child.0.stdout.take().ok_or("no stdout")?);
    if !read_until(&mut out, "PROBE COUNT 100") {
        return Err(explain("the probe never counted to 100", "", &log));
    }
    call(&sock, "PATCH", "/vm", r#"{"state":"Paused"}"#)?;
    let (state, mem) = (
        dir.join(format!("{mem_mib}.state")),
        dir.join(format!("{mem_mib}.mem")),
    );
    let body = serde_json::json!({"snapshot_path": state, "mem_file_path": mem});
    call(&sock, "PUT", "/snapshot/create", &body.to_string())?;
    Ok((state, mem))
}

/// One restore: ember spawned (not timed), then `PUT /snapshot/load` to the first console
/// byte, which must belong to a count line.
fn restore_once(dir: &Path, state: &Path, mem: &Path) -> Result<Duration> {
    let log = dir.join("restore.log");
    let (mut child, sock) = serve(dir, &log)?;
    let mut out = child.0.stdout.take().ok_or("no stdout")?;
    let body = serde_json::json!({"snapshot_path": state, "resume_vm": true,
        "mem_backend": {"backend_type": "File", "backend_path": mem}});
    let start = Instant::now();
    call(&sock, "PUT", "/snapshot/load", &body.to_string())?;
    let mut first = [0u8; 1];
    out.read_exact(&mut first)
        .map_err(|e| explain(&format!("no console byte after the load: {e}"), "", &log))?;
    let elapsed = start.elapsed();
    let mut rest = BufReader::new(out);
    if !read_until(&mut rest, "PROBE COUNT") {
        return Err(explain("the restored guest does not count", "", &log));
    }
    Ok(elapsed)
}

/// A fresh ember of `mem_mib` with the probe, spawn to its first console byte.
fn fresh_once(dir: &Path, mem_mib: u64) -> Result<Duration> {
    let config = serde_json::json!({
        "boot-source": {"kernel_image_path": probe_elf()?,
            "boot_args": format!("console=ttyS0 reboot=k panic=1 probe.mem_mib={mem_mib} probe.vcpus=1 probe.reset=now")},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": mem_mib},
    });
    let path = dir.join("fresh.json");
    std::fs::write(&path, config.to_string()).map_err(|e| e.to_string())?;
    let log = dir.join("fresh.log");
    let mut cmd = common::ember_command(&log, Stdio::null())?;
    cmd.args(["--no-api", "--config-file"]).arg(&path);
    let start = Instant::now();
    let mut child = Running::spawn(&mut cmd)?;
    let mut out = child.0.stdout.take().ok_or("no stdout")?;
    let mut first = [0u8; 1];
    out.read_exact(&mut first)
        .map_err(|e| explain(&format!("no console byte: {e}"), "", &log))?;
    let elapsed = start.elapsed();
    let mut rest = String::new();
    let _ = out.read_to_string(&mut rest);
    if !child.wait()?.success() || !rest.contains("PROBE RESET now") {
        return Err(explain(
            "the fresh probe did not reset cleanly",
            &rest,
            &log,
        ));
    }
    Ok(elapsed)
}

/// Writing a full snapshot of `CREATE_MIB` of memory that is all data, against writing
/// the same bytes with plain `write`s.
fn create_per_gib(dir: &Path, runs: usize) -> Result<(Vec<Duration>, Vec<Duration>)> {
    use vm_memory::{Bytes, GuestAddress};
    let bytes = (CREATE_MIB * MIB) as usize;
    let mem = ember::memory::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), bytes)])
        .map_err(|e| e.to_string())?;
    let page: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8 + 1).collect();
    for off in (0..bytes).step_by(4096) {
        mem.write_slice(&page, GuestAddress(off as u64))
            .map_err(|e| e.to_string())?;
    }
    let buf = vec![7u8; MIB as usize];
    let (mut ember, mut plain) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let path = dir.join("create.mem");
        let file = std::fs::File::create(&path).map_err(|e| e.to_string())?;
        let start = Instant::now();
        ember::snapshot::memory::write_full(&mem, &file, None).map_err(|e| e.to_string())?;
        ember.push(start.elapsed());
        drop(file);
        let _ = std::fs::remove_file(&path);

        let file = std::fs::File::create(&path).map_err(|e| e.to_string())?;
        let start = Instant::now();
        for i in 0..CREATE_MIB {
            file.write_all_at(&buf, i * MIB)
                .map_err(|e| e.to_string())?;
        }
        plain.push(start.elapsed());
        drop(file);
        let _ = std::fs::remove_file(&path);
    }
    Ok((ember, plain))
}

fn bench(dir: &Path) -> Result<()> {
    let full = invoked_as_bench();
    let runs = if full { runs_from_env(10)? } else { 1 };
    let snapshots: Vec<_> = SIZES_MIB
        .iter()
        .map(|&m| make_snapshot(dir, m))
        .collect::<Result<_>>()?;
    // Warm-up, then the measurements interleaved so a slow moment hits all of them.
    for (m, (state, mem)) in SIZES_MIB.iter().zip(&snapshots) {
        restore_once(dir, state, mem)?;
        fresh_once(dir, *m)?;
    }
    let mut restore: [Vec<Duration>; 2] = [vec![], vec![]];
    let mut fresh: [Vec<Duration>; 2] = [vec![], vec![]];
    for _ in 0..runs {
        for (i, (state, mem)) in snapshots.iter().enumerate() {
            restore[i].push(restore_once(dir, state, mem)?);
            fresh[i].push(fresh_once(dir, SIZES_MIB[i])?);
        }
    }
    println!("snapshot restore: probe, 1 vCPU; {runs} runs");
    time_header();
    for (i, m) in SIZES_MIB.iter().enumerate() {
        time_row(
            &format!("baseline: fresh ember spawn -> first byte, {m} MiB"),
            &fresh[i],
        );
        time_row(
            &format!("ember PUT /snapshot/load -> first byte, {m} MiB"),
            &restore[i],
        );
    }
    for (i, m) in SIZES_MIB.iter().enumerate() {
        ratio_row(
            &format!("ratio {m} MiB: restore / fresh start"),
            ratio(&restore[i], &fresh[i]),
        );
    }
    ratio_row(
        "ratio restore 2048 MiB / 128 MiB (flat: ~1)",
        ratio(&restore[1], &restore[0]),
    );
    let (create, plain) = create_per_gib(dir, runs)?;
    println!("snapshot create: {CREATE_MIB} MiB of guest memory, every page data");
    time_header();
    time_row("baseline: write() the same bytes, 1 MiB at a time", &plain);
    time_row("ember write_full", &create);
    ratio_row("ratio write_full / plain write", ratio(&create, &plain));
    println!(
        "snapshot: median restore 128 MiB {:.2} ms, 2048 MiB {:.2} ms; create {:.0} ms per GiB",
        median(&restore[0]).as_secs_f64() * 1e3,
        median(&restore[1]).as_secs_f64() * 1e3,
        median(&create).as_secs_f64() * 1e3 / (CREATE_MIB as f64 / 1024.0)
    );
    Ok(())
}

fn main() -> std::process::ExitCode {
    let result = create_temp_dir("ember-snapshot-bench").and_then(|dir| {
        let r = bench(&dir);
        remove_dir_on_success(&dir, r)
    });
    exit_code("snapshot", result)
}
