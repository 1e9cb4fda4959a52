//! A probe's chunks handed to a blocking thread through a bounded channel:
//! how the filesystem backends write off the runtime's threads. The thread
//! gets the receiving end and gives back what it wrote into (a temporary
//! file, a pack lease); dropping the writer closes the channel, and the
//! thread's own clean-up runs when it ends.

use std::io;

use bytes::Bytes;
use probe_api::names::ProbePath;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};

/// Chunks queued between the network and the writing thread.
const WRITE_QUEUE: usize = 16;

pub(crate) struct ChunkWriter<T> {
    path: ProbePath,
    chunks: mpsc::Sender<Bytes>,
    worker: JoinHandle<io::Result<T>>,
}

impl<T: Send + 'static> ChunkWriter<T> {
    /// Starts `write` on a blocking thread, fed the chunks of `path`.
    pub(crate) fn start(
        path: &ProbePath,
        write: impl FnOnce(mpsc::Receiver<Bytes>) -> io::Result<T> + Send + 'static,
    ) -> Self {
        let (chunks, receiver) = mpsc::channel(WRITE_QUEUE);
        let worker = tokio::task::spawn_blocking(move || write(receiver));
        ChunkWriter { path: path.clone(), chunks, worker }
    }

    /// Queues the next chunk; the thread's error if it stopped.
    pub(crate) async fn write(&mut self, chunk: Bytes) -> Result<()> {
        if self.chunks.send(chunk).await.is_err() {
            // The thread stopped early: only a write error does that.
            let error = match (&mut self.worker).await {
                Ok(Err(error)) => Error::io(format!("writing {}", self.path), error),
                _ => Error::internal(format!("writing {}: the writer stopped", self.path)),
            };
            return Err(error);
        }
        Ok(())
    }

    /// Closes the channel and waits for the thread's result.
    pub(crate) async fn finish(self) -> Result<T> {
        let ChunkWriter { path, chunks, worker } = self;
        drop(chunks);
        worker
            .await
            .map_err(|e| Error::internal(format!("writing {path}: {e}")))?
            .map_err(|e| Error::io(format!("writing {path}"), e))
    }
}
