#!/usr/bin/env bash
# Builds what the real-Linux tests need, from Debian packages at pinned versions, into
# OUT_DIR (default: target/nested-host beside this repository's Cargo.toml, or
# target/nested-host-arm64 with NESTED_ARCH=arm64):
#
#   vmlinuz          the Debian kernel (a bzImage; with NESTED_ARCH=arm64 an arm64 Image):
#                    the outer host's kernel and the guests'
#   vmlinux          (amd64 only) the same kernel as an ELF, unpacked from the bzImage's payload
#   outer.cpio       the outer host's initramfs: busybox, the kvm/kvm-amd/virtio/9p/tun/vfio
#                    modules, the C libraries ember and the test binaries link, and its /init
#   guest.cpio       the guests' initramfs: busybox, virtio/ext4 modules, and an /init that
#                    runs the test's /test.sh (see guest-init)
#   rootfs.ext4      an ext4 image with busybox, for tests that boot from a virtio-blk root
#   kernel-release   the kernel's release string (6.1.0-NN-amd64)
#
# Packages are fetched with `apt-get download` and unpacked with `dpkg-deb -x`; nothing is
# installed on this host except, when missing and running as root, the tools the build
# itself needs (cpio, xz-utils, e2fsprogs). Run again, it does nothing unless the pins or
# these scripts changed. Safe to run concurrently: the second caller waits for the first.
#
# NESTED_ARCH=arm64 builds the same for an arm64 nested host (run.sh boots it under
# qemu-system-aarch64): Debian's arm64 kernel and busybox (dpkg's arm64 architecture must be
# enabled for apt-get download), and the C libraries of the aarch64 cross toolchain
# (/usr/aarch64-linux-gnu), which ember's arm64 build links against.
#
# Usage: [NESTED_ARCH=amd64|arm64] tools/nested-host/build.sh [OUT_DIR]
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
arch="${NESTED_ARCH:-amd64}"
case "$arch" in
amd64) default_out="$root/target/nested-host" ;;
arm64) default_out="$root/target/nested-host-arm64" ;;
*)
    echo "nested-host build: NESTED_ARCH must be amd64 or arm64, not $arch" >&2
    exit 2
    ;;
esac
out="${1:-$default_out}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

# The pins. The kernel package is the ABI the modules below belong to; Debian keeps a point
# release's kernel in bookworm/main, so these stay fetchable until the archive drops them.
# When that happens the build says so and uses the kernel Debian currently ships instead.
KERNEL_PACKAGE=linux-image-6.1.0-50-$arch
KERNEL_VERSION=6.1.176-1
BUSYBOX_VERSION=1:1.35.0-4+deb12u1+b1

# Modules each side loads (with their dependencies, which modules.dep resolves).
GUEST_MODULES="virtio_mmio virtio_pci virtio_blk virtio_net ext4 crc32c_generic virtio-rng vmw_vsock_virtio_transport"
if [ "$arch" = amd64 ]; then
    # e1000 drives the passthrough host's two-function NIC (one IOMMU group), so a test can
    # find a function of that group bound to a host driver.
    OUTER_MODULES="kvm-amd virtio_pci 9pnet_virtio 9p tun vfio-pci vfio_iommu_type1 e1000"
    # Staged in the guests' initramfs but loaded only by the tests that need them: the
    # drivers of the devices the passthrough tests hand a guest.
    GUEST_EXTRA_MODULES="nvme e1000e"
    # The C libraries ember and the test binaries link, and where the loader expects them.
    LIBS_FROM=/lib/x86_64-linux-gnu
    LIBS_TO=lib/x86_64-linux-gnu
    LOADER=/lib64/ld-linux-x86-64.so.2
else
    # KVM is built into Debian's arm64 kernel.
    OUTER_MODULES="virtio_mmio virtio_pci 9pnet_virtio 9p tun"
    GUEST_EXTRA_MODULES=""
    LIBS_FROM=/usr/aarch64-linux-gnu/lib
    LIBS_TO=lib/aarch64-linux-gnu
    LOADER=/usr/aarch64-linux-gnu/lib/ld-linux-aarch64.so.1
fi

log() { printf 'nested-host build: %s\n' "$*" >&2; }
die() {
    log "$*"
    exit 1
}

exec 9>"$out/.lock"
flock 9

stamp_input="$(
    echo "$arch $KERNEL_PACKAGE $KERNEL_VERSION $BUSYBOX_VERSION $OUTER_MODULES $GUEST_MODULES $GUEST_EXTRA_MODULES"
    cat "$here/build.sh" "$here/outer-init" "$here/guest-init" "$here/vsock-test.c"
    # The outer host runs ember and the test binaries with these C libraries.
    sha256sum "$LOADER" "$LIBS_FROM/libc.so.6"
)"
stamp="$(printf '%s' "$stamp_input" | sha256sum | cut -d' ' -f1)"
if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ]; then
    exit 0
fi

need=()
command -v cpio >/dev/null || need+=(cpio)
command -v xz >/dev/null || need+=(xz-utils)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
if [ "$arch" = amd64 ]; then
    { command -v gcc >/dev/null && [ -f /usr/lib/x86_64-linux-gnu/libc.a ]; } || need+=(gcc libc6-dev)
else
    { command -v aarch64-linux-gnu-gcc >/dev/null && [ -f /usr/aarch64-linux-gnu/lib/libc.a ]; } ||
        need+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
fi
command -v apt-get >/dev/null || die "apt-get is missing: the images are built from Debian packages"
if [ ${#need[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || die "missing ${need[*]}; install them (apt-get install ${need[*]}) or run as root"
    log "installing ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

work="$out/work"
rm -rf "$work"
mkdir -p "$work/debs"
cd "$work/debs"

# fetch PACKAGE VERSION [ARCH]: downloads one package (of ARCH, default the nested host's);
# non-zero if the archive lacks that version.
fetch() {
    local what="$1:${3:-$arch}=$2"
    apt-get download "$what" >/dev/null 2>&1 ||
        { apt-get update -qq >/dev/null 2>&1 && apt-get download "$what" >/dev/null 2>&1; }
}

if ! fetch "$KERNEL_PACKAGE" "$KERNEL_VERSION"; then
    current="$(apt-cache depends "linux-image-$arch:$arch" 2>/dev/null | sed -n 's/.*Depends: \(linux-image-[^ :]*\).*/\1/p' | head -1)"
    [ -n "$current" ] || die "cannot fetch $KERNEL_PACKAGE=$KERNEL_VERSION, and linux-image-$arch names no kernel"
    log "WARNING: $KERNEL_PACKAGE=$KERNEL_VERSION is no longer in the archive; using $current (update the pin in tools/nested-host/build.sh)"
    apt-get download "$current:$arch" >/dev/null 2>&1 || die "cannot fetch $current"
fi
fetch busybox-static "$BUSYBOX_VERSION" || {
    log "WARNING: busybox-static=$BUSYBOX_VERSION is no longer in the archive; using the current one"
    apt-get download "busybox-static:$arch" >/dev/null 2>&1 || die "cannot fetch busybox-static"
}
for deb in *.deb; do
    dpkg-deb -x "$deb" "$work/unpacked"
done
# The build runs busybox here too (depmod, its applet list): for another architecture, this
# host's build of the same version.
if [ "$arch" = amd64 ]; then
    tools_busybox="$work/unpacked/bin/busybox"
else
    mkdir -p "$work/tools-debs"
    (cd "$work/tools-debs" && { fetch busybox-static "$BUSYBOX_VERSION" amd64 ||
        apt-get download busybox-static:amd64 >/dev/null 2>&1; } &&
        dpkg-deb -x busybox-static_*.deb "$work/tools") || die "cannot fetch busybox-static:amd64"
    tools_busybox="$work/tools/bin/busybox"
fi
cd "$work"

release="$(ls unpacked/lib/modules)"
[ "$(echo "$release" | wc -w)" = 1 ] || die "expected one kernel in the packages, found: $release"
moddir="unpacked/lib/modules/$release"
busybox="unpacked/bin/busybox"
# modules.dep is made at install time, which never happens here; busybox's depmod makes it.
"$tools_busybox" depmod -b unpacked "$release"

# stage_busybox DIR: busybox with a link per applet, in the directories the applets expect.
stage_busybox() {
    mkdir -p "$1/bin" "$1/sbin" "$1/usr/bin" "$1/usr/sbin" "$1/proc" "$1/sys" "$1/dev" \
        "$1/tmp" "$1/mnt" "$1/root" "$1/etc"
    cp "$busybox" "$1/bin/busybox"
    local applet
    for applet in $("$tools_busybox" --list-full); do
        [ -e "$1/$applet" ] || ln -s /bin/busybox "$1/$applet"
    done
}

# stage_modules DIR MODULE...: the modules and everything they depend on, with a modules.dep
# of their own so busybox's modprobe resolves them.
stage_modules() {
    local dir="$1" m f
    shift
    for m in "$@"; do
        local line
        line="$(grep -E "/$m\.ko:" "$moddir/modules.dep")" || die "no module $m in $release"
        for f in ${line/:/}; do
            mkdir -p "$dir/lib/modules/$release/$(dirname "$f")"
            cp "$moddir/$f" "$dir/lib/modules/$release/$f"
        done
    done
    cp "$moddir/modules.order" "$moddir/modules.builtin" "$dir/lib/modules/$release/"
    "$tools_busybox" depmod -b "$dir" "$release"
}

# make_cpio DIR FILE: a newc archive of DIR, as the kernel unpacks an initramfs.
make_cpio() {
    (cd "$1" && find . | LC_ALL=C sort | cpio -o -H newc --quiet) >"$2.tmp"
    mv "$2.tmp" "$2"
}

log "kernel $release, busybox $("$tools_busybox" | head -1 | cut -d' ' -f2)"

# The outer host.
stage_busybox outer
stage_modules outer $OUTER_MODULES
echo "$OUTER_MODULES" >outer/etc/modules
# ember and the test binaries are dynamically linked against glibc.
if [ "$arch" = amd64 ]; then
    mkdir -p outer/lib64
    cp -L "$LOADER" outer/lib64/
else
    cp -L "$LOADER" outer/lib/
fi
mkdir -p "outer/$LIBS_TO"
for lib in libc.so.6 libm.so.6 libgcc_s.so.1; do
    cp -L "$LIBS_FROM/$lib" "outer/$LIBS_TO/"
done
install -m 0755 "$here/outer-init" outer/init
make_cpio outer outer.cpio

# The guests.
stage_busybox guest
stage_modules guest $GUEST_MODULES $GUEST_EXTRA_MODULES
echo "$GUEST_MODULES" >guest/etc/modules
# The guest side of the vsock tests (busybox has no AF_VSOCK), static like busybox.
if [ "$arch" = amd64 ]; then guest_cc=gcc; else guest_cc=aarch64-linux-gnu-gcc; fi
"$guest_cc" -static -O2 -o guest/bin/vsock-test "$here/vsock-test.c" ||
    die "cannot build vsock-test with $guest_cc"
mkdir -p guest/newroot
install -m 0755 "$here/guest-init" guest/init
make_cpio guest guest.cpio

# A root file system for guests that boot from a virtio-blk root: busybox, and a marker.
stage_busybox rootfs
echo "ember test root file system" >rootfs/etc/ember-rootfs
mkfs.ext4 -q -F -E root_owner=0:0 -L ember-root -d rootfs rootfs.ext4 32M >/dev/null

vmlinuz="$(ls unpacked/boot/vmlinuz-*)"
if [ "$arch" = amd64 ]; then
    # The ELF kernel: the bzImage's payload is the xz-compressed vmlinux (CONFIG_KERNEL_XZ).
    offset="$(LC_ALL=C grep -m1 -obUaP '\xfd7zXZ\x00' "$vmlinuz" | cut -d: -f1)"
    [ -n "$offset" ] || die "no xz payload in $vmlinuz"
    # xz stops at the end of the stream, so tail may die of SIGPIPE: judge by the result.
    (tail -c +$((offset + 1)) "$vmlinuz" | xz -dc --single-stream >vmlinux) || true
    [ "$(head -c 4 vmlinux | od -An -c | tr -d ' ')" = '177ELF' ] || die "the payload of $vmlinuz is not an ELF"
    mv vmlinux "$out/vmlinux"
else
    # Debian's arm64 vmlinuz is the uncompressed Image: "ARM\x64" at byte 56.
    [ "$(tail -c +57 "$vmlinuz" | head -c 4 | od -An -tx1 | tr -d ' ')" = 41524d64 ] ||
        die "$vmlinuz is not an arm64 Image"
fi

for f in outer.cpio guest.cpio rootfs.ext4; do
    mv "$f" "$out/$f"
done
cp "$vmlinuz" "$out/vmlinuz"
echo "$release" >"$out/kernel-release"
cd "$out"
rm -rf "$work"
echo "$stamp" >"$out/stamp"
log "ready in $out"
