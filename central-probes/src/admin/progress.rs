//! Upload progress: a bar with bytes, rate and ETA on a terminal; a plain
//! line at every tenth of the work otherwise (logs, CI); or nothing.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

pub enum Progress {
    Bar(ProgressBar),
    Lines(LineProgress),
    Silent,
}

pub struct LineProgress {
    total: AtomicU64,
    done: AtomicU64,
    /// The next tenth to report, and when the work started.
    state: Mutex<(u64, Instant)>,
}

impl Progress {
    /// A bar on a terminal, plain lines elsewhere.
    pub fn for_stderr() -> Self {
        if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}")
                    .expect("a valid template"),
            );
            Progress::Bar(bar)
        } else {
            Progress::Lines(LineProgress {
                total: AtomicU64::new(0),
                done: AtomicU64::new(0),
                state: Mutex::new((1, Instant::now())),
            })
        }
    }

    pub fn start(&self, total: u64) {
        match self {
            Progress::Bar(bar) => bar.set_length(total),
            Progress::Lines(lines) => {
                lines.total.store(total, Ordering::Relaxed);
                *lines.state.lock().expect("not poisoned") = (1, Instant::now());
            }
            Progress::Silent => {}
        }
    }

    pub fn inc(&self, bytes: u64) {
        match self {
            Progress::Bar(bar) => bar.inc(bytes),
            Progress::Lines(lines) => {
                let done = lines.done.fetch_add(bytes, Ordering::Relaxed) + bytes;
                let total = lines.total.load(Ordering::Relaxed).max(1);
                let mut state = lines.state.lock().expect("not poisoned");
                let (next_tenth, started) = *state;
                if next_tenth <= 9 && done * 10 >= next_tenth * total {
                    let seconds = started.elapsed().as_secs_f64().max(1e-3);
                    eprintln!(
                        "{}% ({} of {} MiB, {:.0} MiB/s)",
                        done * 100 / total,
                        done >> 20,
                        total >> 20,
                        done as f64 / seconds / (1 << 20) as f64
                    );
                    state.0 = done * 10 / total + 1;
                }
            }
            Progress::Silent => {}
        }
    }

    pub fn finish(&self) {
        if let Progress::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}
