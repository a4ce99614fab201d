//! Creating the API socket: owner-only permissions, and a stale socket from a previous run
//! replaced while a live one is left alone.

use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("API socket {0} is in use by another process")]
    InUse(String),
    #[error("API socket path {0} exists and is not a socket")]
    NotASocket(String),
    #[error("cannot remove stale API socket {path}: {source}")]
    RemoveStale {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot create API socket {path}: {source}")]
    Bind {
        path: String,
        source: std::io::Error,
    },
}

/// The socket file ember created, removed at exit only if the path still names it: another
/// ember started on the same path after this one (replacing what it took for a stale
/// socket) keeps its own.
pub struct SocketFile {
    path: PathBuf,
    /// Device, inode and change time of the file as created: an inode number alone can be
    /// reused by the next socket made at the same path.
    identity: Option<(u64, u64, i64, i64)>,
}

impl SocketFile {
    fn new(path: &Path) -> Self {
        let identity = identity(path);
        SocketFile {
            path: path.to_owned(),
            identity,
        }
    }

    /// Removes the socket file if it is still the one [`bind`] created.
    pub fn remove(self) {
        let now = identity(&self.path);
        if now.is_some() && now == self.identity {
            let _ = std::fs::remove_file(&self.path);
        } else if now.is_some() {
            log::info!(
                "API socket {} was replaced by another; leaving it",
                self.path.display()
            );
        }
    }
}

fn identity(path: &Path) -> Option<(u64, u64, i64, i64)> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino(), m.ctime(), m.ctime_nsec()))
}

/// Binds the API socket at `path` with mode 0600.
pub fn bind(path: &Path) -> Result<(UnixListener, SocketFile), SocketError> {
    let shown = path.display().to_string();
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            // Somebody listening means another VMM owns it; refused means it is stale.
            if UnixStream::connect(path).is_ok() {
                return Err(SocketError::InUse(shown));
            }
            log::info!("replacing stale API socket {shown}");
            std::fs::remove_file(path).map_err(|source| SocketError::RemoveStale {
                path: shown.clone(),
                source,
            })?;
        }
        Ok(_) => return Err(SocketError::NotASocket(shown)),
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(source) => {
            return Err(SocketError::Bind {
                path: shown,
                source,
            });
        }
    }
    // Only the owner may connect: the umask applies as the socket file is created, so no
    // other user can reach it even for an instant. The main thread binds before any other
    // thread exists, so changing the process umask briefly affects nothing else.
    // SAFETY: umask only changes the process's file-creation mask.
    let old = unsafe { libc::umask(0o177) };
    let result = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = result.map_err(|source| SocketError::Bind {
        path: shown,
        source,
    })?;
    Ok((listener, SocketFile::new(path)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn temp(name: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("ember-sock-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    #[test]
    fn mode_0600_and_stale_replaced() {
        let p = temp("stale");
        let (first, _) = bind(&p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // While the listener lives, the path is in use.
        assert!(matches!(bind(&p), Err(SocketError::InUse(_))));
        drop(first);
        // The file remains but nobody listens: stale, replaced.
        assert!(p.exists());
        let _second = bind(&p).unwrap();
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn removed_at_exit_only_while_still_ours() {
        let p = temp("ours");
        let (listener, file) = bind(&p).unwrap();
        drop(listener);
        file.remove();
        assert!(!p.exists(), "our own socket is removed");
        // Another process took the path over (it found ours stale and replaced it).
        let (first, first_file) = bind(&p).unwrap();
        drop(first);
        let (_second, _) = bind(&p).unwrap();
        first_file.remove();
        assert!(p.exists(), "the newer socket must stay");
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn regular_file_not_clobbered() {
        let p = temp("file");
        std::fs::write(&p, b"keep me").unwrap();
        assert!(matches!(bind(&p), Err(SocketError::NotASocket(_))));
        assert_eq!(std::fs::read(&p).unwrap(), b"keep me");
        std::fs::remove_file(&p).unwrap();
    }
}
