//! Per-connection rate limit: `governor`'s GCRA limiter, which admits exactly what a token
//! bucket of `burst` tokens refilled at `per_second` would.
//!
//! Each frame a client sends takes one cell; the WebSocket handler asks [`TokenBucket::allow`]
//! before looking at a frame, and a `false` answer becomes an error reply to that client alone.
//! The clock is a parameter, so the tests drive a fake one instead of sleeping.

use std::num::NonZeroU32;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

/// One connection's limiter: a burst of `burst` frames, then `per_second` sustained.
pub struct TokenBucket<C: Clock = DefaultClock> {
    limiter: RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<C::Instant>>,
}

impl TokenBucket {
    /// A full bucket of `burst` frames refilled at `per_second`, on the monotonic clock.
    pub fn new(per_second: u32, burst: u32) -> TokenBucket {
        TokenBucket::with_clock(per_second, burst, DefaultClock::default())
    }
}

impl<C: Clock> TokenBucket<C> {
    /// The same limiter on `clock`. A zero rate or burst counts as 1 (config rejects both).
    pub fn with_clock(per_second: u32, burst: u32, clock: C) -> TokenBucket<C> {
        let at_least_one = |n| NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::per_second(at_least_one(per_second)).allow_burst(at_least_one(burst));
        TokenBucket {
            limiter: RateLimiter::direct_with_clock(quota, clock),
        }
    }

    /// Takes a cell if one is available now.
    pub fn allow(&self) -> bool {
        self.limiter.check().is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;
    use std::time::Duration;

    #[test]
    fn allows_a_burst_then_the_sustained_rate() {
        let clock = FakeRelativeClock::default();
        let bucket = TokenBucket::with_clock(2, 3, clock.clone());
        assert!(bucket.allow());
        assert!(bucket.allow());
        assert!(bucket.allow());
        assert!(!bucket.allow());
        // Just under half a second later, nothing has come back yet.
        clock.advance(Duration::from_millis(499));
        assert!(!bucket.allow());
        // At half a second, one frame (2 per second) has come back, and only one.
        clock.advance(Duration::from_millis(1));
        assert!(bucket.allow());
        assert!(!bucket.allow());
    }

    #[test]
    fn refill_is_capped_at_the_burst() {
        let clock = FakeRelativeClock::default();
        let bucket = TokenBucket::with_clock(100, 2, clock.clone());
        assert!(bucket.allow());
        clock.advance(Duration::from_secs(3600));
        assert!(bucket.allow());
        assert!(bucket.allow());
        assert!(!bucket.allow());
    }

    #[test]
    fn the_real_clock_allows_the_burst_at_once() {
        let bucket = TokenBucket::new(1, 5);
        let allowed = (0..10).filter(|_| bucket.allow()).count();
        // Ten frames within well under a second: the burst and at most one refilled frame.
        assert!((5..=6).contains(&allowed), "{allowed} allowed");
    }
}
