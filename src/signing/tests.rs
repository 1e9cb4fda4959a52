//! Signatures made by minisign's own crate (the end-to-end tests use the
//! `minisign` tool), checked by `TrustedKeys`.

use super::*;

struct Signer {
    keys: minisign::KeyPair,
}

impl Signer {
    fn new() -> Signer {
        Signer { keys: minisign::KeyPair::generate_unencrypted_keypair().unwrap() }
    }

    fn sign_with_comment(&self, data: &[u8], comment: &str) -> Vec<u8> {
        let signature =
            minisign::sign(Some(&self.keys.pk), &self.keys.sk, std::io::Cursor::new(data), Some(comment), None)
                .unwrap();
        signature.into_string().into_bytes()
    }

    fn sign(&self, path: &ProbePath, serial: u64, data: &[u8]) -> Vec<u8> {
        self.sign_with_comment(data, &trusted_comment(path, serial))
    }

    /// The public key as `minisign -G` writes it.
    fn public_key_file(&self) -> String {
        self.keys.pk.to_box().unwrap().into_string()
    }

    fn trusted(&self) -> TrustedKeys {
        TrustedKeys::parse(&self.public_key_file()).unwrap()
    }
}

fn path(text: &str) -> ProbePath {
    ProbePath::parse(text).unwrap()
}

const PROBE: &str = "2.5.0/collector-ebpf-5.14.0-284.11.1.el9_2.x86_64.o.gz";

#[test]
fn a_signature_of_the_probe_verifies_with_its_key_id_and_serial() {
    let signer = Signer::new();
    let probe = path(PROBE);
    let signature = signer.sign(&probe, 7, b"probe bytes");
    let verified = signer.trusted().verify(&probe, b"probe bytes", Some(&signature)).unwrap();
    assert_eq!(verified.serial, 7);
    let key_file = signer.public_key_file();
    assert!(key_file.contains(&verified.key_id.to_string()), "{key_file} names {}", verified.key_id);
    assert_eq!(ProbeSignature::parse(&signature).unwrap().key_id(), verified.key_id);
}

#[test]
fn the_prehashed_check_agrees_with_the_check_of_the_bytes() {
    let signer = Signer::new();
    let probe = path(PROBE);
    let data = vec![7u8; 300_000];
    let signature = signer.sign(&probe, 1, &data);
    let mut hasher = Prehasher::new();
    hasher.update(&data[..1000]);
    hasher.update(&data[1000..]);
    let prehash = hasher.finish();
    let trusted = signer.trusted();
    assert_eq!(trusted.verify_prehashed(&probe, &prehash, Some(&signature)).unwrap().serial, 1);
    let mut other = Prehasher::new();
    other.update(&data[1..]);
    let key_id = ProbeSignature::parse(&signature).unwrap().key_id();
    assert_eq!(
        trusted.verify_prehashed(&probe, &other.finish(), Some(&signature)),
        Err(SignatureError::Invalid(key_id))
    );
}

#[test]
fn every_change_is_refused_with_its_reason() {
    let signer = Signer::new();
    let probe = path(PROBE);
    let trusted = signer.trusted();
    let signature = signer.sign(&probe, 3, b"probe bytes");
    let key_id = ProbeSignature::parse(&signature).unwrap().key_id();

    assert_eq!(trusted.verify(&probe, b"probe byteS", Some(&signature)), Err(SignatureError::Invalid(key_id)));
    assert_eq!(trusted.verify(&probe, b"probe bytes", None), Err(SignatureError::Missing));

    // Moved to another file, or another module version.
    let other_file = path("2.5.0/collector-ebpf-5.15.0-1.x86_64.o.gz");
    assert!(matches!(
        trusted.verify(&other_file, b"probe bytes", Some(&signature)),
        Err(SignatureError::OtherProbe { signed_for }) if signed_for == PROBE
    ));
    let other_version = path("2.6.0/collector-ebpf-5.14.0-284.11.1.el9_2.x86_64.o.gz");
    assert!(matches!(
        trusted.verify(&other_version, b"probe bytes", Some(&signature)),
        Err(SignatureError::OtherProbe { .. })
    ));

    // An edited trusted comment: still of the form, but not what was signed.
    let text = String::from_utf8(signature.clone()).unwrap();
    let edited = text.replace("serial=3", "serial=4");
    assert_ne!(edited, text);
    assert_eq!(trusted.verify(&probe, b"probe bytes", Some(edited.as_bytes())), Err(SignatureError::Invalid(key_id)));
    let renamed = text.replace(".o.gz", ".o.gz.x");
    assert_eq!(trusted.verify(&probe, b"probe bytes", Some(renamed.as_bytes())), Err(SignatureError::Invalid(key_id)));

    // Signed by a key that is not trusted.
    let stranger = Signer::new();
    let foreign = stranger.sign(&probe, 3, b"probe bytes");
    let stranger_id = ProbeSignature::parse(&foreign).unwrap().key_id();
    assert_eq!(trusted.verify(&probe, b"probe bytes", Some(&foreign)), Err(SignatureError::UnknownKey(stranger_id)));

    // A legacy signature: the same bytes with the legacy algorithm.
    let lines: Vec<&str> = text.lines().collect();
    let mut binary = STANDARD.decode(lines[1]).unwrap();
    binary[1] = b'd';
    let legacy = format!("{}\n{}\n{}\n{}\n", lines[0], STANDARD.encode(&binary), lines[2], lines[3]);
    assert_eq!(trusted.verify(&probe, b"probe bytes", Some(legacy.as_bytes())), Err(SignatureError::Legacy));
}

#[test]
fn malformed_oversized_and_foreign_comments_are_refused_before_any_check() {
    let signer = Signer::new();
    let probe = path(PROBE);
    let trusted = signer.trusted();
    let huge = vec![b'a'; 1 << 20];
    assert_eq!(trusted.verify(&probe, b"x", Some(&huge)), Err(SignatureError::TooLarge(1 << 20)));
    for junk in [&b""[..], b"\xff\xfe", b"untrusted comment: x\nnot base64\ntrusted comment: y\nz\n", b"one line"] {
        let result = trusted.verify(&probe, b"x", Some(junk));
        assert!(matches!(result, Err(SignatureError::Malformed(_))), "{junk:?}: {result:?}");
    }
    for comment in [
        "timestamp:1555779966\tfile:test",
        "kprobe v1 module-version=2.5.0 file=x serial=0",
        "kprobe v1 module-version=2.5.0 file=x serial=01",
        "kprobe v1 module-version=2.5.0 file=x serial=-1",
        "kprobe v1 module-version=2.5.0 file=x serial=",
        "kprobe v2 module-version=2.5.0 file=x serial=1",
    ] {
        let signature = signer.sign_with_comment(b"x", comment);
        let result = trusted.verify(&probe, b"x", Some(&signature));
        assert!(matches!(result, Err(SignatureError::BadComment(_))), "{comment}: {result:?}");
    }
}

#[test]
fn a_key_file_holds_several_keys_and_refuses_junk() {
    let (a, b) = (Signer::new(), Signer::new());
    let both =
        TrustedKeys::parse(&format!("{}\n# rotated in 2026-12\n{}", a.public_key_file(), b.public_key_file())).unwrap();
    assert_eq!(both.key_ids().count(), 2);
    let probe = path(PROBE);
    for signer in [&a, &b] {
        assert!(both.verify(&probe, b"p", Some(&signer.sign(&probe, 1, b"p"))).is_ok());
    }
    assert!(TrustedKeys::parse("").unwrap_err().contains("no minisign public key"));
    let junk = TrustedKeys::parse(&format!("{}\nRWQnot-a-key\n", a.public_key_file().trim_end())).unwrap_err();
    assert!(junk.contains("line 3"), "{junk}");
}

/// `signer`'s public key file with its key id replaced by `id`'s: another
/// key under the same id, as anyone can make one.
fn key_file_with_id_of(signer: &Signer, id: &Signer) -> String {
    let key_line = |s: &Signer| s.public_key_file().lines().nth(1).unwrap().to_owned();
    let mut binary = STANDARD.decode(key_line(signer)).unwrap();
    binary[2..10].copy_from_slice(&STANDARD.decode(key_line(id)).unwrap()[2..10]);
    format!("untrusted comment: same id\n{}\n", STANDARD.encode(binary))
}

#[test]
fn two_keys_with_one_key_id_are_refused_naming_both() {
    let (a, b) = (Signer::new(), Signer::new());
    let shadow = key_file_with_id_of(&b, &a);
    let id = a.trusted().key_ids().next().unwrap();
    for (text, lines) in [
        (format!("{}{shadow}", a.public_key_file()), ("line 2", "line 4")),
        (format!("{shadow}# rotated\n{}", a.public_key_file()), ("line 2", "line 5")),
    ] {
        let error = TrustedKeys::parse(&text).unwrap_err();
        assert!(error.contains(lines.0) && error.contains(lines.1), "{error}");
        assert!(error.contains(&id.to_string()), "{error}");
    }
    // The same key twice is one key, not a conflict.
    let twice = TrustedKeys::parse(&format!("{}{}", a.public_key_file(), a.public_key_file())).unwrap();
    assert_eq!(twice.key_ids().count(), 1);
}

#[test]
fn the_fingerprint_covers_the_keys_not_only_their_ids() {
    let (a, b) = (Signer::new(), Signer::new());
    let original = a.trusted();
    let same_id = TrustedKeys::parse(&key_file_with_id_of(&b, &a)).unwrap();
    assert_eq!(original.key_ids().collect::<Vec<_>>(), same_id.key_ids().collect::<Vec<_>>());
    assert_ne!(original.fingerprint(), same_id.fingerprint());
    let both = |first: &Signer, second: &Signer| {
        TrustedKeys::parse(&format!("{}{}", first.public_key_file(), second.public_key_file())).unwrap()
    };
    assert_eq!(both(&a, &b).fingerprint(), both(&b, &a).fingerprint(), "the order of the file does not matter");
    assert_eq!(original.fingerprint(), a.trusted().fingerprint());
}
