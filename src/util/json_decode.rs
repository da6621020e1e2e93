//! JSON decoding whose errors name the field at fault (`ports[0].protocol: unknown variant
//! "sctp", expected "tcp" or "udp"`) instead of only a line and column: decoders of etcd
//! records and configs log a record that does not decode and skip it, and the log line has
//! to say which field to fix. A thin layer over `serde_path_to_error`.

use serde::de::DeserializeOwned;
use serde_json::Value;

/// Decodes `bytes` as one JSON document (trailing garbage is an error).
///
/// The document is decoded by serde_json alone; only when that fails is it decoded again
/// with path tracking to say where. A success runs exactly the code it ran before paths
/// were tracked: tartan-cni decodes its config this way, and what a call executes is what
/// its start-up pays for (page faults), not what the binary holds.
pub fn from_slice<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    serde_json::from_slice(bytes).map_err(|plain| {
        let mut de = serde_json::Deserializer::from_slice(bytes);
        match serde_path_to_error::deserialize::<_, T>(&mut de) {
            Err(e) => describe(e),
            Ok(_) => plain.to_string(),
        }
    })
}

/// Decodes an already parsed JSON value (the same way as [`from_slice`]).
pub fn from_value<T: DeserializeOwned>(v: &Value) -> Result<T, String> {
    T::deserialize(v).map_err(|plain| match serde_path_to_error::deserialize::<_, T>(v) {
        Err(e) => describe(e),
        Ok(_) => plain.to_string(),
    })
}
fn describe(e: serde_path_to_error::Error<serde_json::Error>) -> String {
    let path = e.path().to_string();
    if path == "." || path.is_empty() {
        e.into_inner().to_string()
    } else {
        format!("{path}: {}", e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Outer {
        ports: Vec<Inner>,
    }
    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Inner {
        port: u16,
    }

    #[test]
    fn errors_name_the_field() {
        let e = from_slice::<Outer>(br#"{"ports":[{"port":1},{"port":"x"}]}"#).unwrap_err();
        assert!(e.starts_with("ports[1].port: invalid type"), "{e}");
        let e = from_slice::<Outer>(br#"{}"#).unwrap_err();
        assert!(e.contains("missing field `ports`"), "{e}");
        assert!(from_slice::<Outer>(br#"{"ports":[]} x"#).is_err());
        let e = from_value::<Outer>(&serde_json::json!({"ports": 5})).unwrap_err();
        assert!(e.starts_with("ports: invalid type"), "{e}");
    }
}
