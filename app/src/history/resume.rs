//! A channel's history, as both stores see it: what a read of it returns ([`Snapshot`]) and the
//! one decision every resume takes from a read ([`resume`]): is the gap after a client's
//! position still whole, and which messages fill it.
//!
//! The stores are `redis_stream` (a Redis Stream shared by every instance) and `ring`
//! (in-process, without Redis). Both keep the same facts: the current epoch, the greatest id ever added
//! (`last_added`), the greatest id trimmed away (`max_trimmed`), and the messages after a given
//! id. A gap after id `L` of epoch `E` is whole exactly when the epoch is still `E`, `L` is not
//! newer than anything added, and nothing newer than `L` has been trimmed.

use super::outlet::Delivery;
use crate::position::{MessageId, Position};

/// A read of the history, for a client (or this instance's subscriber) at some position.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The history's current epoch.
    pub epoch: String,
    /// The greatest id ever added in this epoch (`0-0` before the first message).
    pub last_added: MessageId,
    /// The greatest id trimmed away in this epoch (`0-0` when nothing was).
    pub max_trimmed: MessageId,
    /// The messages after the position the read was made for, in order (empty when the read
    /// was for no position, or for another epoch).
    pub after: Vec<Delivery>,
}

/// What a client resuming from a position gets.
#[derive(Debug, Clone)]
pub struct Resume {
    /// Whether `missed` is exactly what the client missed.
    pub recovered: bool,
    /// The current epoch.
    pub epoch: String,
    /// The client's position once `missed` is delivered.
    pub last: MessageId,
    /// The missed messages, in order.
    pub missed: Vec<Delivery>,
    /// Why nothing was recovered.
    pub reason: Option<&'static str>,
}

/// A message accepted into the history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// Its id.
    pub id: MessageId,
    /// The epoch of that id.
    pub epoch: String,
    /// `true` when its `cid` had been published before: nothing new was added, `id` is the
    /// first send's.
    pub duplicate: bool,
}

/// Why a position cannot be resumed from (the client is told, in `reason`).
pub const EPOCH_CHANGED: &str = "the history was reset since your last message (epoch changed)";
/// The position is newer than anything in the history.
pub const UNKNOWN_ID: &str = "your last message id is not in this history";
/// Messages after the position are gone.
pub const TRIMMED: &str = "messages after your last one are older than the history keeps";

/// Decides what a client at `from` gets, given a read made for that position. `None` is a fresh
/// client: nothing to recover, its position is the newest id.
pub fn resume(snapshot: Snapshot, from: Option<&Position>) -> Resume {
    let Snapshot {
        epoch,
        last_added,
        max_trimmed,
        after,
    } = snapshot;
    let refused = |reason| Resume {
        recovered: false,
        epoch: epoch.clone(),
        last: last_added,
        missed: Vec::new(),
        reason: Some(reason),
    };
    let Some(from) = from else {
        return Resume {
            recovered: true,
            epoch,
            last: last_added,
            missed: Vec::new(),
            reason: None,
        };
    };
    if from.epoch != epoch {
        return refused(EPOCH_CHANGED);
    }
    if from.last > last_added {
        return refused(UNKNOWN_ID);
    }
    if max_trimmed > from.last {
        return refused(TRIMMED);
    }
    let missed: Vec<Delivery> = after
        .into_iter()
        .filter(|m| m.id.is_some_and(|id| id > from.last))
        .collect();
    let last = missed.last().and_then(|m| m.id).unwrap_or(from.last);
    Resume {
        recovered: true,
        epoch,
        last,
        missed,
        reason: None,
    }
}

#[cfg(test)]
mod tests {
    use axum::extract::ws::Utf8Bytes;

    use super::*;

    fn id(ms: u64) -> MessageId {
        MessageId { ms, seq: 0 }
    }

    fn snapshot(after: &[u64]) -> Snapshot {
        Snapshot {
            epoch: "e1".into(),
            last_added: id(10),
            max_trimmed: id(3),
            after: after
                .iter()
                .map(|&ms| Delivery {
                    id: Some(id(ms)),
                    text: Utf8Bytes::from(ms.to_string()),
                })
                .collect(),
        }
    }

    fn at(epoch: &str, ms: u64) -> Position {
        Position {
            epoch: epoch.into(),
            last: id(ms),
        }
    }

    #[test]
    fn a_fresh_client_starts_at_the_newest_id() {
        let r = resume(snapshot(&[]), None);
        assert!(r.recovered);
        assert_eq!(
            (r.last, r.missed.len(), r.epoch.as_str()),
            (id(10), 0, "e1")
        );
    }

    #[test]
    fn a_whole_gap_is_filled_exactly() {
        let r = resume(snapshot(&[6, 8, 10]), Some(&at("e1", 5)));
        assert!(r.recovered);
        let ids: Vec<_> = r.missed.iter().map(|m| m.id.unwrap().ms).collect();
        assert_eq!(ids, [6, 8, 10]);
        assert_eq!(r.last, id(10));
        // The trimmed boundary itself is fine: everything after it is kept.
        assert!(resume(snapshot(&[4]), Some(&at("e1", 3))).recovered);
        // Entries the read returned at or before the position are not sent again.
        let r = resume(snapshot(&[5, 6]), Some(&at("e1", 5)));
        assert_eq!(r.missed.len(), 1);
    }

    #[test]
    fn an_up_to_date_client_misses_nothing_and_keeps_its_position() {
        let r = resume(snapshot(&[]), Some(&at("e1", 10)));
        assert!(r.recovered);
        assert_eq!((r.last, r.missed.len()), (id(10), 0));
    }

    #[test]
    fn broken_gaps_are_refused_with_a_reason() {
        for (from, reason) in [
            (at("e0", 5), EPOCH_CHANGED),
            (at("e1", 11), UNKNOWN_ID),
            (at("e1", 2), TRIMMED),
        ] {
            let r = resume(snapshot(&[6]), Some(&from));
            assert!(!r.recovered, "{from:?}");
            assert_eq!(r.reason, Some(reason));
            assert!(r.missed.is_empty());
            assert_eq!((r.epoch.as_str(), r.last), ("e1", id(10)));
        }
    }
}
