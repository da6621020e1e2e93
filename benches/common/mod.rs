//! Helpers shared by the benchmarks.
#![allow(dead_code)]

use tartan::netns_lab::Binaries;

/// The binaries cargo built for this benchmark run.
pub fn bins() -> Binaries {
    tartan::built_binaries!()
}

/// CPU time of a process in nanoseconds, from the scheduler's precise accounting
/// (`/proc/PID/schedstat`; tick-sampled utime over-counts processes that wake on timers).
pub fn cpu_ns(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/schedstat")).ok()?;
    s.split_whitespace().next()?.parse().ok()
}

/// The `p`-th percentile (nearest rank) of `sorted`; NaN when there is no sample.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// The sections named on the command line (arguments not starting with `-`): a section runs
/// when none is named or when a named word is part of its name.
pub struct Sections(Vec<String>);

impl Sections {
    /// Reads the command line.
    pub fn from_args() -> Sections {
        Sections(
            std::env::args()
                .skip(1)
                .filter(|a| !a.starts_with('-'))
                .collect(),
        )
    }

    /// Whether section `name` runs.
    pub fn want(&self, name: &str) -> bool {
        self.0.is_empty() || self.0.iter().any(|w| name.contains(w.as_str()))
    }
}
