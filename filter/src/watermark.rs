//! The read watermark as the filter keeps it (SPEC §2.6).
//!
//! The sidecar owns the watermarks: it polls each watched namespace's index status and moves the
//! watermark forward. The filter never asks for one on a query's path. Instead, each Envoy
//! worker's root context, on a timer, sends the sidecar the namespaces this worker has seen (a
//! [`Tracker`]: queried or written, bounded, least recently used leave) and stores every answer in
//! Envoy's shared data ([`shared_key`], [`Watermark::encode`]), which every worker's queries read
//! with one hostcall. The tracker also keeps the worker's own copy of the watermarks of the
//! namespaces it tracks ([`Tracker::watermark`]), so the queries that made a worker track a
//! namespace need no hostcall at all. An entry not refreshed for `watermark_stale_ms` is not used
//! ([`Watermark::is_fresh`]).

use crate::sidecar_api::{WatchedNamespace, WatermarkAnswer, WatermarkRegistration};
// foldhash (seeded per process) rather than SipHash: looked up on every query.
use foldhash::HashMap;

/// One namespace's watermark as the sidecar last reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watermark {
    /// Epoch ms: every write stamped at or before it is indexed.
    pub at_ms: u64,
    /// Turbopuffer's index of the namespace was updating at the last poll.
    pub updating: bool,
    /// When a root context stored this copy (the filter's clock, epoch ms).
    pub refreshed_ms: u64,
}

impl Watermark {
    /// The shared-data value: `at_ms,updating,refreshed_ms` in ASCII.
    pub fn encode(&self) -> Vec<u8> {
        format!("{},{},{}", self.at_ms, u8::from(self.updating), self.refreshed_ms).into_bytes()
    }

    /// Reads a shared-data value; `None` for an empty value (watermark unknown) or garbage.
    pub fn decode(bytes: &[u8]) -> Option<Watermark> {
        let text = std::str::from_utf8(bytes).ok()?;
        let mut parts = text.split(',');
        let at_ms = parts.next()?.parse().ok()?;
        let updating = match parts.next()? {
            "0" => false,
            "1" => true,
            _ => return None,
        };
        let refreshed_ms = parts.next()?.parse().ok()?;
        if parts.next().is_some() {
            return None;
        }
        Some(Watermark {
            at_ms,
            updating,
            refreshed_ms,
        })
    }

    /// Whether this copy was refreshed recently enough to be used at `now_ms`.
    pub fn is_fresh(&self, now_ms: u64, stale_ms: u64) -> bool {
        now_ms.saturating_sub(self.refreshed_ms) <= stale_ms
    }
}

/// The shared-data key of a namespace's watermark.
pub fn shared_key(namespace: &str) -> String {
    format!("hevlayer.watermark:{namespace}")
}

/// A namespace a request used, for the tracker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Touch {
    pub namespace: String,
    /// A write to it succeeded (the sidecar then polls it often for a while).
    pub written: bool,
    /// The caller's `authorization` (passthrough mode): what the sidecar polls with.
    pub authorization: Option<String>,
}

#[derive(Debug)]
struct Tracked {
    used_ms: u64,
    /// The registration that will carry the last write (0: none pending).
    written: u64,
    authorization: Option<String>,
    /// The registration that will carry the authorization (0: sent already).
    authorization_due: u64,
    /// The sidecar's last answer for it.
    watermark: Option<Watermark>,
}

/// A registration ready to send, and its sequence number for [`Tracker::acknowledge`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub body: Vec<u8>,
    pub seq: u64,
}

/// The namespaces this VM asks the sidecar to watch: at most `capacity` (the least recently used
/// leaves first), each dropped after `idle_ms` without a query or write.
#[derive(Debug)]
pub struct Tracker {
    entries: HashMap<String, Tracked>,
    capacity: usize,
    idle_ms: u64,
    /// The last registration built.
    seq: u64,
}

impl Tracker {
    pub fn new(capacity: usize, idle_ms: u64) -> Self {
        Tracker {
            entries: HashMap::default(),
            capacity: capacity.max(1),
            idle_ms,
            seq: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Records that a request used a namespace.
    pub fn touch(&mut self, touch: Touch, now_ms: u64) {
        let next = self.seq + 1;
        if !self.entries.contains_key(&touch.namespace) && self.entries.len() >= self.capacity {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, t)| t.used_ms)
                .map(|(name, _)| name.clone());
            if let Some(name) = oldest {
                self.entries.remove(&name);
            }
        }
        let entry = self.entries.entry(touch.namespace).or_insert(Tracked {
            used_ms: now_ms,
            written: 0,
            authorization: None,
            authorization_due: 0,
            watermark: None,
        });
        entry.used_ms = entry.used_ms.max(now_ms);
        if touch.written {
            entry.written = next;
        }
        if let Some(auth) = touch.authorization {
            entry.authorization = Some(auth);
            entry.authorization_due = next;
        }
    }

    /// Drops idle namespaces and builds the next registration, or `None` when nothing is tracked.
    /// A write or an authorization goes in every registration until one carrying it is
    /// acknowledged.
    pub fn registration(&mut self, now_ms: u64) -> Option<Registration> {
        let idle_ms = self.idle_ms;
        self.entries
            .retain(|_, t| now_ms.saturating_sub(t.used_ms) <= idle_ms);
        if self.entries.is_empty() {
            return None;
        }
        self.seq += 1;
        let mut namespaces: Vec<WatchedNamespace> = self
            .entries
            .iter()
            .map(|(name, t)| WatchedNamespace {
                namespace: name.clone(),
                written: t.written != 0,
                authorization: if t.authorization_due != 0 {
                    t.authorization.clone()
                } else {
                    None
                },
            })
            .collect();
        namespaces.sort_by(|a, b| a.namespace.cmp(&b.namespace));
        let body = serde_json::to_vec(&WatermarkRegistration { namespaces }).ok()?;
        Some(Registration { body, seq: self.seq })
    }

    /// This worker's copy of a tracked namespace's watermark.
    pub fn watermark(&self, namespace: &str) -> Option<Watermark> {
        self.lookup(namespace).flatten()
    }

    /// `Some` when `namespace` is tracked here: its watermark as this worker last heard it (the
    /// root refreshes every tracked namespace, so no other copy is newer); `None` otherwise.
    pub fn lookup(&self, namespace: &str) -> Option<Option<Watermark>> {
        self.entries.get(namespace).map(|t| t.watermark)
    }

    /// Keeps the sidecar's answer for the namespaces still tracked.
    pub fn store(&mut self, answer: &[(String, Option<Watermark>)]) {
        for (namespace, known) in answer {
            if let Some(t) = self.entries.get_mut(namespace) {
                t.watermark = *known;
            }
        }
    }

    /// The sidecar accepted registration `seq`: what it carried need not be sent again.
    pub fn acknowledge(&mut self, seq: u64) {
        for t in self.entries.values_mut() {
            if t.written <= seq {
                t.written = 0;
            }
            if t.authorization_due <= seq {
                t.authorization_due = 0;
            }
        }
    }
}

/// Reads the sidecar's answer to a registration: each namespace and its watermark as stored at
/// `now_ms` (`None`: not known yet).
pub fn parse_answer(body: &[u8], now_ms: u64) -> Result<Vec<(String, Option<Watermark>)>, String> {
    let answer: WatermarkAnswer =
        serde_json::from_slice(body).map_err(|e| format!("unreadable watermark answer: {e}"))?;
    Ok(answer
        .watermarks
        .into_iter()
        .map(|w| {
            let known = w.watermark.map(|at_ms| Watermark {
                at_ms,
                updating: w.updating,
                refreshed_ms: now_ms,
            });
            (w.namespace, known)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn touch(ns: &str, written: bool, auth: Option<&str>) -> Touch {
        Touch {
            namespace: ns.to_owned(),
            written,
            authorization: auth.map(str::to_owned),
        }
    }

    fn sent(reg: &Registration) -> WatermarkRegistration {
        serde_json::from_slice(&reg.body).unwrap()
    }

    #[test]
    fn entries_round_trip_and_age() {
        let w = Watermark {
            at_ms: 1_700_000_000_000,
            updating: true,
            refreshed_ms: 1_700_000_000_500,
        };
        assert_eq!(Watermark::decode(&w.encode()), Some(w));
        for bad in ["", "1,2,3", "1,1", "a,0,1", "1,0,2,3", "1,true,2"] {
            assert_eq!(Watermark::decode(bad.as_bytes()), None, "{bad}");
        }
        assert!(w.is_fresh(1_700_000_005_500, 5_000));
        assert!(!w.is_fresh(1_700_000_005_501, 5_000));
        assert!(w.is_fresh(0, 5_000), "a clock behind the copy is not staleness");
        assert_eq!(shared_key("a/b"), "hevlayer.watermark:a/b");
    }

    #[test]
    fn writes_and_keys_are_sent_until_acknowledged() {
        let mut t = Tracker::new(10, 60_000);
        assert_eq!(t.registration(0), None);
        t.touch(touch("b", false, Some("Bearer k")), 10);
        t.touch(touch("a", true, None), 10);
        let first = t.registration(20).unwrap();
        let body = sent(&first);
        assert_eq!(body.namespaces.len(), 2);
        assert_eq!(body.namespaces[0].namespace, "a");
        assert!(body.namespaces[0].written);
        assert_eq!(body.namespaces[1].authorization.as_deref(), Some("Bearer k"));
        // Not acknowledged (the callout failed): the next one carries them again.
        let second = t.registration(30).unwrap();
        assert!(sent(&second).namespaces[0].written);
        // A write after a registration was built belongs to the next one, even if the earlier
        // one is acknowledged afterwards.
        t.touch(touch("a", true, None), 35);
        t.acknowledge(second.seq);
        let third = sent(&t.registration(40).unwrap());
        assert!(third.namespaces[0].written);
        assert_eq!(third.namespaces[1].authorization, None);
        t.acknowledge(t.seq);
        let fourth = sent(&t.registration(50).unwrap());
        assert!(fourth
            .namespaces
            .iter()
            .all(|n| !n.written && n.authorization.is_none()));
    }

    #[test]
    fn the_set_is_bounded_and_idle_namespaces_leave() {
        let mut t = Tracker::new(3, 1_000);
        for (i, ns) in ["a", "b", "c"].iter().enumerate() {
            t.touch(touch(ns, false, None), i as u64);
        }
        t.touch(touch("a", false, None), 10);
        t.touch(touch("d", false, None), 11);
        assert_eq!(t.len(), 3);
        let names: Vec<String> = sent(&t.registration(12).unwrap())
            .namespaces
            .into_iter()
            .map(|n| n.namespace)
            .collect();
        assert_eq!(names, ["a", "c", "d"], "b was the least recently used");
        t.touch(touch("d", false, None), 900);
        let names: Vec<String> = sent(&t.registration(1_011).unwrap())
            .namespaces
            .into_iter()
            .map(|n| n.namespace)
            .collect();
        assert_eq!(names, ["d"]);
        assert_eq!(t.registration(5_000), None);
        assert!(t.is_empty());
    }

    #[test]
    fn the_worker_keeps_its_own_copy_of_tracked_watermarks() {
        let mut t = Tracker::new(10, 60_000);
        t.touch(touch("a", false, None), 0);
        assert_eq!(t.watermark("a"), None);
        assert_eq!(t.lookup("a"), Some(None), "tracked, its watermark not heard yet");
        assert_eq!(t.lookup("untracked"), None);
        let w = Watermark {
            at_ms: 5,
            updating: true,
            refreshed_ms: 9,
        };
        t.store(&[("a".to_owned(), Some(w)), ("untracked".to_owned(), Some(w))]);
        assert_eq!(t.watermark("a"), Some(w));
        assert_eq!(t.watermark("untracked"), None, "only tracked namespaces are kept");
        t.store(&[("a".to_owned(), None)]);
        assert_eq!(t.watermark("a"), None, "the sidecar forgot it: so does the copy");
    }

    #[test]
    fn answers_are_read_with_the_refresh_time() {
        let body = br#"{"watermarks":[{"namespace":"a","watermark":5,"updating":true},{"namespace":"b","watermark":null,"updating":false}]}"#;
        let parsed = parse_answer(body, 77).unwrap();
        assert_eq!(
            parsed,
            vec![
                (
                    "a".to_owned(),
                    Some(Watermark {
                        at_ms: 5,
                        updating: true,
                        refreshed_ms: 77
                    })
                ),
                ("b".to_owned(), None)
            ]
        );
        assert!(parse_answer(b"upstream connect error", 1).is_err());
    }
}
