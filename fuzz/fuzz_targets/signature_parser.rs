//! Any bytes as a probe's minisign signature, and any text as a file of
//! trusted keys: parsing and verifying must answer with an error or a
//! verdict, never panic. The key below is the one the seed `valid` was
//! made with, so the fuzzer starts from signatures that verify.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use probe_api::names::ProbePath;
use probe_api::signing::{ProbeSignature, TrustedKeys};

const PUBLIC_KEY: &str = "untrusted comment: minisign public key 8E0B47F49FF9CB4
RWS0nP9Jf7TgCF/sfXj9T5fiYNaXi+KpCyt08kYAJNdLPQrh6JUlLYKQ
";

fuzz_target!(|data: &[u8]| {
    static KEYS: OnceLock<TrustedKeys> = OnceLock::new();
    let keys = KEYS.get_or_init(|| TrustedKeys::parse(PUBLIC_KEY).expect("the seed's key"));
    if let Ok(signature) = ProbeSignature::parse(data) {
        let _ = (signature.key_id(), signature.serial(), signature.trusted_comment());
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = TrustedKeys::parse(text);
    }
    let path = ProbePath::parse("2.5.0/collector-ebpf-5.4.0.o.gz").expect("a valid path");
    let _ = keys.verify(&path, b"probe bytes", Some(data));
});
