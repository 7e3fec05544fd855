//! What an xDS client needs on top of the static path: each resource
//! checked on its own as it arrives (so one bad resource is NACKed while the
//! others apply), and a lenient compile of whatever set of resources is held
//! (resources that cannot be installed yet, such as a cluster still waiting
//! for its endpoints, are left out and listed rather than failing the set).

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;

use crate::error::{ConfigError, ConfigErrors, Diag};
use crate::http::{decide_route_config, route_config_label};
use crate::model::{
    cla_label, convert_cluster, convert_listener, endpoints_of, HttpRoutes, ListenerKind,
};
use crate::{flatten_lenient, FlatConfig, MeshConfig, ResourceRefs};

fn finish(d: Diag) -> Result<Vec<String>, ConfigErrors> {
    if d.errors.is_empty() {
        Ok(d.warnings)
    } else {
        Err(ConfigErrors(d.errors))
    }
}

/// Checks one listener on its own (including an inline route
/// configuration). Ok carries the warnings.
pub fn check_listener(l: &Listener) -> Result<Vec<String>, ConfigErrors> {
    let mut d = Diag::default();
    if let Some(conv) = convert_listener(l, &mut d) {
        if let ListenerKind::Http(HttpRoutes::Inline(rc, path)) = &conv.kind {
            let res = crate::model::listener_label(&l.name);
            decide_route_config(rc, &mut d, &res, path);
        }
    }
    finish(d)
}

/// Checks one cluster on its own (an EDS cluster's endpoints come later, in
/// its ClusterLoadAssignment).
pub fn check_cluster(c: &Cluster) -> Result<Vec<String>, ConfigErrors> {
    let mut d = Diag::default();
    convert_cluster(c, &BTreeMap::new(), true, &mut d);
    finish(d)
}

/// Checks one ClusterLoadAssignment on its own. An assignment without
/// usable endpoints is valid (a service with no ready pods): its cluster is
/// then not installed.
pub fn check_load_assignment(cla: &ClusterLoadAssignment) -> Result<Vec<String>, ConfigErrors> {
    let mut d = Diag::default();
    let res = cla_label(&cla.cluster_name);
    if cla.cluster_name.is_empty() {
        d.error(
            &res,
            "cluster_name",
            "ClusterLoadAssignment has no cluster_name",
        );
    }
    endpoints_of(cla, false, &mut d, &res, "");
    finish(d)
}

/// Checks one route configuration on its own. Routes that depend on the
/// request content are warnings (Envoy accepts them; the kernel leaves
/// those services alone), not errors.
pub fn check_route_config(rc: &RouteConfiguration) -> Result<Vec<String>, ConfigErrors> {
    let mut d = Diag::default();
    let res = route_config_label(&rc.name);
    if rc.name.is_empty() {
        d.error(&res, "name", "route configuration has no name");
    }
    decide_route_config(rc, &mut d, &res, "");
    finish(d)
}

/// The result of a lenient compile.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Compiled {
    /// What the kernel should hold.
    pub flat: FlatConfig,
    /// What was left out and why (resource, field, reason): resources that
    /// depend on something missing or unusable, e.g. a listener whose
    /// cluster has no endpoints yet.
    pub excluded: Vec<ConfigError>,
}

/// Compiles whatever resources are held, leaving out what cannot be
/// installed (see [`MeshConfig::from_resources_lenient`]). Fails only when
/// the whole config does not fit the kernel maps.
pub fn compile_lenient(r: &ResourceRefs<'_>) -> Result<Compiled, ConfigErrors> {
    let (mesh, mut excluded) = MeshConfig::from_resources_lenient(r);
    let (flat, more) = flatten_lenient(&mesh)?;
    excluded.extend(more);
    Ok(Compiled { flat, excluded })
}

/// A compile kept for incremental updates: an endpoints-only change
/// (EDS) re-flattens just the services whose clusters changed, instead of
/// the whole mesh. Cost: O(services using the cluster × their endpoints).
pub struct Incremental {
    mesh: MeshConfig,
    compiled: Compiled,
    /// cluster name → VIPs of the services that route to it.
    users: BTreeMap<String, Vec<std::net::SocketAddr>>,
}

impl Incremental {
    /// A full lenient compile, kept.
    pub fn full(r: &ResourceRefs<'_>) -> Result<Incremental, ConfigErrors> {
        let (mesh, mut excluded) = MeshConfig::from_resources_lenient(r);
        let (flat, more) = flatten_lenient(&mesh)?;
        excluded.extend(more);
        let mut users: BTreeMap<String, Vec<std::net::SocketAddr>> = BTreeMap::new();
        for l in &mesh.listeners {
            if flat.services.contains_key(&l.address) {
                for (c, _) in l.route.clusters() {
                    users.entry(c.to_string()).or_default().push(l.address);
                }
            }
        }
        Ok(Incremental {
            mesh,
            compiled: Compiled { flat, excluded },
            users,
        })
    }

    /// The current result.
    pub fn compiled(&self) -> &Compiled {
        &self.compiled
    }

    /// The ClusterLoadAssignment of EDS clusters `clusters` changed to
    /// `cla`. Returns the VIPs whose records changed, or `None` when the
    /// change reaches further (a cluster becomes usable or unusable, a
    /// service fails to flatten): then a full compile is needed, and this
    /// value must be replaced. Warnings are refreshed only by full
    /// compiles.
    pub fn update_endpoints(
        &mut self,
        clusters: &[&Cluster],
        cla: &ClusterLoadAssignment,
    ) -> Option<Vec<std::net::SocketAddr>> {
        let mut touched = Vec::new();
        for c in clusters {
            if !self.mesh.clusters.contains_key(&c.name) {
                return None;
            }
            // Clusters of per-request routes are re-flattened by a full
            // compile (their slots live in `FlatConfig::l7`).
            let in_l7 = self
                .mesh
                .l7
                .iter()
                .flat_map(|l| &l.table.vhosts)
                .flat_map(|v| &v.routes);
            if in_l7
                .into_iter()
                .any(|r| r.action.clusters().iter().any(|(n, _)| *n == c.name))
            {
                return None;
            }
            let mut d = Diag::default();
            let map = BTreeMap::from([(cla.cluster_name.as_str(), cla)]);
            let m = convert_cluster(c, &map, false, &mut d)?;
            if !d.errors.is_empty() {
                return None;
            }
            self.mesh.clusters.insert(c.name.clone(), m);
            touched.extend(self.users.get(&c.name).into_iter().flatten().copied());
        }
        touched.sort_unstable();
        touched.dedup();
        let mut changed = Vec::new();
        for vip in touched {
            let l = self.mesh.listeners.iter().find(|l| l.address == vip)?;
            let mut d = Diag::default();
            let s = crate::flatten::service(l, &self.mesh, &mut d)?;
            if !d.errors.is_empty() {
                return None;
            }
            let old = self.compiled.flat.services.get(&vip);
            if old.is_none_or(|o| o.slots != s.slots || o.lb_policy != s.lb_policy) {
                changed.push(vip);
            }
            self.compiled.flat.services.insert(vip, s);
        }
        // The slot map's capacity still holds (checked by the kernel apply).
        Some(changed)
    }
}
