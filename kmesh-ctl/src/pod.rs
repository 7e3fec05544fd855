//! Reaching the kmesh daemon of a Kubernetes node through the API server.
//!
//! A pod argument names either a kmesh pod itself or any pod: then the
//! kmesh pod on that pod's node is meant. `--node` names the node directly.
//! The admin API listens on the node's 127.0.0.1:15200 (the kmesh pod uses
//! the host network), so a port-forward to that pod's port 15200 reaches it.
//! One port-forward (one WebSocket through the API server) per admin request.
//!
//! Needs RBAC: `get`/`list` on `pods` and `create` on `pods/portforward`.

use k8s_openapi::api::core::v1::Pod;
use kube::{api::ListParams, Api, Client, Config};

use crate::CtlError;

/// Where the kmesh pods run and how they are labelled (the shipped DaemonSet).
pub struct KmeshPods {
    pub namespace: String,
    pub selector: String,
}

/// Which daemon: a pod (`[NAMESPACE/]NAME`) or a node.
pub enum Which<'a> {
    Pod(&'a str),
    Node(&'a str),
}

/// A resolved kmesh pod.
pub struct KmeshPod {
    pub namespace: String,
    pub name: String,
    client: Client,
}

/// The admin API's port in the kmesh pod.
pub const ADMIN_PORT: u16 = 15200;

/// Kubeconfig from KUBECONFIG, ~/.kube/config or the in-cluster service account.
async fn client() -> Result<Client, CtlError> {
    let config = Config::infer().await.map_err(|e| {
        CtlError::Kubernetes(format!(
            "no usable Kubernetes config ({e}); set KUBECONFIG or create ~/.kube/config, or talk to a daemon directly with --admin-addr"
        ))
    })?;
    Client::try_from(config)
        .map_err(|e| CtlError::Kubernetes(format!("Kubernetes client from the kubeconfig: {e}")))
}

/// An API error as an exit-coded failure that says what to try.
fn api_error(what: &str, e: kube::Error) -> CtlError {
    match &e {
        kube::Error::Api(s) if s.code == 404 => CtlError::NotFound(format!("{what}: not found")),
        kube::Error::Api(s) if s.code == 403 => CtlError::Kubernetes(format!(
            "{what}: forbidden by RBAC ({}); kmeshctl needs get/list on pods and create on pods/portforward",
            s.message
        )),
        kube::Error::Api(s) if s.code == 401 => CtlError::Kubernetes(format!(
            "{what}: not authenticated ({}); refresh the kubeconfig's credentials",
            s.message
        )),
        _ => CtlError::Kubernetes(format!(
            "{what}: {e} (is the API server of the current kubeconfig context reachable?)"
        )),
    }
}

fn running(p: &Pod) -> bool {
    p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
}

fn has_labels(p: &Pod, selector: &str) -> bool {
    let labels = p.metadata.labels.clone().unwrap_or_default();
    selector.split(',').all(|kv| match kv.split_once('=') {
        Some((k, v)) => labels.get(k.trim()).map(String::as_str) == Some(v.trim()),
        None => labels.contains_key(kv.trim()),
    })
}

impl KmeshPods {
    /// The running kmesh pod for `which`.
    pub async fn resolve(&self, which: Which<'_>) -> Result<KmeshPod, CtlError> {
        let client = client().await?;
        let node = match which {
            Which::Node(n) => n.to_string(),
            Which::Pod(arg) => {
                let (ns, name) = arg.split_once('/').unwrap_or((&self.namespace, arg));
                let api: Api<Pod> = Api::namespaced(client.clone(), ns);
                let pod = api.get(name).await.map_err(|e| match api_error(&format!("pod {ns}/{name}"), e) {
                    CtlError::NotFound(m) => CtlError::NotFound(format!(
                        "{m}; list kmesh pods with `kubectl -n {} get pods -l {} -o wide`, or name any pod as NAMESPACE/NAME to reach the kmesh pod of its node",
                        self.namespace, self.selector
                    )),
                    other => other,
                })?;
                if ns == self.namespace && has_labels(&pod, &self.selector) {
                    return self.ready(client, pod);
                }
                pod.spec
                    .as_ref()
                    .and_then(|s| s.node_name.clone())
                    .ok_or_else(|| {
                        CtlError::NotFound(format!(
                            "pod {ns}/{name} is not scheduled on a node yet, so it has no kmesh pod"
                        ))
                    })?
            }
        };
        let api: Api<Pod> = Api::namespaced(client.clone(), &self.namespace);
        let lp = ListParams::default()
            .labels(&self.selector)
            .fields(&format!("spec.nodeName={node}"));
        let pods = api
            .list(&lp)
            .await
            .map_err(|e| api_error(&format!("kmesh pods in namespace {}", self.namespace), e))?;
        // Prefer a running one (a rolling update briefly has two).
        let mut items = pods.items;
        items.sort_by_key(|p| !running(p));
        match items.into_iter().next() {
            Some(p) => self.ready(client, p),
            None => Err(CtlError::NotFound(format!(
                "no kmesh pod (namespace {}, labels {}) on node {node}; is the kmesh DaemonSet scheduled there? (`kubectl -n {} get pods -l {} -o wide`)",
                self.namespace, self.selector, self.namespace, self.selector
            ))),
        }
    }

    fn ready(&self, client: Client, p: Pod) -> Result<KmeshPod, CtlError> {
        let namespace = p.metadata.namespace.clone().unwrap_or_default();
        let name = p.metadata.name.clone().unwrap_or_default();
        if !running(&p) {
            let phase = p
                .status
                .as_ref()
                .and_then(|s| s.phase.clone())
                .unwrap_or_else(|| "Unknown".into());
            return Err(CtlError::NotFound(format!(
                "kmesh pod {namespace}/{name} is not running (phase {phase}); see `kubectl -n {namespace} describe pod {name}`"
            )));
        }
        Ok(KmeshPod {
            namespace,
            name,
            client,
        })
    }
}

impl KmeshPod {
    /// A byte stream to the admin API of this pod's daemon.
    pub async fn connect(&self) -> Result<tokio::io::DuplexStream, CtlError> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let what = format!(
            "port-forward to {}/{}:{ADMIN_PORT}",
            self.namespace, self.name
        );
        let mut pf = api
            .portforward(&self.name, &[ADMIN_PORT])
            .await
            .map_err(|e| api_error(&what, e))?;
        let stream = pf
            .take_stream(ADMIN_PORT)
            .ok_or_else(|| CtlError::Unreachable(anyhow::anyhow!("{what}: no stream")))?;
        // The forwarder runs in its own task and ends with the stream; an
        // error it reports (e.g. nothing listening on the port) is printed.
        if let Some(err) = pf.take_error(ADMIN_PORT) {
            let what = what.clone();
            tokio::spawn(async move {
                if let Some(e) = err.await {
                    eprintln!("kmeshctl: {what}: {e}");
                }
            });
        }
        Ok(stream)
    }

    pub fn describe(&self) -> String {
        format!("pod {}/{}", self.namespace, self.name)
    }
}
