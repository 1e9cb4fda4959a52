//! Compiles `proto/` into Rust with a pure-Rust protobuf compiler (protox), so
//! that a fresh machine builds with cargo alone, and writes the descriptor set
//! that gRPC server reflection serves.

use std::path::PathBuf;

const PROTO_FILES: &[&str] = &[
    "proto/kprobes/v1/probe.proto",
    "proto/kprobes/v1/probe_service.proto",
    "proto/kprobes/v1/probe_upload_service.proto",
    // The product's upload API, served for its unmodified `roxctl`.
    "proto/v1/probe_upload_service.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // tonic-prost-build prints no rerun-if-changed lines of its own.
    for file in PROTO_FILES {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(PROTO_FILES, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("kprobes_descriptor.bin"), protox::prost::Message::encode_to_vec(&descriptors))?;
    tonic_prost_build::configure()
        // Probe bytes are handed from the wire to the store without copies.
        .bytes(".kprobes.v1")
        .compile_fds(descriptors)?;
    Ok(())
}
