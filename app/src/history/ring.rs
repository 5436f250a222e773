//! The in-process history, for a single instance without Redis: the same semantics as the
//! Redis Stream (`redis_stream`) from a ring buffer.
//!
//! [`Ring::publish`] gives a message the next id (`<ms>-<seq>` from this process' clock, never
//! going backwards), appends it, trims by count and age, remembers its `cid` for the dedupe
//! window, and hands it to the room's [`Outlet`]. [`Ring::read`] answers a resume. The epoch is
//! new at every start of the process: its history starts empty.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::ws::Utf8Bytes;

use super::{Delivery, HistoryConfig, Outlet, Page, Published, Range, Snapshot};
use crate::position::{MessageId, Position, new_epoch};
use crate::protocol;

/// The history of one room of this process.
pub struct Ring {
    epoch: String,
    config: HistoryConfig,
    state: Mutex<State>,
    /// Where each new message goes: the room's members.
    outlet: Arc<dyn Outlet>,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct State {
    entries: VecDeque<Entry>,
    last_added: MessageId,
    max_trimmed: MessageId,
    /// `cid` → the id it got, within the dedupe window.
    cids: HashMap<String, MessageId>,
    /// The same `cid`s in the order they were added (so in expiry order: one window for all),
    /// so forgetting the expired ones costs only them, not a scan of the map per message.
    expiry: VecDeque<(Instant, String)>,
}

#[derive(Debug)]
struct Entry {
    added: Instant,
    delivery: Delivery,
}

impl Ring {
    /// An empty history with a new epoch, handing its messages to `outlet`.
    pub fn new(config: HistoryConfig, outlet: Arc<dyn Outlet>) -> Ring {
        Ring {
            epoch: new_epoch(),
            config,
            state: Mutex::new(State::default()),
            outlet,
        }
    }

    /// Adds `body` (a serialised chat message) and hands it to the outlet, unless `cid` was
    /// published within the dedupe window; returns where it is.
    pub fn publish(&self, body: &str, cid: Option<&str>) -> Published {
        self.publish_at(body, cid, Instant::now(), unix_ms())
    }

    fn publish_at(&self, body: &str, cid: Option<&str>, now: Instant, now_ms: u64) -> Published {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some((until, _)) = state.expiry.front() {
            if *until > now {
                break;
            }
            if let Some((_, cid)) = state.expiry.pop_front() {
                state.cids.remove(&cid);
            }
        }
        if let Some(id) = cid.and_then(|cid| state.cids.get(cid)) {
            let published = Published {
                id: *id,
                epoch: self.epoch.clone(),
                duplicate: true,
            };
            return published;
        }
        let last = state.last_added;
        let id = if now_ms > last.ms {
            MessageId { ms: now_ms, seq: 0 }
        } else {
            MessageId {
                ms: last.ms,
                seq: last.seq.saturating_add(1),
            }
        };
        let delivery = Delivery {
            id: Some(id),
            text: Utf8Bytes::from(protocol::with_position(body, id, &self.epoch)),
        };
        state.entries.push_back(Entry {
            added: now,
            delivery: delivery.clone(),
        });
        state.last_added = id;
        if let Some(cid) = cid {
            let until = now + self.config.dedupe_window;
            state.cids.insert(cid.to_owned(), id);
            state.expiry.push_back((until, cid.to_owned()));
        }
        self.trim(&mut state, now);
        // Handed on under the lock: the outlet sees ids in the order they were given, as the
        // Redis channel's order is the Stream's (it skips an id older than one it has seen).
        self.outlet.deliver(delivery, Some(&self.epoch));
        Published {
            id,
            epoch: self.epoch.clone(),
            duplicate: false,
        }
    }

    fn trim(&self, state: &mut State, now: Instant) {
        let too_old = |e: &Entry| now.duration_since(e.added) > self.config.max_age;
        while let Some(first) = state.entries.front() {
            if state.entries.len() <= self.config.messages && !too_old(first) {
                break;
            }
            if let Some(gone) = state.entries.pop_front() {
                state.max_trimmed = gone.delivery.id.unwrap_or(state.max_trimmed);
            }
        }
    }

    /// The history as a resume from `from` needs it.
    pub fn read(&self, from: Option<&Position>) -> Snapshot {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        self.trim(&mut state, Instant::now());
        let after = match from {
            Some(from) if from.epoch == self.epoch => state
                .entries
                .iter()
                .filter(|e| e.delivery.id.is_some_and(|id| id > from.last))
                .map(|e| e.delivery.clone())
                .collect(),
            _ => Vec::new(),
        };
        Snapshot {
            epoch: self.epoch.clone(),
            last_added: state.last_added,
            max_trimmed: state.max_trimmed,
            after,
        }
    }
}

impl Ring {
    /// The page of the history `range` names.
    pub fn page(&self, range: &Range) -> Page {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        self.trim(&mut state, Instant::now());
        Page {
            epoch: self.epoch.clone(),
            messages: range.select(state.entries.iter().map(|e| &e.delivery)),
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::history::resume::{TRIMMED, resume};

    /// An outlet that keeps what it is handed.
    #[derive(Default)]
    struct Kept(Mutex<Vec<(Delivery, Option<String>)>>);

    impl Outlet for Kept {
        fn deliver(&self, message: Delivery, epoch: Option<&str>) {
            let mut kept = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            kept.push((message, epoch.map(str::to_owned)));
        }
    }

    fn ring_into(messages: usize, age_s: u64, outlet: Arc<Kept>) -> Ring {
        let config = HistoryConfig {
            messages,
            max_age: Duration::from_secs(age_s),
            dedupe_window: Duration::from_secs(60),
        };
        Ring::new(config, outlet)
    }

    fn ring(messages: usize, age_s: u64) -> Ring {
        ring_into(messages, age_s, Arc::default())
    }

    #[test]
    fn ids_grow_within_a_millisecond_and_never_go_back() {
        let ring = ring(10, 60);
        let now = Instant::now();
        let a = ring.publish_at("{}", None, now, 100).id;
        let b = ring.publish_at("{}", None, now, 100).id;
        let c = ring.publish_at("{}", None, now, 99).id;
        let d = ring.publish_at("{}", None, now, 101).id;
        assert_eq!(a, MessageId { ms: 100, seq: 0 });
        assert!(a < b && b < c && c < d, "{a} {b} {c} {d}");
    }

    #[test]
    fn a_repeated_cid_is_published_once_with_the_first_id() {
        let outlet = Arc::new(Kept::default());
        let ring = ring_into(10, 60, Arc::clone(&outlet));
        let first = ring.publish(r#"{"content":"x"}"#, Some("c1"));
        assert!(!first.duplicate);
        let again = ring.publish(r#"{"content":"x"}"#, Some("c1"));
        assert!(again.duplicate);
        assert_eq!(again.id, first.id);
        {
            let kept = outlet.0.lock().unwrap();
            assert_eq!(kept.len(), 1, "handed on once");
            let (delivery, epoch) = &kept[0];
            assert_eq!(delivery.id, Some(first.id));
            assert_eq!(epoch.as_deref(), Some(first.epoch.as_str()));
            let text = delivery.text.as_str();
            assert!(text.contains(&format!("\"id\":\"{}\"", first.id)), "{text}");
        }
        assert_eq!(ring.read(None).last_added, first.id);
        // Past the window the cid is forgotten.
        let later = Instant::now() + Duration::from_secs(61);
        let third = ring.publish_at("{}", Some("c1"), later, unix_ms());
        assert!(!third.duplicate);
    }

    #[test]
    fn concurrent_senders_reach_the_outlet_in_id_order() {
        let outlet = Arc::new(Kept::default());
        let ring = Arc::new(ring_into(1000, 60, Arc::clone(&outlet)));
        let senders: Vec<_> = (0..4)
            .map(|_| {
                let ring = Arc::clone(&ring);
                std::thread::spawn(move || {
                    for _ in 0..100 {
                        ring.publish("{}", None);
                    }
                })
            })
            .collect();
        for sender in senders {
            sender.join().unwrap();
        }
        let kept = outlet.0.lock().unwrap();
        let ids: Vec<MessageId> = kept.iter().filter_map(|(d, _)| d.id).collect();
        assert_eq!(ids.len(), 400);
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "out of order");
    }

    #[test]
    fn a_resume_gets_what_came_after_and_trimming_is_detected() {
        let ring = ring(3, 60);
        let ids: Vec<MessageId> = (0..5).map(|_| ring.publish("{}", None).id).collect();
        let epoch = ring.read(None).epoch;
        let from = Position {
            epoch: epoch.clone(),
            last: ids[2],
        };
        let r = resume(ring.read(Some(&from)), Some(&from));
        assert!(r.recovered);
        assert_eq!(
            r.missed.iter().map(|m| m.id).collect::<Vec<_>>(),
            [Some(ids[3]), Some(ids[4])]
        );
        // Only three are kept: after ids[0], ids[1] is gone.
        let from = Position {
            epoch,
            last: ids[0],
        };
        let r = resume(ring.read(Some(&from)), Some(&from));
        assert_eq!(r.reason, Some(TRIMMED));
    }

    #[test]
    fn old_messages_leave_by_age() {
        let ring = ring(100, 1);
        let start = Instant::now();
        let first = ring.publish_at("{}", None, start, 1).id;
        ring.publish_at("{}", None, start + Duration::from_secs(2), 2);
        let snapshot = ring.read(None);
        assert_eq!(snapshot.max_trimmed, first);
    }
}
