//! Which kernel names a Collector looks for.
//!
//! The node's kernel release (`uname -r`, or `KERNEL_VERSION`) is the
//! plain candidate. Some distributions build probes under a more specific
//! name derived from other host facts; each such rule is a function here,
//! and the specific candidates come before the plain one.

use std::collections::HashMap;

/// What the Collector knows about its host.
#[derive(Clone, Debug, Default)]
pub struct HostFacts {
    /// `uname -r`, e.g. `5.10.104-linuxkit`.
    pub release: String,
    /// `uname -v`, e.g. `#1 SMP PREEMPT Thu Mar 17 17:08:06 UTC 2022`.
    pub version: String,
    /// The host's `/etc/os-release`, as key-value pairs.
    pub os_release: HashMap<String, String>,
    /// minikube's version, read from `/etc/VERSION` on its Buildroot ISO.
    pub minikube_version: Option<String>,
}

/// Parses `/etc/os-release`: `KEY=value` lines, values optionally quoted.
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

/// All candidates, most specific first, without duplicates.
pub fn candidates(facts: &HostFacts) -> Vec<String> {
    let mut all: Vec<String> =
        [cos(facts), docker_desktop(facts), minikube(facts), garden_linux(facts)].into_iter().flatten().collect();
    all.extend(ubuntu_backports(facts));
    all.push(facts.release.clone());
    let mut seen = std::collections::HashSet::new();
    all.retain(|c| !c.is_empty() && seen.insert(c.clone()));
    all
}

fn os(facts: &HostFacts, key: &str) -> Option<String> {
    facts.os_release.get(key).filter(|v| !v.is_empty()).cloned()
}

/// The release up to its first `-`: `5.10.104-linuxkit` gives `5.10.104`.
fn short_release(release: &str) -> &str {
    release.split('-').next().unwrap_or(release)
}

/// Container-Optimized OS: a trailing `+` goes, `-<BUILD_ID>-<ID>` comes.
pub fn cos(facts: &HostFacts) -> Option<String> {
    let id = os(facts, "ID").filter(|id| id == "cos")?;
    let build_id = os(facts, "BUILD_ID")?;
    Some(format!("{}-{build_id}-{id}", facts.release.trim_end_matches('+')))
}

/// Docker Desktop (a `linuxkit` kernel): `<short>-dockerdesktop-<build date>`
/// with the build date of `uname -v` as `YYYY-mm-dd-HH-MM-SS`.
pub fn docker_desktop(facts: &HostFacts) -> Option<String> {
    if !facts.release.contains("linuxkit") {
        return None;
    }
    let date = kernel_build_date(&facts.version)?;
    Some(format!("{}-dockerdesktop-{date}", short_release(&facts.release)))
}

/// minikube: `<short>-minikube-<version>`.
pub fn minikube(facts: &HostFacts) -> Option<String> {
    let version = facts.minikube_version.as_deref().map(str::trim).filter(|v| !v.is_empty())?;
    Some(format!("{}-minikube-{version}", short_release(&facts.release)))
}

/// Garden Linux: `<release>-gl-<VERSION_ID>`.
pub fn garden_linux(facts: &HostFacts) -> Option<String> {
    os(facts, "ID").filter(|id| id == "gardenlinux")?;
    Some(format!("{}-gl-{}", facts.release, os(facts, "VERSION_ID")?))
}

/// Ubuntu backport kernels name their series in `uname -v`
/// (`#110~16.04.1-Ubuntu`): `<release>~16.04`, and likewise `~20.04`.
pub fn ubuntu_backports(facts: &HostFacts) -> Vec<String> {
    ["~16.04", "~20.04"]
        .into_iter()
        .filter(|series| facts.version.contains(series))
        .map(|series| format!("{}{series}", facts.release))
        .collect()
}

/// `#1 SMP PREEMPT Thu Mar 17 17:08:06 UTC 2022` gives `2022-03-17-17-08-06`.
pub fn kernel_build_date(version: &str) -> Option<String> {
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let words: Vec<&str> = version.split_whitespace().collect();
    let time_at = words.iter().position(|w| w.len() == 8 && w.matches(':').count() == 2)?;
    let day: u32 = words.get(time_at.checked_sub(1)?)?.parse().ok()?;
    let month_word = words.get(time_at.checked_sub(2)?)?;
    let month = MONTHS.iter().position(|m| m == month_word)? + 1;

    let year = words[time_at..].iter().find(|w| w.len() == 4 && w.bytes().all(|b| b.is_ascii_digit()))?;
    let time = words[time_at].replace(':', "-");
    Some(format!("{year}-{month:02}-{day:02}-{time}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(release: &str, version: &str, os_release: &str) -> HostFacts {
        HostFacts {
            release: release.into(),
            version: version.into(),
            os_release: parse_os_release(os_release),
            minikube_version: None,
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
    fn cos_strips_the_plus_and_appends_build_and_id() {
        let host = facts("5.15.65+", "#1 SMP", "ID=cos\nBUILD_ID=16919.235.1\n");
        assert_eq!(cos(&host).as_deref(), Some("5.15.65-16919.235.1-cos"));
        assert_eq!(candidates(&host), ["5.15.65-16919.235.1-cos", "5.15.65+"]);
        assert_eq!(cos(&facts("5.15.65+", "", "ID=ubuntu\nBUILD_ID=1\n")), None);
        assert_eq!(cos(&facts("5.15.65+", "", "ID=cos\n")), None);
    }

    #[test]
    fn docker_desktop_uses_the_kernel_build_date() {
        let host = facts("5.10.104-linuxkit", "#1 SMP PREEMPT Thu Mar 17 17:08:06 UTC 2022", "ID=alpine\n");
        assert_eq!(docker_desktop(&host).as_deref(), Some("5.10.104-dockerdesktop-2022-03-17-17-08-06"));
        assert_eq!(docker_desktop(&facts("5.10.104-generic", "#1 SMP Thu Mar 17 17:08:06 UTC 2022", "")), None);
        assert_eq!(docker_desktop(&facts("5.10.104-linuxkit", "#1 SMP", "")), None);
    }

    #[test]
    fn kernel_build_dates_parse_from_uname_v() {
        assert_eq!(kernel_build_date("#1 SMP Tue Jan 5 01:02:03 UTC 2021").as_deref(), Some("2021-01-05-01-02-03"));
        assert_eq!(
            kernel_build_date("#1 SMP PREEMPT_DYNAMIC Sat Dec 30 23:59:59 CET 2023").as_deref(),
            Some("2023-12-30-23-59-59")
        );
        assert_eq!(kernel_build_date("#1 SMP"), None);
        assert_eq!(kernel_build_date("#1 SMP Foo 12 01:02:03 UTC 2021"), None);
    }

    #[test]
    fn ubuntu_backports_add_the_series() {
        let host = facts("4.15.0-142-generic", "#146~16.04.1-Ubuntu SMP Tue Apr 13 09:27:15 UTC 2021", "ID=ubuntu\n");
        assert_eq!(ubuntu_backports(&host), ["4.15.0-142-generic~16.04"]);
        let host = facts("5.15.0-60-generic", "#66~20.04.1-Ubuntu SMP", "ID=ubuntu\n");
        assert_eq!(candidates(&host), ["5.15.0-60-generic~20.04", "5.15.0-60-generic"]);
        assert!(ubuntu_backports(&facts("5.15.0-60-generic", "#66-Ubuntu SMP", "")).is_empty());
    }

    #[test]
    fn minikube_and_garden_linux_have_their_own_names() {
        let mut host = facts("5.10.57", "#1 SMP", "ID=buildroot\n");
        host.minikube_version = Some("v1.26.0\n".into());
        assert_eq!(minikube(&host).as_deref(), Some("5.10.57-minikube-v1.26.0"));
        let host = facts("5.15.125-gardenlinux-cloud-amd64", "#1 SMP", "ID=gardenlinux\nVERSION_ID=934.11\n");
        assert_eq!(garden_linux(&host).as_deref(), Some("5.15.125-gardenlinux-cloud-amd64-gl-934.11"));
        assert_eq!(garden_linux(&facts("5.15.125", "", "ID=debian\nVERSION_ID=12\n")), None);
    }

    #[test]
    fn a_plain_host_has_just_its_release() {
        assert_eq!(
            candidates(&facts("5.14.0-284.11.1.el9_2.x86_64", "#1 SMP", "ID=rhel\n")),
            ["5.14.0-284.11.1.el9_2.x86_64"]
        );
    }
}
