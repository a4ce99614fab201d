//! Opening the files a user names for the guest (kernel, initrd, drive images): never in a
//! way that can block, and only kinds that make sense. A FIFO, opened the ordinary way,
//! would block the vmm thread until some other process opened its other end; a directory
//! or a character device cannot hold a kernel or a disk.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// How much of a path error messages quote: a client can send megabyte-long paths.
const SHOWN_PATH_MAX: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum HostFileError {
    #[error("cannot open {what} {path}: {source}")]
    Open {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("{what} {path} is {found}, not {wanted}")]
    WrongType {
        what: &'static str,
        path: String,
        found: &'static str,
        wanted: &'static str,
    },
    #[error("cannot read the size of {what} {path}: {source}")]
    Size {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
}

/// Whether the guest may write through the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    ReadOnly,
    ReadWrite,
}

/// What kinds of file are acceptable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accept {
    /// Regular files only (a kernel, an initrd).
    RegularFile,
    /// A regular file or a block device (a drive).
    FileOrBlockDevice,
}

/// An opened host file, its size and what it is.
#[derive(Debug)]
pub struct HostFile {
    pub file: File,
    /// The path as error messages show it (shortened if very long).
    pub shown: String,
    pub size: u64,
    pub is_block_device: bool,
}

/// `path` as error messages quote it: at most [`SHOWN_PATH_MAX`] characters.
pub fn shown_path(path: &Path) -> String {
    let s = path.display().to_string();
    if s.chars().count() <= SHOWN_PATH_MAX {
        return s;
    }
    let head: String = s.chars().take(SHOWN_PATH_MAX).collect();
    format!("{head}... ({} bytes)", s.len())
}

fn describe(ft: std::fs::FileType) -> &'static str {
    if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_symlink() {
        "a symbolic link"
    } else {
        "a regular file"
    }
}

/// `BLKGETSIZE64`: a block device's size in bytes.
fn block_device_size(file: &File) -> std::io::Result<u64> {
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    let mut size: u64 = 0;
    // SAFETY: the ioctl writes one u64 into `size`, which outlives the call.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(size)
}

/// Opens a log or metrics destination for appending, creating a regular file if needed.
/// Never blocks: a named pipe with no reader fails at once (instead of stalling the vmm
/// thread in `open` until one appears), and writes to a pipe stay non-blocking, so a
/// reader that stops reading costs lines, not a stuck VMM.
pub fn open_sink(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ENXIO) {
                std::io::Error::new(
                    e.kind(),
                    "it is a named pipe that no process reads yet; start the reader first",
                )
            } else {
                e
            }
        })
}

/// Opens `path` (`what` names it in errors) without blocking and checks its type.
pub fn open(
    what: &'static str,
    path: &Path,
    access: Access,
    accept: Accept,
) -> Result<HostFile, HostFileError> {
    let shown = shown_path(path);
    let open_err = |source| HostFileError::Open {
        what,
        path: shown.clone(),
        source,
    };
    // O_NONBLOCK: opening a FIFO would otherwise wait for its other end.
    let file = OpenOptions::new()
        .read(true)
        .write(access == Access::ReadWrite)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(open_err)?;
    let meta = file.metadata().map_err(open_err)?;
    let ft = meta.file_type();
    let is_block_device = ft.is_block_device();
    let ok = ft.is_file() || (is_block_device && accept == Accept::FileOrBlockDevice);
    if !ok {
        return Err(HostFileError::WrongType {
            what,
            path: shown,
            found: describe(ft),
            wanted: match accept {
                Accept::RegularFile => "a regular file",
                Accept::FileOrBlockDevice => "a regular file or a block device",
            },
        });
    }
    // Regular files and block devices never block, and O_NONBLOCK would make io_uring
    // answer EAGAIN instead of waiting for the disk: clear it.
    // SAFETY: F_SETFL on our own descriptor with plain flags.
    unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, 0) };
    let size = if is_block_device {
        block_device_size(&file).map_err(|source| HostFileError::Size {
            what,
            path: shown.clone(),
            source,
        })?
    } else {
        meta.len()
    };
    Ok(HostFile {
        file,
        shown,
        size,
        is_block_device,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn temp(name: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("ember-hostfile-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    #[test]
    fn regular_file_opens_with_its_size() {
        let p = temp("regular");
        std::fs::write(&p, [7u8; 4096]).unwrap();
        let f = open("drive", &p, Access::ReadWrite, Accept::FileOrBlockDevice).unwrap();
        assert_eq!((f.size, f.is_block_device), (4096, false));
        // O_NONBLOCK is cleared once the type is known.
        // SAFETY: F_GETFL only reads the flags.
        let flags = unsafe { libc::fcntl(f.file.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(flags & libc::O_NONBLOCK, 0);
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn fifo_is_refused_at_once() {
        let p = temp("fifo");
        let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let start = Instant::now();
        let err = open("kernel image", &p, Access::ReadOnly, Accept::RegularFile).unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(1), "opening blocked");
        assert!(
            err.to_string().ends_with("is a FIFO, not a regular file"),
            "{err}"
        );
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn directory_and_character_device_are_refused() {
        let err = open(
            "initrd",
            Path::new("/tmp"),
            Access::ReadOnly,
            Accept::RegularFile,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "initrd /tmp is a directory, not a regular file"
        );
        let err = open(
            "drive",
            Path::new("/dev/null"),
            Access::ReadWrite,
            Accept::FileOrBlockDevice,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "drive /dev/null is a character device, not a regular file or a block device"
        );
    }

    #[test]
    fn long_paths_are_shortened_in_messages() {
        let long = "/x".repeat(100_000);
        let err = open(
            "kernel image",
            Path::new(&long),
            Access::ReadOnly,
            Accept::RegularFile,
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.len() < 600, "{} bytes", msg.len());
        assert!(msg.contains("(200000 bytes)"), "{msg}");
    }
}
