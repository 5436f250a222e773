//! Bounded waits: [`eventually`] polls a check until it is done, [`within`] awaits one
//! future; both fail at a deadline and say what they waited for.

use std::future::Future;
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use tokio::time::Instant;

/// Upper bound for any single wait of a test; reaching it fails the test.
pub const DEADLINE: Duration = Duration::from_secs(20);
/// Pause between two checks of a polled condition.
const POLL: Duration = Duration::from_millis(20);

/// What a polled check found: not yet (`false`, `None`), or done, with a value (`true` gives
/// `()`).
pub trait Done {
    /// What the wait returns once the check holds.
    type Value;
    /// The value when done.
    fn done(self) -> Option<Self::Value>;
}

impl Done for bool {
    type Value = ();
    fn done(self) -> Option<()> {
        self.then_some(())
    }
}

impl<T> Done for Option<T> {
    type Value = T;
    fn done(self) -> Option<T> {
        self
    }
}

/// Polls `check` until it is done, at most `within` (a check that hangs is cut at the deadline
/// too). A check that fails counts as not yet; the timeout error names `what` and quotes the
/// last check.
pub async fn eventually<F, Fut, D>(what: &str, within: Duration, mut check: F) -> Result<D::Value>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<D>>,
    D: Done,
{
    let deadline = Instant::now() + within;
    loop {
        let last = match tokio::time::timeout_at(deadline, check()).await {
            Ok(last) => last.map(Done::done),
            Err(_) => Err(anyhow!("the check itself did not finish")),
        };
        match last {
            Ok(Some(value)) => return Ok(value),
            last if Instant::now() >= deadline => {
                let last = match last {
                    Ok(_) => "not yet".to_owned(),
                    Err(e) => format!("{e:#}"),
                };
                bail!("{what}: not reached within {within:?} (last check: {last})");
            }
            _ => tokio::time::sleep(POLL).await,
        }
    }
}

/// Awaits `future`, panicking with `what` if it takes longer than [`DEADLINE`].
pub async fn within<F: Future>(what: &str, future: F) -> F::Output {
    match tokio::time::timeout(DEADLINE, future).await {
        Ok(out) => out,
        Err(_) => panic!("timed out after {DEADLINE:?}: {what}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_condition_that_comes_true_is_awaited_and_one_that_never_does_fails_by_name() {
        let mut calls = 0;
        let value = eventually("the third call", DEADLINE, || {
            calls += 1;
            std::future::ready(Ok((calls == 3).then_some(calls)))
        })
        .await
        .unwrap();
        assert_eq!(value, 3);

        let err = eventually("never", Duration::from_secs(1), || async {
            Err::<bool, _>(anyhow!("still down"))
        })
        .await
        .unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("never: not reached within 1s"), "{text}");
        assert!(text.contains("still down"), "{text}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_check_that_hangs_is_cut_at_the_deadline() {
        let err = eventually("a hanging check", Duration::from_secs(1), || {
            std::future::pending::<Result<bool>>()
        })
        .await
        .unwrap_err();
        assert!(format!("{err:#}").contains("did not finish"), "{err:#}");
    }
}
