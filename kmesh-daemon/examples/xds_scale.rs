//! xDS config scale benchmark (issue 4). Run as root:
//!
//! ```sh
//! cargo run --release -p kmesh-daemon --example xds_scale -- [services] [endpoints-per-service] [churn-iterations]
//! ```
//!
//! Loads the real kernel dataplane (programs loaded, attached to nothing, no
//! pins), then measures the daemon's own xDS path without the network:
//! 1. full load: `services` services (half TCP listeners on their own VIP,
//!    half HTTP virtual hosts behind two wildcard listeners and two RDS
//!    route configurations, Istio style), each with its EDS cluster and
//!    `endpoints-per-service` endpoints: decode + per-resource checks
//!    (the client's store), the adapter's compile, `Dataplane::apply`;
//! 2. the process's RSS after the load (VmRSS, and the peak VmHWM);
//! 3. one endpoint added / removed (a delta EDS update of one resource),
//!    repeated: store update, incremental compile, kernel apply, each timed;
//! 4. one-resource updates of each type (EDS, CDS, LDS, RDS) through the
//!    client's response handling, and the RSS after each kind.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use envoy_types::pb::google::protobuf::Any;
use kmesh_daemon::dataplane::{Dataplane, DataplaneOptions};
use kmesh_daemon::xds::fixture::resources as r;
use kmesh_daemon::xds::store::{Store, CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE};
use kmesh_daemon::xds::to_any;

fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, (i / 250) as u8, (i % 250 + 1) as u8)
}

fn endpoint(i: usize, j: usize) -> SocketAddr {
    let n = i * 16 + j;
    SocketAddr::new(
        Ipv4Addr::new(
            10,
            (100 + n / 65_000) as u8,
            ((n / 250) % 260) as u8,
            (n % 250 + 1) as u8,
        )
        .into(),
        8080,
    )
}

fn status_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numeric arguments"))
        .collect();
    let services = args.first().copied().unwrap_or(10_000);
    let per = args.get(1).copied().unwrap_or(5);
    let churn = args.get(2).copied().unwrap_or(500);
    let rss0 = status_kb("VmRSS:");

    // The resources, as Anys (what arrives over the wire).
    let name = |i: usize| format!("outbound|80||svc{i}.default.svc.cluster.local");
    let mut clusters = Vec::with_capacity(services);
    let mut clas = Vec::with_capacity(services);
    let mut listeners = Vec::new();
    let mut vhosts: BTreeMap<u16, Vec<(String, Vec<String>, String)>> = BTreeMap::new();
    for i in 0..services {
        let n = name(i);
        clusters.push(to_any(&r::eds_cluster(&n)));
        let eps: Vec<SocketAddr> = (0..per).map(|j| endpoint(i, j)).collect();
        clas.push(to_any(&r::cla(&n, &eps)));
        if i % 2 == 0 {
            let l = format!("{}_9080", vip(i));
            listeners.push(to_any(&r::tcp_listener(
                &l,
                SocketAddr::new(vip(i).into(), 9080),
                &n,
            )));
        } else {
            let port = if i % 4 == 1 { 80 } else { 8080 };
            vhosts.entry(port).or_default().push((
                format!("svc{i}.default.svc.cluster.local:{port}"),
                vec![
                    format!("svc{i}.default.svc.cluster.local"),
                    format!("{}", vip(i)),
                    format!("{}:{port}", vip(i)),
                ],
                n,
            ));
        }
    }
    let mut routes = Vec::new();
    for (port, vh) in &vhosts {
        listeners.push(to_any(&r::http_listener(
            &format!("0.0.0.0_{port}"),
            SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), *port),
            &port.to_string(),
        )));
        let refs: Vec<(&str, Vec<String>, &str)> = vh
            .iter()
            .map(|(a, b, c)| (a.as_str(), b.clone(), c.as_str()))
            .collect();
        routes.push(to_any(&r::route_config(&port.to_string(), &refs)));
    }
    let wire: usize = [&clusters, &clas, &listeners, &routes]
        .iter()
        .flat_map(|v| v.iter())
        .map(|a| a.value.len())
        .sum();
    let rss_wire = status_kb("VmRSS:");
    let (n_listeners, n_routes) = (listeners.len(), routes.len());

    let mut dp =
        Dataplane::load(&DataplaneOptions::default()).expect("loading the dataplane (run as root)");
    let rss_loaded = status_kb("VmRSS:");

    // 1. Full load.
    let t0 = Instant::now();
    let mut store = Store::new();
    for (t, v) in [
        (CLUSTER_TYPE, &clusters),
        (ENDPOINT_TYPE, &clas),
        (LISTENER_TYPE, &listeners),
        (ROUTE_TYPE, &routes),
    ] {
        let o = store.apply_sotw(t, "1", v);
        assert!(o.rejected.is_empty(), "{:?}", o.rejected.first());
    }
    let t_store = t0.elapsed();
    // In the daemon a response's bytes go away once stored; so here.
    drop((clusters, clas, listeners, routes));
    let rss_store = status_kb("VmRSS:");
    let t1 = Instant::now();
    let mut inc = {
        let res = store.resources();
        xds_adapter::Incremental::full(&res.refs()).expect("compile")
    };
    // As the client does after a full compile.
    kmesh_daemon::sys::release_freed_memory();
    let compiled = inc.compiled().clone();
    let t_compile = t1.elapsed();
    let rss_compiled = status_kb("VmRSS:");
    assert!(
        compiled.excluded.is_empty(),
        "{:?}",
        compiled.excluded.first()
    );
    assert_eq!(compiled.flat.services.len(), services);
    let t2 = Instant::now();
    let summary = dp.apply(&compiled.flat).expect("kernel apply");
    let t_kernel = t2.elapsed();
    let total = t0.elapsed();
    let dump = dp.dump().expect("dump");
    assert_eq!(dump.services.len(), services);
    let rss = status_kb("VmRSS:");
    let hwm = status_kb("VmHWM:");
    println!("## full load: {services} services, {} endpoints, {} listeners, {} route configs ({} virtual hosts), {wire} bytes of resources",
        services * per, n_listeners, n_routes, vhosts.values().map(Vec::len).sum::<usize>());
    println!("store (decode + per-resource checks): {}", ms(t_store));
    println!("adapter compile (lenient):           {}", ms(t_compile));
    println!(
        "kernel apply ({} services, {} slots): {}",
        summary.added,
        summary.slots_written,
        ms(t_kernel)
    );
    println!("total:                               {}", ms(total));
    println!(
        "RSS: {} MiB at start, {} MiB with the resources built as wire bytes, {} MiB with the dataplane loaded, {} MiB with the store filled, {} MiB after the compile, {} MiB after the load (peak {} MiB)",
        rss0 / 1024,
        rss_wire / 1024,
        rss_loaded / 1024,
        rss_store / 1024,
        rss_compiled / 1024,
        rss / 1024,
        hwm / 1024
    );

    // 3. One endpoint added / removed, as a delta EDS update, on the
    // adapter's incremental path: store, re-flatten the services of that
    // cluster, rewrite only those in the kernel.
    let mut t_st = Vec::new();
    let mut t_co = Vec::new();
    let mut t_ke = Vec::new();
    let mut t_all = Vec::new();
    drop(compiled);
    for k in 0..churn {
        // Pairs: add an endpoint to a service, then remove it again.
        let i = ((k / 2) * 7919) % services;
        let n = name(i);
        let extra = k % 2 == 0;
        let mut eps: Vec<SocketAddr> = (0..per).map(|j| endpoint(i, j)).collect();
        if extra {
            eps.push(endpoint(i, per));
        }
        let any = to_any(&r::cla(&n, &eps));
        let a = Instant::now();
        let o = store.apply_delta(
            ENDPOINT_TYPE,
            &[(n.clone(), format!("v{k}"), Some(any))],
            &[],
        );
        assert!(o.changed && o.rejected.is_empty());
        let b = Instant::now();
        let ch = xds_adapter::Changes {
            load_assignments: vec![n.clone()],
            ..Default::default()
        };
        let vips = inc.update(&store, &ch).expect("incremental update");
        let cc = Instant::now();
        let s = dp
            .apply_services(&inc.compiled().flat, &vips)
            .expect("apply");
        let d = Instant::now();
        assert_eq!((vips.len(), s.changed, s.added, s.removed), (1, 1, 0, 0));
        t_st.push(b - a);
        t_co.push(cc - b);
        t_ke.push(d - cc);
        t_all.push(d - a);
    }
    check_kernel(&dp, &store, &inc);
    let rss_eds = (status_kb("VmRSS:"), status_kb("VmHWM:"));
    // The same through the client's own response handling (`accept`: the
    // rollback copy, store, incremental compile, sink, status), minus gRPC,
    // for each resource type.
    struct DpSink<'a>(&'a mut Dataplane);
    impl kmesh_daemon::xds::Sink for DpSink<'_> {
        fn apply(&mut self, c: &xds_adapter::Compiled, _: &Store) -> Result<(), String> {
            self.0.apply(&c.flat).map(|_| ()).map_err(|e| e.to_string())
        }
        fn apply_services(
            &mut self,
            c: &xds_adapter::Compiled,
            vips: &[SocketAddr],
            _: &Store,
        ) -> Result<(), String> {
            self.0
                .apply_services(&c.flat, vips)
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    }
    let status = kmesh_daemon::xds::SharedStatus::default();
    let mut inc_opt = Some(inc);
    // (type, resource name, resource, whether a kernel record must change)
    let mut through_client = |what: &str,
                              updates: usize,
                              make: &dyn Fn(usize) -> (&'static str, String, Any)|
     -> Vec<Duration> {
        let mut sink = DpSink(&mut dp);
        let mut t = Vec::with_capacity(updates);
        for k in 0..updates {
            let (type_url, n, any) = make(k);
            let items = vec![(n.clone(), format!("{what}{k}"), Some(any))];
            let touched = vec![n.clone()];
            let applies = status.lock().unwrap().applies;
            let a = Instant::now();
            let nack = kmesh_daemon::xds::client::accept(
                type_url,
                &mut store,
                &mut sink,
                &status,
                &mut inc_opt,
                Some(&touched),
                |s| s.apply_delta(type_url, &items, &[]),
            );
            t.push(a.elapsed());
            assert!(nack.is_none(), "{nack:?}");
            assert_eq!(status.lock().unwrap().applies, applies + 1);
            assert!(inc_opt.is_some(), "{what}: fell back to a full compile");
        }
        t
    };
    let eds = |k: usize| {
        let i = ((k / 2) * 7919 + 1) % services;
        let n = name(i);
        let mut eps: Vec<SocketAddr> = (0..per).map(|j| endpoint(i, j)).collect();
        if k.is_multiple_of(2) {
            eps.push(endpoint(i, per));
        }
        (ENDPOINT_TYPE, n.clone(), to_any(&r::cla(&n, &eps)))
    };
    let mut t_client = through_client("e", churn, &eds);
    // CDS: one cluster's LB policy flips (every service using it is
    // rewritten with the other policy), then back.
    let cds = |k: usize| {
        let i = ((k / 2) * 7919 + 3) % services;
        let n = name(i);
        let mut c = r::eds_cluster(&n);
        if k.is_multiple_of(2) {
            c.lb_policy =
                envoy_types::pb::envoy::config::cluster::v3::cluster::LbPolicy::Random as i32;
        }
        (CLUSTER_TYPE, n, to_any(&c))
    };
    let mut t_cds = through_client("c", churn, &cds);
    let rss_cds = (status_kb("VmRSS:"), status_kb("VmHWM:"));
    // LDS: one TCP listener is pointed at another service's cluster, then
    // back (its VIP's slots are rewritten).
    let lds = |k: usize| {
        let i = (((k / 2) * 7919) % (services / 2)) * 2;
        let target = if k.is_multiple_of(2) {
            name((i + 2) % services)
        } else {
            name(i)
        };
        let l = format!("{}_9080", vip(i));
        (
            LISTENER_TYPE,
            l.clone(),
            to_any(&r::tcp_listener(
                &l,
                SocketAddr::new(vip(i).into(), 9080),
                &target,
            )),
        )
    };
    let mut t_lds = through_client("l", churn, &lds);
    let rss_lds = (status_kb("VmRSS:"), status_kb("VmHWM:"));
    // RDS: one virtual host of a route configuration (a quarter of the
    // services) is pointed at another cluster, then back: the whole route
    // configuration is decided again, only the changed VIP is rewritten.
    let rds_updates = churn.min(100);
    let rds = |k: usize| {
        let port = 80u16;
        let j = ((k / 2) * 7919) % vhosts[&port].len();
        let refs: Vec<(&str, Vec<String>, &str)> = vhosts[&port]
            .iter()
            .enumerate()
            .map(|(x, (a, b, c))| {
                let c = if x == j && k.is_multiple_of(2) {
                    vhosts[&port][(j + 1) % vhosts[&port].len()].2.as_str()
                } else {
                    c.as_str()
                };
                (a.as_str(), b.clone(), c)
            })
            .collect();
        (
            ROUTE_TYPE,
            port.to_string(),
            to_any(&r::route_config(&port.to_string(), &refs)),
        )
    };
    let mut t_rds = through_client("r", rds_updates, &rds);
    let rss_rds = (status_kb("VmRSS:"), status_kb("VmHWM:"));
    let inc = inc_opt.expect("incremental state kept");
    check_kernel(&dp, &store, &inc);
    println!(
        "## one endpoint added/removed ({churn} delta EDS updates, one ClusterLoadAssignment each), adapter + kernel only"
    );
    for (what, v) in [
        ("store update", &mut t_st),
        ("incremental", &mut t_co),
        ("kernel apply", &mut t_ke),
        ("total", &mut t_all),
    ] {
        let (p50, p99, max) = (pct(v, 0.5), pct(v, 0.99), pct(v, 1.0));
        println!(
            "{what:<16} p50 {}  p99 {}  max {}",
            ms(p50),
            ms(p99),
            ms(max)
        );
    }
    println!("## through the client's response handling (xds::client::accept: rollback copy, store, incremental compile, kernel, status)");
    for (what, n, v) in [
        ("EDS one endpoint", churn, &mut t_client),
        ("CDS one cluster", churn, &mut t_cds),
        ("LDS one listener", churn, &mut t_lds),
        ("RDS one virtual host", rds_updates, &mut t_rds),
    ] {
        println!(
            "{what:<22} ({n} updates): p50 {}  p99 {}  max {}",
            ms(pct(v, 0.5)),
            ms(pct(v, 0.99)),
            ms(pct(v, 1.0))
        );
    }
    let mib = |(rss, hwm): (u64, u64)| format!("{} MiB (peak {} MiB)", rss / 1024, hwm / 1024);
    println!(
        "RSS after the load {} MiB; after the EDS updates {}; after the CDS updates {}; after the LDS updates {}; after the RDS updates {}",
        rss / 1024,
        mib(rss_eds),
        mib(rss_cds),
        mib(rss_lds),
        mib(rss_rds)
    );
    // For comparison: the same endpoint change through a full compile and
    // a full kernel diff (what every update cost before the incremental
    // path; run last, its temporaries raise the RSS).
    drop(inc);
    let mut t_full = Vec::new();
    for k in 0..3 {
        let i = (k * 104_729) % services;
        let n = name(i);
        let eps: Vec<SocketAddr> = (0..per + (k % 2)).map(|j| endpoint(i, j)).collect();
        let a = Instant::now();
        store.apply_delta(
            ENDPOINT_TYPE,
            &[(n.clone(), format!("f{k}"), Some(to_any(&r::cla(&n, &eps))))],
            &[],
        );
        let c = xds_adapter::Incremental::full(&store.resources().refs()).expect("compile");
        dp.apply(&c.compiled().flat).expect("apply");
        t_full.push(a.elapsed());
    }
    println!(
        "full recompile + full kernel diff for one endpoint (3 runs): p50 {}  max {}",
        ms(pct(&mut t_full, 0.5)),
        ms(pct(&mut t_full, 1.0))
    );
}

/// The kernel holds exactly what a full compile of the store gives, and
/// the incremental state agrees with it. (A check of the benchmark, not
/// part of the daemon's path: its full compile's pages are given back so
/// that the RSS measured afterwards is the daemon's.)
fn check_kernel(dp: &Dataplane, store: &Store, inc: &xds_adapter::Incremental) {
    check_kernel_inner(dp, store, inc);
    kmesh_daemon::sys::release_freed_memory();
}

fn check_kernel_inner(dp: &Dataplane, store: &Store, inc: &xds_adapter::Incremental) {
    let check = xds_adapter::compile_lenient(&store.resources().refs()).expect("compile");
    assert_eq!(check.flat.services, inc.compiled().flat.services);
    let dump = dp.dump().expect("dump");
    assert_eq!(dump.services.len(), check.flat.services.len());
    for ks in &dump.services {
        assert_eq!(
            ks.slots, check.flat.services[&ks.vip].slots,
            "kernel vs compile at {}",
            ks.vip
        );
    }
}
