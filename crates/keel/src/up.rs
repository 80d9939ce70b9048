//! `keel up`: the flash-sale system on one machine, each part its own OS process — an
//! inventory, an orders service, the sale's HTTP API, and the gateway in front — started from
//! `keel.toml` (written with defaults on first run), restarted with backoff when one dies,
//! and stopped together on Ctrl-C.
//!
//! Each child is this same executable (`keel seckill <role>`, `keel gateway`); its first line
//! says where it listens, which is how the next one is wired to it (so ports may be 0). A
//! restarted child keeps its address.

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
    /// The sale's HTTP API.
    pub api: Listen,
    /// The inventory.
    pub inventory: Listen,
    /// The orders service.
    pub orders: OrdersSection,
    /// Rate limits on buying, at the gateway.
    #[serde(default)]
    pub limits: LimitsSection,
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
            api: Listen {
                listen: "127.0.0.1:7400".into(),
            },
            inventory: Listen {
                listen: "127.0.0.1:7200".into(),
            },
            orders: OrdersSection {
                listen: "127.0.0.1:7300".into(),
                payment_window_ms: 600_000,
            },
            limits: LimitsSection::default(),
        }
    }

    /// The gateway's configuration: the API behind `/api/` through a bounded queue, with the
    /// buy limits on `POST /api/items/...`.
    pub fn gateway_toml(&self, listen: &str, api_addr: &str) -> String {
        let mut limits = Vec::new();
        for (rate, key) in [
            (self.limits.buy_per_ip_per_second, "ip"),
            (self.limits.buy_per_user_per_second, "header:x-user-id"),
        ] {
            if rate > 0.0 {
                let burst = (rate * 2.0).ceil().max(1.0) as u64;
                limits.push(format!(
                    "{{ per_second = {rate:?}, burst = {burst}, key = \"{key}\" }}"
                ));
            }
        }
        format!(
            "[server]\nlisten = \"{listen}\"\n[admin]\nlisten = \"{}\"\ntoken = \"{}\"\n\n[upstreams.api]\nservers = [{{ address = \"{api_addr}\" }}]\nmax_inflight = 1024\nqueue_size = 8192\nqueue_timeout_ms = 2000\n\n[[routes]]\nname = \"buy\"\npath_prefix = \"/api/items/\"\nmethods = [\"POST\"]\nupstream = \"api\"\nrate_limits = [{}]\n\n[[routes]]\nname = \"api\"\npath_prefix = \"/api/\"\nupstream = \"api\"\n",
            self.gateway.admin,
            self.admin_token,
            limits.join(", ")
        )
    }

    /// Reads `path`, or writes the defaults there first if it does not exist.
    pub fn load_or_create(path: &Path) -> anyhow::Result<UpConfig> {
        if !path.exists() {
            let config = UpConfig::defaults();
            let text = format!(
                "# keel up: the flash-sale system on this machine (see docs/seckill.md).\n{}",
                toml::to_string(&config)?
            );
            std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
            println!("wrote {} with the defaults", path.display());
            return Ok(config);
        }
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let config: UpConfig =
            toml::from_str(&text).with_context(|| format!("{} is not valid", path.display()))?;
        if config.admin_token.len() < 8 {
            bail!(
                "{}: admin_token must have at least 8 characters",
                path.display()
            );
        }
        Ok(config)
    }
}

/// 128 random bits as hex, from the OS's randomness (the standard library's hasher keys).
fn fresh_token() -> String {
    use std::hash::{BuildHasher, Hasher};
    (0..2)
        .map(|i| {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(i);
            format!("{:016x}", h.finish())
        })
        .collect()
}

/// A child process and how to start it again.
struct Part {
    name: &'static str,
    args: Vec<String>,
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

/// Starts a part; returns the child and the address its banner names.
async fn start(part: &Part) -> anyhow::Result<(Child, String)> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args(&part.args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", part.name))?;
    let mut stdout = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let banner = tokio::time::timeout(Duration::from_secs(30), stdout.next_line())
        .await
        .with_context(|| format!("{} did not start within 30 s", part.name))??
        .with_context(|| format!("{} exited before it listened", part.name))?;
    let address = banner_address(&banner)
        .with_context(|| format!("{}: unexpected first line {banner:?}", part.name))?;
    let name = part.name;
    tokio::spawn(async move {
        while let Ok(Some(line)) = stdout.next_line().await {
            println!("[{name}] {line}");
        }
    });
    if let Some(stderr) = child.stderr.take() {
        let mut stderr = BufReader::new(stderr).lines();
        tokio::spawn(async move {
            while let Ok(Some(line)) = stderr.next_line().await {
                eprintln!("[{name}] {line}");
            }
        });
    }
    println!(
        "started {name} (pid {}) on {address}",
        child.id().unwrap_or(0)
    );
    Ok((child, address))
}

/// Replaces the value after `flag` in `args`.
fn set_arg(args: &mut [String], flag: &str, value: &str) {
    if let Some(i) = args.iter().position(|a| a == flag)
        && let Some(v) = args.get_mut(i + 1)
    {
        *v = value.to_owned();
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
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
                println!("{} exited ({}); restarting in {backoff:?}", part.name,
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
                            println!("restarted {}", part.name);
                            pids.set(part.name, &next);
                            child = next;
                            break;
                        }
                        Err(e) => {
                            println!("restarting {} failed: {e:#}; again in {backoff:?}", part.name);
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

/// Runs the system until Ctrl-C (or for `run_for`).
pub async fn run(config: UpConfig, run_for: Option<Duration>) -> anyhow::Result<()> {
    let data = &config.data_dir;
    std::fs::create_dir_all(data).with_context(|| format!("creating {}", data.display()))?;
    let dir = |name: &str| data.join(name).to_string_lossy().into_owned();
    let mut parts: Vec<(Part, Child)> = Vec::new();

    let mut inventory = Part {
        name: "inventory",
        args: strings(&[
            "seckill",
            "inventory",
            "--addr",
            &config.inventory.listen,
            "--data-dir",
        ]),
    };
    inventory.args.push(dir("inventory"));
    let (child, inventory_addr) = start(&inventory).await?;
    set_arg(&mut inventory.args, "--addr", &inventory_addr);
    parts.push((inventory, child));

    let mut orders = Part {
        name: "orders",
        args: strings(&["seckill", "orders", "--addr", &config.orders.listen]),
    };
    orders.args.extend([
        "--data-dir".into(),
        dir("orders"),
        "--inventory".into(),
        format!("inv-0={inventory_addr}"),
        "--payment-window-ms".into(),
        config.orders.payment_window_ms.to_string(),
    ]);
    let (child, orders_addr) = start(&orders).await?;
    set_arg(&mut orders.args, "--addr", &orders_addr);
    parts.push((orders, child));

    let mut api = Part {
        name: "api",
        args: strings(&["seckill", "api", "--addr", &config.api.listen]),
    };
    api.args.extend([
        "--data-dir".into(),
        dir("catalog"),
        "--inventory".into(),
        format!("inv-0={inventory_addr}"),
        "--orders".into(),
        orders_addr.clone(),
        "--admin-token".into(),
        config.admin_token.clone(),
    ]);
    let (child, api_addr) = start(&api).await?;
    set_arg(&mut api.args, "--addr", &api_addr);
    parts.push((api, child));

    // The gateway in front: the API behind /api/, with a bounded queue in front of it.
    let gateway_config = data.join("gateway.toml");
    let gateway_toml = config.gateway_toml(&config.gateway.listen, &api_addr);
    std::fs::write(&gateway_config, gateway_toml)
        .with_context(|| format!("writing {}", gateway_config.display()))?;
    let mut gateway = Part {
        name: "gateway",
        args: vec![
            "gateway".into(),
            "--config".into(),
            gateway_config.to_string_lossy().into_owned(),
        ],
    };
    let (child, gateway_addr) = start(&gateway).await?;
    // Restarted, it must come back on the same port.
    if config.gateway.listen.ends_with(":0") {
        let fixed = std::fs::read_to_string(&gateway_config)?.replacen(
            &format!("listen = \"{}\"", config.gateway.listen),
            &format!("listen = \"{gateway_addr}\""),
            1,
        );
        std::fs::write(&gateway_config, fixed)?;
    }
    gateway.args.truncate(3);
    parts.push((gateway, child));

    println!(
        "Keel is up: http://{gateway_addr}/api/items  (admin token: {}; Ctrl-C stops)",
        config.admin_token
    );

    let stop = CancellationToken::new();
    let pids = Pids {
        file: data.join("pids.json"),
        pids: std::sync::Arc::default(),
    };
    let mut supervisors = tokio::task::JoinSet::new();
    for (part, child) in parts {
        pids.set(part.name, &child);
        supervisors.spawn(supervise(part, child, stop.clone(), pids.clone()));
    }
    match run_for {
        Some(d) => tokio::time::sleep(d).await,
        None => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    println!("stopping");
    stop.cancel();
    while supervisors.join_next().await.is_some() {}
    println!("stopped");
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
        let text = config.gateway_toml("127.0.0.1:8080", "127.0.0.1:7400");
        let gw = keel_gateway::GatewayConfig::parse(&text).unwrap();
        assert_eq!(gw.routes[0].rate_limits.len(), 2);
        assert_eq!(gw.routes[0].rate_limits[1].key, "header:x-user-id");
        config.limits.buy_per_ip_per_second = 0.0;
        let text = config.gateway_toml("127.0.0.1:8080", "127.0.0.1:7400");
        let gw = keel_gateway::GatewayConfig::parse(&text).unwrap();
        assert_eq!(gw.routes[0].rate_limits.len(), 1);
    }
}
