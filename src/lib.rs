//! The kernel probe distribution API: the gRPC code generated from
//! `proto/kprobes/v1`, and the naming rules for module versions and probe
//! files that Central, the uploader and the Collector all enforce; and the
//! transports both sides share (gRPC channels, an HTTPS GET client).

pub mod candidates;
pub mod client_tls;
pub mod digest;
pub mod errors;
pub mod https;
pub mod limits;
pub mod names;
pub mod probe_stream;
pub mod signing;
pub mod transport;

/// Generated messages, clients and servers of package `kprobes.v1`.
// The proto comments are written for readers of every language, not for
// clippy's Markdown rules.
#[allow(clippy::all)]
pub mod v1 {
    tonic::include_proto!("kprobes.v1");
}

/// The product's own upload API (`proto/v1`, package `v1`), which Central
/// serves for the product's unmodified `roxctl`.
#[allow(clippy::all)]
pub mod product {
    pub mod v1 {
        tonic::include_proto!("v1");
    }
}

/// The encoded descriptor set of `proto/`, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("kprobes_descriptor");
