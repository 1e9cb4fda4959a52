//! The `central-probes` binary run as an admin runs it (only for the tests
//! of the package that builds it).

/// Runs the `central-probes` binary and returns (success, stdout, stderr).
pub async fn central_cli(args: &[&str], token: &str) -> (bool, String, String) {
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
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}
