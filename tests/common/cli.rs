//! The `central-probes` binary run as an admin runs it (only for the tests
//! of the package that builds it).

#![allow(dead_code)] // each test file uses a different part of it

/// Runs the `central-probes` binary and returns (success, stdout, stderr).
pub async fn central_cli(args: &[&str], token: &str) -> (bool, String, String) {
    let (status, stdout, stderr) = central_cli_status(args, token).await;
    (status == 0, stdout, stderr)
}

/// Runs the `central-probes` binary and returns (exit status, stdout,
/// stderr); -1 when a signal ended it.
pub async fn central_cli_status(args: &[&str], token: &str) -> (i32, String, String) {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let token = token.to_owned();
    tokio::task::spawn_blocking(move || {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_central-probes"))
            .args(&args)
            .env("ROX_API_TOKEN", token)
            .env_remove("ROX_CENTRAL_ADDRESS")
            .env_remove("ROX_CA_CERT_FILE")
            .output()
            .unwrap();
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

/// The probe paths `central-probes ls` lists, in its order.
pub async fn listed(address: &str, ca: &std::path::Path, token: &str) -> Vec<String> {
    let (ok, stdout, stderr) = central_cli(&["ls", "-e", address, "--ca", ca.to_str().unwrap()], token).await;
    assert!(ok, "{stderr}");
    // A line per probe, its path a word with a slash.
    let paths = stdout.lines().filter_map(|line| line.split_whitespace().find(|word| word.contains('/')));
    paths.map(str::to_owned).collect()
}
