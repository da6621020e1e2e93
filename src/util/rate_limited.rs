//! A log line at most once per period, with the count of the lines it stood for: for events a
//! flood of bad input can trigger thousands of times a second.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Rate-limits one kind of warning.
#[derive(Debug)]
pub struct RateLimited {
    period: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl RateLimited {
    /// At most one line per `period`.
    pub fn new(period: Duration) -> Self {
        RateLimited {
            period,
            state: Mutex::new((None, 0)),
        }
    }

    /// Logs `msg` unless a line went out less than a period ago (then counts it).
    pub fn warn(&self, msg: &str) {
        if let Some(suppressed) = self.admit() {
            if suppressed > 0 {
                tracing::warn!("{msg} (and {suppressed} more like it since the last line)");
            } else {
                tracing::warn!("{msg}");
            }
        }
    }

    /// `Some(number suppressed since the last line)` when a line may go out now.
    fn admit(&self) -> Option<u64> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        match st.0 {
            Some(t) if now.duration_since(t) < self.period => {
                st.1 += 1;
                None
            }
            _ => {
                let n = st.1;
                *st = (Some(now), 0);
                Some(n)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_period_counting_the_rest() {
        let r = RateLimited::new(Duration::from_secs(3600));
        assert_eq!(r.admit(), Some(0));
        assert_eq!(r.admit(), None);
        assert_eq!(r.admit(), None);
        let r0 = RateLimited::new(Duration::ZERO);
        assert_eq!(r0.admit(), Some(0));
        assert_eq!(r0.admit(), Some(0));
    }
}
