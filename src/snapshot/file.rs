//! The state file's envelope: a fixed header that says what the file is, which format
//! version its body follows and how long the body is, then the body (JSON) and its CRC-64.
//! A file that is not a snapshot, is cut short, was altered or comes from another format
//! version is refused with a message that says which.
//!
//! ```text
//! offset  size  field
//!      0     8  magic "EMBERSNP"
//!      8     4  format version, little endian
//!     12     4  reserved, zero
//!     16     8  body length in bytes, little endian
//!     24     8  CRC-64/ECMA-182 of the body, little endian
//!     32     n  body: the state as JSON
//! ```

use std::io::{Read, Write};

pub const MAGIC: &[u8; 8] = b"EMBERSNP";
/// The format this ember writes and the only one it reads. It changes whenever a saved
/// structure changes shape (docs/snapshots.md, "Compatibility").
pub const FORMAT_VERSION: u32 = 1;
pub const HEADER_LEN: usize = 32;
/// No state file of a VM ember can build comes near this; a longer claim is corruption.
pub const MAX_BODY_LEN: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read the snapshot state file: {0}")]
    Read(std::io::Error),
    #[error("cannot write the snapshot state file: {0}")]
    Write(std::io::Error),
    #[error("the snapshot state file is not an ember snapshot (no EMBERSNP header)")]
    NotASnapshot,
    #[error(
        "the snapshot state file has format version {found}; this ember ({ember}) reads version {FORMAT_VERSION} only"
    )]
    Version { found: u32, ember: &'static str },
    #[error(
        "the snapshot state file is truncated: its header announces {expected} bytes of state, {found} follow"
    )]
    Truncated { expected: u64, found: u64 },
    #[error("the snapshot state file announces {0} bytes of state, more than any snapshot holds")]
    TooLong(u64),
    #[error("the snapshot state file is corrupted: its checksum does not match its contents")]
    Checksum,
}

/// CRC-64/ECMA-182 (polynomial 0x42F0E1EBA9EA3693, no reflection, no final XOR), table
/// driven.
const fn crc64_table() -> [u64; 256] {
    const POLY: u64 = 0x42F0_E1EB_A9EA_3693;
    let mut table = [0u64; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = (i as u64) << 56;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & (1 << 63) != 0 {
                (crc << 1) ^ POLY
            } else {
                crc << 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
}

static CRC64_TABLE: [u64; 256] = crc64_table();

pub fn crc64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0u64, |crc, &b| {
        CRC64_TABLE[((crc >> 56) as u8 ^ b) as usize] ^ (crc << 8)
    })
}

/// Writes `body` in its envelope.
pub fn write(out: &mut impl Write, body: &[u8]) -> Result<(), FileError> {
    let mut header = [0u8; HEADER_LEN];
    header[..8].copy_from_slice(MAGIC);
    header[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    header[16..24].copy_from_slice(&(body.len() as u64).to_le_bytes());
    header[24..32].copy_from_slice(&crc64(body).to_le_bytes());
    out.write_all(&header).map_err(FileError::Write)?;
    out.write_all(body).map_err(FileError::Write)?;
    out.flush().map_err(FileError::Write)
}

/// Reads an envelope and returns its checked body.
pub fn read(input: &mut impl Read) -> Result<Vec<u8>, FileError> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match input.read(&mut header[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FileError::Read(e)),
        }
    }
    if got < MAGIC.len() || &header[..8] != MAGIC {
        return Err(FileError::NotASnapshot);
    }
    let field = |range: std::ops::Range<usize>| {
        let mut b = [0u8; 8];
        b[..range.len()].copy_from_slice(&header[range]);
        u64::from_le_bytes(b)
    };
    if got >= 12 {
        let version = field(8..12) as u32;
        if version != FORMAT_VERSION {
            return Err(FileError::Version {
                found: version,
                ember: env!("CARGO_PKG_VERSION"),
            });
        }
    }
    if got < HEADER_LEN {
        return Err(FileError::Truncated {
            expected: HEADER_LEN as u64,
            found: got as u64,
        });
    }
    let len = field(16..24);
    if len > MAX_BODY_LEN {
        return Err(FileError::TooLong(len));
    }
    let mut body = Vec::with_capacity(len as usize);
    input
        .take(len)
        .read_to_end(&mut body)
        .map_err(FileError::Read)?;
    if (body.len() as u64) < len {
        return Err(FileError::Truncated {
            expected: len,
            found: body.len() as u64,
        });
    }
    if crc64(&body) != field(24..32) {
        return Err(FileError::Checksum);
    }
    Ok(body)
}

/// How snapshot format versions are printed (`--snapshot-version`, `--describe-snapshot`).
pub fn version_name(version: u32) -> String {
    format!("v{version}.0.0")
}

/// What `--describe-snapshot` prints: the format version on the first line (also for
/// files of a version this ember cannot read), then, for a readable file, what it holds.
pub fn describe(input: &mut impl Read) -> Result<String, FileError> {
    let mut header = Vec::with_capacity(HEADER_LEN);
    input
        .by_ref()
        .take(HEADER_LEN as u64)
        .read_to_end(&mut header)
        .map_err(FileError::Read)?;
    if header.len() < 12 || &header[..8] != MAGIC {
        return Err(FileError::NotASnapshot);
    }
    let version = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
    let name = version_name(version);
    if version != FORMAT_VERSION {
        return Ok(format!(
            "{name}\nthis ember reads {} only",
            version_name(FORMAT_VERSION)
        ));
    }
    let body = read(&mut header.as_slice().chain(input))?;
    let state: serde_json::Value =
        serde_json::from_slice(&body).map_err(|_| FileError::Checksum)?;
    let text = |key: &str| state.get(key).and_then(|v| v.as_str()).unwrap_or("?");
    let count = |key: &str| {
        state
            .get(key)
            .and_then(|v| v.as_array())
            .map_or(0, Vec::len)
    };
    let machine = state.get("machine_config");
    let field = |key: &str| {
        machine
            .and_then(|m| m.get(key))
            .and_then(|v| v.as_u64())
            .map_or_else(|| "?".to_owned(), |n| n.to_string())
    };
    Ok(format!(
        "{name}\nwritten by ember {}: {} snapshot of {} vCPUs and {} MiB, {} drives, {} network interfaces, on {}",
        text("ember_version"),
        text("snapshot_type"),
        field("vcpu_count"),
        field("mem_size_mib"),
        count("drives"),
        count("network_interfaces"),
        text("host_cpu"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_names_the_version_and_contents() {
        let body = br#"{"ember_version":"9.9.9","snapshot_type":"Diff","host_cpu":"cpu x","machine_config":{"vcpu_count":2,"mem_size_mib":256},"drives":[{}],"network_interfaces":[]}"#;
        let text = describe(&mut envelope(body).as_slice()).unwrap();
        assert_eq!(
            text,
            "v1.0.0\nwritten by ember 9.9.9: Diff snapshot of 2 vCPUs and 256 MiB, 1 drives, 0 network interfaces, on cpu x"
        );
        let mut other = envelope(body);
        other[8] = 7;
        let text = describe(&mut other.as_slice()).unwrap();
        assert!(text.starts_with("v7.0.0\n"), "{text}");
        assert!(matches!(
            describe(&mut &b"not a snapshot at all"[..]),
            Err(FileError::NotASnapshot)
        ));
        let mut corrupt = envelope(body);
        let last = corrupt.len() - 2;
        corrupt[last] ^= 1;
        assert!(matches!(
            describe(&mut corrupt.as_slice()),
            Err(FileError::Checksum)
        ));
    }

    fn envelope(body: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        write(&mut v, body).unwrap();
        v
    }

    #[test]
    fn crc64_matches_the_ecma_182_check_value() {
        // The catalogue's check value for "123456789" (CRC-64/ECMA-182).
        assert_eq!(crc64(b"123456789"), 0x6C40_DF5F_0B49_7347);
    }

    #[test]
    fn a_body_round_trips() {
        let file = envelope(b"{\"a\":1}");
        assert_eq!(&file[..8], MAGIC);
        assert_eq!(read(&mut &file[..]).unwrap(), b"{\"a\":1}");
    }

    #[test]
    fn every_kind_of_damage_is_named() {
        let good = envelope(b"some state");
        let err = |bytes: &[u8]| read(&mut &bytes[..]).unwrap_err().to_string();

        assert!(err(b"not a snapshot at all").contains("not an ember snapshot"));
        assert!(err(b"").contains("not an ember snapshot"));

        let mut other_version = good.clone();
        other_version[8..12].copy_from_slice(&7u32.to_le_bytes());
        let e = err(&other_version);
        assert!(
            e.contains("format version 7") && e.contains("reads version 1"),
            "{e}"
        );

        let e = err(&good[..good.len() - 3]);
        assert!(e.contains("truncated") && e.contains("10 bytes"), "{e}");
        assert!(err(&good[..20]).contains("truncated"));

        let mut flipped = good.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(err(&flipped).contains("checksum"));

        let mut huge = good;
        huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(err(&huge).contains("more than any snapshot"));
    }
}
