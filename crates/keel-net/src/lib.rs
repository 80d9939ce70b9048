//! Keel's network layer: what every Keel server shares below its protocol.
//!
//! - [`accept`]: the accept loop. Every server in Keel (RPC and the registry on it, the
//!   gateway's two ports, the sale's API) takes connections through [`AcceptLoop`]: a cap on
//!   open connections (new ones beyond it are closed at once and counted), `TCP_NODELAY`,
//!   accept errors (out of descriptors) that slow the loop instead of spinning it, and a
//!   shutdown in two steps: connections are told to drain ([`Drain`]), and after the grace
//!   period whatever is still open is cut.
//! - [`serve_http1`]: one HTTP/1.1 connection served by hyper until it ends or the server's
//!   drain closes it gracefully; [`answers_ok`]: whether another process answers a `GET`
//!   with 200 in time (a liveness probe).
//! - [`Rewind`]: a stream that yields bytes already read (to sniff the protocol) before the
//!   rest, so the connection can be handed to whichever protocol the bytes announce.
//! - [`Backoff`]: exponential delays with a cap and jitter, for every retry loop.
//! - [`TokenBucket`]: the rate-limit policy, for every limiter.
//! - [`duration`]: durations in config files, written as whole milliseconds.
//! - [`constant_time_eq`]: compares secrets without leaking where they differ.
//! - [`say!`]: a line on stdout for a command's console, dropped rather than a panic when
//!   stdout is closed (`keel up | head -3`).

/// `println!` that never panics: a closed stdout (`keel up | head -3`) drops the line instead
/// of killing the process.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use ::std::io::Write as _;
        let _ = ::std::writeln!(::std::io::stdout(), $($arg)*);
    }};
}

pub mod accept;
mod backoff;
mod bucket;
pub mod duration;
mod http;
mod rewind;
mod stop;

pub use accept::{AcceptLoop, ConnectionStats, Drain};
pub use backoff::Backoff;
pub use bucket::TokenBucket;
pub use http::{answers_ok, serve_http1};
pub use rewind::Rewind;
pub use stop::{SUPERVISOR_ENV, stop_requested};

/// Whether `a` and `b` are equal, in a time that depends on their lengths only, not on where
/// they first differ: for tokens and keys, so a client cannot find a secret byte by byte by
/// timing its guesses.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_equal_only_when_equal() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(constant_time_eq(b"", b""));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret!"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
