//! `keel up`: the flash-sale system on one machine, each part its own OS process — the
//! registry, the inventory shards, an orders instance per group of shards, the sale's HTTP API
//! and catalog, and the gateway in front — started from `keel.toml` (written with defaults on
//! first run), restarted with backoff when one dies, and stopped together on Ctrl-C.
//!
//! Each child is this same executable (`keel registry`, `keel seckill <role>`, `keel
//! gateway`); its first line says where it listens. The services register in the registry
//! and find each other there by name (the gateway's pool follows the API's name), so their
//! ports may be 0; a restarted child still keeps its address.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

/// `keel.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpConfig {
    /// Where the processes keep their journals.
    pub data_dir: PathBuf,
    /// Token of the admin endpoints (items, shipping, audit).
    pub admin_token: String,
    /// The gateway: where clients connect, and its admin port.
    pub gateway: GatewaySection,
    /// The registry, where the services find each other.
    #[serde(default = "default_registry")]
    pub registry: RegistrySection,
    /// The sale's HTTP API.
    pub api: Listen,
    /// The inventory shards (a fixed port p: shard i listens on p + i) and where their
    /// journals are.
    pub inventory: InventorySection,
    /// The orders instances (a fixed port p: instance i listens on p + i).
    pub orders: OrdersSection,
    /// How many processes of each kind.
    #[serde(default)]
    pub scale: Scale,
    /// Rate limits on buying, at the gateway.
    #[serde(default)]
    pub limits: LimitsSection,
    /// The catalog cache.
    #[serde(default)]
    pub cache: CacheSection,
    /// The chat service (`[scale] chat` instances behind the gateway at `/chat/`).
    #[serde(default)]
    pub chat: ChatSection,
}

/// `[chat]`: where the chat instances listen (a fixed port p: instance k listens on p + k),
/// and, with `nats`, the NATS server their links to each other go through (direct
/// WebSockets otherwise). They register in the registry, where the gateway and each other
/// find them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChatSection {
    /// `host:port` of instance 0 (port 0: any free port).
    pub listen: String,
    /// A NATS server (`nats://HOST:PORT`) for the links between instances.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats: Option<String>,
    /// The rooms' journals in JetStream streams (`nats://HOST:PORT[?replicas=N&in_flight=M]`,
    /// one stream per instance) instead of `data_dir`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub journal: Option<String>,
}

impl Default for ChatSection {
    fn default() -> ChatSection {
        ChatSection {
            listen: "127.0.0.1:7600".into(),
            nats: None,
            journal: None,
        }
    }
}

/// `[cache]`: the catalog's two-level cache of stock figures. In-process only by default;
/// `redis = "redis://127.0.0.1:6379/"` adds Redis as the shared tier (and carries
/// invalidations between API processes).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheSection {
    /// Redis URL of the shared tier; none: in-process only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis: Option<String>,
    /// How long a figure is kept (each tier).
    pub ttl_ms: u64,
}

impl Default for CacheSection {
    fn default() -> CacheSection {
        CacheSection {
            redis: None,
            ttl_ms: 1000,
        }
    }
}

/// `[limits]`: token buckets on `POST /api/items/...` at the gateway (429 with Retry-After);
/// 0 turns one off. Per user counts the `X-User-Id` header (a request without it counts
/// against its address).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    /// Buy attempts per client address per second (burst: twice that).
    pub buy_per_ip_per_second: f64,
    /// Buy attempts per user per second (burst: twice that).
    pub buy_per_user_per_second: f64,
}

impl Default for LimitsSection {
    fn default() -> LimitsSection {
        LimitsSection {
            buy_per_ip_per_second: 200.0,
            buy_per_user_per_second: 5.0,
        }
    }
}

/// `[scale]`: how many inventory shards, orders instances and APIs run. Each item's stock is
/// split over the shards; orders instance j follows shards j, j + orders, ... The shard and
/// orders counts are fixed once a data directory holds a sale (changing them would move
/// shards' orders to another order book), and `keel up` refuses to start with other counts;
/// the APIs share the catalog (in the registry) and may be as many as wanted, run to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Scale {
    /// Inventory shards (1 to 64).
    pub inventory: u32,
    /// Orders instances (1 to the number of shards).
    pub orders: u32,
    /// API instances (1 to 8), behind the gateway's pool.
    pub api: u32,
    /// Chat instances (0 to 8), behind the gateway at `/chat/`. Rooms are spread over
    /// them, so the count is fixed once a data directory holds chat rooms.
    pub chat: u32,
}

impl Default for Scale {
    fn default() -> Scale {
        Scale {
            inventory: 2,
            orders: 2,
            api: 1,
            chat: 2,
        }
    }
}

impl Scale {
    /// Applies `--scale KIND=N` settings.
    pub fn apply(&mut self, settings: &[String]) -> anyhow::Result<()> {
        for setting in settings {
            let (kind, n) = setting
                .split_once('=')
                .with_context(|| format!("--scale {setting:?}: use KIND=N"))?;
            let n: u32 = n
                .parse()
                .with_context(|| format!("--scale {setting:?}: {n:?} is not a count"))?;
            match kind {
                "inventory" => self.inventory = n,
                "orders" => self.orders = n,
                "api" => self.api = n,
                "chat" => self.chat = n,
                _ => bail!("--scale {setting:?}: the kinds are inventory, orders, api and chat"),
            }
        }
        self.check()
    }

    fn check(&self) -> anyhow::Result<()> {
        if !(1..=64).contains(&self.inventory) {
            bail!("scale: inventory must be 1 to 64");
        }
        if !(1..=self.inventory).contains(&self.orders) {
            bail!(
                "scale: orders must be 1 to the number of inventory shards ({})",
                self.inventory
            );
        }
        if !(1..=8).contains(&self.api) {
            bail!("scale: api must be 1 to 8");
        }
        if self.chat > 8 {
            bail!("scale: chat must be 0 to 8");
        }
        Ok(())
    }
}

fn default_registry() -> RegistrySection {
    RegistrySection {
        listen: "127.0.0.1:7000".into(),
        external: None,
    }
}

/// `[registry]`: Keel's registry, started by `keel up` on `listen`; or, with `external`, a
/// naming service that runs already — etcd (`etcd://HOST:PORT[,HOST:PORT…][?prefix=/P]`) or
/// another Keel registry (`HOST:PORT`) — which every part then uses, and none is started.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrySection {
    /// `host:port` of the registry `keel up` starts (port 0: any free port).
    pub listen: String,
    /// A naming service to use instead of starting one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<String>,
}

/// `[inventory]`: the shards' addresses, and their journals: in `data_dir` by default, or
/// with `journal = "nats://host:port[,host:port…][?replicas=N&in_flight=M]"` each shard's in a
/// NATS JetStream stream of its own (`keel-<id>-inv-<i>`, the id made on first use and kept in
/// `<data_dir>/journal-id`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InventorySection {
    /// `host:port` of shard 0 (port 0: any free port).
    pub listen: String,
    /// The JetStream servers holding the shards' journals; none: local files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub journal: Option<String>,
    /// Standby processes per shard (0 to 4; needs `journal`). A shard's processes elect its
    /// owner in the registry; when the owner dies, a standby takes over once its lease
    /// (`lease_ttl_ms`) runs out, instead of the shard waiting for a restart.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub standbys: u32,
    /// The shard owners' election lease, in milliseconds (300 to 600000; with `journal`).
    #[serde(default = "default_lease_ttl_ms")]
    pub lease_ttl_ms: u64,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn default_lease_ttl_ms() -> u64 {
    3000
}

/// A process's address.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    /// `host:port` (port 0: any free port).
    pub listen: String,
}

/// `[gateway]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySection {
    /// Where clients connect.
    pub listen: String,
    /// The gateway's admin port (metrics, reload).
    pub admin: String,
}

/// `[orders]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrdersSection {
    /// Its address.
    pub listen: String,
    /// Time a buyer has to pay.
    pub payment_window_ms: u64,
    /// The order book in PostgreSQL (`postgres://USER@HOST:PORT/DATABASE`) instead of local
    /// journals; needs `inventory.journal` (the orders follow the shards' streams).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
}

impl UpConfig {
    /// The defaults, with a fresh admin token.
    pub fn defaults() -> UpConfig {
        UpConfig {
            data_dir: "keel-data".into(),
            admin_token: fresh_token(),
            gateway: GatewaySection {
                listen: "127.0.0.1:8080".into(),
                admin: "127.0.0.1:9080".into(),
            },
            registry: default_registry(),
            api: Listen {
                listen: "127.0.0.1:7400".into(),
            },
            inventory: InventorySection {
                standbys: 0,
                lease_ttl_ms: default_lease_ttl_ms(),
                listen: "127.0.0.1:7200".into(),
                journal: None,
            },
            orders: OrdersSection {
                listen: "127.0.0.1:7300".into(),
                payment_window_ms: 600_000,
                database: None,
            },
            scale: Scale::default(),
            limits: LimitsSection::default(),
            cache: CacheSection::default(),
            chat: ChatSection::default(),
        }
    }

    /// The gateway's configuration: the API instances (found through the registry at
    /// `registry`) behind `/api/` through a bounded queue, with the buy limits on
    /// `POST /api/items/...`, and the chat instances behind `/chat/`.
    pub fn gateway_toml(&self, listen: &str, registry: &str, web: &Path) -> String {
        gateway_toml(
            listen,
            &self.gateway.admin,
            &self.admin_token,
            &self.limits,
            registry,
            web,
            self.scale.chat > 0,
        )
    }

    /// Reads `path`, or writes the defaults there first if it does not exist (the default
    /// configuration's first run).
    pub fn load_or_create(path: &Path) -> anyhow::Result<UpConfig> {
        if !path.exists() {
            let config = UpConfig::defaults();
            let text = format!(
                "# keel up: the flash-sale system on this machine (see docs/seckill.md).\n{}",
                toml::to_string(&config)?
            );
            write_private(path, &text).with_context(|| format!("writing {}", path.display()))?;
            keel_net::say!("wrote {} with the defaults", path.display());
            return Ok(config);
        }
        UpConfig::load(path)
    }

    /// Reads `path`, which must exist: a configuration named on the command line is never
    /// made up (a typo would otherwise start a new sale with a new admin token).
    pub fn load(path: &Path) -> anyhow::Result<UpConfig> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                "{}: no such configuration file (run `keel up` without --config to write \
                 keel.toml with the defaults)",
                path.display()
            ),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let config: UpConfig =
            toml::from_str(&text).with_context(|| format!("{} is not valid", path.display()))?;
        config.scale.check()?;
        if config.admin_token.len() < 8 {
            bail!(
                "{}: admin_token must have at least 8 characters",
                path.display()
            );
        }
        Ok(config)
    }
}

/// The gateway's configuration for the sale: the API instances (found through the naming
/// service at `registry`) behind `/api/` through a bounded queue, with the buy `limits` and
/// the opening-time gate on `POST /api/items/...`, the storefront from `web`, the admin
/// port `admin` with `token`, and with `chat` the chat instances (found in the registry too)
/// behind `/chat/`.
pub(crate) fn gateway_toml(
    listen: &str,
    admin: &str,
    token: &str,
    limits: &LimitsSection,
    registry: &str,
    web: &Path,
    chat: bool,
) -> String {
    let mut rate_limits = Vec::new();
    for (rate, key) in [
        (limits.buy_per_ip_per_second, "ip"),
        (limits.buy_per_user_per_second, "header:x-user-id"),
    ] {
        if rate > 0.0 {
            let burst = (rate * 2.0).ceil().max(1.0) as u64;
            rate_limits.push(format!(
                "{{ per_second = {rate:?}, burst = {burst}, key = \"{key}\" }}"
            ));
        }
    }
    // Every value from the configuration or the system goes in as a TOML string, escaped.
    let (listen, registry) = (quoted(listen), quoted(registry));
    // WebSockets are tunnelled once the chat instance answers 101; its pings (every 25 s)
    // keep a tunnel inside the gateway's idle timeout.
    let (chat_upstream, chat_route) = if chat {
        (
            format!(
                "[upstreams.chat]\n[upstreams.chat.discovery]\nregistry = {registry}\nservice = {}\n\n",
                quoted(keel_chat::transport::SERVICE)
            ),
            "[[routes]]\nname = \"chat\"\npath_prefix = \"/chat/\"\nupstream = \"chat\"\n\n"
                .to_owned(),
        )
    } else {
        (String::new(), String::new())
    };
    format!(
        "[server]\nlisten = {listen}\n[admin]\nlisten = {}\ntoken = {}\n\n[upstreams.api]\nmax_inflight = 1024\nqueue_size = 8192\nqueue_timeout_ms = 2000\n[upstreams.api.discovery]\nregistry = {registry}\nservice = {api_service}\n\n{chat_upstream}[[routes]]\nname = \"buy\"\npath_prefix = \"/api/items/\"\nmethods = [\"POST\"]\nupstream = \"api\"\nrate_limits = [{}]\ngate = {{ registry = {registry}, prefix = {opens}, path_segment = 3 }}\n\n[[routes]]\nname = \"api\"\npath_prefix = \"/api/\"\nupstream = \"api\"\n\n{chat_route}[[routes]]\nname = \"storefront\"\npath_prefix = \"/\"\nmethods = [\"GET\", \"HEAD\"]\nstatic_dir = {}\n",
        quoted(admin),
        quoted(token),
        rate_limits.join(", "),
        quoted(&web.to_string_lossy()),
        api_service = quoted(crate::peers::API_SERVICE),
        opens = quoted(crate::peers::OPENS_PREFIX),
    )
}

/// Where a sale's shards keep their journals when they are on JetStream: the servers, the
/// streams' name prefix (shard S's stream is `<prefix>-S`) and the owners' election lease.
pub(crate) struct OnStreams<'a> {
    pub(crate) journal: &'a str,
    pub(crate) prefix: &'a str,
    pub(crate) lease_ttl_ms: u64,
}

/// An inventory process of `shard` (its owner or a standby, as elected, on streams).
pub(crate) fn inventory_part(
    name: String,
    address: String,
    data_dir: String,
    shard: &str,
    registry: &str,
    streams: Option<&OnStreams<'_>>,
) -> Part {
    let mut args = vec![
        "seckill".into(),
        "inventory".into(),
        "--addr".into(),
        address,
        "--data-dir".into(),
        data_dir,
        "--shard".into(),
        shard.to_owned(),
        "--registry".into(),
        registry.to_owned(),
    ];
    if let Some(on) = streams {
        args.extend([
            "--journal".into(),
            on.journal.to_owned(),
            "--stream".into(),
            format!("{}-{shard}", on.prefix),
            "--lease-ttl-ms".into(),
            on.lease_ttl_ms.to_string(),
        ]);
    }
    Part {
        name,
        args,
        env: Vec::new(),
    }
}

/// An orders instance following `shards`; with `database`, its book is in PostgreSQL and
/// fed from the shards' streams (the URL goes by environment: it may hold a password).
pub(crate) fn orders_part(
    name: String,
    address: String,
    data_dir: String,
    registry: &str,
    payment_window_ms: u64,
    shards: &[&String],
    database: Option<(&str, &OnStreams<'_>)>,
) -> Part {
    let mut args = vec![
        "seckill".into(),
        "orders".into(),
        "--addr".into(),
        address,
        "--data-dir".into(),
        data_dir,
        "--registry".into(),
        registry.to_owned(),
        "--payment-window-ms".into(),
        payment_window_ms.to_string(),
    ];
    for shard in shards {
        args.extend(["--inventory".into(), (*shard).clone()]);
    }
    let mut env = Vec::new();
    if let Some((url, on)) = database {
        env.push(("KEEL_ORDERS_DATABASE".to_owned(), url.to_owned()));
        args.extend([
            "--journal".into(),
            on.journal.to_owned(),
            "--stream-prefix".into(),
            on.prefix.to_owned(),
        ]);
    }
    Part { name, args, env }
}

/// An API over `shards`, its catalog in the naming service at `registry` (`catalog_dir` is
/// locked, and a local catalog there is copied in once).
#[allow(clippy::too_many_arguments)]
pub(crate) fn api_part(
    name: String,
    address: String,
    catalog_dir: String,
    registry: &str,
    cache_ttl_ms: u64,
    redis: Option<&str>,
    shards: &[String],
    admin_token: &str,
) -> Part {
    let mut args = vec![
        "seckill".into(),
        "api".into(),
        "--addr".into(),
        address,
        "--data-dir".into(),
        catalog_dir,
        "--registry".into(),
        registry.to_owned(),
        "--cache-ttl-ms".into(),
        cache_ttl_ms.to_string(),
    ];
    if let Some(url) = redis {
        args.extend(["--cache-redis".into(), url.to_owned()]);
    }
    for shard in shards {
        args.extend(["--inventory".into(), shard.clone()]);
    }
    Part {
        name,
        args,
        // By environment: other users of the machine see command lines.
        env: vec![(crate::cli::ADMIN_TOKEN_ENV.into(), admin_token.to_owned())],
    }
}

/// A chat instance `name` of `names`, registered at `registry`, its links over NATS and its
/// journal in a stream when `section` says so; the shared signing key goes by environment.
pub(crate) fn chat_part(
    name: &str,
    address: String,
    data_dir: String,
    registry: &str,
    names: &[String],
    section: &ChatSection,
    secret: &str,
) -> Part {
    let mut args = vec![
        "chat".into(),
        "--listen".into(),
        address,
        "--data-dir".into(),
        data_dir,
        "--instance".into(),
        name.to_owned(),
        "--registry".into(),
        registry.to_owned(),
        "--peers".into(),
        names.join(","),
    ];
    if let Some(url) = &section.nats {
        args.extend(["--nats".into(), url.clone()]);
    }
    if let Some(url) = &section.journal {
        args.extend(["--journal".into(), url.clone()]);
    }
    Part {
        name: name.to_owned(),
        args,
        env: vec![("KEEL_CHAT_SECRET".into(), secret.to_owned())],
    }
}

/// The key the chat instances sign tokens with, made once and kept in
/// `<data_dir>/chat-secret` (readable by its owner alone), so tokens outlive restarts.
fn chat_secret(data: &Path) -> anyhow::Result<String> {
    let file = data.join("chat-secret");
    match std::fs::read_to_string(&file) {
        Ok(secret) if !secret.trim().is_empty() => Ok(secret.trim().to_owned()),
        Ok(_) => bail!(
            "{} is empty: remove it to have a new key made",
            file.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let secret = fresh_token();
            write_private(&file, &secret).with_context(|| format!("writing {}", file.display()))?;
            Ok(secret)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", file.display())),
    }
}

/// Writes `text` to `path` readable by its owner alone: the file holds the admin token.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(text.as_bytes())
}

/// `text` as a TOML string (quoted and escaped).
fn quoted(text: &str) -> String {
    toml::Value::String(text.to_owned()).to_string()
}

/// 128 random bits as hex.
fn fresh_token() -> String {
    format!("{:016x}{:016x}", crate::random_u64(), crate::random_u64())
}

/// A child process and how to start it again.
pub(crate) struct Part {
    pub(crate) name: String,
    pub(crate) args: Vec<String>,
    /// Passed in the environment, not on the command line: values other users must not see
    /// in `ps` (the admin token).
    pub(crate) env: Vec<(String, String)>,
}

/// The process ids of the running parts, also written to `<data_dir>/pids.json` after every
/// (re)start — what `keel bench seckill --chaos` reads to pick a victim.
#[derive(Clone)]
struct Pids {
    file: PathBuf,
    pids: std::sync::Arc<parking_lot::Mutex<std::collections::BTreeMap<String, u32>>>,
}

impl Pids {
    fn set(&self, name: &str, child: &Child) {
        let mut pids = self.pids.lock();
        pids.insert(name.to_owned(), child.id().unwrap_or(0));
        let text = serde_json::to_string(&*pids).unwrap_or_default();
        // Written whole under the lock, then renamed, so a reader never sees half of it.
        let tmp = self.file.with_extension("tmp");
        if std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, &self.file))
            .is_err()
        {
            tracing::warn!(file = %self.file.display(), "could not write the process ids");
        }
    }
}

/// The address in a banner line (`... on <address> ...`), without a scheme.
fn banner_address(line: &str) -> Option<String> {
    let after = line.split_once(" on ")?.1;
    let token = after.split_whitespace().next()?;
    let token = token
        .trim_start_matches("http://")
        .trim_start_matches("https://");
    Some(
        token
            .trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
            .to_owned(),
    )
}

/// Starts a part; returns the child and the address its banner names. A part that exits
/// before it listens is reported with what it wrote to stderr (its own error).
async fn start(part: &Part) -> anyhow::Result<(Child, String)> {
    let exe = std::env::current_exe()?;
    // In a process group of its own: a Ctrl-C at the terminal reaches `keel up` alone, which
    // then stops the parts in order.
    let mut child = Command::new(exe)
        .process_group(0)
        // The child stops by itself if this process dies without stopping it (SIGKILL).
        .env(keel_net::SUPERVISOR_ENV, std::process::id().to_string())
        .envs(part.env.iter().map(|(k, v)| (k, v)))
        .args(&part.args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", part.name))?;
    let name = part.name.clone();
    // Until the banner, stderr is kept (to explain a failed start); after it, relayed.
    let early: std::sync::Arc<parking_lot::Mutex<Option<Vec<String>>>> =
        std::sync::Arc::new(parking_lot::Mutex::new(Some(Vec::new())));
    let stderr_done = match child.stderr.take() {
        Some(stderr) => {
            let mut stderr = BufReader::new(stderr).lines();
            let name = name.clone();
            let early = early.clone();
            Some(tokio::spawn(async move {
                while let Ok(Some(line)) = stderr.next_line().await {
                    if let Some(kept) = early.lock().as_mut() {
                        if kept.len() < 50 {
                            kept.push(line.clone());
                        }
                        continue;
                    }
                    use std::io::Write as _;
                    let _ = writeln!(std::io::stderr(), "[{name}] {line}");
                }
            }))
        }
        None => None,
    };
    let mut stdout = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let banner = tokio::time::timeout(Duration::from_secs(30), stdout.next_line())
        .await
        .with_context(|| format!("{name} did not start within 30 s"))?;
    let banner = match banner {
        Ok(Some(line)) => line,
        _ => {
            // The part is gone: its stderr ends too; wait for the last lines (bounded).
            if let Some(done) = stderr_done {
                let _ = tokio::time::timeout(Duration::from_secs(2), done).await;
            }
            let said = early.lock().take().unwrap_or_default();
            let status = tokio::time::timeout(Duration::from_secs(2), child.wait())
                .await
                .ok()
                .and_then(Result::ok)
                .map_or_else(|| "no exit status".to_owned(), |s| s.to_string());
            let said = part_error(&said);
            bail!("{name} exited before it listened ({status}): {said}");
        }
    };
    // From now on stderr is relayed; what came before the banner is shown first.
    if let Some(kept) = early.lock().take() {
        use std::io::Write as _;
        for line in kept {
            let _ = writeln!(std::io::stderr(), "[{name}] {line}");
        }
    }
    let address = banner_address(&banner)
        .with_context(|| format!("{name}: unexpected first line {banner:?}"))?;
    let out_name = name.clone();
    tokio::spawn(async move {
        let name = out_name;
        while let Ok(Some(line)) = stdout.next_line().await {
            keel_net::say!("[{name}] {line}");
        }
    });
    keel_net::say!(
        "started {name} (pid {}) on {address}",
        child.id().unwrap_or(0)
    );
    Ok((child, address))
}

/// The error a part printed before exiting: anyhow's `Error: ...` and its causes, or else
/// its last lines.
fn part_error(stderr: &[String]) -> String {
    if let Some(at) = stderr.iter().position(|l| l.starts_with("Error: ")) {
        let lines: Vec<&str> = stderr[at..]
            .iter()
            .map(|l| {
                let l = l.trim();
                let l = l.strip_prefix("Error: ").unwrap_or(l);
                // anyhow numbers the causes: "0: ...".
                match l.split_once(": ") {
                    Some((n, rest)) if n.bytes().all(|b| b.is_ascii_digit()) => rest,
                    _ => l,
                }
            })
            .filter(|l| !l.is_empty() && *l != "Caused by:")
            .collect();
        return lines.join(": ");
    }
    match stderr.len() {
        0 => "it printed nothing".to_owned(),
        n => stderr[n.saturating_sub(5)..].join(" | "),
    }
}

/// Replaces the value after `flag` in `args`.
fn set_arg(args: &mut [String], flag: &str, value: &str) {
    if let Some(i) = args.iter().position(|a| a == flag)
        && let Some(v) = args.get_mut(i + 1)
    {
        *v = value.to_owned();
    }
}

/// Asks a process to stop as Ctrl-C would.
fn interrupt(child: &Child) {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .status();
    }
}

/// Keeps a part running until `stop`: restarts it with backoff (100 ms doubling to 5 s;
/// back to 100 ms after it has run for 30 s) whenever it exits.
async fn supervise(part: Part, mut child: Child, stop: CancellationToken, pids: Pids) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let started = tokio::time::Instant::now();
        tokio::select! {
            status = child.wait() => {
                if stop.is_cancelled() {
                    return;
                }
                keel_net::say!("{} exited ({}); restarting in {backoff:?}", part.name,
                    status.map_or_else(|e| e.to_string(), |s| s.to_string()));
                if started.elapsed() > Duration::from_secs(30) {
                    backoff = Duration::from_millis(100);
                }
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = stop.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                loop {
                    match start(&part).await {
                        Ok((next, _)) => {
                            // The file first: whoever reads the line finds the new pid there.
                            pids.set(&part.name, &next);
                            keel_net::say!("restarted {}", part.name);
                            child = next;
                            break;
                        }
                        Err(e) => {
                            keel_net::say!("restarting {} failed: {e:#}; again in {backoff:?}", part.name);
                            tokio::select! {
                                () = tokio::time::sleep(backoff) => {}
                                () = stop.cancelled() => return,
                            }
                            backoff = (backoff * 2).min(Duration::from_secs(5));
                        }
                    }
                }
            }
            () = stop.cancelled() => {
                interrupt(&child);
                if tokio::time::timeout(Duration::from_secs(10), child.wait()).await.is_err() {
                    let _ = child.kill().await;
                }
                return;
            }
        }
    }
}

/// `host:port` with `i` added to the port, unless the port is 0 (any free port).
pub(crate) fn nth_address(listen: &str, i: u32) -> anyhow::Result<String> {
    let (host, port) = listen
        .rsplit_once(':')
        .with_context(|| format!("{listen:?} is not host:port"))?;
    let port: u16 = port
        .parse()
        .with_context(|| format!("{listen:?}: the port is not a number from 0 to 65535"))?;
    if port == 0 {
        return Ok(listen.to_owned());
    }
    let port = u16::try_from(i)
        .ok()
        .and_then(|i| port.checked_add(i))
        .with_context(|| format!("{listen:?} + {i}: no such port"))?;
    Ok(format!("{host}:{port}"))
}

/// Starts `part`, fixes its address for restarts, and adds it to `parts`; returns the address.
pub(crate) async fn launch(
    mut part: Part,
    parts: &mut Vec<(Part, Child)>,
) -> anyhow::Result<String> {
    let (child, address) = start(&part).await?;
    set_arg(&mut part.args, "--addr", &address);
    set_arg(&mut part.args, "--listen", &address);
    parts.push((part, child));
    Ok(address)
}

/// Refuses a data directory that holds a sale made with other counts (`topology.json`).
fn check_topology(data: &Path, scale: Scale) -> anyhow::Result<()> {
    let file = data.join("topology.json");
    match std::fs::read_to_string(&file) {
        Ok(text) => {
            let before: Scale = serde_json::from_str(&text)
                .with_context(|| format!("{} is not valid", file.display()))?;
            if before.chat != scale.chat && data.join("chat-0").exists() {
                bail!(
                    "{} holds chat rooms spread over {} chat instances; another count would \
                     give rooms to instances that do not hold their history (use another \
                     data_dir)",
                    data.display(),
                    before.chat
                );
            }
            if (before.inventory, before.orders) != (scale.inventory, scale.orders) {
                bail!(
                    "{} holds a sale made with {} inventory shards and {} orders instances; \
                     changing the counts would move orders between order books (use another \
                     data_dir for a new sale)",
                    data.display(),
                    before.inventory,
                    before.orders
                );
            }
            if before != scale {
                std::fs::write(&file, serde_json::to_string(&scale)?)
                    .with_context(|| format!("writing {}", file.display()))?;
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::write(&file, serde_json::to_string(&scale)?)
                .with_context(|| format!("writing {}", file.display()))
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", file.display())),
    }
}

/// Where the shards' journals are: `None` for `data_dir`, or the JetStream address and the
/// streams' name prefix. The choice is kept in `<data_dir>/journal-id` (the prefix, and the
/// address): a sale whose journals are local files is refused a JetStream address and the
/// other way round, since the shards would start empty in the other place.
fn check_journal(data: &Path, address: Option<&str>) -> anyhow::Result<Option<(String, String)>> {
    let file = data.join("journal-id");
    let address = address.map(str::trim).filter(|a| !a.is_empty());
    if let Some(a) = address {
        keel_store::StreamOptions::parse(a, "check")
            .map_err(|e| anyhow::anyhow!("inventory.journal: {e}"))?;
    }
    let recorded = match std::fs::read_to_string(&file) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
    };
    match (recorded, address) {
        (None, None) => Ok(None),
        (None, Some(a)) => {
            if data.join("inventory-0").exists() {
                bail!(
                    "inventory.journal = {a:?}, but {} holds a sale whose inventory journals are                      local files; they would start empty in JetStream (use another data_dir for                      a sale on JetStream)",
                    data.display()
                );
            }
            let prefix = format!("keel-{:016x}", crate::random_u64());
            std::fs::write(&file, format!("{prefix}\n{a}\n"))
                .with_context(|| format!("writing {}", file.display()))?;
            Ok(Some((a.to_owned(), prefix)))
        }
        (Some(text), configured) => {
            let mut lines = text.lines();
            let prefix = lines.next().unwrap_or_default().trim().to_owned();
            let was = lines.next().unwrap_or_default().trim().to_owned();
            match configured {
                // Another list of servers (a member added or replaced) finds the same
                // streams; pointing it at another cluster is the operator's call.
                Some(a) => {
                    if a != was {
                        tracing::warn!(was = %was, now = %a, "inventory.journal changed; the streams {prefix}-inv-* are looked for there");
                        std::fs::write(&file, format!("{prefix}\n{a}\n"))
                            .with_context(|| format!("writing {}", file.display()))?;
                    }
                    Ok(Some((a.to_owned(), prefix)))
                }
                None => bail!(
                    "the sale in {} keeps its inventory journals in JetStream at {was:?}                      (streams {prefix}-inv-*), but inventory.journal is not set",
                    data.display()
                ),
            }
        }
    }
}

/// Checks `orders.database` against the data directory: it needs the inventory on JetStream,
/// and a sale stays where its orders began (local journals or PostgreSQL), which a marker
/// file in `data` records.
fn check_database(
    data: &Path,
    url: Option<&str>,
    on_streams: bool,
) -> anyhow::Result<Option<String>> {
    let marker = data.join("orders-database");
    let url = url.map(str::trim).filter(|u| !u.is_empty());
    match url {
        Some(u) => {
            if !(u.starts_with("postgres://") || u.starts_with("postgresql://")) {
                bail!("orders.database = {u:?}: use postgres://USER@HOST:PORT/DATABASE");
            }
            if !on_streams {
                bail!(
                    "orders.database needs inventory.journal: orders in PostgreSQL follow the shards' JetStream streams"
                );
            }
            if !marker.exists() {
                if data.join("orders-0").exists() {
                    bail!(
                        "orders.database is set, but {} holds a sale whose orders are in local journals; they would not be in the database (use another data_dir)",
                        data.display()
                    );
                }
                std::fs::write(&marker, b"postgres\n")
                    .with_context(|| format!("writing {}", marker.display()))?;
            }
            Ok(Some(u.to_owned()))
        }
        None if marker.exists() => bail!(
            "the sale in {} keeps its orders in PostgreSQL, but orders.database is not set",
            data.display()
        ),
        None => Ok(None),
    }
}

/// Waits (up to 30 s) until `GET /api/items` through the gateway at `gateway` is answered
/// by the API rather than refused for want of a server.
async fn wait_until_served(gateway: &str) -> anyhow::Result<()> {
    wait_until_answered(gateway, "/api/items", "the API").await
}

/// Waits until the gateway answers `GET path` with 200 (through `what`), for 30 s at most.
async fn wait_until_answered(gateway: &str, path: &str, what: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if keel_net::answers_ok(gateway, path, Duration::from_secs(2)).await {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the gateway at {gateway} did not reach {what} within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Checks what would make a part fail to start, before any part starts: every address parses
/// and its port is free, and the data directory can be written.
fn preflight(config: &UpConfig) -> anyhow::Result<()> {
    let mut addresses = vec![
        ("gateway.listen", config.gateway.listen.clone()),
        ("gateway.admin", config.gateway.admin.clone()),
    ];
    match &config.registry.external {
        None => addresses.push(("registry.listen", config.registry.listen.clone())),
        Some(external) => {
            keel_registry::NamingAddress::parse(external)
                .map_err(|e| anyhow::anyhow!("registry.external: {e}"))?;
        }
    }
    for i in 0..config.scale.inventory {
        addresses.push((
            "inventory.listen",
            nth_address(&config.inventory.listen, i)?,
        ));
    }
    for j in 0..config.scale.orders {
        addresses.push(("orders.listen", nth_address(&config.orders.listen, j)?));
    }
    for k in 0..config.scale.api {
        addresses.push(("api.listen", nth_address(&config.api.listen, k)?));
    }
    let mut seen = std::collections::HashSet::new();
    for (field, address) in &addresses {
        let parsed: std::net::SocketAddr = address.parse().with_context(|| {
            format!("{field} = {address:?} is not an IP address and port (such as 127.0.0.1:8080)")
        })?;
        if parsed.port() == 0 {
            continue;
        }
        if !seen.insert(parsed) {
            bail!("{field} = {address:?}: that address is given to two parts");
        }
        std::net::TcpListener::bind(parsed)
            .map_err(|e| anyhow::anyhow!("{field} = {address:?}: cannot listen there: {e}"))?;
    }
    let data = &config.data_dir;
    std::fs::create_dir_all(data)
        .with_context(|| format!("data_dir {}: cannot create it", data.display()))?;
    let probe = data.join(".keel-write-test");
    std::fs::write(&probe, b"")
        .and_then(|()| std::fs::remove_file(&probe))
        .with_context(|| format!("data_dir {}: cannot write there", data.display()))?;
    Ok(())
}

/// Runs the system until Ctrl-C (or for `run_for`).
pub async fn run(config: UpConfig, run_for: Option<Duration>) -> anyhow::Result<()> {
    // Listened for from the start: a Ctrl-C while the parts start (or right after the banner)
    // stops them in order instead of killing `keel up` with the default action.
    let interrupted = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("listening for Ctrl-C")?;
    let data = &config.data_dir;
    config.scale.check()?;
    preflight(&config)?;
    // One `keel up` per data directory: a second one would interleave its records with ours
    // in every journal. Held until this function returns; each part locks its own journal too.
    let _data_lock = keel_store::DirLock::acquire(data)
        .with_context(|| format!("another `keel up` runs on {}", data.display()))?;
    check_topology(data, config.scale)?;
    let streams = check_journal(data, config.inventory.journal.as_deref())?;
    let section = &config.inventory;
    if section.standbys > 4 {
        bail!("inventory.standbys = {}: use 0 to 4", section.standbys);
    }
    if section.standbys > 0 && streams.is_none() {
        bail!(
            "inventory.standbys = {} needs inventory.journal: a standby takes a shard over from its stream (local journals are one process's own)",
            section.standbys
        );
    }
    let database = check_database(data, config.orders.database.as_deref(), streams.is_some())?;
    if !(300..=600_000).contains(&section.lease_ttl_ms) {
        bail!(
            "inventory.lease_ttl_ms = {}: use 300 to 600000",
            section.lease_ttl_ms
        );
    }
    let dir = |name: &str| data.join(name).to_string_lossy().into_owned();
    let mut parts: Vec<(Part, Child)> = Vec::new();

    let registry = match &config.registry.external {
        Some(external) => external.trim().to_owned(),
        None => {
            launch(
                Part {
                    name: "registry".into(),
                    args: vec![
                        "registry".into(),
                        "--addr".into(),
                        config.registry.listen.clone(),
                        "--data-dir".into(),
                        dir("registry"),
                    ],
                    env: Vec::new(),
                },
                &mut parts,
            )
            .await?
        }
    };

    let shards: Vec<String> = (0..config.scale.inventory)
        .map(|i| format!("inv-{i}"))
        .collect();
    let on_streams = streams.as_ref().map(|(journal, prefix)| OnStreams {
        journal,
        prefix,
        lease_ttl_ms: config.inventory.lease_ttl_ms,
    });
    // The standbys listen on any free port of the shards' host.
    let host = config
        .inventory
        .listen
        .rsplit_once(':')
        .map_or("127.0.0.1", |(host, _)| host);
    for (i, shard) in shards.iter().enumerate() {
        let i = i as u32;
        let owner = inventory_part(
            format!("inventory-{i}"),
            nth_address(&config.inventory.listen, i)?,
            dir(&format!("inventory-{i}")),
            shard,
            &registry,
            on_streams.as_ref(),
        );
        launch(owner, &mut parts).await?;
        for k in 1..=config.inventory.standbys {
            let standby = inventory_part(
                format!("inventory-{i}-standby-{k}"),
                format!("{host}:0"),
                dir(&format!("inventory-{i}-standby-{k}")),
                shard,
                &registry,
                on_streams.as_ref(),
            );
            launch(standby, &mut parts).await?;
        }
    }

    for j in 0..config.scale.orders {
        let followed: Vec<&String> = shards
            .iter()
            .skip(j as usize)
            .step_by(config.scale.orders as usize)
            .collect();
        let part = orders_part(
            format!("orders-{j}"),
            nth_address(&config.orders.listen, j)?,
            dir(&format!("orders-{j}")),
            &registry,
            config.orders.payment_window_ms,
            &followed,
            database.as_deref().zip(on_streams.as_ref()),
        );
        launch(part, &mut parts).await?;
    }

    // The APIs: they share the catalog in the registry, so any number serve the same sale.
    for k in 0..config.scale.api {
        let (name, catalog) = match k {
            0 => ("api".to_owned(), dir("catalog")),
            k => (format!("api-{k}"), dir(&format!("catalog-{k}"))),
        };
        let part = api_part(
            name,
            nth_address(&config.api.listen, k)?,
            catalog,
            &registry,
            config.cache.ttl_ms,
            config.cache.redis.as_deref(),
            &shards,
            &config.admin_token,
        );
        launch(part, &mut parts).await?;
    }

    // The chat instances: rooms spread over them, found by each other and by the gateway in
    // the registry; they sign their users' tokens (and their links) with one key.
    if config.scale.chat > 0 {
        let secret = chat_secret(data)?;
        let names: Vec<String> = (0..config.scale.chat)
            .map(|k| format!("chat-{k}"))
            .collect();
        for (k, name) in names.iter().enumerate() {
            let part = chat_part(
                name,
                nth_address(&config.chat.listen, k as u32)?,
                dir(name),
                &registry,
                &names,
                &config.chat,
                &secret,
            );
            launch(part, &mut parts).await?;
        }
    }

    // The gateway in front: the API instances (found in the registry) behind /api/, with a
    // bounded queue in front of them.
    let gateway_toml = config.gateway_toml(
        &config.gateway.listen,
        &registry,
        &std::path::absolute(data.join("web"))?,
    );
    let gateway_addr =
        start_gateway(data, &config.gateway.listen, &gateway_toml, &mut parts).await?;
    let chat = if config.scale.chat > 0 {
        wait_until_answered(&gateway_addr, "/chat/api/health", "a chat instance").await?;
        format!(
            "\n  chat        http://{gateway_addr}/chat/ ({} instances, docs/chat.md)",
            config.scale.chat
        )
    } else {
        String::new()
    };

    keel_net::say!(
        "Keel is up: http://{gateway_addr}/ (the storefront)\n  admin page  http://{gateway_addr}/admin.html (admin token: {})\n  API         http://{gateway_addr}/api/items (docs/seckill.md){chat}\n  registry    {registry}\nCtrl-C stops everything.",
        config.admin_token
    );

    run_parts(parts, data, interrupted, run_for).await
}

/// Writes the sale's storefront pages in `data/web` and the gateway's configuration
/// `gateway_toml` in `data/gateway.toml`, starts the gateway, and waits until it serves the
/// API; returns its address. A gateway on port 0 keeps the port it got across restarts.
pub(crate) async fn start_gateway(
    data: &Path,
    listen: &str,
    gateway_toml: &str,
    parts: &mut Vec<(Part, Child)>,
) -> anyhow::Result<String> {
    let gateway_config = data.join("gateway.toml");
    let web = std::path::absolute(data.join("web"))?;
    crate::web::write(&web).with_context(|| format!("writing {}", web.display()))?;
    write_private(&gateway_config, gateway_toml)
        .with_context(|| format!("writing {}", gateway_config.display()))?;
    let gateway = Part {
        name: "gateway".into(),
        args: vec![
            "gateway".into(),
            "--config".into(),
            gateway_config.to_string_lossy().into_owned(),
        ],
        env: Vec::new(),
    };
    let (child, gateway_addr) = start(&gateway).await?;
    // Restarted, it must come back on the same port.
    if listen.ends_with(":0") {
        let fixed = std::fs::read_to_string(&gateway_config)?.replacen(
            &format!("listen = {}", quoted(listen)),
            &format!("listen = {}", quoted(&gateway_addr)),
            1,
        );
        std::fs::write(&gateway_config, fixed)?;
    }
    parts.push((gateway, child));
    // Up means the gateway has found an API in the registry and answers through it.
    wait_until_served(&gateway_addr).await?;
    Ok(gateway_addr)
}

/// Keeps `parts` running (restarting any that dies) until Ctrl-C (`interrupted`) or
/// `run_for`, then stops them in the reverse order of their dependencies: the gateway and the
/// APIs (no new work), the orders (which read the inventory), the inventory, and the registry
/// last (so the others can still deregister). Their process ids are kept in
/// `data/pids.json`.
pub(crate) async fn run_parts(
    parts: Vec<(Part, Child)>,
    data: &Path,
    mut interrupted: tokio::signal::unix::Signal,
    run_for: Option<Duration>,
) -> anyhow::Result<()> {
    // Each group stops once the one before has exited.
    let stage = |name: &str| match name {
        n if n == "gateway" || n.starts_with("api") || n.starts_with("chat") => 0,
        n if n.starts_with("orders") => 1,
        n if n.starts_with("inventory") => 2,
        _ => 3,
    };
    let mut stages: Vec<(CancellationToken, tokio::task::JoinSet<()>)> = (0..4)
        .map(|_| (CancellationToken::new(), tokio::task::JoinSet::new()))
        .collect();
    let pids = Pids {
        file: data.join("pids.json"),
        pids: std::sync::Arc::default(),
    };
    for (part, child) in parts {
        pids.set(&part.name, &child);
        let (stop, supervisors) = &mut stages[stage(&part.name)];
        supervisors.spawn(supervise(part, child, stop.clone(), pids.clone()));
    }
    let run_out = async {
        match run_for {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = run_out => {}
        _ = interrupted.recv() => {}
    }
    keel_net::say!("stopping");
    for (stop, supervisors) in &mut stages {
        stop.cancel();
        while supervisors.join_next().await.is_some() {}
    }
    keel_net::say!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn banners_name_the_address() {
        assert_eq!(
            banner_address("inventory on 127.0.0.1:7200").as_deref(),
            Some("127.0.0.1:7200")
        );
        assert_eq!(
            banner_address("keel gateway on http://127.0.0.1:8080 (gw.toml); SIGHUP reloads")
                .as_deref(),
            Some("127.0.0.1:8080")
        );
        assert_eq!(banner_address("hello"), None);
        let config: UpConfig =
            toml::from_str(&toml::to_string(&UpConfig::defaults()).unwrap()).unwrap();
        assert_eq!(config.admin_token.len(), 32);
    }

    #[test]
    fn the_generated_gateway_configuration_is_valid_and_carries_the_limits() {
        let mut config = UpConfig::defaults();
        // A token TOML would need escaped goes through intact.
        config.admin_token = "to\"ken\\with quotes".into();
        let web = tempfile::tempdir().unwrap();
        let text = config.gateway_toml("127.0.0.1:8080", "127.0.0.1:7000", web.path());
        let gw = keel_gateway::GatewayConfig::parse(&text).unwrap();
        assert_eq!(gw.routes[0].rate_limits.len(), 2);
        assert_eq!(gw.routes[0].rate_limits[1].key, "header:x-user-id");
        assert_eq!(gw.routes[2].name.as_deref(), Some("chat"));
        assert_eq!(gw.routes[3].name.as_deref(), Some("storefront"));
        assert_eq!(
            gw.admin.as_ref().unwrap().token.as_deref(),
            Some("to\"ken\\with quotes")
        );
        config.limits.buy_per_ip_per_second = 0.0;
        let text = config.gateway_toml("127.0.0.1:8080", "127.0.0.1:7000", web.path());
        let gw = keel_gateway::GatewayConfig::parse(&text).unwrap();
        assert_eq!(gw.routes[0].rate_limits.len(), 1);
    }

    #[test]
    fn scale_settings_and_addresses() {
        let mut scale = Scale::default();
        scale
            .apply(&["inventory=4".into(), "orders=3".into()])
            .unwrap();
        assert_eq!((scale.inventory, scale.orders), (4, 3));
        assert!(scale.clone().apply(&["orders=5".into()]).is_err());
        assert!(scale.clone().apply(&["inventory=0".into()]).is_err());
        let mut three = scale;
        three.apply(&["api=3".into()]).unwrap();
        assert_eq!(three.api, 3);
        assert!(scale.clone().apply(&["api=0".into()]).is_err());
        assert!(scale.clone().apply(&["api=9".into()]).is_err());
        assert_eq!(
            scale.clone().apply(&["chat=3".into()]).map(|()| 3).unwrap(),
            3
        );
        assert!(scale.clone().apply(&["chat=9".into()]).is_err());
        assert!(scale.clone().apply(&["shop=2".into()]).is_err());
        assert!(scale.clone().apply(&["inventory".into()]).is_err());
        assert_eq!(nth_address("127.0.0.1:7200", 3).unwrap(), "127.0.0.1:7203");
        assert_eq!(nth_address("127.0.0.1:0", 3).unwrap(), "127.0.0.1:0");
        assert!(nth_address("127.0.0.1:65535", 1).is_err());
        assert!(nth_address("nohost", 1).is_err());

        let dir = tempfile::tempdir().unwrap();
        check_topology(dir.path(), Scale::default()).unwrap();
        check_topology(dir.path(), Scale::default()).unwrap();
        let err = check_topology(dir.path(), scale).unwrap_err().to_string();
        assert!(err.contains("2 inventory shards"), "{err}");

        // The chat count may change while no chat instance holds rooms, not after.
        let chat = |n| Scale {
            chat: n,
            ..Scale::default()
        };
        let fresh = tempfile::tempdir().unwrap();
        check_topology(fresh.path(), chat(2)).unwrap();
        check_topology(fresh.path(), chat(3)).unwrap();
        std::fs::create_dir(fresh.path().join("chat-0")).unwrap();
        let err = check_topology(fresh.path(), chat(2))
            .unwrap_err()
            .to_string();
        assert!(err.contains("3 chat instances"), "{err}");
        check_topology(fresh.path(), chat(3)).unwrap();
    }
}
