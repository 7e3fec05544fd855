//! Request-dependent HTTP routes → the hashed tables the kernel's sk_msg
//! program matches a request head against (`kmesh_abi::l7`), and the same
//! matching on strings, which the connector uses to check every kernel
//! decision and to decide the requests the kernel leaves to it.
//!
//! Semantics follow Envoy's route matching:
//! - virtual host by Host (lowercased, port kept): exact domain, then the
//!   longest `*suffix`, then the longest `prefix*`, then `*`; none → 404;
//! - routes in order, the first whose path, header and query conditions all
//!   hold wins; none → 404;
//! - path: `prefix`, `path` (exact), `path_separated_prefix`, on the path
//!   before `?`, case-sensitive;
//! - headers (name lowercased, repeated headers joined with `,`): exact,
//!   prefix, present, each with `invert_match`; an absent header matches
//!   only `present_match: false`, or `present_match: true` inverted;
//! - query parameters: exact value or present, first occurrence of a name.
//!
//! What the tables cannot express (regex, ranges, `:method` and other
//! pseudo-headers, case-insensitive matching, more than `MAX_L7_ROUTES`
//! routes in a virtual host, more than `MAX_L7_COND_BITS` distinct
//! conditions, strings longer than `MAX_L7_MATCH` bytes) is an error naming
//! the field: such a listener is not installed, and connects to it are left
//! alone, never sent to a backend another route would pick.

use std::collections::BTreeMap;

use kmesh_abi::l7::{
    hash, L7CondKey, L7Group, L7Route as AbiRoute, L7Routes, COND_HDR_EXACT, COND_HDR_PREFIX,
    COND_HDR_PRESENT, COND_HOST, COND_PATH_EXACT, COND_PATH_PREFIX, COND_PATH_SEP,
    COND_QUERY_EXACT, COND_QUERY_PRESENT, L7_NONE, L7_WILDCARD_DOMAINS, MAX_L7_COND_BITS,
    MAX_L7_GROUP_CLUSTERS, MAX_L7_MATCH, MAX_L7_ROUTES,
};

use crate::model::TcpRoute;

/// How a route matches the path (before `?`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PathMatch {
    Prefix(String),
    Exact(String),
    /// `path_separated_prefix`: equal, or followed by `/`.
    Separated(String),
}

/// What a header matcher checks.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HeaderTest {
    Exact(String),
    Prefix(String),
    /// `present_match`.
    Present(bool),
}

/// A header matcher.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HeaderCond {
    /// Lowercased.
    pub name: String,
    pub test: HeaderTest,
    pub invert: bool,
}

/// A query parameter matcher: `value` None = present.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct QueryCond {
    pub name: String,
    pub value: Option<String>,
}

/// One route of a virtual host.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct L7Route {
    /// Position in the virtual host's `routes`.
    pub index: u32,
    pub path: PathMatch,
    pub headers: Vec<HeaderCond>,
    pub query: Vec<QueryCond>,
    pub action: TcpRoute,
}

/// One virtual host.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct L7Vhost {
    pub name: String,
    /// Lowercased.
    pub domains: Vec<String>,
    pub routes: Vec<L7Route>,
}

/// The routes of one HTTP listener, decided per request.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct L7Table {
    pub vhosts: Vec<L7Vhost>,
}

/// An HTTP listener on a VIP whose routes are decided per request.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct L7Listener {
    pub name: String,
    pub address: std::net::SocketAddr,
    pub table: L7Table,
}

/// A request as the matcher needs it.
#[derive(Debug, Clone, Default)]
pub struct Request<'a> {
    pub host: &'a str,
    /// Origin-form target: path and query.
    pub target: &'a str,
    /// In arrival order; names in any case.
    pub headers: Vec<(&'a str, &'a str)>,
}

/// The result of matching one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome<'t> {
    Route {
        vhost: u32,
        route: u32,
        action: &'t TcpRoute,
    },
    /// No virtual host or no route: Envoy answers 404.
    NoRoute,
}

impl L7Table {
    /// The virtual host Envoy picks for `host`.
    pub fn vhost_for(&self, host: &str) -> Option<usize> {
        let host = host.to_ascii_lowercase();
        let find = |f: &dyn Fn(&str) -> Option<usize>| -> Option<usize> {
            // (vhost, specificity): the longest wildcard wins.
            let mut best: Option<(usize, usize)> = None;
            for (i, v) in self.vhosts.iter().enumerate() {
                for d in &v.domains {
                    if let Some(n) = f(d) {
                        if best.is_none_or(|(_, m)| n > m) {
                            best = Some((i, n));
                        }
                    }
                }
            }
            best.map(|b| b.0)
        };
        find(&|d| (d == host).then_some(d.len()))
            .or_else(|| {
                find(&|d| {
                    let s = d.strip_prefix('*')?;
                    (!s.is_empty() && host.len() > s.len() && host.ends_with(s)).then_some(s.len())
                })
            })
            .or_else(|| {
                find(&|d| {
                    let p = d.strip_suffix('*')?;
                    (!p.is_empty() && host.len() > p.len() && host.starts_with(p))
                        .then_some(p.len())
                })
            })
            .or_else(|| find(&|d| (d == "*").then_some(0)))
    }

    /// Envoy's routing decision for `req`.
    pub fn route(&self, req: &Request<'_>) -> Outcome<'_> {
        let Some(vi) = self.vhost_for(req.host) else {
            return Outcome::NoRoute;
        };
        let (path, query) = match req.target.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (req.target, None),
        };
        for r in &self.vhosts[vi].routes {
            if path_matches(&r.path, path)
                && r.headers.iter().all(|h| header_matches(h, &req.headers))
                && r.query.iter().all(|q| query_matches(q, query))
            {
                return Outcome::Route {
                    vhost: vi as u32,
                    route: r.index,
                    action: &r.action,
                };
            }
        }
        Outcome::NoRoute
    }
}

fn path_matches(m: &PathMatch, path: &str) -> bool {
    match m {
        PathMatch::Prefix(p) => path.starts_with(p.as_str()),
        PathMatch::Exact(p) => path == p,
        PathMatch::Separated(p) => {
            path == p
                || (path.starts_with(p.as_str()) && path.as_bytes().get(p.len()) == Some(&b'/'))
        }
    }
}

fn header_matches(h: &HeaderCond, headers: &[(&str, &str)]) -> bool {
    let values: Vec<&str> = headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(&h.name))
        .map(|(_, v)| v.trim_matches([' ', '\t']))
        .collect();
    if values.is_empty() {
        return match h.test {
            HeaderTest::Present(p) => p == h.invert,
            _ => false,
        };
    }
    let joined = values.join(",");
    let m = match &h.test {
        HeaderTest::Exact(v) => joined == *v,
        HeaderTest::Prefix(v) => joined.starts_with(v.as_str()),
        HeaderTest::Present(p) => *p,
    };
    m != h.invert
}

fn query_matches(q: &QueryCond, query: Option<&str>) -> bool {
    let Some(query) = query else {
        return false;
    };
    let first = query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == q.name).then_some(v)
    });
    match (first, &q.value) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(v), Some(want)) => v == want,
    }
}

/// Kernel records of one L7 service (see `kmesh_abi::l7`), before ids
/// are given: the writer adds the service id to every key and maps route
/// actions (indexes into `actions`) to group ids and cluster names to
/// cluster ids.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct L7Records {
    /// `(kind, len, hash)` → bits (or vhost + 1 for `COND_HOST`).
    pub conds: BTreeMap<(u32, u32, u64), u64>,
    /// Per virtual host, its routes; `L7Route::group` indexes `actions`.
    pub vhosts: Vec<L7Routes>,
    pub actions: Vec<TcpRoute>,
    pub flags: u32,
    pub star_vhost: u32,
    pub path_prefix_lens: [u64; 2],
    pub hdr_prefix_lens: [u64; 2],
}

/// Why a table cannot be put in the kernel: (field path, message).
pub type LimitError = (String, String);

impl L7Table {
    /// The kernel records for this table, hashed with `seed`.
    pub fn records(&self, seed: u64) -> Result<L7Records, LimitError> {
        let mut out = L7Records {
            star_vhost: L7_NONE,
            ..L7Records::default()
        };
        let mut bits: BTreeMap<(u32, u32, u64), u64> = BTreeMap::new();
        let mut next_bit = 0usize;
        let mut bit = |key: (u32, u32, u64), field: &str| -> Result<u64, LimitError> {
            if key.1 as usize > MAX_L7_MATCH {
                return Err((
                    field.to_string(),
                    format!("matches {} bytes; the kernel matches at most MAX_L7_MATCH = {MAX_L7_MATCH}", key.1),
                ));
            }
            if let Some(b) = bits.get(&key) {
                return Ok(*b);
            }
            if next_bit == MAX_L7_COND_BITS {
                return Err((
                    field.to_string(),
                    format!("more than MAX_L7_COND_BITS = {MAX_L7_COND_BITS} distinct conditions in one route configuration"),
                ));
            }
            let b = 1u64 << next_bit;
            next_bit += 1;
            bits.insert(key, b);
            Ok(b)
        };
        let set_len = |lens: &mut [u64; 2], n: usize| lens[n >> 6] |= 1 << (n & 63);
        for (vi, vh) in self.vhosts.iter().enumerate() {
            let vpath = format!("virtual_hosts[{vi}]");
            for d in &vh.domains {
                if d == "*" {
                    out.star_vhost = vi as u32;
                } else if d.starts_with('*') || d.ends_with('*') {
                    out.flags |= L7_WILDCARD_DOMAINS;
                } else {
                    if d.len() > MAX_L7_MATCH {
                        return Err((
                            format!("{vpath}.domains"),
                            format!(
                                "domain {d:?} is longer than MAX_L7_MATCH = {MAX_L7_MATCH} bytes"
                            ),
                        ));
                    }
                    out.conds.insert(
                        (COND_HOST, d.len() as u32, hash(seed, d.as_bytes())),
                        vi as u64 + 1,
                    );
                }
            }
            if vh.routes.len() > MAX_L7_ROUTES {
                return Err((format!("{vpath}.routes"), format!("{} routes; the kernel evaluates at most MAX_L7_ROUTES = {MAX_L7_ROUTES} per virtual host", vh.routes.len())));
            }
            let mut table = L7Routes {
                count: vh.routes.len() as u32,
                ..L7Routes::default()
            };
            for (j, r) in vh.routes.iter().enumerate() {
                let rpath = format!("{vpath}.routes[{}].match", r.index);
                let (mut need, mut forbid) = (0u64, 0u64);
                let p = |s: &str| (s.len() as u32, hash(seed, s.as_bytes()));
                match &r.path {
                    PathMatch::Prefix(s) if s.is_empty() || s == "/" => {}
                    PathMatch::Prefix(s) => {
                        let (l, h) = p(s);
                        need |= bit((COND_PATH_PREFIX, l, h), &format!("{rpath}.prefix"))?;
                        set_len(&mut out.path_prefix_lens, s.len());
                    }
                    PathMatch::Exact(s) => {
                        let (l, h) = p(s);
                        need |= bit((COND_PATH_EXACT, l, h), &format!("{rpath}.path"))?;
                    }
                    PathMatch::Separated(s) => {
                        let (l, h) = p(s);
                        need |= bit(
                            (COND_PATH_SEP, l, h),
                            &format!("{rpath}.path_separated_prefix"),
                        )?;
                    }
                }
                for (k, hc) in r.headers.iter().enumerate() {
                    let field = format!("{rpath}.headers[{k}]");
                    let present = bit(
                        (
                            COND_HDR_PRESENT,
                            hc.name.len() as u32,
                            hash(seed, hc.name.as_bytes()),
                        ),
                        &field,
                    )?;
                    let value = |v: &str| format!("{}:{v}", hc.name);
                    match &hc.test {
                        HeaderTest::Exact(v) | HeaderTest::Prefix(v) => {
                            let s = value(v);
                            let kind = if matches!(hc.test, HeaderTest::Exact(_)) {
                                COND_HDR_EXACT
                            } else {
                                COND_HDR_PREFIX
                            };
                            if kind == COND_HDR_PREFIX {
                                set_len(&mut out.hdr_prefix_lens, s.len().min(MAX_L7_MATCH));
                            }
                            let b = bit((kind, s.len() as u32, hash(seed, s.as_bytes())), &field)?;
                            if hc.invert {
                                // Absent header: no match (Envoy).
                                need |= present;
                                forbid |= b;
                            } else {
                                need |= b;
                            }
                        }
                        HeaderTest::Present(p) => {
                            if *p != hc.invert {
                                need |= present;
                            } else {
                                forbid |= present;
                            }
                        }
                    }
                }
                for (k, q) in r.query.iter().enumerate() {
                    let field = format!("{rpath}.query_parameters[{k}]");
                    let b = match &q.value {
                        None => bit(
                            (
                                COND_QUERY_PRESENT,
                                q.name.len() as u32,
                                hash(seed, q.name.as_bytes()),
                            ),
                            &field,
                        )?,
                        Some(v) => {
                            let s = format!("{}={v}", q.name);
                            // The name's present bit marks its first occurrence.
                            bit(
                                (
                                    COND_QUERY_PRESENT,
                                    q.name.len() as u32,
                                    hash(seed, q.name.as_bytes()),
                                ),
                                &field,
                            )?;
                            bit(
                                (COND_QUERY_EXACT, s.len() as u32, hash(seed, s.as_bytes())),
                                &field,
                            )?
                        }
                    };
                    need |= b;
                }
                if r.action.clusters().len() > MAX_L7_GROUP_CLUSTERS {
                    return Err((
                        format!("{vpath}.routes[{}].route.weighted_clusters", r.index),
                        format!(
                            "more than MAX_L7_GROUP_CLUSTERS = {MAX_L7_GROUP_CLUSTERS} clusters"
                        ),
                    ));
                }
                let group = out
                    .actions
                    .iter()
                    .position(|a| *a == r.action)
                    .unwrap_or_else(|| {
                        out.actions.push(r.action.clone());
                        out.actions.len() - 1
                    });
                table.routes[j] = AbiRoute {
                    need,
                    forbid,
                    group: group as u32,
                    index: r.index,
                };
            }
            out.vhosts.push(table);
        }
        for (k, b) in bits {
            *out.conds.entry(k).or_insert(0) |= b;
        }
        Ok(out)
    }
}

/// A group record for `action`, with cluster ids from `id_of`.
pub fn group_record(action: &TcpRoute, mut id_of: impl FnMut(&str) -> u32) -> L7Group {
    let mut g = L7Group::default();
    for (j, (c, w)) in action
        .clusters()
        .into_iter()
        .enumerate()
        .take(MAX_L7_GROUP_CLUSTERS)
    {
        g.total += w;
        g.clusters[j] = id_of(c);
        g.cum[j] = g.total;
        g.count += 1;
    }
    g
}

/// The condition key as the kernel map holds it.
pub fn cond_key(l7_id: u32, (kind, len, hash): (u32, u32, u64)) -> L7CondKey {
    L7CondKey {
        l7_id,
        kind,
        len,
        pad: 0,
        hash,
    }
}
