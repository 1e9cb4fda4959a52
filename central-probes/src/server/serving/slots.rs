//! A global bound on GetProbe streams in flight, shared fairly between
//! connections, and the eviction of clients that stop reading.
//!
//! Each probe stream holds a slot from before its file is opened until its
//! last byte has left the stream (or the stream is dropped), so open files
//! and the bytes buffered for streams are bounded by the number of slots,
//! whatever the number of connections and streams. A freed slot goes to the
//! waiting request whose connection holds the fewest slots (then the oldest
//! request), so a client with thousands of streams cannot queue ahead of a
//! Collector asking for one probe.
//!
//! A stream is *stalled* while it has bytes to send and is waiting to be
//! asked for them: from the moment its response is handed to HTTP/2 (the
//! probe's header is ready) and after each piece it hands on, until HTTP/2
//! polls it again. HTTP/2 polls a stream only when the client's window has
//! room, so a client that grants no window at all stalls its streams from
//! their first byte, as one that stops reading does later. A slot stalled
//! longer than the send timeout closes its connection (as nginx's
//! `send_timeout`), and while any request waits for a slot, connections
//! stalled for a second or more are closed to make room: when the request
//! arrives and at every sweep while it waits.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tracing::{info, warn};

/// When every slot is taken, streams stalled at least this long lose their
/// connection to make room.
const STALL_UNDER_PRESSURE: Duration = Duration::from_secs(1);
/// How often stalls are checked: a request waiting for a slot waits at
/// most `STALL_UNDER_PRESSURE` plus this for a stalled holder to go.
const SWEEP_INTERVAL: Duration = Duration::from_millis(100);

/// The connection a probe stream goes out on: slots are shared fairly
/// between connections (`id`), and one whose client stopped reading is
/// closed (`close`). The connection code implements it; the slots know
/// nothing else of connections.
pub trait Connection: Send + Sync + 'static {
    fn id(&self) -> u64;
    /// Closes the connection at once, streams in flight included.
    fn close(&self);
}

#[derive(Clone)]
pub struct ProbeSlots {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    capacity: usize,
    send_timeout: Duration,
    /// Zero point of the stall clocks.
    epoch: Instant,
}

#[derive(Default)]
struct State {
    free: usize,
    next_id: u64,
    /// Slots held, by slot id.
    held: HashMap<u64, Holder>,
    /// Slots held per connection id.
    per_connection: HashMap<u64, usize>,
    waiters: Vec<Waiter>,
}

struct Holder {
    connection: Arc<dyn Connection>,
    stall: Arc<StallClock>,
}

struct Waiter {
    id: u64,
    connection: Arc<dyn Connection>,
    grant: oneshot::Sender<Slot>,
}

/// When a stream started waiting to be read, in milliseconds after the
/// epoch plus one; 0 while it is not waiting on its client.
#[derive(Default)]
pub struct StallClock(AtomicU64);

/// A held slot; dropping it gives the slot to the next waiter.
pub struct Slot {
    id: u64,
    shared: Arc<Shared>,
    stall: Arc<StallClock>,
}

impl ProbeSlots {
    /// `capacity` streams at once; a stream stalled longer than
    /// `send_timeout` closes its connection.
    pub fn new(capacity: usize, send_timeout: Duration) -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::new(State { free: capacity, ..State::default() }),
            capacity,
            send_timeout,
            epoch: Instant::now(),
        });
        let sweeper = Arc::downgrade(&shared);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(shared) = sweeper.upgrade() else { return };
                // A request waiting for a slot makes a second's stall too
                // long: the holders it waits on may have stalled just
                // after it arrived.
                if shared.has_waiters() {
                    shared.close_stalled_under_pressure();
                }
                let closed = shared.close_stalled(shared.send_timeout);
                if closed > 0 {
                    info!(connections = closed, timeout = ?shared.send_timeout, "closed connections whose client stopped reading");
                }
            }
        });
        ProbeSlots { shared }
    }

    /// A slot for a stream of `connection`, waiting at most `wait`. `None`
    /// when none came free in time.
    pub async fn acquire(&self, connection: Arc<dyn Connection>, wait: Duration) -> Option<Slot> {
        let receiver = {
            let mut state = self.shared.state();
            if state.free > 0 {
                state.free -= 1;
                return Some(self.shared.grant(&mut state, connection));
            }
            let (grant, receiver) = oneshot::channel();
            state.next_id += 1;
            let id = state.next_id;
            state.waiters.push(Waiter { id, connection, grant });
            receiver
        };
        self.shared.close_stalled_under_pressure();
        tokio::time::timeout(wait, receiver).await.ok()?.ok()
    }

    pub fn capacity(&self) -> usize {
        self.shared.capacity
    }

    /// Slots held now.
    pub fn in_use(&self) -> usize {
        self.shared.state().held.len()
    }
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // Every change under this lock leaves the state consistent.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn grant(self: &Arc<Self>, state: &mut State, connection: Arc<dyn Connection>) -> Slot {
        state.next_id += 1;
        let id = state.next_id;
        let stall = Arc::new(StallClock::default());
        *state.per_connection.entry(connection.id()).or_default() += 1;
        state.held.insert(id, Holder { connection, stall: stall.clone() });
        Slot { id, shared: self.clone(), stall }
    }

    fn release(self: &Arc<Self>, id: u64) {
        let (waiter, slot) = {
            let mut state = self.state();
            let Some(holder) = state.held.remove(&id) else { return };
            state.forget_holder(holder.connection.id());
            match state.next_waiter() {
                None => {
                    state.free += 1;
                    return;
                }
                Some(waiter) => {
                    let slot = self.grant(&mut state, waiter.connection.clone());
                    (waiter, slot)
                }
            }
        };
        // Outside the lock: a waiter that gave up just now hands the slot
        // back, and dropping it releases it again.
        let _ = waiter.grant.send(slot);
    }

    fn has_waiters(&self) -> bool {
        self.state().waiters.iter().any(|waiter| !waiter.grant.is_closed())
    }

    fn close_stalled_under_pressure(&self) {
        let closed = self.close_stalled(STALL_UNDER_PRESSURE);
        if closed > 0 {
            warn!(
                connections = closed,
                "every probe stream slot was taken: closed connections whose client stopped reading"
            );
        }
    }

    /// Closes the connections of streams stalled for at least `min`;
    /// returns how many.
    fn close_stalled(&self, min: Duration) -> usize {
        let now = self.now_millis();
        let min = min.as_millis() as u64;
        let state = self.state();
        let mut closed = HashMap::new();
        for holder in state.held.values() {
            let since = holder.stall.0.load(Ordering::Relaxed);
            if since != 0 && now.saturating_sub(since - 1) >= min {
                closed.entry(holder.connection.id()).or_insert_with(|| holder.connection.clone());
            }
        }
        drop(state);
        for connection in closed.values() {
            connection.close();
        }
        closed.len()
    }

    fn now_millis(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
}

impl State {
    fn forget_holder(&mut self, connection: u64) {
        if let Some(count) = self.per_connection.get_mut(&connection) {
            *count -= 1;
            if *count == 0 {
                self.per_connection.remove(&connection);
            }
        }
    }

    /// The waiter to serve next: of the connection holding the fewest
    /// slots, the oldest first among equals; those who gave up are dropped.
    fn next_waiter(&mut self) -> Option<Waiter> {
        self.waiters.retain(|waiter| !waiter.grant.is_closed());
        let per_connection = &self.per_connection;
        let index = self
            .waiters
            .iter()
            .enumerate()
            .min_by_key(|(_, waiter)| (per_connection.get(&waiter.connection.id()).copied().unwrap_or(0), waiter.id))
            .map(|(index, _)| index)?;
        Some(self.waiters.swap_remove(index))
    }
}

impl Slot {
    /// The stream has bytes to send and waits to be asked for them.
    pub fn waiting_on_client(&self) {
        let now = self.shared.now_millis() + 1;
        self.stall.0.store(now, Ordering::Relaxed);
    }

    /// The stream is being asked for more: its client reads.
    pub fn client_reads(&self) {
        self.stall.0.store(0, Ordering::Relaxed);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.shared.release(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    /// A connection that only remembers being closed.
    struct TestConnection {
        id: u64,
        closed: AtomicBool,
    }

    impl TestConnection {
        fn new() -> Arc<TestConnection> {
            static NEXT: AtomicU64 = AtomicU64::new(0);
            Arc::new(TestConnection { id: NEXT.fetch_add(1, Ordering::Relaxed), closed: AtomicBool::new(false) })
        }

        fn is_closed(&self) -> bool {
            self.closed.load(Ordering::SeqCst)
        }
    }

    impl Connection for TestConnection {
        fn id(&self) -> u64 {
            self.id
        }

        fn close(&self) {
            self.closed.store(true, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn a_freed_slot_goes_to_the_connection_holding_fewest() {
        let slots = ProbeSlots::new(2, Duration::from_secs(60));
        let greedy = TestConnection::new();
        let modest = TestConnection::new();
        let first = slots.acquire(greedy.clone(), Duration::ZERO).await.unwrap();
        let _second = slots.acquire(greedy.clone(), Duration::ZERO).await.unwrap();
        assert!(slots.acquire(greedy.clone(), Duration::ZERO).await.is_none(), "no slot free");

        // The greedy connection queues first, the modest one after it.
        let queued_greedy = tokio::spawn({
            let (slots, greedy) = (slots.clone(), greedy.clone());
            async move { slots.acquire(greedy.clone(), Duration::from_secs(5)).await.is_some() }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let queued_modest = tokio::spawn({
            let slots = slots.clone();
            async move { slots.acquire(modest.clone(), Duration::from_secs(5)).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(first);
        let modest_slot = queued_modest.await.unwrap();
        assert!(modest_slot.is_some(), "the connection holding none is served first");
        assert!(!queued_greedy.is_finished());
        drop(modest_slot);
        assert!(queued_greedy.await.unwrap());
        assert_eq!(slots.in_use(), 1);
    }

    #[tokio::test]
    async fn a_stalled_stream_loses_its_connection_when_slots_run_out() {
        let slots = ProbeSlots::new(1, Duration::from_secs(60));
        let reader = TestConnection::new();
        let slot = slots.acquire(reader.clone(), Duration::ZERO).await.unwrap();
        slot.waiting_on_client();
        let other = TestConnection::new();
        assert!(slots.acquire(other.clone(), Duration::from_millis(10)).await.is_none());
        assert!(!reader.is_closed(), "stalled for less than a second: kept");

        tokio::time::sleep(STALL_UNDER_PRESSURE + Duration::from_millis(50)).await;
        assert!(slots.acquire(other.clone(), Duration::from_millis(10)).await.is_none());
        assert!(reader.is_closed(), "stalled for over a second while others wait: closed");

        slot.client_reads();
        drop(slot);
        assert!(slots.acquire(other.clone(), Duration::ZERO).await.is_some());
    }

    #[tokio::test]
    async fn a_waiting_request_closes_a_holder_that_stalls_after_it_arrived() {
        let slots = ProbeSlots::new(1, Duration::from_secs(60));
        let holder = TestConnection::new();
        let slot = slots.acquire(holder.clone(), Duration::ZERO).await.unwrap();
        slot.waiting_on_client();
        let waiting = tokio::spawn({
            let slots = slots.clone();
            async move { slots.acquire(TestConnection::new(), Duration::from_secs(5)).await.is_some() }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!holder.is_closed(), "stalled for less than a second when the request came");
        tokio::time::sleep(STALL_UNDER_PRESSURE + SWEEP_INTERVAL * 2).await;
        assert!(holder.is_closed(), "the sweeper closes it while the request waits");
        drop(slot);
        assert!(waiting.await.unwrap());
    }

    #[tokio::test]
    async fn the_send_timeout_closes_a_stalled_connection_without_pressure() {
        let slots = ProbeSlots::new(4, Duration::from_millis(200));
        let connection = TestConnection::new();
        let slot = slots.acquire(connection.clone(), Duration::ZERO).await.unwrap();
        slot.waiting_on_client();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(connection.is_closed());
    }
}
