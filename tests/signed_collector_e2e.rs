//! End to end: a Collector in `--signature-policy required` writes a probe
//! only if its minisign signature (made by the real `minisign` tool)
//! verifies, names the probe and is not below the serial the node saw,
//! whichever source served it: Central by GetProbe, Central's HTTPS route,
//! a bucket, or the node-local cache. Every attack is refused with its
//! reason reported and nothing written.

mod common;
#[path = "common/minisign.rs"]
mod minisign;

use std::path::{Path, PathBuf};

use central_probes::server::StoreLayout;
use common::{Central, CentralOptions, TestPki};
use minisign::MinisignKey;

const MODULE: &str = "2.5.0";
const KERNEL: &str = "5.14.0-284.11.1.el9_2.x86_64";
const PATH: &str = "2.5.0/collector-ebpf-5.14.0-284.11.1.el9_2.x86_64.o.gz";

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// The probe file (gzip'd) of `variant`, and the object inside it.
fn probe(variant: u8) -> (Vec<u8>, Vec<u8>) {
    let object: Vec<u8> = format!("eBPF object {variant} for {KERNEL}").repeat(200).into_bytes();
    (gzip(&object), object)
}

/// Uploads `file` under `path` with `signature` in its trailer, replacing
/// what is there.
async fn upload(central: &Central, pki: &TestPki, path: &str, file: &[u8], signature: Option<&[u8]>) {
    common::upload_signed(central, pki, path, file, signature).await.unwrap();
}

struct Collector {
    dir: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Collector {
    fn new(pki: &TestPki, dir: &Path, trusted: &MinisignKey) -> Collector {
        std::fs::write(dir.join("collector.pem"), &pki.collector.cert_pem).unwrap();
        std::fs::write(dir.join("collector-key.pem"), &pki.collector.key_pem).unwrap();
        let path = |p: PathBuf| p.display().to_string();
        let args = [
            "get-probe",
            "--collection-method",
            "ebpf",
            "--module-version",
            MODULE,
            "--kernel-candidates",
            KERNEL,
            "--ca",
            &path(pki.ca_file()),
            "--cert",
            &path(dir.join("collector.pem")),
            "--key",
            &path(dir.join("collector-key.pem")),
            "--trusted-keys",
            &path(trusted.public.clone()),
            "--state-dir",
            &path(dir.join("state")),
            "--retry-budget",
            "0s",
            "--connect-timeout",
            "500ms",
            "-o",
            "json",
        ]
        .map(String::from)
        .to_vec();
        Collector { dir: dir.to_owned(), args, env: Vec::new() }
    }

    /// Runs get-probe with `extra`, writing to `dir/<out>`: exit code, the
    /// JSON report and stderr.
    async fn run(&self, out: &str, extra: &[&str]) -> (i32, serde_json::Value, String) {
        let mut args = self.args.clone();
        args.extend(["--out".into(), self.dir.join(out).display().to_string()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let env = self.env.clone();
        tokio::task::spawn_blocking(move || {
            let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_collector-client"));
            for name in ["GRPC_SERVER", "MODULE_DOWNLOAD_BASE_URL", "PROBE_TRUSTED_KEYS", "https_proxy", "HTTPS_PROXY"]
            {
                command.env_remove(name);
            }
            let output = command.args(&args).envs(env).output().unwrap();
            let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
            let report = serde_json::from_str(stdout.trim()).unwrap_or(serde_json::Value::String(stdout));
            (output.status.code().unwrap_or(-1), report, String::from_utf8_lossy(&output.stderr).into_owned())
        })
        .await
        .unwrap()
    }

    /// Expects the probe to be refused for `reason`, reported in the JSON
    /// and the crash-loop report, and nothing written.
    async fn refuses(&self, out: &str, extra: &[&str], reason: &str) {
        let (code, report, stderr) = self.run(out, extra).await;
        assert_eq!(code, 1, "{reason}: {report}\n{stderr}");
        assert!(report["signature_refusals"][reason].as_u64() >= Some(1), "{reason}: {report}");
        assert!(stderr.contains("signature refused"), "{reason}: {stderr}");
        assert!(!self.dir.join(out).exists(), "{reason}: nothing is written");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_in_required_mode_loads_only_what_a_trusted_key_signed() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let (trusted, stranger) = (MinisignKey::generate(dir.path(), "site"), MinisignKey::generate(dir.path(), "x"));
    // The per-file layout, whose probe files the test tampers with below.
    let options = CentralOptions { store_layout: StoreLayout::Files, ..CentralOptions::default() };
    let central = Central::start_with(&pki, &dir.path().join("central"), options).await;
    let (file, object) = probe(1);
    upload(&central, &pki, PATH, &file, Some(&trusted.sign(PATH, 2, &file))).await;
    let collector = Collector::new(&pki, dir.path(), &trusted);
    let grpc = ["--central", &central.address];

    // GetProbe, then the HTTPS route.
    let (code, report, stderr) = collector.run("grpc.o", &grpc).await;
    assert_eq!(code, 0, "{report}\n{stderr}");
    assert_eq!(std::fs::read(dir.path().join("grpc.o")).unwrap(), object);
    assert_eq!(report["signature"]["key_id"].as_str(), Some(trusted.key_id().as_str()), "{report}");
    assert_eq!(report["signature"]["serial"], 2);
    assert_eq!(report["signature_policy"], "required");
    let (code, report, stderr) = collector.run("http.o", &[&grpc[..], &["--central-http"]].concat()).await;
    assert_eq!(code, 0, "{report}\n{stderr}");
    assert_eq!(report["signature"]["serial"], 2, "{report}");

    // What an attacker holding an admin token, Central or its disk can do.
    let other_path = "2.5.0/collector-ebpf-6.1.0-1.x86_64.o.gz";
    let (other_file, _) = probe(2);
    let signed_as_2_6 = trusted.sign(&PATH.replace("2.5.0", "2.6.0"), 3, &file);
    let good = String::from_utf8(trusted.sign(PATH, 3, &file)).unwrap();
    let edited = good.replace("serial=3", "serial=30");
    type Attack = (&'static str, Vec<u8>, Option<Vec<u8>>, &'static str);
    let cases: Vec<Attack> = vec![
        ("an unsigned probe uploaded with --overwrite", probe(3).0, None, "missing"),
        (
            "another file's probe and signature",
            other_file.clone(),
            Some(trusted.sign(other_path, 3, &other_file)),
            "other_probe",
        ),
        ("another module version's signature", file.clone(), Some(signed_as_2_6), "other_probe"),
        ("an edited trusted comment", file.clone(), Some(edited.into_bytes()), "invalid"),
        ("a signature of other bytes", probe(4).0, Some(trusted.sign(PATH, 3, &file)), "invalid"),
        ("an unknown key", file.clone(), Some(stranger.sign(PATH, 3, &file)), "unknown_key"),
        (
            "a legacy signature",
            file.clone(),
            Some(trusted.sign_with(
                &file,
                &probe_api::signing::trusted_comment(&probe_api::names::ProbePath::parse(PATH).unwrap(), 3),
                true,
            )),
            "legacy",
        ),
        ("a lower serial than the node accepted", file.clone(), Some(trusted.sign(PATH, 1, &file)), "rollback"),
        ("a malformed signature", file.clone(), Some(b"untrusted comment: x\nnot a signature\n".to_vec()), "malformed"),
    ];
    for (i, (attack, bytes, signature, reason)) in cases.into_iter().enumerate() {
        upload(&central, &pki, PATH, &bytes, signature.as_deref()).await;
        println!("attack: {attack}");
        collector.refuses(&format!("attack-{i}.o"), &grpc, reason).await;
        collector.refuses(&format!("attack-{i}-http.o"), &[&grpc[..], &["--central-http"]].concat(), reason).await;
    }
    // --min-serial is a floor for a node that saw nothing yet.
    upload(&central, &pki, PATH, &file, Some(&trusted.sign(PATH, 3, &file))).await;
    let state_at = collector.args.iter().position(|arg| arg == "--state-dir").unwrap() + 1;
    let mut new_node = Collector { args: collector.args.clone(), dir: collector.dir.clone(), env: Vec::new() };
    new_node.args[state_at] = dir.path().join("fresh-state").display().to_string();
    new_node.refuses("floor.o", &[&grpc[..], &["--min-serial", "4"]].concat(), "rollback").await;
    let (code, _, stderr) = new_node.run("floor-3.o", &grpc).await;
    assert_eq!(code, 0, "without the floor, a new node takes serial 3: {stderr}");
    let (code, _, stderr) = collector.run("serial-3.o", &grpc).await;
    assert_eq!(code, 0, "a higher serial is accepted: {stderr}");

    // A compromised Central: a byte of the probe flipped on its disk, and
    // the stored SHA-256 and CRC-32 rewritten to match.
    central.stop().await;
    let stored = dir.path().join("central/probes").join(PATH);
    let mut on_disk = std::fs::read(&stored).unwrap();
    let content = 56..56 + file.len();
    on_disk[content.start + 100] ^= 1;
    let tampered = on_disk[content.clone()].to_vec();
    on_disk[16..48].copy_from_slice(&probe_api::digest::Sha256Digest::of(&tampered).0);
    on_disk[48..52].copy_from_slice(&crc32fast::hash(&tampered).to_le_bytes());
    std::fs::write(&stored, &on_disk).unwrap();
    let options = CentralOptions { store_layout: StoreLayout::Files, ..CentralOptions::default() };
    let central = Central::start_with(&pki, &dir.path().join("central"), options).await;
    let client = central.collector(&pki, Some(&pki.collector));
    let served = client.fetch(MODULE, &format!("collector-ebpf-{KERNEL}.o.gz")).await.unwrap();
    assert_eq!(served.bytes, tampered, "Central serves the tampered bytes with a matching SHA-256");
    collector.refuses("tampered.o", &["--central", &central.address], "invalid").await;

    // In warn mode an unsigned probe is used, and the refusal reported.
    upload(&central, &pki, PATH, &probe(5).0, None).await;
    let (code, report, _) =
        collector.run("warn.o", &["--central", &central.address, "--signature-policy", "warn"]).await;
    assert_eq!(code, 0, "{report}");
    assert_eq!(std::fs::read(dir.path().join("warn.o")).unwrap(), probe(5).1);
    assert_eq!(report["signature_refusals"]["missing"], 1, "{report}");
    assert_eq!(report["signature"], serde_json::Value::Null);
    central.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_and_the_node_local_cache_are_checked_like_central() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let trusted = MinisignKey::generate(dir.path(), "site");
    let (file, object) = probe(1);
    // A bucket (Python's file server over TLS) with the probe and its
    // signature beside it.
    let files = dir.path().join("bucket/modules/2.5.0");
    std::fs::create_dir_all(&files).unwrap();
    let probe_file = files.join(format!("collector-ebpf-{KERNEL}.o.gz"));
    let signature_file = files.join(format!("collector-ebpf-{KERNEL}.o.gz.minisig"));
    std::fs::write(&probe_file, &file).unwrap();
    std::fs::write(&signature_file, trusted.sign(PATH, 1, &file)).unwrap();
    let bucket = common::https_bucket(&pki, dir.path(), &dir.path().join("bucket"));
    let port = bucket.port.clone();
    let base_url = format!("https://localhost:{port}/modules");
    // SSL_CERT_FILE makes the test CA the system's for the bucket.
    let mut collector = Collector::new(&pki, dir.path(), &trusted);
    let cache = dir.path().join("cache").display().to_string();
    collector.args.extend(["--cache-dir".into(), cache.clone()]);
    let bucket_args = ["--module-download-base-url", &base_url];
    collector.env.push(("SSL_CERT_FILE".into(), pki.ca_file().display().to_string()));

    let (code, report, stderr) = collector.run("bucket.o", &bucket_args).await;
    assert_eq!(code, 0, "{report}\n{stderr}");
    assert_eq!(std::fs::read(dir.path().join("bucket.o")).unwrap(), object);
    assert_eq!(report["signature"]["serial"], 1, "{report}");

    // A 1 MiB signature, and none at all.
    std::fs::write(&signature_file, vec![b'a'; 1 << 20]).unwrap();
    collector.refuses("huge.o", &bucket_args, "too_large").await;
    std::fs::remove_file(&signature_file).unwrap();
    collector.refuses("unsigned.o", &bucket_args, "missing").await;
    drop(bucket);

    // Nothing remote reachable: the cached probe, checked again.
    let unreachable = ["--central", "127.0.0.1:1"];
    let (code, report, stderr) = collector.run("cached.o", &unreachable).await;
    assert_eq!(code, 0, "{report}\n{stderr}");
    assert!(report["source"].as_str().unwrap().contains("node-local cache"), "{report}");
    assert_eq!(report["signature"]["serial"], 1, "{report}");
    assert_eq!(std::fs::read(dir.path().join("cached.o")).unwrap(), object);
    // A cached signature that was swapped is refused like a served one.
    let cached_signature = Path::new(&cache).join(format!("{MODULE}/collector-ebpf-{KERNEL}.o.gz.minisig"));
    let stranger = MinisignKey::generate(dir.path(), "x");
    std::fs::write(&cached_signature, stranger.sign(PATH, 1, &file)).unwrap();
    collector.refuses("cached-foreign.o", &unreachable, "unknown_key").await;
}

/// The kernel of an Ubuntu node and its backport name: two candidates of
/// one kernel.
const UBUNTU: &str = "5.4.0-42-generic";
const UBUNTU_BACKPORT: &str = "5.4.0-42-generic~20.04";

fn ubuntu_path(kernel: &str) -> String {
    format!("{MODULE}/collector-ebpf-{kernel}.o.gz")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_candidate_name_cannot_roll_a_node_back() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let trusted = MinisignKey::generate(dir.path(), "site");
    let central = Central::start(&pki, &dir.path().join("central")).await;
    let (file, _) = probe(1);
    let first = ubuntu_path(UBUNTU);
    upload(&central, &pki, &first, &file, Some(&trusted.sign(&first, 5, &file))).await;
    let mut collector = Collector::new(&pki, dir.path(), &trusted);
    let at = collector.args.iter().position(|arg| arg == "--kernel-candidates").unwrap() + 1;
    collector.args[at] = format!("{UBUNTU} {UBUNTU_BACKPORT}");
    let (code, report, stderr) = collector.run("first.o", &["--central", &central.address]).await;
    assert_eq!(code, 0, "{report}\n{stderr}");
    assert_eq!(report["signature"]["serial"], 5, "{report}");
    central.stop().await;

    // A compromised Central: the first name "not found", an older probe,
    // validly signed, under the backport name.
    let compromised = Central::start(&pki, &dir.path().join("compromised")).await;
    let (old, _) = probe(2);
    let backport = ubuntu_path(UBUNTU_BACKPORT);
    upload(&compromised, &pki, &backport, &old, Some(&trusted.sign(&backport, 4, &old))).await;
    collector.refuses("rolled-back.o", &["--central", &compromised.address], "rollback").await;
    // At the serial the node accepted, the other name is taken.
    upload(&compromised, &pki, &backport, &old, Some(&trusted.sign(&backport, 5, &old))).await;
    let (code, report, stderr) = collector.run("backport.o", &["--central", &compromised.address]).await;
    assert_eq!(code, 0, "{report}\n{stderr}");
    assert_eq!(report["kernel"], UBUNTU_BACKPORT, "{report}");
    compromised.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_probe_runs_at_once_lose_no_serial() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let trusted = MinisignKey::generate(dir.path(), "site");
    // Two Centrals: one with serial 3 of a probe, one with serial 7 of it;
    // both with another kernel's probe.
    let (low, high) =
        (Central::start(&pki, &dir.path().join("low")).await, Central::start(&pki, &dir.path().join("high")).await);
    let (file, _) = probe(1);
    let (a, b) = (ubuntu_path(UBUNTU), ubuntu_path("6.1.0-1-amd64"));
    for (central, serial) in [(&low, 3), (&high, 7)] {
        upload(central, &pki, &a, &file, Some(&trusted.sign(&a, serial, &file))).await;
        upload(central, &pki, &b, &file, Some(&trusted.sign(&b, 10 + serial, &file))).await;
    }
    let collector = Collector::new(&pki, dir.path(), &trusted);
    let runs = (0..8).map(|i| {
        let mut run = Collector { dir: collector.dir.clone(), args: collector.args.clone(), env: Vec::new() };
        let at = run.args.iter().position(|arg| arg == "--kernel-candidates").unwrap() + 1;
        run.args[at] = if i % 2 == 0 { UBUNTU } else { "6.1.0-1-amd64" }.to_owned();
        let central = if i % 4 < 2 { low.address.clone() } else { high.address.clone() };
        async move { run.run(&format!("run-{i}.o"), &["--central", &central]).await }
    });
    // All at once, then each awaited.
    let runs: Vec<_> = runs.map(tokio::spawn).collect();
    for run in runs {
        let (code, report, stderr) = run.await.unwrap();
        // A run that read serial 3 after another recorded 7 is refused.
        assert!(code == 0 || report["signature_refusals"]["rollback"] == 1, "{report}\n{stderr}");
    }
    let state = std::fs::read_to_string(dir.path().join("state/accepted-serials")).unwrap();
    assert!(state.contains(&format!("{a} 7\n")), "{state}");
    assert!(state.contains(&format!("{b} 17\n")), "{state}");
    low.stop().await;
    high.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_symlink_planted_where_the_collector_writes_is_followed() {
    use std::os::unix::fs::symlink;
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let trusted = MinisignKey::generate(dir.path(), "site");
    let central = Central::start(&pki, &dir.path().join("central")).await;
    let (file, object) = probe(1);
    upload(&central, &pki, PATH, &file, Some(&trusted.sign(PATH, 1, &file))).await;
    let mut collector = Collector::new(&pki, dir.path(), &trusted);
    let cache = dir.path().join("cache");
    collector.args.extend(["--cache-dir".into(), cache.display().to_string()]);
    let precious = dir.path().join("precious");
    std::fs::write(&precious, b"precious").unwrap();
    let (module_dir, state) = (cache.join(MODULE), dir.path().join("state"));
    std::fs::create_dir_all(&module_dir).unwrap();
    std::fs::create_dir_all(&state).unwrap();
    let cached = format!("collector-ebpf-{KERNEL}.o.gz");
    let mut planted = vec![dir.path().join("planted.o"), dir.path().join(".planted.o.tmp")];
    for name in [cached.clone(), format!("{cached}.sha256"), format!("{cached}.minisig")] {
        planted.extend([module_dir.join(&name), module_dir.join(format!(".{name}.tmp"))]);
    }
    planted.push(state.join(".accepted-serials.tmp"));
    for path in &planted {
        symlink(&precious, path).unwrap();
    }
    let grpc = ["--central", &central.address];
    // The state itself a symlink: its serials cannot be trusted, so the run
    // fails closed, saying what to do.
    let state_file = state.join("accepted-serials");
    symlink(&precious, &state_file).unwrap();
    let (code, _, stderr) = collector.run("planted.o", &grpc).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("is a symlink, which is never followed: remove it"), "{stderr}");
    std::fs::remove_file(&state_file).unwrap();
    let (code, report, stderr) = collector.run("planted.o", &grpc).await;
    assert_eq!(code, 0, "{report}\n{stderr}");
    assert_eq!(std::fs::read(&precious).unwrap(), b"precious", "no write went through a symlink");
    assert_eq!(std::fs::read(dir.path().join("planted.o")).unwrap(), object);
    for path in &planted {
        let kept = std::fs::symlink_metadata(path).map(|m| m.is_symlink());
        assert!(!matches!(kept, Ok(true)), "{} is still a symlink", path.display());
    }
    assert!(std::fs::read_to_string(state.join("accepted-serials")).unwrap().contains(&format!("{PATH} 1")));

    // Symlinks in place of the directories: refused, nothing written there.
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::fs::remove_dir_all(&module_dir).unwrap();
    symlink(&elsewhere, &module_dir).unwrap();
    let (code, report, stderr) = collector.run("module-dir.o", &grpc).await;
    assert_eq!(code, 0, "the cache is only a fallback: {report}\n{stderr}");
    assert!(stderr.contains("could not keep the probe") && stderr.contains("not a directory"), "{stderr}");
    std::fs::remove_dir_all(&state).unwrap();
    symlink(&elsewhere, &state).unwrap();
    let (code, _, stderr) = collector.run("state-dir.o", &grpc).await;
    assert_eq!(code, 1, "the serials cannot be kept: {stderr}");
    assert!(stderr.contains("not a directory"), "{stderr}");
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
    central.stop().await;
}
