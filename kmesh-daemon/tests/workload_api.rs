//! The workload API client (dual-engine) against the in-process control
//! plane: initial sync, update, removal, NACK of a bad resource naming it
//! while the others apply, and a reconnect that resends only differences.
//! The sink records what would be written to the kernel (the kernel path
//! is covered in bpf-tests/tests/workload_xds.rs).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kmesh_daemon::xds::fixture::{workload_api as wa, AdsFixture, Kind};
use kmesh_daemon::xds::workload::{self, WorkloadSink};
use kmesh_daemon::xds::{ClientOptions, NodeIdentity, XdsStatus};
use xds_adapter::workload::api::{ADDRESS_TYPE, AUTHORIZATION_TYPE};
use xds_adapter::workload::{DualEngineConfig, LocalNode};

const T: Duration = Duration::from_secs(10);

#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<DualEngineConfig>>>);

impl WorkloadSink for Recorder {
    fn apply(&mut self, c: &DualEngineConfig) -> Result<(), String> {
        self.0.lock().unwrap().push(c.clone());
        Ok(())
    }
}

impl Recorder {
    fn count(&self) -> usize {
        self.0.lock().unwrap().len()
    }
    /// Waits until the last applied config satisfies `pred`.
    async fn wait(&self, what: &str, pred: impl Fn(&DualEngineConfig) -> bool) -> DualEngineConfig {
        let deadline = tokio::time::Instant::now() + T;
        loop {
            if let Some(c) = self.0.lock().unwrap().last().cloned() {
                if pred(&c) {
                    return c;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}; last applied: {:?}",
                self.0.lock().unwrap().last().map(|c| &c.config)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn ip(s: &str) -> std::net::IpAddr {
    s.parse().unwrap()
}

fn slots(c: &DualEngineConfig, vip: &str) -> Vec<SocketAddr> {
    c.flat
        .services
        .get(&vip.parse().unwrap())
        .map(|s| s.slots.clone())
        .unwrap_or_default()
}

fn start(f: &AdsFixture) -> (Recorder, Arc<Mutex<XdsStatus>>, tokio::task::JoinHandle<()>) {
    let mut opts = ClientOptions::new(
        f.uri(),
        NodeIdentity {
            ip: "10.244.0.5".into(),
            pod: "kmesh-test".into(),
            namespace: "kmesh-system".into(),
            cluster_id: "Kubernetes".into(),
            istio_version: "1.26.0".into(),
            extra: Default::default(),
        },
    );
    opts.delta = true;
    opts.backoff_initial = Duration::from_millis(50);
    let rec = Recorder::default();
    let status = Arc::new(Mutex::new(XdsStatus::default()));
    let task = tokio::spawn(workload::run(
        opts,
        LocalNode {
            node: "node-a".into(),
            ..Default::default()
        },
        rec.clone(),
        status.clone(),
    ));
    (rec, status, task)
}

/// web (10.96.0.10:80 → 8080) with two pods, and a DENY policy.
fn serve(f: &AdsFixture) {
    let web = wa::service("default", "web", ip("10.96.0.10"), &[(80, 8080)]);
    let key = wa::service_key(&web);
    let mut addrs = vec![(key.clone(), wa::service_any(&web))];
    for (n, a) in [("web-0", "10.244.0.10"), ("web-1", "10.244.0.11")] {
        let w = wa::workload("default", n, "web", ip(a), &[(&key, 80, 8080)]);
        addrs.push((wa::uid("default", n), wa::workload_any(&w)));
    }
    f.set(ADDRESS_TYPE, addrs);
    let p = wa::deny_principals("default", "no-evil", &["cluster.local/ns/evil/sa/x"]);
    f.set(
        AUTHORIZATION_TYPE,
        vec![("default/no-evil".into(), wa::policy_any(&p))],
    );
}

#[tokio::test]
async fn initial_sync_update_removal_and_nack() {
    let f = AdsFixture::start().await.unwrap();
    serve(&f);
    let (rec, status, task) = start(&f);

    // Initial sync: both pods behind the VIP, the policy held; both types
    // subscribed as an ambient node proxy and ACKed.
    let c = rec
        .wait("initial sync", |c| {
            slots(c, "10.96.0.10:80").len() == 2 && c.config.policies.len() == 1
        })
        .await;
    assert_eq!(
        slots(&c, "10.96.0.10:80"),
        vec![
            "10.244.0.10:8080".parse().unwrap(),
            "10.244.0.11:8080".parse().unwrap()
        ]
    );
    assert_eq!(c.authz.policy_names, vec!["default/no-evil".to_string()]);
    for t in [ADDRESS_TYPE, AUTHORIZATION_TYPE] {
        f.wait_for(0, T, |e| e.type_url == t && e.kind == Kind::Ack)
            .await
            .unwrap();
    }
    let first = f
        .wait_for(0, T, |e| e.kind == Kind::Request && e.node_id.is_some())
        .await
        .unwrap();
    assert!(
        first
            .node_id
            .as_deref()
            .unwrap()
            .starts_with("ztunnel~10.244.0.5~"),
        "{first:?}"
    );

    // Update: web-1 moves to another address.
    let from = f.events().len();
    let key = "default/web.default.svc.cluster.local";
    let moved = wa::workload(
        "default",
        "web-1",
        "web",
        ip("10.244.0.12"),
        &[(key, 80, 8080)],
    );
    f.upsert(
        ADDRESS_TYPE,
        &wa::uid("default", "web-1"),
        wa::workload_any(&moved),
    );
    rec.wait("update", |c| {
        slots(c, "10.96.0.10:80").contains(&"10.244.0.12:8080".parse().unwrap())
    })
    .await;
    f.wait_for(from, T, |e| {
        e.type_url == ADDRESS_TYPE && e.kind == Kind::Ack
    })
    .await
    .unwrap();

    // Removal: web-0 goes; the policy goes.
    f.remove(ADDRESS_TYPE, &wa::uid("default", "web-0"));
    f.remove(AUTHORIZATION_TYPE, "default/no-evil");
    let c = rec
        .wait("removal", |c| {
            slots(c, "10.96.0.10:80").len() == 1 && c.config.policies.is_empty()
        })
        .await;
    assert_eq!(c.config.workloads.len(), 1);
    assert!(c.authz.policy_names.is_empty());

    // NACK: a bad workload (3-byte address) next to a good one; the good
    // one applies, the NACK names the bad one and the field.
    let from = f.events().len();
    let mut bad = wa::workload(
        "default",
        "bad",
        "web",
        ip("10.244.0.13"),
        &[(key, 80, 8080)],
    );
    bad.addresses = vec![vec![10, 244, 0]];
    let good = wa::workload(
        "default",
        "web-2",
        "web",
        ip("10.244.0.14"),
        &[(key, 80, 8080)],
    );
    f.upsert(
        ADDRESS_TYPE,
        &wa::uid("default", "bad"),
        wa::workload_any(&bad),
    );
    f.upsert(
        ADDRESS_TYPE,
        &wa::uid("default", "web-2"),
        wa::workload_any(&good),
    );
    let nack = f
        .wait_for(from, T, |e| {
            e.type_url == ADDRESS_TYPE && e.kind == Kind::Nack
        })
        .await
        .unwrap();
    let msg = nack.error.unwrap();
    assert!(msg.contains("Kubernetes//Pod/default/bad"), "{msg}");
    assert!(
        msg.contains("workload \"default/bad\": field addresses[0]"),
        "{msg}"
    );
    rec.wait("the good resource of a NACKed response", |c| {
        slots(c, "10.96.0.10:80").contains(&"10.244.0.14:8080".parse().unwrap())
    })
    .await;
    {
        let s = status.lock().unwrap();
        assert_eq!(s.rejected["WDS"][0].name, "Kubernetes//Pod/default/bad");
        assert!(s.last_nack["WDS"].contains("field addresses[0]"));
        assert_eq!(s.resources["WDS"].len(), 3, "{:?}", s.resources);
    }

    // A bad policy: NACKed, nothing else changes.
    let applies = rec.count();
    let mut p = wa::deny_principals("default", "dry", &["x"]);
    p.dry_run = true;
    let from = f.events().len();
    f.upsert(AUTHORIZATION_TYPE, "default/dry", wa::policy_any(&p));
    let nack = f
        .wait_for(from, T, |e| {
            e.type_url == AUTHORIZATION_TYPE && e.kind == Kind::Nack
        })
        .await
        .unwrap();
    assert!(
        nack.error
            .unwrap()
            .contains("policy \"default/dry\": field dry_run"),
        "NACK must name the policy and field"
    );
    assert_eq!(
        rec.count(),
        applies,
        "a rejected-only response writes nothing"
    );
    task.abort();
}

#[tokio::test]
async fn reconnect_sends_held_versions_and_an_empty_mesh_is_a_config() {
    let f = AdsFixture::start().await.unwrap();
    let (rec, _status, task) = start(&f);
    // Nothing served: the first (empty) responses are still written.
    rec.wait("empty initial config", |c| c.flat.services.is_empty())
        .await;
    serve(&f);
    rec.wait("sync", |c| slots(c, "10.96.0.10:80").len() == 2)
        .await;
    // The control plane restarts with the same config: the client
    // reconnects announcing what it holds, and nothing is rewritten.
    let addr = f.addr;
    let snap = f.snapshot();
    let applies = rec.count();
    drop(f);
    let f = AdsFixture::start_on(addr, snap).await.unwrap();
    let ev = f
        .wait_for(0, T, |e| {
            e.type_url == ADDRESS_TYPE && e.kind == Kind::Request
        })
        .await
        .unwrap();
    assert_eq!(ev.initial_versions.len(), 3, "{ev:?}");
    f.wait_for(0, T, |e| {
        e.type_url == AUTHORIZATION_TYPE && e.kind == Kind::Ack
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(rec.count(), applies, "an unchanged set is not rewritten");
    task.abort();
}
