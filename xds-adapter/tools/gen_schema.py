#!/usr/bin/env python3
"""Generates xds-adapter/src/schema/generated.rs: field tables (names, field
numbers, types) of the Envoy v3 messages the adapter decodes from JSON/YAML.

The tables are read from the prost code that `envoy-types` ships, so they
match the protobuf types the crate decodes into. Usage:

    python3 tools/gen_schema.py ~/.cargo/registry/src/*/envoy-types-0.7.7 > src/schema/generated.rs
"""
import os
import re
import sys

# Messages decoded field by field (every other message type is "opaque": its
# presence is recorded, its content is not interpreted).
DEEP = [
    "envoy::config::bootstrap::v3::Bootstrap",
    "envoy::config::bootstrap::v3::bootstrap::StaticResources",
    "envoy::config::listener::v3::Listener",
    "envoy::config::listener::v3::FilterChain",
    "envoy::config::listener::v3::Filter",
    "envoy::config::listener::v3::FilterChainMatch",
    "envoy::config::core::v3::CidrRange",
    "envoy::config::core::v3::Address",
    "envoy::config::core::v3::SocketAddress",
    "envoy::config::core::v3::Locality",
    "envoy::extensions::filters::network::tcp_proxy::v3::TcpProxy",
    "envoy::extensions::filters::network::tcp_proxy::v3::tcp_proxy::WeightedCluster",
    "envoy::extensions::filters::network::tcp_proxy::v3::tcp_proxy::weighted_cluster::ClusterWeight",
    "envoy::config::cluster::v3::Cluster",
    "envoy::config::cluster::v3::cluster::EdsClusterConfig",
    "envoy::config::cluster::v3::CircuitBreakers",
    "envoy::config::cluster::v3::circuit_breakers::Thresholds",
    "envoy::config::endpoint::v3::ClusterLoadAssignment",
    "envoy::config::endpoint::v3::LocalityLbEndpoints",
    "envoy::config::endpoint::v3::LbEndpoint",
    "envoy::config::endpoint::v3::Endpoint",
    "envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager",
    "envoy::extensions::filters::network::http_connection_manager::v3::Rds",
    "envoy::config::route::v3::RouteConfiguration",
    "envoy::config::route::v3::VirtualHost",
    "envoy::config::route::v3::Route",
    "envoy::config::route::v3::RouteMatch",
    "envoy::config::route::v3::RouteAction",
    "envoy::config::route::v3::WeightedCluster",
    "envoy::config::route::v3::weighted_cluster::ClusterWeight",
]

WKT = {
    "google::protobuf::Duration": "Duration",
    "google::protobuf::Timestamp": "Timestamp",
    "google::protobuf::UInt32Value": "U32Value",
    "google::protobuf::UInt64Value": "U64Value",
    "google::protobuf::Int32Value": "I32Value",
    "google::protobuf::Int64Value": "I64Value",
    "google::protobuf::BoolValue": "BoolValue",
    "google::protobuf::DoubleValue": "DoubleValue",
    "google::protobuf::FloatValue": "FloatValue",
    "google::protobuf::StringValue": "StringValue",
    "google::protobuf::Struct": "Struct",
    "google::protobuf::Any": "Any",
}

SCALARS = {
    "string": "String", "bytes": "Bytes", "bool": "Bool",
    "uint32": "U32", "fixed32": "Fixed32", "int32": "I32", "sint32": "I32",
    "uint64": "U64", "fixed64": "Fixed64", "int64": "I64", "sint64": "I64",
    "double": "F64", "float": "F32",
}


def file_module(fname):
    parts = fname[: -len(".rs")].split(".")
    return ["r#type" if p == "type" else p for p in parts]


def strip_comments(text):
    return "\n".join(l for l in text.split("\n") if not l.strip().startswith("//"))


def split_items(body):
    """Yields (attrs, decl) for each field/variant of a struct or enum body."""
    i, n = 0, len(body)
    attrs = []
    while i < n:
        c = body[i]
        if c.isspace():
            i += 1
            continue
        if body.startswith("#[", i):
            depth, j = 0, i + 1
            while True:
                if body[j] == "[":
                    depth += 1
                elif body[j] == "]":
                    depth -= 1
                    if depth == 0:
                        break
                j += 1
            attrs.append(body[i : j + 1])
            i = j + 1
            continue
        depth, j = 0, i
        while j < n:
            if body[j] in "<(":
                depth += 1
            elif body[j] in ">)":
                depth -= 1
            elif body[j] == "," and depth == 0:
                break
            j += 1
        yield attrs, " ".join(body[i:j].split())
        attrs = []
        i = j + 1


class Item:
    def __init__(self, kind, module, name, body):
        self.kind, self.module, self.name, self.body = kind, module, name, body


def parse_file(path, fmod):
    items = {}
    lines = open(path).read().split("\n")
    stack = []  # (name, indent)
    i = 0
    while i < len(lines):
        line = lines[i]
        m = re.match(r"^( *)pub mod (\w+) \{$", line)
        if m:
            stack.append((m.group(2), len(m.group(1))))
            i += 1
            continue
        m = re.match(r"^( *)pub (struct|enum) (\w+) \{\s*\}?$", line)
        if m:
            ind = len(m.group(1))
            body = []
            if not line.rstrip().endswith("}"):
                i += 1
                while lines[i] != " " * ind + "}":
                    body.append(lines[i])
                    i += 1
            mod = fmod + [s[0] for s in stack]
            it = Item(m.group(2), mod, m.group(3), strip_comments("\n".join(body)))
            items["::".join(mod + [m.group(3)])] = it
            i += 1
            continue
        m = re.match(r"^( *)impl (\w+) \{$", line)
        if m:
            ind = len(m.group(1))
            body = []
            i += 1
            while lines[i] != " " * ind + "}":
                body.append(lines[i])
                i += 1
            key = "::".join(fmod + [s[0] for s in stack] + [m.group(2)])
            if key in items:
                items[key].impl = "\n".join(body)
            i += 1
            continue
        if stack and line == " " * stack[-1][1] + "}":
            stack.pop()
        i += 1
    return items


def resolve(path, module):
    path = path.replace("::prost::alloc::string::", "").strip()
    parts = path.split("::")
    mod = list(module)
    if parts[0] == "":
        return "::".join(parts[1:])
    k = 0
    while parts[k] == "super":
        mod.pop()
        k += 1
    return "::".join(mod + parts[k:])


def inner_type(decl_type):
    t = decl_type
    for w in ["::core::option::Option<", "::prost::alloc::vec::Vec<",
              "::prost::alloc::boxed::Box<"]:
        if t.startswith(w):
            t = t[len(w):].rstrip(">").strip().rstrip(",").strip()
    return t


def snake(name):
    s = re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()
    return s[:-1] if s.endswith("_") else s


def camel(name):
    parts = name.split("_")
    return parts[0] + "".join(p[:1].upper() + p[1:] for p in parts[1:])


def const_name(key):
    return "M_" + re.sub(r"[^A-Za-z0-9]+", "_", key.replace("r#", "")).upper()


def enum_const(key):
    return "E_" + re.sub(r"[^A-Za-z0-9]+", "_", key.replace("r#", "")).upper()


def main():
    root = sys.argv[1]
    gen = os.path.join(root, "src", "generated")
    items = {}
    for f in sorted(os.listdir(gen)):
        if f.endswith(".rs") and f != "mod.rs":
            items.update(parse_file(os.path.join(gen, f), file_module(f)))

    enums_needed = {}
    out = []

    def enum_ref(key):
        if key not in items or items[key].kind != "enum":
            raise SystemExit("unknown enum " + key)
        enums_needed[key] = items[key]
        return "Ty::Enum(%s)" % enum_const(key)

    def field_ty(prost, decl_type, module):
        kind = prost.split(",")[0].strip()
        if kind in SCALARS:
            return "Ty::" + SCALARS[kind]
        if kind.startswith("enumeration"):
            return enum_ref(resolve(re.search(r'"(.*)"', kind).group(1), module))
        if kind == "message":
            key = resolve(inner_type(decl_type), module)
            if key in WKT:
                return "Ty::" + WKT[key]
            if key in DEEP:
                return "Ty::Message(&%s)" % const_name(key)
            return 'Ty::Opaque("%s")' % key.replace("r#", "")
        if kind.startswith("map"):
            return "Ty::Map"
        raise SystemExit("unhandled prost kind %r" % prost)

    out.append("// @generated by tools/gen_schema.py from the envoy-types 0.7.7 prost code.")
    out.append("// Field names and numbers of the Envoy v3 protobuf API. Do not edit.")
    out.append("use super::{Card, FieldSchema, MsgSchema, Ty};")
    out.append("")
    for key in DEEP:
        it = items[key]
        fields = []
        for attrs, decl in split_items(it.body):
            prost = [a for a in attrs if a.startswith("#[prost(")]
            if not prost:
                continue
            p = prost[0][len("#[prost("):-2]
            m = re.match(r"pub (?:r#)?(\w+): (.*)$", decl)
            fname, ftype = m.group(1), m.group(2)
            if p.startswith("oneof"):
                okey = "::".join(it.module + [snake(it.name), re.search(r'"[\w:]*::(\w+)"', p).group(1)])
                oit = items[okey]
                for oattrs, odecl in split_items(oit.body):
                    op = [a for a in oattrs if a.startswith("#[prost(")][0][len("#[prost("):-2]
                    vm = re.match(r"(\w+)\((.*)\)$", odecl)
                    vname, vtype = snake(vm.group(1)), vm.group(2).strip().rstrip(",").strip()
                    tag = int(re.search(r'tag = "(\d+)"', op).group(1))
                    ty = field_ty(op, vtype, oit.module)
                    fields.append((vname, tag, 'Card::Oneof("%s")' % fname, ty))
                continue
            tag = int(re.search(r'tag = "(\d+)"', p).group(1))
            card = "Card::Repeated" if "repeated" in p else "Card::Single"
            if p.startswith("map"):
                card = "Card::Single"
            ty = field_ty(p, ftype, it.module)
            fields.append((fname, tag, card, ty))
        fields.sort(key=lambda f: f[1])
        out.append("pub static %s: MsgSchema = MsgSchema {" % const_name(key))
        out.append('    rust: "%s",' % key.replace("r#", ""))
        out.append("    fields: &[")
        for fname, tag, card, ty in fields:
            out.append('        FieldSchema { name: "%s", json: "%s", tag: %d, card: %s, ty: %s },'
                       % (fname, camel(fname), tag, card, ty))
        out.append("    ],")
        out.append("};")
        out.append("")
    for key, it in sorted(enums_needed.items()):
        values = dict(re.findall(r"(\w+) = (-?\d+)", it.body))
        names = re.findall(r'"(\w+)" => \{?\s*Some\(Self::(\w+)\)', it.impl)
        pairs = ", ".join('("%s", %s)' % (n, values[v]) for n, v in names)
        out.append("pub static %s: &[(&str, i32)] = &[%s];" % (enum_const(key), pairs))
    out.append("")
    print("\n".join(out))


main()
