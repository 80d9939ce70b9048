//! Routing: the first route whose host, path, method and headers all match serves a request;
//! its path is then rewritten (prefix stripped and/or added) for the upstream.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};

use crate::config::RouteConfig;
use crate::headers::Lookup;

/// Where a route sends its requests.
#[derive(Debug)]
pub(crate) enum Target {
    /// The upstream pool with this index.
    Upstream(usize),
    /// Files under a directory.
    Static(crate::static_files::StaticDir),
    /// A Keel RPC service.
    Rpc(Box<crate::bridge::Bridge>),
}

/// A route, compiled.
#[derive(Debug)]
pub(crate) struct Route {
    /// Its name in metrics and logs.
    pub(crate) name: String,
    pub(crate) target: Target,
    pub(crate) cache: Option<Arc<crate::cache::Cache>>,
    pub(crate) metrics: Arc<crate::metrics::RouteMetrics>,
    host: Option<String>,
    path: Option<String>,
    prefix: Option<String>,
    methods: Vec<Method>,
    headers: Vec<(HeaderName, HeaderValue)>,
    strip: Option<String>,
    add: Option<String>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) addresses: crate::filter::AddressFilter,
    pub(crate) rate_limits: Vec<crate::filter::RateLimiter>,
    /// Overrides the server's body limit.
    pub(crate) max_body_bytes: Option<u64>,
    pub(crate) auth: Option<crate::auth::Auth>,
    pub(crate) gate: Option<Arc<crate::gate::Gate>>,
}

/// The routes in order.
#[derive(Debug, Default)]
pub(crate) struct Router {
    routes: Vec<Route>,
}

impl Route {
    /// Compiles a route named `name` (counting into `metrics`); `upstream` is its pool's index
    /// if it proxies. Names and values were validated with the configuration; a header that
    /// still does not parse is an error here.
    pub(crate) fn compile(
        config: &RouteConfig,
        name: String,
        upstream: Option<usize>,
        metrics: Arc<crate::metrics::RouteMetrics>,
    ) -> Result<Route, String> {
        let target = match (upstream, &config.static_dir, &config.rpc) {
            (Some(i), _, _) => Target::Upstream(i),
            (None, Some(dir), _) => Target::Static(crate::static_files::StaticDir::new(dir)?),
            (None, None, Some(rpc)) => {
                let claim_headers = config
                    .auth
                    .as_ref()
                    .and_then(|a| a.jwt.as_ref())
                    .map(|j| {
                        j.forward_claims
                            .values()
                            .map(|h| h.to_ascii_lowercase())
                            .collect()
                    })
                    .unwrap_or_default();
                Target::Rpc(Box::new(crate::bridge::Bridge::new(rpc, claim_headers)))
            }
            (None, None, None) => return Err("no upstream, static_dir or rpc".into()),
        };
        let headers = config
            .headers
            .iter()
            .map(|(k, v)| {
                let name = HeaderName::from_bytes(k.as_bytes())
                    .map_err(|_| format!("{k:?} is not a header name"))?;
                let value =
                    HeaderValue::from_str(v).map_err(|_| format!("{v:?} is not a header value"))?;
                Ok((name, value))
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Route {
            name,
            target,
            cache: config
                .cache
                .as_ref()
                .map(|c| Arc::new(crate::cache::Cache::new(c))),
            metrics,
            host: config.host.as_ref().map(|h| h.to_ascii_lowercase()),
            path: config.path.clone(),
            prefix: config.path_prefix.clone(),
            methods: config
                .methods
                .iter()
                .filter_map(|m| Method::from_bytes(m.to_ascii_uppercase().as_bytes()).ok())
                .collect(),
            headers,
            strip: config.strip_prefix.clone(),
            add: config.add_prefix.clone(),
            timeout: config.timeout,
            addresses: crate::filter::AddressFilter::new(&config.allow, &config.deny),
            rate_limits: config
                .rate_limit
                .iter()
                .chain(&config.rate_limits)
                .map(|l| {
                    let auth = config.auth.as_ref();
                    crate::filter::RateLimiter::new(
                        l,
                        auth.map_or("x-api-key", |a| a.api_key_header.as_str()),
                        auth.map_or(&[][..], |a| &a.api_keys[..]),
                    )
                })
                .collect(),
            max_body_bytes: config.max_body_bytes,
            auth: config
                .auth
                .as_ref()
                .map(crate::auth::Auth::new)
                .transpose()?,
            gate: config
                .gate
                .as_ref()
                .map(|g| Arc::new(crate::gate::Gate::new(g))),
        })
    }

    fn matches(
        &self,
        method: &Method,
        host: Option<&str>,
        path: &str,
        headers: &(impl Lookup + ?Sized),
    ) -> bool {
        if let Some(want) = &self.host
            && host.is_none_or(|h| !h.eq_ignore_ascii_case(want))
        {
            return false;
        }
        match (&self.path, &self.prefix) {
            (Some(exact), _) if path != exact => return false,
            (None, Some(prefix)) if !path.starts_with(prefix.as_str()) => return false,
            _ => {}
        }
        if !self.methods.is_empty() && !self.methods.contains(method) {
            return false;
        }
        self.headers
            .iter()
            .all(|(name, value)| headers.value(name) == Some(value.as_bytes()))
    }

    /// What the admin API shows of it.
    pub(crate) fn describe(&self, pools: &[Arc<crate::upstream::Pool>]) -> serde_json::Value {
        let (upstream, static_dir, rpc) = match &self.target {
            Target::Upstream(i) => (pools.get(*i).map(|p| p.name.clone()), None, None),
            Target::Static(dir) => (None, Some(dir.root().display().to_string()), None),
            Target::Rpc(bridge) => (None, None, Some(bridge.service().to_owned())),
        };
        serde_json::json!({
            "name": self.name,
            "host": self.host,
            "path": self.path,
            "path_prefix": self.prefix,
            "methods": self.methods.iter().map(Method::as_str).collect::<Vec<_>>(),
            "headers": self.headers.iter().map(|(n, v)| (n.as_str(), v.to_str().unwrap_or(""))).collect::<std::collections::BTreeMap<_, _>>(),
            "upstream": upstream,
            "static_dir": static_dir,
            "rpc_service": rpc,
            "strip_prefix": self.strip,
            "add_prefix": self.add,
            "timeout_ms": self.timeout.map(|t| t.as_millis() as u64),
            "rate_limits": self.rate_limits.len(),
            "auth": self.auth.is_some(),
            "cache": self.cache.is_some(),
            "requests": self.metrics.total(),
        })
    }

    /// The path (and query) to send upstream.
    pub(crate) fn rewrite(&self, path: &str, query: Option<&str>) -> String {
        let mut rest = path;
        if let Some(strip) = &self.strip
            && let Some(r) = path.strip_prefix(strip.as_str())
        {
            rest = r;
        }
        let mut out = String::with_capacity(path.len() + 16);
        if let Some(add) = &self.add {
            out.push_str(add.trim_end_matches('/'));
        }
        if !rest.starts_with('/') {
            out.push('/');
        }
        out.push_str(rest);
        if let Some(q) = query {
            out.push('?');
            out.push_str(q);
        }
        out
    }
}

impl Router {
    pub(crate) fn new(routes: Vec<Route>) -> Router {
        Router { routes }
    }

    /// The routes in order.
    pub(crate) fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The route for a request, if any, with its index.
    pub(crate) fn find(
        &self,
        method: &Method,
        host: Option<&str>,
        path: &str,
        headers: &(impl Lookup + ?Sized),
    ) -> Option<(usize, &Route)> {
        self.routes
            .iter()
            .enumerate()
            .find(|(_, r)| r.matches(method, host, path, headers))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

    fn route(toml_text: &str) -> Route {
        let config: RouteConfig = toml::from_str(toml_text).unwrap();
        Route::compile(&config, "r".into(), Some(0), Default::default()).unwrap()
    }

    #[test]
    fn matching_and_rewriting() {
        let r = route(
            "upstream = \"a\"\npath_prefix = \"/api/\"\nstrip_prefix = \"/api\"\nmethods = [\"GET\"]\nhost = \"Shop.example\"",
        );
        let h = HeaderMap::new();
        assert!(r.matches(&Method::GET, Some("shop.example"), "/api/items", &h));
        assert!(!r.matches(&Method::POST, Some("shop.example"), "/api/items", &h));
        assert!(!r.matches(&Method::GET, Some("other"), "/api/items", &h));
        assert!(!r.matches(&Method::GET, Some("shop.example"), "/apix", &h));
        assert_eq!(r.rewrite("/api/items", Some("x=1")), "/items?x=1");
        assert_eq!(r.rewrite("/api", None), "/");

        let r = route(
            "upstream = \"a\"\npath = \"/health\"\nadd_prefix = \"/v2/\"\n[headers]\nx-canary = \"1\"",
        );
        let mut h = HeaderMap::new();
        assert!(!r.matches(&Method::GET, None, "/health", &h));
        h.insert("x-canary", HeaderValue::from_static("1"));
        assert!(r.matches(&Method::GET, None, "/health", &h));
        assert!(!r.matches(&Method::GET, None, "/health/x", &h));
        assert_eq!(r.rewrite("/health", None), "/v2/health");
    }
}
