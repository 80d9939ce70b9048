//! The `keel` command: run Keel services and measure them.
//!
//! - `keel serve`: the echo service on a port (binary protocol and HTTP/JSON).
//! - `keel registry`: the naming service, durable in a data directory.
//! - `keel gateway`: the reverse proxy and load balancer.
//! - `keel bench rpc`: the built-in load generator against a Keel echo server.
//! - `keel bench registry`: a registry workload against Keel's registry or etcd.
//! - `keel demo`: both at once, in one process, for a few seconds.
//! - `keel up`: the flash sale on this machine, as supervised processes.
//! - `keel node`: one host's share of the flash sale across machines (`cluster.toml`).

use std::net::SocketAddr;
use std::time::Duration;

// Request paths allocate many small, short-lived buffers (headers, frames); glibc's malloc
// spent ~8% of the gateway's time in a profile, mimalloc's thread-local free lists much less.
#[global_allocator]
static ALLOCATOR: keel_alloc::Allocator = keel_alloc::Allocator;

mod bench_failover;
mod bench_overload;
mod bench_registry;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use keel::loadgen;
use keel_echo::{EchoClient, EchoRequest, EchoServer, EchoService};
use keel_net::say;
use keel_rpc::{CallOptions, Channel, ChannelConfig, Codec, Server, ServerConfig};

#[derive(Parser, Debug)]
#[command(name = "keel", version, about = "Keel: a backend platform in Rust")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the echo service (Keel RPC and HTTP/JSON on one port) until Ctrl-C.
    Serve(ServeArgs),
    /// Measure a running service.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Start an echo server and drive it with the load generator for a few seconds.
    Demo(DemoArgs),
    /// Run the naming service (registry) until Ctrl-C.
    Registry(RegistryArgs),
    /// Run the flash-sale system (inventory, orders, HTTP API) and the chat, behind the
    /// gateway, as separate processes from keel.toml (written with defaults if absent) until
    /// Ctrl-C.
    Up(UpArgs),
    /// Run one host's share of the flash sale across several machines (etcd, NATS JetStream,
    /// PostgreSQL), as `cluster.toml` says, until Ctrl-C.
    Node(NodeArgs),
    /// Run one process of the flash-sale system (what `keel up` starts).
    #[command(subcommand)]
    Seckill(keel_seckill::cli::Role),
    /// Run one chat instance (rooms over WebSocket, durable history) until Ctrl-C.
    Chat(keel_chat::cli::ChatArgs),
    /// Run the gateway (reverse proxy and load balancer) until Ctrl-C; SIGHUP reloads its
    /// configuration file.
    Gateway(GatewayArgs),
}

#[derive(Args, Debug)]
struct NodeArgs {
    /// The cluster's configuration (the engines and every host's parts).
    #[arg(long)]
    config: std::path::PathBuf,
    /// Which host of the configuration this is.
    #[arg(long)]
    host: String,
    /// Stop after this many seconds; 0 runs until Ctrl-C.
    #[arg(long, default_value_t = 0)]
    seconds: u64,
}

#[derive(Args, Debug)]
struct UpArgs {
    /// The system's configuration. Without this flag, `keel.toml` is used and written with
    /// the defaults on first run; a file named here must exist.
    #[arg(long)]
    config: Option<std::path::PathBuf>,
    /// Stop after this many seconds (for trying it out and for CI); 0 runs until Ctrl-C.
    #[arg(long, default_value_t = 0)]
    seconds: u64,
    /// How many processes of a kind, over keel.toml's `[scale]`: `--scale inventory=4`
    /// (kinds: inventory, orders, api, chat); repeatable.
    #[arg(long)]
    scale: Vec<String>,
}

#[derive(Args, Debug)]
struct GatewayArgs {
    /// Configuration file (TOML; see docs/gateway.md).
    #[arg(long, default_value = "gateway.toml")]
    config: String,
    /// Runtime worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

#[derive(Args, Debug)]
struct RegistryArgs {
    /// Address to listen on (Keel RPC and HTTP/JSON).
    #[arg(long, default_value = "127.0.0.1:7000")]
    addr: SocketAddr,
    /// Directory for the journal and snapshots.
    #[arg(long, default_value = "keel-data/registry")]
    data_dir: std::path::PathBuf,
    /// When writes reach the disk: always (fsync before acknowledging, group commit),
    /// interval:<ms>, or never.
    #[arg(long, default_value = "always")]
    sync: String,
    /// Require the token in this file for writes (`authorization: Bearer <token>`). Without
    /// it, the token (if any) is read from KEEL_REGISTRY_TOKEN; never from the command line,
    /// which `ps` shows to every user of the machine.
    #[arg(long)]
    token_file: Option<std::path::PathBuf>,
    /// Share of a service's instances whose leases may lapse at once before protection keeps
    /// them listed (1 turns protection off).
    #[arg(long, default_value_t = 0.5)]
    protect_threshold: f64,
    /// Runtime worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7100")]
    addr: SocketAddr,
    /// Runtime worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Also serve keel.bench.Work/Do, a service with this many workers (0: not served).
    #[arg(long, default_value_t = 0)]
    work_slots: usize,
    /// Milliseconds of work per keel.bench.Work call.
    #[arg(long, default_value_t = 10)]
    work_ms: u64,
    /// Server settings from a TOML file: the keys of `keel_rpc::ServerConfig`
    /// (docs/operations.md); a missing key keeps its default, an unknown key is an error.
    #[arg(long)]
    server_config: Option<std::path::PathBuf>,
    /// Server-wide concurrency limit (0: none); overrides the file.
    #[arg(long)]
    max_concurrency: Option<usize>,
    /// Adapt the concurrency limit to measured latency (overload protection).
    #[arg(long)]
    adaptive_limit: bool,
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Unary echo calls against a Keel server.
    Rpc(RpcBenchArgs),
    /// A registry workload against Keel's registry or etcd.
    Registry(bench_registry::RegistryBenchArgs),
    /// Load on the work service (`keel serve --work-slots`), closed or open loop.
    Work(bench_overload::WorkBenchArgs),
    /// Load on several echo instances through a service channel, one killed midway.
    Failover(bench_failover::FailoverBenchArgs),
    /// Many WebSocket connections against running chat instances: memory per connection,
    /// fan-out deliveries per second, delivery delay, messages lost.
    Chat(keel_chat::bench::ChatBenchArgs),
    /// A flash sale against a running `keel up`, then its invariants checked (non-zero exit
    /// on a breach).
    Seckill(keel_seckill::bench::SeckillBenchArgs),
}

#[derive(Args, Debug, Clone)]
struct RpcBenchArgs {
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:7100")]
    addr: String,
    #[command(flatten)]
    load: loadgen::LoadArgs,
    /// Body codec: protobuf or json.
    #[arg(long, default_value = "protobuf")]
    codec: String,
    /// Print only the JSON line.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct DemoArgs {
    /// Measured seconds.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Address for the demo server (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    addr: SocketAddr,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KEEL_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Bench(BenchCommand::Rpc(args)) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let report = rt.block_on(bench_rpc(&args))?;
            print_report(&args, &report);
            Ok(())
        }
        Command::Bench(BenchCommand::Failover(args)) => print_json(bench_failover::run(&args)),
        Command::Bench(BenchCommand::Work(args)) => print_json(bench_overload::run(&args)),
        Command::Bench(BenchCommand::Registry(args)) => print_json(bench_registry::run(&args)),
        Command::Bench(BenchCommand::Chat(args)) => {
            let rt = runtime(0)?;
            let summary = rt.block_on(keel_chat::bench::run(&args))?;
            say!("{summary}");
            Ok(())
        }
        Command::Bench(BenchCommand::Seckill(args)) => {
            let rt = runtime(0)?;
            let summary = rt.block_on(keel_seckill::bench::run(&args))?;
            say!("{summary}");
            match summary["verdict"].as_str() {
                Some("ok") => {}
                Some("unchecked") => anyhow::bail!(
                    "could not check the invariants: the system is unreachable (nothing found broken)"
                ),
                _ => anyhow::bail!("an invariant of the sale was broken"),
            }
            Ok(())
        }
        Command::Demo(args) => demo(args),
        Command::Registry(args) => registry(args),
        Command::Gateway(args) => gateway(args),
        Command::Chat(args) => keel_chat::cli::run(args),
        Command::Seckill(role) => keel_seckill::cli::run(role),
        Command::Node(args) => {
            let config = keel_seckill::node::ClusterConfig::load(&args.config)?;
            let rt = runtime(0)?;
            rt.block_on(keel_seckill::node::run(
                config,
                &args.host,
                (args.seconds > 0).then(|| std::time::Duration::from_secs(args.seconds)),
            ))
        }
        Command::Up(args) => {
            let mut config = match &args.config {
                Some(path) => keel_seckill::up::UpConfig::load(path)?,
                None => {
                    keel_seckill::up::UpConfig::load_or_create(std::path::Path::new("keel.toml"))?
                }
            };
            config.scale.apply(&args.scale)?;
            let rt = runtime(0)?;
            rt.block_on(keel_seckill::up::run(
                config,
                (args.seconds > 0).then(|| std::time::Duration::from_secs(args.seconds)),
            ))
        }
    }
}

fn gateway(args: GatewayArgs) -> anyhow::Result<()> {
    let gateway = keel_gateway::Gateway::from_file(&args.config)?;
    let config = gateway.config();
    let listen = config.server.listen;
    // With one thread the gateway runs on the current-thread scheduler, which does less per
    // task switch: +6% requests/s in bench/gateway.sh. (Not for the RPC server: there a
    // multi-thread runtime's LIFO slot runs a connection's writer right after its reader, which
    // keeps connections from moving in lockstep; see docs/benchmarks.md.)
    let rt = if args.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        runtime(args.threads)?
    };
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        let scheme = if config.server.tls.is_some() {
            "https"
        } else {
            "http"
        };
        // Listened for before the banner: a SIGHUP that comes as soon as the gateway says it
        // is up must reload it, not end it with the signal's default action.
        let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("listening for SIGHUP")?;
        say!(
            "keel gateway on {scheme}://{} ({}); SIGHUP reloads, Ctrl-C stops",
            listener.local_addr()?,
            args.config
        );
        let stop = tokio_util::sync::CancellationToken::new();
        if let Some(admin) = &config.admin {
            let listener = tokio::net::TcpListener::bind(admin.listen)
                .await
                .with_context(|| format!("binding the admin port {}", admin.listen))?;
            say!("admin API on http://{}", listener.local_addr()?);
            let stop = stop.clone();
            tokio::spawn(
                gateway
                    .clone()
                    .serve_admin(listener, async move { stop.cancelled().await }),
            );
        }
        let reloader = gateway.clone();
        tokio::spawn(async move {
            let mut hangups = hangups;
            while hangups.recv().await.is_some() {
                // Written without panicking if nobody reads stdout any more.
                use std::io::Write as _;
                let _ = match reloader.reload_file().await {
                    Ok(()) => writeln!(std::io::stdout(), "configuration reloaded"),
                    Err(e) => writeln!(
                        std::io::stderr(),
                        "reload refused, the old configuration stays: {e}"
                    ),
                };
            }
        });
        gateway
            .serve(listener, async {
                keel_net::stop_requested().await;
            })
            .await?;
        stop.cancel();
        Ok(())
    })
}

/// Runs a benchmark on a current-thread runtime (the client pinned to one core, as every
/// contender's) and prints its JSON line.
fn print_json(
    bench: impl std::future::Future<Output = anyhow::Result<serde_json::Value>>,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    say!("{}", rt.block_on(bench)?);
    Ok(())
}

fn parse_sync(spec: &str) -> anyhow::Result<keel_store::SyncPolicy> {
    use keel_store::SyncPolicy;
    match spec {
        "always" => Ok(SyncPolicy::Always),
        "never" => Ok(SyncPolicy::Never),
        other => match other.strip_prefix("interval:").map(str::parse::<u64>) {
            Some(Ok(ms)) if ms > 0 => Ok(SyncPolicy::Interval(Duration::from_millis(ms))),
            _ => anyhow::bail!(
                "--sync {other:?}: use always, never, or interval:<milliseconds> (e.g. interval:100)"
            ),
        },
    }
}

fn registry(args: RegistryArgs) -> anyhow::Result<()> {
    use keel_registry::{Registry, RegistryConfig};
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.protect_threshold),
        "--protect-threshold {} must be between 0 and 1",
        args.protect_threshold
    );
    let config = RegistryConfig {
        data_dir: Some(args.data_dir.clone()),
        sync: parse_sync(&args.sync)?,
        token: keel_seckill::cli::secret(args.token_file.as_deref(), "KEEL_REGISTRY_TOKEN")?,
        protect_threshold: args.protect_threshold,
        ..RegistryConfig::default()
    };
    let rt = runtime(args.threads)?;
    rt.block_on(async {
        let registry = Registry::open(config)
            .await
            .with_context(|| format!("opening the registry in {}", args.data_dir.display()))?;
        let listener = tokio::net::TcpListener::bind(args.addr)
            .await
            .with_context(|| format!("binding {}", args.addr))?;
        // Printed on stdout so scripts and tests can wait for it.
        say!(
            "keel registry on {} (data in {}, revision {}); Ctrl-C stops",
            listener.local_addr()?,
            args.data_dir.display(),
            registry.revision()
        );
        let server = Server::builder().add_service(registry.service()).build();
        server
            .serve(listener, async {
                keel_net::stop_requested().await;
            })
            .await?;
        registry.close().await?;
        Ok(())
    })
}

fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if threads > 0 {
        builder.worker_threads(threads);
    }
    Ok(builder.enable_all().build()?)
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = match &args.server_config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            toml::from_str::<ServerConfig>(&text)
                .with_context(|| format!("{} is not valid", path.display()))?
        }
        None => ServerConfig::default(),
    };
    if let Some(limit) = args.max_concurrency {
        config.max_concurrency = limit;
    }
    config.adaptive_limit |= args.adaptive_limit;
    let rt = runtime(args.threads)?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.addr)
            .await
            .with_context(|| format!("binding {}", args.addr))?;
        eprintln!(
            "keel echo service on {} (Keel RPC + HTTP/JSON); Ctrl-C stops",
            listener.local_addr()?
        );
        let mut builder = Server::builder()
            .config(config)
            .add_service(EchoServer::new(EchoService));
        if args.work_slots > 0 {
            builder = builder.add_service(bench_overload::work_service(
                args.work_slots,
                Duration::from_millis(args.work_ms),
            ));
        }
        builder
            .build()
            .serve(listener, async {
                keel_net::stop_requested().await;
            })
            .await?;
        Ok(())
    })
}

fn parse_codec(name: &str) -> anyhow::Result<Codec> {
    match name {
        "protobuf" | "proto" | "pb" => Ok(Codec::Protobuf),
        "json" => Ok(Codec::Json),
        other => anyhow::bail!("unknown codec {other:?}: use protobuf or json"),
    }
}

async fn bench_rpc(args: &RpcBenchArgs) -> anyhow::Result<loadgen::LoadReport> {
    let load = &args.load;
    anyhow::ensure!(
        load.connections > 0 && load.concurrency > 0,
        "connections and concurrency must be positive"
    );
    let codec = parse_codec(&args.codec)?;
    let mut clients = Vec::with_capacity(load.connections);
    for _ in 0..load.connections {
        let channel = Channel::connect(args.addr.clone(), ChannelConfig::default())
            .await
            .with_context(|| format!("connecting to {}", args.addr))?;
        clients.push(EchoClient::new(channel));
    }
    let request = EchoRequest {
        message: String::new(),
        payload: vec![0x5a; load.payload].into(),
    };
    let report = loadgen::closed_loop(
        load.concurrency,
        Duration::from_secs_f64(load.warmup),
        Duration::from_secs_f64(load.seconds),
        |worker| EchoCaller {
            client: clients[worker % clients.len()].clone(),
            request: request.clone(),
            codec,
            expected: load.payload,
        },
    )
    .await;
    Ok(report)
}

/// One `keel bench rpc` worker: its client, request and options, reused for every call.
struct EchoCaller {
    client: EchoClient,
    request: EchoRequest,
    codec: Codec,
    expected: usize,
}

impl loadgen::Caller for EchoCaller {
    async fn call(&mut self) -> Result<(), String> {
        let reply = self
            .client
            // No per-call deadline, as in the tonic client it is compared with. Built anew each
            // call, as a caller would: with no metadata that costs no allocation.
            .echo_with(&self.request, CallOptions::default().codec(self.codec))
            .await
            .map_err(|s| s.to_string())?;
        if reply.payload.len() != self.expected {
            return Err(format!(
                "reply payload {} bytes, sent {}",
                reply.payload.len(),
                self.expected
            ));
        }
        Ok(())
    }
}

fn print_report(args: &RpcBenchArgs, report: &loadgen::LoadReport) {
    if !args.json {
        say!(
            "keel rpc: {} B payload, concurrency {}, {} connections, {}",
            args.load.payload,
            args.load.concurrency,
            args.load.connections,
            args.codec
        );
        say!("  {}", report.summary());
        if let Some(e) = &report.first_error {
            say!("  first error: {e}");
        }
    }
    say!("{}", report.to_json_for(&args.load));
}

fn demo(args: DemoArgs) -> anyhow::Result<()> {
    // The server gets its own runtime thread, the load generator another, as if they were
    // two processes: what is measured is the protocol and the server, not a shared scheduler.
    let server_rt = runtime(1)?;
    let listener = server_rt.block_on(tokio::net::TcpListener::bind(args.addr))?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = Server::builder()
        .config(ServerConfig::default())
        .add_service(EchoServer::new(EchoService))
        .build();
    let server_handle = server.clone();
    let serving = server_rt.spawn(server.serve(listener, async {
        let _ = stop_rx.await;
    }));
    say!("Keel echo service listening on {addr} (Keel RPC and HTTP/JSON on one port)");
    say!("  try: curl -s -X POST http://{addr}/keel.echo.v1.Echo/Echo -d '{{\"message\":\"hi\"}}'");
    say!(
        "Driving it with the built-in load generator for {:.0} s...",
        args.seconds
    );

    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    for (payload, concurrency) in [(64usize, 64usize), (1024, 64)] {
        let bench = RpcBenchArgs {
            addr: addr.to_string(),
            load: loadgen::LoadArgs {
                concurrency,
                connections: 4,
                payload,
                seconds: args.seconds / 2.0,
                warmup: 0.3,
            },
            codec: "protobuf".into(),
            json: false,
        };
        let report = client_rt.block_on(bench_rpc(&bench))?;
        say!(
            "  echo {payload:>5} B, {concurrency} in flight over 4 connections: {}",
            report.summary()
        );
        anyhow::ensure!(report.errors == 0, "calls failed: {:?}", report.first_error);
    }
    // The same service over HTTP/JSON, as curl would call it.
    let metrics = server_handle.render_metrics();
    let calls = metrics
        .lines()
        .find(|l| l.starts_with("keel_rpc_requests_total{service=\"keel.echo.v1.Echo\",method=\"Echo\",status=\"ok\"}"))
        .unwrap_or("");
    say!("Server metrics: {calls}");
    let _ = stop_tx.send(());
    server_rt.block_on(serving)??;
    say!("Server drained and stopped.");
    Ok(())
}
