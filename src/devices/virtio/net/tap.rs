//! The host side of a network interface: a TAP device opened from `/dev/net/tun`, frames
//! carrying the 12-byte virtio-net header in front (`IFF_VNET_HDR`), non-blocking.
//!
//! Anything that reads and writes whole frames on a file descriptor works the same way;
//! the unit tests use one end of a datagram socket pair in place of a TAP.

use std::fs::OpenOptions;
use std::io::{self, ErrorKind};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// Bytes of the virtio-net header on every frame: `struct virtio_net_hdr_v1` (virtio 1.2,
/// 5.1.6), the same layout as the TAP's `virtio_net_hdr_mrg_rxbuf`.
pub const VNET_HDR_LEN: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(io::Error),
    #[error("cannot attach to TAP device {name:?}: {source}")]
    SetIff { name: String, source: io::Error },
    #[error("TAP device {name:?} cannot carry virtio-net headers: {source}")]
    VnetHdr { name: String, source: io::Error },
}

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags (the rest of the union is
/// padding here).
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

pub struct Tap {
    fd: OwnedFd,
    name: String,
}

impl Tap {
    /// Attaches to the TAP device `name` (or creates it, when the host allows), with
    /// virtio-net headers and non-blocking I/O.
    pub fn open(name: &str) -> Result<Self, TapError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let tap = Tap {
            fd: file.into(),
            name: name.to_owned(),
        };
        tap.attach()?;
        Ok(tap)
    }

    /// Attaches this descriptor to the TAP device of its name again, after the device was
    /// deleted and made anew: the kernel detaches a TAP's descriptors when it goes, and a
    /// detached one may attach again. No new descriptor is opened, which the vmm thread's
    /// seccomp filter would not allow.
    pub fn reattach(&self) -> Result<(), TapError> {
        self.attach()
    }

    fn attach(&self) -> Result<(), TapError> {
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
            _pad: [0; 22],
        };
        // The caller validated the name (1-15 bytes, no NUL): it fits with its NUL.
        let bytes = self.name.as_bytes();
        let n = bytes.len().min(libc::IFNAMSIZ - 1);
        req.name[..n].copy_from_slice(&bytes[..n]);
        // SAFETY: TUNSETIFF reads and writes one ifreq, which `req` is (with its padding).
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        if rc < 0 {
            return Err(TapError::SetIff {
                name: self.name.clone(),
                source: io::Error::last_os_error(),
            });
        }
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) };
        if rc < 0 {
            return Err(TapError::VnetHdr {
                name: self.name.clone(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// A TAP stand-in: any non-blocking descriptor that carries whole frames.
    pub fn from_fd(fd: OwnedFd, name: &str) -> Self {
        Tap {
            fd,
            name: name.to_owned(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Tells the TAP which offloads the guest accepted (`TUN_F_*`): frames it hands ember may
    /// then carry partial checksums and be larger than the MTU (GSO). Without them, it
    /// completes checksums and segments frames itself.
    pub fn set_offload(&self, flags: libc::c_uint) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        let rc = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads one frame (header included) into the pieces `iovecs` describe, in order;
    /// `WouldBlock` when none is waiting.
    ///
    /// # Safety
    /// Every iovec must describe memory valid for writes for the duration of the call.
    pub unsafe fn read_frame_vectored(&self, iovecs: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: the caller guarantees the iovecs.
        unsafe { self.transfer(iovecs, libc::read, libc::readv) }
    }

    /// Writes one frame given as pieces (header first).
    ///
    /// # Safety
    /// Every iovec must describe memory valid for reads for the duration of the call.
    pub unsafe fn write_frame(&self, iovecs: &[libc::iovec]) -> io::Result<usize> {
        // write(2) for one piece (the usual frame: header and data in one buffer) is
        // measurably cheaper than writev(2) of one iovec.
        // SAFETY: the caller guarantees the iovecs.
        unsafe { self.transfer(iovecs, write_mut, libc::writev) }
    }

    /// One frame through `single` (one piece) or `vectored` (several), again when a signal
    /// interrupted it.
    ///
    /// # Safety
    /// The iovecs must be valid for what `single`/`vectored` do with them.
    unsafe fn transfer(
        &self,
        iovecs: &[libc::iovec],
        single: unsafe extern "C" fn(libc::c_int, *mut libc::c_void, libc::size_t) -> libc::ssize_t,
        vectored: unsafe extern "C" fn(
            libc::c_int,
            *const libc::iovec,
            libc::c_int,
        ) -> libc::ssize_t,
    ) -> io::Result<usize> {
        loop {
            let n = match iovecs {
                // SAFETY: the caller guarantees the iovec.
                [one] => unsafe { single(self.fd.as_raw_fd(), one.iov_base, one.iov_len) },
                // SAFETY: the caller guarantees the iovecs; their count fits in c_int as
                // the callers bound it (IOV_MAX).
                _ => unsafe {
                    vectored(
                        self.fd.as_raw_fd(),
                        iovecs.as_ptr(),
                        iovecs.len() as libc::c_int,
                    )
                },
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// `write(2)` with the buffer typed as `read(2)`'s, so both fit [`Tap::transfer`].
unsafe extern "C" fn write_mut(
    fd: libc::c_int,
    buf: *mut libc::c_void,
    len: libc::size_t,
) -> libc::ssize_t {
    // SAFETY: the caller's guarantee for `buf` passes through unchanged.
    unsafe { libc::write(fd, buf.cast_const(), len) }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Whether an I/O error means the TAP device itself is gone (deleted while attached), as
/// opposed to a frame or a moment the TAP did not take.
pub fn is_detached(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADFD) | Some(libc::ENODEV) | Some(libc::ENXIO) | Some(libc::EBADF)
    )
}

/// Asks the kernel whether a network interface exists, through a socket made while ember
/// could still make one (the vmm thread's seccomp filter allows no `socket` later).
pub struct InterfaceProbe(OwnedFd);

impl InterfaceProbe {
    pub fn new() -> io::Result<Self> {
        // SAFETY: creates a socket; checked.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor, now owned here.
        Ok(InterfaceProbe(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Whether an interface called `name` exists in the socket's network namespace (which
    /// is ember's: /sys would show the namespace that mounted it, not the same when ember
    /// joined a namespace with setns alone).
    pub fn exists(&self, name: &str) -> bool {
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        };
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
            return false;
        }
        req.name[..bytes.len()].copy_from_slice(bytes);
        // SAFETY: SIOCGIFINDEX reads the name and writes the index into one ifreq.
        unsafe { libc::ioctl(self.0.as_raw_fd(), libc::SIOCGIFINDEX, &mut req) == 0 }
    }
}
