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
    use envoy_types::pb::envoy::config::cluster::v3::cluster::{
        ClusterDiscoveryType, DiscoveryType,
    };
    let mut d = Diag::default();
    let res = crate::model::cluster_label(&c.name);
    if crate::chains::is_original_dst(c) {
        if c.name.is_empty() {
            d.error(&res, "name", "cluster has no name");
        }
        d.warn(&res, "type", "ORIGINAL_DST: connects routed to it are left alone by the kernel (they go where they were dialled, as Envoy's passthrough does)");
        return finish(d);
    }
    convert_cluster(c, &BTreeMap::new(), true, &mut d);
    // A STATIC cluster listing no endpoint at all (Istio's
    // BlackHoleCluster) is valid for Envoy: it refuses connections. The
    // kernel cannot refuse at connect time, so it installs no route to it
    // and such connects are left alone.
    let is_static = c.cluster_discovery_type.is_none()
        || matches!(c.cluster_discovery_type, Some(ClusterDiscoveryType::Type(t)) if t == DiscoveryType::Static as i32);
    let listed: usize = c
        .load_assignment
        .iter()
        .flat_map(|a| &a.endpoints)
        .map(|l| l.lb_endpoints.len())
        .sum();
    if is_static && listed == 0 {
        let before = d.errors.len();
        d.errors.retain(|e| e.field != "load_assignment.endpoints");
        if d.errors.len() != before {
            d.warn(&res, "load_assignment.endpoints", "no endpoints: Envoy refuses connections routed to it; the kernel cannot refuse at connect time, so routes to it are not installed and those connects are left alone");
        }
    }
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
