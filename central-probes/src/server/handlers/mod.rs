//! The handlers: one file per route or service, each a thin adapter from
//! its wire format to a use case.

pub mod admin_service;
pub mod get_probe;
pub mod kernel_objects;
pub mod roxctl_existing;
pub mod roxctl_upload;
pub mod upload_probes;
