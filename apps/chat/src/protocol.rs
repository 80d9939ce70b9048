//! The chat protocol's JSON messages (docs/chat.md): what clients send, and the server's
//! answers, each serialised once however many connections receive it.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// A message from a client, by its `type`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientMsg {
    /// Join a room; with `since`, also get every message after that `msg_id`.
    Join {
        /// The room.
        room: String,
        /// The last `msg_id` the client has seen in the room.
        #[serde(default)]
        since: Option<u64>,
    },
    /// Leave a room.
    Leave {
        /// The room.
        room: String,
    },
    /// Send a message to a room the connection has joined.
    Send {
        /// The room.
        room: String,
        /// The text.
        text: String,
        /// The client's id for this message: a resend with the same id is acknowledged with
        /// the first one's `msg_id` and not delivered again.
        client_msg_id: String,
    },
    /// Send a message to one user (every connection of theirs, and the sender's).
    Dm {
        /// The user it is for.
        to: String,
        /// The text.
        text: String,
        /// As for `send`.
        client_msg_id: String,
    },
    /// Ask for a room's members.
    Presence {
        /// The room.
        room: String,
    },
    /// Ask for a room's messages before a `msg_id`.
    History {
        /// The room.
        room: String,
        /// Only messages below this `msg_id` (exclusive); the newest when absent.
        #[serde(default)]
        before: Option<u64>,
        /// At most this many (the newest of them), capped by the server.
        #[serde(default)]
        limit: Option<usize>,
    },
    /// Ask for a `pong` (an application-level check; WebSocket pings are answered too). A
    /// struct variant, so that unknown fields are refused as for every other type.
    Ping {},
}

/// A stored message: what the journal keeps and `msg` frames carry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// The room (for a direct message, the conversation's internal name).
    pub room: String,
    /// Its place in the room: 1, 2, 3… without gaps.
    pub msg_id: u64,
    /// Who sent it.
    pub user: String,
    /// For a direct message, the user it was sent to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// The text.
    pub text: String,
    /// When the server accepted it, in Unix milliseconds.
    pub ts: u64,
    /// The sender's id for it (for idempotent resends).
    pub client_msg_id: String,
}

impl Message {
    /// The `msg` frame for this message, as every member receives it.
    pub fn frame(&self) -> Arc<str> {
        #[derive(Serialize)]
        struct Frame<'a> {
            #[serde(rename = "type")]
            kind: &'static str,
            #[serde(skip_serializing_if = "Option::is_none")]
            room: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            to: Option<&'a str>,
            msg_id: u64,
            user: &'a str,
            text: &'a str,
            ts: u64,
        }
        let frame = Frame {
            kind: "msg",
            room: self.to.is_none().then_some(self.room.as_str()),
            to: self.to.as_deref(),
            msg_id: self.msg_id,
            user: &self.user,
            text: &self.text,
            ts: self.ts,
        };
        to_frame(&frame)
    }
}

/// Serialises a server frame.
pub fn to_frame(value: &impl Serialize) -> Arc<str> {
    // The frames are plain structs of strings and numbers: serialising cannot fail.
    Arc::from(serde_json::to_string(value).unwrap_or_default())
}

/// A JSON array of already-serialised frames.
pub fn frame_list(frames: &[Arc<str>]) -> Box<serde_json::value::RawValue> {
    let mut out = String::with_capacity(2 + frames.iter().map(|f| f.len() + 1).sum::<usize>());
    out.push('[');
    for (i, f) in frames.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(f);
    }
    out.push(']');
    // Each frame is JSON this server wrote, so the list is too.
    serde_json::value::RawValue::from_string(out).unwrap_or_else(|_| empty_list())
}

fn empty_list() -> Box<serde_json::value::RawValue> {
    serde_json::value::RawValue::from_string("[]".to_owned()).unwrap_or_default()
}

/// An `error` frame; `client_msg_id` when it answers a send.
pub fn error(code: &str, detail: &str, client_msg_id: Option<&str>) -> Arc<str> {
    #[derive(Serialize)]
    struct Error<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        code: &'a str,
        detail: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        client_msg_id: Option<&'a str>,
    }
    to_frame(&Error {
        kind: "error",
        code,
        detail,
        client_msg_id,
    })
}

/// Error codes of `error` frames.
pub mod code {
    /// The frame is not a message of the protocol.
    pub const BAD_REQUEST: &str = "bad_request";
    /// The connection has not joined that room.
    pub const NOT_JOINED: &str = "not_joined";
    /// Sends over the connection's rate.
    pub const RATE_LIMITED: &str = "rate_limited";
    /// The connection is in as many rooms as it may be.
    pub const TOO_MANY_ROOMS: &str = "too_many_rooms";
    /// The room has as many members as it may have.
    pub const ROOM_FULL: &str = "room_full";
    /// The text is longer than the limit.
    pub const TOO_LONG: &str = "too_long";
    /// A room or user name, or a client message id, that is empty or too long.
    pub const BAD_NAME: &str = "bad_name";
    /// The message could not be made durable; it was not delivered and may be sent again.
    pub const UNAVAILABLE: &str = "unavailable";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_messages_parse_and_unknown_fields_are_refused() {
        let join: ClientMsg =
            serde_json::from_str(r#"{"type":"join","room":"a","since":3}"#).unwrap();
        assert_eq!(
            join,
            ClientMsg::Join {
                room: "a".into(),
                since: Some(3)
            }
        );
        let ping: ClientMsg = serde_json::from_str(r#"{"type":"ping"}"#).unwrap();
        assert_eq!(ping, ClientMsg::Ping {});
        assert!(serde_json::from_str::<ClientMsg>(r#"{"type":"ping","x":1}"#).is_err());
        assert!(serde_json::from_str::<ClientMsg>(r#"{"type":"join","room":"a","x":1}"#).is_err());
        assert!(serde_json::from_str::<ClientMsg>(r#"{"type":"shout"}"#).is_err());
    }

    #[test]
    fn a_msg_frame_names_its_room_or_its_recipient() {
        let mut m = Message {
            room: "lobby".into(),
            msg_id: 7,
            user: "ann".into(),
            to: None,
            text: "hi \"there\"".into(),
            ts: 1,
            client_msg_id: "c1".into(),
        };
        let v: serde_json::Value = serde_json::from_str(&m.frame()).unwrap();
        assert_eq!(v["type"], "msg");
        assert_eq!(v["room"], "lobby");
        assert_eq!(v["text"], "hi \"there\"");
        assert!(v.get("client_msg_id").is_none());
        m.to = Some("bob".into());
        let v: serde_json::Value = serde_json::from_str(&m.frame()).unwrap();
        assert_eq!(v["to"], "bob");
        assert!(v.get("room").is_none());
        let list: serde_json::Value =
            serde_json::from_str(frame_list(&[m.frame(), m.frame()]).get()).unwrap();
        assert_eq!(list.as_array().unwrap().len(), 2);
    }
}
