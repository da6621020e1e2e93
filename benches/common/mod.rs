//! Helpers shared by the benchmarks.
#![allow(dead_code)]

use tartan::lab::Binaries;

/// The binaries cargo built for this benchmark run.
pub fn bins() -> Binaries {
    tartan::built_binaries!()
}

/// CPU time of a process in nanoseconds: the sum over its live threads of the scheduler's
/// precise accounting (`/proc/PID/task/*/schedstat`; tick-sampled utime over-counts processes
/// that wake on timers). Threads that exited in between are not counted.
pub fn cpu_ns(pid: u32) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut sum = 0;
    for t in tasks.flatten() {
        let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) else {
            continue;
        };
        sum += s
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Some(sum)
}

/// Waits (at most `limit`) until the processes `pids` have used no CPU for `quiet`: work a
/// timed call triggered in daemons is then done and not charged to the next call.
pub fn settle(pids: &[u32], quiet: std::time::Duration, limit: std::time::Duration) {
    let total = || pids.iter().filter_map(|p| cpu_ns(*p)).sum::<u64>();
    let deadline = std::time::Instant::now() + limit;
    let mut last = total();
    while std::time::Instant::now() < deadline {
        std::thread::sleep(quiet);
        let now = total();
        if now == last {
            return;
        }
        last = now;
    }
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

/// The idle and total jiffies of all CPUs (`/proc/stat`).
fn cpu_jiffies() -> Option<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu: Vec<u64> = s
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let idle = cpu.get(3)? + cpu.get(4).copied().unwrap_or(0);
    Some((idle, cpu.iter().sum()))
}

/// Waits (up to 60 s) until the machine is nearly idle: tearing down a namespace that held
/// hundreds of thousands of set elements keeps kernel workers busy for seconds after it is
/// gone, and a measurement taken meanwhile measures that (so do other builds on the machine).
/// Returns the idle share of the last half second (> 0.9 unless the wait gave up).
pub fn wait_quiet() -> f64 {
    let start = std::time::Instant::now();
    let mut share = f64::NAN;
    while start.elapsed() < std::time::Duration::from_secs(60) {
        let Some((i0, t0)) = cpu_jiffies() else { break };
        std::thread::sleep(std::time::Duration::from_millis(500));
        let Some((i1, t1)) = cpu_jiffies() else { break };
        if t1 > t0 {
            share = (i1 - i0) as f64 / (t1 - t0) as f64;
            if share > 0.9 {
                break;
            }
        }
    }
    share
}
