//! The damaged probes a store's reads found (`check.rs` finds them): each
//! is remembered with the SHA-256 recorded for it, so that an upload of
//! that content repairs it rather than counting as identical, logged with
//! where the backend keeps it, and told to the server's metrics.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use probe_api::digest::Sha256Digest;
use probe_api::names::ProbePath;
use tracing::error;

use super::StoredProbe;
use super::backend::Backend;
use super::check::OnDamaged;

#[derive(Default)]
pub(super) struct Damage {
    /// Told of each damaged probe found (the server's metrics).
    pub(super) on_damaged: Option<OnDamaged>,
    /// Kept until a commit writes the path or it is removed.
    found: Mutex<HashMap<ProbePath, Sha256Digest>>,
}

impl Damage {
    pub(super) fn found(&self) -> MutexGuard<'_, HashMap<ProbePath, Sha256Digest>> {
        self.found.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// What a read of `backend` calls on finding a probe damaged:
    /// remembers it, tells `on_damaged`, and logs where it is kept (asked
    /// of the backend in a task of its own, off the read's path).
    pub(super) fn reporter<B: Backend>(self: &Arc<Self>, backend: Weak<B>) -> OnDamaged {
        let damage = self.clone();
        Arc::new(move |probe: &StoredProbe, why: &str| {
            damage.found().insert(probe.path.clone(), probe.sha256);
            if let Some(on_damaged) = &damage.on_damaged {
                on_damaged(probe, why);
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
