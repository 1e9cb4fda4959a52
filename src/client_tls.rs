//! What a client presents and trusts over TLS, shared by the gRPC
//! transport (`transport`) and the HTTPS client (`https`), and the check
//! that a CA file holds a certificate at all: without one, TLS would only
//! fail later, as an "unknown issuer" that points at the wrong thing.

use std::path::{Path, PathBuf};

/// TLS settings of a client.
#[derive(Clone, Debug, Default)]
pub struct ClientTls {
    /// PEM of the CA that signed Central's server certificate.
    pub ca_pem: Vec<u8>,
    /// PEM certificate and key presented to Central, if any.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

/// Why PEM meant to hold CA certificates cannot be trusted.
#[derive(Debug)]
pub enum CaPemError {
    /// No `CERTIFICATE` section (an empty file, a key, a DER file).
    NoCertificate,
    /// A `CERTIFICATE` section that does not decode.
    Invalid(String),
}

impl std::fmt::Display for CaPemError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CaPemError::NoCertificate => f.write_str("holds no PEM certificate"),
            CaPemError::Invalid(why) => write!(f, "holds a PEM certificate that cannot be read: {why}"),
        }
    }
}

/// The number of certificates in `pem`; an error without any.
pub fn check_ca_pem(pem: &[u8]) -> Result<usize, CaPemError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut count = 0;
    for certificate in CertificateDer::pem_slice_iter(pem) {
        certificate.map_err(|e| CaPemError::Invalid(e.to_string()))?;
        count += 1;
    }
    if count == 0 {
        return Err(CaPemError::NoCertificate);
    }
    Ok(count)
}

/// A CA file that cannot be used: unreadable, or without a certificate.
#[derive(Debug)]
pub struct CaFileError {
    pub path: PathBuf,
    pub why: CaFileProblem,
}

#[derive(Debug)]
pub enum CaFileProblem {
    Read(std::io::Error),
    Pem(CaPemError),
}

impl std::fmt::Display for CaFileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.why {
            CaFileProblem::Read(error) => write!(f, "reading the CA certificate {}: {error}", self.path.display()),
            CaFileProblem::Pem(error) => write!(f, "{} {error}", self.path.display()),
        }
    }
}

impl std::error::Error for CaFileError {}

/// Reads a CA file (`--ca`) and checks up front that it holds at least one
/// PEM certificate.
pub fn read_ca_file(path: &Path) -> Result<Vec<u8>, CaFileError> {
    let error = |why| CaFileError { path: path.to_owned(), why };
    let pem = std::fs::read(path).map_err(|e| error(CaFileProblem::Read(e)))?;
    check_ca_pem(&pem).map_err(|e| error(CaFileProblem::Pem(e)))?;
    Ok(pem)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n";

    #[test]
    fn a_ca_file_without_a_pem_certificate_is_named_up_front() {
        let dir = std::env::temp_dir().join(format!("ca-check-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, content) in [("empty.pem", ""), ("key.pem", KEY), ("text.pem", "not a certificate\n")] {
            let path = dir.join(name);
            std::fs::write(&path, content).unwrap();
            let error = read_ca_file(&path).unwrap_err().to_string();
            assert_eq!(error, format!("{} holds no PEM certificate", path.display()));
        }
        let broken = dir.join("broken.pem");
        std::fs::write(&broken, "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n").unwrap();
        let error = read_ca_file(&broken).unwrap_err().to_string();
        assert!(error.contains("cannot be read"), "{error}");
        let missing = read_ca_file(&dir.join("missing.pem")).unwrap_err().to_string();
        assert!(missing.starts_with("reading the CA certificate"), "{missing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
