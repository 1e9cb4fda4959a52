//! TLS to the database over rustls (`--database-ca`): the server's
//! certificate must chain to the given CA and name the host connected to,
//! what libpq calls `sslmode=verify-full`. tokio-postgres knows the modes
//! `disable`, `prefer` and `require` only, so a URL's `sslmode=verify-full`
//! (or `verify-ca`) is read here as "require, and verify with the CA".

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use tokio_rustls::TlsConnector;

use crate::error::{Error, Result};

/// Makes a verified TLS connection per database connection.
#[derive(Clone)]
pub struct RustlsConnect {
    config: Arc<rustls::ClientConfig>,
}

impl RustlsConnect {
    /// Trusts the CA certificates (PEM) in `ca_pem` only.
    pub fn new(ca_pem: &[u8]) -> Result<Self> {
        let invalid = |e: &dyn std::fmt::Display| Error::invalid_argument(format!("the database CA: {e}"));
        let mut roots = rustls::RootCertStore::empty();
        for certificate in CertificateDer::pem_slice_iter(ca_pem) {
            roots.add(certificate.map_err(|e| invalid(&e))?).map_err(|e| invalid(&e))?;
        }
        if roots.is_empty() {
            return Err(invalid(&"no certificate in the file"));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid(&e))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(RustlsConnect { config: Arc::new(config) })
    }
}

/// Splits `sslmode=verify-full` or `verify-ca` off a URL (tokio-postgres
/// refuses them): the URL to hand on, and whether verification was asked.
pub fn take_verify_mode(url: &str) -> (String, bool) {
    let mut verify = false;
    let Some((base, query)) = url.split_once('?') else { return (url.to_owned(), false) };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            let asks = matches!(*pair, "sslmode=verify-full" | "sslmode=verify-ca");
            verify |= asks;
            !asks
        })
        .collect();
    let url = if kept.is_empty() { base.to_owned() } else { format!("{base}?{}", kept.join("&")) };
    (url, verify)
}

impl MakeTlsConnect<tokio_postgres::Socket> for RustlsConnect {
    type Stream = RustlsStream;
    type TlsConnect = RustlsConnectTo;
    type Error = io::Error;

    fn make_tls_connect(&mut self, host: &str) -> io::Result<RustlsConnectTo> {
        let name = ServerName::try_from(host.to_owned()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Ok(RustlsConnectTo { config: self.config.clone(), name })
    }
}

/// One connection's handshake with the host it is for.
pub struct RustlsConnectTo {
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
}

impl TlsConnect<tokio_postgres::Socket> for RustlsConnectTo {
    type Stream = RustlsStream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream>> + Send>>;

    fn connect(self, socket: tokio_postgres::Socket) -> Self::Future {
        Box::pin(async move {
            let stream = TlsConnector::from(self.config).connect(self.name, socket).await?;
            Ok(RustlsStream(Box::new(stream)))
        })
    }
}

/// A TLS connection to the database.
pub struct RustlsStream(Box<tokio_rustls::client::TlsStream<tokio_postgres::Socket>>);

impl TlsStream for RustlsStream {
    /// No SCRAM channel binding: the certificate check already binds the
    /// connection to the server.
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

impl AsyncRead for RustlsStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for RustlsStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_modes_are_taken_off_the_url_and_the_rest_kept() {
        let cases = [
            ("postgres://u@h/db", ("postgres://u@h/db", false)),
            ("postgres://u@h/db?sslmode=verify-full", ("postgres://u@h/db", true)),
            ("postgres://u@h/db?application_name=x&sslmode=verify-ca", ("postgres://u@h/db?application_name=x", true)),
            ("postgres://u@h/db?sslmode=require", ("postgres://u@h/db?sslmode=require", false)),
        ];
        for (url, (expected, verify)) in cases {
            assert_eq!(take_verify_mode(url), (expected.to_owned(), verify), "{url}");
        }
    }
}
