//! The access log: one JSON object per request, written by a thread of its own so a slow disk
//! never holds up a request. When the writer falls behind by more than the buffer, lines are
//! dropped and counted (`keel_gateway_access_log_dropped_total`) rather than queued without
//! bound.

use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc;

/// Lines buffered between requests and the writer thread.
const BUFFER: usize = 64 * 1024;

/// An open access log.
#[derive(Debug)]
pub(crate) struct AccessLog {
    /// Where it goes, as configured (to reuse the log across reloads).
    pub(crate) target: String,
    tx: mpsc::SyncSender<String>,
    dropped: AtomicU64,
}

impl AccessLog {
    /// Opens `target`: `"stdout"` or a file, appended to.
    pub(crate) fn open(target: &str) -> std::io::Result<AccessLog> {
        let mut out: Box<dyn std::io::Write + Send> = if target == "stdout" {
            Box::new(std::io::stdout())
        } else {
            Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(target)?,
            )
        };
        let (tx, rx) = mpsc::sync_channel::<String>(BUFFER);
        std::thread::Builder::new()
            .name("keel-access-log".into())
            .spawn(move || {
                let mut buf = Vec::with_capacity(64 * 1024);
                while let Ok(line) = rx.recv() {
                    buf.extend_from_slice(line.as_bytes());
                    buf.push(b'\n');
                    // Write what has gathered in one go.
                    while let Ok(line) = rx.try_recv() {
                        buf.extend_from_slice(line.as_bytes());
                        buf.push(b'\n');
                        if buf.len() > 1 << 20 {
                            break;
                        }
                    }
                    if let Err(e) = out.write_all(&buf).and_then(|()| out.flush()) {
                        tracing::warn!(error = %e, "access log write failed");
                    }
                    buf.clear();
                }
            })?;
        Ok(AccessLog {
            target: target.to_owned(),
            tx,
            dropped: AtomicU64::new(0),
        })
    }

    /// Logs one request.
    pub(crate) fn write(&self, entry: &Entry<'_>) {
        let line = serde_json::to_string(entry).unwrap_or_default();
        if self.tx.try_send(line).is_err() {
            self.dropped.fetch_add(1, Relaxed);
        }
    }

    /// Lines lost because the writer fell behind.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Relaxed)
    }
}

/// One line of the log.
#[derive(Debug, serde::Serialize)]
pub(crate) struct Entry<'a> {
    /// Unix time in milliseconds when the request arrived.
    pub(crate) ts_ms: u64,
    pub(crate) client: String,
    pub(crate) method: &'a str,
    pub(crate) host: Option<&'a str>,
    pub(crate) path: &'a str,
    pub(crate) status: u16,
    /// Microseconds to the response head.
    pub(crate) duration_us: u64,
    pub(crate) route: Option<&'a str>,
    pub(crate) upstream_server: Option<&'a str>,
    pub(crate) cache: Option<&'a str>,
}
