//! Wire-level JSON: duplicate-aware parsing, stream framing, the request
//! envelope and response encoding (rpc-contract.md §1.2, §1.3;
//! SPDK `lib/jsonrpc/jsonrpc_server.c`).

use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Serialize;
use serde_json::{Map, Number, Value};

use crate::error::RpcError;
use crate::registry::dispatch;

/// Longest accepted request id (`SPDK_JSONRPC_ID_MAX_LEN`).
pub(crate) const ID_MAX_LEN: usize = 128;

/// Key that marks an object in which the peer repeated a key.
///
/// `serde_json::Value` silently keeps the last of duplicate keys, but SPDK's
/// decoder rejects them. The parser therefore records the fact inside the
/// object itself (a key no JSON text can produce by accident), and
/// [`strip_dup_markers`] turns it into a flag before a handler sees params.
pub(crate) const DUP_KEY: &str = "\u{0}duplicate-key";

/// A `Value` parsed with duplicate keys marked (see [`DUP_KEY`]).
pub(crate) struct StrictValue(pub Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        // JSON text cannot express NaN or infinities.
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        StrictValue::deserialize(d).map(|v| v.0)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(StrictValue(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(k) = map.next_key::<String>()? {
            let StrictValue(v) = map.next_value()?;
            if out.contains_key(&k) {
                out.insert(DUP_KEY.to_string(), Value::Bool(true));
            } else {
                out.insert(k, v);
            }
        }
        Ok(Value::Object(out))
    }
}

/// Remove every duplicate marker below `v`; true if there was one.
pub(crate) fn strip_dup_markers(v: &mut Value) -> bool {
    match v {
        Value::Object(m) => {
            let mut dup = m.remove(DUP_KEY).is_some();
            for x in m.values_mut() {
                dup |= strip_dup_markers(x);
            }
            dup
        }
        Value::Array(a) => {
            let mut dup = false;
            for x in a.iter_mut() {
                dup |= strip_dup_markers(x);
            }
            dup
        }
        _ => false,
    }
}

/// Complete values taken from a receive buffer.
#[derive(Debug, Default)]
pub(crate) struct Framed {
    pub values: Vec<Value>,
    /// The bytes after `values` are not JSON: answer -32700 and close.
    pub parse_error: bool,
}

/// Take every complete JSON value off the front of `buf`, leaving an
/// incomplete tail for the next read (SPDK's `SPDK_JSON_PARSE_INCOMPLETE`).
/// `eof`: no more bytes will come, so a number at the very end is complete.
pub(crate) fn take_values(buf: &mut Vec<u8>, eof: bool) -> Framed {
    let mut out = Framed::default();
    let mut consumed = 0;
    {
        let mut it = serde_json::Deserializer::from_slice(buf).into_iter::<StrictValue>();
        loop {
            match it.next() {
                None => {
                    // Only whitespace is left.
                    consumed = buf.len();
                    break;
                }
                Some(Ok(StrictValue(v))) => {
                    let end = it.byte_offset();
                    // "12" may be the start of "123": a number that touches the
                    // end of the buffer is not known to be complete yet.
                    if v.is_number() && end == buf.len() && !eof {
                        break;
                    }
                    consumed = end;
                    out.values.push(v);
                }
                Some(Err(e)) if e.is_eof() => break,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "JSON parse error");
                    out.parse_error = true;
                    break;
                }
            }
        }
    }
    buf.drain(..consumed);
    out
}

/// A request that passed the envelope checks.
#[derive(Debug, PartialEq)]
pub(crate) struct Request {
    /// `None`: no `id` member (a notification).
    pub id: Option<Value>,
    pub method: String,
    pub params: Option<Value>,
    /// Params repeated a key somewhere.
    pub dup: bool,
}

impl Request {
    /// SPDK skips the success response when the id is absent *or* null
    /// (`spdk_jsonrpc_end_result`); errors are always sent.
    fn suppress_success(&self) -> bool {
        matches!(self.id, None | Some(Value::Null))
    }
}

/// Envelope checks of SPDK's `parse_single_request`. On failure returns the
/// id to answer with (null unless the id had already been accepted, as in
/// SPDK) and -32600 "Invalid request".
pub(crate) fn parse_request(v: Value) -> Result<Request, Box<(Value, RpcError)>> {
    let invalid = |id: Value| Err(Box::new((id, RpcError::invalid_request())));
    let Value::Object(mut obj) = v else {
        return invalid(Value::Null);
    };
    // spdk_json_decode_object: unknown or repeated keys fail the decode.
    if obj
        .keys()
        .any(|k| !matches!(k.as_str(), "jsonrpc" | "method" | "params" | "id"))
    {
        return invalid(Value::Null);
    }
    match obj.get("jsonrpc") {
        None => {}
        Some(Value::String(s)) if s == "2.0" => {}
        Some(_) => return invalid(Value::Null),
    }
    let method = match obj.remove("method") {
        Some(Value::String(s)) => s,
        _ => return invalid(Value::Null),
    };
    let id = match obj.remove("id") {
        None => None,
        Some(id @ (Value::Null | Value::Number(_))) => Some(id),
        Some(Value::String(s)) if s.len() <= ID_MAX_LEN => Some(Value::String(s)),
        Some(_) => return invalid(Value::Null),
    };
    let (params, dup) = match obj.remove("params") {
        None | Some(Value::Null) => (None, false),
        Some(mut p @ (Value::Object(_) | Value::Array(_))) => {
            let dup = strip_dup_markers(&mut p);
            (Some(p), dup)
        }
        Some(_) => return invalid(id.unwrap_or(Value::Null)),
    };
    Ok(Request {
        id,
        method,
        params,
        dup,
    })
}

/// One response object; `result` and `error` are never both present and
/// `error` is never `null` (rpc.py treats the key as failure).
#[derive(Serialize)]
pub(crate) struct Response {
    jsonrpc: &'static str,
    id: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<RpcError>,
}

impl Response {
    pub(crate) fn new(id: Value, r: Result<Value, RpcError>) -> Response {
        let (result, error) = match r {
            Ok(v) => (Some(v), None),
            Err(e) => (None, Some(e)),
        };
        Response {
            jsonrpc: "2.0",
            id,
            result,
            error,
        }
    }
}

/// Serialise a response (object or batch array) followed by "\n".
pub(crate) fn encode<T: Serialize>(r: &T) -> Vec<u8> {
    let mut out = serde_json::to_vec(r).unwrap_or_else(|e| {
        // Only reachable with a broken Serialize impl in a handler result,
        // which was already turned into a Value; keep the connection usable.
        tracing::error!(error = %e, "cannot encode JSON-RPC response");
        br#"{"jsonrpc":"2.0","id":null,"error":{"code":-32603,"message":"Internal error"}}"#
            .to_vec()
    });
    out.push(b'\n');
    out
}

/// The -32700 reply sent before closing a connection.
pub(crate) fn parse_error_reply() -> Vec<u8> {
    encode(&Response::new(Value::Null, Err(RpcError::parse_error())))
}

async fn process_one(v: Value) -> Option<Response> {
    match parse_request(v) {
        Err(e) => {
            let (id, err) = *e;
            Some(Response::new(id, Err(err)))
        }
        Ok(req) => {
            let quiet = req.suppress_success();
            let r = dispatch(&req.method, req.params, req.dup).await;
            if quiet && r.is_ok() {
                return None;
            }
            Some(Response::new(req.id.unwrap_or(Value::Null), r))
        }
    }
}

/// Handle one top-level value (a request or a batch) and return the bytes to
/// send, if any. Runs on reactor 0. Batch elements run one after another and
/// are answered in request order, in one array.
pub(crate) async fn process_value(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::Array(items) => {
            if items.is_empty() {
                return Some(encode(&Response::new(
                    Value::Null,
                    Err(RpcError::invalid_request()),
                )));
            }
            let mut out = Vec::new();
            for item in items {
                if let Some(r) = process_one(item).await {
                    out.push(r);
                }
            }
            // A batch of notifications only gets no reply at all.
            (!out.is_empty()).then(|| encode(&out))
        }
        v => process_one(v).await.map(|r| encode(&r)),
    }
}

/// The best-effort reply when reactor 0 is not running: answer each request
/// of `v` with `err` (respecting notifications).
pub(crate) fn immediate_error(v: Value, err: &RpcError) -> Option<Vec<u8>> {
    let one = |v: Value| -> Option<Response> {
        match parse_request(v) {
            Err(e) => {
                let (id, e) = *e;
                Some(Response::new(id, Err(e)))
            }
            Ok(req) => Some(Response::new(
                req.id.unwrap_or(Value::Null),
                Err(err.clone()),
            )),
        }
    };
    match v {
        Value::Array(items) if !items.is_empty() => {
            let out: Vec<Response> = items.into_iter().filter_map(one).collect();
            Some(encode(&out))
        }
        Value::Array(_) => Some(encode(&Response::new(
            Value::Null,
            Err(RpcError::invalid_request()),
        ))),
        v => one(v).map(|r| encode(&r)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn take(buf: &mut Vec<u8>) -> Framed {
        take_values(buf, false)
    }

    #[test]
    fn split_input_waits_for_more() {
        let full = br#"{"jsonrpc":"2.0","method":"m","id":1}"#;
        let mut buf = full[..10].to_vec();
        let f = take(&mut buf);
        assert!(f.values.is_empty() && !f.parse_error);
        assert_eq!(buf.len(), 10, "incomplete bytes are kept");
        buf.extend_from_slice(&full[10..]);
        let f = take(&mut buf);
        assert_eq!(f.values, vec![json!({"jsonrpc":"2.0","method":"m","id":1})]);
        assert!(buf.is_empty());
    }

    #[test]
    fn split_inside_string_and_number() {
        let mut buf = br#"{"method":"bdev_get_bd"#.to_vec();
        assert!(take(&mut buf).values.is_empty());
        buf.extend_from_slice(br#"evs","id":12"#);
        assert!(take(&mut buf).values.is_empty());
        buf.extend_from_slice(b"3}");
        let f = take(&mut buf);
        assert_eq!(f.values, vec![json!({"method":"bdev_get_bdevs","id":123})]);
    }

    #[test]
    fn two_values_in_one_buffer_and_a_tail() {
        let mut buf = br#"{"method":"a","id":1}{"method":"b","id":2} {"method":"#.to_vec();
        let f = take(&mut buf);
        assert_eq!(f.values.len(), 2);
        assert_eq!(f.values[1]["method"], "b");
        assert!(!f.parse_error);
        assert_eq!(buf, br#" {"method":"#.to_vec());
    }

    #[test]
    fn pretty_printed_request() {
        let text = "{\n  \"jsonrpc\": \"2.0\",\n  \"method\": \"bdev_malloc_create\",\n  \"id\": 1,\n  \"params\": {\n    \"num_blocks\": 131072,\n    \"block_size\": 512,\n    \"name\": \"Malloc0\",\n    \"md_interleave\": false,\n    \"dif_is_head_of_md\": false\n  }\n}";
        let mut buf = text.as_bytes().to_vec();
        let f = take(&mut buf);
        assert_eq!(f.values.len(), 1);
        let req = parse_request(f.values[0].clone()).unwrap();
        assert_eq!(req.method, "bdev_malloc_create");
        assert_eq!(req.id, Some(json!(1)));
        assert_eq!(req.params.unwrap()["md_interleave"], json!(false));
    }

    #[test]
    fn batch_is_one_value() {
        let mut buf = br#"[{"method":"a","id":1},{"method":"b"}]"#.to_vec();
        let f = take(&mut buf);
        assert_eq!(f.values.len(), 1);
        assert!(f.values[0].is_array());
    }

    #[test]
    fn parse_error_after_good_value() {
        let mut buf = br#"{"method":"a","id":1} {"method" 1}"#.to_vec();
        let f = take(&mut buf);
        assert_eq!(f.values.len(), 1);
        assert!(f.parse_error);
        let mut buf = b"}garbage".to_vec();
        assert!(take(&mut buf).parse_error);
        let mut buf = b"\xff\xfe".to_vec();
        assert!(take(&mut buf).parse_error);
    }

    #[test]
    fn whitespace_only_is_consumed() {
        let mut buf = b" \n\t ".to_vec();
        let f = take(&mut buf);
        assert!(f.values.is_empty() && !f.parse_error && buf.is_empty());
    }

    #[test]
    fn trailing_number_complete_at_eof() {
        let mut buf = b"42".to_vec();
        assert!(take_values(&mut buf, false).values.is_empty());
        assert_eq!(take_values(&mut buf, true).values, vec![json!(42)]);
    }

    #[test]
    fn duplicate_keys_are_marked() {
        let mut buf = br#"{"method":"m","params":{"a":1,"b":{"c":1,"c":2}}}"#.to_vec();
        let v = take(&mut buf).values.remove(0);
        let req = parse_request(v).unwrap();
        assert!(req.dup);
        assert_eq!(req.params, Some(json!({"a":1,"b":{"c":1}})));

        let mut buf = br#"{"method":"m","method":"n","id":1}"#.to_vec();
        let v = take(&mut buf).values.remove(0);
        assert!(parse_request(v).is_err());
    }

    fn invalid(v: Value) -> Value {
        match parse_request(v) {
            Err(e) => {
                assert_eq!(e.1, RpcError::new(-32600, "Invalid request"));
                e.0
            }
            Ok(r) => panic!("accepted {r:?}"),
        }
    }

    #[test]
    fn envelope_validation() {
        // Accepted shapes.
        let r = parse_request(json!({"method":"m"})).unwrap();
        assert_eq!((r.id, r.params), (None, None));
        let r =
            parse_request(json!({"jsonrpc":"2.0","method":"m","id":"x","params":null})).unwrap();
        assert_eq!((r.id, r.params), (Some(json!("x")), None));
        let r = parse_request(json!({"method":"m","id":null,"params":[1]})).unwrap();
        assert_eq!((r.id, r.params), (Some(Value::Null), Some(json!([1]))));

        // Rejected shapes; the id is echoed only once it was accepted.
        assert_eq!(
            invalid(json!({"jsonrpc":"1.0","method":"m","id":1})),
            Value::Null
        );
        assert_eq!(
            invalid(json!({"jsonrpc":2.0,"method":"m","id":1})),
            Value::Null
        );
        assert_eq!(invalid(json!({"id":1})), Value::Null);
        assert_eq!(invalid(json!({"method":5,"id":1})), Value::Null);
        assert_eq!(invalid(json!({"method":"m","id":[1]})), Value::Null);
        assert_eq!(invalid(json!({"method":"m","id":{}})), Value::Null);
        assert_eq!(invalid(json!({"method":"m","id":true})), Value::Null);
        assert_eq!(invalid(json!({"method":"m","id":7,"params":"x"})), json!(7));
        assert_eq!(invalid(json!({"method":"m","id":7,"params":3})), json!(7));
        assert_eq!(invalid(json!({"method":"m","id":7,"extra":1})), Value::Null);
        assert_eq!(invalid(json!("m")), Value::Null);
        assert_eq!(invalid(json!(1)), Value::Null);

        let long = "x".repeat(ID_MAX_LEN + 1);
        invalid(json!({"method":"m","id":long}));
        let ok = "x".repeat(ID_MAX_LEN);
        assert!(parse_request(json!({"method":"m","id":ok})).is_ok());
    }

    #[test]
    fn responses_have_no_null_error() {
        let ok = String::from_utf8(encode(&Response::new(json!(1), Ok(json!(true))))).unwrap();
        assert_eq!(ok, "{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":true}\n");
        let null = String::from_utf8(encode(&Response::new(json!(1), Ok(Value::Null)))).unwrap();
        assert_eq!(null, "{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":null}\n");
        let err = String::from_utf8(encode(&Response::new(
            Value::Null,
            Err(RpcError::errno(libc::ENODEV)),
        )))
        .unwrap();
        assert_eq!(
            err,
            "{\"jsonrpc\":\"2.0\",\"id\":null,\"error\":{\"code\":-19,\"message\":\"No such device\"}}\n"
        );
        assert_eq!(
            parse_error_reply(),
            b"{\"jsonrpc\":\"2.0\",\"id\":null,\"error\":{\"code\":-32700,\"message\":\"Parse error\"}}\n"
        );
    }
}
