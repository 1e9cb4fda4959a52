//! Who gets a descriptor: the registry of live connections (evicting the
//! oldest still in its handshake), the process's descriptor limit, and the
//! accept loop's pause when descriptors run out.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tracing::warn;

use super::handle::ConnectionHandle;

/// Live connections, by id (the oldest first), and whether each is still
/// in its handshake.
#[derive(Default)]
pub(super) struct Registry {
    connections: Mutex<BTreeMap<u64, (ConnectionHandle, bool)>>,
    next_id: AtomicU64,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, (ConnectionHandle, bool)>> {
        self.connections.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A new connection, in its handshake until told otherwise.
    pub(super) fn register(self: &Arc<Self>) -> (ConnectionHandle, Registration) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let handle = ConnectionHandle::new(id);
        self.lock().insert(id, (handle.clone(), true));
        (handle, Registration { registry: self.clone(), id })
    }

    pub(super) fn len(&self) -> usize {
        self.lock().len()
    }

    /// Closes the oldest connection still in its handshake, if any.
    pub(super) fn evict_oldest_handshake(&self) -> bool {
        let mut connections = self.lock();
        let Some(id) = connections.iter().find(|(_, (_, handshaking))| *handshaking).map(|(id, _)| *id) else {
            return false;
        };
        let (handle, _) = connections.remove(&id).expect("just found");
        handle.close();
        true
    }
}

/// Removes its connection from the registry when the connection ends.
pub(super) struct Registration {
    registry: Arc<Registry>,
    id: u64,
}

impl Registration {
    /// The TLS handshake is done: no longer the first to be evicted.
    pub(super) fn handshake_done(&self) {
        if let Some((_, handshaking)) = self.registry.lock().get_mut(&self.id) {
            *handshaking = false;
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}

/// Raises the soft limit of open descriptors to the hard limit and returns
/// the soft limit in force.
pub fn raise_descriptor_limit() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `limit` is a valid rlimit to write into.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 1024;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
        // SAFETY: `raised` is a valid rlimit; raising up to the hard limit
        // needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    // rlim_t is u64 on Linux but not everywhere.
    #[allow(clippy::useless_conversion)]
    u64::from(limit.rlim_cur)
}

/// How often running out of descriptors is logged at most.
pub(super) const WARN_EVERY: Duration = Duration::from_secs(60);

/// Pauses of the accept loop while the process is out of descriptors, and
/// a log line at most every `WARN_EVERY`, not one per attempt.
#[derive(Default)]
pub(super) struct AcceptBackoff {
    /// Failures since the last successful accept: the pause grows with them.
    consecutive: u32,
    /// Failures not yet reported in a log line.
    unreported: u64,
    last_warning: Option<Instant>,
}

impl AcceptBackoff {
    pub(super) fn failed(&mut self, evicted: bool, error: &std::io::Error) -> Duration {
        self.unreported += 1;
        if self.last_warning.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
            warn!(
                %error,
                refused_accepts = self.unreported,
                "out of file descriptors: closing connections still in their handshake, oldest first"
            );
            self.last_warning = Some(Instant::now());
            self.unreported = 0;
        }
        self.consecutive += 1;
        if evicted {
            // The evicted connection frees its descriptor once its task runs.
            return Duration::from_millis(1);
        }
        Duration::from_millis(5 << self.consecutive.min(8)).min(Duration::from_secs(1))
    }

    pub(super) fn succeeded(&mut self) {
        self.consecutive = 0;
    }
}
