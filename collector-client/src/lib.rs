//! The Collector's side of probe distribution: fetch a probe from Central
//! over mutual TLS and accept it only if its size and SHA-256 match the
//! header Central sent first.

pub mod central;
