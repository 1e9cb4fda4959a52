//! The handle of one connection that its requests carry: its id (the
//! probe stream slots count per connection) and the way to close it at
//! once, which `ProbeSlots` uses on clients that stopped reading. A leaf:
//! what the connection serves depends on it, not the other way round.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::Notify;

/// One connection as requests and the accept loop see it.
#[derive(Clone)]
pub struct ConnectionHandle(Arc<HandleShared>);

struct HandleShared {
    id: u64,
    closed: AtomicBool,
    close: Notify,
}

impl ConnectionHandle {
    pub(super) fn new(id: u64) -> Self {
        ConnectionHandle(Arc::new(HandleShared { id, closed: AtomicBool::new(false), close: Notify::new() }))
    }

    /// A handle of no accepted connection (requests that did not come
    /// through `serve`, and tests); closing it affects nothing else.
    pub fn detached() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(u64::MAX / 2);
        Self::new(NEXT.fetch_add(1, Ordering::Relaxed))
    }

    pub fn id(&self) -> u64 {
        self.0.id
    }

    /// Closes the connection at once, streams in flight included.
    pub fn close(&self) {
        self.0.closed.store(true, Ordering::SeqCst);
        self.0.close.notify_one();
    }

    pub fn is_closed(&self) -> bool {
        self.0.closed.load(Ordering::SeqCst)
    }

    pub(super) async fn closed(&self) {
        self.0.close.notified().await;
    }
}
