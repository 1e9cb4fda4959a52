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
//! - `per-file, direct I/O, 32 in flight`: the same, the file's whole
//!   4 KiB blocks written with `O_DIRECT` (no copy into the page cache),
//!   its last partial block through the page cache. Measured only: the
//!   store writes through the page cache (see BENCHMARKS.md).
//! - `group of N, fsync each`: write N files, fsync each, rename all,
//!   fsync the directory once.
//! - `group of N, syncfs`: write N files, one `syncfs` of the whole file
//!   system, rename all, fsync the directory once.
//!
//! Prints one line per strategy: files/s, MB/s and the process's CPU
//! seconds. Each strategy writes into a directory of its own and all are
//! removed at the end: on a file system without a journal, ext4 skips the
//! inodes freed in the last minute when it allocates new ones, which would
//! charge one strategy for the files of the one before.

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
    let strategies: [(&str, Strategy); 5] = [
        ("per-file", per_file),
        ("per-file, 32 in flight", per_file_parallel),
        ("per-file, direct I/O, 32 in flight", per_file_direct_parallel),
        ("group, fsync each", group_fsync_each),
        ("group, syncfs", group_syncfs),
    ];
    let mut targets = Vec::new();
    for (n, (name, strategy)) in strategies.into_iter().enumerate() {
        let target = dir.join(format!("durability-{n}"));
        let _ = fs::remove_dir_all(&target);
        fs::create_dir_all(target.join("tmp")).unwrap();
        fs::create_dir_all(target.join("final")).unwrap();
        sync_dir(&target);
        let cpu = cpu_seconds();
        let started = Instant::now();
        strategy(&target, files, &content, group);
        let seconds = started.elapsed().as_secs_f64();
        let cpu = cpu_seconds() - cpu;
        let label = if name.starts_with("group") { format!("{name} (groups of {group})") } else { name.to_owned() };
        println!(
            "{label}: {files} files of {size} bytes in {seconds:.2} s, {:.0} files/s, {:.0} MB/s, {cpu:.2} CPU s",
            files as f64 / seconds,
            (files * size) as f64 / seconds / 1e6
        );
        targets.push(target);
    }
    for target in targets {
        fs::remove_dir_all(&target).unwrap();
    }
}

/// User and system CPU seconds of this process so far.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the zeroed struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) }, 0);
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
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
    in_parallel(files, |i| commit_one(dir, i, content));
}

fn per_file_direct_parallel(dir: &Path, files: usize, content: &[u8], _: usize) {
    let aligned = AlignedCopy::of(content);
    in_parallel(files, |i| {
        let (temp, done) = paths(dir, i);
        write_direct(&temp, aligned.bytes()).sync_all().unwrap();
        fs::rename(&temp, &done).unwrap();
        sync_dir(&dir.join("final"));
    });
}

/// Bytes at a 4 KiB-aligned address, as `O_DIRECT` needs them.
struct AlignedCopy {
    pointer: *mut u8,
    len: usize,
    layout: std::alloc::Layout,
}

// SAFETY: the copy is only read once made.
unsafe impl Sync for AlignedCopy {}

impl AlignedCopy {
    fn of(content: &[u8]) -> AlignedCopy {
        let layout = std::alloc::Layout::from_size_align(content.len().max(1), DIRECT_BLOCK).unwrap();
        // SAFETY: a non-zero size; freed on drop with the same layout.
        let pointer = unsafe { std::alloc::alloc(layout) };
        assert!(!pointer.is_null());
        // SAFETY: `pointer` holds `content.len()` bytes.
        unsafe { std::ptr::copy_nonoverlapping(content.as_ptr(), pointer, content.len()) };
        AlignedCopy { pointer, len: content.len(), layout }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: initialised in `of`.
        unsafe { std::slice::from_raw_parts(self.pointer, self.len) }
    }
}

impl Drop for AlignedCopy {
    fn drop(&mut self) {
        // SAFETY: allocated in `of` with this layout.
        unsafe { std::alloc::dealloc(self.pointer, self.layout) };
    }
}

const DIRECT_BLOCK: usize = 4096;

/// Writes the (aligned) content's whole blocks with `O_DIRECT`, then the
/// rest through the page cache.
fn write_direct(path: &Path, aligned: &[u8]) -> File {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let file =
        fs::OpenOptions::new().write(true).create(true).truncate(true).custom_flags(libc::O_DIRECT).open(path).unwrap();
    let whole = aligned.len() / DIRECT_BLOCK * DIRECT_BLOCK;
    file.write_all_at(&aligned[..whole], 0).unwrap();
    // SAFETY: a valid descriptor; clears O_DIRECT for the unaligned tail.
    unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, 0) };
    file.write_all_at(&aligned[whole..], whole as u64).unwrap();
    file
}

fn in_parallel(files: usize, commit: impl Fn(usize) + Sync) {
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..32 {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= files {
                        break;
                    }
                    commit(i);
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
