//! Which kernel names a Collector looks for, derived as the product's
//! Collector derives them (stackrox/collector `DriverCandidates.cpp` and
//! `HostInfo.h`, before driver downloads were removed in August 2024), in
//! the same order:
//!
//! 1. `KERNEL_CANDIDATES`, when set, replaces everything below.
//! 2. Ubuntu (`ID=ubuntu`): the release with the first backport marker found
//!    in `uname -v` (`~16.04`, then `~20.04`).
//! 3. Garden Linux (`PRETTY_NAME` is `Garden Linux <n>.<n>`):
//!    `<release>-gl-<X>`, X the first `\d+\.\d+\.\d+-\w+` in `uname -v`.
//! 4. The host candidate: on COS (`ID=cos` with a `BUILD_ID`) the release
//!    without a trailing `+`, then `-<BUILD_ID>-<ID>`; on Docker Desktop
//!    (`PRETTY_NAME` is `Docker Desktop`) `<short release>-dockerdesktop-<build
//!    time>` from the text after `SMP ` in `uname -v`; else the release.
//! 5. minikube (the host name is `minikube`): `<short
//!    release>-minikube-<v\d+\.\d+\.\d+ from the first line of /etc/VERSION>`.
//!
//! Central derives the same names from a node's facts (a coverage check
//! before a kernel rollout), so they live here, shared, rather than in the
//! Collector.
//!
//! One difference, deliberate: where the product aborts (a Docker Desktop
//! `uname -v` it cannot parse), the plain release is the host candidate,
//! with a warning.

use std::collections::HashMap;

/// What the Collector knows about its host.
#[derive(Clone, Debug, Default)]
pub struct HostFacts {
    /// `uname -r` (or `KERNEL_VERSION`), e.g. `5.10.104-linuxkit`.
    pub release: String,
    /// `uname -v`, e.g. `#1 SMP PREEMPT Thu Mar 17 17:08:06 UTC 2022`.
    pub version: String,
    /// The host's os-release, as key-value pairs.
    pub os_release: HashMap<String, String>,
    /// The node's host name.
    pub hostname: String,
    /// The first line of the host's `/etc/VERSION` (minikube's ISO has one).
    pub version_file: Option<String>,
}

/// Parses an os-release file: `KEY=value` lines, values optionally quoted.
pub fn parse_os_release(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            if line.starts_with('#') {
                return None;
            }
            let (key, value) = line.split_once('=')?;
            let value = value.trim();
            let value = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(value);
            Some((key.trim().to_owned(), value.to_owned()))
        })
        .collect()
}

/// The candidates of a host without `KERNEL_CANDIDATES`, in the product's
/// order, without duplicates.
pub fn candidates(facts: &HostFacts) -> Vec<String> {
    let mut all: Vec<String> = [ubuntu_backport(facts), garden_linux(facts)].into_iter().flatten().collect();
    all.push(host_candidate(facts));
    all.extend(minikube(facts));
    let mut seen = std::collections::HashSet::new();
    all.retain(|c| !c.is_empty() && seen.insert(c.clone()));
    all
}

/// `KERNEL_CANDIDATES` (or `--kernel-candidates`): names separated by
/// spaces, as the product splits them, or by commas.
pub fn split_candidates(text: &str) -> Vec<String> {
    text.split(|c: char| c == ',' || c.is_whitespace()).filter(|c| !c.is_empty()).map(str::to_owned).collect()
}

fn os<'a>(facts: &'a HostFacts, key: &str) -> &'a str {
    facts.os_release.get(key).map(String::as_str).unwrap_or_default()
}

/// The product's `GetDistro`: `PRETTY_NAME`, else "Linux".
fn distro(facts: &HostFacts) -> &str {
    match os(facts, "PRETTY_NAME") {
        "" => "Linux",
        name => name,
    }
}

/// `kernel.major.minor` of a release starting `\d+\.\d+\.\d+` (the
/// product's `ShortRelease`; `0.0.0` when it does not).
pub fn short_release(release: &str) -> String {
    let numbers: Vec<&str> = release.splitn(4, '.').take(3).collect();
    let leading = |part: &str| part.bytes().take_while(u8::is_ascii_digit).count();
    let parsed = numbers.len() == 3
        && leading(numbers[0]) == numbers[0].len()
        && leading(numbers[1]) == numbers[1].len()
        && leading(numbers[2]) > 0
        && numbers.iter().all(|n| !n.is_empty());
    if !parsed {
        return "0.0.0".to_owned();
    }
    let number = |part: &str| part[..leading(part)].parse::<u64>().unwrap_or(0);
    format!("{}.{}.{}", number(numbers[0]), number(numbers[1]), number(numbers[2]))
}

/// COS, Docker Desktop, or the release itself.
pub fn host_candidate(facts: &HostFacts) -> String {
    let build_id = os(facts, "BUILD_ID");
    if os(facts, "ID") == "cos" && !build_id.is_empty() {
        let release = facts.release.strip_suffix('+').unwrap_or(&facts.release);
        return format!("{release}-{build_id}-cos");
    }
    if distro(facts) == "Docker Desktop" {
        match docker_desktop_build_time(&facts.version) {
            Some(time) => return format!("{}-dockerdesktop-{time}", short_release(&facts.release)),
            None => tracing::warn!(
                version = %facts.version,
                "Docker Desktop, but no build time after \"SMP \" in uname -v: trying the plain release"
            ),
        }
    }
    facts.release.clone()
}

/// The text after `SMP ` in `uname -v`, read as `%a %b %d %H:%M:%S UTC %Y`,
/// written `%Y-%m-%d-%H-%M-%S`.
pub fn docker_desktop_build_time(version: &str) -> Option<String> {
    const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let after = &version[version.find("SMP ")? + 4..];
    let words: Vec<&str> = after.split_whitespace().collect();
    let [day_name, month, day, time, "UTC", year, ..] = words.as_slice() else { return None };
    DAYS.contains(day_name).then_some(())?;
    let month = MONTHS.iter().position(|m| m == month)? + 1;
    let day: u32 = day.parse().ok().filter(|d| (1..=31).contains(d))?;
    let year: u32 = year.parse().ok()?;
    let hms: Vec<u32> = time.split(':').map(|part| part.parse().ok()).collect::<Option<_>>()?;
    let [hour, minute, second] = hms.as_slice() else { return None };
    Some(format!("{year:04}-{month:02}-{day:02}-{hour:02}-{minute:02}-{second:02}"))
}

/// minikube: `<short release>-minikube-<version>`, the version being the
/// first `v\d+\.\d+\.\d+` in the first line of `/etc/VERSION`.
pub fn minikube(facts: &HostFacts) -> Option<String> {
    if facts.hostname != "minikube" {
        return None;
    }
    let line = facts.version_file.as_deref()?.lines().next()?;
    let version = find_version(line, "v", false)?;
    Some(format!("{}-minikube-{version}", short_release(&facts.release)))
}

/// Garden Linux: `<release>-gl-<X>`, X the first `\d+\.\d+\.\d+-\w+` of
/// `uname -v`.
pub fn garden_linux(facts: &HostFacts) -> Option<String> {
    if !is_garden_linux(distro(facts)) {
        return None;
    }
    let version = find_version(&facts.version, "", true);
    if version.is_none() {
        tracing::warn!(version = %facts.version, "Garden Linux, but no <n>.<n>.<n>-<word> in uname -v");
    }
    Some(format!("{}-gl-{}", facts.release, version?))
}

/// `PRETTY_NAME` is all of `Garden Linux \d+\.\d+` (the product's
/// `regex_match`).
fn is_garden_linux(pretty_name: &str) -> bool {
    let Some(version) = pretty_name.strip_prefix("Garden Linux ") else { return false };
    let Some((major, minor)) = version.split_once('.') else { return false };
    [major, minor].iter().all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Ubuntu: the release and the first backport marker found in `uname -v`.
pub fn ubuntu_backport(facts: &HostFacts) -> Option<String> {
    if os(facts, "ID") != "ubuntu" {
        return None;
    }
    let marker = ["~16.04", "~20.04"].into_iter().find(|marker| facts.version.contains(marker))?;
    Some(format!("{}{marker}", facts.release))
}

/// The leftmost `<prefix>\d+\.\d+\.\d+` in `text`, followed by `-\w+`
/// (the longest run of word characters) when `with_suffix`.
fn find_version(text: &str, prefix: &str, with_suffix: bool) -> Option<String> {
    let bytes = text.as_bytes();
    let digits_at = |i: usize| bytes[i.min(bytes.len())..].iter().take_while(|b| b.is_ascii_digit()).count();
    (0..bytes.len()).find_map(|start| {
        let mut at = start;
        if !bytes[at..].starts_with(prefix.as_bytes()) {
            return None;
        }
        at += prefix.len();
        for part in 0..3 {
            let n = digits_at(at);
            if n == 0 {
                return None;
            }
            at += n;
            if part < 2 {
                if bytes.get(at) != Some(&b'.') {
                    return None;
                }
                at += 1;
            }
        }
        if with_suffix {
            if bytes.get(at) != Some(&b'-') {
                return None;
            }
            let word = bytes[at + 1..].iter().take_while(|b| b.is_ascii_alphanumeric() || **b == b'_').count();
            if word == 0 {
                return None;
            }
            at += 1 + word;
        }
        Some(text[start..at].to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(release: &str, version: &str, os_release: &str) -> HostFacts {
        HostFacts {
            release: release.into(),
            version: version.into(),
            os_release: parse_os_release(os_release),
            hostname: "node".into(),
            version_file: None,
        }
    }

    #[test]
    fn os_release_values_are_unquoted() {
        let parsed = parse_os_release("# comment\nID=cos\nNAME=\"Container-Optimized OS\"\nBUILD_ID='16919.235.1'\n");
        assert_eq!(parsed["ID"], "cos");
        assert_eq!(parsed["NAME"], "Container-Optimized OS");
        assert_eq!(parsed["BUILD_ID"], "16919.235.1");
    }

    #[test]
    fn cos_needs_its_id_and_a_build_id() {
        assert_eq!(host_candidate(&facts("5.15.65+", "", "ID=cos\nBUILD_ID=16919.235.1\n")), "5.15.65-16919.235.1-cos");
        assert_eq!(host_candidate(&facts("5.15.65+", "", "ID=ubuntu\nBUILD_ID=1\n")), "5.15.65+");
        assert_eq!(host_candidate(&facts("5.15.65+", "", "ID=cos\n")), "5.15.65+");
    }

    #[test]
    fn docker_desktop_build_times_are_read_after_smp_as_the_product_reads_them() {
        let time = docker_desktop_build_time;
        assert_eq!(time("#1 SMP Tue Jan 5 01:02:03 UTC 2021").as_deref(), Some("2021-01-05-01-02-03"));
        // The product's strptime wants the day name right after "SMP ".
        assert_eq!(time("#1 SMP PREEMPT Thu Mar 17 17:08:06 UTC 2022"), None);
        assert_eq!(time("#1 SMP Sat Dec 30 23:59:59 CET 2023"), None, "UTC only");
        assert_eq!(time("#1 SMP"), None);
        // Without a build time the plain release is tried (the product aborts).
        let host = facts("5.10.104-linuxkit", "#1 SMP PREEMPT", "PRETTY_NAME=\"Docker Desktop\"\n");
        assert_eq!(host_candidate(&host), "5.10.104-linuxkit");
        // A linuxkit kernel alone is not Docker Desktop.
        let host = facts("5.10.104-linuxkit", "#1 SMP Thu Mar 17 17:08:06 UTC 2022", "PRETTY_NAME=\"Alpine\"\n");
        assert_eq!(host_candidate(&host), "5.10.104-linuxkit");
    }

    #[test]
    fn short_releases_are_the_first_three_numbers() {
        assert_eq!(short_release("5.10.104-linuxkit"), "5.10.104");
        assert_eq!(short_release("4.19.112+"), "4.19.112");
        assert_eq!(short_release("5.10.57"), "5.10.57");
        assert_eq!(short_release("6.1"), "0.0.0", "the product's default when it cannot parse");
    }

    #[test]
    fn ubuntu_backports_need_ubuntu_and_stop_at_the_first_marker() {
        let both = "#1~16.04.1~20.04-Ubuntu SMP";
        assert_eq!(
            ubuntu_backport(&facts("4.15.0-1-generic", both, "ID=ubuntu\n")).as_deref(),
            Some("4.15.0-1-generic~16.04")
        );
        assert_eq!(ubuntu_backport(&facts("4.15.0-1-generic", both, "ID=debian\n")), None);
    }

    #[test]
    fn garden_linux_needs_its_pretty_name_whole_and_a_version_in_uname_v() {
        let version = "#1 SMP Debian 5.10.83-1gardenlinux1 (2021-12-07)";
        let garden = |pretty: &str| {
            garden_linux(&facts("5.10.0-9-cloud-amd64", version, &format!("PRETTY_NAME=\"{pretty}\"\n")))
        };
        assert_eq!(garden("Garden Linux 576.12").as_deref(), Some("5.10.0-9-cloud-amd64-gl-5.10.83-1gardenlinux1"));
        assert_eq!(garden("Garden Linux 576.12 (dev)"), None, "regex_match wants the whole name");
        assert_eq!(garden("Garden Linux"), None);
        let no_version = facts("5.10.0-9-cloud-amd64", "#1 SMP", "PRETTY_NAME=\"Garden Linux 576.12\"\n");
        assert_eq!(garden_linux(&no_version), None);
    }

    #[test]
    fn versions_are_found_leftmost_with_the_longest_word() {
        assert_eq!(find_version("a 1.2.3-x_y9 4.5.6-z", "", true).as_deref(), Some("1.2.3-x_y9"));
        assert_eq!(find_version("12.3.4-", "", true), None);
        assert_eq!(find_version("v1.26.0-1655407986-14197", "v", false).as_deref(), Some("v1.26.0"));
        assert_eq!(find_version("minikube 1.26.0", "v", false), None);
    }

    #[test]
    fn minikube_is_recognised_by_its_host_name() {
        let mut host = facts("5.10.57", "#1 SMP", "ID=buildroot\n");
        host.version_file = Some("v1.26.0-1655407986-14197\n".into());
        assert_eq!(minikube(&host), None, "not named minikube");
        host.hostname = "minikube".into();
        assert_eq!(minikube(&host).as_deref(), Some("5.10.57-minikube-v1.26.0"));
        assert_eq!(candidates(&host), ["5.10.57", "5.10.57-minikube-v1.26.0"], "after the host candidate");
    }

    #[test]
    fn candidates_given_are_split_on_spaces_and_commas() {
        assert_eq!(split_candidates(" 5.4.0-1  6.1.0-2,6.2.0 "), ["5.4.0-1", "6.1.0-2", "6.2.0"]);
        assert!(split_candidates("  ").is_empty());
    }
}
