//! The circuit breaker in front of the cluster: a transport failure opens it for a while, during
//! which calls fail in microseconds; then one probe goes through and closes or re-opens it.
//!
//! Every admitted call ends in exactly one outcome, even when its future is dropped (a caller's
//! timeout, a client that went away): `Call` records a dropped call as a failure, so a hung node
//! opens the breaker and an abandoned probe never leaves it half-open forever.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::cache::CacheError;

const OPEN_MESSAGE: &str = "cache cold: Aerospike circuit breaker open";

/// What `/healthz` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    /// Failing fast until the open period ends.
    Open,
    /// The open period ended; the next call (or a health probe) decides.
    HalfOpen,
}

pub struct Breaker {
    open_for: Duration,
    open_until: Mutex<Option<Instant>>,
    probing: AtomicBool,
}

impl Breaker {
    pub fn new(open_for: Duration) -> Self {
        Self {
            open_for,
            open_until: Mutex::new(None),
            probing: AtomicBool::new(false),
        }
    }

    /// Admits a call (a closed breaker, or the single half-open probe) or fails fast.
    pub fn admit(&self) -> Result<Call<'_>, CacheError> {
        let open_until = *self.open_until.lock().unwrap_or_else(PoisonError::into_inner);
        let probe = match open_until {
            None => false,
            Some(until) if Instant::now() < until => {
                return Err(CacheError::Unavailable(OPEN_MESSAGE.into()))
            }
            Some(_) => {
                if self.probing.swap(true, Ordering::AcqRel) {
                    return Err(CacheError::Unavailable(OPEN_MESSAGE.into()));
                }
                true
            }
        };
        Ok(Call {
            breaker: self,
            probe,
            done: false,
        })
    }

    fn record(&self, probe: bool, failure: bool) {
        let mut open_until = self.open_until.lock().unwrap_or_else(PoisonError::into_inner);
        if failure {
            *open_until = Some(Instant::now() + self.open_for);
        } else if probe || open_until.is_some() {
            *open_until = None;
        }
        if probe {
            self.probing.store(false, Ordering::Release);
        }
    }

    pub fn state(&self) -> BreakerState {
        match *self.open_until.lock().unwrap_or_else(PoisonError::into_inner) {
            None => BreakerState::Closed,
            Some(until) if Instant::now() < until => BreakerState::Open,
            Some(_) => BreakerState::HalfOpen,
        }
    }
}

/// One admitted call. `finish` records its outcome; dropping it unfinished records a failure.
pub struct Call<'a> {
    breaker: &'a Breaker,
    probe: bool,
    done: bool,
}

impl Call<'_> {
    /// `transport_failure`: the cluster could not be reached or did not answer in time.
    pub fn finish(mut self, transport_failure: bool) {
        self.done = true;
        self.breaker.record(self.probe, transport_failure);
    }
}

impl Drop for Call<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.breaker.record(self.probe, true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_then_lets_one_probe_through() {
        let b = Breaker::new(Duration::from_millis(30));
        b.admit().unwrap().finish(false);
        assert_eq!(b.state(), BreakerState::Closed);
        b.admit().unwrap().finish(true);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.admit().is_err());
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        let probe = b.admit().unwrap();
        assert!(b.admit().is_err(), "only one probe at a time");
        probe.finish(false);
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.admit().is_ok());
    }

    #[test]
    fn a_dropped_call_is_a_failure_and_a_dropped_probe_clears_probing() {
        let b = Breaker::new(Duration::from_millis(30));
        drop(b.admit().unwrap());
        assert_eq!(
            b.state(),
            BreakerState::Open,
            "an abandoned call counts as a failure"
        );
        std::thread::sleep(Duration::from_millis(40));
        drop(b.admit().unwrap());
        assert_eq!(b.state(), BreakerState::Open, "the abandoned probe re-opened it");
        std::thread::sleep(Duration::from_millis(40));
        let probe = b.admit().expect("probing was cleared: a new probe is admitted");
        probe.finish(false);
        assert_eq!(b.state(), BreakerState::Closed);
    }
}
