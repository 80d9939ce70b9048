//! How chat instances reach each other, carrying [`crate::cluster`]'s lines in order.
//!
//! Each instance has one outgoing queue per other instance, drained by one task, in
//! batches of lines (one JSON object per line):
//!
//! - **direct** (the default): the task keeps a WebSocket open to the other instance's
//!   `/chat/relay` (authenticated with a token signed by the key the instances share) and
//!   writes each batch as one text message. The other instance's address is fixed in the
//!   configuration (`NAME=HOST:PORT`) or found in the registry, where every instance
//!   registers as service `chat` with its name in the `instance` label.
//! - **NATS** (`nats = "nats://…"`): each batch is published to subject
//!   `keel.chat.<instance>`, to which that instance subscribes. NATS keeps one publisher's
//!   messages in order.
//!
//! Either way a link begins with `hello` and repeats it every second. A link that breaks,
//! or whose queue overflows, starts a new session: its queue is emptied, and the `hello`
//! with the new session number makes both sides resynchronise the rooms they share.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures_util::StreamExt as _;
use keel_governance::Endpoints;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::hub::{Hub, Peer};
use crate::ws::{self, Decoder, Incoming};

/// How often a link says `hello`.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// Most bytes of lines sent in one WebSocket message or NATS message. One more line may pass
/// it; the longest lines (a `joined` with what was missed, `history`, `synced`) carry at most
/// 384 KiB of messages, so a batch stays under NATS's default limit of 1 MiB.
const BATCH: usize = 256 << 10;

/// Largest message accepted on an incoming link.
const MAX_RELAY_MESSAGE: usize = 16 << 20;

/// The registered service name of chat instances.
pub const SERVICE: &str = "chat";

/// The registry's namespace of chat instances.
pub const NAMESPACE: &str = "default";

/// Where the other instances listen: fixed addresses, then the registry.
pub struct Addresses {
    fixed: HashMap<String, String>,
    registry: Option<watch::Receiver<Arc<Endpoints>>>,
    /// Keeps the registry's watch running (it stops when dropped).
    _discover: Option<Box<dyn keel_governance::Discover>>,
}

impl std::fmt::Debug for Addresses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Addresses")
            .field("fixed", &self.fixed)
            .field("registry", &self.registry.is_some())
            .finish()
    }
}

impl Addresses {
    /// Fixed addresses (instance name to `HOST:PORT`), and those `discover` lists for
    /// service `chat`.
    pub fn new(
        fixed: HashMap<String, String>,
        discover: Option<Box<dyn keel_governance::Discover>>,
    ) -> Result<Addresses, keel_governance::DiscoverError> {
        let registry = match &discover {
            Some(d) => Some(d.subscribe(SERVICE)?),
            None => None,
        };
        Ok(Addresses {
            fixed,
            registry,
            _discover: discover,
        })
    }

    /// Where instance `name` listens now: its fixed address, or its newest registration.
    fn address(&self, name: &str) -> Option<String> {
        if let Some(address) = self.fixed.get(name) {
            return Some(address.clone());
        }
        let endpoints = self.registry.as_ref()?.borrow().clone();
        endpoints
            .instances
            .iter()
            .filter(|i| i.metadata.get("instance").is_some_and(|n| n == name))
            .max_by_key(|i| {
                i.metadata
                    .get("started")
                    .and_then(|s| s.parse::<u64>().ok())
                    .unwrap_or(0)
            })
            .map(|i| i.address.clone())
    }
}

/// Mints the token a direct link presents (short-lived, made for each connection).
pub type TokenMaker = Arc<dyn Fn() -> String + Send + Sync>;

/// Starts the links of `hub` (which has some): direct WebSockets to `addresses` with tokens
/// from `token`, or NATS at `nats`; and the sweeper of late requests and silent instances.
pub async fn start(
    hub: &Arc<Hub>,
    nats: Option<&str>,
    addresses: Addresses,
    token: TokenMaker,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let Some(links) = hub.links() else {
        return Ok(Vec::new());
    };
    let mut tasks = Vec::new();
    match nats {
        Some(url) => {
            let client = async_nats::connect(url)
                .await
                .map_err(|e| anyhow::anyhow!("connecting to NATS at {url}: {e}"))?;
            let mut inbox = client
                .subscribe(subject(links.me()))
                .await
                .map_err(|e| anyhow::anyhow!("subscribing on NATS at {url}: {e}"))?;
            let receiver = hub.clone();
            tasks.push(tokio::spawn(async move {
                while let Some(message) = inbox.next().await {
                    on_batch(&receiver, &message.payload);
                }
            }));
            for (name, outbox) in links.outboxes() {
                tasks.push(tokio::spawn(nats_link(
                    client.clone(),
                    hub.clone(),
                    subject(name),
                    outbox.clone(),
                )));
            }
        }
        None => {
            let addresses = Arc::new(addresses);
            for (name, outbox) in links.outboxes() {
                tasks.push(tokio::spawn(direct_link(
                    hub.clone(),
                    name.clone(),
                    outbox.clone(),
                    addresses.clone(),
                    token.clone(),
                )));
            }
        }
    }
    let sweeper = hub.clone();
    tasks.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tick.tick().await;
            if let Some(links) = sweeper.links() {
                links.sweep(&sweeper);
            }
        }
    }));
    Ok(tasks)
}

fn subject(instance: &str) -> String {
    format!("keel.chat.{instance}")
}

/// Hands each line of a batch to the links.
fn on_batch(hub: &Arc<Hub>, batch: &[u8]) {
    let Some(links) = hub.links() else { return };
    let Ok(text) = std::str::from_utf8(batch) else {
        tracing::warn!("a batch from another chat instance is not UTF-8");
        return;
    };
    for line in text.split('\n').filter(|l| !l.is_empty()) {
        links.on_line(hub, line);
    }
}

/// Appends `line` and a newline to a batch.
fn push_line(batch: &mut BytesMut, line: &str) {
    batch.extend_from_slice(line.as_bytes());
    batch.extend_from_slice(b"\n");
}

/// Keeps a WebSocket to instance `name` and writes its queue there.
async fn direct_link(
    hub: Arc<Hub>,
    name: Arc<str>,
    outbox: Arc<Peer>,
    addresses: Arc<Addresses>,
    token: TokenMaker,
) {
    let backoff = keel_net::Backoff {
        initial: Duration::from_millis(50),
        max: Duration::from_secs(2),
        ..keel_net::Backoff::default()
    };
    let mut session = 0;
    let mut attempt = 0;
    loop {
        let connected = async {
            let address = addresses.address(&name).ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::NotFound, "not registered")
            })?;
            let mut stream =
                tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(&address))
                    .await
                    .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
            stream.set_nodelay(true)?;
            let path = format!("/chat/relay?token={}", token());
            let handshake = ws::client_handshake(&mut stream, &address, &path);
            tokio::time::timeout(Duration::from_secs(2), handshake)
                .await
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
            Ok::<_, std::io::Error>(stream)
        }
        .await;
        let mut stream = match connected {
            Ok(stream) => stream,
            Err(e) => {
                tracing::debug!(instance = %name, error = %e, "no link to chat instance yet");
                tokio::time::sleep(backoff.delay(attempt)).await;
                attempt = attempt.saturating_add(1);
                continue;
            }
        };
        session += 1;
        let opened = tokio::time::Instant::now();
        // What is queued goes out after the new session's hello, which makes both sides
        // resynchronise whatever the broken link lost; a queue that overflowed starts over.
        if outbox.is_behind() {
            outbox.reset();
        }
        let Some(links) = hub.links() else { return };
        let ended = write_link(&mut stream, &outbox, || links.hello(session)).await;
        tracing::info!(instance = %name, error = %ended, "link to chat instance ended; reconnecting");
        // A link that held is opened again at once; one closed as soon as it opened (the other
        // side draining, say) waits as a failed attempt would.
        if opened.elapsed() >= Duration::from_secs(1) {
            attempt = 0;
        } else {
            tokio::time::sleep(backoff.delay(attempt)).await;
            attempt = attempt.saturating_add(1);
        }
    }
}

/// Writes the queue to one link until it breaks, with a `hello` first and every second.
async fn write_link(
    stream: &mut TcpStream,
    outbox: &Peer,
    hello: impl Fn() -> Arc<str>,
) -> std::io::Error {
    let mut batch = BytesMut::new();
    let mut out = BytesMut::new();
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    let mut sink = vec![0u8; 4096];
    push_line(&mut batch, &hello());
    loop {
        if outbox.is_behind() {
            return std::io::Error::other("its queue overflowed");
        }
        if !batch.is_empty() {
            // Lines are JSON this process wrote: the batch is UTF-8.
            let text = std::str::from_utf8(&batch).unwrap_or_default();
            ws::encode_text_masked(text, rand::random(), &mut out);
            batch.clear();
            let write = tokio::time::timeout(Duration::from_secs(10), stream.write_all(&out));
            match write.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return e,
                Err(_) => return std::io::Error::from(std::io::ErrorKind::TimedOut),
            }
            out.clear();
            if out.capacity() > BATCH * 4 {
                out = BytesMut::new();
            }
        }
        tokio::select! {
            _ = heartbeat.tick() => push_line(&mut batch, &hello()),
            () = outbox.wait() => {
                outbox.take(&mut batch, BATCH, |line, b| push_line(b, line));
            }
            read = stream.read(&mut sink) => match read {
                // The other side sends nothing but control frames; it closed or failed.
                Ok(0) => return std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
                Ok(_) => {}
                Err(e) => return e,
            },
        }
    }
}

/// Publishes the queue for one instance to its NATS subject.
async fn nats_link(client: async_nats::Client, hub: Arc<Hub>, subject: String, outbox: Arc<Peer>) {
    let Some(links) = hub.links() else { return };
    let mut session = 1;
    outbox.reset();
    let mut batch = BytesMut::new();
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    push_line(&mut batch, &links.hello(session));
    loop {
        if outbox.is_behind() {
            session += 1;
            outbox.reset();
            batch.clear();
            push_line(&mut batch, &links.hello(session));
        }
        if !batch.is_empty() {
            let payload = batch.split().freeze();
            if let Err(e) = client.publish(subject.clone(), payload).await {
                tracing::warn!(%subject, error = %e, "publishing to another chat instance failed");
                session += 1;
                outbox.reset();
                push_line(&mut batch, &links.hello(session));
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        }
        tokio::select! {
            _ = heartbeat.tick() => push_line(&mut batch, &links.hello(session)),
            () = outbox.wait() => {
                outbox.take(&mut batch, BATCH, |line, b| push_line(b, line));
            }
        }
    }
}

/// Serves an incoming link from another instance (after the upgrade): hands its lines to
/// the links, answers pings, until it closes or the server drains.
pub(crate) async fn inbound(
    hub: Arc<Hub>,
    mut stream: TcpStream,
    leftover: bytes::Bytes,
    drain: keel_net::Drain,
) {
    let mut decoder = Decoder::new(MAX_RELAY_MESSAGE);
    let mut input = BytesMut::from(&leftover[..]);
    let mut out = BytesMut::new();
    loop {
        loop {
            match decoder.decode(&mut input) {
                Ok(Some(Incoming::Text(text))) => on_batch(&hub, text.as_bytes()),
                Ok(Some(Incoming::Ping(payload))) => ws::encode_pong(&payload, &mut out),
                Ok(Some(Incoming::Pong)) => {}
                Ok(Some(Incoming::Close(_))) => return,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "a link from another chat instance broke the protocol");
                    return;
                }
            }
        }
        if !out.is_empty() {
            if stream.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
        tokio::select! {
            () = drain.draining() => return,
            read = stream.read_buf(&mut input) => match read {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
        }
    }
}
