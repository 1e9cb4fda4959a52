//! Every file the Collector creates (the probe, the node-local cache, the
//! accepted serials) goes through a [`Dir`]: a directory opened without
//! following a symlink at its last component, locked while it is written,
//! with each file made by `openat` relative to it. Whoever can plant an
//! entry in one of these directories (they are host paths shared by pods)
//! cannot redirect a write: a symlink in place of a subdirectory or a file
//! is refused or replaced, never followed.
//!
//! A file is replaced whole: its temporary `.<name>.tmp` is created with
//! `O_EXCL | O_NOFOLLOW`, written, fsync'd, renamed over the name, and the
//! directory fsync'd. Writers of one directory hold its `flock`, so a
//! temporary file found there is a leftover of a run that died (SIGKILL, an
//! OOM kill, a power cut) and is removed, not opened: a leftover never
//! wedges a later run, whatever its pid (always 1 in a container).

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// A directory, held open.
#[derive(Debug)]
pub struct Dir {
    path: PathBuf,
    fd: OwnedFd,
}

/// A [`Dir`] whose writers' lock this process holds, until it is dropped.
pub struct Locked<'a> {
    dir: &'a Dir,
    lock: File,
}

impl Dir {
    /// Opens `path`, creating it (and its parents) when `create`. Its last
    /// component must be a directory, not a symlink to one; the parents are
    /// the admin's configuration and are taken as they are.
    pub fn open(path: &Path, create: bool) -> io::Result<Dir> {
        if create && let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        let c_path = c_name(path.as_os_str())?;
        let fd = open_dir_at(libc::AT_FDCWD, &c_path, create).map_err(|e| in_dir(e, path))?;
        Ok(Dir { path: path.to_owned(), fd })
    }

    /// The subdirectory `name`, made when `create`; a symlink there is
    /// refused.
    pub fn subdir(&self, name: &str, create: bool) -> io::Result<Dir> {
        let path = self.path.join(name);
        let fd = open_dir_at(self.fd.as_raw_fd(), &c_name(OsStr::new(name))?, create).map_err(|e| in_dir(e, &path))?;
        Ok(Dir { path, fd })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes the writers' lock of this directory, waiting for another
    /// process (another `get-probe` on the node) to finish its writes.
    pub fn lock(&self) -> io::Result<Locked<'_>> {
        // A lock of its own open file description: the lock is released
        // when `lock` is closed, whatever else holds the directory open.
        let fd = open_dir_at(self.fd.as_raw_fd(), c".", false)?;
        let lock = File::from(fd);
        lock.lock().map_err(|e| in_dir(e, &self.path))?;
        Ok(Locked { dir: self, lock })
    }

    /// The regular file `name`, at most `max` bytes (more is an error);
    /// `None` when there is none. A symlink, a FIFO or a device there is an
    /// error, never opened for reading.
    pub fn read(&self, name: &str, max: u64) -> io::Result<Option<Vec<u8>>> {
        let c = c_name(OsStr::new(name))?;
        let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC;
        // SAFETY: a valid directory descriptor and a NUL-terminated name.
        let fd = unsafe { libc::openat(self.fd.as_raw_fd(), c.as_ptr(), flags) };
        if fd < 0 {
            let error = io::Error::last_os_error();
            return match error.raw_os_error() {
                Some(libc::ENOENT) => Ok(None),
                Some(libc::ELOOP) => Err(io::Error::other(format!(
                    "{} is a symlink, which is never followed: remove it, and find out who put it there",
                    self.path.join(name).display()
                ))),
                _ => Err(in_dir(error, &self.path.join(name))),
            };
        }
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let file = unsafe { File::from_raw_fd(fd) };
        let metadata = file.metadata()?;
        if !metadata.is_file() {
            return Err(io::Error::other(format!("{} is not a regular file", self.path.join(name).display())));
        }
        if metadata.len() > max {
            return Err(io::Error::other(format!("{} is over {max} bytes", self.path.join(name).display())));
        }
        let mut bytes = Vec::with_capacity(metadata.len() as usize);
        file.take(max + 1).read_to_end(&mut bytes)?;
        if bytes.len() as u64 > max {
            return Err(io::Error::other(format!("{} is over {max} bytes", self.path.join(name).display())));
        }
        Ok(Some(bytes))
    }
}

impl Locked<'_> {
    /// Replaces `name` with `bytes` (mode `mode`), durably: temporary file,
    /// fsync, rename, directory fsync. A symlink at `name` is replaced, not
    /// followed.
    pub fn replace(&self, name: &str, bytes: &[u8], mode: libc::mode_t) -> io::Result<()> {
        let dir = self.dir.fd.as_raw_fd();
        let c = c_name(OsStr::new(name))?;
        let temp = c_name(OsStr::new(&format!(".{name}.tmp")))?;
        // Writers hold the lock: a temporary file here was left by a run
        // that died. Unlinking removes a planted symlink itself.
        unlink_at(dir, &temp)?;
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: a valid directory descriptor and a NUL-terminated name.
        let fd = unsafe { libc::openat(dir, temp.as_ptr(), flags, libc::c_uint::from(mode)) };
        if fd < 0 {
            return Err(in_dir(io::Error::last_os_error(), &self.dir.path.join(format!(".{name}.tmp"))));
        }
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let mut file = unsafe { File::from_raw_fd(fd) };
        let written = (|| {
            file.write_all(bytes)?;
            file.sync_all()?;
            // SAFETY: valid descriptor and names.
            if unsafe { libc::renameat(dir, temp.as_ptr(), dir, c.as_ptr()) } != 0 {
                return Err(io::Error::last_os_error());
            }
            self.lock.sync_all()
        })();
        if written.is_err() {
            let _ = unlink_at(dir, &temp);
        }
        written.map_err(|e| in_dir(e, &self.dir.path.join(name)))
    }

    /// Removes `name` if it is there (a symlink is removed, not followed).
    pub fn remove(&self, name: &str) -> io::Result<()> {
        unlink_at(self.dir.fd.as_raw_fd(), &c_name(OsStr::new(name))?).map_err(|e| in_dir(e, &self.dir.path.join(name)))
    }

    pub fn dir(&self) -> &Dir {
        self.dir
    }
}

fn c_name(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in a file name"))
}

/// Opens the directory `name` relative to `dir`, never through a symlink;
/// makes it first when `create`.
fn open_dir_at(dir: libc::c_int, name: &CStr, create: bool) -> io::Result<OwnedFd> {
    // SAFETY: a valid directory descriptor (or AT_FDCWD) and a NUL-terminated name.
    if create && unsafe { libc::mkdirat(dir, name.as_ptr(), 0o755) } != 0 {
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::AlreadyExists {
            return Err(error);
        }
    }
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: as above.
    let fd = unsafe { libc::openat(dir, name.as_ptr(), flags) };
    if fd < 0 {
        let error = io::Error::last_os_error();
        // O_NOFOLLOW on a symlink gives ELOOP, O_DIRECTORY on a file ENOTDIR.
        return Err(match error.raw_os_error() {
            Some(libc::ELOOP) | Some(libc::ENOTDIR) => {
                io::Error::other("not a directory (a symlink or a file is there); remove it and run again")
            }
            _ => error,
        });
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn unlink_at(dir: libc::c_int, name: &CStr) -> io::Result<()> {
    // SAFETY: a valid directory descriptor and a NUL-terminated name.
    if unsafe { libc::unlinkat(dir, name.as_ptr(), 0) } != 0 {
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::NotFound {
            return Err(error);
        }
    }
    Ok(())
}

/// `error`, naming the path it happened at.
fn in_dir(error: io::Error, path: &Path) -> io::Error {
    io::Error::new(error.kind(), format!("{}: {error}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{PermissionsExt, symlink};

    #[test]
    fn a_file_is_replaced_whole_with_its_mode() {
        let root = tempfile::tempdir().unwrap();
        let dir = Dir::open(&root.path().join("a/b"), true).unwrap();
        let locked = dir.lock().unwrap();
        locked.replace("probe.o", b"first", 0o444).unwrap();
        locked.replace("probe.o", b"second", 0o444).unwrap();
        let path = root.path().join("a/b/probe.o");
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o444);
        assert_eq!(dir.read("probe.o", 100).unwrap().unwrap(), b"second");
        assert_eq!(dir.read("other", 100).unwrap(), None);
        assert!(dir.read("probe.o", 3).is_err(), "over the bound");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file left");
    }

    #[test]
    fn planted_symlinks_are_never_followed() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("target");
        std::fs::write(&target, b"precious").unwrap();
        let cache = root.path().join("cache");
        std::fs::create_dir(&cache).unwrap();
        // At a file's name and at its temporary name: replaced, not followed.
        symlink(&target, cache.join("probe.o")).unwrap();
        symlink(&target, cache.join(".state.tmp")).unwrap();
        let dir = Dir::open(&cache, false).unwrap();
        let locked = dir.lock().unwrap();
        locked.replace("probe.o", b"new", 0o444).unwrap();
        locked.replace("state", b"new", 0o600).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"precious");
        assert!(!std::fs::symlink_metadata(cache.join("probe.o")).unwrap().is_symlink());
        // Read through a symlink: refused.
        symlink(&target, cache.join("digest")).unwrap();
        assert!(dir.read("digest", 100).is_err());
        // At a directory: refused, never created through.
        let elsewhere = root.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        symlink(&elsewhere, cache.join("2.5.0")).unwrap();
        assert!(dir.subdir("2.5.0", true).unwrap_err().to_string().contains("not a directory"));
        symlink(&elsewhere, root.path().join("state")).unwrap();
        assert!(Dir::open(&root.path().join("state"), true).is_err());
        assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
    }

    #[test]
    fn a_leftover_temporary_file_is_removed_not_reused() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join(".probe.o.tmp"), b"left by a killed run").unwrap();
        let mut permissions = std::fs::metadata(root.path().join(".probe.o.tmp")).unwrap().permissions();
        permissions.set_mode(0o400);
        std::fs::set_permissions(root.path().join(".probe.o.tmp"), permissions).unwrap();
        let dir = Dir::open(root.path(), false).unwrap();
        dir.lock().unwrap().replace("probe.o", b"probe", 0o444).unwrap();
        assert_eq!(std::fs::read(root.path().join("probe.o")).unwrap(), b"probe");
        assert!(!root.path().join(".probe.o.tmp").exists());
    }
}
