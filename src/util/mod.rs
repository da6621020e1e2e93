//! Helpers with no tartan dependencies: retry backoff, logging set-up, shutdown signals,
//! JSON decoding with field paths, a list of collected failures, and test support.

pub mod backoff;
pub mod errors;
pub mod json_decode;
pub mod logging;
#[cfg(test)]
pub(crate) mod proptest_support;
pub mod rate_limited;
pub mod shutdown;
#[cfg(test)]
pub(crate) mod test_tmp;
