//! The host side of vsock: Unix stream sockets.
//!
//! Host processes reach the guest through one listening socket (`uds_path`): they connect
//! and write `CONNECT <port>\n`, and are answered `OK <host port>\n` once the guest
//! accepted. The guest reaches host services listening at `<uds_path>_<port>`. Every
//! socket is non-blocking and close-on-exec; nothing here waits.

use std::io::ErrorKind;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The longest `CONNECT <port>\n` line taken, newline included.
pub const MAX_HANDSHAKE_LINE: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum UnixError {
    #[error("{path}: another process listens there")]
    InUse { path: PathBuf },
    #[error("{path}: exists and is not a socket")]
    NotASocket { path: PathBuf },
    #[error("{path}: cannot remove the stale socket: {source}")]
    RemoveStale {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: cannot listen: {source}")]
    Listen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: longer than a Unix socket address holds")]
    PathTooLong { path: PathBuf },
    #[error("{path}: cannot connect: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Listens at `path`, non-blocking. A socket file left behind by a process that is gone is
/// replaced; one that a live process still accepts on is not, nor is any other file.
pub fn listen(path: &Path) -> Result<UnixListener, UnixError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(UnixError::NotASocket { path: path.into() });
        }
        match UnixStream::connect(path) {
            Ok(_) => return Err(UnixError::InUse { path: path.into() }),
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path).map_err(|source| UnixError::RemoveStale {
                    path: path.into(),
                    source,
                })?;
            }
            // Not ours to judge (permissions, say): binding reports it.
            Err(_) => {}
        }
    }
    let listener = UnixListener::bind(path).map_err(|source| UnixError::Listen {
        path: path.into(),
        source,
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| UnixError::Listen {
            path: path.into(),
            source,
        })?;
    Ok(listener)
}

/// The next connection waiting on `listener`, already non-blocking; None when there is
/// none. One call (`accept4`) instead of std's accept plus an ioctl.
pub fn accept(listener: &UnixListener) -> std::io::Result<Option<UnixStream>> {
    loop {
        // SAFETY: a null address asks for none; the returned fd is checked and owned.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            )
        };
        if fd >= 0 {
            // SAFETY: a fresh descriptor nobody else owns.
            return Ok(Some(UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) })));
        }
        let e = std::io::Error::last_os_error();
        match e.kind() {
            ErrorKind::WouldBlock => return Ok(None),
            ErrorKind::Interrupted => continue,
            // The client gave up before it was accepted: try the next one.
            _ if e.raw_os_error() == Some(libc::ECONNABORTED) => continue,
            _ => return Err(e),
        }
    }
}

/// Where a guest connecting to host port `port` is sent.
pub fn service_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut p = uds_path.as_os_str().to_owned();
    p.push(format!("_{port}"));
    p.into()
}

/// Connects to `path` without waiting: a Unix listener either takes the connection into
/// its backlog at once or refuses it (a full backlog is EAGAIN, taken as a refusal), so
/// a host service that stopped accepting cannot stall the vmm thread.
pub fn connect(path: &Path) -> Result<UnixStream, UnixError> {
    let err = |source| UnixError::Connect {
        path: path.into(),
        source,
    };
    // SAFETY: an all-zero sockaddr_un is valid; its fields are set below.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    // One byte stays for the terminating NUL.
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(UnixError::PathTooLong { path: path.into() });
    }
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    // SAFETY: plain socket creation; the fd is checked and owned right after.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: fresh and ours.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_un of at least `len` bytes.
    let rc = unsafe {
        libc::connect(
            owned.as_raw_fd(),
            (&raw const addr).cast::<libc::sockaddr>(),
            len,
        )
    };
    if rc != 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    Ok(UnixStream::from(owned))
}

/// Writes what the socket takes now, without raising SIGPIPE on a peer that is gone.
pub fn send(fd: RawFd, bytes: &[u8]) -> std::io::Result<usize> {
    loop {
        // SAFETY: reads `bytes` only.
        let n = unsafe {
            libc::send(
                fd,
                bytes.as_ptr().cast(),
                bytes.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Reads what the socket has now into `buf`.
pub fn recv(fd: RawFd, buf: &mut [u8], flags: libc::c_int) -> std::io::Result<usize> {
    loop {
        // SAFETY: writes into `buf` only.
        let n = unsafe {
            libc::recv(
                fd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                flags | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Shuts down one or both directions; a socket whose peer is gone has nothing to shut.
pub fn shutdown(stream: &UnixStream, how: std::net::Shutdown) {
    let _ = stream.shutdown(how);
}

/// What the `CONNECT` line says so far.
#[derive(Debug, PartialEq, Eq)]
pub enum HandshakeStep {
    /// Not a whole line yet.
    Pending,
    /// The guest port asked for; the line is consumed, what follows is data.
    Port(u32),
    /// Not a valid line, or the host went away: the connection is closed.
    Failed(&'static str),
}

/// A host connection accepted on the listener, before its `CONNECT` line.
pub struct Handshake {
    pub stream: UnixStream,
    /// When it is given up if the line has not come.
    pub deadline: Instant,
}

impl Handshake {
    /// Looks at what the host wrote: the line is consumed only once whole, so bytes the
    /// host sends after it stay in the socket as the connection's first data.
    pub fn poll(&mut self) -> HandshakeStep {
        let fd = self.stream.as_raw_fd();
        let mut buf = [0u8; MAX_HANDSHAKE_LINE];
        let n = match recv(fd, &mut buf, libc::MSG_PEEK) {
            Ok(0) => return HandshakeStep::Failed("closed before its CONNECT line"),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return HandshakeStep::Pending,
            Err(_) => return HandshakeStep::Failed("unreadable"),
        };
        let Some(end) = buf[..n].iter().position(|&b| b == b'\n') else {
            return if n == MAX_HANDSHAKE_LINE {
                HandshakeStep::Failed("CONNECT line too long")
            } else {
                HandshakeStep::Pending
            };
        };
        let Some(port) = parse_connect_line(&buf[..end]) else {
            return HandshakeStep::Failed("not a CONNECT <port> line");
        };
        let mut line = [0u8; MAX_HANDSHAKE_LINE];
        match recv(fd, &mut line[..=end], 0) {
            Ok(m) if m == end + 1 => HandshakeStep::Port(port),
            _ => HandshakeStep::Failed("unreadable"),
        }
    }
}

/// `CONNECT <port>` (the newline already cut), the command in any letter case, the port
/// decimal.
pub fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let line = line.strip_suffix('\r').unwrap_or(line);
    let mut words = line.split_ascii_whitespace();
    let (Some(cmd), Some(port), None) = (words.next(), words.next(), words.next()) else {
        return None;
    };
    if !cmd.eq_ignore_ascii_case("connect") || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect_line(b"CONNECT 1234"), Some(1234));
        assert_eq!(parse_connect_line(b"connect 52\r"), Some(52));
        assert_eq!(parse_connect_line(b"CONNECT 4294967295"), Some(u32::MAX));
        for bad in [
            &b"CONNECT"[..],
            b"CONNECT ",
            b"CONNECT 4294967296",
            b"CONNECT -1",
            b"CONNECT +1",
            b"CONNECT 1 2",
            b"LISTEN 1",
            b"CONNECT 0x10",
            b"\xff\xfe",
        ] {
            assert_eq!(parse_connect_line(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn service_paths_append_the_port() {
        assert_eq!(
            service_path(Path::new("/run/v.sock"), 5000),
            PathBuf::from("/run/v.sock_5000")
        );
    }

    #[test]
    fn a_live_listener_is_not_replaced_a_stale_one_is() {
        let dir = std::env::temp_dir().join(format!("ember-vsock-unix-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.sock");
        let live = listen(&path).unwrap();
        assert!(matches!(listen(&path), Err(UnixError::InUse { .. })));
        drop(live);
        // The file stays behind with nobody listening: taken over.
        assert!(path.exists());
        let _again = listen(&path).unwrap();
        let file = dir.join("plain");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(listen(&file), Err(UnixError::NotASocket { .. })));
        assert!(file.exists(), "a regular file is never removed");
        assert!(matches!(
            connect(&dir.join("nobody")),
            Err(UnixError::Connect { .. })
        ));
        let long = dir.join("x".repeat(200));
        assert!(matches!(connect(&long), Err(UnixError::PathTooLong { .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
