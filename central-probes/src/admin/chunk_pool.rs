//! Reusable buffers for the pieces of a package on their way to the network.
//!
//! An upload hands every piece it reads to tonic as `Bytes`. Reading into a
//! scratch buffer and copying each piece into a new allocation costs a copy
//! of the whole package and an allocation per piece, each touched fresh (the
//! kernel zero-fills new pages: 2 GB of them for a 2 GB package). Here a
//! piece is read straight into a pooled buffer and handed on as it is; when
//! tonic has encoded and dropped it, the buffer returns to the pool.

use std::ops::Deref;
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, sync_channel};

use bytes::Bytes;

/// At most `count` buffers of `size` bytes, made as they are first needed.
pub struct ChunkPool {
    size: usize,
    /// Buffers not made yet.
    unmade: usize,
    free: Receiver<Vec<u8>>,
    give_back: SyncSender<Vec<u8>>,
}

impl ChunkPool {
    pub fn new(size: usize, count: usize) -> ChunkPool {
        let (give_back, free) = sync_channel(count);
        ChunkPool { size, unmade: count, free, give_back }
    }

    /// Bytes per buffer.
    pub fn size(&self) -> usize {
        self.size
    }

    /// A free buffer; waits for one to come back when all are in use.
    pub fn take(&mut self) -> Chunk {
        let buffer = match self.free.try_recv() {
            Ok(buffer) => buffer,
            Err(TryRecvError::Empty) if self.unmade > 0 => {
                self.unmade -= 1;
                vec![0; self.size]
            }
            // Never disconnected: the pool holds a sender itself.
            Err(_) => self.free.recv().expect("the pool holds a sender"),
        };
        Chunk { buffer, len: 0, give_back: self.give_back.clone() }
    }
}

/// A buffer of the pool and how many of its bytes are filled.
pub struct Chunk {
    buffer: Vec<u8>,
    len: usize,
    give_back: SyncSender<Vec<u8>>,
}

impl Chunk {
    /// The whole buffer, to read into; then `set_len` says how much was read.
    pub fn space(&mut self) -> &mut [u8] {
        &mut self.buffer
    }

    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.buffer.len(), "a chunk holds at most its buffer");
        self.len = len;
    }

    /// The filled bytes, without copying them; the buffer goes back to the
    /// pool when the last `Bytes` of it is dropped.
    pub fn into_bytes(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl Deref for Chunk {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.buffer[..self.len]
    }
}

impl AsRef<[u8]> for Chunk {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        // Fails only when the pool is gone, and then the buffer is freed.
        let _ = self.give_back.try_send(std::mem::take(&mut self.buffer));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_chunk_returns_its_buffer_and_bytes_keep_theirs_until_dropped() {
        let mut pool = ChunkPool::new(4, 1);
        let mut chunk = pool.take();
        chunk.space()[..3].copy_from_slice(b"abc");
        chunk.set_len(3);
        let bytes = chunk.into_bytes();
        let view = bytes.slice(1..);
        drop(bytes);
        assert_eq!(&view[..], b"bc", "a slice keeps the buffer");
        let address = view.as_ptr() as usize - 1;
        drop(view);
        // The one buffer came back: taking again reuses it, making none.
        let again = pool.take();
        assert_eq!(again.buffer.as_ptr() as usize, address);
        assert!(again.is_empty(), "a taken chunk starts empty");
    }

    #[test]
    fn take_waits_for_a_buffer_when_all_are_in_use() {
        let mut pool = ChunkPool::new(8, 2);
        let first = pool.take();
        let first_address = first.buffer.as_ptr() as usize;
        let _second = pool.take();
        let returner = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            drop(first);
        });
        let third = pool.take();
        assert_eq!(third.buffer.as_ptr() as usize, first_address, "no third buffer is made");
        returner.join().unwrap();
    }
}
