#!/usr/bin/env bash
# Runs SCRIPT inside the nested host: a Debian kernel booted by QEMU with TCG and `-cpu max`,
# whose emulated AMD SVM with nested paging gives it a working /dev/kvm, so ember runs in it
# and boots real Linux guests even where this host has no hardware virtualization.
#
# This repository is shared into the nested host (9p) at the same absolute path, so SCRIPT,
# target/debug/ember and the test binaries resolve there as here. SCRIPT runs with `sh` from
# the repository root, as root, with EMBER_NESTED_HOST=1 and TMPDIR=/tmp (a tmpfs). The
# nested host's console (SCRIPT's output among it) goes to stdout; the exit code is
# SCRIPT's, or 125 when the nested host itself failed, 126 when it hung (its kernel reported
# a lockup, or its console, heartbeat included, was silent for NESTED_SILENCE_S, default
# 120 s, or one of its CPUs stopped) and 124 on timeout.
#
# NESTED_ARCH=arm64 runs SCRIPT in an arm64 nested host instead: Debian's arm64 kernel under
# `qemu-system-aarch64 -M virt,virtualization=on -cpu max`, whose emulated EL2 gives it
# KVM (VHE); NESTED_GIC (3, the default, or 2) picks the GIC generation it has, and so the
# vGICs its KVM can offer ember's guests.
#
# Usage: tools/nested-host/run.sh [--timeout SECONDS] SCRIPT
# Environment: NESTED_SMP (CPUs, default 2), NESTED_MEM_MIB (memory, default 2048),
# NESTED_SILENCE_S (see 126 above), NESTED_CPU (QEMU's -cpu, default max,-xsave: see below),
# NESTED_MONITOR (a path: QEMU's monitor listens there, for looking into a stuck host),
# NESTED_PASSTHROUGH_DISK (a raw image: the nested host becomes a q35 machine with an
# emulated Intel IOMMU with interrupt remapping, booted with intel_iommu=on, and gets an
# NVMe controller backed by that image and an e1000e NIC, for the VFIO passthrough tests;
# neither is bound to a driver there until a test binds it to vfio-pci; and a two-function
# e1000 NIC at 00:10 whose functions share an IOMMU group, bound to the e1000 driver).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
arch="${NESTED_ARCH:-amd64}"
case "$arch" in
amd64)
    out="$root/target/nested-host"
    qemu_binary=qemu-system-x86_64
    qemu_package=qemu-system-x86
    ;;
arm64)
    out="$root/target/nested-host-arm64"
    qemu_binary=qemu-system-aarch64
    qemu_package=qemu-system-arm
    ;;
*)
    echo "nested-host: NESTED_ARCH must be amd64 or arm64, not $arch" >&2
    exit 2
    ;;
esac
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

if ! command -v "$qemu_binary" >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "nested-host: installing $qemu_package" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$qemu_package" >/dev/null ||
            { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$qemu_package" >/dev/null; }
    else
        echo "nested-host: $qemu_binary is missing (apt-get install $qemu_package)" >&2
        exit 125
    fi
fi
NESTED_ARCH="$arch" bash "$here/build.sh" "$out"

monitor=()
if [ -n "${NESTED_MONITOR:-}" ]; then
    monitor=(-monitor "unix:$NESTED_MONITOR,server,nowait")
fi

# XSAVE is off in the emulated CPU. With it on, QEMU's TCG emulation of nested SVM (7.2)
# now and then hands a guest of ember an inconsistent XSAVE state while the nested host
# runs other work on its second CPU: the guest warns "XSAVE consistency problem" in
# fpu__init_system and triple-faults, in about 1 boot in 6 (4/25 measured; 0/25 with
# -xsave, and the same fault shows with an older ember under background load). The cost:
# guests here save FPU state with FXSAVE, so they do not exercise CPUID leaf 0xd.
cpu="${NESTED_CPU:-max,-xsave}"

passthrough=()
iommu_args=""
if [ -n "${NESTED_PASSTHROUGH_DISK:-}" ]; then
    [ -f "$NESTED_PASSTHROUGH_DISK" ] || { echo "nested-host: no image $NESTED_PASSTHROUGH_DISK" >&2; exit 2; }
    passthrough=(
        -M q35,kernel-irqchip=split -device intel-iommu,intremap=on,caching-mode=on
        -drive "file=$NESTED_PASSTHROUGH_DISK,if=none,id=pt-disk,format=raw,cache=unsafe"
        -device nvme,serial=ember-passthrough,drive=pt-disk
        -netdev user,id=pt-net,restrict=on -device e1000e,netdev=pt-net
        # Two functions of one slot without ACS: the kernel puts them in one IOMMU group.
        -netdev user,id=pt-net2,restrict=on -netdev user,id=pt-net3,restrict=on
        -device e1000,addr=0x10.0,multifunction=on,netdev=pt-net2
        -device e1000,addr=0x10.1,netdev=pt-net3
    )
    iommu_args=" intel_iommu=on"
fi

if [ "$arch" = arm64 ]; then
    machine=(-M "virt,virtualization=on,gic-version=${NESTED_GIC:-3}" -cpu "${NESTED_CPU:-max}")
    console=ttyAMA0
else
    machine=(-cpu "$cpu")
    console=ttyS0
fi

log="$(mktemp)"
timeout --kill-after=10 "$timeout" "$qemu_binary" \
    -accel tcg "${machine[@]}" -smp "${NESTED_SMP:-2}" -m "${NESTED_MEM_MIB:-2048}" \
    -nodefaults -no-reboot -display none -serial stdio "${monitor[@]}" "${passthrough[@]}" \
    -kernel "$out/vmlinuz" -initrd "$out/outer.cpio" \
    -append "console=$console quiet panic=-1 nested.share=$root nested.script=$script$iommu_args" \
    -virtfs "local,path=$root,mount_tag=share,security_model=none,id=share" \
    </dev/null >"$log" 2>&1 &
qemu=$!
tail -n +1 -f --pid="$qemu" "$log" &
tailer=$!
trap 'kill "$qemu" "$tailer" 2>/dev/null || true; rm -f "$log"' EXIT

# The watchdog: a hung nested host is killed at once rather than at the timeout. Its /init
# prints a heartbeat every 20 s, so silence means the nested host froze, not the script, and
# reports a CPU that stopped (see outer-init).
silence="${NESTED_SILENCE_S:-120}"
hung=
last_size=-1
last_change=$SECONDS
while kill -0 "$qemu" 2>/dev/null; do
    sleep 2
    size="$(stat -c %s "$log")"
    if [ "$size" != "$last_size" ]; then
        last_size="$size"
        last_change=$SECONDS
    fi
    # Only the nested host's own kernel lines (they start with its timestamp); what a
    # guest prints, echoed by a test, is prefixed and does not count.
    if grep -qE '^\[ *[0-9.]+\] .*(soft lockup|hard LOCKUP|self-detected stall|rcu_sched detected stall)' "$log"; then
        hung="its kernel reported a lockup"
    elif grep -qE '^nested-host: cpu[0-9]+ stopped' "$log"; then
        hung="one of its CPUs stopped"
    elif [ $((SECONDS - last_change)) -ge "$silence" ]; then
        hung="its console was silent for $silence s"
    fi
    if [ -n "$hung" ]; then
        kill "$qemu" 2>/dev/null || true
        break
    fi
done
set +e
wait "$qemu"
qemu_status=$?
set -e
sleep 0.2 # let tail print the last lines
if [ -n "$hung" ]; then
    echo "nested-host: the nested host hung ($hung); its run says nothing about the script" >&2
    exit 126
fi
if [ "$qemu_status" = 124 ] || [ "$qemu_status" = 137 ]; then
    echo "nested-host: timed out after ${timeout} s" >&2
    exit 124
fi
code="$(tr -d '\r' <"$log" | sed -n 's/^NESTED-HOST EXIT \([0-9]*\)$/\1/p' | tail -1)"
if [ -z "$code" ]; then
    echo "nested-host: the nested host ended without running the script to its end (qemu exit $qemu_status)" >&2
    exit 125
fi
exit "$code"
