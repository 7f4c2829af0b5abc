//! A worker's queue of mirrors that go after their responses: streams hand their writes' mirrors
//! in, the root context sends them in batches (group commit: one callout carries every mirror
//! waiting, up to `BATCH_MIRRORS` and `BATCH_BYTES`; at most `MAX_IN_FLIGHT` callouts at a time,
//! so under load mirrors gather while earlier batches are out) and records each one's outcome.
//! A group of evictions ahead that goes out anyway takes the oldest waiting mirrors along, up to
//! a few bytes (`take_riders`): one callout then does the work of two.
//! Plain data; the glue does the hostcalls.

use crate::exchange::MirrorJob;
use foldhash::HashMap;
use std::collections::VecDeque;

/// Most mirror callouts one worker has out at once.
pub const MAX_IN_FLIGHT: usize = 4;
/// Most mirrors in one callout.
pub const BATCH_MIRRORS: usize = 256;
/// A batch takes mirrors while their bodies stay within this (a larger mirror goes alone).
pub const BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Mirrors keep gathering while writes keep coming only while they come to at most this: a
/// larger backlog goes at once (holding is for small mirrors, and it holds no more memory).
pub const HOLD_BYTES: usize = 64 * 1024;

/// A batch callout on its way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flight {
    pub sent_ms: u64,
    /// Mirrors it carries.
    pub mirrors: usize,
}

#[derive(Debug)]
pub struct MirrorQueue {
    waiting: VecDeque<MirrorJob>,
    /// Bytes of the waiting mirrors' bodies.
    bytes: usize,
    max_bytes: usize,
    in_flight: HashMap<u32, Flight>,
    /// Mirrors riding evictions ahead, by the eviction's callout (not bounded by
    /// `MAX_IN_FLIGHT`: the evictions go out anyway).
    riding: HashMap<u32, Flight>,
    /// A wake-up is on its way to the root context (one is enough for any number of mirrors).
    wake_pending: bool,
}

/// What happened to a mirror handed in.
#[derive(Debug, PartialEq, Eq)]
pub enum Accepted {
    /// Queued; the root context must be woken (no wake-up is on its way yet).
    Wake,
    /// Queued; a wake-up is already on its way.
    Queued,
    /// The queue holds `max_bytes` already: the mirror is dropped.
    Full,
}

impl Default for MirrorQueue {
    fn default() -> Self {
        MirrorQueue::new(crate::config::DEFAULT_MIRROR_QUEUE_BYTES)
    }
}

impl MirrorQueue {
    pub fn new(max_bytes: usize) -> Self {
        MirrorQueue {
            waiting: VecDeque::new(),
            bytes: 0,
            max_bytes,
            in_flight: HashMap::default(),
            riding: HashMap::default(),
            wake_pending: false,
        }
    }

    /// Hands a mirror in. A mirror larger than the whole queue is still taken when the queue is
    /// empty, so that no size of write is always dropped.
    pub fn push(&mut self, job: MirrorJob) -> Accepted {
        let size = job.body.len();
        if !self.waiting.is_empty() && self.bytes.saturating_add(size) > self.max_bytes {
            return Accepted::Full;
        }
        self.bytes += size;
        self.waiting.push_back(job);
        if self.wake_pending {
            Accepted::Queued
        } else {
            self.wake_pending = true;
            Accepted::Wake
        }
    }

    /// The root context was woken (or could not be: the timer will send the mirrors instead).
    pub fn woken(&mut self) {
        self.wake_pending = false;
    }

    /// Mirrors waiting to be sent.
    pub fn queued(&self) -> usize {
        self.waiting.len()
    }

    /// Whether more is waiting than the linger holds back while writes keep coming.
    pub fn beyond_hold(&self) -> bool {
        self.bytes > HOLD_BYTES
    }

    /// Whether a whole batch is waiting (it goes at once rather than lingering for more).
    pub fn batch_full(&self) -> bool {
        self.waiting.len() >= BATCH_MIRRORS || self.bytes >= BATCH_BYTES
    }

    /// The next batch to send, oldest first, while fewer than `MAX_IN_FLIGHT` are out; empty
    /// when none may go or none is waiting.
    pub fn take_batch(&mut self) -> Vec<MirrorJob> {
        if self.in_flight.len() >= MAX_IN_FLIGHT {
            return Vec::new();
        }
        self.take_front(BATCH_BYTES, true)
    }

    /// The oldest waiting mirrors, at most `BATCH_MIRRORS` whose bodies come to at most
    /// `max_bytes`; with `oversized_first`, a first one larger than that is taken alone.
    fn take_front(&mut self, max_bytes: usize, oversized_first: bool) -> Vec<MirrorJob> {
        let mut taken = Vec::new();
        let mut bytes = 0usize;
        while let Some(next) = self.waiting.front() {
            let size = next.body.len();
            let fits = bytes + size <= max_bytes || (oversized_first && taken.is_empty());
            if taken.len() == BATCH_MIRRORS || !fits {
                break;
            }
            bytes += size;
            self.bytes -= size;
            taken.extend(self.waiting.pop_front());
        }
        taken
    }

    /// The oldest waiting mirrors whose bodies come to at most `max_bytes` together, to ride an
    /// eviction ahead; empty when the first alone is larger (it waits for a batch).
    pub fn take_riders(&mut self, max_bytes: usize) -> Vec<MirrorJob> {
        self.take_front(max_bytes, false)
    }

    /// Riders whose eviction could not be sent: back at the front, in their order.
    pub fn put_back(&mut self, riders: Vec<MirrorJob>) {
        for job in riders.into_iter().rev() {
            self.bytes += job.body.len();
            self.waiting.push_front(job);
        }
    }

    /// `mirrors` riders went out with the eviction sent as callout `token`.
    pub fn rode(&mut self, token: u32, mirrors: usize, now_ms: u64) {
        self.riding.insert(
            token,
            Flight {
                sent_ms: now_ms,
                mirrors,
            },
        );
    }

    /// A batch of `mirrors` went out as callout `token`.
    pub fn sent(&mut self, token: u32, mirrors: usize, now_ms: u64) {
        self.in_flight.insert(
            token,
            Flight {
                sent_ms: now_ms,
                mirrors,
            },
        );
    }

    /// A callout was answered: its flight, when it was a mirror batch's or carried riders.
    pub fn answered(&mut self, token: u32) -> Option<Flight> {
        self.in_flight
            .remove(&token)
            .or_else(|| self.riding.remove(&token))
    }

    /// Flights with no answer `limit_ms` after they went out (Envoy answers every callout, with
    /// its own 504 at the timeout, so this only guards against a host that does not): removed.
    /// Returns the mirrors they carried.
    pub fn expire(&mut self, now_ms: u64, limit_ms: u64) -> usize {
        let mut mirrors = 0;
        for flights in [&mut self.in_flight, &mut self.riding] {
            flights.retain(|_, f| {
                let keep = now_ms.saturating_sub(f.sent_ms) < limit_ms;
                if !keep {
                    mirrors += f.mirrors;
                }
                keep
            });
        }
        mirrors
    }

    /// Mirrors waiting to be sent.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn job(n: usize) -> MirrorJob {
        MirrorJob {
            request_id: format!("r{n}"),
            trace: Default::default(),
            body: vec![b'x'; n],
        }
    }

    #[test]
    fn one_wake_up_covers_every_mirror_until_the_root_runs() {
        let mut q = MirrorQueue::new(100);
        assert_eq!(q.push(job(10)), Accepted::Wake);
        assert_eq!(q.push(job(10)), Accepted::Queued);
        q.woken();
        assert_eq!(q.take_batch().len(), 2, "both in one batch");
        assert_eq!(q.push(job(10)), Accepted::Wake);
        assert_eq!(q.waiting(), 1);
    }

    #[test]
    fn the_queue_is_bounded_by_bytes_but_never_refuses_a_first_mirror() {
        let mut q = MirrorQueue::new(25);
        assert_eq!(q.push(job(20)), Accepted::Wake);
        assert_eq!(q.push(job(10)), Accepted::Full);
        assert_eq!(q.push(job(5)), Accepted::Queued);
        assert_eq!(q.take_batch().len(), 2);
        assert_eq!(q.waiting(), 0);
        assert_eq!(
            q.push(job(1_000)),
            Accepted::Queued,
            "an empty queue takes any size"
        );
        assert_eq!(q.push(job(1)), Accepted::Full);
    }

    #[test]
    fn batches_are_bounded_by_count_and_bytes_and_keep_order() {
        let mut q = MirrorQueue::new(usize::MAX);
        for n in 0..BATCH_MIRRORS + 5 {
            q.push(job(n % 7 + 1));
        }
        let first = q.take_batch();
        assert_eq!(first.len(), BATCH_MIRRORS);
        assert_eq!(first[0].request_id, "r1");
        assert_eq!(q.take_batch().len(), 5);
        // A mirror past the byte bound starts the next batch; one larger than it goes alone.
        q.push(job(BATCH_BYTES - 10));
        q.push(job(20));
        q.push(job(BATCH_BYTES + 1));
        assert_eq!(q.take_batch().len(), 1);
        assert_eq!(q.take_batch().len(), 1);
        assert_eq!(q.take_batch()[0].body.len(), BATCH_BYTES + 1);
        assert!(q.take_batch().is_empty());
    }

    /// A queue with `MAX_IN_FLIGHT` one-mirror batches out (tokens from 0, sent at 1,000 ms)
    /// and two mirrors waiting.
    fn flights_full() -> MirrorQueue {
        let mut q = MirrorQueue::new(usize::MAX);
        for token in 0..MAX_IN_FLIGHT as u32 {
            q.push(job(1));
            let batch = q.take_batch();
            q.sent(token, batch.len(), 1_000);
        }
        q.push(job(1));
        q.push(job(1));
        q
    }

    #[test]
    fn at_most_max_in_flight_batches_go_out_and_answers_free_room() {
        let mut q = flights_full();
        assert!(q.take_batch().is_empty(), "no room");
        assert_eq!((q.in_flight(), q.waiting()), (MAX_IN_FLIGHT, 2));
        assert_eq!(
            q.answered(0),
            Some(Flight {
                sent_ms: 1_000,
                mirrors: 1
            })
        );
        assert_eq!(q.answered(0), None, "one answer per flight");
        assert_eq!(q.answered(999), None, "not a mirror's");
        assert_eq!(q.take_batch().len(), 2, "what gathered meanwhile goes as one");
    }

    #[test]
    fn riders_are_the_oldest_within_the_bound_and_can_come_back() {
        let mut q = MirrorQueue::new(usize::MAX);
        for n in [10, 20, 30, 5] {
            q.push(job(n));
        }
        assert!(q.take_riders(0).is_empty());
        assert!(
            q.take_riders(9).is_empty(),
            "the oldest does not fit: none jumps the queue"
        );
        let riders = q.take_riders(35);
        let names: Vec<&str> = riders.iter().map(|j| j.request_id.as_str()).collect();
        assert_eq!(names, ["r10", "r20"]);
        assert_eq!(q.waiting(), 2);
        q.put_back(riders);
        let all: Vec<String> = q.take_batch().into_iter().map(|j| j.request_id).collect();
        assert_eq!(all, ["r10", "r20", "r30", "r5"], "put back in front, in order");
        // The byte count follows: an empty queue after taking everything.
        q.push(job(7));
        assert_eq!(q.take_riders(7).len(), 1);
        assert_eq!(q.push(job(1)), Accepted::Queued);
        assert_eq!(q.bytes, 1);
    }

    #[test]
    fn riding_flights_are_answered_and_expire_apart_from_batches() {
        let mut q = flights_full();
        let riders = q.take_riders(100);
        q.rode(50, riders.len(), 1_000);
        assert_eq!(q.in_flight(), MAX_IN_FLIGHT, "riders take no batch's room");
        assert_eq!(
            q.answered(50),
            Some(Flight {
                sent_ms: 1_000,
                mirrors: 2
            })
        );
        assert_eq!(q.answered(50), None);
        q.push(job(1));
        let riders = q.take_riders(100);
        q.rode(51, riders.len(), 1_000);
        assert_eq!(
            q.expire(5_000, 1_000),
            MAX_IN_FLIGHT + 1,
            "batches and riders expire"
        );
    }

    #[test]
    fn flights_never_answered_expire_with_their_mirrors() {
        let mut q = MirrorQueue::new(100);
        q.push(job(1));
        q.push(job(1));
        let batch = q.take_batch();
        q.sent(7, batch.len(), 1_000);
        assert_eq!(q.expire(1_500, 1_000), 0);
        assert_eq!(q.expire(2_000, 1_000), 2);
        assert_eq!(q.in_flight(), 0);
    }
}
