//! The Collector's signature check of one probe, timed in CPU time: what
//! `TrustedKeys::verify` costs (parsing, BLAKE2b-512 of the probe, two
//! Ed25519 verifications) beside the SHA-256 of the same bytes that every
//! fetch computes anyway, measured on the same thread in the same run.

use probe_api::digest::Sha256Digest;
use probe_api::names::ProbePath;
use probe_api::signing::{TrustedKeys, trusted_comment};

/// CPU time of this thread, in nanoseconds.
fn thread_cpu_nanos() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid clock id and a writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// Microseconds of CPU per call of `f`, over `iterations` calls.
fn per_call(iterations: usize, mut f: impl FnMut()) -> f64 {
    let start = thread_cpu_nanos();
    for _ in 0..iterations {
        f();
    }
    (thread_cpu_nanos() - start) as f64 / iterations as f64 / 1000.0
}

/// Prints "<verify µs> <SHA-256 µs> <ratio>" for a probe of `size` bytes.
pub fn run(size: usize, iterations: usize) {
    let path = ProbePath::parse("2.5.0/collector-ebpf-5.14.0-284.11.1.el9_2.x86_64.o.gz").unwrap();
    // Incompressible, as a gzip'd probe is.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let data: Vec<u8> = (0..size)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let keys = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
    let comment = trusted_comment(&path, 1);
    let signature = minisign::sign(None, &keys.sk, std::io::Cursor::new(&data), Some(&comment), None).unwrap();
    let signature = signature.into_string().into_bytes();
    let trusted = TrustedKeys::parse(&keys.pk.to_box().unwrap().into_string()).unwrap();
    assert!(trusted.verify(&path, &data, Some(&signature)).is_ok());
    // Warm both up once.
    let _ = Sha256Digest::of(&data);
    let verify = per_call(iterations, || {
        std::hint::black_box(trusted.verify(&path, &data, Some(&signature)).unwrap());
    });
    let sha256 = per_call(iterations, || {
        std::hint::black_box(Sha256Digest::of(&data));
    });
    println!("{verify:.1} {sha256:.1} {:.2}", verify / sha256);
}
