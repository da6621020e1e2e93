//! What the decoders' property tests (`<module>/proptests.rs`) share: the case budget,
//! arbitrary bytes and JSON (with the decoder's own field names as keys, so the generator
//! reaches past the first type check), and mutations of a valid document that say which
//! field they touched.
//!
//! The properties every decoder is held to: arbitrary bytes and arbitrary JSON never panic;
//! valid values round-trip through the encoder where one exists; a valid document with one
//! field removed, replaced by arbitrary JSON, or joined by an unknown field either decodes
//! or fails with an error that names a field of the format.

use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::Config;
use serde_json::Value;

/// Cases per property: the 33 decoder properties together took 5.3 s in a debug build on
/// 2 cores shared with two other builds (load 8; `cargo test --lib proptests --
/// --test-threads=2`), well inside the chaos suite's 30 s.
pub const CASES: u32 = 1024;

/// The configuration every decoder property runs with (no regression files: a case a
/// property finds is kept as a unit test next to the fix).
pub fn config() -> Config {
    Config {
        cases: CASES,
        failure_persistence: None,
        ..Config::default()
    }
}

/// Arbitrary bytes, mostly short.
pub fn arb_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..200)
}

/// Strings that look like what the formats hold (addresses, CIDRs, MACs, versions, paths,
/// numbers in text), near-misses of them, and arbitrary Unicode.
pub fn arb_text() -> impl Strategy<Value = String> {
    prop_oneof![
        select(
            &[
                "",
                "10.244.0.0/16",
                "10.244.3.0-24",
                "10.244.3.1/24",
                "10.244.3.5",
                "0.0.0.0/0",
                "255.255.255.255/32",
                "1.2.3.4/33",
                "fd00::1/64",
                "aa:bb:cc:dd:ee:f0",
                "01:00:00:00:00:00",
                "vxlan",
                "udp",
                "tcp",
                "1.0.0",
                "1.1.0",
                "0.4.0",
                "9.9.9",
                "/run/tartan/subnet.env",
                "relative/path",
                "..",
                "eth0",
                "-1",
                "65536",
                "99999999999999999999",
                "clientIP",
                "local",
                "web",
            ][..]
        )
        .prop_map(str::to_string),
        "[0-9a-z.:/=_-]{0,20}",
        "\\PC{0,24}",
    ]
}

/// Arbitrary JSON up to 4 levels deep; object keys are drawn from `keys` half the time.
pub fn arb_json(keys: &'static [&'static str]) -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1e6f64..1e6).prop_map(Value::from),
        arb_text().prop_map(Value::String),
    ];
    let key = prop_oneof![
        select(keys).prop_map(str::to_string),
        "[A-Za-z]{1,10}".prop_map(|s: String| s),
    ];
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((key.clone(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// A JSON object (so the decoder gets past "not an object") whose keys are mostly `keys`.
pub fn arb_json_object(keys: &'static [&'static str]) -> impl Strategy<Value = Value> {
    prop::collection::vec((select(keys), arb_json(keys)), 0..10)
        .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect()))
}

/// One change to a valid document. Paths are field names from the top, array indexes as
/// decimal steps (`["ports", "0", "protocol"]`).
#[derive(Debug, Clone)]
pub enum Mutation {
    /// The field at the path is removed.
    Remove(&'static [&'static str]),
    /// The field at the path is set to a value.
    Replace(&'static [&'static str], Value),
    /// A top-level field of that name is set (unknown fields are ignored by the formats).
    Add(String, Value),
}

/// Arbitrary mutations of the fields at `paths`, with replacement values from
/// [`arb_json`] over `keys`.
pub fn arb_mutation(
    paths: &'static [&'static [&'static str]],
    keys: &'static [&'static str],
) -> impl Strategy<Value = Mutation> {
    prop_oneof![
        select(paths).prop_map(Mutation::Remove),
        (select(paths), arb_json(keys)).prop_map(|(p, v)| Mutation::Replace(p, v)),
        ("[A-Za-z]{1,10}", arb_json(keys)).prop_map(|(k, v)| Mutation::Add(k, v)),
    ]
}

fn step<'a>(v: &'a mut Value, key: &str) -> Option<&'a mut Value> {
    match v {
        Value::Object(m) => m.get_mut(key),
        Value::Array(a) => a.get_mut(key.parse::<usize>().ok()?),
        _ => None,
    }
}

/// Applies `m` to `doc` (a path that does not exist in `doc` leaves it unchanged).
pub fn apply(mut doc: Value, m: &Mutation) -> Value {
    let (path, new) = match m {
        Mutation::Add(k, v) => {
            if let Value::Object(o) = &mut doc {
                o.insert(k.clone(), v.clone());
            }
            return doc;
        }
        Mutation::Remove(p) => (*p, None),
        Mutation::Replace(p, v) => (*p, Some(v.clone())),
    };
    let Some((last, parents)) = path.split_last() else {
        return doc;
    };
    let mut at = &mut doc;
    for k in parents {
        match step(at, k) {
            Some(next) => at = next,
            None => return doc,
        }
    }
    match (at, new) {
        (Value::Object(o), None) => {
            o.remove(*last);
        }
        (Value::Object(o), Some(v)) => {
            o.insert(last.to_string(), v);
        }
        (Value::Array(a), new) => {
            if let Ok(i) = last.parse::<usize>()
                && i < a.len()
            {
                match new {
                    None => {
                        a.remove(i);
                    }
                    Some(v) => a[i] = v,
                }
            }
        }
        _ => {}
    }
    doc
}

/// Whether an error message names one of `fields`.
pub fn names_a_field(err: &str, fields: &[&str]) -> bool {
    fields.iter().any(|f| err.contains(f))
}
