//! Signed probes: minisign signatures (prehashed Ed25519, `ED`), one
//! detached `<probe file>.minisig` per probe, whose trusted comment binds
//! the probe to its path and release:
//! `kprobe v1 module-version=<mv> file=<probe file> serial=<n>`.
//!
//! Central checks them on upload (`serve --trusted-keys`) and the Collector
//! before it writes a probe (`get-probe --trusted-keys`), both through
//! `TrustedKeys::verify`. The cryptography is the `minisign-verify` crate's,
//! the same as the `minisign -V` a person runs; this module adds what the
//! crate leaves to its caller: a bound on the size, refusing legacy
//! signatures, finding the key by its id, and the trusted comment's rules.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use blake2::Digest;

use crate::names::ProbePath;

/// Largest signature accepted: a minisign signature file is about 300
/// bytes; a longer one is refused before it is parsed.
pub const MAX_SIGNATURE_LEN: usize = 2048;

pub use crate::names::SIGNATURE_SUFFIX;

/// The trusted comment a signature of `path` at release `serial` carries.
pub fn trusted_comment(path: &ProbePath, serial: u64) -> String {
    format!("kprobe v1 module-version={} file={} serial={serial}", path.module_version(), path.file_name())
}

/// A minisign key id, printed as minisign prints it (16 hex digits).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(pub [u8; 8]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016X}", u64::from_le_bytes(self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Why a probe's signature is not accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SignatureError {
    /// The probe came without one.
    Missing,
    /// Longer than `MAX_SIGNATURE_LEN`.
    TooLarge(usize),
    /// Not a minisign signature.
    Malformed(String),
    /// A legacy (not prehashed) minisign signature.
    Legacy,
    /// Made by a key that is not trusted.
    UnknownKey(KeyId),
    /// The key is trusted, but the signature does not verify: the probe or
    /// the trusted comment was changed.
    Invalid(KeyId),
    /// The trusted comment is not `kprobe v1 module-version=... file=...
    /// serial=...`.
    BadComment(String),
    /// Signed for another probe file or module version.
    OtherProbe { signed_for: String },
    /// A lower serial than this node accepted before.
    Rollback { serial: u64, accepted: u64 },
}

impl SignatureError {
    /// A short stable name, for metrics and machine-readable reports.
    pub fn reason(&self) -> &'static str {
        match self {
            SignatureError::Missing => "missing",
            SignatureError::TooLarge(_) => "too_large",
            SignatureError::Malformed(_) => "malformed",
            SignatureError::Legacy => "legacy",
            SignatureError::UnknownKey(_) => "unknown_key",
            SignatureError::Invalid(_) => "invalid",
            SignatureError::BadComment(_) => "bad_comment",
            SignatureError::OtherProbe { .. } => "other_probe",
            SignatureError::Rollback { .. } => "rollback",
        }
    }
}

impl fmt::Display for SignatureError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SignatureError::Missing => write!(f, "the probe is not signed"),
            SignatureError::TooLarge(len) => {
                write!(f, "the signature is {len} bytes, more than the {MAX_SIGNATURE_LEN} allowed")
            }
            SignatureError::Malformed(why) => write!(f, "the signature is not a minisign signature: {why}"),
            SignatureError::Legacy => write!(f, "a legacy (not prehashed) minisign signature is not accepted"),
            SignatureError::UnknownKey(key) => write!(f, "signed by key {key}, which is not trusted"),
            SignatureError::Invalid(key) => {
                write!(f, "the signature by key {key} does not verify: the probe or its trusted comment was changed")
            }
            SignatureError::BadComment(comment) => write!(
                f,
                "the trusted comment {comment:?} is not \"kprobe v1 module-version=<mv> file=<probe file> serial=<n>\""
            ),
            SignatureError::OtherProbe { signed_for } => write!(f, "the signature is for another probe: {signed_for}"),
            SignatureError::Rollback { serial, accepted } => {
                write!(f, "signature serial {serial} is below serial {accepted}, which this node accepted before")
            }
        }
    }
}

impl std::error::Error for SignatureError {}

/// A parsed probe signature: who signed, and what its trusted comment says.
#[derive(Clone)]
pub struct ProbeSignature {
    key_id: KeyId,
    /// The Ed25519 signature of the probe's BLAKE2b-512.
    signature: [u8; 64],
    trusted_comment: String,
    /// The fourth line: the signature of `signature` and the comment.
    global_line: String,
    decoded: minisign_verify::Signature,
    /// What the trusted comment names: "<mv>/<file>", and the serial.
    signed_path: String,
    serial: u64,
}

impl ProbeSignature {
    /// Parses a `.minisig` file's bytes: bounded, prehashed, and with a
    /// trusted comment of our form (for any path; `verify` checks it is
    /// the probe's).
    pub fn parse(bytes: &[u8]) -> Result<ProbeSignature, SignatureError> {
        if bytes.len() > MAX_SIGNATURE_LEN {
            return Err(SignatureError::TooLarge(bytes.len()));
        }
        let malformed = |why: &str| SignatureError::Malformed(why.to_owned());
        let text = std::str::from_utf8(bytes).map_err(|_| malformed("not UTF-8 text"))?;
        let lines: Vec<&str> = text.lines().collect();
        let [untrusted, signature_line, comment_line, global_line] = lines[..] else {
            return Err(malformed("not four lines"));
        };
        if !untrusted.starts_with("untrusted comment:") {
            return Err(malformed("the first line is not an untrusted comment"));
        }
        let binary = STANDARD.decode(signature_line).map_err(|_| malformed("the signature line is not base64"))?;
        let Ok::<[u8; 74], _>(binary) = binary.try_into() else {
            return Err(malformed("the signature line is not 74 bytes"));
        };
        match &binary[..2] {
            b"ED" => {}
            b"Ed" => return Err(SignatureError::Legacy),
            _ => return Err(malformed("an unknown signature algorithm")),
        }
        let trusted_comment = comment_line
            .strip_prefix("trusted comment: ")
            .ok_or_else(|| malformed("the third line is not a trusted comment"))?
            .to_owned();
        if STANDARD.decode(global_line).map(|global| global.len()) != Ok(64) {
            return Err(malformed("the global signature is not 64 bytes of base64"));
        }
        let decoded = minisign_verify::Signature::decode(text).map_err(|e| malformed(&e.to_string()))?;
        let (signed_path, serial) =
            parse_comment(&trusted_comment).ok_or_else(|| SignatureError::BadComment(trusted_comment.clone()))?;
        Ok(ProbeSignature {
            key_id: KeyId(binary[2..10].try_into().expect("8 bytes")),
            signature: binary[10..].try_into().expect("64 bytes"),
            trusted_comment,
            global_line: global_line.to_owned(),
            decoded,
            signed_path,
            serial,
        })
    }

    pub fn key_id(&self) -> KeyId {
        self.key_id
    }

    /// The release number the signer gave (a positive integer).
    pub fn serial(&self) -> u64 {
        self.serial
    }

    pub fn trusted_comment(&self) -> &str {
        &self.trusted_comment
    }

    /// The same signature in minisign's legacy encoding, whose signed
    /// message is the data itself: verifying it over a probe's BLAKE2b-512
    /// is exactly verifying the prehashed signature over the probe (the
    /// global signature covers the Ed25519 signature and the trusted
    /// comment, not the algorithm bytes). This lets Central check a probe
    /// whose signature arrives after its bytes, from the hash it computed
    /// while they streamed by.
    fn over_prehash(&self) -> minisign_verify::Signature {
        let mut binary = Vec::with_capacity(74);
        binary.extend_from_slice(b"Ed");
        binary.extend_from_slice(&self.key_id.0);
        binary.extend_from_slice(&self.signature);
        let text = format!(
            "untrusted comment: prehash\n{}\ntrusted comment: {}\n{}",
            STANDARD.encode(&binary),
            self.trusted_comment,
            self.global_line
        );
        minisign_verify::Signature::decode(&text).expect("re-encoding a decoded signature")
    }
}

/// "kprobe v1 module-version=<mv> file=<file> serial=<n>" as ("<mv>/<file>",
/// n); `None` for any other text, a serial of 0 or one with a sign or
/// leading zeros included.
fn parse_comment(comment: &str) -> Option<(String, u64)> {
    let rest = comment.strip_prefix("kprobe v1 module-version=")?;
    let (module_version, rest) = rest.split_once(" file=")?;
    let (file, serial) = rest.rsplit_once(" serial=")?;
    if module_version.contains(' ') || file.contains(' ') {
        return None;
    }
    if serial.is_empty() || !serial.bytes().all(|b| b.is_ascii_digit()) || serial.starts_with('0') {
        return None;
    }
    let serial: u64 = serial.parse().ok()?;
    Some((format!("{module_version}/{file}"), serial))
}

/// The BLAKE2b-512 of a probe, computed as its bytes go by: what a
/// prehashed minisign signature signs.
#[derive(Clone, Default)]
pub struct Prehasher(blake2::Blake2b512);

impl Prehasher {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub fn finish(self) -> [u8; 64] {
        self.0.finalize().into()
    }
}

/// What a verified signature says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verified {
    pub key_id: KeyId,
    pub serial: u64,
}

/// The public keys a probe may be signed by, looked up by key id.
#[derive(Clone, Default)]
pub struct TrustedKeys {
    keys: Vec<TrustedKey>,
}

#[derive(Clone)]
struct TrustedKey {
    id: KeyId,
    key: minisign_verify::PublicKey,
    /// The key as its file holds it (`Ed`, key id, Ed25519 key): what
    /// `fingerprint` covers, since two keys may share an id.
    binary: [u8; 42],
}

impl fmt::Debug for TrustedKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.keys.iter().map(|key| key.id)).finish()
    }
}

impl TrustedKeys {
    /// Reads a file of one or more minisign public keys: `minisign.pub`
    /// files put one after the other, or one base64 key a line. Empty lines
    /// and lines starting with "untrusted comment:" or "#" are skipped. A
    /// key given twice counts once; two different keys with the same key id
    /// are an error, since a signature names its key by id only and one of
    /// them would silently shadow the other.
    pub fn load(path: &std::path::Path) -> Result<TrustedKeys, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        TrustedKeys::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<TrustedKeys, String> {
        // Each key with the line it came from, for the error of a shared id.
        let mut keys: Vec<(TrustedKey, usize)> = Vec::new();
        for (number, line) in text.lines().enumerate().map(|(i, line)| (i + 1, line.trim())) {
            if line.is_empty() || line.starts_with('#') || line.starts_with("untrusted comment:") {
                continue;
            }
            let bad = || format!("line {number} is not a minisign public key");
            let binary = STANDARD.decode(line).map_err(|_| bad())?;
            let Ok::<[u8; 42], _>(binary) = binary.try_into() else { return Err(bad()) };
            if &binary[..2] != b"Ed" {
                return Err(bad());
            }
            let key = minisign_verify::PublicKey::from_base64(line).map_err(|_| bad())?;
            let id = KeyId(binary[2..10].try_into().expect("8 bytes"));
            match keys.iter().find(|(known, _)| known.id == id) {
                None => keys.push((TrustedKey { id, key, binary }, number)),
                Some((known, _)) if known.binary == binary => {}
                Some((_, first)) => {
                    return Err(format!(
                        "line {first} and line {number} hold two different keys with the same key id {id}: a \
                         signature names its key by id only, so one would shadow the other; remove the one you \
                         did not make (anyone can give a new key any id)"
                    ));
                }
            }
        }
        if keys.is_empty() {
            return Err("no minisign public key in it".to_owned());
        }
        Ok(TrustedKeys { keys: keys.into_iter().map(|(key, _)| key).collect() })
    }

    pub fn key_ids(&self) -> impl Iterator<Item = KeyId> + '_ {
        self.keys.iter().map(|key| key.id)
    }

    /// The SHA-256, in hex, of the whole set of keys (the keys themselves,
    /// not only their ids), in no particular order of the file: what a
    /// cache of probes checked by these keys is tied to, so that replacing
    /// a key by another with the same id is seen.
    pub fn fingerprint(&self) -> String {
        let mut binaries: Vec<&[u8; 42]> = self.keys.iter().map(|key| &key.binary).collect();
        binaries.sort();
        let mut hasher = crate::digest::Sha256Hasher::new();
        for binary in binaries {
            hasher.update(binary);
        }
        hasher.finish().to_hex()
    }

    /// Checks `signature` (a `.minisig` file's bytes, if the probe came
    /// with one) of the probe `path` whose bytes are `data`.
    pub fn verify(&self, path: &ProbePath, data: &[u8], signature: Option<&[u8]>) -> Result<Verified, SignatureError> {
        self.check(path, signature, |key, parsed| key.verify(data, &parsed.decoded, false))
    }

    /// `verify`, given the probe's BLAKE2b-512 (`Prehasher`) instead of its
    /// bytes.
    pub fn verify_prehashed(
        &self,
        path: &ProbePath,
        prehash: &[u8; 64],
        signature: Option<&[u8]>,
    ) -> Result<Verified, SignatureError> {
        self.check(path, signature, |key, parsed| key.verify(prehash, &parsed.over_prehash(), true))
    }

    fn check(
        &self,
        path: &ProbePath,
        signature: Option<&[u8]>,
        verify: impl FnOnce(&minisign_verify::PublicKey, &ProbeSignature) -> Result<(), minisign_verify::Error>,
    ) -> Result<Verified, SignatureError> {
        let parsed = ProbeSignature::parse(signature.ok_or(SignatureError::Missing)?)?;
        let key_id = parsed.key_id;
        let trusted = self.keys.iter().find(|key| key.id == key_id).ok_or(SignatureError::UnknownKey(key_id))?;
        verify(&trusted.key, &parsed).map_err(|_| SignatureError::Invalid(key_id))?;
        // Only a verified comment is believed.
        if parsed.signed_path != path.to_string() {
            return Err(SignatureError::OtherProbe { signed_for: parsed.signed_path });
        }
        Ok(Verified { key_id, serial: parsed.serial })
    }
}

#[cfg(test)]
mod tests;
