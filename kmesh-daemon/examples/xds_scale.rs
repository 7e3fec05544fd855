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
//!    repeated: store update, compile, kernel apply, each timed.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

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
    let mut inc = xds_adapter::Incremental::full(&store.resources().refs()).expect("compile");
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
    // client's incremental path: store, re-flatten the services of that
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
        let cla = store.load_assignment(&n).expect("held");
        let users = store.clusters_for_eds(&n);
        let users: Vec<_> = users.iter().collect();
        let vips = inc
            .update_endpoints(&users, &cla)
            .expect("incremental update");
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
    // The kernel holds exactly what a full compile of the store gives.
    let check = xds_adapter::compile_lenient(&store.resources().refs()).expect("compile");
    assert_eq!(check.flat.services, inc.compiled().flat.services);
    let dump = dp.dump().expect("dump");
    for ks in &dump.services {
        assert_eq!(
            ks.slots, check.flat.services[&ks.vip].slots,
            "kernel vs compile at {}",
            ks.vip
        );
    }
    // The same through the client's own response handling (`accept`: the
    // rollback copy, store, incremental compile, sink, status), minus gRPC.
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
    let mut t_client = Vec::new();
    {
        let mut sink = DpSink(&mut dp);
        for k in 0..churn {
            let i = ((k / 2) * 7919 + 1) % services;
            let n = name(i);
            let mut eps: Vec<SocketAddr> = (0..per).map(|j| endpoint(i, j)).collect();
            if k % 2 == 0 {
                eps.push(endpoint(i, per));
            }
            let items = vec![(n.clone(), format!("c{k}"), Some(to_any(&r::cla(&n, &eps))))];
            let touched = vec![n.clone()];
            let a = Instant::now();
            let nack = kmesh_daemon::xds::client::accept(
                ENDPOINT_TYPE,
                &mut store,
                &mut sink,
                &status,
                &mut inc_opt,
                Some(&touched),
                |s| s.apply_delta(ENDPOINT_TYPE, &items, &[]),
            );
            t_client.push(a.elapsed());
            assert!(nack.is_none(), "{nack:?}");
        }
    }
    let mut inc = inc_opt.expect("incremental state kept");
    println!(
        "through the client's response handling ({churn} updates): p50 {}  p99 {}  max {}",
        ms(pct(&mut t_client, 0.5)),
        ms(pct(&mut t_client, 0.99)),
        ms(pct(&mut t_client, 1.0))
    );
    // For comparison: the same change through a full compile and a full
    // kernel diff (what every non-endpoint response costs).
    let mut t_full = Vec::new();
    for k in 0..10 {
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
        inc = c;
    }
    let prev = inc;
    drop(prev);
    println!(
        "## one endpoint added/removed ({churn} delta EDS updates, one ClusterLoadAssignment each)"
    );
    for (what, v) in [
        ("store update", &mut t_st),
        ("re-flatten", &mut t_co),
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
    println!(
        "full recompile + full kernel diff for one endpoint (10 runs): p50 {}  max {}",
        ms(pct(&mut t_full, 0.5)),
        ms(pct(&mut t_full, 1.0))
    );
    println!(
        "RSS after churn: {} MiB (peak {} MiB)",
        status_kb("VmRSS:") / 1024,
        status_kb("VmHWM:") / 1024
    );
}
