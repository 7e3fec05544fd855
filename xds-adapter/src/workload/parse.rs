//! Text → [`LocalConfig`], validating every field once. The document is
//! walked as a YAML value (not derived deserializers) so that every error
//! names the resource (`workload "default/web-0"`) and the field path.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use serde_yaml::{Mapping, Value};

use super::{
    Action, Cidr, HealthPolicy, LbMode, LoadBalancing, LocalConfig, Locality, LocalityMode,
    LocalityScope, Match, Policy, Scope, Service, StringMatch, Waypoint, WaypointDestination,
    Workload,
};
use crate::{ConfigError, ConfigErrors};

/// Workload fields of ztunnel's local config that the kernel does not use:
/// accepted so a ztunnel file loads unchanged.
const WORKLOAD_IGNORED: &[&str] = &[
    "uid",
    "workloadName",
    "workloadType",
    "canonicalName",
    "canonicalRevision",
    "protocol",
    "networkMode",
    "nativeTunnel",
    "applicationTunnel",
    "networkGateway",
    "hostname",
    "capacity",
];
const SERVICE_IGNORED: &[&str] = &["subjectAltNames", "ipFamilies", "endpoints"];
/// L7 attributes of Istio AuthorizationPolicy an L4 engine cannot check.
const L7_FIELDS: &[&str] = &[
    "requestPrincipals",
    "notRequestPrincipals",
    "hosts",
    "notHosts",
    "methods",
    "notMethods",
    "paths",
    "notPaths",
    "remoteIps",
    "notRemoteIps",
    "when",
];

struct Ctx {
    errors: Vec<ConfigError>,
    warnings: Vec<String>,
}

impl Ctx {
    fn err(&mut self, res: &str, field: &str, msg: impl Into<String>) {
        self.errors.push(ConfigError::new(res, field, msg));
    }
}

fn key_str(k: &Value) -> String {
    match k {
        Value::String(s) => s.clone(),
        other => serde_yaml::to_string(other)
            .unwrap_or_default()
            .trim()
            .to_string(),
    }
}

fn as_str(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        _ => None,
    }
}

fn str_field(c: &mut Ctx, res: &str, m: &Mapping, f: &str, required: bool) -> String {
    match m.get(f) {
        None | Some(Value::Null) => {
            if required {
                c.err(res, f, "missing (required)");
            }
            String::new()
        }
        Some(v) => as_str(v).unwrap_or_else(|| {
            c.err(res, f, "must be a string");
            String::new()
        }),
    }
}

fn list<'a>(c: &mut Ctx, res: &str, f: &str, v: Option<&'a Value>) -> &'a [Value] {
    match v {
        None | Some(Value::Null) => &[],
        Some(Value::Sequence(s)) => s,
        Some(_) => {
            c.err(res, f, "must be a list");
            &[]
        }
    }
}

fn port_of(v: &Value) -> Option<u16> {
    match v {
        Value::Number(n) => n.as_u64().and_then(|p| u16::try_from(p).ok()),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

fn port_map(c: &mut Ctx, res: &str, f: &str, v: Option<&Value>) -> BTreeMap<u16, u16> {
    let mut out = BTreeMap::new();
    match v {
        None | Some(Value::Null) => {}
        Some(Value::Mapping(m)) => {
            for (k, t) in m {
                let field = format!("{f}.{}", key_str(k));
                match (port_of(k), port_of(t)) {
                    (Some(0), _) => c.err(res, &field, "service port 0 is not a port"),
                    (Some(p), Some(t)) => {
                        out.insert(p, t);
                    }
                    (None, _) => c.err(res, &field, "key must be a port (0-65535)"),
                    (_, None) => c.err(res, &field, "target port must be 0-65535"),
                }
            }
        }
        Some(_) => c.err(res, f, "must be a map of service port to target port"),
    }
    out
}

fn check_keys(c: &mut Ctx, res: &str, prefix: &str, m: &Mapping, known: &[&str], ignored: &[&str]) {
    for k in m.keys() {
        let k = key_str(k);
        if !known.contains(&k.as_str()) && !ignored.contains(&k.as_str()) {
            let field = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            c.errors.push(
                ConfigError::new(res, field, "unknown field")
                    .with_hint(format!("known fields: {}", known.join(", "))),
            );
        }
    }
}

/// Parses a ztunnel-style local config (YAML or JSON).
pub fn parse_local_config(text: &str) -> Result<LocalConfig, ConfigErrors> {
    let doc: Value = serde_yaml::from_str(text).map_err(|e| {
        ConfigErrors(vec![ConfigError::new(
            "document",
            "",
            format!("not YAML/JSON: {e}"),
        )])
    })?;
    let mut c = Ctx {
        errors: Vec::new(),
        warnings: Vec::new(),
    };
    let top = match &doc {
        Value::Mapping(m) => m.clone(),
        Value::Null => Mapping::new(),
        _ => {
            return Err(ConfigErrors(vec![ConfigError::new(
                "document",
                "",
                "must be a map with workloads, services and policies",
            )]))
        }
    };
    check_keys(
        &mut c,
        "document",
        "",
        &top,
        &["workloads", "services", "policies"],
        &[],
    );
    let mut workloads = Vec::new();
    for (i, w) in list(&mut c, "document", "workloads", top.get("workloads"))
        .iter()
        .enumerate()
    {
        if let Some(w) = workload(&mut c, i, w) {
            workloads.push(w);
        }
    }
    let mut services = Vec::new();
    for (i, s) in list(&mut c, "document", "services", top.get("services"))
        .iter()
        .enumerate()
    {
        if let Some(s) = service(&mut c, i, s) {
            services.push(s);
        }
    }
    let mut policies = Vec::new();
    for (i, p) in list(&mut c, "document", "policies", top.get("policies"))
        .iter()
        .enumerate()
    {
        if let Some(p) = policy(&mut c, i, p) {
            policies.push(p);
        }
    }
    cross_check(&mut c, &workloads, &services, &policies);
    if !c.errors.is_empty() {
        return Err(ConfigErrors(c.errors));
    }
    Ok(LocalConfig {
        workloads,
        services,
        policies,
        warnings: c.warnings,
    })
}

fn label(kind: &str, i: usize, m: &Mapping) -> String {
    let ns = m.get("namespace").and_then(as_str).unwrap_or_default();
    match m.get("name").and_then(as_str) {
        Some(n) => format!("{kind} \"{ns}/{n}\""),
        None => format!("{kind}[{i}]"),
    }
}

fn workload(c: &mut Ctx, i: usize, v: &Value) -> Option<Workload> {
    let Value::Mapping(m) = v else {
        c.err(&format!("workload[{i}]"), "", "must be a map");
        return None;
    };
    let res = label("workload", i, m);
    let before = c.errors.len();
    check_keys(
        c,
        &res,
        "",
        m,
        &[
            "name",
            "namespace",
            "serviceAccount",
            "trustDomain",
            "node",
            "workloadIps",
            "workloadIp",
            "services",
            "authorizationPolicies",
            "status",
            "waypoint",
            "network",
            "clusterId",
            "locality",
        ],
        WORKLOAD_IGNORED,
    );
    let name = str_field(c, &res, m, "name", true);
    let namespace = str_field(c, &res, m, "namespace", true);
    let mut service_account = str_field(c, &res, m, "serviceAccount", false);
    if service_account.is_empty() {
        service_account = "default".into();
    }
    let mut trust_domain = str_field(c, &res, m, "trustDomain", false);
    if trust_domain.is_empty() {
        trust_domain = "cluster.local".into();
    }
    let node = str_field(c, &res, m, "node", false);
    let network = str_field(c, &res, m, "network", false);
    let cluster_id = str_field(c, &res, m, "clusterId", false);
    let locality = match m.get("locality") {
        None | Some(Value::Null) => Locality::default(),
        Some(Value::Mapping(lm)) => {
            check_keys(c, &res, "locality", lm, &["region", "zone", "subzone"], &[]);
            let mut f = |k: &str| match lm.get(k) {
                None | Some(Value::Null) => String::new(),
                Some(v) => as_str(v).unwrap_or_else(|| {
                    c.err(&res, &format!("locality.{k}"), "must be a string");
                    String::new()
                }),
            };
            Locality {
                region: f("region"),
                zone: f("zone"),
                subzone: f("subzone"),
            }
        }
        Some(Value::String(s)) => s.parse().unwrap_or_else(|e| {
            c.err(&res, "locality", e);
            Locality::default()
        }),
        Some(_) => {
            c.err(
                &res,
                "locality",
                "must be {region, zone, subzone} or \"region/zone/subzone\"",
            );
            Locality::default()
        }
    };
    let healthy = match str_field(c, &res, m, "status", false).as_str() {
        "" | "Healthy" | "HEALTHY" => true,
        "Unhealthy" | "UNHEALTHY" => false,
        other => {
            c.err(
                &res,
                "status",
                format!("{other:?} is not Healthy or Unhealthy"),
            );
            true
        }
    };
    let mut ips = Vec::new();
    let mut raw: Vec<(String, Value)> = list(c, &res, "workloadIps", m.get("workloadIps"))
        .iter()
        .enumerate()
        .map(|(j, v)| (format!("workloadIps[{j}]"), v.clone()))
        .collect();
    if let Some(v) = m.get("workloadIp") {
        raw.push(("workloadIp".into(), v.clone()));
    }
    for (field, v) in raw {
        match as_str(&v).and_then(|s| s.parse::<IpAddr>().ok()) {
            Some(ip) => ips.push(ip),
            None => c.err(
                &res,
                &field,
                format!("{} is not an IP address", key_str(&v)),
            ),
        }
    }
    if ips.is_empty() {
        c.err(&res, "workloadIps", "a workload needs at least one address");
    }
    let mut services = BTreeMap::new();
    match m.get("services") {
        None | Some(Value::Null) => {}
        Some(Value::Mapping(sm)) => {
            for (k, pm) in sm {
                let key = key_str(k);
                let ports = port_map(c, &res, &format!("services.{key}"), Some(pm));
                if !key.contains('/') {
                    c.err(
                        &res,
                        &format!("services.{key}"),
                        "key must be namespace/hostname",
                    );
                }
                services.insert(key, ports);
            }
        }
        Some(_) => c.err(
            &res,
            "services",
            "must be a map of namespace/hostname to port map",
        ),
    }
    let mut authorization_policies = Vec::new();
    for (j, p) in list(
        c,
        &res,
        "authorizationPolicies",
        m.get("authorizationPolicies"),
    )
    .iter()
    .enumerate()
    {
        match as_str(p) {
            Some(s) if s.contains('/') => authorization_policies.push(s),
            _ => c.err(
                &res,
                &format!("authorizationPolicies[{j}]"),
                "must be \"namespace/name\" of a policy",
            ),
        }
    }
    let waypoint = waypoint(c, &res, m.get("waypoint"));
    (c.errors.len() == before).then_some(Workload {
        name,
        namespace,
        service_account,
        trust_domain,
        node,
        network,
        cluster_id,
        locality,
        healthy,
        ips,
        services,
        authorization_policies,
        waypoint,
    })
}

fn service(c: &mut Ctx, i: usize, v: &Value) -> Option<Service> {
    let Value::Mapping(m) = v else {
        c.err(&format!("service[{i}]"), "", "must be a map");
        return None;
    };
    let res = label("service", i, m);
    let before = c.errors.len();
    check_keys(
        c,
        &res,
        "",
        m,
        &[
            "name",
            "namespace",
            "hostname",
            "vips",
            "ports",
            "lbPolicy",
            "waypoint",
            "loadBalancer",
        ],
        SERVICE_IGNORED,
    );
    let name = str_field(c, &res, m, "name", true);
    let namespace = str_field(c, &res, m, "namespace", true);
    let hostname = str_field(c, &res, m, "hostname", true);
    let mut vips = Vec::new();
    for (j, v) in list(c, &res, "vips", m.get("vips")).iter().enumerate() {
        let field = format!("vips[{j}]");
        let Some(s) = as_str(v) else {
            c.err(&res, &field, "must be a string \"network/ip\"");
            continue;
        };
        // "network/ip"; the network part may be empty ("/10.96.0.1").
        let ip = s.rsplit_once('/').map(|(_, ip)| ip).unwrap_or(&s);
        match ip.parse::<IpAddr>() {
            Ok(ip) => vips.push(ip),
            Err(_) => c.err(
                &res,
                &field,
                format!("{s:?} is not \"network/ip\" with an IP address"),
            ),
        }
    }
    let ports = port_map(c, &res, "ports", m.get("ports"));
    let lb = match m.get("lbPolicy").and_then(as_str).as_deref() {
        None => LbMode::Random,
        Some("RANDOM") | Some("Random") => LbMode::Random,
        Some("ROUND_ROBIN") | Some("RoundRobin") => LbMode::RoundRobin,
        Some(other) => {
            c.err(
                &res,
                "lbPolicy",
                format!("{other:?} is not RANDOM or ROUND_ROBIN"),
            );
            LbMode::Random
        }
    };
    let load_balancing = match m.get("loadBalancer") {
        None | Some(Value::Null) => None,
        Some(Value::Mapping(lbm)) => Some(load_balancer(c, &res, lbm)),
        Some(_) => {
            c.err(
                &res,
                "loadBalancer",
                "must be {routingPreferences, mode, healthPolicy}",
            );
            None
        }
    };
    let waypoint = waypoint(c, &res, m.get("waypoint"));
    (c.errors.len() == before).then_some(Service {
        name,
        namespace,
        hostname,
        vips,
        ports,
        lb,
        waypoint,
        load_balancing,
    })
}

/// `waypoint: {destination: "network/ip" | {address: "network/ip"} |
/// {hostname: {namespace, hostname}}, hboneMtlsPort: N}` (ztunnel's
/// GatewayAddress; `port` is accepted for `hboneMtlsPort`).
fn waypoint(c: &mut Ctx, res: &str, v: Option<&Value>) -> Option<Waypoint> {
    let m = match v {
        None | Some(Value::Null) => return None,
        Some(Value::Mapping(m)) => m,
        Some(_) => {
            c.err(
                res,
                "waypoint",
                "must be a map with destination and hboneMtlsPort",
            );
            return None;
        }
    };
    check_keys(
        c,
        res,
        "waypoint",
        m,
        &["destination", "hboneMtlsPort", "port"],
        &[],
    );
    let port = match m
        .get("hboneMtlsPort")
        .or_else(|| m.get("port"))
        .map(port_of)
    {
        Some(Some(p)) if p != 0 => Some(p),
        Some(_) => {
            c.err(res, "waypoint.hboneMtlsPort", "must be a port (1-65535)");
            None
        }
        None => {
            c.errors.push(
                ConfigError::new(res, "waypoint.hboneMtlsPort", "missing (required)")
                    .with_hint("the port the waypoint's PROXY protocol v2 listener accepts on"),
            );
            None
        }
    };
    let address = |c: &mut Ctx, field: &str, v: &Value| -> Option<WaypointDestination> {
        let ip = as_str(v).and_then(|s| {
            let ip = s
                .rsplit_once('/')
                .map(|(_, ip)| ip.to_string())
                .unwrap_or(s);
            ip.parse::<IpAddr>().ok()
        });
        if ip.is_none() {
            c.err(
                res,
                field,
                format!("{} is not \"network/ip\" with an IP address", key_str(v)),
            );
        }
        ip.map(WaypointDestination::Address)
    };
    let destination = match m.get("destination") {
        None | Some(Value::Null) => {
            c.err(res, "waypoint.destination", "missing (required)");
            None
        }
        Some(v @ Value::String(_)) => address(c, "waypoint.destination", v),
        Some(Value::Mapping(d)) => {
            check_keys(
                c,
                res,
                "waypoint.destination",
                d,
                &["address", "hostname"],
                &[],
            );
            match (d.get("address"), d.get("hostname")) {
                (Some(a), None) => address(c, "waypoint.destination.address", a),
                (None, Some(Value::Mapping(h))) => {
                    let f = "waypoint.destination.hostname";
                    let ns = h.get("namespace").and_then(as_str);
                    let host = h.get("hostname").and_then(as_str);
                    match (ns, host) {
                        (Some(ns), Some(host)) => {
                            Some(WaypointDestination::Hostname(format!("{ns}/{host}")))
                        }
                        _ => {
                            c.err(res, f, "must be {namespace, hostname}");
                            None
                        }
                    }
                }
                _ => {
                    c.err(
                        res,
                        "waypoint.destination",
                        "must have exactly one of address or hostname",
                    );
                    None
                }
            }
        }
        Some(_) => {
            c.err(
                res,
                "waypoint.destination",
                "must be \"network/ip\", {address: ...} or {hostname: {namespace, hostname}}",
            );
            None
        }
    };
    Some(Waypoint {
        destination: destination?,
        port: port?,
    })
}

/// ztunnel's `loadBalancer` (`routingPreferences` or the proto's
/// `routingPreference`, `mode`, `healthPolicy`); enum values in ztunnel's
/// spelling (`Failover`) or the proto's (`FAILOVER`).
fn load_balancer(c: &mut Ctx, res: &str, m: &Mapping) -> LoadBalancing {
    check_keys(
        c,
        res,
        "loadBalancer",
        m,
        &[
            "routingPreferences",
            "routingPreference",
            "mode",
            "healthPolicy",
        ],
        &[],
    );
    let field = if m.contains_key("routingPreferences") {
        "routingPreferences"
    } else {
        "routingPreference"
    };
    let mut routing_preference = Vec::new();
    for (j, v) in list(c, res, &format!("loadBalancer.{field}"), m.get(field))
        .iter()
        .enumerate()
    {
        match as_str(v).as_deref().and_then(locality_scope) {
            Some(s) => routing_preference.push(s),
            None => c.err(
                res,
                &format!("loadBalancer.{field}[{j}]"),
                format!(
                    "{} is not Network, Region, Zone, Subzone, Node or Cluster",
                    key_str(v)
                ),
            ),
        }
    }
    let mode = match m.get("mode").and_then(as_str).as_deref() {
        None | Some("Standard") | Some("UNSPECIFIED_MODE") => LocalityMode::Standard,
        Some("Strict") | Some("STRICT") => LocalityMode::Strict,
        Some("Failover") | Some("FAILOVER") => LocalityMode::Failover,
        Some("Passthrough") | Some("PASSTHROUGH") => {
            c.err(
                res,
                "loadBalancer.mode",
                "Passthrough (send to the original destination, no service load balancing) is not supported by the kernel engine",
            );
            LocalityMode::Standard
        }
        Some(other) => {
            c.err(
                res,
                "loadBalancer.mode",
                format!("{other:?} is not Standard, Strict or Failover"),
            );
            LocalityMode::Standard
        }
    };
    let health_policy = match m.get("healthPolicy").and_then(as_str).as_deref() {
        None | Some("OnlyHealthy") | Some("ONLY_HEALTHY") => HealthPolicy::OnlyHealthy,
        Some("AllowAll") | Some("ALLOW_ALL") => HealthPolicy::AllowAll,
        Some(other) => {
            c.err(
                res,
                "loadBalancer.healthPolicy",
                format!("{other:?} is not OnlyHealthy or AllowAll"),
            );
            HealthPolicy::OnlyHealthy
        }
    };
    LoadBalancing {
        routing_preference,
        mode,
        health_policy,
    }
}

/// A `routing_preference` scope in ztunnel's or the proto's spelling.
fn locality_scope(s: &str) -> Option<LocalityScope> {
    Some(match s {
        "Network" | "NETWORK" => LocalityScope::Network,
        "Region" | "REGION" => LocalityScope::Region,
        "Zone" | "ZONE" => LocalityScope::Zone,
        "Subzone" | "SUBZONE" => LocalityScope::Subzone,
        "Node" | "NODE" => LocalityScope::Node,
        "Cluster" | "CLUSTER" => LocalityScope::Cluster,
        _ => return None,
    })
}

fn policy(c: &mut Ctx, i: usize, v: &Value) -> Option<Policy> {
    let Value::Mapping(m) = v else {
        c.err(&format!("policy[{i}]"), "", "must be a map");
        return None;
    };
    let res = label("policy", i, m);
    let before = c.errors.len();
    check_keys(
        c,
        &res,
        "",
        m,
        &["name", "namespace", "scope", "action", "rules", "dryRun"],
        &[],
    );
    let name = str_field(c, &res, m, "name", true);
    let namespace = str_field(c, &res, m, "namespace", true);
    let scope = match str_field(c, &res, m, "scope", true).as_str() {
        "Global" => Scope::Global,
        "Namespace" => Scope::Namespace,
        "WorkloadSelector" => Scope::WorkloadSelector,
        "" => Scope::Namespace,
        other => {
            c.err(
                &res,
                "scope",
                format!("{other:?} is not Global, Namespace or WorkloadSelector"),
            );
            Scope::Namespace
        }
    };
    let action = match str_field(c, &res, m, "action", true).as_str() {
        "Allow" => Action::Allow,
        "Deny" => Action::Deny,
        "" => Action::Allow,
        other => {
            c.err(&res, "action", format!("{other:?} is not Allow or Deny"));
            Action::Allow
        }
    };
    if m.get("dryRun").and_then(Value::as_bool) == Some(true) {
        c.err(
            &res,
            "dryRun",
            "dry-run policies are not supported by the kernel engine",
        );
    }
    let mut rules = Vec::new();
    for (r, rule) in list(c, &res, "rules", m.get("rules")).iter().enumerate() {
        let rf = format!("rules[{r}]");
        let mut clauses = Vec::new();
        for (k, clause) in list(c, &res, &rf, Some(rule)).iter().enumerate() {
            let cf = format!("{rf}[{k}]");
            // A clause is a list of matches, or `{matches: [...]}` as in the proto.
            let (items, mf) = match clause {
                Value::Mapping(cm) => {
                    check_keys(c, &res, &cf, cm, &["matches"], &[]);
                    (
                        list(c, &res, &format!("{cf}.matches"), cm.get("matches")),
                        format!("{cf}.matches"),
                    )
                }
                other => (list(c, &res, &cf, Some(other)), cf.clone()),
            };
            let mut matches = Vec::new();
            for (j, mv) in items.iter().enumerate() {
                matches.push(parse_match(c, &res, &format!("{mf}[{j}]"), mv, action));
            }
            clauses.push(matches);
        }
        rules.push(clauses);
    }
    (c.errors.len() == before).then_some(Policy {
        name,
        namespace,
        scope,
        action,
        rules,
    })
}

fn string_match(v: &Value) -> Option<StringMatch> {
    match v {
        Value::String(s) => Some(if s == "*" {
            StringMatch::Presence
        } else if let Some(x) = s.strip_prefix('*') {
            StringMatch::Suffix(x.to_string())
        } else if let Some(x) = s.strip_suffix('*') {
            StringMatch::Prefix(x.to_string())
        } else {
            StringMatch::Exact(s.clone())
        }),
        Value::Mapping(m) if m.len() == 1 => {
            let (k, v) = m.iter().next()?;
            let s = as_str(v);
            match key_str(k).as_str() {
                "Exact" | "exact" => s.map(StringMatch::Exact),
                "Prefix" | "prefix" => s.map(StringMatch::Prefix),
                "Suffix" | "suffix" => s.map(StringMatch::Suffix),
                "Presence" | "presence" => Some(StringMatch::Presence),
                _ => None,
            }
        }
        _ => None,
    }
}

/// `10.0.0.0/8`, `10.0.0.1` (a /32), `fd00::/64`; host bits are cleared.
pub(crate) fn parse_cidr(s: &str) -> Result<Cidr, String> {
    let (ip, len) = match s.split_once('/') {
        Some((ip, len)) => (ip, Some(len)),
        None => (s, None),
    };
    let addr: IpAddr = ip
        .parse()
        .map_err(|_| format!("{s:?}: {ip:?} is not an IP address"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = match len {
        None => max,
        Some(l) => l
            .parse::<u8>()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| format!("{s:?}: prefix length {l:?} is not 0-{max}"))?,
    };
    Cidr::new(addr, len).map_err(|e| format!("{s:?}: {e}"))
}

fn parse_match(c: &mut Ctx, res: &str, f: &str, v: &Value, action: Action) -> Match {
    let mut out = Match::default();
    let Value::Mapping(m) = v else {
        c.err(res, f, "a match must be a map of fields");
        return out;
    };
    const L4: &[&str] = &[
        "namespaces",
        "notNamespaces",
        "principals",
        "notPrincipals",
        "serviceAccounts",
        "notServiceAccounts",
        "sourceIps",
        "notSourceIps",
        "destinationIps",
        "notDestinationIps",
        "destinationPorts",
        "notDestinationPorts",
    ];
    check_keys(c, res, f, m, L4, L7_FIELDS);
    let strings = |c: &mut Ctx, name: &str| -> Vec<StringMatch> {
        let mut v = Vec::new();
        for (j, x) in list(c, res, &format!("{f}.{name}"), m.get(name))
            .iter()
            .enumerate()
        {
            match string_match(x) {
                Some(mut s) => {
                    // Principals are written without `spiffe://`; accept it.
                    if name.ends_with("rincipals") {
                        if let StringMatch::Exact(e) | StringMatch::Prefix(e) = &mut s {
                            if let Some(rest) = e.strip_prefix("spiffe://") {
                                *e = rest.to_string();
                            }
                        }
                    }
                    v.push(s)
                }
                None => c.err(
                    res,
                    &format!("{f}.{name}[{j}]"),
                    "must be a string (\"x\", \"x*\", \"*x\", \"*\") or {Exact|Prefix|Suffix: x} or {Presence: {}}",
                ),
            }
        }
        v
    };
    out.namespaces = strings(c, "namespaces");
    out.not_namespaces = strings(c, "notNamespaces");
    out.principals = strings(c, "principals");
    out.not_principals = strings(c, "notPrincipals");
    let sas = |c: &mut Ctx, name: &str| -> Vec<(String, String)> {
        let mut v = Vec::new();
        for (j, x) in list(c, res, &format!("{f}.{name}"), m.get(name))
            .iter()
            .enumerate()
        {
            let ns = x.get("namespace").and_then(as_str);
            let sa = x.get("serviceAccount").and_then(as_str);
            match (ns, sa) {
                (Some(ns), Some(sa)) => v.push((ns, sa)),
                _ => c.err(
                    res,
                    &format!("{f}.{name}[{j}]"),
                    "must be {namespace, serviceAccount}",
                ),
            }
        }
        v
    };
    out.service_accounts = sas(c, "serviceAccounts");
    out.not_service_accounts = sas(c, "notServiceAccounts");
    let cidrs = |c: &mut Ctx, name: &str| -> Vec<Cidr> {
        let mut v = Vec::new();
        for (j, x) in list(c, res, &format!("{f}.{name}"), m.get(name))
            .iter()
            .enumerate()
        {
            match as_str(x)
                .ok_or_else(|| "must be a string".to_string())
                .and_then(|s| parse_cidr(&s))
            {
                Ok(cidr) => v.push(cidr),
                Err(e) => c.err(
                    res,
                    &format!("{f}.{name}[{j}]"),
                    format!("CIDR does not parse: {e}"),
                ),
            }
        }
        v
    };
    out.source_ips = cidrs(c, "sourceIps");
    out.not_source_ips = cidrs(c, "notSourceIps");
    out.destination_ips = cidrs(c, "destinationIps");
    out.not_destination_ips = cidrs(c, "notDestinationIps");
    let ports = |c: &mut Ctx, name: &str| -> Vec<u16> {
        let mut v = Vec::new();
        for (j, x) in list(c, res, &format!("{f}.{name}"), m.get(name))
            .iter()
            .enumerate()
        {
            match port_of(x) {
                Some(p) => v.push(p),
                None => c.err(
                    res,
                    &format!("{f}.{name}[{j}]"),
                    format!("{} is not a port (0-65535)", key_str(x)),
                ),
            }
        }
        v
    };
    out.destination_ports = ports(c, "destinationPorts");
    out.not_destination_ports = ports(c, "notDestinationPorts");
    for l7 in L7_FIELDS {
        if m.contains_key(*l7) {
            out.l7_fields.push(l7.to_string());
            let what = match action {
                Action::Allow => "this match never matches (what it would allow is denied)",
                Action::Deny => "the field is ignored and the match's L4 part is denied",
            };
            c.warnings.push(format!(
                "{res}: field {f}.{l7}: an L7 attribute cannot be checked in the kernel; {what}"
            ));
        }
    }
    out
}

fn cross_check(c: &mut Ctx, workloads: &[Workload], services: &[Service], policies: &[Policy]) {
    let mut seen = BTreeSet::new();
    let mut ips: BTreeMap<IpAddr, String> = BTreeMap::new();
    for w in workloads {
        let res = format!("workload \"{}/{}\"", w.namespace, w.name);
        if !seen.insert((w.namespace.clone(), w.name.clone())) {
            c.err(&res, "name", "defined twice");
        }
        for ip in &w.ips {
            if let Some(prev) = ips.insert(*ip, res.clone()) {
                c.err(
                    &res,
                    "workloadIps",
                    format!("{ip} is already the address of {prev}"),
                );
            }
        }
    }
    let svc_keys: BTreeSet<String> = services.iter().map(Service::key).collect();
    for w in workloads {
        for k in w.services.keys() {
            if !svc_keys.contains(k) {
                c.err(
                    &format!("workload \"{}/{}\"", w.namespace, w.name),
                    &format!("services.{k}"),
                    "no service with this namespace/hostname",
                );
            }
        }
    }
    let mut vips: BTreeMap<(IpAddr, u16), String> = BTreeMap::new();
    let mut keys = BTreeSet::new();
    for s in services {
        let res = format!("service \"{}/{}\"", s.namespace, s.name);
        if !keys.insert(s.key()) {
            c.err(&res, "hostname", format!("{} is defined twice", s.key()));
        }
        for vip in &s.vips {
            for port in s.ports.keys() {
                if let Some(prev) = vips.insert((*vip, *port), res.clone()) {
                    c.err(
                        &res,
                        "vips",
                        format!("{vip}:{port} is already captured by {prev}"),
                    );
                }
            }
        }
    }
    let mut by_key: BTreeMap<String, &Policy> = BTreeMap::new();
    for p in policies {
        let res = format!("policy \"{}\"", p.key());
        if by_key.insert(p.key(), p).is_some() {
            c.err(&res, "name", "defined twice");
        }
    }
    // Overlap: two policies with the same scope, namespace, action and
    // rules that apply to the same workloads (for WorkloadSelector: the
    // same selecting workloads) are one policy under two names; one of
    // them is a mistake.
    let mut selected_by: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for w in workloads {
        for k in &w.authorization_policies {
            selected_by
                .entry(k.as_str())
                .or_default()
                .push(format!("{}/{}", w.namespace, w.name));
        }
    }
    let mut content: BTreeMap<String, String> = BTreeMap::new();
    for p in policies {
        let key = p.key();
        let targets = match p.scope {
            Scope::WorkloadSelector => selected_by.get(key.as_str()).cloned().unwrap_or_default(),
            _ => Vec::new(),
        };
        let body = format!("{:?}", (&p.namespace, p.scope, p.action, &p.rules, targets));
        if let Some(prev) = content.insert(body, p.key()) {
            if prev != p.key() {
                c.errors.push(
                    ConfigError::new(
                        format!("policy \"{}\"", p.key()),
                        "rules",
                        format!("overlaps policy \"{prev}\": same scope, action and rules"),
                    )
                    .with_hint("remove one of the two"),
                );
            }
        }
    }
    for w in workloads {
        for (j, k) in w.authorization_policies.iter().enumerate() {
            let res = format!("workload \"{}/{}\"", w.namespace, w.name);
            match by_key.get(k) {
                None => c.errors.push(
                    ConfigError::new(&res, format!("authorizationPolicies[{j}]"), format!("no policy {k:?}"))
                        .with_hint("a missing policy could let traffic through that it should stop; define it or remove the reference"),
                ),
                Some(p) if p.scope != Scope::WorkloadSelector => c.err(
                    &res,
                    &format!("authorizationPolicies[{j}]"),
                    format!("policy {k:?} has scope {:?}, not WorkloadSelector", p.scope),
                ),
                Some(_) => {}
            }
        }
    }
}
