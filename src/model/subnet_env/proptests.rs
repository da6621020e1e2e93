//! Property tests of the `subnet.env` decoder (see `util::proptest_support`; the format is lines
//! of `KEY=VALUE`, so mutations work on lines instead of JSON fields).

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use proptest::prelude::*;
use proptest::sample::select;

use super::SubnetEnv;
use crate::util::proptest_support::{arb_text, config, names_a_field};

const KEYS: &[&str] = &[
    "FLANNEL_NETWORK",
    "FLANNEL_SUBNET",
    "FLANNEL_MTU",
    "FLANNEL_IPMASQ",
];

fn arb_net() -> impl Strategy<Value = Ipv4Network> {
    (any::<u32>(), 0u8..=32).prop_map(|(ip, len)| {
        let n = Ipv4Network::new(Ipv4Addr::from(ip), len).expect("prefix 0..=32");
        Ipv4Network::new(n.network(), len).expect("prefix 0..=32")
    })
}

fn arb_net6() -> impl Strategy<Value = ipnetwork::Ipv6Network> {
    (any::<u128>(), 0u8..=128).prop_map(|(ip, len)| {
        let n =
            ipnetwork::Ipv6Network::new(std::net::Ipv6Addr::from(ip), len).expect("prefix 0..=128");
        ipnetwork::Ipv6Network::new(n.network(), len).expect("prefix 0..=128")
    })
}

fn arb_env() -> impl Strategy<Value = SubnetEnv> {
    (
        arb_net(),
        arb_net(),
        any::<u32>(),
        any::<bool>(),
        proptest::option::of((arb_net6(), arb_net6())),
    )
        .prop_map(|(network, subnet, mtu, ipmasq, v6)| SubnetEnv {
            network,
            subnet,
            mtu,
            ipmasq,
            cluster_dns: None,
            ipv6: v6.map(|(network, subnet)| super::Ipv6Env { network, subnet }),
        })
}

/// One change to the file's lines.
#[derive(Debug, Clone)]
enum LineMutation {
    /// The line of that key is dropped.
    Drop(&'static str),
    /// The value of that key becomes the text.
    Set(&'static str, String),
    /// A line is inserted at the position (modulo the line count).
    Insert(usize, String),
}

fn arb_line_mutation() -> impl Strategy<Value = LineMutation> {
    prop_oneof![
        select(KEYS).prop_map(LineMutation::Drop),
        (select(KEYS), arb_text()).prop_map(|(k, v)| LineMutation::Set(k, v)),
        (any::<usize>(), "\\PC{0,30}").prop_map(|(i, l)| LineMutation::Insert(i, l)),
    ]
}

fn mutate(text: &str, m: &LineMutation) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    match m {
        LineMutation::Drop(k) => lines.retain(|l| !l.starts_with(&format!("{k}="))),
        LineMutation::Set(k, v) => {
            for l in &mut lines {
                if l.starts_with(&format!("{k}=")) {
                    *l = format!("{k}={}", v.replace('\n', " "));
                }
            }
        }
        LineMutation::Insert(i, l) => {
            let at = i % (lines.len() + 1);
            lines.insert(at, l.clone());
        }
    }
    lines.join("\n")
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn files_round_trip(e in arb_env()) {
        let back = SubnetEnv::parse(&e.render()).map_err(|err| format!("{err:#}"));
        prop_assert_eq!(back, Ok(e.clone()), "{}", e.render());
    }

    #[test]
    fn arbitrary_text_never_panics(t in "\\PC{0,200}", lines in prop::collection::vec(
        (select(KEYS), arb_text()), 0..6)) {
        let _ = SubnetEnv::parse(&t);
        let file: String = lines.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
        let _ = SubnetEnv::parse(&file);
    }

    #[test]
    fn mutated_files_decode_or_name_a_key(e in arb_env(), m in arb_line_mutation()) {
        let text = mutate(&e.render(), &m);
        if let Err(err) = SubnetEnv::parse(&text) {
            let err = format!("{err:#}");
            prop_assert!(names_a_field(&err, KEYS), "{err} names no key ({text:?})");
        }
    }
}
