//! Feeds arbitrary bytes to the RPC body codecs as the body of a call, for messages of every
//! kind the services take (strings, bytes, 32- and 64-bit integers, maps, enums, oneofs,
//! optional fields): as JSON, the way the HTTP→RPC bridge (`POST /{service}/{method}`) reads
//! a request body, and as protobuf, the way a binary call's body is read. Neither may panic,
//! and whatever either accepts must come back unchanged through both encodings: JSON written
//! by the codec reads back as the same message, and so does its protobuf encoding. The one
//! exception: an enum number read from protobuf that the schema does not name cannot be
//! written as JSON, and the encoder must say so with an error.
#![no_main]

use std::fmt::Debug;

use bytes::{Bytes, BytesMut};
use keel_echo::{CountRequest, EchoRequest};
use keel_registry::proto::{LockRequest, PutConfigRequest, RegisterRequest, WatchRequest};
use keel_rpc::protocol::{Codec, RpcMessage};
use libfuzzer_sys::fuzz_target;

fn round_trip<M: RpcMessage + PartialEq + Debug>(body: &[u8]) {
    for codec in [Codec::Json, Codec::Protobuf] {
        let Ok(msg) = codec.decode::<M>(Bytes::copy_from_slice(body)) else {
            continue;
        };
        for back in [Codec::Json, Codec::Protobuf] {
            let mut out = BytesMut::new();
            if let Err(e) = back.encode(&msg, &mut out) {
                // Protobuf keeps an enum number it does not know, which JSON has no name
                // for: the encoder says so (and the registry refuses such a status).
                assert!(
                    codec == Codec::Protobuf
                        && back == Codec::Json
                        && e.message().contains("Invalid variant"),
                    "a decoded message does not encode: {e:?}"
                );
                continue;
            }
            let again = back.decode::<M>(out.clone().freeze()).unwrap_or_else(|e| {
                panic!(
                    "{back:?} written by the codec does not read back: {e:?}: {:?}",
                    String::from_utf8_lossy(&out)
                )
            });
            assert_eq!(again, msg, "{codec:?} then {back:?}");
        }
    }
}

fuzz_target!(|input: &[u8]| {
    // The first byte picks the message type; the rest is the body.
    let Some((&kind, body)) = input.split_first() else {
        return;
    };
    match kind % 6 {
        0 => round_trip::<EchoRequest>(body),
        1 => round_trip::<CountRequest>(body),
        2 => round_trip::<RegisterRequest>(body),
        3 => round_trip::<PutConfigRequest>(body),
        4 => round_trip::<WatchRequest>(body),
        _ => round_trip::<LockRequest>(body),
    }
});
