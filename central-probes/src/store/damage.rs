//! The damaged probes a store's reads found (`check.rs` finds them): each
//! is remembered with the SHA-256 recorded for it, so that an upload of
//! that content repairs it rather than counting as identical, logged with
//! where the backend keeps it, and told to the server's metrics.
//!
//! A backend with a data directory names a file to keep them in
//! (`Backend::damage_file`: a line `<sha256> <path>` each, replaced whole),
//! so that what an offline `verify` or an earlier run found is still known
//! when Central starts, and the next upload repairs it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use probe_api::digest::Sha256Digest;
use probe_api::names::ProbePath;
use tracing::{debug, error, warn};

use super::StoredProbe;
use super::backend::Backend;
use super::check::OnDamaged;

#[derive(Default)]
pub(super) struct Damage {
    /// Told of each damaged probe found (the server's metrics).
    pub(super) on_damaged: Option<OnDamaged>,
    /// Kept until a commit writes the path or it is removed.
    found: Mutex<BTreeMap<ProbePath, Sha256Digest>>,
    /// Where they are kept across restarts, if anywhere.
    file: Option<PathBuf>,
}

impl Damage {
    /// What `file` (if any) holds; a line that does not parse is skipped.
    pub(super) fn open(file: Option<PathBuf>) -> Self {
        let text = file.as_ref().and_then(|file| std::fs::read_to_string(file).ok()).unwrap_or_default();
        let found = text
            .lines()
            .filter_map(|line| {
                let (sha256, path) = line.split_once(' ')?;
                Some((ProbePath::parse(path).ok()?, Sha256Digest::from_hex(sha256)?))
            })
            .collect();
        Damage { on_damaged: None, found: Mutex::new(found), file }
    }

    fn found(&self) -> MutexGuard<'_, BTreeMap<ProbePath, Sha256Digest>> {
        self.found.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The SHA-256 recorded for `path` when a read found it damaged.
    pub(super) fn get(&self, path: &ProbePath) -> Option<Sha256Digest> {
        self.found().get(path).copied()
    }

    /// Remembers that the probe recorded as `sha256` under `path` is
    /// damaged; whether that is news.
    pub(super) fn mark(&self, path: &ProbePath, sha256: Sha256Digest) -> bool {
        let mut found = self.found();
        let news = found.insert(path.clone(), sha256) != Some(sha256);
        if news {
            self.keep(&found);
        }
        news
    }

    /// Forgets `path`: written again, or removed.
    pub(super) fn clear(&self, path: &ProbePath) {
        let mut found = self.found();
        if found.remove(path).is_some() {
            self.keep(&found);
        }
    }

    /// Writes `found` to the file, under the lock so that writes keep
    /// their order. A failure loses only what the next restart would know.
    fn keep(&self, found: &BTreeMap<ProbePath, Sha256Digest>) {
        let Some(file) = &self.file else { return };
        let text: String = found.iter().map(|(path, sha256)| format!("{sha256} {path}\n")).collect();
        if let Err(error) = crate::private_file::replace(file, text.as_bytes()) {
            warn!(file = %file.display(), %error, "could not record the damaged probes; a restart forgets them");
        }
    }

    /// What a read of `backend` calls on finding a probe damaged:
    /// remembers it, tells `on_damaged`, and logs where it is kept (asked
    /// of the backend in a task of its own, off the read's path).
    pub(super) fn reporter<B: Backend>(self: &Arc<Self>, backend: Weak<B>) -> OnDamaged {
        let damage = self.clone();
        Arc::new(move |probe: &StoredProbe, why: &str| {
            let news = damage.mark(&probe.path, probe.sha256);
            if let Some(on_damaged) = &damage.on_damaged {
                on_damaged(probe, why);
            }
            // Logged once with where it is kept; a crowd of Collectors
            // asking again is counted (the metric), not logged line by line.
            if !news {
                debug!(path = %probe.path, why, "a probe known to be damaged was asked for again");
                return;
            }
            let (backend, path, logged_why) = (backend.clone(), probe.path.clone(), why.to_owned());
            let log = async move {
                let location = match backend.upgrade() {
                    Some(backend) => backend.location(&path).await,
                    None => "a store closed since".to_owned(),
                };
                error!(
                    %path, %location, why = logged_why,
                    "a stored probe is damaged and is not served: upload the support package that holds it again"
                );
            };
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn(log)),
                Err(_) => error!(path = %probe.path, why, "a stored probe is damaged and is not served"),
            }
        })
    }
}
