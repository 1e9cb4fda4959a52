//! The on-disk layout: the 48-byte header in front of every probe's bytes
//! (magic, size, SHA-256), the directory lock, the page token key, and
//! leftovers of interrupted writes.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use probe_api::digest::Sha256Digest;
use tonic::Code;

use crate::error::{Error, Result};

use super::Entry;

pub(super) const MAGIC: &[u8; 8] = b"KPROBE01";
pub(super) const HEADER_LEN: u64 = 48;

pub(super) fn header(entry: Entry) -> [u8; HEADER_LEN as usize] {
    let mut header = [0u8; HEADER_LEN as usize];
    header[..8].copy_from_slice(MAGIC);
    header[8..16].copy_from_slice(&entry.size.to_le_bytes());
    header[16..].copy_from_slice(&entry.sha256.0);
    header
}

/// Reads and checks the header of a stored probe file.
pub(super) fn read_header(file: &File) -> io::Result<Entry> {
    let mut header = [0u8; HEADER_LEN as usize];
    file.read_exact_at(&mut header, 0)?;
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    if &header[..8] != MAGIC {
        return Err(invalid("not a probe file of this store (bad magic)"));
    }
    let size = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    let sha256 = Sha256Digest(header[16..].try_into().expect("32 bytes"));
    if file.metadata()?.len() != HEADER_LEN + size {
        return Err(invalid("the file length does not match its header"));
    }
    Ok(Entry { size, sha256 })
}

pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

pub(super) fn lock_data_dir(data_dir: &Path) -> Result<File> {
    let path = data_dir.join("lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    file.try_lock().map_err(|_| {
        Error::new(Code::FailedPrecondition, format!("{} is in use by another Central", data_dir.display()))
    })?;
    Ok(file)
}

/// Reads the 32-byte key at `path`, or makes one: random, readable by
/// Central's user only, written whole or not at all.
pub(super) fn load_or_create_key(path: &Path) -> Result<[u8; 32]> {
    use std::os::unix::fs::OpenOptionsExt;
    let io_error = |what: &str| {
        let what = format!("{what} {}", path.display());
        move |e| Error::io(what, e)
    };
    match fs::read(path) {
        Ok(bytes) => {
            return bytes.try_into().map_err(|_| Error::internal(format!("{} is not a 32-byte key", path.display())));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error("reading")(e)),
    }
    let mut key = [0u8; 32];
    getrandom::getrandom(&mut key).map_err(|e| Error::internal(format!("making a page token key: {e}")))?;
    let temp = path.with_extension("new");
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temp)
        .map_err(io_error("creating"))?;
    file.write_all(&key).and_then(|()| file.sync_all()).map_err(io_error("writing"))?;
    fs::rename(&temp, path).map_err(io_error("renaming"))?;
    Ok(key)
}

pub(super) fn remove_leftovers(tmp_dir: &Path) -> Result<usize> {
    let mut removed = 0;
    let entries = fs::read_dir(tmp_dir).map_err(|e| Error::io(format!("reading {}", tmp_dir.display()), e))?;
    for entry in entries {
        let path = entry.map_err(|e| Error::io("reading tmp/", e))?.path();
        fs::remove_file(&path).map_err(|e| Error::io(format!("removing {}", path.display()), e))?;
        removed += 1;
    }
    Ok(removed)
}
