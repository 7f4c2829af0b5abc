//! Group commit of evictions ahead: the bookkeeping of one worker's writes whose evictions travel
//! together in one callout from the root context.
//!
//! A write's eviction ahead (its cached documents removed while Turbopuffer applies it) must be
//! answered before the write's response goes to the client. Alone, that is one callout per write.
//! Grouped, a write joins the worker's waiting group and wakes the root context, which sends one
//! callout for every write waiting; its answer settles each member: through a slot the write's
//! stream reads when its response comes, or, for a write whose response came first and waits,
//! by the root finishing that write's exchange (parked here) and resuming its stream.
//!
//! No proxy-wasm here (the glue sends and resumes); `P` is what a parked write leaves behind.

use crate::config::GroupEvictions;
use crate::exchange::Callout;
// The glue keys these maps by context id on every grouped write: a fast hash.
use foldhash::HashMap;
use std::cell::Cell;
use std::rc::Rc;

/// Whether a write's eviction ahead joins its worker's group (else the write sends it itself),
/// given how many evictions the worker's streams sent themselves and how many groups are out.
/// Adaptive: only while one is out, so that at low load no write waits for the root's extra hop
/// and under load the writes that come meanwhile share a callout.
pub fn joins_group(mode: GroupEvictions, own_out: usize, groups_out: usize) -> bool {
    match mode {
        GroupEvictions::Off => false,
        GroupEvictions::Always => true,
        GroupEvictions::Adaptive => own_out > 0 || groups_out > 0,
    }
}

/// How a member's eviction went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The sidecar evicted the group (2xx JSON answer).
    pub ok: bool,
    /// No answer came within the timeout (for the log line; a timeout is a failure).
    pub timed_out: bool,
}

/// Where the root puts a member's outcome for its stream to read.
pub type Slot = Rc<Cell<Option<Outcome>>>;

/// A write waiting in the group.
#[derive(Debug)]
pub struct Member {
    pub context_id: u32,
    /// The write's own eviction callout: its body is one fence, and the group goes with its
    /// first member's headers.
    pub call: Callout,
    pub slot: Slot,
}

/// A group on its way: whom its answer settles.
#[derive(Debug)]
pub struct Flight {
    pub members: Vec<(u32, Slot)>,
    pub sent_ms: u64,
}

/// The group to send: its members' bodies and the first member's headers.
#[derive(Debug)]
pub struct Group {
    pub bodies: Vec<Vec<u8>>,
    pub headers: Vec<(String, String)>,
    pub members: Vec<(u32, Slot)>,
}

/// One worker's groups: the one gathering, those in flight, and the writes parked on them.
#[derive(Debug)]
pub struct Groups<P> {
    waiting: Vec<Member>,
    flights: Vec<(u32, Flight)>,
    parked: HashMap<u32, P>,
}

impl<P> Default for Groups<P> {
    fn default() -> Self {
        Groups {
            waiting: Vec::new(),
            flights: Vec::new(),
            parked: HashMap::default(),
        }
    }
}

impl<P> Groups<P> {
    /// Adds a write to the gathering group. True when it is the first: the root must be woken.
    pub fn join(&mut self, member: Member) -> bool {
        self.waiting.push(member);
        self.waiting.len() == 1
    }

    /// Takes back the write that just joined (the root could not be woken: it goes alone).
    pub fn leave(&mut self, context_id: u32) -> Option<Member> {
        let i = self.waiting.iter().rposition(|m| m.context_id == context_id)?;
        Some(self.waiting.remove(i))
    }

    /// The gathering group, to send now (`None`: nobody waits).
    pub fn take(&mut self) -> Option<Group> {
        if self.waiting.is_empty() {
            return None;
        }
        let mut waiting = std::mem::take(&mut self.waiting);
        let headers = waiting
            .first_mut()
            .map(|m| std::mem::take(&mut m.call.headers))
            .unwrap_or_default();
        let mut bodies = Vec::with_capacity(waiting.len());
        let mut members = Vec::with_capacity(waiting.len());
        for m in waiting {
            bodies.push(m.call.body);
            members.push((m.context_id, m.slot));
        }
        Some(Group {
            bodies,
            headers,
            members,
        })
    }

    /// A group went out as callout `token`.
    pub fn sent(&mut self, token: u32, members: Vec<(u32, Slot)>, now_ms: u64) {
        self.flights.push((
            token,
            Flight {
                members,
                sent_ms: now_ms,
            },
        ));
    }

    /// Groups in flight.
    pub fn in_flight(&self) -> usize {
        self.flights.len()
    }

    /// The flight a callout answer is for, if it is one of these.
    pub fn answered(&mut self, token: u32) -> Option<Flight> {
        let i = self.flights.iter().position(|(t, _)| *t == token)?;
        Some(self.flights.remove(i).1)
    }

    /// Flights sent at least `limit_ms` ago (their answer is lost: they failed).
    pub fn expire(&mut self, now_ms: u64, limit_ms: u64) -> Vec<Flight> {
        let (old, young) = std::mem::take(&mut self.flights)
            .into_iter()
            .partition(|(_, f)| now_ms.saturating_sub(f.sent_ms) >= limit_ms);
        self.flights = young;
        old.into_iter().map(|(_, f)| f).collect()
    }

    /// A member whose response came before its group's answer leaves what finishing it needs.
    pub fn park(&mut self, context_id: u32, parked: P) {
        self.parked.insert(context_id, parked);
    }

    /// Tells each member of a flight (or of a group never sent) its outcome; returns the parked
    /// writes to finish, with their context ids.
    pub fn settle(&mut self, members: &[(u32, Slot)], outcome: Outcome) -> Vec<(u32, P)> {
        let mut finish = Vec::new();
        for (context_id, slot) in members {
            slot.set(Some(outcome));
            if let Some(parked) = self.parked.remove(context_id) {
                finish.push((*context_id, parked));
            }
        }
        finish
    }

    /// Writes parked now.
    pub fn parked(&self) -> usize {
        self.parked.len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn member(id: u32) -> (Member, Slot) {
        let slot = Slot::default();
        let m = Member {
            context_id: id,
            call: Callout {
                purpose: crate::exchange::Purpose::EvictAhead,
                headers: vec![("x-request-id".to_owned(), format!("r{id}"))],
                body: format!("body{id}").into_bytes(),
                timeout_ms: 200,
            },
            slot: Rc::clone(&slot),
        };
        (m, slot)
    }

    #[test]
    fn adaptive_grouping_waits_for_something_out() {
        use GroupEvictions::{Adaptive, Always, Off};
        assert!(!joins_group(Adaptive, 0, 0), "alone at low load");
        assert!(joins_group(Adaptive, 1, 0));
        assert!(joins_group(Adaptive, 0, 1));
        assert!(joins_group(Always, 0, 0));
        assert!(!joins_group(Off, 3, 3));
    }

    #[test]
    fn the_first_member_wakes_the_root_and_a_group_carries_everyone_waiting() {
        let mut g: Groups<&str> = Groups::default();
        assert!(g.take().is_none());
        let (a, _) = member(2);
        let (b, _) = member(3);
        assert!(g.join(a));
        assert!(!g.join(b), "the root is already woken");
        let group = g.take().unwrap();
        assert_eq!(group.bodies, [b"body2".to_vec(), b"body3".to_vec()]);
        assert_eq!(group.headers, [("x-request-id".to_owned(), "r2".to_owned())]);
        assert_eq!(group.members.iter().map(|m| m.0).collect::<Vec<_>>(), [2, 3]);
        assert!(g.take().is_none());
        let (c, _) = member(4);
        assert!(g.join(c), "a new group wakes the root again");
    }

    #[test]
    fn an_answer_fills_every_slot_and_returns_the_parked_writes() {
        let mut g: Groups<&str> = Groups::default();
        let (a, slot_a) = member(2);
        let (b, slot_b) = member(3);
        g.join(a);
        g.join(b);
        let group = g.take().unwrap();
        g.sent(9, group.members, 100);
        assert_eq!(g.in_flight(), 1);
        g.park(3, "write 3");
        assert_eq!(g.parked(), 1);
        assert!(g.answered(8).is_none(), "not one of these");
        let flight = g.answered(9).unwrap();
        assert_eq!(g.in_flight(), 0);
        let outcome = Outcome {
            ok: true,
            timed_out: false,
        };
        let finish = g.settle(&flight.members, outcome);
        assert_eq!(finish, [(3, "write 3")]);
        assert_eq!((slot_a.get(), slot_b.get()), (Some(outcome), Some(outcome)));
        assert_eq!(g.parked(), 0);
    }

    #[test]
    fn a_member_can_leave_and_old_flights_expire() {
        let mut g: Groups<()> = Groups::default();
        let (a, _) = member(2);
        let (b, _) = member(3);
        g.join(a);
        g.join(b);
        assert_eq!(g.leave(3).unwrap().context_id, 3);
        assert!(g.leave(3).is_none());
        let group = g.take().unwrap();
        assert_eq!(group.members.len(), 1);
        g.sent(1, group.members, 100);
        let (c, _) = member(4);
        g.join(c);
        let group = g.take().unwrap();
        g.sent(2, group.members, 150);
        assert!(g.expire(299, 200).is_empty());
        let old = g.expire(300, 200);
        assert_eq!(old.len(), 1);
        assert_eq!(old[0].members[0].0, 2);
        assert_eq!(g.in_flight(), 1);
    }
}
