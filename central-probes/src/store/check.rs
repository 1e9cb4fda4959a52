//! Reads that check what they hand out. Every record carries its probe's
//! size, CRC-32 and SHA-256, computed from the uploaded bytes; a stored copy
//! that no longer matches them (a flipped bit on disk, a damaged row) is
//! damaged, and is never served as good: the reader hashes each chunk
//! before handing it out and checks the last chunk before it leaves, so a
//! damaged probe ends with DATA_LOSS instead of its last bytes and no client
//! ever receives the whole of it.
//!
//! Serving checks the CRC-32 when the record has one: it catches every
//! error within 32 consecutive bits (any flipped byte), and any other with
//! odds of 1 in 2^32, at a fraction of SHA-256's cost per byte. A record
//! without one (stored before CRC-32s were recorded) is checked by its
//! SHA-256. A thorough check (`central-probes verify`) checks both.
//!
//! `verify_all` reads every stored probe through such a check: what the
//! `verify` command and the VerifyProbes RPC report.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use probe_api::digest::{Sha256Digest, Sha256Hasher};
use probe_api::names::{ModuleVersion, ProbePath};
use tokio_stream::{Stream, StreamExt};
use tonic::Code;

use super::{ChunkStream, ProbeStore, StoredProbe};
use crate::error::{Error, Result};

/// Told of each damaged probe a read finds: its path, what it was recorded
/// as, and what is wrong with it.
pub type OnDamaged = Arc<dyn Fn(&StoredProbe, &str) + Send + Sync>;

/// The running check of one probe's bytes against its record.
pub struct ReadCheck {
    size: u64,
    seen: u64,
    crc32: Option<(crc32fast::Hasher, u32)>,
    sha256: Option<(Sha256Hasher, Sha256Digest)>,
}

impl ReadCheck {
    /// The check serving makes: the CRC-32 if recorded, else the SHA-256;
    /// `thorough` checks both.
    pub fn new(probe: &StoredProbe, thorough: bool) -> Self {
        let crc32 = probe.crc32.map(|crc32| (crc32fast::Hasher::new(), crc32));
        let sha256 = (thorough || crc32.is_none()).then(|| (Sha256Hasher::new(), probe.sha256));
        ReadCheck { size: probe.size, seen: 0, crc32, sha256 }
    }

    /// Takes the next bytes; true once all the recorded size is in.
    pub fn update(&mut self, chunk: &[u8]) -> bool {
        self.seen += chunk.len() as u64;
        if let Some((hasher, _)) = &mut self.crc32 {
            hasher.update(chunk);
        }
        if let Some((hasher, _)) = &mut self.sha256 {
            hasher.update(chunk);
        }
        self.seen >= self.size
    }

    /// What is wrong with the bytes taken, if anything.
    pub fn finish(self) -> std::result::Result<(), String> {
        if self.seen != self.size {
            return Err(format!("{} bytes stored but {} recorded", self.seen, self.size));
        }
        if let Some((hasher, recorded)) = self.crc32 {
            let found = hasher.finalize();
            if found != recorded {
                return Err(format!("its bytes have CRC-32 {found:08x} but {recorded:08x} was recorded"));
            }
        }
        if let Some((hasher, recorded)) = self.sha256 {
            let found = hasher.finish();
            if found != recorded {
                return Err(format!("its bytes have SHA-256 {found} but {recorded} was recorded"));
            }
        }
        Ok(())
    }
}

/// The error a read of a damaged probe ends with.
pub fn damaged(path: &ProbePath, why: &str) -> Error {
    Error::new(
        Code::DataLoss,
        format!(
            "{path}: the stored copy is damaged ({why}); Central refuses to serve it: upload the support package \
             that holds it again to repair it"
        ),
    )
}

/// `chunks` of `probe`, checked: the chunk that completes the recorded
/// size is handed out only if the whole probe checks; otherwise the stream
/// ends with DATA_LOSS and `on_damaged` is told.
pub fn checked(probe: StoredProbe, chunks: ChunkStream, thorough: bool, on_damaged: OnDamaged) -> ChunkStream {
    let check = Some(ReadCheck::new(&probe, thorough));
    Box::pin(CheckedChunks { probe, chunks, check, on_damaged })
}

struct CheckedChunks {
    probe: StoredProbe,
    chunks: ChunkStream,
    /// `None` once the check is finished (the stream ends after that).
    check: Option<ReadCheck>,
    on_damaged: OnDamaged,
}

impl CheckedChunks {
    /// Ends the check: `last` (the chunk that completed it, if any) if the
    /// probe is intact, else its DATA_LOSS error.
    fn conclude(&mut self, last: Option<Bytes>) -> Option<Result<Bytes>> {
        let check = self.check.take()?;
        match check.finish() {
            Ok(()) => last.map(Ok),
            Err(why) => {
                (self.on_damaged)(&self.probe, &why);
                Some(Err(damaged(&self.probe.path, &why)))
            }
        }
    }
}

impl Stream for CheckedChunks {
    type Item = Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes>>> {
        if self.check.is_none() {
            return Poll::Ready(None);
        }
        let next = std::task::ready!(self.chunks.as_mut().poll_next(cx));
        Poll::Ready(match next {
            Some(Ok(chunk)) => {
                let check = self.check.as_mut().expect("checked above");
                if check.update(&chunk) { self.conclude(Some(chunk)) } else { Some(Ok(chunk)) }
            }
            Some(Err(error)) => {
                self.check = None;
                Some(Err(error))
            }
            // Fewer bytes than recorded (or a probe of none).
            None => self.conclude(None),
        })
    }
}

/// What a check of one stored probe found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Checked {
    /// Not stored (any more).
    Missing,
    Intact,
    /// Its bytes do not match its record; why.
    Damaged(String),
}

/// Reads `chunks` of a probe to their end: `Damaged` on DATA_LOSS (the
/// checked reader's verdict), any other error as it is.
pub async fn drain(mut chunks: ChunkStream) -> Result<Checked> {
    while let Some(chunk) = chunks.next().await {
        match chunk {
            Ok(_) => {}
            Err(error) if error.code == Code::DataLoss => return Ok(Checked::Damaged(error.message)),
            Err(error) => return Err(error),
        }
    }
    Ok(Checked::Intact)
}

/// Reads `chunks` of `probe` to their end through a thorough check,
/// telling `on_damaged` if it fails.
pub async fn check_whole(probe: &StoredProbe, mut chunks: ChunkStream, on_damaged: OnDamaged) -> Result<Checked> {
    let mut check = ReadCheck::new(probe, true);
    while let Some(chunk) = chunks.next().await {
        check.update(&chunk?);
    }
    match check.finish() {
        Ok(()) => Ok(Checked::Intact),
        Err(why) => {
            on_damaged(probe, &why);
            Ok(Checked::Damaged(why))
        }
    }
}

/// One damaged probe `verify_all` found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DamagedProbe {
    pub probe: StoredProbe,
    pub why: String,
}

/// What `verify_all` read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerifySummary {
    pub checked: u64,
    pub bytes: u64,
    pub damaged: u64,
}

/// Probes listed per page while verifying.
const VERIFY_PAGE: usize = 1000;

/// Reads every stored probe (of `module_versions`, or all when empty) in
/// path order through a thorough check, telling `on_damaged` of each
/// damaged one as it is found. A probe removed meanwhile is skipped; any
/// error other than damage ends the run.
pub async fn verify_all(
    store: &dyn ProbeStore,
    module_versions: &[ModuleVersion],
    mut on_damaged: impl FnMut(DamagedProbe) -> Result<()>,
) -> Result<VerifySummary> {
    let mut summary = VerifySummary::default();
    let versions: Vec<Option<&ModuleVersion>> =
        if module_versions.is_empty() { vec![None] } else { module_versions.iter().map(Some).collect() };
    for version in versions {
        let mut after: Option<ProbePath> = None;
        loop {
            let page = store.list(version, after.as_ref(), VERIFY_PAGE).await?;
            for probe in &page {
                match store.check(&probe.path).await? {
                    Checked::Missing => continue,
                    Checked::Intact => {}
                    Checked::Damaged(why) => {
                        summary.damaged += 1;
                        on_damaged(DamagedProbe { probe: probe.clone(), why })?;
                    }
                }
                summary.checked += 1;
                summary.bytes += probe.size;
            }
            match page.last() {
                Some(last) if page.len() == VERIFY_PAGE => after = Some(last.path.clone()),
                _ => break,
            }
        }
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn probe(bytes: &[u8], crc32: bool) -> StoredProbe {
        StoredProbe {
            path: ProbePath::parse("2.5.0/collector-ebpf-5.4.0.o.gz").unwrap(),
            size: bytes.len() as u64,
            sha256: Sha256Digest::of(bytes),
            crc32: crc32.then(|| crc32fast::hash(bytes)),
            signature: None,
        }
    }

    /// The chunks a checked read of `stored` hands out for a record of
    /// `recorded`, and what `on_damaged` was told.
    async fn read(recorded: &StoredProbe, stored: &[u8], chunk: usize) -> (Vec<Result<Bytes>>, Vec<String>) {
        let told = Arc::new(Mutex::new(Vec::new()));
        let on_damaged: OnDamaged = {
            let told = told.clone();
            Arc::new(move |_: &StoredProbe, why: &str| told.lock().unwrap().push(why.to_owned()))
        };
        let pieces: Vec<Result<Bytes>> = stored.chunks(chunk).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
        let chunks = checked(recorded.clone(), Box::pin(tokio_stream::iter(pieces)), false, on_damaged);
        let out = chunks.collect().await;
        let told = told.lock().unwrap().clone();
        (out, told)
    }

    #[tokio::test]
    async fn an_intact_probe_streams_whole() {
        let bytes: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        for crc32 in [true, false] {
            let (out, told) = read(&probe(&bytes, crc32), &bytes, 300).await;
            let got: Vec<u8> = out.into_iter().flat_map(|c| c.unwrap().to_vec()).collect();
            assert_eq!((got, told), (bytes.clone(), Vec::<String>::new()));
        }
    }

    #[tokio::test]
    async fn any_flipped_byte_ends_the_stream_before_its_last_chunk() {
        let bytes: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        for crc32 in [true, false] {
            for at in [0, 299, 300, 999] {
                for flip in [0x01u8, 0x80, 0xff] {
                    let mut stored = bytes.clone();
                    stored[at] ^= flip;
                    let (out, told) = read(&probe(&bytes, crc32), &stored, 300).await;
                    assert_eq!(out.len(), 4, "three chunks, then the error instead of the last");
                    assert!(out[..3].iter().all(Result::is_ok));
                    assert_eq!(out[3].as_ref().unwrap_err().code, Code::DataLoss, "byte {at} ^ {flip:#x}");
                    assert_eq!(told.len(), 1);
                }
            }
        }
    }

    #[tokio::test]
    async fn a_probe_shorter_or_longer_than_recorded_is_damaged() {
        let bytes = b"0123456789";
        let (out, told) = read(&probe(bytes, true), &bytes[..7], 3).await;
        assert_eq!(out.last().unwrap().as_ref().unwrap_err().code, Code::DataLoss);
        assert!(told[0].contains("7 bytes stored but 10 recorded"), "{told:?}");
        let (out, _) = read(&probe(&bytes[..4], true), bytes, 5).await;
        assert_eq!(out.len(), 1, "the first chunk already runs past the record");
        assert_eq!(out[0].as_ref().unwrap_err().code, Code::DataLoss);
    }

    #[test]
    fn a_thorough_check_also_checks_the_sha256() {
        let bytes = b"probe";
        let mut recorded = probe(bytes, true);
        recorded.sha256 = Sha256Digest::of(b"other");
        let mut fast = ReadCheck::new(&recorded, false);
        fast.update(bytes);
        assert_eq!(fast.finish(), Ok(()));
        let mut thorough = ReadCheck::new(&recorded, true);
        thorough.update(bytes);
        assert!(thorough.finish().unwrap_err().contains("SHA-256"));
    }
}
