//! Latency statistics: percentiles from an HDR histogram, per-round medians, and the noise
//! a run observed (how much the per-round medians spread). Pure.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Samples of one measure on one path, kept per round so noise can be stated.
#[derive(Debug, Clone)]
pub struct Samples {
    hist: Histogram<u64>,
    rounds: Vec<Vec<u64>>,
}

/// Highest value the histograms track: 10 s in nanoseconds.
const MAX_NS: u64 = 10_000_000_000;

impl Default for Samples {
    fn default() -> Self {
        Samples::new()
    }
}

impl Samples {
    /// Empty samples (nanosecond resolution, 3 significant digits).
    pub fn new() -> Samples {
        Samples {
            hist: Histogram::new_with_bounds(1, MAX_NS, 3)
                .expect("constant histogram bounds are valid"),
            rounds: Vec::new(),
        }
    }

    /// Starts a new round.
    pub fn next_round(&mut self) {
        self.rounds.push(Vec::new());
    }

    /// Records one sample in the current round.
    pub fn record(&mut self, d: Duration) {
        let ns = (d.as_nanos() as u64).clamp(1, MAX_NS);
        let _ = self.hist.record(ns);
        if self.rounds.is_empty() {
            self.rounds.push(Vec::new());
        }
        if let Some(r) = self.rounds.last_mut() {
            r.push(ns);
        }
    }

    /// Number of samples.
    pub fn len(&self) -> u64 {
        self.hist.len()
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.hist.is_empty()
    }

    /// The median of each round that has samples, in microseconds.
    pub fn round_medians_us(&self) -> Vec<f64> {
        self.rounds
            .iter()
            .filter(|r| !r.is_empty())
            .map(|r| {
                let mut v = r.clone();
                v.sort_unstable();
                v[v.len() / 2] as f64 / 1000.0
            })
            .collect()
    }

    /// Points of the cumulative distribution: (fraction, µs) at fixed quantiles.
    pub fn cdf_us(&self) -> Vec<(f64, f64)> {
        if self.hist.is_empty() {
            return Vec::new();
        }
        let mut qs: Vec<f64> = (1..=19).map(|i| f64::from(i) * 0.05).collect();
        qs.extend([0.97, 0.99, 0.995, 0.999]);
        qs.into_iter()
            .map(|q| (q, self.hist.value_at_quantile(q) as f64 / 1000.0))
            .collect()
    }

    /// The summary of all samples.
    pub fn summary(&self) -> Summary {
        let us = |ns: u64| ns as f64 / 1000.0;
        let medians = self.round_medians_us();
        Summary {
            count: self.hist.len(),
            min_us: us(self.hist.min()),
            p50_us: us(self.hist.value_at_quantile(0.5)),
            p90_us: us(self.hist.value_at_quantile(0.9)),
            p99_us: us(self.hist.value_at_quantile(0.99)),
            p999_us: us(self.hist.value_at_quantile(0.999)),
            max_us: us(self.hist.max()),
            mean_us: self.hist.mean() / 1000.0,
            noise_pct: noise_pct(&medians),
            round_medians_us: medians,
        }
    }
}

/// The spread of per-round medians: (p90 − p10) / median, in percent. `None` with fewer than
/// three rounds.
pub fn noise_pct(round_medians: &[f64]) -> Option<f64> {
    if round_medians.len() < 3 {
        return None;
    }
    let mut v = round_medians.to_vec();
    v.sort_by(f64::total_cmp);
    let q = |p: f64| v[((p * (v.len() - 1) as f64).round() as usize).min(v.len() - 1)];
    let mid = q(0.5);
    if mid <= 0.0 {
        return None;
    }
    Some((q(0.9) - q(0.1)) / mid * 100.0)
}

/// Median of the ratio a/b taken round by round (the same machine state for both).
pub fn paired_ratio(a: &[f64], b: &[f64]) -> Option<f64> {
    let mut r: Vec<f64> = a
        .iter()
        .zip(b)
        .filter(|(_, y)| **y > 0.0)
        .map(|(x, y)| x / y)
        .collect();
    if r.is_empty() {
        return None;
    }
    r.sort_by(f64::total_cmp);
    Some(r[r.len() / 2])
}

/// Percentiles of one measure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Number of samples.
    pub count: u64,
    /// Smallest sample (µs).
    pub min_us: f64,
    /// Median (µs).
    pub p50_us: f64,
    /// 90th percentile (µs).
    pub p90_us: f64,
    /// 99th percentile (µs).
    pub p99_us: f64,
    /// 99.9th percentile (µs).
    pub p999_us: f64,
    /// Largest sample (µs).
    pub max_us: f64,
    /// Mean (µs).
    pub mean_us: f64,
    /// Spread of the per-round medians, (p90 − p10) / median in percent.
    pub noise_pct: Option<f64>,
    /// Median of each round (µs).
    pub round_medians_us: Vec<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_rounds() {
        let mut s = Samples::new();
        for r in 0..4u64 {
            s.next_round();
            for i in 1..=100u64 {
                s.record(Duration::from_micros(i + r * 10));
            }
        }
        let m = s.summary();
        assert_eq!(m.count, 400);
        assert!((m.p50_us - 65.0).abs() < 2.0, "{m:?}");
        assert!(m.p99_us >= m.p90_us && m.p90_us >= m.p50_us);
        assert_eq!(m.round_medians_us.len(), 4);
        assert!((m.round_medians_us[0] - 51.0).abs() < 0.01);
        assert!(m.noise_pct.is_some());
    }

    #[test]
    fn noise_needs_three_rounds() {
        assert_eq!(noise_pct(&[1.0, 2.0]), None);
        let n = noise_pct(&[100.0, 100.0, 100.0]).unwrap();
        assert!(n.abs() < 1e-9);
        let n = noise_pct(&[90.0, 100.0, 110.0]).unwrap();
        assert!((n - 20.0).abs() < 1e-9, "{n}");
    }

    #[test]
    fn paired_ratios_use_rounds() {
        let a = [20.0, 40.0, 30.0];
        let b = [10.0, 20.0, 15.0];
        assert_eq!(paired_ratio(&a, &b), Some(2.0));
        assert_eq!(paired_ratio(&[], &[]), None);
    }

    #[test]
    fn empty_and_huge_samples() {
        let mut s = Samples::new();
        assert!(s.is_empty());
        s.record(Duration::from_secs(100));
        assert_eq!(s.len(), 1);
        assert!(s.summary().max_us >= 9_000_000.0);
    }
}
