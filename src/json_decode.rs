//! JSON decoding whose errors name the field at fault (`ports[0].protocol: unknown variant
//! "sctp", expected "tcp" or "udp"`) instead of only a line and column: decoders of etcd
//! records and configs log a record that does not decode and skip it, and the log line has
//! to say which field to fix. A thin layer over `serde_path_to_error`.

use serde::de::DeserializeOwned;

/// Decodes `bytes` as one JSON document (trailing garbage is an error).
pub fn from_slice<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let v = serde_path_to_error::deserialize(&mut de).map_err(describe)?;
    de.end().map_err(|e| e.to_string())?;
    Ok(v)
}

/// Decodes an already parsed JSON value.
pub fn from_value<T: DeserializeOwned>(v: serde_json::Value) -> Result<T, String> {
    serde_path_to_error::deserialize(v).map_err(describe)
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
        let e = from_value::<Outer>(serde_json::json!({"ports": 5})).unwrap_err();
        assert!(e.starts_with("ports: invalid type"), "{e}");
    }
}
