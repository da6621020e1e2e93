//! Property tests of the pod record decoder (see `util::proptest_support`).

use std::net::Ipv4Addr;

use proptest::prelude::*;

use super::PodRecord;
use crate::util::proptest_support::{
    apply, arb_bytes, arb_json, arb_json_object, arb_mutation, config, names_a_field,
};

const KEYS: &[&str] = &[
    "containerId",
    "ifname",
    "node",
    "ip",
    "namespace",
    "name",
    "labels",
];
const PATHS: &[&[&str]] = &[
    &["containerId"],
    &["ifname"],
    &["node"],
    &["ip"],
    &["namespace"],
    &["name"],
    &["labels"],
];

fn arb_record() -> impl Strategy<Value = PodRecord> {
    (
        "[a-z0-9]{1,64}",
        "[a-z0-9]{1,15}",
        "\\PC{1,30}",
        any::<u32>(),
        "\\PC{0,30}",
        "\\PC{0,30}",
        prop::collection::btree_map("\\PC{1,20}", "\\PC{0,20}", 0..5),
    )
        .prop_map(
            |(container_id, ifname, node, ip, namespace, name, labels)| PodRecord {
                ip6: None,
                container_id,
                ifname,
                node,
                ip: Ipv4Addr::from(ip),
                namespace,
                name,
                labels,
            },
        )
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn records_round_trip(r in arb_record()) {
        prop_assert_eq!(PodRecord::parse(&r.to_bytes()), Ok(r));
    }

    #[test]
    fn arbitrary_bytes_and_json_never_panic(b in arb_bytes(), v in arb_json_object(KEYS), w in arb_json(KEYS)) {
        let _ = PodRecord::parse(&b);
        let _ = PodRecord::parse(v.to_string().as_bytes());
        let _ = PodRecord::parse(w.to_string().as_bytes());
    }

    #[test]
    fn mutated_records_decode_or_name_a_field(r in arb_record(), m in arb_mutation(PATHS, KEYS)) {
        let doc: serde_json::Value = serde_json::from_slice(&r.to_bytes()).expect("own JSON");
        let mutated = apply(doc, &m);
        if let Err(e) = PodRecord::parse(mutated.to_string().as_bytes()) {
            prop_assert!(names_a_field(&e.to_string(), KEYS), "{e} names no field ({mutated})");
        }
    }
}
