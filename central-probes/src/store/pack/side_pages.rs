//! Copies of the pages an appender let go that hold the header of a record
//! still open or not yet decided. Its header or stamp, written later, is
//! patched into the copy and the whole page written through the page
//! cache: a write of a few bytes to a page not cached (it was written
//! direct) makes the kernel read the page back from disk first
//! (BENCHMARKS.md, "Hashing and writing an upload").

use std::collections::BTreeMap;
use std::fs::File;
use std::io;

use super::faults::Faults;
use super::record::HEADER_LEN;

const PAGE: u64 = 4096;

#[derive(Default)]
pub(super) struct SidePages(BTreeMap<u64, Vec<u8>>);

/// The pages the header of the record at `start` lies on.
fn header_pages(start: u64) -> impl Iterator<Item = u64> {
    let (first, last) = (start / PAGE * PAGE, (start + HEADER_LEN - 1) / PAGE * PAGE);
    (first..=last).step_by(PAGE as usize)
}

impl SidePages {
    /// Copies, of the pages from `buffer` (pack offset `at`) up to
    /// `let_go_to` (a page boundary), those holding a header of `starts`.
    pub(super) fn keep(&mut self, buffer: &[u8], at: u64, let_go_to: u64, starts: impl Iterator<Item = u64>) {
        for page in starts.flat_map(header_pages).filter(|&page| page >= at && page < let_go_to) {
            let from = (page - at) as usize;
            self.0.entry(page).or_insert_with(|| buffer[from..from + PAGE as usize].to_vec());
        }
    }

    /// Writes `bytes` at `offset` of `file`: into the copies, each then
    /// written whole; bytes on no copy as they are.
    pub(super) fn write(&mut self, faults: &Faults, file: &File, offset: u64, bytes: &[u8]) -> io::Result<()> {
        let mut done = 0;
        while done < bytes.len() {
            let at = offset + done as u64;
            let page = at / PAGE * PAGE;
            let n = (bytes.len() - done).min((page + PAGE - at) as usize);
            let piece = &bytes[done..done + n];
            match self.0.get_mut(&page) {
                Some(copy) => {
                    copy[(at - page) as usize..][..n].copy_from_slice(piece);
                    faults.write_at(file, copy, page)?;
                }
                None => faults.write_at(file, piece, at)?,
            }
            done += n;
        }
        Ok(())
    }

    /// The record at `start` is decided: its pages go unless a header of
    /// `others` lies on them too.
    pub(super) fn forget(&mut self, start: u64, others: impl Iterator<Item = u64>) {
        let needed: Vec<u64> = others.flat_map(header_pages).collect();
        for page in header_pages(start) {
            if !needed.contains(&page) {
                self.0.remove(&page);
            }
        }
    }

    /// Forgets the pages from `offset` on (cut off).
    pub(super) fn forget_from(&mut self, offset: u64) {
        self.0.retain(|&page, _| page + PAGE <= offset);
    }

    pub(super) fn clear(&mut self) {
        self.0.clear();
    }
}
