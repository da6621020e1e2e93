//! The CNI protocol as tartan-cni speaks it: versions, the environment, the network config on
//! stdin, results and their conversion between spec versions. Pure data and validation; no
//! I/O besides reading the values handed in.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::error::{CniError, code};

/// Default node bridge.
pub const DEFAULT_BRIDGE: &str = "tartan0";
/// Default path of tartand's subnet.env.
pub const DEFAULT_SUBNET_FILE: &str = "/run/tartan/subnet.env";
/// Default IPAM directory (one subdirectory per network name).
pub const DEFAULT_DATA_DIR: &str = "/var/lib/tartan/cni";
/// Default tartand socket.
pub const DEFAULT_DAEMON_SOCKET: &str = "/run/tartan/tartand.sock";

/// A CNI spec version this plugin speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CniVersion {
    /// 0.3.0
    V0_3_0,
    /// 0.3.1
    V0_3_1,
    /// 0.4.0 (adds CHECK)
    V0_4_0,
    /// 1.0.0
    V1_0_0,
    /// 1.1.0 (adds STATUS, GC, interface MTU)
    V1_1_0,
}

impl CniVersion {
    /// Every supported version, oldest first.
    pub const ALL: [CniVersion; 5] = [
        CniVersion::V0_3_0,
        CniVersion::V0_3_1,
        CniVersion::V0_4_0,
        CniVersion::V1_0_0,
        CniVersion::V1_1_0,
    ];
    /// The newest supported version.
    pub const LATEST: CniVersion = CniVersion::V1_1_0;

    /// Parses a version string; anything unsupported is error code 1.
    pub fn parse(s: &str) -> Result<CniVersion, CniError> {
        CniVersion::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| {
                CniError::new(
                    code::INCOMPATIBLE_VERSION,
                    format!("incompatible CNI version: cniVersion {s:?}"),
                )
                .details(format!("supported: {}", supported_list()))
            })
    }

    /// The version string.
    pub fn as_str(self) -> &'static str {
        match self {
            CniVersion::V0_3_0 => "0.3.0",
            CniVersion::V0_3_1 => "0.3.1",
            CniVersion::V0_4_0 => "0.4.0",
            CniVersion::V1_0_0 => "1.0.0",
            CniVersion::V1_1_0 => "1.1.0",
        }
    }

    /// Whether results of this version tag IPs with `"version": "4"|"6"` (pre-1.0 format).
    pub fn tags_ip_version(self) -> bool {
        self < CniVersion::V1_0_0
    }
}

fn supported_list() -> String {
    CniVersion::ALL.map(CniVersion::as_str).join(", ")
}

/// The VERSION answer: the requested version (or the latest) and every supported version.
pub fn version_info(requested: Option<CniVersion>) -> Value {
    serde_json::json!({
        "cniVersion": requested.unwrap_or(CniVersion::LATEST).as_str(),
        "supportedVersions": CniVersion::ALL.map(CniVersion::as_str),
    })
}

/// `CNI_COMMAND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Attach the container.
    Add,
    /// Detach the container (idempotent).
    Del,
    /// Verify the attachment against `prevResult`.
    Check,
    /// Report supported versions.
    Version,
    /// Report readiness (1.1.0).
    Status,
    /// Free everything not in `cni.dev/valid-attachments` (1.1.0).
    Gc,
}

impl Command {
    fn parse(s: &str) -> Option<Command> {
        Some(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            _ => return None,
        })
    }
}

/// The plugin's environment (`CNI_*` variables), validated for the command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniEnv {
    /// `CNI_COMMAND`.
    pub command: Command,
    /// `CNI_CONTAINERID` (ADD, DEL, CHECK).
    pub container_id: Option<String>,
    /// `CNI_NETNS` (ADD, CHECK; optional for DEL).
    pub netns: Option<PathBuf>,
    /// `CNI_IFNAME` (ADD, DEL, CHECK).
    pub ifname: Option<String>,
    /// `CNI_ARGS`, split into pairs (later duplicates win).
    pub args: BTreeMap<String, String>,
    /// `CNI_PATH` (unused: tartan-cni delegates to no other plugin).
    pub path: Option<String>,
}

impl CniEnv {
    /// Reads and validates the environment through `get` (e.g. `std::env::var`).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<CniEnv, CniError> {
        let nonempty = |k: &str| get(k).filter(|v| !v.is_empty());
        let cmd = nonempty("CNI_COMMAND").ok_or_else(|| CniError::env("CNI_COMMAND is not set"))?;
        let command = Command::parse(&cmd)
            .ok_or_else(|| CniError::env(format!("CNI_COMMAND={cmd:?} is not a CNI command")))?;
        let needs_attachment = matches!(command, Command::Add | Command::Del | Command::Check);
        let needs_netns = matches!(command, Command::Add | Command::Check);
        let container_id = nonempty("CNI_CONTAINERID");
        let ifname = nonempty("CNI_IFNAME");
        let netns = nonempty("CNI_NETNS").map(PathBuf::from);
        if needs_attachment {
            match &container_id {
                None => return Err(CniError::env("CNI_CONTAINERID is not set")),
                Some(id) => validate_container_id(id)?,
            }
            match &ifname {
                None => return Err(CniError::env("CNI_IFNAME is not set")),
                Some(n) => {
                    validate_ifname(n).map_err(|m| CniError::env(format!("CNI_IFNAME: {m}")))?
                }
            }
        }
        if needs_netns && netns.is_none() {
            return Err(CniError::env("CNI_NETNS is not set"));
        }
        if let Some(p) = &netns
            && needs_attachment
            && !p.is_absolute()
        {
            return Err(CniError::env(format!(
                "CNI_NETNS={} is not an absolute path",
                p.display()
            )));
        }
        let args = match get("CNI_ARGS") {
            Some(a) => parse_cni_args(&a)?,
            None => BTreeMap::new(),
        };
        Ok(CniEnv {
            command,
            container_id,
            netns,
            ifname,
            args,
            path: get("CNI_PATH"),
        })
    }

    /// Pod namespace from `K8S_POD_NAMESPACE`, else `default`.
    pub fn pod_namespace(&self) -> String {
        self.args
            .get("K8S_POD_NAMESPACE")
            .filter(|v| !v.is_empty())
            .cloned()
            .unwrap_or_else(|| "default".into())
    }

    /// Pod name from `K8S_POD_NAME`, else the container ID.
    pub fn pod_name(&self) -> String {
        self.args
            .get("K8S_POD_NAME")
            .filter(|v| !v.is_empty())
            .cloned()
            .or_else(|| self.container_id.clone())
            .unwrap_or_default()
    }
}

/// Splits `CNI_ARGS` (`K=V;K2=V2`); a pair without `=` or an empty key is error code 4.
pub fn parse_cni_args(s: &str) -> Result<BTreeMap<String, String>, CniError> {
    let mut out = BTreeMap::new();
    for pair in s.split(';').filter(|p| !p.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(CniError::env(format!(
                "CNI_ARGS: {pair:?} is not KEY=VALUE"
            )));
        };
        if k.is_empty() {
            return Err(CniError::env(format!(
                "CNI_ARGS: {pair:?} has an empty key"
            )));
        }
        if v.len() > 1024 {
            return Err(CniError::env(format!(
                "CNI_ARGS: the value of {k} is too long"
            )));
        }
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

/// A container ID: starts with a letter or digit, then letters, digits, `_`, `.`, `-`
/// (libcni's rule), at most 200 bytes. Anything else is error code 4.
pub fn validate_container_id(id: &str) -> Result<(), CniError> {
    if let Some(why) = name_problem(id, 200) {
        return Err(CniError::env(format!("CNI_CONTAINERID {id:?} {why}")));
    }
    Ok(())
}

/// A network name follows the container ID rule; anything else is error code 7.
pub fn validate_network_name(name: &str) -> Result<(), CniError> {
    if let Some(why) = name_problem(name, 200) {
        return Err(CniError::config(format!("network name {name:?} {why}")));
    }
    Ok(())
}

fn name_problem(s: &str, max: usize) -> Option<&'static str> {
    let mut chars = s.chars();
    match chars.next() {
        None => return Some("is empty"),
        Some(c) if !c.is_ascii_alphanumeric() => {
            return Some("must start with a letter or digit");
        }
        _ => {}
    }
    if s.len() > max {
        return Some("is too long");
    }
    if !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
        return Some("may contain only letters, digits, '_', '.' and '-'");
    }
    None
}

/// Why a string is not a Linux interface name (the caller prefixes the field, e.g.
/// `CNI_IFNAME` or `bridge`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IfnameError {
    /// The name is empty.
    #[error("interface name is empty")]
    Empty,
    /// The name is longer than the kernel's 15 bytes.
    #[error("interface name {0:?} is longer than 15 bytes")]
    TooLong(String),
    /// The name is `.` or `..`.
    #[error("interface name {0:?} is not allowed")]
    Reserved(String),
    /// The name holds '/', ':', whitespace or NUL.
    #[error("interface name {0:?} contains '/', ':', whitespace or NUL")]
    BadCharacter(String),
}

/// A Linux interface name: 1–15 bytes, not `.`/`..`, no `/`, `:`, whitespace or NUL.
pub fn validate_ifname(name: &str) -> Result<(), IfnameError> {
    if name.is_empty() {
        return Err(IfnameError::Empty);
    }
    if name.len() > 15 {
        return Err(IfnameError::TooLong(name.to_string()));
    }
    if name == "." || name == ".." {
        return Err(IfnameError::Reserved(name.to_string()));
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c == '\0')
    {
        return Err(IfnameError::BadCharacter(name.to_string()));
    }
    Ok(())
}

/// One entry of `cni.dev/valid-attachments` (GC).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
pub struct Attachment {
    /// Container ID.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// Interface name.
    pub ifname: String,
}

/// The network config on stdin, with tartan's keys and their defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    /// `cniVersion`.
    pub cni_version: CniVersion,
    /// `name`: the network name (also the IPAM subdirectory).
    pub name: String,
    /// `bridge`: node bridge name.
    pub bridge: String,
    /// `subnetFile`: tartand's subnet.env.
    pub subnet_file: PathBuf,
    /// `dataDir`: IPAM directory root.
    pub data_dir: PathBuf,
    /// `daemonSocket`: tartand's unix socket.
    pub daemon_socket: PathBuf,
    /// `mtu`: overrides subnet.env's MTU.
    pub mtu: Option<u32>,
    /// `hairpinMode`: hairpin on the bridge port (default true).
    pub hairpin_mode: bool,
    /// Labels from `args.cni.labels` and `runtimeConfig.labels` (the latter wins).
    pub labels: BTreeMap<String, String>,
    /// `prevResult`, decoded.
    pub prev_result: Option<CniResult>,
    /// `cni.dev/valid-attachments` (GC).
    pub valid_attachments: Option<Vec<Attachment>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawConf {
    cni_version: Option<String>,
    name: Option<String>,
    bridge: Option<String>,
    subnet_file: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    daemon_socket: Option<PathBuf>,
    mtu: Option<u32>,
    hairpin_mode: Option<bool>,
    args: Option<Value>,
    runtime_config: Option<Value>,
    prev_result: Option<Value>,
    #[serde(rename = "cni.dev/valid-attachments")]
    valid_attachments: Option<Vec<Attachment>>,
}

/// Reads the `cniVersion` of a config without validating the rest (for VERSION and for
/// stamping errors); `None` when stdin is not a JSON object with a string `cniVersion`.
pub fn peek_version(stdin: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(stdin).ok()?;
    v.get("cniVersion")?.as_str().map(str::to_string)
}

impl NetConf {
    /// Decodes and validates the config: not JSON (or not an object) is code 6, an unknown
    /// version code 1, wrong or missing values code 7.
    pub fn parse(stdin: &[u8]) -> Result<NetConf, CniError> {
        let v: Value = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(code::DECODE, "the network config is not valid JSON")
                .details(e.to_string())
        })?;
        if !v.is_object() {
            return Err(CniError::new(
                code::DECODE,
                "the network config is not a JSON object",
            ));
        }
        let raw: RawConf = crate::util::json_decode::from_value(&v)
            .map_err(|e| CniError::config("invalid network config").details(e))?;
        let version = raw
            .cni_version
            .ok_or_else(|| CniError::config("cniVersion is missing"))?;
        let cni_version = CniVersion::parse(&version)?;
        let name = raw
            .name
            .ok_or_else(|| CniError::config("name is missing"))?;
        validate_network_name(&name)?;
        let bridge = raw.bridge.unwrap_or_else(|| DEFAULT_BRIDGE.into());
        validate_ifname(&bridge).map_err(|m| CniError::config(format!("bridge: {m}")))?;
        let abs = |key: &str, p: Option<PathBuf>, default: &str| -> Result<PathBuf, CniError> {
            let p = p.unwrap_or_else(|| PathBuf::from(default));
            if !p.is_absolute() || p.as_os_str().len() > 4000 {
                return Err(CniError::config(format!(
                    "{key} {} must be an absolute path",
                    p.display()
                )));
            }
            Ok(p)
        };
        let subnet_file = abs("subnetFile", raw.subnet_file, DEFAULT_SUBNET_FILE)?;
        let data_dir = abs("dataDir", raw.data_dir, DEFAULT_DATA_DIR)?;
        let daemon_socket = abs("daemonSocket", raw.daemon_socket, DEFAULT_DAEMON_SOCKET)?;
        if let Some(m) = raw.mtu
            && !(68..=65535).contains(&m)
        {
            return Err(CniError::config(format!("mtu {m} is outside 68..65535")));
        }
        let mut labels = BTreeMap::new();
        if let Some(args) = &raw.args
            && let Some(l) = args.get("cni").and_then(|c| c.get("labels"))
        {
            collect_labels(l, "args.cni.labels", &mut labels)?;
        }
        if let Some(rc) = &raw.runtime_config
            && let Some(l) = rc.get("labels")
        {
            collect_labels(l, "runtimeConfig.labels", &mut labels)?;
        }
        let prev_result = match raw.prev_result {
            None | Some(Value::Null) => None,
            Some(p) => Some(CniResult::parse(p)?),
        };
        if let Some(atts) = &raw.valid_attachments
            && atts.len() > 1_000_000
        {
            return Err(CniError::config("too many valid attachments"));
        }
        Ok(NetConf {
            cni_version,
            name,
            bridge,
            subnet_file,
            data_dir,
            daemon_socket,
            mtu: raw.mtu,
            hairpin_mode: raw.hairpin_mode.unwrap_or(true),
            labels,
            prev_result,
            valid_attachments: raw.valid_attachments,
        })
    }
}

/// Labels as the CNI conventions give them (`[{"key": .., "value": ..}]`) or as an object.
fn collect_labels(
    v: &Value,
    what: &str,
    out: &mut BTreeMap<String, String>,
) -> Result<(), CniError> {
    let bad = || {
        CniError::config(format!(
            "{what} must be [{{\"key\":..,\"value\":..}}] or an object of strings"
        ))
    };
    let mut put = |k: &str, val: &str| -> Result<(), CniError> {
        if k.is_empty() || k.len() > 317 || val.len() > 1024 {
            return Err(CniError::config(format!(
                "{what}: label {k:?} is empty or too long"
            )));
        }
        out.insert(k.to_string(), val.to_string());
        Ok(())
    };
    match v {
        Value::Array(items) => {
            for it in items {
                let k = it.get("key").and_then(Value::as_str).ok_or_else(bad)?;
                let val = it.get("value").and_then(Value::as_str).ok_or_else(bad)?;
                put(k, val)?;
            }
        }
        Value::Object(m) => {
            for (k, val) in m {
                put(k, val.as_str().ok_or_else(bad)?)?;
            }
        }
        Value::Null => {}
        _ => return Err(bad()),
    }
    Ok(())
}

/// An interface of a result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Interface {
    /// Interface name.
    pub name: String,
    /// MAC address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// MTU (1.1.0 results only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// The namespace path for interfaces inside the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    /// Fields of other plugins, passed through unchanged.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// An address of a result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IpConfig {
    /// Address with prefix length (`10.244.3.5/24`).
    pub address: IpNetwork,
    /// Gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
    /// Fields of other plugins, passed through unchanged.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A route of a result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Route {
    /// Destination.
    pub dst: IpNetwork,
    /// Next hop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
    /// Other fields (1.1.0 adds mtu, advmss, priority, table, scope).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Route fields that exist only in 1.1.0 results.
const ROUTE_FIELDS_1_1: [&str; 5] = ["mtu", "advmss", "priority", "table", "scope"];
/// Interface fields that exist only in 1.1.0 results.
const INTERFACE_FIELDS_1_1: [&str; 2] = ["socketPath", "pciID"];

/// A result, independent of the spec version it came in or goes out as.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CniResult {
    /// Interfaces.
    pub interfaces: Vec<Interface>,
    /// Addresses.
    pub ips: Vec<IpConfig>,
    /// Routes.
    pub routes: Vec<Route>,
    /// DNS settings (passed through).
    pub dns: Value,
}

#[derive(Deserialize)]
struct RawResult {
    #[serde(rename = "cniVersion")]
    cni_version: Option<String>,
    #[serde(default)]
    interfaces: Vec<Interface>,
    #[serde(default)]
    ips: Vec<IpConfig>,
    #[serde(default)]
    routes: Vec<Route>,
    #[serde(default)]
    dns: Value,
}

impl CniResult {
    /// Decodes a result of any supported version (a `prevResult`).
    pub fn parse(v: Value) -> Result<CniResult, CniError> {
        let raw: RawResult = crate::util::json_decode::from_value(&v)
            .map_err(|e| CniError::config("invalid prevResult").details(e))?;
        if let Some(ver) = &raw.cni_version {
            CniVersion::parse(ver)?;
        }
        let mut r = CniResult {
            interfaces: raw.interfaces,
            ips: raw.ips,
            routes: raw.routes,
            dns: raw.dns,
        };
        for ip in &mut r.ips {
            ip.extra.remove("version");
            if let Some(i) = ip.interface
                && i >= r.interfaces.len()
            {
                return Err(CniError::config(format!(
                    "prevResult: ip {} refers to interface {i}, which does not exist",
                    ip.address
                )));
            }
        }
        Ok(r)
    }

    /// Encodes the result as `version` wants it: pre-1.0 results tag every IP with
    /// `"version"`, pre-1.1 results carry no interface MTU and no 1.1.0 route fields.
    pub fn render(&self, version: CniVersion) -> Value {
        let mut r = self.clone();
        if version < CniVersion::V1_1_0 {
            for i in &mut r.interfaces {
                i.mtu = None;
                for k in INTERFACE_FIELDS_1_1 {
                    i.extra.remove(k);
                }
            }
            for rt in &mut r.routes {
                for k in ROUTE_FIELDS_1_1 {
                    rt.extra.remove(k);
                }
            }
        }
        let ips: Vec<Value> = r
            .ips
            .iter()
            .map(|ip| {
                let mut v = serde_json::to_value(ip).unwrap_or(Value::Null);
                if version.tags_ip_version()
                    && let Value::Object(m) = &mut v
                {
                    let fam = if ip.address.is_ipv4() { "4" } else { "6" };
                    m.insert("version".into(), Value::String(fam.into()));
                }
                v
            })
            .collect();
        let mut out = Map::new();
        out.insert("cniVersion".into(), Value::String(version.as_str().into()));
        if !r.interfaces.is_empty() {
            out.insert(
                "interfaces".into(),
                serde_json::to_value(&r.interfaces).unwrap_or(Value::Null),
            );
        }
        if !ips.is_empty() {
            out.insert("ips".into(), Value::Array(ips));
        }
        if !r.routes.is_empty() {
            out.insert(
                "routes".into(),
                serde_json::to_value(&r.routes).unwrap_or(Value::Null),
            );
        }
        let dns = match r.dns {
            Value::Object(m) => Value::Object(m),
            _ => Value::Object(Map::new()),
        };
        out.insert("dns".into(), dns);
        Value::Object(out)
    }

    /// Appends `other`'s interfaces, IPs and routes, renumbering its interface indexes
    /// (how a plugin adds its work to a `prevResult`).
    pub fn append(&mut self, other: CniResult) {
        let base = self.interfaces.len();
        self.interfaces.extend(other.interfaces);
        self.ips.extend(other.ips.into_iter().map(|mut ip| {
            ip.interface = ip.interface.map(|i| i + base);
            ip
        }));
        self.routes.extend(other.routes);
        if !other.dns.is_null() && other.dns.as_object().is_some_and(|m| !m.is_empty()) {
            self.dns = other.dns;
        }
    }
}

/// The index of the container interface `ifname` (in `netns`, when the result says) in a
/// result's interfaces.
pub fn find_container_interface(r: &CniResult, ifname: &str, netns: &Path) -> Option<usize> {
    r.interfaces.iter().position(|i| {
        i.name == ifname
            && i.sandbox
                .as_deref()
                .is_some_and(|s| Path::new(s) == netns || s.is_empty())
    })
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod proptests;
