//! Field tables of the Envoy v3 messages this crate reads: proto field name,
//! JSON name, field number and type. They drive the JSON/YAML decoder (which
//! fields exist, how to encode them) and the "field is set but ignored"
//! warnings (field number → name).
//!
//! Messages listed in `tools/gen_schema.py` are described field by field;
//! every other message type is [`Ty::Opaque`]: the decoder checks it is an
//! object and records its presence, but does not interpret its content.

#[rustfmt::skip]
mod generated;

pub(crate) use generated::*;

/// A protobuf message type.
#[derive(Debug)]
pub(crate) struct MsgSchema {
    /// The Rust path of the prost type in `envoy_types::pb`.
    pub rust: &'static str,
    /// Fields in field-number order.
    pub fields: &'static [FieldSchema],
}

/// One field of a message.
#[derive(Debug)]
pub(crate) struct FieldSchema {
    /// Proto field name (snake_case).
    pub name: &'static str,
    /// Proto3 JSON name (lowerCamelCase).
    pub json: &'static str,
    /// Field number.
    pub tag: u32,
    pub card: Card,
    pub ty: Ty,
}

/// Cardinality of a field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Card {
    Single,
    Repeated,
    /// Member of the named oneof: at most one member may be set.
    Oneof(&'static str),
}

/// Type of a field. (The generator may emit any variant; not every one
/// occurs in the current tables.)
#[allow(dead_code)]
#[derive(Debug, Clone, Copy)]
pub(crate) enum Ty {
    String,
    Bytes,
    Bool,
    U32,
    Fixed32,
    I32,
    U64,
    Fixed64,
    I64,
    F64,
    F32,
    /// An enum: (name, number) pairs.
    Enum(&'static [(&'static str, i32)]),
    /// A message described field by field.
    Message(&'static MsgSchema),
    Duration,
    Timestamp,
    U32Value,
    U64Value,
    I32Value,
    I64Value,
    BoolValue,
    DoubleValue,
    FloatValue,
    StringValue,
    Struct,
    Any,
    /// `map<string, _>`.
    Map,
    /// A message type whose content is not interpreted (its Rust path).
    Opaque(&'static str),
}

impl MsgSchema {
    /// The field called `key`, by proto name or JSON name.
    pub fn field(&self, key: &str) -> Option<&'static FieldSchema> {
        self.fields.iter().find(|f| f.name == key || f.json == key)
    }

    /// The proto name of field number `tag`.
    pub fn name_of(&self, tag: u32) -> Option<&'static str> {
        self.fields.iter().find(|f| f.tag == tag).map(|f| f.name)
    }

    /// A known field name close to `key` (for "did you mean" hints).
    pub fn suggest(&self, key: &str) -> Option<&'static str> {
        let key_l = key.to_ascii_lowercase();
        self.fields
            .iter()
            .flat_map(|f| [(f.name, f.name), (f.json, f.name)])
            .map(|(spelling, name)| (edit_distance(&key_l, &spelling.to_ascii_lowercase()), name))
            .filter(|(d, _)| *d <= 2.max(key.len() / 5))
            .min_by_key(|(d, _)| *d)
            .map(|(_, name)| name)
    }
}

/// Proto message of the TCP proxy network filter, as an `Any` type URL.
pub(crate) const TCP_PROXY_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";

/// The type URL of the HTTP connection manager network filter's `typed_config`.
pub(crate) const HCM_TYPE_URL: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";

/// The schema of an `Any` payload type this crate decodes, by type URL.
pub(crate) fn any_schema(type_url: &str) -> Option<&'static MsgSchema> {
    match type_url {
        TCP_PROXY_TYPE_URL => Some(&M_ENVOY_EXTENSIONS_FILTERS_NETWORK_TCP_PROXY_V3_TCPPROXY),
        HCM_TYPE_URL => Some(
            &M_ENVOY_EXTENSIONS_FILTERS_NETWORK_HTTP_CONNECTION_MANAGER_V3_HTTPCONNECTIONMANAGER,
        ),
        _ => None,
    }
}

pub(crate) static LISTENER: &MsgSchema = &M_ENVOY_CONFIG_LISTENER_V3_LISTENER;
pub(crate) static HCM: &MsgSchema =
    &M_ENVOY_EXTENSIONS_FILTERS_NETWORK_HTTP_CONNECTION_MANAGER_V3_HTTPCONNECTIONMANAGER;
pub(crate) static RDS: &MsgSchema =
    &M_ENVOY_EXTENSIONS_FILTERS_NETWORK_HTTP_CONNECTION_MANAGER_V3_RDS;
pub(crate) static ROUTE_CONFIGURATION: &MsgSchema = &M_ENVOY_CONFIG_ROUTE_V3_ROUTECONFIGURATION;
pub(crate) static VIRTUAL_HOST: &MsgSchema = &M_ENVOY_CONFIG_ROUTE_V3_VIRTUALHOST;
pub(crate) static ROUTE: &MsgSchema = &M_ENVOY_CONFIG_ROUTE_V3_ROUTE;
pub(crate) static ROUTE_MATCH: &MsgSchema = &M_ENVOY_CONFIG_ROUTE_V3_ROUTEMATCH;
pub(crate) static ROUTE_ACTION: &MsgSchema = &M_ENVOY_CONFIG_ROUTE_V3_ROUTEACTION;
pub(crate) static ROUTE_CLUSTER_WEIGHT: &MsgSchema =
    &M_ENVOY_CONFIG_ROUTE_V3_WEIGHTED_CLUSTER_CLUSTERWEIGHT;
pub(crate) static FILTER_CHAIN: &MsgSchema = &M_ENVOY_CONFIG_LISTENER_V3_FILTERCHAIN;
pub(crate) static SOCKET_ADDRESS: &MsgSchema = &M_ENVOY_CONFIG_CORE_V3_SOCKETADDRESS;
pub(crate) static TCP_PROXY: &MsgSchema = &M_ENVOY_EXTENSIONS_FILTERS_NETWORK_TCP_PROXY_V3_TCPPROXY;
pub(crate) static CLUSTER_WEIGHT: &MsgSchema =
    &M_ENVOY_EXTENSIONS_FILTERS_NETWORK_TCP_PROXY_V3_TCP_PROXY_WEIGHTED_CLUSTER_CLUSTERWEIGHT;
pub(crate) static CLUSTER: &MsgSchema = &M_ENVOY_CONFIG_CLUSTER_V3_CLUSTER;
pub(crate) static EDS_CLUSTER_CONFIG: &MsgSchema =
    &M_ENVOY_CONFIG_CLUSTER_V3_CLUSTER_EDSCLUSTERCONFIG;
pub(crate) static CLUSTER_LOAD_ASSIGNMENT: &MsgSchema =
    &M_ENVOY_CONFIG_ENDPOINT_V3_CLUSTERLOADASSIGNMENT;
pub(crate) static LOCALITY_LB_ENDPOINTS: &MsgSchema =
    &M_ENVOY_CONFIG_ENDPOINT_V3_LOCALITYLBENDPOINTS;
pub(crate) static LB_ENDPOINT: &MsgSchema = &M_ENVOY_CONFIG_ENDPOINT_V3_LBENDPOINT;
pub(crate) static ENDPOINT: &MsgSchema = &M_ENVOY_CONFIG_ENDPOINT_V3_ENDPOINT;
pub(crate) static BOOTSTRAP: &MsgSchema = &M_ENVOY_CONFIG_BOOTSTRAP_V3_BOOTSTRAP;
pub(crate) static STATIC_RESOURCES: &MsgSchema =
    &M_ENVOY_CONFIG_BOOTSTRAP_V3_BOOTSTRAP_STATICRESOURCES;

/// Levenshtein distance (small inputs only).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::TcpProxy;
    use prost::Name;

    #[test]
    fn tables_are_consistent() {
        for m in [
            LISTENER,
            FILTER_CHAIN,
            &M_ENVOY_CONFIG_LISTENER_V3_FILTER,
            &M_ENVOY_CONFIG_CORE_V3_ADDRESS,
            SOCKET_ADDRESS,
            TCP_PROXY,
            CLUSTER_WEIGHT,
            CLUSTER,
            EDS_CLUSTER_CONFIG,
            CLUSTER_LOAD_ASSIGNMENT,
            LOCALITY_LB_ENDPOINTS,
            LB_ENDPOINT,
            ENDPOINT,
            BOOTSTRAP,
            STATIC_RESOURCES,
            &M_ENVOY_CONFIG_ROUTE_V3_HEADERMATCHER,
            &M_ENVOY_CONFIG_ROUTE_V3_QUERYPARAMETERMATCHER,
            &M_ENVOY_TYPE_MATCHER_V3_STRINGMATCHER,
        ] {
            let mut tags: Vec<u32> = m.fields.iter().map(|f| f.tag).collect();
            tags.dedup();
            assert_eq!(tags.len(), m.fields.len(), "{}", m.rust);
            assert!(tags.windows(2).all(|w| w[0] < w[1]), "{}", m.rust);
        }
        assert_eq!(TcpProxy::type_url(), TCP_PROXY_TYPE_URL);
        assert_eq!(SOCKET_ADDRESS.field("portValue").unwrap().tag, 3);
        assert_eq!(CLUSTER.name_of(33), Some("load_assignment"));
    }

    #[test]
    fn suggestions() {
        assert_eq!(SOCKET_ADDRESS.suggest("port_valu"), Some("port_value"));
        assert_eq!(SOCKET_ADDRESS.suggest("portVal"), Some("port_value"));
        assert_eq!(SOCKET_ADDRESS.suggest("zzzzzzzz"), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}
