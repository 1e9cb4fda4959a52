//! The admin side: what `central-probes upload`, `ls`, `rm` and `export` run. It talks to
//! Central only through the API (`probe_api`), never through the server's
//! internals.

pub mod checksum;
pub mod chunk_pool;
pub mod client;
pub mod error;
mod existing;
pub mod export;
pub mod package;
mod package_file;
pub mod progress;
pub mod registry_pull;
pub mod registry_push;
pub mod registry_target;
pub mod signatures;
pub mod upload;
