//! Per-connection rate limit: a token bucket.
//!
//! Each frame a client sends takes one token; tokens refill at `per_second` up to `burst`.
//! The WebSocket handler asks [`TokenBucket::allow`] with the current instant before looking at
//! a frame; a `false` answer becomes an error reply to that client alone. Pure logic over
//! explicit instants, so it is tested without clocks or sockets.

use std::time::Instant;

/// A token bucket refilled continuously.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    per_second: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket of `burst` tokens refilled at `per_second`.
    pub fn new(per_second: u32, burst: u32, now: Instant) -> TokenBucket {
        TokenBucket {
            per_second: f64::from(per_second),
            burst: f64::from(burst.max(1)),
            tokens: f64::from(burst.max(1)),
            last: now,
        }
    }

    /// Takes a token if one is available at `now`.
    pub fn allow(&mut self, now: Instant) -> bool {
        if now > self.last {
            let elapsed = now - self.last;
            self.last = now;
            self.tokens = (self.tokens + elapsed.as_secs_f64() * self.per_second).min(self.burst);
        }
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn allows_a_burst_then_the_sustained_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(2, 3, start);
        assert!(bucket.allow(start));
        assert!(bucket.allow(start));
        assert!(bucket.allow(start));
        assert!(!bucket.allow(start));
        // Half a second later, one token (2 per second) has come back.
        let later = start + Duration::from_millis(500);
        assert!(bucket.allow(later));
        assert!(!bucket.allow(later));
    }

    #[test]
    fn refill_is_capped_at_the_burst() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(100, 2, start);
        assert!(bucket.allow(start));
        let much_later = start + Duration::from_secs(3600);
        assert!(bucket.allow(much_later));
        assert!(bucket.allow(much_later));
        assert!(!bucket.allow(much_later));
    }

    #[test]
    fn a_clock_going_backwards_does_not_add_tokens() {
        let start = Instant::now() + Duration::from_secs(10);
        let mut bucket = TokenBucket::new(1, 1, start);
        assert!(bucket.allow(start));
        assert!(!bucket.allow(start - Duration::from_secs(5)));
    }
}
