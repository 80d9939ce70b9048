//! Keel's chat service: rooms over WebSocket, as a browser chat needs them.
//!
//! A client signs in (`POST /chat/api/login`, a demo login that hands out an HS256 token),
//! opens `GET /chat/ws?token=…` as a WebSocket and speaks JSON text frames: join and leave
//! rooms, send to a room or to one user, ask for members and for history. The protocol and
//! its guarantees are in `docs/chat.md`.
//!
//! - [`ws`]: WebSocket framing on `tungstenite`'s frame headers, over buffers each
//!   connection holds only while it reads or writes.
//! - [`protocol`]: the JSON messages.
//! - [`hub`]: rooms — members, numbering, the journal (keel-store) that makes a message
//!   durable before anyone sees it, delivery in order, history and recovery after `since`.
//! - [`conn`]: one connection — its bounded queue (a consumer that falls behind is closed
//!   with 4009, it never slows the room), pings, token expiry, rate limits.
//! - [`cluster`]: several instances as one chat — each room has one owner (rendezvous
//!   hashing over the instances' names) that numbers and journals its messages; the other
//!   instances forward their connections' requests to it and receive its messages, with
//!   gaps detected by number and recovered.
//! - [`transport`]: the links between instances — direct WebSockets (addresses fixed or
//!   found in the registry) or NATS subjects.
//! - [`server`]: login, the upgrade, registration in the registry, and keel-net's accept
//!   loop.
//! - [`config`]: the settings, each with a default; [`cli`]: `keel chat`; [`bench`]:
//!   `keel bench chat`.

pub mod bench;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod conn;
pub mod hub;
pub mod protocol;
pub mod server;
pub mod transport;
pub mod ws;

pub use config::{ChatConfig, ConfigError};
pub use server::Chat;
