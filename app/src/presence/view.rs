//! What a room's presence looks like and how it changes, as pure data: the [`Tally`] of one
//! instance's connections by member, the [`View`] merged from every instance's tallies, the
//! [`Diff`] between two views, and the frames members receive.
//!
//! A member is a user (a token's `sub`) or, in anonymous mode, a name: a user with three tabs
//! is one member with `conns: 3`, and anonymous connections that last used the same name are
//! one member. A connection that has not named itself yet (anonymous, before its first
//! message) is counted in `count` but listed under no member. Frames:
//! `{"presence":"state","members":[{"user","name","conns"}...],"count":N}` (at most
//! [`MAX_LISTED`] members) and `{"presence":"diff","joins":[...],"leaves":[...],"count":N}`,
//! where a join is a member that arrived or whose entry changed (it replaces the old one).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Most members a state frame lists; `count` still counts every connection.
pub const MAX_LISTED: usize = 500;

/// Who a connection is: a user (token mode) and the name it shows, if it has one yet.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Who {
    /// The user id (a token's `sub`); `None` in anonymous mode.
    pub user: Option<String>,
    /// The name shown: the token's name, or the name of an anonymous connection's last message.
    pub name: Option<String>,
}

impl Who {
    /// The member this connection belongs to: its user, else its name; `None` for an anonymous
    /// connection that has not named itself.
    fn member(&self) -> Option<MemberId> {
        match (&self.user, &self.name) {
            (Some(user), _) => Some(MemberId::User(user.clone())),
            (None, Some(name)) => Some(MemberId::Name(name.clone())),
            (None, None) => None,
        }
    }

    /// The field this connection is counted under in Redis (compact JSON, `[user, name]`).
    pub fn to_field(&self) -> String {
        serde_json::to_string(&(&self.user, &self.name)).unwrap_or_else(|_| "[null,null]".into())
    }

    /// The inverse of [`Who::to_field`]; `None` for a field this code did not write.
    pub fn from_field(field: &str) -> Option<Who> {
        let (user, name) = serde_json::from_str::<(Option<String>, Option<String>)>(field).ok()?;
        Some(Who { user, name })
    }
}

/// A member's identity in a view: a user, or (anonymous) a name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MemberId {
    /// A signed-in user.
    User(String),
    /// Anonymous connections that last used this name.
    Name(String),
}

/// One instance's connections in one room, by who they are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally(BTreeMap<Who, usize>);

impl Tally {
    /// One more connection as `who`.
    pub fn add(&mut self, who: &Who) {
        *self.0.entry(who.clone()).or_default() += 1;
    }

    /// One connection as `who` fewer.
    pub fn remove(&mut self, who: &Who) {
        if let Some(n) = self.0.get_mut(who) {
            *n -= 1;
            if *n == 0 {
                self.0.remove(who);
            }
        }
    }

    /// Connections counted.
    pub fn connections(&self) -> usize {
        self.0.values().sum()
    }

    /// Whether no connection is counted.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Each `who` and its connections.
    pub fn entries(&self) -> impl Iterator<Item = (&Who, usize)> {
        self.0.iter().map(|(who, n)| (who, *n))
    }

    /// A tally from `(who, connections)` pairs (as read back from Redis).
    pub fn from_entries(entries: impl IntoIterator<Item = (Who, usize)>) -> Tally {
        let mut tally = Tally::default();
        for (who, n) in entries {
            if n > 0 {
                *tally.0.entry(who).or_default() += n;
            }
        }
        tally
    }
}

/// A member as members see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Shown {
    /// The user id, in token mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The name shown.
    pub name: String,
    /// Its connections, on every instance.
    pub conns: usize,
}

/// A member that left, as members see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Gone {
    /// The user id, in token mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The name it showed.
    pub name: String,
}

/// A room's presence across every instance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    members: BTreeMap<MemberId, Shown>,
    /// Every connection, named or not.
    count: usize,
}

impl View {
    /// The view of `tallies` (one per instance) together.
    pub fn merge<'a>(tallies: impl IntoIterator<Item = &'a Tally>) -> View {
        let mut view = View::default();
        for tally in tallies {
            for (who, n) in tally.entries() {
                view.count += n;
                let Some(id) = who.member() else { continue };
                let shown = view.members.entry(id).or_insert_with(|| Shown {
                    user: who.user.clone(),
                    name: who
                        .name
                        .clone()
                        .or_else(|| who.user.clone())
                        .unwrap_or_default(),
                    conns: 0,
                });
                shown.conns += n;
            }
        }
        view
    }

    /// Connections in the room.
    pub fn count(&self) -> usize {
        self.count
    }

    /// The members, ordered by user, then name.
    pub fn members(&self) -> impl Iterator<Item = &Shown> {
        self.members.values()
    }

    /// The members of `user`'s (at most one).
    pub fn member_of(&self, user: &str) -> Option<&Shown> {
        self.members.get(&MemberId::User(user.to_owned()))
    }

    /// What changed from `self` to `next`; `None` when nothing did.
    pub fn diff(&self, next: &View) -> Option<Diff> {
        let joins: Vec<Shown> = next
            .members
            .iter()
            .filter(|(id, shown)| self.members.get(id) != Some(shown))
            .map(|(_, shown)| shown.clone())
            .collect();
        let leaves: Vec<Gone> = self
            .members
            .iter()
            .filter(|(id, _)| !next.members.contains_key(id))
            .map(|(_, shown)| Gone {
                user: shown.user.clone(),
                name: shown.name.clone(),
            })
            .collect();
        if joins.is_empty() && leaves.is_empty() && self.count == next.count {
            return None;
        }
        Some(Diff {
            joins,
            leaves,
            count: next.count,
        })
    }

    /// `{"presence":"state",...}`: the whole view, at most [`MAX_LISTED`] members.
    pub fn state_json(&self) -> String {
        #[derive(Serialize)]
        struct State<'a> {
            presence: &'static str,
            members: Vec<&'a Shown>,
            count: usize,
        }
        let state = State {
            presence: "state",
            members: self.members.values().take(MAX_LISTED).collect(),
            count: self.count,
        };
        serde_json::to_string(&state).unwrap_or_else(|_| "{}".to_owned())
    }
}

/// The change between two views.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diff {
    /// Members that arrived or whose entry changed.
    pub joins: Vec<Shown>,
    /// Members that left.
    pub leaves: Vec<Gone>,
    /// Connections in the room now.
    pub count: usize,
}

impl Diff {
    /// `{"presence":"diff","joins":[...],"leaves":[...],"count":N}`.
    pub fn to_json(&self) -> String {
        #[derive(Serialize)]
        struct Frame<'a> {
            presence: &'static str,
            #[serde(flatten)]
            diff: &'a Diff,
        }
        serde_json::to_string(&Frame {
            presence: "diff",
            diff: self,
        })
        .unwrap_or_else(|_| "{}".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn anon(name: Option<&str>) -> Who {
        Who {
            user: None,
            name: name.map(str::to_owned),
        }
    }

    fn user(user: &str, name: &str) -> Who {
        Who {
            user: Some(user.to_owned()),
            name: Some(name.to_owned()),
        }
    }

    #[test]
    fn a_user_with_tabs_on_two_instances_is_one_member() {
        let mut one = Tally::default();
        let mut two = Tally::default();
        one.add(&user("u1", "Alice"));
        one.add(&user("u1", "Alice"));
        two.add(&user("u1", "Alice"));
        two.add(&anon(None));
        let view = View::merge([&one, &two]);
        assert_eq!(view.count(), 4);
        let members: Vec<&Shown> = view.members().collect();
        assert_eq!(
            members,
            [&Shown {
                user: Some("u1".into()),
                name: "Alice".into(),
                conns: 3
            }]
        );
        assert_eq!(view.member_of("u1").map(|m| m.conns), Some(3));
        assert_eq!(
            view.state_json(),
            r#"{"presence":"state","members":[{"user":"u1","name":"Alice","conns":3}],"count":4}"#
        );
    }

    #[test]
    fn anonymous_connections_are_grouped_by_their_last_name() {
        let mut tally = Tally::default();
        tally.add(&anon(Some("bob")));
        tally.add(&anon(Some("bob")));
        tally.add(&anon(None));
        let before = View::merge([&tally]);
        assert_eq!(
            before.state_json(),
            r#"{"presence":"state","members":[{"name":"bob","conns":2}],"count":3}"#
        );
        // The nameless one names itself "cy"; one "bob" leaves.
        tally.remove(&anon(None));
        tally.add(&anon(Some("cy")));
        tally.remove(&anon(Some("bob")));
        let after = View::merge([&tally]);
        let diff = before.diff(&after).unwrap();
        assert_eq!(
            diff.to_json(),
            r#"{"presence":"diff","joins":[{"name":"bob","conns":1},{"name":"cy","conns":1}],"leaves":[],"count":2}"#
        );
        tally.remove(&anon(Some("bob")));
        let diff = after.diff(&View::merge([&tally])).unwrap();
        assert_eq!(
            diff.to_json(),
            r#"{"presence":"diff","joins":[],"leaves":[{"name":"bob"}],"count":1}"#
        );
    }

    #[test]
    fn a_join_and_leave_between_two_views_is_no_diff() {
        let mut tally = Tally::default();
        tally.add(&user("u1", "A"));
        let before = View::merge([&tally]);
        tally.add(&user("u2", "B"));
        tally.remove(&user("u2", "B"));
        assert_eq!(before.diff(&View::merge([&tally])), None);
        assert!(before.diff(&View::default()).is_some());
    }

    #[test]
    fn fields_round_trip_and_foreign_ones_are_ignored() {
        for who in [anon(None), anon(Some("a\"b")), user("u", "n")] {
            assert_eq!(Who::from_field(&who.to_field()), Some(who));
        }
        assert_eq!(Who::from_field("nonsense"), None);
        assert_eq!(Who::from_field("[1,2]"), None);
    }

    #[test]
    fn the_state_lists_at_most_max_listed_members() {
        let mut tally = Tally::default();
        for i in 0..MAX_LISTED + 10 {
            tally.add(&anon(Some(&format!("n{i:04}"))));
        }
        let state: serde_json::Value =
            serde_json::from_str(&View::merge([&tally]).state_json()).unwrap();
        assert_eq!(state["members"].as_array().unwrap().len(), MAX_LISTED);
        assert_eq!(state["count"], MAX_LISTED + 10);
    }
}
