//! The Collector's side of probe distribution: derive the candidate kernel
//! names of this node, look for the probe in the Collector image and then
//! at Central (over mutual TLS, by GetProbe or by its HTTPS route), retrying within a budget, and write the
//! verified, decompressed probe atomically; or fail with a report that
//! says what was tried and what to do.

pub mod cache;
// The kernel names, derived as the product's Collector derives them; they
// live in `probe-api`, which Central shares.
pub use probe_api::candidates;
pub mod central;
pub mod chain;
pub mod facts;
pub mod fetch;
pub mod files;
pub mod host;
pub mod https_probes;
pub mod limits;
pub mod output;
pub mod report;
pub mod signatures;
pub mod sources;
