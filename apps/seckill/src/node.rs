//! `keel node --config cluster.toml --host NAME`: one host's share of a sale that runs on
//! several machines, over the distributed engines — etcd (or a Keel registry) for names,
//! config and elections; NATS JetStream for the shards' journals; PostgreSQL for the orders;
//! Redis, optionally, for the stock cache's shared tier.
//!
//! One `cluster.toml` names the engines and every host's parts; each host runs
//! `keel node` with its own name. A host runs any of: a gateway, an API, processes for some
//! inventory shards (each shard's processes elect its owner, so a shard listed on two hosts
//! has an owner on one and a standby on the other), and an orders instance (which follows
//! every shard: the order book is one table, and the shards' feeds are shared consumers).
//! The parts are supervised as `keel up` supervises its own: restarted when they die, stopped
//! in order on Ctrl-C.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::Deserialize;
use tokio::process::Child;

use crate::up::{
    LimitsSection, OnStreams, Part, api_part, gateway_toml, inventory_part, launch, nth_address,
    orders_part, run_parts, start_gateway,
};

/// `cluster.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Token of the admin endpoints, the same on every host.
    pub admin_token: String,
    /// Where each host keeps its own files (its API's catalog lock, the gateway's
    /// configuration and pages, the process ids); relative paths are from the directory
    /// `keel node` runs in.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// The engines every host uses.
    pub engines: Engines,
    /// The sale's settings.
    #[serde(default)]
    pub sale: SaleSection,
    /// The gateways' buy limits.
    #[serde(default)]
    pub limits: LimitsSection,
    /// The hosts.
    pub hosts: Vec<HostSection>,
}

fn default_data_dir() -> PathBuf {
    "keel-node".into()
}

/// `[engines]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Engines {
    /// The naming service: `etcd://HOST:PORT,…` (or a Keel registry, `HOST:PORT`).
    pub registry: String,
    /// The JetStream servers of the shards' journals: `nats://HOST:PORT,…?replicas=3`.
    pub journal: String,
    /// The name prefix of the sale's streams (shard S's stream is `<streams>-S`); it names
    /// the sale in JetStream, so it must stay the same for the sale's life.
    pub streams: String,
    /// The order book: `postgres://USER@HOST:PORT/DATABASE`.
    pub database: String,
    /// The stock cache's shared tier (`redis://HOST:PORT/`), if any.
    #[serde(default)]
    pub redis: Option<String>,
}

/// `[sale]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SaleSection {
    /// Inventory shards (`inv-0` …), 1 to 64.
    pub shards: u32,
    /// The shard owners' election lease, in milliseconds (300 to 600000).
    pub lease_ttl_ms: u64,
    /// Time a buyer has to pay, in milliseconds.
    pub payment_window_ms: u64,
    /// How long the stock cache keeps a figure, in milliseconds.
    pub cache_ttl_ms: u64,
}

impl Default for SaleSection {
    fn default() -> SaleSection {
        SaleSection {
            shards: 2,
            lease_ttl_ms: 3000,
            payment_window_ms: 600_000,
            cache_ttl_ms: 1000,
        }
    }
}

/// `[[hosts]]`: one machine and the parts it runs. Addresses are where the part listens
/// (the host's own address, which the others reach).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostSection {
    /// The host's name (`keel node --host NAME`).
    pub name: String,
    /// The gateway's address, if the host runs one.
    #[serde(default)]
    pub gateway: Option<String>,
    /// The gateway's admin address (with `gateway`; default: its port + 1000).
    #[serde(default)]
    pub gateway_admin: Option<String>,
    /// The API's address, if the host runs one.
    #[serde(default)]
    pub api: Option<String>,
    /// The first inventory process's address (the k-th listed shard's on its port + k).
    #[serde(default)]
    pub inventory: Option<String>,
    /// The shards this host runs a process for (owner or standby, as elected).
    #[serde(default)]
    pub shards: Vec<String>,
    /// The orders instance's address, if the host runs one.
    #[serde(default)]
    pub orders: Option<String>,
}

impl ClusterConfig {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> anyhow::Result<ClusterConfig> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let config: ClusterConfig =
            toml::from_str(&text).with_context(|| format!("{} is not valid", path.display()))?;
        config
            .check()
            .with_context(|| format!("{} is not valid", path.display()))?;
        Ok(config)
    }

    /// The names of the sale's shards.
    pub fn shard_names(&self) -> Vec<String> {
        (0..self.sale.shards).map(|i| format!("inv-{i}")).collect()
    }

    fn check(&self) -> anyhow::Result<()> {
        if self.admin_token.len() < 16 {
            bail!("admin_token: use at least 16 characters");
        }
        keel_registry::NamingAddress::parse(&self.engines.registry)
            .map_err(|e| anyhow::anyhow!("engines.registry: {e}"))?;
        keel_store::StreamOptions::parse(&self.engines.journal, "check")
            .map_err(|e| anyhow::anyhow!("engines.journal: {e}"))?;
        keel_store::stream::check_stream_name(&format!("{}-inv-0", self.engines.streams))
            .map_err(|e| anyhow::anyhow!("engines.streams: {e}"))?;
        let db = &self.engines.database;
        if !(db.starts_with("postgres://") || db.starts_with("postgresql://")) {
            bail!("engines.database: use postgres://USER@HOST:PORT/DATABASE");
        }
        if !(1..=64).contains(&self.sale.shards) {
            bail!("sale.shards: use 1 to 64");
        }
        if !(300..=600_000).contains(&self.sale.lease_ttl_ms) {
            bail!("sale.lease_ttl_ms: use 300 to 600000");
        }
        if self.hosts.is_empty() {
            bail!("hosts: name at least one host");
        }
        let shards = self.shard_names();
        let mut names = std::collections::HashSet::new();
        for host in &self.hosts {
            if !names.insert(host.name.as_str()) {
                bail!("hosts: {:?} is named twice", host.name);
            }
            for shard in &host.shards {
                if !shards.contains(shard) {
                    bail!(
                        "hosts.{}.shards: {shard:?} is not a shard of the sale ({})",
                        host.name,
                        shards.join(", ")
                    );
                }
            }
            if !host.shards.is_empty() && host.inventory.is_none() {
                bail!("hosts.{}: shards need an inventory address", host.name);
            }
            if host.gateway.is_some()
                && host.api.is_none()
                && self.hosts.iter().all(|h| h.api.is_none())
            {
                bail!("hosts.{}: a gateway needs an API on some host", host.name);
            }
        }
        for shard in &shards {
            if !self.hosts.iter().any(|h| h.shards.contains(shard)) {
                bail!("shard {shard} runs on no host: list it in some host's shards");
            }
        }
        if !self.hosts.iter().any(|h| h.orders.is_some()) {
            bail!("hosts: some host must run an orders instance");
        }
        Ok(())
    }
}

/// Runs host `host`'s parts of the sale in `config` until Ctrl-C (or for `run_for`).
pub async fn run(
    config: ClusterConfig,
    host: &str,
    run_for: Option<Duration>,
) -> anyhow::Result<()> {
    let interrupted = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("listening for Ctrl-C")?;
    let Some(me) = config.hosts.iter().find(|h| h.name == host) else {
        bail!(
            "--host {host:?}: the hosts in the configuration are {}",
            config
                .hosts
                .iter()
                .map(|h| h.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    let data = config.data_dir.join(host);
    std::fs::create_dir_all(&data)
        .with_context(|| format!("data_dir {}: cannot create it", data.display()))?;
    let _lock = keel_store::DirLock::acquire(&data)
        .with_context(|| format!("another `keel node` runs on {}", data.display()))?;
    let dir = |name: &str| data.join(name).to_string_lossy().into_owned();
    let engines = &config.engines;
    let registry = engines.registry.trim().to_owned();
    let shards = config.shard_names();
    let mut parts: Vec<(Part, Child)> = Vec::new();

    let on_streams = OnStreams {
        journal: &engines.journal,
        prefix: &engines.streams,
        lease_ttl_ms: config.sale.lease_ttl_ms,
    };
    for (k, shard) in me.shards.iter().enumerate() {
        let base = me.inventory.as_deref().unwrap_or_default();
        let part = inventory_part(
            format!("inventory-{shard}"),
            nth_address(base, k as u32)?,
            dir(&format!("inventory-{shard}")),
            shard,
            &registry,
            Some(&on_streams),
        );
        launch(part, &mut parts).await?;
    }
    if let Some(address) = &me.orders {
        let every: Vec<&String> = shards.iter().collect();
        let part = orders_part(
            "orders".into(),
            address.clone(),
            dir("orders"),
            &registry,
            config.sale.payment_window_ms,
            &every,
            Some((&engines.database, &on_streams)),
        );
        launch(part, &mut parts).await?;
    }
    if let Some(address) = &me.api {
        let part = api_part(
            "api".into(),
            address.clone(),
            dir("catalog"),
            &registry,
            config.sale.cache_ttl_ms,
            engines.redis.as_deref(),
            &shards,
            &config.admin_token,
        );
        launch(part, &mut parts).await?;
    }
    let mut gateway_addr = None;
    if let Some(listen) = &me.gateway {
        let admin = match &me.gateway_admin {
            Some(a) => a.clone(),
            None => nth_address(listen, 1000)?,
        };
        let web = std::path::absolute(data.join("web"))?;
        let text = gateway_toml(
            listen,
            &admin,
            &config.admin_token,
            &config.limits,
            &registry,
            &web,
            false,
        );
        gateway_addr = Some(start_gateway(&data, listen, &text, &mut parts).await?);
    }
    keel_net::say!(
        "Keel node {host} is up: {} part(s){}; Ctrl-C stops them.",
        parts.len(),
        gateway_addr.map_or_else(String::new, |a| format!(", the gateway on http://{a}/"))
    );
    run_parts(parts, &data, interrupted, run_for).await
}

#[cfg(test)]
mod tests {
    use super::ClusterConfig;

    const GOOD: &str = r#"
admin_token = "0123456789abcdef0123"
[engines]
registry = "etcd://10.0.0.1:2379,10.0.0.2:2379"
journal = "nats://10.0.0.1:4222?replicas=3"
streams = "keel-shop"
database = "postgres://keel@10.0.0.4:5432/shop"
[sale]
shards = 2
[[hosts]]
name = "h1"
gateway = "10.0.0.1:8080"
api = "10.0.0.1:7400"
inventory = "10.0.0.1:7200"
shards = ["inv-0", "inv-1"]
orders = "10.0.0.1:7300"
[[hosts]]
name = "h2"
inventory = "10.0.0.2:7200"
shards = ["inv-1"]
"#;

    fn check(text: &str) -> Result<ClusterConfig, String> {
        let config: ClusterConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        config.check().map_err(|e| e.to_string())?;
        Ok(config)
    }

    #[test]
    fn a_cluster_file_is_checked_field_by_field() {
        let config = check(GOOD).unwrap();
        assert_eq!(config.shard_names(), ["inv-0", "inv-1"]);
        assert_eq!(config.sale.lease_ttl_ms, 3000);
        for (edit, error) in [
            (("shards = 2", "shards = 0"), "sale.shards"),
            (
                ("etcd://10.0.0.1:2379,10.0.0.2:2379", "http://x"),
                "engines.registry",
            ),
            (("replicas=3", "replicas=2"), "engines.journal"),
            (("keel-shop", "keel shop"), "engines.streams"),
            (
                ("postgres://keel@10.0.0.4:5432/shop", "mysql://x"),
                "engines.database",
            ),
            (
                ("shards = [\"inv-1\"]", "shards = [\"inv-7\"]"),
                "not a shard of the sale",
            ),
            (
                ("shards = [\"inv-0\", \"inv-1\"]", "shards = [\"inv-1\"]"),
                "inv-0 runs on no host",
            ),
            (("name = \"h2\"", "name = \"h1\""), "named twice"),
            (("orders = \"10.0.0.1:7300\"", ""), "orders instance"),
            (
                (
                    "admin_token = \"0123456789abcdef0123\"",
                    "admin_token = \"short\"",
                ),
                "admin_token",
            ),
        ] {
            let text = GOOD.replacen(edit.0, edit.1, 1);
            assert_ne!(text, GOOD, "{edit:?}");
            let err = check(&text).unwrap_err();
            assert!(err.contains(error), "{edit:?}: {err}");
        }
        let err = check(&GOOD.replace("[sale]", "[sale]\ncolour = \"red\"")).unwrap_err();
        assert!(err.contains("colour"), "{err}");
    }
}
