//! Signed identities: who a token connection is, and which rooms it may join.
//!
//! The operator's backend signs a JWT; `keys` loads the keys that may have signed it (HMAC
//! secret files, PEM public keys, a JWKS file; several at once, chosen by `kid`) into a
//! [`KeyRing`]; `verify` checks a token against the ring and the configured rules (algorithm
//! allow-list, `exp`, `nbf`, `iat`, `iss`, `aud`, leeway) into an [`Identity`]; `grants`
//! matches room names against the token's `rooms` claim; `gate` decides admission to a room,
//! refreshes and the close codes; `mint` signs tokens for operators (`app token`) and tests.
//! Nothing here logs or stores a token.

mod gate;
mod grants;
mod keys;
mod mint;
mod verify;

pub use gate::{CLOSE_FORBIDDEN, CLOSE_UNAUTHORIZED, Deadlines, Denied, Gate, token_of};
pub use grants::{Grant, GrantError, Grants};
pub use keys::{KeyError, KeyFiles, KeyRing, KeySource, KeySpec};
pub use mint::{MintError, Minted, SigningKey, TokenRequest};
pub use verify::{Identity, Refusal, Rules, Verifier};

/// The longest token accepted, in bytes: far above any real token (a few hundred bytes), far
/// below the frame limit, so a hostile one costs no decoding.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
