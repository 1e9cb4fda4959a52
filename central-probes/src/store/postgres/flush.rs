//! Group flush of the write-ahead log: durable commits without one WAL
//! fsync per file in a row.
//!
//! An upload's files take effect in stream order, so each file's commit
//! waits for the one before it to be visible. With PostgreSQL's default
//! `synchronous_commit`, visible also means flushed, and the files of an
//! upload would pay one WAL fsync each, one after the other. Instead a
//! file's transaction commits with `synchronous_commit = off` (visible at
//! once, in order), tells the next file it may go, and then waits here for
//! a flush that began after its commit. A flush is a transaction of its own
//! that writes to the log and commits synchronously: PostgreSQL flushes the
//! log up to its commit record, which is after the commit records of every
//! file that waits. One
//! flush runs at a time; the files whose commits landed meanwhile share the
//! next one. A file is reported stored only after its flush, so the
//! guarantee is unchanged: a file reported STORED survives a crash of the
//! database or of its machine.

use std::sync::atomic::{AtomicU64, Ordering};

use deadpool_postgres::Object;
use tokio::sync::Mutex;

use super::connection::db_error;
use crate::error::Result;

/// Makes earlier asynchronous commits durable, many at a time.
#[derive(Default)]
pub struct GroupFlush {
    /// Flushes begun so far.
    begun: AtomicU64,
    /// Flushes finished so far; held while one runs.
    finished: Mutex<u64>,
}

impl GroupFlush {
    /// Returns once every transaction that committed on any connection
    /// before this call is durable. Runs the flush on `client` when no flush
    /// that began after the call has finished yet.
    pub async fn flush(&self, client: &Object) -> Result<()> {
        // A flush running now may have begun before our commit: only a
        // later one is sure to cover it.
        let needed = self.begun.load(Ordering::SeqCst) + 1;
        let mut finished = self.finished.lock().await;
        if *finished >= needed {
            return Ok(());
        }
        let number = self.begun.fetch_add(1, Ordering::SeqCst) + 1;
        // A transaction that wrote to the log and commits synchronously
        // flushes the log up to its commit record. (One that only took a
        // transaction ID would commit asynchronously: nothing to flush.) A
        // transactional logical message writes a record and changes no
        // table; logical decoding skips it unless asked for messages.
        client
            .batch_execute("SELECT pg_logical_emit_message(true, 'kprobes', 'flush')")
            .await
            .map_err(|e| db_error("making commits durable", e))?;
        *finished = number;
        Ok(())
    }
}
