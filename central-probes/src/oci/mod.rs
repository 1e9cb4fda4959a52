//! A client of OCI registries (the CNCF distribution API that Quay,
//! Harbor, ECR and Debian's `docker-registry` serve), and the layout of a
//! support package as an OCI artifact. `package push`/`pull` (`admin::oci`)
//! and Central's registry upstream (`server::upstream::registry`) use it.
//!
//! - `reference`: `HOST[:PORT]/PATH[:TAG]`;
//! - `auth`: the auth file and the Basic and Bearer flows;
//! - `http`: pooled HTTPS/1.1 connections, through a proxy if set;
//! - `registry`: blobs and manifests of one repository;
//! - `checked`: reads checked against their digest;
//! - `layout`: the index, its shard manifests and their media types.

pub mod auth;
pub mod checked;
pub mod error;
mod http;
pub mod layout;
pub mod reference;
pub mod registry;

use std::path::PathBuf;
use std::time::Duration;

use probe_api::https::ProxySettings;

pub use error::{OciError, OciErrorKind, OciResult};
pub use reference::Reference;
pub use registry::Registry;

/// How to reach registries: whom to trust, through what, with which
/// credentials.
#[derive(Clone, Debug)]
pub struct RegistryOptions {
    /// The CA certificates (PEM) trusted for the registry.
    pub ca_pem: Vec<u8>,
    pub proxies: ProxySettings,
    /// containers-auth.json or Docker's config.json, if any.
    pub auth_file: Option<PathBuf>,
    pub connect_timeout: Duration,
    /// How long to wait for the head of each answer.
    pub answer_timeout: Duration,
}

impl RegistryOptions {
    /// A client of the repository `reference` names; `push` asks a token
    /// server for the right to write.
    pub fn open(&self, reference: &Reference, push: bool) -> OciResult<Registry> {
        let credentials = match &self.auth_file {
            Some(file) => auth::credentials_for(file, &reference.registry)?,
            None => None,
        };
        let connections =
            http::Connections::new(&self.ca_pem, self.proxies.clone(), self.connect_timeout, self.answer_timeout)?;
        Ok(Registry::new(reference.clone(), connections, credentials, push))
    }
}
