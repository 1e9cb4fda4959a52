//! Central's side of kernel probe distribution: the probe store, the gRPC
//! services that fill it and serve from it, and the admin tooling.

pub mod admin_client;
pub mod auth;
pub mod connections;
pub mod error;
pub mod metrics;
pub mod package;
pub mod page_token;
pub mod pki;
pub mod probe_service;
pub mod probe_slots;
pub mod progress;
pub mod server;
pub mod sources;
pub mod store;
pub mod synthetic;
pub mod upload_service;
pub mod upload_session;
pub mod upstream;
