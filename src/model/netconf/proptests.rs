//! Property tests of the network config decoder (see `util::proptest_support` for the properties).

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnetwork::{Ipv4Network, Ipv6Network};
use proptest::prelude::*;

use super::{BackendConfig, Ipv6Pool, NetworkConfig};
use crate::util::proptest_support::{
    Mutation, apply, arb_bytes, arb_json, arb_json_object, arb_mutation, config, names_a_field,
};

const KEYS: &[&str] = &[
    "Network",
    "SubnetLen",
    "SubnetMin",
    "SubnetMax",
    "EnableIPv4",
    "EnableIPv6",
    "IPv6Network",
    "IPv6SubnetLen",
    "IPv6SubnetMin",
    "IPv6SubnetMax",
    "Backend",
    "Type",
    "VNI",
    "Port",
    "DirectRouting",
];
const PATHS: &[&[&str]] = &[
    &["Network"],
    &["SubnetLen"],
    &["SubnetMin"],
    &["SubnetMax"],
    &["EnableIPv4"],
    &["EnableIPv6"],
    &["IPv6Network"],
    &["IPv6SubnetLen"],
    &["IPv6SubnetMin"],
    &["IPv6SubnetMax"],
    &["Backend"],
    &["Backend", "Type"],
    &["Backend", "VNI"],
    &["Backend", "Port"],
    &["Backend", "DirectRouting"],
];

/// A valid IPv6 pool: any network /0../124, a subnet length leaving at least four subnets
/// (at most 126), a SubnetMin..SubnetMax range inside it.
fn arb_ipv6_pool() -> impl Strategy<Value = Ipv6Pool> {
    (any::<u128>(), 0u8..=124)
        .prop_flat_map(|(base, plen)| {
            let net = Ipv6Network::new(Ipv6Addr::from(base), plen)
                .and_then(|n| Ipv6Network::new(n.network(), plen))
                .expect("prefix 0..=124");
            (Just(net), (plen + 2)..=126)
        })
        .prop_flat_map(|(net, len)| {
            // Subnet indices within the network (at most 2^64 of them are drawn from).
            let bits = u32::from(len - net.prefix()).min(64);
            let count = if bits == 64 { u64::MAX } else { 1u64 << bits };
            (Just(net), Just(len), 0..count, 0..count)
        })
        .prop_map(|(network, subnet_len, i, j)| {
            let size = 1u128 << (128 - u32::from(subnet_len));
            let first = u128::from(network.network());
            let at = |k: u64| Ipv6Addr::from(first + u128::from(k) * size);
            Ipv6Pool {
                network,
                subnet_len,
                subnet_min: at(i.min(j)),
                subnet_max: at(i.max(j)),
            }
        })
}

/// A valid config: any network /0../28, a subnet length leaving at least four subnets, a
/// SubnetMin..SubnetMax range inside it, any VNI and port; IPv4 only or dual-stack.
fn arb_config() -> impl Strategy<Value = NetworkConfig> {
    (arb_config4(), proptest::option::of(arb_ipv6_pool()))
        .prop_map(|(c, ipv6)| NetworkConfig { ipv6, ..c })
}

fn arb_config4() -> impl Strategy<Value = NetworkConfig> {
    (any::<u32>(), 0u8..=28)
        .prop_flat_map(|(base, plen)| {
            let net = Ipv4Network::new(Ipv4Addr::from(base), plen)
                .and_then(|n| Ipv4Network::new(n.network(), plen))
                .expect("prefix 0..=28");
            (Just(net), (plen + 2)..=30)
        })
        .prop_flat_map(|(net, len)| {
            let count = 1u64 << (len - net.prefix());
            (
                Just(net),
                Just(len),
                0..count,
                0..count,
                1u32..(1 << 24),
                1u16..=65535,
                any::<bool>(),
            )
        })
        .prop_map(|(network, subnet_len, i, j, vni, port, direct_routing)| {
            let size = 1u64 << (32 - subnet_len);
            let first = u64::from(u32::from(network.network()));
            let at = |k: u64| Ipv4Addr::from((first + k * size) as u32);
            NetworkConfig {
                network,
                subnet_len,
                subnet_min: at(i.min(j)),
                subnet_max: at(i.max(j)),
                ipv6: None,
                backend: BackendConfig {
                    vni,
                    port,
                    direct_routing,
                },
            }
        })
}

/// What every decoded config holds.
fn check_invariants(c: &NetworkConfig) -> Result<(), TestCaseError> {
    prop_assert!(c.subnet_len >= c.network.prefix() + 2 && c.subnet_len <= 30);
    prop_assert!(c.network.contains(c.subnet_min) && c.network.contains(c.subnet_max));
    prop_assert!(u32::from(c.subnet_min) <= u32::from(c.subnet_max));
    prop_assert!(c.subnet_count() >= 1);
    let first = c.nth_subnet(0).expect("a first subnet");
    prop_assert!(c.is_leasable(first));
    prop_assert!(c.nth_subnet(c.subnet_count()).is_none());
    prop_assert!(c.backend.vni >= 1 && c.backend.vni < (1 << 24) && c.backend.port >= 1);
    if let Some(p) = &c.ipv6 {
        prop_assert!(p.subnet_len >= p.network.prefix() + 2 && p.subnet_len <= 126);
        prop_assert!(p.network.contains(p.subnet_min) && p.network.contains(p.subnet_max));
        prop_assert!(u128::from(p.subnet_min) <= u128::from(p.subnet_max));
        let first = p.nth_subnet(0).expect("a first IPv6 subnet");
        prop_assert!(p.is_leasable(first));
        if p.subnet_count() < u64::MAX {
            prop_assert!(p.nth_subnet(p.subnet_count()).is_none());
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes_never_panic(b in arb_bytes()) {
        let _ = NetworkConfig::parse(&b);
    }

    #[test]
    fn arbitrary_json_never_panics_and_what_decodes_is_sound(v in arb_json_object(KEYS)) {
        if let Ok(c) = NetworkConfig::parse(v.to_string().as_bytes()) {
            check_invariants(&c)?;
        }
    }

    #[test]
    fn valid_configs_round_trip(c in arb_config()) {
        let back = NetworkConfig::parse(c.to_json().as_bytes());
        prop_assert_eq!(back.as_ref(), Ok(&c), "{}", c.to_json());
        check_invariants(&c)?;
    }

    #[test]
    fn mutated_configs_decode_or_name_a_field(
        c in arb_config(),
        m in arb_mutation(PATHS, KEYS),
    ) {
        let doc: serde_json::Value = serde_json::from_str(&c.to_json()).expect("own JSON");
        let mutated = apply(doc, &m);
        match NetworkConfig::parse(mutated.to_string().as_bytes()) {
            Ok(back) => {
                check_invariants(&back)?;
                if let Mutation::Add(k, _) = &m
                    && !KEYS.contains(&k.as_str())
                {
                    prop_assert_eq!(back, c, "an unknown field changed the config");
                }
            }
            Err(e) => prop_assert!(
                names_a_field(&e.to_string(), KEYS),
                "{e} names no field ({mutated})"
            ),
        }
    }

    #[test]
    fn arbitrary_values_anywhere_never_panic(v in arb_json(KEYS)) {
        let _ = NetworkConfig::parse(v.to_string().as_bytes());
    }
}
