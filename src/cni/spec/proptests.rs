//! Property tests of the CNI config and environment decoders and of results' conversion
//! between spec versions (see `util::proptest_support`).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use proptest::prelude::*;
use proptest::sample::select;
use serde_json::{Map, Value, json};

use super::{
    CniEnv, CniResult, CniVersion, Interface, IpConfig, NetConf, Route, parse_cni_args,
    validate_ifname, validate_network_name,
};
use crate::cni::error::{CniError, code};
use crate::util::proptest_support::{
    apply, arb_bytes, arb_json, arb_json_object, arb_mutation, arb_text, config, names_a_field,
};

const KEYS: &[&str] = &[
    "cniVersion",
    "name",
    "type",
    "bridge",
    "subnetFile",
    "dataDir",
    "daemonSocket",
    "mtu",
    "hairpinMode",
    "args",
    "cni",
    "labels",
    "key",
    "value",
    "runtimeConfig",
    "prevResult",
    "interfaces",
    "ips",
    "routes",
    "dns",
    "address",
    "gateway",
    "interface",
    "sandbox",
    "dst",
    "gw",
    "cni.dev/valid-attachments",
    "containerID",
    "ifname",
];
/// Field names an error may name: [`KEYS`] less "type", "key" and "value", which serde's
/// own words ("invalid type", "invalid value") would match.
const FIELDS: &[&str] = &[
    "cniVersion",
    "name",
    "bridge",
    "subnetFile",
    "dataDir",
    "daemonSocket",
    "mtu",
    "hairpinMode",
    "args",
    "labels",
    "runtimeConfig",
    "prevResult",
    "cni.dev/valid-attachments",
];
const PATHS: &[&[&str]] = &[
    &["cniVersion"],
    &["name"],
    &["type"],
    &["bridge"],
    &["subnetFile"],
    &["dataDir"],
    &["daemonSocket"],
    &["mtu"],
    &["hairpinMode"],
    &["args"],
    &["args", "cni"],
    &["args", "cni", "labels"],
    &["args", "cni", "labels", "0"],
    &["args", "cni", "labels", "0", "key"],
    &["args", "cni", "labels", "0", "value"],
    &["runtimeConfig"],
    &["runtimeConfig", "labels"],
    &["prevResult"],
    &["prevResult", "cniVersion"],
    &["prevResult", "interfaces"],
    &["prevResult", "interfaces", "0", "name"],
    &["prevResult", "interfaces", "0", "mtu"],
    &["prevResult", "ips"],
    &["prevResult", "ips", "0", "address"],
    &["prevResult", "ips", "0", "gateway"],
    &["prevResult", "ips", "0", "interface"],
    &["prevResult", "routes", "0", "dst"],
    &["cni.dev/valid-attachments"],
    &["cni.dev/valid-attachments", "0", "containerID"],
    &["cni.dev/valid-attachments", "0", "ifname"],
];
const ENV_VARS: &[&str] = &[
    "CNI_COMMAND",
    "CNI_CONTAINERID",
    "CNI_NETNS",
    "CNI_IFNAME",
    "CNI_ARGS",
    "CNI_PATH",
];

const CONTAINER_ID: &str = "[a-zA-Z0-9][a-zA-Z0-9_.-]{0,40}";
const IFNAME: &str = "[a-z][a-z0-9]{0,14}";
const ABS_PATH: &str = "(/[a-z0-9._-]{1,10}){1,4}";

fn arb_ipnet() -> impl Strategy<Value = IpNetwork> {
    prop_oneof![
        (any::<u32>(), 0u8..=32).prop_map(|(a, p)| IpNetwork::V4(
            Ipv4Network::new(Ipv4Addr::from(a), p).expect("prefix 0..=32")
        )),
        (any::<u128>(), 0u8..=128).prop_map(|(a, p)| IpNetwork::V6(
            Ipv6Network::new(Ipv6Addr::from(a), p).expect("prefix 0..=128")
        )),
    ]
}

fn arb_extra() -> impl Strategy<Value = Map<String, Value>> {
    prop::collection::vec(("[a-z]{1,6}x", arb_text()), 0..2)
        .prop_map(|kv| kv.into_iter().map(|(k, v)| (k, Value::String(v))).collect())
}

/// Any result: interfaces, addresses pointing at existing interfaces, routes, DNS.
fn arb_result() -> impl Strategy<Value = CniResult> {
    let iface = (
        IFNAME,
        proptest::option::of("[0-9a-f:]{17}"),
        proptest::option::of(68u32..=65535),
        proptest::option::of(ABS_PATH),
        arb_extra(),
    )
        .prop_map(|(name, mac, mtu, sandbox, extra)| Interface {
            name,
            mac,
            mtu,
            sandbox,
            extra,
        });
    (prop::collection::vec(iface, 0..4), 0usize..4)
        .prop_flat_map(|(interfaces, n_ips)| {
            let n = interfaces.len();
            let ip = (
                arb_ipnet(),
                proptest::option::of(arb_ipnet().prop_map(|n| n.ip())),
                if n == 0 {
                    Just(None).boxed()
                } else {
                    proptest::option::of(0..n).boxed()
                },
                arb_extra(),
            )
                .prop_map(|(address, gateway, interface, extra)| IpConfig {
                    address,
                    gateway,
                    interface,
                    extra,
                });
            let route = (
                arb_ipnet(),
                proptest::option::of(arb_ipnet().prop_map(|n| n.ip())),
            )
                .prop_map(|(dst, gw)| Route {
                    dst,
                    gw,
                    extra: Map::new(),
                });
            (
                Just(interfaces),
                prop::collection::vec(ip, n_ips),
                prop::collection::vec(route, 0..3),
                any::<bool>(),
            )
        })
        .prop_map(|(interfaces, ips, routes, with_dns)| CniResult {
            interfaces,
            ips,
            routes,
            dns: if with_dns {
                json!({"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]})
            } else {
                Value::Object(Map::new())
            },
        })
}

fn arb_version() -> impl Strategy<Value = CniVersion> {
    select(&CniVersion::ALL[..])
}

/// A valid config as JSON, with every optional key present or not.
fn arb_conf() -> impl Strategy<Value = Value> {
    (
        arb_version(),
        "[a-zA-Z0-9][a-zA-Z0-9_.-]{0,30}",
        proptest::option::of(IFNAME),
        prop::collection::vec(proptest::option::of(ABS_PATH), 3),
        proptest::option::of(68u32..=65535),
        proptest::option::of(any::<bool>()),
        prop::collection::btree_map("[a-z./-]{1,20}", "\\PC{0,20}", 0..3),
        prop::collection::btree_map("[a-z./-]{1,20}", "\\PC{0,20}", 0..3),
        proptest::option::of(arb_result()),
        proptest::option::of(prop::collection::vec((CONTAINER_ID, IFNAME), 0..3)),
    )
        .prop_map(
            |(version, name, bridge, paths, mtu, hairpin, args_labels, rc_labels, prev, atts)| {
                let mut c =
                    json!({"cniVersion": version.as_str(), "name": name, "type": "tartan-cni"});
                let o = c.as_object_mut().expect("an object");
                let mut put = |k: &str, v: Option<Value>| {
                    if let Some(v) = v {
                        o.insert(k.to_string(), v);
                    }
                };
                put("bridge", bridge.map(Value::from));
                for (k, p) in ["subnetFile", "dataDir", "daemonSocket"].iter().zip(paths) {
                    put(k, p.map(Value::from));
                }
                put("mtu", mtu.map(Value::from));
                put("hairpinMode", hairpin.map(Value::from));
                let labels: Vec<Value> = args_labels
                    .iter()
                    .map(|(k, v)| json!({"key": k, "value": v}))
                    .collect();
                put("args", Some(json!({"cni": {"labels": labels}})));
                put("runtimeConfig", Some(json!({"labels": rc_labels})));
                put("prevResult", prev.map(|r| r.render(version)));
                put(
                    "cni.dev/valid-attachments",
                    atts.map(|a| {
                        a.iter()
                            .map(|(c, i)| json!({"containerID": c, "ifname": i}))
                            .collect::<Vec<_>>()
                            .into()
                    }),
                );
                c
            },
        )
}

fn error_text(e: &CniError) -> String {
    format!("{} {}", e.msg, e.details)
}

/// What every decoded config holds.
fn check_conf(c: &NetConf) -> Result<(), TestCaseError> {
    prop_assert!(validate_network_name(&c.name).is_ok());
    prop_assert!(validate_ifname(&c.bridge).is_ok());
    for p in [&c.subnet_file, &c.data_dir, &c.daemon_socket] {
        prop_assert!(p.is_absolute());
    }
    prop_assert!(c.mtu.is_none_or(|m| (68..=65535).contains(&m)));
    if let Some(r) = &c.prev_result {
        for ip in &r.ips {
            prop_assert!(ip.interface.is_none_or(|i| i < r.interfaces.len()));
        }
    }
    Ok(())
}

fn env_of(vars: &BTreeMap<String, String>) -> Result<CniEnv, CniError> {
    CniEnv::from_vars(|k| vars.get(k).cloned())
}

fn arb_valid_env() -> impl Strategy<Value = BTreeMap<String, String>> {
    (
        select(&["ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC"][..]),
        CONTAINER_ID,
        ABS_PATH,
        IFNAME,
        prop::collection::btree_map("[A-Z_]{1,12}", "[a-z0-9-]{0,12}", 0..3),
    )
        .prop_map(|(cmd, cid, netns, ifname, args)| {
            let args: String = args.iter().map(|(k, v)| format!("{k}={v};")).collect();
            [
                ("CNI_COMMAND", cmd.to_string()),
                ("CNI_CONTAINERID", cid),
                ("CNI_NETNS", netns),
                ("CNI_IFNAME", ifname),
                ("CNI_ARGS", args),
                ("CNI_PATH", "/opt/cni/bin".to_string()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect()
        })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_stdin_never_panics_and_gets_a_config_code(b in arb_bytes(), v in arb_json(KEYS)) {
        for input in [b, v.to_string().into_bytes()] {
            if let Err(e) = NetConf::parse(&input) {
                prop_assert!(
                    [code::INCOMPATIBLE_VERSION, code::DECODE, code::INVALID_CONFIG].contains(&e.code),
                    "{e}"
                );
            }
        }
    }

    #[test]
    fn arbitrary_config_objects_never_panic_and_what_decodes_is_sound(v in arb_json_object(KEYS)) {
        match NetConf::parse(v.to_string().as_bytes()) {
            Ok(c) => check_conf(&c)?,
            Err(e) => prop_assert!(
                names_a_field(&error_text(&e), FIELDS),
                "{e} names no field ({v})"
            ),
        }
    }

    #[test]
    fn valid_configs_decode_to_what_they_say(v in arb_conf()) {
        let c = NetConf::parse(v.to_string().as_bytes())
            .map_err(|e| TestCaseError::fail(format!("{e} ({v})")))?;
        check_conf(&c)?;
        prop_assert_eq!(c.cni_version.as_str(), v["cniVersion"].as_str().unwrap_or_default());
        prop_assert_eq!(c.name.as_str(), v["name"].as_str().unwrap_or_default());
        prop_assert_eq!(c.mtu.map(u64::from), v["mtu"].as_u64());
        prop_assert_eq!(c.prev_result.is_some(), v.get("prevResult").is_some());
        for (k, val) in v["runtimeConfig"]["labels"].as_object().into_iter().flatten() {
            prop_assert_eq!(c.labels.get(k).map(String::as_str), val.as_str());
        }
    }

    #[test]
    fn mutated_configs_decode_or_name_a_field(v in arb_conf(), m in arb_mutation(PATHS, KEYS)) {
        let mutated = apply(v, &m);
        match NetConf::parse(mutated.to_string().as_bytes()) {
            Ok(c) => check_conf(&c)?,
            Err(e) => prop_assert!(
                names_a_field(&error_text(&e), FIELDS),
                "{e} names no field ({mutated})"
            ),
        }
    }

    #[test]
    fn results_round_trip_through_every_version(r in arb_result(), v in arb_version()) {
        let back = CniResult::parse(r.render(v)).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut want = r.clone();
        if v < CniVersion::V1_1_0 {
            for i in &mut want.interfaces {
                i.mtu = None;
            }
        }
        prop_assert_eq!(back, want);
    }

    #[test]
    fn arbitrary_environments_never_panic_and_errors_name_the_variable(
        vars in prop::collection::btree_map(select(ENV_VARS), arb_text(), 0..7),
    ) {
        let vars: BTreeMap<String, String> =
            vars.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        match env_of(&vars) {
            Ok(e) => {
                let _ = (e.pod_namespace(), e.pod_name());
            }
            Err(e) => {
                prop_assert_eq!(e.code, code::INVALID_ENV, "{}", e);
                prop_assert!(names_a_field(&e.msg, ENV_VARS), "{e} names no variable");
            }
        }
    }

    #[test]
    fn mutated_environments_decode_or_name_the_variable(
        vars in arb_valid_env(),
        var in select(ENV_VARS),
        value in proptest::option::of(arb_text()),
    ) {
        prop_assert!(env_of(&vars).is_ok(), "a valid environment was refused: {vars:?}");
        let mut vars = vars;
        match value {
            Some(v) => vars.insert(var.to_string(), v),
            None => vars.remove(var),
        };
        if let Err(e) = env_of(&vars) {
            prop_assert_eq!(e.code, code::INVALID_ENV, "{}", e);
            prop_assert!(names_a_field(&e.msg, ENV_VARS), "{e} names no variable");
        }
    }

    #[test]
    fn cni_args_round_trip(args in prop::collection::btree_map("[A-Za-z0-9_]{1,12}", "[^;=]{0,20}", 0..5)) {
        let text: String = args.iter().map(|(k, v)| format!("{k}={v};")).collect();
        prop_assert_eq!(parse_cni_args(&text), Ok(args));
    }

    #[test]
    fn arbitrary_cni_args_never_panic(s in "\\PC{0,60}") {
        if let Err(e) = parse_cni_args(&s) {
            prop_assert!(e.msg.starts_with("CNI_ARGS"), "{e}");
        }
    }
}
