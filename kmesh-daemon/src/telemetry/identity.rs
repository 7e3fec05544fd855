//! Who is at each end of a connection, as far as this daemon knows.
//!
//! In kernel-native mode with a static config the daemon knows services,
//! not workloads: a service VIP → its listener, and an endpoint address →
//! the cluster it belongs to. When a cluster is named the way Istio names
//! outbound clusters (`outbound|<port>|<subset>|<fqdn>`), the service FQDN,
//! short name and namespace are taken from it, as Istio's own telemetry
//! does. Workload names, namespaces of pods and principals need the
//! Kubernetes/Istio workload model (not in this mode): they are "unknown",
//! the value Istio itself reports when it does not know.

use std::{collections::HashMap, net::SocketAddr};

use xds_adapter::FlatConfig;

pub const UNKNOWN: &str = "unknown";

/// What is known about a destination service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceIdentity {
    /// The listener capturing the VIP.
    pub listener: String,
    /// The cluster the chosen endpoint belongs to.
    pub cluster: String,
    /// Istio's `destination_service`: the FQDN, or the cluster name.
    pub service: String,
    /// Istio's `destination_service_name`.
    pub service_name: String,
    /// Istio's `destination_service_namespace`.
    pub service_namespace: String,
}

/// Lookup tables rebuilt on every config apply (O(endpoints)).
#[derive(Debug, Default)]
pub struct Identity {
    /// VIP → (listener, endpoint address → cluster).
    by_vip: HashMap<SocketAddr, (String, HashMap<SocketAddr, String>)>,
    /// Endpoint address → (listener, cluster), for inbound connections.
    /// An endpoint behind several services maps to the first by VIP order.
    by_endpoint: HashMap<SocketAddr, (String, String)>,
}

impl Identity {
    pub fn from_config(cfg: &FlatConfig) -> Self {
        let mut id = Identity::default();
        for s in cfg.services.values() {
            let eps: HashMap<SocketAddr, String> = s
                .endpoints
                .iter()
                .map(|e| (e.addr, e.cluster.clone()))
                .collect();
            for e in &s.endpoints {
                id.by_endpoint
                    .entry(e.addr)
                    .or_insert_with(|| (s.listener.clone(), e.cluster.clone()));
            }
            id.by_vip.insert(s.vip, (s.listener.clone(), eps));
        }
        id
    }

    /// The service of an outbound connection: dialled `vip`, landed on `backend`.
    pub fn outbound(&self, vip: SocketAddr, backend: SocketAddr) -> Option<ServiceIdentity> {
        let (listener, eps) = self.by_vip.get(&vip)?;
        // The backend may have left the config since the connect: then the
        // cluster is known only if the service has exactly one.
        let cluster = eps.get(&backend).cloned().unwrap_or_else(|| {
            let clusters: std::collections::BTreeSet<&String> = eps.values().collect();
            match clusters.into_iter().collect::<Vec<_>>().as_slice() {
                [only] => (*only).clone(),
                _ => UNKNOWN.into(),
            }
        });
        Some(service_identity(listener, &cluster))
    }

    /// The service an inbound connection reached, by the local address.
    pub fn inbound(&self, local: SocketAddr) -> Option<ServiceIdentity> {
        let (listener, cluster) = self.by_endpoint.get(&local)?;
        Some(service_identity(listener, cluster))
    }
}

fn service_identity(listener: &str, cluster: &str) -> ServiceIdentity {
    let (service, service_name, service_namespace) = match istio_cluster_host(cluster) {
        Some(host) => {
            let mut labels = host.split('.');
            let name = labels.next().unwrap_or(host).to_string();
            let ns = labels.next().unwrap_or(UNKNOWN).to_string();
            (host.to_string(), name, ns)
        }
        None => (
            cluster.to_string(),
            cluster.to_string(),
            UNKNOWN.to_string(),
        ),
    };
    ServiceIdentity {
        listener: listener.to_string(),
        cluster: cluster.to_string(),
        service,
        service_name,
        service_namespace,
    }
}

/// The host of an Istio cluster name `outbound|9080|v1|reviews.default.svc.cluster.local`.
fn istio_cluster_host(cluster: &str) -> Option<&str> {
    let mut parts = cluster.split('|');
    let dir = parts.next()?;
    let _port = parts.next()?.parse::<u16>().ok()?;
    let _subset = parts.next()?;
    let host = parts.next()?;
    (matches!(dir, "outbound" | "inbound") && parts.next().is_none() && !host.is_empty())
        .then_some(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_cluster_names_give_service_name_and_namespace() {
        let s = service_identity("l", "outbound|9080|v1|reviews.bookinfo.svc.cluster.local");
        assert_eq!(s.service, "reviews.bookinfo.svc.cluster.local");
        assert_eq!(s.service_name, "reviews");
        assert_eq!(s.service_namespace, "bookinfo");
        let plain = service_identity("l", "web");
        assert_eq!(
            (
                plain.service.as_str(),
                plain.service_name.as_str(),
                plain.service_namespace.as_str()
            ),
            ("web", "web", UNKNOWN)
        );
        assert_eq!(istio_cluster_host("outbound|x||h"), None);
        assert_eq!(istio_cluster_host("a|1||h|extra"), None);
    }
}
