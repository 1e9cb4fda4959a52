//! Probe signatures in support packages: a probe's minisign signature is
//! the entry `kernel-modules/<module version>/<probe file>.minisig` beside
//! it. `read_signatures` attaches them to an upload's probes;
//! `sign_package` (`central-probes package sign`) writes a copy of a
//! package with a signature for every probe; `verify_package` (`package
//! verify`) checks each one. Both stream: one probe's bytes at a time go
//! through the signer or the verifier, whatever the package's size.
//! Blocking: callers run them on a blocking thread.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufWriter};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use probe_api::names::{PackageEntry, ProbePath, classify_package_entry};
use probe_api::signing::{
    MAX_SIGNATURE_LEN, Prehasher, SIGNATURE_SUFFIX, SignatureError, TrustedKeys, trusted_comment,
};
use zip::ZipArchive;
use zip::write::{SimpleFileOptions, ZipWriter};

use crate::admin::chunk_pool::ChunkPool;
use crate::admin::error::PackageError;
use crate::admin::package::{Package, PackageIndex};

/// Reads every signature entry of the package into its probe. A signature
/// whose probe is not in the package is reported as unrecognised; one over
/// `MAX_SIGNATURE_LEN` bytes refuses the package.
pub fn read_signatures(package: &mut Package, index: &mut PackageIndex) -> Result<(), PackageError> {
    let by_path: HashMap<ProbePath, usize> =
        index.probes.iter().enumerate().map(|(i, probe)| (probe.path.clone(), i)).collect();
    for (path, entry, size) in std::mem::take(&mut index.signatures) {
        let name = format!("kernel-modules/{path}{SIGNATURE_SUFFIX}");
        let Some(&probe) = by_path.get(&path) else {
            index.unrecognised.push(format!("{name}: a signature without its probe in the package"));
            continue;
        };
        let too_large = || PackageError::Signature { name: name.clone(), why: SignatureError::TooLarge(size as usize) };
        if size > MAX_SIGNATURE_LEN as u64 {
            return Err(too_large());
        }
        let read_error = |source| PackageError::Read { path: name.clone(), source };
        let signature =
            package.read_small_entry(entry, MAX_SIGNATURE_LEN).map_err(read_error)?.ok_or_else(too_large)?;
        index.probes[probe].signature = Some(Bytes::from(signature));
    }
    Ok(())
}

/// The secret key to sign with: a minisign secret key file, unencrypted
/// (`minisign -G -W`) or encrypted with the password in `password_file`
/// (its first line).
pub fn load_secret_key(key_file: &Path, password_file: Option<&Path>) -> Result<minisign::SecretKey, String> {
    let text = std::fs::read_to_string(key_file).map_err(|e| format!("reading {}: {e}", key_file.display()))?;
    let text = with_checksum(&text).unwrap_or(text);
    let key_box = minisign::SecretKeyBox::from_string(&text).map_err(|e| format!("{}: {e}", key_file.display()))?;
    let key = match password_file {
        None => key_box
            .into_unencrypted_secret_key()
            .map_err(|e| format!("{}: {e} (an encrypted key needs --password-file)", key_file.display()))?,
        Some(file) => {
            let password = std::fs::read_to_string(file).map_err(|e| format!("reading {}: {e}", file.display()))?;
            let password = password.lines().next().unwrap_or_default().to_owned();
            key_box.into_secret_key(Some(password)).map_err(|e| format!("{}: {e}", key_file.display()))?
        }
    };
    Ok(key)
}

/// The tool `minisign` 0.11 (Debian 12's) writes an unencrypted key
/// (`-G -W`) with a checksum of zeros, which it does not check itself but
/// minisign's crate does: such a key, with its checksum (BLAKE2b-256 of
/// algorithm, key id and secret key) filled in. `None` for any other key.
fn with_checksum(text: &str) -> Option<String> {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use blake2::Digest;
    let mut lines: Vec<&str> = text.lines().collect();
    let mut key = STANDARD.decode(lines.get(1)?.trim()).ok()?;
    // sig alg 2, kdf alg 2, checksum alg 2, salt 32, limits 16, then the
    // encrypted part: key id 8, secret key 64, checksum 32.
    let (kdf_none, checksum) = (key.get(2..4)? == [0, 0], 54 + 8 + 64);
    if !kdf_none || key.len() != checksum + 32 || key[checksum..].iter().any(|&b| b != 0) {
        return None;
    }
    let mut hasher = blake2::Blake2b256::new();
    hasher.update(&key[..2]);
    hasher.update(&key[54..checksum]);
    let sum = hasher.finalize();
    key[checksum..].copy_from_slice(&sum);
    let encoded = STANDARD.encode(&key);
    lines[1] = &encoded;
    Some(lines.join("\n") + "\n")
}

/// What `sign_package` did.
#[derive(Debug, Default)]
pub struct SignReport {
    pub signed: usize,
    /// Signature entries of the input that were replaced.
    pub replaced: usize,
    pub other_entries: usize,
}

/// Copies the package at `input` to `output` (written to a temporary file
/// beside it, then renamed) with a signature entry after every probe at
/// release `serial`. Entries are copied as they are compressed; signature
/// entries the input had are replaced.
pub fn sign_package(
    input: &Path,
    output: &Path,
    key: &minisign::SecretKey,
    serial: u64,
) -> Result<SignReport, SignError> {
    if serial == 0 {
        return Err(SignError::Other("the serial must be a positive integer".into()));
    }
    let open = File::open(input).map_err(|source| PackageError::Open { path: input.to_owned(), source })?;
    let mut archive =
        ZipArchive::new(open).map_err(|source| PackageError::NotZip { path: input.to_owned(), source })?;
    let temp = output.with_extension("zip.part");
    let written = (|| {
        let out = File::create(&temp).map_err(|e| SignError::output(&temp, e))?;
        let mut zip = ZipWriter::new(BufWriter::with_capacity(1 << 20, out));
        let mut report = SignReport::default();
        let zip_error = |e: zip::result::ZipError| SignError::output(output, io::Error::other(e));
        for i in 0..archive.len() {
            let unreadable = |source| PackageError::UnreadableEntry { index: i, source };
            let entry = archive.by_index_raw(i).map_err(unreadable)?;
            let name = entry.name().map_err(unreadable)?.into_owned();
            let kind = if entry.is_dir() { PackageEntry::Ignored } else { classify_package_entry(&name) };
            if let PackageEntry::Signature(_) = kind {
                report.replaced += 1;
                continue;
            }
            zip.raw_copy_file(entry).map_err(zip_error)?;
            let PackageEntry::Probe(path) = kind else {
                report.other_entries += 1;
                continue;
            };
            let bytes = archive.by_index(i).map_err(unreadable)?;
            let comment = trusted_comment(&path, serial);
            let signature = minisign::sign(None, key, bytes, Some(&comment), Some("signature from central-probes"))
                .map_err(|e| SignError::Other(format!("signing {name}: {e}")))?;
            let stored = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
            zip.start_file(format!("{name}{SIGNATURE_SUFFIX}"), stored).map_err(zip_error)?;
            io::Write::write_all(&mut zip, signature.into_string().as_bytes())
                .map_err(|e| SignError::output(output, e))?;
            report.signed += 1;
        }
        let out =
            zip.finish().map_err(zip_error)?.into_inner().map_err(|e| SignError::output(output, e.into_error()))?;
        out.sync_all().map_err(|e| SignError::output(output, e))?;
        std::fs::rename(&temp, output).map_err(|e| SignError::output(output, e))?;
        Ok(report)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written
}

/// Why `package sign` failed.
#[derive(Debug)]
pub enum SignError {
    Package(PackageError),
    Output { path: PathBuf, source: io::Error },
    Other(String),
}

impl SignError {
    fn output(path: &Path, source: io::Error) -> SignError {
        SignError::Output { path: path.to_owned(), source }
    }
}

impl From<PackageError> for SignError {
    fn from(error: PackageError) -> Self {
        SignError::Package(error)
    }
}

impl std::fmt::Display for SignError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SignError::Package(error) => write!(f, "{error}"),
            SignError::Output { path, source } => write!(f, "writing {}: {source}", path.display()),
            SignError::Other(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for SignError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SignError::Package(error) => Some(error),
            SignError::Output { source, .. } => Some(source),
            SignError::Other(_) => None,
        }
    }
}

/// One probe of a package and what checking its signature gave.
#[derive(Debug)]
pub struct Checked {
    pub path: ProbePath,
    pub outcome: Result<probe_api::signing::Verified, SignatureError>,
}

/// Checks the signature of every probe of the package at `path` against
/// `keys`, in archive order.
pub fn verify_package(path: &Path, keys: &TrustedKeys) -> Result<Vec<Checked>, PackageError> {
    let reads = crate::admin::package::PackageReads::default();
    let mut package = Package::open(path, &reads)?;
    let mut index = package.index()?;
    read_signatures(&mut package, &mut index)?;
    let mut pool = ChunkPool::new(256 << 10, 1);
    let mut checked = Vec::with_capacity(index.probes.len());
    for probe in &index.probes {
        let mut prehash = Prehasher::new();
        package
            .read_entry(probe, &mut pool, |chunk| {
                prehash.update(&chunk);
                Ok(())
            })
            .map_err(|source| PackageError::Read { path: probe.path.to_string(), source })?;
        let outcome = keys.verify_prehashed(&probe.path, &prehash.finish(), probe.signature.as_deref());
        checked.push(Checked { path: probe.path.clone(), outcome });
    }
    Ok(checked)
}
