//! The handle of one connection that its requests carry: its id (the
//! probe stream slots count per connection) and the way to close it at
//! once, which `ProbeSlots` uses on clients that stopped reading, through
//! the `Connection` trait the slots own.

use std::sync::Arc;

use tokio::sync::Notify;

use crate::server::serving::slots::Connection;

/// One connection as requests and the accept loop see it.
#[derive(Clone)]
pub struct ConnectionHandle(Arc<HandleShared>);

struct HandleShared {
    id: u64,
    close: Notify,
}

impl ConnectionHandle {
    pub(super) fn new(id: u64) -> Self {
        ConnectionHandle(Arc::new(HandleShared { id, close: Notify::new() }))
    }

    pub fn id(&self) -> u64 {
        self.0.id
    }

    /// Closes the connection at once, streams in flight included.
    pub fn close(&self) {
        self.0.close.notify_one();
    }

    pub(super) async fn closed(&self) {
        self.0.close.notified().await;
    }
}

impl Connection for ConnectionHandle {
    fn id(&self) -> u64 {
        ConnectionHandle::id(self)
    }

    fn close(&self) {
        ConnectionHandle::close(self)
    }
}
