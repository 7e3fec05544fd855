//! A compile kept between updates, so that a changed resource recomputes
//! only the services that depend on it.
//!
//! Dependencies, kept as indexes (built from the resources themselves, so
//! a resource referenced before it arrives is tracked too):
//!
//! ```text
//! listener ──rds──▶ route configuration ──▶ clusters ──eds──▶ ClusterLoadAssignment
//!    └──────────── tcp_proxy / inline routes ──┘
//! ```
//!
//! - a ClusterLoadAssignment or cluster that was usable and stays usable
//!   (endpoints, LB policy) re-flattens the installed services that route
//!   to it: O(those services × their endpoints);
//! - a cluster that appears, disappears or becomes (un)usable, a changed
//!   route configuration or listener rebuilds the listeners that reference
//!   it (decoding only them, their route configurations and nothing else;
//!   converted clusters are reused): O(those listeners' services);
//! - what cannot be done locally (two listeners claiming one VIP) asks for
//!   a full compile (`None`).
//!
//! Memory: the converted clusters (endpoints), one model listener per
//! installed VIP, the flat services and the indexes; no protobuf message
//! is kept.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::{filter, Listener};
use envoy_types::pb::envoy::config::route::v3::{route, route_action, RouteConfiguration};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::RouteSpecifier, HttpConnectionManager,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{
    tcp_proxy::ClusterSpecifier, TcpProxy,
};
use prost::Message;

use crate::error::{ConfigError, ConfigErrors, Diag};
use crate::mesh::{build_listeners, ClusterSet};
use crate::model::{cla_label, cluster_label, listener_label, Listener as ModelListener};
use crate::{flatten_lenient, Compiled, MeshConfig, ResourceRefs};

/// Where an incremental update reads the resources it needs, by name (the
/// xDS client's store decodes them from its held bytes). `None`: not held
/// (removed).
pub trait ResourceSource {
    fn listener(&self, name: &str) -> Option<Listener>;
    fn route_config(&self, name: &str) -> Option<RouteConfiguration>;
    fn cluster(&self, name: &str) -> Option<Cluster>;
    fn load_assignment(&self, name: &str) -> Option<ClusterLoadAssignment>;
}

/// The resources one update upserted or removed, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    pub listeners: Vec<String>,
    pub route_configs: Vec<String>,
    pub clusters: Vec<String>,
    pub load_assignments: Vec<String>,
}

/// A compile kept for incremental updates (see the module docs).
pub struct Incremental {
    /// Usable clusters (`mesh.clusters`; `mesh.listeners` stays empty, the
    /// listeners are in `by_vip`).
    mesh: MeshConfig,
    failed: BTreeSet<String>,
    passthrough: BTreeSet<String>,
    compiled: Compiled,
    /// The model listener behind each installed VIP.
    by_vip: BTreeMap<SocketAddr, ModelListener>,
    /// cluster → installed VIPs that route to it.
    users: BTreeMap<String, BTreeSet<SocketAddr>>,
    /// listener → installed VIPs it owns.
    listener_vips: BTreeMap<String, Vec<SocketAddr>>,
    /// listener → (route configurations, clusters) it references.
    listener_deps: BTreeMap<String, (Vec<String>, Vec<String>)>,
    /// route configuration → clusters it references.
    route_clusters: BTreeMap<String, Vec<String>>,
    /// route configuration → listeners that take it.
    route_listeners: BTreeMap<String, BTreeSet<String>>,
    /// cluster → listeners that reference it (directly or by route).
    cluster_listeners: BTreeMap<String, BTreeSet<String>>,
    /// ClusterLoadAssignment name → EDS clusters that take it, and back.
    cla_clusters: BTreeMap<String, BTreeSet<String>>,
    cluster_cla: BTreeMap<String, String>,
    /// Problems and warnings by the resource they name (`listener "x"`).
    notes: BTreeMap<String, (Vec<ConfigError>, Vec<String>)>,
    /// Two listeners claimed one VIP in the last build: ownership depends
    /// on listener order, so listener changes take a full compile.
    contested: bool,
    /// Per-request (L7) listeners, by listener name.
    l7: BTreeMap<String, Vec<crate::l7::L7Listener>>,
}

/// The EDS service name of an EDS cluster.
fn eds_name(c: &Cluster) -> Option<String> {
    use envoy_types::pb::envoy::config::cluster::v3::cluster::{
        ClusterDiscoveryType, DiscoveryType,
    };
    let eds = matches!(c.cluster_discovery_type,
        Some(ClusterDiscoveryType::Type(t)) if t == DiscoveryType::Eds as i32);
    eds.then(|| {
        c.eds_cluster_config
            .as_ref()
            .map(|e| e.service_name.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| c.name.clone())
    })
}

/// The clusters a route configuration names (every route action).
pub(crate) fn route_config_clusters(rc: &RouteConfiguration) -> Vec<String> {
    let mut out = BTreeSet::new();
    for vh in &rc.virtual_hosts {
        for r in &vh.routes {
            if let Some(route::Action::Route(ra)) = &r.action {
                match &ra.cluster_specifier {
                    Some(route_action::ClusterSpecifier::Cluster(c)) => {
                        out.insert(c.clone());
                    }
                    Some(route_action::ClusterSpecifier::WeightedClusters(w)) => {
                        out.extend(w.clusters.iter().map(|c| c.name.clone()));
                    }
                    _ => {}
                }
            }
        }
    }
    out.into_iter().collect()
}

/// The route configurations (by RDS) and clusters (tcp_proxy, inline
/// routes) a listener names, in any of its chains.
pub(crate) fn listener_refs(l: &Listener) -> (Vec<String>, Vec<String>) {
    let mut routes = BTreeSet::new();
    let mut clusters = BTreeSet::new();
    for chain in l.filter_chains.iter().chain(l.default_filter_chain.iter()) {
        for f in &chain.filters {
            let Some(filter::ConfigType::TypedConfig(a)) = &f.config_type else {
                continue;
            };
            if a.type_url == crate::TCP_PROXY_TYPE_URL {
                match TcpProxy::decode(a.value.as_slice()).map(|t| t.cluster_specifier) {
                    Ok(Some(ClusterSpecifier::Cluster(c))) => {
                        clusters.insert(c);
                    }
                    Ok(Some(ClusterSpecifier::WeightedClusters(w))) => {
                        clusters.extend(w.clusters.into_iter().map(|c| c.name));
                    }
                    _ => {}
                }
            } else if a.type_url == crate::HCM_TYPE_URL {
                match HttpConnectionManager::decode(a.value.as_slice()).map(|h| h.route_specifier) {
                    Ok(Some(RouteSpecifier::Rds(r))) => {
                        routes.insert(r.route_config_name);
                    }
                    Ok(Some(RouteSpecifier::RouteConfig(rc))) => {
                        clusters.extend(route_config_clusters(&rc));
                    }
                    _ => {}
                }
            }
        }
    }
    (routes.into_iter().collect(), clusters.into_iter().collect())
}

impl Incremental {
    /// A full lenient compile, kept with its indexes. The services are
    /// those of [`crate::compile_lenient`]; the problems and warnings are
    /// kept per resource that caused them, so that an update replaces
    /// exactly its own.
    pub fn full(r: &ResourceRefs<'_>) -> Result<Incremental, ConfigErrors> {
        let mut inc = Incremental {
            mesh: MeshConfig {
                listeners: Vec::new(),
                l7: Vec::new(),
                clusters: BTreeMap::new(),
                warnings: Vec::new(),
            },
            failed: BTreeSet::new(),
            passthrough: BTreeSet::new(),
            compiled: Compiled {
                flat: crate::FlatConfig {
                    services: BTreeMap::new(),
                    l7: Vec::new(),
                    warnings: Vec::new(),
                },
                excluded: Vec::new(),
            },
            by_vip: BTreeMap::new(),
            users: BTreeMap::new(),
            listener_vips: BTreeMap::new(),
            listener_deps: BTreeMap::new(),
            route_clusters: BTreeMap::new(),
            route_listeners: BTreeMap::new(),
            cluster_listeners: BTreeMap::new(),
            cla_clusters: BTreeMap::new(),
            cluster_cla: BTreeMap::new(),
            notes: BTreeMap::new(),
            contested: false,
            l7: BTreeMap::new(),
        };
        let mut global = Diag::default();
        let clas = crate::mesh::load_assignments_by_name(r, &mut global);
        let mut set = ClusterSet::default();
        let mut seen = BTreeSet::new();
        for &c in &r.clusters {
            if !c.name.is_empty() && !seen.insert(c.name.as_str()) {
                global.error(&cluster_label(&c.name), "name", "duplicate cluster name");
                continue;
            }
            let mut d = Diag::default();
            set.convert(c, &clas, &mut d);
            inc.set_notes(cluster_label(&c.name), d);
            if let Some(n) = eds_name(c) {
                inc.link_cla(&c.name, n);
            }
        }
        for name in clas.keys() {
            if !inc.cla_clusters.contains_key(*name) && !seen.contains(name) {
                global.warn(
                    &cla_label(name),
                    "",
                    "no EDS cluster uses this ClusterLoadAssignment; ignored",
                );
            }
        }
        inc.mesh.clusters = set.usable;
        inc.failed = set.failed;
        inc.passthrough = set.passthrough;
        let mut rds: BTreeMap<&str, &RouteConfiguration> = BTreeMap::new();
        for &rc in &r.route_configs {
            inc.route_clusters
                .insert(rc.name.clone(), route_config_clusters(rc));
            rds.insert(rc.name.as_str(), rc);
        }
        let mut names = BTreeSet::new();
        for &l in &r.listeners {
            if !names.insert(l.name.as_str()) {
                global.error(&listener_label(&l.name), "name", "duplicate listener name");
                continue;
            }
            let refs = listener_refs(l);
            let rcs: Vec<&RouteConfiguration> = refs
                .0
                .iter()
                .filter_map(|n| rds.get(n.as_str()).copied())
                .collect();
            inc.index_listener(&l.name, refs);
            if inc.build_one(l, &rcs).is_err() {
                inc.contested = true;
            }
        }
        for (name, rc) in &rds {
            if !inc.route_listeners.contains_key(*name) {
                inc.decide_unused(name, Some(rc));
            }
        }
        inc.set_notes(String::new(), global);
        let vips: Vec<SocketAddr> = inc.by_vip.keys().copied().collect();
        for v in vips {
            inc.flatten_one(v);
        }
        let slots = inc.compiled.flat.slot_count();
        if inc.compiled.flat.services.len() > kmesh_abi::MAX_SERVICES as usize
            || slots > kmesh_abi::MAX_SLOTS as usize
        {
            // The same error the whole-config flatten gives.
            let (_, more) = flatten_lenient(&MeshConfig {
                listeners: inc.by_vip.values().cloned().collect(),
                l7: Vec::new(),
                clusters: inc.mesh.clusters.clone(),
                warnings: Vec::new(),
            })?;
            return Err(ConfigErrors(more));
        }
        inc.mesh.l7 = inc.l7.values().flatten().cloned().collect();
        inc.compiled.flat.l7 = crate::flatten::flatten_l7(&inc.mesh.l7, &inc.mesh);
        inc.refresh_notes();
        Ok(inc)
    }

    /// Builds one listener against the converted clusters: its services go
    /// into the indexes (not yet flattened), its notes replace its earlier
    /// ones. `Err(vip)`: a VIP it would install is owned by another
    /// listener (which keeps it, as in a full compile).
    fn build_one(&mut self, l: &Listener, rcs: &[&RouteConfiguration]) -> Result<(), SocketAddr> {
        let refs = ResourceRefs {
            listeners: vec![l],
            clusters: Vec::new(),
            load_assignments: Vec::new(),
            route_configs: rcs.to_vec(),
        };
        let set = ClusterSet {
            usable: std::mem::take(&mut self.mesh.clusters),
            failed: std::mem::take(&mut self.failed),
            passthrough: std::mem::take(&mut self.passthrough),
        };
        let mut d = Diag::default();
        let built = build_listeners(&refs, &set, true, false, &mut d);
        self.mesh.clusters = set.usable;
        self.failed = set.failed;
        self.passthrough = set.passthrough;
        let mut out = Ok(());
        let res = listener_label(&l.name);
        if built.l7.is_empty() {
            self.l7.remove(&l.name);
        } else {
            self.l7.insert(l.name.clone(), built.l7);
        }
        for m in built.listeners {
            if let Some(other) = self.by_vip.get(&m.address) {
                d.error(
                    &res,
                    "address",
                    format!(
                        "{} is already captured by listener {:?}",
                        m.address, other.name
                    ),
                );
                out = Err(m.address);
                continue;
            }
            self.index_service(m);
        }
        self.set_notes(res, d);
        out
    }

    /// Decides a route configuration no listener takes, for its own
    /// problems (`None`: it is gone).
    fn decide_unused(&mut self, name: &str, rc: Option<&RouteConfiguration>) {
        let label = crate::http::route_config_label(name);
        let mut d = Diag::default();
        if let Some(rc) = rc {
            crate::http::decide_route_config(rc, &mut d, &label, "");
            d.warn(&label, "", "not used by any listener");
        }
        self.set_notes(format!("unused {label}"), d);
    }

    /// (Re)flattens the service at `vip` from its model listener; a
    /// service that does not flatten is left out with its reason. True
    /// when its records changed.
    fn flatten_one(&mut self, vip: SocketAddr) -> bool {
        let owner = format!("service {vip}");
        let Some(l) = self.by_vip.get(&vip) else {
            self.set_notes(owner, Diag::default());
            return self.compiled.flat.services.remove(&vip).is_some();
        };
        let mut d = Diag::default();
        let s = crate::flatten::service(l, &self.mesh, &mut d).filter(|_| d.errors.is_empty());
        self.set_notes(owner, d);
        match s {
            Some(s) => {
                let old = self.compiled.flat.services.get(&vip);
                let changed = old.is_none_or(|o| {
                    o.slots != s.slots || o.lb_policy != s.lb_policy || o.listener != s.listener
                });
                self.compiled.flat.services.insert(vip, s);
                changed
            }
            None => self.compiled.flat.services.remove(&vip).is_some(),
        }
    }

    /// The current result.
    pub fn compiled(&self) -> &Compiled {
        &self.compiled
    }

    fn link_cla(&mut self, cluster: &str, cla: String) {
        self.cla_clusters
            .entry(cla.clone())
            .or_default()
            .insert(cluster.to_string());
        self.cluster_cla.insert(cluster.to_string(), cla);
    }

    fn unlink_cla(&mut self, cluster: &str) {
        if let Some(cla) = self.cluster_cla.remove(cluster) {
            if let Some(u) = self.cla_clusters.get_mut(&cla) {
                u.remove(cluster);
                if u.is_empty() {
                    self.cla_clusters.remove(&cla);
                }
            }
        }
    }

    fn index_service(&mut self, l: ModelListener) {
        for (c, _) in l.route.clusters() {
            self.users
                .entry(c.to_string())
                .or_default()
                .insert(l.address);
        }
        self.listener_vips
            .entry(l.name.clone())
            .or_default()
            .push(l.address);
        self.by_vip.insert(l.address, l);
    }

    fn unindex_service(&mut self, vip: SocketAddr) {
        if let Some(l) = self.by_vip.remove(&vip) {
            for (c, _) in l.route.clusters() {
                if let Some(u) = self.users.get_mut(c) {
                    u.remove(&vip);
                    if u.is_empty() {
                        self.users.remove(c);
                    }
                }
            }
        }
    }

    /// Records what listener `name` references (its routes' clusters
    /// included), replacing the previous record.
    fn index_listener(&mut self, name: &str, refs: (Vec<String>, Vec<String>)) {
        self.unindex_listener(name);
        let (routes, mut clusters) = refs;
        for r in &routes {
            self.route_listeners
                .entry(r.clone())
                .or_default()
                .insert(name.to_string());
            clusters.extend(self.route_clusters.get(r).into_iter().flatten().cloned());
        }
        clusters.sort_unstable();
        clusters.dedup();
        for c in &clusters {
            self.cluster_listeners
                .entry(c.clone())
                .or_default()
                .insert(name.to_string());
        }
        self.listener_deps
            .insert(name.to_string(), (routes, clusters));
    }

    fn unindex_listener(&mut self, name: &str) {
        let Some((routes, clusters)) = self.listener_deps.remove(name) else {
            return;
        };
        for (map, keys) in [
            (&mut self.route_listeners, &routes),
            (&mut self.cluster_listeners, &clusters),
        ] {
            for k in keys {
                if let Some(s) = map.get_mut(k) {
                    s.remove(name);
                    if s.is_empty() {
                        map.remove(k);
                    }
                }
            }
        }
    }

    /// Replaces what `owner` (the resource whose conversion found them)
    /// has to say with `d`. True when it changed.
    fn set_notes(&mut self, owner: String, d: Diag) -> bool {
        let new = (d.errors, d.warnings);
        let empty = new.0.is_empty() && new.1.is_empty();
        let old = if empty {
            self.notes.remove(&owner)
        } else {
            self.notes.insert(owner, new.clone())
        };
        match old {
            Some(o) => empty || o != new,
            None => !empty,
        }
    }

    /// The excluded list and warnings from the notes, each line once (a
    /// route configuration shared by listeners is reported by each).
    /// Cost: O(notes), only after updates that changed notes.
    fn refresh_notes(&mut self) {
        let mut seen = std::collections::HashSet::new();
        self.compiled.excluded = self
            .notes
            .values()
            .flat_map(|n| n.0.iter())
            .filter(|e| seen.insert(e.to_string()))
            .cloned()
            .collect();
        let mut seen = std::collections::HashSet::new();
        self.compiled.flat.warnings = self
            .notes
            .values()
            .flat_map(|n| n.1.iter())
            .filter(|w| seen.insert(w.as_str()))
            .cloned()
            .collect();
    }

    /// Applies the changes in `ch`, reading the changed resources from
    /// `src`. Returns the VIPs whose records changed (added, changed or
    /// removed: a VIP absent from `compiled().flat.services` is to be
    /// removed), or `None` when a full compile is needed; then this value
    /// must be replaced.
    pub fn update(&mut self, src: &impl ResourceSource, ch: &Changes) -> Option<Vec<SocketAddr>> {
        // Per-request (L7) tables are rebuilt by full compiles only: any
        // change while one is installed takes that path.
        if !self.l7.is_empty() {
            return None;
        }
        let mut notes_changed = false;
        let mut relisten: BTreeSet<String> = ch.listeners.iter().cloned().collect();
        for r in &ch.route_configs {
            let rc = src.route_config(r);
            match &rc {
                Some(rc) => {
                    self.route_clusters
                        .insert(r.clone(), route_config_clusters(rc));
                }
                None => {
                    self.route_clusters.remove(r);
                }
            }
            match self.route_listeners.get(r) {
                Some(ls) => relisten.extend(ls.iter().cloned()),
                None => self.decide_unused(r, rc.as_ref()),
            }
            notes_changed = true;
        }
        let mut reconvert: BTreeSet<String> = ch.clusters.iter().cloned().collect();
        for cla in &ch.load_assignments {
            reconvert.extend(self.cla_clusters.get(cla).into_iter().flatten().cloned());
        }
        let mut touched: BTreeSet<SocketAddr> = BTreeSet::new();
        for name in &reconvert {
            let state = |s: &Self| {
                (
                    s.mesh.clusters.contains_key(name),
                    s.passthrough.contains(name),
                    s.failed.contains(name),
                )
            };
            let was = state(self);
            self.unlink_cla(name);
            let mut set = ClusterSet {
                usable: std::mem::take(&mut self.mesh.clusters),
                failed: std::mem::take(&mut self.failed),
                passthrough: std::mem::take(&mut self.passthrough),
            };
            let mut d = Diag::default();
            match src.cluster(name) {
                None => set.remove(name),
                Some(c) => {
                    let cla_name = eds_name(&c);
                    let cla = cla_name.as_deref().and_then(|n| src.load_assignment(n));
                    let mut map = BTreeMap::new();
                    if let (Some(n), Some(cla)) = (&cla_name, &cla) {
                        map.insert(n.as_str(), cla);
                    }
                    if let Some(n) = &cla_name {
                        self.link_cla(name, n.clone());
                    }
                    set.convert(&c, &map, &mut d);
                }
            }
            self.mesh.clusters = set.usable;
            self.failed = set.failed;
            self.passthrough = set.passthrough;
            notes_changed |= self.set_notes(cluster_label(name), d);
            let now = state(self);
            // Usable before and after: the same services, new records.
            // Otherwise what the listeners install (or say about it) changes.
            if was == (true, false, false) && now == was {
                touched.extend(self.users.get(name).into_iter().flatten().copied());
            } else if was != now {
                relisten.extend(
                    self.cluster_listeners
                        .get(name)
                        .into_iter()
                        .flatten()
                        .cloned(),
                );
            }
        }
        if !relisten.is_empty() {
            if self.contested {
                return None;
            }
            let mut old_routes = BTreeSet::new();
            // The model listeners being rebuilt: a VIP whose model comes
            // back equal (and whose clusters did not change, or it is in
            // `touched` already) keeps its flat service as it is.
            let mut old_models: BTreeMap<SocketAddr, ModelListener> = BTreeMap::new();
            for n in &relisten {
                for v in self.listener_vips.remove(n).unwrap_or_default() {
                    if let Some(m) = self.by_vip.get(&v) {
                        old_models.insert(v, m.clone());
                    }
                    self.unindex_service(v);
                }
                if let Some((routes, _)) = self.listener_deps.get(n) {
                    old_routes.extend(routes.iter().cloned());
                }
                self.unindex_listener(n);
            }
            for n in &relisten {
                let Some(l) = src.listener(n) else {
                    notes_changed |= self.set_notes(listener_label(n), Diag::default());
                    continue;
                };
                let refs = listener_refs(&l);
                let rcs: Vec<RouteConfiguration> =
                    refs.0.iter().filter_map(|r| src.route_config(r)).collect();
                for r in &refs.0 {
                    // Taken by a listener: reported through it.
                    self.set_notes(
                        format!("unused {}", crate::http::route_config_label(r)),
                        Diag::default(),
                    );
                }
                self.index_listener(n, refs);
                if self.build_one(&l, &rcs.iter().collect::<Vec<_>>()).is_err()
                    || !self.l7.is_empty()
                {
                    // Who owns a contested VIP depends on listener order;
                    // a new per-request table needs a full compile.
                    return None;
                }
                for v in self.listener_vips.get(n).into_iter().flatten() {
                    if old_models.get(v) != self.by_vip.get(v) {
                        touched.insert(*v);
                    }
                }
                notes_changed = true;
            }
            // VIPs no rebuilt listener owns any more.
            for v in old_models.keys() {
                if !self.by_vip.contains_key(v) {
                    touched.insert(*v);
                }
            }
            // Route configurations no listener takes any more report
            // their own problems.
            for r in old_routes {
                if !self.route_listeners.contains_key(&r) {
                    let rc = src.route_config(&r);
                    self.decide_unused(&r, rc.as_ref());
                }
            }
        }
        let mut changed = Vec::new();
        for vip in touched {
            if self.flatten_one(vip) {
                changed.push(vip);
            }
            notes_changed |= self.notes.contains_key(&format!("service {vip}"));
        }
        if notes_changed {
            self.refresh_notes();
        }
        // The map capacities are checked by the kernel apply.
        Some(changed)
    }
}

/// Lookup by name in a [`crate::Resources`] (a linear scan per lookup:
/// for tests and small static configs).
impl ResourceSource for crate::Resources {
    fn listener(&self, name: &str) -> Option<Listener> {
        self.listeners.iter().find(|l| l.name == name).cloned()
    }
    fn route_config(&self, name: &str) -> Option<RouteConfiguration> {
        self.route_configs.iter().find(|r| r.name == name).cloned()
    }
    fn cluster(&self, name: &str) -> Option<Cluster> {
        self.clusters.iter().find(|c| c.name == name).cloned()
    }
    fn load_assignment(&self, name: &str) -> Option<ClusterLoadAssignment> {
        self.load_assignments
            .iter()
            .find(|c| c.cluster_name == name)
            .cloned()
    }
}
