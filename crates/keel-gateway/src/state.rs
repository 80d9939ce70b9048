//! What a request is served with: the compiled configuration in force ([`Shared`]) and what
//! lives as long as the gateway across reloads ([`Inner`]). Every part of the request path
//! reads these; they hold the compiled parts and run none of the path.

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use crate::config::GatewayConfig;
use crate::{access, metrics, router, upstream};

/// One configuration, compiled: what a request is served with.
pub(crate) struct Shared {
    pub(crate) config: GatewayConfig,
    pub(crate) router: router::Router,
    pub(crate) pools: Vec<Arc<upstream::Pool>>,
    pub(crate) tls: Option<tokio_rustls::TlsAcceptor>,
    pub(crate) access: Option<Arc<access::AccessLog>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("router", &self.router)
            .field("pools", &self.pools)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// What lives as long as the gateway, across reloads.
#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) current: ArcSwap<Shared>,
    /// The file the configuration came from, re-read by [`crate::Gateway::reload_file`].
    pub(crate) path: Option<PathBuf>,
    pub(crate) metrics: metrics::Metrics,
    /// Serialises reloads.
    pub(crate) reloading: tokio::sync::Mutex<()>,
    /// Cancelled when `serve` stops: ends WebSocket tunnels (which live outside connections).
    pub(crate) stopping: CancellationToken,
    /// When the gateway was built, for `/status`.
    pub(crate) started: std::time::Instant,
}
