#!/usr/bin/env bash
# Fetches Debian's cloud kernel (a bzImage) into OUT_DIR, for booting a real Linux guest on
# a host with hardware virtualization:
#
#   tools/debian-kernel.sh /tmp/guest && EMBER_TEST_KERNEL=/tmp/guest/vmlinuz cargo test --test linux_guest
#
# Debian builds virtio-mmio and virtio-blk as modules, so this kernel boots to a panic for
# want of a root device (which the kernel-only test expects). For a root file system on
# /dev/vda, use a kernel with CONFIG_VIRTIO_MMIO=y, CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y and
# CONFIG_VIRTIO_BLK=y and set EMBER_TEST_ROOTFS to an ext4 image (docs/guest-images.md).
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUT_DIR" >&2
    exit 2
fi
mkdir -p "$1"
out="$(cd "$1" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

cd "$work"
# The metapackage names the current kernel package; fetch just that one.
apt-get download linux-image-cloud-amd64 >/dev/null 2>&1
meta=(linux-image-cloud-amd64_*.deb)
pkg="$(dpkg-deb -f "${meta[0]}" Depends | sed -n 's/^\(linux-image-[^ ,]*\).*/\1/p')"
apt-get download "$pkg" >/dev/null 2>&1
dpkg-deb -x "$pkg"_*.deb extracted
cp extracted/boot/vmlinuz-* "$out/vmlinuz"
cp extracted/boot/config-* "$out/config"
echo "$out/vmlinuz"
