//! A page of a room's history for the server API: the messages between two ids, at most a
//! limit of them, the oldest first. With `after` the page starts right after it (paging
//! forward); with only `before` it is the newest ones before it (paging back); with neither,
//! the newest ones.

use super::Delivery;
use crate::position::MessageId;

/// Which messages a page holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    /// Only messages newer than this.
    pub after: Option<MessageId>,
    /// Only messages older than this.
    pub before: Option<MessageId>,
    /// At most this many.
    pub limit: usize,
}

impl Range {
    /// Whether `id` lies within the range's bounds.
    pub fn contains(&self, id: MessageId) -> bool {
        self.after.is_none_or(|after| id > after) && self.before.is_none_or(|before| id < before)
    }

    /// Whether the page is taken from the newest end (no `after`).
    pub fn takes_newest(&self) -> bool {
        self.after.is_none()
    }

    /// The page of `entries` (in id order): the first `limit` within the bounds, or the last
    /// `limit` when taken from the newest end; oldest first either way.
    pub fn select<'a>(
        &self,
        entries: impl DoubleEndedIterator<Item = &'a Delivery>,
    ) -> Vec<Delivery> {
        let within = |d: &&Delivery| d.id.is_some_and(|id| self.contains(id));
        if self.takes_newest() {
            let mut page: Vec<Delivery> = entries
                .rev()
                .filter(within)
                .take(self.limit)
                .cloned()
                .collect();
            page.reverse();
            page
        } else {
            entries.filter(within).take(self.limit).cloned().collect()
        }
    }
}

/// A page of history.
#[derive(Debug, Clone)]
pub struct Page {
    /// The history's current epoch (ids belong to it).
    pub epoch: String,
    /// The messages, oldest first, as clients receive them.
    pub messages: Vec<Delivery>,
}

#[cfg(test)]
mod tests {
    use axum::extract::ws::Utf8Bytes;

    use super::*;

    fn entries(n: u64) -> Vec<Delivery> {
        (1..=n)
            .map(|ms| Delivery {
                id: Some(MessageId { ms, seq: 0 }),
                text: Utf8Bytes::from(ms.to_string()),
            })
            .collect()
    }

    fn ids(page: &[Delivery]) -> Vec<u64> {
        page.iter().filter_map(|d| d.id).map(|id| id.ms).collect()
    }

    #[test]
    fn pages_forward_back_and_between() {
        let all = entries(10);
        let id = |ms| Some(MessageId { ms, seq: 0 });
        let range = |after, before, limit| Range {
            after,
            before,
            limit,
        };
        assert_eq!(ids(&range(None, None, 3).select(all.iter())), [8, 9, 10]);
        assert_eq!(ids(&range(id(2), None, 3).select(all.iter())), [3, 4, 5]);
        assert_eq!(ids(&range(None, id(5), 3).select(all.iter())), [2, 3, 4]);
        assert_eq!(ids(&range(id(2), id(5), 10).select(all.iter())), [3, 4]);
        assert!(range(id(10), None, 3).select(all.iter()).is_empty());
    }
}
