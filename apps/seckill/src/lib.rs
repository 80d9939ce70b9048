//! Keel's flash-sale (seckill) reference application: thousands of buyers fighting over a few
//! items in a short burst, and the stock never oversold.
//!
//! Its parts:
//! - [`inventory`]: [`Inventory`], one inventory instance's share of the stock, whose every
//!   reservation is in its journal before it is acknowledged;
//! - [`orders`]: [`Orders`], the order book: orders made from reservations, a payment window,
//!   shipping only what is paid;
//! - [`service`]: the inventory as a Keel RPC service (`keel.seckill.v1.Inventory`, from
//!   `proto/inventory.proto`), run by the `keel-seckill inventory` process;
//! - [`api`]: the sale's HTTP API (the contract served behind the gateway) and the catalog,
//!   run by `keel-seckill api`;
//! - [`catalog`]: the items, kept in a local journal or shared by every API in the naming
//!   service;
//! - [`orders_pg`]: the order book in PostgreSQL (the scale-out profile), shared by several
//!   orders instances;
//! - [`orders_service`]: the order book as `keel.seckill.v1.Orders`, with its background work
//!   (taking in reservations, expiring unpaid orders), run by `keel-seckill orders`;
//! - [`owner`]: shard ownership, one owner per inventory shard chosen by an election, with
//!   standbys;
//! - [`peers`]: how the processes find each other (fixed addresses or Keel's registry);
//! - [`web`]: the storefront and admin pages the gateway serves;
//! - [`metrics`]: the sale's business in Prometheus text, at the API's `/metrics`;
//! - [`up`]: `keel up`, the sale's topology on one machine: every part its own process behind
//!   the gateway, supervised;
//! - [`node`]: `keel node`, one host's share of the sale across machines (`cluster.toml`);
//! - [`bench`]: `keel bench seckill`, a sale against a running system with its invariants
//!   checked through the API.
//!
//! The `keel` binary dispatches its `up`, `node`, `seckill <role>` and `bench seckill`
//! commands here.

pub mod api;
pub mod bench;
pub mod catalog;
pub mod cli;
pub mod inventory;
pub mod metrics;
pub mod node;
pub mod orders;
pub mod orders_pg;
pub mod orders_service;
pub mod owner;
pub mod peers;
pub mod service;
#[doc(hidden)]
pub mod testing;
pub mod up;
pub mod web;

/// Generated from `proto/inventory.proto`.
#[allow(missing_docs)]
pub mod proto {
    keel_rpc::include_proto!("keel.seckill.v1");
}

pub use inventory::{Inventory, InventoryError, Refusal, Reservation};

/// 64 random bits, for ids and tokens: the standard library seeds each `RandomState` from
/// the operating system's randomness.
pub fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    h.finish()
}
pub use orders::{Order, OrderError, OrderStatus, Orders};
pub use service::InventoryService;
