//! What the Collector accepts (`--signature-policy`): in `required`, a
//! probe from the network or the node-local cache is used only if its
//! minisign signature verifies against a trusted key (`--trusted-keys`),
//! names this module version and file, and has a serial no lower than this
//! node accepted before for any candidate name of its kernel in that module
//! version (nor than `--min-serial`): a server that answers the first
//! candidate "not found" and serves an older probe under another name
//! (Ubuntu's `~20.04`, minikube's) is refused as a rollback. `warn` logs
//! what `required` would refuse and goes on (for migrating); `off` checks
//! nothing. Probes built into the image are part of the image and trusted
//! as it is.
//!
//! The serials a node accepted are kept in `<state dir>/accepted-serials`,
//! a line `<probe path> <serial>` each. Every `get-probe` on the node
//! updates it under the state directory's lock, reading it again there, so
//! two runs at once neither lower a serial nor drop another's line; the
//! update is durable before the probe is written where the Collector loads
//! it. A state file that cannot be read fails the run: forgetting serials
//! would reopen rollbacks.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use probe_api::names::ProbePath;
use probe_api::signing::{SignatureError, TrustedKeys, Verified};

use crate::files::Dir;

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
    /// The probe path of every candidate name of this node's kernel: a
    /// serial accepted for one is the floor for all.
    kernel: Vec<ProbePath>,
    /// Refusals by reason, for the report.
    refusals: Mutex<BTreeMap<&'static str, u64>>,
}

impl SignaturePolicy {
    /// A policy of `mode` for the probes of `kernel` (the paths of its
    /// candidate names); `required` and `warn` need `keys`. With a
    /// `state_dir`, the serials this node accepted are kept there.
    pub fn new(
        mode: Mode,
        keys: Option<TrustedKeys>,
        min_serial: u64,
        state_dir: Option<&Path>,
        kernel: Vec<ProbePath>,
    ) -> Result<Self, String> {
        if mode != Mode::Off && keys.is_none() {
            return Err(format!("--signature-policy {} needs --trusted-keys (PROBE_TRUSTED_KEYS)", mode.name()));
        }
        let serials = state_dir.filter(|_| mode != Mode::Off).map(AcceptedSerials::open).transpose()?;
        Ok(SignaturePolicy { mode, keys, min_serial, serials, kernel, refusals: Mutex::new(BTreeMap::new()) })
    }

    /// Checks nothing.
    pub fn off() -> Self {
        Self::new(Mode::Off, None, 0, None, Vec::new()).expect("off needs nothing")
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
            let accepted =
                self.serials.as_ref().map_or(0, |s| floor(&s.known, &self.kernel, path)).max(self.min_serial);
            if verified.serial < accepted {
                return Err(SignatureError::Rollback { serial: verified.serial, accepted });
            }
            Ok(verified)
        });
        match checked {
            Ok(verified) => Ok(Checked::Verified(verified)),
            Err(why) => {
                self.refused(&why);
                if self.mode == Mode::Warn {
                    tracing::warn!(%path, "signature-policy warn: using a probe that required would refuse: {why}");
                    return Ok(Checked::Unchecked);
                }
                Err(why)
            }
        }
    }

    fn refused(&self, why: &SignatureError) {
        *self.refusals.lock().unwrap_or_else(|p| p.into_inner()).entry(why.reason()).or_default() += 1;
    }

    /// Records that this node accepts `path` at `serial`, durably, before
    /// the probe is used. Under the state's lock the floor is read again:
    /// if another run on the node accepted a higher serial for this kernel
    /// meanwhile, this one is refused as a rollback after all.
    pub fn accept(&self, path: &ProbePath, serial: u64) -> Result<(), String> {
        let Some(serials) = &self.serials else { return Ok(()) };
        let rollback = serials.raise(path, serial, &self.kernel)?;
        match rollback {
            None => Ok(()),
            Some(why) => {
                self.refused(&why);
                if self.mode == Mode::Warn {
                    tracing::warn!(%path, "signature-policy warn: using a probe that required would refuse: {why}");
                    return Ok(());
                }
                Err(format!("signature refused: {why}"))
            }
        }
    }

    /// Signature refusals so far, by reason.
    pub fn refusals(&self) -> BTreeMap<&'static str, u64> {
        self.refusals.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The highest serial in `known` for `path` or any path of `kernel`.
fn floor(known: &BTreeMap<String, u64>, kernel: &[ProbePath], path: &ProbePath) -> u64 {
    kernel.iter().chain([path]).filter_map(|p| known.get(&p.to_string())).copied().max().unwrap_or(0)
}

/// The highest serial this node accepted per probe path: what the state
/// file held when the run started (for the checks while fetching), and the
/// directory to update it in.
#[derive(Debug)]
struct AcceptedSerials {
    dir: Dir,
    known: BTreeMap<String, u64>,
}

const STATE_FILE: &str = "accepted-serials";
/// Far above any node's state (a line per probe it ever accepted).
const MAX_STATE_FILE: u64 = 16 << 20;

impl AcceptedSerials {
    fn open(path: &Path) -> Result<Self, String> {
        let dir = Dir::open(path, true).map_err(|e| format!("opening the state directory: {e}"))?;
        let known = read_state(&dir)?;
        Ok(AcceptedSerials { dir, known })
    }

    /// Raises `path` to `serial` under the lock, unless that would be a
    /// rollback for `kernel` by what the file holds now.
    fn raise(&self, path: &ProbePath, serial: u64, kernel: &[ProbePath]) -> Result<Option<SignatureError>, String> {
        let locked = self.dir.lock().map_err(|e| format!("locking the state directory: {e}"))?;
        let mut known = read_state(&self.dir)?;
        let accepted = floor(&known, kernel, path);
        if serial < accepted {
            return Ok(Some(SignatureError::Rollback { serial, accepted }));
        }
        let entry = known.entry(path.to_string()).or_default();
        if *entry >= serial {
            return Ok(None);
        }
        *entry = serial;
        let text: String = known.iter().map(|(path, serial)| format!("{path} {serial}\n")).collect();
        locked
            .replace(STATE_FILE, text.as_bytes(), 0o600)
            .map_err(|e| format!("recording the accepted serial: {e}"))?;
        Ok(None)
    }
}

fn read_state(dir: &Dir) -> Result<BTreeMap<String, u64>, String> {
    let file = dir.path().join(STATE_FILE);
    let bytes = dir.read(STATE_FILE, MAX_STATE_FILE).map_err(|e| format!("reading {}: {e}", file.display()))?;
    let text = String::from_utf8(bytes.unwrap_or_default()).map_err(|_| {
        format!("{} is not text: move it away only if this node may forget its serials", file.display())
    })?;
    let mut serials = BTreeMap::new();
    for (number, line) in text.lines().enumerate().filter(|(_, line)| !line.trim().is_empty()) {
        let parsed = line.split_once(' ').and_then(|(path, serial)| Some((path, serial.parse::<u64>().ok()?)));
        // A damaged state must not reset what the node remembers.
        let Some((path, serial)) = parsed else {
            return Err(format!("{} line {} is not \"<probe path> <serial>\"", file.display(), number + 1));
        };
        serials.insert(path.to_owned(), serial);
    }
    Ok(serials)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(text: &str) -> ProbePath {
        ProbePath::parse(text).unwrap()
    }

    #[test]
    fn accepted_serials_only_rise_survive_a_restart_and_fail_closed() {
        let dir = tempfile::tempdir().unwrap();
        let probe = path("2.5.0/collector-ebpf-5.4.0.o.gz");
        let kernel = [probe.clone()];
        let serials = AcceptedSerials::open(dir.path()).unwrap();
        assert_eq!(floor(&serials.known, &kernel, &probe), 0);
        assert!(serials.raise(&probe, 5, &kernel).unwrap().is_none());
        assert!(serials.raise(&probe, 5, &kernel).unwrap().is_none(), "the same serial again");
        assert!(matches!(
            serials.raise(&probe, 3, &kernel),
            Ok(Some(SignatureError::Rollback { serial: 3, accepted: 5 }))
        ));
        let again = AcceptedSerials::open(dir.path()).unwrap();
        assert_eq!(floor(&again.known, &kernel, &probe), 5);
        std::fs::write(dir.path().join(STATE_FILE), "garbage\n").unwrap();
        assert!(AcceptedSerials::open(dir.path()).unwrap_err().contains("line 1"));
        assert!(again.raise(&probe, 9, &kernel).unwrap_err().contains("line 1"), "damaged under the lock too");
    }

    #[test]
    fn a_serial_accepted_for_one_candidate_is_the_floor_for_every_candidate() {
        let dir = tempfile::tempdir().unwrap();
        let first = path("2.5.0/collector-ebpf-5.4.0-42-generic.o.gz");
        let backport = path("2.5.0/collector-ebpf-5.4.0-42-generic~20.04.o.gz");
        let kernel = [first.clone(), backport.clone()];
        let serials = AcceptedSerials::open(dir.path()).unwrap();
        assert!(serials.raise(&first, 7, &kernel).unwrap().is_none());
        let restarted = AcceptedSerials::open(dir.path()).unwrap();
        assert_eq!(floor(&restarted.known, &kernel, &backport), 7, "the other name of the same kernel");
        assert!(matches!(restarted.raise(&backport, 6, &kernel), Ok(Some(SignatureError::Rollback { .. }))));
        let other_version = path("2.6.0/collector-ebpf-5.4.0-42-generic.o.gz");
        assert_eq!(
            floor(&restarted.known, std::slice::from_ref(&other_version), &other_version),
            0,
            "per module version"
        );
    }

    #[test]
    fn runs_at_once_lose_no_entry_and_lower_no_serial() {
        let dir = tempfile::tempdir().unwrap();
        let names: Vec<ProbePath> = (0..8).map(|i| path(&format!("2.5.0/collector-ebpf-5.4.{i}.o.gz"))).collect();
        let all_opened = std::sync::Barrier::new(names.len());
        std::thread::scope(|scope| {
            for (i, name) in names.iter().enumerate() {
                let (dir, all_opened) = (dir.path(), &all_opened);
                scope.spawn(move || {
                    // Each run opens the state before any other writes it.
                    let serials = AcceptedSerials::open(dir).unwrap();
                    all_opened.wait();
                    for serial in [3, 10 + i as u64, 5] {
                        let _ = serials.raise(name, serial, std::slice::from_ref(name)).unwrap();
                    }
                });
            }
        });
        let known = AcceptedSerials::open(dir.path()).unwrap().known;
        for (i, name) in names.iter().enumerate() {
            assert_eq!(known.get(&name.to_string()), Some(&(10 + i as u64)), "{name}");
        }
    }

    #[test]
    fn required_and_warn_need_keys() {
        assert!(
            SignaturePolicy::new(Mode::Required, None, 0, None, Vec::new()).unwrap_err().contains("--trusted-keys")
        );
        assert!(SignaturePolicy::new(Mode::Warn, None, 0, None, Vec::new()).is_err());
        let off = SignaturePolicy::off();
        assert_eq!(off.check(&path("2.5.0/collector-ebpf-5.4.0.o.gz"), b"anything", None), Ok(Checked::Unchecked));
    }
}
