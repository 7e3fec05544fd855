//! Istio-standard TCP metrics and the Prometheus text exposition format
//! (version 0.0.4) writer.
//!
//! Counters are kept per distinct label set; a label set is made of
//! config-level names (services, clusters), never of addresses or ports,
//! so the number of series is bounded by the config, not by traffic.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt::Write as _,
    sync::Arc,
};

use super::{
    event::{Connection, Direction, Kind},
    identity::{Identity, UNKNOWN},
    workload::{Workload, Workloads},
};

/// Istio's standard TCP metric labels, in Istio's order.
pub const ISTIO_LABELS: [&str; 23] = [
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
];

/// `destination_service_name` of connections to no known service, as Istio
/// names traffic that passes through without a service.
pub const PASSTHROUGH: &str = "PassthroughCluster";

/// Values of [`ISTIO_LABELS`], same order.
pub type LabelValues = [String; 23];

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TcpCounters {
    pub opened: u64,
    pub closed: u64,
    pub sent_bytes: u64,
    pub received_bytes: u64,
}

/// The Istio TCP metrics, per label set, and the bytes already reported
/// for each open connection.
///
/// Bytes of open connections are reported as they flow ([`Self::progress`],
/// from the kernel's per-connection state); the CLOSE event then adds only
/// what was not reported yet, so a connection's bytes are counted once.
#[derive(Debug, Default)]
pub struct TcpMetrics {
    series: BTreeMap<Arc<LabelValues>, TcpCounters>,
    /// Socket cookie → the open connection's series and bytes reported.
    /// Bounded by the kernel's connection table (`MAX_CONNS`): entries go
    /// at CLOSE, or by [`Self::forget_closed`] when a CLOSE event was lost.
    open: HashMap<u64, OpenConn>,
}

#[derive(Debug)]
struct OpenConn {
    labels: Arc<LabelValues>,
    sent: u64,
    received: u64,
    /// Consecutive progress reads that did not find the connection.
    missing: u8,
}

/// Reads without the connection before its entry is dropped: a CLOSE
/// event is read from the ring buffer within milliseconds, so three
/// reporting intervals without the connection mean its CLOSE was lost.
const MISSING_READS: u8 = 3;

/// The named workloads at the (source, destination) ends of a connection:
/// the reporting pod by its netns cookie (or its own address), the peer by
/// its address.
pub fn workloads<'a>(
    c: &Connection,
    wl: &'a Workloads,
) -> (Option<&'a Workload>, Option<&'a Workload>) {
    let me = wl
        .by_cookie(c.netns_cookie)
        .or_else(|| wl.by_ip(c.local.ip()));
    let peer = wl.by_ip(c.remote.ip());
    match c.direction {
        Direction::Outbound => (me, peer),
        Direction::Inbound => (peer, me),
    }
}

/// Istio's labels for a connection, as the reporting side sees it.
pub fn istio_labels(c: &Connection, id: &Identity, wl: &Workloads) -> LabelValues {
    let svc = match (c.direction, c.orig_dst) {
        (Direction::Outbound, Some(vip)) => id.outbound(vip, c.remote),
        (Direction::Outbound, None) => None,
        (Direction::Inbound, _) => id.inbound(c.local),
    };
    let u = || UNKNOWN.to_string();
    let (service, svc_name, namespace) = match &svc {
        Some(s) => (
            s.service.clone(),
            s.service_name.clone(),
            s.service_namespace.clone(),
        ),
        // Not a mesh service (an enrolled pod dialling an address no
        // listener captures): Istio's passthrough naming. Not the address:
        // one series per peer address would make the series count
        // unbounded (the access log has the address).
        None => (u(), PASSTHROUGH.to_string(), u()),
    };
    let (src_w, dst_w) = workloads(c, wl);
    let field = |w: Option<&Workload>, f: fn(&Workload) -> Option<&String>| {
        w.and_then(f).map_or_else(u, String::clone)
    };
    let name = |w| field(w, |w| Some(&w.name));
    let ns = |w| field(w, |w| Some(&w.namespace));
    let canonical = |w| field(w, |w| Some(&w.canonical_service));
    // Istio's default canonical revision, also for unknown workloads.
    let revision =
        |w: Option<&Workload>| w.map_or_else(|| "latest".into(), |w| w.canonical_revision.clone());
    let principal = |w| field(w, |w| w.principal.as_ref());
    let app = |w| field(w, |w| w.app.as_ref());
    let version = |w| field(w, |w| w.version.as_ref());
    let (reporter, security) = match c.direction {
        // No mTLS in this dataplane: the destination sees plaintext; the
        // source cannot know what the peer enforces.
        Direction::Outbound => ("source", UNKNOWN),
        Direction::Inbound => ("destination", "none"),
    };
    // Workloads are known from Kubernetes or when named with --workload;
    // the principal is the pod's service account identity (from
    // Kubernetes; this dataplane does no mTLS that would prove it).
    [
        reporter.into(),
        name(src_w),
        canonical(src_w),
        revision(src_w),
        ns(src_w),
        principal(src_w),
        app(src_w),
        version(src_w),
        u(),
        name(dst_w),
        ns(dst_w),
        principal(dst_w),
        app(dst_w),
        version(dst_w),
        service,
        svc_name,
        namespace,
        canonical(dst_w),
        revision(dst_w),
        u(),
        "tcp".into(),
        "-".into(),
        security.into(),
    ]
}

impl TcpMetrics {
    /// The series of `labels` (created at zero), and its shared key.
    fn series_mut(&mut self, labels: LabelValues) -> (Arc<LabelValues>, &mut TcpCounters) {
        let key = match self.series.get_key_value(&labels) {
            Some((k, _)) => k.clone(),
            None => Arc::new(labels),
        };
        (key.clone(), self.series.entry(key).or_default())
    }

    pub fn record(&mut self, c: &Connection, id: &Identity, wl: &Workloads) {
        let labels = istio_labels(c, id, wl);
        match c.kind {
            Kind::Open => {
                let (labels, e) = self.series_mut(labels);
                e.opened += 1;
                self.open.insert(
                    c.sock_cookie,
                    OpenConn {
                        labels,
                        sent: 0,
                        received: 0,
                        missing: 0,
                    },
                );
            }
            Kind::Close => {
                let (sent, received) = self
                    .open
                    .remove(&c.sock_cookie)
                    .map_or((0, 0), |o| (o.sent, o.received));
                let (_, e) = self.series_mut(labels);
                e.closed += 1;
                e.sent_bytes += c.bytes_sent.saturating_sub(sent);
                e.received_bytes += c.bytes_received.saturating_sub(received);
            }
        }
    }

    /// Bytes an open connection has sent and received so far (totals since
    /// it was established): the growth since the last report is added to
    /// its series. Unknown cookies (OPEN not seen) are left to the CLOSE.
    pub fn progress(&mut self, sock_cookie: u64, sent: u64, received: u64) {
        let Some(o) = self.open.get_mut(&sock_cookie) else {
            return;
        };
        o.missing = 0;
        let (ds, dr) = (
            sent.saturating_sub(o.sent),
            received.saturating_sub(o.received),
        );
        if ds == 0 && dr == 0 {
            return;
        }
        o.sent += ds;
        o.received += dr;
        if let Some(e) = self.series.get_mut(&o.labels) {
            e.sent_bytes += ds;
            e.received_bytes += dr;
        }
    }

    /// Drops open connections not `live` in the kernel for several reads
    /// in a row (their CLOSE event was lost, or monitoring was switched off).
    pub fn forget_closed(&mut self, live: &HashSet<u64>) {
        self.open.retain(|cookie, o| {
            if live.contains(cookie) {
                o.missing = 0;
                return true;
            }
            o.missing += 1;
            o.missing < MISSING_READS
        });
    }

    /// Open connections being reported.
    pub fn open_connections(&self) -> usize {
        self.open.len()
    }

    pub fn series(&self) -> impl Iterator<Item = (&LabelValues, &TcpCounters)> {
        self.series.iter().map(|(k, v)| (&**k, v))
    }

    /// Writes the four Istio TCP metric families. Byte counters are the
    /// reporting side's bytes, of open connections as reported so far and
    /// of closed ones in full.
    pub fn render(&self, out: &mut String) {
        type Get = fn(&TcpCounters) -> u64;
        let families: [(&str, &str, Get); 4] = [
            (
                "istio_tcp_connections_opened_total",
                "Total number of TCP connections opened.",
                |c| c.opened,
            ),
            (
                "istio_tcp_connections_closed_total",
                "Total number of TCP connections closed.",
                |c| c.closed,
            ),
            (
                "istio_tcp_sent_bytes_total",
                "Total bytes sent by the reporting side of TCP connections (open ones as they flow).",
                |c| c.sent_bytes,
            ),
            (
                "istio_tcp_received_bytes_total",
                "Total bytes received by the reporting side of TCP connections (open ones as they flow).",
                |c| c.received_bytes,
            ),
        ];
        for (name, help, get) in families {
            header(out, name, help, "counter");
            for (labels, c) in self.series() {
                let pairs: Vec<(&str, &str)> = ISTIO_LABELS
                    .iter()
                    .copied()
                    .zip(labels.iter().map(String::as_str))
                    .collect();
                sample(out, name, &pairs, get(c) as f64);
            }
        }
    }
}

/// `# HELP` and `# TYPE` lines.
pub fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {}", escape_help(help));
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// One sample line.
pub fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: f64) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{k}=\"{}\"", escape_label(v));
        }
        out.push('}');
    }
    let _ = writeln!(out, " {}", fmt_value(value));
}

fn fmt_value(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

fn escape_help(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n")
}

fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('\n', "\\n")
        .replace('"', "\\\"")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::event::{Connection, Direction, Kind};

    fn conn(dir: Direction, local: &str, remote: &str, vip: Option<&str>) -> Connection {
        Connection {
            kind: Kind::Close,
            direction: dir,
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            orig_dst: vip.map(|v| v.parse().unwrap()),
            netns_cookie: 1,
            sock_cookie: 2,
            bytes_sent: 10,
            bytes_received: 20,
            duration: std::time::Duration::ZERO,
            end_ns: 0,
            srtt_us: 0,
            total_retrans: 0,
        }
    }

    fn identity() -> Identity {
        let cfg = xds_adapter::compile_static_config(
            r#"
static_resources:
  listeners:
  - name: web
    address: { socket_address: { address: 10.96.0.10, port_value: 80 } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: web
          cluster: "outbound|80||web.shop.svc.cluster.local"
  clusters:
  - name: "outbound|80||web.shop.svc.cluster.local"
    type: STATIC
    load_assignment:
      cluster_name: "outbound|80||web.shop.svc.cluster.local"
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: 10.244.0.3, port_value: 8080 } } }
"#,
        )
        .unwrap();
        Identity::from_config(&cfg)
    }

    #[test]
    fn labels_name_the_service_from_either_side_and_bound_the_rest() {
        let id = identity();
        let wl = Workloads::default();
        let get = |l: &LabelValues, name: &str| {
            l[ISTIO_LABELS.iter().position(|x| *x == name).unwrap()].clone()
        };
        let out = istio_labels(
            &conn(
                Direction::Outbound,
                "10.244.0.2:4000",
                "10.244.0.3:8080",
                Some("10.96.0.10:80"),
            ),
            &id,
            &wl,
        );
        assert_eq!(get(&out, "reporter"), "source");
        assert_eq!(
            get(&out, "destination_service"),
            "web.shop.svc.cluster.local"
        );
        assert_eq!(get(&out, "destination_service_namespace"), "shop");
        let inb = istio_labels(
            &conn(
                Direction::Inbound,
                "10.244.0.3:8080",
                "10.244.0.2:4000",
                None,
            ),
            &id,
            &wl,
        );
        assert_eq!(get(&inb, "reporter"), "destination");
        assert_eq!(get(&inb, "destination_service_name"), "web");
        assert_eq!(get(&inb, "connection_security_policy"), "none");
        // Two different unknown peers share one series.
        let a = istio_labels(
            &conn(Direction::Outbound, "10.244.0.2:1", "1.1.1.1:443", None),
            &id,
            &wl,
        );
        let b = istio_labels(
            &conn(Direction::Outbound, "10.244.0.2:2", "8.8.8.8:53", None),
            &id,
            &wl,
        );
        assert_eq!(a, b);
        assert_eq!(get(&a, "destination_service_name"), PASSTHROUGH);
        let mut m = TcpMetrics::default();
        m.record(
            &conn(Direction::Outbound, "10.244.0.2:1", "1.1.1.1:443", None),
            &id,
            &wl,
        );
        m.record(
            &conn(Direction::Outbound, "10.244.0.2:2", "8.8.8.8:53", None),
            &id,
            &wl,
        );
        let series: Vec<_> = m.series().collect();
        assert_eq!(series.len(), 1);
        assert_eq!((series[0].1.closed, series[0].1.sent_bytes), (2, 20));

        // Named workloads fill both ends.
        let mut named = Workloads::default();
        named.insert(Some(1), &[], "shop/client".parse().unwrap());
        let backend = "10.244.0.3".parse().unwrap();
        named.insert(None, &[backend], "shop/web-v1".parse().unwrap());
        let c = conn(
            Direction::Outbound,
            "10.244.0.2:4000",
            "10.244.0.3:8080",
            Some("10.96.0.10:80"),
        );
        let l = istio_labels(&c, &id, &named);
        assert_eq!(get(&l, "source_workload"), "client");
        assert_eq!(get(&l, "source_workload_namespace"), "shop");
        assert_eq!(get(&l, "destination_workload"), "web-v1");
        assert_eq!(get(&l, "destination_canonical_service"), "web-v1");
        assert_eq!(get(&l, "destination_principal"), UNKNOWN);

        // Kubernetes identities: the reporting pod found by its own
        // address, principal, canonical service/revision, app and version.
        let mut kube = Workloads::default();
        let mut client = Workload::named("shop", "client");
        client.principal = Some("spiffe://cluster.local/ns/shop/sa/client".into());
        kube.insert(None, &["10.244.0.2".parse().unwrap()], client);
        let mut web = Workload::named("shop", "web-v1");
        web.canonical_service = "web".into();
        web.canonical_revision = "v1".into();
        web.app = Some("web".into());
        web.version = Some("v1".into());
        web.principal = Some("spiffe://cluster.local/ns/shop/sa/web".into());
        kube.insert(None, &[backend], web);
        let mut c = c;
        c.netns_cookie = 42;
        let l = istio_labels(&c, &id, &kube);
        assert_eq!(get(&l, "source_workload"), "client");
        assert_eq!(
            get(&l, "source_principal"),
            "spiffe://cluster.local/ns/shop/sa/client"
        );
        assert_eq!(
            get(&l, "destination_principal"),
            "spiffe://cluster.local/ns/shop/sa/web"
        );
        assert_eq!(get(&l, "destination_canonical_service"), "web");
        assert_eq!(get(&l, "destination_canonical_revision"), "v1");
        assert_eq!(get(&l, "destination_app"), "web");
        assert_eq!(get(&l, "destination_version"), "v1");
        assert_eq!(get(&l, "source_canonical_revision"), "latest");
    }

    #[test]
    fn bytes_of_open_connections_are_counted_once() {
        let id = identity();
        let wl = Workloads::default();
        let mut c = conn(
            Direction::Outbound,
            "10.244.0.2:4000",
            "10.244.0.3:8080",
            Some("10.96.0.10:80"),
        );
        let mut m = TcpMetrics::default();
        c.kind = Kind::Open;
        m.record(&c, &id, &wl);
        let bytes = |m: &TcpMetrics| {
            let (_, s) = m.series().next().unwrap();
            (s.sent_bytes, s.received_bytes)
        };
        m.progress(c.sock_cookie, 4, 7);
        assert_eq!(bytes(&m), (4, 7));
        m.progress(c.sock_cookie, 6, 7);
        m.progress(99, 1000, 1000); // OPEN never seen: left to its CLOSE
        assert_eq!(bytes(&m), (6, 7));
        // CLOSE carries the totals (10, 20): only the rest is added.
        c.kind = Kind::Close;
        m.record(&c, &id, &wl);
        assert_eq!(bytes(&m), (10, 20));
        assert_eq!(m.open_connections(), 0);
        // A progress read racing the CLOSE adds nothing.
        m.progress(c.sock_cookie, 10, 20);
        assert_eq!(bytes(&m), (10, 20));
        // A connection whose CLOSE is lost is forgotten after some reads.
        c.kind = Kind::Open;
        c.sock_cookie = 3;
        m.record(&c, &id, &wl);
        let live = HashSet::new();
        m.forget_closed(&live);
        m.forget_closed(&live);
        assert_eq!(m.open_connections(), 1);
        m.forget_closed(&live);
        assert_eq!(m.open_connections(), 0);
    }

    #[test]
    fn exposition_escapes_and_formats() {
        let mut s = String::new();
        header(&mut s, "m_total", "a\nb", "counter");
        sample(&mut s, "m_total", &[("a", "x\"y\\z")], 3.0);
        sample(&mut s, "m_seconds_total", &[], 0.25);
        assert_eq!(
            s,
            "# HELP m_total a\\nb\n# TYPE m_total counter\nm_total{a=\"x\\\"y\\\\z\"} 3\nm_seconds_total 0.25\n"
        );
    }
}
