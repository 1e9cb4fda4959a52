//! End to end: `central-probes package sign` and `package verify` with
//! keys of the real `minisign` tool, which checks what we sign; a package
//! signed by the tool itself; a Central with `--trusted-keys` refusing at
//! upload and from the upstream every probe whose signature does not
//! verify, keeping nothing of it; and an export that re-imports verified.

#[path = "common/cli.rs"]
mod cli;
mod common;
#[path = "common/minisign.rs"]
mod minisign;

use std::io::{Read, Write};
use std::path::Path;

use central_probes::server::metrics::SignatureLabels;
use central_probes::server::upstream::UpstreamKind;
use central_probes::synthetic::PackageSpec;
use cli::central_cli;
use common::{Central, CentralOptions, TestPki};
use minisign::MinisignKey;
use probe_api::signing::{TrustedKeys, trusted_comment};
use tonic::Code;

fn spec() -> PackageSpec {
    let kernels = ["5.4.0-100-generic", "5.10.0-27-cloud-amd64", "6.1.0-18-amd64"];
    PackageSpec { kernel_modules: true, size_divisor: 20, ..PackageSpec::new("2.5.0", &kernels) }
}

async fn cli(central: Option<&Central>, pki: &TestPki, args: &[&str]) -> (bool, String, String) {
    let ca = pki.ca_file();
    let mut args = args.to_vec();
    let token = central.map(|c| c.admin_token.clone()).unwrap_or_default();
    if let Some(central) = central {
        args.extend(["-e", &central.address, "--ca", ca.to_str().unwrap()]);
    }
    central_cli(&args, &token).await
}

/// `package verify` of `package` against `keys`.
async fn verify(keys: &MinisignKey, package: &Path) -> (i32, String, String) {
    let (keys, package) = (keys.public.display().to_string(), package.display().to_string());
    cli::central_cli_status(&["package", "verify", &package, "--trusted-keys", &keys], "").await
}

/// The entries of a zip file, by name.
fn entries(path: &Path) -> Vec<(String, Vec<u8>)> {
    let mut archive = zip::ZipArchive::new(std::fs::File::open(path).unwrap()).unwrap();
    (0..archive.len())
        .map(|i| {
            let mut entry = archive.by_index(i).unwrap();
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).unwrap();
            (entry.name().unwrap().into_owned(), bytes)
        })
        .collect()
}

fn trusted(key: &MinisignKey) -> Option<TrustedKeys> {
    Some(TrustedKeys::load(&key.public).unwrap())
}

/// Uploads one file with `signature` in its trailer: the call's result.
async fn upload_one(
    central: &Central,
    pki: &TestPki,
    path: &str,
    bytes: &[u8],
    signature: &[u8],
) -> Result<(), tonic::Status> {
    common::upload_signed(central, pki, path, bytes, Some(signature)).await
}

fn refusals(central: &Central, reason: &'static str, at: &'static str) -> u64 {
    central.metrics.signature_refusals.get_or_create(&SignatureLabels { reason, at }).get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_package_verifies_with_minisign_uploads_to_a_checking_central_and_exports_verified() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let (key, stranger) = (MinisignKey::generate(dir.path(), "site"), MinisignKey::generate(dir.path(), "other"));
    let (package, signed) = (dir.path().join("pkg.zip"), dir.path().join("signed.zip"));
    spec().write(&package).unwrap();
    let sign = ["package", "sign", package.to_str().unwrap(), "--secret-key", key.secret.to_str().unwrap()];
    let (ok, out, err) =
        cli(None, &pki, &[&sign[..], &["--serial", "5", "-o", "json", "--out", signed.to_str().unwrap()]].concat())
            .await;
    assert!(ok, "{out}\n{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((report["signed"].as_u64(), report["serial"].as_u64()), (Some(6), Some(5)), "{report}");

    // The stock tool checks what we signed.
    let signed_entries = entries(&signed);
    let probes: Vec<&(String, Vec<u8>)> = signed_entries.iter().filter(|(name, _)| name.ends_with(".gz")).collect();
    assert_eq!(probes.len(), 6);
    for (name, bytes) in &probes {
        let signature = &signed_entries.iter().find(|(n, _)| *n == format!("{name}.minisig")).unwrap().1;
        assert!(key.verifies(bytes, signature), "minisign -V {name}");
        assert!(!stranger.verifies(bytes, signature));
        let path = probe_api::names::ProbePath::parse(name.strip_prefix("kernel-modules/").unwrap()).unwrap();
        assert!(String::from_utf8_lossy(signature).contains(&trusted_comment(&path, 5)));
    }
    let (status, out, _) = verify(&key, &signed).await;
    assert!(status == 0 && out.contains("6 of 6 probes verified"), "{out}");
    let (status, out, _) = verify(&stranger, &signed).await;
    assert!(status == 1 && out.matches("FAILED").count() == 6 && out.contains("not trusted"), "{out}");
    let (status, out, _) = verify(&key, &package).await;
    assert!(status == 1 && out.contains("not signed"), "{out}");
    // A package that cannot be read is no finding: exit status 2.
    let (status, out, err) = verify(&key, &dir.path().join("missing.zip")).await;
    assert!(status == 2 && err.contains("missing.zip"), "{status} {out}\n{err}");

    // A Central that checks: the signed package is stored, its signatures
    // listed and served byte for byte.
    let options = CentralOptions { trusted_keys: trusted(&key), ..Default::default() };
    let central = Central::start_with(&pki, &dir.path().join("central"), options).await;
    let (ok, out, err) = cli(Some(&central), &pki, &["upload", "-o", "json", signed.to_str().unwrap()]).await;
    assert!(ok, "{out}\n{err}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).unwrap()["stored"], 6, "{out}");
    let (_, listing, _) = cli(Some(&central), &pki, &["ls", "-o", "json"]).await;
    let listing: serde_json::Value = serde_json::from_str(&listing).unwrap();
    for probe in listing["probes"].as_array().unwrap() {
        assert_eq!(probe["signature"]["key_id"].as_str(), Some(key.key_id().as_str()), "{probe}");
        assert_eq!(probe["signature"]["serial"], 5, "{probe}");
    }
    let (_, text, _) = cli(Some(&central), &pki, &["ls"]).await;
    assert!(text.lines().all(|line| line.ends_with(&format!("signed-by {} serial 5", key.key_id()))), "{text}");
    let (name, bytes) = probes[0];
    let path = name.strip_prefix("kernel-modules/").unwrap();
    let (version, file) = path.split_once('/').unwrap();
    let fetched = central.collector(&pki, Some(&pki.collector)).fetch(version, file).await.unwrap();
    assert_eq!(&fetched.bytes, bytes);
    let stored_signature = &signed_entries.iter().find(|(n, _)| *n == format!("{name}.minisig")).unwrap().1;
    assert_eq!(fetched.signature.as_ref(), Some(stored_signature), "byte for byte");
    // Again: nothing to send. The unsigned package is refused whole.
    let (ok, out, _) = cli(Some(&central), &pki, &["upload", "-o", "json", signed.to_str().unwrap()]).await;
    assert!(ok && serde_json::from_str::<serde_json::Value>(&out).unwrap()["identical"] == 6, "{out}");
    let (ok, _, err) = cli(Some(&central), &pki, &["upload", "--overwrite", package.to_str().unwrap()]).await;
    assert!(!ok && err.contains("is not signed"), "{err}");
    assert!(refusals(&central, "missing", "upload") >= 1, "counted");

    // A package signed by the minisign tool itself, with our comment.
    let by_tool = dir.path().join("by-tool.zip");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&by_tool).unwrap());
    let stored = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let probe_path = probe_api::names::ProbePath::parse(path).unwrap();
    for (entry, content) in [
        (name.clone(), bytes.clone()),
        (format!("{name}.minisig"), key.sign_with(bytes, &trusted_comment(&probe_path, 6), false)),
    ] {
        zip.start_file(entry, stored).unwrap();
        zip.write_all(&content).unwrap();
    }
    zip.finish().unwrap();
    let (ok, out, err) =
        cli(Some(&central), &pki, &["upload", "--overwrite", "-o", "json", by_tool.to_str().unwrap()]).await;
    assert!(ok, "{out}\n{err}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).unwrap()["overwritten"], 1, "{out}");

    // Export, then import into a fresh checking Central: all verified.
    let exported = dir.path().join("exported.zip");
    let (ok, _, err) = cli(Some(&central), &pki, &["export", "--out", exported.to_str().unwrap()]).await;
    assert!(ok, "{err}");
    let (status, out, _) = verify(&key, &exported).await;
    assert!(status == 0 && out.contains("6 of 6 probes verified"), "{out}");
    let options = CentralOptions { trusted_keys: trusted(&key), ..Default::default() };
    let fresh = Central::start_with(&pki, &dir.path().join("fresh"), options).await;
    let (ok, out, err) = cli(Some(&fresh), &pki, &["upload", "-o", "json", exported.to_str().unwrap()]).await;
    assert!(ok && serde_json::from_str::<serde_json::Value>(&out).unwrap()["stored"] == 6, "{out}\n{err}");
    fresh.stop().await;
    central.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checking_central_refuses_each_bad_signature_at_upload_and_keeps_nothing() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let (key, stranger) = (MinisignKey::generate(dir.path(), "site"), MinisignKey::generate(dir.path(), "other"));
    let options = CentralOptions { trusted_keys: trusted(&key), ..Default::default() };
    let central = Central::start_with(&pki, &dir.path().join("central"), options).await;
    let path = "2.5.0/collector-ebpf-5.4.0-100-generic.o.gz";
    let other = "2.5.0/collector-ebpf-6.1.0-18-amd64.o.gz";
    let bytes = b"the probe's bytes".repeat(100);
    let good = String::from_utf8(key.sign(path, 2, &bytes)).unwrap();
    let legacy = key.sign_with(&bytes, &good.lines().nth(2).unwrap()["trusted comment: ".len()..], true);
    let cases: Vec<(&str, Vec<u8>, &str, &'static str)> = vec![
        ("unsigned", Vec::new(), "is not signed", "missing"),
        ("an unknown key", stranger.sign(path, 2, &bytes), "not trusted", "unknown_key"),
        ("an edited comment", good.replace("serial=2", "serial=9").into_bytes(), "does not verify", "invalid"),
        ("another file's signature", key.sign(other, 2, &bytes), "for another probe", "other_probe"),
        ("a legacy signature", legacy, "legacy", "legacy"),
        ("a malformed signature", b"untrusted comment: x\nAAAA\n".to_vec(), "not a minisign signature", "malformed"),
        ("a foreign comment", key.sign_with(&bytes, "timestamp:1\tfile:x", false), "trusted comment", "bad_comment"),
    ];
    for (attack, signature, says, reason) in cases {
        let status = upload_one(&central, &pki, path, &bytes, &signature).await.expect_err(attack);
        assert_eq!(status.code(), Code::FailedPrecondition, "{attack}: {status:?}");
        assert!(status.message().contains(path) && status.message().contains(says), "{attack}: {status:?}");
        assert_eq!(refusals(&central, reason, "upload"), 1, "{attack}");
    }
    let huge = vec![b'a'; 1 << 20];
    let status = upload_one(&central, &pki, path, &bytes, &huge).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let (_, listing, _) = cli(Some(&central), &pki, &["ls", "-o", "json"]).await;
    assert!(listing.contains("\"count\":0"), "nothing was stored: {listing}");
    assert_eq!(common::tmp_files(&dir.path().join("central")), 0, "nor left in tmp/");
    upload_one(&central, &pki, path, &bytes, good.as_bytes()).await.unwrap();
    central.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checking_central_serves_and_caches_only_verified_upstream_probes() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let (key, stranger) = (MinisignKey::generate(dir.path(), "site"), MinisignKey::generate(dir.path(), "other"));
    let options = CentralOptions { allow_anonymous_reads: true, ..Default::default() };
    let upstream = Central::start_with(&pki, &dir.path().join("upstream"), options).await;
    let (good, bad) = ("2.5.0/collector-ebpf-5.4.0-1.o.gz", "2.5.0/collector-ebpf-5.4.0-2.o.gz");
    upload_one(&upstream, &pki, good, b"good probe", &key.sign(good, 1, b"good probe")).await.unwrap();
    upload_one(&upstream, &pki, bad, b"bad probe", &stranger.sign(bad, 1, b"bad probe")).await.unwrap();
    let kind = UpstreamKind::Grpc { address: format!("https://{}", upstream.address) };
    let upstream_config = common::upstream_config(&pki, kind, &dir.path().join("upstream-cache"));
    // A run without keys caches the stranger's probe; the checking run on
    // the same cache directory must not serve that copy.
    let options = CentralOptions { upstream: Some(upstream_config.clone()), ..Default::default() };
    let unchecked = Central::start_with(&pki, &dir.path().join("central"), options).await;
    unchecked.collector(&pki, Some(&pki.collector)).fetch("2.5.0", "collector-ebpf-5.4.0-2.o.gz").await.unwrap();
    unchecked.stop().await;
    let options = CentralOptions { upstream: Some(upstream_config), trusted_keys: trusted(&key), ..Default::default() };
    let central = Central::start_with(&pki, &dir.path().join("central"), options).await;
    let client = central.collector(&pki, Some(&pki.collector));
    let served = client.fetch("2.5.0", "collector-ebpf-5.4.0-1.o.gz").await.unwrap();
    assert!(
        key.verifies(&served.bytes, served.signature.as_deref().unwrap()),
        "the upstream's signature passed through"
    );
    let status = client.fetch("2.5.0", "collector-ebpf-5.4.0-2.o.gz").await.unwrap_err();
    let probe_api::probe_stream::ReplyError::Status(status) = status else { panic!("{status:?}") };
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(status.message().contains("not trusted"), "{status:?}");
    assert_eq!(refusals(&central, "unknown_key", "upstream"), 1);
    let cached = std::fs::read_dir(dir.path().join("upstream-cache/probes/2.5.0")).unwrap().count();
    assert_eq!(cached, 1, "only the verified probe is cached");
    central.stop().await;
    upstream.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn package_sign_takes_a_password_protected_key_and_refuses_the_wrong_password() {
    let dir = tempfile::tempdir().unwrap();
    // An scrypt-encrypted key, as `minisign -G` makes one with a password.
    let keys = ::minisign::KeyPair::generate_encrypted_keypair(Some("correct horse".into())).unwrap();
    let (secret, public) = (dir.path().join("site.key"), dir.path().join("site.pub"));
    std::fs::write(&secret, keys.sk.to_box(None).unwrap().into_string()).unwrap();
    std::fs::write(&public, keys.pk.to_box().unwrap().into_string()).unwrap();
    let (package, signed) = (dir.path().join("pkg.zip"), dir.path().join("signed.zip"));
    spec().write(&package).unwrap();
    let password = dir.path().join("password");
    let sign = |password_line: &'static str| {
        std::fs::write(&password, password_line).unwrap();
        let args = [
            "package",
            "sign",
            package.to_str().unwrap(),
            "--secret-key",
            secret.to_str().unwrap(),
            "--password-file",
            password.to_str().unwrap(),
            "-o",
            signed.to_str().unwrap(),
        ]
        .map(String::from);
        async move { central_cli(&args.each_ref().map(String::as_str), "").await }
    };
    let (ok, _, err) = sign("wrong horse\n").await;
    assert!(!ok && err.contains("Wrong password"), "{err}");
    assert!(!signed.exists(), "nothing is written");
    let (ok, out, err) = sign("correct horse\n").await;
    assert!(ok && out.contains("Signed 6 probes"), "{out}\n{err}");
    // `-o FILE` named the file before -o meant the output format everywhere.
    assert!(err.contains("warning: `package sign -o FILE` is deprecated"), "{err}");
    let (ok, out, _) =
        central_cli(&["package", "verify", signed.to_str().unwrap(), "--trusted-keys", public.to_str().unwrap()], "")
            .await;
    assert!(ok && out.contains("6 of 6 probes verified"), "{out}");
}
