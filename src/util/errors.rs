//! [`ErrorList`]: the failures of a stage that tries everything before it reports (a batch
//! of netlink requests, a teardown), as one error whose message joins them.

use std::fmt;

/// Failures collected by a stage that keeps going after one fails. It keeps the first
/// [`ErrorList::KEPT`] messages and counts the rest; Display joins the kept ones with `"; "`
/// and says how many more there were, so one log line stays short however much failed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorList {
    kept: Vec<String>,
    total: usize,
}

impl ErrorList {
    /// How many messages are kept (and shown).
    pub const KEPT: usize = 5;

    /// An empty list.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one failure.
    pub fn push(&mut self, e: impl fmt::Display) {
        if self.kept.len() < Self::KEPT {
            self.kept.push(e.to_string());
        }
        self.total += 1;
    }

    /// How many failures were added (kept or not).
    pub fn len(&self) -> usize {
        self.total
    }

    /// Whether nothing failed.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// The kept messages, in the order they were added.
    pub fn kept(&self) -> &[String] {
        &self.kept
    }

    /// `Ok(())` when nothing failed, else the list as the error.
    pub fn into_result(self) -> Result<(), ErrorList> {
        if self.is_empty() { Ok(()) } else { Err(self) }
    }
}

impl<D: fmt::Display> Extend<D> for ErrorList {
    fn extend<I: IntoIterator<Item = D>>(&mut self, iter: I) {
        for e in iter {
            self.push(e);
        }
    }
}

impl<D: fmt::Display> FromIterator<D> for ErrorList {
    fn from_iter<I: IntoIterator<Item = D>>(iter: I) -> Self {
        let mut l = ErrorList::new();
        l.extend(iter);
        l
    }
}

impl fmt::Display for ErrorList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.kept.join("; "))?;
        let more = self.total - self.kept.len();
        if more > 0 {
            write!(f, "; and {more} more")?;
        }
        Ok(())
    }
}

impl std::error::Error for ErrorList {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_and_caps() {
        let mut l = ErrorList::new();
        assert!(l.is_empty());
        assert_eq!(l.clone().into_result(), Ok(()));
        l.push("a");
        l.push(format_args!("b {}", 1));
        assert_eq!(l.to_string(), "a; b 1");
        l.extend((0..6).map(|i| format!("x{i}")));
        assert_eq!(l.len(), 8);
        assert_eq!(l.kept().len(), ErrorList::KEPT);
        assert_eq!(l.to_string(), "a; b 1; x0; x1; x2; and 3 more");
        let e = l.into_result().unwrap_err();
        let any: anyhow::Error = e.into();
        assert!(any.to_string().ends_with("and 3 more"));
        let c: ErrorList = ["p", "q"].into_iter().collect();
        assert_eq!(c.to_string(), "p; q");
    }
}
