//! When a simulated device reconnects, and whether it should.
//!
//! Delays grow exponentially from a base to a cap, with "equal jitter": each delay is
//! half the current step plus a random part of the other half, so many devices that
//! lost the same gateway do not come back in lockstep, and no delay is ever zero.

use std::time::Duration;

use mosaic_protocol::close;
use rand::Rng;

/// Exponential backoff with jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// Delays from `base` doubling up to `max` (`max` is raised to `base` if smaller).
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max: max.max(base),
            attempt: 0,
        }
    }

    /// The next delay: within `[step/2, step]`, where step = min(max, base * 2^attempt).
    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let step = self.step();
        self.attempt = self.attempt.saturating_add(1);
        let half = step / 2;
        let extra_ms = rng.random_range(0..=(step - half).as_millis() as u64);
        half + Duration::from_millis(extra_ms)
    }

    /// The delay's upper bound at the current attempt.
    pub fn step(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// Back to the base delay (after a session that got as far as `welcome`).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// How many delays were handed out since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

/// What a device does after its connection closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterClose {
    /// Reconnect after the next backoff delay.
    Backoff,
    /// The gateway is going away (1001): reconnect promptly, to another replica, with
    /// a short random spread and a fresh backoff.
    Promptly,
    /// The token was refused or expired (4401): reconnect with a fresh token if the
    /// device can mint one, else stop.
    Reauthenticate,
    /// Stop: another connection of this device took over (4409), or the device used
    /// another device's token (4403). Reconnecting would only fight.
    Stop,
}

/// What a close `code` (None: the connection dropped without a close frame) means.
pub fn after_close(code: Option<u16>) -> AfterClose {
    match code {
        Some(close::GOING_AWAY) => AfterClose::Promptly,
        Some(close::UNAUTHORIZED) => AfterClose::Reauthenticate,
        Some(close::REPLACED) | Some(close::FORBIDDEN) => AfterClose::Stop,
        _ => AfterClose::Backoff,
    }
}

/// The longest random spread before reconnecting after 1001.
pub const PROMPT_SPREAD: Duration = Duration::from_millis(500);

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn delays_stay_within_bounds_and_grow_to_the_cap() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(5);
        let mut rng = StdRng::seed_from_u64(7);
        let mut b = Backoff::new(base, max);
        let mut last_step = Duration::ZERO;
        for attempt in 0..64u32 {
            let step = b.step();
            assert!(step >= last_step, "steps never shrink");
            assert!(step <= max);
            let d = b.next_delay(&mut rng);
            assert!(
                d >= step / 2 && d <= step,
                "attempt {attempt}: {d:?} vs {step:?}"
            );
            assert!(d > Duration::ZERO);
            last_step = step;
        }
        assert_eq!(last_step, max, "reaches the cap");
        b.reset();
        assert_eq!(b.step(), base);
        assert_eq!(b.attempts(), 0);
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut rng = StdRng::seed_from_u64(1);
        let delays: std::collections::HashSet<_> = (0..50)
            .map(|_| {
                Backoff::new(Duration::from_secs(1), Duration::from_secs(1)).next_delay(&mut rng)
            })
            .collect();
        assert!(delays.len() > 10, "only {} distinct delays", delays.len());
    }

    #[test]
    fn close_codes_decide_what_happens_next() {
        assert_eq!(after_close(Some(1001)), AfterClose::Promptly);
        assert_eq!(after_close(Some(4401)), AfterClose::Reauthenticate);
        assert_eq!(after_close(Some(4409)), AfterClose::Stop);
        assert_eq!(after_close(Some(4403)), AfterClose::Stop);
        for code in [
            None,
            Some(1000),
            Some(1006),
            Some(1008),
            Some(1009),
            Some(4408),
            Some(4429),
        ] {
            assert_eq!(after_close(code), AfterClose::Backoff, "{code:?}");
        }
    }
}
