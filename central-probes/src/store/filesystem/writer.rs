//! Staging and committing a probe: bytes to a temporary file in `tmp/`,
//! written on the lane that hashes them (`backend::Stage::Blocking`), then
//! the commit (header, fsync, rename under the index lock by the overwrite
//! rule, directory fsync).

use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use probe_api::names::ProbePath;
use tokio::sync::oneshot;
use tracing::warn;

use crate::error::{Error, Result};
use crate::store::backend::{BlockingStaging, FileEnd, Staged};
use crate::store::disk::sync_dir;
use crate::store::{CommitOutcome, Content, Decision, StoredProbe, overwrite_rule, report_taken};

use super::entry::{Entry, stored};
use super::format::{HEADER_LEN, header};
use super::state::Inner;

/// A file in `tmp/`, removed on drop unless it was renamed into place.
pub(super) struct TempFile {
    path: PathBuf,
    file: File,
    renamed: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.renamed
            && let Err(error) = fs::remove_file(&self.path)
        {
            warn!(path = %self.path.display(), %error, "could not remove a temporary file");
        }
    }
}

/// Bytes being written to a file in `tmp/`, on the lane that hashes them.
/// Dropped unfinished (on that lane, after the chunks queued before), its
/// `TempFile` removes the file.
pub(super) struct FsStaging {
    inner: Arc<Inner>,
    path: ProbePath,
    temp: TempFile,
}

/// A written temporary file, ready to be renamed into place.
pub(super) struct FsStaged {
    inner: Arc<Inner>,
    path: ProbePath,
    /// `None` only while `prepare` works on it.
    temp: Option<TempFile>,
}

impl FsStaging {
    /// Creates the temporary file, its bytes to be written after the room
    /// for the header (which `prepare` writes).
    pub(super) fn start(inner: &Arc<Inner>, path: &ProbePath) -> Result<FsStaging> {
        let n = inner.next_temp.fetch_add(1, Ordering::Relaxed);
        let temp_path = inner.tmp_dir.join(format!("{}-{n}.part", std::process::id()));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp_path)
            .map_err(|e| Error::io(format!("creating {}", temp_path.display()), e))?;
        let mut temp = TempFile { path: temp_path, file, renamed: false };
        temp.file
            .seek(SeekFrom::Start(HEADER_LEN))
            .map_err(|e| Error::io(format!("creating {}", temp.path.display()), e))?;
        Ok(FsStaging { inner: inner.clone(), path: path.clone(), temp })
    }
}

impl BlockingStaging for FsStaging {
    fn write(&mut self, chunk: &[u8]) -> Result<()> {
        self.temp.file.write_all(chunk).map_err(|e| Error::io(format!("writing {}", self.path), e))
    }

    /// The header and signature are written by `prepare`, which has the
    /// probe as verified.
    fn finish(self: Box<Self>, _end: FileEnd) -> Result<Box<dyn Staged>> {
        let FsStaging { inner, path, temp } = *self;
        Ok(Box::new(FsStaged { inner, path, temp: Some(temp) }))
    }
}

#[tonic::async_trait]
impl Staged for FsStaged {
    async fn existing(&self) -> Result<Option<StoredProbe>> {
        Ok(self.inner.index().get(&self.path).map(|entry| stored(self.path.clone(), entry.clone())))
    }

    async fn prepare(&mut self, probe: &StoredProbe) -> Result<()> {
        let crc32 = probe.crc32.ok_or_else(|| Error::internal(format!("{}: no CRC-32 to store", probe.path)))?;
        let temp = self.temp.take().expect("prepared once");
        let signature = probe.signature.clone().unwrap_or_default();
        let signature_len = u32::try_from(signature.len())
            .map_err(|_| Error::invalid_argument(format!("{}: the signature is too long", probe.path)))?;
        let header = header(probe.size, &probe.sha256, crc32, signature_len);
        let path = self.path.clone();
        let durable = self.inner.durable;
        let signature_at = HEADER_LEN + probe.size;
        let temp = tokio::task::spawn_blocking(move || {
            // The signature after the bytes, then the header that counts it.
            temp.file
                .write_all_at(&signature, signature_at)
                .map_err(|e| Error::io(format!("writing the signature of {path}"), e))?;
            temp.file.write_all_at(&header, 0).map_err(|e| Error::io(format!("writing the header of {path}"), e))?;
            if durable {
                temp.file.sync_all().map_err(|e| Error::io(format!("syncing {path}"), e))?;
            }
            Ok::<_, Error>(temp)
        })
        .await
        .map_err(|e| Error::internal(format!("syncing {}: {e}", self.path)))??;
        self.temp = Some(temp);
        Ok(())
    }

    async fn commit(
        self: Box<Self>,
        probe: StoredProbe,
        overwrite: bool,
        repair: bool,
        taken: Option<oneshot::Sender<bool>>,
    ) -> Result<CommitOutcome> {
        let FsStaged { inner, path, temp } = *self;
        let temp = temp.expect("prepared before the commit");
        let new = Entry::of(&probe);
        tokio::task::spawn_blocking(move || commit(&inner, &path, temp, new, (overwrite, repair), taken))
            .await
            .map_err(|e| Error::internal(format!("commit task failed: {e}")))?
    }
}

/// The store's overwrite rule (with `overwrite` and `repair`) on this
/// store's index entries.
fn decide(old: Option<&Entry>, new: &Entry, (overwrite, repair): (bool, bool)) -> Decision {
    fn content(entry: &Entry) -> Content<'_> {
        (entry.size, entry.sha256, entry.signature.as_deref())
    }
    overwrite_rule(old.map(content), content(new), overwrite, repair)
}

/// Under the index lock, decides by the overwrite rule and renames the
/// prepared file into place, then tells `taken` and fsyncs the directory.
fn commit(
    inner: &Inner,
    path: &ProbePath,
    mut temp: TempFile,
    new: Entry,
    rule: (bool, bool),
    taken: Option<oneshot::Sender<bool>>,
) -> Result<CommitOutcome> {
    let io_error = |what: &str| {
        let what = format!("{what} {path}");
        move |e| Error::io(what, e)
    };
    let final_path = inner.final_path(path);
    let module_dir = final_path.parent().expect("a probe path has a directory");
    {
        // The check and the rename happen under one lock: concurrent uploads
        // of one path cannot both think they stored it first.
        let mut index = inner.index();
        let outcome = match decide(index.get(path), &new, rule) {
            Decision::Keep(nothing_to_write) => {
                report_taken(taken);
                return Ok(nothing_to_write);
            }
            Decision::Write(outcome) => outcome,
        };
        if !module_dir.exists() {
            fs::create_dir(module_dir).map_err(io_error("creating the directory of"))?;
            if inner.durable {
                sync_dir(&inner.probes_dir).map_err(io_error("syncing the directory of"))?;
            }
        }
        fs::rename(&temp.path, &final_path).map_err(io_error("renaming"))?;
        temp.renamed = true;
        index.insert(path.clone(), new);
        drop(index);
        // Visible now: the next file of the upload may take effect while
        // this directory entry is made durable.
        report_taken(taken);
        if inner.durable {
            sync_dir(module_dir).map_err(io_error("syncing the directory of"))?;
        }
        Ok(outcome)
    }
}
