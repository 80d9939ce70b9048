//! A journal kept in a NATS JetStream stream instead of local segment files: the same
//! append-and-replay contract as [`Journal`](crate::Journal), with the stream's replicas
//! (on other machines) in place of the local disk.
//!
//! - **Group commit.** Records appended while earlier messages await their acknowledgement
//!   travel together in one message (at most `max_in_flight` messages are unacknowledged at
//!   once), so under load the stream stores, replicates and delivers one message for many
//!   records. Each message says which records it holds (see [`unpack`]); replay reads messages
//!   `1..=last` and numbers the records from 1 across them.
//! - **Fenced appends.** Every message carries `Nats-Expected-Last-Sequence: s - 1`, where `s`
//!   is the stream sequence it must get, and every message but a writer's first also
//!   `Nats-Expected-Last-Msg-Id`: the id of the writer's previous message. The stream stores
//!   it only if its last message is that one, so a writer that has been replaced (another
//!   process opened the stream, replayed it and appended) has its next append refused by
//!   JetStream itself — and the ones it had already sent behind it too, since the stream's
//!   last message is no longer the writer's: [`StoreError::Fenced`]. The refused append and
//!   every one after it fail, and the journal accepts no more, as after a disk error.
//! - **Acknowledged after JetStream acknowledged.** An [`Appended`] resolves once the stream's
//!   leader has stored the message, which with `replicas > 1` is after a quorum of the replicas
//!   has it (in memory or on disk: JetStream syncs its files on an interval, see
//!   docs/scale-out.md).
//! - **In doubt, asked again.** A publish whose answer is lost (a timeout, a leader change, a
//!   broken connection) is sent again with the same `Nats-Msg-Id`; JetStream's duplicate
//!   window answers a message it has with its first sequence, so a retry never stores a record
//!   twice. The message id names the writer (random per open) and the index of the message's
//!   first record, so one writer's retry is never taken for another's message. After
//!   `retry_for` without an answer the journal fails with [`StoreError::Engine`].
//!
//! Appends are pipelined: one task publishes in index order without waiting for more than the
//! window of `max_in_flight` messages, another reads the acknowledgements in the same order.
//! JetStream applies a stream's messages in the order they arrive on a connection, so message
//! `s + 1`'s expectation holds once `s` is stored.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishErrorKind, message::PublishMessage};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::StreamExt;
use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};

use crate::StoreError;
use crate::journal::{Appended, JournalStats, Record, Recovered};

/// Where a stream journal lives and how it behaves.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    /// NATS servers to connect to (`nats://host:port` or `host:port`); any one of a cluster is
    /// enough, the client learns the others.
    pub servers: Vec<String>,
    /// The stream's name (letters, digits, `-` and `_`); its subject is `keel.journal.<name>`.
    pub stream: String,
    /// Replicas of the stream when it is created (1, 3 or 5; at most the cluster's size).
    pub replicas: usize,
    /// Largest record accepted.
    pub max_record_bytes: usize,
    /// How long one publish waits for its acknowledgement before it is sent again.
    pub ack_timeout: Duration,
    /// How long an append may stay in doubt (resent after timeouts, leader changes, lost
    /// connections) before the journal gives up and fails.
    pub retry_for: Duration,
    /// Messages published and not yet acknowledged, at most. Records appended meanwhile wait
    /// and go together in the next message: fewer makes larger messages (less work for the
    /// servers per record), more makes shorter waits when the servers are idle.
    pub max_in_flight: usize,
}

impl StreamOptions {
    /// Options for `stream` on `servers`, one replica, the other settings at their defaults.
    pub fn new(servers: Vec<String>, stream: impl Into<String>) -> StreamOptions {
        StreamOptions {
            servers,
            stream: stream.into(),
            replicas: 1,
            max_record_bytes: 1 << 20,
            ack_timeout: Duration::from_secs(2),
            retry_for: Duration::from_secs(15),
            max_in_flight: 4,
        }
    }

    /// Reads a journal address: `nats://host:port[,host:port…][?replicas=N&in_flight=M]`
    /// (`in_flight`: [`max_in_flight`](StreamOptions::max_in_flight), 1 to 1024). The stream
    /// name is given separately (it is the journal's, not the server's).
    pub fn parse(address: &str, stream: impl Into<String>) -> Result<StreamOptions, StoreError> {
        let bad = |reason: String| StoreError::InvalidSetting {
            setting: "journal address",
            value: address.to_owned(),
            reason,
        };
        let rest = address
            .strip_prefix("nats://")
            .ok_or_else(|| bad("it does not start with nats://".to_owned()))?;
        let (hosts, query) = rest.split_once('?').unwrap_or((rest, ""));
        let servers: Vec<String> = hosts
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(|h| format!("nats://{}", h.trim_start_matches("nats://")))
            .collect();
        if servers.is_empty() {
            return Err(bad("it names no server".to_owned()));
        }
        let mut options = StreamOptions::new(servers, stream);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("replicas", n)) => {
                    options.replicas = match n.parse::<usize>() {
                        Ok(r @ (1 | 3 | 5)) => r,
                        _ => {
                            return Err(bad(format!("replicas must be 1, 3 or 5, not {n:?}")));
                        }
                    }
                }
                Some(("in_flight", n)) => {
                    options.max_in_flight = match n.parse::<usize>() {
                        Ok(m @ 1..=1024) => m,
                        _ => {
                            return Err(bad(format!("in_flight must be 1 to 1024, not {n:?}")));
                        }
                    }
                }
                _ => {
                    return Err(bad(format!(
                        "unknown setting {pair:?} (known: replicas, in_flight)"
                    )));
                }
            }
        }
        check_stream_name(&options.stream)?;
        Ok(options)
    }

    /// The subject the stream's records are published on.
    pub fn subject(&self) -> String {
        format!("keel.journal.{}", self.stream)
    }
}

/// A stream name JetStream accepts and Keel can put in a subject: 1 to 200 of ASCII letters,
/// digits, `-` and `_`.
pub fn check_stream_name(name: &str) -> Result<(), StoreError> {
    check_name("stream name", name)
}

/// A name of `setting` (a stream's, a consumer's) JetStream accepts in a subject; see
/// [`check_stream_name`].
pub(crate) fn check_name(setting: &'static str, name: &str) -> Result<(), StoreError> {
    if name.is_empty()
        || name.len() > 200
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(StoreError::InvalidSetting {
            setting,
            value: name.to_owned(),
            reason: "it must be 1 to 200 ASCII letters, digits, '-' or '_'".to_owned(),
        });
    }
    Ok(())
}

/// An append waiting to be published.
struct Pending {
    index: u64,
    payload: Bytes,
    done: oneshot::Sender<Result<(), StoreError>>,
}

/// Records that travel in one message.
struct Batch {
    /// The stream sequence the message must get.
    sequence: u64,
    /// The id of the writer's previous message, which must be the stream's last (none for the
    /// writer's first message, which the sequence alone fences).
    after: Option<String>,
    /// In index order, without gaps.
    records: Vec<Pending>,
    /// What is published: the record itself when it is alone, else the records framed.
    body: Bytes,
}

impl Batch {
    fn first(&self) -> u64 {
        self.records.first().map_or(0, |r| r.index)
    }

    fn last(&self) -> u64 {
        self.records.last().map_or(0, |r| r.index)
    }

    fn settle(self, result: &Result<(), StoreError>) {
        for record in self.records {
            let _ = record.done.send(result.clone());
        }
    }
}

/// A published message waiting for its acknowledgement.
struct InFlight {
    batch: Batch,
    /// The acknowledgement to wait for, or what the sending itself came to.
    ack: Result<jetstream::context::PublishAckFuture, Outcome>,
    /// When it was published: its answer is waited for until `ack_timeout` after that, not
    /// after the messages before it were settled (after an outage, those published during it
    /// would otherwise each wait a whole timeout in turn).
    sent: Instant,
    /// Its place in the window of unacknowledged messages, given back once it is settled.
    _window: OwnedSemaphorePermit,
}

/// The header naming the index of a message's first record.
const INDEX_HEADER: &str = "Keel-Index";
/// The header counting a message's records when there are several.
const RECORDS_HEADER: &str = "Keel-Records";

/// The records of the stream's message `sequence`. A message holds one record, whose index is
/// the `Keel-Index` header, or, with a `Keel-Records: k` header, `k` records numbered on from
/// it, each framed as its length (4 bytes, big-endian) and its bytes. A message without
/// `Keel-Index` (written before records were batched) is the one record of index `sequence`.
pub(crate) fn unpack(
    sequence: u64,
    headers: Option<&HeaderMap>,
    payload: &Bytes,
) -> Result<Vec<Record>, String> {
    let header = |name: &str| {
        headers
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().parse::<u64>())
    };
    let first = match header(INDEX_HEADER) {
        None => sequence,
        Some(Ok(i)) if i > 0 => i,
        Some(_) => {
            return Err(format!(
                "message {sequence} has a bad {INDEX_HEADER} header"
            ));
        }
    };
    let count = match header(RECORDS_HEADER) {
        None => {
            return Ok(vec![Record {
                index: first,
                payload: payload.clone(),
            }]);
        }
        Some(Ok(k)) if k > 0 => k,
        Some(_) => {
            return Err(format!(
                "message {sequence} has a bad {RECORDS_HEADER} header"
            ));
        }
    };
    let mut rest = payload.clone();
    let mut records = Vec::with_capacity(usize::try_from(count).unwrap_or(0).min(4096));
    for k in 0..count {
        let len = (rest.remaining() >= 4).then(|| rest.get_u32() as usize);
        let Some(len) = len.filter(|&len| rest.remaining() >= len) else {
            return Err(format!(
                "message {sequence} ends inside record {k} of {count}"
            ));
        };
        records.push(Record {
            index: first + k,
            payload: rest.split_to(len),
        });
    }
    if rest.has_remaining() {
        return Err(format!(
            "message {sequence} has {} bytes after its {count} records",
            rest.remaining()
        ));
    }
    Ok(records)
}

/// How far the acknowledgements have come, and whether the journal failed.
#[derive(Debug, Clone)]
struct Progress {
    acked: u64,
    failed: Option<StoreError>,
}

struct Submit {
    tx: Option<mpsc::UnboundedSender<Pending>>,
    next_index: u64,
}

/// A journal in a JetStream stream. Appends may come from many tasks; they are numbered in
/// submission order, which is the order they are stored and replayed in.
pub struct StreamJournal {
    options: StreamOptions,
    submit: Mutex<Submit>,
    progress: watch::Receiver<Progress>,
    stats: Arc<JournalStats>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    client: async_nats::Client,
}

impl std::fmt::Debug for StreamJournal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamJournal")
            .field("stream", &self.options.stream)
            .field("next_index", &self.next_index())
            .finish()
    }
}

pub(crate) fn engine(stream: &str, what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Engine {
        stream: stream.to_owned(),
        reason: format!("{what}: {e}"),
    }
}

impl StreamJournal {
    /// Connects, creates the stream if it does not exist (file storage, `replicas`, nothing
    /// ever discarded or deleted), and replays it. The records come back in
    /// [`Recovered::records`]; the journal appends after the last of them.
    pub async fn open(options: StreamOptions) -> Result<(StreamJournal, Recovered), StoreError> {
        let name = options.stream.clone();
        let (client, js) = connect(&options).await?;
        let subject = options.subject();
        let (stream, info) = open_stream(&js, &options).await?;
        let last = info.state.last_sequence;
        let first = info.state.first_sequence;
        if last > 0 && first != 1 {
            return Err(engine(
                &name,
                "open",
                format!("the stream starts at message {first}: records before it are gone"),
            ));
        }
        let records = replay(&stream, &options, last).await?;
        let last_index = records.last().map_or(0, |r| r.index);

        let (progress_tx, progress) = watch::channel(Progress {
            acked: last_index,
            failed: None,
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let (flight_tx, flight_rx) = mpsc::unbounded_channel();
        let stats = Arc::new(JournalStats::default());
        let writer = format!("{:016x}", random_u64());
        let publisher = tokio::spawn(
            Publisher {
                js: js.clone(),
                subject: subject.clone(),
                writer: writer.clone(),
                flights: flight_tx,
                stats: stats.clone(),
                window: Arc::new(Semaphore::new(options.max_in_flight.max(1))),
                max_bytes: options.max_record_bytes.saturating_sub(HEADER_ROOM),
                next_sequence: last + 1,
                last_id: None,
                ack_timeout: options.ack_timeout,
                progress: progress.clone(),
            }
            .run(rx),
        );
        let acker = tokio::spawn(
            Acker {
                js,
                subject,
                writer,
                options: options.clone(),
                progress: progress_tx,
                stats: stats.clone(),
                predecessor_retried: false,
            }
            .run(flight_rx),
        );
        let journal = StreamJournal {
            options,
            submit: Mutex::new(Submit {
                tx: Some(tx),
                next_index: last_index + 1,
            }),
            progress,
            stats,
            tasks: Mutex::new(vec![publisher, acker]),
            client,
        };
        Ok((
            journal,
            Recovered {
                records,
                ..Recovered::default()
            },
        ))
    }

    /// Appends a record. The index is assigned now, in submission order; await the result for
    /// JetStream's acknowledgement.
    pub fn append(&self, payload: impl Into<Bytes>) -> Result<Appended, StoreError> {
        let payload = payload.into();
        if payload.len() > self.options.max_record_bytes {
            return Err(StoreError::TooLarge {
                len: payload.len(),
                max: self.options.max_record_bytes,
            });
        }
        if let Some(e) = &self.progress.borrow().failed {
            return Err(e.clone());
        }
        let (done, rx) = oneshot::channel();
        let mut submit = self.submit.lock();
        let index = submit.next_index;
        let tx = submit.tx.as_ref().ok_or(StoreError::Closed)?;
        tx.send(Pending {
            index,
            payload,
            done,
        })
        .map_err(|_| StoreError::Closed)?;
        submit.next_index += 1;
        self.stats.appends.fetch_add(1, Ordering::Relaxed);
        Ok(Appended::new(index, rx))
    }

    /// The index the next append will get.
    pub fn next_index(&self) -> u64 {
        self.submit.lock().next_index
    }

    /// Waits until everything appended so far is acknowledged by JetStream.
    pub async fn sync(&self) -> Result<(), StoreError> {
        let target = self.next_index() - 1;
        let mut progress = self.progress.clone();
        let seen = progress
            .wait_for(|p| p.acked >= target || p.failed.is_some())
            .await
            .map_err(|_| StoreError::Closed)?;
        match &seen.failed {
            Some(e) if seen.acked < target => Err(e.clone()),
            _ => Ok(()),
        }
    }

    /// Counters (appends, bytes, messages as `batches`, resends; a stream journal has no
    /// fsyncs of its own).
    pub fn stats(&self) -> &JournalStats {
        &self.stats
    }

    /// The stream's name.
    pub fn stream(&self) -> &str {
        &self.options.stream
    }

    /// Stops accepting appends, waits for the acknowledgements of those submitted, and
    /// disconnects.
    pub async fn close(&self) -> Result<(), StoreError> {
        let result = self.sync().await;
        self.submit.lock().tx = None;
        let tasks = std::mem::take(&mut *self.tasks.lock());
        for task in tasks {
            let _ = task.await;
        }
        let _ = self.client.drain().await;
        match result {
            Err(StoreError::Closed) => Ok(()),
            other => other,
        }
    }
}

impl Drop for StreamJournal {
    fn drop(&mut self) {
        for task in self.tasks.lock().iter() {
            task.abort();
        }
    }
}

/// Connects to the servers of `options` and waits (up to 10 s) for the first connection, so a
/// wrong address is an error at once; the client reconnects by itself afterwards.
pub(crate) async fn connect(
    options: &StreamOptions,
) -> Result<(async_nats::Client, jetstream::Context), StoreError> {
    check_stream_name(&options.stream)?;
    let name = &options.stream;
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        .request_timeout(Some(options.ack_timeout))
        .connect(options.servers.as_slice())
        .await
        .map_err(|e| engine(name, "connecting to NATS", e))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.connection_state() != async_nats::connection::State::Connected {
        if Instant::now() > deadline {
            return Err(engine(
                name,
                "connecting to NATS",
                format!("no server of {:?} answered in 10 s", options.servers),
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let js = jetstream::ContextBuilder::new()
        .timeout(options.ack_timeout)
        .max_ack_inflight(4096)
        .backpressure_on_inflight(true)
        .build(client.clone());
    Ok((client, js))
}

/// The journal's stream, created if it does not exist (file storage, `replicas`, nothing ever
/// discarded or deleted), and its state; refused if a stream of that name holds something
/// else.
pub(crate) async fn open_stream(
    js: &jetstream::Context,
    options: &StreamOptions,
) -> Result<(jetstream::stream::Stream, jetstream::stream::Info), StoreError> {
    let name = &options.stream;
    let subject = options.subject();
    let config = jetstream::stream::Config {
        name: name.clone(),
        subjects: vec![subject.clone()],
        storage: jetstream::stream::StorageType::File,
        num_replicas: options.replicas,
        max_message_size: i32::try_from(options.max_record_bytes).unwrap_or(i32::MAX),
        duplicate_window: Duration::from_secs(120),
        deny_delete: true,
        deny_purge: true,
        allow_direct: true,
        ..Default::default()
    };
    let stream = retry_api(options, || js.get_or_create_stream(config.clone()))
        .await
        .map_err(|e| engine(name, "creating the stream", e))?;
    // Made a moment ago by another process, the stream may not be known yet to the server
    // asked ("stream not found"): asked again, as for a leader election.
    let info = retry_api(options, || stream.get_info())
        .await
        .map_err(|e| engine(name, "reading the stream's state", e))?;
    if !info.config.subjects.contains(&subject) {
        return Err(engine(
            name,
            "open",
            format!(
                "the stream exists with subjects {:?}, not {subject:?}: it is not a Keel journal",
                info.config.subjects
            ),
        ));
    }
    if info.config.num_replicas != options.replicas {
        tracing::warn!(stream = %name, has = info.config.num_replicas, asked = options.replicas,
            "the stream exists with another number of replicas; kept as it is");
    }
    Ok((stream, info))
}

/// Runs a JetStream API call again while the cluster has no leader for it yet (a stream
/// being created or a leader election), for up to `retry_for`.
pub(crate) async fn retry_api<
    T,
    E: std::fmt::Display,
    F: std::future::Future<Output = Result<T, E>>,
>(
    options: &StreamOptions,
    mut call: impl FnMut() -> F,
) -> Result<T, E> {
    let deadline = Instant::now() + options.retry_for;
    let mut wait = Duration::from_millis(50);
    loop {
        match call().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() + wait < deadline => {
                tracing::debug!(error = %e, "JetStream call failed; trying again");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(1));
            }
            Err(e) => return Err(e),
        }
    }
}

/// How long the replay waits for its consumer to be made before it reads message by message,
/// at most and at least; in between, about what reading the stream message by message would
/// take ([`GET_TIME`] a message), so a short stream is not held up waiting for a consumer.
const CONSUMER_PATIENCE: Duration = Duration::from_millis(500);
const CONSUMER_PATIENCE_MIN: Duration = Duration::from_millis(100);

/// A rough time per message when the replay reads message by message, 64 at a time: in the
/// three-host cluster of `bench/cluster.sh`, right after a host was lost, a shard's stream of a
/// sale of 10,000 units in progress was read this way in 0.2 to 0.3 s.
const GET_TIME: Duration = Duration::from_micros(150);

/// Reads in flight at once when the replay reads message by message.
const REPLAY_GETS_IN_FLIGHT: usize = 64;

/// Reads messages `1..=last` in order, and returns their records.
///
/// The replay reads through an ordered consumer, which streams the messages in batches. Making
/// a consumer needs JetStream's metadata leader, and right after the server that held it is
/// lost there is none until the cluster elects another (4-9 s after the last heartbeat in
/// nats-server's Raft). A shard's stream does not wait for that: its own leader answers
/// message reads. So when the consumer is not made in time (see [`CONSUMER_PATIENCE`]), the replay
/// asks the stream's leader for each message instead, [`REPLAY_GETS_IN_FLIGHT`] at a time.
async fn replay(
    stream: &jetstream::stream::Stream,
    options: &StreamOptions,
    last: u64,
) -> Result<Vec<Record>, StoreError> {
    if last == 0 {
        return Ok(Vec::new());
    }
    let patience = GET_TIME
        .saturating_mul(u32::try_from(last).unwrap_or(u32::MAX))
        .clamp(CONSUMER_PATIENCE_MIN, CONSUMER_PATIENCE);
    let made = tokio::time::timeout(
        patience,
        stream.create_consumer(jetstream::consumer::pull::OrderedConfig {
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            ..Default::default()
        }),
    )
    .await;
    match made {
        Ok(Ok(consumer)) => replay_by_consumer(consumer, options, last).await,
        Ok(Err(e)) => {
            tracing::info!(stream = %options.stream, error = %e,
                "no replay consumer; reading the stream message by message");
            replay_by_gets(stream, options, last).await
        }
        Err(_) => {
            tracing::info!(stream = %options.stream, ?patience,
                "no replay consumer in time (no metadata leader?); reading the stream message by message");
            replay_by_gets(stream, options, last).await
        }
    }
}

fn corrupt(name: &str, sequence: u64, reason: String) -> StoreError {
    StoreError::Corrupt {
        file: format!("nats stream {name}").into(),
        offset: sequence,
        reason,
    }
}

fn replayed_out_of_order(name: &str, sequence: u64, expected: u64) -> StoreError {
    corrupt(
        name,
        sequence,
        format!("message {sequence} where {expected} was expected"),
    )
}

/// Adds the records of message `sequence` to `records`, which must go on without a gap.
fn take_message(
    name: &str,
    records: &mut Vec<Record>,
    sequence: u64,
    headers: Option<&HeaderMap>,
    payload: &Bytes,
) -> Result<(), StoreError> {
    let unpacked = unpack(sequence, headers, payload).map_err(|e| corrupt(name, sequence, e))?;
    let expected = records.last().map_or(1, |r| r.index + 1);
    if unpacked.first().map(|r| r.index) != Some(expected) {
        return Err(corrupt(
            name,
            sequence,
            format!("message {sequence} does not start with record {expected}"),
        ));
    }
    records.extend(unpacked);
    Ok(())
}

async fn replay_by_consumer(
    consumer: jetstream::consumer::Consumer<jetstream::consumer::pull::OrderedConfig>,
    options: &StreamOptions,
    last: u64,
) -> Result<Vec<Record>, StoreError> {
    let name = options.stream.as_str();
    let mut records = Vec::with_capacity(usize::try_from(last).unwrap_or(0).min(1 << 20));
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| engine(name, "replaying the stream", e))?;
    let mut expected = 1;
    while expected <= last {
        let message = tokio::time::timeout(Duration::from_secs(30), messages.next())
            .await
            .map_err(|_| engine(name, "replaying the stream", "no message for 30 s"))?
            .ok_or_else(|| engine(name, "replaying the stream", "the consumer ended"))?
            .map_err(|e| engine(name, "replaying the stream", e))?;
        let sequence = message
            .info()
            .map_err(|e| engine(name, "replaying the stream", e))?
            .stream_sequence;
        if sequence != expected {
            return Err(replayed_out_of_order(name, sequence, expected));
        }
        take_message(
            name,
            &mut records,
            sequence,
            message.headers.as_ref(),
            &message.payload,
        )?;
        expected += 1;
    }
    Ok(records)
}

/// Reads `1..=last` from the stream's leader, each message asked again (see [`retry_api`])
/// while the stream has no leader.
async fn replay_by_gets(
    stream: &jetstream::stream::Stream,
    options: &StreamOptions,
    last: u64,
) -> Result<Vec<Record>, StoreError> {
    let name = options.stream.as_str();
    let mut reads = futures_util::stream::iter(1..=last)
        .map(|sequence| async move {
            let message = retry_api(options, || stream.get_raw_message(sequence))
                .await
                .map_err(|e| engine(name, "replaying the stream", e))?;
            if message.sequence != sequence {
                return Err(replayed_out_of_order(name, message.sequence, sequence));
            }
            Ok(message)
        })
        .buffered(REPLAY_GETS_IN_FLIGHT);
    let mut records = Vec::with_capacity(usize::try_from(last).unwrap_or(0).min(1 << 20));
    while let Some(message) = reads.next().await {
        let message = message?;
        take_message(
            name,
            &mut records,
            message.sequence,
            Some(&message.headers),
            &message.payload,
        )?;
    }
    Ok(records)
}

fn message_id(writer: &str, first: u64) -> String {
    format!("{writer}-{first}")
}

fn publish_message(writer: &str, batch: &Batch) -> PublishMessage {
    let mut message = PublishMessage::build()
        .payload(batch.body.clone())
        .message_id(message_id(writer, batch.first()))
        .expected_last_sequence(batch.sequence - 1)
        .header(INDEX_HEADER, batch.first().to_string());
    if let Some(after) = &batch.after {
        message = message.expected_last_message_id(after);
    }
    match batch.records.len() {
        1 => message,
        k => message.header(RECORDS_HEADER, k.to_string()),
    }
}

/// Publishes in index order, without waiting for acknowledgements beyond the window.
struct Publisher {
    js: jetstream::Context,
    subject: String,
    writer: String,
    flights: mpsc::UnboundedSender<InFlight>,
    stats: Arc<JournalStats>,
    /// One permit per message that may be unacknowledged.
    window: Arc<Semaphore>,
    /// The largest message body of several records (the stream refuses larger messages, and
    /// counts their headers too).
    max_bytes: usize,
    next_sequence: u64,
    /// The id of the last message published.
    last_id: Option<String>,
    /// How long sending one message may take.
    ack_timeout: Duration,
    /// Once the journal failed, nothing more is published.
    progress: watch::Receiver<Progress>,
}

/// Room left in a message for its headers (message id, expectations, index, count).
const HEADER_ROOM: usize = 1024;

impl Publisher {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Pending>) {
        let mut carried: Option<Pending> = None;
        loop {
            let first = match carried.take() {
                Some(p) => p,
                None => match rx.recv().await {
                    Some(p) => p,
                    None => return,
                },
            };
            // While the window is full, the records appended meanwhile queue up: they go
            // together once a message is acknowledged.
            let Ok(window) = self.window.clone().acquire_owned().await else {
                return;
            };
            if let Some(e) = self.progress.borrow().failed.clone() {
                let _ = first.done.send(Err(e.clone()));
                while let Ok(next) = rx.try_recv() {
                    let _ = next.done.send(Err(e.clone()));
                }
                continue;
            }
            let mut bytes = first.payload.len();
            let mut records = vec![first];
            while let Ok(next) = rx.try_recv() {
                let framed = 4 * (records.len() + 1) + bytes + next.payload.len();
                if framed > self.max_bytes {
                    carried = Some(next);
                    break;
                }
                bytes += next.payload.len();
                records.push(next);
            }
            let body = if records.len() == 1 {
                records[0].payload.clone()
            } else {
                let mut body = BytesMut::with_capacity(bytes + 4 * records.len());
                for r in &records {
                    body.put_u32(r.payload.len() as u32);
                    body.put_slice(&r.payload);
                }
                body.freeze()
            };
            let batch = Batch {
                sequence: self.next_sequence,
                after: self.last_id.take(),
                records,
                body,
            };
            self.next_sequence += 1;
            self.last_id = Some(message_id(&self.writer, batch.first()));
            let ack = send(
                &self.js,
                &self.subject,
                publish_message(&self.writer, &batch),
                self.ack_timeout,
            )
            .await;
            self.stats.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
            self.stats.batches.fetch_add(1, Ordering::Relaxed);
            let sent = Instant::now();
            let flight = InFlight {
                batch,
                ack,
                sent,
                _window: window,
            };
            if self.flights.send(flight).is_err() {
                return;
            }
        }
    }
}

/// Reads acknowledgements in index order, resends what is in doubt, fails the journal on a
/// fence or after `retry_for`.
struct Acker {
    js: jetstream::Context,
    subject: String,
    writer: String,
    options: StreamOptions,
    progress: watch::Sender<Progress>,
    stats: Arc<JournalStats>,
    /// The previous message was stored only by a resend: this one's first attempt may have
    /// reached the stream before it and been refused for that.
    predecessor_retried: bool,
}

/// What one attempt came to.
enum Outcome {
    Stored,
    /// Refused because the stream's last message is not the one expected (`sequence - 1`, or
    /// the writer's previous message).
    WrongLast(String),
    /// No answer, or an answer that says "not now".
    InDoubt(String),
    /// An answer that will not change.
    Refused(String),
}

impl Acker {
    async fn run(mut self, mut flights: mpsc::UnboundedReceiver<InFlight>) {
        let mut failed: Option<StoreError> = None;
        let mut queue: VecDeque<InFlight> = VecDeque::new();
        loop {
            let flight = match queue.pop_front() {
                Some(f) => f,
                None => match flights.recv().await {
                    Some(f) => f,
                    None => return,
                },
            };
            if let Some(e) = &failed {
                flight.batch.settle(&Err(e.clone()));
                continue;
            }
            let index = flight.batch.first();
            let sequence = flight.batch.sequence;
            let first = match flight.ack {
                Ok(ack) => {
                    let left = self
                        .options
                        .ack_timeout
                        .saturating_sub(flight.sent.elapsed())
                        .max(Duration::from_millis(50));
                    match tokio::time::timeout(left, ack.into_future()).await {
                        Ok(answer) => outcome(sequence, answer),
                        Err(_) => Outcome::InDoubt(format!(
                            "no acknowledgement within {:?} of publishing",
                            self.options.ack_timeout
                        )),
                    }
                }
                Err(outcome) => outcome,
            };
            let result = match first {
                Outcome::Stored => {
                    self.predecessor_retried = false;
                    Ok(())
                }
                Outcome::WrongLast(reason) if !self.predecessor_retried => {
                    Err(self.fenced(index, &reason))
                }
                Outcome::Refused(reason) => Err(engine(
                    &self.options.stream,
                    &format!("append {index} refused"),
                    reason,
                )),
                Outcome::WrongLast(reason) | Outcome::InDoubt(reason) => {
                    self.resend(&flight.batch, reason).await
                }
            };
            match result {
                Ok(()) => {
                    let last = flight.batch.last();
                    self.progress.send_modify(|p| p.acked = last);
                    flight.batch.settle(&Ok(()));
                }
                Err(e) => {
                    tracing::error!(stream = %self.options.stream, index, error = %e,
                        "stream journal failed; it takes no more appends");
                    self.progress.send_modify(|p| p.failed = Some(e.clone()));
                    flight.batch.settle(&Err(e.clone()));
                    failed = Some(e);
                    // Whatever was published after it is answered with the same error.
                    while let Ok(f) = flights.try_recv() {
                        queue.push_back(f);
                    }
                }
            }
        }
    }

    fn fenced(&self, index: u64, reason: &str) -> StoreError {
        StoreError::Fenced {
            stream: self.options.stream.clone(),
            index,
            reason: reason.to_owned(),
        }
    }

    /// Sends an append again (same message id, same expectation) until JetStream answers
    /// for sure or `retry_for` has passed.
    async fn resend(&mut self, batch: &Batch, mut reason: String) -> Result<(), StoreError> {
        let index = batch.first();
        let deadline = Instant::now() + self.options.retry_for;
        let mut wait = Duration::from_millis(20);
        loop {
            if Instant::now() >= deadline {
                return Err(engine(
                    &self.options.stream,
                    &format!(
                        "append {index} still in doubt after {:?}",
                        self.options.retry_for
                    ),
                    reason,
                ));
            }
            tracing::debug!(stream = %self.options.stream, index, %reason, "resending an append in doubt");
            self.stats.resends.fetch_add(1, Ordering::Relaxed);
            let sent = send(
                &self.js,
                &self.subject,
                publish_message(&self.writer, batch),
                self.options.ack_timeout,
            )
            .await;
            let attempt = match sent {
                Ok(ack) => outcome(batch.sequence, ack.await),
                Err(outcome) => outcome,
            };
            match attempt {
                Outcome::Stored => {
                    self.predecessor_retried = true;
                    return Ok(());
                }
                // A resend carries the message id of the first attempt: had that been stored,
                // the duplicate window would have answered with its sequence. So the stream
                // moved on without this writer.
                Outcome::WrongLast(r) => return Err(self.fenced(index, &r)),
                Outcome::Refused(r) => {
                    return Err(engine(
                        &self.options.stream,
                        &format!("append {index} refused"),
                        r,
                    ));
                }
                Outcome::InDoubt(r) => reason = r,
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_millis(500));
        }
    }
}

/// Publishes `message`, bounded in time: sending waits for room in the client's buffers (and
/// for an acknowledgement slot), which a connection being re-made can hold up indefinitely.
async fn send(
    js: &jetstream::Context,
    subject: &str,
    message: PublishMessage,
    timeout: Duration,
) -> Result<jetstream::context::PublishAckFuture, Outcome> {
    match tokio::time::timeout(timeout, js.send_publish(subject.to_owned(), message)).await {
        Ok(Ok(ack)) => Ok(ack),
        Ok(Err(e)) => Err(publish_outcome(&e)),
        Err(_) => Err(Outcome::InDoubt(format!(
            "the message could not be sent within {timeout:?}"
        ))),
    }
}

fn outcome(
    sequence: u64,
    ack: Result<jetstream::publish::PublishAck, jetstream::context::PublishError>,
) -> Outcome {
    match ack {
        Ok(ack) if ack.sequence == sequence => Outcome::Stored,
        Ok(ack) => Outcome::Refused(format!(
            "stored as message {} where {sequence} was expected",
            ack.sequence
        )),
        Err(e) => publish_outcome(&e),
    }
}

fn publish_outcome(e: &jetstream::context::PublishError) -> Outcome {
    match e.kind() {
        PublishErrorKind::WrongLastSequence | PublishErrorKind::WrongLastMessageId => {
            Outcome::WrongLast(e.to_string())
        }
        PublishErrorKind::TimedOut
        | PublishErrorKind::BrokenPipe
        | PublishErrorKind::StreamNotFound
        | PublishErrorKind::MaxAckPending => Outcome::InDoubt(e.to_string()),
        PublishErrorKind::MaxPayloadExceeded => Outcome::Refused(e.to_string()),
        // "JetStream not currently available", "no leader" and the like come as API errors
        // of kind Other: in doubt, and resent until `retry_for` is up.
        _ => Outcome::InDoubt(e.to_string()),
    }
}

/// 64 random bits (the standard library seeds each `RandomState` from the OS).
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{DeleteStreams, nats_up, nats_url, unique_stream};

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, *v);
        }
        h
    }

    /// A message is one record, or several framed; what does not add up is an error.
    #[test]
    fn messages_unpack_into_their_records() {
        let one = Bytes::from_static(b"alone");
        // Written before batching: the record's index is the message's sequence.
        let old = unpack(7, None, &one).unwrap();
        assert_eq!((old.len(), old[0].index, &old[0].payload), (1, 7, &one));
        let single = unpack(3, Some(&headers(&[(INDEX_HEADER, "9")])), &one).unwrap();
        assert_eq!((single.len(), single[0].index), (1, 9));

        let mut framed = BytesMut::new();
        for r in [&b"ab"[..], b"", b"xyz"] {
            framed.put_u32(r.len() as u32);
            framed.put_slice(r);
        }
        let framed = framed.freeze();
        let three = headers(&[(INDEX_HEADER, "10"), (RECORDS_HEADER, "3")]);
        let records = unpack(4, Some(&three), &framed).unwrap();
        let got: Vec<_> = records
            .iter()
            .map(|r| (r.index, r.payload.as_ref()))
            .collect();
        assert_eq!(got, vec![(10, &b"ab"[..]), (11, b""), (12, b"xyz")]);

        let four = headers(&[(INDEX_HEADER, "10"), (RECORDS_HEADER, "4")]);
        assert!(
            unpack(4, Some(&four), &framed)
                .unwrap_err()
                .contains("ends inside record 3")
        );
        let two = headers(&[(INDEX_HEADER, "10"), (RECORDS_HEADER, "2")]);
        assert!(
            unpack(4, Some(&two), &framed)
                .unwrap_err()
                .contains("bytes after its 2 records")
        );
        let cut = framed.slice(..framed.len() - 1);
        assert!(unpack(4, Some(&three), &cut).is_err());
        for bad in [
            headers(&[(INDEX_HEADER, "0")]),
            headers(&[(INDEX_HEADER, "x")]),
            headers(&[(INDEX_HEADER, "1"), (RECORDS_HEADER, "0")]),
            headers(&[(INDEX_HEADER, "1"), (RECORDS_HEADER, "-1")]),
        ] {
            assert!(unpack(4, Some(&bad), &framed).is_err(), "{bad:?}");
        }
    }

    /// A stream written one record per message without headers (as before records were
    /// grouped) replays, and appends go on after it.
    #[tokio::test]
    async fn a_stream_of_single_records_without_headers_replays() {
        if !nats_up("a_stream_of_single_records_without_headers_replays") {
            return;
        }
        let name = unique_stream("plain");
        let _guard = DeleteStreams::new(vec![name.clone()]);
        let options = StreamOptions::parse(&nats_url(), &name).unwrap();
        let (_client, js) = connect(&options).await.unwrap();
        open_stream(&js, &options).await.unwrap();
        for i in 1..=3u64 {
            let ack = js
                .send_publish(
                    options.subject(),
                    PublishMessage::build()
                        .payload(Bytes::from(format!("old {i}")))
                        .expected_last_sequence(i - 1),
                )
                .await
                .unwrap();
            assert_eq!(ack.await.unwrap().sequence, i);
        }
        let (journal, recovered) = StreamJournal::open(options.clone()).await.unwrap();
        assert_eq!(recovered.records.len(), 3);
        assert_eq!(journal.append("new").unwrap().await.unwrap(), 4);
        journal.close().await.unwrap();
        let (journal, recovered) = StreamJournal::open(options).await.unwrap();
        let got: Vec<_> = recovered
            .records
            .iter()
            .map(|r| (r.index, String::from_utf8_lossy(&r.payload).into_owned()))
            .collect();
        assert_eq!(
            got,
            vec![
                (1, "old 1".to_owned()),
                (2, "old 2".to_owned()),
                (3, "old 3".to_owned()),
                (4, "new".to_owned())
            ]
        );
        journal.close().await.unwrap();
    }

    /// Both ways of replaying read the same records, in order.
    #[tokio::test]
    async fn reading_message_by_message_replays_what_the_consumer_replays() {
        if !nats_up("reading_message_by_message_replays_what_the_consumer_replays") {
            return;
        }
        let name = unique_stream("gets");
        let _guard = DeleteStreams::new(vec![name.clone()]);
        let mut options = StreamOptions::parse(&nats_url(), &name).unwrap();
        options.max_in_flight = 2;
        let (journal, _) = StreamJournal::open(options.clone()).await.unwrap();
        let appended: Vec<_> = (0..300)
            .map(|i| journal.append(format!("record {i}")).unwrap())
            .collect();
        futures_util::future::try_join_all(appended).await.unwrap();
        journal.close().await.unwrap();

        let (_client, js) = connect(&options).await.unwrap();
        let (stream, info) = open_stream(&js, &options).await.unwrap();
        let last = info.state.last_sequence;
        let by_gets = replay_by_gets(&stream, &options, last).await.unwrap();
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
            .await
            .unwrap();
        let by_consumer = replay_by_consumer(consumer, &options, last).await.unwrap();
        assert_eq!(by_gets.len(), 300);
        assert_eq!(by_consumer.len(), 300);
        for (i, (a, b)) in by_gets.iter().zip(&by_consumer).enumerate() {
            assert_eq!((a.index, &a.payload), (b.index, &b.payload));
            assert_eq!(a.index, i as u64 + 1);
            assert_eq!(a.payload, format!("record {i}").as_bytes());
        }
    }
}
