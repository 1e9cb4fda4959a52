//! End to end: the `central-probes` binary as a new user meets it. Every
//! environment variable the code reads is named in the --help of the
//! commands that read it; `pki init` keeps an existing CA; a `--ca` file
//! without a certificate is named as such before any connection; a Central
//! that cannot be reached is named with the reason.

#[path = "common/cli.rs"]
mod cli;
mod common;

use std::collections::BTreeSet;
use std::path::Path;

use cli::central_cli;
use common::{Central, TestPki};

fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_central-probes")).args(args).output().unwrap();
    let text = |bytes: Vec<u8>| String::from_utf8_lossy(&bytes).into_owned();
    (output.status.code(), text(output.stdout), text(output.stderr))
}

/// `central-probes <path> --help`.
fn help(path: &[String]) -> String {
    let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
    args.push("--help");
    let (status, stdout, stderr) = run(&args);
    assert_eq!(status, Some(0), "{args:?}: {stderr}");
    stdout
}

/// Every command without subcommands, found through the "Commands:" lists
/// of --help, with its help text.
fn leaf_commands() -> Vec<(String, String)> {
    let mut leaves = Vec::new();
    let mut pending = vec![Vec::<String>::new()];
    while let Some(path) = pending.pop() {
        let text = help(&path);
        let commands: Vec<String> = text
            .lines()
            .skip_while(|line| *line != "Commands:")
            .skip(1)
            .take_while(|line| line.starts_with("  "))
            .filter_map(|line| line.split_whitespace().next())
            .filter(|name| *name != "help")
            .map(str::to_owned)
            .collect();
        if commands.is_empty() {
            leaves.push((path.join(" "), text));
        }
        pending.extend(commands.into_iter().map(|name| [path.clone(), vec![name]].concat()));
    }
    assert!(leaves.len() >= 14, "{:?}", leaves.iter().map(|(name, _)| name).collect::<Vec<_>>());
    leaves
}

/// The string literals of the calls `var(...)` and `var_os(...)` (the
/// environment read by hand) and of clap's `env = "..."` in `text`.
fn env_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for opener in ["var(\"", "var_os(\"", "env = \""] {
        for (start, _) in text.match_indices(opener) {
            let mut rest = &text[start + opener.len() - 1..];
            // One literal, or several: `var("https_proxy", "HTTPS_PROXY")`.
            while let Some(literal) = rest.strip_prefix('"') {
                let Some(end) = literal.find('"') else { break };
                names.insert(literal[..end].to_owned());
                rest = literal[end + 1..].trim_start_matches([',', ' ']);
            }
        }
    }
    if text.contains("from_default_env") {
        names.insert("RUST_LOG".to_owned());
    }
    names
}

/// The names read by the sources under `dir`, test code aside.
fn names_read_under(dir: &Path) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap();
        if path.is_dir() {
            names.extend(names_read_under(&path));
        } else if name.ends_with(".rs") && !["tests.rs", "test_cluster.rs"].contains(&name) {
            let text = std::fs::read_to_string(&path).unwrap();
            let code = text.split("#[cfg(test)]").next().unwrap();
            names.extend(env_names(code));
        }
    }
    names
}

#[test]
fn every_environment_variable_the_code_reads_is_in_the_help_of_the_commands_that_read_it() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let shared = names_read_under(&root.join("src"));
    let central = names_read_under(&root.join("central-probes/src"));
    assert!(central.contains("ROX_API_TOKEN") && central.contains("CENTRAL_DATA_DIR"), "{central:?}");
    assert!(shared.contains("SSL_CERT_FILE") && shared.contains("HTTPS_PROXY"), "{shared:?}");
    let leaves = leaf_commands();
    let help_of = |name: &str| &leaves.iter().find(|(leaf, _)| leaf == name).unwrap().1;
    for (command, text) in &leaves {
        // Every command logs through the same filter.
        assert!(text.contains("RUST_LOG"), "{command}: {text}");
        // Every command that calls Central sends the token.
        if text.contains("--endpoint") {
            assert!(text.contains("ROX_API_TOKEN"), "`{command} --help` does not name ROX_API_TOKEN:\n{text}");
        }
    }
    for name in &central {
        assert!(leaves.iter().any(|(_, text)| text.contains(name.as_str())), "no --help names {name}");
    }
    // The shared crate's variables are read by Central's upstream client.
    for name in &shared {
        assert!(help_of("serve").contains(name.as_str()), "`serve --help` does not name {name}");
    }
}

#[test]
fn pki_init_keeps_an_existing_ca_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pki");
    let out = out.to_str().unwrap();
    let (status, _, stderr) = run(&["pki", "init", "--out", out]);
    assert_eq!(status, Some(0), "{stderr}");
    let ca = std::fs::read(dir.path().join("pki/ca.pem")).unwrap();
    let key = std::fs::read(dir.path().join("pki/ca-key.pem")).unwrap();

    let (status, _, stderr) = run(&["pki", "init", "--out", out]);
    assert_eq!(status, Some(1), "{stderr}");
    assert!(
        stderr.contains("ca.pem, ca-key.pem, server.pem, server-key.pem") && stderr.contains("--force"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(dir.path().join("pki/ca.pem")).unwrap(), ca, "the CA is kept");
    assert_eq!(std::fs::read(dir.path().join("pki/ca-key.pem")).unwrap(), key);

    let (status, _, stderr) = run(&["pki", "init", "--out", out, "--force"]);
    assert_eq!(status, Some(0), "{stderr}");
    assert_ne!(std::fs::read(dir.path().join("pki/ca.pem")).unwrap(), ca, "--force makes a new CA");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_file_without_a_certificate_is_named_as_such() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let central = Central::start(&pki, &dir.path().join("data")).await;
    // What one gets by passing the key, or an empty file, for the CA.
    let key_only = dir.path().join("ca-key.pem");
    std::fs::write(&key_only, pki.ca.key_pem()).unwrap();
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    for ca in [&key_only, &empty] {
        let args = ["ls", "-e", &central.address, "--ca", ca.to_str().unwrap()];
        let (ok, _, stderr) = central_cli(&args, &central.view_token).await;
        assert!(!ok, "{stderr}");
        assert!(stderr.contains(&format!("{} holds no PEM certificate", ca.display())), "{stderr}");
        assert!(!stderr.contains("UnknownIssuer"), "{stderr}");
    }
    // The right one works.
    let ca = pki.ca_file();
    let args = ["ls", "-e", &central.address, "--ca", ca.to_str().unwrap()];
    let (ok, _, stderr) = central_cli(&args, &central.view_token).await;
    assert!(ok, "{stderr}");
    central.stop().await;
}

/// `ls`, `misses` and `upload` against `address` with `ca`: each one's
/// stderr, as they fail.
async fn each_command_failing(address: &str, ca: &Path, package: &Path) -> Vec<String> {
    let ca = ca.to_str().unwrap();
    let commands: [&[&str]; 3] = [&["ls"], &["misses"], &["upload", package.to_str().unwrap()]];
    let mut failures = Vec::new();
    for command in commands {
        let args = [command, &["-e", address, "--ca", ca]].concat();
        let (ok, _, stderr) = central_cli(&args, "a-token").await;
        assert!(!ok, "{args:?}: {stderr}");
        failures.push(stderr);
    }
    failures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_central_out_of_reach_is_named_with_the_reason() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let package = dir.path().join("package.zip");
    central_probes::synthetic::PackageSpec::new("2.5.0", &["5.14.0-1.x86_64"]).write(&package).unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    for stderr in each_command_failing(&closed, &pki.ca_file(), &package).await {
        assert!(stderr.contains(&format!("cannot connect to {closed}: Connection refused")), "{stderr}");
    }
    let unknown = "no-such-host.invalid:443";
    for stderr in each_command_failing(unknown, &pki.ca_file(), &package).await {
        assert!(stderr.contains(&format!("cannot connect to {unknown}: failed to lookup address")), "{stderr}");
    }

    let central = Central::start(&pki, &dir.path().join("data")).await;
    let foreign_ca = dir.path().join("foreign-ca.pem");
    std::fs::write(&foreign_ca, TestPki::new().ca.cert_pem).unwrap();
    for stderr in each_command_failing(&central.address, &foreign_ca, &package).await {
        let tls = format!("TLS with {} failed: invalid peer certificate", central.address);
        assert!(stderr.contains(&tls), "{stderr}");
        assert!(stderr.contains("check that --ca is the CA that signed Central's certificate"), "{stderr}");
    }
    central.stop().await;
}
