//! The Istio workload API messages (`istio.workload.Address`,
//! `istio.security.Authorization`) as the daemon reads them: only the
//! fields the kernel engine uses or must report, with the upstream field
//! numbers. Fields not declared here are skipped when decoding; the ones
//! we decode only to report (network gateways, dry run,
//! passthrough) are turned into warnings or errors by [`super::api`].
//! Enums are kept as their wire integers and matched against the
//! constants below, so an enum value newer than this file is an error
//! naming the field rather than a silent default.

use std::collections::BTreeMap;

/// `istio.workload.Address`: a workload or a service.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Address {
    #[prost(oneof = "address::Type", tags = "1, 2")]
    pub r#type: Option<address::Type>,
}

pub mod address {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Type {
        #[prost(message, boxed, tag = "1")]
        Workload(Box<super::Workload>),
        #[prost(message, boxed, tag = "2")]
        Service(Box<super::Service>),
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Service {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub namespace: String,
    #[prost(string, tag = "3")]
    pub hostname: String,
    #[prost(message, repeated, tag = "4")]
    pub addresses: Vec<NetworkAddress>,
    #[prost(message, repeated, tag = "5")]
    pub ports: Vec<Port>,
    #[prost(message, optional, tag = "7")]
    pub waypoint: Option<GatewayAddress>,
    #[prost(message, optional, tag = "8")]
    pub load_balancing: Option<LoadBalancing>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LoadBalancing {
    /// `LoadBalancing.Scope` values.
    #[prost(int32, repeated, tag = "1")]
    pub routing_preference: Vec<i32>,
    /// `LoadBalancing.Mode`.
    #[prost(int32, tag = "2")]
    pub mode: i32,
    /// `LoadBalancing.HealthPolicy`.
    #[prost(int32, tag = "3")]
    pub health_policy: i32,
}

/// `LoadBalancing.Scope`.
pub mod scope {
    pub const REGION: i32 = 1;
    pub const ZONE: i32 = 2;
    pub const SUBZONE: i32 = 3;
    pub const NODE: i32 = 4;
    pub const CLUSTER: i32 = 5;
    pub const NETWORK: i32 = 6;
}

/// `LoadBalancing.Mode`.
pub mod mode {
    pub const UNSPECIFIED: i32 = 0;
    pub const STRICT: i32 = 1;
    pub const FAILOVER: i32 = 2;
    pub const PASSTHROUGH: i32 = 3;
}

/// `LoadBalancing.HealthPolicy`.
pub mod health_policy {
    pub const ONLY_HEALTHY: i32 = 0;
    pub const ALLOW_ALL: i32 = 1;
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Workload {
    #[prost(string, tag = "20")]
    pub uid: String,
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub namespace: String,
    /// 4 or 16 bytes each.
    #[prost(bytes = "vec", repeated, tag = "3")]
    pub addresses: Vec<Vec<u8>>,
    #[prost(string, tag = "4")]
    pub network: String,
    #[prost(string, tag = "6")]
    pub trust_domain: String,
    #[prost(string, tag = "7")]
    pub service_account: String,
    #[prost(message, optional, tag = "8")]
    pub waypoint: Option<GatewayAddress>,
    #[prost(string, tag = "9")]
    pub node: String,
    #[prost(message, optional, tag = "19")]
    pub network_gateway: Option<GatewayAddress>,
    /// `namespace/hostname` of a service → its ports on this workload.
    #[prost(btree_map = "string, message", tag = "22")]
    pub services: BTreeMap<String, PortList>,
    #[prost(string, repeated, tag = "16")]
    pub authorization_policies: Vec<String>,
    /// `WorkloadStatus`: 0 HEALTHY, 1 UNHEALTHY.
    #[prost(int32, tag = "17")]
    pub status: i32,
    #[prost(string, tag = "18")]
    pub cluster_id: String,
    #[prost(message, optional, tag = "24")]
    pub locality: Option<Locality>,
    #[prost(message, optional, tag = "23")]
    pub application_tunnel: Option<ApplicationTunnel>,
    /// `google.protobuf.UInt32Value`: the endpoint's relative weight.
    #[prost(message, optional, tag = "27")]
    pub capacity: Option<UInt32Value>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ApplicationTunnel {
    /// 0 NONE, 1 PROXY.
    #[prost(int32, tag = "1")]
    pub protocol: i32,
    #[prost(uint32, tag = "2")]
    pub port: u32,
}

/// `google.protobuf.UInt32Value`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct UInt32Value {
    #[prost(uint32, tag = "1")]
    pub value: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Locality {
    #[prost(string, tag = "1")]
    pub region: String,
    #[prost(string, tag = "2")]
    pub zone: String,
    #[prost(string, tag = "3")]
    pub subzone: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PortList {
    #[prost(message, repeated, tag = "1")]
    pub ports: Vec<Port>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Port {
    #[prost(uint32, tag = "1")]
    pub service_port: u32,
    #[prost(uint32, tag = "2")]
    pub target_port: u32,
}

/// A waypoint (or network gateway): an address or a service, and the
/// port it accepts tunnelled connections on.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GatewayAddress {
    #[prost(oneof = "gateway_address::Destination", tags = "1, 2")]
    pub destination: Option<gateway_address::Destination>,
    #[prost(uint32, tag = "3")]
    pub hbone_mtls_port: u32,
}

pub mod gateway_address {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Destination {
        #[prost(message, tag = "1")]
        Hostname(super::NamespacedHostname),
        #[prost(message, tag = "2")]
        Address(super::NetworkAddress),
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct NamespacedHostname {
    #[prost(string, tag = "1")]
    pub namespace: String,
    #[prost(string, tag = "2")]
    pub hostname: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct NetworkAddress {
    #[prost(string, tag = "1")]
    pub network: String,
    #[prost(bytes = "vec", tag = "2")]
    pub address: Vec<u8>,
}

/// `istio.security.Authorization`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Authorization {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub namespace: String,
    /// 0 GLOBAL, 1 NAMESPACE, 2 WORKLOAD_SELECTOR.
    #[prost(int32, tag = "3")]
    pub scope: i32,
    /// 0 ALLOW, 1 DENY.
    #[prost(int32, tag = "4")]
    pub action: i32,
    #[prost(message, repeated, tag = "5")]
    pub rules: Vec<Rule>,
    #[prost(bool, tag = "6")]
    pub dry_run: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Rule {
    #[prost(message, repeated, tag = "1")]
    pub clauses: Vec<Clause>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Clause {
    #[prost(message, repeated, tag = "2")]
    pub matches: Vec<Match>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Match {
    #[prost(message, repeated, tag = "1")]
    pub namespaces: Vec<StringMatch>,
    #[prost(message, repeated, tag = "2")]
    pub not_namespaces: Vec<StringMatch>,
    #[prost(message, repeated, tag = "11")]
    pub service_accounts: Vec<ServiceAccountMatch>,
    #[prost(message, repeated, tag = "12")]
    pub not_service_accounts: Vec<ServiceAccountMatch>,
    #[prost(message, repeated, tag = "3")]
    pub principals: Vec<StringMatch>,
    #[prost(message, repeated, tag = "4")]
    pub not_principals: Vec<StringMatch>,
    #[prost(message, repeated, tag = "5")]
    pub source_ips: Vec<CidrAddress>,
    #[prost(message, repeated, tag = "6")]
    pub not_source_ips: Vec<CidrAddress>,
    #[prost(message, repeated, tag = "7")]
    pub destination_ips: Vec<CidrAddress>,
    #[prost(message, repeated, tag = "8")]
    pub not_destination_ips: Vec<CidrAddress>,
    #[prost(uint32, repeated, tag = "9")]
    pub destination_ports: Vec<u32>,
    #[prost(uint32, repeated, tag = "10")]
    pub not_destination_ports: Vec<u32>,
}

/// `istio.security.Address`: an IP prefix.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CidrAddress {
    #[prost(bytes = "vec", tag = "1")]
    pub address: Vec<u8>,
    #[prost(uint32, tag = "2")]
    pub length: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ServiceAccountMatch {
    #[prost(string, tag = "1")]
    pub namespace: String,
    #[prost(string, tag = "2")]
    pub service_account: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct StringMatch {
    #[prost(oneof = "string_match::MatchType", tags = "1, 2, 3, 4")]
    pub match_type: Option<string_match::MatchType>,
}

pub mod string_match {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum MatchType {
        #[prost(string, tag = "1")]
        Exact(String),
        #[prost(string, tag = "2")]
        Prefix(String),
        #[prost(string, tag = "3")]
        Suffix(String),
        #[prost(message, tag = "4")]
        Presence(super::Empty),
    }
}

/// `google.protobuf.Empty`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Empty {}
