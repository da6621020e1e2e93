//! Ingress routes (`/tartan/ingress/routes/<name>`) and TLS certificates
//! (`/tartan/ingress/certs/<name>`) in etcd: create (a route only if its name is free, in one
//! transaction), put (a certificate, replacing one of the same name), get, list, delete.

use anyhow::{Result, bail};
use etcd_client::{Compare, CompareOp, Txn, TxnOp};

use crate::model::DecodeError;
use crate::model::ingress::{IngressCert, IngressRoute};
use crate::model::service::valid_name;
use crate::store::etcd::{EtcdArgs, Store};
use crate::store::keys::{
    ingress_cert_key, ingress_certs_prefix, ingress_route_key, ingress_routes_prefix,
};

/// What the store does the same way for routes and certificates.
trait Record: Sized {
    /// How messages name the kind (`ingress route`).
    const WHAT: &'static str;
    fn name(&self) -> &str;
    fn decode(bytes: &[u8]) -> Result<Self, DecodeError>;
    fn check(&self) -> Result<(), DecodeError>;
    fn key(keys: &EtcdArgs, name: &str) -> String;
    fn prefix(keys: &EtcdArgs) -> String;
}

impl Record for IngressRoute {
    const WHAT: &'static str = "ingress route";
    fn name(&self) -> &str {
        &self.name
    }
    fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        IngressRoute::parse(bytes)
    }
    fn check(&self) -> Result<(), DecodeError> {
        self.validate()
    }
    fn key(keys: &EtcdArgs, name: &str) -> String {
        ingress_route_key(keys, name)
    }
    fn prefix(keys: &EtcdArgs) -> String {
        ingress_routes_prefix(keys)
    }
}

impl Record for IngressCert {
    const WHAT: &'static str = "ingress certificate";
    fn name(&self) -> &str {
        &self.name
    }
    fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        IngressCert::parse(bytes)
    }
    fn check(&self) -> Result<(), DecodeError> {
        self.validate()
    }
    fn key(keys: &EtcdArgs, name: &str) -> String {
        ingress_cert_key(keys, name)
    }
    fn prefix(keys: &EtcdArgs) -> String {
        ingress_certs_prefix(keys)
    }
}

/// Refuses a name that is not a DNS label (it would make a key outside the prefix's level).
fn check_name<R: Record>(name: &str) -> Result<()> {
    if !valid_name(name) {
        bail!(
            "{} name {name:?}: use lowercase letters, digits and '-' (at most 63)",
            R::WHAT
        );
    }
    Ok(())
}

/// Access to ingress routes and certificates in etcd.
pub struct IngressStore<'a> {
    store: &'a Store,
    keys: &'a EtcdArgs,
}

impl<'a> IngressStore<'a> {
    /// Routes and certificates under `keys`.
    pub fn new(store: &'a Store, keys: &'a EtcdArgs) -> Self {
        IngressStore { store, keys }
    }

    /// Creates `route`; an error if it does not validate or a route of its name exists. The
    /// transaction is sent again when a leader dies without answering; finding its own
    /// earlier write then counts as success.
    pub async fn create_route(&self, route: &IngressRoute) -> Result<()> {
        route
            .check()
            .map_err(|e| anyhow::anyhow!("invalid {}: {e}", IngressRoute::WHAT))?;
        let key = ingress_route_key(self.keys, &route.name);
        let bytes = route.to_bytes();
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), bytes.clone(), None)]);
        if self.store.txn_resendable(txn).await? {
            return Ok(());
        }
        match self.store.get(&key).await? {
            Some(kv) if kv.value == bytes => Ok(()),
            Some(_) => bail!("ingress route {} already exists", route.name),
            None => bail!(
                "ingress route {} was created and deleted meanwhile; try again",
                route.name
            ),
        }
    }

    /// Reads one route.
    pub async fn get_route(&self, name: &str) -> Result<Option<IngressRoute>> {
        self.get(name).await
    }

    /// Lists routes by name; malformed records are returned as messages next to the good
    /// ones.
    pub async fn list_routes(&self) -> Result<(Vec<IngressRoute>, Vec<String>)> {
        self.list().await
    }

    /// Deletes a route; an error if there is none of that name.
    pub async fn delete_route(&self, name: &str) -> Result<()> {
        self.delete::<IngressRoute>(name).await
    }

    /// Writes `cert`, replacing a certificate of the same name; an error if it does not
    /// validate.
    pub async fn put_cert(&self, cert: &IngressCert) -> Result<()> {
        cert.check()
            .map_err(|e| anyhow::anyhow!("invalid {}: {e}", IngressCert::WHAT))?;
        self.store
            .put(&ingress_cert_key(self.keys, &cert.name), cert.to_bytes(), 0)
            .await
    }

    /// Reads one certificate.
    pub async fn get_cert(&self, name: &str) -> Result<Option<IngressCert>> {
        self.get(name).await
    }

    /// Lists certificates by name; malformed records are returned as messages next to the
    /// good ones.
    pub async fn list_certs(&self) -> Result<(Vec<IngressCert>, Vec<String>)> {
        self.list().await
    }

    /// Deletes a certificate; an error if there is none of that name.
    pub async fn delete_cert(&self, name: &str) -> Result<()> {
        self.delete::<IngressCert>(name).await
    }

    async fn get<R: Record>(&self, name: &str) -> Result<Option<R>> {
        check_name::<R>(name)?;
        let Some(kv) = self.store.get(&R::key(self.keys, name)).await? else {
            return Ok(None);
        };
        R::decode(&kv.value)
            .map(Some)
            .map_err(|e| anyhow::anyhow!("stored {} {name} is invalid: {e}", R::WHAT))
    }

    async fn list<R: Record>(&self) -> Result<(Vec<R>, Vec<String>)> {
        let (_, items) = self.store.list(&R::prefix(self.keys)).await?;
        let mut good = Vec::new();
        let mut bad = Vec::new();
        for it in items {
            match R::decode(&it.value) {
                Ok(r) => good.push(r),
                Err(e) => bad.push(format!("{}: {e}", it.key)),
            }
        }
        good.sort_by(|a, b| a.name().cmp(b.name()));
        Ok((good, bad))
    }

    async fn delete<R: Record>(&self, name: &str) -> Result<()> {
        check_name::<R>(name)?;
        if !self.store.delete(&R::key(self.keys, name)).await? {
            bail!("{} {name} does not exist", R::WHAT);
        }
        Ok(())
    }
}
