//! Several chat instances as one chat: every room has one owner among them, and members on
//! any instance see its messages.
//!
//! The owner of a room is chosen by rendezvous hashing over the configured names of the
//! instances, so every instance agrees on it without asking anyone, and it stays the same
//! across restarts: the owner numbers the room's messages, journals them and keeps their
//! history, as a lone instance does. A connection in a room owned elsewhere is served by its
//! own instance, which forwards the connection's requests to the owner and receives the
//! room's messages from it:
//!
//! - *requests* (`join`, `leave`, `send`, `presence`, `history`) go to the owner with the
//!   connection's user; the owner counts the members of each instance and answers the
//!   connection through the link (`ack`, errors, `joined`, lists).
//! - *events*: the owner sends each message of a room (with its number) and each member
//!   change to every instance with members in it, in order, over the one link to that
//!   instance; the instance hands them to its connections in the room (a "mirror" of it).
//! - A mirror that sees a number skip (frames lost when a link broke or its queue
//!   overflowed) asks the owner for what follows its last number (`sync`) and drops events
//!   until the answer; the answer carries the missed messages, delivered in order. When the
//!   owner no longer has them, the mirror's connections are closed with 4010, and the
//!   client's `join` with `since` says so (`recovered: false`): never a silent gap.
//! - Each instance greets the others every second (`hello`, with the instance's epoch, new
//!   at each start, and its link session, new at each reconnection). An instance that
//!   restarted, or went unheard for `peer_timeout`, loses its members in the rooms owned
//!   elsewhere (they leave); when it is heard again, each side sends the other what it
//!   needs to resume (`reset`, then `sync` of every mirrored room, which sets the
//!   instance's members and recovers the messages it missed).
//! - A request to an owner that does not answer within `request_timeout` (or that is known
//!   to be down, or is heard again after a restart while the request waits) is answered
//!   with the error `unavailable`; a send may then be repeated with the same
//!   `client_msg_id` and is not delivered twice.
//!
//! The links themselves (direct WebSockets between the instances, or NATS subjects) are in
//! [`crate::transport`]; this module only needs each to deliver one instance's lines to
//! another in order.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::hub::{Hub, JoinRefused, Peer, Place, Target, Who};
use crate::protocol::{self, code, to_frame};
use crate::ws::close;

/// A frame for clients, carried inside a line as the JSON it is (not as an escaped string).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub(crate) struct Frame(Box<serde_json::value::RawValue>);

impl Frame {
    /// The frame's text, shared by its recipients.
    pub(crate) fn text(&self) -> Arc<str> {
        Arc::from(self.0.get())
    }
}

impl From<&Arc<str>> for Frame {
    fn from(frame: &Arc<str>) -> Frame {
        // Frames are JSON this server wrote.
        Frame(
            serde_json::value::RawValue::from_string(frame.to_string())
                .unwrap_or_else(|_| serde_json::value::RawValue::NULL.to_owned()),
        )
    }
}

impl PartialEq for Frame {
    fn eq(&self, other: &Frame) -> bool {
        self.0.get() == other.0.get()
    }
}

impl Eq for Frame {}

/// What instances tell each other: one JSON object per line, `{"<kind>":{…}}` (externally
/// tagged: the frames inside are raw JSON, which an internally tagged enum cannot carry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Relay {
    /// "I am here": sent first on a link and every second.
    Hello {
        from: String,
        epoch: u64,
        session: u64,
    },
    /// "Send me the `sync` of every room of mine you mirror."
    Reset { from: String },
    Join {
        from: String,
        req: u64,
        conn: u64,
        user: String,
        room: String,
        since: Option<u64>,
        again: bool,
    },
    Leave {
        from: String,
        user: String,
        room: String,
    },
    /// The sender's connections per user in a room, and its last number there.
    Sync {
        from: String,
        room: String,
        users: Vec<(String, u32)>,
        since: u64,
    },
    Send {
        from: String,
        req: u64,
        conn: u64,
        user: String,
        room: String,
        to: Option<String>,
        text: String,
        client_msg_id: String,
    },
    Presence {
        from: String,
        req: u64,
        conn: u64,
        room: String,
    },
    History {
        from: String,
        req: u64,
        conn: u64,
        room: String,
        before: Option<u64>,
        limit: Option<usize>,
    },
    /// The answer to a `join`: the connection's `joined` frame.
    Joined {
        req: u64,
        room: String,
        last_msg_id: u64,
        frame: Frame,
    },
    /// The answer to a `sync`: the messages after its `since`.
    Synced {
        room: String,
        last_msg_id: u64,
        recovered: bool,
        missed: Vec<(u64, Frame)>,
    },
    /// A message of a room.
    Msg {
        room: String,
        msg_id: u64,
        frame: Frame,
    },
    /// A member change of a room.
    Member { room: String, frame: Frame },
    /// A frame for the connection that made request `req`.
    Conn { req: u64, conn: u64, frame: Frame },
    /// A direct message, for the connections of these users.
    Users { users: Vec<String>, frame: Frame },
}

impl Relay {
    /// The line that carries it.
    pub(crate) fn line(&self) -> Arc<str> {
        to_frame(self)
    }
}

/// Frames queued for one other instance before its link counts as broken (and is resynced).
const OUTBOX_FRAMES: usize = 256 * 1024;
/// Bytes queued for one other instance before its link counts as broken.
const OUTBOX_BYTES: usize = 64 << 20;

/// Settings of the links between instances.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// This instance's name.
    pub me: String,
    /// Every instance's name, this one's included.
    pub names: Vec<String>,
    /// A request unanswered this long is answered with `unavailable`.
    pub request_timeout: Duration,
    /// An instance unheard this long counts as down: its members leave.
    pub peer_timeout: Duration,
    /// Most bytes of messages in one answer that crosses to another instance (`joined` with
    /// `since`, `history`, `synced`): as on one instance over direct links, less over NATS,
    /// whose messages hold 1 MiB.
    pub list_bytes: usize,
}

/// This instance's view of the others: who owns which room, what is on its way to each,
/// and the rooms owned elsewhere in which its connections are.
#[derive(Debug)]
pub struct Links {
    me: Arc<str>,
    /// New at each start: tells the others this instance restarted.
    epoch: u64,
    names: Vec<Arc<str>>,
    outboxes: FxHashMap<Arc<str>, Arc<Peer>>,
    request_timeout: Duration,
    peer_timeout: Duration,
    list_bytes: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Rooms owned elsewhere with connections here.
    mirrors: FxHashMap<String, Mirror>,
    /// Joins sent and not yet answered: (connection, room) to request.
    joining: FxHashMap<(u64, String), u64>,
    requests: FxHashMap<u64, Request>,
    peers: FxHashMap<Arc<str>, PeerState>,
    next_req: u64,
}

/// A room owned elsewhere, as this instance's connections in it see it.
#[derive(Debug)]
struct Mirror {
    owner: Arc<str>,
    /// Connections in the room, each with the number after which its messages start.
    subscribers: FxHashMap<u64, (Arc<Peer>, u64)>,
    /// The last number handed to the connections.
    last: u64,
    /// A `sync` is on its way (sent then): events wait for its answer.
    resyncing: Option<Instant>,
}

#[derive(Debug)]
struct Request {
    peer: Arc<Peer>,
    owner: Arc<str>,
    deadline: Instant,
    /// What the connection gets when no answer comes.
    on_timeout: Arc<str>,
    /// The room, for a join.
    join: Option<String>,
}

#[derive(Debug, Default)]
struct PeerState {
    epoch: u64,
    session: u64,
    last_heard: Option<Instant>,
    dead: bool,
}

/// Why the links' settings were refused.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// A name NATS subjects and the registry cannot carry.
    #[error("instance name {0:?}: use 1 to 64 of A-Z, a-z, 0-9, '-' and '_'")]
    BadName(String),
    /// This instance is not among the names.
    #[error("this instance ({0}) is not among the chat's instances")]
    NotListed(String),
    /// A name given twice.
    #[error("instance {0} is listed twice")]
    Twice(String),
}

/// Checks an instance name: it becomes a NATS subject token and a registry label.
pub fn check_instance_name(name: &str) -> Result<(), LinkError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(LinkError::BadName(name.to_owned()))
    }
}

impl Links {
    /// Links of instance `config.me` among `config.names`.
    pub fn new(config: &LinkConfig) -> Result<Links, LinkError> {
        let mut names: Vec<Arc<str>> = Vec::new();
        for name in &config.names {
            check_instance_name(name)?;
            if names.iter().any(|n| **n == **name) {
                return Err(LinkError::Twice(name.clone()));
            }
            names.push(Arc::from(name.as_str()));
        }
        let me = names
            .iter()
            .find(|n| ***n == *config.me)
            .cloned()
            .ok_or_else(|| LinkError::NotListed(config.me.clone()))?;
        let outboxes = names
            .iter()
            .filter(|n| **n != me)
            .map(|n| {
                (
                    n.clone(),
                    Peer::new(0, n.clone(), OUTBOX_FRAMES, OUTBOX_BYTES),
                )
            })
            .collect();
        Ok(Links {
            me,
            epoch: rand::random::<u64>() | 1,
            names,
            outboxes,
            request_timeout: config.request_timeout,
            peer_timeout: config.peer_timeout,
            list_bytes: config.list_bytes,
            state: Mutex::new(State {
                // Numbers of another life of this instance must not match this one's.
                next_req: rand::random::<u64>() >> 1,
                ..State::default()
            }),
        })
    }

    /// This instance's name.
    pub fn me(&self) -> &Arc<str> {
        &self.me
    }

    /// Most bytes of messages in one answer to another instance.
    pub(crate) fn list_bytes(&self) -> usize {
        self.list_bytes
    }

    /// The other instances and their outgoing queues.
    pub(crate) fn outboxes(&self) -> impl Iterator<Item = (&Arc<str>, &Arc<Peer>)> {
        self.outboxes.iter()
    }

    /// The instance that owns room `room`: the highest of a hash of each name with the room.
    pub fn owner(&self, room: &str) -> &Arc<str> {
        self.names
            .iter()
            .max_by_key(|name| score(name, room))
            .unwrap_or(&self.me)
    }

    /// The greeting that opens a link of `session` (and is repeated every second on it).
    pub(crate) fn hello(&self, session: u64) -> Arc<str> {
        Relay::Hello {
            from: self.me.to_string(),
            epoch: self.epoch,
            session,
        }
        .line()
    }

    /// Queues a line for `instance`.
    pub(crate) fn post(&self, instance: &str, line: Arc<str>) {
        if let Some(outbox) = self.outboxes.get(instance) {
            outbox.send(line);
        }
    }

    /// Queues a line for every other instance.
    pub(crate) fn post_all(&self, line: Arc<str>) {
        for outbox in self.outboxes.values() {
            outbox.send(line.clone());
        }
    }

    fn name(&self, name: &str) -> Option<Arc<str>> {
        self.names.iter().find(|n| ***n == *name).cloned()
    }

    /// Registers a request of `peer` to `owner`; `None` (and `on_timeout` sent at once) when
    /// the owner is known to be down.
    fn request(
        &self,
        st: &mut State,
        peer: &Arc<Peer>,
        owner: &Arc<str>,
        on_timeout: Arc<str>,
        join: Option<&str>,
    ) -> Option<u64> {
        if st.peers.get(owner).is_some_and(|p| p.dead) {
            peer.send(on_timeout);
            return None;
        }
        st.next_req += 1;
        let req = st.next_req;
        st.requests.insert(
            req,
            Request {
                peer: peer.clone(),
                owner: owner.clone(),
                deadline: Instant::now() + self.request_timeout,
                on_timeout,
                join: join.map(str::to_owned),
            },
        );
        Some(req)
    }

    /// A connection here joins a room `owner` holds. A join while one is on its way is
    /// answered by that one; a join of a room the connection is in asks for its answer again.
    pub(crate) fn join(&self, peer: &Arc<Peer>, room: &str, since: Option<u64>, owner: &Arc<str>) {
        let mut st = self.state.lock();
        let key = (peer.id, room.to_owned());
        if st.joining.contains_key(&key) {
            return;
        }
        let again = st
            .mirrors
            .get(room)
            .is_some_and(|m| m.subscribers.contains_key(&peer.id));
        let on_timeout = protocol::error(
            code::UNAVAILABLE,
            &format!("{room} is held by chat instance {owner}, which does not answer; join again"),
            None,
        );
        let Some(req) = self.request(&mut st, peer, owner, on_timeout, (!again).then_some(room))
        else {
            return;
        };
        if !again {
            st.joining.insert(key, req);
        }
        let relay = Relay::Join {
            from: self.me.to_string(),
            req,
            conn: peer.id,
            user: peer.user.to_string(),
            room: room.to_owned(),
            since,
            again,
        };
        // Posted under the lock: a `sync` of the room (which counts this join) cannot come
        // between the count and the line.
        self.post(owner, relay.line());
    }

    /// A connection here leaves a room `owner` holds; whether it was in it or on its way.
    pub(crate) fn leave(&self, peer: &Peer, room: &str, owner: &Arc<str>) -> bool {
        let mut st = self.state.lock();
        let key = (peer.id, room.to_owned());
        let was_joining = match st.joining.remove(&key) {
            Some(req) => {
                st.requests.remove(&req);
                true
            }
            None => false,
        };
        let was_in = st
            .mirrors
            .get_mut(room)
            .is_some_and(|mirror| mirror.subscribers.remove(&peer.id).is_some());
        drop_unused_mirror(&mut st, room);
        if !(was_joining || was_in) {
            return false;
        }
        let relay = Relay::Leave {
            from: self.me.to_string(),
            user: peer.user.to_string(),
            room: room.to_owned(),
        };
        self.post(owner, relay.line());
        true
    }

    /// A connection here sends to a room (or a conversation) `owner` holds.
    pub(crate) fn send(
        &self,
        peer: &Arc<Peer>,
        room: &str,
        to: Option<&str>,
        text: String,
        client_msg_id: String,
        owner: &Arc<str>,
    ) {
        let on_timeout = protocol::error(
            code::UNAVAILABLE,
            &format!(
                "chat instance {owner}, which holds this conversation, does not answer; send again with the same client_msg_id"
            ),
            Some(&client_msg_id),
        );
        let mut st = self.state.lock();
        let Some(req) = self.request(&mut st, peer, owner, on_timeout, None) else {
            return;
        };
        let relay = Relay::Send {
            from: self.me.to_string(),
            req,
            conn: peer.id,
            user: peer.user.to_string(),
            room: room.to_owned(),
            to: to.map(str::to_owned),
            text,
            client_msg_id,
        };
        self.post(owner, relay.line());
    }

    fn unanswered(owner: &str, room: &str) -> Arc<str> {
        protocol::error(
            code::UNAVAILABLE,
            &format!("{room} is held by chat instance {owner}, which does not answer"),
            None,
        )
    }

    /// A connection here asks for the members of a room `owner` holds.
    pub(crate) fn presence(&self, peer: &Arc<Peer>, room: &str, owner: &Arc<str>) {
        let on_timeout = Links::unanswered(owner, room);
        let mut st = self.state.lock();
        let Some(req) = self.request(&mut st, peer, owner, on_timeout, None) else {
            return;
        };
        let relay = Relay::Presence {
            from: self.me.to_string(),
            req,
            conn: peer.id,
            room: room.to_owned(),
        };
        self.post(owner, relay.line());
    }

    /// A connection here asks for history of a room `owner` holds.
    pub(crate) fn history(
        &self,
        peer: &Arc<Peer>,
        room: &str,
        before: Option<u64>,
        limit: Option<usize>,
        owner: &Arc<str>,
    ) {
        let on_timeout = Links::unanswered(owner, room);
        let mut st = self.state.lock();
        let Some(req) = self.request(&mut st, peer, owner, on_timeout, None) else {
            return;
        };
        let relay = Relay::History {
            from: self.me.to_string(),
            req,
            conn: peer.id,
            room: room.to_owned(),
            before,
            limit,
        };
        self.post(owner, relay.line());
    }

    /// Asks `owner` for what follows each room of its that is mirrored here, telling it this
    /// instance's members there.
    fn resync(&self, owner: &Arc<str>) {
        let mut st = self.state.lock();
        let State {
            mirrors,
            joining,
            requests,
            ..
        } = &mut *st;
        let now = Instant::now();
        for (room, mirror) in mirrors.iter_mut() {
            if mirror.owner != *owner {
                continue;
            }
            mirror.resyncing = Some(now);
            self.post(owner, sync_line(&self.me, room, mirror, joining, requests));
        }
    }

    /// Handles one line from another instance.
    pub(crate) fn on_line(&self, hub: &Arc<Hub>, line: &str) {
        let relay: Relay = match serde_json::from_str(line) {
            Ok(relay) => relay,
            Err(e) => {
                tracing::warn!(error = %e, "a line from another chat instance is not understood");
                return;
            }
        };
        match relay {
            Relay::Hello {
                from,
                epoch,
                session,
            } => self.on_hello(hub, &from, epoch, session),
            Relay::Reset { from } => {
                if let Some(from) = self.name(&from) {
                    self.resync(&from);
                }
            }
            Relay::Join {
                from,
                req,
                conn,
                user,
                room,
                since,
                again,
            } => {
                let Some(from) = self.name(&from) else { return };
                if **self.owner(&room) != *self.me {
                    let frame = Frame::from(&disagree(&room));
                    self.post(&from, Relay::Conn { req, conn, frame }.line());
                    return;
                }
                let user: Arc<str> = Arc::from(user);
                let who = Who::Remote {
                    instance: &from,
                    user: &user,
                    again,
                };
                let joined = hub.join_owned(who, &room, since, |frame, last_msg_id| {
                    let joined = Relay::Joined {
                        req,
                        room: room.clone(),
                        last_msg_id,
                        frame: Frame::from(&frame),
                    };
                    self.post(&from, joined.line());
                });
                if let Err(JoinRefused::Full) = joined {
                    let frame = Frame::from(&protocol::error(
                        code::ROOM_FULL,
                        &format!("{room} has its most members"),
                        None,
                    ));
                    self.post(&from, Relay::Conn { req, conn, frame }.line());
                }
            }
            Relay::Leave { from, user, room } => {
                if let Some(from) = self.name(&from) {
                    hub.leave_owned(&room, &Arc::from(user), Place::There(&from));
                }
            }
            Relay::Sync {
                from,
                room,
                users,
                since,
            } => {
                let Some(from) = self.name(&from) else { return };
                if **self.owner(&room) == *self.me {
                    hub.sync_owned(&from, &room, &users, since);
                }
            }
            Relay::Send {
                from,
                req,
                conn,
                user,
                room,
                to,
                text,
                client_msg_id,
            } => {
                let Some(from) = self.name(&from) else { return };
                let target = Target::Remote {
                    instance: from.clone(),
                    conn,
                    req,
                };
                if **self.owner(&room) != *self.me {
                    hub.answer(&target, disagree(&room));
                    return;
                }
                if let Some(delivery) = hub.send_owned(
                    Arc::from(user),
                    target,
                    &room,
                    to.as_deref(),
                    text,
                    client_msg_id,
                ) {
                    tokio::spawn(delivery);
                }
            }
            Relay::Presence {
                from,
                req,
                conn,
                room,
            } => {
                let frame = match **self.owner(&room) == *self.me {
                    true => hub.presence_frame(&room),
                    false => disagree(&room),
                };
                let frame = Frame::from(&frame);
                self.post(&from, Relay::Conn { req, conn, frame }.line());
            }
            Relay::History {
                from,
                req,
                conn,
                room,
                before,
                limit,
            } => {
                let frame = match **self.owner(&room) == *self.me {
                    true => hub.history_frame(&room, before, limit, self.list_bytes),
                    false => disagree(&room),
                };
                let frame = Frame::from(&frame);
                self.post(&from, Relay::Conn { req, conn, frame }.line());
            }
            Relay::Joined {
                req,
                room,
                last_msg_id,
                frame,
            } => self.on_joined(req, room, last_msg_id, frame),
            Relay::Synced {
                room,
                last_msg_id,
                recovered,
                missed,
            } => self.on_synced(&room, last_msg_id, recovered, missed),
            Relay::Msg {
                room,
                msg_id,
                frame,
            } => self.on_msg(&room, msg_id, frame),
            Relay::Member { room, frame } => {
                let st = self.state.lock();
                if let Some(mirror) = st.mirrors.get(&room) {
                    let frame = frame.text();
                    for (peer, _) in mirror.subscribers.values() {
                        peer.send(frame.clone());
                    }
                }
            }
            Relay::Conn { req, conn, frame } => {
                let mut st = self.state.lock();
                if st.requests.get(&req).is_some_and(|r| r.peer.id == conn)
                    && let Some(request) = st.requests.remove(&req)
                {
                    if let Some(room) = request.join {
                        // A join refused: nothing of the room for this connection.
                        st.joining.remove(&(request.peer.id, room.clone()));
                        drop_unused_mirror(&mut st, &room);
                    }
                    request.peer.send(frame.text());
                }
            }
            Relay::Users { users, frame } => {
                let users: Vec<&str> = users.iter().map(String::as_str).collect();
                hub.to_users(&users, &frame.text());
            }
        }
    }

    fn on_hello(&self, hub: &Hub, from: &str, epoch: u64, session: u64) {
        let Some(from) = self.name(from) else {
            tracing::warn!(
                instance = from,
                "greeted by a chat instance not in the list"
            );
            return;
        };
        let (restarted, changed) = {
            let mut st = self.state.lock();
            let peer = st.peers.entry(from.clone()).or_default();
            let restarted = peer.epoch != epoch || peer.dead;
            let changed = restarted || peer.session != session;
            *peer = PeerState {
                epoch,
                session,
                last_heard: Some(Instant::now()),
                dead: false,
            };
            (restarted, changed)
        };
        if restarted && let Some(outbox) = self.outboxes.get(&from) {
            // Under the state lock, which a request holds from its registration to its
            // posting: none is posted between dropping the queue and failing the requests.
            let mut st = self.state.lock();
            // Lines queued for its previous life answer nothing it asked.
            outbox.reset();
            // Requests to it may have been among those lines, died with its previous life, or
            // been answered into a queue its side drops as it greets us: each is answered
            // `unavailable` now rather than at its deadline (a client may ask again; a send
            // repeated with its `client_msg_id` is not delivered twice). One its new life did
            // take gets the same answer; its own answer then finds no request and is dropped.
            let lost: Vec<u64> = st
                .requests
                .iter()
                .filter(|(_, r)| r.owner == from)
                .map(|(req, _)| *req)
                .collect();
            self.fail_requests(&mut st, lost);
        }
        if changed {
            // Its connections are gone, or lines between us may have been lost (a leave, a
            // join): its members here are forgotten, and it tells them again in the `sync`s
            // the `reset` below asks for.
            hub.forget_instance(&from);
            tracing::info!(instance = %from, restarted, "chat instance (re)connected; resynchronising");
            let reset = Relay::Reset {
                from: self.me.to_string(),
            };
            self.post(&from, reset.line());
            self.resync(&from);
        }
    }

    fn on_joined(&self, req: u64, room: String, last_msg_id: u64, frame: Frame) {
        let mut st = self.state.lock();
        let Some(request) = st.requests.remove(&req) else {
            // Left or timed out meanwhile: the owner has had the leave after the join.
            return;
        };
        if request.join.is_none() {
            // A join asked again: answered if the connection is still in the room.
            if st
                .mirrors
                .get(&room)
                .is_some_and(|m| m.subscribers.contains_key(&request.peer.id))
            {
                request.peer.send(frame.text());
            }
            return;
        }
        st.joining.remove(&(request.peer.id, room.clone()));
        let mirror = st.mirrors.entry(room.clone()).or_insert_with(|| Mirror {
            owner: request.owner.clone(),
            subscribers: FxHashMap::default(),
            last: last_msg_id,
            resyncing: None,
        });
        let gap = mirror.last < last_msg_id && mirror.resyncing.is_none();
        mirror
            .subscribers
            .insert(request.peer.id, (request.peer.clone(), last_msg_id));
        request.peer.send(frame.text());
        if gap {
            self.start_resync(st, &room);
        }
    }

    fn on_msg(&self, room: &str, msg_id: u64, frame: Frame) {
        let mut st = self.state.lock();
        let Some(mirror) = st.mirrors.get_mut(room) else {
            return;
        };
        if mirror.resyncing.is_some() || msg_id <= mirror.last {
            return;
        }
        if msg_id != mirror.last.saturating_add(1) {
            self.start_resync(st, room);
            return;
        }
        mirror.last = msg_id;
        let frame = frame.text();
        for (peer, after) in mirror.subscribers.values() {
            if *after < msg_id {
                peer.send(frame.clone());
            }
        }
    }

    /// Messages of a mirrored room were lost on the way: asks its owner for what follows.
    fn start_resync(&self, mut st: parking_lot::MutexGuard<'_, State>, room: &str) {
        let State {
            mirrors,
            joining,
            requests,
            ..
        } = &mut *st;
        let Some(mirror) = mirrors.get_mut(room) else {
            return;
        };
        mirror.resyncing = Some(Instant::now());
        let line = sync_line(&self.me, room, mirror, joining, requests);
        self.post(&mirror.owner, line);
    }

    fn on_synced(&self, room: &str, last_msg_id: u64, recovered: bool, missed: Vec<(u64, Frame)>) {
        let mut st = self.state.lock();
        let Some(mirror) = st.mirrors.get_mut(room) else {
            return;
        };
        mirror.resyncing = None;
        if last_msg_id < mirror.last {
            // The holder has fewer messages than were handed out (its history was lost):
            // the numbers start over, and every connection here must learn it.
            for (peer, _) in mirror.subscribers.values() {
                peer.cut(close::RESYNC);
            }
            mirror.subscribers.clear();
            mirror.last = last_msg_id;
            drop_unused_mirror(&mut st, room);
            return;
        }
        // Whole when the messages after `last` are all there, without a hole.
        let mut next = mirror.last.saturating_add(1);
        let mut holed = false;
        for (id, _) in &missed {
            if *id < next {
                continue;
            }
            holed |= *id != next;
            next = id.saturating_add(1);
        }
        let whole = recovered && !holed && next > last_msg_id;
        if !whole {
            // Some connections cannot be given every message: they reconnect and learn
            // what they missed from `join` with `since`; nothing past the hole is handed out.
            for (peer, after) in mirror.subscribers.values() {
                if *after < last_msg_id {
                    peer.cut(close::RESYNC);
                }
            }
            mirror
                .subscribers
                .retain(|_, (_, after)| *after >= last_msg_id);
            mirror.last = last_msg_id;
            drop_unused_mirror(&mut st, room);
            return;
        }
        for (id, frame) in missed {
            if id <= mirror.last {
                continue;
            }
            let frame = frame.text();
            for (peer, after) in mirror.subscribers.values() {
                if *after < id {
                    peer.send(frame.clone());
                }
            }
            mirror.last = id;
        }
    }

    /// Answers requests that waited too long, asks again for `sync`s unanswered as long,
    /// and gives up on instances unheard for the peer timeout (their members leave the rooms
    /// owned here). Called a few times a second.
    pub(crate) fn sweep(&self, hub: &Hub) {
        let now = Instant::now();
        let mut st = self.state.lock();
        let mut dead = Vec::new();
        for (name, peer) in st.peers.iter_mut() {
            if !peer.dead
                && peer
                    .last_heard
                    .is_some_and(|t| now.saturating_duration_since(t) > self.peer_timeout)
            {
                peer.dead = true;
                dead.push(name.clone());
            }
        }
        let late: Vec<u64> = st
            .requests
            .iter()
            .filter(|(_, r)| r.deadline <= now || dead.contains(&r.owner))
            .map(|(req, _)| *req)
            .collect();
        self.fail_requests(&mut st, late);
        // A `sync` or its answer lost on the way (NATS may drop messages): asked again.
        let State {
            mirrors,
            joining,
            requests,
            ..
        } = &mut *st;
        for (room, mirror) in mirrors.iter_mut() {
            if mirror
                .resyncing
                .is_some_and(|at| now.saturating_duration_since(at) > self.request_timeout)
            {
                mirror.resyncing = Some(now);
                self.post(
                    &mirror.owner,
                    sync_line(&self.me, room, mirror, joining, requests),
                );
            }
        }
        // Under the lock, so a greeting that brings an instance back cannot be undone by
        // this forgetting it.
        for name in dead {
            tracing::warn!(instance = %name, "chat instance unheard; its members leave");
            hub.forget_instance(&name);
        }
    }

    /// Answers the requests `reqs` with their `unavailable` error (the client may ask again;
    /// a send repeated with its `client_msg_id` is not delivered twice) and forgets them.
    fn fail_requests(&self, st: &mut State, reqs: Vec<u64>) {
        for req in reqs {
            let Some(request) = st.requests.remove(&req) else {
                continue;
            };
            request.peer.send(request.on_timeout.clone());
            if let Some(room) = request.join {
                st.joining.remove(&(request.peer.id, room.clone()));
                drop_unused_mirror(st, &room);
                // The owner may have had the join: it hears the leave after it.
                let relay = Relay::Leave {
                    from: self.me.to_string(),
                    user: request.peer.user.to_string(),
                    room,
                };
                self.post(&request.owner, relay.line());
            }
        }
    }

    /// Rooms mirrored here (owned elsewhere, with connections here).
    pub fn mirrored_rooms(&self) -> usize {
        self.state.lock().mirrors.len()
    }
}

/// Forgets a mirrored room no connection here is in or on its way into.
fn drop_unused_mirror(st: &mut State, room: &str) {
    let unused = st
        .mirrors
        .get(room)
        .is_some_and(|m| m.subscribers.is_empty())
        && !st.joining.keys().any(|(_, r)| r == room);
    if unused {
        st.mirrors.remove(room);
    }
}

/// The `sync` of a mirrored room: this instance's connections there per user (those on
/// their way in included), and its last number.
fn sync_line(
    me: &str,
    room: &str,
    mirror: &Mirror,
    joining: &FxHashMap<(u64, String), u64>,
    requests: &FxHashMap<u64, Request>,
) -> Arc<str> {
    let mut users: FxHashMap<&str, u32> = FxHashMap::default();
    for (peer, _) in mirror.subscribers.values() {
        *users.entry(&peer.user).or_insert(0) += 1;
    }
    for ((_, r), req) in joining {
        if r == room
            && let Some(request) = requests.get(req)
        {
            *users.entry(&request.peer.user).or_insert(0) += 1;
        }
    }
    Relay::Sync {
        from: me.to_owned(),
        room: room.to_owned(),
        users: users.into_iter().map(|(u, n)| (u.to_owned(), n)).collect(),
        since: mirror.last,
    }
    .line()
}

fn disagree(room: &str) -> Arc<str> {
    protocol::error(
        code::UNAVAILABLE,
        &format!(
            "the chat instances disagree on who holds {room}: their lists of instances differ"
        ),
        None,
    )
}

/// Rendezvous score of `name` for `room`: CRC-32 of both, spread over 64 bits by
/// SplitMix64's finaliser (CRC alone is linear, and would rank names the same way for many
/// rooms).
fn score(name: &str, room: &str) -> u64 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(name.as_bytes());
    hasher.update(&[0]);
    hasher.update(room.as_bytes());
    let mut z = u64::from(hasher.finalize()) ^ ((name.len() as u64) << 32);
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn links(me: &str, names: &[&str]) -> Links {
        Links::new(&LinkConfig {
            me: me.into(),
            names: names.iter().map(|n| (*n).to_owned()).collect(),
            request_timeout: Duration::from_secs(5),
            peer_timeout: Duration::from_secs(5),
            list_bytes: crate::hub::MAX_LIST_BYTES,
        })
        .unwrap()
    }

    #[test]
    fn every_instance_names_the_same_owner_and_rooms_spread_over_them() {
        let names = ["chat-0", "chat-1", "chat-2"];
        let views: Vec<Links> = names.iter().map(|me| links(me, &names)).collect();
        let mut owned = [0usize; 3];
        for i in 0..3000 {
            let room = format!("room-{i}");
            let owner = views[0].owner(&room).clone();
            assert!(views.iter().all(|v| *v.owner(&room) == owner));
            owned[names.iter().position(|n| **n == *owner).unwrap()] += 1;
        }
        for n in owned {
            assert!((800..1200).contains(&n), "{owned:?}");
        }
        // Adding an instance moves only the rooms it takes.
        let four = links("chat-0", &["chat-0", "chat-1", "chat-2", "chat-3"]);
        for i in 0..1000 {
            let room = format!("room-{i}");
            let now = four.owner(&room);
            assert!(**now == *"chat-3" || *now == *views[0].owner(&room));
        }
    }

    #[test]
    fn names_are_checked() {
        assert!(
            Links::new(&LinkConfig {
                me: "a".into(),
                names: vec!["b".into()],
                request_timeout: Duration::from_secs(1),
                peer_timeout: Duration::from_secs(1),
                list_bytes: crate::hub::MAX_LIST_BYTES,
            })
            .is_err()
        );
        assert!(check_instance_name("chat.0").is_err());
        assert!(check_instance_name("chat-0").is_ok());
    }

    #[test]
    fn relay_lines_round_trip() {
        let relay = Relay::Msg {
            room: "lobby".into(),
            msg_id: 3,
            frame: Frame::from(&Arc::from(r#"{"type":"msg","text":"a \"b\""}"#)),
        };
        let line = relay.line();
        assert!(!line.contains('\n'));
        assert_eq!(serde_json::from_str::<Relay>(&line).unwrap(), relay);
    }

    /// Lines queued for `instance`, parsed.
    fn drain(links: &Links, instance: &str) -> Vec<serde_json::Value> {
        let (_, outbox) = links.outboxes().find(|(n, _)| ***n == *instance).unwrap();
        let mut buf = bytes::BytesMut::new();
        outbox.take(&mut buf, usize::MAX, |line, b| {
            b.extend_from_slice(line.as_bytes());
            b.extend_from_slice(b"\n");
        });
        std::str::from_utf8(&buf)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Frames queued for a connection, parsed.
    fn frames(peer: &Peer) -> Vec<serde_json::Value> {
        let mut buf = bytes::BytesMut::new();
        let mut out = Vec::new();
        peer.take(&mut buf, usize::MAX, |frame, _| {
            out.push(serde_json::from_str(frame).unwrap());
        });
        out
    }

    fn msg_line(room: &str, id: u64) -> String {
        let frame = format!(
            r#"{{"type":"msg","room":"{room}","msg_id":{id},"user":"ann","text":"t{id}","ts":1}}"#
        );
        format!(r#"{{"msg":{{"room":"{room}","msg_id":{id},"frame":{frame}}}}}"#)
    }

    #[tokio::test]
    async fn a_mirror_that_sees_a_number_skip_asks_for_the_rest_and_never_shows_a_hole() {
        let dir = tempfile::tempdir().unwrap();
        let names = ["a", "b"];
        let hub = Hub::open(
            dir.path(),
            crate::hub::HubConfig {
                instance: "b".into(),
                ..crate::hub::HubConfig::default()
            },
            Some(links("b", &names)),
        )
        .await
        .unwrap();
        let links = hub.links().unwrap();
        let room = (0..)
            .map(|i| format!("r{i}"))
            .find(|r| **links.owner(r) == *"a")
            .unwrap();
        let peer = Peer::new(7, Arc::from("bob"), 1000, 1 << 20);
        hub.join(&peer, &room, None).unwrap();
        let sent = drain(links, "a");
        let req = sent[0]["join"]["req"].as_u64().unwrap();
        assert_eq!(sent[0]["join"]["user"], "bob");
        let joined = format!(
            r#"{{"joined":{{"req":{req},"room":"{room}","last_msg_id":0,"frame":{{"type":"joined","room":"{room}"}}}}}}"#
        );
        links.on_line(&hub, &joined);
        links.on_line(&hub, &msg_line(&room, 1));
        // 2 is lost on the way: 3 starts a resync, and 4 waits for its answer.
        links.on_line(&hub, &msg_line(&room, 3));
        links.on_line(&hub, &msg_line(&room, 4));
        let sync = drain(links, "a");
        assert_eq!(sync.len(), 1, "{sync:?}");
        assert_eq!(sync[0]["sync"]["since"], 1);
        assert_eq!(sync[0]["sync"]["users"], serde_json::json!([["bob", 1]]));
        let missed: Vec<String> = (2..=4)
            .map(|id| format!(r#"[{id},{{"type":"msg","room":"{room}","msg_id":{id}}}]"#))
            .collect();
        let synced = format!(
            r#"{{"synced":{{"room":"{room}","last_msg_id":4,"recovered":true,"missed":[{}]}}}}"#,
            missed.join(",")
        );
        links.on_line(&hub, &synced);
        links.on_line(&hub, &msg_line(&room, 5));
        let ids: Vec<u64> = frames(&peer)
            .iter()
            .filter(|f| f["type"] == "msg")
            .map(|f| f["msg_id"].as_u64().unwrap())
            .collect();
        assert_eq!(ids, vec![1, 2, 3, 4, 5], "in order, once each");
        assert_eq!(peer.cut_requested(), None);
        // A gap the holder cannot fill: nothing past it is handed out, the connection is cut.
        links.on_line(&hub, &msg_line(&room, 9));
        assert_eq!(drain(links, "a")[0]["sync"]["since"], 5);
        let synced = format!(
            r#"{{"synced":{{"room":"{room}","last_msg_id":9,"recovered":false,"missed":[[9,{{"type":"msg"}}]]}}}}"#
        );
        links.on_line(&hub, &synced);
        assert!(frames(&peer).is_empty(), "no message past the hole");
        assert_eq!(peer.cut_requested(), Some(close::RESYNC));
        // Lines that are not the protocol's are logged and dropped, never a panic.
        for junk in [
            "",
            "{",
            "[]",
            r#"{"msg":{"room":1}}"#,
            r#"{"hello":{"from":"zz","epoch":1,"session":1}}"#,
        ] {
            links.on_line(&hub, junk);
        }
        hub.close().await.unwrap();
    }
}
