//! The backing file the block-device fuzz targets share: made once per process, in memory
//! (/dev/shm) where there is one, so fuzzing never waits on a real disk.

use std::sync::OnceLock;

/// Sectors of the fuzz disk.
pub const DISK_SECTORS: u64 = 64;

/// The path of a zero-filled disk of [`DISK_SECTORS`] sectors, created at the first call.
pub fn disk() -> &'static str {
    static PATH: OnceLock<String> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            "/dev/shm".into()
        } else {
            std::env::temp_dir()
        };
        let path = dir.join(format!("ember-fuzz-disk-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; (DISK_SECTORS * 512) as usize])
            .expect("create the disk file");
        path.display().to_string()
    })
}
