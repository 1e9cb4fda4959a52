//! Small files readable by Central's user only (token hashes, the page
//! token key, the misses), replaced whole: written to a temporary file
//! beside them, fsync'd, renamed over them, and the rename made durable. A
//! reader sees the old content or the new, never a mix.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Replaces the file at `path` with `bytes`, mode 0600.
pub fn replace(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut temp_name = path.file_name().unwrap_or_default().to_owned();
    temp_name.push(".new");
    let temp = path.with_file_name(temp_name);
    // A temporary file left by a crash may have other permissions, which
    // opening it would keep: the mode applies only to a file created anew.
    match fs::remove_file(&temp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut file = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&temp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&temp, path)?;
    let dir = path.parent().filter(|dir| !dir.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_replaced_file_is_private_even_over_a_leftover_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        fs::write(dir.path().join("tokens.new"), b"left by a crash").unwrap();
        fs::set_permissions(dir.path().join("tokens.new"), fs::Permissions::from_mode(0o644)).unwrap();
        replace(&path, b"first").unwrap();
        replace(&path, b"second").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(!dir.path().join("tokens.new").exists());
    }
}
