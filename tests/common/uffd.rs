//! A page-fault handler for the Uffd memory backend, as an orchestrator would run one: it
//! listens on a Unix socket, takes the userfaultfd and the region list ember sends, and
//! fills every page the guest first touches from the snapshot's memory file. It runs on a
//! thread of the test process (a userfaultfd works from any process that holds it).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

/// _IOWR(0xaa, 0x03, struct uffdio_copy)
const UFFDIO_COPY: libc::c_ulong = 0xc028_aa03;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const PAGE: u64 = 4096;

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[derive(serde::Deserialize, Debug)]
struct Region {
    base_host_virt_addr: u64,
    size: u64,
    offset: u64,
    page_size: u64,
}

pub struct UffdHandler {
    pub faults: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

impl UffdHandler {
    /// Listens at `socket`, serving pages from `memory_file`.
    pub fn start(socket: &Path, memory_file: &Path) -> Self {
        let listener = UnixListener::bind(socket).expect("bind the handler's socket");
        let file = std::fs::File::open(memory_file).expect("open the memory file");
        let faults = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (f, s) = (faults.clone(), stop.clone());
        let thread = std::thread::spawn(move || serve(listener, file, f, s));
        UffdHandler {
            faults,
            stop,
            thread: Some(thread),
        }
    }

    /// Stops serving; returns what went wrong while it served, if anything.
    pub fn stop(mut self) -> Result<(), String> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .map(|t| t.join().unwrap_or(Err("the handler panicked".into())))
            .unwrap_or(Ok(()))
    }
}

fn receive(listener: &UnixListener) -> Result<(Vec<Region>, OwnedFd), String> {
    let (stream, _) = listener.accept().map_err(|e| e.to_string())?;
    let mut body = vec![0u8; 64 << 10];
    let mut control = [0u8; 64];
    let mut iov = libc::iovec {
        iov_base: body.as_mut_ptr().cast(),
        iov_len: body.len(),
    };
    // SAFETY: a zeroed msghdr is valid; its buffers outlive recvmsg.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len() as _;
    // SAFETY: a connected socket and a message whose buffers live through the call.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, 0) };
    if n <= 0 {
        return Err(format!("recvmsg: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: the kernel filled the control buffer; CMSG_FIRSTHDR checks its length.
    let fd = unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null() || (*cmsg).cmsg_type != libc::SCM_RIGHTS {
            return Err("no descriptor came with the regions".into());
        }
        std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>())
    };
    // SAFETY: the descriptor the kernel just installed for us.
    let uffd = unsafe { OwnedFd::from_raw_fd(fd) };
    let regions: Vec<Region> =
        serde_json::from_slice(&body[..n as usize]).map_err(|e| format!("regions: {e}"))?;
    Ok((regions, uffd))
}

fn serve(
    listener: UnixListener,
    file: std::fs::File,
    faults: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> Result<(), String> {
    let (regions, uffd) = receive(&listener)?;
    if regions.is_empty() || regions.iter().any(|r| r.page_size != PAGE) {
        return Err(format!("unexpected regions {regions:?}"));
    }
    let mut page = vec![0u8; PAGE as usize];
    while !stop.load(Ordering::SeqCst) {
        let mut p = libc::pollfd {
            fd: uffd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut p, 1, 100) } <= 0 {
            continue;
        }
        let mut msg = [0u8; 32];
        // SAFETY: reads one uffd_msg (32 bytes) into our buffer.
        let n = unsafe { libc::read(uffd.as_raw_fd(), msg.as_mut_ptr().cast(), 32) };
        if n != 32 {
            continue; // EAGAIN: another reader's, or a spurious wakeup
        }
        if msg[0] != UFFD_EVENT_PAGEFAULT {
            continue;
        }
        let address = u64::from_le_bytes(msg[16..24].try_into().unwrap_or_default()) & !(PAGE - 1);
        let Some(r) = regions
            .iter()
            .find(|r| address >= r.base_host_virt_addr && address < r.base_host_virt_addr + r.size)
        else {
            return Err(format!("a fault at {address:#x} outside every region"));
        };
        file.read_exact_at(&mut page, r.offset + (address - r.base_host_virt_addr))
            .map_err(|e| format!("read the memory file: {e}"))?;
        let mut copy = UffdioCopy {
            dst: address,
            src: page.as_ptr() as u64,
            len: PAGE,
            mode: 0,
            copy: 0,
        };
        // SAFETY: copies one page from our buffer into the registered range.
        let r = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_COPY, &mut copy) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            // EEXIST: the page was filled meanwhile (two vCPUs faulted on it).
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(format!("UFFDIO_COPY at {address:#x}: {e}"));
            }
        }
        faults.fetch_add(1, Ordering::SeqCst);
    }
    Ok(())
}
