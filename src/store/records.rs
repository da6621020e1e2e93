//! The service, pod and endpoints prefixes decoded into [`ModelChange`]s: one decoding for
//! every consumer of these records (the service proxy and the cluster DNS read the same
//! watches through [`tee`]).

use std::time::Instant;

use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use crate::model::DecodeError;
use crate::model::pod::PodRecord;
use crate::model::service::{ExplicitEndpoints, Service};
use crate::store::etcd::{Change, EtcdArgs, KvItem, ReflectorEvent, Store};
use crate::store::keys::{endpoints_prefix, pods_prefix, service_key, services_prefix};

/// A change seen in etcd, already decoded.
#[derive(Debug, Clone)]
pub enum ModelChange {
    /// A service was created or updated (`key` is its etcd key).
    PutService(String, Service),
    /// A service was deleted.
    DeleteService(String),
    /// A pod record was created or updated.
    PutPod(String, PodRecord),
    /// A pod record was deleted.
    DeletePod(String),
    /// Explicit endpoints of `namespace/name` were set.
    PutEndpoints(String, ExplicitEndpoints),
    /// Explicit endpoints of `namespace/name` were removed.
    DeleteEndpoints(String),
}

/// Which of the three record prefixes a key belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// `/tartan/services/`.
    Services,
    /// `/tartan/pods/`.
    Pods,
    /// `/tartan/endpoints/`.
    Endpoints,
}

impl RecordKind {
    /// The etcd prefix of this kind.
    pub fn prefix(self, keys: &EtcdArgs) -> String {
        match self {
            RecordKind::Services => services_prefix(keys),
            RecordKind::Pods => pods_prefix(keys),
            RecordKind::Endpoints => endpoints_prefix(keys),
        }
    }
}

/// Decodes one put under the prefix of `kind`.
pub fn decode(
    kind: RecordKind,
    item: &KvItem,
    keys: &EtcdArgs,
) -> Result<ModelChange, DecodeError> {
    match kind {
        RecordKind::Services => {
            let s = Service::parse(&item.value)?;
            let want = service_key(keys, &s.namespace, &s.name);
            if want != item.key {
                return Err(DecodeError::value(
                    "service",
                    s.id(),
                    "is stored under the wrong key",
                ));
            }
            Ok(ModelChange::PutService(item.key.clone(), s))
        }
        RecordKind::Pods => Ok(ModelChange::PutPod(
            item.key.clone(),
            PodRecord::parse(&item.value)?,
        )),
        RecordKind::Endpoints => {
            let id = item
                .key
                .strip_prefix(&endpoints_prefix(keys))
                .filter(|r| r.split('/').count() == 2)
                .ok_or_else(|| {
                    DecodeError::value(
                        "endpoints key",
                        format!("{:?}", item.key),
                        "is not <namespace>/<name>",
                    )
                })?
                .to_string();
            Ok(ModelChange::PutEndpoints(
                id,
                ExplicitEndpoints::parse(&item.value)?,
            ))
        }
    }
}

/// The change a deleted key of `kind` means.
pub fn deletion(kind: RecordKind, key: &str, keys: &EtcdArgs) -> Option<ModelChange> {
    match kind {
        RecordKind::Services => Some(ModelChange::DeleteService(key.to_string())),
        RecordKind::Pods => Some(ModelChange::DeletePod(key.to_string())),
        RecordKind::Endpoints => key
            .strip_prefix(&endpoints_prefix(keys))
            .map(|id| ModelChange::DeleteEndpoints(id.to_string())),
    }
}

/// What a (re)listing of `kind` means for a consumer holding `held` (the service keys, pod
/// keys and endpoint ids it knows): deletions of everything the listing lacks.
pub fn gone_after_listing(
    kind: RecordKind,
    items: &[KvItem],
    held: (Vec<String>, Vec<String>, Vec<String>),
    keys: &EtcdArgs,
) -> Vec<ModelChange> {
    let fresh: std::collections::HashSet<&str> = items.iter().map(|i| i.key.as_str()).collect();
    let (services, pods, endpoints) = held;
    match kind {
        RecordKind::Services => services
            .into_iter()
            .filter(|k| !fresh.contains(k.as_str()))
            .map(ModelChange::DeleteService)
            .collect(),
        RecordKind::Pods => pods
            .into_iter()
            .filter(|k| !fresh.contains(k.as_str()))
            .map(ModelChange::DeletePod)
            .collect(),
        RecordKind::Endpoints => {
            let prefix = endpoints_prefix(keys);
            endpoints
                .into_iter()
                .filter(|id| !fresh.contains(format!("{prefix}{id}").as_str()))
                .map(ModelChange::DeleteEndpoints)
                .collect()
        }
    }
}

/// The three record streams (reflectors of their etcd prefixes).
pub struct Feeds {
    /// `/tartan/services/`.
    pub services: UnboundedReceiver<ReflectorEvent>,
    /// `/tartan/pods/`.
    pub pods: UnboundedReceiver<ReflectorEvent>,
    /// `/tartan/endpoints/`.
    pub endpoints: UnboundedReceiver<ReflectorEvent>,
}

impl Feeds {
    /// One watch per prefix.
    pub fn watch(store: &Store, keys: &EtcdArgs) -> Feeds {
        Feeds {
            services: store.reflect(&services_prefix(keys)),
            pods: store.reflect(&pods_prefix(keys)),
            endpoints: store.reflect(&endpoints_prefix(keys)),
        }
    }

    /// Splits every stream in two (both see every event, in order), so two consumers share
    /// one watch per prefix.
    pub fn tee(self) -> (Feeds, Feeds) {
        let (s1, s2) = tee(self.services);
        let (p1, p2) = tee(self.pods);
        let (e1, e2) = tee(self.endpoints);
        (
            Feeds {
                services: s1,
                pods: p1,
                endpoints: e1,
            },
            Feeds {
                services: s2,
                pods: p2,
                endpoints: e2,
            },
        )
    }
}

/// Copies every event of `rx` to two receivers; ends when the source ends or both are gone.
pub fn tee(
    mut rx: UnboundedReceiver<ReflectorEvent>,
) -> (
    UnboundedReceiver<ReflectorEvent>,
    UnboundedReceiver<ReflectorEvent>,
) {
    let (a_tx, a_rx) = unbounded_channel();
    let (b_tx, b_rx) = unbounded_channel();
    tokio::spawn(async move {
        while let Some(ev) = rx.recv().await {
            let a = a_tx.send(ev.clone()).is_ok();
            let b = b_tx.send(ev).is_ok();
            if !a && !b {
                return;
            }
        }
    });
    (a_rx, b_rx)
}

/// A consumer of the decoded record streams (the cluster DNS catalog, the ingress's
/// backends): what [`apply_feeds`] feeds.
pub trait RecordSink {
    /// Applies one change.
    fn change(&mut self, c: ModelChange);
    /// The service keys, pod keys and endpoint ids held (what a relisting may delete).
    fn held(&self) -> (Vec<String>, Vec<String>, Vec<String>);
    /// A record that does not decode (the proxy counts and reports those; other readers
    /// only skip them).
    fn skipped(&mut self, key: &str, e: &DecodeError) {
        tracing::debug!(%key, "record skipped: {e}");
    }
    /// After each batch of events: `listed` once every prefix was listed at least once;
    /// `started` is when the batch's first event arrived.
    fn settled(&mut self, listed: bool, started: Instant);
}

/// Applies every event of `feeds` to `sink` until the feeds close: a (re)listing replaces
/// what the sink holds of that kind, changes apply one by one, and whatever else is already
/// queued is taken in the same batch.
pub async fn apply_feeds(feeds: Feeds, keys: &EtcdArgs, sink: &mut impl RecordSink) {
    let mut sources = [
        (RecordKind::Services, feeds.services, false),
        (RecordKind::Pods, feeds.pods, false),
        (RecordKind::Endpoints, feeds.endpoints, false),
    ];
    loop {
        let got = {
            let futs = sources
                .iter_mut()
                .enumerate()
                .map(|(i, s)| Box::pin(async move { s.1.recv().await.map(|e| (i, e)) }));
            futures::future::select_all(futs).await.0
        };
        let Some((i, ev)) = got else { return };
        let t0 = Instant::now();
        absorb(sources[i].0, ev, sink, keys);
        sources[i].2 = true;
        for s in sources.iter_mut() {
            while let Ok(ev) = s.1.try_recv() {
                absorb(s.0, ev, sink, keys);
                s.2 = true;
            }
        }
        sink.settled(sources.iter().all(|s| s.2), t0);
    }
}

fn absorb(kind: RecordKind, ev: ReflectorEvent, sink: &mut impl RecordSink, keys: &EtcdArgs) {
    let put = |sink: &mut _, it: &KvItem| match decode(kind, it, keys) {
        Ok(c) => RecordSink::change(sink, c),
        Err(e) => RecordSink::skipped(sink, &it.key, &e),
    };
    match ev {
        ReflectorEvent::Reset { items, .. } => {
            for c in gone_after_listing(kind, &items, sink.held(), keys) {
                sink.change(c);
            }
            for it in &items {
                put(&mut *sink, it);
            }
        }
        ReflectorEvent::Changes { changes, .. } => {
            for c in changes {
                match c {
                    Change::Put(it) => put(&mut *sink, &it),
                    Change::Delete(k) => {
                        if let Some(c) = deletion(kind, &k, keys) {
                            sink.change(c);
                        }
                    }
                }
            }
        }
    }
}
