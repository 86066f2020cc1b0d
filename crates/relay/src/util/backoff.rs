//! Capped exponential backoff with full jitter, and a sleep that gives way to shutdown.
//!
//! Full jitter (a uniform draw between a small floor and the current ceiling) keeps a fleet of relays
//! from reconnecting in lockstep after a cloud outage; the floor keeps a failing peer from ever being
//! hit in a tight loop.

use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff {
            base,
            cap: cap.max(base),
            attempt: 0,
        }
    }

    /// The ceiling for the next wait: base × 2^attempt, at most `cap`.
    pub fn ceiling(&self) -> Duration {
        self.base
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.cap)
    }

    /// The next wait, drawn uniformly from [ceiling/10, ceiling], and moves to the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let ceil = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let floor = ceil / 10;
        let span = (ceil - floor).as_millis() as u64;
        floor + Duration::from_millis(fastrand::u64(0..=span))
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

/// `d` stretched or shrunk by up to `fraction` at random (for heartbeat spacing).
pub fn jitter(d: Duration, fraction: f64) -> Duration {
    let f = 1.0 + fraction * (fastrand::f64() * 2.0 - 1.0);
    d.mul_f64(f.max(0.0))
}

/// Sleeps for `d`; returns false when shutdown came first.
pub async fn sleep_or_shutdown(d: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = shutdown.cancelled() => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        for _ in 0..20 {
            let before = b.ceiling();
            let d = b.next_delay();
            assert!(
                d <= before && d >= before / 10,
                "{d:?} outside [{:?}, {before:?}]",
                before / 10
            );
        }
        assert_eq!(b.ceiling(), Duration::from_secs(60));
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_secs(1));
    }

    #[test]
    fn jitter_stays_in_band() {
        for _ in 0..100 {
            let d = jitter(Duration::from_secs(100), 0.05);
            assert!(
                d >= Duration::from_secs(95) && d <= Duration::from_secs(105),
                "{d:?}"
            );
        }
    }
}
