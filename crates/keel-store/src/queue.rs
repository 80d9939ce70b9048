//! A durable message queue on the journal: what is pushed survives a crash until a consumer
//! acknowledges it, and a message whose consumer dies before acknowledging is delivered again.
//!
//! - [`DurableQueue::push`] returns once the message is in the journal (as durable as the sync
//!   policy promises); only then can consumers see it. (A snapshot taken meanwhile includes
//!   it, since its record precedes the snapshot's index.)
//! - [`DurableQueue::pop`] hands out the oldest message not leased to another consumer and
//!   leases it for a while; [`DurableQueue::ack`] removes it for good (journaled). A lease
//!   that runs out, or [`DurableQueue::nack`], makes the message available again, and a
//!   restart makes every unacknowledged message available again: delivery is at least once,
//!   so consumers must be idempotent (`Delivery::redelivered` tells them when to look).
//! - Every `snapshot_every` acknowledgements the pending messages are written as a snapshot
//!   and the journal before it is dropped, so the journal does not grow without bound.
//!
//! Records: a push is `1, seq (u64 LE), payload`; an ack is `2, seq (u64 LE)`. A snapshot is
//! `next_seq (u64 LE)`, then per message `seq (u64 LE), length (u32 LE), payload`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::{Journal, JournalOptions, StoreError};

const PUSH: u8 = 1;
const ACK: u8 = 2;

/// A message handed to a consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The message's sequence number (from 1, in push order); acknowledge it with this.
    pub seq: u64,
    /// What was pushed.
    pub payload: Bytes,
    /// Whether it was handed out before (its lease ran out, it was nacked, or the queue
    /// restarted): the consumer may have acted on it already.
    pub redelivered: bool,
    /// Which handing-out of the message this is (from 1, since the queue was opened);
    /// [`DurableQueue::nack`] with a stale attempt does nothing.
    pub attempt: u32,
}

/// Makes a pushed message visible if its `push` is abandoned while the record is written.
struct Settle<'a> {
    queue: &'a DurableQueue,
    seq: u64,
    done: bool,
}

impl Drop for Settle<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.queue.state.lock().unsettled.remove(&self.seq);
            self.queue.ready.notify_one();
        }
    }
}

#[derive(Debug, Default)]
struct State {
    /// Pushed and not acknowledged, by sequence number.
    messages: BTreeMap<u64, Bytes>,
    /// Leased messages and when their lease ends.
    leased: HashMap<u64, Instant>,
    /// Messages handed out at least once (since the queue was opened, or before it).
    delivered: std::collections::HashSet<u64>,
    /// Pushed messages whose record is not durable yet: in `messages` (so a snapshot taken
    /// meanwhile keeps them) but not handed out.
    unsettled: std::collections::HashSet<u64>,
    /// Times each pending message was handed out since the queue was opened.
    attempts: HashMap<u64, u32>,
    next_seq: u64,
    acks_since_snapshot: u64,
}

/// A journal-backed queue.
#[derive(Debug)]
pub struct DurableQueue {
    journal: Journal,
    state: Mutex<State>,
    ready: Notify,
    snapshot_every: u64,
}

fn corrupt(dir: &Path, index: u64, reason: &str) -> StoreError {
    StoreError::Corrupt {
        file: dir.to_owned(),
        offset: index,
        reason: format!("queue record {index}: {reason}"),
    }
}

impl DurableQueue {
    /// Opens (or creates) the queue in `dir`; every message not acknowledged before is
    /// pending again (and marked redelivered). Blocking; call it at start-up or from
    /// `spawn_blocking`.
    pub fn open(
        dir: impl AsRef<Path>,
        options: JournalOptions,
        snapshot_every: u64,
    ) -> Result<DurableQueue, StoreError> {
        let dir = dir.as_ref();
        let (journal, recovered) = Journal::open(dir, options)?;
        let mut state = State {
            next_seq: 1,
            ..State::default()
        };
        if let Some(snapshot) = &recovered.snapshot {
            let mut data = snapshot.data.clone();
            let bad = || corrupt(dir, snapshot.index, "snapshot cut short");
            if data.remaining() < 8 {
                return Err(bad());
            }
            state.next_seq = data.get_u64_le();
            while data.has_remaining() {
                if data.remaining() < 12 {
                    return Err(bad());
                }
                let seq = data.get_u64_le();
                let len = data.get_u32_le() as usize;
                if data.remaining() < len {
                    return Err(bad());
                }
                state.messages.insert(seq, data.split_to(len));
            }
        }
        for record in &recovered.records {
            let mut p = record.payload.clone();
            if p.remaining() < 9 {
                return Err(corrupt(dir, record.index, "too short"));
            }
            let tag = p.get_u8();
            let seq = p.get_u64_le();
            match tag {
                PUSH => {
                    state.messages.insert(seq, p);
                    state.next_seq = state.next_seq.max(seq + 1);
                }
                ACK => {
                    state.messages.remove(&seq);
                }
                other => return Err(corrupt(dir, record.index, &format!("tag {other}"))),
            }
        }
        // Whatever is still pending may have been handed out before the restart.
        state.delivered = state.messages.keys().copied().collect();
        Ok(DurableQueue {
            journal,
            state: Mutex::new(state),
            ready: Notify::new(),
            snapshot_every: snapshot_every.max(1),
        })
    }

    /// Appends a message; returns its sequence number once it is durable.
    pub async fn push(&self, payload: impl Into<Bytes>) -> Result<u64, StoreError> {
        let payload = payload.into();
        let (seq, appended) = {
            let mut state = self.state.lock();
            let seq = state.next_seq;
            let mut record = BytesMut::with_capacity(9 + payload.len());
            record.put_u8(PUSH);
            record.put_u64_le(seq);
            record.put_slice(&payload);
            let appended = self.journal.append(record.freeze())?;
            state.next_seq += 1;
            state.messages.insert(seq, payload);
            state.unsettled.insert(seq);
            (seq, appended)
        };
        // If the caller stops waiting, the record is still written: the guard makes the
        // message visible then (a failed write stops the journal, and the queue, anyway).
        let mut settle = Settle {
            queue: self,
            seq,
            done: false,
        };
        let result = appended.await;
        settle.done = true;
        let mut state = self.state.lock();
        state.unsettled.remove(&seq);
        if let Err(e) = result {
            state.messages.remove(&seq);
            return Err(e);
        }
        drop(state);
        self.ready.notify_one();
        Ok(seq)
    }

    /// The oldest message not leased to another consumer, leased to this one for `lease`;
    /// waits for one if there is none.
    pub async fn pop(&self, lease: Duration) -> Delivery {
        loop {
            let notified = self.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let next_expiry = {
                let mut state = self.state.lock();
                let now = Instant::now();
                let free = state
                    .messages
                    .iter()
                    .find(|(seq, _)| {
                        !state.unsettled.contains(seq)
                            && state.leased.get(seq).is_none_or(|until| *until <= now)
                    })
                    .map(|(seq, payload)| (*seq, payload.clone()));
                if let Some((seq, payload)) = free {
                    let until = now
                        .checked_add(lease)
                        .unwrap_or(now + Duration::from_secs(86_400));
                    state.leased.insert(seq, until);
                    let redelivered = !state.delivered.insert(seq);
                    let attempt = state.attempts.entry(seq).or_insert(0);
                    *attempt += 1;
                    let attempt = *attempt;
                    drop(state);
                    // Consumers waiting with no lease to time them now have one: wake them, so
                    // each sleeps until the earliest lease ends.
                    self.ready.notify_waiters();
                    return Delivery {
                        seq,
                        payload,
                        redelivered,
                        attempt,
                    };
                }
                state.leased.values().min().copied()
            };
            match next_expiry {
                Some(at) => {
                    tokio::select! {
                        () = &mut notified => {}
                        () = tokio::time::sleep_until(at) => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    /// Removes a message for good; false if it was not pending (acknowledged before).
    pub async fn ack(&self, seq: u64) -> Result<bool, StoreError> {
        let (appended, snapshot) = {
            let mut state = self.state.lock();
            if !state.messages.contains_key(&seq) {
                return Ok(false);
            }
            let mut record = BytesMut::with_capacity(9);
            record.put_u8(ACK);
            record.put_u64_le(seq);
            let appended = self.journal.append(record.freeze())?;
            state.messages.remove(&seq);
            state.leased.remove(&seq);
            state.delivered.remove(&seq);
            state.attempts.remove(&seq);
            state.acks_since_snapshot += 1;
            // Every so often, the pending messages as a snapshot (taken under the lock, so it
            // matches the journal up to the index of this ack exactly).
            let snapshot = (state.acks_since_snapshot >= self.snapshot_every).then(|| {
                state.acks_since_snapshot = 0;
                let mut data = BytesMut::new();
                data.put_u64_le(state.next_seq);
                for (seq, payload) in &state.messages {
                    data.put_u64_le(*seq);
                    data.put_u32_le(payload.len() as u32);
                    data.put_slice(payload);
                }
                (appended.index, data.freeze())
            });
            (appended, snapshot)
        };
        appended.await?;
        if let Some((index, data)) = snapshot
            && let Err(e) = self.journal.snapshot(index, data).await
        {
            tracing::warn!(error = %e, "queue snapshot failed; the journal keeps growing");
        }
        Ok(true)
    }

    /// Gives a leased message back at once (the consumer could not handle it now). A
    /// `delivery` whose lease already went to another consumer is ignored.
    pub fn nack(&self, delivery: &Delivery) {
        let mut state = self.state.lock();
        if state.attempts.get(&delivery.seq) == Some(&delivery.attempt)
            && state.leased.remove(&delivery.seq).is_some()
        {
            drop(state);
            self.ready.notify_one();
        }
    }

    /// Messages pushed and not acknowledged (leased ones included).
    pub fn len(&self) -> usize {
        self.state.lock().messages.len()
    }

    /// Whether no message is pending.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
