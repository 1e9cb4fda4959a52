//! `probe-bench durability`: what making files durable costs, per file and
//! in groups, on the file system under DIR. Each strategy writes the same
//! files (as the store does: to a temporary name, then renamed into one
//! directory) and leaves every file durable, surviving a power cut, before
//! it counts it done:
//!
//! - `per-file`: the store today, one file at a time: write, fsync the
//!   file, rename, fsync the directory.
//! - `per-file, 32 in flight`: the same on 32 threads at once, as the
//!   store overlaps the commits of an upload (up to 32 pending).
//! - `group of N, fsync each`: write N files, fsync each, rename all,
//!   fsync the directory once.
//! - `group of N, syncfs`: write N files, one `syncfs` of the whole file
//!   system, rename all, fsync the directory once.
//!
//! Prints one line per strategy: files/s and MB/s.

use std::fs::{self, File};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Writes `files` copies of the content into the directory, durably, in
/// groups of the given size where the strategy groups.
type Strategy = fn(&Path, usize, &[u8], usize);

pub fn run(dir: &Path, files: usize, size: usize, group: usize) {
    let content: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
    let strategies: [(&str, Strategy); 4] = [
        ("per-file", per_file),
        ("per-file, 32 in flight", per_file_parallel),
        ("group, fsync each", group_fsync_each),
        ("group, syncfs", group_syncfs),
    ];
    for (name, strategy) in strategies {
        let target = dir.join("durability");
        let _ = fs::remove_dir_all(&target);
        fs::create_dir_all(target.join("tmp")).unwrap();
        fs::create_dir_all(target.join("final")).unwrap();
        sync_dir(&target);
        let started = Instant::now();
        strategy(&target, files, &content, group);
        let seconds = started.elapsed().as_secs_f64();
        let label = if name.starts_with("group") { format!("{name} (groups of {group})") } else { name.to_owned() };
        println!(
            "{label}: {files} files of {size} bytes in {seconds:.2} s, {:.0} files/s, {:.0} MB/s",
            files as f64 / seconds,
            (files * size) as f64 / seconds / 1e6
        );
        fs::remove_dir_all(&target).unwrap();
    }
}

fn paths(dir: &Path, i: usize) -> (PathBuf, PathBuf) {
    (dir.join("tmp").join(format!("{i}.part")), dir.join("final").join(format!("probe-{i}.o.gz")))
}

fn write(path: &Path, content: &[u8]) -> File {
    let mut file = File::create(path).unwrap();
    file.write_all(content).unwrap();
    file
}

fn sync_dir(dir: &Path) {
    File::open(dir).unwrap().sync_all().unwrap();
}

fn commit_one(dir: &Path, i: usize, content: &[u8]) {
    let (temp, done) = paths(dir, i);
    write(&temp, content).sync_all().unwrap();
    fs::rename(&temp, &done).unwrap();
    sync_dir(&dir.join("final"));
}

fn per_file(dir: &Path, files: usize, content: &[u8], _: usize) {
    for i in 0..files {
        commit_one(dir, i, content);
    }
}

fn per_file_parallel(dir: &Path, files: usize, content: &[u8], _: usize) {
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..32 {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= files {
                        break;
                    }
                    commit_one(dir, i, content);
                }
            });
        }
    });
}

fn group_fsync_each(dir: &Path, files: usize, content: &[u8], group: usize) {
    for start in (0..files).step_by(group) {
        let batch: Vec<usize> = (start..files.min(start + group)).collect();
        let written: Vec<File> = batch.iter().map(|&i| write(&paths(dir, i).0, content)).collect();
        for file in &written {
            file.sync_all().unwrap();
        }
        for &i in &batch {
            let (temp, done) = paths(dir, i);
            fs::rename(temp, done).unwrap();
        }
        sync_dir(&dir.join("final"));
    }
}

fn group_syncfs(dir: &Path, files: usize, content: &[u8], group: usize) {
    for start in (0..files).step_by(group) {
        let batch: Vec<usize> = (start..files.min(start + group)).collect();
        for &i in &batch {
            write(&paths(dir, i).0, content);
        }
        let handle = File::open(dir).unwrap();
        // SAFETY: a valid open descriptor.
        assert_eq!(unsafe { libc::syncfs(handle.as_raw_fd()) }, 0, "syncfs failed");
        for &i in &batch {
            let (temp, done) = paths(dir, i);
            fs::rename(temp, done).unwrap();
        }
        sync_dir(&dir.join("final"));
    }
}
