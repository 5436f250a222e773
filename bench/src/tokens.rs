//! Signed-in load (`--token-secret` or `--token-key` of `bench fanout`): each client signs in
//! to an app in token mode with a token of its own, minted here before the connections open
//! (so the generator's signing is not in the window) and sent as its first frame.

use std::path::PathBuf;

use anyhow::Context;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

/// How clients get their tokens.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TokenArgs {
    /// Token mode with an HMAC secret: the file the apps' `[auth] secret_file` names (HS256).
    #[arg(long, value_name = "FILE", conflicts_with = "token_key")]
    pub(crate) token_secret: Option<PathBuf>,
    /// Token mode with a private key (PEM, e.g. ES256) whose public half the apps verify with.
    #[arg(long, value_name = "FILE", requires = "token_alg")]
    pub(crate) token_key: Option<PathBuf>,
    /// The private key's algorithm (ES256, RS256, EdDSA).
    #[arg(long, value_name = "ALG")]
    pub(crate) token_alg: Option<Algorithm>,
}

/// Signs the clients' tokens.
pub struct Signer {
    key: EncodingKey,
    algorithm: Algorithm,
}

impl TokenArgs {
    /// The signer these options name, if any.
    pub fn signer(&self) -> anyhow::Result<Option<Signer>> {
        let read = |path: &PathBuf| {
            std::fs::read(path).with_context(|| format!("reading {}", path.display()))
        };
        let (key, algorithm) = match (&self.token_secret, &self.token_key, self.token_alg) {
            (Some(secret), _, _) => (EncodingKey::from_secret(&read(secret)?)?, Algorithm::HS256),
            (None, Some(pem), Some(alg @ (Algorithm::ES256 | Algorithm::ES384))) => {
                (EncodingKey::from_ec_pem(&read(pem)?)?, alg)
            }
            (None, Some(pem), Some(Algorithm::EdDSA)) => {
                (EncodingKey::from_ed_pem(&read(pem)?)?, Algorithm::EdDSA)
            }
            (None, Some(pem), Some(alg)) => (EncodingKey::from_rsa_pem(&read(pem)?)?, alg),
            _ => return Ok(None),
        };
        Ok(Some(Signer { key, algorithm }))
    }
}

impl Signer {
    /// A token for user `name` (its display name too), valid for an hour.
    pub fn mint(&self, name: &str) -> anyhow::Result<String> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        let claims =
            serde_json::json!({ "sub": name, "name": name, "iat": now, "exp": now + 3600 });
        Ok(jsonwebtoken::encode(
            &Header::new(self.algorithm),
            &claims,
            &self.key,
        )?)
    }
}
