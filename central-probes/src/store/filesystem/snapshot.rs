//! A snapshot of the index (`index.snapshot` in the data directory), so that
//! start-up reads one file instead of every probe's header.
//!
//! The snapshot holds, per module directory, the directory's modification
//! time and its probes (name, size, SHA-256, CRC-32, and the signature in
//! base64, "-" for none; a version 2 snapshot, written before signatures,
//! has no such field and is read as unsigned, as its probes were). A directory whose time is
//! unchanged has had no probe added, replaced or removed (each is a rename
//! or unlink in it), so its probes are taken from the snapshot; any other
//! directory is read from disk. Directory times have a coarse clock, so a
//! directory changed less than a second before the snapshot was written is
//! always read from disk. The snapshot is written whole or not at all
//! (temporary file, fsync, rename) after start-up and when the store
//! closes; a missing, damaged or stale snapshot only costs a full read.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use probe_api::digest::Sha256Digest;
use probe_api::names::ProbePath;
use tracing::warn;

use super::entry::Entry;
use crate::store::disk::sync_dir;

const FILE: &str = "index.snapshot";
/// Version 1 (no CRC-32) is read as a missing snapshot: one full read.
const FIRST_LINE: &str = "kprobes-index 3";
const FIRST_LINE_V2: &str = "kprobes-index 2";
/// How long before the snapshot a directory must have stopped changing for
/// its time to vouch for its content.
const QUIET_NANOS: i128 = 1_000_000_000;

/// What a snapshot says of each module directory: its time and probes.
pub(super) struct Snapshot {
    dirs: HashMap<String, (i128, Vec<(String, Entry)>)>,
    written: i128,
}

impl Snapshot {
    /// The probes of `module_dir` (named `module`), if the snapshot still
    /// describes it.
    pub(super) fn take(&mut self, module: &str, module_dir: &Path) -> Option<Vec<(String, Entry)>> {
        let (mtime, _) = self.dirs.get(module)?;
        let current = modified_nanos(module_dir).ok()?;
        if current != *mtime || *mtime + QUIET_NANOS > self.written {
            return None;
        }
        self.dirs.remove(module).map(|(_, entries)| entries)
    }
}

/// The snapshot in `data_dir`, or `None` when there is none or it is
/// unreadable.
pub(super) fn read(data_dir: &Path) -> Option<Snapshot> {
    let text = match fs::read_to_string(data_dir.join(FILE)) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(error) => {
            warn!(%error, "the index snapshot is unreadable; reading every probe");
            return None;
        }
    };
    let parsed = parse(&text);
    if parsed.is_none() {
        warn!("the index snapshot is damaged; reading every probe");
    }
    parsed
}

fn parse(text: &str) -> Option<Snapshot> {
    let mut lines = text.lines();
    let with_signatures = match lines.next()? {
        FIRST_LINE => true,
        FIRST_LINE_V2 => false,
        _ => return None,
    };
    let written: i128 = lines.next()?.strip_prefix("W ")?.parse().ok()?;
    let mut dirs: HashMap<String, (i128, Vec<(String, Entry)>)> = HashMap::new();
    let mut current: Option<String> = None;
    let mut complete = false;
    for line in lines {
        let fields: Vec<&str> = line.split(' ').collect();
        match fields[..] {
            ["D", mtime, module] => {
                dirs.insert(module.to_owned(), (mtime.parse().ok()?, Vec::new()));
                current = Some(module.to_owned());
            }
            ["F", name, size, sha256, crc32, ref signature @ ..] if signature.len() == usize::from(with_signatures) => {
                let crc32 = match crc32 {
                    "-" => None,
                    hex => Some(u32::from_str_radix(hex, 16).ok()?),
                };
                let signature = match signature.first() {
                    None | Some(&"-") => None,
                    Some(base64) => Some(Bytes::from(STANDARD.decode(base64).ok()?)),
                };
                let (size, sha256) = (size.parse().ok()?, Sha256Digest::from_hex(sha256)?);
                let entry = Entry { size, sha256, crc32, signature };
                dirs.get_mut(current.as_ref()?)?.1.push((name.to_owned(), entry));
            }
            ["END"] => complete = true,
            _ => return None,
        }
    }
    complete.then_some(Snapshot { dirs, written })
}

/// How long to wait, before writing a snapshot on close, for every module
/// directory of `index` to have been quiet long enough to be vouched for:
/// zero unless one changed less than a second ago (an upload just before
/// shutdown). Waiting on close spares the next start-up reading that
/// directory's headers.
pub(super) fn quiet_wait(probes_dir: &Path, index: &BTreeMap<ProbePath, Entry>) -> std::time::Duration {
    let mut versions: Vec<&str> = index.keys().map(|path| path.module_version().as_str()).collect();
    versions.dedup();
    let latest = versions.iter().filter_map(|v| modified_nanos(&probes_dir.join(v)).ok()).max();
    let wait = latest.map_or(0, |latest| latest + QUIET_NANOS - nanos(SystemTime::now()));
    // A directory dated in the future (a clock step) is not waited for.
    std::time::Duration::from_nanos(wait.clamp(0, QUIET_NANOS) as u64)
}

/// Writes the snapshot of `index`, with the current times of the module
/// directories under `probes_dir`.
pub(super) fn write(data_dir: &Path, probes_dir: &Path, index: &BTreeMap<ProbePath, Entry>) -> io::Result<()> {
    let written = nanos(SystemTime::now());
    let temp = data_dir.join(format!("{FILE}.new"));
    let mut out = BufWriter::new(File::create(&temp)?);
    writeln!(out, "{FIRST_LINE}")?;
    writeln!(out, "W {written}")?;
    let mut module: Option<&str> = None;
    for (path, entry) in index {
        let version = path.module_version().as_str();
        if module != Some(version) {
            let mtime = modified_nanos(&probes_dir.join(version))?;
            writeln!(out, "D {mtime} {version}")?;
            module = Some(version);
        }
        let crc32 = entry.crc32.map_or_else(|| "-".to_owned(), |crc32| format!("{crc32:08x}"));
        let signature = entry.signature.as_ref().map_or_else(|| "-".to_owned(), |s| STANDARD.encode(s));
        writeln!(out, "F {} {} {} {crc32} {signature}", path.file_name(), entry.size, entry.sha256)?;
    }
    writeln!(out, "END")?;
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    fs::rename(&temp, data_dir.join(FILE))?;
    sync_dir(data_dir)
}

fn modified_nanos(path: &Path) -> io::Result<i128> {
    Ok(nanos(fs::metadata(path)?.modified()?))
}

fn nanos(time: SystemTime) -> i128 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i128)
}
