//! VerifyProbes: every stored probe read through a thorough check
//! (`store::check::verify_all`), each damaged one streamed as it is found,
//! then a summary, for `central-probes verify -e`. A task per verification
//! reads the store; one runs at a time, since each reads every stored byte.

use std::sync::Arc;
use std::time::Duration;

use probe_api::v1::verify_probes_response::Message;
use probe_api::v1::{DamagedProbe, VerifyProbesRequest, VerifyProbesResponse, VerifySummary};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::server::export::module_versions_asked;
use crate::store::ProbeStore;
use crate::store::check::verify_all;

/// The messages of one verification; it ends with its summary, or with an
/// error.
pub type VerifyStream = ReceiverStream<Result<VerifyProbesResponse, Status>>;

/// Runs verifications, one at a time.
pub struct Verifications {
    store: Arc<dyn ProbeStore>,
    running: Arc<Semaphore>,
    /// A verification whose client takes nothing for this long is ended.
    send_timeout: Duration,
}

impl Verifications {
    /// Verifies `store` (the record, without caches).
    pub fn new(store: Arc<dyn ProbeStore>, send_timeout: Duration) -> Self {
        Verifications { store, running: Arc::new(Semaphore::new(1)), send_timeout }
    }

    /// Checks the request and starts the verification it asks for.
    pub fn start(&self, request: VerifyProbesRequest) -> Result<VerifyStream> {
        let versions = module_versions_asked(&request.module_versions, "verification")?;
        let Ok(permit) = self.running.clone().try_acquire_owned() else {
            return Err(Error::new(
                Code::ResourceExhausted,
                "Central is verifying its store already; retry when that verification has finished",
            ));
        };
        let (sender, receiver) = mpsc::channel(16);
        let (store, send_timeout) = (self.store.clone(), self.send_timeout);
        tokio::spawn(async move {
            let _permit = permit;
            let send = |message: Result<VerifyProbesResponse, Status>| {
                let sender = sender.clone();
                async move {
                    match tokio::time::timeout(send_timeout, sender.send(message)).await {
                        Ok(Ok(())) => Ok(()),
                        // Gone or not reading: stop reading the store.
                        _ => Err(Error::new(Code::Unavailable, "the client stopped reading the verification")),
                    }
                }
            };
            let (found, mut messages) = mpsc::unbounded_channel();
            let verified = {
                let run = verify_all(store.as_ref(), &versions, |damaged| {
                    let message =
                        Message::Damaged(DamagedProbe { probe: Some(damaged.probe.into()), reason: damaged.why });
                    found.send(message).map_err(|_| Error::internal("the verification's queue is gone"))
                });
                tokio::pin!(run);
                // Each damaged probe goes out as it is found.
                loop {
                    tokio::select! {
                        verified = &mut run => break verified,
                        // A client gone (Ctrl-C, its deadline) frees the
                        // one verification at once, not after every byte.
                        () = sender.closed() => {
                            info!("the client of a verification went away: stopped");
                            return;
                        }
                        Some(message) = messages.recv() => {
                            if let Err(error) = send(Ok(VerifyProbesResponse { message: Some(message) })).await {
                                break Err(error);
                            }
                        }
                    }
                }
            };
            drop(found);
            while let Some(message) = messages.recv().await {
                if send(Ok(VerifyProbesResponse { message: Some(message) })).await.is_err() {
                    return;
                }
            }
            let last = match verified {
                Ok(summary) => {
                    info!(
                        checked = summary.checked,
                        bytes = summary.bytes,
                        damaged = summary.damaged,
                        "store verified"
                    );
                    Ok(VerifyProbesResponse {
                        message: Some(Message::Summary(VerifySummary {
                            checked_count: summary.checked,
                            checked_bytes: summary.bytes,
                            damaged_count: summary.damaged,
                        })),
                    })
                }
                Err(error) => {
                    warn!(%error, "a verification of the store ended early");
                    Err(Status::from(error))
                }
            };
            let _ = send(last).await;
        });
        Ok(ReceiverStream::new(receiver))
    }
}
