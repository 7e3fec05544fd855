//! The resources the daemon holds from the control plane, per type and
//! name, with their versions: the last good version of every resource.
//!
//! A resource that fails its check is not stored; if an earlier version of
//! it was accepted, that version stays (and keeps routing). Removal follows
//! xDS: a state-of-the-world LDS/CDS response is the complete set (names not
//! in it are removed); EDS/RDS responses carry only what was asked for, and
//! those resources go away when nothing references them any more; delta
//! responses name removals explicitly.

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::config::cluster::v3::{cluster, Cluster};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::{filter, Listener};
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::RouteSpecifier, HttpConnectionManager,
};
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use xds_adapter::Resources;

pub const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT_TYPE: &str =
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const ROUTE_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";

/// The four types in Envoy's warming order: clusters, their endpoints,
/// listeners, their routes.
pub const TYPES: [&str; 4] = [CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE];

/// Short name of a type URL for logs (`CDS`, `EDS`, `LDS`, `RDS`).
pub fn short(type_url: &str) -> &'static str {
    match type_url {
        LISTENER_TYPE => "LDS",
        CLUSTER_TYPE => "CDS",
        ENDPOINT_TYPE => "EDS",
        ROUTE_TYPE => "RDS",
        _ => "?",
    }
}

/// One held resource: its wire bytes (checked when it arrived), not the
/// decoded message. Decoded prost structs are large (a `Cluster` is 3.4 KB
/// of mostly empty optional fields; 10,000 services took ~130 MiB decoded
/// against 4.4 MB encoded), so they are decoded only for a compile and
/// dropped after it. `refs` keeps what subscriptions need.
#[derive(Debug, Clone)]
pub struct Held {
    pub version: String,
    pub bytes: Vec<u8>,
    pub refs: Refs,
}

/// What a held resource references, kept so that subscriptions do not
/// need a decode.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Refs {
    #[default]
    None,
    /// An EDS cluster: the ClusterLoadAssignment name it takes.
    Eds(String),
    /// A listener: the route configurations it takes by RDS.
    Rds(Vec<String>),
}

/// A decoded resource of one of the four types.
#[derive(Debug, Clone)]
pub enum Decoded {
    Listener(Box<Listener>),
    Cluster(Box<Cluster>),
    Endpoints(Box<ClusterLoadAssignment>),
    Route(Box<RouteConfiguration>),
}

/// One rejected resource: its name (or position when the name is not
/// known) and the reasons.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Rejected {
    pub name: String,
    pub reason: String,
}

/// What [`Store`] did with a response.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// True when the held set changed (an apply is needed).
    pub changed: bool,
    /// Names added or replaced with different content.
    pub upserted: Vec<String>,
    /// Names removed.
    pub removed: Vec<String>,
    pub rejected: Vec<Rejected>,
    /// Warnings of the accepted resources.
    pub warnings: Vec<String>,
}

/// Decodes and checks one resource of type `type_url`. Returns its name
/// and the decoded message, or the name (if known) and the reasons.
pub fn decode(type_url: &str, any: &Any) -> Result<(String, Decoded, Vec<String>), Rejected> {
    let reject = |name: &str, reason: String| Rejected {
        name: name.to_string(),
        reason,
    };
    if any.type_url != type_url {
        return Err(reject(
            "",
            format!(
                "resource type {} in a {} response",
                any.type_url,
                short(type_url)
            ),
        ));
    }
    let bytes = any.value.as_slice();
    let errs = |e: xds_adapter::ConfigErrors| e.to_string();
    match type_url {
        LISTENER_TYPE => {
            let l = Listener::decode(bytes).map_err(|e| reject("", format!("Listener: {e}")))?;
            let w = xds_adapter::check_listener(&l).map_err(|e| reject(&l.name, errs(e)))?;
            Ok((l.name.clone(), Decoded::Listener(Box::new(l)), w))
        }
        CLUSTER_TYPE => {
            let c = Cluster::decode(bytes).map_err(|e| reject("", format!("Cluster: {e}")))?;
            let w = xds_adapter::check_cluster(&c).map_err(|e| reject(&c.name, errs(e)))?;
            Ok((c.name.clone(), Decoded::Cluster(Box::new(c)), w))
        }
        ENDPOINT_TYPE => {
            let c = ClusterLoadAssignment::decode(bytes)
                .map_err(|e| reject("", format!("ClusterLoadAssignment: {e}")))?;
            let w = xds_adapter::check_load_assignment(&c)
                .map_err(|e| reject(&c.cluster_name, errs(e)))?;
            Ok((c.cluster_name.clone(), Decoded::Endpoints(Box::new(c)), w))
        }
        ROUTE_TYPE => {
            let r = RouteConfiguration::decode(bytes)
                .map_err(|e| reject("", format!("RouteConfiguration: {e}")))?;
            let w = xds_adapter::check_route_config(&r).map_err(|e| reject(&r.name, errs(e)))?;
            Ok((r.name.clone(), Decoded::Route(Box::new(r)), w))
        }
        other => Err(reject("", format!("unsupported resource type {other}"))),
    }
}

/// All held resources, by type URL then name.
#[derive(Debug, Clone, Default)]
pub struct Store {
    pub types: BTreeMap<&'static str, BTreeMap<String, Held>>,
}

fn static_type(type_url: &str) -> Option<&'static str> {
    TYPES.into_iter().find(|t| *t == type_url)
}

impl Store {
    pub fn new() -> Self {
        Self::default()
    }

    /// Resources of one type.
    pub fn of(&self, type_url: &str) -> Option<&BTreeMap<String, Held>> {
        self.types.get(type_url)
    }

    /// Name → version of one type (delta's `initial_resource_versions`).
    pub fn versions(&self, type_url: &str) -> BTreeMap<String, String> {
        self.of(type_url)
            .map(|m| {
                m.iter()
                    .map(|(k, h)| (k.clone(), h.version.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Applies a state-of-the-world response. For LDS and CDS the response
    /// is the whole set; for EDS and RDS it updates what it carries.
    pub fn apply_sotw(&mut self, type_url: &str, version: &str, resources: &[Any]) -> Outcome {
        let Some(t) = static_type(type_url) else {
            return Outcome {
                rejected: vec![Rejected {
                    name: String::new(),
                    reason: format!("unsupported resource type {type_url}"),
                }],
                ..Default::default()
            };
        };
        let mut out = Outcome::default();
        let mut fresh: BTreeMap<String, Held> = BTreeMap::new();
        let mut named_in_response = BTreeSet::new();
        for (i, any) in resources.iter().enumerate() {
            match decode(type_url, any) {
                Ok((name, resource, warnings)) => {
                    if !named_in_response.insert(name.clone()) {
                        out.rejected.push(Rejected {
                            name,
                            reason: "listed twice in one response".into(),
                        });
                        continue;
                    }
                    out.warnings.extend(warnings);
                    fresh.insert(
                        name,
                        Held {
                            version: version.to_string(),
                            bytes: any.value.clone(),
                            refs: refs_of(&resource),
                        },
                    );
                }
                Err(mut r) => {
                    if r.name.is_empty() {
                        r.name = format!("resources[{i}]");
                    } else {
                        named_in_response.insert(r.name.clone());
                    }
                    out.rejected.push(r);
                }
            }
        }
        let held = self.types.entry(t).or_default();
        let complete = matches!(t, LISTENER_TYPE | CLUSTER_TYPE);
        if complete {
            // Names absent from the response are removed; rejected names
            // keep their last good version.
            let gone: Vec<String> = held
                .keys()
                .filter(|k| !named_in_response.contains(*k))
                .cloned()
                .collect();
            for k in &gone {
                held.remove(k);
            }
            out.changed |= !gone.is_empty();
            out.removed = gone;
        }
        for (name, h) in fresh {
            let same = held.get(&name).is_some_and(|old| old.bytes == h.bytes);
            if !same {
                out.changed = true;
                out.upserted.push(name.clone());
            }
            held.insert(name, h);
        }
        out
    }

    /// Applies a delta response: upserts and removals by name.
    pub fn apply_delta(
        &mut self,
        type_url: &str,
        resources: &[(String, String, Option<Any>)],
        removed: &[String],
    ) -> Outcome {
        let Some(t) = static_type(type_url) else {
            return Outcome {
                rejected: vec![Rejected {
                    name: String::new(),
                    reason: format!("unsupported resource type {type_url}"),
                }],
                ..Default::default()
            };
        };
        let mut out = Outcome::default();
        let held = self.types.entry(t).or_default();
        for (name, version, any) in resources {
            let Some(any) = any else {
                // A resource entry without a body only refreshes its TTL.
                continue;
            };
            match decode(type_url, any) {
                Ok((decoded_name, resource, warnings)) if &decoded_name == name => {
                    out.warnings.extend(warnings);
                    let same = held.get(name).is_some_and(|old| old.bytes == any.value);
                    out.changed |= !same;
                    if !same {
                        out.upserted.push(name.clone());
                    }
                    held.insert(
                        name.clone(),
                        Held {
                            version: version.clone(),
                            bytes: any.value.clone(),
                            refs: refs_of(&resource),
                        },
                    );
                }
                Ok((decoded_name, _, _)) => out.rejected.push(Rejected {
                    name: name.clone(),
                    reason: format!("the resource inside is named {decoded_name:?}"),
                }),
                Err(mut r) => {
                    r.name = name.clone();
                    out.rejected.push(r);
                }
            }
        }
        for name in removed {
            if held.remove(name).is_some() {
                out.changed = true;
                out.removed.push(name.clone());
            }
        }
        out
    }

    /// Drops EDS/RDS resources that no held cluster/listener references,
    /// and returns them (type, name, resource) so that a failed update
    /// can put them back. `candidates`: the only EDS/RDS names that may
    /// have lost their last reference (those the changed clusters and
    /// listeners referenced before), or `None` to check everything. Cost:
    /// O(held clusters and listeners × candidates), no copies.
    pub fn collect_garbage(
        &mut self,
        candidates: Option<&BTreeSet<String>>,
    ) -> Vec<(&'static str, String, Held)> {
        let mut out = Vec::new();
        for (t, owner) in [(ENDPOINT_TYPE, CLUSTER_TYPE), (ROUTE_TYPE, LISTENER_TYPE)] {
            let referenced = |s: &Store, n: &str| {
                s.of(owner)
                    .into_iter()
                    .flat_map(|m| m.values())
                    .any(|h| match &h.refs {
                        Refs::Eds(e) => e == n,
                        Refs::Rds(r) => r.iter().any(|r| r == n),
                        Refs::None => false,
                    })
            };
            let gone: Vec<String> = match candidates {
                Some(c) => c
                    .iter()
                    .filter(|n| self.of(t).is_some_and(|m| m.contains_key(*n)))
                    .filter(|n| !referenced(self, n))
                    .cloned()
                    .collect(),
                None => {
                    let keep = if t == ENDPOINT_TYPE {
                        self.eds_names()
                    } else {
                        self.rds_names()
                    };
                    self.of(t)
                        .into_iter()
                        .flat_map(|m| m.keys())
                        .filter(|k| !keep.contains(*k))
                        .cloned()
                        .collect()
                }
            };
            if let Some(m) = self.types.get_mut(t) {
                for n in gone {
                    if let Some(h) = m.remove(&n) {
                        out.push((t, n, h));
                    }
                }
            }
        }
        out
    }

    /// The ClusterLoadAssignment names the held EDS clusters need.
    pub fn eds_names(&self) -> BTreeSet<String> {
        self.of(CLUSTER_TYPE)
            .into_iter()
            .flat_map(|m| m.values())
            .filter_map(|h| match &h.refs {
                Refs::Eds(n) => Some(n.clone()),
                _ => None,
            })
            .collect()
    }

    /// One held resource, decoded (the bytes were checked when they
    /// arrived; a decode that fails reads as absent).
    pub fn decoded<M: Message + Default>(&self, type_url: &str, name: &str) -> Option<M> {
        let h = self.of(type_url)?.get(name)?;
        M::decode(h.bytes.as_slice()).ok()
    }

    /// The route configuration names the held listeners use through RDS.
    pub fn rds_names(&self) -> BTreeSet<String> {
        self.of(LISTENER_TYPE)
            .into_iter()
            .flat_map(|m| m.values())
            .flat_map(|h| match &h.refs {
                Refs::Rds(n) => n.clone(),
                _ => Vec::new(),
            })
            .collect()
    }

    /// Everything held, decoded, as the adapter takes it. The bytes were
    /// checked when they arrived; a decode cannot fail here (one that did
    /// would be left out). Cost: a decode of every held resource.
    pub fn resources(&self) -> Resources {
        fn all<M: Message + Default>(s: &Store, t: &str) -> Vec<M> {
            s.of(t)
                .into_iter()
                .flat_map(|m| m.values())
                .filter_map(|h| M::decode(h.bytes.as_slice()).ok())
                .collect()
        }
        Resources {
            listeners: all(self, LISTENER_TYPE),
            clusters: all(self, CLUSTER_TYPE),
            load_assignments: all(self, ENDPOINT_TYPE),
            route_configs: all(self, ROUTE_TYPE),
        }
    }

    /// (type, name, version) of everything held, for the admin dump.
    pub fn summary(&self) -> BTreeMap<&'static str, BTreeMap<String, String>> {
        self.types
            .iter()
            .map(|(t, m)| {
                (
                    short(t),
                    m.iter()
                        .map(|(k, h)| (k.clone(), h.version.clone()))
                        .collect(),
                )
            })
            .collect()
    }
}

/// The adapter's incremental compile reads the changed resources from the
/// store, decoding only those.
impl xds_adapter::ResourceSource for Store {
    fn listener(&self, name: &str) -> Option<Listener> {
        self.decoded(LISTENER_TYPE, name)
    }
    fn route_config(&self, name: &str) -> Option<RouteConfiguration> {
        self.decoded(ROUTE_TYPE, name)
    }
    fn cluster(&self, name: &str) -> Option<Cluster> {
        self.decoded(CLUSTER_TYPE, name)
    }
    fn load_assignment(&self, name: &str) -> Option<ClusterLoadAssignment> {
        self.decoded(ENDPOINT_TYPE, name)
    }
}

fn refs_of(d: &Decoded) -> Refs {
    match d {
        Decoded::Cluster(c) => {
            let eds = matches!(c.cluster_discovery_type,
                Some(cluster::ClusterDiscoveryType::Type(t)) if t == cluster::DiscoveryType::Eds as i32);
            if !eds {
                return Refs::None;
            }
            Refs::Eds(
                c.eds_cluster_config
                    .as_ref()
                    .map(|e| e.service_name.clone())
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| c.name.clone()),
            )
        }
        Decoded::Listener(l) => {
            let mut out = Vec::new();
            for chain in l.filter_chains.iter().chain(l.default_filter_chain.iter()) {
                for f in &chain.filters {
                    if let Some(filter::ConfigType::TypedConfig(a)) = &f.config_type {
                        if a.type_url == xds_adapter::HCM_TYPE_URL {
                            if let Ok(h) = HttpConnectionManager::decode(a.value.as_slice()) {
                                if let Some(RouteSpecifier::Rds(r)) = h.route_specifier {
                                    out.push(r.route_config_name);
                                }
                            }
                        }
                    }
                }
            }
            if out.is_empty() {
                Refs::None
            } else {
                Refs::Rds(out)
            }
        }
        _ => Refs::None,
    }
}
