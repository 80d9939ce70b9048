//! Benchmark contenders for `bench/rpc.sh`, measured by the same load generator as Keel:
//!
//! - `tonic-server` / `tonic-client`: gRPC over HTTP/2 with the same echo `.proto`.
//! - `raw-server` / `raw-client`: length-prefixed echo over plain TCP, requests pipelined on
//!   each connection, with no framework at all: the ceiling of this machine's loopback.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::{Buf, BufMut, BytesMut};
use clap::{Args, Parser, Subcommand};
use keel::loadgen::{self, LoadReport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[allow(missing_docs, unreachable_pub, clippy::all)]
mod pb {
    tonic::include_proto!("keel.echo.v1");
}

#[derive(Parser, Debug)]
#[command(about = "Benchmark peers for Keel RPC")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// gRPC echo server (tonic).
    TonicServer(ServerArgs),
    /// Load generator against the tonic server.
    TonicClient(ClientArgs),
    /// Raw-TCP echo server.
    RawServer(ServerArgs),
    /// Pipelining load generator against the raw server.
    RawClient(ClientArgs),
}

#[derive(Args, Debug)]
struct ServerArgs {
    #[arg(long)]
    addr: SocketAddr,
    /// Runtime worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

#[derive(Args, Debug, Clone)]
struct ClientArgs {
    #[arg(long)]
    addr: SocketAddr,
    #[command(flatten)]
    load: loadgen::LoadArgs,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::TonicServer(a) => server_runtime(a.threads)?.block_on(tonic_server(a.addr)),
        Command::RawServer(a) => server_runtime(a.threads)?.block_on(raw_server(a.addr)),
        Command::TonicClient(a) => {
            let report = client_runtime()?.block_on(tonic_client(&a))?;
            print(&a, &report);
            Ok(())
        }
        Command::RawClient(a) => {
            let report = client_runtime()?.block_on(raw_client(&a))?;
            print(&a, &report);
            Ok(())
        }
    }
}

fn server_runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()?)
}

fn client_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn print(args: &ClientArgs, report: &LoadReport) {
    println!("{}", report.to_json_for(&args.load));
}

#[derive(Debug, Default)]
struct TonicEcho;

#[tonic::async_trait]
impl pb::echo_server::Echo for TonicEcho {
    async fn echo(
        &self,
        request: tonic::Request<pb::EchoRequest>,
    ) -> Result<tonic::Response<pb::EchoReply>, tonic::Status> {
        let r = request.into_inner();
        Ok(tonic::Response::new(pb::EchoReply {
            message: r.message,
            payload: r.payload,
        }))
    }

    type CountStream = std::pin::Pin<
        Box<dyn tokio_stream_shim::Stream<Item = Result<pb::CountReply, tonic::Status>> + Send>,
    >;

    async fn count(
        &self,
        _request: tonic::Request<pb::CountRequest>,
    ) -> Result<tonic::Response<Self::CountStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("not part of the benchmark"))
    }
}

/// tonic's generated code wants a `Stream`; name the trait without another dependency.
mod tokio_stream_shim {
    pub(crate) use tonic::codegen::tokio_stream::Stream;
}

async fn tonic_server(addr: SocketAddr) -> anyhow::Result<()> {
    tonic::transport::Server::builder()
        .add_service(pb::echo_server::EchoServer::new(TonicEcho))
        .serve(addr)
        .await?;
    Ok(())
}

async fn tonic_client(args: &ClientArgs) -> anyhow::Result<LoadReport> {
    let mut clients = Vec::new();
    for _ in 0..args.load.connections.max(1) {
        // Each `connect` opens its own HTTP/2 connection.
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", args.addr))?
            .tcp_nodelay(true)
            .connect()
            .await
            .context("connecting to the tonic server")?;
        clients.push(pb::echo_client::EchoClient::new(channel));
    }
    let payload = vec![0x5a; args.load.payload];
    let expected = args.load.payload;
    let report = loadgen::closed_loop(
        args.load.concurrency,
        Duration::from_secs_f64(args.load.warmup),
        Duration::from_secs_f64(args.load.seconds),
        |worker| TonicCaller {
            client: clients[worker % clients.len()].clone(),
            payload: payload.clone(),
            expected,
        },
    )
    .await;
    Ok(report)
}

/// One tonic worker: its client and payload, reused for every call.
struct TonicCaller {
    client: pb::echo_client::EchoClient<tonic::transport::Channel>,
    payload: Vec<u8>,
    expected: usize,
}

impl loadgen::Caller for TonicCaller {
    async fn call(&mut self) -> Result<(), String> {
        // tonic takes the request by value: each call builds its own, as a caller would.
        let request = pb::EchoRequest {
            message: String::new(),
            payload: self.payload.clone(),
        };
        let reply = self
            .client
            .echo(request)
            .await
            .map_err(|s| s.to_string())?
            .into_inner();
        if reply.payload.len() != self.expected {
            return Err("short reply".to_owned());
        }
        Ok(())
    }
}

/// The length of the first complete `[u32 length][payload]` frame in `input`, if there is one.
fn complete_frame(input: &[u8]) -> Option<usize> {
    let len = u32::from_be_bytes(input.get(..4)?.try_into().ok()?) as usize;
    (input.len() >= 4 + len).then_some(4 + len)
}

async fn raw_server(addr: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    loop {
        let (mut stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        tokio::spawn(async move {
            let mut input = BytesMut::with_capacity(64 * 1024);
            let mut output = BytesMut::with_capacity(64 * 1024);
            loop {
                match stream.read_buf(&mut input).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                // Echo every complete frame; partial frames wait for more bytes.
                while let Some(n) = complete_frame(&input) {
                    output.extend_from_slice(&input[..n]);
                    input.advance(n);
                }
                if !output.is_empty() {
                    if stream.write_all(&output).await.is_err() {
                        return;
                    }
                    output.clear();
                }
            }
        });
    }
}

async fn raw_client(args: &ClientArgs) -> anyhow::Result<LoadReport> {
    let connections = args.load.connections.max(1);
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(args.load.warmup);
    let end = measure_from + Duration::from_secs_f64(args.load.seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..connections {
        // Spread the concurrency over the connections as evenly as possible.
        let depth = args.load.concurrency / connections
            + usize::from(c < args.load.concurrency % connections);
        if depth == 0 {
            continue;
        }
        let mut stream = TcpStream::connect(args.addr)
            .await
            .context("connecting to the raw server")?;
        stream.set_nodelay(true)?;
        let payload = vec![0x5a; args.load.payload];
        tasks.spawn(async move {
            let mut hist = loadgen::new_histogram();
            let mut sent: VecDeque<Instant> = VecDeque::with_capacity(depth);
            let mut out = BytesMut::with_capacity(depth * (payload.len() + 4));
            let mut input = BytesMut::with_capacity(64 * 1024);
            let push = |out: &mut BytesMut, sent: &mut VecDeque<Instant>| {
                out.put_u32(payload.len() as u32);
                out.put_slice(&payload);
                sent.push_back(Instant::now());
            };
            for _ in 0..depth {
                push(&mut out, &mut sent);
            }
            loop {
                if !out.is_empty() {
                    if stream.write_all(&out).await.is_err() {
                        break;
                    }
                    out.clear();
                }
                if sent.is_empty() {
                    break;
                }
                match stream.read_buf(&mut input).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                while let Some(n) = complete_frame(&input) {
                    input.advance(n);
                    let now = Instant::now();
                    if let Some(t0) = sent.pop_front()
                        && t0 >= measure_from
                    {
                        hist.saturating_record((now - t0).as_micros().max(1) as u64);
                    }
                    if now < end {
                        push(&mut out, &mut sent);
                    }
                }
            }
            hist
        });
    }
    let mut hist = loadgen::new_histogram();
    while let Some(joined) = tasks.join_next().await {
        hist.add(&joined?)?;
    }
    Ok(LoadReport::from_histogram(
        &hist,
        0,
        None,
        measure_from,
        end,
    ))
}
