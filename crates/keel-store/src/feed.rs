//! A journal stream read as a queue: a durable JetStream consumer that hands a stream
//! journal's records to whoever follows it (the scale-out twin of [`DurableQueue`](crate::DurableQueue)).
//!
//! - **Durable.** The consumer lives in JetStream under its name, so a follower that restarts
//!   goes on from the first record it had not acknowledged, and several processes that open
//!   the same name share the records between them.
//! - **At least once.** A record is delivered again when its acknowledgement does not come
//!   within `ack_wait` (the process died, or was cut off): the follower must take each record
//!   idempotently, and acknowledge it only once what it made of it is durable.
//! - **Backlog.** [`StreamFeed::backlog`] counts the messages not yet delivered plus those
//!   delivered and not yet acknowledged: zero means the follower has taken in everything
//!   stored so far.
//! - **Messages of several records.** A journal message may hold several records (group
//!   commit); they are delivered together, in one [`StreamFeed::next`], and acknowledged
//!   together, with the last of them.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use futures_util::StreamExt;

use crate::StoreError;
use crate::stream::{StreamOptions, connect, engine, open_stream, retry_api, unpack};

/// How much longer than a pull request's own expiry the client waits for its end.
const PULL_GRACE: Duration = Duration::from_secs(2);

/// One record of the stream, delivered to this follower.
#[derive(Debug)]
pub struct FeedRecord {
    /// Its index in the journal.
    pub index: u64,
    /// How many times it has been delivered (1 the first time).
    pub delivered: i64,
    /// The record.
    pub payload: Bytes,
    /// The message that holds it, acknowledged with its last record.
    message: Option<Arc<jetstream::Message>>,
}

/// A durable consumer of a journal stream.
pub struct StreamFeed {
    client: async_nats::Client,
    consumer: jetstream::consumer::Consumer<jetstream::consumer::pull::Config>,
    stream: String,
}

impl std::fmt::Debug for StreamFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamFeed")
            .field("stream", &self.stream)
            .finish()
    }
}

impl StreamFeed {
    /// Opens (creating if needed) the consumer `durable` of the journal stream in `options`
    /// (the stream too, if its writer has not made it yet), delivering every record from the
    /// first; a record not acknowledged within `ack_wait` is delivered again.
    pub async fn open(
        options: &StreamOptions,
        durable: &str,
        ack_wait: Duration,
    ) -> Result<StreamFeed, StoreError> {
        crate::stream::check_name("consumer name", durable)?;
        let (client, js) = connect(options).await?;
        let (stream, _) = open_stream(&js, options).await?;
        let config = jetstream::consumer::pull::Config {
            durable_name: Some(durable.to_owned()),
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait,
            max_ack_pending: 20_000,
            ..Default::default()
        };
        let consumer = retry_api(options, || {
            stream.get_or_create_consumer(durable, config.clone())
        })
        .await
        .map_err(|e| engine(&options.stream, "creating the consumer", e))?;
        Ok(StreamFeed {
            client,
            consumer,
            stream: options.stream.clone(),
        })
    }

    /// The records of the next messages, at most `max` messages, waiting up to `wait` for the
    /// first; an empty list when none came. Returns as soon as something is there (records
    /// are not held back to fill a batch, where their acknowledgement wait would run out).
    pub async fn next(&self, max: usize, wait: Duration) -> Result<Vec<FeedRecord>, StoreError> {
        let max = max.max(1);
        let mut records = self.pull(max, None).await?;
        if records.is_empty() {
            records = self
                .pull(1, Some(wait.max(Duration::from_millis(10))))
                .await?;
            if !records.is_empty() && max > 1 {
                records.extend(self.pull(max - 1, None).await?);
            }
        }
        Ok(records)
    }

    /// Up to `max` records: those there now (`wait` none), or waiting up to `wait` for `max`.
    async fn pull(
        &self,
        max: usize,
        wait: Option<Duration>,
    ) -> Result<Vec<FeedRecord>, StoreError> {
        let fetched = match wait {
            None => self.consumer.fetch().max_messages(max).messages().await,
            Some(wait) => {
                self.consumer
                    .batch()
                    .max_messages(max)
                    .expires(wait)
                    .messages()
                    .await
            }
        };
        let mut batch = fetched.map_err(|e| engine(&self.stream, "fetching records", e))?;
        let mut records = Vec::new();
        // A pull request whose server died is never answered: the client gives up on it a
        // little after the server would have, keeping what came.
        let patience = wait.unwrap_or_default() + PULL_GRACE;
        tokio::time::timeout(patience, async {
            while let Some(message) = batch.next().await {
                let message = message.map_err(|e| engine(&self.stream, "fetching records", e))?;
                let info = message
                    .info()
                    .map_err(|e| engine(&self.stream, "reading a record's place", e))?;
                let (sequence, delivered) = (info.stream_sequence, info.delivered);
                let message = Arc::new(message);
                match unpack(sequence, message.headers.as_ref(), &message.payload) {
                    Ok(unpacked) => {
                        let last = unpacked.len() - 1;
                        records.extend(unpacked.into_iter().enumerate().map(|(k, r)| FeedRecord {
                            index: r.index,
                            delivered,
                            payload: r.payload,
                            message: (k == last).then(|| message.clone()),
                        }));
                    }
                    // Unreadable as a whole: handed over as one record that no reader will
                    // understand, to be logged and acknowledged.
                    Err(e) => {
                        tracing::error!(stream = %self.stream, sequence, error = %e,
                            "a journal message cannot be unpacked");
                        records.push(FeedRecord {
                            index: 0,
                            delivered,
                            payload: message.payload.clone(),
                            message: Some(message),
                        });
                    }
                }
            }
            Ok::<(), StoreError>(())
        })
        .await
        .unwrap_or(Ok(()))
        .or_else(|e| if records.is_empty() { Err(e) } else { Ok(()) })?;
        Ok(records)
    }

    /// Acknowledges `records` (what was made of them is durable) and waits until the server
    /// has the acknowledgements; an acknowledgement lost on the way only means a redelivery.
    /// A message of several records is acknowledged with its last record: acknowledge the
    /// records of one [`next`](StreamFeed::next) together.
    pub async fn ack(&self, records: &[FeedRecord]) -> Result<(), StoreError> {
        for message in records.iter().filter_map(|r| r.message.as_ref()) {
            message
                .ack()
                .await
                .map_err(|e| engine(&self.stream, "acknowledging a record", e))?;
        }
        self.client
            .flush()
            .await
            .map_err(|e| engine(&self.stream, "acknowledging records", e))
    }

    /// Messages not yet delivered plus messages delivered and not yet acknowledged.
    pub async fn backlog(&self) -> Result<u64, StoreError> {
        let info = self
            .consumer
            .get_info()
            .await
            .map_err(|e| engine(&self.stream, "reading the consumer's state", e))?;
        Ok(info.num_pending + info.num_ack_pending as u64)
    }

    /// The stream followed.
    pub fn stream(&self) -> &str {
        &self.stream
    }
}
