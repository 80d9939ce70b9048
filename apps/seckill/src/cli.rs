//! The processes' entry points (command line and start-up), shared by the `keel-seckill`
//! binary and by `keel` (`keel seckill <role>`, which `keel up` runs).

use std::net::SocketAddr;
use std::sync::Arc;

use crate::orders_service::{Inventories, OrdersService};
use crate::{Inventory, InventoryService, Orders, proto};
use anyhow::Context as _;
use clap::Subcommand;

/// A process of the sale.
#[derive(Subcommand, Debug)]
pub enum Role {
    /// Run the sale's HTTP API and catalog until Ctrl-C.
    Api {
        /// Address to listen on (HTTP).
        #[arg(long, default_value = "127.0.0.1:7400")]
        addr: SocketAddr,
        /// Directory of the catalog's journal.
        #[arg(long, default_value = "keel-data/catalog")]
        data_dir: std::path::PathBuf,
        /// The inventory: NAME=HOST:PORT.
        #[arg(long, value_parser = parse_named)]
        inventory: (String, String),
        /// The orders service: HOST:PORT.
        #[arg(long)]
        orders: String,
        /// Token of the admin endpoints.
        #[arg(long, env = "KEEL_ADMIN_TOKEN")]
        admin_token: String,
        /// Buckets each item's stock is split into.
        #[arg(long, default_value_t = 16)]
        buckets: u32,
    },
    /// Run an orders instance until Ctrl-C.
    Orders {
        /// Address to listen on (Keel RPC and HTTP/JSON).
        #[arg(long, default_value = "127.0.0.1:7300")]
        addr: SocketAddr,
        /// Directory of the order book's journal.
        #[arg(long, default_value = "keel-data/orders")]
        data_dir: std::path::PathBuf,
        /// An inventory to take reservations from: NAME=HOST:PORT (repeat for each).
        #[arg(long = "inventory", value_parser = parse_named)]
        inventories: Vec<(String, String)>,
        /// Time a buyer has to pay before the order expires and its unit returns.
        #[arg(long, default_value_t = 600_000)]
        payment_window_ms: u64,
        /// How often unpaid orders are checked for expiry.
        #[arg(long, default_value_t = 200)]
        sweep_ms: u64,
    },
    /// Run an inventory instance until Ctrl-C.
    Inventory {
        /// Address to listen on (Keel RPC and HTTP/JSON).
        #[arg(long, default_value = "127.0.0.1:7200")]
        addr: SocketAddr,
        /// Directory of the instance's journal.
        #[arg(long, default_value = "keel-data/inventory")]
        data_dir: std::path::PathBuf,
    },
}

fn parse_named(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .filter(|(n, a)| !n.is_empty() && !a.is_empty())
        .map(|(n, a)| (n.to_owned(), a.to_owned()))
        .ok_or_else(|| format!("{text:?} is not NAME=HOST:PORT"))
}

/// Runs a process of the sale until Ctrl-C (SIGINT). The first line it prints is
/// `<role> on <address>`, once it listens.
pub fn run(role: Role) -> anyhow::Result<()> {
    match role {
        Role::Api {
            addr,
            data_dir,
            inventory,
            orders,
            admin_token,
            buckets,
        } => {
            let catalog = crate::api::Catalog::open(&data_dir)
                .with_context(|| format!("opening the catalog in {}", data_dir.display()))?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let channel = |addr: String| {
                    keel_rpc::Channel::with_config(addr, keel_rpc::ChannelConfig::default())
                };
                let api = Arc::new(crate::api::Api {
                    catalog,
                    inventory: proto::InventoryClient::new(channel(inventory.1)),
                    inventory_name: inventory.0,
                    orders: proto::OrdersClient::new(channel(orders)),
                    admin_token,
                    buckets,
                    sold_out: parking_lot::Mutex::new(std::collections::HashMap::new()),
                });
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding {addr}"))?;
                println!("api on {}", listener.local_addr()?);
                crate::api::serve(api, listener, async {
                    let _ = tokio::signal::ctrl_c().await;
                })
                .await?;
                Ok(())
            })
        }
        Role::Orders {
            addr,
            data_dir,
            inventories,
            payment_window_ms,
            sweep_ms,
        } => {
            let orders = Orders::open(
                &data_dir,
                keel_store::JournalOptions::default(),
                payment_window_ms,
            )
            .with_context(|| format!("opening the orders in {}", data_dir.display()))?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let orders = Arc::new(orders);
                let clients: Inventories = inventories
                    .into_iter()
                    .map(|(name, addr)| {
                        let channel = keel_rpc::Channel::with_config(
                            addr,
                            keel_rpc::ChannelConfig::default(),
                        );
                        (name, proto::InventoryClient::new(channel))
                    })
                    .collect();
                let clients = Arc::new(clients);
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding {addr}"))?;
                println!("orders on {}", listener.local_addr()?);
                let work = tokio::spawn(crate::orders_service::background(
                    orders.clone(),
                    clients.clone(),
                    std::time::Duration::from_millis(sweep_ms.max(1)),
                ));
                let server = keel_rpc::Server::builder()
                    .add_service(proto::OrdersServer::new(OrdersService::new(
                        orders, clients,
                    )))
                    .build();
                server
                    .serve(listener, async {
                        let _ = tokio::signal::ctrl_c().await;
                    })
                    .await?;
                work.abort();
                Ok(())
            })
        }
        Role::Inventory { addr, data_dir } => {
            let inventory = Inventory::open(&data_dir, keel_store::JournalOptions::default())
                .with_context(|| format!("opening the inventory in {}", data_dir.display()))?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding {addr}"))?;
                println!("inventory on {}", listener.local_addr()?);
                let server = keel_rpc::Server::builder()
                    .add_service(proto::InventoryServer::new(InventoryService::new(
                        Arc::new(inventory),
                    )))
                    .build();
                server
                    .serve(listener, async {
                        let _ = tokio::signal::ctrl_c().await;
                    })
                    .await?;
                Ok(())
            })
        }
    }
}
