//! `central-probes coverage`: before a kernel rollout, which probe each
//! node would be served and from where, asked of Central (CheckCoverage);
//! exit status 1 when a node would crash-loop, 2 when the check could not
//! be made. `--prefetch` has Central fetch and keep what only its
//! upstream has.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::Args;
use probe_api::errors::remote_text;
use probe_api::names::ProbeFileName;
use probe_api::v1::{CheckCoverageRequest, CheckCoverageResponse, CoverageNode, CoverageSource, NodeFacts};

use super::upload::Endpoint;
use super::{CliError, Incomplete, OutputFormat};

#[derive(Args)]
#[command(after_help = super::ENDPOINT_ENV)]
pub struct CoverageArgs {
    #[command(flatten)]
    endpoint: Endpoint,
    /// The Collector's module version (its image's MODULE_VERSION.txt).
    #[arg(long)]
    module_version: String,
    /// The nodes, a line each: the JSON line of `collector-client facts -o
    /// json` (its candidates are used), or a kernel release (`uname -r`;
    /// Central derives its candidates); blank lines and `#` lines are skipped.
    #[arg(long, value_name = "FILE")]
    nodes: PathBuf,
    /// The Collector image's built-in probe directory (or a copy): its
    /// probe files count as the first source.
    #[arg(long, value_name = "DIR", conflicts_with = "builtin")]
    builtin_dir: Option<PathBuf>,
    /// Instead of --builtin-dir: a file naming the built-in probe files, one
    /// a line (`ls` of the directory).
    #[arg(long, value_name = "FILE-LIST")]
    builtin: Option<PathBuf>,
    /// Have Central fetch now, and keep like an upload, every probe a node
    /// would get from its upstream (needs an admin token).
    #[arg(long)]
    prefetch: bool,
    /// `text` (nodes grouped by outcome), or `json` (one object:
    /// docs/operations.md, "Machine-readable output").
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    output: OutputFormat,
}

/// A node as read from its line, and how to name it.
struct Node {
    line: usize,
    kernel: String,
    hostname: Option<String>,
    request: CoverageNode,
}

/// The API's source as the CLI and its JSON name it.
fn source_name(source: CoverageSource) -> &'static str {
    match source {
        CoverageSource::Builtin => "builtin",
        CoverageSource::Uploaded => "uploaded",
        CoverageSource::UpstreamCache => "upstream-cache",
        CoverageSource::Upstream => "upstream",
        CoverageSource::None | CoverageSource::Unspecified => "none",
    }
}

/// What each source means for the rollout, in the table's order.
const GROUPS: [(CoverageSource, &str); 5] = [
    (CoverageSource::None, "no probe: these nodes would crash-loop"),
    (CoverageSource::Upstream, "from the upstream: served while it is reachable (--prefetch keeps them)"),
    (CoverageSource::UpstreamCache, "from Central's upstream cache: served while cached (--prefetch keeps them)"),
    (CoverageSource::Uploaded, "uploaded to Central"),
    (CoverageSource::Builtin, "built into the Collector image"),
];

pub async fn coverage(args: CoverageArgs) -> Result<(), CliError> {
    let nodes = read_nodes(&args.nodes)?;
    let builtin_files = match (&args.builtin_dir, &args.builtin) {
        (Some(dir), _) => builtin_in(dir)?,
        (None, Some(list)) => builtin_listed(list)?,
        (None, None) => Vec::new(),
    };
    let request = CheckCoverageRequest {
        module_version: args.module_version.clone(),
        nodes: nodes.iter().map(|node| node.request.clone()).collect(),
        builtin_files,
        prefetch: args.prefetch,
    };
    let mut client = args.endpoint.connect()?;
    let response = args.endpoint.call("checking coverage", client.check_coverage(request)).await?;
    if response.nodes.len() != nodes.len() {
        return Err(format!("Central answered for {} of {} nodes", response.nodes.len(), nodes.len()).into());
    }
    let crash_loops = response.nodes.iter().filter(|n| n.source() == CoverageSource::None).count();
    match args.output {
        OutputFormat::Json => println!("{}", report_json(&args.module_version, &nodes, &response)),
        OutputFormat::Text => print_table(&args.module_version, &nodes, &response),
    }
    if crash_loops > 0 {
        return Err(Box::new(Incomplete {
            status: 1,
            message: format!("{crash_loops} of {} nodes would crash-loop: no source has their probe", nodes.len()),
        }));
    }
    Ok(())
}

/// The nodes of `file`; a line that is neither a facts object nor a
/// kernel release stops everything, named.
fn read_nodes(file: &Path) -> Result<Vec<Node>, CliError> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("reading --nodes {}: {e}", file.display()))?;
    let mut nodes = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let node = node_of(line, index + 1).map_err(|why| {
            format!(
                "{}:{}: {why}; each line is a JSON line of `collector-client facts -o json` or a kernel release \
                 (uname -r). Nothing was asked",
                file.display(),
                index + 1
            )
        })?;
        nodes.extend(node);
    }
    if nodes.is_empty() {
        return Err(format!("{} names no node: write a kernel release or a facts line per node", file.display()).into());
    }
    Ok(nodes)
}

/// One line's node; `None` for a CORE_BPF node, which needs no probe.
fn node_of(line: &str, number: usize) -> Result<Option<Node>, String> {
    if !line.starts_with('{') {
        ProbeFileName::ebpf(line).map_err(|e| format!("{line:?} is not a kernel release: {e}"))?;
        let facts = NodeFacts { kernel: line.to_owned(), ..Default::default() };
        let request = CoverageNode { candidates: Vec::new(), facts: Some(facts) };
        return Ok(Some(Node { line: number, kernel: line.to_owned(), hostname: None, request }));
    }
    let value: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("not valid JSON: {e}"))?;
    let text = |key: &str| value.get(key).and_then(serde_json::Value::as_str).map(str::to_owned);
    if text("collection_method").as_deref() == Some("CORE_BPF") {
        eprintln!("line {number}: collection method CORE_BPF: its probe is built into the Collector; not asked");
        return Ok(None);
    }
    let candidates: Vec<String> = match value.get("candidates") {
        None | Some(serde_json::Value::Null) => Vec::new(),
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .map(|c| c.as_str().map(str::to_owned).ok_or("\"candidates\" holds a value that is not a string"))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err("\"candidates\" is not an array of names".into()),
    };
    let kernel = text("kernel").or_else(|| candidates.first().cloned());
    let kernel = kernel.ok_or("a JSON line without \"kernel\" or \"candidates\"")?;
    let os_release = value.get("os_release").and_then(serde_json::Value::as_object);
    let facts = NodeFacts {
        kernel: kernel.clone(),
        uname_v: text("uname_v").unwrap_or_default(),
        os_release: os_release
            .into_iter()
            .flatten()
            .filter_map(|(key, value)| Some((key.clone(), value.as_str()?.to_owned())))
            .collect(),
        hostname: text("hostname").unwrap_or_default(),
        etc_version: text("etc_version").unwrap_or_default(),
    };
    let request = CoverageNode { candidates, facts: Some(facts) };
    Ok(Some(Node { line: number, kernel, hostname: text("hostname"), request }))
}

/// The probe files of a built-in directory (gzip'd or not).
fn builtin_in(dir: &Path) -> Result<Vec<String>, CliError> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("reading --builtin-dir {}: {e}", dir.display()))?;
    let mut names = Vec::new();
    for entry in entries {
        let name = entry.map_err(|e| format!("reading --builtin-dir {}: {e}", dir.display()))?.file_name();
        let name = name.to_string_lossy();
        let gzipped = if name.ends_with(".gz") { name.to_string() } else { format!("{name}.gz") };
        if ProbeFileName::parse(&gzipped).is_ok() {
            names.push(name.into_owned());
        }
    }
    Ok(names)
}

/// The file names of a --builtin list (paths are cut to their last part).
fn builtin_listed(list: &Path) -> Result<Vec<String>, CliError> {
    let text = std::fs::read_to_string(list).map_err(|e| format!("reading --builtin {}: {e}", list.display()))?;
    let names = text.lines().map(str::trim).filter(|line| !line.is_empty());
    Ok(names.map(|line| line.rsplit('/').next().unwrap_or(line).to_owned()).collect())
}

/// The probe files to upload: the first candidate of each node that would
/// crash-loop (any of its candidates would do), by path.
fn to_upload(module_version: &str, response: &CheckCoverageResponse) -> BTreeMap<String, Vec<String>> {
    let mut files = BTreeMap::new();
    for node in response.nodes.iter().filter(|n| n.source() == CoverageSource::None) {
        let Some(first) = node.candidates.first() else { continue };
        let others = node.candidates[1..].iter().map(|c| format!("collector-ebpf-{c}.o.gz"));
        files.entry(path_of(module_version, first)).or_insert_with(|| others.collect());
    }
    files
}

fn report_json(module_version: &str, nodes: &[Node], response: &CheckCoverageResponse) -> serde_json::Value {
    let listed: Vec<serde_json::Value> = nodes
        .iter()
        .zip(&response.nodes)
        .map(|(node, answer)| {
            serde_json::json!({
                "line": node.line,
                "kernel": node.kernel,
                "hostname": node.hostname,
                "candidates": answer.candidates,
                "candidate": (!answer.candidate.is_empty()).then_some(&answer.candidate),
                "path": (!answer.candidate.is_empty()).then(|| path_of(module_version, &answer.candidate)),
                "source": source_name(answer.source()),
            })
        })
        .collect();
    let mut counts = serde_json::Map::new();
    for (source, _) in GROUPS {
        let count = response.nodes.iter().filter(|n| n.source() == source).count();
        counts.insert(source_name(source).to_owned(), count.into());
    }
    let failures: Vec<serde_json::Value> = response
        .prefetch_failures
        .iter()
        .map(|f| serde_json::json!({"path": f.path, "reason": remote_text(&f.reason)}))
        .collect();
    serde_json::json!({
        "module_version": module_version,
        "nodes": listed,
        "counts": counts,
        "to_upload": to_upload(module_version, response).into_keys().collect::<Vec<_>>(),
        "upstream_requests": response.upstream_requests,
        "prefetched": response.prefetched,
        "prefetch_failures": failures,
    })
}

/// A candidate's probe path (Central checked the candidate).
fn path_of(module_version: &str, candidate: &str) -> String {
    format!("{module_version}/collector-ebpf-{candidate}.o.gz")
}

fn print_table(module_version: &str, nodes: &[Node], response: &CheckCoverageResponse) {
    let width = nodes.iter().map(|node| node.kernel.len()).max().unwrap_or(0).max(6);
    for (source, meaning) in GROUPS {
        let group: Vec<_> = nodes.iter().zip(&response.nodes).filter(|(_, a)| a.source() == source).collect();
        if group.is_empty() {
            continue;
        }
        println!("{} nodes {meaning}:", group.len());
        for (node, answer) in group {
            let served = match answer.candidate.as_str() {
                "" => format!("tried {}", answer.candidates.join(" ")),
                candidate => format!("collector-ebpf-{candidate}.o.gz"),
            };
            let host = node.hostname.as_deref().map(|h| format!(" ({h})")).unwrap_or_default();
            println!("  line {:<5} {:width$}  {served}{host}", node.line, node.kernel);
        }
    }
    let upload = to_upload(module_version, response);
    if !upload.is_empty() {
        println!(
            "To upload, module version {module_version} (support-pkg-{module_version}-*.zip holds them), {} probes:",
            upload.len()
        );
        for (path, others) in upload {
            let or = if others.is_empty() { String::new() } else { format!(" (or {})", others.join(", ")) };
            println!("  {path}{or}");
        }
    }
    if !response.prefetched.is_empty() {
        println!("Prefetched {} probes, now stored (`ls` marks them prefetched):", response.prefetched.len());
        response.prefetched.iter().for_each(|path| println!("  {path}"));
    }
    for failure in &response.prefetch_failures {
        println!("Not prefetched: {}: {}", failure.path, remote_text(&failure.reason));
    }
    eprintln!("{} nodes checked; {} requests to the upstream", nodes.len(), response.upstream_requests);
}
