//! The upstream's recent "not found" answers, so that a crowd asking for a
//! missing probe does not become a crowd of upstream requests. Any caller
//! with a Collector certificate can ask for as many distinct valid names as
//! it likes, so the map is bounded twice: an answer is believed for its
//! time to live only, and beyond `MAX_NOT_FOUND_ANSWERS` the oldest answer
//! is forgotten first. Forgetting one early costs one more upstream request,
//! nothing else. The clock is the caller's, so tests need not wait.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use probe_api::names::ProbePath;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

/// How many "not found" answers Central remembers at most (about 2 MiB).
pub const MAX_NOT_FOUND_ANSWERS: usize = 10_000;

pub(super) struct NotFoundAnswers {
    ttl: Duration,
    max_answers: usize,
    /// When each probe's answer came, and its place in `by_age`.
    answers: HashMap<ProbePath, (Instant, u64)>,
    /// The same answers, oldest first: the next to expire or be evicted.
    by_age: BTreeMap<u64, ProbePath>,
    next_place: u64,
    /// Answers held now, and answers evicted for room (metrics).
    held: Gauge,
    evicted: Counter,
}

impl NotFoundAnswers {
    pub(super) fn new(ttl: Duration, max_answers: usize, held: Gauge, evicted: Counter) -> Self {
        NotFoundAnswers {
            ttl,
            max_answers,
            answers: HashMap::new(),
            by_age: BTreeMap::new(),
            next_place: 0,
            held,
            evicted,
        }
    }

    /// Whether the upstream answered "not found" for `path` less than the
    /// time to live before `now`.
    pub(super) fn is_fresh(&mut self, path: &ProbePath, now: Instant) -> bool {
        match self.answers.get(path) {
            Some(&(at, _)) if now.saturating_duration_since(at) < self.ttl => true,
            Some(_) => {
                self.forget(path);
                false
            }
            None => false,
        }
    }

    /// Remembers the upstream's "not found" for `path` at `now`; expired
    /// answers go, and the oldest ones beyond the bound.
    pub(super) fn record(&mut self, path: &ProbePath, now: Instant) {
        self.forget(path);
        while let Some((_, oldest)) = self.by_age.first_key_value() {
            let oldest = oldest.clone();
            let expired =
                self.answers.get(&oldest).is_none_or(|&(at, _)| now.saturating_duration_since(at) >= self.ttl);
            if !expired && self.answers.len() < self.max_answers {
                break;
            }
            self.forget(&oldest);
            if !expired {
                self.evicted.inc();
            }
        }
        let place = self.next_place;
        self.next_place += 1;
        self.answers.insert(path.clone(), (now, place));
        self.by_age.insert(place, path.clone());
        self.held.set(self.answers.len() as i64);
    }

    fn forget(&mut self, path: &ProbePath) {
        if let Some((_, place)) = self.answers.remove(path) {
            self.by_age.remove(&place);
        }
        self.held.set(self.answers.len() as i64);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        debug_assert_eq!(self.answers.len(), self.by_age.len());
        self.answers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(30);

    fn path(n: usize) -> ProbePath {
        ProbePath::parse(&format!("2.5.0/collector-ebpf-6.1.{n}.o.gz")).unwrap()
    }

    fn answers(max: usize) -> (NotFoundAnswers, Gauge, Counter) {
        let (held, evicted) = (Gauge::default(), Counter::default());
        (NotFoundAnswers::new(TTL, max, held.clone(), evicted.clone()), held, evicted)
    }

    #[test]
    fn distinct_names_beyond_the_bound_evict_the_oldest_answers() {
        let (mut answers, held, evicted) = answers(100);
        let start = Instant::now();
        for n in 0..1_000 {
            answers.record(&path(n), start + Duration::from_millis(n as u64));
            assert!(answers.len() <= 100);
        }
        let now = start + Duration::from_secs(1);
        assert_eq!(answers.len(), 100);
        assert_eq!((held.get(), evicted.get()), (100, 900));
        assert!((0..900).all(|n| !answers.is_fresh(&path(n), now)), "the oldest are forgotten");
        assert!((900..1_000).all(|n| answers.is_fresh(&path(n), now)), "the newest are kept");
    }

    #[test]
    fn answers_age_out_and_expired_ones_leave_the_map() {
        let (mut answers, held, evicted) = answers(100);
        let start = Instant::now();
        answers.record(&path(1), start);
        answers.record(&path(2), start + TTL / 2);
        assert!(answers.is_fresh(&path(1), start + TTL - Duration::from_millis(1)));
        assert!(!answers.is_fresh(&path(1), start + TTL), "an answer is believed for its time to live only");
        assert!(answers.is_fresh(&path(2), start + TTL));
        assert_eq!(held.get(), 1, "the expired answer left the map when it was looked up");
        // A new answer sweeps out every expired one, looked up or not.
        answers.record(&path(3), start + 2 * TTL);
        assert_eq!(answers.len(), 1);
        assert_eq!((held.get(), evicted.get()), (1, 0), "expiring is not evicting");
    }

    #[test]
    fn a_renewed_answer_counts_from_its_renewal() {
        let (mut answers, _, evicted) = answers(3);
        let start = Instant::now();
        for n in 0..3 {
            answers.record(&path(n), start + Duration::from_secs(n as u64));
        }
        answers.record(&path(0), start + Duration::from_secs(3));
        answers.record(&path(3), start + Duration::from_secs(4));
        let now = start + Duration::from_secs(5);
        assert!(answers.is_fresh(&path(0), now), "renewed, so not the oldest");
        assert!(!answers.is_fresh(&path(1), now), "the oldest was evicted");
        assert_eq!((answers.len(), evicted.get()), (3, 1));
        assert!(answers.is_fresh(&path(0), start + Duration::from_secs(3) + TTL - Duration::from_millis(1)));
    }
}
