//! The HTTP → RPC bridge: a route whose target is a Keel service. `POST <path>/<Method>` with
//! a JSON body is sent as a unary call of `<service>/<Method>` in the JSON codec through a
//! governed service channel (discovery, balancing, retries within a budget, hedging, outlier
//! ejection); the JSON reply comes back as the answer.
//!
//! What travels as call metadata: `authorization`, headers named `keel-meta-<key>` (as
//! `<key>`), the headers the route's JWT check forwards claims in, and `x-forwarded-for` (the
//! client's address). A `keel-meta-` header naming one of the others is dropped, so a client
//! cannot forge them.
//! RPC errors become the HTTP status of their code (`Code::http_status`) with
//! `{"error": "<code>", "detail": "<message>"}`.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use keel_governance::{Discover, ServiceChannel, ServiceChannelConfig, StaticDiscover};
use keel_rpc::client::{CallTransport, RawRequest};
use keel_rpc::protocol::Text;
use keel_rpc::{CallOptions, Codec};

use crate::bodies::DownBody;
use crate::config::RpcRouteConfig;
use crate::error::{ErrorKind, GatewayError};

/// A route's way to its service; the channel is made on first use (it needs the runtime, and
/// for etcd a connection).
pub(crate) struct Bridge {
    config: RpcRouteConfig,
    /// Headers the route's auth fills with claims, forwarded as metadata.
    claim_headers: Vec<String>,
    channel: tokio::sync::OnceCell<(Arc<dyn Discover>, ServiceChannel)>,
}

impl std::fmt::Debug for Bridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bridge")
            .field("service", &self.config.service)
            .finish_non_exhaustive()
    }
}

impl Bridge {
    pub(crate) fn new(config: &RpcRouteConfig, claim_headers: Vec<String>) -> Bridge {
        Bridge {
            config: config.clone(),
            claim_headers,
            channel: tokio::sync::OnceCell::new(),
        }
    }

    /// The RPC service this route calls.
    pub(crate) fn service(&self) -> &str {
        &self.config.service
    }

    async fn channel(&self) -> Result<&ServiceChannel, String> {
        let (_, channel) = self
            .channel
            .get_or_try_init(|| async {
                let (discover, name): (Arc<dyn Discover>, String) = match &self.config.discovery {
                    Some(d) => (
                        crate::upstream::connect_discovery(d).await?,
                        d.service.clone(),
                    ),
                    None => {
                        let fixed = StaticDiscover::new();
                        fixed.set(
                            &self.config.service,
                            self.config
                                .servers
                                .iter()
                                .map(|a| keel_governance::Instance::new(a.clone(), a.clone()))
                                .collect(),
                        );
                        (Arc::new(fixed), self.config.service.clone())
                    }
                };
                let mut config = ServiceChannelConfig {
                    balancer: self.config.balancer,
                    hedge_after: self.config.hedge_after,
                    ..ServiceChannelConfig::default()
                };
                config.retry.max_attempts = self.config.max_attempts.max(1);
                let channel =
                    ServiceChannel::new(&*discover, &name, config).map_err(|e| e.to_string())?;
                Ok::<_, String>((discover, channel))
            })
            .await?;
        Ok(channel)
    }

    /// The call metadata for a request's headers (see the module docs).
    fn metadata(&self, headers: &http::HeaderMap, peer: std::net::IpAddr) -> Vec<(Text, Bytes)> {
        let mut metadata: Vec<(Text, Bytes)> = Vec::new();
        for (name, value) in headers {
            let name = name.as_str();
            let reserved = |key: &str| {
                key == "authorization"
                    || key == "x-forwarded-for"
                    || self.claim_headers.iter().any(|c| c == key)
            };
            let key = if let Some(key) = name.strip_prefix("keel-meta-") {
                // A client may not pass off its own values as what the gateway vouches for.
                if reserved(key) {
                    continue;
                }
                key
            } else if reserved(name) && name != "x-forwarded-for" {
                name
            } else {
                continue;
            };
            metadata.push((Text::from(key), Bytes::copy_from_slice(value.as_bytes())));
        }
        metadata.push((Text::from("x-forwarded-for"), Bytes::from(peer.to_string())));
        metadata
    }

    /// Serves one request; `method` is the path after the route's rewrite (`/<Method>`).
    pub(crate) async fn serve<B>(
        &self,
        method: &str,
        parts: http::request::Parts,
        body: B,
        peer: std::net::IpAddr,
        max_body: u64,
    ) -> Response<DownBody>
    where
        B: hyper::body::Body<Data = bytes::Bytes>,
        B::Error: Into<crate::bodies::BoxError>,
    {
        if parts.method != Method::POST {
            return GatewayError::new(
                ErrorKind::MethodNotAllowed,
                "RPC methods are called with POST and a JSON body",
            )
            .with_header(header::ALLOW, HeaderValue::from_static("POST"))
            .into_response();
        }
        let method = method.trim_start_matches('/');
        if method.is_empty()
            || method.contains('/')
            || !method
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return GatewayError::new(
                ErrorKind::NotFound,
                format!(
                    "call POST <route>/<Method> on {}; {method:?} is not a method name",
                    self.config.service
                ),
            )
            .into_response();
        }
        let body = match Limited::new(body, usize::try_from(max_body).unwrap_or(usize::MAX))
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                return GatewayError::new(ErrorKind::BodyTooLarge, e.to_string()).into_response();
            }
        };
        let metadata = self.metadata(&parts.headers, peer);
        let channel = match self.channel().await {
            Ok(c) => c,
            Err(e) => return GatewayError::new(ErrorKind::Unavailable, e).into_response(),
        };
        let request = RawRequest {
            service: Text::from(self.config.service.as_str()),
            method: Text::from(method),
            body,
            options: CallOptions {
                timeout: Some(self.config.timeout),
                codec: Codec::Json,
                metadata,
                hash_key: None,
            },
        };
        match channel.unary_raw(request).await {
            Ok(reply) if reply.codec == Codec::Json => {
                let mut resp = Response::new(Full::new(reply.body).map_err(|e| match e {}).boxed());
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                resp
            }
            Ok(reply) => GatewayError::new(
                ErrorKind::BadGateway,
                format!(
                    "the service replied in {} instead of JSON",
                    reply.codec.as_str()
                ),
            )
            .into_response(),
            // The service's own error, relayed: its code, and the HTTP status the code maps to.
            Err(status) => crate::error::json_error(
                StatusCode::from_u16(status.code().http_status())
                    .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                status.code().as_str(),
                status.message(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_cannot_forge_what_the_gateway_vouches_for() {
        let config: RpcRouteConfig =
            toml::from_str("service = \"a.B\"\nservers = [\"127.0.0.1:1\"]").unwrap();
        let bridge = Bridge::new(&config, vec!["x-user-id".into()]);
        let mut headers = http::HeaderMap::new();
        headers.insert("authorization", "Bearer t".parse().unwrap());
        headers.insert("x-user-id", "alice".parse().unwrap());
        headers.insert("keel-meta-trace", "t-1".parse().unwrap());
        headers.insert("keel-meta-x-user-id", "mallory".parse().unwrap());
        headers.insert("keel-meta-authorization", "Bearer forged".parse().unwrap());
        headers.insert("keel-meta-x-forwarded-for", "10.9.9.9".parse().unwrap());
        headers.insert("x-forwarded-for", "10.8.8.8".parse().unwrap());
        let meta = bridge.metadata(&headers, "127.0.0.1".parse().unwrap());
        let pairs: Vec<(&str, &[u8])> = meta.iter().map(|(k, v)| (k.as_str(), &v[..])).collect();
        let get = |key: &str| -> Vec<&[u8]> {
            pairs
                .iter()
                .filter(|(k, _)| *k == key)
                .map(|(_, v)| *v)
                .collect()
        };
        assert_eq!(get("x-user-id"), vec![&b"alice"[..]]);
        assert_eq!(get("authorization"), vec![&b"Bearer t"[..]]);
        assert_eq!(get("trace"), vec![&b"t-1"[..]]);
        assert_eq!(get("x-forwarded-for"), vec![&b"127.0.0.1"[..]]);
    }
}
