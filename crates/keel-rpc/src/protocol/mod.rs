//! The Keel wire protocol, as pure code: bytes in, values out, no sockets.
//!
//! - [`frame`]: the fixed header, frame types, the metadata section, and the decoder that refuses
//!   an oversized frame before allocating for it.
//! - [`codec`]: how message bodies are encoded (protobuf or JSON, chosen per call).
//!
//! The byte layout is specified in `docs/protocol.md`.

pub mod codec;
pub mod frame;

pub use codec::{Codec, RpcMessage};
pub use frame::{
    DEFAULT_MAX_FRAME_SIZE, Frame, FrameError, FrameType, HEADER_LEN, MAGIC, Metadata, Text,
    VERSION,
};
