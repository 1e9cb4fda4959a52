//! The appender against a model of its pack: records of every size around
//! its buffer, written in pieces, given up last or in the middle, and
//! patched (as headers and stamps are) before and after their pages were
//! written out and let go; the pack must read back as the model says.

use std::sync::Arc;

use super::super::appender::{Appended, Appenders};
use super::super::faults::Faults;
use super::super::packs::{Packs, pack_path};

const MIB: usize = 1 << 20;

struct Fixture {
    _dir: tempfile::TempDir,
    packs: Arc<Packs>,
    appenders: Appenders,
    /// What the pack must hold, up to the appender's end.
    model: Vec<u8>,
}

fn fixture() -> Fixture {
    fixture_sealing_at(1 << 40)
}

fn fixture_sealing_at(pack_len: u64) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let packs = Arc::new(Packs::new(dir.path().to_path_buf(), Arc::new(Faults::default()), pack_len));
    let appenders = Appenders::new(packs.clone(), 1);
    Fixture { _dir: dir, packs, appenders, model: Vec::new() }
}

fn bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed)).collect()
}

impl Fixture {
    /// Appends a record of `head`, `len` bytes in pieces of `piece`, and
    /// an 11-byte tail.
    fn record(&mut self, len: usize, piece: usize, seed: u8) -> Appended {
        let head = bytes(100, seed ^ 0x55);
        let appending = self.appenders.begin(&head).unwrap().expect("the appender is free");
        assert_eq!(appending.start, self.model.len() as u64, "records follow each other");
        assert!(self.appenders.begin(b"x").unwrap().is_none(), "one record at a time");
        let body = bytes(len, seed);
        for chunk in body.chunks(piece) {
            appending.write(chunk).unwrap();
        }
        let tail = bytes(11, seed ^ 0xAA);
        let appended = appending.finish(&tail).unwrap();
        self.model.extend_from_slice(&head);
        self.model.extend_from_slice(&body);
        self.model.extend_from_slice(&tail);
        assert_eq!(appended.end, self.model.len() as u64);
        appended
    }

    fn patch(&mut self, offset: usize, seed: u8) {
        let patch = bytes(12, seed);
        self.appenders.write_at(1, offset as u64, &patch).unwrap();
        self.model[offset..offset + 12].copy_from_slice(&patch);
    }

    /// The pack as written out, up to the model's end.
    fn on_disk(&self) -> Vec<u8> {
        self.appenders.write_out(1).unwrap();
        let mut read = std::fs::read(pack_path(&self.packs.dir, 1)).unwrap();
        assert!(read.len() >= self.model.len(), "{} bytes on disk, {} appended", read.len(), self.model.len());
        read.truncate(self.model.len());
        read
    }
}

#[test]
fn records_of_any_size_follow_each_other_and_read_back_with_their_patches() {
    let mut f = fixture();
    let small = f.record(5_000, 700, 1);
    // Patched while its page is still buffered, and after a write-out.
    f.patch(40, 2);
    assert_eq!(f.on_disk(), f.model);
    f.patch(60, 3);
    small.committed();
    // Larger than the buffer: its first pages are let go before its end.
    let large_start = f.model.len();
    let large = f.record(9 * MIB + 123, MIB, 4);
    f.patch(large_start + 20, 5);
    large.committed();
    // Around the buffer's size, in pieces that do not divide it.
    for (n, len) in [4 * MIB - 150, 4 * MIB, 2 * MIB + 1, 130_000, 1].into_iter().enumerate() {
        let start = f.model.len();
        let record = f.record(len, 64 * 1024 + 7, 10 + n as u8);
        f.patch(start + 72, 20 + n as u8);
        record.committed();
    }
    // Patched after being let go: through the page cache.
    f.patch(30, 6);
    assert_eq!(f.on_disk(), f.model);
}

#[test]
fn a_record_given_up_last_is_cut_off_and_one_in_the_middle_stays() {
    let mut f = fixture();
    let first = f.record(3_000, 1_000, 1);
    first.committed();
    let end = f.model.len();
    // Given up last, also once written out: the next record takes its place.
    let given_up = f.record(6 * MIB, MIB, 2);
    drop(given_up);
    f.model.truncate(end);
    let kept_end = f.model.len();
    let middle = f.record(10_000, 4_000, 3);
    let after = f.record(20_000, 4_000, 4);
    // Given up with a record after it: its bytes stay, whole.
    drop(middle);
    after.committed();
    assert_eq!(f.on_disk(), f.model);
    assert!(f.model.len() > kept_end);
    // Given up before its end: cut off, the next record where it began.
    let head = bytes(100, 9);
    let appending = f.appenders.begin(&head).unwrap().unwrap();
    appending.write(&bytes(5 * MIB, 9)).unwrap();
    drop(appending);
    let last = f.record(1_000, 100, 5);
    last.committed();
    assert_eq!(f.on_disk(), f.model);
}

#[test]
fn a_full_pack_is_written_out_and_ends_at_its_last_record_and_the_next_starts_anew() {
    let mut f = fixture_sealing_at(MIB as u64);
    let records: Vec<_> = (0..4).map(|n| f.record(300_000, 65_536, n)).collect();
    records.into_iter().for_each(Appended::committed);
    // Past the target: the next record starts pack 2.
    let head = bytes(100, 7);
    let next = f.appenders.begin(&head).unwrap().unwrap();
    assert_eq!((next.pack, next.start), (2, 0));
    let first_pack = std::fs::read(pack_path(&f.packs.dir, 1)).unwrap();
    assert_eq!(first_pack, f.model, "pack 1 holds its records and nothing after");
    drop(next);
}

#[test]
fn a_record_still_open_when_the_store_closes_is_cut_off() {
    let mut f = fixture();
    f.record(3_000, 1_000, 1).committed();
    // Past the buffer, so part of it is written out already.
    let appending = f.appenders.begin(&bytes(100, 2)).unwrap().unwrap();
    appending.write(&bytes(5 * MIB, 2)).unwrap();
    let Fixture { _dir, packs, appenders, model } = f;
    drop(appenders);
    assert_eq!(std::fs::read(pack_path(&packs.dir, 1)).unwrap(), model, "the pack ends at its last whole record");
    // The upload's end comes later, and finds the pack given back.
    drop(appending);
    assert_eq!(std::fs::read(pack_path(&packs.dir, 1)).unwrap(), model);
}
