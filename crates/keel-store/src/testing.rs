//! Support for test suites that need a NATS server with JetStream (hidden from the docs; not
//! part of the API): where the server is, whether it answers (skipping with a message, or
//! failing under `KEEL_REQUIRE_SERVICES=1`), unique stream names, and streams deleted when a
//! test ends, also when it fails.

use std::future::Future;
use std::time::Duration;

/// The server the suites use: `KEEL_NATS_URL`, or `nats://127.0.0.1:4222`.
pub fn nats_url() -> String {
    std::env::var("KEEL_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// Whether the server answers. When it does not, prints that `test` is skipped, or panics
/// when `KEEL_REQUIRE_SERVICES=1`.
pub fn nats_up(test: &str) -> bool {
    let url = nats_url();
    let up = url
        .trim_start_matches("nats://")
        .parse::<std::net::SocketAddr>()
        .is_ok_and(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(1)).is_ok());
    if !up {
        assert!(
            std::env::var("KEEL_REQUIRE_SERVICES").as_deref() != Ok("1"),
            "{test}: NATS is required (KEEL_REQUIRE_SERVICES=1) but nothing answers at {url}"
        );
        eprintln!("skipping {test}: no NATS server at {url}");
    }
    up
}

/// A stream name no other test run uses.
pub fn unique_stream(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("keel-test-{prefix}-{}-{nanos}", std::process::id())
}

/// Runs `f` with a JetStream context for `url`, on a thread and runtime of its own (so it
/// works from synchronous tests and from `Drop`).
pub fn on_nats<T, F>(
    url: &str,
    f: impl FnOnce(async_nats::jetstream::Context) -> F + Send + 'static,
) -> Option<T>
where
    T: Send + 'static,
    F: Future<Output = T>,
{
    let url = url.to_owned();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        rt.block_on(async {
            let client = async_nats::connect(url.as_str()).await.ok()?;
            Some(f(async_nats::jetstream::new(client)).await)
        })
    })
    .join()
    .ok()
    .flatten()
}

/// Streams on the server at `url`, deleted when dropped.
#[derive(Debug)]
pub struct DeleteStreams {
    /// The server.
    pub url: String,
    /// The streams.
    pub names: Vec<String>,
}

impl DeleteStreams {
    /// Streams `names` on the suites' server.
    pub fn new(names: Vec<String>) -> DeleteStreams {
        DeleteStreams {
            url: nats_url(),
            names,
        }
    }

    /// How many messages each stream holds (0 for one that does not exist).
    pub fn messages(&self) -> Vec<u64> {
        let names = self.names.clone();
        on_nats(&self.url, move |js| async move {
            let mut counts = Vec::new();
            for name in names {
                let n = match js.get_stream(&name).await {
                    Ok(mut s) => s.info().await.map_or(0, |i| i.state.messages),
                    Err(_) => 0,
                };
                counts.push(n);
            }
            counts
        })
        .unwrap_or_default()
    }
}

impl Drop for DeleteStreams {
    fn drop(&mut self) {
        let names = std::mem::take(&mut self.names);
        on_nats(&self.url, move |js| async move {
            for name in names {
                let _ = js.delete_stream(&name).await;
            }
        });
    }
}
