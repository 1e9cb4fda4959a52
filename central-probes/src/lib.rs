//! Central's side of kernel probe distribution, by concern:
//! - `server`: the gRPC services, their connections and limits, auth,
//!   metrics, the fallback chain, and `server::run`, the one composition
//!   root the binary, the tests and the benches all start;
//! - `store`: where uploaded probes live, behind a trait;
//! - `admin`: the admin side's client, support package reader and progress;
//! - `cli` (in the binary): one file per subcommand.

pub mod admin;
pub mod error;
pub mod oci;
pub mod pki;
pub mod private_file;
pub mod server;
pub mod store;
#[cfg(feature = "testing")]
pub mod synthetic;
