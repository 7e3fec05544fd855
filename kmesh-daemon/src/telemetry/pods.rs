//! Workload identities of Kubernetes pods, as Istio derives them:
//!
//! - workload name: the controller owning the pod — a ReplicaSet's
//!   Deployment (the ReplicaSet name without its `pod-template-hash`
//!   suffix), a CronJob's Job (without the schedule-time suffix), any
//!   other controller by its own name; the pod's name without one;
//! - canonical service: label `service.istio.io/canonical-name`, else
//!   `app.kubernetes.io/name`, else `app`, else the workload name;
//! - canonical revision: `service.istio.io/canonical-revision`, else
//!   `app.kubernetes.io/version`, else `version`, else `latest`;
//! - principal: `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
//!
//! Host-network pods are skipped: their address is the node's, shared by
//! everything on the host.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Pod;

use super::workload::Workload;

/// Istio's default trust domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// The pod's addresses and identity; `None` for host-network pods and pods
/// without an address yet.
pub fn workload_of(pod: &Pod, trust_domain: &str) -> Option<(Vec<IpAddr>, Workload)> {
    let spec = pod.spec.as_ref();
    if spec.and_then(|s| s.host_network) == Some(true) {
        return None;
    }
    let status = pod.status.as_ref()?;
    let mut ips: Vec<IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|a| a.ip.parse().ok())
        .chain(status.pod_ip.as_deref().and_then(|a| a.parse().ok()))
        .collect();
    ips.sort();
    ips.dedup();
    if ips.is_empty() {
        return None;
    }
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    let label = |keys: &[&str]| keys.iter().find_map(|k| labels.get(*k).cloned());
    let name = workload_name(pod);
    let sa = spec
        .and_then(|s| s.service_account_name.as_deref())
        .unwrap_or("default");
    Some((
        ips,
        Workload {
            namespace: namespace.to_string(),
            canonical_service: label(&[
                "service.istio.io/canonical-name",
                "app.kubernetes.io/name",
                "app",
            ])
            .unwrap_or_else(|| name.clone()),
            canonical_revision: label(&[
                "service.istio.io/canonical-revision",
                "app.kubernetes.io/version",
                "version",
            ])
            .unwrap_or_else(|| "latest".into()),
            principal: Some(format!("spiffe://{trust_domain}/ns/{namespace}/sa/{sa}")),
            app: label(&["app"]),
            version: label(&["version"]),
            name,
        },
    ))
}

/// The name of the workload a pod belongs to.
fn workload_name(pod: &Pod) -> String {
    let pod_name = pod.metadata.name.clone().unwrap_or_default();
    let Some(owner) = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
    else {
        return pod_name;
    };
    match owner.kind.as_str() {
        "ReplicaSet" => {
            let hash = pod
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("pod-template-hash"));
            match hash.and_then(|h| owner.name.strip_suffix(&format!("-{h}"))) {
                Some(deployment) => deployment.to_string(),
                None => owner.name.clone(),
            }
        }
        // A CronJob names its Jobs `<cronjob>-<scheduled time in minutes>`.
        "Job" => match owner.name.rsplit_once('-') {
            Some((cron, t)) if t.len() >= 8 && t.bytes().all(|b| b.is_ascii_digit()) => {
                cron.to_string()
            }
            _ => owner.name.clone(),
        },
        _ => owner.name.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn deployment_pods_get_istio_identities() {
        let p = pod(serde_json::json!({
            "metadata": {"name": "reviews-v2-5d8f7c9b6-x2x4z", "namespace": "bookinfo",
                "labels": {"app": "reviews", "version": "v2", "pod-template-hash": "5d8f7c9b6"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                    "name": "reviews-v2-5d8f7c9b6", "uid": "u", "controller": true}]},
            "spec": {"serviceAccountName": "bookinfo-reviews", "containers": []},
            "status": {"podIP": "10.244.1.7", "podIPs": [{"ip": "10.244.1.7"}, {"ip": "fd00::7"}]}
        }));
        let (ips, w) = workload_of(&p, "example.org").unwrap();
        assert_eq!(ips.len(), 2);
        assert_eq!(w.name, "reviews-v2");
        assert_eq!(w.namespace, "bookinfo");
        assert_eq!(w.canonical_service, "reviews");
        assert_eq!(w.canonical_revision, "v2");
        assert_eq!(
            w.principal.as_deref(),
            Some("spiffe://example.org/ns/bookinfo/sa/bookinfo-reviews")
        );
        assert_eq!(
            (w.app.as_deref(), w.version.as_deref()),
            (Some("reviews"), Some("v2"))
        );
    }

    #[test]
    fn other_owners_bare_pods_and_host_network() {
        let cron = pod(serde_json::json!({
            "metadata": {"name": "report-28870560-abcde", "namespace": "ops",
                "labels": {"service.istio.io/canonical-name": "reports",
                    "app.kubernetes.io/version": "3"},
                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job",
                    "name": "report-28870560", "uid": "u", "controller": true}]},
            "status": {"podIP": "10.244.1.8"}
        }));
        let (_, w) = workload_of(&cron, DEFAULT_TRUST_DOMAIN).unwrap();
        assert_eq!(
            (w.name.as_str(), w.canonical_service.as_str()),
            ("report", "reports")
        );
        assert_eq!(w.canonical_revision, "3");
        assert_eq!(
            w.principal.as_deref(),
            Some("spiffe://cluster.local/ns/ops/sa/default")
        );
        let bare = pod(serde_json::json!({
            "metadata": {"name": "debug", "namespace": "ops"},
            "status": {"podIP": "10.244.1.9"}
        }));
        let (_, w) = workload_of(&bare, DEFAULT_TRUST_DOMAIN).unwrap();
        assert_eq!(
            (w.name.as_str(), w.canonical_service.as_str()),
            ("debug", "debug")
        );
        assert_eq!(w.canonical_revision, "latest");
        let host = pod(serde_json::json!({
            "metadata": {"name": "h", "namespace": "ops"},
            "spec": {"hostNetwork": true, "containers": []},
            "status": {"podIP": "192.168.0.2"}
        }));
        assert!(workload_of(&host, DEFAULT_TRUST_DOMAIN).is_none());
        let pending = pod(serde_json::json!({"metadata": {"name": "p"}, "status": {}}));
        assert!(workload_of(&pending, DEFAULT_TRUST_DOMAIN).is_none());
    }
}
