//! Writing the probe where the Collector loads it from: atomically (a
//! temporary file in the same directory, fsync, rename, directory fsync)
//! and read-only, so a crash never leaves a half-written probe there, and
//! through [`Dir`], so a symlink planted there is never followed.

use std::io;
use std::path::Path;

use crate::files::Dir;

pub fn write_read_only(out: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = out.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name =
        out.file_name().and_then(|n| n.to_str()).ok_or_else(|| io::Error::other("the output path has no file name"))?;
    Dir::open(dir, false)?.lock()?.replace(name, bytes, 0o444)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_probe_is_written_whole_and_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("probe.o");
        write_read_only(&out, b"first").unwrap();
        write_read_only(&out, b"second").unwrap();
        assert_eq!(fs::read(&out).unwrap(), b"second");
        assert_eq!(fs::metadata(&out).unwrap().permissions().mode() & 0o777, 0o444);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file left");
    }
}
