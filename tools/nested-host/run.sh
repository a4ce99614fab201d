#!/usr/bin/env bash
# Runs SCRIPT inside the nested host: a Debian kernel booted by QEMU with TCG and `-cpu max`,
# whose emulated AMD SVM with nested paging gives it a working /dev/kvm, so ember runs in it
# and boots real Linux guests even where this host has no hardware virtualization.
#
# This repository is shared into the nested host (9p) at the same absolute path, so SCRIPT,
# target/debug/ember and the test binaries resolve there as here. SCRIPT runs with `sh` from
# the repository root, as root, with EMBER_NESTED_HOST=1 and TMPDIR=/tmp (a tmpfs). The
# nested host's console (SCRIPT's output among it) goes to stdout; the exit code is
# SCRIPT's, or 125 when the nested host itself failed and 124 on timeout.
#
# Usage: tools/nested-host/run.sh [--timeout SECONDS] SCRIPT
# Environment: NESTED_SMP (CPUs, default 2), NESTED_MEM_MIB (memory, default 2048),
# NESTED_MONITOR (a path: QEMU's monitor listens there, for looking into a stuck host).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="$root/target/nested-host"
timeout=600
if [ "${1:-}" = "--timeout" ]; then
    timeout="$2"
    shift 2
fi
if [ $# -ne 1 ]; then
    echo "usage: $0 [--timeout SECONDS] SCRIPT" >&2
    exit 2
fi
script="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
case "$script" in
"$root"/*) ;;
*)
    # Only this repository is shared: bring the script into it.
    mkdir -p "$out/scripts"
    copy="$out/scripts/$(basename "$1").$$"
    cp "$script" "$copy"
    script="$copy"
    ;;
esac

if ! command -v qemu-system-x86_64 >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "nested-host: installing qemu-system-x86" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-system-x86 >/dev/null ||
            { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-system-x86 >/dev/null; }
    else
        echo "nested-host: qemu-system-x86_64 is missing (apt-get install qemu-system-x86)" >&2
        exit 125
    fi
fi
bash "$here/build.sh" "$out"

monitor=()
if [ -n "${NESTED_MONITOR:-}" ]; then
    monitor=(-monitor "unix:$NESTED_MONITOR,server,nowait")
fi

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
set +e
timeout --kill-after=10 "$timeout" qemu-system-x86_64 \
    -accel tcg -cpu max -smp "${NESTED_SMP:-2}" -m "${NESTED_MEM_MIB:-2048}" \
    -nodefaults -no-reboot -display none -serial stdio "${monitor[@]}" \
    -kernel "$out/vmlinuz" -initrd "$out/outer.cpio" \
    -append "console=ttyS0 quiet panic=-1 nested.share=$root nested.script=$script" \
    -virtfs "local,path=$root,mount_tag=share,security_model=none,id=share" \
    </dev/null | tee "$log"
status=("${PIPESTATUS[@]}")
set -e
if [ "${status[0]}" = 124 ] || [ "${status[0]}" = 137 ]; then
    echo "nested-host: timed out after ${timeout} s" >&2
    exit 124
fi
code="$(tr -d '\r' <"$log" | sed -n 's/^NESTED-HOST EXIT \([0-9]*\)$/\1/p' | tail -1)"
if [ -z "$code" ]; then
    echo "nested-host: the nested host ended without running the script to its end (qemu exit ${status[0]})" >&2
    exit 125
fi
exit "$code"
