//! Static configuration documents → [`Resources`]: an Envoy v3 bootstrap
//! (YAML or JSON) or an Envoy admin `/config_dump` (JSON).

use serde_json::{Map, Value};

use crate::decode::{decode_resource, describe};
use crate::error::{index, join, ConfigError, ConfigErrors, Diag};
use crate::schema::{self, MsgSchema};
use crate::Resources;

const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const CLA_TYPE: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

const BOOTSTRAP: &str = "bootstrap";
const CONFIG_DUMP: &str = "config_dump";

/// Parses a static config document; see [`crate::parse_static_config`].
pub(crate) fn parse_static_config(text: &str) -> Result<Resources, ConfigErrors> {
    let doc = parse_document(text)?;
    let mut diag = Diag::default();
    let mut res = Resources::default();
    match &doc {
        Value::Object(top) if top.contains_key("configs") => config_dump(top, &mut res, &mut diag),
        Value::Object(top) => bootstrap(top, &mut res, &mut diag),
        other => diag.error_hint(
            "document",
            "",
            format!(
                "expected a mapping at the top level, got {}",
                describe(other)
            ),
            "a static config is an Envoy bootstrap (static_resources: …) or an admin /config_dump",
        ),
    }
    if diag.errors.is_empty() {
        Ok(res)
    } else {
        Err(ConfigErrors(diag.errors))
    }
}

/// Text → JSON value. JSON-looking text is parsed as JSON first; everything
/// else (and JSON that fails, in case it is YAML flow style) as YAML.
fn parse_document(text: &str) -> Result<Value, ConfigErrors> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let doc_err = |m: String| ConfigErrors::from(ConfigError::new("document", "", m));
    if text.trim().is_empty() {
        return Err(doc_err("the document is empty".into()));
    }
    let mut start = text.trim_start().chars().filter(|c| !c.is_whitespace());
    let first_two = (start.next(), start.next());
    if matches!(first_two.0, Some('{' | '[')) {
        let json_err = match serde_json::from_str::<Value>(text) {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        // `{"…` or `[…` is JSON: report its syntax error rather than let the
        // more lenient YAML parser read something else into it. Flow-style
        // YAML with bare keys (`{static_resources: …}`) is still YAML.
        if first_two == (Some('{'), Some('"')) || first_two.0 == Some('[') {
            return Err(doc_err(format!("JSON syntax error: {json_err}")));
        }
    }
    parse_yaml(text).map_err(doc_err)
}

/// Deepest `[`/`{` nesting the YAML path accepts. The YAML parser's own
/// recursion limit is lower, but it only applies after parsing, which takes
/// quadratic time in the flow nesting depth.
const MAX_FLOW_DEPTH: usize = 200;

/// The deepest flow-collection nesting in YAML text (brackets inside quoted
/// scalars are skipped; the quote tracking is approximate, which can only
/// make the result smaller).
fn flow_depth(text: &str) -> usize {
    let (mut depth, mut max) = (0usize, 0usize);
    let mut prev = '\n';
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                while let Some(q) = chars.next() {
                    match q {
                        '\\' => {
                            chars.next();
                        }
                        '"' => break,
                        _ => {}
                    }
                }
            }
            '\'' if prev.is_whitespace() || matches!(prev, '[' | '{' | ',' | ':') => {
                while let Some(q) = chars.next() {
                    if q == '\'' {
                        if chars.peek() == Some(&'\'') {
                            chars.next();
                        } else {
                            break;
                        }
                    }
                }
            }
            '[' | '{' => {
                depth += 1;
                max = max.max(depth);
            }
            ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        prev = c;
    }
    max
}

fn parse_yaml(text: &str) -> Result<Value, String> {
    if flow_depth(text) > MAX_FLOW_DEPTH {
        return Err(format!(
            "the document nests deeper than {MAX_FLOW_DEPTH} levels"
        ));
    }
    let mut y: serde_yaml::Value =
        serde_yaml::from_str(text).map_err(|e| format!("YAML syntax error: {e}"))?;
    y.apply_merge()
        .map_err(|e| format!("YAML merge key error: {e}"))?;
    let v = yaml_to_json(y, "")?;
    if v.is_null() {
        return Err("the document is empty".into());
    }
    Ok(v)
}

fn yaml_to_json(y: serde_yaml::Value, path: &str) -> Result<Value, String> {
    use serde_yaml::Value as Y;
    let at = |path: &str| {
        if path.is_empty() {
            "at the top level".to_string()
        } else {
            format!("at {path}")
        }
    };
    Ok(match y {
        Y::Null => Value::Null,
        Y::Bool(b) => Value::Bool(b),
        Y::Number(n) => {
            if let Some(u) = n.as_u64() {
                Value::from(u)
            } else if let Some(i) = n.as_i64() {
                Value::from(i)
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                match serde_json::Number::from_f64(f) {
                    Some(num) => Value::Number(num),
                    // proto3 JSON spells non-finite floats as strings.
                    None if f.is_nan() => Value::from("NaN"),
                    None if f > 0.0 => Value::from("Infinity"),
                    None => Value::from("-Infinity"),
                }
            }
        }
        Y::String(s) => Value::String(s),
        Y::Sequence(items) => Value::Array(
            items
                .into_iter()
                .enumerate()
                .map(|(i, item)| yaml_to_json(item, &index(path, i)))
                .collect::<Result<_, _>>()?,
        ),
        Y::Mapping(m) => {
            let mut out = Map::new();
            for (k, v) in m {
                let key = match k {
                    Y::String(s) => s,
                    Y::Number(n) => n.to_string(),
                    Y::Bool(b) => b.to_string(),
                    other => {
                        return Err(format!(
                            "YAML mapping keys must be strings ({}, got {other:?})",
                            at(path)
                        ))
                    }
                };
                let child = join(path, &key);
                let value = yaml_to_json(v, &child)?;
                out.insert(key, value);
            }
            Value::Object(out)
        }
        Y::Tagged(t) => {
            return Err(format!(
                "YAML tags ({}) are not supported ({})",
                t.tag,
                at(path)
            ));
        }
    })
}

/// lowerCamelCase of a snake_case name.
fn camel(snake: &str) -> String {
    let mut out = String::with_capacity(snake.len());
    let mut upper = false;
    for c in snake.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.push(c.to_ascii_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// Wrapper objects (config_dump entries): allowed keys by proto name (the
/// lowerCamelCase spelling is accepted too); unknown keys are errors.
struct Wrapper<'a> {
    obj: &'a Map<String, Value>,
}

impl<'a> Wrapper<'a> {
    fn new(
        v: &'a Value,
        allowed: &[&str],
        resource: &str,
        path: &str,
        diag: &mut Diag,
    ) -> Option<Wrapper<'a>> {
        let Some(obj) = v.as_object() else {
            diag.error(
                resource,
                path,
                format!("expected an object, got {}", describe(v)),
            );
            return None;
        };
        for key in obj.keys() {
            if key != "@type" && !allowed.iter().any(|a| a == key || camel(a) == *key) {
                diag.error(resource, &join(path, key), "unknown field");
            }
        }
        Some(Wrapper { obj })
    }

    /// The value of `name` (by proto or JSON name) and the key it was found under.
    fn get(&self, name: &str) -> Option<(&'a str, &'a Value)> {
        let camel = camel(name);
        self.obj
            .iter()
            .find(|(k, v)| (*k == name || **k == camel) && !v.is_null())
            .map(|(k, v)| (k.as_str(), v))
    }

    /// The elements of the list `name` with their paths.
    fn list(
        &self,
        name: &str,
        resource: &str,
        path: &str,
        diag: &mut Diag,
    ) -> Vec<(String, &'a Value)> {
        match self.get(name) {
            None => Vec::new(),
            Some((key, Value::Array(items))) => {
                let p = join(path, key);
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| (index(&p, i), v))
                    .collect()
            }
            Some((key, other)) => {
                let msg = format!("expected a list, got {}", describe(other));
                diag.error(resource, &join(path, key), msg);
                Vec::new()
            }
        }
    }
}

fn bootstrap(top: &Map<String, Value>, res: &mut Resources, diag: &mut Diag) {
    for (key, val) in top {
        match schema::BOOTSTRAP.field(key) {
            Some(f) if f.name == "static_resources" => static_resources(key, val, res, diag),
            // Known to Envoy, irrelevant to the kernel dataplane.
            Some(_) => {}
            None => {
                let hint = match key.as_str() {
                    "listeners" | "clusters" => Some(format!("`{key}` belongs under static_resources")),
                    "resources" | "version_info" | "versionInfo" => Some(
                        "this looks like an xDS DiscoveryResponse; give a bootstrap or an admin /config_dump".into(),
                    ),
                    _ => schema::BOOTSTRAP.suggest(key).map(|s| format!("did you mean `{s}`?")),
                };
                match hint {
                    Some(h) => diag.error_hint(BOOTSTRAP, key, "unknown top-level field", h),
                    None => diag.error(BOOTSTRAP, key, "unknown top-level field"),
                }
            }
        }
    }
}

fn static_resources(key: &str, val: &Value, res: &mut Resources, diag: &mut Diag) {
    let Some(obj) = val.as_object() else {
        if !val.is_null() {
            diag.error(
                BOOTSTRAP,
                key,
                format!("expected an object, got {}", describe(val)),
            );
        }
        return;
    };
    for (k, v) in obj {
        let path = join(key, k);
        let Some(f) = schema::STATIC_RESOURCES.field(k) else {
            match schema::STATIC_RESOURCES.suggest(k) {
                Some(s) => diag.error_hint(
                    BOOTSTRAP,
                    &path,
                    "unknown field",
                    format!("did you mean `{s}`?"),
                ),
                None => diag.error(BOOTSTRAP, &path, "unknown field"),
            }
            continue;
        };
        if v.is_null() || f.name == "secrets" {
            // Secrets are only used by TLS transport sockets, which are
            // reported (and ignored) where they are referenced.
            continue;
        }
        let Some(items) = v.as_array() else {
            diag.error(
                BOOTSTRAP,
                &path,
                format!("expected a list, got {}", describe(v)),
            );
            continue;
        };
        for (i, item) in items.iter().enumerate() {
            let p = index(&path, i);
            match f.name {
                "listeners" => {
                    if let Some(l) = resource(item, Kind::Listener, BOOTSTRAP, &p, diag) {
                        res.listeners.push(l);
                    }
                }
                _ => {
                    if let Some(c) = resource(item, Kind::Cluster, BOOTSTRAP, &p, diag) {
                        res.clusters.push(c);
                    }
                }
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Listener,
    Cluster,
    LoadAssignment,
    RouteConfig,
}

impl Kind {
    fn schema(self) -> &'static MsgSchema {
        match self {
            Kind::Listener => schema::LISTENER,
            Kind::Cluster => schema::CLUSTER,
            Kind::LoadAssignment => schema::CLUSTER_LOAD_ASSIGNMENT,
            Kind::RouteConfig => schema::ROUTE_CONFIGURATION,
        }
    }

    fn type_url(self) -> &'static str {
        match self {
            Kind::Listener => LISTENER_TYPE,
            Kind::Cluster => CLUSTER_TYPE,
            Kind::LoadAssignment => CLA_TYPE,
            Kind::RouteConfig => "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
        }
    }

    fn word(self) -> &'static str {
        match self {
            Kind::Listener => "listener",
            Kind::Cluster => "cluster",
            Kind::LoadAssignment => "cluster_load_assignment",
            Kind::RouteConfig => "route_configuration",
        }
    }

    fn name_keys(self) -> [&'static str; 2] {
        match self {
            Kind::LoadAssignment => ["cluster_name", "clusterName"],
            _ => ["name", "name"],
        }
    }
}

/// The label errors use for a resource object: `listener "web"`, or its
/// document path when it has no usable name.
fn label(obj: &Map<String, Value>, kind: Kind, path: &str) -> String {
    let name = kind
        .name_keys()
        .iter()
        .find_map(|k| obj.get(*k))
        .and_then(Value::as_str);
    match name {
        Some(n) if !n.is_empty() => format!("{} {n:?}", kind.word()),
        _ => format!("{} at {path}", kind.word()),
    }
}

/// Decodes one resource object (optionally carrying the `@type` of its
/// `Any` wrapper, as in a config_dump).
fn resource<M: prost::Message + Default>(
    v: &Value,
    kind: Kind,
    doc_resource: &str,
    path: &str,
    diag: &mut Diag,
) -> Option<M> {
    let Some(obj) = v.as_object() else {
        diag.error(
            doc_resource,
            path,
            format!("expected an object, got {}", describe(v)),
        );
        return None;
    };
    let label = label(obj, kind, path);
    let mut body = obj.clone();
    if let Some(t) = body.remove("@type") {
        if t.as_str() != Some(kind.type_url()) {
            diag.error(
                &label,
                "@type",
                format!("expected {}, got {}", kind.type_url(), describe(&t)),
            );
            return None;
        }
    }
    decode_resource(kind.schema(), &body, &label, diag)
}

fn config_dump(top: &Map<String, Value>, res: &mut Resources, diag: &mut Diag) {
    for key in top.keys() {
        if key != "configs" {
            diag.error(CONFIG_DUMP, key, "unknown field");
        }
    }
    let Some(configs) = top.get("configs").and_then(Value::as_array) else {
        let got = top.get("configs").map(describe).unwrap_or_default();
        diag.error(
            CONFIG_DUMP,
            "configs",
            format!("expected a list, got {got}"),
        );
        return;
    };
    for (i, entry) in configs.iter().enumerate() {
        let path = index("configs", i);
        let type_url = match entry.get("@type") {
            Some(Value::String(s)) => s.as_str(),
            _ => {
                diag.error(
                    CONFIG_DUMP,
                    &join(&path, "@type"),
                    "missing or not a string",
                );
                continue;
            }
        };
        let kind = type_url.rsplit('/').next().unwrap_or_default();
        match kind {
            "envoy.admin.v3.ListenersConfigDump" => listeners_dump(entry, &path, res, diag),
            "envoy.admin.v3.ClustersConfigDump" => clusters_dump(entry, &path, res, diag),
            "envoy.admin.v3.EndpointsConfigDump" => endpoints_dump(entry, &path, res, diag),
            "envoy.admin.v3.RoutesConfigDump" => routes_dump(entry, &path, res, diag),
            // Bootstrap, secrets, …: not needed (the bootstrap's static
            // resources are also in the listener and cluster dumps).
            _ => {}
        }
    }
}

fn listeners_dump(entry: &Value, path: &str, res: &mut Resources, diag: &mut Diag) {
    let allowed = ["version_info", "static_listeners", "dynamic_listeners"];
    let Some(w) = Wrapper::new(entry, &allowed, CONFIG_DUMP, path, diag) else {
        return;
    };
    for (p, item) in w.list("static_listeners", CONFIG_DUMP, path, diag) {
        let Some(s) = Wrapper::new(item, &["listener", "last_updated"], CONFIG_DUMP, &p, diag)
        else {
            continue;
        };
        if let Some((k, l)) = s.get("listener") {
            if let Some(l) = resource(l, Kind::Listener, CONFIG_DUMP, &join(&p, k), diag) {
                res.listeners.push(l);
            }
        }
    }
    let dynamic = [
        "name",
        "active_state",
        "warming_state",
        "draining_state",
        "error_state",
        "client_status",
    ];
    for (p, item) in w.list("dynamic_listeners", CONFIG_DUMP, path, diag) {
        let Some(d) = Wrapper::new(item, &dynamic, CONFIG_DUMP, &p, diag) else {
            continue;
        };
        // Only the active version serves traffic; warming and draining
        // versions are not programmed.
        let Some((k, active)) = d.get("active_state") else {
            continue;
        };
        let sp = join(&p, k);
        let state = ["version_info", "listener", "last_updated"];
        let Some(s) = Wrapper::new(active, &state, CONFIG_DUMP, &sp, diag) else {
            continue;
        };
        if let Some((k, l)) = s.get("listener") {
            if let Some(l) = resource(l, Kind::Listener, CONFIG_DUMP, &join(&sp, k), diag) {
                res.listeners.push(l);
            }
        }
    }
}

fn clusters_dump(entry: &Value, path: &str, res: &mut Resources, diag: &mut Diag) {
    let allowed = [
        "version_info",
        "static_clusters",
        "dynamic_active_clusters",
        "dynamic_warming_clusters",
    ];
    let Some(w) = Wrapper::new(entry, &allowed, CONFIG_DUMP, path, diag) else {
        return;
    };
    let members = [
        "version_info",
        "cluster",
        "last_updated",
        "error_state",
        "client_status",
    ];
    for list in ["static_clusters", "dynamic_active_clusters"] {
        for (p, item) in w.list(list, CONFIG_DUMP, path, diag) {
            let Some(s) = Wrapper::new(item, &members, CONFIG_DUMP, &p, diag) else {
                continue;
            };
            if let Some((k, c)) = s.get("cluster") {
                if let Some(c) = resource(c, Kind::Cluster, CONFIG_DUMP, &join(&p, k), diag) {
                    res.clusters.push(c);
                }
            }
        }
    }
}

fn endpoints_dump(entry: &Value, path: &str, res: &mut Resources, diag: &mut Diag) {
    let lists = ["static_endpoint_configs", "dynamic_endpoint_configs"];
    res.load_assignments.extend(config_list(
        entry,
        path,
        diag,
        lists,
        "endpoint_config",
        Kind::LoadAssignment,
    ));
}

/// Route configurations, for listeners that take theirs by RDS.
fn routes_dump(entry: &Value, path: &str, res: &mut Resources, diag: &mut Diag) {
    let lists = ["static_route_configs", "dynamic_route_configs"];
    res.route_configs.extend(config_list(
        entry,
        path,
        diag,
        lists,
        "route_config",
        Kind::RouteConfig,
    ));
}

/// The resources of a dump made of two lists (`lists`) of entries
/// `{version_info, <member>: resource, last_updated, …}`.
fn config_list<M: prost::Message + Default>(
    entry: &Value,
    path: &str,
    diag: &mut Diag,
    lists: [&str; 2],
    member: &str,
    kind: Kind,
) -> Vec<M> {
    let mut out = Vec::new();
    let Some(w) = Wrapper::new(entry, &lists, CONFIG_DUMP, path, diag) else {
        return out;
    };
    let members = [
        "version_info",
        member,
        "last_updated",
        "error_state",
        "client_status",
    ];
    for list in lists {
        for (p, item) in w.list(list, CONFIG_DUMP, path, diag) {
            let Some(s) = Wrapper::new(item, &members, CONFIG_DUMP, &p, diag) else {
                continue;
            };
            if let Some((k, e)) = s.get(member) {
                let p = join(&p, k);
                out.extend(resource(e, kind, CONFIG_DUMP, &p, diag));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_depths() {
        assert_eq!(flow_depth("a: [1, {b: [2]}]"), 3);
        assert_eq!(flow_depth("a: \"[[[[\"\nb: '{{{{'\nc: it's [x]"), 1);
        assert_eq!(flow_depth("a: 'x''[[['"), 0);
        let deep = format!("a: {}", "[".repeat(300));
        let e = parse_static_config(&deep).unwrap_err();
        assert_eq!(
            e.to_string(),
            "document: the document nests deeper than 200 levels"
        );
    }

    #[test]
    fn camel_names() {
        assert_eq!(camel("static_listeners"), "staticListeners");
        assert_eq!(camel("name"), "name");
    }

    #[test]
    fn document_errors() {
        let e = parse_static_config("").unwrap_err();
        assert_eq!(e.to_string(), "document: the document is empty");
        let e = parse_static_config("{\"a\": }").unwrap_err();
        assert!(
            e.to_string().starts_with("document: JSON syntax error"),
            "{e}"
        );
        let e = parse_static_config("a: [1,\n").unwrap_err();
        assert!(
            e.to_string().starts_with("document: YAML syntax error"),
            "{e}"
        );
        let e = parse_static_config("- 1\n- 2\n").unwrap_err();
        assert!(
            e.to_string()
                .contains("expected a mapping at the top level"),
            "{e}"
        );
        let e = parse_static_config("x: !foo 1\n").unwrap_err();
        assert!(e.to_string().contains("YAML tags"), "{e}");
    }

    #[test]
    fn bootstrap_keys() {
        let r = parse_static_config(
            "admin: {address: {}}\nnode: {id: x}\nlayered_runtime: {}\nstats_flush_interval: 5s\n",
        )
        .unwrap();
        assert!(r.listeners.is_empty() && r.clusters.is_empty());
        let e = parse_static_config("listeners: []\nfoo: 1\n").unwrap_err();
        assert_eq!(e.len(), 2);
        assert!(e.to_string().contains("bootstrap: field listeners: unknown top-level field (hint: `listeners` belongs under static_resources)"), "{e}");
        assert!(
            e.to_string()
                .contains("bootstrap: field foo: unknown top-level field"),
            "{e}"
        );
    }

    #[test]
    fn yaml_merge_keys_and_flow_json() {
        let r = parse_static_config(
            "static_resources:\n  clusters:\n  - &c {name: a, connect_timeout: 1s}\n  - <<: *c\n    name: b\n",
        )
        .unwrap();
        assert_eq!(r.clusters.len(), 2);
        assert_eq!(r.clusters[1].name, "b");
        assert!(r.clusters[1].connect_timeout.is_some());
        // YAML flow style that is not valid JSON.
        let r = parse_static_config("{static_resources: {clusters: [{name: a}]}}").unwrap();
        assert_eq!(r.clusters[0].name, "a");
    }
}
