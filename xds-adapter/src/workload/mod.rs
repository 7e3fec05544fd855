//! Dual-engine local config: workloads, services and authorization
//! policies in istio/ztunnel's local config format (the shape of the
//! Istio workload API, `istio.workload.Address` and
//! `istio.security.Authorization`), validated once at the boundary and
//! compiled into the connect-time service records ([`FlatConfig`]) and the
//! authorization tables of the XDP program ([`AuthzTables`]).
//!
//! ```yaml
//! workloads:
//! - name: web-0
//!   namespace: default
//!   serviceAccount: web
//!   workloadIps: ["10.244.0.3"]
//!   services: { "default/web.default.svc.cluster.local": { 80: 8080 } }
//!   authorizationPolicies: ["default/only-client"]   # WorkloadSelector scope
//! services:
//! - name: web
//!   namespace: default
//!   hostname: web.default.svc.cluster.local
//!   vips: ["/10.96.0.10"]
//!   ports: { 80: 8080 }
//! policies:
//! - name: only-client
//!   namespace: default
//!   scope: WorkloadSelector          # Global | Namespace | WorkloadSelector
//!   action: Allow                    # Allow | Deny
//!   rules:                           # rules (OR) → clauses (AND) → matches (OR)
//!   - - - principals: [{Exact: "cluster.local/ns/default/sa/client"}]
//!         destinationPorts: [8080]
//! ```
//!
//! L7 fields (`paths`, `methods`, `hosts`, `requestPrincipals`,
//! `remoteIps`, `when` and their `not` forms) cannot be checked by an L4
//! engine. They are handled the way Istio documents for ztunnel, so that a
//! policy never fails open: in an ALLOW policy a match using them never
//! matches (what it would have allowed is denied); in a DENY policy they are
//! dropped and the match's L4 part is enforced (so it denies at least what
//! the full policy denies; with no L4 part left it matches every
//! connection). Both produce a warning naming the policy and field.

pub mod api;
mod compile;
mod parse;
pub mod proto;
mod waypoint;

pub use compile::{az_ip, compile, locality_rank, AuthzTables};
pub use parse::parse_local_config;
pub use waypoint::{waypoint_table, WaypointTable};

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::{ConfigErrors, FlatConfig};

/// A workload as the kernel needs it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub trust_domain: String,
    pub node: String,
    pub network: String,
    pub cluster_id: String,
    pub locality: Locality,
    /// `status`: an Unhealthy workload is no service endpoint (its
    /// identity and policies still apply).
    pub healthy: bool,
    pub ips: Vec<IpAddr>,
    /// `namespace/hostname` of a service → (service port → target port).
    pub services: BTreeMap<String, BTreeMap<u16, u16>>,
    /// `namespace/name` of the WorkloadSelector policies selecting it.
    pub authorization_policies: Vec<String>,
    /// Connections to this workload (any port) go through this waypoint.
    pub waypoint: Option<Waypoint>,
}

/// `waypoint` of a workload or service (ztunnel's GatewayAddress): where
/// its traffic is sent instead, with a PROXY protocol v2 header naming the
/// original destination.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Waypoint {
    pub destination: WaypointDestination,
    /// The port the waypoint accepts PROXY-v2-prefixed connections on
    /// (`hboneMtlsPort` in ztunnel's format; Istio's HBONE port is 15008,
    /// here it is whatever the waypoint's listener uses).
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum WaypointDestination {
    /// The waypoint's own address.
    Address(IpAddr),
    /// A service of the config (`namespace/hostname`): its VIPs, load
    /// balanced over its endpoints like any service.
    Hostname(String),
}

impl Workload {
    /// `<trust domain>/ns/<namespace>/sa/<service account>`: the SPIFFE id
    /// without `spiffe://`, the form Istio principals are written in.
    pub fn principal(&self) -> String {
        format!(
            "{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// Load balancing of a service's endpoints at connect time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum LbMode {
    Random,
    RoundRobin,
}

/// A service: VIPs and ports; endpoints are the workloads that name it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    pub vips: Vec<IpAddr>,
    /// Service port → target port (0: same as the service port).
    pub ports: BTreeMap<u16, u16>,
    pub lb: LbMode,
    /// Connections to this service's VIPs go through this waypoint.
    pub waypoint: Option<Waypoint>,
    /// Locality-aware endpoint selection (`loadBalancer` / the workload
    /// API's `load_balancing`); `None`: every endpoint, healthy only.
    pub load_balancing: Option<LoadBalancing>,
}

/// `region/zone/subzone` of a workload or of this node.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub subzone: String,
}

impl std::str::FromStr for Locality {
    type Err = String;

    /// `region[/zone[/subzone]]`, as Istio writes a locality.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split('/').map(str::to_string);
        let l = Locality {
            region: parts.next().unwrap_or_default(),
            zone: parts.next().unwrap_or_default(),
            subzone: parts.next().unwrap_or_default(),
        };
        if parts.next().is_some() {
            return Err(format!(
                "{s:?} has more than three parts (region/zone/subzone)"
            ));
        }
        Ok(l)
    }
}

/// Where the client side of every connect on this node is: what
/// locality-aware load balancing compares endpoints with. All enrolled
/// pods of a node share the connect maps, so the node stands for them.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct LocalNode {
    pub locality: Locality,
    /// The node name (`NODE_NAME`), compared with a workload's `node`.
    pub node: String,
    pub network: String,
    pub cluster_id: String,
}

/// One scope of `routing_preference`, compared between this node and an
/// endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum LocalityScope {
    Network,
    Region,
    Zone,
    Subzone,
    Node,
    Cluster,
}

/// How `routing_preference` restricts the endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum LocalityMode {
    /// Locality is ignored (only the health policy applies).
    Standard,
    /// Only endpoints matching every preferred scope; none → connects to
    /// the service are refused.
    Strict,
    /// The endpoints of the best rank present (rank: how many leading
    /// scopes match).
    Failover,
}

/// Whether unhealthy workloads are endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum HealthPolicy {
    OnlyHealthy,
    AllowAll,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LoadBalancing {
    pub routing_preference: Vec<LocalityScope>,
    pub mode: LocalityMode,
    pub health_policy: HealthPolicy,
}

impl Service {
    /// `namespace/hostname`, the key workloads use in `services`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Scope {
    /// Applies to every workload (a policy in the root namespace).
    Global,
    /// Applies to the workloads of the policy's namespace.
    Namespace,
    /// Applies to the workloads that list it in `authorizationPolicies`.
    WorkloadSelector,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Action {
    Allow,
    Deny,
}

/// A string match of `namespaces` / `principals`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    /// Any non-empty value.
    Presence,
}

impl StringMatch {
    pub fn matches(&self, s: &str) -> bool {
        match self {
            StringMatch::Exact(e) => s == e,
            StringMatch::Prefix(p) => s.starts_with(p.as_str()),
            StringMatch::Suffix(p) => s.ends_with(p.as_str()),
            StringMatch::Presence => !s.is_empty(),
        }
    }
}

/// An IP prefix; host bits beyond `len` are zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    /// `addr/len` with the host bits cleared.
    pub fn new(addr: IpAddr, len: u8) -> Result<Cidr, String> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(format!("prefix length {len} is not 0-{max}"));
        }
        let addr = match addr {
            IpAddr::V4(a) => {
                let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = if len == 0 {
                    0
                } else {
                    u128::MAX << (128 - len)
                };
                IpAddr::V6((u128::from(a) & mask).into())
            }
        };
        Ok(Cidr { addr, len })
    }
}

/// One match: every non-empty field must hold (AND); within a field, any
/// value (OR); within a `not` field, none.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Match {
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    /// (namespace, service account).
    pub service_accounts: Vec<(String, String)>,
    pub not_service_accounts: Vec<(String, String)>,
    pub source_ips: Vec<Cidr>,
    pub not_source_ips: Vec<Cidr>,
    pub destination_ips: Vec<Cidr>,
    pub not_destination_ips: Vec<Cidr>,
    pub destination_ports: Vec<u16>,
    pub not_destination_ports: Vec<u16>,
    /// Names of the L7 fields the match used (already handled: see the
    /// module docs); kept for the dump.
    pub l7_fields: Vec<String>,
}

impl Match {
    /// True when no L4 field is set.
    pub fn is_l4_empty(&self) -> bool {
        self.namespaces.is_empty()
            && self.not_namespaces.is_empty()
            && self.principals.is_empty()
            && self.not_principals.is_empty()
            && self.service_accounts.is_empty()
            && self.not_service_accounts.is_empty()
            && self.source_ips.is_empty()
            && self.not_source_ips.is_empty()
            && self.destination_ips.is_empty()
            && self.not_destination_ips.is_empty()
            && self.destination_ports.is_empty()
            && self.not_destination_ports.is_empty()
    }
}

/// An authorization policy. `rules[r][c][m]`: rules OR'd, clauses AND'd,
/// matches OR'd.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Policy {
    pub name: String,
    pub namespace: String,
    pub scope: Scope,
    pub action: Action,
    pub rules: Vec<Vec<Vec<Match>>>,
}

impl Policy {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// The validated local config.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct LocalConfig {
    pub workloads: Vec<Workload>,
    pub services: Vec<Service>,
    pub policies: Vec<Policy>,
    pub warnings: Vec<String>,
}

/// Everything the daemon writes in dual-engine mode.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DualEngineConfig {
    pub config: LocalConfig,
    /// Services as connect-time records (the same maps as kernel-native).
    pub flat: FlatConfig,
    #[serde(skip)]
    pub authz: AuthzTables,
    /// Destinations with a waypoint.
    pub waypoints: WaypointTable,
}

/// Parses, validates and compiles a ztunnel-style local config document
/// for a node without a known locality.
pub fn compile_local_config(text: &str) -> Result<DualEngineConfig, ConfigErrors> {
    compile_local_config_for(text, &LocalNode::default())
}

/// [`compile_local_config`] for the node `node` (locality-aware load
/// balancing compares endpoints with it).
pub fn compile_local_config_for(
    text: &str,
    node: &LocalNode,
) -> Result<DualEngineConfig, ConfigErrors> {
    DualEngineConfig::compile(parse_local_config(text)?, node)
}

impl DualEngineConfig {
    /// Compiles a validated config (from the local file or the workload
    /// API) for the node `node`.
    pub fn compile(config: LocalConfig, node: &LocalNode) -> Result<Self, ConfigErrors> {
        let (flat, authz) = compile(&config, node)?;
        let waypoints = waypoint_table(&config)?;
        Ok(DualEngineConfig {
            config,
            flat,
            authz,
            waypoints,
        })
    }
}
