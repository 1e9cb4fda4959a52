//! Any request target as the HTTPS route's path (`/kernel-objects/<module
//! version>/<file name>[.minisig]`): parsed as hyper parses a request's
//! URI, split by the route, then checked by the naming rules as
//! `ProbeServing::serve` checks it. It must never panic, and a path it
//! accepts must be one storable name: it prints back to the same path,
//! parses again to the same path, and has no '/', '\\', control or
//! non-ASCII byte in its file name.
#![no_main]

use central_probes::server::handlers::kernel_objects::{PREFIX, route_path};
use libfuzzer_sys::fuzz_target;
use probe_api::names::{MAX_PATH_LEN, ModuleVersion, ProbeFileName, ProbePath};

fn check(path: &str) {
    let Some(route) = route_path(path) else { return };
    assert!(path.starts_with(PREFIX));
    let (Ok(module_version), Ok(file_name)) =
        (ModuleVersion::parse(route.module_version), ProbeFileName::parse(route.file_name))
    else {
        return;
    };
    assert_eq!(module_version.as_str(), route.module_version);
    assert_eq!(file_name.as_str(), route.file_name);
    assert!(!module_version.as_str().contains('/'));
    assert!(file_name.as_str().bytes().all(|b| b.is_ascii_graphic() && b != b'/' && b != b'\\'));
    let probe = ProbePath::new(module_version, file_name);
    let printed = probe.to_string();
    assert_eq!(printed, format!("{}/{}", route.module_version, route.file_name));
    assert!(printed.len() <= MAX_PATH_LEN && probe.byte_len() == printed.len());
    assert_eq!(ProbePath::parse(&printed).as_ref(), Ok(&probe));
    let signature = if route.signature { ".minisig" } else { "" };
    assert_eq!(path, format!("{PREFIX}{printed}{signature}"));
}

fuzz_target!(|data: &[u8]| {
    // As it comes off the wire: hyper hands the route the URI's path.
    if let Ok(uri) = http::Uri::try_from(data) {
        check(uri.path());
    }
    // And as a path on its own, whatever a URI parser lets through.
    if let Ok(path) = std::str::from_utf8(data) {
        check(path);
    }
});
