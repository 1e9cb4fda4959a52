//! Central's side of kernel probe distribution: the probe store, the gRPC
//! services that fill it and serve from it, and the admin tooling.

pub mod error;
pub mod store;
