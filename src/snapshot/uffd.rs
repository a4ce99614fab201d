//! The Uffd memory backend: guest RAM is left empty and registered with a userfaultfd,
//! which is handed to a page-fault handler process listening on a Unix socket. The
//! handler fills each page the guest (or KVM, or a device) first touches, from wherever
//! it keeps the snapshot's memory: a file, the network, a deduplicating store.
//!
//! The hand-over follows Firecracker's protocol, so its handlers work unchanged: one
//! message on the socket whose body is a JSON array with one entry per region,
//! `{"base_host_virt_addr", "size", "offset", "page_size", "page_size_kib"}` (`offset` is
//! the region's place in the memory file), with the userfaultfd attached as SCM_RIGHTS.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use serde::Serialize;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::GuestMemoryMmap;

// The userfaultfd ABI (linux/userfaultfd.h), which libc does not carry.
const UFFD_API: u64 = 0xaa;
/// _IOWR(0xaa, 0x3f, struct uffdio_api)
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
/// _IOWR(0xaa, 0x00, struct uffdio_register)
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error("cannot create a userfaultfd: {0} (is vm.unprivileged_userfaultfd off for this user?)")]
    Create(std::io::Error),
    #[error("the kernel refuses the userfaultfd API: {0}")]
    Api(std::io::Error),
    #[error("cannot register guest memory at {addr:#x} with the userfaultfd: {source}")]
    Register { addr: u64, source: std::io::Error },
    #[error("cannot reach the page-fault handler at {path:?}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot hand the userfaultfd to the page-fault handler: {0}")]
    Send(std::io::Error),
}

/// One region as the handler learns of it.
#[derive(Debug, Serialize)]
pub struct UffdRegion {
    pub base_host_virt_addr: u64,
    pub size: u64,
    pub offset: u64,
    pub page_size: u64,
    pub page_size_kib: u64,
}

/// Registers every region of `mem` (anonymous, untouched) with a new userfaultfd for
/// missing-page faults and sends it, with the regions, to the handler at `socket_path`.
/// Returns ember's copy of the userfaultfd, which must stay open while the VM runs.
pub fn hand_over(mem: &GuestMemoryMmap, socket_path: &str) -> Result<OwnedFd, UffdError> {
    // SAFETY: the syscall takes flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(UffdError::Create(std::io::Error::last_os_error()));
    }
    // SAFETY: a descriptor we just got and own alone.
    let uffd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut api = UffdioApi {
        api: UFFD_API,
        features: 0,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes the struct we pass, which outlives the call.
    if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API, &mut api) } != 0 {
        return Err(UffdError::Api(std::io::Error::last_os_error()));
    }
    let mut regions = Vec::with_capacity(mem.num_regions());
    let mut offset = 0;
    for region in mem.iter() {
        let start = region.as_ptr() as u64;
        let mut reg = UffdioRegister {
            start,
            len: region.len(),
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: registers a range of our own mapping; the struct outlives the call.
        if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) } != 0 {
            return Err(UffdError::Register {
                addr: region.start_addr().0,
                source: std::io::Error::last_os_error(),
            });
        }
        regions.push(UffdRegion {
            base_host_virt_addr: start,
            size: region.len(),
            offset,
            page_size: super::memory::PAGE_SIZE,
            page_size_kib: super::memory::PAGE_SIZE / 1024,
        });
        offset += region.len();
    }
    let stream = UnixStream::connect(socket_path).map_err(|source| UffdError::Connect {
        path: socket_path.to_owned(),
        source,
    })?;
    let body = serde_json::to_vec(&regions)
        .map_err(|e| UffdError::Send(std::io::Error::other(e.to_string())))?;
    send_with_fd(&stream, &body, uffd.as_raw_fd()).map_err(UffdError::Send)?;
    Ok(uffd)
}

/// Sends `bytes` with `fd` attached (SCM_RIGHTS) in one message.
fn send_with_fd(stream: &UnixStream, bytes: &[u8], fd: i32) -> std::io::Result<()> {
    let iov = [IoSlice::new(bytes)];
    // SAFETY: CMSG_SPACE is a size computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<i32>() as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: a zeroed msghdr is valid; every pointer set below outlives sendmsg.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: the control buffer has room for one header with one descriptor
    // (CMSG_SPACE above), so CMSG_FIRSTHDR and CMSG_DATA point inside it.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<i32>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>(), fd);
    }
    // SAFETY: a valid socket and a message whose buffers live until the call returns.
    let sent = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, 0) };
    if sent < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if (sent as usize) < bytes.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::WriteZero,
            "the handler took only part of the region list",
        ));
    }
    Ok(())
}
