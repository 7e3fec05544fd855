//! HTTP connection manager → route configuration → virtual hosts → routes,
//! decided at connect time.
//!
//! The kernel picks a backend in `connect()`, before the first request byte
//! exists. It can therefore honour an HTTP route only where the route does
//! not depend on the request:
//!
//! - **VIPs**: a listener on a specific IP:port is that service. A wildcard
//!   listener (`0.0.0.0:80`, as Istio's outbound HTTP listeners are) captures
//!   the IP-literal domains of its virtual hosts (`10.96.0.10`,
//!   `10.96.0.10:80`, `[fd00::a]:80`); hostname domains
//!   (`reviews.default.svc.cluster.local:80`, `*`) name the same services by
//!   the Host header, which the kernel never sees, and are skipped.
//! - **Routes**: a virtual host is decided by its first catch-all route
//!   (`prefix: ""` or `"/"`, or `path_separated_prefix: "/"`, with no header,
//!   query, gRPC, TLS-context, runtime or metadata condition). Routes before
//!   it that match on request content are harmless when they send to the same
//!   cluster(s) as the catch-all. When one of them sends elsewhere, or when
//!   there is no catch-all, or the deciding action is not a forward to
//!   clusters (redirect, direct response, `cluster_header`, …), the virtual
//!   host is **not installed**: connects to its VIPs are left alone by the
//!   kernel (as if kmesh were not there) and a warning names the listener,
//!   route configuration, virtual host and route. Traffic is never sent to a
//!   cluster that a request might not have been routed to.
//! - Per-route L7 behaviour (timeouts, retries, rewrites, header changes, …)
//!   is reported once per route configuration and field as ignored.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use envoy_types::pb::envoy::config::route::v3 as pb_route;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as pb_hcm;

use crate::error::{index, join, Diag};
use crate::model::{warn_ignored, HttpRoutes, Route, TcpRoute};
use crate::schema;

/// `route_configuration "80"`.
pub(crate) fn route_config_label(name: &str) -> String {
    if name.is_empty() {
        "route_configuration (unnamed)".into()
    } else {
        format!("route_configuration {name:?}")
    }
}

pub(crate) fn convert_hcm(
    h: &pb_hcm::HttpConnectionManager,
    d: &mut Diag,
    res: &str,
    path: &str,
) -> Option<HttpRoutes> {
    use pb_hcm::http_connection_manager::RouteSpecifier;
    let mut scratch = Diag::default();
    warn_ignored(
        h,
        schema::HCM,
        |m| {
            m.stat_prefix.clear();
            m.route_specifier = None;
            // HTTP filters (router, telemetry, …) act on requests, which the
            // kernel does not see; the list is always present.
            m.http_filters.clear();
            m.codec_type = 0;
        },
        &mut scratch,
        res,
        path,
    );
    d.warnings.append(&mut scratch.warnings);
    match &h.route_specifier {
        Some(RouteSpecifier::Rds(rds)) => {
            let rpath = join(path, "rds");
            warn_ignored(
                rds,
                schema::RDS,
                |m| {
                    m.route_config_name.clear();
                    m.config_source = None;
                },
                d,
                res,
                &rpath,
            );
            if rds.route_config_name.is_empty() {
                d.error(
                    res,
                    &join(&rpath, "route_config_name"),
                    "route_config_name is empty",
                );
                return None;
            }
            Some(HttpRoutes::Rds(rds.route_config_name.clone()))
        }
        Some(RouteSpecifier::RouteConfig(rc)) => Some(HttpRoutes::Inline(
            Box::new(rc.clone()),
            join(path, "route_config"),
        )),
        Some(RouteSpecifier::ScopedRoutes(_)) => {
            d.error_hint(
                res,
                &join(path, "scoped_routes"),
                "scoped routes are not supported",
                "use rds or route_config",
            );
            None
        }
        None => {
            d.error_hint(
                res,
                path,
                "http_connection_manager has neither rds nor route_config",
                "set rds.route_config_name or an inline route_config",
            );
            None
        }
    }
}

/// The connect-time decision for one virtual host.
#[derive(Debug, Clone)]
pub(crate) struct VhostDecision {
    pub name: String,
    pub domains: Vec<String>,
    /// The route and its cluster references (field paths relative to the
    /// route configuration), or why the virtual host cannot be decided at
    /// connect time.
    pub outcome: Result<Route, String>,
}

/// A whole route configuration, decided: one entry per virtual host.
/// Errors are what Envoy would reject too (or what cannot mean anything
/// here): an empty cluster name, a zero-weight split, duplicate domains.
pub(crate) fn decide_route_config(
    rc: &pb_route::RouteConfiguration,
    d: &mut Diag,
    res: &str,
    path: &str,
) -> Vec<VhostDecision> {
    // Ignored L7 fields, collapsed: one warning per field over all routes.
    let mut scratch = Diag::default();
    warn_ignored(
        rc,
        schema::ROUTE_CONFIGURATION,
        |m| {
            m.name.clear();
            m.virtual_hosts.clear();
            m.validate_clusters = None;
        },
        &mut scratch,
        res,
        path,
    );
    let mut seen_domains: BTreeMap<String, String> = BTreeMap::new();
    let mut out = Vec::with_capacity(rc.virtual_hosts.len());
    for (i, vh) in rc.virtual_hosts.iter().enumerate() {
        let vpath = index(&join(path, "virtual_hosts"), i);
        let star = join(path, "virtual_hosts[*]");
        warn_ignored(
            vh,
            schema::VIRTUAL_HOST,
            |m| {
                m.name.clear();
                m.domains.clear();
                m.routes.clear();
            },
            &mut scratch,
            res,
            &star,
        );
        if vh.domains.is_empty() {
            d.error(
                res,
                &join(&vpath, "domains"),
                format!("virtual host {:?} has no domains", vh.name),
            );
        }
        for dom in &vh.domains {
            let key = dom.to_ascii_lowercase();
            if let Some(other) = seen_domains.insert(key, vh.name.clone()) {
                d.error(
                    res,
                    &join(&vpath, "domains"),
                    format!(
                        "domain {dom:?} is also in virtual host {other:?}; domains must be unique in a route configuration"
                    ),
                );
            }
        }
        let outcome = decide_vhost(vh, d, &mut scratch, res, &vpath, &star);
        out.push(VhostDecision {
            name: vh.name.clone(),
            domains: vh.domains.clone(),
            outcome,
        });
    }
    // Collapse identical warnings (same field in many routes) into one.
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut order = Vec::new();
    for w in scratch.warnings {
        let c = counts.entry(w.clone()).or_insert(0);
        if *c == 0 {
            order.push(w);
        }
        *c += 1;
    }
    for w in order {
        match counts[&w] {
            1 => d.warnings.push(w),
            n => d.warnings.push(format!("{w} ({n} times)")),
        }
    }
    out
}

/// Why a route match depends on the request, or `None` for a catch-all.
fn content_condition(m: Option<&pb_route::RouteMatch>) -> Option<String> {
    use pb_route::route_match::PathSpecifier;
    let Some(m) = m else {
        return Some("no match".into());
    };
    let path = match &m.path_specifier {
        Some(PathSpecifier::Prefix(p)) if p.is_empty() || p == "/" => None,
        Some(PathSpecifier::PathSeparatedPrefix(p)) if p == "/" => None,
        Some(PathSpecifier::Prefix(p)) => Some(format!("prefix {p:?}")),
        Some(PathSpecifier::Path(p)) => Some(format!("path {p:?}")),
        Some(PathSpecifier::SafeRegex(r)) => Some(format!("safe_regex {:?}", r.regex)),
        Some(PathSpecifier::PathSeparatedPrefix(p)) => Some(format!("path_separated_prefix {p:?}")),
        Some(PathSpecifier::ConnectMatcher(_)) => Some("connect_matcher".into()),
        Some(_) => Some("path_match_policy".into()),
        None => Some("no path specifier".into()),
    };
    if path.is_some() {
        return path;
    }
    let mut conds = Vec::new();
    if !m.headers.is_empty() {
        conds.push("headers");
    }
    if !m.query_parameters.is_empty() {
        conds.push("query_parameters");
    }
    if !m.cookies.is_empty() {
        conds.push("cookies");
    }
    if m.grpc.is_some() {
        conds.push("grpc");
    }
    if m.tls_context.is_some() {
        conds.push("tls_context");
    }
    if m.runtime_fraction.is_some() {
        conds.push("runtime_fraction");
    }
    if !m.dynamic_metadata.is_empty() {
        conds.push("dynamic_metadata");
    }
    if !m.filter_state.is_empty() {
        conds.push("filter_state");
    }
    (!conds.is_empty()).then(|| format!("matches on {}", conds.join(", ")))
}

/// A route's action, as a connect-time route, or why it is not one.
pub(crate) fn route_action(
    r: &pb_route::Route,
    d: &mut Diag,
    scratch: &mut Diag,
    res: &str,
    rpath: &str,
    star: &str,
) -> Result<Route, String> {
    use pb_route::route::Action;
    use pb_route::route_action::ClusterSpecifier;
    let ra = match &r.action {
        Some(Action::Route(ra)) => ra,
        Some(Action::Redirect(_)) => return Err("it answers with a redirect".into()),
        Some(Action::DirectResponse(_)) => return Err("it answers with a direct response".into()),
        Some(_) => return Err("its action does not forward to a cluster".into()),
        None => return Err("it has no action".into()),
    };
    let apath = join(rpath, "route");
    warn_ignored(
        ra,
        schema::ROUTE_ACTION,
        |m| {
            m.cluster_specifier = None;
        },
        scratch,
        res,
        &join(star, "routes[*].route"),
    );
    match &ra.cluster_specifier {
        Some(ClusterSpecifier::Cluster(c)) => {
            if c.is_empty() {
                d.error(res, &join(&apath, "cluster"), "cluster name is empty");
                return Err("empty cluster name".into());
            }
            Ok((
                TcpRoute::Cluster(c.clone()),
                vec![(c.clone(), join(&apath, "cluster"))],
            ))
        }
        Some(ClusterSpecifier::WeightedClusters(wc)) => {
            let wpath = join(&join(&apath, "weighted_clusters"), "clusters");
            let mut out: Vec<(String, u32)> = Vec::new();
            let mut refs = Vec::new();
            let before = d.errors.len();
            for (i, cw) in wc.clusters.iter().enumerate() {
                let cpath = index(&wpath, i);
                warn_ignored(
                    cw,
                    schema::ROUTE_CLUSTER_WEIGHT,
                    |m| {
                        m.name.clear();
                        m.weight = None;
                    },
                    scratch,
                    res,
                    &join(star, "routes[*].route.weighted_clusters.clusters[*]"),
                );
                if cw.name.is_empty() {
                    if !cw.cluster_header.is_empty() {
                        return Err(format!(
                            "weighted cluster {i} takes its cluster from header {:?}",
                            cw.cluster_header
                        ));
                    }
                    d.error(res, &join(&cpath, "name"), "cluster name is empty");
                    continue;
                }
                let w = cw.weight.as_ref().map_or(0, |w| w.value);
                if w == 0 {
                    // Envoy accepts 0: that cluster gets no traffic.
                    continue;
                }
                if let Some(e) = out.iter_mut().find(|(n, _)| *n == cw.name) {
                    e.1 = e.1.saturating_add(w);
                } else {
                    out.push((cw.name.clone(), w));
                }
                refs.push((cw.name.clone(), join(&cpath, "name")));
            }
            if d.errors.len() != before {
                return Err("invalid weighted_clusters".into());
            }
            if out.is_empty() {
                d.error(
                    res,
                    &wpath,
                    "weighted_clusters has no cluster with a weight above 0",
                );
                return Err("no weighted cluster".into());
            }
            let route = if out.len() == 1 {
                TcpRoute::Cluster(out.remove(0).0)
            } else {
                TcpRoute::Weighted(out)
            };
            Ok((route, refs))
        }
        Some(ClusterSpecifier::ClusterHeader(h)) => {
            Err(format!("it takes the cluster from request header {h:?}"))
        }
        Some(_) => Err("a cluster specifier plugin picks the cluster per request".into()),
        None => {
            d.error(res, &apath, "route action names no cluster");
            Err("no cluster".into())
        }
    }
}

pub(crate) fn same_clusters(a: &TcpRoute, b: &TcpRoute) -> bool {
    match (a, b) {
        (TcpRoute::Cluster(x), TcpRoute::Cluster(y)) => x == y,
        (TcpRoute::Weighted(x), TcpRoute::Weighted(y)) => {
            // Same split: same clusters with proportional weights.
            let tx: u64 = x.iter().map(|(_, w)| u64::from(*w)).sum();
            let ty: u64 = y.iter().map(|(_, w)| u64::from(*w)).sum();
            x.len() == y.len()
                && x.iter().all(|(n, w)| {
                    y.iter()
                        .any(|(m, v)| m == n && u64::from(*w) * ty == u64::from(*v) * tx)
                })
        }
        _ => false,
    }
}

fn decide_vhost(
    vh: &pb_route::VirtualHost,
    d: &mut Diag,
    scratch: &mut Diag,
    res: &str,
    vpath: &str,
    star: &str,
) -> Result<Route, String> {
    let mut earlier: Vec<(usize, String, Result<Route, String>)> = Vec::new();
    if vh.routes.is_empty() {
        return Err("it has no routes".into());
    }
    for (j, r) in vh.routes.iter().enumerate() {
        let rpath = index(&join(vpath, "routes"), j);
        warn_ignored(
            r,
            schema::ROUTE,
            |m| {
                m.r#match = None;
                m.action = None;
                m.name.clear();
                m.metadata = None;
                m.decorator = None;
                m.stat_prefix.clear();
            },
            scratch,
            res,
            &join(star, "routes[*]"),
        );
        if let Some(m) = &r.r#match {
            warn_ignored(
                m,
                schema::ROUTE_MATCH,
                |m| {
                    m.path_specifier = None;
                    m.headers.clear();
                    m.query_parameters.clear();
                    m.cookies.clear();
                    m.grpc = None;
                    m.tls_context = None;
                    m.runtime_fraction = None;
                    m.dynamic_metadata.clear();
                    m.filter_state.clear();
                    m.case_sensitive = None;
                },
                scratch,
                res,
                &join(star, "routes[*].match"),
            );
        }
        let label = if r.name.is_empty() {
            format!("route {j}")
        } else {
            format!("route {j} ({:?})", r.name)
        };
        let action = route_action(r, d, scratch, res, &rpath, star);
        match content_condition(r.r#match.as_ref()) {
            Some(cond) => earlier.push((j, format!("{label} [{cond}]"), action)),
            None => {
                let decided = action.map_err(|why| format!("its catch-all {label}: {why}"))?;
                for (_, what, a) in &earlier {
                    match a {
                        Ok((t, _)) if same_clusters(t, &decided.0) => {}
                        Ok((t, _)) => {
                            return Err(format!(
                                "{what} depends on the request and sends to {} while the catch-all {label} sends to {}; the kernel decides at connect time, before the request exists",
                                describe(t),
                                describe(&decided.0)
                            ))
                        }
                        Err(why) => {
                            return Err(format!(
                                "{what} depends on the request and {why}"
                            ))
                        }
                    }
                }
                // The references of the harmless earlier routes count too.
                let mut refs = decided.1;
                for (_, _, a) in earlier {
                    if let Ok((_, r)) = a {
                        refs.extend(r);
                    }
                }
                return Ok((decided.0, refs));
            }
        }
    }
    let first = earlier.first().map(|e| e.1.clone()).unwrap_or_default();
    Err(format!(
        "no route is a catch-all (prefix \"/\" without conditions); every route depends on the request, first {first}"
    ))
}

pub(crate) fn describe(t: &TcpRoute) -> String {
    match t {
        TcpRoute::Cluster(c) => format!("cluster {c:?}"),
        TcpRoute::Weighted(w) => {
            let parts: Vec<String> = w.iter().map(|(c, w)| format!("{c:?}:{w}")).collect();
            format!("weighted clusters {}", parts.join(", "))
        }
    }
}

/// The service VIPs an HTTP listener on `listen` captures through virtual
/// host `vh`: the listener address itself when it is a specific IP, else
/// the IP-literal domains (`ip`, or `ip:port` with the listener's port).
pub(crate) fn vhost_vips(listen: SocketAddr, domains: &[String]) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for dom in domains {
        let vip = if let Ok(ip) = dom.parse::<IpAddr>() {
            Some(SocketAddr::new(ip, listen.port()))
        } else if let Ok(sa) = dom.parse::<SocketAddr>() {
            (sa.port() == listen.port()).then_some(sa)
        } else {
            dom.strip_prefix('[')
                .and_then(|d| d.strip_suffix(']'))
                .and_then(|d| d.parse::<IpAddr>().ok())
                .map(|ip| SocketAddr::new(ip, listen.port()))
        };
        if let Some(v) = vip.map(crate::addr::canonical) {
            if !v.ip().is_unspecified() && !out.contains(&v) {
                out.push(v);
            }
        }
    }
    out
}

/// For a listener on a specific VIP: the virtual host a connection to it
/// would use. Exact IP / IP:port domain first, then `*`, then the only one.
pub(crate) fn vhost_for_vip(vip: SocketAddr, vhosts: &[VhostDecision]) -> Option<usize> {
    let exact = vhosts
        .iter()
        .position(|v| vhost_vips(vip, &v.domains).contains(&vip));
    exact
        .or_else(|| {
            vhosts
                .iter()
                .position(|v| v.domains.iter().any(|d| d == "*"))
        })
        .or_else(|| (vhosts.len() == 1).then_some(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vips_from_domains() {
        let l: SocketAddr = "0.0.0.0:80".parse().unwrap();
        let doms: Vec<String> = [
            "reviews.default.svc.cluster.local",
            "reviews.default.svc.cluster.local:80",
            "10.96.0.10",
            "10.96.0.10:80",
            "10.96.0.11:8080",
            "[fd00::a]:80",
            "[fd00::b]",
            "*",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let v = vhost_vips(l, &doms);
        let want: Vec<SocketAddr> = ["10.96.0.10:80", "[fd00::a]:80", "[fd00::b]:80"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(v, want);
    }
}
