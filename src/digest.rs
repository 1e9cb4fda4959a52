//! SHA-256 digests as the API writes them (64 lowercase hex characters),
//! and the one hasher every component uses.
//!
//! Hashing is on the hot path of uploads and downloads. ring's SHA-256 is
//! BoringSSL's assembly (SHA-NI, AVX2, SSSE3 by CPU); the sha2 crate falls
//! back to portable code on x86 CPUs without SHA-NI, which is slower there.
//! ring is in the tree already, for rustls.

use std::fmt;

/// An incremental SHA-256 computation.
pub struct Sha256Hasher(ring::digest::Context);

impl Sha256Hasher {
    pub fn new() -> Self {
        Sha256Hasher(ring::digest::Context::new(&ring::digest::SHA256))
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub fn finish(self) -> Sha256Digest {
        let digest = self.0.finish();
        Sha256Digest(digest.as_ref().try_into().expect("SHA-256 is 32 bytes"))
    }
}

impl Default for Sha256Hasher {
    fn default() -> Self {
        Self::new()
    }
}

/// A SHA-256 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sha256Digest(pub [u8; 32]);

impl Sha256Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        let mut hasher = Sha256Hasher::new();
        hasher.update(bytes);
        hasher.finish()
    }

    /// Parses 64 lowercase hex characters; anything else is `None`.
    pub fn from_hex(s: &str) -> Option<Self> {
        if s.len() != 64 {
            return None;
        }
        Some(Sha256Digest(hex_decode(s)?.try_into().ok()?))
    }

    pub fn to_hex(&self) -> String {
        hex_encode(&self.0)
    }
}

/// Lowercase hex of `bytes`.
pub fn hex_encode(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        s.push(HEX[usize::from(byte >> 4)] as char);
        s.push(HEX[usize::from(byte & 0xf)] as char);
    }
    s
}

/// The bytes of lowercase hex; `None` for anything else.
pub fn hex_decode(s: &str) -> Option<Vec<u8>> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    let hex = s.as_bytes();
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    hex.chunks_exact(2).map(|pair| Some(nibble(pair[0])? << 4 | nibble(pair[1])?)).collect()
}

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256Digest({})", self.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digests_come_out_right() {
        let empty = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        assert_eq!(Sha256Digest::of(b"").to_hex(), empty);
        let mut hasher = Sha256Hasher::new();
        hasher.update(b"a");
        hasher.update(b"bc");
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(hasher.finish().to_hex(), abc);
    }

    #[test]
    fn hex_round_trips_and_rejects_malformed_digests() {
        let hex = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        assert_eq!(Sha256Digest::from_hex(hex).unwrap().to_hex(), hex);
        assert!(Sha256Digest::from_hex(&hex.to_uppercase()).is_none());
        assert!(Sha256Digest::from_hex(&hex[..63]).is_none());
        assert!(Sha256Digest::from_hex(&format!("{hex}0")).is_none());
        assert!(Sha256Digest::from_hex(&hex.replace('e', "g")).is_none());
    }
}
