//! Resources → validated [`MeshConfig`] (all resources, cross-checked).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use envoy_types::pb::envoy::config::route::v3 as pb_route;

use crate::error::{ConfigError, ConfigErrors, Diag};
use crate::http::{
    decide_route_config, route_config_label, vhost_for_vip, vhost_vips, VhostDecision,
};
use crate::model::{
    self, cla_label, cluster_label, convert_cluster, convert_listener, listener_label, HttpRoutes,
    ListenerKind, TcpRoute,
};
use crate::{l7route, ResourceRefs, Resources};

/// The validated configuration: listeners with their routes, and the
/// clusters they use.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MeshConfig {
    /// In configuration order.
    pub listeners: Vec<model::Listener>,
    /// HTTP listeners on a VIP whose routes depend on the request: decided
    /// per request (sk_msg + connector).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub l7: Vec<crate::l7::L7Listener>,
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
        let (mesh, errors) = Self::build(&r.refs(), false);
        if errors.is_empty() {
            Ok(mesh)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// Like [`MeshConfig::from_resources`], but a resource with a problem is
    /// left out (with everything that depends on it) instead of failing the
    /// whole config: the second value lists what was left out and why. This
    /// is what a control-plane client wants, where resources arrive one by
    /// one and a cluster may wait for its endpoints (EDS warming).
    pub fn from_resources_lenient(r: &ResourceRefs<'_>) -> (MeshConfig, Vec<ConfigError>) {
        Self::build(r, true)
    }

    fn build(r: &ResourceRefs<'_>, lenient: bool) -> (MeshConfig, Vec<ConfigError>) {
        let mut d = Diag::default();

        // ClusterLoadAssignments (for EDS clusters), by cluster name.
        let mut clas = BTreeMap::new();
        for &cla in &r.load_assignments {
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
        for &c in &r.clusters {
            if !c.name.is_empty() && !seen.insert(c.name.as_str()) {
                d.error(&cluster_label(&c.name), "name", "duplicate cluster name");
                continue;
            }
            match convert_cluster(c, &clas, false, &mut d) {
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

        // Route configurations from RDS, by name.
        let mut rds: BTreeMap<&str, &pb_route::RouteConfiguration> = BTreeMap::new();
        for &rc in &r.route_configs {
            let res = route_config_label(&rc.name);
            if rc.name.is_empty() {
                d.error(&res, "name", "route configuration has no name");
            } else if rds.insert(rc.name.as_str(), rc).is_some() {
                d.error(&res, "name", "duplicate route configuration name");
            }
        }
        // Each RDS route configuration is decided once, however many
        // listeners use it; its errors are reported once.
        let mut decided: BTreeMap<&str, Option<Vec<VhostDecision>>> = BTreeMap::new();
        for (name, rc) in &rds {
            let res = route_config_label(name);
            let before = d.errors.len();
            let v = decide_route_config(rc, &mut d, &res, "");
            decided.insert(name, (d.errors.len() == before).then_some(v));
        }

        let mut listeners = Vec::new();
        let mut l7 = Vec::new();
        let mut names = BTreeSet::new();
        let mut addrs: BTreeMap<SocketAddr, String> = BTreeMap::new();
        let mut used = BTreeSet::new();
        let mut used_rds = BTreeSet::new();
        for &l in &r.listeners {
            let res = listener_label(&l.name);
            if !l.name.is_empty() && !names.insert(l.name.as_str()) {
                d.error(&res, "name", "duplicate listener name");
                continue;
            }
            let Some(conv) = convert_listener(l, &mut d) else {
                continue;
            };
            let mut candidates: Vec<Candidate> = Vec::new();
            match conv.kind {
                ListenerKind::Tcp((route, refs)) => {
                    candidates.push((conv.address, route, refs, res.clone()))
                }
                ListenerKind::Http(src) => {
                    let inline;
                    let (vhosts, rc_res) = match &src {
                        HttpRoutes::Inline(rc, path) => {
                            let before = d.errors.len();
                            let v = decide_route_config(rc, &mut d, &res, path);
                            if d.errors.len() != before {
                                continue;
                            }
                            inline = v;
                            (&inline, res.clone())
                        }
                        HttpRoutes::Rds(name) => {
                            used_rds.insert(name.clone());
                            match decided.get(name.as_str()) {
                                Some(Some(v)) => (v, route_config_label(name)),
                                Some(None) => {
                                    if lenient {
                                        d.error(&res, "rds", format!("route configuration {name:?} is not usable (see its own entry)"));
                                    }
                                    continue;
                                }
                                None => {
                                    d.error_hint(
                                        &res,
                                        "rds.route_config_name",
                                        format!("route configuration {name:?} is not defined"),
                                        "over xDS it arrives by RDS; in a static file, use an inline route_config",
                                    );
                                    continue;
                                }
                            }
                        }
                    };
                    let via = |vh: &VhostDecision| format!("{rc_res} virtual host {:?}", vh.name);
                    if conv.address.ip().is_unspecified() {
                        let mut any = false;
                        for vh in vhosts {
                            let vips = vhost_vips(conv.address, &vh.domains);
                            if vips.is_empty() {
                                continue;
                            }
                            any = true;
                            match &vh.outcome {
                                Ok((route, refs)) => {
                                    for v in vips {
                                        candidates.push((
                                            v,
                                            route.clone(),
                                            refs.clone(),
                                            rc_res.clone(),
                                        ));
                                    }
                                }
                                Err(why) => d.warn(
                                    &res,
                                    "",
                                    format!(
                                        "{}: not installed, connects to {} are left alone: {why}",
                                        via(vh),
                                        list(&vips)
                                    ),
                                ),
                            }
                        }
                        if !any {
                            d.warn(&res, "address", format!(
                                "wildcard HTTP listener {} whose virtual hosts have no IP-literal domain: it captures no service VIP (hostnames are matched on the Host header, which the kernel does not see at connect time)",
                                conv.address
                            ));
                        }
                    } else {
                        let picked = vhost_for_vip(conv.address, vhosts);
                        let why = match picked.map(|i| (&vhosts[i], &vhosts[i].outcome)) {
                            Some((_, Ok((route, refs)))) => {
                                candidates.push((
                                    conv.address,
                                    route.clone(),
                                    refs.clone(),
                                    rc_res.clone(),
                                ));
                                None
                            }
                            Some((vh, Err(why))) => Some(format!("{}: {why}", via(vh))),
                            None => Some(format!(
                                "no virtual host of {rc_res} matches {} by IP domain or \"*\"",
                                conv.address
                            )),
                        };
                        if vhosts.is_empty() {
                            d.warn(&res, "", format!(
                                "no virtual host of {rc_res} matches {} (by IP domain or \"*\"); not installed",
                                conv.address
                            ));
                        } else if let Some(why) = why {
                            // Decided per request instead, when the kernel
                            // tables can express the routes.
                            let (rc, rc_path) = match &src {
                                HttpRoutes::Inline(rc, path) => (&**rc, path.as_str()),
                                HttpRoutes::Rds(name) => (rds[name.as_str()], ""),
                            };
                            match l7route::l7_table(rc, &rc_res, rc_path) {
                                Ok((table, refs)) => {
                                    used.extend(refs.iter().map(|r| r.0.clone()));
                                    if let Some((c, path)) = refs.iter().find(|r| !clusters.contains_key(&r.0)) {
                                        if !failed.contains(c.as_str()) || lenient {
                                            d.error(&rc_res, path, format!("cluster {c:?} is not defined or not usable; {} not installed", conv.address));
                                        }
                                    } else if let Some(other) = addrs.insert(conv.address, l.name.clone()) {
                                        d.error(&res, "address", format!("{} is already captured by listener {other:?}", conv.address));
                                    } else {
                                        l7.push(crate::l7::L7Listener { name: l.name.clone(), address: conv.address, table });
                                    }
                                }
                                Err((field, msg)) => d.warn(&res, "", format!(
                                    "not installed, connects to {} are left alone: {why}; and it cannot be decided per request: {rc_res} {field}: {msg}",
                                    conv.address
                                )),
                            }
                        }
                    }
                }
            }
            for (address, route, refs, ref_res) in candidates {
                if let Some(other) = addrs.get(&address) {
                    d.error(
                        &res,
                        "address",
                        format!("{address} is already captured by listener {other:?}"),
                    );
                    continue;
                }
                let mut ok = true;
                for (cluster, path) in &refs {
                    used.insert(cluster.clone());
                    if clusters.contains_key(cluster) {
                        continue;
                    }
                    ok = false;
                    if failed.contains(cluster.as_str()) {
                        // Already reported where the cluster is defined.
                        if lenient {
                            d.error(&ref_res, path, format!("cluster {cluster:?} is not usable (see its own entry); {address} not installed"));
                        }
                        continue;
                    }
                    let known: Vec<&str> = clusters.keys().map(String::as_str).take(10).collect();
                    let hint = if known.is_empty() {
                        "no cluster is defined".to_string()
                    } else {
                        format!("defined clusters: {}", known.join(", "))
                    };
                    d.error_hint(
                        &ref_res,
                        path,
                        format!("cluster {cluster:?} is not defined"),
                        hint,
                    );
                }
                if ok {
                    addrs.insert(address, l.name.clone());
                    listeners.push(model::Listener {
                        name: l.name.clone(),
                        address,
                        route,
                    });
                }
            }
        }
        for name in rds.keys() {
            if !used_rds.contains(*name) {
                d.warn(&route_config_label(name), "", "not used by any listener");
            }
        }
        for name in clusters.keys() {
            if !used.contains(name) {
                d.warn(&cluster_label(name), "", "not used by any listener");
            }
        }

        (
            MeshConfig {
                listeners,
                l7,
                clusters,
                warnings: d.warnings,
            },
            d.errors,
        )
    }
}

/// A service a listener would install: (VIP, route, cluster references as
/// (name, field path), the resource the references are in).
type Candidate = (SocketAddr, TcpRoute, Vec<(String, String)>, String);

fn list(v: &[SocketAddr]) -> String {
    v.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn is_eds(c: &envoy_types::pb::envoy::config::cluster::v3::Cluster) -> bool {
    use envoy_types::pb::envoy::config::cluster::v3::cluster::{
        ClusterDiscoveryType, DiscoveryType,
    };
    matches!(c.cluster_discovery_type, Some(ClusterDiscoveryType::Type(t)) if t == DiscoveryType::Eds as i32)
}
