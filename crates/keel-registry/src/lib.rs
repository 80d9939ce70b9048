//! Keel's naming service: the seeds' addressing service and coordination centre.
//!
//! - [`server`]: the [`Registry`] — leases kept alive by heartbeats, service instances,
//!   watches that resume from a revision, versioned config, locks and elections with fencing
//!   tokens, protection against empty pushes — durable through `keel-store`. Its API is a Keel
//!   RPC service (`keel.registry.v1.Registry`, see `proto/registry.proto`), so it is also
//!   served as HTTP/JSON on the same port.
//! - [`client`]: [`RegistryDiscover`] (the `keel_governance::Discover` implementation: an
//!   initial list plus a watch, the last known list while the registry is unreachable, a local
//!   cache file across restarts) and [`Registration`] (keeps an instance's lease alive,
//!   deregisters on shutdown).
//! - [`backend`]: [`NamingBackend`], one interface over Keel's registry and etcd
//!   ([`etcd`], feature `etcd`, on by default), so the discovery and registration helpers
//!   and services work on either.
//! - [`naming`]: [`Naming`], either backend chosen by an address (`HOST:PORT` or
//!   `etcd://HOST:PORT,…`), for processes that take their naming service from configuration.
//! - `state`: the deterministic state machine that the journal replays.

pub mod backend;
pub mod client;
#[cfg(feature = "etcd")]
pub mod etcd;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
#[cfg(feature = "etcd")]
pub mod naming;
pub mod server;
mod state;
#[cfg(feature = "etcd")]
#[doc(hidden)]
pub mod testing;

/// Generated from `proto/registry.proto`.
#[allow(missing_docs, clippy::all)]
pub mod proto {
    keel_rpc::include_proto!("keel.registry.v1");
}

pub use backend::NamingBackend;
pub use client::{ConfigChange, Registration, RegistryDiscover, RegistryHandle, follow_config};
#[cfg(feature = "etcd")]
pub use etcd::EtcdBackend;
#[cfg(feature = "etcd")]
pub use naming::{Naming, NamingAddress, NamingError};
pub use server::{Registry, RegistryConfig, RegistryStats};

/// What can go wrong starting or stopping a registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The journal or a snapshot could not be read or written.
    #[error("registry storage: {0}")]
    Store(#[from] keel_store::StoreError),
    /// Start-up failed for another reason.
    #[error("registry start-up: {0}")]
    Startup(String),
}
