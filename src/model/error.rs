//! The error every record decoder in `model` returns: each variant names the field (or key)
//! at fault, so the consumer that logs and skips a record can say what to fix.

/// Why a record (service, endpoints, pod, subnet lease key or value, `subnet.env`) was
/// rejected. The Display text names the field in every variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The bytes are not a JSON document of the record's shape.
    #[error("{context}: {detail}")]
    Json {
        /// How the message starts, naming the record (`service does not decode`).
        context: &'static str,
        /// serde_json's message, led by the path of the field at fault when there is one
        /// (from [`crate::util::json_decode`]).
        detail: String,
    },
    /// A required field is absent.
    #[error("{field} is missing")]
    Missing {
        /// The field.
        field: String,
    },
    /// A field holds a value of the wrong form: `namespace "A" is not a valid name`.
    #[error("{field} {value} {reason}")]
    Value {
        /// The field.
        field: String,
        /// The value as it is quoted in the message.
        value: String,
        /// What is wrong with it (`is not a valid name`).
        reason: String,
    },
    /// A number outside its range: `ports[0].nodePort 40000 is outside 30000-32767`.
    #[error("{field} {value} is outside {min}-{max}{unit}")]
    OutOfRange {
        /// The field (a path such as `ports[1].nodePort`).
        field: String,
        /// The value found.
        value: u64,
        /// Smallest value allowed.
        min: u64,
        /// Largest value allowed.
        max: u64,
        /// The unit, with a leading space (` seconds`), or empty.
        unit: &'static str,
    },
    /// A field breaks a rule of the record: `ports: port 80/tcp is listed twice`.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field.
        field: String,
        /// The rule it breaks.
        reason: String,
    },
}

impl DecodeError {
    /// A JSON decoding failure of the record named by `context`.
    pub fn json(context: &'static str, detail: String) -> Self {
        DecodeError::Json { context, detail }
    }

    /// `field` is absent.
    pub fn missing(field: impl Into<String>) -> Self {
        DecodeError::Missing {
            field: field.into(),
        }
    }

    /// `field` holds `value`, which `reason` says is wrong.
    pub fn value(
        field: impl Into<String>,
        value: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        DecodeError::Value {
            field: field.into(),
            value: value.into(),
            reason: reason.into(),
        }
    }

    /// `field` breaks the rule `reason`.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        DecodeError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// `field` holds `value`, outside `min..=max`.
    pub fn out_of_range(field: impl Into<String>, value: u64, min: u64, max: u64) -> Self {
        DecodeError::OutOfRange {
            field: field.into(),
            value,
            min,
            max,
            unit: "",
        }
    }

    /// The field the error names (for a JSON failure, the record it is about).
    pub fn field(&self) -> &str {
        match self {
            DecodeError::Json { context, .. } => context,
            DecodeError::Missing { field }
            | DecodeError::Value { field, .. }
            | DecodeError::OutOfRange { field, .. }
            | DecodeError::Invalid { field, .. } => field,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_field() {
        assert_eq!(
            DecodeError::value("namespace", "\"A\"", "is not a valid name").to_string(),
            "namespace \"A\" is not a valid name"
        );
        assert_eq!(
            DecodeError::missing("BackendData").to_string(),
            "BackendData is missing"
        );
        assert_eq!(
            DecodeError::invalid("ports", "port 80/tcp is listed twice").to_string(),
            "ports: port 80/tcp is listed twice"
        );
        let e = DecodeError::out_of_range("ports[1].nodePort", 40000, 30000, 32767);
        assert_eq!(
            e.to_string(),
            "ports[1].nodePort 40000 is outside 30000-32767"
        );
        assert_eq!(e.field(), "ports[1].nodePort");
        assert_eq!(
            DecodeError::json("service does not decode", "ports: invalid type".into()).to_string(),
            "service does not decode: ports: invalid type"
        );
    }
}
