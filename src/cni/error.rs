//! CNI errors: the spec's well-known codes, tartan's plugin codes (≥ 100) and the JSON error
//! object a plugin prints on stdout before exiting non-zero.

use std::fmt;

/// Error codes: 1–99 are reserved by the CNI spec, 100 and up are tartan's own.
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Unsupported field in the network configuration.
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// Container unknown or does not exist.
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// Invalid necessary environment variables.
    pub const INVALID_ENV: u32 = 4;
    /// I/O failure.
    pub const IO_FAILURE: u32 = 5;
    /// Failed to decode content (stdin is not JSON, or not a JSON object).
    pub const DECODE: u32 = 6;
    /// Invalid network config (well-formed JSON with wrong or missing values).
    pub const INVALID_CONFIG: u32 = 7;
    /// Try again later: the node has no subnet yet or tartand is not reachable.
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin is not available (no node lease, no daemon).
    pub const NOT_AVAILABLE: u32 = 50;
    /// A kernel (netlink) operation failed.
    pub const KERNEL: u32 = 100;
    /// No free address left in the node subnet.
    pub const ADDRESSES_EXHAUSTED: u32 = 101;
    /// The allocation store (IPAM directory) could not be read or written.
    pub const STORE: u32 = 102;
    /// CHECK found the container's network differing from `prevResult`.
    pub const CHECK_FAILED: u32 = 103;
    /// An interface with the requested name already exists in the pod namespace.
    pub const INTERFACE_EXISTS: u32 = 104;
}

/// A CNI error as the spec defines it: `code`, `msg` and `details`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    /// Error code (see [`code`]).
    pub code: u32,
    /// Short message.
    pub msg: String,
    /// Longer explanation (may be empty).
    pub details: String,
}

impl CniError {
    /// An error with a code and a message.
    pub fn new(code: u32, msg: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    /// Adds details.
    pub fn details(mut self, details: impl Into<String>) -> CniError {
        self.details = details.into();
        self
    }

    /// Code 4: a bad environment variable.
    pub fn env(msg: impl Into<String>) -> CniError {
        CniError::new(code::INVALID_ENV, msg)
    }

    /// Code 7: an invalid config value.
    pub fn config(msg: impl Into<String>) -> CniError {
        CniError::new(code::INVALID_CONFIG, msg)
    }

    /// Code 100: a kernel operation failed.
    pub fn kernel(msg: impl Into<String>) -> CniError {
        CniError::new(code::KERNEL, msg)
    }

    /// Code 102: the allocation store failed.
    pub fn store(msg: impl Into<String>) -> CniError {
        CniError::new(code::STORE, msg)
    }

    /// The JSON error object of the spec, stamped with `cni_version`.
    pub fn to_json(&self, cni_version: &str) -> String {
        let mut v = serde_json::json!({
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
        });
        if !self.details.is_empty() {
            v["details"] = serde_json::Value::String(self.details.clone());
        }
        v.to_string()
    }
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "code {}: {}", self.code, self.msg)?;
        if !self.details.is_empty() {
            write!(f, " ({})", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for CniError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shape() {
        let e = CniError::new(code::TRY_AGAIN_LATER, "no subnet yet").details("waiting");
        let v: serde_json::Value = serde_json::from_str(&e.to_json("1.1.0")).unwrap();
        assert_eq!(v["cniVersion"], "1.1.0");
        assert_eq!(v["code"], 11);
        assert_eq!(v["msg"], "no subnet yet");
        assert_eq!(v["details"], "waiting");
        let v: serde_json::Value =
            serde_json::from_str(&CniError::env("x").to_json("1.0.0")).unwrap();
        assert!(v.get("details").is_none());
    }
}
