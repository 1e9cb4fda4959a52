//! The wire, and nothing but the wire: the gRPC message framing Central
//! reads and writes beside tonic (`grpc`, `grpc_stream`), gRPC-web
//! (`grpc_web`) and plain HTTP answers and body reads (`http`). Nothing
//! here knows a route, a handler or a use case: handlers call it.

pub mod grpc;
pub mod grpc_stream;
pub mod grpc_web;
pub mod http;
