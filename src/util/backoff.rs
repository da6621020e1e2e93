//! Jittered exponential backoff for reconnects and retries.

use std::time::Duration;

use rand::RngExt;

/// Exponential backoff with jitter: each delay is uniform in `[current/2, current]`, where
/// `current` starts at `base` and doubles after each failure up to `max`. The lower bound
/// grows too, so repeated failures really do slow down (with `[base/2, current]`, five
/// failures in a row could all wait `base/2`; a netns test caught 5 retries in 3 s at a
/// 500 ms base).
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
        let lo = hi / 2;
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
            let cap = b.current.as_millis() as u64;
            let d = b.next_delay().as_millis() as u64;
            assert!(
                (cap / 2..=cap).contains(&d),
                "{d} outside {}..={cap}",
                cap / 2
            );
            last_cap = b.current.as_millis() as u64;
        }
        assert_eq!(last_cap, 1000);
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn repeated_failures_wait_longer_and_longer() {
        // At a 500 ms base, four failures in a row wait at least 250 + 500 + 1000 + 2000 ms.
        for _ in 0..200 {
            let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
            let total: Duration = (0..4).map(|_| b.next_delay()).sum();
            assert!(total >= Duration::from_millis(3750), "{total:?}");
        }
    }
}
