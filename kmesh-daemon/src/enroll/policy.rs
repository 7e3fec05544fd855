//! The enrollment rule, as Istio ambient and Kmesh users know it:
//! - a namespace labelled `istio.io/dataplane-mode=Kmesh` enrolls its pods;
//! - a pod label of the same key overrides: `Kmesh` enrolls the pod in any
//!   namespace, `none` opts it out;
//! - values compare case-insensitively;
//! - pods with an Istio sidecar, host-network pods, pods being deleted and
//!   pods not yet running are never enrolled.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;

/// The label key on namespaces and pods.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";

/// True when `pod` (in a namespace with `ns_labels`) should be managed.
pub fn wants_kmesh(ns_labels: Option<&BTreeMap<String, String>>, pod: &Pod) -> bool {
    let meta = &pod.metadata;
    if meta.deletion_timestamp.is_some() {
        return false;
    }
    let spec = match &pod.spec {
        Some(s) => s,
        None => return false,
    };
    if spec.host_network == Some(true) {
        return false;
    }
    let sidecar = meta
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key("sidecar.istio.io/status"))
        || spec.containers.iter().any(|c| c.name == "istio-proxy")
        || spec
            .init_containers
            .as_ref()
            .is_some_and(|cs| cs.iter().any(|c| c.name == "istio-proxy"));
    if sidecar {
        return false;
    }
    let running = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Running");
    if !running {
        return false;
    }
    let label = |labels: Option<&BTreeMap<String, String>>| {
        labels
            .and_then(|l| l.get(DATAPLANE_MODE_LABEL))
            .map(|v| v.to_ascii_lowercase())
    };
    match label(meta.labels.as_ref()).as_deref() {
        Some("none") => false,
        Some("kmesh") => true,
        _ => label(ns_labels).as_deref() == Some("kmesh"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, PodSpec, PodStatus};

    fn labels(v: &[(&str, &str)]) -> BTreeMap<String, String> {
        v.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn pod(pod_label: Option<&str>) -> Pod {
        let mut p = Pod::default();
        p.metadata.name = Some("p".into());
        if let Some(v) = pod_label {
            p.metadata.labels = Some(labels(&[(DATAPLANE_MODE_LABEL, v)]));
        }
        p.spec = Some(PodSpec {
            containers: vec![Container {
                name: "app".into(),
                ..Default::default()
            }],
            ..Default::default()
        });
        p.status = Some(PodStatus {
            phase: Some("Running".into()),
            ..Default::default()
        });
        p
    }

    #[test]
    fn namespace_label_enrolls_case_insensitively() {
        let ns = labels(&[(DATAPLANE_MODE_LABEL, "kmesh")]);
        assert!(wants_kmesh(Some(&ns), &pod(None)));
        let ns = labels(&[(DATAPLANE_MODE_LABEL, "KMESH")]);
        assert!(wants_kmesh(Some(&ns), &pod(None)));
        assert!(!wants_kmesh(None, &pod(None)));
        let ns = labels(&[(DATAPLANE_MODE_LABEL, "ambient")]);
        assert!(!wants_kmesh(Some(&ns), &pod(None)));
    }

    #[test]
    fn pod_label_overrides_namespace() {
        let ns = labels(&[(DATAPLANE_MODE_LABEL, "Kmesh")]);
        assert!(!wants_kmesh(Some(&ns), &pod(Some("none"))));
        assert!(!wants_kmesh(Some(&ns), &pod(Some("NONE"))));
        assert!(wants_kmesh(None, &pod(Some("Kmesh"))));
    }

    #[test]
    fn sidecars_host_network_and_non_running_pods_are_skipped() {
        let ns = labels(&[(DATAPLANE_MODE_LABEL, "Kmesh")]);
        let mut p = pod(None);
        p.metadata.annotations = Some(labels(&[("sidecar.istio.io/status", "{}")]));
        assert!(!wants_kmesh(Some(&ns), &p));
        let mut p = pod(None);
        p.spec.as_mut().unwrap().containers.push(Container {
            name: "istio-proxy".into(),
            ..Default::default()
        });
        assert!(!wants_kmesh(Some(&ns), &p));
        let mut p = pod(None);
        p.spec.as_mut().unwrap().host_network = Some(true);
        assert!(!wants_kmesh(Some(&ns), &p));
        let mut p = pod(None);
        p.status.as_mut().unwrap().phase = Some("Pending".into());
        assert!(!wants_kmesh(Some(&ns), &p));
    }
}
