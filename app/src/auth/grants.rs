//! Room grants: the rooms a token's `rooms` claim lets its holder join, as exact names or
//! prefixes ending in `*` (`team-*` grants `team-a` and `team-b`, `*` grants every room).

/// One entry of a token's `rooms` claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// Exactly this room.
    Room(String),
    /// Every room whose name starts with this (the claim's entry without its `*`).
    Prefix(String),
}

/// The rooms a token grants beyond the public ones; empty when the claim is absent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants(Vec<Grant>);

/// Why a `rooms` claim is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    /// More entries than [`Grants::MAX`].
    #[error("the rooms claim lists {count} entries, more than {max}")]
    TooMany {
        /// Entries in the claim.
        count: usize,
        /// The most accepted.
        max: usize,
    },
    /// An entry that is empty, too long, or has a `*` anywhere but at its end.
    #[error("the rooms claim entry {entry:?} is not a room name or a prefix ending in *")]
    Entry {
        /// The offending entry, cut to 64 characters.
        entry: String,
    },
}

impl Grants {
    /// The most entries a `rooms` claim may list.
    pub const MAX: usize = 256;
    /// The longest entry, in characters (room names are at most 64).
    const MAX_ENTRY_CHARS: usize = 65;

    /// Reads a `rooms` claim; `None` (claim absent) grants nothing beyond the public rooms.
    pub fn from_claim(claim: Option<&[String]>) -> Result<Grants, GrantError> {
        let Some(entries) = claim else {
            return Ok(Grants::default());
        };
        if entries.len() > Self::MAX {
            return Err(GrantError::TooMany {
                count: entries.len(),
                max: Self::MAX,
            });
        }
        entries
            .iter()
            .map(|entry| Self::entry(entry))
            .collect::<Result<Vec<_>, _>>()
            .map(Grants)
    }

    fn entry(entry: &str) -> Result<Grant, GrantError> {
        let refused = || GrantError::Entry {
            entry: entry.chars().take(64).collect(),
        };
        if entry.is_empty() || entry.chars().count() > Self::MAX_ENTRY_CHARS {
            return Err(refused());
        }
        match entry.strip_suffix('*') {
            Some(prefix) if !prefix.contains('*') => Ok(Grant::Prefix(prefix.to_owned())),
            Some(_) => Err(refused()),
            None if entry.contains('*') => Err(refused()),
            None => Ok(Grant::Room(entry.to_owned())),
        }
    }

    /// Whether these grants let their holder join `room`.
    pub fn allows(&self, room: &str) -> bool {
        self.0.iter().any(|grant| match grant {
            Grant::Room(name) => name == room,
            Grant::Prefix(prefix) => room.starts_with(prefix.as_str()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grants(entries: &[&str]) -> Grants {
        let owned: Vec<String> = entries.iter().map(|e| (*e).to_owned()).collect();
        match Grants::from_claim(Some(&owned)) {
            Ok(grants) => grants,
            Err(e) => panic!("{entries:?} refused: {e}"),
        }
    }

    #[test]
    fn an_absent_claim_grants_nothing() {
        let none = Grants::from_claim(None);
        assert_eq!(none, Ok(Grants::default()));
        assert!(!Grants::default().allows("lobby"));
    }

    #[test]
    fn exact_names_and_prefixes_match_as_written() {
        let g = grants(&["lobby", "team-*"]);
        assert!(g.allows("lobby"));
        assert!(!g.allows("lobby2"), "an exact name is not a prefix");
        assert!(g.allows("team-a"));
        assert!(g.allows("team-"));
        assert!(!g.allows("team"), "the prefix includes its dash");
        assert!(!g.allows("other"));
        assert!(grants(&["*"]).allows("anything"));
    }

    #[test]
    fn malformed_entries_are_refused() {
        for bad in ["", "a*b", "**", "*a", &"x".repeat(70)] {
            let claim = vec![bad.to_owned()];
            assert!(
                matches!(
                    Grants::from_claim(Some(&claim)),
                    Err(GrantError::Entry { .. })
                ),
                "{bad:?} accepted"
            );
        }
        let many = vec!["r".to_owned(); Grants::MAX + 1];
        assert_eq!(
            Grants::from_claim(Some(&many)),
            Err(GrantError::TooMany {
                count: Grants::MAX + 1,
                max: Grants::MAX
            })
        );
    }
}
