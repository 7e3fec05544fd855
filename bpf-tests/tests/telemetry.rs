//! Kernel tests of connection telemetry: the sockops program's events turned
//! into Istio metrics and access log lines for real connections, state
//! cleaned up under churn, ring-buffer drops counted (needs root).

mod common;

use std::{
    io::Write,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::{bootstrap, compile, mesh, mesh_with, ClusterSpec, ListenerSpec, Mesh};
use kmesh_daemon::{
    dataplane::DataplaneOptions,
    telemetry::{accesslog::Format, metrics::ISTIO_LABELS, Telemetry, TelemetryOptions},
};

const VIP: &str = "10.96.0.10:80";

/// An access log sink the test can read.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl Write for Lines {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Lines {
    fn lines(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .map(str::to_string)
            .collect()
    }
}

fn web_config(m: &Mesh) -> xds_adapter::FlatConfig {
    compile(&bootstrap(
        &[ListenerSpec {
            name: "web",
            vip: VIP.parse().unwrap(),
            clusters: vec![("outbound|80||web.shop.svc.cluster.local", 1)],
        }],
        &[ClusterSpec {
            name: "outbound|80||web.shop.svc.cluster.local",
            lb: "ROUND_ROBIN",
            endpoints: m.servers.iter().map(|p| (p.addr4(8080), 1)).collect(),
        }],
    ))
}

fn label<'a>(labels: &'a [String; 23], name: &str) -> &'a str {
    let i = ISTIO_LABELS.iter().position(|l| *l == name).unwrap();
    &labels[i]
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// Waits until `f` holds, failing with `what` after 10 s.
fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn entries(t: &Telemetry, map: &str) -> u64 {
    t.map_usage()
        .into_iter()
        .find(|m| m.name == map)
        .and_then(|m| m.entries)
        .unwrap_or_else(|| panic!("{map} listed with an entry count"))
}

fn conn_entries(t: &Telemetry) -> u64 {
    entries(t, "KM_CONN")
}

#[test]
fn metrics_and_access_log_match_real_connections_both_sides() {
    let mut m = mesh(2, &[]);
    // Enroll the servers too: each connection is then seen twice, once
    // outbound by the client and once inbound by the server.
    for s in &m.servers {
        let cookie = kmesh_daemon::netns::cookie_of(&s.netns_path).unwrap();
        m.dp.enroll(cookie).unwrap();
    }
    let rt = runtime();
    let lines = Lines::default();
    let t = rt
        .block_on(async {
            Telemetry::start(
                &mut m.dp,
                TelemetryOptions {
                    accesslog: true,
                    accesslog_format: Format::Text,
                    monitoring: true,
                    sink: Some(Box::new(lines.clone())),
                    ..Default::default()
                },
            )
        })
        .unwrap();
    let cfg = web_config(&m);
    m.dp.apply(&cfg).unwrap();
    t.set_config(&cfg);
    // Name the pods: their addresses are read from their namespaces.
    let spec = format!("{}=shop/client", m.client.netns_path.display());
    let ips = t.register_workload(&spec.parse().unwrap()).unwrap();
    assert!(
        ips.contains(&m.client.ip4.into()) && ips.contains(&m.client.ip6.into()),
        "{ips:?}"
    );
    for (i, s) in m.servers.iter().enumerate() {
        let spec = format!("{}=shop/web-v{}", s.netns_path.display(), i + 1);
        t.register_workload(&spec.parse().unwrap()).unwrap();
    }

    let r = m
        .node
        .talk(&m.client, VIP.parse().unwrap(), 20, 1000)
        .unwrap();
    assert_eq!(r.errors, 0, "{r:?}");
    assert_eq!(r.sent, 20_000);
    // "srvN\n" + the echo on every connection.
    assert_eq!(r.received, 20 * 1005);

    wait_for("40 closed connections in the metrics", || {
        t.tcp_series().iter().map(|(_, c)| c.closed).sum::<u64>() == 40
    });
    let series = t.tcp_series();
    let side = |reporter: &str| {
        series
            .iter()
            .filter(|(l, _)| label(l, "reporter") == reporter)
            .collect::<Vec<_>>()
    };
    // One label set per (side, destination workload).
    for reporter in ["source", "destination"] {
        let sets = side(reporter);
        assert_eq!(sets.len(), 2, "one set per backend workload: {series:#?}");
        let mut dst_workloads: Vec<&str> = sets
            .iter()
            .map(|(l, _)| label(l, "destination_workload"))
            .collect();
        dst_workloads.sort();
        assert_eq!(dst_workloads, ["web-v1", "web-v2"], "{series:#?}");
        let (mut opened, mut closed, mut sent, mut received) = (0, 0, 0, 0);
        for (l, c) in &sets {
            assert_eq!(
                label(l, "destination_service"),
                "web.shop.svc.cluster.local"
            );
            assert_eq!(label(l, "destination_service_name"), "web");
            assert_eq!(label(l, "destination_service_namespace"), "shop");
            assert_eq!(label(l, "source_workload"), "client");
            assert_eq!(label(l, "source_workload_namespace"), "shop");
            assert_eq!(label(l, "destination_workload_namespace"), "shop");
            assert_eq!(label(l, "request_protocol"), "tcp");
            let policy = if reporter == "source" {
                "unknown"
            } else {
                "none"
            };
            assert_eq!(label(l, "connection_security_policy"), policy);
            opened += c.opened;
            closed += c.closed;
            sent += c.sent_bytes;
            received += c.received_bytes;
        }
        assert_eq!((opened, closed), (20, 20), "{reporter}");
        if reporter == "source" {
            assert_eq!((sent, received), (r.sent, r.received), "client bytes");
        } else {
            assert_eq!((sent, received), (r.received, r.sent), "server bytes");
        }
    }

    let log = lines.lines();
    let out: Vec<&String> = log
        .iter()
        .filter(|l| l.contains("direction=OUTBOUND"))
        .collect();
    let inb: Vec<&String> = log
        .iter()
        .filter(|l| l.contains("direction=INBOUND"))
        .collect();
    assert_eq!((out.len(), inb.len()), (20, 20), "{log:#?}");
    let client = m.client.ip4.to_string();
    for l in &out {
        assert!(l.starts_with("accesslog: "), "{l}");
        assert!(l.contains(&format!("src.addr={client}:")), "{l}");
        assert!(
            l.contains("src.workload=client, src.namespace=shop,"),
            "{l}"
        );
        assert!(
            l.contains("dst.workload=web-v1, ") || l.contains("dst.workload=web-v2, "),
            "{l}"
        );
        assert!(l.contains("dst.service=web.shop.svc.cluster.local,"), "{l}");
        assert!(l.contains("dst.namespace=shop,"), "{l}");
        assert!(
            l.contains("sent_bytes=1000, received_bytes=1005, duration="),
            "{l}"
        );
        let dst_ok = m
            .servers
            .iter()
            .any(|s| l.contains(&format!("dst.addr={}, ", s.addr4(8080))));
        assert!(dst_ok, "dst.addr must be the backend reached: {l}");
    }
    for l in &inb {
        assert!(l.contains("sent_bytes=1005, received_bytes=1000"), "{l}");
        assert!(l.contains(&format!("src.addr={client}:")), "{l}");
    }

    // Nothing left behind in the kernel, and the kernel counted the same.
    wait_for("KM_CONN empty", || conn_entries(&t) == 0);
    let k = t.kernel_counters().unwrap();
    assert_eq!(
        (k.conn_opened, k.conn_closed, k.events_dropped),
        (40, 40, 0)
    );

    // Switched off at runtime: no more lines.
    t.set_accesslog(false);
    let before = lines.lines().len();
    m.node.talk(&m.client, VIP.parse().unwrap(), 3, 10).unwrap();
    wait_for("46 closes", || {
        t.tcp_series().iter().map(|(_, c)| c.closed).sum::<u64>() == 46
    });
    assert_eq!(lines.lines().len(), before);

    // Monitoring off: the kernel tracks nothing.
    t.set_monitoring(false).unwrap();
    m.node.talk(&m.client, VIP.parse().unwrap(), 3, 10).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(t.kernel_counters().unwrap().conn_opened, 46);
    drop(rt);
}

#[test]
fn json_access_log_and_state_cleaned_up_under_churn() {
    let mut m = mesh(2, &[]);
    let rt = runtime();
    let lines = Lines::default();
    let t = rt
        .block_on(async {
            Telemetry::start(
                &mut m.dp,
                TelemetryOptions {
                    accesslog: true,
                    accesslog_format: Format::Json,
                    monitoring: true,
                    sink: Some(Box::new(lines.clone())),
                    ..Default::default()
                },
            )
        })
        .unwrap();
    let cfg = web_config(&m);
    m.dp.apply(&cfg).unwrap();
    t.set_config(&cfg);

    // Churn: many short connections, some of them held open meanwhile.
    let held = m.node.hold(&m.client, VIP.parse().unwrap(), 10).unwrap();
    let r = m
        .node
        .connect(&m.client, VIP.parse().unwrap(), 500)
        .unwrap();
    // On a loaded machine a client may time out (3 s) reading a backend's
    // name; such a connection was still established and closed, and is
    // accounted like the others.
    assert!(r.errors <= 5, "{r:?}");
    let opened = t.kernel_counters().unwrap().conn_opened;
    assert!(opened >= 510 - r.errors as u64, "{opened} opened: {r:?}");
    wait_for("every short connection closed", || {
        t.kernel_counters().unwrap().conn_closed == opened - 10
    });
    assert_eq!(conn_entries(&t), 10, "only the held connections keep state");
    assert_eq!(entries(&t, "KM_ORIGDST"), 10, "closed sockets' VIPs freed");
    drop(held);
    wait_for("KM_CONN empty after the held connections close", || {
        conn_entries(&t) == 0
    });
    assert_eq!(entries(&t, "KM_ORIGDST"), 0);
    wait_for("one log line per connection", || {
        lines.lines().len() as u64 == opened
    });
    let entries: Vec<serde_json::Value> = lines
        .lines()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(entries.iter().all(|e| e["direction"] == "OUTBOUND"
        && e["dst.service"] == "web.shop.svc.cluster.local"
        && e["sent_bytes"].is_u64()));
    // A `connect` client reads the backend's name ("srvN\n") and sends nothing.
    let name_only = entries
        .iter()
        .filter(|e| e["received_bytes"] == 5 && e["sent_bytes"] == 0)
        .count();
    assert!(
        name_only >= 500 - r.errors,
        "{name_only} of {}",
        entries.len()
    );
    drop(rt);
}

#[test]
fn full_ring_buffer_drops_are_counted() {
    // One page: records of 120 bytes + 8 bytes of header; the kernel keeps
    // the ring from filling completely (producer - consumer must stay below
    // its size), so 31 fit.
    let mut m = mesh_with(
        1,
        &[],
        &DataplaneOptions {
            event_ring_bytes: Some(4096),
            ..Default::default()
        },
    );
    // A runtime that is not driven after start: the reader never runs and
    // the ring buffer fills up.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let t = rt
        .block_on(async { Telemetry::start(&mut m.dp, TelemetryOptions::default()) })
        .unwrap();
    let cfg = compile(&bootstrap(
        &[ListenerSpec {
            name: "web",
            vip: VIP.parse().unwrap(),
            clusters: vec![("web", 1)],
        }],
        &[ClusterSpec {
            name: "web",
            lb: "ROUND_ROBIN",
            endpoints: vec![(m.servers[0].addr4(8080), 1)],
        }],
    ));
    m.dp.apply(&cfg).unwrap();
    let r = m.node.connect(&m.client, VIP.parse().unwrap(), 50).unwrap();
    assert_eq!(r.errors, 0, "{r:?}");
    wait_for("50 closes", || {
        t.kernel_counters().unwrap().conn_closed == 50
    });
    let k = t.kernel_counters().unwrap();
    assert_eq!(k.events_dropped, 100 - 31, "{k:?}");
    // Now drain: exactly the 31 events that fit arrive.
    rt.block_on(async { tokio::time::sleep(Duration::from_millis(300)).await });
    assert_eq!(t.events.load(std::sync::atomic::Ordering::Relaxed), 31);
    let text = t.render(None);
    assert!(
        text.contains("kmesh_ringbuf_events_dropped_total 69\n"),
        "{text}"
    );
}

/// The sum over series of one Istio metric family in the exposition.
fn exposed(t: &Telemetry, family: &str) -> u64 {
    t.render(None)
        .lines()
        .filter(|l| l.starts_with(&format!("{family}{{")))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

#[test]
fn bytes_of_open_connections_grow_before_close_and_count_once() {
    let mut m = mesh(1, &[]);
    let rt = runtime();
    let t = rt
        .block_on(async {
            Telemetry::start(
                &mut m.dp,
                TelemetryOptions {
                    tcp_reporting_interval: Duration::from_millis(200),
                    ..Default::default()
                },
            )
        })
        .unwrap();
    let cfg = web_config(&m);
    m.dp.apply(&cfg).unwrap();
    t.set_config(&cfg);

    let mut held = m.node.hold(&m.client, VIP.parse().unwrap(), 1).unwrap();
    wait_for("the connection opened", || {
        exposed(&t, "istio_tcp_connections_opened_total") == 1
    });
    for k in 1..=3u64 {
        // "probe-0\n" out, echoed back; the greeting "srv0\n" came first.
        assert_eq!(held.check().unwrap(), 1);
        wait_for(&format!("{} bytes sent reported while open", 8 * k), || {
            exposed(&t, "istio_tcp_sent_bytes_total") == 8 * k
        });
        // Received bytes are read at the RTT sample of the ACK, before the
        // echo it carries is queued: at least what came before.
        let received = exposed(&t, "istio_tcp_received_bytes_total");
        assert!(
            (5 + 8 * (k - 1)..=5 + 8 * k).contains(&received),
            "received {received} after {k} probes"
        );
        assert_eq!(exposed(&t, "istio_tcp_connections_closed_total"), 0);
    }
    drop(held);
    wait_for("the connection closed", || {
        exposed(&t, "istio_tcp_connections_closed_total") == 1
    });
    // Reported while open + the rest at close = exactly what was transferred.
    assert_eq!(exposed(&t, "istio_tcp_sent_bytes_total"), 24);
    assert_eq!(exposed(&t, "istio_tcp_received_bytes_total"), 5 + 24);
    drop(rt);
}

/// A pod as the API server describes it: a Deployment's pod with labels,
/// a service account and an address.
fn k8s_pod(
    ns: &str,
    deployment: &str,
    sa: &str,
    ip: std::net::Ipv4Addr,
) -> k8s_openapi::api::core::v1::Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("{deployment}-6d5f8-x1"), "namespace": ns,
            "labels": {"app": deployment, "version": "v2", "pod-template-hash": "6d5f8"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                "name": format!("{deployment}-6d5f8"), "uid": "rs", "controller": true}]},
        "spec": {"serviceAccountName": sa, "containers": []},
        "status": {"podIP": ip.to_string()}
    }))
    .unwrap()
}

#[test]
fn kubernetes_identities_label_real_connections() {
    let mut m = mesh(1, &[]);
    let rt = runtime();
    let lines = Lines::default();
    let t = rt
        .block_on(async {
            Telemetry::start(
                &mut m.dp,
                TelemetryOptions {
                    accesslog: true,
                    sink: Some(Box::new(lines.clone())),
                    ..Default::default()
                },
            )
        })
        .unwrap();
    let cfg = web_config(&m);
    m.dp.apply(&cfg).unwrap();
    t.set_config(&cfg);
    // What the Kubernetes watch hands over: both pods, by address (the
    // client is found by its socket's local address, not by a netns name).
    let pods = [
        k8s_pod("shop", "client", "shopper", m.client.ip4),
        k8s_pod("shop", "web", "web-sa", m.servers[0].ip4),
    ];
    let ids: Vec<_> = pods
        .iter()
        .filter_map(|p| kmesh_daemon::telemetry::pods::workload_of(p, "cluster.local"))
        .collect();
    t.set_kubernetes_workloads(&ids);

    let r = m.node.talk(&m.client, VIP.parse().unwrap(), 2, 10).unwrap();
    assert_eq!(r.errors, 0, "{r:?}");
    wait_for("two closes", || {
        t.tcp_series().iter().map(|(_, c)| c.closed).sum::<u64>() == 2
    });
    let series = t.tcp_series();
    assert_eq!(series.len(), 1);
    let l = &series[0].0;
    for (name, want) in [
        ("source_workload", "client"),
        ("source_workload_namespace", "shop"),
        (
            "source_principal",
            "spiffe://cluster.local/ns/shop/sa/shopper",
        ),
        ("source_canonical_service", "client"),
        ("source_canonical_revision", "v2"),
        ("destination_workload", "web"),
        (
            "destination_principal",
            "spiffe://cluster.local/ns/shop/sa/web-sa",
        ),
        ("destination_app", "web"),
        ("destination_version", "v2"),
        ("destination_service", "web.shop.svc.cluster.local"),
    ] {
        assert_eq!(label(l, name), want, "{name}");
    }
    wait_for("two access log lines", || lines.lines().len() == 2);
    for line in lines.lines() {
        assert!(
            line.contains("src.workload=client, src.namespace=shop, ")
                && line.contains("dst.workload=web, dst.namespace=shop, "),
            "{line}"
        );
    }
    drop(rt);
}
