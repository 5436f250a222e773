//! One conversation with the CA: the account (stored, or created and stored) and one order
//! for one certificate, from `newOrder` to the issued chain.
//!
//! For each authorization still pending, the configured challenge's answer is put into
//! [`Challenges`] (the http-01 key authorization, or a tls-alpn-01 certificate), the CA is
//! told it is ready, and once every name is valid a fresh P-256 key signs the CSR (rcgen); the
//! chain comes back as PEM. Answers are taken out however the order ends. A CA that refuses
//! explains itself in a problem document (RFC 7807), which [`OrderError`] carries whole to
//! the log.

use std::time::Duration;

use instant_acme::{
    Account, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder, OrderStatus,
    Problem, RetryPolicy,
};
use rcgen::{CertificateParams, DistinguishedName, KeyPair};
use tracing::info;

use super::challenge::{Challenges, alpn_certificate};
use super::peer::Peer;
use super::storage::{Storage, StorageError};
use crate::config::{AcmeChallenge, AcmeConfig};

/// How long the CA may take to validate every name, then to issue.
const POLL_TIMEOUT: Duration = Duration::from_secs(90);

/// Why an order (or getting the account) failed.
#[derive(Debug, thiserror::Error)]
pub enum OrderError {
    /// The CA answered with a problem document.
    #[error("the CA refused: {}", problem_text(.0))]
    Problem(Problem),
    /// The CA could not be reached or answered something that is not ACME.
    #[error("ACME request failed: {0}")]
    Acme(instant_acme::Error),
    /// The CA offered no challenge of the configured type for a name.
    #[error("the CA offers no {challenge} challenge for {name}")]
    NoChallenge {
        /// The name.
        name: String,
        /// The configured challenge.
        challenge: &'static str,
    },
    /// An authorization or the order ended invalid.
    #[error("validation failed for {name}: {}", .problem.as_ref().map_or_else(|| "no reason given".to_owned(), problem_text))]
    Invalid {
        /// The name (or the whole order).
        name: String,
        /// The CA's explanation, if it gave one.
        problem: Option<Problem>,
    },
    /// A key or certificate could not be made locally.
    #[error("could not make a key or CSR: {0}")]
    Local(String),
    /// The storage directory failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl From<instant_acme::Error> for OrderError {
    fn from(e: instant_acme::Error) -> Self {
        match e {
            instant_acme::Error::Api(problem) => OrderError::Problem(problem),
            other => OrderError::Acme(other),
        }
    }
}

/// A problem document on one line: type, detail, status and each subproblem.
pub fn problem_text(p: &Problem) -> String {
    let mut text = format!(
        "type={} detail={:?}",
        p.r#type.as_deref().unwrap_or("(none)"),
        p.detail.as_deref().unwrap_or("")
    );
    if let Some(status) = p.status {
        text.push_str(&format!(" status={status}"));
    }
    for sub in &p.subproblems {
        text.push_str(&format!(
            "; {}: type={} detail={:?}",
            sub.identifier
                .as_ref()
                .map_or_else(|| "?".to_owned(), |i| format!("{i:?}")),
            sub.r#type.as_deref().unwrap_or("(none)"),
            sub.detail.as_deref().unwrap_or("")
        ));
    }
    text
}

/// The account for `config`: the stored one, or a new one (stored before it is used).
pub async fn account(config: &AcmeConfig, storage: &Storage) -> Result<Account, OrderError> {
    let builder = match &config.ca_file {
        Some(f) => Account::builder_with_root(f)?,
        None => Account::builder()?,
    };
    if let Some(credentials) = storage.account(&config.directory)? {
        return Ok(builder.from_credentials(credentials).await?);
    }
    let contact: Vec<&str> = config.contact.iter().map(String::as_str).collect();
    let (account, credentials) = builder
        .create(
            &NewAccount {
                contact: &contact,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            config.directory.clone(),
            None,
        )
        .await?;
    storage.save_account(&config.directory, credentials)?;
    info!(directory = %config.directory, account = %account.id(), "ACME account created");
    Ok(account)
}

/// An issued certificate as PEM: the chain, leaf first, then its private key.
pub struct Issued {
    /// Chain and key, the combined form the storage keeps.
    pub pem: String,
}

/// Orders a certificate for `names`, proving control with `challenge` answered through
/// `challenges`.
pub async fn order(
    account: &Account,
    names: &[String],
    challenge: AcmeChallenge,
    challenges: &Challenges,
    peer: Option<&Peer>,
) -> Result<Issued, OrderError> {
    let identifiers: Vec<Identifier> = names.iter().cloned().map(Identifier::Dns).collect();
    let mut order = account.new_order(&NewOrder::new(&identifiers)).await?;
    let mut answered = Vec::new();
    let result = async {
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz?;
            let name = authz.identifier().to_string();
            match authz.status {
                AuthorizationStatus::Valid => continue,
                AuthorizationStatus::Pending => {}
                _ => {
                    return Err(OrderError::Invalid {
                        name,
                        problem: None,
                    });
                }
            }
            let kind = match challenge {
                AcmeChallenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
                AcmeChallenge::Http01 => ChallengeType::Http01,
            };
            let mut handle = authz
                .challenge(kind)
                .ok_or_else(|| OrderError::NoChallenge {
                    name: name.clone(),
                    challenge: challenge.name(),
                })?;
            let key_authorization = handle.key_authorization();
            match challenge {
                AcmeChallenge::Http01 => {
                    challenges.put_http(&handle.token, key_authorization.as_str());
                }
                AcmeChallenge::TlsAlpn01 => {
                    let digest = key_authorization.digest();
                    let cert =
                        alpn_certificate(&name, digest.as_ref()).map_err(OrderError::Local)?;
                    challenges.put_tls(&name, cert);
                    if let Some(p) = peer {
                        p.share_tls_alpn01(&name, Some(digest.as_ref())).await;
                    }
                }
            }
            answered.push((handle.token.clone(), name));
            handle.set_ready().await?;
        }
        let retry = RetryPolicy::new()
            .initial_delay(Duration::from_millis(100))
            .backoff(1.5)
            .timeout(POLL_TIMEOUT);
        match order.poll_ready(&retry).await? {
            OrderStatus::Ready => {}
            _ => return Err(invalid(&mut order, names).await),
        }
        let key = KeyPair::generate().map_err(|e| OrderError::Local(e.to_string()))?;
        let mut params =
            CertificateParams::new(names.to_vec()).map_err(|e| OrderError::Local(e.to_string()))?;
        params.distinguished_name = DistinguishedName::new();
        let csr = params
            .serialize_request(&key)
            .map_err(|e| OrderError::Local(e.to_string()))?;
        order.finalize_csr(csr.der()).await?;
        let chain = order.poll_certificate(&retry).await?;
        Ok(Issued {
            pem: format!("{}\n{}", chain.trim_end(), key.serialize_pem()),
        })
    }
    .await;
    for (token, name) in &answered {
        challenges.remove(token, name);
        if let (Some(p), AcmeChallenge::TlsAlpn01) = (peer, challenge) {
            p.share_tls_alpn01(name, None).await;
        }
    }
    result
}

/// Why an order that will not become ready is invalid: the first failed challenge's problem.
async fn invalid(order: &mut instant_acme::Order, names: &[String]) -> OrderError {
    let mut authorizations = order.authorizations();
    while let Some(Ok(authz)) = authorizations.next().await {
        for c in &authz.challenges {
            if let Some(problem) = &c.error {
                return OrderError::Invalid {
                    name: authz.identifier().to_string(),
                    problem: Some(problem.clone()),
                };
            }
        }
    }
    OrderError::Invalid {
        name: names.join(","),
        problem: order.state().error.clone(),
    }
}
