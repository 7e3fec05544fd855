//! `RouteConfiguration` protos → [`L7Table`], for route configurations whose
//! decision depends on the request (see `http.rs`: those cannot be decided
//! at connect time).
//!
//! Only what the kernel tables and the string matcher implement with
//! Envoy's exact semantics is accepted; anything else (regex, suffix or
//! contains matchers, case-insensitive matching, pseudo-headers, cookies,
//! runtime fractions, redirects, direct responses, …) fails the whole table
//! with the field path, and the listener is left alone: never a request
//! sent where Envoy would not send it.

use envoy_types::pb::envoy::config::route::v3 as pb_route;
use envoy_types::pb::envoy::r#type::matcher::v3 as pb_matcher;

use crate::error::{index, join, Diag};
use crate::http::route_action;
use crate::l7::{HeaderCond, HeaderTest, L7Route, L7Table, L7Vhost, PathMatch, QueryCond};

/// (field path, why).
pub(crate) type Unsupported = (String, String);

/// A table and the cluster references of its actions (name, field path).
pub(crate) type Compiled = (L7Table, Vec<(String, String)>);

/// The table Envoy would route `rc` with, or the first field the kernel
/// tables cannot express. Field paths are relative to `path` (the route
/// configuration's own path in its resource).
pub(crate) fn l7_table(
    rc: &pb_route::RouteConfiguration,
    res: &str,
    path: &str,
) -> Result<Compiled, Unsupported> {
    let mut vhosts = Vec::with_capacity(rc.virtual_hosts.len());
    let mut refs = Vec::new();
    for (i, vh) in rc.virtual_hosts.iter().enumerate() {
        let vpath = index(&join(path, "virtual_hosts"), i);
        let mut routes = Vec::with_capacity(vh.routes.len());
        for (j, r) in vh.routes.iter().enumerate() {
            let rpath = index(&join(&vpath, "routes"), j);
            let m = r
                .r#match
                .as_ref()
                .ok_or_else(|| (join(&rpath, "match"), "route has no match".to_string()))?;
            let mpath = join(&rpath, "match");
            // Errors of the action are reported where the route
            // configuration is checked; here only whether it forwards.
            let mut scratch = Diag::default();
            let (action, r_refs) =
                route_action(r, &mut scratch, &mut Diag::default(), res, &rpath, "").map_err(
                    |why| {
                        (
                            join(&rpath, "route"),
                            format!("the route is not a forward to clusters: {why}"),
                        )
                    },
                )?;
            refs.extend(r_refs);
            routes.push(L7Route {
                index: j as u32,
                path: path_match(m, &mpath)?,
                headers: m
                    .headers
                    .iter()
                    .enumerate()
                    .map(|(k, h)| {
                        HeaderCond::try_from(h).map_err(|e| (index(&join(&mpath, "headers"), k), e))
                    })
                    .collect::<Result<_, _>>()?,
                query: m
                    .query_parameters
                    .iter()
                    .enumerate()
                    .map(|(k, q)| {
                        QueryCond::try_from(q)
                            .map_err(|e| (index(&join(&mpath, "query_parameters"), k), e))
                    })
                    .collect::<Result<_, _>>()?,
                action,
            });
        }
        vhosts.push(L7Vhost {
            name: vh.name.clone(),
            domains: vh.domains.iter().map(|d| d.to_ascii_lowercase()).collect(),
            routes,
        });
    }
    let table = L7Table { vhosts };
    // The limits do not depend on the seed: check them now, so that the
    // listener is refused here rather than when the daemon installs it.
    table.records(0).map_err(|(f, msg)| (join(path, &f), msg))?;
    Ok((table, refs))
}

fn path_match(m: &pb_route::RouteMatch, mpath: &str) -> Result<PathMatch, Unsupported> {
    use pb_route::route_match::PathSpecifier;
    let unsupported = |field: &str, what: &str| {
        Err((
            join(mpath, field),
            format!("{what} is not supported by in-kernel HTTP routing"),
        ))
    };
    if m.case_sensitive.as_ref().is_some_and(|c| !c.value) {
        return unsupported("case_sensitive", "case-insensitive path matching");
    }
    for (set, field) in [
        (!m.cookies.is_empty(), "cookies"),
        (m.grpc.is_some(), "grpc"),
        (m.tls_context.is_some(), "tls_context"),
        (m.runtime_fraction.is_some(), "runtime_fraction"),
        (!m.dynamic_metadata.is_empty(), "dynamic_metadata"),
        (!m.filter_state.is_empty(), "filter_state"),
    ] {
        if set {
            return unsupported(field, &format!("matching on {field}"));
        }
    }
    match &m.path_specifier {
        Some(PathSpecifier::Prefix(p)) => Ok(PathMatch::Prefix(p.clone())),
        Some(PathSpecifier::Path(p)) => Ok(PathMatch::Exact(p.clone())),
        Some(PathSpecifier::PathSeparatedPrefix(p)) => Ok(PathMatch::Separated(p.clone())),
        Some(PathSpecifier::SafeRegex(_)) => unsupported("safe_regex", "a regex path"),
        Some(PathSpecifier::ConnectMatcher(_)) => unsupported("connect_matcher", "CONNECT"),
        Some(_) => unsupported("path_match_policy", "a path match policy"),
        None => Err((
            mpath.to_string(),
            "route match has no path specifier".into(),
        )),
    }
}

/// Exact or prefix of a `StringMatcher`, case-sensitive.
fn plain(s: &pb_matcher::StringMatcher) -> Result<HeaderTest, String> {
    use pb_matcher::string_matcher::MatchPattern;
    if s.ignore_case {
        return Err("string_match.ignore_case is not supported by in-kernel HTTP routing".into());
    }
    match &s.match_pattern {
        Some(MatchPattern::Exact(v)) => Ok(HeaderTest::Exact(v.clone())),
        Some(MatchPattern::Prefix(v)) => Ok(HeaderTest::Prefix(v.clone())),
        _ => Err(
            "string_match: only exact and prefix are supported by in-kernel HTTP routing".into(),
        ),
    }
}

impl TryFrom<&pb_route::HeaderMatcher> for HeaderCond {
    type Error = String;

    // `exact_match`/`prefix_match` are deprecated in favour of `string_match`
    // but still what many configurations (and Istio) write.
    #[allow(deprecated)]
    fn try_from(h: &pb_route::HeaderMatcher) -> Result<Self, String> {
        use pb_route::header_matcher::HeaderMatchSpecifier as S;
        let name = h.name.to_ascii_lowercase();
        if name.is_empty() {
            return Err("header matcher has no name".into());
        }
        if name.starts_with(':') {
            return Err(format!(
                "pseudo-header {name:?} is not supported by in-kernel HTTP routing"
            ));
        }
        if h.treat_missing_header_as_empty {
            return Err(
                "treat_missing_header_as_empty is not supported by in-kernel HTTP routing".into(),
            );
        }
        let test = match &h.header_match_specifier {
            Some(S::ExactMatch(v)) => HeaderTest::Exact(v.clone()),
            Some(S::PrefixMatch(v)) => HeaderTest::Prefix(v.clone()),
            Some(S::PresentMatch(p)) => HeaderTest::Present(*p),
            Some(S::StringMatch(s)) => plain(s)?,
            // Envoy: no specifier = the header is present.
            None => HeaderTest::Present(true),
            Some(_) => {
                return Err(
                    "only exact, prefix, present and string_match (exact/prefix) header matchers are supported by in-kernel HTTP routing".into(),
                )
            }
        };
        Ok(HeaderCond {
            name,
            test,
            invert: h.invert_match,
        })
    }
}

impl TryFrom<&pb_route::QueryParameterMatcher> for QueryCond {
    type Error = String;

    fn try_from(q: &pb_route::QueryParameterMatcher) -> Result<Self, String> {
        use pb_route::query_parameter_matcher::QueryParameterMatchSpecifier as S;
        if q.name.is_empty() {
            return Err("query parameter matcher has no name".into());
        }
        let value = match &q.query_parameter_match_specifier {
            Some(S::StringMatch(s)) => match plain(s)? {
                HeaderTest::Exact(v) => Some(v),
                _ => {
                    return Err(
                        "query parameters: only exact string_match is supported by in-kernel HTTP routing".into(),
                    )
                }
            },
            Some(S::PresentMatch(true)) | None => None,
            Some(S::PresentMatch(false)) => {
                return Err("present_match: false is not supported by in-kernel HTTP routing".into())
            }
        };
        Ok(QueryCond {
            name: q.name.clone(),
            value,
        })
    }
}
