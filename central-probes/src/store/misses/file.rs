//! The misses of a Central with a data directory, kept in `misses.tsv`
//! there: a line per miss, rewritten whole (temporary file, fsync, rename)
//! at each change, which comes at most once a second. It is bounded by
//! `MAX_MISSES`, so a rewrite is small.
//!
//! A line: path, requests, first seen, last seen, resolved at (or `-`),
//! resolved by (or `-`), and the distinct clients as comma-separated hex,
//! tab-separated. A line that does not parse is skipped with a warning:
//! misses are a diagnosis, and a damaged file must not keep Central down.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use probe_api::names::ProbePath;
use tracing::warn;

use super::{Miss, MissLog, MissTable, Resolved, Resolver};
use crate::error::{Error, Result};
use crate::store::client_id::ClientId;

const FILE: &str = "misses.tsv";
const HEADER: &str = "# kprobes misses v1: path requests first_seen last_seen resolved_at resolved_by clients";

pub struct FileMissLog {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    table: Mutex<MissTable>,
}

impl FileMissLog {
    /// The misses kept in `data_dir`, none if it has no misses file yet.
    pub fn open(data_dir: &Path) -> Result<Self> {
        let path = data_dir.join(FILE);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
        };
        let misses = text.lines().filter(|line| !line.starts_with('#') && !line.is_empty()).filter_map(|line| {
            let miss = parse_line(line);
            if miss.is_none() {
                warn!(file = %path.display(), line, "skipping a damaged line of the misses file");
            }
            miss
        });
        let table = Mutex::new(MissTable::from_misses(misses.collect::<Vec<_>>()));
        Ok(FileMissLog { inner: Arc::new(Inner { table, path }) })
    }

    /// Runs `change` on the table, then saves it if `change` says so, on a
    /// blocking thread (the save fsyncs).
    async fn change(&self, change: impl FnOnce(&mut MissTable) -> bool + Send + 'static) -> Result<()> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let mut table = inner.table.lock().expect("not poisoned");
            if change(&mut table) { inner.save(&table) } else { Ok(()) }
        })
        .await
        .map_err(|e| Error::internal(format!("recording misses: {e}")))?
    }
}

impl Inner {
    /// Writes the table, under its lock so that writes keep their order.
    fn save(&self, table: &MissTable) -> Result<()> {
        let mut text = format!("{HEADER}\n");
        for miss in table.list() {
            text.push_str(&format_line(&miss));
            text.push('\n');
        }
        crate::private_file::replace(&self.path, text.as_bytes())
            .map_err(|e| Error::io(format!("writing {}", self.path.display()), e))
    }
}

#[tonic::async_trait]
impl MissLog for FileMissLog {
    async fn record(&self, seen: Vec<Miss>) -> Result<()> {
        self.change(move |table| {
            table.record(seen);
            true
        })
        .await
    }

    async fn resolve(&self, paths: &[ProbePath], resolved: Resolved) -> Result<()> {
        let paths = paths.to_vec();
        self.change(move |table| table.resolve(&paths, resolved)).await
    }

    async fn list(&self) -> Result<Vec<Miss>> {
        Ok(self.inner.table.lock().expect("not poisoned").list())
    }
}

fn format_line(miss: &Miss) -> String {
    let (at, by) = match miss.resolved {
        Some(resolved) => (resolved.at.to_string(), resolved.by.as_str()),
        None => ("-".to_owned(), "-"),
    };
    let mut clients = String::new();
    for (i, client) in miss.clients.iter().enumerate() {
        let separator = if i == 0 { "" } else { "," };
        let _ = write!(clients, "{separator}{:016x}", client.0);
    }
    format!("{}\t{}\t{}\t{}\t{at}\t{by}\t{clients}", miss.path, miss.requests, miss.first_seen, miss.last_seen)
}

fn parse_line(line: &str) -> Option<Miss> {
    let fields: Vec<&str> = line.split('\t').collect();
    let [path, requests, first_seen, last_seen, at, by, clients] = fields[..] else { return None };
    let resolved = match (at, by) {
        ("-", "-") => None,
        (at, by) => Some(Resolved { at: at.parse().ok()?, by: Resolver::parse(by)? }),
    };
    let clients = match clients {
        "" => BTreeSet::new(),
        list => list.split(',').map(|c| u64::from_str_radix(c, 16).ok().map(ClientId)).collect::<Option<_>>()?,
    };
    Some(Miss {
        path: ProbePath::parse(path).ok()?,
        requests: requests.parse().ok()?,
        clients,
        first_seen: first_seen.parse().ok()?,
        last_seen: last_seen.parse().ok()?,
        resolved,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn misses_survive_a_reopen_and_damaged_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let log = FileMissLog::open(dir.path()).unwrap();
        let path = |i: usize| ProbePath::parse(&format!("2.5.0/collector-ebpf-6.{i}.0.o.gz")).unwrap();
        let miss = |i: usize| Miss {
            path: path(i),
            requests: 3,
            clients: BTreeSet::from([ClientId(7), ClientId(u64::MAX)]),
            first_seen: 100,
            last_seen: 100 + i as u64,
            resolved: None,
        };
        log.record(vec![miss(1), miss(2)]).await.unwrap();
        let resolved = Resolved { at: 200, by: Resolver::Upstream };
        log.resolve(&[path(1)], resolved).await.unwrap();
        let before = log.list().await.unwrap();

        let reopened = FileMissLog::open(dir.path()).unwrap();
        assert_eq!(reopened.list().await.unwrap(), before);
        assert_eq!(before.len(), 2);
        assert_eq!(before[1].resolved, Some(resolved));

        let file = dir.path().join(FILE);
        let text = fs::read_to_string(&file).unwrap();
        fs::write(&file, format!("{text}not a miss\n2.5.0/x\t1\n")).unwrap();
        assert_eq!(FileMissLog::open(dir.path()).unwrap().list().await.unwrap(), before);
    }
}
