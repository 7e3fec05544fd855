//! Keeps the kernel's enrolled set equal to the enrollment rule applied to
//! the pods of this node, from Kubernetes watches.
//!
//! Two reflectors (pods with `spec.nodeName=<node>`, all namespaces) feed
//! one reconcile: on every change, and on a periodic resync for pods whose
//! processes were not up yet, the desired set is computed from the stores
//! and written with one `set_enrolled` (only the difference reaches the
//! kernel). Nothing is written before both initial lists are complete, so a
//! restarting daemon never drops enrollments it inherited from pinned maps.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::PathBuf,
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    runtime::{
        reflector::{self, ObjectRef, Store},
        watcher, WatchStreamExt,
    },
    Api, Client,
};

use super::{locate, policy};

/// Where the computed set goes (the dataplane, or a recorder in tests).
pub trait EnrollSink: Send {
    fn set_enrolled(&mut self, cookies: &BTreeSet<u64>) -> Result<(), String>;
    /// The pods of this node, after each change once the initial list is
    /// complete (for workload identities in telemetry).
    fn set_pods(&mut self, _pods: &[std::sync::Arc<Pod>]) {}
}

/// Finds the netns cookie of a pod by UID.
pub trait NetnsResolver: Send {
    /// `None` while no process of the pod runs yet.
    fn cookie(&mut self, pod_uid: &str) -> Option<u64>;
    /// Forgets pods not in `live` (bounded memory under churn).
    fn retain(&mut self, live: &BTreeSet<String>);
}

/// Resolves from the host's `/proc` (mounted at `host_proc`), caching per
/// pod UID: a pod's network namespace never changes while it lives.
pub struct HostResolver {
    host_proc: PathBuf,
    cache: HashMap<String, u64>,
}

impl HostResolver {
    pub fn new(host_proc: PathBuf) -> Self {
        HostResolver {
            host_proc,
            cache: HashMap::new(),
        }
    }
}

impl NetnsResolver for HostResolver {
    fn cookie(&mut self, uid: &str) -> Option<u64> {
        if let Some(c) = self.cache.get(uid) {
            return Some(*c);
        }
        let path = match locate::pod_netns(&self.host_proc, uid) {
            Ok(Some(p)) => p,
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(host_proc = %self.host_proc.display(), "scanning for pod {uid}: {e}");
                return None;
            }
        };
        match crate::netns::cookie_of(&path) {
            Ok(c) => {
                self.cache.insert(uid.to_string(), c);
                Some(c)
            }
            Err(e) => {
                tracing::warn!(pod_uid = uid, "netns of pod: {e}");
                None
            }
        }
    }

    fn retain(&mut self, live: &BTreeSet<String>) {
        self.cache.retain(|uid, _| live.contains(uid));
    }
}

/// The enrolled set the rule asks for, given the stores' contents.
pub fn desired<R: NetnsResolver>(
    pods: &[std::sync::Arc<Pod>],
    namespaces: &Store<Namespace>,
    resolver: &mut R,
    always: &BTreeSet<u64>,
) -> BTreeSet<u64> {
    let mut out = always.clone();
    let mut live = BTreeSet::new();
    for pod in pods {
        let Some(uid) = pod.metadata.uid.as_deref() else {
            continue;
        };
        live.insert(uid.to_string());
        let ns_name = pod.metadata.namespace.as_deref().unwrap_or("default");
        let ns = namespaces.get(&ObjectRef::new(ns_name));
        let ns_labels: Option<&BTreeMap<String, String>> =
            ns.as_ref().and_then(|n| n.metadata.labels.as_ref());
        if policy::wants_kmesh(ns_labels, pod) {
            match resolver.cookie(uid) {
                Some(c) => {
                    out.insert(c);
                }
                None => {
                    tracing::debug!(pod = ?pod.metadata.name, "enrolled pod has no running process yet")
                }
            }
        }
    }
    resolver.retain(&live);
    out
}

enum Tick {
    Pods(bool),
    Namespaces(bool),
    Resync,
}

/// Runs until the watches end (never, in practice: they back off and retry).
/// `always` are namespaces enrolled regardless (from `--enroll-netns`).
pub async fn run<S: EnrollSink, R: NetnsResolver>(
    client: Client,
    node: &str,
    mut sink: S,
    mut resolver: R,
    always: BTreeSet<u64>,
    resync: Duration,
) {
    let (pods, pod_writer) = reflector::store::<Pod>();
    let (namespaces, ns_writer) = reflector::store::<Namespace>();
    let pod_cfg = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let pod_events = reflector::reflector(
        pod_writer,
        watcher::watcher(Api::<Pod>::all(client.clone()), pod_cfg),
    )
    .default_backoff()
    .map(|e| Tick::Pods(log_event("pods", e)));
    let ns_events = reflector::reflector(
        ns_writer,
        watcher::watcher(Api::<Namespace>::all(client), watcher::Config::default()),
    )
    .default_backoff()
    .map(|e| Tick::Namespaces(log_event("namespaces", e)));
    let ticks = futures::stream::unfold(tokio::time::interval(resync), |mut i| async move {
        i.tick().await;
        Some((Tick::Resync, i))
    });
    let mut events = std::pin::pin!(futures::stream::select(
        futures::stream::select(pod_events, ns_events),
        ticks
    ));
    let (mut pods_ready, mut ns_ready) = (false, false);
    let mut last: Option<BTreeSet<u64>> = None;
    while let Some(tick) = events.next().await {
        let pods_changed = matches!(tick, Tick::Pods(_));
        match tick {
            Tick::Pods(init_done) => pods_ready |= init_done,
            Tick::Namespaces(init_done) => ns_ready |= init_done,
            Tick::Resync => {}
        }
        if pods_ready && (pods_changed || last.is_none()) {
            sink.set_pods(&pods.state());
        }
        if !(pods_ready && ns_ready) {
            continue;
        }
        let want = desired(&pods.state(), &namespaces, &mut resolver, &always);
        if last.as_ref() == Some(&want) {
            continue;
        }
        match sink.set_enrolled(&want) {
            Ok(()) => {
                tracing::info!(
                    enrolled = want.len(),
                    "enrollment reconciled with Kubernetes"
                );
                last = Some(want);
            }
            Err(e) => tracing::warn!("writing enrollment: {e}; retrying on the next change"),
        }
    }
}

/// Logs watch errors; true when the event completes an initial list.
fn log_event<K>(what: &str, e: Result<watcher::Event<K>, watcher::Error>) -> bool {
    match e {
        Ok(watcher::Event::InitDone) => true,
        Ok(_) => false,
        Err(err) => {
            tracing::warn!(
                "watching {what}: {err} (hint: check the kmesh ClusterRole and the API server)"
            );
            false
        }
    }
}
