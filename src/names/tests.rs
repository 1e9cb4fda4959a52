//! The naming rules against the valid and invalid examples of the
//! product's packages.

use super::*;

#[test]
fn module_versions_from_the_reference_are_judged_right() {
    let hex64 = "1123dde0458e72a49880b06922e135dbcd36fb784fed530ab84ddfa8924e5c05";
    for valid in ["2.5.0", "0.0.0", "10.5.155", "2.5.0-rc1", "2.5.0-rc12", hex64] {
        assert!(ModuleVersion::parse(valid).is_ok(), "{valid} should be valid");
    }
    let hex63 = &hex64[..63];
    let hex65 = format!("{hex64}0");
    let upper = hex64.to_uppercase();
    let non_hex = format!("{}g", &hex64[..63]);
    for invalid in [
        "",
        "0.0",
        ".2.3",
        "2.3.",
        "10.5.155.123",
        "latest",
        hex63,
        &hex65,
        &upper,
        &non_hex,
        "2.5.0-rc",
        "2.5.0-rcx",
        "2.5.0-beta1",
        "2.\u{0665}.0", // ARABIC-INDIC DIGIT FIVE: a Unicode digit
        "2.5.0/..",
    ] {
        assert!(ModuleVersion::parse(invalid).is_err(), "{invalid:?} should be invalid");
    }
}

#[test]
fn probe_file_names_from_the_reference_are_judged_right() {
    for (valid, kind, release) in [
        ("collector-ebpf-5.14.0-284.11.1.el9_2.x86_64.o.gz", ProbeKind::Ebpf, "5.14.0-284.11.1.el9_2.x86_64"),
        ("collector-4.9.24-coreos.ko.gz", ProbeKind::KernelModule, "4.9.24-coreos"),
        ("collector-10.1.ko.gz", ProbeKind::KernelModule, "10.1"),
        // As the product's rule: any one character after the first dot.
        ("collector-5...ko.gz", ProbeKind::KernelModule, "5.."),
        ("collector-ebpf-5.4.0-1.el8~20.04+1.o.gz", ProbeKind::Ebpf, "5.4.0-1.el8~20.04+1"),
    ] {
        let name = ProbeFileName::parse(valid).unwrap();
        assert_eq!(name.kind(), kind);
        assert_eq!(name.kernel_release(), release);
    }
    for invalid in [
        "collector-4.9.24-coreos.o.gz",
        "collector-ebpf-4.9.24-coreos.ko.gz",
        "collector-ebpf-4.9.24.o",
        "collector-4.9.24.ko",
        "collector.ko.gz",
        "collector-.ko.gz",
        "collector-5..ko.gz",
        "collector-ebpf-5..o.gz",
        "collector-ebpf-.o.gz",
        "/collector-4.9.24.ko.gz",
        "collector-4/9.ko.gz",
        "collector-x4.9.ko.gz",
        "collector-49.ko.gz",
        "collector-4.9 x.ko.gz",
        "collector-\u{0664}.9.ko.gz",
        "collector-4.9\\a.ko.gz",
    ] {
        assert!(ProbeFileName::parse(invalid).is_err(), "{invalid:?} should be invalid");
    }
    let long = format!("collector-4.{}.ko.gz", "1".repeat(250));
    assert!(ProbeFileName::parse(&long).is_err());
}

#[test]
fn every_component_and_the_whole_path_are_bounded() {
    let long_version = format!("{}.0.0", "1".repeat(MAX_MODULE_VERSION_LEN));
    assert!(ModuleVersion::parse(&long_version).is_err());
    assert!(ModuleVersion::parse(&format!("{}.0.0", "1".repeat(MAX_MODULE_VERSION_LEN - 4))).is_ok());
    let longest_name = format!("collector-4.{}.ko.gz", "1".repeat(MAX_FILE_NAME_LEN - 18));
    assert_eq!(longest_name.len(), MAX_FILE_NAME_LEN);
    let longest_version = "1".repeat(MAX_MODULE_VERSION_LEN - 4) + ".0.0";
    let longest = ProbePath::parse(&format!("{longest_version}/{longest_name}")).unwrap();
    assert!(longest.to_string().len() <= MAX_PATH_LEN);
    let too_long = format!("{}/{}", long_version, "x".repeat(MAX_PATH_LEN));
    assert!(ProbePath::parse(&too_long).unwrap_err().to_string().contains("longer than 512 bytes"));
}

#[test]
fn paths_order_as_their_strings() {
    let mut paths: Vec<&str> = vec![
        "2.5.0/collector-ebpf-5.4.0.o.gz",
        "2.5.0-rc1/collector-ebpf-5.4.0.o.gz",
        "2.5.0/collector-5.4.0.ko.gz",
        "2.10.0/collector-5.4.0.ko.gz",
        "2.5.1/collector-5.4.0.ko.gz",
        "1123dde0458e72a49880b06922e135dbcd36fb784fed530ab84ddfa8924e5c05/collector-4.9.24-coreos.ko.gz",
    ];
    let mut parsed: Vec<ProbePath> = paths.iter().map(|p| ProbePath::parse(p).unwrap()).collect();
    parsed.sort();
    paths.sort();
    assert_eq!(parsed.iter().map(|p| p.to_string()).collect::<Vec<_>>(), paths);
    let position = |prefix: &str| paths.iter().position(|p| p.starts_with(prefix)).unwrap();
    assert!(position("2.5.0-rc1/") < position("2.5.0/"));

    // Module versions order as their paths do.
    let mut versions: Vec<ModuleVersion> = parsed.iter().map(|p| p.module_version().clone()).collect();
    versions.sort();
    versions.dedup();
    let mut in_path_order: Vec<ModuleVersion> = Vec::new();
    for path in &parsed {
        if in_path_order.last() != Some(path.module_version()) {
            in_path_order.push(path.module_version().clone());
        }
    }
    assert_eq!(versions, in_path_order);
    assert!(ModuleVersion::parse("2.5.0-rc1").unwrap() < ModuleVersion::parse("2.5.0").unwrap());
}

#[test]
fn probe_paths_are_exactly_two_components() {
    for valid in [
        "2.5.0/collector-ebpf-5.14.0-284.11.1.el9_2.x86_64.o.gz",
        "1123dde0458e72a49880b06922e135dbcd36fb784fed530ab84ddfa8924e5c05/collector-4.9.24-coreos.ko.gz",
    ] {
        let path = ProbePath::parse(valid).unwrap();
        assert_eq!(path.to_string(), valid);
    }
    for invalid in [
        "/2.5.0/collector-4.9.24.ko.gz",
        "2.5.0/collector-4.9.24.ko.gz/",
        "2.5.0//collector-4.9.24.ko.gz",
        "2.5.0/x/collector-4.9.24.ko.gz",
        "../collector-4.9.24.ko.gz",
        "collector-4.9.24.ko.gz",
        "2.5.0/",
        "",
    ] {
        assert!(ProbePath::parse(invalid).is_err(), "{invalid:?} should be invalid");
    }
}

#[test]
fn package_entries_are_classified() {
    let probe = "kernel-modules/2.5.0/collector-ebpf-5.4.0.o.gz";
    assert_eq!(
        classify_package_entry(probe),
        PackageEntry::Probe(ProbePath::parse("2.5.0/collector-ebpf-5.4.0.o.gz").unwrap())
    );
    assert_eq!(
        classify_package_entry("kernel-modules/2.5.0/collector-ebpf-5.4.0.o.gz.minisig"),
        PackageEntry::Signature(ProbePath::parse("2.5.0/collector-ebpf-5.4.0.o.gz").unwrap())
    );
    assert!(matches!(classify_package_entry("kernel-modules/2.5.0/notes.txt.minisig"), PackageEntry::Unrecognised(_)));
    for ignored in [
        "kernel-modules/",
        "kernel-modules/2.5.0/",
        "kernel-modules/2.5.0/LICENSE",
        "README.md",
        "other/2.5.0/collector-5.4.0.ko.gz",
    ] {
        assert_eq!(classify_package_entry(ignored), PackageEntry::Ignored, "{ignored}");
    }
    for odd in [
        "kernel-modules/2.5.0/notes.txt",
        "kernel-modules/2.5.0/collector-4.9.24-coreos.o.gz",
        "kernel-modules/../2.5.0/collector-5.4.0.ko.gz",
        "kernel-modules/2.5.0/sub/collector-5.4.0.ko.gz",
    ] {
        assert!(matches!(classify_package_entry(odd), PackageEntry::Unrecognised(_)), "{odd}");
    }
}
