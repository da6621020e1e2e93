//! TLS termination: certificates by SNI name (exact host, then a wildcard one label up,
//! then the default certificate from files), swapped live as etcd changes; rustls with the
//! ring provider, TLS 1.2 and 1.3 only, ALPN `h2` and `http/1.1`.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use anyhow::{Context, Result, bail};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::model::ingress::{HostKind, IngressCert, MAX_HOST_LEN, normalize_request_host};

/// Parses a PEM chain and key into a key rustls can serve (errors say which part failed).
pub fn certified_key(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<CertifiedKey>> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("certificate PEM: {e}"))?;
    if chain.is_empty() {
        bail!("certificate PEM: no CERTIFICATE block");
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| anyhow::anyhow!("private key PEM: {e}"))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| anyhow::anyhow!("private key: {e}"))?;
    let ck = CertifiedKey::new(chain, signer);
    ck.keys_match()
        .map_err(|e| anyhow::anyhow!("the key does not belong to the certificate: {e}"))?;
    Ok(Arc::new(ck))
}

#[derive(Debug, Default)]
struct Index {
    /// Certificate name → its hosts and key.
    by_name: HashMap<String, (Vec<String>, Arc<CertifiedKey>)>,
    /// Exact host → certificate name.
    exact: HashMap<String, String>,
    /// Wildcard suffix (without `*.`) → certificate name.
    wildcard: HashMap<String, String>,
}

/// The certificates the ingress serves, picked per SNI name.
#[derive(Debug, Default)]
pub struct CertStore {
    index: RwLock<Index>,
    default: RwLock<Option<Arc<CertifiedKey>>>,
}

impl CertStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// The certificate served when no SNI name matches (from `--tls-cert`/`--tls-key`).
    pub fn set_default(&self, key: Arc<CertifiedKey>) {
        *self.default.write().unwrap_or_else(|e| e.into_inner()) = Some(key);
    }

    /// Adds or replaces the certificate `c` (parsed first: a bad one changes nothing).
    pub fn put(&self, c: &IngressCert) -> Result<()> {
        let key = certified_key(c.cert_pem.as_bytes(), c.key_pem.as_bytes())
            .with_context(|| format!("certificate {}", c.name))?;
        let hosts: Vec<String> = c.hosts.iter().map(|h| h.as_str().to_string()).collect();
        let mut ix = self.index.write().unwrap_or_else(|e| e.into_inner());
        remove_locked(&mut ix, &c.name);
        for h in &c.hosts {
            match h.kind() {
                HostKind::Exact(e) => {
                    ix.exact.insert(e.to_string(), c.name.clone());
                }
                HostKind::Wildcard(s) => {
                    ix.wildcard.insert(s.to_string(), c.name.clone());
                }
                HostKind::Any => {}
            }
        }
        ix.by_name.insert(c.name.clone(), (hosts, key));
        Ok(())
    }

    /// Removes the certificate named `name`.
    pub fn remove(&self, name: &str) {
        let mut ix = self.index.write().unwrap_or_else(|e| e.into_inner());
        remove_locked(&mut ix, name);
    }

    /// Names of the certificates held.
    pub fn names(&self) -> Vec<String> {
        let ix = self.index.read().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<String> = ix.by_name.keys().cloned().collect();
        v.sort();
        v
    }

    /// The key for SNI name `sni` (None: no SNI or no match, and no default).
    pub fn lookup(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let mut buf = [0u8; MAX_HOST_LEN];
        if let Some(host) = sni.and_then(|s| normalize_request_host(s, &mut buf)) {
            let ix = self.index.read().unwrap_or_else(|e| e.into_inner());
            let name = ix.exact.get(host).or_else(|| {
                let (_, suffix) = host.split_once('.')?;
                ix.wildcard.get(suffix)
            });
            if let Some((_, k)) = name.and_then(|n| ix.by_name.get(n)) {
                return Some(k.clone());
            }
        }
        self.default
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

fn remove_locked(ix: &mut Index, name: &str) {
    if ix.by_name.remove(name).is_some() {
        ix.exact.retain(|_, n| n != name);
        ix.wildcard.retain(|_, n| n != name);
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.lookup(hello.server_name())
    }
}

/// The rustls server configuration over `store`.
pub fn server_config(store: Arc<CertStore>) -> Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("TLS versions")?
        .with_no_client_auth()
        .with_cert_resolver(store);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_pem_is_refused_with_the_part_named() {
        let e = certified_key(b"nothing", b"nothing").unwrap_err();
        assert!(format!("{e:#}").contains("certificate PEM"), "{e:#}");
        let c = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let e = certified_key(
            c.as_bytes(),
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("key"), "{e:#}");
    }

    #[test]
    fn no_certificate_and_no_default_resolves_to_nothing() {
        let s = CertStore::new();
        assert!(s.lookup(Some("shop.example.com")).is_none());
        assert!(s.lookup(None).is_none());
        s.remove("absent");
        assert!(s.names().is_empty());
    }
}
