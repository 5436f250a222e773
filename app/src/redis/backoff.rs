//! Capped exponential backoff for reconnecting to Redis, from `backon` (no jitter, factor 2,
//! no limit on the number of attempts).
//!
//! The subscriber asks [`Backoff::next_delay`] after each failed or lost subscription and calls
//! [`Backoff::reset`] once subscribed again: delays run min, 2·min, 4·min, … up to max.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// Doubling delays between `min` and `max`.
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    delays: <ExponentialBuilder as BackoffBuilder>::Backoff,
    max: Duration,
}

impl Backoff {
    /// Starts at `min`; never exceeds `max` (`max` below `min` is treated as `min`).
    pub fn new(min: Duration, max: Duration) -> Backoff {
        let max = max.max(min);
        let builder = ExponentialBuilder::new()
            .with_factor(2.0)
            .with_min_delay(min)
            .with_max_delay(max)
            .without_max_times();
        Backoff {
            builder,
            delays: builder.build(),
            max,
        }
    }

    /// The delay to wait now; the one after it is twice as long, up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        // Without a limit on attempts or total delay the sequence never ends; `max` is its
        // value from some point on anyway.
        self.delays.next().unwrap_or(self.max)
    }

    /// Back to `min` after a success.
    pub fn reset(&mut self) {
        self.delays = self.builder.build();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// backon doubles in f32 seconds: within a microsecond of the exact double is a double.
    fn assert_near(got: &[Duration], want: &[Duration]) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!(
                g.abs_diff(*w) < Duration::from_micros(1),
                "{got:?} != {want:?}"
            );
        }
    }

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let ms = Duration::from_millis;
        let mut backoff = Backoff::new(ms(100), ms(500));
        let delays: Vec<_> = (0..5).map(|_| backoff.next_delay()).collect();
        assert_near(&delays, &[ms(100), ms(200), ms(400), ms(500), ms(500)]);
        assert_eq!(delays[3..], [ms(500), ms(500)], "the cap is exact");
        backoff.reset();
        assert_eq!(backoff.next_delay(), ms(100));
        assert_near(&[backoff.next_delay()], &[ms(200)]);
    }

    #[test]
    fn defaults_run_from_100ms_to_5s() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let delays: Vec<_> = (0..8).map(|_| backoff.next_delay()).collect();
        let want = [100, 200, 400, 800, 1600, 3200, 5000, 5000].map(Duration::from_millis);
        assert_near(&delays, &want);
    }

    #[test]
    fn never_overflows() {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::MAX);
        for _ in 0..200 {
            backoff.next_delay();
        }
        assert_eq!(backoff.next_delay(), Duration::MAX);
    }

    #[test]
    fn a_max_below_min_is_min() {
        let mut backoff = Backoff::new(Duration::from_secs(2), Duration::from_secs(1));
        assert_eq!(backoff.next_delay(), Duration::from_secs(2));
        assert_eq!(backoff.next_delay(), Duration::from_secs(2));
    }
}
