//! The validated domain model: what the kernel dataplane can do, checked and
//! normalised, converted from the Envoy protos with `TryFrom`.
//!
//! The `TryFrom` impls check one resource on its own. Cross-resource checks
//! (referenced clusters exist, names and addresses are unique, EDS clusters
//! find their ClusterLoadAssignment) and the warnings are done by
//! [`crate::MeshConfig::from_resources`], which should be preferred.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use envoy_types::pb::envoy::config::cluster::v3 as pb_cluster;
use envoy_types::pb::envoy::config::core::v3 as pb_core;
use envoy_types::pb::envoy::config::endpoint::v3 as pb_endpoint;
use envoy_types::pb::envoy::config::listener::v3 as pb_listener;
use envoy_types::pb::envoy::config::route::v3 as pb_route;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as pb_hcm;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3 as pb_tcp;
use prost::Message;

use crate::error::{index, join, ConfigErrors, Diag};
use crate::schema::{self, MsgSchema, HCM_TYPE_URL, TCP_PROXY_TYPE_URL};

/// A listener: connections to `address` are sent to `route`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Listener {
    pub name: String,
    /// The service VIP:port (IPv4-mapped IPv6 addresses are stored as IPv4).
    pub address: SocketAddr,
    pub route: TcpRoute,
}

/// Where a listener's connections go.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TcpRoute {
    /// All connections to one cluster.
    Cluster(String),
    /// Connections split over clusters in proportion to the weights (each ≥ 1).
    Weighted(Vec<(String, u32)>),
}

impl TcpRoute {
    /// The clusters the route uses, with their weights (1 for a single cluster).
    pub fn clusters(&self) -> Vec<(&str, u32)> {
        match self {
            TcpRoute::Cluster(c) => vec![(c.as_str(), 1)],
            TcpRoute::Weighted(w) => w.iter().map(|(c, w)| (c.as_str(), *w)).collect(),
        }
    }
}

/// A cluster: a named set of endpoints and how to pick one.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Cluster {
    pub name: String,
    pub lb: LbPolicy,
    /// All healthy endpoints of the cluster, in configuration order, at
    /// every priority (flattening splits the load over the priorities).
    pub endpoints: Vec<Endpoint>,
    /// `circuit_breakers.thresholds[priority=DEFAULT].max_connections`
    /// (Envoy's default 1024 when the threshold is given without it); 0 =
    /// no circuit breaker configured.
    pub max_connections: u32,
    /// Per priority (index = priority): (healthy, total) endpoint counts,
    /// the input of Envoy's priority load split.
    pub priority_health: Vec<(u32, u32)>,
}

/// Load-balancing policies the kernel implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LbPolicy {
    RoundRobin,
    Random,
    /// Power of two choices over active connections.
    LeastRequest,
    /// Consistent hashing of the client; served by the Maglev table.
    RingHash,
    /// Consistent hashing of the client with a Maglev lookup table.
    Maglev,
}

impl LbPolicy {
    /// The `kmesh_abi::LB_*` value.
    pub fn to_abi(self) -> u32 {
        match self {
            LbPolicy::RoundRobin => kmesh_abi::LB_ROUND_ROBIN,
            LbPolicy::Random => kmesh_abi::LB_RANDOM,
            LbPolicy::LeastRequest => kmesh_abi::LB_LEAST_REQUEST,
            LbPolicy::RingHash | LbPolicy::Maglev => kmesh_abi::LB_MAGLEV,
        }
    }

    /// Whether the slots must be a consistent-hash lookup table.
    pub fn is_hash(self) -> bool {
        matches!(self, LbPolicy::RingHash | LbPolicy::Maglev)
    }
}

/// Envoy's default `max_connections` of a circuit-breaker threshold.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 1024;

/// One backend of a cluster.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Endpoint {
    /// Backend address (IPv4-mapped IPv6 addresses are stored as IPv4).
    pub addr: SocketAddr,
    /// `lb_endpoints[].load_balancing_weight` (default 1, always ≥ 1).
    pub weight: u32,
    /// The locality's `load_balancing_weight` (default 1, always ≥ 1).
    pub locality_weight: u32,
    /// The locality's priority (0 is the highest; at most 127).
    pub priority: u32,
}

impl TryFrom<&pb_listener::Listener> for Listener {
    type Error = ConfigErrors;

    /// Converts one listener on its own (cluster references are not checked).
    fn try_from(l: &pb_listener::Listener) -> Result<Self, ConfigErrors> {
        let mut d = Diag::default();
        let conv = convert_listener(l, &mut d);
        match conv {
            Some(ConvertedListener {
                name,
                address,
                kind: ListenerKind::Tcp((route, _)),
            }) if d.errors.is_empty() => Ok(Listener {
                name,
                address,
                route,
            }),
            Some(_) if d.errors.is_empty() => Err(ConfigErrors(vec![crate::ConfigError::new(
                listener_label(&l.name),
                "filter_chains",
                "this listener's services come from its route configuration or its filter chains' matches",
            )
            .with_hint("use MeshConfig::from_resources, which resolves the routes")])),
            _ => Err(ConfigErrors(d.errors)),
        }
    }
}

impl TryFrom<&pb_cluster::Cluster> for Cluster {
    type Error = ConfigErrors;

    /// Converts one cluster on its own. An EDS cluster fails here: its
    /// endpoints come from a separate ClusterLoadAssignment, which
    /// [`crate::MeshConfig::from_resources`] looks up.
    fn try_from(c: &pb_cluster::Cluster) -> Result<Self, ConfigErrors> {
        let mut d = Diag::default();
        let conv = convert_cluster(c, &BTreeMap::new(), false, &mut d);
        match conv {
            Some(c) if d.errors.is_empty() => Ok(c),
            _ => Err(ConfigErrors(d.errors)),
        }
    }
}

/// `listener "web"`.
pub(crate) fn listener_label(name: &str) -> String {
    if name.is_empty() {
        "listener (unnamed)".into()
    } else {
        format!("listener {name:?}")
    }
}

/// `cluster "reviews"`.
pub(crate) fn cluster_label(name: &str) -> String {
    if name.is_empty() {
        "cluster (unnamed)".into()
    } else {
        format!("cluster {name:?}")
    }
}

/// `cluster_load_assignment "reviews"`.
pub(crate) fn cla_label(name: &str) -> String {
    if name.is_empty() {
        "cluster_load_assignment (unnamed)".into()
    } else {
        format!("cluster_load_assignment {name:?}")
    }
}

const IGNORED: &str = "not supported by the kmesh dataplane; ignored";

/// Warns about every field of `m` that is set although the adapter does not
/// use it: `clear` resets the fields that are used (or reported otherwise),
/// whatever is left is named from the field table.
pub(crate) fn warn_ignored<M: Message + Clone>(
    m: &M,
    schema: &MsgSchema,
    clear: impl FnOnce(&mut M),
    d: &mut Diag,
    resource: &str,
    path: &str,
) {
    let mut rest = m.clone();
    clear(&mut rest);
    for tag in field_numbers(&rest.encode_to_vec()) {
        let name = schema
            .name_of(tag)
            .map_or_else(|| format!("#{tag}"), str::to_string);
        d.warn(resource, &join(path, &name), IGNORED);
    }
}

/// The distinct top-level field numbers present in encoded message bytes.
fn field_numbers(mut buf: &[u8]) -> Vec<u32> {
    use prost::encoding::{decode_key, decode_varint, WireType};
    let mut tags = Vec::new();
    while !buf.is_empty() {
        let Ok((tag, wt)) = decode_key(&mut buf) else {
            break;
        };
        let skip = match wt {
            WireType::Varint => decode_varint(&mut buf).map(|_| 0).unwrap_or(usize::MAX),
            WireType::SixtyFourBit => 8,
            WireType::ThirtyTwoBit => 4,
            WireType::LengthDelimited => decode_varint(&mut buf)
                .ok()
                .and_then(|n| usize::try_from(n).ok())
                .unwrap_or(usize::MAX),
            WireType::StartGroup | WireType::EndGroup => usize::MAX,
        };
        if skip > buf.len() {
            break;
        }
        buf = &buf[skip..];
        if !tags.contains(&tag) {
            tags.push(tag);
        }
    }
    tags.sort_unstable();
    tags
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Listener,
    /// A listener with an HTTP connection manager: the wildcard address is
    /// allowed (the VIPs then come from the virtual hosts' domains).
    HttpListener,
    Endpoint,
    DnsEndpoint,
}

/// An `envoy.config.core.v3.Address` that must be an IP:port socket address.
fn socket_addr(
    a: &pb_core::Address,
    role: Role,
    d: &mut Diag,
    res: &str,
    path: &str,
) -> Option<SocketAddr> {
    use pb_core::address::Address as A;
    use pb_core::socket_address::{PortSpecifier, Protocol};
    let sa = match &a.address {
        Some(A::SocketAddress(sa)) => sa,
        Some(A::Pipe(_)) => {
            d.error(
                res,
                &join(path, "pipe"),
                "unix socket (pipe) addresses are not supported; use socket_address",
            );
            return None;
        }
        Some(A::EnvoyInternalAddress(_)) => {
            d.error(
                res,
                &join(path, "envoy_internal_address"),
                "Envoy internal addresses are not supported; use socket_address",
            );
            return None;
        }
        None => {
            d.error(res, path, "address is not set; expected socket_address");
            return None;
        }
    };
    let path = join(path, "socket_address");
    warn_ignored(
        sa,
        schema::SOCKET_ADDRESS,
        |m| {
            m.address.clear();
            m.port_specifier = None;
            m.protocol = 0;
        },
        d,
        res,
        &path,
    );
    let before = d.errors.len();
    match Protocol::try_from(sa.protocol) {
        Ok(Protocol::Tcp) => {}
        Ok(Protocol::Udp) => d.error(
            res,
            &join(&path, "protocol"),
            "UDP is not supported; only TCP",
        ),
        Err(_) => d.error(
            res,
            &join(&path, "protocol"),
            format!("unknown protocol {}", sa.protocol),
        ),
    }
    let port = match &sa.port_specifier {
        Some(PortSpecifier::PortValue(p)) => match u16::try_from(*p) {
            Ok(0) => {
                let what = if matches!(role, Role::Listener | Role::HttpListener) {
                    "a service"
                } else {
                    "an endpoint"
                };
                d.error(
                    res,
                    &join(&path, "port_value"),
                    format!("port 0 is not usable for {what}"),
                );
                None
            }
            Ok(p) => Some(p),
            Err(_) => {
                d.error(
                    res,
                    &join(&path, "port_value"),
                    format!("{p} is out of range (0-65535)"),
                );
                None
            }
        },
        Some(PortSpecifier::NamedPort(n)) => {
            d.error_hint(
                res,
                &join(&path, "named_port"),
                format!("named port {n:?} is not supported"),
                "use port_value",
            );
            None
        }
        None => {
            d.error(res, &join(&path, "port_value"), "port_value is not set");
            None
        }
    };
    let apath = join(&path, "address");
    let ip = if sa.address.is_empty() {
        d.error(res, &apath, "address is empty; expected an IP address");
        None
    } else {
        match sa.address.parse::<IpAddr>() {
            Ok(ip) if ip.is_unspecified() && role != Role::HttpListener => {
                let msg = match role {
                    Role::Listener | Role::HttpListener => format!(
                        "{} is the wildcard address; a tcp_proxy listener must capture one service VIP",
                        sa.address
                    ),
                    _ => format!("{} is the unspecified address, not a backend", sa.address),
                };
                d.error(res, &apath, msg);
                None
            }
            Ok(ip) => Some(ip),
            Err(_) => {
                let msg = if role == Role::DnsEndpoint {
                    format!(
                        "{:?} is not an IP address: STRICT_DNS endpoints must be IP literals here, hostnames are not resolved",
                        sa.address
                    )
                } else {
                    format!(
                        "{:?} is not an IP address: hostnames are not resolved",
                        sa.address
                    )
                };
                d.error_hint(
                    res,
                    &apath,
                    msg,
                    "write an IP literal such as 10.96.0.10 or fd00::a (no brackets, no zone)",
                );
                None
            }
        }
    };
    if d.errors.len() != before {
        return None;
    }
    Some(crate::addr::canonical(SocketAddr::new(ip?, port?)))
}

/// A converted listener plus where it references clusters (for the
/// "cluster is not defined" check).
pub(crate) struct ConvertedListener {
    pub name: String,
    /// For an HTTP listener this may be the wildcard address (port = the
    /// service port; the VIPs come from the virtual hosts' domains).
    pub address: SocketAddr,
    pub kind: ListenerKind,
}

/// What a listener's filter chain does.
pub(crate) enum ListenerKind {
    /// `tcp_proxy`: the route, and (cluster name, field path) references.
    Tcp(Route),
    /// HTTP connection manager: the route configuration that decides.
    Http(HttpRoutes),
    /// Several filter chains chosen by `filter_chain_match` (see
    /// [`crate::chains`]); the default chain, if any, is last.
    Chains(Vec<MatchedChain>),
    /// A listener that installs no service, and why (an inbound listener,
    /// Istio's `virtualOutbound`).
    Ignored(String),
}

/// One filter chain of a [`ListenerKind::Chains`] listener.
pub(crate) struct MatchedChain {
    /// `filter chain 2 ("outbound|9080||reviews")`, `default_filter_chain`.
    pub label: String,
    pub is_default: bool,
    pub m: crate::chains::ChainMatch,
    /// What the chain does (`Tcp` or `Http`), or why it cannot be decided
    /// at connect time (e.g. a network filter the kernel cannot honour).
    pub kind: Result<ListenerKind, String>,
}

/// Where an HTTP connection manager's routes come from.
#[derive(Debug, Clone)]
pub(crate) enum HttpRoutes {
    /// `route_config` (field path of it in the listener).
    Inline(Box<pb_route::RouteConfiguration>, String),
    /// `rds.route_config_name`.
    Rds(String),
}

pub(crate) fn convert_listener(
    l: &pb_listener::Listener,
    d: &mut Diag,
) -> Option<ConvertedListener> {
    let res = listener_label(&l.name);
    let before = d.errors.len();
    if l.name.is_empty() {
        d.error(&res, "name", "listener has no name");
    }
    if l.api_listener.is_some() {
        d.error(&res, "api_listener", "API listeners are not supported");
    }
    if l.listener_specifier.is_some() {
        d.error(
            &res,
            "internal_listener",
            "internal listeners are not supported",
        );
    }
    if !l.additional_addresses.is_empty() {
        d.error_hint(
            &res,
            "additional_addresses",
            "additional addresses are not supported yet",
            "give each VIP:port its own listener",
        );
    }
    warn_ignored(
        l,
        schema::LISTENER,
        |m| {
            m.name.clear();
            m.address = None;
            m.filter_chains.clear();
            m.default_filter_chain = None;
            m.stat_prefix.clear();
            m.metadata = None;
            m.traffic_direction = 0;
            m.bind_to_port = None;
            m.api_listener = None;
            m.listener_specifier = None;
            m.additional_addresses.clear();
        },
        d,
        &res,
        "",
    );

    let mut chains: Vec<(String, &pb_listener::FilterChain)> = l
        .filter_chains
        .iter()
        .enumerate()
        .map(|(i, c)| (index("filter_chains", i), c))
        .collect();
    if let Some(c) = &l.default_filter_chain {
        chains.push(("default_filter_chain".into(), c));
    }
    let is_http = chains.len() == 1
        && chains[0].1.filters.iter().any(|f| {
            matches!(&f.config_type, Some(pb_listener::filter::ConfigType::TypedConfig(a)) if a.type_url == HCM_TYPE_URL)
        });
    // Several chains, or one with a real match: chosen per destination.
    let matched = chains.len() > 1
        || chains.iter().any(|(_, c)| {
            c.filter_chain_match
                .as_ref()
                .is_some_and(|m| *m != Default::default())
        });
    let ignored = ignored_listener(l);
    let role = if is_http || matched || ignored.is_some() {
        Role::HttpListener
    } else {
        Role::Listener
    };
    let address = match &l.address {
        Some(a) => socket_addr(a, role, d, &res, "address"),
        None => {
            d.error(&res, "address", "listener has no address");
            None
        }
    };
    let mut kind = None;
    match chains.as_slice() {
        _ if ignored.is_some() => kind = ignored.map(ListenerKind::Ignored),
        [] => d.error_hint(
            &res,
            "filter_chains",
            "listener has no filter chains",
            "add a filter chain with an envoy.filters.network.tcp_proxy or http_connection_manager filter",
        ),
        [(path, chain)] if !matched => kind = convert_chain(chain, d, &res, path),
        more => {
            let mut out = Vec::with_capacity(more.len());
            for (path, chain) in more {
                let is_default = path == "default_filter_chain";
                let m = if is_default {
                    crate::chains::ChainMatch::default()
                } else {
                    crate::chains::convert_match(chain.filter_chain_match.as_ref(), d, &res, path)
                };
                let label = if chain.name.is_empty() {
                    path.clone()
                } else {
                    format!("{path} ({:?})", chain.name)
                };
                // A chain that cannot be converted does not reject the
                // listener: destinations that may pick it are left alone.
                let mut scratch = Diag::default();
                let k = convert_chain(chain, &mut scratch, &res, path);
                d.warnings.append(&mut scratch.warnings);
                let kind = match k {
                    Some(k) if scratch.errors.is_empty() => Ok(k),
                    _ => Err(scratch
                        .errors
                        .iter()
                        .map(|e| e.to_string())
                        .collect::<Vec<_>>()
                        .join("; ")),
                };
                out.push(MatchedChain {
                    label,
                    is_default,
                    m,
                    kind,
                });
            }
            kind = Some(ListenerKind::Chains(out));
        }
    }
    if d.errors.len() != before {
        return None;
    }
    Some(ConvertedListener {
        name: l.name.clone(),
        address: address?,
        kind: kind?,
    })
}

pub(crate) type Route = (TcpRoute, Vec<(String, String)>);

/// Why a listener installs no service, if it is one of those: inbound
/// listeners (the kernel routes outbound connects only) and listeners that
/// hand connections on by their original destination (Istio's
/// `virtualOutbound` on 15001).
fn ignored_listener(l: &pb_listener::Listener) -> Option<String> {
    if l.traffic_direction == pb_core::TrafficDirection::Inbound as i32 {
        return Some("inbound listener: the kernel routes outbound connects only; inbound connections reach the pod unchanged; not installed".into());
    }
    if l.use_original_dst.as_ref().is_some_and(|b| b.value) {
        return Some("use_original_dst: this listener hands each connection to the listener of its original destination; the kernel sees that destination itself in connect(), and leaves a connect that matches no service alone (as a passthrough chain does); not installed".into());
    }
    None
}

fn convert_chain(
    chain: &pb_listener::FilterChain,
    d: &mut Diag,
    res: &str,
    path: &str,
) -> Option<ListenerKind> {
    use pb_listener::filter::ConfigType;
    warn_ignored(
        chain,
        schema::FILTER_CHAIN,
        |m| {
            m.filters.clear();
            m.name.clear();
            m.metadata = None;
            // Evaluated by the caller (a listener with one chain and a
            // non-empty match takes the several-chains path).
            m.filter_chain_match = None;
        },
        d,
        res,
        path,
    );
    if chain.filters.is_empty() {
        d.error_hint(
            res,
            &join(path, "filters"),
            "filter chain has no filters",
            "add an envoy.filters.network.tcp_proxy filter",
        );
        return None;
    }
    let mut route = None;
    for (i, f) in chain.filters.iter().enumerate() {
        let fpath = index(&join(path, "filters"), i);
        let name = if f.name.is_empty() {
            "(unnamed)"
        } else {
            f.name.as_str()
        };
        match &f.config_type {
            Some(ConfigType::TypedConfig(any)) if any.type_url == TCP_PROXY_TYPE_URL => {
                let tpath = join(&fpath, "typed_config");
                if route.is_some() {
                    d.error(res, &fpath, format!("second tcp_proxy filter {name:?}; a filter chain has one"));
                    continue;
                }
                match pb_tcp::TcpProxy::decode(any.value.as_slice()) {
                    Ok(tp) => route = Some(convert_tcp_proxy(&tp, d, res, &tpath).map(ListenerKind::Tcp)),
                    Err(e) => d.error(res, &tpath, format!("TcpProxy does not decode: {e}")),
                }
            }
            Some(ConfigType::TypedConfig(any)) if any.type_url == HCM_TYPE_URL => {
                let tpath = join(&fpath, "typed_config");
                if route.is_some() {
                    d.error(res, &fpath, format!("second routing filter {name:?}; a filter chain has one"));
                    continue;
                }
                match pb_hcm::HttpConnectionManager::decode(any.value.as_slice()) {
                    Ok(h) => route = Some(crate::http::convert_hcm(&h, d, res, &tpath).map(ListenerKind::Http)),
                    Err(e) => d.error(res, &tpath, format!("HttpConnectionManager does not decode: {e}")),
                }
            }
            Some(ConfigType::TypedConfig(any)) if telemetry_filter(name, &any.type_url) => {
                d.warn(
                    res,
                    &fpath,
                    format!("network filter {name:?} only records telemetry; ignored (the kernel reports its own connection metrics)"),
                );
            }
            Some(ConfigType::TypedConfig(any)) => {
                d.error_hint(
                    res,
                    &fpath,
                    format!("network filter {name:?} ({}) is not supported", any.type_url),
                    "only envoy.filters.network.tcp_proxy and envoy.filters.network.http_connection_manager can route a listener",
                );
            }
            Some(ConfigType::ConfigDiscovery(_)) => d.error(
                res,
                &join(&fpath, "config_discovery"),
                format!("filter {name:?}: filter config discovery is not supported; use typed_config"),
            ),
            None => d.error_hint(
                res,
                &fpath,
                format!("filter {name:?} has no typed_config"),
                "set typed_config with \"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            ),
        }
    }
    route.flatten()
}

/// Network filters that observe a connection without changing where it
/// goes or whether it is allowed (Istio adds them to outbound chains).
fn telemetry_filter(name: &str, type_url: &str) -> bool {
    matches!(name, "istio.stats" | "istio.metadata_exchange")
        || matches!(
            type_url,
            "type.googleapis.com/stats.PluginConfig"
                | "type.googleapis.com/envoy.tcp.metadataexchange.config.MetadataExchange"
        )
}

fn convert_tcp_proxy(tp: &pb_tcp::TcpProxy, d: &mut Diag, res: &str, path: &str) -> Option<Route> {
    use pb_tcp::tcp_proxy::ClusterSpecifier;
    let before = d.errors.len();
    if tp.tunneling_config.is_some() {
        d.error(
            res,
            &join(path, "tunneling_config"),
            "tunneling is not supported: the kernel connects to the backend directly",
        );
    }
    warn_ignored(
        tp,
        schema::TCP_PROXY,
        |m| {
            m.stat_prefix.clear();
            m.cluster_specifier = None;
            m.idle_timeout = None;
            m.max_connect_attempts = None;
            m.tunneling_config = None;
        },
        d,
        res,
        path,
    );
    let route = match &tp.cluster_specifier {
        Some(ClusterSpecifier::Cluster(c)) => {
            let cpath = join(path, "cluster");
            if c.is_empty() {
                d.error(res, &cpath, "cluster name is empty");
                None
            } else {
                Some((TcpRoute::Cluster(c.clone()), vec![(c.clone(), cpath)]))
            }
        }
        Some(ClusterSpecifier::WeightedClusters(wc)) => {
            let wpath = join(&join(path, "weighted_clusters"), "clusters");
            if wc.clusters.is_empty() {
                d.error(res, &wpath, "weighted_clusters lists no clusters");
            }
            let mut out: Vec<(String, u32)> = Vec::new();
            let mut refs = Vec::new();
            for (i, cw) in wc.clusters.iter().enumerate() {
                let cpath = index(&wpath, i);
                warn_ignored(
                    cw,
                    schema::CLUSTER_WEIGHT,
                    |m| {
                        m.name.clear();
                        m.weight = 0;
                    },
                    d,
                    res,
                    &cpath,
                );
                if cw.name.is_empty() {
                    d.error(res, &join(&cpath, "name"), "cluster name is empty");
                } else if out.iter().any(|(n, _)| *n == cw.name) {
                    d.error(
                        res,
                        &join(&cpath, "name"),
                        format!("cluster {:?} is listed twice", cw.name),
                    );
                }
                if cw.weight == 0 {
                    d.error(res, &join(&cpath, "weight"), "weight must be at least 1");
                }
                out.push((cw.name.clone(), cw.weight));
                refs.push((cw.name.clone(), join(&cpath, "name")));
            }
            Some((TcpRoute::Weighted(out), refs))
        }
        None => {
            d.error_hint(
                res,
                path,
                "tcp_proxy names no upstream",
                "set `cluster` or `weighted_clusters`",
            );
            None
        }
    };
    if d.errors.len() != before {
        return None;
    }
    route
}

/// With `standalone`, an EDS cluster is checked on its own: its endpoints
/// (from a separate ClusterLoadAssignment) are not looked up and come out
/// empty.
pub(crate) fn convert_cluster(
    c: &pb_cluster::Cluster,
    load_assignments: &BTreeMap<&str, &pb_endpoint::ClusterLoadAssignment>,
    standalone: bool,
    d: &mut Diag,
) -> Option<Cluster> {
    use pb_cluster::cluster::{ClusterDiscoveryType, DiscoveryType, LbPolicy as PbLb};
    let res = cluster_label(&c.name);
    let before = d.errors.len();
    if c.name.is_empty() {
        d.error(&res, "name", "cluster has no name");
    }
    warn_ignored(
        c,
        schema::CLUSTER,
        |m| {
            m.name.clear();
            m.alt_stat_name.clear();
            m.cluster_discovery_type = None;
            m.connect_timeout = None;
            m.lb_policy = 0;
            m.circuit_breakers = None;
            m.load_assignment = None;
            m.eds_cluster_config = None;
            m.metadata = None;
        },
        d,
        &res,
        "",
    );

    let ty = match &c.cluster_discovery_type {
        None => Some(DiscoveryType::Static),
        Some(ClusterDiscoveryType::Type(t)) => match DiscoveryType::try_from(*t) {
            Ok(t @ (DiscoveryType::Static | DiscoveryType::StrictDns | DiscoveryType::Eds)) => {
                Some(t)
            }
            Ok(DiscoveryType::LogicalDns) => {
                d.error_hint(
                    &res,
                    "type",
                    "LOGICAL_DNS clusters resolve hostnames, which is not supported",
                    "use STATIC (or STRICT_DNS) with IP addresses, or EDS",
                );
                None
            }
            Ok(DiscoveryType::OriginalDst) => {
                d.error(&res, "type", "ORIGINAL_DST clusters are not supported");
                None
            }
            Err(_) => {
                d.error(&res, "type", format!("unknown cluster type {t}"));
                None
            }
        },
        Some(ClusterDiscoveryType::ClusterType(ct)) => {
            d.error(
                &res,
                "cluster_type",
                format!("custom cluster type {:?} is not supported", ct.name),
            );
            None
        }
    };

    let lb = match PbLb::try_from(c.lb_policy) {
        Ok(PbLb::RoundRobin) => LbPolicy::RoundRobin,
        Ok(PbLb::Random) => LbPolicy::Random,
        Ok(PbLb::LeastRequest) => LbPolicy::LeastRequest,
        Ok(PbLb::RingHash) => LbPolicy::RingHash,
        Ok(PbLb::Maglev) => LbPolicy::Maglev,
        Ok(p) => {
            d.warn(
                &res,
                "lb_policy",
                format!(
                    "{} is not implemented in the kernel yet; using ROUND_ROBIN",
                    p.as_str_name()
                ),
            );
            LbPolicy::RoundRobin
        }
        Err(_) => {
            d.error(
                &res,
                "lb_policy",
                format!("unknown load balancing policy {}", c.lb_policy),
            );
            LbPolicy::RoundRobin
        }
    };

    let max_connections = circuit_breaker(c, d, &res);

    if let Some(t) = &c.connect_timeout {
        if t.seconds < 0 || t.nanos < 0 || (t.seconds == 0 && t.nanos == 0) {
            d.error(&res, "connect_timeout", "must be greater than 0s");
        }
    }

    let no_endpoints = "cluster has no endpoints";
    let mut endpoints = None;
    match ty {
        Some(DiscoveryType::Eds) => {
            let service = c
                .eds_cluster_config
                .as_ref()
                .map(|e| e.service_name.as_str())
                .filter(|s| !s.is_empty())
                .unwrap_or(c.name.as_str());
            if let Some(e) = &c.eds_cluster_config {
                warn_ignored(
                    e,
                    schema::EDS_CLUSTER_CONFIG,
                    |m| {
                        m.eds_config = None;
                        m.service_name.clear();
                    },
                    d,
                    &res,
                    "eds_cluster_config",
                );
            }
            if c.load_assignment.is_some() {
                d.warn(
                    &res,
                    "load_assignment",
                    format!("ignored for an EDS cluster; endpoints come from ClusterLoadAssignment {service:?}"),
                );
            }
            match load_assignments.get(service) {
                None if standalone => {
                    endpoints = Some(Endpoints {
                        endpoints: Vec::new(),
                        health: Vec::new(),
                        listed: 0,
                        unhealthy: 0,
                    })
                }
                Some(cla) => {
                    let eps = endpoints_of(cla, false, d, &cla_label(service), "");
                    if d.errors.len() == before && !has_usable(&eps) {
                        d.error(
                            &res,
                            "eds_cluster_config",
                            format!("{no_endpoints} (ClusterLoadAssignment {service:?}: {})", why_empty(&eps)),
                        );
                    }
                    endpoints = Some(eps);
                }
                None => d.error_hint(
                    &res,
                    "eds_cluster_config",
                    format!("{no_endpoints}: there is no ClusterLoadAssignment for {service:?}"),
                    "EDS endpoints come from a ClusterLoadAssignment resource: over xDS, or in the EndpointsConfigDump of a /config_dump?include_eds",
                ),
            }
        }
        Some(t) => {
            if c.eds_cluster_config.is_some() {
                d.warn(
                    &res,
                    "eds_cluster_config",
                    "only used by EDS clusters; ignored",
                );
            }
            match &c.load_assignment {
                Some(cla) => {
                    let dns = t == DiscoveryType::StrictDns;
                    let eps = endpoints_of(cla, dns, d, &res, "load_assignment");
                    if d.errors.len() == before && !has_usable(&eps) {
                        let msg = if eps.listed == 0 {
                            no_endpoints.to_string()
                        } else {
                            format!("{no_endpoints} ({})", why_empty(&eps))
                        };
                        d.error(&res, "load_assignment.endpoints", msg);
                    }
                    endpoints = Some(eps);
                }
                None => d.error(&res, "load_assignment.endpoints", no_endpoints),
            }
        }
        None => {}
    }
    if d.errors.len() != before {
        return None;
    }
    let all = endpoints?;
    let priority_health = all.health.clone();
    Some(Cluster {
        name: c.name.clone(),
        lb,
        endpoints: all.endpoints,
        max_connections,
        priority_health,
    })
}

/// `max_connections` of the DEFAULT-priority circuit-breaker threshold.
/// Only that threshold field is enforced (per connect, in the kernel);
/// the request-level thresholds need an L7 proxy and are reported.
fn circuit_breaker(c: &pb_cluster::Cluster, d: &mut Diag, res: &str) -> u32 {
    let Some(cb) = &c.circuit_breakers else {
        return 0;
    };
    let mut max = 0;
    for (i, t) in cb.thresholds.iter().enumerate() {
        let path = index("circuit_breakers.thresholds", i);
        if t.priority != pb_core::RoutingPriority::Default as i32 {
            d.warn(
                res,
                &join(&path, "priority"),
                "only the DEFAULT priority threshold applies (routes have no priority here); ignored",
            );
            continue;
        }
        for (set, name) in [
            (t.max_pending_requests.is_some(), "max_pending_requests"),
            (t.max_requests.is_some(), "max_requests"),
            (t.max_retries.is_some(), "max_retries"),
            (t.retry_budget.is_some(), "retry_budget"),
            (t.max_connection_pools.is_some(), "max_connection_pools"),
        ] {
            if set {
                d.warn(res, &join(&path, name), IGNORED);
            }
        }
        max = match &t.max_connections {
            Some(v) if v.value == 0 => {
                d.error_hint(
                    res,
                    &join(&path, "max_connections"),
                    "0 would refuse every connection",
                    "remove the cluster from the routes instead, or allow at least 1",
                );
                0
            }
            Some(v) => v.value,
            None => DEFAULT_MAX_CONNECTIONS,
        };
    }
    max
}

pub(crate) struct Endpoints {
    /// The healthy endpoints.
    endpoints: Vec<Endpoint>,
    /// Per priority: (healthy, total) endpoints.
    health: Vec<(u32, u32)>,
    /// Endpoints listed in the assignment, including excluded ones.
    listed: usize,
    /// Endpoints left out because their health status says so.
    unhealthy: usize,
}

fn has_usable(e: &Endpoints) -> bool {
    !e.endpoints.is_empty()
}

fn why_empty(e: &Endpoints) -> String {
    if e.listed == 0 {
        "it lists none".into()
    } else if e.unhealthy == e.listed {
        format!("all {} are unhealthy or draining", e.listed)
    } else {
        "none is usable".into()
    }
}

pub(crate) fn endpoints_of(
    cla: &pb_endpoint::ClusterLoadAssignment,
    dns: bool,
    d: &mut Diag,
    res: &str,
    path: &str,
) -> Endpoints {
    use pb_core::HealthStatus;
    use pb_endpoint::lb_endpoint::HostIdentifier;
    warn_ignored(
        cla,
        schema::CLUSTER_LOAD_ASSIGNMENT,
        |m| {
            m.cluster_name.clear();
            m.endpoints.clear();
        },
        d,
        res,
        path,
    );
    let role = if dns {
        Role::DnsEndpoint
    } else {
        Role::Endpoint
    };
    let mut out = Endpoints {
        endpoints: Vec::new(),
        health: Vec::new(),
        listed: 0,
        unhealthy: 0,
    };
    let epath = join(path, "endpoints");
    for (i, loc) in cla.endpoints.iter().enumerate() {
        let lpath = index(&epath, i);
        if loc.lb_config.is_some() {
            d.error_hint(
                res,
                &lpath,
                "load_balancer_endpoints / leds_cluster_locality_config are not supported",
                "list the endpoints in lb_endpoints",
            );
        }
        warn_ignored(
            loc,
            schema::LOCALITY_LB_ENDPOINTS,
            |m| {
                m.locality = None;
                m.metadata = None;
                m.lb_endpoints.clear();
                m.load_balancing_weight = None;
                m.priority = 0;
                m.lb_config = None;
            },
            d,
            res,
            &lpath,
        );
        let locality_weight = match &loc.load_balancing_weight {
            Some(w) if w.value == 0 => {
                d.error(
                    res,
                    &join(&lpath, "load_balancing_weight"),
                    "weight must be at least 1",
                );
                1
            }
            Some(w) => w.value,
            None => 1,
        };
        for (j, lbe) in loc.lb_endpoints.iter().enumerate() {
            let ppath = index(&join(&lpath, "lb_endpoints"), j);
            out.listed += 1;
            warn_ignored(
                lbe,
                schema::LB_ENDPOINT,
                |m| {
                    m.host_identifier = None;
                    m.load_balancing_weight = None;
                    m.metadata = None;
                    m.health_status = 0;
                },
                d,
                res,
                &ppath,
            );
            let weight = match &lbe.load_balancing_weight {
                Some(w) if w.value == 0 => {
                    d.error(
                        res,
                        &join(&ppath, "load_balancing_weight"),
                        "weight must be at least 1",
                    );
                    1
                }
                Some(w) => w.value,
                None => 1,
            };
            let ep = match &lbe.host_identifier {
                Some(HostIdentifier::Endpoint(ep)) => ep,
                Some(HostIdentifier::EndpointName(n)) => {
                    d.error(
                        res,
                        &join(&ppath, "endpoint_name"),
                        format!("named endpoint {n:?} is not supported; give the endpoint inline"),
                    );
                    continue;
                }
                None => {
                    d.error(res, &join(&ppath, "endpoint"), "endpoint is not set");
                    continue;
                }
            };
            let ep_path = join(&ppath, "endpoint");
            warn_ignored(
                ep,
                schema::ENDPOINT,
                |m| {
                    m.address = None;
                    m.hostname.clear();
                    m.observability_name.clear();
                },
                d,
                res,
                &ep_path,
            );
            let addr_path = join(&ep_path, "address");
            let Some(addr) = (match &ep.address {
                Some(a) => socket_addr(a, role, d, res, &addr_path),
                None => {
                    d.error(res, &addr_path, "endpoint has no address");
                    None
                }
            }) else {
                continue;
            };
            let excluded = matches!(
                HealthStatus::try_from(lbe.health_status),
                Ok(HealthStatus::Unhealthy | HealthStatus::Draining | HealthStatus::Timeout)
            );
            // Envoy's priorities are at most 128 levels (0..=127).
            let p = loc.priority.min(127) as usize;
            if out.health.len() <= p {
                out.health.resize(p + 1, (0, 0));
            }
            out.health[p].1 += 1;
            if excluded {
                out.unhealthy += 1;
                d.warn(
                    res,
                    &join(&ppath, "health_status"),
                    format!(
                        "endpoint {addr} is {}; not used",
                        HealthStatus::try_from(lbe.health_status).map_or("", |h| h.as_str_name())
                    ),
                );
                continue;
            }
            if out
                .endpoints
                .iter()
                .any(|e| e.addr == addr && e.priority == loc.priority)
            {
                d.warn(
                    res,
                    &ppath,
                    format!("endpoint {addr} is listed twice; both entries count"),
                );
            }
            out.health[p].0 += 1;
            out.endpoints.push(Endpoint {
                addr,
                weight,
                locality_weight,
                priority: loc.priority.min(127),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_numbers_of_encoded_messages() {
        let l = pb_listener::Listener {
            name: "x".into(),
            stat_prefix: "y".into(),
            enable_mptcp: true,
            listener_filters: vec![Default::default(), Default::default()],
            ..Default::default()
        };
        assert_eq!(field_numbers(&l.encode_to_vec()), vec![1, 9, 28, 30]);
        assert_eq!(field_numbers(&[0xff]), Vec::<u32>::new());
    }

    #[test]
    fn lb_policy_abi() {
        assert_eq!(LbPolicy::RoundRobin.to_abi(), kmesh_abi::LB_ROUND_ROBIN);
        assert_eq!(LbPolicy::Random.to_abi(), kmesh_abi::LB_RANDOM);
        assert_eq!(LbPolicy::LeastRequest.to_abi(), kmesh_abi::LB_LEAST_REQUEST);
        assert_eq!(LbPolicy::RingHash.to_abi(), kmesh_abi::LB_MAGLEV);
        assert_eq!(LbPolicy::Maglev.to_abi(), kmesh_abi::LB_MAGLEV);
    }
}
