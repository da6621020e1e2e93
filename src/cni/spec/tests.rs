//! Unit tests of `cni::spec`.

use super::*;

fn env(vars: &[(&str, &str)]) -> Result<CniEnv, CniError> {
    let m: BTreeMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    CniEnv::from_vars(|k| m.get(k).cloned())
}

const ADD: &[(&str, &str)] = &[
    ("CNI_COMMAND", "ADD"),
    ("CNI_CONTAINERID", "abc123"),
    ("CNI_NETNS", "/var/run/netns/x"),
    ("CNI_IFNAME", "eth0"),
    ("CNI_PATH", "/opt/cni/bin"),
    (
        "CNI_ARGS",
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=prod;K8S_POD_NAME=web-0",
    ),
];

#[test]
fn environment() {
    let e = env(ADD).unwrap();
    assert_eq!(e.command, Command::Add);
    assert_eq!(e.pod_namespace(), "prod");
    assert_eq!(e.pod_name(), "web-0");
    let with = |k: &str, v: &str| {
        let mut vars: Vec<(&str, &str)> = ADD.iter().filter(|(kk, _)| *kk != k).copied().collect();
        if !v.is_empty() {
            vars.push((k, v));
        }
        env(&vars)
    };
    for (k, v) in [
        ("CNI_COMMAND", ""),
        ("CNI_COMMAND", "ATTACH"),
        ("CNI_CONTAINERID", ""),
        ("CNI_CONTAINERID", "../etc"),
        ("CNI_CONTAINERID", "a/b"),
        ("CNI_CONTAINERID", "-abc"),
        ("CNI_CONTAINERID", "a b"),
        ("CNI_IFNAME", ""),
        ("CNI_IFNAME", "eth0/../x"),
        ("CNI_IFNAME", "0123456789abcdef"),
        ("CNI_IFNAME", ".."),
        ("CNI_IFNAME", "a:b"),
        ("CNI_NETNS", ""),
        ("CNI_NETNS", "relative/ns"),
        ("CNI_ARGS", "K8S_POD_NAME"),
        ("CNI_ARGS", "=x"),
    ] {
        let err = with(k, v).expect_err(&format!("{k}={v:?} accepted"));
        assert_eq!(err.code, code::INVALID_ENV, "{k}={v:?}: {err}");
    }
    assert!(with("CNI_IFNAME", "0123456789abcde").is_ok());
    // DEL does not need the netns; VERSION needs nothing else.
    assert!(
        env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_IFNAME", "eth0")
        ])
        .is_ok()
    );
    assert!(env(&[("CNI_COMMAND", "VERSION")]).is_ok());
    assert!(env(&[("CNI_COMMAND", "GC")]).is_ok());
    let d = env(&[("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "c")]).unwrap_err();
    assert_eq!(d.code, code::INVALID_ENV);
    // Defaults without CNI_ARGS.
    let e = env(&ADD[..4]).unwrap();
    assert_eq!(
        (e.pod_namespace(), e.pod_name()),
        ("default".into(), "abc123".into())
    );
}

#[test]
fn config_defaults_and_labels() {
    let c = NetConf::parse(
        br#"{"cniVersion":"1.0.0","name":"tartan","type":"tartan-cni",
                "args":{"cni":{"labels":[{"key":"app","value":"web"},{"key":"tier","value":"a"}]}},
                "runtimeConfig":{"labels":{"tier":"b"}}}"#,
    )
    .unwrap();
    assert_eq!(c.cni_version, CniVersion::V1_0_0);
    assert_eq!(c.bridge, "tartan0");
    assert_eq!(c.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
    assert_eq!(c.subnet_file, PathBuf::from(DEFAULT_SUBNET_FILE));
    assert_eq!(c.daemon_socket, PathBuf::from(DEFAULT_DAEMON_SOCKET));
    assert!(c.hairpin_mode);
    assert_eq!(c.labels["app"], "web");
    assert_eq!(c.labels["tier"], "b");
    assert!(c.prev_result.is_none());
}

#[test]
fn config_errors_have_the_right_codes() {
    let cases: &[(&[u8], u32)] = &[
            (b"", code::DECODE),
            (b"{not json", code::DECODE),
            (b"[1,2]", code::DECODE),
            (b"\"x\"", code::DECODE),
            (br#"{"name":"n"}"#, code::INVALID_CONFIG),
            (br#"{"cniVersion":"0.2.0","name":"n"}"#, code::INCOMPATIBLE_VERSION),
            (br#"{"cniVersion":"9.9.9","name":"n"}"#, code::INCOMPATIBLE_VERSION),
            (br#"{"cniVersion":1,"name":"n"}"#, code::INVALID_CONFIG),
            (br#"{"cniVersion":"1.0.0"}"#, code::INVALID_CONFIG),
            (br#"{"cniVersion":"1.0.0","name":"../up"}"#, code::INVALID_CONFIG),
            (br#"{"cniVersion":"1.0.0","name":"a/b"}"#, code::INVALID_CONFIG),
            (br#"{"cniVersion":"1.0.0","name":"n","bridge":"way-too-long-bridge"}"#, code::INVALID_CONFIG),
            (br#"{"cniVersion":"1.0.0","name":"n","mtu":20}"#, code::INVALID_CONFIG),
            (br#"{"cniVersion":"1.0.0","name":"n","mtu":"1500"}"#, code::INVALID_CONFIG),
            (br#"{"cniVersion":"1.0.0","name":"n","dataDir":"relative"}"#, code::INVALID_CONFIG),
            (br#"{"cniVersion":"1.0.0","name":"n","args":{"cni":{"labels":[{"key":1}]}}}"#, code::INVALID_CONFIG),
            (br#"{"cniVersion":"1.0.0","name":"n","prevResult":{"ips":[{"address":"nope"}]}}"#, code::INVALID_CONFIG),
            (br#"{"cniVersion":"1.0.0","name":"n","prevResult":{"ips":[{"address":"10.0.0.2/24","interface":3}]}}"#, code::INVALID_CONFIG),
        ];
    for (input, want) in cases {
        let e = NetConf::parse(input).expect_err(&String::from_utf8_lossy(input));
        assert_eq!(e.code, *want, "{}: {e}", String::from_utf8_lossy(input));
    }
}

fn sample() -> CniResult {
    CniResult {
        interfaces: vec![
            Interface {
                name: "tartan0".into(),
                mac: Some("0a:58:0a:f4:03:01".into()),
                mtu: Some(1450),
                sandbox: None,
                extra: Map::new(),
            },
            Interface {
                name: "eth0".into(),
                mac: Some("0a:58:0a:f4:03:05".into()),
                mtu: Some(1450),
                sandbox: Some("/var/run/netns/x".into()),
                extra: Map::new(),
            },
        ],
        ips: vec![IpConfig {
            address: "10.244.3.5/24".parse().unwrap(),
            gateway: Some("10.244.3.1".parse().unwrap()),
            interface: Some(1),
            extra: Map::new(),
        }],
        routes: vec![Route {
            dst: "0.0.0.0/0".parse().unwrap(),
            gw: Some("10.244.3.1".parse().unwrap()),
            extra: Map::new(),
        }],
        dns: Value::Object(Map::new()),
    }
}

#[test]
fn results_per_version() {
    let r = sample();
    let v1 = r.render(CniVersion::V1_1_0);
    assert_eq!(v1["cniVersion"], "1.1.0");
    assert_eq!(v1["ips"][0]["address"], "10.244.3.5/24");
    assert_eq!(v1["ips"][0]["gateway"], "10.244.3.1");
    assert_eq!(v1["ips"][0]["interface"], 1);
    assert!(v1["ips"][0].get("version").is_none());
    assert_eq!(v1["interfaces"][1]["mtu"], 1450);
    assert_eq!(v1["interfaces"][1]["sandbox"], "/var/run/netns/x");
    assert_eq!(v1["routes"][0]["dst"], "0.0.0.0/0");
    let v10 = r.render(CniVersion::V1_0_0);
    assert!(v10["interfaces"][1].get("mtu").is_none());
    assert!(v10["ips"][0].get("version").is_none());
    for old in [CniVersion::V0_3_0, CniVersion::V0_3_1, CniVersion::V0_4_0] {
        let v = r.render(old);
        assert_eq!(v["cniVersion"], old.as_str());
        assert_eq!(v["ips"][0]["version"], "4");
        assert!(v["interfaces"][1].get("mtu").is_none());
        // And back: an old result parses into the same data (minus the 1.1.0 MTU).
        let back = CniResult::parse(v).unwrap();
        let mut want = r.clone();
        for i in &mut want.interfaces {
            i.mtu = None;
        }
        assert_eq!(back, want);
    }
    assert_eq!(CniResult::parse(v1).unwrap(), r);
}

#[test]
fn other_plugins_fields_pass_through_and_append_renumbers() {
    let prev = serde_json::json!({
        "cniVersion": "0.4.0",
        "interfaces": [{"name": "lo", "sandbox": "/x", "custom": true}],
        "ips": [{"version": "6", "address": "fd00::2/64", "interface": 0}],
        "routes": [{"dst": "::/0", "mtu": 1400}],
        "dns": {"nameservers": ["10.96.0.10"]}
    });
    let mut r = CniResult::parse(prev).unwrap();
    r.append(sample());
    assert_eq!(r.ips[1].interface, Some(2));
    let v = r.render(CniVersion::V0_4_0);
    assert_eq!(v["interfaces"][0]["custom"], true);
    assert_eq!(v["ips"][0]["version"], "6");
    assert_eq!(v["ips"][1]["version"], "4");
    assert!(v["routes"][0].get("mtu").is_none());
    assert_eq!(v["dns"]["nameservers"][0], "10.96.0.10");
    let v = r.render(CniVersion::V1_1_0);
    assert_eq!(v["routes"][0]["mtu"], 1400);
    assert_eq!(
        find_container_interface(&r, "eth0", Path::new("/var/run/netns/x")),
        Some(2)
    );
    assert_eq!(
        find_container_interface(&r, "eth0", Path::new("/other")),
        None
    );
}

#[test]
fn version_answer() {
    let v = version_info(Some(CniVersion::V0_4_0));
    assert_eq!(v["cniVersion"], "0.4.0");
    assert_eq!(
        v["supportedVersions"],
        serde_json::json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );
    assert_eq!(version_info(None)["cniVersion"], "1.1.0");
}
