//! A development PKI made with rcgen: a cluster CA, Central's server
//! certificate (valid for the names the product's clients check, the
//! loopback names and a site's own, `SERVER_NAMES`) and a Collector client
//! identity. `central-probes pki init --out DIR` writes it; tests make their
//! own at run time.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A certificate and its private key, both PEM.
#[derive(Clone, Debug)]
pub struct CertifiedKey {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A certificate authority that can issue server and client certificates.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    pub cert_pem: String,
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    name
}

impl CertificateAuthority {
    pub fn new(common_name: &str) -> Result<Self, rcgen::Error> {
        let mut params = CertificateParams::new(Vec::new())?;
        params.distinguished_name = distinguished_name(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate()?;
        let cert_pem = params.self_signed(&key)?.pem();
        Ok(CertificateAuthority { issuer: Issuer::new(params, key), cert_pem })
    }

    /// A server certificate for the given DNS names and IP addresses.
    pub fn issue_server(&self, names: &[&str]) -> Result<CertifiedKey, rcgen::Error> {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone())?;
        params.distinguished_name = distinguished_name(&names[0]);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params)
    }

    /// A client certificate, such as a Collector's identity.
    pub fn issue_client(&self, common_name: &str) -> Result<CertifiedKey, rcgen::Error> {
        self.issue(self.client_params(common_name)?)
    }

    /// A client certificate that expired long ago, for tests of refusal.
    pub fn issue_expired_client(&self, common_name: &str) -> Result<CertifiedKey, rcgen::Error> {
        let mut params = self.client_params(common_name)?;
        params.not_before = rcgen::date_time_ymd(2000, 1, 1);
        params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        self.issue(params)
    }

    fn client_params(&self, common_name: &str) -> Result<CertificateParams, rcgen::Error> {
        let mut params = CertificateParams::new(Vec::new())?;
        params.distinguished_name = distinguished_name(common_name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        Ok(params)
    }

    fn issue(&self, mut params: CertificateParams) -> Result<CertifiedKey, rcgen::Error> {
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(CertifiedKey { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }
}

/// The names of Central's certificate: those the product's unmodified
/// clients check (roxctl checks `central.stackrox` when given an IP
/// address; Collectors default `SNI_HOSTNAME` to `sensor.stackrox.svc`),
/// and the loopback names.
pub const SERVER_NAMES: &[&str] =
    &["central.stackrox", "central.stackrox.svc", "sensor.stackrox.svc", "localhost", "127.0.0.1"];

/// The files `init` writes, private keys after their certificates.
pub const FILES: [&str; 6] =
    ["ca.pem", "ca-key.pem", "server.pem", "server-key.pem", "collector.pem", "collector-key.pem"];

/// Writes a development PKI into `out`, the server certificate valid for
/// `SERVER_NAMES` and `extra_names`: the six `FILES`. Private keys are
/// readable by their owner only. Files already there are replaced only
/// with `replace`: a new CA invalidates every certificate the old one
/// issued, so a second run must not make one by accident.
pub fn init(out: &Path, extra_names: &[String], replace: bool) -> std::io::Result<()> {
    if !replace {
        let existing: Vec<&str> =
            FILES.iter().copied().filter(|name| out.join(name).symlink_metadata().is_ok()).collect();
        if !existing.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!(
                    "it already holds {}; a new CA would invalidate every certificate the one there issued. \
                     Keep them, or give --force to replace them",
                    existing.join(", ")
                ),
            ));
        }
    }
    let error = |e: rcgen::Error| std::io::Error::other(format!("making certificates: {e}"));
    let ca = CertificateAuthority::new("central-probes development CA").map_err(error)?;
    let mut names: Vec<&str> = SERVER_NAMES.to_vec();
    names.extend(extra_names.iter().map(String::as_str).filter(|name| !SERVER_NAMES.contains(name)));
    let server = ca.issue_server(&names).map_err(error)?;
    let collector = ca.issue_client("collector").map_err(error)?;
    fs::create_dir_all(out)?;
    let contents = [
        (&ca.cert_pem, 0o644),
        (&ca.key_pem(), 0o600),
        (&server.cert_pem, 0o644),
        (&server.key_pem, 0o600),
        (&collector.cert_pem, 0o644),
        (&collector.key_pem, 0o600),
    ];
    for (name, (content, mode)) in FILES.iter().zip(contents) {
        write_file(&out.join(name), content, mode, replace)?;
    }
    Ok(())
}

/// Writes `path`; without `replace`, only if nothing is there (`O_EXCL`:
/// not even a file made since `init` looked).
fn write_file(path: &Path, content: &str, mode: u32, replace: bool) -> std::io::Result<()> {
    let mut options = fs::OpenOptions::new();
    options.write(true).mode(mode);
    if replace {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let mut file = options.open(path).map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    file.write_all(content.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_writes_all_six_files_with_private_keys_kept_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), &[], false).unwrap();
        for name in ["ca.pem", "server.pem", "collector.pem"] {
            let text = fs::read_to_string(dir.path().join(name)).unwrap();
            assert!(text.starts_with("-----BEGIN CERTIFICATE-----"), "{name}");
        }
        for name in ["ca-key.pem", "server-key.pem", "collector-key.pem"] {
            let path = dir.path().join(name);
            assert!(fs::read_to_string(&path).unwrap().contains("PRIVATE KEY"));
            assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600, "{name}");
        }
    }

    #[test]
    fn a_second_init_keeps_the_ca_unless_forced_and_names_the_files_and_the_flag() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), &[], false).unwrap();
        let read = |name: &str| fs::read(dir.path().join(name)).unwrap();
        let (ca, ca_key) = (read("ca.pem"), read("ca-key.pem"));
        let error = init(dir.path(), &[], false).unwrap_err().to_string();
        assert!(error.contains("ca.pem, ca-key.pem, server.pem") && error.contains("--force"), "{error}");
        assert_eq!((read("ca.pem"), read("ca-key.pem")), (ca.clone(), ca_key.clone()), "the CA is kept");
        // One file left of an earlier run is enough to refuse.
        let other = tempfile::tempdir().unwrap();
        fs::write(other.path().join("collector-key.pem"), "mine").unwrap();
        let error = init(other.path(), &[], false).unwrap_err().to_string();
        assert!(error.contains("collector-key.pem") && !error.contains("ca.pem"), "{error}");
        assert!(!other.path().join("ca.pem").exists(), "nothing written");
        init(dir.path(), &[], true).unwrap();
        assert_ne!(read("ca.pem"), ca, "--force makes a new CA");
        assert_ne!(read("ca-key.pem"), ca_key);
    }

    #[test]
    fn the_server_certificate_holds_the_names_unmodified_clients_check_and_a_sites_own() {
        use rustls::client::danger::ServerCertVerifier;
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
        crate::server::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), &["probes.example.com".to_owned(), "10.1.2.3".to_owned()], false).unwrap();
        let read = |name: &str| fs::read(dir.path().join(name)).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(&read("ca.pem")).unwrap()).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder(std::sync::Arc::new(roots)).build().unwrap();
        let server = CertificateDer::from_pem_slice(&read("server.pem")).unwrap();
        let verify = |name: &str| {
            let name = ServerName::try_from(name.to_owned()).unwrap();
            verifier.verify_server_cert(&server, &[], &name, &[], UnixTime::now()).is_ok()
        };
        for name in SERVER_NAMES.iter().copied().chain(["probes.example.com", "10.1.2.3"]) {
            assert!(verify(name), "{name}");
        }
        assert!(!verify("central.example.com"), "no other name");
    }
}
