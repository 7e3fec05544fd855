//! The node identity Istiod expects from a sidecar-mode proxy.
//!
//! Istiod generates a proxy's listeners from its node id
//! `sidecar~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local` and its
//! metadata (NAMESPACE, CLUSTER_ID, ISTIO_VERSION, INTERCEPTION_MODE, …).
//! Like pilot-agent, every `ISTIO_META_<KEY>` environment variable becomes a
//! metadata field `<KEY>`, so an operator can add or override any of them.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3::{node::UserAgentVersionType, Node};
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};

/// What the node id and metadata are built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeIdentity {
    /// The pod IP (Istio: INSTANCE_IP).
    pub ip: String,
    /// The pod name (Istio: POD_NAME).
    pub pod: String,
    /// The namespace (Istio: POD_NAMESPACE).
    pub namespace: String,
    /// The cluster id (Istio: CLUSTER_ID, default `Kubernetes`).
    pub cluster_id: String,
    /// The Istio version announced to Istiod (ISTIO_META_ISTIO_VERSION).
    pub istio_version: String,
    /// Extra metadata (`ISTIO_META_*` without the prefix), overriding the
    /// defaults.
    pub extra: BTreeMap<String, String>,
}

impl NodeIdentity {
    /// From the environment a DaemonSet pod has (downward API variables as
    /// Istio's injector names them), with development defaults.
    pub fn from_env() -> Self {
        let get = |k: &str, default: &str| std::env::var(k).unwrap_or_else(|_| default.into());
        let extra = std::env::vars()
            .filter_map(|(k, v)| k.strip_prefix("ISTIO_META_").map(|k| (k.to_string(), v)))
            .collect();
        NodeIdentity {
            ip: get("INSTANCE_IP", "127.0.0.1"),
            pod: get("POD_NAME", "kmesh-daemon"),
            namespace: get("POD_NAMESPACE", "kmesh-system"),
            cluster_id: get("CLUSTER_ID", "Kubernetes"),
            istio_version: get("ISTIO_VERSION", "1.26.0"),
            extra,
        }
    }

    /// `sidecar~<ip>~<pod>.<ns>~<ns>.svc.cluster.local`.
    pub fn node_id(&self) -> String {
        format!(
            "sidecar~{}~{}.{}~{}.svc.cluster.local",
            self.ip, self.pod, self.namespace, self.namespace
        )
    }

    /// The Envoy `Node` sent on the first request of every stream.
    pub fn to_node(&self) -> Node {
        let mut meta: BTreeMap<String, String> = BTreeMap::new();
        meta.insert("NAMESPACE".into(), self.namespace.clone());
        meta.insert("NAME".into(), self.pod.clone());
        meta.insert("CLUSTER_ID".into(), self.cluster_id.clone());
        meta.insert("ISTIO_VERSION".into(), self.istio_version.clone());
        meta.insert("INTERCEPTION_MODE".into(), "REDIRECT".into());
        meta.insert("INSTANCE_IPS".into(), self.ip.clone());
        meta.insert("WORKLOAD_NAME".into(), self.pod.clone());
        meta.insert("MESH_ID".into(), "cluster.local".into());
        for (k, v) in &self.extra {
            meta.insert(k.clone(), v.clone());
        }
        let fields = meta
            .into_iter()
            .map(|(k, v)| {
                (
                    k,
                    Value {
                        kind: Some(Kind::StringValue(v)),
                    },
                )
            })
            .collect();
        Node {
            id: self.node_id(),
            cluster: format!("{}.{}", self.pod, self.namespace),
            metadata: Some(Struct { fields }),
            user_agent_name: "kmesh-rs".into(),
            user_agent_version_type: Some(UserAgentVersionType::UserAgentVersion(
                crate::VERSION.into(),
            )),
            ..Default::default()
        }
    }
}

impl NodeIdentity {
    /// `ztunnel~<ip>~<pod>.<ns>~<ns>.svc.cluster.local`: the node type
    /// Istiod serves the workload API (Address, Authorization) to.
    pub fn ztunnel_node_id(&self) -> String {
        format!(
            "ztunnel~{}~{}.{}~{}.svc.cluster.local",
            self.ip, self.pod, self.namespace, self.namespace
        )
    }

    /// The `Node` of an ambient node proxy: the sidecar metadata plus
    /// `NODE_NAME` (`node_name`), with the ztunnel node id.
    pub fn to_ztunnel_node(&self, node_name: &str) -> Node {
        let mut node = self.to_node();
        node.id = self.ztunnel_node_id();
        if let Some(meta) = node.metadata.as_mut() {
            meta.fields.insert(
                "NODE_NAME".into(),
                Value {
                    kind: Some(Kind::StringValue(node_name.to_string())),
                },
            );
        }
        node
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_sidecar_node_id_and_metadata() {
        let n = NodeIdentity {
            ip: "10.244.1.7".into(),
            pod: "kmesh-abc".into(),
            namespace: "kmesh-system".into(),
            cluster_id: "Kubernetes".into(),
            istio_version: "1.26.0".into(),
            extra: [("INTERCEPTION_MODE".to_string(), "NONE".to_string())].into(),
        };
        assert_eq!(
            n.node_id(),
            "sidecar~10.244.1.7~kmesh-abc.kmesh-system~kmesh-system.svc.cluster.local"
        );
        let node = n.to_node();
        let f = &node.metadata.unwrap().fields;
        let s = |k: &str| match &f[k].kind {
            Some(Kind::StringValue(s)) => s.clone(),
            _ => panic!("{k} not a string"),
        };
        assert_eq!(s("NAMESPACE"), "kmesh-system");
        assert_eq!(s("CLUSTER_ID"), "Kubernetes");
        assert_eq!(s("INTERCEPTION_MODE"), "NONE", "ISTIO_META_* overrides");
    }
}
