//! The change feed of a database store: every commit and removal notifies
//! `CHANGES_CHANNEL` with the probe's path; each replica listens on a
//! connection of its own and hands the paths to `ReadThrough`, which trusts
//! its local copies only while this feed is live.

use std::time::Duration;

use probe_api::names::ProbePath;
use tokio::sync::mpsc;
use tokio_postgres::NoTls;
use tonic::Code;
use tracing::warn;

use super::PostgresBackend;
use super::connection::{Connector, db_error};
use super::rows::CHANGES_CHANNEL;
use crate::error::{Error, Result};
use crate::store::read_through::RecordChange;

impl PostgresBackend {
    /// Changes made through any replica, as they commit: a task listens on
    /// a connection of its own, reconnecting after a loss (each second),
    /// and ends when the receiver is dropped.
    pub fn changes(&self) -> mpsc::Receiver<RecordChange> {
        let (sender, receiver) = mpsc::channel(1024);
        let (mut config, connector) = self.settings.clone();
        // A connection that only waits would notice a silent network
        // partition never; TCP keepalive notices it within about a minute,
        // after which every read is checked again.
        config
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(30))
            .keepalives_interval(Duration::from_secs(10))
            .keepalives_retries(3);
        tokio::spawn(async move {
            loop {
                let ended = match &connector {
                    Connector::Plain => listen(&config, NoTls, &sender).await,
                    Connector::Tls(tls) => listen(&config, tls.clone(), &sender).await,
                };
                if let Err(error) = ended {
                    warn!(%error, "lost the database's change notifications; checking every read until they are back");
                }
                if sender.send(RecordChange::Lost).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        receiver
    }
}

/// Listens on one connection until it fails: `Live` once listening, then
/// one `Changed` per notification.
async fn listen<T>(config: &tokio_postgres::Config, tls: T, changes: &mpsc::Sender<RecordChange>) -> Result<()>
where
    T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>,
    T::Stream: Send + 'static,
{
    let (client, mut connection) = config.connect(tls).await.map_err(|e| db_error("connecting to listen", e))?;
    let (paths, mut notified) = mpsc::unbounded_channel::<String>();
    // Polling the connection both runs the client's statements and yields
    // the notifications.
    let driver = tokio::spawn(async move {
        while let Some(Ok(message)) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            if let tokio_postgres::AsyncMessage::Notification(note) = message
                && paths.send(note.payload().to_owned()).is_err()
            {
                return;
            }
        }
    });
    let listening = client.batch_execute(&format!("LISTEN {CHANGES_CHANNEL}")).await;
    if let Err(error) = listening {
        driver.abort();
        return Err(db_error("listening for changes", error));
    }
    if changes.send(RecordChange::Live).await.is_err() {
        driver.abort();
        return Ok(());
    }
    while let Some(path) = notified.recv().await {
        let Ok(path) = ProbePath::parse(&path) else { continue };
        if changes.send(RecordChange::Changed(path)).await.is_err() {
            break;
        }
    }
    driver.abort();
    Err(Error::new(Code::Unavailable, "the listening connection ended"))
}
