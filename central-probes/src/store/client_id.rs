//! Who asked for a probe, as a number: the misses count distinct clients by
//! it. A client with a certificate is its subject (the DER of its
//! distinguished name, so that renewed certificates and other keys of one
//! name count once); one without (anonymous reads) is its IP address.
//! Hashed, since only equality matters and the misses keep many.

use std::net::IpAddr;

use probe_api::digest::Sha256Digest;

/// A client, for counting distinct ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(pub u64);

impl ClientId {
    /// The client of a connection: its certificate's subject if it showed
    /// one (rustls verified it), else its address.
    pub fn of(certificate: Option<&[u8]>, address: Option<IpAddr>) -> ClientId {
        match certificate.and_then(subject_der) {
            Some(subject) => hashed(b"subject:", subject),
            None => hashed(b"address:", address.map(|a| a.to_string()).unwrap_or_default().as_bytes()),
        }
    }
}

fn hashed(kind: &[u8], bytes: &[u8]) -> ClientId {
    let digest = Sha256Digest::of(&[kind, bytes].concat());
    ClientId(u64::from_be_bytes(digest.0[..8].try_into().expect("8 bytes")))
}

/// The subject Name of a DER X.509 certificate, tag and length included:
/// `Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version
/// OPTIONAL, serialNumber, signature, issuer, validity, subject, ... } ... }`.
fn subject_der(certificate: &[u8]) -> Option<&[u8]> {
    let (certificate, _) = contents(certificate, 0x30)?;
    let (mut tbs, _) = contents(certificate, 0x30)?;
    if tbs.first() == Some(&0xa0) {
        tbs = skip(tbs)?; // version
    }
    for _ in ["serialNumber", "signature", "issuer", "validity"] {
        tbs = skip(tbs)?;
    }
    let rest = skip(tbs)?;
    Some(&tbs[..tbs.len() - rest.len()])
}

/// The header of the DER element at the start of `der`: its tag, the
/// length of its contents, and the length of the header.
fn header(der: &[u8]) -> Option<(u8, usize, usize)> {
    let (&tag, rest) = der.split_first()?;
    let (&first, rest) = rest.split_first()?;
    if first < 0x80 {
        return Some((tag, usize::from(first), 2));
    }
    let octets = usize::from(first & 0x7f);
    if octets == 0 || octets > 4 || rest.len() < octets {
        return None;
    }
    let length = rest[..octets].iter().fold(0usize, |length, &byte| (length << 8) | usize::from(byte));
    Some((tag, length, 2 + octets))
}

/// The contents of the element at the start of `der`, which must have
/// `tag`, and what follows it.
fn contents(der: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (found, length, header_len) = header(der)?;
    let end = header_len.checked_add(length)?;
    (found == tag && der.len() >= end).then(|| (&der[header_len..end], &der[end..]))
}

/// What follows the element at the start of `der`.
fn skip(der: &[u8]) -> Option<&[u8]> {
    let (_, length, header_len) = header(der)?;
    der.get(header_len.checked_add(length)?..)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::CertificateAuthority;
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    fn der(pem: &str) -> Vec<u8> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap().to_vec()
    }

    #[test]
    fn clients_are_told_apart_by_certificate_subject_and_else_by_address() {
        let ca = CertificateAuthority::new("test CA").unwrap();
        let (a1, a2, b) = (
            ca.issue_client("node-a").unwrap(),
            ca.issue_client("node-a").unwrap(),
            ca.issue_client("node-b").unwrap(),
        );
        let id = |pem: &str| ClientId::of(Some(&der(pem)), None);
        assert_eq!(id(&a1.cert_pem), id(&a2.cert_pem), "another key of one name is one client");
        assert_ne!(id(&a1.cert_pem), id(&b.cert_pem));
        assert!(subject_der(&der(&a1.cert_pem)).is_some_and(|s| s.windows(6).any(|w| w == b"node-a")));

        let address = |ip: &str| ClientId::of(None, Some(ip.parse().unwrap()));
        assert_eq!(address("10.0.0.1"), address("10.0.0.1"));
        assert_ne!(address("10.0.0.1"), address("10.0.0.2"));
        assert_ne!(address("10.0.0.1"), id(&a1.cert_pem));
    }

    #[test]
    fn malformed_certificates_fall_back_to_the_address() {
        let address = Some("10.0.0.1".parse().unwrap());
        for garbage in [&b""[..], b"\x30", b"\x30\x84\xff\xff\xff\xff", b"\x30\x03\x30\x01\x02", b"\x04\x00"] {
            assert_eq!(subject_der(garbage), None, "{garbage:?}");
            assert_eq!(ClientId::of(Some(garbage), address), ClientId::of(None, address));
        }
    }
}
