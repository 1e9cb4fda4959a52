//! Any sequence of upload messages into the upload state machine and a real
//! store: it must end with a response or a clear error, never panic, and
//! never leave a file in tmp/ behind.
//!
//! Input format: repeated [u16 little-endian length][encoded UploadProbesRequest];
//! undecodable messages end the sequence.
#![no_main]

use std::sync::{Arc, OnceLock};

use central_probes::store::ProbeStore;
use central_probes::store::filesystem::{FilesystemStore, FilesystemStoreConfig};
use central_probes::server::upload_session::UploadSession;
use libfuzzer_sys::fuzz_target;
use probe_api::v1::UploadProbesRequest;
use prost::Message;

struct World {
    runtime: tokio::runtime::Runtime,
    store: Arc<dyn ProbeStore>,
    dir: tempfile::TempDir,
}

fn messages(mut data: &[u8]) -> Vec<UploadProbesRequest> {
    let mut messages = Vec::new();
    while data.len() >= 2 {
        let len = u16::from_le_bytes([data[0], data[1]]) as usize;
        let Some(body) = data.get(2..2 + len) else { break };
        let Ok(message) = UploadProbesRequest::decode(body) else { break };
        messages.push(message);
        data = &data[2 + len..];
    }
    messages
}

fuzz_target!(|data: &[u8]| {
    static WORLD: OnceLock<World> = OnceLock::new();
    let world = WORLD.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let config = FilesystemStoreConfig { data_dir: dir.path().to_owned(), min_free_bytes: 0 };
        let store: Arc<dyn ProbeStore> = Arc::new(FilesystemStore::open(&config).unwrap());
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        World { runtime, store, dir }
    });
    let requests = tokio_stream::iter(messages(data).into_iter().map(Ok));
    let _ = world.runtime.block_on(UploadSession::new(world.store.clone()).run(requests));
    // Writers dropped mid-file remove their file from their own thread.
    for _ in 0..200 {
        if std::fs::read_dir(world.dir.path().join("tmp")).unwrap().count() == 0 {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    panic!("a temporary file stayed behind");
});
