//! End to end through real registries (Debian's `docker-registry` with TLS
//! and htpasswd, `common/registry.rs`): `package push` to registry A,
//! `skopeo copy --all` to registry B as a mirror across an air gap would,
//! a Central with `--upstream-oci` on B serving what a Collector in
//! `required` signature mode accepts, `package pull` into a zip that
//! `upload` and the roxctl route take, re-pushes and interrupted pushes,
//! an independent client (the `oras` Python SDK), and each failure with
//! its message.

#[path = "common/cli.rs"]
mod cli;
mod common;
#[path = "common/connect_proxy.rs"]
mod connect_proxy;
#[path = "common/raw_grpc.rs"]
mod raw_grpc;
#[path = "common/registry.rs"]
mod registry;
#[path = "common/roxctl.rs"]
mod roxctl;

use std::path::{Path, PathBuf};
use std::time::Duration;

use central_probes::server::upstream::UpstreamKind;
use central_probes::synthetic::PackageSpec;
use cli::central_cli;
use common::{Central, CentralOptions, TestPki};
use connect_proxy::ConnectProxy;
use registry::{TestRegistry, skopeo_copy};

const MODULE: &str = "2.5.0";
const REPOSITORY: &str = "kprobes/support";

fn kernels(count: usize) -> Vec<String> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/kernel-versions.txt"));
    text.unwrap().lines().take(count).map(str::to_owned).collect()
}

/// A package of `count` kernels (two probes each), small probes.
fn spec(count: usize, variant: u64) -> PackageSpec {
    let kernels = kernels(count);
    let names: Vec<&str> = kernels.iter().map(String::as_str).collect();
    let mut spec = PackageSpec::new(MODULE, &names);
    spec.kernel_modules = true;
    spec.size_divisor = 40;
    spec.variant = variant;
    spec
}

/// The key pair a site signs with, made by `package keygen`.
struct Keys {
    public: PathBuf,
    secret: PathBuf,
}

async fn cli(args: &[&str]) -> (bool, String, String) {
    central_cli(args, "").await
}

async fn cli_ok(args: &[&str]) -> String {
    let (ok, stdout, stderr) = cli(args).await;
    assert!(ok, "{args:?}: {stdout}\n{stderr}");
    stdout
}

async fn keys(dir: &Path) -> Keys {
    let keys = Keys { public: dir.join("site.pub"), secret: dir.join("site.key") };
    cli_ok(&["package", "keygen", "--public-key", path(&keys.public), "--secret-key", path(&keys.secret)]).await;
    keys
}

fn path(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Writes `spec`'s package, signed with `keys` if given.
async fn package(dir: &Path, name: &str, spec: &PackageSpec, keys: Option<&Keys>) -> PathBuf {
    let unsigned = dir.join(format!("{name}-unsigned.zip"));
    spec.write(&unsigned).unwrap();
    let Some(keys) = keys else { return unsigned };
    let signed = dir.join(format!("{name}.zip"));
    let args = ["package", "sign", path(&unsigned), "--secret-key", path(&keys.secret), "--out", path(&signed)];
    cli_ok(&args).await;
    signed
}

fn repository(registry: &TestRegistry) -> String {
    format!("{}/{REPOSITORY}", registry.address)
}

/// `package push` to `registry`: its JSON report.
async fn push(package: &Path, registry: &TestRegistry, extra: &[&str]) -> serde_json::Value {
    let repository = repository(registry);
    let mut args = vec!["package", "push", path(package), "--repository", &repository, "-o", "json"];
    let ca = registry.ca_file();
    args.extend(["--registry-ca", path(&ca)]);
    args.extend(["--registry-auth-file", path(&registry.auth_file)]);
    args.extend(extra);
    serde_json::from_str(&cli_ok(&args).await).unwrap()
}

/// `package pull` of `tag` from `registry`: success, stdout, stderr.
async fn pull(registry: &TestRegistry, tag: &str, out: &Path, auth_file: &Path) -> (bool, String, String) {
    let reference = format!("{}:{tag}", repository(registry));
    let args = ["package", "pull", "--repository", &reference, "--out", path(out)];
    let ca = registry.cert_dir.join("ca.crt");
    cli(&[&args[..], &["--registry-ca", path(&ca), "--registry-auth-file", path(auth_file)]].concat()).await
}

/// The probe entries of a zip (signatures and all), name -> bytes.
fn zip_entries(path: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut archive = zip::ZipArchive::new(std::fs::File::open(path).unwrap()).unwrap();
    let mut entries = std::collections::BTreeMap::new();
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i).unwrap();
        let name = entry.name().unwrap().into_owned();
        if entry.is_dir() || !name.starts_with("kernel-modules/") || name.ends_with("LICENSE") {
            continue;
        }
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut bytes).unwrap();
        entries.insert(name, bytes);
    }
    entries
}

/// Central with registry `registry` as its upstream.
async fn central_on(pki: &TestPki, dir: &Path, registry: &TestRegistry, trusted: Option<&Keys>) -> Central {
    let kind = UpstreamKind::Registry {
        repository: repository(registry),
        auth_file: Some(registry.auth_file.clone()),
        index_ttl: Duration::from_secs(60),
    };
    let mut upstream = common::upstream_config(pki, kind, &dir.join("cache"));
    upstream.connect_timeout = Duration::from_secs(5);
    upstream.fetch_timeout = Duration::from_secs(30);
    let trusted_keys = trusted.map(|keys| probe_api::signing::TrustedKeys::load(&keys.public).unwrap());
    let options = CentralOptions { upstream: Some(upstream), trusted_keys, ..CentralOptions::default() };
    Central::start_with(pki, &dir.join("central"), options).await
}

fn split(path: &str) -> (&str, &str) {
    path.split_once('/').unwrap()
}

#[tokio::test]
async fn a_signed_package_mirrored_by_skopeo_is_served_from_the_mirror_and_verified() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (TestRegistry::start(&pki), TestRegistry::start(&pki));
    let keys = keys(dir.path()).await;
    let spec = spec(30, 0);
    let package = package(dir.path(), "pkg", &spec, Some(&keys)).await;
    let pushed = push(&package, &a, &[]).await;
    assert_eq!((pushed["probes"].as_u64(), pushed["signatures"].as_u64()), (Some(60), Some(60)), "{pushed}");
    let (source, destination) =
        (format!("docker://{}:{MODULE}", repository(&a)), format!("docker://{}:{MODULE}", repository(&b)));
    skopeo_copy((&source, Some(&a)), (&destination, Some(&b)));

    let central = central_on(&pki, dir.path(), &b, Some(&keys)).await;
    let collector = central.collector(&pki, Some(&pki.collector));
    let trusted = probe_api::signing::TrustedKeys::load(&keys.public).unwrap();
    let wanted = &spec.probe_paths()[7];
    let probe_path = probe_api::names::ProbePath::parse(wanted).unwrap();
    let policy = collector_client::signatures::SignaturePolicy::new(
        collector_client::signatures::Mode::Required,
        Some(trusted),
        0,
        None,
        vec![probe_path.clone()],
    )
    .unwrap();
    let (module_version, file_name) = split(wanted);
    let fetched = collector.fetch(module_version, file_name).await.unwrap();
    assert_eq!(fetched.bytes, spec.probe_bytes(wanted));
    assert_eq!(fetched.sha256, probe_api::digest::Sha256Digest::of(&spec.probe_bytes(wanted)));
    assert_eq!(fetched.source, probe_api::v1::ProbeSource::Upstream);
    let checked = policy.check(&probe_path, &fetched.bytes, fetched.signature.as_deref());
    assert!(checked.is_ok(), "a Collector in required mode accepts it: {checked:?}");

    // Again: from Central's cache, the registry not asked.
    let asked = b.request_count();
    let again = collector.fetch(module_version, file_name).await.unwrap();
    assert_eq!((again.bytes, again.source), (fetched.bytes, probe_api::v1::ProbeSource::UpstreamCache));
    assert_eq!(b.request_count(), asked, "no registry request for a cached probe");

    // An independent client finds the probe on B by its title.
    let out = dir.path().join("by-oras");
    let oras = std::process::Command::new(registry::oras_python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/python/oras_pull.py"))
        .args([&b.address, REPOSITORY, MODULE, file_name, path(&b.ca_file()), &b.user, &b.password, path(&out)])
        .output()
        .unwrap();
    assert!(oras.status.success(), "{}", String::from_utf8_lossy(&oras.stderr));
    assert_eq!(std::fs::read(&out).unwrap(), spec.probe_bytes(wanted));

    // A probe the package lacks: NOT_FOUND naming the registry.
    let status = collector.fetch(MODULE, "collector-ebpf-9.9.9-none.o.gz").await.unwrap_err();
    let text = format!("{status:?}");
    assert!(text.contains("NotFound") && text.contains(&b.address), "{text}");
    central.stop().await;
}

#[tokio::test]
async fn a_pulled_package_is_taken_by_upload_and_the_roxctl_route_unchanged() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (TestRegistry::start(&pki), TestRegistry::start(&pki));
    let keys = keys(dir.path()).await;
    let spec = spec(20, 0);
    let package = package(dir.path(), "pkg", &spec, Some(&keys)).await;
    push(&package, &a, &[]).await;
    // From the mirror, whose index skopeo re-encoded.
    let (source, destination) =
        (format!("docker://{}:{MODULE}", repository(&a)), format!("docker://{}:{MODULE}", repository(&b)));
    skopeo_copy((&source, Some(&a)), (&destination, Some(&b)));
    let pulled = dir.path().join("pulled.zip");
    let (ok, stdout, stderr) = pull(&b, MODULE, &pulled, &b.auth_file).await;
    assert!(ok, "{stdout}\n{stderr}");
    let entries = zip_entries(&pulled);
    assert_eq!(entries, zip_entries(&package), "every probe and signature identical");

    // `central-probes upload` of the pulled zip.
    let first = Central::start(&pki, &dir.path().join("first")).await;
    let ca = pki.ca_file();
    let args = ["upload", path(&pulled), "-e", &first.address, "--ca", path(&ca)];
    let (ok, stdout, stderr) = central_cli(&args, &first.admin_token).await;
    assert!(ok, "{stdout}\n{stderr}");
    // The roxctl route, with the probes of the pulled zip.
    let second = Central::start(&pki, &dir.path().join("second")).await;
    let files: Vec<roxctl::PackageFile> = entries
        .iter()
        .filter(|(name, _)| !name.ends_with(".minisig"))
        .map(|(name, bytes)| roxctl::PackageFile::new(name.strip_prefix("kernel-modules/").unwrap(), bytes.clone()))
        .collect();
    let sender = roxctl::http2(&second.address, &pki).await;
    let (status, text) = roxctl::upload_http2(&sender, roxctl::Upload::of(&second.admin_token, &files)).await;
    assert_eq!(status, 200, "{text}");
    for central in [&first, &second] {
        let collector = central.collector(&pki, Some(&pki.collector));
        for wanted in spec.probe_paths() {
            let (module_version, file_name) = split(&wanted);
            let fetched = collector.fetch(module_version, file_name).await.unwrap();
            assert_eq!(fetched.bytes, spec.probe_bytes(&wanted), "{wanted}");
        }
    }
}

#[tokio::test]
async fn a_re_push_sends_no_blob_and_gives_the_same_index() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let a = TestRegistry::start(&pki);
    let package = package(dir.path(), "pkg", &spec(20, 0), None).await;
    let first = push(&package, &a, &[]).await;
    assert_eq!(first["blobs_sent"].as_u64(), Some(40), "{first}");
    let (uploads, heads) = (a.requests("blobs/uploads"), a.requests("\"HEAD /v2/kprobes/support/blobs/"));
    let second = push(&package, &a, &[]).await;
    assert_eq!(second["blobs_sent"].as_u64(), Some(0), "{second}");
    assert_eq!(a.requests("blobs/uploads"), uploads, "the registry saw no upload");
    // The blobs the tag's artifact names are known without a HEAD each.
    assert_eq!(a.requests("\"HEAD /v2/kprobes/support/blobs/"), heads, "no blob asked about");
    assert_eq!(second["index_digest"], first["index_digest"]);
}

#[tokio::test]
async fn a_push_killed_midway_completes_when_run_again_and_no_tag_pointed_at_a_missing_blob() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let a = TestRegistry::start(&pki);
    let spec = spec(150, 0);
    let package = package(dir.path(), "pkg", &spec, None).await;
    let repository = repository(&a);
    // A reader polling the tag throughout: whenever it names an index,
    // every blob that index names must be there.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = tokio::spawn(watch_tag(options_for(&a), repository.clone(), stop.clone()));
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_central-probes"))
        .args(["package", "push", path(&package), "--repository", &repository])
        .args(["--registry-ca", path(&a.ca_file()), "--registry-auth-file", path(&a.auth_file)])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // kill -9 once some blobs are in.
    while a.blob_files().len() < 40 {
        assert!(child.try_wait().unwrap().is_none(), "the push ended before it could be interrupted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let reader = dir.path().join("reader.zip");
    let (ok, _, stderr) = pull(&a, MODULE, &reader, &a.auth_file).await;
    assert!(!ok && stderr.contains("has no tag 2.5.0"), "no index before every blob is in: {stderr}");
    assert!(!reader.exists() && !dir.path().join("reader.zip.partial").exists(), "nothing half-written");

    let report = push(&package, &a, &[]).await;
    let sent = report["blobs_sent"].as_u64().unwrap();
    assert!(sent > 0 && sent < 300, "only what the first push did not send: {report}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = watcher.await.unwrap();
    assert!(seen >= 1, "the reader saw the finished index");
    let (ok, stdout, stderr) = pull(&a, MODULE, &reader, &a.auth_file).await;
    assert!(ok, "{stdout}\n{stderr}");
    assert_eq!(zip_entries(&reader), zip_entries(&package));
}

/// Polls `repository`'s tag until `stop` (and once more after it); each
/// time it names an index, checks that every blob of it is there. Returns
/// how often it saw an index.
async fn watch_tag(
    options: central_probes::oci::RegistryOptions,
    repository: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> usize {
    let reference = central_probes::oci::Reference::parse(&repository, false).unwrap();
    let registry = options.open(&reference, false).unwrap();
    let mut seen = 0;
    loop {
        let last = stop.load(std::sync::atomic::Ordering::Relaxed);
        if registry.manifest_digest(MODULE).await.unwrap().is_some() {
            let (_, _, probes) = central_probes::oci::checked::read_artifact(&registry, MODULE).await.unwrap();
            for probe in probes {
                let digest = central_probes::oci::layout::digest_text(&probe.digest);
                assert!(registry.has_blob(&digest).await.unwrap(), "the tag named {digest} before it was in");
            }
            seen += 1;
        }
        if last {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn options_for(registry: &TestRegistry) -> central_probes::oci::RegistryOptions {
    central_probes::oci::RegistryOptions {
        ca_pem: std::fs::read(registry.ca_file()).unwrap(),
        proxies: Default::default(),
        auth_file: Some(registry.auth_file.clone()),
        connect_timeout: Duration::from_secs(5),
        answer_timeout: Duration::from_secs(30),
    }
}

#[tokio::test]
async fn registry_failures_are_one_line_that_says_what_to_do_and_write_nothing() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let a = TestRegistry::start(&pki);
    let spec = spec(10, 0);
    let package = package(dir.path(), "pkg", &spec, None).await;
    let pushed = push(&package, &a, &[]).await;
    let out = dir.path().join("out.zip");
    let nothing_written = || !out.exists() && !dir.path().join("out.zip.partial").exists();

    // Wrong credentials, and none: the password never shown.
    let wrong = dir.path().join("wrong.json");
    use base64::Engine;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{}:not-the-password", a.user));
    std::fs::write(&wrong, format!(r#"{{"auths": {{"{}": {{"auth": "{auth}"}}}}}}"#, a.address)).unwrap();
    let (ok, _, stderr) = pull(&a, MODULE, &out, &wrong).await;
    assert!(!ok && stderr.contains("refused the credentials") && stderr.contains(&a.address), "{stderr}");
    assert!(!stderr.contains("not-the-password") && !stderr.contains(&auth), "{stderr}");
    let empty = dir.path().join("empty.json");
    std::fs::write(&empty, r#"{"auths": {}}"#).unwrap();
    let (ok, _, stderr) = pull(&a, MODULE, &out, &empty).await;
    assert!(!ok && stderr.contains(&format!("add \"{}\" to the auth file", a.address)), "{stderr}");

    // A tag, or a repository, that does not exist.
    let (ok, _, stderr) = pull(&a, "9.9.9", &out, &a.auth_file).await;
    assert!(!ok && stderr.contains("has no tag 9.9.9") && stderr.contains("skopeo list-tags"), "{stderr}");
    let reference = format!("{}/no/such:{MODULE}", a.address);
    let args = ["package", "pull", "--repository", &reference, "--out", path(&out)];
    let (ok, _, stderr) =
        cli(&[&args[..], &["--registry-ca", path(&a.ca_file()), "--registry-auth-file", path(&a.auth_file)]].concat())
            .await;
    assert!(!ok && stderr.contains("has no tag 2.5.0 (or no such repository)"), "{stderr}");

    // An artifact that is not a support package: an ordinary image manifest.
    let reference = central_probes::oci::Reference::parse(&repository(&a), false).unwrap();
    let client = options_for(&a).open(&reference, true).unwrap();
    let image = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.empty.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;
    client
        .put_manifest("image", "application/vnd.oci.image.manifest.v1+json", bytes::Bytes::from_static(image))
        .await
        .unwrap();
    let (ok, _, stderr) = pull(&a, "image", &out, &a.auth_file).await;
    assert!(
        !ok && stderr
            .contains("not a support package: its media type is \"application/vnd.oci.image.manifest.v1+json\""),
        "{stderr}"
    );

    // A manifest over what registries accept is refused, saying the limit.
    let huge = bytes::Bytes::from(vec![b' '; 5 << 20]);
    let error = client.put_manifest("huge", "application/vnd.oci.image.manifest.v1+json", huge).await.unwrap_err();
    assert!(error.message.contains("over the 4194304 bytes registries accept"), "{error}");

    // A registry that accepts connections and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let reference = format!("{}/{REPOSITORY}:{MODULE}", silent.local_addr().unwrap());
    let args = ["package", "pull", "--repository", &reference, "--out", path(&out), "--registry-timeout", "1s"];
    let (ok, _, stderr) = cli(&[&args[..], &["--registry-ca", path(&a.ca_file())]].concat()).await;
    assert!(
        !ok && stderr.contains("took over 1s") && stderr.contains(&silent.local_addr().unwrap().to_string()),
        "{stderr}"
    );
    assert!(nothing_written());

    // A blob damaged in the registry's storage: DATA_LOSS, nothing kept.
    let wanted = &spec.probe_paths()[3];
    let digest = format!("sha256:{}", probe_api::digest::Sha256Digest::of(&spec.probe_bytes(wanted)).to_hex());
    let mut damaged = spec.probe_bytes(wanted);
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0xff;
    std::fs::write(a.blob_file(&digest), &damaged).unwrap();
    let (ok, _, stderr) = pull(&a, MODULE, &out, &a.auth_file).await;
    assert!(!ok && stderr.contains(&digest) && stderr.contains("does not match its digest"), "{stderr}");
    assert!(nothing_written());
    let central = central_on(&pki, dir.path(), &a, None).await;
    let collector = central.collector(&pki, Some(&pki.collector));
    let (module_version, file_name) = split(wanted);
    for _ in 0..2 {
        let status = collector.fetch(module_version, file_name).await.unwrap_err();
        let text = format!("{status:?}");
        assert!(text.contains("DataLoss") || text.contains("DATA_LOSS"), "{text}");
    }
    assert_eq!(pushed["probes"].as_u64(), Some(20));
    central.stop().await;

    // A registry that is down: UNAVAILABLE, naming it.
    let down = TestRegistry::start(&pki);
    let address = down.address.clone();
    let central = central_on(&pki, &dir.path().join("down"), &down, None).await;
    drop(down);
    let collector = central.collector(&pki, Some(&pki.collector));
    let status = collector.fetch(module_version, file_name).await.unwrap_err();
    let text = format!("{status:?}");
    assert!(text.contains("Unavailable") && text.contains(&address), "{text}");
    central.stop().await;
}

#[tokio::test]
async fn a_tag_overwritten_with_an_unsigned_package_is_refused_by_a_central_with_trusted_keys() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let b = TestRegistry::start(&pki);
    let keys = keys(dir.path()).await;
    let spec = spec(10, 0);
    let signed = package(dir.path(), "signed", &spec, Some(&keys)).await;
    let unsigned = package(dir.path(), "unsigned", &spec, None).await;
    push(&signed, &b, &[]).await;
    push(&unsigned, &b, &[]).await;
    let central = central_on(&pki, dir.path(), &b, Some(&keys)).await;
    let collector = central.collector(&pki, Some(&pki.collector));
    let wanted = spec.probe_paths()[0].clone();
    let (module_version, file_name) = split(&wanted);
    let status = collector.fetch(module_version, file_name).await.unwrap_err();
    let text = format!("{status:?}");
    assert!(text.contains("NotFound") && text.contains("not served"), "{text}");
    central.stop().await;
}

/// A JWT for the registry's token auth (ES256, the signer's certificate in
/// `x5c`), granting pull and push on the test repository for an hour.
fn registry_token(signer: &rcgen::KeyPair, signer_der: &[u8]) -> String {
    use base64::Engine;
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
    let url = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let x5c = base64::engine::general_purpose::STANDARD.encode(signer_der);
    let header = serde_json::json!({"typ": "JWT", "alg": "ES256", "x5c": [x5c]});
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let claims = serde_json::json!({
        "iss": "test-issuer", "sub": "mirror", "aud": "test-registry", "exp": now + 3600, "nbf": now - 60,
        "iat": now - 60, "jti": "test",
        "access": [{"type": "repository", "name": REPOSITORY, "actions": ["pull", "push"]}],
    });
    let signing_input = format!("{}.{}", url(header.to_string().as_bytes()), url(claims.to_string().as_bytes()));
    let rng = ring::rand::SystemRandom::new();
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &signer.serialize_der(), &rng).unwrap();
    let signature = key.sign(&rng, signing_input.as_bytes()).unwrap();
    format!("{signing_input}.{}", url(signature.as_ref()))
}

/// The token server of `tests/python/token_server.py`; stopped when dropped.
struct TokenServer(std::process::Child);

impl Drop for TokenServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_registry_that_wants_bearer_tokens_gets_one_from_its_realm_with_the_credentials() {
    use base64::Engine;
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let signer = rcgen::KeyPair::generate().unwrap();
    let signer_cert =
        rcgen::CertificateParams::new(vec!["token-signer".to_owned()]).unwrap().self_signed(&signer).unwrap();
    std::fs::write(dir.path().join("token"), registry_token(&signer, signer_cert.der())).unwrap();
    std::fs::write(dir.path().join("server.pem"), &pki.server.cert_pem).unwrap();
    std::fs::write(dir.path().join("server-key.pem"), &pki.server.key_pem).unwrap();
    let (user, password) = ("mirror", "token-pw");
    let expected = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")));
    let mut child = std::process::Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/python/token_server.py"))
        .args([dir.path().join("server.pem"), dir.path().join("server-key.pem"), dir.path().join("token")])
        .arg(&expected)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
    let _tokens = TokenServer(child);
    let realm = format!("https://127.0.0.1:{}/token", line.trim().strip_prefix("listening on ").unwrap());
    let registry = TestRegistry::start_with(&pki, Some((&realm, &signer_cert.pem())));
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    std::fs::write(&registry.auth_file, format!(r#"{{"auths": {{"{}": {{"auth": "{auth}"}}}}}}"#, registry.address))
        .unwrap();

    let spec = spec(5, 0);
    let package = package(dir.path(), "pkg", &spec, None).await;
    let pushed = push(&package, &registry, &[]).await;
    assert_eq!(pushed["probes"].as_u64(), Some(10), "{pushed}");
    let out = dir.path().join("pulled.zip");
    let (ok, stdout, stderr) = pull(&registry, MODULE, &out, &registry.auth_file).await;
    assert!(ok, "{stdout}\n{stderr}");
    assert_eq!(zip_entries(&out), zip_entries(&package));

    // Credentials the token server refuses: said so, and not shown.
    let wrong = dir.path().join("wrong.json");
    let bad = base64::engine::general_purpose::STANDARD.encode(format!("{user}:wrong-pw"));
    std::fs::write(&wrong, format!(r#"{{"auths": {{"{}": {{"auth": "{bad}"}}}}}}"#, registry.address)).unwrap();
    let (ok, _, stderr) = pull(&registry, MODULE, &dir.path().join("x.zip"), &wrong).await;
    assert!(!ok && stderr.contains("token server refused the credentials"), "{stderr}");
    assert!(!stderr.contains("wrong-pw") && !stderr.contains(&bad), "{stderr}");
}

#[tokio::test]
async fn a_probe_over_4_mib_goes_up_in_pieces_and_comes_back_whole() {
    use std::io::Write;
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let a = TestRegistry::start(&pki);
    // A gzip file of 9 MiB that does not compress (stored blocks).
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let object: Vec<u8> = (0..9 << 20)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect();
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::none());
    encoder.write_all(&object).unwrap();
    let large = encoder.finish().unwrap();
    let name = "collector-6.1.0-big.x86_64.ko.gz";
    let package = dir.path().join("large.zip");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&package).unwrap());
    let stored = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file(format!("kernel-modules/{MODULE}/{name}"), stored).unwrap();
    zip.write_all(&large).unwrap();
    zip.finish().unwrap();

    push(&package, &a, &[]).await;
    assert!(a.requests("\"PATCH /v2/kprobes/support/blobs/uploads/") >= 3, "sent in pieces of at most 4 MiB");
    let out = dir.path().join("pulled.zip");
    let (ok, stdout, stderr) = pull(&a, MODULE, &out, &a.auth_file).await;
    assert!(ok, "{stdout}\n{stderr}");
    assert_eq!(zip_entries(&out), zip_entries(&package));
    let central = central_on(&pki, dir.path(), &a, None).await;
    let fetched = central.collector(&pki, Some(&pki.collector)).fetch(MODULE, name).await.unwrap();
    assert!(fetched.bytes == large, "Central streams it whole from the registry");
    central.stop().await;
}

#[tokio::test]
async fn coverage_asks_a_registry_upstream_through_its_manifests_without_downloading_a_probe() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let a = TestRegistry::start(&pki);
    let spec = spec(12, 0);
    let package = package(dir.path(), "pkg", &spec, None).await;
    push(&package, &a, &[]).await;
    let central = central_on(&pki, dir.path(), &a, None).await;
    let kernels = kernels(12);
    let nodes = dir.path().join("nodes.txt");
    std::fs::write(&nodes, format!("{}\n{}\n9.9.9-not-packaged\n", kernels[2], kernels[9])).unwrap();
    let ca = pki.ca_file();
    let args = ["coverage", "-e", &central.address, "--ca", path(&ca), "--module-version", MODULE];
    let args = [&args[..], &["--nodes", path(&nodes), "-o", "json"]].concat();
    let (_, stdout, stderr) = central_cli(&args, &central.view_token).await;
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}\n{stderr}"));
    let sources: Vec<&str> =
        report["nodes"].as_array().unwrap().iter().map(|n| n["source"].as_str().unwrap()).collect();
    assert_eq!(sources, ["upstream", "upstream", "none"], "{report}");
    assert_eq!(a.requests("\"GET /v2/kprobes/support/blobs/"), 0, "no probe downloaded");
    assert!(report["upstream_requests"].as_u64().unwrap() >= 1, "{report}");
    central.stop().await;
}

#[tokio::test]
async fn a_tag_pushed_again_is_followed_once_the_index_is_stale_and_kept_until_then() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let a = TestRegistry::start(&pki);
    let (old, new) = (spec(6, 0), spec(6, 1));
    push(&package(dir.path(), "old", &old, None).await, &a, &[]).await;
    // Two Centrals on the same tag: one revalidates its index on every miss,
    // one keeps it for an hour.
    let mut centrals = Vec::new();
    for (name, ttl) in [("fresh", Duration::ZERO), ("kept", Duration::from_secs(3600))] {
        let kind =
            UpstreamKind::Registry { repository: repository(&a), auth_file: Some(a.auth_file.clone()), index_ttl: ttl };
        let upstream = common::upstream_config(&pki, kind, &dir.path().join(name).join("cache"));
        let options = CentralOptions { upstream: Some(upstream), ..CentralOptions::default() };
        centrals.push(Central::start_with(&pki, &dir.path().join(name).join("central"), options).await);
    }
    let paths = old.probe_paths();
    for central in &centrals {
        let (module_version, file_name) = split(&paths[0]);
        let fetched = central.collector(&pki, Some(&pki.collector)).fetch(module_version, file_name).await.unwrap();
        assert_eq!(fetched.bytes, old.probe_bytes(&paths[0]));
    }
    push(&package(dir.path(), "new", &new, None).await, &a, &[]).await;
    let (module_version, file_name) = split(&paths[1]);
    let fresh = centrals[0].collector(&pki, Some(&pki.collector)).fetch(module_version, file_name).await.unwrap();
    assert_eq!(fresh.bytes, new.probe_bytes(&paths[1]), "a stale index is checked by digest and read again");
    let kept = centrals[1].collector(&pki, Some(&pki.collector)).fetch(module_version, file_name).await.unwrap();
    assert_eq!(kept.bytes, old.probe_bytes(&paths[1]), "within its TTL the index is used as it was read");
    for central in centrals {
        central.stop().await;
    }
}

#[tokio::test]
async fn push_and_pull_go_through_the_https_proxy_unless_no_proxy_names_the_registry() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let a = TestRegistry::start(&pki);
    let package = package(dir.path(), "pkg", &spec(4, 0), None).await;
    let proxy = ConnectProxy::start().await;
    let run = |args: Vec<String>, no_proxy: &'static str| {
        let proxy = format!("http://{}", proxy.address);
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_central-probes"))
                .args(&args)
                .env("HTTPS_PROXY", proxy)
                .env("NO_PROXY", no_proxy)
                .env_remove("https_proxy")
                .env_remove("no_proxy")
                .output()
                .unwrap()
        })
    };
    let ca = a.ca_file();
    let registry_flags = ["--registry-ca", path(&ca), "--registry-auth-file", path(&a.auth_file)];
    let mut push_args = vec!["package", "push", path(&package), "--repository"];
    let repository = repository(&a);
    push_args.push(&repository);
    push_args.extend(registry_flags);
    let output = run(push_args.iter().map(|a| a.to_string()).collect(), "").await.unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let tunnels = proxy.targets();
    assert!(!tunnels.is_empty() && tunnels.iter().all(|t| *t == a.address), "{tunnels:?}");

    let before = proxy.targets().len();
    let reference = format!("{repository}:{MODULE}");
    let out = dir.path().join("pulled.zip");
    let mut pull_args = vec!["package", "pull", "--repository", &reference, "--out", path(&out)];
    pull_args.extend(registry_flags);
    let output = run(pull_args.iter().map(|a| a.to_string()).collect(), "127.0.0.1").await.unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(proxy.targets().len(), before, "NO_PROXY bypasses the proxy");
    assert_eq!(zip_entries(&out), zip_entries(&package));
}
