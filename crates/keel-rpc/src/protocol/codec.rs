//! Body codecs. A call declares its codec in the request metadata; the server decodes the
//! request and encodes the reply with that same codec.

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Serialize, de::DeserializeOwned};

use crate::status::Status;

/// How a message body is encoded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Codec {
    /// Protocol Buffers binary encoding (prost). The default.
    #[default]
    Protobuf = 0,
    /// JSON, with the proto3 JSON mapping (field names in lowerCamelCase, bytes as base64,
    /// 64-bit integers as strings).
    Json = 1,
}

impl Codec {
    /// The codec for a wire number.
    pub fn from_u8(n: u8) -> Option<Codec> {
        match n {
            0 => Some(Codec::Protobuf),
            1 => Some(Codec::Json),
            _ => None,
        }
    }

    /// Appends `msg` encoded with this codec to `dst`.
    pub fn encode<M: RpcMessage>(self, msg: &M, dst: &mut BytesMut) -> Result<(), Status> {
        match self {
            Codec::Protobuf => {
                dst.reserve(msg.encoded_len());
                msg.encode(dst)
                    .map_err(|e| Status::internal(format!("protobuf encode: {e}")))
            }
            Codec::Json => serde_json::to_writer(dst.writer(), msg)
                .map_err(|e| Status::internal(format!("json encode: {e}"))),
        }
    }

    /// Reads a message encoded with this codec. A malformed body is `invalid_argument`.
    ///
    /// Takes the body as [`Bytes`] so that `bytes` fields generated as `Bytes` (see
    /// `keel_rpc_build::Builder::bytes`) share the received buffer instead of copying it.
    pub fn decode<M: RpcMessage>(self, src: Bytes) -> Result<M, Status> {
        match self {
            Codec::Protobuf => M::decode(src)
                .map_err(|e| Status::invalid_argument(format!("bad protobuf body: {e}"))),
            // An empty JSON body reads as the empty message, as an empty protobuf body does.
            Codec::Json if src.iter().all(u8::is_ascii_whitespace) => Ok(M::default()),
            Codec::Json => decode_json(&src),
        }
    }

    /// The name used in docs and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Codec::Protobuf => "protobuf",
            Codec::Json => "json",
        }
    }
}

/// Reads a JSON body by the proto3 JSON mapping. The generated readers take the usual form
/// directly; what the mapping also accepts — `null` for a field's default, an integer
/// written as `2.0` or `2e0` — is brought to that form and read again. An error names the
/// field it is about (`count: invalid type: ...`).
fn decode_json<M: DeserializeOwned>(src: &[u8]) -> Result<M, Status> {
    let first = match read_json(&mut serde_json::Deserializer::from_slice(src)) {
        Ok(msg) => return Ok(msg),
        Err(e) => e,
    };
    let Ok(mut value) = serde_json::from_slice::<serde_json::Value>(src) else {
        return Err(first);
    };
    if !to_plain_form(&mut value) {
        return Err(first);
    }
    read_json(value)
}

fn read_json<'de, M, D>(deserializer: D) -> Result<M, Status>
where
    M: DeserializeOwned,
    D: serde::Deserializer<'de, Error = serde_json::Error>,
{
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let path = e.path().to_string();
        let mut inner = e.into_inner().to_string();
        // pbjson reads numbers through an untagged enum, whose error says nothing useful.
        if let Some(at) = inner.find("data did not match any variant of untagged enum") {
            let place = inner[at..]
                .find(" at line")
                .map_or("", |i| &inner[at + i..]);
            inner =
                format!("not a number of the field's type (integers may also be strings){place}");
        }
        match path.as_str() {
            "" | "." => Status::invalid_argument(format!("bad JSON body: {inner}")),
            field => Status::invalid_argument(format!("bad JSON body: {field}: {inner}")),
        }
    })
}

/// Drops `null` members (a field's default) and writes integral numbers such as `2.0` or
/// `2e0` as integers, in place; whether anything changed.
fn to_plain_form(value: &mut serde_json::Value) -> bool {
    use serde_json::Value;
    match value {
        Value::Object(members) => {
            let before = members.len();
            members.retain(|_, v| !v.is_null());
            let mut changed = members.len() != before;
            for v in members.values_mut() {
                changed |= to_plain_form(v);
            }
            changed
        }
        Value::Array(items) => items.iter_mut().fold(false, |c, v| to_plain_form(v) | c),
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            // Exactly representable integers only (|f| <= 2^53), so nothing is rounded.
            if f.fract() == 0.0 && f.abs() <= 9_007_199_254_740_992.0 {
                *value = if f < 0.0 {
                    Value::from(f as i64)
                } else {
                    Value::from(f as u64)
                };
                true
            } else {
                false
            }
        }
        _ => false,
    }
}

/// A message that can travel in either codec: prost for protobuf, serde for JSON. Types
/// generated by `keel-rpc-build` implement it.
pub trait RpcMessage:
    prost::Message + Default + Serialize + DeserializeOwned + Send + Sync + 'static
{
}

impl<T> RpcMessage for T where
    T: prost::Message + Default + Serialize + DeserializeOwned + Send + Sync + 'static
{
}
