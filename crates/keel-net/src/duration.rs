//! Durations in config files, written as whole milliseconds (`idle_timeout_ms = 30000`).
//!
//! One rule everywhere in Keel: a required duration of `0` is zero (an immediate timeout, no
//! wait); an optional one ([`opt_ms`]) of `0` is off, the same as leaving it out. Use them
//! with serde's `with` attribute:
//!
//! ```
//! use std::time::Duration;
//!
//! #[derive(serde::Deserialize)]
//! struct Settings {
//!     #[serde(with = "keel_net::duration::ms", rename = "grace_ms")]
//!     grace: Duration,
//!     #[serde(with = "keel_net::duration::opt_ms", rename = "deadline_ms")]
//!     deadline: Option<Duration>,
//! }
//!
//! let s: Settings = serde_json::from_str(r#"{"grace_ms": 1500, "deadline_ms": 0}"#).unwrap();
//! assert_eq!(s.grace, Duration::from_millis(1500));
//! assert_eq!(s.deadline, None);
//! ```

/// A [`Duration`](std::time::Duration) as whole milliseconds; `0` is zero.
pub mod ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Reads whole milliseconds.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }

    /// Writes whole milliseconds (a fraction of a millisecond is dropped).
    pub fn serialize<S: Serializer>(value: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(value.as_millis()).unwrap_or(u64::MAX))
    }
}

/// An optional [`Duration`](std::time::Duration) as whole milliseconds; `0` is `None` (off).
pub mod opt_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Reads whole milliseconds, `0` as `None`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let ms = u64::deserialize(d)?;
        Ok((ms > 0).then(|| Duration::from_millis(ms)))
    }

    /// Writes whole milliseconds, `None` as `0`.
    pub fn serialize<S: Serializer>(value: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        let ms = value.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        s.serialize_u64(ms)
    }
}
