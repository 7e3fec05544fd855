//! Resources → validated [`MeshConfig`] (all resources, cross-checked).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use crate::error::{ConfigErrors, Diag};
use crate::model::{
    self, cla_label, cluster_label, convert_cluster, convert_listener, listener_label,
};
use crate::Resources;

/// The validated configuration: listeners with their routes, and the
/// clusters they use.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MeshConfig {
    /// In configuration order.
    pub listeners: Vec<model::Listener>,
    /// By cluster name.
    pub clusters: BTreeMap<String, model::Cluster>,
    /// Things that are accepted but not (fully) honoured, e.g. fields the
    /// kernel ignores. One line each, formatted like errors.
    pub warnings: Vec<String>,
}

impl MeshConfig {
    /// Converts and cross-checks all resources. Collects every problem
    /// rather than stopping at the first.
    pub fn from_resources(r: &Resources) -> Result<MeshConfig, ConfigErrors> {
        let mut d = Diag::default();

        // ClusterLoadAssignments (for EDS clusters), by cluster name.
        let mut clas = BTreeMap::new();
        for cla in &r.load_assignments {
            let res = cla_label(&cla.cluster_name);
            if cla.cluster_name.is_empty() {
                d.error(
                    &res,
                    "cluster_name",
                    "ClusterLoadAssignment has no cluster_name",
                );
            } else if clas.insert(cla.cluster_name.as_str(), cla).is_some() {
                d.error(&res, "cluster_name", "duplicate ClusterLoadAssignment");
            }
        }

        let mut clusters = BTreeMap::new();
        let mut failed = BTreeSet::new();
        let mut seen = BTreeSet::new();
        for c in &r.clusters {
            if !c.name.is_empty() && !seen.insert(c.name.as_str()) {
                d.error(&cluster_label(&c.name), "name", "duplicate cluster name");
                continue;
            }
            match convert_cluster(c, &clas, &mut d) {
                Some(m) => {
                    clusters.insert(m.name.clone(), m);
                }
                None => {
                    failed.insert(c.name.as_str());
                }
            }
        }
        let eds_services: BTreeSet<&str> = r
            .clusters
            .iter()
            .filter(|c| is_eds(c))
            .map(|c| {
                c.eds_cluster_config
                    .as_ref()
                    .map(|e| e.service_name.as_str())
                    .filter(|s| !s.is_empty())
                    .unwrap_or(c.name.as_str())
            })
            .collect();
        for name in clas.keys() {
            // A config_dump also lists the assignments of STATIC clusters.
            if !eds_services.contains(name) && !seen.contains(name) {
                d.warn(
                    &cla_label(name),
                    "",
                    "no EDS cluster uses this ClusterLoadAssignment; ignored",
                );
            }
        }

        let mut listeners = Vec::new();
        let mut names = BTreeSet::new();
        let mut addrs: BTreeMap<SocketAddr, &str> = BTreeMap::new();
        let mut used = BTreeSet::new();
        for l in &r.listeners {
            let res = listener_label(&l.name);
            if !l.name.is_empty() && !names.insert(l.name.as_str()) {
                d.error(&res, "name", "duplicate listener name");
                continue;
            }
            let Some(conv) = convert_listener(l, &mut d) else {
                continue;
            };
            if let Some(other) = addrs.get(&conv.listener.address) {
                d.error(
                    &res,
                    "address",
                    format!(
                        "{} is already captured by listener {other:?}",
                        conv.listener.address
                    ),
                );
                continue;
            }
            addrs.insert(conv.listener.address, l.name.as_str());
            let mut ok = true;
            for (cluster, path) in &conv.refs {
                used.insert(cluster.clone());
                if clusters.contains_key(cluster) {
                    continue;
                }
                ok = false;
                if failed.contains(cluster.as_str()) {
                    // Already reported where the cluster is defined.
                    continue;
                }
                let known: Vec<&str> = clusters.keys().map(String::as_str).take(10).collect();
                let hint = if known.is_empty() {
                    "no cluster is defined".to_string()
                } else {
                    format!("defined clusters: {}", known.join(", "))
                };
                d.error_hint(
                    &res,
                    path,
                    format!("cluster {cluster:?} is not defined"),
                    hint,
                );
            }
            if ok {
                listeners.push(conv.listener);
            }
        }
        for name in clusters.keys() {
            if !used.contains(name) {
                d.warn(&cluster_label(name), "", "not used by any listener");
            }
        }

        if !d.errors.is_empty() {
            return Err(ConfigErrors(d.errors));
        }
        Ok(MeshConfig {
            listeners,
            clusters,
            warnings: d.warnings,
        })
    }
}

fn is_eds(c: &envoy_types::pb::envoy::config::cluster::v3::Cluster) -> bool {
    use envoy_types::pb::envoy::config::cluster::v3::cluster::{
        ClusterDiscoveryType, DiscoveryType,
    };
    matches!(c.cluster_discovery_type, Some(ClusterDiscoveryType::Type(t)) if t == DiscoveryType::Eds as i32)
}
