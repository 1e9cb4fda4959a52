//! Keys and signatures made by the real `minisign` tool (Debian's package,
//! which `.ci/run` installs): what a site signing its packages uses.

#![allow(dead_code)] // each test file uses a different part of it

use std::path::{Path, PathBuf};
use std::process::Command;

use probe_api::signing::ProbeSignature;

/// A minisign key pair in a directory of its own, unencrypted (`-W`).
pub struct MinisignKey {
    pub public: PathBuf,
    pub secret: PathBuf,
    dir: PathBuf,
}

fn run(command: &mut Command) {
    let output = command.output().expect("the minisign tool (apt-get install minisign)");
    assert!(output.status.success(), "{command:?}: {}", String::from_utf8_lossy(&output.stderr));
}

impl MinisignKey {
    pub fn generate(dir: &Path, name: &str) -> MinisignKey {
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let (public, secret) = (dir.join("minisign.pub"), dir.join("minisign.key"));
        run(Command::new("minisign").args(["-G", "-W", "-f", "-p"]).arg(&public).arg("-s").arg(&secret));
        MinisignKey { public, secret, dir }
    }

    /// `minisign -S` of `data` with `comment` as its trusted comment;
    /// `legacy` signs in the legacy (not prehashed) format, `-l`.
    pub fn sign_with(&self, data: &[u8], comment: &str, legacy: bool) -> Vec<u8> {
        let (file, signature) = (self.dir.join("data"), self.dir.join("data.minisig"));
        std::fs::write(&file, data).unwrap();
        let mut command = Command::new("minisign");
        command.args(["-S", "-s"]).arg(&self.secret).arg("-m").arg(&file).arg("-x").arg(&signature);
        command.args(["-t", comment]);
        if legacy {
            command.arg("-l");
        }
        run(&mut command);
        std::fs::read(&signature).unwrap()
    }

    /// A signature of the probe `path` at `serial`, as `package sign` makes it.
    pub fn sign(&self, path: &str, serial: u64, data: &[u8]) -> Vec<u8> {
        let path = probe_api::names::ProbePath::parse(path).unwrap();
        self.sign_with(data, &probe_api::signing::trusted_comment(&path, serial), false)
    }

    /// The key id as Central and the Collector print it.
    pub fn key_id(&self) -> String {
        let signature = self.sign_with(b"x", "kprobe v1 module-version=2.5.0 file=x serial=1", false);
        ProbeSignature::parse(&signature).unwrap().key_id().to_string()
    }

    /// `minisign -V` of `data` against `signature`: whether it verifies.
    pub fn verifies(&self, data: &[u8], signature: &[u8]) -> bool {
        let (file, sig) = (self.dir.join("checked"), self.dir.join("checked.minisig"));
        std::fs::write(&file, data).unwrap();
        std::fs::write(&sig, signature).unwrap();
        let output = Command::new("minisign")
            .arg("-V")
            .arg("-p")
            .arg(&self.public)
            .arg("-m")
            .arg(&file)
            .arg("-x")
            .arg(&sig)
            .output()
            .unwrap();
        output.status.success()
    }
}
