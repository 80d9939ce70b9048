//! `keel bench chat`: many WebSocket connections against running chat instances.
//!
//! It opens the connections (from several source addresses when asked, with a progress line
//! on stderr), puts them in rooms of a given size, and measures:
//! - memory per connection of the chat processes (their resident set before and after the
//!   connections, from `/proc/PID/status`);
//! - with a publish rate: fan-out deliveries per second, the delay from publishing a message
//!   to its receipt (p50, p99), messages lost (expected deliveries that never came) and gaps
//!   in the numbering seen by a member.
//!
//! Tokens are signed by the bench itself with the instances' key (`KEEL_CHAT_SECRET` or
//! `--secret-file`), as an application's own sign-in service would issue them; the demo
//! login is rate-limited per address and is not what a load test measures.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::BytesMut;
use clap::Args;
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::ws::{self, Decoder, Incoming};

/// What the servers speak.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Keel's chat protocol (docs/chat.md).
    Keel,
    /// socket.io 4 over its WebSocket transport (Engine.IO 4): events `join` (a room name,
    /// answered by `joined`) and `send` (`{room, text}`, broadcast to the room as `msg`), as
    /// `bench/chat/server.js` serves them.
    Socketio,
}

impl Protocol {
    /// The request target of the WebSocket upgrade.
    fn path(self, token: &str) -> String {
        match self {
            Protocol::Keel => format!("/chat/ws?token={token}"),
            Protocol::Socketio => "/socket.io/?EIO=4&transport=websocket".to_owned(),
        }
    }
}

/// The source address of connection `i`: 127.0.0.1 up to 127.0.0.`sources`, in turn.
fn source(i: usize, sources: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        127,
        0,
        0,
        1 + (i % usize::from(sources)) as u8,
    ))
}

/// `keel bench chat` arguments.
#[derive(Args, Debug, Clone)]
pub struct ChatBenchArgs {
    /// The servers' protocol.
    #[arg(long, value_enum, default_value = "keel")]
    pub protocol: Protocol,
    /// A chat instance (`HOST:PORT`); repeat to spread the connections over several.
    #[arg(long = "addr", required = true)]
    pub addrs: Vec<SocketAddr>,
    /// File holding the instances' token key (else KEEL_CHAT_SECRET).
    #[arg(long)]
    pub secret_file: Option<PathBuf>,
    /// Connections to open.
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Members per room (rooms = connections / room size).
    #[arg(long, default_value_t = 100)]
    pub room_size: usize,
    /// Messages published per second, all rooms together (0: only hold the connections).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Most messages per second one connection publishes (keep it under the instances'
    /// `sends_per_second`); the rate is spread over as many members as that takes.
    #[arg(long, default_value_t = 10.0)]
    pub per_connection_rate: f64,
    /// How long to publish (or hold), in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Source addresses 127.0.0.1 up to 127.0.0.N, each with its own range of ports.
    #[arg(long, default_value_t = 1)]
    pub sources: u8,
    /// Connections per second that connect, join a room and go away during the window, on
    /// top of those held (0: none).
    #[arg(long, default_value_t = 0.0)]
    pub churn: f64,
    /// Chat process ids whose memory is measured (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub pids: Vec<u32>,
}

/// Counters every connection adds to.
#[derive(Debug)]
struct Shared {
    epoch: Instant,
    joined: AtomicU64,
    failed: AtomicU64,
    publishing: AtomicBool,
    stop: tokio::sync::watch::Sender<bool>,
    sent: AtomicU64,
    delivered: AtomicU64,
    gaps: AtomicU64,
    errors: AtomicU64,
    /// Connections that came, joined and went during the window.
    churned: AtomicU64,
    churn_failed: AtomicU64,
    latency: Vec<Mutex<Histogram<u64>>>,
}

const SHARDS: usize = 16;

/// Runs the benchmark; returns its summary.
pub async fn run(args: &ChatBenchArgs) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(
        args.connections > 0 && args.room_size > 0,
        "connections and room size must be positive"
    );
    anyhow::ensure!(args.sources > 0, "--sources counts from 1");
    let secret = match (&args.secret_file, args.protocol) {
        (Some(path), _) => std::fs::read_to_string(path)
            .with_context(|| format!("reading {}", path.display()))?
            .trim()
            .to_owned(),
        (None, Protocol::Socketio) => String::new(),
        (None, Protocol::Keel) => std::env::var("KEEL_CHAT_SECRET")
            .context("set KEEL_CHAT_SECRET or --secret-file: the instances' token key")?,
    };
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes());
    let (stop, _) = tokio::sync::watch::channel(false);
    let mut latency = Vec::with_capacity(SHARDS);
    for _ in 0..SHARDS {
        // Microseconds, from 1 µs to a minute, 3 significant digits.
        latency.push(Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3)?));
    }
    let shared = Arc::new(Shared {
        epoch: Instant::now(),
        joined: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        publishing: AtomicBool::new(false),
        stop,
        sent: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        gaps: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        churned: AtomicU64::new(0),
        churn_failed: AtomicU64::new(0),
        latency,
    });
    let rss_before = rss_kb(&args.pids);
    let rooms = args.connections.div_ceil(args.room_size);
    let publishers_per_room = if args.rate > 0.0 {
        let per_room = args.rate / rooms as f64;
        ((per_room / args.per_connection_rate).ceil() as usize).clamp(1, args.room_size)
    } else {
        0
    };
    let each_rate = if publishers_per_room > 0 {
        args.rate / (rooms * publishers_per_room) as f64
    } else {
        0.0
    };
    let expiry = crate::hub::now_ms() / 1000 + 24 * 3600;
    let opening = Arc::new(tokio::sync::Semaphore::new(256));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..args.connections {
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &serde_json::json!({ "sub": format!("u{i}"), "exp": expiry }),
            &key,
        )?;
        let addr = args.addrs[i % args.addrs.len()];
        let source = source(i, args.sources);
        let room = format!("bench-{}", i / args.room_size);
        let publish = (i % args.room_size < publishers_per_room)
            .then(|| Duration::from_secs_f64(1.0 / each_rate));
        let shared = shared.clone();
        let opening = opening.clone();
        let protocol = args.protocol;
        tasks.spawn(async move {
            let permit = opening.acquire_owned().await;
            let path = protocol.path(&token);
            let target = Target {
                protocol,
                addr,
                source,
                path: &path,
                room: &room,
                churn: false,
            };
            if let Err(e) = member(i, target, publish, &shared, permit.ok()).await {
                shared.failed.fetch_add(1, Relaxed);
                tracing::debug!(connection = i, error = %e, "connection failed");
            }
        });
    }
    // Ramp: wait until every connection has joined its room (or failed), with progress.
    let total = args.connections as u64;
    let mut last_print = Instant::now();
    loop {
        let (joined, failed) = (shared.joined.load(Relaxed), shared.failed.load(Relaxed));
        if joined + failed >= total {
            break;
        }
        if last_print.elapsed() >= Duration::from_secs(1) {
            eprintln!(
                "connected {joined}/{total} ({failed} failed) after {:.0?}",
                started.elapsed()
            );
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ramp = started.elapsed();
    let joined = shared.joined.load(Relaxed);
    eprintln!("connected {joined}/{total} in {ramp:.1?}");
    // Let the instances settle (allocations freed after the upgrade burst) before reading memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = rss_kb(&args.pids);

    let window = Duration::from_secs_f64(args.seconds);
    let window_start = Instant::now();
    shared.publishing.store(args.rate > 0.0, Relaxed);
    let churn = (args.churn > 0.0).then(|| {
        let (args, key, shared) = (args.clone(), key.clone(), shared.clone());
        tokio::spawn(async move { churn(&args, &key, &shared, rooms, window).await })
    });
    tokio::time::sleep(window).await;
    shared.publishing.store(false, Relaxed);
    if let Some(churn) = churn {
        let _ = churn.await;
    }
    let sent = shared.sent.load(Relaxed);
    // What was published has a few seconds to arrive.
    let expected = sent * args.room_size.min(args.connections) as u64;
    let drain_until = Instant::now() + Duration::from_secs(5);
    while shared.delivered.load(Relaxed) < expected && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let measured = window_start.elapsed().min(window + Duration::from_secs(5));
    let delivered = shared.delivered.load(Relaxed);
    let rss_held = rss_kb(&args.pids);
    let _ = shared.stop.send(true);
    while tasks.join_next().await.is_some() {}

    let mut latency = Histogram::<u64>::new(3)?;
    for shard in &shared.latency {
        latency.add(&*shard.lock())?;
    }
    let ms = |q: f64| latency.value_at_quantile(q) as f64 / 1000.0;
    let per_conn = |after: Option<u64>| match (rss_before, after) {
        (Some(b), Some(a)) if joined > 0 => {
            Some(((a as f64 - b as f64) / joined as f64 * 100.0).round() / 100.0)
        }
        _ => None,
    };
    Ok(serde_json::json!({
        "connections": joined,
        "failed": shared.failed.load(Relaxed),
        "rooms": rooms,
        "room_size": args.room_size,
        "ramp_s": (ramp.as_secs_f64() * 100.0).round() / 100.0,
        "rss_kb_before": rss_before,
        "rss_kb_connected": rss_after,
        "rss_kb_end": rss_held,
        "kb_per_conn": per_conn(rss_after),
        "publishers": rooms * publishers_per_room,
        "sent": sent,
        "delivered": delivered,
        // Over the publishing window and the time the last deliveries then took.
        "deliveries_per_s": (delivered as f64 / measured.as_secs_f64().max(1e-9)).round(),
        "p50_ms": ms(0.5),
        "p99_ms": ms(0.99),
        "max_ms": latency.max() as f64 / 1000.0,
        "lost": expected.saturating_sub(delivered),
        "gaps": shared.gaps.load(Relaxed),
        "errors": shared.errors.load(Relaxed),
        "churn_per_s": (shared.churned.load(Relaxed) as f64 / window.as_secs_f64()).round(),
        "churn_failed": shared.churn_failed.load(Relaxed),
    }))
}

/// Connections that connect, join and leave at `args.churn` per second for `window`, each
/// as a user of its own.
async fn churn(
    args: &ChatBenchArgs,
    key: &jsonwebtoken::EncodingKey,
    shared: &Arc<Shared>,
    rooms: usize,
    window: Duration,
) {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / args.churn));
    let until = Instant::now() + window;
    let mut cycles = tokio::task::JoinSet::new();
    let expiry = crate::hub::now_ms() / 1000 + 3600;
    let mut k = 0usize;
    while Instant::now() < until {
        tick.tick().await;
        let i = args.connections + k;
        k += 1;
        let claims = serde_json::json!({ "sub": format!("u{i}"), "exp": expiry });
        let Ok(token) = jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, key) else {
            shared.churn_failed.fetch_add(1, Relaxed);
            continue;
        };
        let (protocol, shared) = (args.protocol, shared.clone());
        let addr = args.addrs[i % args.addrs.len()];
        let source = source(i, args.sources);
        let room = format!("bench-{}", k % rooms.max(1));
        cycles.spawn(async move {
            let path = protocol.path(&token);
            let target = Target {
                protocol,
                addr,
                source,
                path: &path,
                room: &room,
                churn: true,
            };
            if member(i, target, None, &shared, None).await.is_err() {
                shared.churn_failed.fetch_add(1, Relaxed);
            }
        });
        while cycles.try_join_next().is_some() {}
    }
    while cycles.join_next().await.is_some() {}
}

/// Resident memory of `pids` together, in KiB; `None` without pids.
fn rss_kb(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    let mut total = 0;
    for pid in pids {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        total += line.split_whitespace().nth(1)?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// A server frame, as far as the bench reads it.
#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(default)]
    msg_id: Option<u64>,
    #[serde(default)]
    last_msg_id: Option<u64>,
    #[serde(default, borrow)]
    text: Option<&'a str>,
}

/// Where a member connects and what it says there.
struct Target<'a> {
    protocol: Protocol,
    addr: SocketAddr,
    source: IpAddr,
    path: &'a str,
    room: &'a str,
    /// Leave as soon as the room is joined (a connection of the churn).
    churn: bool,
}

/// A socket.io event frame (`42["name", body]`), as far as the bench reads it.
#[derive(Deserialize)]
struct SioEvent<'a>(&'a str, #[serde(borrow)] SioBody<'a>);

#[derive(Deserialize)]
struct SioBody<'a> {
    #[serde(default, borrow)]
    text: Option<&'a str>,
}

/// What a text frame told the member.
enum Heard<'a> {
    Joined(Option<u64>),
    Msg(Option<u64>, Option<&'a str>),
    Error,
    /// Protocol chatter to answer with this text (socket.io's handshake, pings and join).
    Reply(String),
    Other,
}

fn hear<'a>(protocol: Protocol, text: &'a str, room: &str) -> Heard<'a> {
    match protocol {
        Protocol::Keel => match serde_json::from_str::<Frame<'_>>(text) {
            Ok(frame) => match frame.kind {
                "msg" => Heard::Msg(frame.msg_id, frame.text),
                "joined" => Heard::Joined(frame.last_msg_id),
                "error" => Heard::Error,
                _ => Heard::Other,
            },
            Err(_) => Heard::Other,
        },
        // Engine.IO: 0 open (connect to the default namespace), 2 ping (pong), 40 connected
        // (join the room), 42 an event.
        Protocol::Socketio => match text.as_bytes() {
            [b'0', ..] => Heard::Reply("40".into()),
            [b'2', ..] => Heard::Reply("3".into()),
            [b'4', b'0', ..] => Heard::Reply(format!(r#"42["join","{room}"]"#)),
            [b'4', b'2', ..] => match serde_json::from_str::<SioEvent<'_>>(&text[2..]) {
                Ok(SioEvent("msg", body)) => Heard::Msg(None, body.text),
                Ok(SioEvent("joined", _)) => Heard::Joined(None),
                _ => Heard::Other,
            },
            _ => Heard::Other,
        },
    }
}

/// One member: connects, joins, reads until stopped, and publishes when it is a publisher.
async fn member(
    i: usize,
    target: Target<'_>,
    publish: Option<Duration>,
    shared: &Shared,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
) -> anyhow::Result<()> {
    let Target {
        protocol,
        addr,
        source,
        path,
        room,
        churn,
    } = target;
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    let mut stream: TcpStream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut input = ws::client_handshake(&mut stream, &addr.to_string(), path).await?;
    let mask = (i as u32).to_le_bytes();
    let mut out = BytesMut::new();
    if protocol == Protocol::Keel {
        let join = format!(r#"{{"type":"join","room":"{room}"}}"#);
        ws::encode_text_masked(&join, mask, &mut out);
        stream.write_all(&out).await?;
        out.clear();
    }
    let mut decoder = Decoder::for_client(1 << 20);
    let mut last_id: Option<u64> = None;
    let mut permit = permit;
    let mut stop = shared.stop.subscribe();
    let mut tick = publish.map(|every| {
        // Publishers start at different moments, so the rate is smooth.
        let offset = every.mul_f64((i as f64 * 0.618_034) % 1.0);
        tokio::time::interval_at(tokio::time::Instant::now() + offset, every)
    });
    let mut sequence = 0u64;
    loop {
        loop {
            let incoming = match decoder.decode(&mut input) {
                Ok(Some(incoming)) => incoming,
                Ok(None) => break,
                Err(e) => anyhow::bail!("bad frame from the server: {e}"),
            };
            match incoming {
                Incoming::Text(text) => match hear(protocol, &text, room) {
                    Heard::Msg(msg_id, body) => {
                        let now = shared.epoch.elapsed().as_micros() as u64;
                        if let Some(sent_at) = body.and_then(|t| t.parse::<u64>().ok()) {
                            shared.latency[i % SHARDS]
                                .lock()
                                .saturating_record(now.saturating_sub(sent_at).max(1));
                        }
                        shared.delivered.fetch_add(1, Relaxed);
                        if let (Some(id), Some(last)) = (msg_id, last_id)
                            && id > last + 1
                        {
                            shared.gaps.fetch_add(id - last - 1, Relaxed);
                        }
                        last_id = msg_id.or(last_id);
                    }
                    Heard::Joined(_) if churn => {
                        shared.churned.fetch_add(1, Relaxed);
                        return Ok(());
                    }
                    Heard::Joined(last) => {
                        last_id = last;
                        shared.joined.fetch_add(1, Relaxed);
                        permit.take();
                    }
                    Heard::Error => {
                        shared.errors.fetch_add(1, Relaxed);
                    }
                    Heard::Reply(reply) => ws::encode_text_masked(&reply, mask, &mut out),
                    Heard::Other => {}
                },
                Incoming::Ping(payload) => ws::encode_pong_masked(&payload, mask, &mut out),
                Incoming::Pong => {}
                Incoming::Close(code) => anyhow::bail!("closed by the server: {code:?}"),
            }
        }
        if input.is_empty() {
            input = BytesMut::new();
        }
        if !out.is_empty() {
            stream.write_all(&out).await?;
            out = BytesMut::new();
        }
        input.reserve(4096);
        tokio::select! {
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    return Ok(());
                }
            }
            read = stream.read_buf(&mut input) => {
                if read? == 0 {
                    anyhow::bail!("the server closed the connection");
                }
            }
            _ = async { match tick.as_mut() { Some(t) => t.tick().await, None => std::future::pending().await } } => {
                if shared.publishing.load(Relaxed) {
                    sequence += 1;
                    let sent_at = shared.epoch.elapsed().as_micros();
                    let send = match protocol {
                        Protocol::Keel => format!(
                            r#"{{"type":"send","room":"{room}","text":"{sent_at}","client_msg_id":"{sequence}"}}"#
                        ),
                        Protocol::Socketio => {
                            format!(r#"42["send",{{"room":"{room}","text":"{sent_at}"}}]"#)
                        }
                    };
                    ws::encode_text_masked(&send, mask, &mut out);
                    shared.sent.fetch_add(1, Relaxed);
                }
            }
        }
    }
}
