//! One WebSocket connection after the upgrade: reads the client's frames, writes what the
//! rooms queue for it, keeps it alive with pings, and ends it with the close code that says
//! why.
//!
//! Between reads the connection holds no read buffer, and between writes no write buffer:
//! an idle connection costs its task, its queue and its socket.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::config::ChatConfig;
use crate::hub::{Hub, JoinRefused, Peer, dm_room};
use crate::protocol::{self, ClientMsg, code};
use crate::ws::{self, Decoder, Incoming, close};

/// Most bytes of queued frames written in one go.
const WRITE_BATCH: usize = 64 * 1024;

/// Who the connection is and until when its token holds.
#[derive(Debug, Clone)]
pub struct Session {
    /// The signed-in user.
    pub user: Arc<str>,
    /// When the token expires, in Unix seconds.
    pub expires: u64,
}

/// Leaves every room and forgets the connection, however the task ends.
struct Cleanup<'a> {
    hub: &'a Hub,
    peer: &'a Peer,
    rooms: Vec<String>,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        self.hub.disconnect(self.peer, &self.rooms);
    }
}

/// Why the loop ended: a close frame to send (code, reason), or none.
type Ending = Option<(u16, String)>;

/// Serves the connection until it ends.
pub async fn run(
    hub: Arc<Hub>,
    config: Arc<ChatConfig>,
    mut stream: TcpStream,
    leftover: Bytes,
    session: Session,
    id: u64,
    drain: keel_net::Drain,
) {
    let peer = Peer::new(
        id,
        session.user.clone(),
        config.send_queue,
        config.send_queue_bytes,
    );
    hub.connect(&peer);
    let mut conn = Conn {
        hub: &hub,
        config: &config,
        peer: &peer,
        cleanup: Cleanup {
            hub: &hub,
            peer: &peer,
            rooms: Vec::new(),
        },
        bucket: keel_net::TokenBucket::full(config.send_burst, Instant::now()),
        refused_in_a_row: 0,
    };
    let mut decoder = Decoder::new(config.max_message_bytes);
    let mut input = BytesMut::from(&leftover[..]);
    // The leftover may be a slice of hyper's whole read buffer: let it go now, not with the
    // connection.
    drop(leftover);
    let mut output = BytesMut::new();
    // A token good for more than a year is checked again in a year (no overflow).
    let lifetime = session.expires.saturating_sub(crate::hub::now_ms() / 1000);
    let expires = Instant::now() + Duration::from_secs(lifetime.min(365 * 24 * 3600));
    let mut last_heard = Instant::now();
    let mut next_ping = last_heard + config.ping_interval;
    // Wakes for the next ping, the pong deadline or the token's expiry, whichever is first.
    let due = |last_heard: Instant, next_ping: Instant| {
        next_ping.min(last_heard + config.pong_timeout).min(expires)
    };
    let tick = tokio::time::sleep_until(due(last_heard, next_ping));
    tokio::pin!(tick);

    let ending: Ending = 'conn: loop {
        // Frames already read (the bytes that came with the upgrade, or a read's worth).
        loop {
            match decoder.decode(&mut input) {
                Ok(Some(incoming)) => {
                    last_heard = Instant::now();
                    match incoming {
                        Incoming::Text(text) => {
                            if let Some(end) = conn.on_text(&text) {
                                break 'conn Some(end);
                            }
                        }
                        Incoming::Ping(payload) => {
                            ws::encode_pong(&payload, &mut output);
                        }
                        Incoming::Pong => {}
                        Incoming::Close(code) => {
                            // Answer with the client's code, as RFC 6455 asks, unless it is
                            // one no endpoint may send.
                            let code = match code.map(|(c, _)| c) {
                                None => close::NORMAL,
                                Some(c) if ws::is_valid_close_code(c) => c,
                                Some(_) => close::PROTOCOL,
                            };
                            break 'conn Some((code, String::new()));
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => break 'conn Some((e.close_code(), e.to_string())),
            }
        }
        if input.is_empty() {
            // Nothing partial: give the buffer back rather than keep it while idle.
            input = BytesMut::new();
        }
        if peer.is_behind() {
            break Some((close::SLOW, slow_reason(&config)));
        }
        if let Some(code) = peer.cut_requested() {
            break Some((code, cut_reason(code).into()));
        }
        if !output.is_empty() {
            if write(&mut stream, &output, config.write_timeout)
                .await
                .is_err()
            {
                break None;
            }
            output = BytesMut::new();
        }
        // Unbiased: a busy room must not starve reading the client (its pongs), nor the
        // reverse.
        tokio::select! {
            () = drain.draining() => break Some((close::GOING_AWAY, "server shutting down".into())),
            ready = stream.readable() => {
                if ready.is_err() {
                    break None;
                }
                input.reserve(4096);
                match stream.try_read_buf(&mut input) {
                    Ok(0) => break None,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => break None,
                }
            }
            () = peer.wait() => {
                peer.take(&mut output, WRITE_BATCH, ws::encode_text);
            }
            () = &mut tick => {
                let now = Instant::now();
                if now >= expires {
                    break Some((close::AUTH, "token expired".into()));
                }
                if now.saturating_duration_since(last_heard) >= config.pong_timeout {
                    // Nothing heard, not even a pong, for the whole timeout: the peer is gone.
                    break None;
                }
                if now >= next_ping {
                    ws::encode_ping(b"", &mut output);
                    next_ping = now + config.ping_interval;
                }
                // The deadline only moves later (reads push the pong deadline, pings the next
                // ping), so the timer is set here, when it fires, not after every read.
                tick.as_mut().reset(due(last_heard, next_ping));
            }
        }
    };
    if let Some((code, reason)) = ending {
        // Frames already taken from the queue (a batch being written) go first; what is still
        // queued is not sent.
        let mut out = if code == close::SLOW {
            output
        } else {
            BytesMut::new()
        };
        ws::encode_close(code, &reason, &mut out);
        if write(&mut stream, &out, config.write_timeout).await.is_ok() {
            let _ = stream.shutdown().await;
            // Read what the client still sends (its close frame) until it closes, briefly:
            // closing with unread bytes would reset the connection, and the client could lose
            // the close frame and its code.
            // On the heap: a buffer here would be part of every connection's task.
            let mut sink = vec![0u8; 512];
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
            })
            .await;
        }
    }
    drop(conn);
}

fn slow_reason(config: &ChatConfig) -> String {
    format!(
        "fell {} frames behind; reconnect and join with since to catch up",
        config.send_queue
    )
}

/// The reason sent with a close the rooms asked for.
fn cut_reason(code: u16) -> &'static str {
    match code {
        close::RESYNC => {
            "messages of a room could not be recovered after a fault; reconnect and join with since"
        }
        _ => "closed by the server",
    }
}

async fn write(stream: &mut TcpStream, bytes: &[u8], timeout: Duration) -> Result<(), ()> {
    match tokio::time::timeout(timeout, stream.write_all(bytes)).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

/// A connection's state between frames.
struct Conn<'a> {
    hub: &'a Arc<Hub>,
    config: &'a ChatConfig,
    peer: &'a Arc<Peer>,
    /// Holds the rooms joined, to leave them when the connection ends.
    cleanup: Cleanup<'a>,
    bucket: keel_net::TokenBucket,
    /// Sends refused by the rate limit since the last one accepted.
    refused_in_a_row: u32,
}

impl Conn<'_> {
    /// Handles one text message; `Some` ends the connection with that close.
    fn on_text(&mut self, text: &str) -> Option<(u16, String)> {
        let msg: ClientMsg = match serde_json::from_str(text) {
            Ok(msg) => msg,
            Err(e) => {
                self.peer.send(protocol::error(
                    code::BAD_REQUEST,
                    &format!("not a message of the chat protocol: {e}"),
                    None,
                ));
                return None;
            }
        };
        let config = self.config;
        // Room names are checked for every request that names one (the conversations of
        // direct messages live in rooms no valid name reaches).
        let (room_name, client_msg_id) = match &msg {
            ClientMsg::Join { room, .. }
            | ClientMsg::Presence { room }
            | ClientMsg::History { room, .. }
            | ClientMsg::Leave { room } => (Some(room.as_str()), None),
            ClientMsg::Send {
                room,
                client_msg_id,
                ..
            } => (Some(room.as_str()), Some(client_msg_id.as_str())),
            ClientMsg::Dm { client_msg_id, .. } => (None, Some(client_msg_id.as_str())),
            ClientMsg::Ping {} => (None, None),
        };
        if let Some(name) = room_name
            && let Err(detail) = check_name(name, "room")
        {
            self.peer.send(protocol::error(
                code::BAD_NAME,
                &detail.to_string(),
                client_msg_id,
            ));
            return None;
        }
        // Every request but `leave` and `ping` costs a token of the connection's rate.
        if !matches!(msg, ClientMsg::Leave { .. } | ClientMsg::Ping {})
            && let Err(end) = self.admit(client_msg_id)
        {
            return end;
        }
        match msg {
            ClientMsg::Join { room, since } => {
                let rooms = &mut self.cleanup.rooms;
                let joined = rooms.contains(&room);
                if !joined && rooms.len() >= config.max_rooms_per_connection {
                    self.peer.send(protocol::error(
                        code::TOO_MANY_ROOMS,
                        &format!(
                            "a connection may be in {} rooms",
                            config.max_rooms_per_connection
                        ),
                        None,
                    ));
                    return None;
                }
                match self.hub.join(self.peer, &room, since) {
                    Ok(()) if !joined => rooms.push(room),
                    Ok(()) => {}
                    Err(JoinRefused::Full) => self.peer.send(protocol::error(
                        code::ROOM_FULL,
                        &format!("{room} has its most members"),
                        None,
                    )),
                }
            }
            ClientMsg::Leave { room } => {
                self.hub.leave(self.peer, &room);
                self.cleanup.rooms.retain(|r| r != &room);
            }
            ClientMsg::Send {
                room,
                text,
                client_msg_id,
            } => {
                if !self.cleanup.rooms.contains(&room) {
                    self.peer.send(protocol::error(
                        code::NOT_JOINED,
                        &format!("join {room} before sending to it"),
                        Some(&client_msg_id),
                    ));
                    return None;
                }
                return self.send(&room, None, text, client_msg_id);
            }
            ClientMsg::Dm {
                to,
                text,
                client_msg_id,
            } => {
                if let Err(detail) = check_name(&to, "user") {
                    self.peer.send(protocol::error(
                        code::BAD_NAME,
                        &detail.to_string(),
                        Some(&client_msg_id),
                    ));
                    return None;
                }
                let room = dm_room(&self.peer.user, &to);
                return self.send(&room, Some(&to), text, client_msg_id);
            }
            ClientMsg::Presence { room } => self.hub.presence(self.peer, &room),
            ClientMsg::History {
                room,
                before,
                limit,
            } => self.hub.history(self.peer, &room, before, limit),
            ClientMsg::Ping {} => self.peer.send(Arc::from(r#"{"type":"pong"}"#)),
        }
        None
    }

    /// Takes a token of the connection's rate for a request. Refused: an error (`None`) or,
    /// far over the limit, the close (4008) that ends the connection.
    fn admit(&mut self, client_msg_id: Option<&str>) -> Result<(), Option<(u16, String)>> {
        let config = self.config;
        let now = Instant::now();
        if self
            .bucket
            .take(config.sends_per_second, config.send_burst, now)
            .is_ok()
        {
            self.refused_in_a_row = 0;
            return Ok(());
        }
        self.refused_in_a_row += 1;
        if self.refused_in_a_row > config.abuse_after {
            return Err(Some((
                close::ABUSE,
                format!(
                    "{} requests over the rate limit in a row",
                    self.refused_in_a_row
                ),
            )));
        }
        self.peer.send(protocol::error(
            code::RATE_LIMITED,
            &format!(
                "at most {} requests per second (bursts of {})",
                config.sends_per_second, config.send_burst
            ),
            client_msg_id,
        ));
        Err(None)
    }

    fn send(
        &mut self,
        room: &str,
        to: Option<&str>,
        text: String,
        client_msg_id: String,
    ) -> Option<(u16, String)> {
        let config = self.config;
        if client_msg_id.is_empty() || client_msg_id.len() > MAX_NAME {
            self.peer.send(protocol::error(
                code::BAD_NAME,
                &format!("client_msg_id must be 1 to {MAX_NAME} bytes"),
                Some(&client_msg_id),
            ));
            return None;
        }
        if text.chars().count() > config.max_text_chars {
            self.peer.send(protocol::error(
                code::TOO_LONG,
                &format!("text is limited to {} characters", config.max_text_chars),
                Some(&client_msg_id),
            ));
            return None;
        }
        if let Some(delivery) = self.hub.send(self.peer, room, to, text, client_msg_id) {
            tokio::spawn(delivery);
        }
        None
    }
}

/// Longest room name, user name or client message id, in bytes.
pub const MAX_NAME: usize = 64;

/// Checks a room or user name: 1 to [`MAX_NAME`] bytes, no control characters.
pub fn check_name(name: &str, what: &'static str) -> Result<(), BadName> {
    if name.is_empty() || name.len() > MAX_NAME || name.chars().any(char::is_control) {
        return Err(BadName(what));
    }
    Ok(())
}

/// A room or user name [`check_name`] refused: which kind of name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a {0} name is 1 to {MAX_NAME} bytes without control characters")]
pub struct BadName(pub &'static str);
