//! Random bytes from the host kernel's CSPRNG (`getrandom`, the pool /dev/urandom reads),
//! for whatever ember hands out that must not be guessed: the entropy device's bytes, the
//! metadata service's session tokens.

/// Fills `buf` completely; a signal interrupting the call does not end it early.
pub fn fill(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: the pointer and length describe `rest`, a live, writable slice.
        let got = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if got < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += got.unsigned_abs();
    }
    Ok(())
}
