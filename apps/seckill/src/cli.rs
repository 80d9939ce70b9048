//! The processes' entry points (command line and start-up), shared by the `keel-seckill`
//! binary and by `keel` (`keel seckill <role>`, which `keel up` runs).

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::orders_pg::PgOrders;
use crate::orders_service::{Inventories, OrderBook, OrdersService};
use crate::peers::{self, Peers};
use crate::{Inventory, InventoryService, Orders, proto};
use anyhow::Context as _;
use clap::Subcommand;

/// The durable consumer through which orders instances follow a shard's journal stream.
const ORDERS_CONSUMER: &str = "keel-orders";

/// How long a reservation record handed to an orders instance waits for its acknowledgement
/// before it is delivered again (to whichever instance asks next).
const ORDERS_ACK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

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
        /// An inventory shard: NAME, found through the registry, or NAME=HOST:PORT (repeat
        /// for each shard; new items are spread over all of them).
        #[arg(long = "inventory", value_parser = peers::parse_peer, required = true)]
        inventories: Vec<(String, Option<String>)>,
        /// The orders instance of a shard at a fixed address: NAME=HOST:PORT (a shard without
        /// one is found through the registry).
        #[arg(long = "orders", value_parser = peers::parse_peer)]
        orders: Vec<(String, Option<String>)>,
        /// The naming service — Keel's registry (HOST:PORT) or etcd (etcd://HOST:PORT,…):
        /// where peers without an address are found, and where this process registers.
        #[arg(long)]
        registry: Option<String>,
        /// A file holding the token of the admin endpoints. Without it, the token is read from
        /// the environment variable KEEL_ADMIN_TOKEN. (Never on the command line, where every
        /// user of the machine sees it in `ps`.)
        #[arg(long)]
        admin_token_file: Option<std::path::PathBuf>,
        /// Buckets each item's stock is split into.
        #[arg(long, default_value_t = 16)]
        buckets: u32,
        /// The catalog cache's shared tier: a Redis URL (`redis://127.0.0.1:6379/`); without
        /// one, only the in-process tier.
        #[arg(long)]
        cache_redis: Option<String>,
        /// How long the catalog cache keeps a stock figure (each tier).
        #[arg(long, default_value_t = 1000)]
        cache_ttl_ms: u64,
        /// How long a buy whose answer was lost (its shard's owner died or is being replaced)
        /// is sent again with the same request id before the buyer gets 503.
        #[arg(long, default_value_t = 10_000)]
        in_doubt_ms: u64,
    },
    /// Run an orders instance until Ctrl-C.
    Orders {
        /// Address to listen on (Keel RPC and HTTP/JSON).
        #[arg(long, default_value = "127.0.0.1:7300")]
        addr: SocketAddr,
        /// Directory of the order book's journal.
        #[arg(long, default_value = "keel-data/orders")]
        data_dir: std::path::PathBuf,
        /// An inventory shard to take reservations from: NAME (through the registry) or
        /// NAME=HOST:PORT; repeat for each. The process registers as the orders of each.
        #[arg(long = "inventory", value_parser = peers::parse_peer, required = true)]
        inventories: Vec<(String, Option<String>)>,
        /// The naming service — Keel's registry (HOST:PORT) or etcd (etcd://HOST:PORT,…).
        #[arg(long)]
        registry: Option<String>,
        /// Time a buyer has to pay before the order expires and its unit returns.
        #[arg(long, default_value_t = 600_000)]
        payment_window_ms: u64,
        /// How often unpaid orders are checked for expiry.
        #[arg(long, default_value_t = 200)]
        sweep_ms: u64,
        /// Keep the order book in PostgreSQL (`postgres://USER@HOST:PORT/DATABASE`) instead
        /// of `--data-dir`; several orders instances may share it. Needs `--journal`: the
        /// reservations then come from the shards' journal streams. Also read from
        /// `KEEL_ORDERS_DATABASE`, which keeps a password off the command line.
        #[arg(
            long,
            env = "KEEL_ORDERS_DATABASE",
            hide_env_values = true,
            requires = "journal"
        )]
        database: Option<String>,
        /// With `--database`: the JetStream servers holding the shards' journals
        /// (`nats://HOST:PORT[,HOST:PORT…]`); each shard's stream is read through the durable
        /// consumer `keel-orders`, shared by every orders instance.
        #[arg(long, requires = "database")]
        journal: Option<String>,
        /// With `--journal`: shard S's stream is `<PREFIX>-S` (the inventory's default
        /// stream names have the prefix `keel-inventory`).
        #[arg(long, default_value = "keel-inventory")]
        stream_prefix: String,
    },
    /// Run an inventory instance until Ctrl-C.
    Inventory {
        /// Address to listen on (Keel RPC and HTTP/JSON).
        #[arg(long, default_value = "127.0.0.1:7200")]
        addr: SocketAddr,
        /// Directory of the instance's journal.
        #[arg(long, default_value = "keel-data/inventory")]
        data_dir: std::path::PathBuf,
        /// The journal in a NATS JetStream stream instead of `--data-dir`:
        /// `nats://HOST:PORT[,HOST:PORT…][?replicas=N&in_flight=M]` (N: 1, 3 or 5, used when the
        /// stream is created; M: messages awaiting acknowledgement at once, 4 by default).
        #[arg(long)]
        journal: Option<String>,
        /// The stream's name with `--journal` (default `keel-inventory-<shard>`).
        #[arg(long)]
        stream: Option<String>,
        /// The shard's name (it prefixes the ids of its orders).
        #[arg(long, default_value = "inv-0", value_parser = parse_shard)]
        shard: String,
        /// The naming service — Keel's registry (HOST:PORT) or etcd (etcd://HOST:PORT,…),
        /// to register in. With `--journal` too, the shard's processes elect its owner there:
        /// one serves, the others stand by.
        #[arg(long)]
        registry: Option<String>,
        /// The election lease's TTL (with `--journal` and `--registry`): how long a dead
        /// owner keeps its shard before a standby takes over.
        #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u64).range(300..=600_000))]
        lease_ttl_ms: u64,
    },
}

/// The environment variable that holds the admin token (`keel up` sets it in the API).
pub const ADMIN_TOKEN_ENV: &str = "KEEL_ADMIN_TOKEN";

/// A secret from `file` (its contents, trimmed) or else from the environment variable `env`;
/// `None` when neither is set (an empty variable counts as unset). Secrets never come from the
/// command line, which `ps` shows to every user of the machine.
pub fn secret(file: Option<&std::path::Path>, env: &str) -> anyhow::Result<Option<String>> {
    use anyhow::Context as _;
    match file {
        Some(path) => {
            let value = std::fs::read_to_string(path)
                .with_context(|| format!("reading the secret in {}", path.display()))?;
            let value = value.trim();
            anyhow::ensure!(!value.is_empty(), "{} is empty", path.display());
            Ok(Some(value.to_owned()))
        }
        None => match std::env::var(env) {
            Ok(value) if value.is_empty() => Ok(None),
            Ok(value) => Ok(Some(value)),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(e) => anyhow::bail!("{env}: {e}"),
        },
    }
}

use keel_net::stop_requested;

fn parse_shard(text: &str) -> Result<String, String> {
    peers::check_shard(text)
        .map(|()| text.to_owned())
        .map_err(|e| e.to_string())
}

/// The sale's id: 64 random bits in `<dir>/sale-id`, made on first use. It names the sale's
/// entries in shared stores (the catalog cache's Redis tier).
fn sale_id(dir: &std::path::Path) -> anyhow::Result<String> {
    let file = dir.join("sale-id");
    match std::fs::read_to_string(&file) {
        Ok(id) if !id.trim().is_empty() => Ok(id.trim().to_owned()),
        _ => {
            let id = format!("{:016x}", crate::random_u64());
            std::fs::write(&file, &id).with_context(|| format!("writing {}", file.display()))?;
            Ok(id)
        }
    }
}

/// The API's catalog and the sale's id: with a naming service, both shared by every API
/// there (a catalog in `data_dir` from a sale that ran without one is copied in, once); without
/// one, in `data_dir`.
async fn open_catalog(
    peers: &Peers,
    data_dir: &std::path::Path,
) -> anyhow::Result<(crate::api::Catalog, String, Option<keel_store::DirLock>)> {
    let Some(naming) = peers.registry() else {
        let catalog = crate::api::Catalog::open(data_dir)
            .with_context(|| format!("opening the catalog in {}", data_dir.display()))?;
        return Ok((catalog, sale_id(data_dir)?, None));
    };
    // The directory stays this process's while it runs, as with a local catalog.
    let lock = keel_store::DirLock::acquire(data_dir)
        .with_context(|| format!("opening the catalog in {}", data_dir.display()))?;
    let catalog = crate::api::Catalog::shared(naming.clone())
        .await
        .context("opening the catalog in the naming service")?;
    // A local catalog is copied once; the marker keeps a later start (after items were
    // removed from the shared one, say) from copying it again.
    let moved = data_dir.join("catalog-moved");
    let holds_more_than_the_lock = data_dir.read_dir().is_ok_and(|d| {
        d.filter_map(Result::ok)
            .any(|e| e.file_name() != keel_store::lock::LOCK_FILE)
    });
    let mut lock = Some(lock);
    if !moved.exists() && holds_more_than_the_lock {
        // The local journal takes the directory's lock itself.
        drop(lock.take());
        let local = crate::api::Catalog::open(data_dir)
            .with_context(|| format!("opening the catalog in {}", data_dir.display()))?;
        let copied = catalog.import(&local).await?;
        std::fs::write(&moved, b"the catalog is in the naming service\n")
            .with_context(|| format!("writing {}", moved.display()))?;
        if copied > 0 {
            tracing::info!(copied, dir = %data_dir.display(), "the catalog moved into the naming service");
        }
        drop(local);
        lock = Some(
            keel_store::DirLock::acquire(data_dir)
                .with_context(|| format!("opening the catalog in {}", data_dir.display()))?,
        );
    }
    // The sale's id (it names the stock cache's shared entries): the first API's, or the one
    // the local directory had.
    let mine = match std::fs::read_to_string(data_dir.join("sale-id")) {
        Ok(id) if !id.trim().is_empty() => id.trim().to_owned(),
        _ => format!("{:016x}", crate::random_u64()),
    };
    let key = "seckill/sale-id";
    use keel_registry::NamingBackend as _;
    let sale = match naming
        .put_config_if(peers::NAMESPACE, key, mine.clone().into_bytes().into(), 0)
        .await
    {
        Ok(_) => mine,
        Err(e) if e.code() == keel_rpc::Code::FailedPrecondition => {
            let entry = naming
                .get_config(peers::NAMESPACE, key)
                .await
                .context("reading the sale's id")?
                .context("the sale's id vanished")?;
            String::from_utf8_lossy(&entry.value).into_owned()
        }
        Err(e) => return Err(anyhow::anyhow!("recording the sale's id: {e}")),
    };
    Ok((catalog, sale, lock))
}

/// Deregisters what `registrations` holds (a process stopping leaves the registry at once
/// instead of when its lease runs out).
async fn deregister(registrations: Vec<keel_registry::Registration<keel_registry::Naming>>) {
    for r in registrations {
        if let Err(e) = r.deregister().await {
            tracing::warn!(error = %e, "deregistering failed");
        }
    }
}

/// Runs a process of the sale until Ctrl-C (SIGINT). The first line it prints is
/// `<role> on <address>`, once it listens.
pub fn run(role: Role) -> anyhow::Result<()> {
    match role {
        Role::Api {
            addr,
            data_dir,
            inventories,
            orders,
            registry,
            admin_token_file,
            buckets,
            cache_redis,
            cache_ttl_ms,
            in_doubt_ms,
        } => {
            let admin_token =
                secret(admin_token_file.as_deref(), ADMIN_TOKEN_ENV)?.with_context(|| {
                    format!(
                        "the admin token is needed: set {ADMIN_TOKEN_ENV} or --admin-token-file"
                    )
                })?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let peers = Peers::connect(registry.as_deref()).await?;
                let (catalog, sale, _lock) = open_catalog(&peers, &data_dir).await?;
                let mut shards = Vec::new();
                for (name, address) in inventories {
                    let orders_address = orders
                        .iter()
                        .find(|(n, _)| *n == name)
                        .and_then(|(_, a)| a.clone());
                    shards.push(crate::api::Shard {
                        inventory: proto::InventoryClient::new(
                            peers.channel(&peers::inventory_service(&name), address.as_deref())?,
                        ),
                        orders: proto::OrdersClient::new(
                            peers.channel(
                                &peers::orders_service(&name),
                                orders_address.as_deref(),
                            )?,
                        ),
                        name,
                    });
                }
                let ttl = std::time::Duration::from_millis(cache_ttl_ms.max(1));
                let config = keel_cache::CacheConfig {
                    local_ttl: ttl,
                    shared_ttl: ttl,
                    // Named after this sale, so sales sharing one Redis never see each
                    // other's figures.
                    ..keel_cache::CacheConfig::new(format!("seckill-stock-{sale}"))
                };
                let stock_cache = match cache_redis {
                    None => keel_cache::TwoLevel::local(config),
                    Some(url) => {
                        let tier = keel_cache::RedisTier::connect(&url)
                            .await
                            .with_context(|| format!("the catalog cache's Redis at {url}"))?;
                        keel_cache::TwoLevel::with_shared(config, tier)
                            .await
                            .with_context(|| format!("subscribing at {url}"))?
                    }
                };
                let mut api =
                    crate::api::Api::new(catalog, shards, admin_token, buckets, stock_cache);
                api.registry = peers.registry().cloned();
                api.in_doubt_for = std::time::Duration::from_millis(in_doubt_ms);
                let api = Arc::new(api);
                // Transfers between shards left unfinished (a crash, a shard away): finished
                // now and retried every second.
                tokio::spawn({
                    let api = Arc::downgrade(&api);
                    async move {
                        while let Some(api) = api.upgrade() {
                            api.finish_pending_transfers().await;
                            drop(api);
                            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                        }
                    }
                });
                if let Some(registry) = peers.registry() {
                    tokio::spawn(crate::api::follow_stock_changes(
                        api.stock_cache.clone(),
                        registry.clone(),
                    ));
                }
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding {addr}"))?;
                let local = listener.local_addr()?;
                let registration = peers.register(peers::API_SERVICE, local).await?;
                let _ = writeln!(std::io::stdout(), "api on {local}");
                crate::api::serve(api, listener, async {
                    stop_requested().await;
                })
                .await?;
                deregister(registration.into_iter().collect()).await;
                Ok(())
            })
        }
        Role::Orders {
            addr,
            data_dir,
            inventories,
            registry,
            payment_window_ms,
            sweep_ms,
            database,
            journal,
            stream_prefix,
        } => {
            let local_book = match database {
                Some(_) => None,
                None => Some(
                    Orders::open(
                        &data_dir,
                        keel_store::JournalOptions::default(),
                        payment_window_ms,
                    )
                    .with_context(|| format!("opening the orders in {}", data_dir.display()))?,
                ),
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let orders = Arc::new(match (local_book, database, journal) {
                    (Some(orders), _, _) => OrderBook::Local(Arc::new(orders)),
                    (None, Some(url), Some(journal)) => {
                        let orders = PgOrders::connect(&url, payment_window_ms)
                            .await
                            .context("opening the order book in PostgreSQL")?;
                        let mut feeds = std::collections::BTreeMap::new();
                        for (name, _) in &inventories {
                            let stream = format!("{stream_prefix}-{name}");
                            let options = keel_store::StreamOptions::parse(&journal, &stream)
                                .map_err(|e| anyhow::anyhow!("--journal: {e}"))?;
                            let feed = keel_store::StreamFeed::open(
                                &options,
                                ORDERS_CONSUMER,
                                ORDERS_ACK_WAIT,
                            )
                            .await
                            .with_context(|| format!("following the journal stream {stream}"))?;
                            feeds.insert(name.clone(), Arc::new(feed));
                        }
                        OrderBook::Postgres { orders, feeds }
                    }
                    _ => anyhow::bail!("--database needs --journal"),
                });
                let peers = Peers::connect(registry.as_deref()).await?;
                let mut clients = Inventories::new();
                for (name, address) in &inventories {
                    let channel =
                        peers.channel(&peers::inventory_service(name), address.as_deref())?;
                    clients.insert(name.clone(), proto::InventoryClient::new(channel));
                }
                let clients = Arc::new(clients);
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding {addr}"))?;
                let local = listener.local_addr()?;
                let mut registrations = Vec::new();
                for (name, _) in &inventories {
                    registrations
                        .extend(peers.register(&peers::orders_service(name), local).await?);
                }
                let _ = writeln!(std::io::stdout(), "orders on {local}");
                let work = tokio::spawn(crate::orders_service::background(
                    orders.clone(),
                    clients.clone(),
                    std::time::Duration::from_millis(sweep_ms.max(1)),
                    peers.registry().cloned(),
                ));
                let server = keel_rpc::Server::builder()
                    .add_service(proto::OrdersServer::new(OrdersService::new(
                        orders, clients,
                    )))
                    .build();
                server
                    .serve(listener, async {
                        stop_requested().await;
                    })
                    .await?;
                work.abort();
                deregister(registrations).await;
                Ok(())
            })
        }
        Role::Inventory {
            addr,
            data_dir,
            journal,
            stream,
            shard,
            registry,
            lease_ttl_ms,
        } => {
            let stream = stream.unwrap_or_else(|| format!("keel-inventory-{shard}"));
            let target = keel_store::LogTarget::choose(journal.as_deref(), &data_dir, &stream)
                .map_err(anyhow::Error::msg)?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let peers = Peers::connect(registry.as_deref()).await?;
                let elected = matches!(target, keel_store::LogTarget::Stream(_))
                    && peers.registry().is_some();
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding {addr}"))?;
                let local = listener.local_addr()?;
                let (service, registration) = if elected {
                    (InventoryService::standby(), None)
                } else {
                    let place = target.describe();
                    let inventory = Inventory::open_at(target.clone())
                        .await
                        .with_context(|| format!("opening the inventory in {place}"))?;
                    let registration = peers
                        .register(&peers::inventory_service(&shard), local)
                        .await?;
                    (InventoryService::new(Arc::new(inventory)), registration)
                };
                let stop = tokio_util::sync::CancellationToken::new();
                let ownership = match (elected, peers.registry()) {
                    (true, Some(backend)) => {
                        let (role, _) = tokio::sync::watch::channel(crate::owner::Role::Standby);
                        Some(tokio::spawn(crate::owner::run(
                            backend.clone(),
                            crate::owner::Ownership {
                                shard: shard.clone(),
                                target,
                                lease_ttl: std::time::Duration::from_millis(lease_ttl_ms),
                                address: local,
                            },
                            service.clone(),
                            role,
                            stop.clone(),
                        )))
                    }
                    _ => None,
                };
                let _ = writeln!(std::io::stdout(), "inventory on {local}");
                let server = keel_rpc::Server::builder()
                    .add_service(proto::InventoryServer::new(service))
                    .build();
                server
                    .serve(listener, async {
                        stop_requested().await;
                        // Step down first: deregistered and resigned, so a standby takes over
                        // at once rather than after the lease.
                        stop.cancel();
                        if let Some(ownership) = ownership {
                            let _ = ownership.await;
                        }
                    })
                    .await?;
                deregister(registration.into_iter().collect()).await;
                Ok(())
            })
        }
    }
}
