//! Jittered exponential backoff for reconnects and retries.

use std::time::Duration;

use rand::RngExt;

/// Exponential backoff with full jitter: each delay is uniform in `[base/2, current]`,
/// where `current` doubles after each failure up to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    /// A backoff starting at `base` and capped at `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max,
            current: base,
        }
    }

    /// The delay to wait before the next attempt; grows the next delay.
    pub fn next_delay(&mut self) -> Duration {
        let hi = self.current.as_millis().max(1) as u64;
        let lo = (self.base.as_millis() as u64 / 2).min(hi);
        let d = Duration::from_millis(rand::rng().random_range(lo..=hi));
        self.current = (self.current * 2).min(self.max);
        d
    }

    /// Sleeps for the next delay.
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }

    /// Resets after a success.
    pub fn reset(&mut self) {
        self.current = self.base;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let mut last_cap = 0;
        for _ in 0..10 {
            let d = b.next_delay().as_millis() as u64;
            assert!((50..=1000).contains(&d), "{d}");
            last_cap = b.current.as_millis() as u64;
        }
        assert_eq!(last_cap, 1000);
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
