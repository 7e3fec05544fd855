//! JSON (proto3 JSON mapping, as Envoy reads YAML/JSON config) → protobuf
//! wire bytes → prost messages, driven by the field tables in
//! [`crate::schema`].
//!
//! The decoder checks every key against the message's field table (proto
//! name or lowerCamelCase JSON name), every value against the field's type,
//! and oneof exclusivity, and reports each problem with the resource and the
//! JSON path. Fields of opaque message types (those the adapter does not
//! interpret) are recorded as present-but-empty messages so that the
//! "ignored field" warnings of the domain conversion see them; their content
//! is not checked.

use prost::encoding::{encode_key, encode_varint, WireType};
use serde_json::{Map, Value};

use crate::error::{index, join, Diag};
use crate::schema::{any_schema, Card, FieldSchema, MsgSchema, Ty};

/// Decodes one resource object into the prost message `M` described by
/// `schema`. Returns `None` (with errors recorded in `diag`) when the object
/// does not decode cleanly.
pub(crate) fn decode_resource<M: prost::Message + Default>(
    schema: &'static MsgSchema,
    obj: &Map<String, Value>,
    resource: &str,
    diag: &mut Diag,
) -> Option<M> {
    let before = diag.errors.len();
    let bytes = Encoder { resource, diag }.object(schema, obj, "");
    if diag.errors.len() != before {
        return None;
    }
    match M::decode(bytes.as_slice()) {
        Ok(m) => Some(m),
        Err(e) => {
            diag.error(
                resource,
                "",
                format!("internal error: re-decoding as {} failed: {e}", schema.rust),
            );
            None
        }
    }
}

struct Encoder<'a> {
    resource: &'a str,
    diag: &'a mut Diag,
}

/// A short description of a JSON value for error messages.
pub(crate) fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) if s.chars().count() > 60 => {
            let short: String = s.chars().take(60).collect();
            format!("{short:?}…")
        }
        Value::String(s) => format!("{s:?}"),
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "an object".into(),
    }
}

fn put_len(tag: u32, bytes: &[u8], buf: &mut Vec<u8>) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(bytes.len() as u64, buf);
    buf.extend_from_slice(bytes);
}

fn put_varint(tag: u32, v: u64, buf: &mut Vec<u8>) {
    encode_key(tag, WireType::Varint, buf);
    encode_varint(v, buf);
}

/// Integer value of a JSON number or numeric string, if it is integral.
fn as_integer(v: &Value) -> Option<i128> {
    match v {
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                Some(i128::from(u))
            } else if let Some(i) = n.as_i64() {
                Some(i128::from(i))
            } else {
                let f = n.as_f64()?;
                (f.fract() == 0.0 && f.abs() < 1.8e19).then_some(f as i128)
            }
        }
        Value::String(s) => {
            let t = s.trim();
            if t.is_empty() || t != s {
                return None;
            }
            t.parse::<i128>().ok().or_else(|| {
                let f: f64 = t.parse().ok()?;
                (f.is_finite() && f.fract() == 0.0 && f.abs() < 1.8e19).then_some(f as i128)
            })
        }
        _ => None,
    }
}

/// Parses a proto3 JSON duration (`"1.5s"`, `"-0.25s"`) into (seconds, nanos).
pub(crate) fn parse_duration(s: &str) -> Option<(i64, i32)> {
    let body = s.strip_suffix('s')?;
    let (neg, body) = match body.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, body),
    };
    let (whole, frac) = match body.split_once('.') {
        Some((w, f)) => (w, f),
        None => (body, ""),
    };
    if whole.is_empty()
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || frac.len() > 9
        || !frac.bytes().all(|b| b.is_ascii_digit())
        || (body.contains('.') && frac.is_empty())
    {
        return None;
    }
    let secs: i64 = whole.parse().ok()?;
    if secs > 315_576_000_000 {
        return None;
    }
    let nanos: i32 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<9}").parse().ok()?
    };
    Some(if neg { (-secs, -nanos) } else { (secs, nanos) })
}

impl Encoder<'_> {
    fn err(&mut self, path: &str, message: impl Into<String>) {
        self.diag.error(self.resource, path, message);
    }

    fn err_hint(&mut self, path: &str, message: impl Into<String>, hint: impl Into<String>) {
        self.diag.error_hint(self.resource, path, message, hint);
    }

    fn object(
        &mut self,
        schema: &'static MsgSchema,
        obj: &Map<String, Value>,
        path: &str,
    ) -> Vec<u8> {
        let mut buf = Vec::new();
        let mut seen: Vec<(&'static FieldSchema, &str)> = Vec::new();
        let mut oneofs: Vec<(&'static str, &str)> = Vec::new();
        for (key, val) in obj {
            let fpath = join(path, key);
            let Some(f) = schema.field(key) else {
                match schema.suggest(key) {
                    Some(s) => {
                        self.err_hint(&fpath, "unknown field", format!("did you mean `{s}`?"))
                    }
                    None => self.err(&fpath, "unknown field"),
                }
                continue;
            };
            if let Some((_, other)) = seen.iter().find(|(g, _)| std::ptr::eq(*g, f)) {
                let msg = format!("field is set twice (as `{other}` and as `{key}`)");
                self.err(&fpath, msg);
                continue;
            }
            seen.push((f, key));
            if val.is_null() {
                // proto3 JSON: null means "not set".
                continue;
            }
            if let Card::Oneof(group) = f.card {
                if let Some((_, other)) = oneofs.iter().find(|(g, _)| *g == group) {
                    let msg = format!("only one of `{other}` and `{key}` may be set (they are alternatives in `{group}`)");
                    self.err(&fpath, msg);
                    continue;
                }
                oneofs.push((group, key));
            }
            if f.card == Card::Repeated {
                let Some(items) = val.as_array() else {
                    let msg = format!("expected a list, got {}", describe(val));
                    self.err(&fpath, msg);
                    continue;
                };
                for (i, item) in items.iter().enumerate() {
                    self.value(f, item, &index(&fpath, i), &mut buf);
                }
            } else {
                self.value(f, val, &fpath, &mut buf);
            }
        }
        buf
    }

    fn message(&mut self, schema: &'static MsgSchema, v: &Value, path: &str) -> Option<Vec<u8>> {
        match v.as_object() {
            Some(obj) => Some(self.object(schema, obj, path)),
            None => {
                self.err(path, format!("expected an object, got {}", describe(v)));
                None
            }
        }
    }

    fn int(&mut self, v: &Value, path: &str, what: &str, min: i128, max: i128) -> Option<i128> {
        match as_integer(v) {
            Some(i) if (min..=max).contains(&i) => Some(i),
            _ => {
                self.err(path, format!("expected {what}, got {}", describe(v)));
                None
            }
        }
    }

    fn float(&mut self, v: &Value, path: &str) -> Option<f64> {
        let f = match v {
            Value::Number(n) => n.as_f64(),
            Value::String(s) => match s.as_str() {
                "NaN" => Some(f64::NAN),
                "Infinity" => Some(f64::INFINITY),
                "-Infinity" => Some(f64::NEG_INFINITY),
                other => other.parse().ok(),
            },
            _ => None,
        };
        if f.is_none() {
            self.err(path, format!("expected a number, got {}", describe(v)));
        }
        f
    }

    fn string<'v>(&mut self, v: &'v Value, path: &str) -> Option<&'v str> {
        let s = v.as_str();
        if s.is_none() {
            self.err(path, format!("expected a string, got {}", describe(v)));
        }
        s
    }

    fn boolean(&mut self, v: &Value, path: &str) -> Option<bool> {
        let b = v.as_bool();
        if b.is_none() {
            self.err(path, format!("expected true or false, got {}", describe(v)));
        }
        b
    }

    /// Encodes one value of field `f` (one element, for a repeated field).
    fn value(&mut self, f: &'static FieldSchema, v: &Value, path: &str, buf: &mut Vec<u8>) {
        const U32: (&str, i128, i128) = ("an unsigned 32-bit integer", 0, u32::MAX as i128);
        const I32: (&str, i128, i128) = ("a 32-bit integer", i32::MIN as i128, i32::MAX as i128);
        const U64: (&str, i128, i128) = ("an unsigned 64-bit integer", 0, u64::MAX as i128);
        const I64: (&str, i128, i128) = ("a 64-bit integer", i64::MIN as i128, i64::MAX as i128);
        let tag = f.tag;
        match f.ty {
            Ty::String | Ty::Bytes => {
                if let Some(s) = self.string(v, path) {
                    put_len(tag, s.as_bytes(), buf);
                }
            }
            Ty::Bool => {
                if let Some(b) = self.boolean(v, path) {
                    put_varint(tag, u64::from(b), buf);
                }
            }
            Ty::U32 | Ty::U64 | Ty::I32 | Ty::I64 => {
                let (what, min, max) = match f.ty {
                    Ty::U32 => U32,
                    Ty::U64 => U64,
                    Ty::I32 => I32,
                    _ => I64,
                };
                if let Some(i) = self.int(v, path, what, min, max) {
                    // Negative values are sign-extended to 64 bits on the wire.
                    put_varint(tag, i as i64 as u64, buf);
                }
            }
            Ty::Fixed32 => {
                if let Some(i) = self.int(v, path, U32.0, U32.1, U32.2) {
                    encode_key(tag, WireType::ThirtyTwoBit, buf);
                    buf.extend_from_slice(&(i as u32).to_le_bytes());
                }
            }
            Ty::Fixed64 => {
                if let Some(i) = self.int(v, path, U64.0, U64.1, U64.2) {
                    encode_key(tag, WireType::SixtyFourBit, buf);
                    buf.extend_from_slice(&(i as u64).to_le_bytes());
                }
            }
            Ty::F64 => {
                if let Some(x) = self.float(v, path) {
                    encode_key(tag, WireType::SixtyFourBit, buf);
                    buf.extend_from_slice(&x.to_le_bytes());
                }
            }
            Ty::F32 => {
                if let Some(x) = self.float(v, path) {
                    encode_key(tag, WireType::ThirtyTwoBit, buf);
                    buf.extend_from_slice(&(x as f32).to_le_bytes());
                }
            }
            Ty::Enum(values) => {
                let number = match v {
                    Value::String(s) => values.iter().find(|(n, _)| n == s).map(|(_, i)| *i),
                    Value::Number(_) => as_integer(v).and_then(|i| i32::try_from(i).ok()),
                    _ => None,
                };
                match number {
                    Some(n) => put_varint(tag, i64::from(n) as u64, buf),
                    None => {
                        let names: Vec<&str> = values.iter().map(|(n, _)| *n).collect();
                        self.err_hint(
                            path,
                            format!("unknown value {}", describe(v)),
                            format!("expected one of {}", names.join(", ")),
                        );
                    }
                }
            }
            Ty::Message(schema) => {
                if let Some(bytes) = self.message(schema, v, path) {
                    put_len(tag, &bytes, buf);
                }
            }
            Ty::Duration => {
                let parsed = v.as_str().and_then(parse_duration);
                match parsed {
                    Some((secs, nanos)) => {
                        let mut inner = Vec::new();
                        if secs != 0 {
                            put_varint(1, secs as u64, &mut inner);
                        }
                        if nanos != 0 {
                            put_varint(2, i64::from(nanos) as u64, &mut inner);
                        }
                        put_len(tag, &inner, buf);
                    }
                    None => self.err_hint(
                        path,
                        format!("expected a duration, got {}", describe(v)),
                        "write durations as seconds with an \"s\" suffix, e.g. \"0.25s\"",
                    ),
                }
            }
            Ty::Timestamp => {
                if self.string(v, path).is_some() {
                    put_len(tag, &[], buf);
                }
            }
            Ty::U32Value | Ty::U64Value | Ty::I32Value | Ty::I64Value => {
                let (what, min, max) = match f.ty {
                    Ty::U32Value => U32,
                    Ty::U64Value => U64,
                    Ty::I32Value => I32,
                    _ => I64,
                };
                if let Some(i) = self.int(v, path, what, min, max) {
                    let mut inner = Vec::new();
                    if i != 0 {
                        put_varint(1, i as i64 as u64, &mut inner);
                    }
                    put_len(tag, &inner, buf);
                }
            }
            Ty::BoolValue => {
                if let Some(b) = self.boolean(v, path) {
                    let mut inner = Vec::new();
                    if b {
                        put_varint(1, 1, &mut inner);
                    }
                    put_len(tag, &inner, buf);
                }
            }
            Ty::DoubleValue | Ty::FloatValue => {
                if let Some(x) = self.float(v, path) {
                    let mut inner = Vec::new();
                    if matches!(f.ty, Ty::DoubleValue) {
                        encode_key(1, WireType::SixtyFourBit, &mut inner);
                        inner.extend_from_slice(&x.to_le_bytes());
                    } else {
                        encode_key(1, WireType::ThirtyTwoBit, &mut inner);
                        inner.extend_from_slice(&(x as f32).to_le_bytes());
                    }
                    put_len(tag, &inner, buf);
                }
            }
            Ty::StringValue => {
                if let Some(s) = self.string(v, path) {
                    let mut inner = Vec::new();
                    put_len(1, s.as_bytes(), &mut inner);
                    put_len(tag, &inner, buf);
                }
            }
            Ty::Any => self.any(tag, v, path, buf),
            Ty::Struct => {
                if v.is_object() {
                    put_len(tag, &[], buf);
                } else {
                    self.err(path, format!("expected an object, got {}", describe(v)));
                }
            }
            Ty::Map => match v.as_object() {
                Some(m) if m.is_empty() => {}
                // One empty map entry records that the map is set.
                Some(_) => put_len(tag, &[], buf),
                None => self.err(path, format!("expected an object, got {}", describe(v))),
            },
            Ty::Opaque(rust) => {
                let ok = match rust {
                    "google::protobuf::Value" => true,
                    "google::protobuf::ListValue" => v.is_array(),
                    _ => v.is_object(),
                };
                if ok {
                    put_len(tag, &[], buf);
                } else {
                    self.err(path, format!("expected an object, got {}", describe(v)));
                }
            }
        }
    }

    /// A `google.protobuf.Any`: `{"@type": "type.googleapis.com/…", …fields}`.
    /// The fields are decoded when the type is one this crate understands;
    /// otherwise only the type URL is kept.
    fn any(&mut self, tag: u32, v: &Value, path: &str, buf: &mut Vec<u8>) {
        let Some(obj) = v.as_object() else {
            self.err(
                path,
                format!("expected an object with an \"@type\", got {}", describe(v)),
            );
            return;
        };
        let type_url = match obj.get("@type") {
            Some(Value::String(s)) if !s.is_empty() => s.as_str(),
            Some(other) => {
                let msg = format!("expected a type URL string, got {}", describe(other));
                self.err(&join(path, "@type"), msg);
                return;
            }
            None => {
                self.err_hint(
                    path,
                    "missing \"@type\"",
                    "a typed_config names its message type, e.g. \"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                );
                return;
            }
        };
        let mut inner = Vec::new();
        put_len(1, type_url.as_bytes(), &mut inner);
        if let Some(schema) = any_schema(type_url) {
            let mut rest = obj.clone();
            rest.remove("@type");
            let before = self.diag.errors.len();
            let value = self.object(schema, &rest, path);
            if self.diag.errors.len() != before {
                return;
            }
            if !value.is_empty() {
                put_len(2, &value, &mut inner);
            }
        }
        put_len(tag, &inner, buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema;
    use envoy_types::pb::envoy::config::core::v3::{address, socket_address, SocketAddress};
    use envoy_types::pb::envoy::config::listener::v3::Listener;
    use serde_json::json;

    fn decode<M: prost::Message + Default>(
        s: &'static MsgSchema,
        v: Value,
    ) -> Result<M, Vec<String>> {
        let mut d = Diag::default();
        let obj = v.as_object().unwrap().clone();
        decode_resource::<M>(s, &obj, "res", &mut d)
            .ok_or_else(|| d.errors.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn socket_address_both_spellings() {
        let a: SocketAddress = decode(
            schema::SOCKET_ADDRESS,
            json!({"address": "10.0.0.1", "portValue": 80, "protocol": "TCP"}),
        )
        .unwrap();
        assert_eq!(a.address, "10.0.0.1");
        assert_eq!(
            a.port_specifier,
            Some(socket_address::PortSpecifier::PortValue(80))
        );
        let b: SocketAddress = decode(
            schema::SOCKET_ADDRESS,
            json!({"address": "10.0.0.1", "port_value": "80"}),
        )
        .unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn type_errors_name_the_path() {
        let e = decode::<SocketAddress>(
            schema::SOCKET_ADDRESS,
            json!({"address": 5, "port_value": -1, "protocol": "SCTP"}),
        )
        .unwrap_err();
        assert!(
            e.contains(&"res: field address: expected a string, got 5".to_string()),
            "{e:?}"
        );
        assert!(
            e.contains(
                &"res: field port_value: expected an unsigned 32-bit integer, got -1".to_string()
            ),
            "{e:?}"
        );
        assert!(
            e.iter().any(|m| m.starts_with(
                "res: field protocol: unknown value \"SCTP\" (hint: expected one of TCP, UDP)"
            )),
            "{e:?}"
        );
    }

    #[test]
    fn oneof_and_duplicates() {
        let e = decode::<SocketAddress>(
            schema::SOCKET_ADDRESS,
            json!({"port_value": 1, "named_port": "x", "address": "a", "portValue": 2}),
        )
        .unwrap_err();
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e.iter().any(|m| m.contains("set twice")));
        assert!(e.iter().any(|m| m.contains("only one of")));
    }

    #[test]
    fn opaque_fields_are_recorded() {
        let l: Listener = decode(
            schema::LISTENER,
            json!({"name": "l", "listener_filters": [{"name": "x", "whatever": 1}], "address": {"pipe": {"path": "/x"}}}),
        )
        .unwrap();
        assert_eq!(l.listener_filters.len(), 1);
        assert!(matches!(
            l.address.unwrap().address,
            Some(address::Address::Pipe(_))
        ));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("0.25s"), Some((0, 250_000_000)));
        assert_eq!(parse_duration("1s"), Some((1, 0)));
        assert_eq!(parse_duration("-1.5s"), Some((-1, -500_000_000)));
        assert_eq!(parse_duration("1.s"), None);
        assert_eq!(parse_duration("250ms"), None);
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_duration("1.0000000001s"), None);
    }
}
