//! Writing the probe where the Collector loads it from: atomically (a
//! temporary file in the same directory, fsync, rename, directory fsync)
//! and read-only, so a crash never leaves a half-written probe there.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

pub fn write_read_only(out: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = out.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = out.file_name().ok_or_else(|| io::Error::other("the output path has no file name"))?;
    let temp = dir.join(format!(".{}.{}.tmp", name.to_string_lossy(), std::process::id()));
    let result = (|| {
        let mut file = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&temp)?;
        file.write_all(bytes)?;
        file.set_permissions(fs::Permissions::from_mode(0o444))?;
        file.sync_all()?;
        fs::rename(&temp, out)?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_is_written_whole_and_read_only() {
        let dir = std::env::temp_dir().join(format!("probe-out-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let out = dir.join("probe.o");
        write_read_only(&out, b"first").unwrap();
        write_read_only(&out, b"second").unwrap();
        assert_eq!(fs::read(&out).unwrap(), b"second");
        assert_eq!(fs::metadata(&out).unwrap().permissions().mode() & 0o777, 0o444);
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1, "no temporary file left");
        fs::remove_dir_all(&dir).unwrap();
    }
}
