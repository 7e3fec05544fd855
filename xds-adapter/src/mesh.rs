//! Resources → validated [`MeshConfig`] (all resources, cross-checked).

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use envoy_types::pb::envoy::config::route::v3 as pb_route;

use crate::error::{ConfigError, ConfigErrors, Diag};
use crate::http::{
    decide_route_config, describe, route_config_label, same_clusters, vhost_for_vip, vhost_vips,
    VhostDecision,
};
use crate::model::{
    self, cla_label, cluster_label, convert_cluster, convert_listener, listener_label, HttpRoutes,
    ListenerKind, Route, TcpRoute,
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
        let (mesh, errors, _) = Self::build_parts(r, lenient);
        (mesh, errors)
    }

    /// The build, also returning the failed and ORIGINAL_DST clusters (in
    /// a [`ClusterSet`] whose `usable` map has moved into the mesh).
    pub(crate) fn build_parts(
        r: &ResourceRefs<'_>,
        lenient: bool,
    ) -> (MeshConfig, Vec<ConfigError>, ClusterSet) {
        let mut d = Diag::default();

        let clas = load_assignments_by_name(r, &mut d);

        let mut set = ClusterSet::default();
        let mut seen = BTreeSet::new();
        for &c in &r.clusters {
            if !c.name.is_empty() && !seen.insert(c.name.as_str()) {
                d.error(&cluster_label(&c.name), "name", "duplicate cluster name");
                continue;
            }
            set.convert(c, &clas, &mut d);
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

        let Built {
            listeners,
            l7,
            used,
        } = build_listeners(r, &set, lenient, true, &mut d);
        for name in set.usable.keys() {
            if !used.contains(name) {
                d.warn(&cluster_label(name), "", "not used by any listener");
            }
        }

        let clusters = std::mem::take(&mut set.usable);
        (
            MeshConfig {
                listeners,
                l7,
                clusters,
                warnings: d.warnings,
            },
            d.errors,
            set,
        )
    }
}

/// ClusterLoadAssignments (for EDS clusters), by cluster name; unnamed
/// and duplicate ones are errors.
pub(crate) fn load_assignments_by_name<'a>(
    r: &ResourceRefs<'a>,
    d: &mut Diag,
) -> BTreeMap<&'a str, &'a envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment> {
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
    clas
}

/// The clusters of a config, converted once and shared by every listener
/// that routes to them.
#[derive(Debug, Clone, Default)]
pub(crate) struct ClusterSet {
    /// Usable clusters (endpoints known), by name.
    pub usable: BTreeMap<String, model::Cluster>,
    /// Clusters that failed their conversion (reported where defined).
    pub failed: BTreeSet<String>,
    /// ORIGINAL_DST clusters (Istio's PassthroughCluster): routes to them
    /// leave the connect alone.
    pub passthrough: BTreeSet<String>,
}

impl ClusterSet {
    /// Converts `c` (with its ClusterLoadAssignment from `clas` when it is
    /// an EDS cluster) into the set, replacing any earlier entry.
    pub fn convert(
        &mut self,
        c: &envoy_types::pb::envoy::config::cluster::v3::Cluster,
        clas: &BTreeMap<&str, &envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment>,
        d: &mut Diag,
    ) {
        self.remove(&c.name);
        if crate::chains::is_original_dst(c) {
            self.passthrough.insert(c.name.clone());
            return;
        }
        match convert_cluster(c, clas, false, d) {
            Some(m) => {
                self.usable.insert(m.name.clone(), m);
            }
            None => {
                self.failed.insert(c.name.clone());
            }
        }
    }

    pub fn remove(&mut self, name: &str) {
        self.usable.remove(name);
        self.failed.remove(name);
        self.passthrough.remove(name);
    }
}

/// What [`build_listeners`] found.
pub(crate) struct Built {
    pub listeners: Vec<model::Listener>,
    /// HTTP listeners on a VIP whose routes are decided per request.
    pub l7: Vec<crate::l7::L7Listener>,
    /// Clusters referenced by installed or attempted services.
    pub used: BTreeSet<String>,
}

/// Route configurations and listeners → services, against converted
/// clusters. With `warn_unused`, route configurations no listener uses are
/// reported (a whole-config check; a partial rebuild skips it).
pub(crate) fn build_listeners(
    r: &ResourceRefs<'_>,
    set: &ClusterSet,
    lenient: bool,
    warn_unused: bool,
    d: &mut Diag,
) -> Built {
    let clusters = &set.usable;
    let failed = &set.failed;
    let passthrough = &set.passthrough;
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
        let v = decide_route_config(rc, d, &res, "");
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
        let Some(conv) = convert_listener(l, d) else {
            continue;
        };
        let mut candidates: Vec<Candidate> = Vec::new();
        match conv.kind {
            ListenerKind::Tcp((route, refs)) => {
                candidates.push((conv.address, route, refs, res.clone()))
            }
            ListenerKind::Ignored(why) => d.warn(&res, "", why),
            ListenerKind::Chains(chains) => {
                let mut resolved = Vec::with_capacity(chains.len());
                for c in &chains {
                    resolved.push(match &c.kind {
                        Ok(ListenerKind::Http(src)) => match resolve_http(src, &decided, &mut used_rds, lenient, d, &res) {
                            Some(v) => ChainRoutes::Http(v),
                            None => ChainRoutes::Unusable("its route configuration is not usable".into()),
                        },
                        Ok(ListenerKind::Tcp(r)) => ChainRoutes::Tcp(r.clone()),
                        Ok(_) => ChainRoutes::Unusable("unsupported chain".into()),
                        Err(why) => {
                            d.warn(&res, "", format!("{}: not usable ({why}); connects that may take it are left alone", c.label));
                            ChainRoutes::Unusable(why.clone())
                        }
                    });
                }
                candidates.extend(decide_chains(
                    conv.address,
                    &chains,
                    &resolved,
                    passthrough,
                    d,
                    &res,
                ));
            }
            ListenerKind::Http(src) => {
                let Some((vhosts, rc_res)) =
                    resolve_http(&src, &decided, &mut used_rds, lenient, d, &res)
                else {
                    continue;
                };
                let vhosts = &*vhosts;
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
                    let why = match vhost_for_vip(conv.address, vhosts) {
                        Some(i) => match &vhosts[i].outcome {
                            Ok((route, refs)) => {
                                candidates.push((
                                    conv.address,
                                    route.clone(),
                                    refs.clone(),
                                    rc_res.clone(),
                                ));
                                None
                            }
                            Err(why) => Some(format!("{}: {why}", via(&vhosts[i]))),
                        },
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
        // A route to an ORIGINAL_DST cluster is Envoy's passthrough:
        // the connect goes where it was dialled, which is what the
        // kernel does for a destination it does not hold.
        candidates.retain(|(address, route, _, _)| match passthrough_of(route, passthrough) {
            Passthrough::None => true,
            Passthrough::All => false,
            Passthrough::Some(c) => {
                d.warn(&res, "", format!("{address}: not installed, connects are left alone: its route splits between ORIGINAL_DST cluster {c:?} and other clusters"));
                false
            }
        });
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
    for name in rds.keys().filter(|_| warn_unused) {
        if !used_rds.contains(*name) {
            d.warn(&route_config_label(name), "", "not used by any listener");
        }
    }
    Built {
        listeners,
        l7,
        used,
    }
}

/// A service a listener would install: (VIP, route, cluster references as
/// (name, field path), the resource the references are in).
pub(crate) type Candidate = (SocketAddr, TcpRoute, Vec<(String, String)>, String);

/// An HTTP connection manager's virtual hosts, decided, and the label of
/// the resource that holds them.
fn resolve_http<'a>(
    src: &'a HttpRoutes,
    decided: &'a BTreeMap<&str, Option<Vec<VhostDecision>>>,
    used_rds: &mut BTreeSet<String>,
    lenient: bool,
    d: &mut Diag,
    res: &str,
) -> Option<(Cow<'a, [VhostDecision]>, String)> {
    match src {
        HttpRoutes::Inline(rc, path) => {
            let before = d.errors.len();
            let v = decide_route_config(rc, d, res, path);
            (d.errors.len() == before).then(|| (Cow::Owned(v), res.to_string()))
        }
        HttpRoutes::Rds(name) => {
            used_rds.insert(name.clone());
            match decided.get(name.as_str()) {
                Some(Some(v)) => Some((Cow::Borrowed(v.as_slice()), route_config_label(name))),
                Some(None) => {
                    if lenient {
                        d.error(
                            res,
                            "rds",
                            format!(
                                "route configuration {name:?} is not usable (see its own entry)"
                            ),
                        );
                    }
                    None
                }
                None => {
                    d.error_hint(
                        res,
                        "rds.route_config_name",
                        format!("route configuration {name:?} is not defined"),
                        "over xDS it arrives by RDS; in a static file, use an inline route_config",
                    );
                    None
                }
            }
        }
    }
}

/// A matched chain with its HTTP routes resolved.
pub(crate) enum ChainRoutes<'a> {
    Tcp(Route),
    /// Virtual hosts and the label of the resource that holds them.
    Http((Cow<'a, [VhostDecision]>, String)),
    Unusable(String),
}

/// How much of a route goes to ORIGINAL_DST clusters.
enum Passthrough<'a> {
    None,
    All,
    Some(&'a str),
}

fn passthrough_of<'a>(route: &'a TcpRoute, passthrough: &BTreeSet<String>) -> Passthrough<'a> {
    let cs = route.clusters();
    let n = cs.iter().filter(|(c, _)| passthrough.contains(*c)).count();
    match n {
        0 => Passthrough::None,
        _ if n == cs.len() => Passthrough::All,
        _ => Passthrough::Some(
            cs.iter()
                .find(|(c, _)| passthrough.contains(*c))
                .map_or("", |c| c.0),
        ),
    }
}

/// Where a chain sends a connection to `dest`.
enum Outcome {
    Route(Route, String),
    /// Left alone (ORIGINAL_DST).
    Passthrough,
    /// Envoy closes it (no chain, no default chain).
    Closed,
    Undecidable(String),
}

fn chain_outcome(
    listen: SocketAddr,
    dest: SocketAddr,
    routes: &ChainRoutes<'_>,
    passthrough: &BTreeSet<String>,
) -> Outcome {
    let route = match routes {
        ChainRoutes::Unusable(why) => return Outcome::Undecidable(why.clone()),
        ChainRoutes::Tcp(r) => (r.clone(), String::new()),
        ChainRoutes::Http((vhosts, rc_res)) => {
            let i = if listen.ip().is_unspecified() {
                vhosts
                    .iter()
                    .position(|v| vhost_vips(listen, &v.domains).contains(&dest))
            } else {
                vhost_for_vip(dest, vhosts)
            };
            let Some(i) = i else {
                return Outcome::Undecidable(format!(
                    "no virtual host of {rc_res} names {dest}; the Host header decides"
                ));
            };
            match &vhosts[i].outcome {
                Ok(r) => (r.clone(), rc_res.clone()),
                Err(why) => {
                    return Outcome::Undecidable(format!(
                        "{rc_res} virtual host {:?}: {why}",
                        vhosts[i].name
                    ))
                }
            }
        }
    };
    match passthrough_of(&route.0 .0, passthrough) {
        Passthrough::None => Outcome::Route(route.0, route.1),
        Passthrough::All => Outcome::Passthrough,
        Passthrough::Some(c) => Outcome::Undecidable(format!(
            "it splits between ORIGINAL_DST cluster {c:?} and other clusters"
        )),
    }
}

/// The services a listener with matched filter chains installs: for each
/// concrete destination it names, the route every chain Envoy may pick
/// agrees on; the others are reported and left alone.
fn decide_chains(
    listen: SocketAddr,
    chains: &[model::MatchedChain],
    routes: &[ChainRoutes<'_>],
    passthrough: &BTreeSet<String>,
    d: &mut Diag,
    res: &str,
) -> Vec<Candidate> {
    let matches: Vec<crate::chains::ChainMatch> = chains
        .iter()
        .filter(|c| !c.is_default)
        .map(|c| c.m.clone())
        .collect();
    let default = chains.iter().position(|c| c.is_default);
    // The destinations the listener names.
    let mut dests: Vec<SocketAddr> = Vec::new();
    let mut add = |a: SocketAddr| {
        let a = crate::addr::canonical(a);
        if !a.ip().is_unspecified() && !dests.contains(&a) {
            dests.push(a);
        }
    };
    if !listen.ip().is_unspecified() {
        add(listen);
    } else {
        for (c, r) in chains.iter().zip(routes) {
            for ip in c.m.hosts() {
                add(SocketAddr::new(ip, listen.port()));
            }
            if let ChainRoutes::Http((vhosts, _)) = r {
                for vh in vhosts.iter() {
                    for v in vhost_vips(listen, &vh.domains) {
                        add(v);
                    }
                }
            }
        }
    }
    // Chains that name no single destination and route somewhere: what
    // they would take is left alone.
    for (c, r) in chains.iter().zip(routes) {
        if c.is_default || c.m.hosts().next().is_some() || !listen.ip().is_unspecified() {
            continue;
        }
        let routed = match r {
            ChainRoutes::Tcp((route, _)) => {
                !matches!(passthrough_of(route, passthrough), Passthrough::All)
            }
            _ => false,
        };
        if routed {
            let what = if c.m.opaque.is_empty() {
                "names no single destination (prefix_ranges /32 or /128)".to_string()
            } else {
                format!(
                    "matches on {}, which the kernel does not see at connect time",
                    c.m.opaque.join(", ")
                )
            };
            d.warn(
                res,
                "",
                format!("{}: {what}; connects it would take are left alone", c.label),
            );
        }
    }
    let mut out = Vec::new();
    for dest in dests {
        // `matches` skips the default chain, which is last: the indexes
        // are the same in `chains`. Without a default chain Envoy closes
        // what no chain takes.
        let (picked, may_close) = match crate::chains::pick(&matches, dest) {
            crate::chains::Pick::Default => (default.into_iter().collect(), default.is_none()),
            crate::chains::Pick::Chains {
                chains: mut v,
                or_default,
            } => {
                if or_default {
                    v.extend(default);
                }
                (v, or_default && default.is_none())
            }
        };
        let picked: Vec<usize> = picked;
        let mut outcomes: Vec<(usize, Outcome)> = picked
            .iter()
            .map(|&i| (i, chain_outcome(listen, dest, &routes[i], passthrough)))
            .collect();
        if may_close {
            outcomes.push((usize::MAX, Outcome::Closed));
        }
        let label = |i: usize| {
            if i == usize::MAX {
                "no chain (Envoy closes the connection)".to_string()
            } else {
                let c = &chains[i];
                if c.m.opaque.is_empty() {
                    c.label.clone()
                } else {
                    format!("{} [{}]", c.label, c.m.opaque.join(", "))
                }
            }
        };
        let first = &outcomes[0].1;
        let agree = outcomes.iter().all(|(_, o)| match (first, o) {
            (Outcome::Route(a, _), Outcome::Route(b, _)) => same_clusters(&a.0, &b.0),
            (Outcome::Passthrough, Outcome::Passthrough) => true,
            _ => false,
        });
        if agree {
            if let Outcome::Route((route, _), _) = first {
                let mut refs = Vec::new();
                let mut ref_res = res.to_string();
                for (_, o) in &outcomes {
                    if let Outcome::Route((_, r), rr) = o {
                        refs.extend(r.iter().cloned());
                        if !rr.is_empty() {
                            ref_res = rr.clone();
                        }
                    }
                }
                out.push((dest, route.clone(), refs, ref_res));
            }
            continue;
        }
        let why: Vec<String> = outcomes
            .iter()
            .map(|(i, o)| {
                let to = match o {
                    Outcome::Route((r, _), _) => format!("sends to {}", describe(r)),
                    Outcome::Passthrough => "passes it through (ORIGINAL_DST)".into(),
                    Outcome::Closed => "closes it".into(),
                    Outcome::Undecidable(w) => format!("cannot be decided at connect time: {w}"),
                };
                format!("{} {to}", label(*i))
            })
            .collect();
        d.warn(
            res,
            "",
            format!(
                "{dest}: not installed, connects are left alone: the filter chains Envoy may pick for it do not agree ({})",
                why.join("; ")
            ),
        );
    }
    out
}

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
