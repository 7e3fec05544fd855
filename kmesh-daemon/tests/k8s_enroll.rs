//! The Kubernetes enrollment watch logic against a fake API server: list +
//! watch of pods (field-selected to this node) and namespaces over HTTP, as
//! kube's watcher speaks it; pod identities for telemetry from the same watch. No real API server can run here; the netns
//! side is tested for real in bpf-tests.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    body::Body,
    extract::{Query, State},
    response::IntoResponse,
    routing::get,
    Router,
};
use futures::StreamExt;
use kmesh_daemon::{
    enroll::kubernetes::{run, EnrollSink, NetnsResolver},
    telemetry::{pods::workload_of, workload::Workload},
};
use serde_json::{json, Value};
use tokio::sync::broadcast;

/// The fake API server's state: objects by kind, a resourceVersion counter
/// and a feed of watch events.
#[derive(Clone)]
struct Fake {
    objects: Arc<Mutex<BTreeMap<(String, String), Value>>>,
    rv: Arc<Mutex<u64>>,
    events: broadcast::Sender<(String, Value)>,
}

impl Fake {
    fn new() -> Self {
        Fake {
            objects: Arc::default(),
            rv: Arc::new(Mutex::new(1)),
            events: broadcast::channel(256).0,
        }
    }

    /// Adds, replaces (`ADDED`/`MODIFIED`) or deletes an object and tells watchers.
    fn put(&self, kind: &str, mut obj: Value, delete: bool) {
        let name = obj["metadata"]["name"].as_str().unwrap().to_string();
        let rv = {
            let mut rv = self.rv.lock().unwrap();
            *rv += 1;
            *rv
        };
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let key = (kind.to_string(), name);
        let mut objs = self.objects.lock().unwrap();
        let ty = if delete {
            objs.remove(&key);
            "DELETED"
        } else if objs.insert(key, obj.clone()).is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let _ = self
            .events
            .send((kind.to_string(), json!({"type": ty, "object": obj})));
    }

    fn list(&self, kind: &str, node: Option<&str>) -> Value {
        let objs = self.objects.lock().unwrap();
        let items: Vec<Value> = objs
            .iter()
            .filter(|((k, _), o)| k == kind && node.is_none_or(|n| o["spec"]["nodeName"] == n))
            .map(|(_, o)| o.clone())
            .collect();
        let list_kind = if kind == "pods" {
            "PodList"
        } else {
            "NamespaceList"
        };
        json!({"kind": list_kind, "apiVersion": "v1", "metadata": {"resourceVersion": self.rv.lock().unwrap().to_string()}, "items": items})
    }
}

async fn serve_kind(
    kind: &'static str,
    fake: Fake,
    q: BTreeMap<String, String>,
) -> axum::response::Response {
    let node = q
        .get("fieldSelector")
        .and_then(|f| f.strip_prefix("spec.nodeName="))
        .map(str::to_string);
    if q.get("watch").is_some_and(|w| w == "true" || w == "1") {
        let rx = fake.events.subscribe();
        let stream = tokio_stream_from(rx).filter_map(move |(k, ev)| {
            let keep = k == kind
                && node
                    .as_deref()
                    .is_none_or(|n| ev["object"]["spec"]["nodeName"] == n);
            async move { keep.then(|| Ok::<_, std::io::Error>(format!("{ev}\n"))) }
        });
        return axum::response::Response::builder()
            .header("content-type", "application/json")
            .body(Body::from_stream(stream))
            .unwrap();
    }
    axum::Json(fake.list(kind, node.as_deref())).into_response()
}

fn tokio_stream_from(
    rx: broadcast::Receiver<(String, Value)>,
) -> impl futures::Stream<Item = (String, Value)> {
    futures::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(v) => return Some((v, rx)),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => return None,
            }
        }
    })
}

/// Records every set written and the latest pod identities (by address);
/// resolves pod UIDs `uN` to cookie N.
#[derive(Clone, Default)]
struct Recorder(
    Arc<Mutex<Vec<BTreeSet<u64>>>>,
    Arc<Mutex<BTreeMap<std::net::IpAddr, Workload>>>,
);

impl EnrollSink for Recorder {
    fn set_enrolled(&mut self, cookies: &BTreeSet<u64>) -> Result<(), String> {
        self.0.lock().unwrap().push(cookies.clone());
        Ok(())
    }
    fn set_pods(&mut self, pods: &[Arc<k8s_openapi::api::core::v1::Pod>]) {
        let mut ids = self.1.lock().unwrap();
        ids.clear();
        for p in pods {
            if let Some((ips, w)) = workload_of(p, "mesh.example") {
                for ip in ips {
                    ids.insert(ip, w.clone());
                }
            }
        }
    }
}

struct ByUid;

impl NetnsResolver for ByUid {
    fn cookie(&mut self, uid: &str) -> Option<u64> {
        uid.strip_prefix('u')?.parse().ok()
    }
    fn retain(&mut self, _: &BTreeSet<String>) {}
}

fn ns(name: &str, mode: Option<&str>) -> Value {
    let mut v = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "uid": format!("ns-{name}")}});
    if let Some(m) = mode {
        v["metadata"]["labels"] = json!({"istio.io/dataplane-mode": m});
    }
    v
}

fn pod(name: &str, uid: u64, ns: &str, node: &str, extra: impl FnOnce(&mut Value)) -> Value {
    let mut v = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": format!("u{uid}")},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "app"}]},
        "status": {"phase": "Running"}
    });
    extra(&mut v);
    v
}

fn set(v: &[u64]) -> BTreeSet<u64> {
    v.iter().copied().collect()
}

async fn wait_for(rec: &Recorder, want: BTreeSet<u64>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if rec.0.lock().unwrap().last() == Some(&want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "enrolled set never became {want:?}; writes: {:?}",
            rec.0.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_follows_labels_pods_and_namespaces() {
    let fake = Fake::new();
    fake.put("namespaces", ns("apps", Some("Kmesh")), false);
    fake.put("namespaces", ns("other", None), false);
    fake.put("pods", pod("p1", 1, "apps", "node1", |_| {}), false);
    fake.put("pods", pod("p2", 2, "apps", "node2", |_| {}), false); // another node
    fake.put("pods", pod("p3", 3, "other", "node1", |_| {}), false);

    let app = Router::new()
        .route(
            "/api/v1/pods",
            get(|State(f): State<Fake>, Query(q)| serve_kind("pods", f, q)),
        )
        .route(
            "/api/v1/namespaces",
            get(|State(f): State<Fake>, Query(q)| serve_kind("namespaces", f, q)),
        )
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let client = kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
    let rec = Recorder::default();
    // Cookie 900 stands for a namespace enrolled by flag: always kept.
    let task = tokio::spawn(run(
        client,
        "node1",
        rec.clone(),
        ByUid,
        set(&[900]),
        Duration::from_secs(1),
    ));

    // Initial reconcile: p1 (labelled namespace); p2 is on another node, p3's namespace is not labelled.
    wait_for(&rec, set(&[1, 900])).await;
    // A pod label enrolls a pod in an unlabelled namespace, without restart.
    fake.put(
        "pods",
        pod("p3", 3, "other", "node1", |p| {
            p["metadata"]["labels"] = json!({"istio.io/dataplane-mode": "kmesh"})
        }),
        false,
    );
    wait_for(&rec, set(&[1, 3, 900])).await;
    // `none` on the pod opts out of a labelled namespace.
    fake.put(
        "pods",
        pod("p1", 1, "apps", "node1", |p| {
            p["metadata"]["labels"] = json!({"istio.io/dataplane-mode": "none"})
        }),
        false,
    );
    wait_for(&rec, set(&[3, 900])).await;
    // Host-network and sidecar pods are skipped; a plain new pod is enrolled.
    fake.put(
        "pods",
        pod("hn", 4, "apps", "node1", |p| {
            p["spec"]["hostNetwork"] = json!(true)
        }),
        false,
    );
    fake.put(
        "pods",
        pod("sc", 5, "apps", "node1", |p| {
            p["metadata"]["annotations"] = json!({"sidecar.istio.io/status": "{}"})
        }),
        false,
    );
    fake.put("pods", pod("p6", 6, "apps", "node1", |_| {}), false);
    wait_for(&rec, set(&[3, 6, 900])).await;
    // Pod identities follow the watch: a Deployment's pod with labels and
    // a service account, by address.
    fake.put(
        "pods",
        pod("web-7f9c4d-abcde", 7, "apps", "node1", |p| {
            p["metadata"]["labels"] = json!({"app": "web", "version": "v3", "pod-template-hash": "7f9c4d"});
            p["metadata"]["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                "name": "web-7f9c4d", "uid": "rs", "controller": true}]);
            p["spec"]["serviceAccountName"] = json!("web-sa");
            p["status"]["podIP"] = json!("10.244.0.7");
        }),
        false,
    );
    let ip: std::net::IpAddr = "10.244.0.7".parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !rec.1.lock().unwrap().contains_key(&ip) {
        assert!(
            Instant::now() < deadline,
            "no identity for {ip}: {:?}",
            rec.1
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let w = rec.1.lock().unwrap()[&ip].clone();
    assert_eq!((w.namespace.as_str(), w.name.as_str()), ("apps", "web"));
    assert_eq!(
        (w.canonical_service.as_str(), w.canonical_revision.as_str()),
        ("web", "v3")
    );
    assert_eq!(
        w.principal.as_deref(),
        Some("spiffe://mesh.example/ns/apps/sa/web-sa")
    );
    wait_for(&rec, set(&[3, 6, 7, 900])).await;
    fake.put(
        "pods",
        pod("web-7f9c4d-abcde", 7, "apps", "node1", |_| {}),
        true,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while rec.1.lock().unwrap().contains_key(&ip) {
        assert!(Instant::now() < deadline, "identity of a deleted pod kept");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_for(&rec, set(&[3, 6, 900])).await;
    // Removing the namespace label takes its pods out.
    fake.put("namespaces", ns("apps", None), false);
    wait_for(&rec, set(&[3, 900])).await;
    // A deleted pod goes away.
    fake.put("pods", pod("p3", 3, "other", "node1", |_| {}), true);
    wait_for(&rec, set(&[900])).await;
    // Every write was a real change (no redundant writes).
    let writes = rec.0.lock().unwrap().clone();
    assert!(writes.windows(2).all(|w| w[0] != w[1]), "{writes:?}");
    task.abort();
}
