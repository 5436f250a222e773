//! Signed-in users across every instance: how many connections each holds (against
//! `max_connections_per_user`, or the token's `max_conns`), who an operator disconnected and
//! until when, and closing a user's connections on every instance.
//!
//! [`Users::claim`] gives an admitted token connection its [`Seat`], or refuses it; a disconnect
//! marks the seat and cancels the connection's own stop token, and the seat gives its place back
//! when dropped. Without Redis everything is counted here, for this instance. With Redis (`shared`),
//! each user's count is a hash of per-instance counts that every instance refreshes on a
//! heartbeat, so a dead instance's connections stop counting within [`shared::COUNT_TTL`];
//! [`Users::start`] runs that heartbeat and follows the disconnect stream every instance reads.

mod shared;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use self::shared::{COUNT_TTL, DisconnectError, disconnect_everywhere};
use crate::auth::Identity;
use crate::redis::RedisLink;

/// Why a token connection was not given a seat; the text is the close reason it reads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// An operator disconnected the user until this time (Unix seconds).
    #[error("disconnected by the operator until {0} (Unix time)")]
    Revoked(u64),
    /// The user holds its limit of connections already.
    #[error("too many connections for this user (at most {0})")]
    TooMany(u32),
    /// The count could not be read (Redis unreachable).
    #[error("cannot count this user's connections now; try again shortly")]
    Unavailable,
}

/// The signed-in users of this instance, and with Redis of every instance.
pub struct Users {
    /// `max_connections_per_user`, for tokens without `max_conns`.
    default_limit: u32,
    local: Mutex<Local>,
    shared: Option<shared::Shared>,
}

#[derive(Default)]
struct Local {
    /// Each user's connections here: a seat's id, whether an operator let it go, and the
    /// connection's stop token.
    seats: HashMap<String, Vec<(u64, Arc<AtomicBool>, CancellationToken)>>,
    next_id: u64,
    /// Without Redis: users disconnected until a time (Unix seconds).
    revoked: HashMap<String, u64>,
}

/// An admitted token connection's place in its user's count; given back when dropped.
pub struct Seat {
    users: Arc<Users>,
    user: String,
    id: u64,
    left: Arc<AtomicBool>,
}

impl Seat {
    /// Whether an operator disconnected the user (its stop token was cancelled for that).
    pub fn left(&self) -> bool {
        self.left.load(Ordering::Acquire)
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        {
            let mut local = self.users.lock();
            let emptied = local.seats.get_mut(&self.user).is_some_and(|seats| {
                seats.retain(|(id, _, _)| *id != self.id);
                seats.is_empty()
            });
            if emptied {
                local.seats.remove(&self.user);
            }
        }
        if let Some(shared) = &self.users.shared {
            shared.release(self.user.clone());
        }
    }
}

impl Users {
    /// The users of an instance that counts through `redis` when given.
    pub fn new(default_limit: u32, redis: Option<Arc<RedisLink>>) -> Arc<Users> {
        Arc::new(Users {
            default_limit,
            local: Mutex::new(Local::default()),
            shared: redis.map(shared::Shared::new),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Local> {
        self.local.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A seat for `identity`'s new connection at `now` (Unix seconds), unless the user is
    /// disconnected until later or holds its limit of connections already; `stop` is the
    /// connection's stop token, which a disconnect cancels.
    pub async fn claim(
        self: &Arc<Self>,
        identity: &Identity,
        now: u64,
        stop: CancellationToken,
    ) -> Result<Seat, Refused> {
        let limit = identity.max_conns.unwrap_or(self.default_limit);
        let issued_at = identity.issued_at.unwrap_or(0);
        match &self.shared {
            Some(shared) => shared.claim(&identity.user, limit, issued_at).await?,
            None => {
                let local = self.lock();
                if let Some(&until) = local.revoked.get(&identity.user) {
                    if until > now && issued_at < until {
                        return Err(Refused::Revoked(until));
                    }
                }
                let held = local.seats.get(&identity.user).map_or(0, Vec::len);
                if held >= usize::try_from(limit).unwrap_or(usize::MAX) {
                    return Err(Refused::TooMany(limit));
                }
            }
        }
        let left = Arc::new(AtomicBool::new(false));
        let id = {
            let mut local = self.lock();
            local.next_id += 1;
            let id = local.next_id;
            local.seats.entry(identity.user.clone()).or_default().push((
                id,
                Arc::clone(&left),
                stop,
            ));
            id
        };
        Ok(Seat {
            users: Arc::clone(self),
            user: identity.user.clone(),
            id,
            left,
        })
    }

    /// Tells this instance's connections of `user` to leave; how many there were.
    fn disconnect_here(&self, user: &str) -> usize {
        let local = self.lock();
        let seats = local.seats.get(user).map_or(&[][..], Vec::as_slice);
        for (_, left, stop) in seats {
            left.store(true, Ordering::Release);
            stop.cancel();
        }
        seats.len()
    }

    /// Disconnects `user` on every instance (this one alone without Redis) and, with `until`
    /// (Unix seconds) in the future, refuses its tokens issued before then until then.
    pub async fn disconnect(
        &self,
        user: &str,
        until: Option<u64>,
        now: u64,
    ) -> Result<(), DisconnectError> {
        match &self.shared {
            Some(shared) => shared.disconnect(user, until).await,
            None => {
                if let Some(until) = until.filter(|&until| until > now) {
                    let mut local = self.lock();
                    local.revoked.retain(|_, &mut until| until > now);
                    local.revoked.insert(user.to_owned(), until);
                }
                let closed = self.disconnect_here(user);
                tracing::info!(user, closed, "user disconnected");
                Ok(())
            }
        }
    }

    /// With Redis, runs the count's heartbeat and follows the disconnect stream on `tracker`
    /// until `stop` is cancelled.
    pub fn start(self: &Arc<Self>, tracker: &TaskTracker, stop: CancellationToken) {
        if self.shared.is_some() {
            tracker.spawn(shared::heartbeat(Arc::clone(self), stop.clone()));
            tracker.spawn(shared::follow_disconnects(Arc::clone(self), stop));
        }
    }

    /// How many connections each local user holds.
    fn local_counts(&self) -> Vec<(String, usize)> {
        self.lock()
            .seats
            .iter()
            .map(|(user, seats)| (user.clone(), seats.len()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Grants;

    /// A seat for `identity` at `now`, for a connection nothing else stops.
    async fn claim(users: &Arc<Users>, identity: &Identity, now: u64) -> Result<Seat, Refused> {
        users.claim(identity, now, CancellationToken::new()).await
    }

    fn identity(user: &str, max_conns: Option<u32>, issued_at: u64) -> Identity {
        Identity {
            user: user.to_owned(),
            name: user.to_owned(),
            grants: Grants::default(),
            max_conns,
            expires_at: issued_at + 3600,
            issued_at: Some(issued_at),
        }
    }

    #[tokio::test]
    async fn a_user_holds_at_most_its_limit_and_a_closed_seat_frees_a_place() {
        let users = Users::new(2, None);
        let alice = identity("alice", None, 100);
        let first = claim(&users, &alice, 100).await.unwrap();
        let _second = claim(&users, &alice, 100).await.unwrap();
        assert_eq!(
            claim(&users, &alice, 100).await.err(),
            Some(Refused::TooMany(2))
        );
        // Another user is counted apart, and a token's own limit wins.
        let bob = identity("bob", Some(1), 100);
        let _bob = claim(&users, &bob, 100).await.unwrap();
        assert_eq!(
            claim(&users, &bob, 100).await.err(),
            Some(Refused::TooMany(1))
        );
        drop(first);
        assert!(claim(&users, &alice, 100).await.is_ok());
    }

    #[tokio::test]
    async fn a_disconnect_tells_every_seat_of_the_user_and_until_refuses_older_tokens() {
        let users = Users::new(10, None);
        let alice = identity("alice", None, 100);
        let stops = [CancellationToken::new(), CancellationToken::new()];
        let seats = [
            users.claim(&alice, 100, stops[0].clone()).await.unwrap(),
            users.claim(&alice, 100, stops[1].clone()).await.unwrap(),
        ];
        let bob = claim(&users, &identity("bob", None, 100), 100)
            .await
            .unwrap();
        users.disconnect("alice", Some(200), 150).await.unwrap();
        assert!(seats.iter().all(Seat::left));
        assert!(stops.iter().all(CancellationToken::is_cancelled));
        assert!(!bob.left());
        // Until 200 a token issued before it is refused; at 200 the ban is over.
        assert_eq!(
            claim(&users, &alice, 150).await.err(),
            Some(Refused::Revoked(200))
        );
        assert!(claim(&users, &alice, 200).await.is_ok());
    }
}
