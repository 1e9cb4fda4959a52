//! The facts about the node that kernel names are derived from, read where
//! the product's Collector reads them: it runs in a container with the
//! host's files under a host root (`COLLECTOR_HOST_ROOT`, `/host` by
//! default).
//!
//! - the kernel release: `KERNEL_VERSION`, else the kernel's own (what
//!   `uname -r` says; read from `<root>/proc/sys/kernel/osrelease`, else
//!   `/proc/sys/kernel/osrelease`, the same kernel);
//! - `uname -v`: `<root>/proc/sys/kernel/version`, else
//!   `/proc/sys/kernel/version`;
//! - os-release: `<root>/etc/os-release`, else `<root>/usr/lib/os-release`;
//! - the host name: `NODE_HOSTNAME`, else `<root>/etc/hostname`, else
//!   `<root>/proc/sys/kernel/hostname`;
//! - `<root>/etc/VERSION` (minikube's).
//!
//! Reading `uname` from files rather than the system call gives the same
//! strings on a node and lets a test give a fake host root.

use std::path::{Path, PathBuf};

use crate::candidates::{HostFacts, parse_os_release};

/// Where and how to read the host.
#[derive(Clone, Debug, Default)]
pub struct HostSettings {
    pub host_root: PathBuf,
    /// `KERNEL_VERSION`: the release to use instead of the kernel's.
    pub kernel_release: Option<String>,
    /// `NODE_HOSTNAME`.
    pub node_hostname: Option<String>,
    /// An os-release file to read instead of the host root's.
    pub os_release: Option<PathBuf>,
}

/// The first line of `path`, trimmed; `None` if unreadable or empty.
fn first_line(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().next()?.trim();
    (!line.is_empty()).then(|| line.to_owned())
}

/// Reads the host's facts; only the kernel release is required.
pub fn read(settings: &HostSettings) -> Result<HostFacts, String> {
    let root = &settings.host_root;
    let kernel_file = |name: &str| {
        first_line(&root.join("proc/sys/kernel").join(name))
            .or_else(|| first_line(&Path::new("/proc/sys/kernel").join(name)))
    };
    let release = match settings.kernel_release.as_deref().map(str::trim).filter(|r| !r.is_empty()) {
        Some(release) => release.to_owned(),
        None => kernel_file("osrelease").ok_or("cannot read the kernel release (proc/sys/kernel/osrelease)")?,
    };
    let os_release_paths = match &settings.os_release {
        Some(path) => vec![path.clone()],
        None => vec![root.join("etc/os-release"), root.join("usr/lib/os-release")],
    };
    let os_release = os_release_paths
        .iter()
        .find_map(|path| std::fs::read_to_string(path).ok())
        .map(|text| parse_os_release(&text))
        .unwrap_or_default();
    let hostname = settings
        .node_hostname
        .clone()
        .filter(|name| !name.is_empty())
        .or_else(|| first_line(&root.join("etc/hostname")))
        .or_else(|| first_line(&root.join("proc/sys/kernel/hostname")))
        .unwrap_or_else(|| "unknown".to_owned());
    Ok(HostFacts {
        release,
        version: kernel_file("version").unwrap_or_default(),
        os_release,
        hostname,
        version_file: std::fs::read_to_string(root.join("etc/VERSION")).ok(),
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::candidates::candidates;

    /// Every host of `tests/data/hosts`: its root holds the files the product
    /// reads (os-release, `uname -r`/`-v` as `proc/sys/kernel/osrelease` and
    /// `version`, the host name, `/etc/VERSION`), and `candidates` the names
    /// the product derives from them, in order.
    #[test]
    fn each_distribution_gets_the_products_candidates_in_its_order() {
        let hosts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/hosts");
        let mut checked = 0;
        for host in std::fs::read_dir(&hosts).unwrap() {
            let host = host.unwrap().path();
            if !host.is_dir() {
                continue;
            }
            let settings = HostSettings { host_root: host.join("root"), ..HostSettings::default() };
            let facts = read(&settings).unwrap();
            let expected: Vec<String> =
                std::fs::read_to_string(host.join("candidates")).unwrap().lines().map(str::to_owned).collect();
            assert_eq!(candidates(&facts), expected, "{}", host.display());
            checked += 1;
        }
        assert!(checked >= 11, "the host data is there: {checked} hosts");
    }
}
