//! Keel RPC: a binary multiplexed protocol on long TCP connections.
//!
//! - [`protocol`]: frames, metadata, codecs: pure code, no I/O (spec: `docs/protocol.md`).
//! - [`server`]: [`Server`] serving services from `.proto` (or hand-written [`ServiceDef`]s),
//!   with HTTP/1.1 (JSON calls, `/health`, `/metrics`, `/status`) on the same port.
//! - [`client`]: [`Channel`], one address over one multiplexed connection with keepalive and
//!   reconnect; [`client::CallTransport`], the seam where discovery and balancing plug in.
//! - [`status`]: the closed set of status codes.
//!
//! Services are usually written from a `.proto` file compiled by `keel-rpc-build` and pulled
//! in with [`include_proto!`]; see the `keel-echo` crate for a complete example.

pub mod client;
pub mod http_body;
pub mod protocol;
pub mod server;
pub mod status;
mod transport;

pub use client::{CallOptions, Channel, ChannelConfig, Streaming};
pub use protocol::{Codec, Metadata, RpcMessage};
pub use server::{Context, ResponseStream, Server, ServerConfig, ServiceDef};
pub use status::{Code, Status};

/// Re-exports used by generated code; not a stable API.
#[doc(hidden)]
pub mod __private {
    pub use futures_util;
    pub use pbjson;
    pub use pbjson_types;
    pub use prost;
    pub use serde;
}

/// Includes the code `keel-rpc-build` generated for a protobuf package: messages (prost), their
/// JSON mapping (pbjson) and the service traits, servers and clients.
///
/// ```ignore
/// pub mod echo {
///     keel_rpc::include_proto!("keel.echo.v1");
/// }
/// ```
#[macro_export]
macro_rules! include_proto {
    ($package:literal) => {
        #[allow(unused_imports)]
        use $crate::__private::{pbjson, prost, serde};
        include!(concat!(env!("OUT_DIR"), "/", $package, ".rs"));
        include!(concat!(env!("OUT_DIR"), "/", $package, ".serde.rs"));
    };
}
