//! Property tests of the subnet lease key and value decoders (see `util::proptest_support`).

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use proptest::prelude::*;

use super::{LeaseValue, MacAddr, SubnetKey, subnet_from_key, subnet_to_key};
use crate::model::DecodeError;
use crate::util::proptest_support::{
    apply, arb_bytes, arb_json, arb_json_object, arb_mutation, arb_text, config, names_a_field,
};

const KEYS: &[&str] = &[
    "PublicIP",
    "BackendType",
    "BackendData",
    "NodeName",
    "VNI",
    "VtepMAC",
];
const PATHS: &[&[&str]] = &[
    &["PublicIP"],
    &["BackendType"],
    &["BackendData"],
    &["NodeName"],
    &["BackendData", "VNI"],
    &["BackendData", "VtepMAC"],
];

fn arb_unicast_mac() -> impl Strategy<Value = MacAddr> {
    any::<[u8; 6]>()
        .prop_map(|mut m| {
            m[0] &= 0xfe;
            MacAddr(m)
        })
        .prop_filter("not all zeros", MacAddr::is_valid_unicast)
}

fn arb_lease() -> impl Strategy<Value = LeaseValue> {
    (any::<u32>(), any::<u32>(), arb_unicast_mac(), "\\PC{1,40}")
        .prop_map(|(ip, vni, mac, node)| LeaseValue::vxlan(Ipv4Addr::from(ip), vni, mac, &node))
}

/// The whole decode tartand does on a lease value: the value, then its VXLAN data.
fn decode(bytes: &[u8]) -> Result<(LeaseValue, super::VxlanBackendData), DecodeError> {
    let v = LeaseValue::parse(bytes)?;
    let d = v.vxlan_data()?;
    let _ = v.belongs_to("n", Ipv4Addr::LOCALHOST);
    Ok((v, d))
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn keys_round_trip(ip in any::<u32>(), len in 0u8..=32) {
        let net = Ipv4Network::new(Ipv4Addr::from(ip), len).expect("prefix 0..=32");
        let net = Ipv4Network::new(net.network(), len).expect("prefix 0..=32");
        prop_assert_eq!(subnet_from_key(&subnet_to_key(net)), Ok(net));
    }

    #[test]
    fn arbitrary_keys_never_panic_and_what_decodes_re_encodes(s in arb_text()) {
        if let Ok(net) = subnet_from_key(&s) {
            prop_assert_eq!(net.ip(), net.network());
            prop_assert_eq!(subnet_from_key(&subnet_to_key(net)), Ok(net));
        }
        let dashed = format!("{s}-{}", s.len() % 40);
        let _ = subnet_from_key(&dashed);
    }

    #[test]
    fn dual_stack_keys_round_trip(ip in any::<u32>(), len in 0u8..=32, ip6 in any::<u128>(), len6 in 0u8..=128) {
        let v4 = Ipv4Network::new(Ipv4Addr::from(ip), len).expect("prefix 0..=32");
        let v4 = Ipv4Network::new(v4.network(), len).expect("prefix 0..=32");
        let v6 = ipnetwork::Ipv6Network::new(std::net::Ipv6Addr::from(ip6), len6).expect("prefix 0..=128");
        let v6 = ipnetwork::Ipv6Network::new(v6.network(), len6).expect("prefix 0..=128");
        let k = SubnetKey { v4, v6: Some(v6) };
        prop_assert_eq!(SubnetKey::parse(&k.to_string()), Ok(k));
        prop_assert_eq!(subnet_from_key(&k.to_string()), Ok(v4));
    }

    #[test]
    fn arbitrary_dual_stack_keys_never_panic(v4 in arb_text(), v6 in arb_text()) {
        let key = format!("{v4}&{v6}");
        if let Ok(k) = SubnetKey::parse(&key) {
            prop_assert_eq!(SubnetKey::parse(&k.to_string()), Ok(k));
        }
    }

    #[test]
    fn macs_round_trip_and_arbitrary_text_never_panics(m in any::<[u8; 6]>(), s in arb_text()) {
        let mac = MacAddr(m);
        prop_assert_eq!(mac.to_string().parse::<MacAddr>(), Ok(mac));
        let _ = s.parse::<MacAddr>();
    }

    #[test]
    fn values_round_trip(v in arb_lease()) {
        let (back, data) = decode(&v.to_bytes()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&back, &v);
        prop_assert!(data.vtep_mac.is_valid_unicast());
    }

    #[test]
    fn arbitrary_bytes_and_json_never_panic(b in arb_bytes(), v in arb_json_object(KEYS), w in arb_json(KEYS)) {
        let _ = decode(&b);
        let _ = decode(v.to_string().as_bytes());
        let _ = decode(w.to_string().as_bytes());
    }

    #[test]
    fn mutated_values_decode_or_name_a_field(v in arb_lease(), m in arb_mutation(PATHS, KEYS)) {
        let doc: serde_json::Value = serde_json::from_slice(&v.to_bytes()).expect("own JSON");
        let mutated = apply(doc, &m);
        if let Err(e) = decode(mutated.to_string().as_bytes()) {
            prop_assert!(names_a_field(&e.to_string(), KEYS), "{e} names no field ({mutated})");
        }
    }
}
