//! Synthetic support packages for the demo, the tests and the benchmarks:
//! the real layout and names, and probes that are real gzip files of
//! deterministic pseudo-random bytes (incompressible, like real gzip'd
//! probes) with realistic sizes.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

use zip::write::SimpleFileOptions;

/// How to make a package.
#[derive(Clone, Debug)]
pub struct PackageSpec {
    pub module_version: String,
    /// Kernel releases; each gets an eBPF probe, and a kernel module if
    /// `kernel_modules` is set.
    pub kernels: Vec<String>,
    pub kernel_modules: bool,
    /// Changes every probe's bytes (but not their sizes): a package built
    /// with another variant conflicts with this one file by file.
    pub variant: u64,
    /// Scales realistic sizes (60-200 KB, one in 500 near 1.5 MB) down for
    /// quick tests: the size is divided by this.
    pub size_divisor: usize,
    /// Deflate entries instead of storing them.
    pub deflate: bool,
}

impl PackageSpec {
    pub fn new(module_version: &str, kernels: &[&str]) -> Self {
        PackageSpec {
            module_version: module_version.to_owned(),
            kernels: kernels.iter().map(|k| k.to_string()).collect(),
            kernel_modules: false,
            variant: 0,
            size_divisor: 1,
            deflate: false,
        }
    }

    /// The probe paths (`<module version>/<file name>`) in package order.
    pub fn probe_paths(&self) -> Vec<String> {
        let mut paths = Vec::new();
        for kernel in &self.kernels {
            paths.push(format!("{}/collector-ebpf-{kernel}.o.gz", self.module_version));
            if self.kernel_modules {
                paths.push(format!("{}/collector-{kernel}.ko.gz", self.module_version));
            }
        }
        paths
    }

    /// The bytes of the probe file at `path` in this package: a gzip file.
    pub fn probe_bytes(&self, path: &str) -> Vec<u8> {
        let seed = fnv1a(path.as_bytes());
        let size = (realistic_size(seed) / self.size_divisor.max(1)).max(1);
        let object = pseudo_random_bytes(seed ^ self.variant.wrapping_mul(0x9e37_79b9_7f4a_7c15), size);
        // Level 0: random bytes do not compress, and storing them is fast.
        // A gzip file of one stored block ends with the CRC-32 of the bytes
        // just before it, so the CRC-32 of the whole file depends on its
        // header and length only, not on the object. A real probe is
        // deflated and has no such blind spot; here the header's time (a
        // rebuilt probe's) tells the variants apart, as it would.
        let mtime = 1_700_000_000u32.wrapping_add(self.variant as u32);
        let mut gzip =
            flate2::GzBuilder::new().mtime(mtime).write(Vec::with_capacity(size + 64), flate2::Compression::none());
        gzip.write_all(&object).expect("writing to a Vec cannot fail");
        gzip.finish().expect("writing to a Vec cannot fail")
    }

    /// Writes the package; returns the total probe bytes.
    pub fn write(&self, out: &Path) -> io::Result<u64> {
        let mut zip = zip::ZipWriter::new(BufWriter::with_capacity(1 << 20, File::create(out)?));
        let method = if self.deflate { zip::CompressionMethod::Deflated } else { zip::CompressionMethod::Stored };
        let options = SimpleFileOptions::default().compression_method(method).large_file(false);
        let dir = format!("kernel-modules/{}/", self.module_version);
        zip.add_directory("kernel-modules/", SimpleFileOptions::default()).map_err(io::Error::other)?;
        zip.add_directory(dir.as_str(), SimpleFileOptions::default()).map_err(io::Error::other)?;
        zip.start_file(format!("{dir}LICENSE"), options).map_err(io::Error::other)?;
        zip.write_all(b"Synthetic probes for testing; no license needed.\n")?;
        let mut total = 0;
        for path in self.probe_paths() {
            let bytes = self.probe_bytes(&path);
            total += bytes.len() as u64;
            zip.start_file(format!("kernel-modules/{path}"), options).map_err(io::Error::other)?;
            zip.write_all(&bytes)?;
        }
        zip.finish().map_err(io::Error::other)?.flush()?;
        Ok(total)
    }
}

/// 60-200 KB for most probes; about one in 500 is near 1.5 MB. 16,256
/// probes then make about 2.1 GB, as a real package does.
fn realistic_size(seed: u64) -> usize {
    if seed.is_multiple_of(500) {
        1_400_000 + (seed >> 20) as usize % 200_000
    } else {
        60_000 + (seed >> 8) as usize % 140_000
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// xorshift64*: fast, deterministic, and incompressible enough.
fn pseudo_random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed | 1;
    let mut bytes = Vec::with_capacity(len + 8);
    while bytes.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        bytes.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    bytes.truncate(len);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_change_bytes_but_not_sizes() {
        let spec = PackageSpec::new("2.5.0", &["5.4.0"]);
        let other = PackageSpec { variant: 1, ..spec.clone() };
        let path = &spec.probe_paths()[0];
        assert_eq!(spec.probe_bytes(path), spec.probe_bytes(path));
        assert_ne!(spec.probe_bytes(path), other.probe_bytes(path));
        assert_eq!(spec.probe_bytes(path).len(), other.probe_bytes(path).len());
        let size = spec.probe_bytes(path).len();
        assert!((60_000..1_600_000).contains(&size), "{size}");
        let mut object = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&spec.probe_bytes(path)[..]), &mut object)
            .unwrap();
        assert!(size - object.len() < 100, "a gzip file with stored blocks around the object");
    }
}
