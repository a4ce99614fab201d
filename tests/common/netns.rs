//! A private network namespace per test, with TAP devices in it, and a raw packet socket on
//! a TAP to see the frames a guest sends and to inject frames for it. Nothing leaves the
//! namespace; dropping it deletes the namespace and every device in it, also when the test
//! fails half-way.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::EMBER;

/// EtherType the tests' frames use: IEEE 802 local experimental, which no host stack
/// answers or sends by itself.
pub const TEST_ETHERTYPE: u16 = 0x88b5;

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Bytes a packet socket may hold before the kernel drops frames for it.
const RECEIVE_BUFFER: libc::c_int = 8 << 20;

pub struct TestNetns {
    pub name: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

impl TestNetns {
    /// A fresh namespace; Err with the reason when this host cannot make one (not root,
    /// no `ip`).
    pub fn new(tag: &str) -> Result<Self, String> {
        let name = format!(
            "ember-{}-{}-{tag}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        ip(&["netns", "add", &name])?;
        let ns = TestNetns { name };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Runs a command inside the namespace and waits for it.
    pub fn exec(&self, args: &[&str]) -> Result<(), String> {
        let mut all = vec!["netns", "exec", &self.name];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// A persistent TAP called `name`, up, with IPv6 off (so the host stack sends nothing
    /// on it by itself).
    pub fn add_tap(&self, name: &str) -> Result<(), String> {
        self.exec(&["ip", "tuntap", "add", "dev", name, "mode", "tap"])?;
        let _ = self.exec(&[
            "sysctl",
            "-q",
            "-w",
            &format!("net.ipv6.conf.{name}.disable_ipv6=1"),
        ]);
        self.exec(&["ip", "link", "set", name, "up"])
    }

    pub fn delete_link(&self, name: &str) -> Result<(), String> {
        self.exec(&["ip", "link", "del", name])
    }

    /// `ember` with `args`, run inside the namespace (`ip netns exec` execs it: the child
    /// is ember itself).
    pub fn ember_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, EMBER]).args(args);
        cmd.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        cmd
    }

    /// A raw socket on interface `ifname` in this namespace, for [`TEST_ETHERTYPE`] frames.
    pub fn packet_socket(&self, ifname: &str) -> Result<PacketSocket, String> {
        let ns_path = format!("/var/run/netns/{}", self.name);
        let ifname = ifname.to_owned();
        // setns changes only the calling thread's namespace; a socket keeps the namespace
        // it was made in, so a short-lived thread makes it.
        std::thread::spawn(move || -> Result<PacketSocket, String> {
            let ns = std::fs::File::open(&ns_path).map_err(|e| format!("{ns_path}: {e}"))?;
            // SAFETY: setns on this thread with a namespace fd we hold.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(format!("setns: {}", std::io::Error::last_os_error()));
            }
            PacketSocket::bind(&ifname, TEST_ETHERTYPE)
        })
        .join()
        .map_err(|_| "the namespace thread panicked".to_owned())?
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
}

impl PacketSocket {
    /// A raw socket on interface `ifname` of this thread's namespace for every frame.
    #[allow(dead_code)]
    pub fn bind_all(ifname: &str) -> Result<Self, String> {
        Self::bind(ifname, libc::ETH_P_ALL as u16)
    }

    fn bind(ifname: &str, ethertype: u16) -> Result<Self, String> {
        let proto = ethertype.to_be();
        // SAFETY: creates a new socket; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        if fd < 0 {
            return Err(format!(
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // The default receive buffer (rmem_default, about 208 KiB) holds only a couple of
        // hundred small frames, each charged a few hundred bytes of overhead: a guest's
        // burst while the test is descheduled would be dropped here and look like the
        // device's loss. Root may go past rmem_max (SO_RCVBUFFORCE); otherwise ask anyway.
        let size: libc::c_int = RECEIVE_BUFFER;
        for option in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
            // SAFETY: passes one c_int of the size given.
            let rc = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    option,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as u32,
                )
            };
            if rc == 0 {
                break;
            }
        }
        let cname = std::ffi::CString::new(ifname).map_err(|e| e.to_string())?;
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) } as i32;
        if ifindex == 0 {
            return Err(format!("no interface {ifname}"));
        }
        // SAFETY: sockaddr_ll is plain data; zero is a valid start.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = ifindex;
        // SAFETY: binds with a sockaddr_ll of the size given.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc != 0 {
            return Err(format!("bind: {}", std::io::Error::last_os_error()));
        }
        Ok(PacketSocket { fd, ifindex })
    }

    /// The next frame the guest sent (not one this socket sent), within `limit`.
    pub fn receive(&self, limit: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as i32) } <= 0 {
                continue;
            }
            let mut buf = vec![0u8; 65_600];
            // SAFETY: sockaddr_ll is plain data.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut from_len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: receives into live buffers of the sizes given.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&mut from as *mut libc::sockaddr_ll).cast(),
                    &mut from_len,
                )
            };
            if n < 0 {
                continue;
            }
            if from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            buf.truncate(n as usize);
            return Some(buf);
        }
    }

    /// Sends `frame` (Ethernet header included) out of the interface, towards the guest.
    pub fn send(&self, frame: &[u8]) -> Result<(), String> {
        // SAFETY: sockaddr_ll is plain data.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_protocol = TEST_ETHERTYPE.to_be();
        to.sll_ifindex = self.ifindex;
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: sends from a live buffer to a sockaddr_ll of the size given.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&to as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if n as usize != frame.len() {
            return Err(format!("sendto: {}", std::io::Error::last_os_error()));
        }
        Ok(())
    }
}

/// An Ethernet frame of [`TEST_ETHERTYPE`] from `src` to `dst` carrying `payload`.
pub fn test_frame(dst: [u8; 6], src: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&TEST_ETHERTYPE.to_be_bytes());
    f.extend_from_slice(payload);
    f
}
