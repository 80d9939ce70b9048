//! The chat instance's HTTP side: demo login, the WebSocket upgrade, and the accept loop
//! (keel-net's, like every Keel server) that runs each connection in one task from its first
//! request to its close frame.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};

use crate::config::ChatConfig;
use crate::conn::{self, Session, check_name};
use crate::hub::{Hub, now_ms};
use crate::ws;

/// The chat page: sign in, rooms, members, messages; reconnects by itself and resumes with
/// `since`.
const PAGE: &str = include_str!("page.html");

/// Largest login request body.
const MAX_LOGIN_BODY: usize = 4096;

/// Addresses whose login buckets are remembered; beyond it, full buckets are forgotten.
const MAX_TRACKED_ADDRESSES: usize = 100_000;

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    /// Not required: a token signed elsewhere with the shared key may leave it out.
    #[serde(default)]
    iat: u64,
}

/// One chat instance: its rooms and what its HTTP side needs.
pub struct Chat {
    hub: Arc<Hub>,
    config: Arc<ChatConfig>,
    encoding: jsonwebtoken::EncodingKey,
    decoding: jsonwebtoken::DecodingKey,
    validation: jsonwebtoken::Validation,
    logins: Mutex<HashMap<IpAddr, keel_net::TokenBucket>>,
    next_peer: AtomicU64,
    stats: Arc<keel_net::ConnectionStats>,
    /// The tasks of the links to other instances, stopped with the server.
    link_tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    started: std::time::Instant,
}

impl std::fmt::Debug for Chat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chat")
            .field("instance", &self.hub.instance())
            .field("connections", &self.stats.open.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// A WebSocket accepted by the HTTP side, to be served once hyper hands the socket over.
struct Accepted {
    upgrade: hyper::upgrade::OnUpgrade,
    /// A client's session, or `None` for a link from another instance.
    session: Option<Session>,
}

/// The subject of the tokens instances sign for their links to each other: a control
/// character keeps it out of every user name, so no login can mint one.
const RELAY_SUBJECT: &str = "\u{1}relay";

type Slot = Arc<Mutex<Option<Accepted>>>;

impl Chat {
    /// An instance with its rooms opened from `config.data_dir`.
    pub async fn open(config: ChatConfig) -> anyhow::Result<Arc<Chat>> {
        config.check()?;
        let links = if config.peers.is_empty() {
            None
        } else {
            let names = config.peer_list()?;
            Some(crate::cluster::Links::new(&crate::cluster::LinkConfig {
                me: config.instance.clone(),
                names: names.into_iter().map(|(name, _)| name).collect(),
                request_timeout: config.request_timeout,
                peer_timeout: config.peer_timeout,
                list_bytes: match config.nats.as_str() {
                    "" => crate::hub::MAX_LIST_BYTES,
                    _ => crate::hub::NATS_LIST_BYTES,
                },
            })?)
        };
        let target = keel_store::LogTarget::choose(
            Some(config.journal.as_str()),
            &config.data_dir,
            &format!("keel-chat-{}", config.instance),
        )?;
        let hub = Hub::open_log(
            target,
            crate::hub::HubConfig {
                instance: config.instance.clone(),
                history: config.history,
                max_members: config.max_members_per_room,
                snapshot_every: config.snapshot_every,
                ..crate::hub::HubConfig::default()
            },
            links,
        )
        .await?;
        let secret = if config.secret.is_empty() {
            rand::random::<[u8; 32]>().to_vec()
        } else {
            config.secret.as_bytes().to_vec()
        };
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Ok(Arc::new(Chat {
            hub,
            encoding: jsonwebtoken::EncodingKey::from_secret(&secret),
            decoding: jsonwebtoken::DecodingKey::from_secret(&secret),
            validation,
            config: Arc::new(config),
            logins: Mutex::default(),
            next_peer: AtomicU64::new(1),
            stats: Arc::default(),
            link_tasks: Mutex::default(),
            started: std::time::Instant::now(),
        }))
    }

    /// The rooms.
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Connections open now, accepted and refused.
    pub fn connection_stats(&self) -> &keel_net::ConnectionStats {
        &self.stats
    }

    /// Registers the instance in the naming service at `registry` (service `chat`, its name
    /// in the label `instance`) under a lease kept alive in the background.
    async fn register(
        &self,
        registry: &str,
        address: SocketAddr,
    ) -> anyhow::Result<(
        keel_registry::Naming,
        keel_registry::Registration<keel_registry::Naming>,
    )> {
        let naming = keel_registry::Naming::connect(registry)
            .await
            .map_err(|e| anyhow::anyhow!("registry {registry}: {e}"))?;
        let instance = keel_registry::proto::Instance {
            namespace: crate::transport::NAMESPACE.into(),
            service: crate::transport::SERVICE.into(),
            // The process id: a restarted instance registers anew while the dead one's
            // lease runs out, and the newest (`started`) is the one its peers pick.
            id: format!("{}/{}", self.config.instance, std::process::id()),
            address: address.to_string(),
            metadata: [
                ("instance".to_owned(), self.config.instance.clone()),
                ("started".to_owned(), now_ms().to_string()),
            ]
            .into_iter()
            .collect(),
            ..Default::default()
        };
        let registration = keel_registry::Registration::start(
            naming.clone(),
            instance,
            std::time::Duration::from_secs(3),
        )
        .await
        .map_err(|e| anyhow::anyhow!("registering in {registry}: {e}"))?;
        Ok((naming, registration))
    }

    /// Starts the links to the other instances (when there are any), finding them at their
    /// fixed addresses or through `naming`.
    async fn start_links(&self, naming: Option<&keel_registry::Naming>) -> anyhow::Result<()> {
        if self.hub.links().is_none() {
            return Ok(());
        }
        let fixed = self
            .config
            .peer_list()?
            .into_iter()
            .filter_map(|(name, address)| Some((name, address?)))
            .collect();
        let discover = naming.map(|naming| {
            Box::new(keel_registry::RegistryDiscover::new(
                naming.clone(),
                crate::transport::NAMESPACE,
            )) as Box<dyn keel_governance::Discover>
        });
        let addresses = crate::transport::Addresses::new(fixed, discover)?;
        // A token per connection, good for a minute: it only has to open the link.
        let key = self.encoding.clone();
        let token: crate::transport::TokenMaker = Arc::new(move || {
            let iat = now_ms() / 1000;
            let claims = Claims {
                sub: RELAY_SUBJECT.into(),
                exp: iat + 60,
                iat,
            };
            jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key)
                .unwrap_or_default()
        });
        let nats = (!self.config.nats.is_empty()).then_some(self.config.nats.as_str());
        let tasks = crate::transport::start(&self.hub, nats, addresses, token).await?;
        self.link_tasks.lock().extend(tasks);
        Ok(())
    }

    /// Serves `listener` until `shutdown` completes; open WebSockets are then closed with
    /// 1001, and the journal is closed after them. With peers, the links to them start
    /// first, and with a registry the instance registers there (and deregisters at the end).
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let address = listener.local_addr()?;
        let registered = match self.config.registry.as_str() {
            "" => None,
            registry => Some(self.register(registry, address).await?),
        };
        self.start_links(registered.as_ref().map(|(naming, _)| naming))
            .await?;
        let chat = self.clone();
        let result = keel_net::AcceptLoop::new(self.stats.clone())
            .max_connections(self.config.max_connections)
            .shutdown_grace(std::time::Duration::from_secs(5))
            .run(listener, shutdown, move |stream, peer, drain| {
                chat.clone().connection(stream, peer, drain)
            })
            .await;
        if let Some((_, registration)) = registered
            && let Err(e) = registration.deregister().await
        {
            tracing::warn!(error = %e, "deregistering the chat instance failed");
        }
        for task in self.link_tasks.lock().drain(..) {
            task.abort();
        }
        if let Err(e) = self.hub.close().await {
            tracing::warn!(error = %e, "closing the chat journal failed");
        }
        Ok(result?)
    }

    /// One TCP connection: HTTP requests until one upgrades, then the WebSocket.
    async fn connection(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        drain: keel_net::Drain,
    ) {
        let slot: Slot = Arc::default();
        let service = {
            let chat = self.clone();
            let slot = slot.clone();
            hyper::service::service_fn(move |req| {
                let chat = chat.clone();
                let slot = slot.clone();
                async move {
                    Ok::<_, std::convert::Infallible>(chat.handle(req, peer.ip(), &slot).await)
                }
            })
        };
        // Boxed, so hyper's connection state is freed when the upgrade hands the socket over
        // rather than staying in this task's memory for the WebSocket's whole life.
        Box::pin(keel_net::serve_http1(
            stream,
            service,
            std::time::Duration::from_secs(10),
            drain.clone(),
        ))
        .await;
        let Some(accepted) = slot.lock().take() else {
            return;
        };
        let upgraded = match accepted.upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "the WebSocket upgrade did not complete");
                return;
            }
        };
        let Ok(parts) = upgraded.downcast::<TokioIo<TcpStream>>() else {
            tracing::warn!(%peer, "upgraded connection of an unexpected type");
            return;
        };
        let Some(session) = accepted.session else {
            crate::transport::inbound(
                self.hub.clone(),
                parts.io.into_inner(),
                parts.read_buf,
                drain,
            )
            .await;
            return;
        };
        let id = self.next_peer.fetch_add(1, Ordering::Relaxed);
        conn::run(
            self.hub.clone(),
            self.config.clone(),
            parts.io.into_inner(),
            parts.read_buf,
            session,
            id,
            drain,
        )
        .await;
    }

    async fn handle(
        &self,
        req: Request<Incoming>,
        ip: IpAddr,
        slot: &Slot,
    ) -> Response<Full<Bytes>> {
        let path = req.uri().path();
        match (req.method(), path) {
            (&Method::GET, "/chat/") => {
                let mut answer = Response::new(Full::new(Bytes::from_static(PAGE.as_bytes())));
                let h = answer.headers_mut();
                h.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/html; charset=utf-8"),
                );
                h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
                answer
            }
            (&Method::GET, "/chat") => {
                let mut answer = Response::new(Full::new(Bytes::new()));
                *answer.status_mut() = StatusCode::MOVED_PERMANENTLY;
                answer
                    .headers_mut()
                    .insert(header::LOCATION, HeaderValue::from_static("/chat/"));
                answer
            }
            (&Method::POST, "/chat/api/login") => self.login(req, ip).await,
            (&Method::GET, "/chat/ws") => self.upgrade(req, slot, false),
            (&Method::GET, "/chat/relay") if self.hub.links().is_some() => {
                self.upgrade(req, slot, true)
            }
            (&Method::GET, "/chat/api/health") => json(
                StatusCode::OK,
                &serde_json::json!({
                    "instance": self.hub.instance(),
                    "connections": self.stats.open.load(Ordering::Relaxed),
                }),
            ),
            // The operations endpoints every Keel server has, on the instance's own port.
            (&Method::GET, "/health") => {
                json(StatusCode::OK, &serde_json::json!({"status": "serving"}))
            }
            (&Method::GET, "/status") => json(StatusCode::OK, &self.status()),
            (&Method::GET, "/metrics") => {
                let mut answer = Response::new(Full::new(Bytes::from(self.metrics())));
                answer.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                answer
            }
            (_, "/chat/api/login" | "/chat/ws" | "/chat/api/health") => error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "wrong method for this path",
            ),
            _ => error(StatusCode::NOT_FOUND, "not_found", "no such path"),
        }
    }

    /// `GET /status`: the instance, its uptime, connections and rooms.
    fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "instance": self.hub.instance(),
            "uptime_s": self.started.elapsed().as_secs(),
            "connections": self.stats.open.load(Ordering::Relaxed),
            "rooms": self.hub.room_count(),
            "mirrored_rooms": self.hub.links().map_or(0, crate::cluster::Links::mirrored_rooms),
            "messages_stored": self.hub.messages_stored(),
        })
    }

    /// `GET /metrics`: the same figures in Prometheus's text format.
    fn metrics(&self) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
            ));
        };
        metric(
            "keel_chat_uptime_seconds",
            "gauge",
            "Seconds since the instance started.",
            self.started.elapsed().as_secs(),
        );
        metric(
            "keel_chat_connections",
            "gauge",
            "WebSocket and HTTP connections open.",
            self.stats.open.load(Ordering::Relaxed) as u64,
        );
        metric(
            "keel_chat_rooms",
            "gauge",
            "Rooms held in memory by this instance.",
            self.hub.room_count() as u64,
        );
        metric(
            "keel_chat_mirrored_rooms",
            "gauge",
            "Rooms held by other instances with connections here.",
            self.hub
                .links()
                .map_or(0, crate::cluster::Links::mirrored_rooms) as u64,
        );
        metric(
            "keel_chat_messages_stored_total",
            "counter",
            "Messages journaled since the start.",
            self.hub.messages_stored(),
        );
        out
    }

    async fn login(&self, req: Request<Incoming>, ip: IpAddr) -> Response<Full<Bytes>> {
        if !self.login_allowed(ip) {
            let mut answer = error(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                &format!(
                    "at most {} logins per second from one address",
                    self.config.logins_per_second
                ),
            );
            answer
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return answer;
        }
        let body = match Limited::new(req.into_body(), MAX_LOGIN_BODY)
            .collect()
            .await
        {
            Ok(body) => body.to_bytes(),
            Err(_) => {
                return error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    &format!("a login body is at most {MAX_LOGIN_BODY} bytes"),
                );
            }
        };
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Login {
            user: String,
        }
        let login: Login = match serde_json::from_slice(&body) {
            Ok(login) => login,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    &format!("send {{\"user\": NAME}}: {e}"),
                );
            }
        };
        if let Err(detail) = check_name(&login.user, "user") {
            return error(StatusCode::BAD_REQUEST, "bad_name", &detail.to_string());
        }
        let iat = now_ms() / 1000;
        let claims = Claims {
            sub: login.user,
            exp: iat + self.config.token_ttl.as_secs().max(1),
            iat,
        };
        match jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &self.encoding) {
            Ok(token) => json(
                StatusCode::OK,
                &serde_json::json!({ "token": token, "expires": claims.exp }),
            ),
            Err(e) => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                &e.to_string(),
            ),
        }
    }

    fn login_allowed(&self, ip: IpAddr) -> bool {
        let (rate, burst) = (self.config.logins_per_second, self.config.login_burst);
        let now = tokio::time::Instant::now();
        let mut logins = self.logins.lock();
        if logins.len() >= MAX_TRACKED_ADDRESSES {
            logins.retain(|_, bucket| !bucket.is_full(rate, burst, now));
        }
        logins
            .entry(ip)
            .or_insert(keel_net::TokenBucket::full(burst, now))
            .take(rate, burst, now)
            .is_ok()
    }

    /// Accepts a WebSocket: a client's (`relay` false) or another instance's link.
    fn upgrade(
        &self,
        mut req: Request<Incoming>,
        slot: &Slot,
        relay: bool,
    ) -> Response<Full<Bytes>> {
        let headers = req.headers();
        let has = |name: header::HeaderName, token: &str| {
            headers.get_all(name).iter().any(|v| {
                v.to_str()
                    .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            })
        };
        if !has(header::UPGRADE, "websocket") || !has(header::CONNECTION, "upgrade") {
            return error(
                StatusCode::UPGRADE_REQUIRED,
                "upgrade_required",
                "connect with a WebSocket upgrade",
            );
        }
        if headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .map(HeaderValue::as_bytes)
            != Some(b"13")
        {
            let mut answer = error(
                StatusCode::UPGRADE_REQUIRED,
                "bad_version",
                "WebSocket version 13 only",
            );
            answer.headers_mut().insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
            return answer;
        }
        let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "no Sec-WebSocket-Key",
            );
        };
        if let Some(origin) = headers.get(header::ORIGIN) {
            let allowed = &self.config.allowed_origins;
            if !allowed.is_empty() && !allowed.iter().any(|a| a.as_bytes() == origin.as_bytes()) {
                return error(
                    StatusCode::FORBIDDEN,
                    "bad_origin",
                    "this origin may not connect",
                );
            }
        }
        let token = req
            .uri()
            .query()
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("token=")));
        let Some(token) = token else {
            return error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "connect with ?token= from /chat/api/login",
            );
        };
        let claims = match jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation) {
            Ok(data) => data.claims,
            Err(e) => {
                return error(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    &format!("token refused: {e}"),
                );
            }
        };
        let session = if relay {
            if claims.sub != RELAY_SUBJECT {
                return error(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "links between instances need an instance's token",
                );
            }
            None
        } else {
            if check_name(&claims.sub, "user").is_err() {
                return error(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "token names no valid user",
                );
            }
            Some(Session {
                user: Arc::from(claims.sub),
                expires: claims.exp,
            })
        };
        let accept = ws::accept_key(key.as_bytes());
        *slot.lock() = Some(Accepted {
            upgrade: hyper::upgrade::on(&mut req),
            session,
        });
        let mut answer = Response::new(Full::new(Bytes::new()));
        *answer.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = answer.headers_mut();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        if let Ok(accept) = HeaderValue::from_str(&accept) {
            h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        }
        answer
    }
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut answer = Response::new(Full::new(Bytes::from(value.to_string())));
    *answer.status_mut() = status;
    answer.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    answer
}

fn error(status: StatusCode, code: &str, detail: &str) -> Response<Full<Bytes>> {
    json(
        status,
        &serde_json::json!({ "error": code, "detail": detail }),
    )
}
