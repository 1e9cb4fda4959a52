//! What the Collector accepts (`--signature-policy`): in `required`, a
//! probe from the network or the node-local cache is used only if its
//! minisign signature verifies against a trusted key (`--trusted-keys`),
//! names this module version and file, and has a serial no lower than this
//! node accepted before for that probe (nor than `--min-serial`); `warn`
//! logs what `required` would refuse and goes on (for migrating); `off`
//! checks nothing. Probes built into the image are part of the image and
//! trusted as it is.
//!
//! The serials a node accepted are kept in `<state dir>/accepted-serials`,
//! a line `<probe path> <serial>` each, replaced whole (temporary file,
//! fsync, rename) when one rises.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use probe_api::names::ProbePath;
use probe_api::signing::{SignatureError, TrustedKeys, Verified};

/// `--signature-policy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Use only probes whose signature verifies.
    Required,
    /// Log what `required` would refuse, and use the probe anyway.
    Warn,
    /// Check nothing.
    Off,
}

impl Mode {
    /// As the flag spells it.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Required => "required",
            Mode::Warn => "warn",
            Mode::Off => "off",
        }
    }
}

/// What the check of one probe gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Checked {
    /// Verified: by this key, at this serial.
    Verified(Verified),
    /// Not checked (`off`), or refused but used anyway (`warn`).
    Unchecked,
}

#[derive(Debug)]
pub struct SignaturePolicy {
    mode: Mode,
    keys: Option<TrustedKeys>,
    min_serial: u64,
    serials: Option<AcceptedSerials>,
    /// Refusals by reason, for the report.
    refusals: Mutex<BTreeMap<&'static str, u64>>,
}

impl SignaturePolicy {
    /// A policy of `mode`; `required` and `warn` need `keys`.
    pub fn new(
        mode: Mode,
        keys: Option<TrustedKeys>,
        min_serial: u64,
        state_dir: Option<&Path>,
    ) -> Result<Self, String> {
        if mode != Mode::Off && keys.is_none() {
            return Err(format!("--signature-policy {} needs --trusted-keys (PROBE_TRUSTED_KEYS)", mode.name()));
        }
        let serials = state_dir.map(AcceptedSerials::load).transpose()?;
        Ok(SignaturePolicy { mode, keys, min_serial, serials, refusals: Mutex::new(BTreeMap::new()) })
    }

    /// Checks nothing.
    pub fn off() -> Self {
        Self::new(Mode::Off, None, 0, None).expect("off needs nothing")
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Whether sources should fetch signatures at all.
    pub fn wants_signatures(&self) -> bool {
        self.mode != Mode::Off
    }

    /// Checks the probe `path` (its file's bytes, as stored: gzip'd) and
    /// its signature. `Err` is the reason it must not be used.
    pub fn check(&self, path: &ProbePath, bytes: &[u8], signature: Option<&[u8]>) -> Result<Checked, SignatureError> {
        let Some(keys) = self.keys.as_ref().filter(|_| self.mode != Mode::Off) else { return Ok(Checked::Unchecked) };
        let checked = keys.verify(path, bytes, signature).and_then(|verified| {
            let accepted = self.serials.as_ref().map_or(0, |s| s.get(path)).max(self.min_serial);
            if verified.serial < accepted {
                return Err(SignatureError::Rollback { serial: verified.serial, accepted });
            }
            Ok(verified)
        });
        match checked {
            Ok(verified) => Ok(Checked::Verified(verified)),
            Err(why) => {
                *self.refusals.lock().unwrap_or_else(|p| p.into_inner()).entry(why.reason()).or_default() += 1;
                if self.mode == Mode::Warn {
                    tracing::warn!(%path, "signature-policy warn: using a probe that required would refuse: {why}");
                    return Ok(Checked::Unchecked);
                }
                Err(why)
            }
        }
    }

    /// Remembers that this node accepted `path` at `serial` (after the probe
    /// was written).
    pub fn accepted(&self, path: &ProbePath, serial: u64) -> io::Result<()> {
        match &self.serials {
            Some(serials) => serials.raise(path, serial),
            None => Ok(()),
        }
    }

    /// Signature refusals so far, by reason.
    pub fn refusals(&self) -> BTreeMap<&'static str, u64> {
        self.refusals.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The highest serial this node accepted per probe path.
#[derive(Debug)]
struct AcceptedSerials {
    file: PathBuf,
    serials: Mutex<BTreeMap<String, u64>>,
}

const STATE_FILE: &str = "accepted-serials";

impl AcceptedSerials {
    fn load(dir: &Path) -> Result<Self, String> {
        let file = dir.join(STATE_FILE);
        let text = match std::fs::read_to_string(&file) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(format!("reading {}: {e}", file.display())),
        };
        let mut serials = BTreeMap::new();
        for (number, line) in text.lines().enumerate().filter(|(_, line)| !line.trim().is_empty()) {
            let parsed = line.split_once(' ').and_then(|(path, serial)| Some((path, serial.parse::<u64>().ok()?)));
            // A damaged state must not reset what the node remembers.
            let Some((path, serial)) = parsed else {
                return Err(format!("{} line {} is not \"<probe path> <serial>\"", file.display(), number + 1));
            };
            serials.insert(path.to_owned(), serial);
        }
        Ok(AcceptedSerials { file, serials: Mutex::new(serials) })
    }

    fn get(&self, path: &ProbePath) -> u64 {
        self.serials.lock().unwrap_or_else(|p| p.into_inner()).get(&path.to_string()).copied().unwrap_or(0)
    }

    fn raise(&self, path: &ProbePath, serial: u64) -> io::Result<()> {
        let mut serials = self.serials.lock().unwrap_or_else(|p| p.into_inner());
        let known = serials.entry(path.to_string()).or_default();
        if *known >= serial {
            return Ok(());
        }
        *known = serial;
        let text: String = serials.iter().map(|(path, serial)| format!("{path} {serial}\n")).collect();
        let dir = self.file.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        crate::cache::write_atomically(&self.file, text.as_bytes())?;
        std::fs::File::open(dir)?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_serials_only_rise_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = ProbePath::parse("2.5.0/collector-ebpf-5.4.0.o.gz").unwrap();
        let serials = AcceptedSerials::load(dir.path()).unwrap();
        assert_eq!(serials.get(&path), 0);
        serials.raise(&path, 5).unwrap();
        serials.raise(&path, 3).unwrap();
        let again = AcceptedSerials::load(dir.path()).unwrap();
        assert_eq!(again.get(&path), 5);
        std::fs::write(dir.path().join(STATE_FILE), "garbage\n").unwrap();
        assert!(AcceptedSerials::load(dir.path()).unwrap_err().contains("line 1"));
    }

    #[test]
    fn required_and_warn_need_keys() {
        assert!(SignaturePolicy::new(Mode::Required, None, 0, None).unwrap_err().contains("--trusted-keys"));
        assert!(SignaturePolicy::new(Mode::Warn, None, 0, None).is_err());
        let off = SignaturePolicy::off();
        let path = ProbePath::parse("2.5.0/collector-ebpf-5.4.0.o.gz").unwrap();
        assert_eq!(off.check(&path, b"anything", None), Ok(Checked::Unchecked));
    }
}
