//! Envoy v3 resources → the flat records the kmesh-rs kernel programs use.
//!
//! A pure library (no I/O): the daemon reads a file or talks xDS and hands
//! the text or the protobuf messages here.
//!
//! ```text
//! text ──parse_static_config──▶ Resources ──MeshConfig::from_resources──▶ MeshConfig ──flatten──▶ FlatConfig
//!       (bootstrap / config_dump)  (protos, as from xDS)        (validated model)              (services + slots)
//! ```
//!
//! What is supported: TCP listeners on one `socket_address` (IP literal) with
//! one filter chain whose network filter is `tcp_proxy` (`cluster` or
//! `weighted_clusters`); STATIC, STRICT_DNS (IP literals only) and EDS
//! clusters with ROUND_ROBIN, RANDOM, LEAST_REQUEST, MAGLEV or RING_HASH
//! (served by a Maglev table) load balancing, endpoint and locality weights,
//! priorities with health-based failover ([`priority`]) and the
//! `max_connections` circuit breaker. Everything Envoy knows but the kernel does not do is
//! either an error (when ignoring it would change where traffic goes) or a
//! warning naming the resource and field (when it would not).
//!
//! Weights: an endpoint's weight is its `load_balancing_weight` (default 1)
//! × its locality's `load_balancing_weight` (default 1). A `weighted_clusters`
//! route gives each endpoint the share cluster_weight / Σ cluster weights ×
//! endpoint weight / Σ endpoint weights of its cluster. Shares are turned into
//! whole slots exactly (divided by their common divisor) or, beyond
//! `kmesh_abi::MAX_SLOTS_PER_SERVICE` slots, scaled down with a warning.
#![forbid(unsafe_code)]

pub mod addr;
mod chains;
mod decode;
mod error;
mod flatten;
mod http;
mod incremental;
pub mod l7;
mod l7route;
pub mod maglev;
mod mesh;
pub mod model;
mod parse;
pub mod priority;
mod schema;
pub mod workload;
mod xds;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;

pub use error::{ConfigError, ConfigErrors};
pub use flatten::{
    cluster_id, flatten, flatten_lenient, FlatConfig, FlatEndpoint, FlatL7, FlatService,
};
pub use incremental::{Changes, Incremental, ResourceSource};
pub use mesh::MeshConfig;
pub use xds::{
    check_cluster, check_listener, check_load_assignment, check_route_config, compile_lenient,
    Compiled,
};

/// The type URL of the HTTP connection manager network filter's `typed_config`.
pub const HCM_TYPE_URL: &str = schema::HCM_TYPE_URL;

/// The type URL of the TCP proxy network filter's `typed_config`.
pub const TCP_PROXY_TYPE_URL: &str = schema::TCP_PROXY_TYPE_URL;

/// Envoy resources as protobuf messages, as they come from a file or from xDS.
///
/// Resources parsed from a file carry the fields this crate interprets in
/// full; fields of other message types (e.g. `health_checks`) are kept only
/// as present-but-empty messages, so that [`MeshConfig::from_resources`] can
/// warn that they are ignored. Filter `typed_config`s are `Any`s with the
/// prost-encoded message, as over xDS (only for `tcp_proxy`; other filter
/// types keep just their type URL).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resources {
    pub listeners: Vec<Listener>,
    pub clusters: Vec<Cluster>,
    pub load_assignments: Vec<ClusterLoadAssignment>,
    /// Route configurations referenced by HTTP listeners' `rds`.
    pub route_configs: Vec<RouteConfiguration>,
}

/// [`Resources`] by reference: what a holder of resources (the xDS client's
/// store) hands to [`compile_lenient`] without copying them.
#[derive(Debug, Clone, Default)]
pub struct ResourceRefs<'a> {
    pub listeners: Vec<&'a Listener>,
    pub clusters: Vec<&'a Cluster>,
    pub load_assignments: Vec<&'a ClusterLoadAssignment>,
    pub route_configs: Vec<&'a RouteConfiguration>,
}

impl Resources {
    /// The same resources by reference.
    pub fn refs(&self) -> ResourceRefs<'_> {
        ResourceRefs {
            listeners: self.listeners.iter().collect(),
            clusters: self.clusters.iter().collect(),
            load_assignments: self.load_assignments.iter().collect(),
            route_configs: self.route_configs.iter().collect(),
        }
    }
}

/// Parses a static config document (YAML or JSON; JSON is detected, YAML is
/// the fallback).
///
/// Accepts (a) an Envoy v3 bootstrap: `static_resources: {listeners,
/// clusters}`; the other top-level keys Envoy knows (admin, node,
/// layered_runtime, stats_*, overload_manager, …) are accepted and ignored,
/// an unknown top-level key is an error; (b) an Envoy admin `/config_dump`:
/// `{"configs": [...]}` with ListenersConfigDump (static and active dynamic
/// listeners), ClustersConfigDump (static and dynamic active clusters) and
/// EndpointsConfigDump entries; other dumps are ignored.
///
/// Field names may be snake_case or lowerCamelCase. Every unknown field,
/// wrongly typed value or bad enum name is reported with the resource and
/// its path.
pub fn parse_static_config(text: &str) -> Result<Resources, ConfigErrors> {
    parse::parse_static_config(text)
}

/// Parses, validates and flattens a static config document.
pub fn compile_static_config(text: &str) -> Result<FlatConfig, ConfigErrors> {
    let resources = parse_static_config(text)?;
    let mesh = MeshConfig::from_resources(&resources)?;
    flatten(&mesh)
}
