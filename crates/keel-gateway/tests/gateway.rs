//! The gateway in front of real upstream HTTP servers on loopback.

mod common;

use common::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use keel_gateway::{Gateway, GatewayConfig};

#[tokio::test]
async fn routes_by_host_path_method_and_header_and_rewrites_prefixes() {
    let (a, b, c) = (
        upstream("a").await,
        upstream("b").await,
        upstream("c").await,
    );
    let gw = gateway(&format!(
        r#"
[upstreams.api]
servers = [{{ address = "{a}" }}]
[upstreams.canary]
servers = [{{ address = "{b}" }}]
[upstreams.shop]
servers = [{{ address = "{c}" }}]

[[routes]]
path_prefix = "/api/"
upstream = "canary"
[routes.headers]
x-canary = "1"

[[routes]]
path_prefix = "/api/"
methods = ["GET", "POST"]
upstream = "api"
strip_prefix = "/api"
add_prefix = "/v1"

[[routes]]
host = "shop.example"
path = "/"
upstream = "shop"
"#
    ))
    .await;
    let r = send(gw, "GET", "/api/items?x=1", &[], "").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        (r.json["server"].as_str(), r.json["path"].as_str()),
        (Some("a"), Some("/v1/items?x=1"))
    );
    let r = send(gw, "GET", "/api/items", &[("x-canary", "1")], "").await;
    assert_eq!(r.json["server"], "b");
    let r = send(gw, "POST", "/api/orders", &[], "hello").await;
    assert_eq!(
        (r.json["server"].as_str(), r.json["body"].as_str()),
        (Some("a"), Some("hello"))
    );
    let r = send(gw, "DELETE", "/api/orders", &[], "").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.json["error"], "no_route");
    let r = send(gw, "GET", "/", &[("host", "shop.example:8080")], "").await;
    assert_eq!(r.json["server"], "c");
    assert_eq!(
        r.json["host"], "shop.example:8080",
        "the client's Host is kept"
    );
    let r = send(gw, "GET", "/", &[("host", "other.example")], "").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn balances_across_servers_by_weight() {
    let (a, b) = (upstream("a").await, upstream("b").await);
    let gw = gateway(&format!(
        r#"
[upstreams.api]
servers = [{{ address = "{a}", weight = 300 }}, {{ address = "{b}", weight = 100 }}]
balancer = "weighted"
[[routes]]
path_prefix = "/"
upstream = "api"
"#
    ))
    .await;
    let mut counts = std::collections::HashMap::new();
    for _ in 0..40 {
        let r = send(gw, "GET", "/", &[], "").await;
        *counts
            .entry(r.json["server"].as_str().unwrap().to_owned())
            .or_insert(0) += 1;
    }
    assert_eq!((counts["a"], counts["b"]), (30, 10));
}

#[tokio::test]
async fn a_dead_server_costs_idempotent_requests_nothing_and_others_get_502() {
    let a = upstream("a").await;
    let dead = dead_addr();
    let gw = gateway(&format!(
        r#"
[upstreams.api]
servers = [{{ address = "{dead}" }}, {{ address = "{a}" }}]
[[routes]]
path_prefix = "/"
upstream = "api"
"#
    ))
    .await;
    for _ in 0..10 {
        let r = send(gw, "GET", "/x", &[], "").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.json);
        assert_eq!(r.json["server"], "a");
    }
    // The dead server failed five connects in a row: it is ejected, so even requests that
    // cannot be retried now go to the live one.
    for _ in 0..4 {
        let r = send(gw, "POST", "/x", &[], "body").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.json);
    }
}

#[tokio::test]
async fn a_request_with_a_body_is_not_retried_and_gets_a_clear_502() {
    let dead = dead_addr();
    let gw = one_upstream(dead).await;
    let r = send(gw, "POST", "/orders", &[], "{}").await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.json["error"], "bad_gateway");
    assert!(
        r.json["detail"]
            .as_str()
            .unwrap()
            .contains(&dead.to_string())
    );
}

#[tokio::test]
async fn a_slow_upstream_is_cut_off_with_504() {
    let a = upstream("a").await;
    let gw = gateway(&format!(
        r#"
[upstreams.api]
servers = [{{ address = "{a}" }}]
[[routes]]
path = "/slow"
upstream = "api"
timeout_ms = 200
"#
    ))
    .await;
    let r = send(gw, "GET", "/slow", &[], "").await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(r.json["error"], "upstream_timeout");
}

#[tokio::test]
async fn hop_by_hop_headers_stay_on_their_hop_and_forwarding_headers_are_added() {
    let a = upstream("a").await;
    let gw = one_upstream(a).await;
    let r = send(
        gw,
        "GET",
        "/",
        &[
            ("connection", "x-hop"),
            ("x-hop", "secret"),
            ("x-forwarded-for", "10.0.0.1"),
        ],
        "",
    )
    .await;
    assert_eq!(
        r.json["x_hop"], "",
        "a header named by Connection is not forwarded"
    );
    assert_eq!(r.json["xff"], "10.0.0.1, 127.0.0.1");
    assert!(
        r.headers.get("keep-alive").is_none(),
        "the upstream's Keep-Alive is not passed back"
    );
}

#[tokio::test]
async fn speaks_http2_to_clients() {
    let a = upstream("a").await;
    let gw = one_upstream(a).await;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let resp = client
        .request(
            Request::get(format!("http://{gw}/h2"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), StatusCode::OK);
    let json: serde_json::Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(json["path"], "/h2");
    assert_eq!(json["host"], gw.to_string(), ":authority became Host");
}

#[test]
fn the_documented_example_config_is_valid() {
    let doc = include_str!("../../../docs/gateway.md");
    let start = doc.find("```toml\n").expect("a toml block") + "```toml\n".len();
    let end = start + doc[start..].find("```").expect("closed");
    let site = tempfile::tempdir().unwrap();
    let text = doc[start..end].replace("/srv/www", site.path().to_str().unwrap());
    let config = GatewayConfig::parse(&text).unwrap();
    assert_eq!(config.routes.len(), 6);
    assert_eq!(config.routes[2].gate.as_ref().unwrap().path_segment, 2);
    assert_eq!(
        config.admin.as_ref().unwrap().token.as_deref(),
        Some("admin-secret")
    );
    assert_eq!(config.upstreams["api"].max_inflight, Some(256));
    assert_eq!(config.upstreams["api"].outlier.consecutive_failures, 5);
    assert_eq!(
        config.upstreams["users"]
            .discovery
            .as_ref()
            .unwrap()
            .service,
        "users-http"
    );
    assert_eq!(
        config.routes[3].rpc.as_ref().unwrap().service,
        "keel.echo.v1.Echo"
    );
    assert_eq!(config.upstreams["api"].servers[0].weight, 200);
    assert_eq!(config.upstreams["api"].servers[1].weight, 100);
    assert_eq!(config.upstreams["api"].health.as_ref().unwrap().fall, 3);
    assert_eq!(
        config.routes[0].auth.as_ref().unwrap().api_keys,
        ["change-me"]
    );
    Gateway::new(config).unwrap();
}

#[tokio::test]
async fn active_health_checks_take_a_sick_server_out_and_bring_it_back() {
    let (sick_a, sick_b) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let a = upstream_with_health("a", sick_a.clone()).await;
    let b = upstream_with_health("b", sick_b.clone()).await;
    let gw = gateway(&format!(
        r#"
[upstreams.api]
servers = [{{ address = "{a}" }}, {{ address = "{b}" }}]
[upstreams.api.health]
path = "/health"
interval_ms = 20
timeout_ms = 200
rise = 2
fall = 2
[[routes]]
path_prefix = "/"
upstream = "api"
"#
    ))
    .await;
    let servers = |gw| async move {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..10 {
            let r = send(gw, "GET", "/", &[], "").await;
            if r.status == StatusCode::OK {
                seen.insert(r.json["server"].as_str().unwrap().to_owned());
            } else {
                seen.insert(format!(
                    "{} {}",
                    r.status.as_u16(),
                    r.json["error"].as_str().unwrap_or("")
                ));
            }
        }
        seen.into_iter().collect::<Vec<_>>()
    };
    assert_eq!(servers(gw).await, ["a", "b"]);
    sick_a.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(servers(gw).await, ["b"], "a failed its checks");
    sick_b.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(servers(gw).await, ["503 no_healthy_upstream"]);
    sick_a.store(false, Ordering::SeqCst);
    sick_b.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(servers(gw).await, ["a", "b"], "both recovered");
}

#[tokio::test]
async fn address_filters_rate_limits_and_size_limits() {
    let a = upstream("a").await;
    let gw = gateway(&format!(
        r#"
[server]
max_uri_bytes = 64
max_body_bytes = 10

[upstreams.api]
servers = [{{ address = "{a}" }}]

[[routes]]
path_prefix = "/private/"
upstream = "api"
allow = ["10.0.0.0/8"]

[[routes]]
path_prefix = "/blocked/"
upstream = "api"
deny = ["127.0.0.0/8"]

[[routes]]
path_prefix = "/buy"
upstream = "api"
allow = ["127.0.0.1"]
rate_limit = {{ per_second = 1.0, burst = 3 }}

[[routes]]
path_prefix = "/"
upstream = "api"
"#
    ))
    .await;
    let r = send(gw, "GET", "/private/x", &[], "").await;
    assert_eq!(
        (r.status, r.json["error"].as_str()),
        (StatusCode::FORBIDDEN, Some("forbidden"))
    );
    let r = send(gw, "GET", "/blocked/x", &[], "").await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    for _ in 0..3 {
        assert_eq!(
            send(gw, "POST", "/buy", &[], "").await.status,
            StatusCode::OK
        );
    }
    let r = send(gw, "POST", "/buy", &[], "").await;
    assert_eq!(
        (r.status, r.json["error"].as_str()),
        (StatusCode::TOO_MANY_REQUESTS, Some("rate_limited"))
    );
    assert_eq!(r.headers.get("retry-after").unwrap(), "1");
    // Other routes are not limited.
    assert_eq!(
        send(gw, "GET", "/other", &[], "").await.status,
        StatusCode::OK
    );
    let long = format!("/{}", "x".repeat(100));
    let r = send(gw, "GET", &long, &[], "").await;
    assert_eq!(
        (r.status, r.json["error"].as_str()),
        (StatusCode::URI_TOO_LONG, Some("uri_too_long"))
    );
    let r = send(gw, "POST", "/other", &[], "more than ten bytes").await;
    assert_eq!(
        (r.status, r.json["error"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("body_too_large"))
    );
}

/// A throwaway RSA key pair, generated with openssl for these tests only.
const TEST_RSA_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----\nMIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQDgwe6h6MI9tHTf\nMOXZuWik343Ioz+PNBjGjqE0Dn4ItCx7Xouu2Mb5E1tDJitJTvVGDsX2Gw7OJnTY\nbBIMBWdVb1ELLF9J+r5YBOlMqGMtM/OdAYL5ZSuXXgHrWSfJ9EKrO/sdVrhOMJgy\ny3t1JBhoQlEpkVT1n7a4lA/kEomhIDTYhKSZ5saUNYp0z32f7XPNDJjEktcm8Sl8\n7Xl2NmmXZOBdbts5GBRaNa8AOVFkdQ4sqLOgA8vC2UfGfp2RBtFVJWFeRWrpvUcj\nb0XBdhIVX0uOjYJwM/v6PBImg2OB5gnP1ZdMlEbWTLlqwkOhCLdwxTfbmMqZw4G/\nbc+OtUVfAgMBAAECggEAA4MTM1ElLbx1AO1rJLW+X5fUR88wbSGxEa8T8E+RZUR9\nEwz348zPO2aaGM3qv6PFWLiRtZgtcaW+dHfSxoClPy7ZHL9iSUNzcU6oNLwcl43D\nzK9l9jMEcQaZoPHCTPCzssp7v5Lhh1Jzd/t1EQFT/E6tgu0agX1jEs+wJGm9eb8b\nY9n9TULCYhEMNg6GLk+HkFmKEU/TkTa9LtionjS6UjZ5EloqQMr7fTonyRN+MYWr\nVuvmFPttrt1F9u36LNeZ/++SYl/0PIFXWnzUNWHG496g+d+BD6NSMN6LcZV9blEv\nWnqkRp1/GdyCANi7RhYRxVRLl4U2ucYhuLoSwbP/4QKBgQD0A7AGn0KHixdDtSQS\nPsfxi34Oem3aSRCQLD6FJIv2os9yisfihaFnqCNaKDKpVerB+E2dNsMOeW2VxEeS\nqxEDBpn3JvnMHXGpJMIRuffDUNg/WhN87KsYL+0SQY38gEyckjQycVwz9vOQ0Jaz\nYUYgpsf9pjec92/iLdPZ9wJozwKBgQDrzBpXRWefX3R3zYBla9F2WovJOQWnQyCl\nQFt+ZNP/dgsd6/mIDV2Shzrb5NJ+Eop7dCij1OsUJCrXo4kk9VksGYWV05V+/Dsv\n2ERNfdbeA21SPdshtbPc9bSICWO1SF/DSSoL3VNo2BRyaKgGeGMly/SymMWPagQW\ng1ZCcYdecQKBgGt7EFbqYYCYmIe/SwMqWiGf4sd3z9ldY4lNo8A7p9bcQenfDUpO\nuBiTa/bzS9VgvcXwnCdKjsJaZBWa3jfRV+3wQ3Mk3NS2h3EMetsaAfMrMgU9pOXa\nzUYbHh5zd5on3Rb+IzWwzv8ooIJCDo82opARRngIdeiS6NpEe1M/xPTrAoGBANH9\nRkgKKyonXBWFEZ9A0Z1RLcPZ4EsA4QXJtrFtIc8TVPskt2iOXpKrk6NYuIxF/sXK\nwJaGe4PIYc8AeJZNWUiIwgqYDz6zahJFyy4nrz6wVp8zLv9qTe+tcUTk98Lt3TqQ\n4b0HMczhAfSRd3GrrMBwTk7u9qGtjE5wUFWDvUZBAoGBAJ2rNKBWKJlz3fi268pg\nS5XTrwd4iOmlXml5u6xA9Koha3Gr4LJLBW0QDV4DmK7ivxRdAcSdptTV7euFOQeS\nLm4me2cZ7tlp3HZHzs+gRrvBtqD8uezoGMJ7k0w3qhsOTMydrpOQ3bb5B6JezVCR\nf+vOQSoq2u8KmQ1m+EQ9urqn\n-----END PRIVATE KEY-----";
const TEST_RSA_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA4MHuoejCPbR03zDl2blo\npN+NyKM/jzQYxo6hNA5+CLQse16LrtjG+RNbQyYrSU71Rg7F9hsOziZ02GwSDAVn\nVW9RCyxfSfq+WATpTKhjLTPznQGC+WUrl14B61knyfRCqzv7HVa4TjCYMst7dSQY\naEJRKZFU9Z+2uJQP5BKJoSA02ISkmebGlDWKdM99n+1zzQyYxJLXJvEpfO15djZp\nl2TgXW7bORgUWjWvADlRZHUOLKizoAPLwtlHxn6dkQbRVSVhXkVq6b1HI29FwXYS\nFV9Ljo2CcDP7+jwSJoNjgeYJz9WXTJRG1ky5asJDoQi3cMU325jKmcOBv23PjrVF\nXwIDAQAB\n-----END PUBLIC KEY-----";

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token(
    alg: jsonwebtoken::Algorithm,
    key: &jsonwebtoken::EncodingKey,
    claims: serde_json::Value,
) -> String {
    jsonwebtoken::encode(&jsonwebtoken::Header::new(alg), &claims, key).unwrap()
}

#[tokio::test]
async fn api_keys_and_jwts_guard_routes_and_claims_are_forwarded() {
    let a = upstream("a").await;
    let public = TEST_RSA_PUBLIC.replace('\n', "\\n");
    let gw = gateway(&format!(
        r#"
[upstreams.api]
servers = [{{ address = "{a}" }}]

[[routes]]
path_prefix = "/keys/"
upstream = "api"
auth = {{ api_keys = ["k-123"] }}

[[routes]]
path_prefix = "/hs/"
upstream = "api"
[routes.auth.jwt]
algorithm = "HS256"
secret = "s3cret"
issuer = "keel-test"
audience = "shop"
forward_claims = {{ sub = "x-user-id" }}

[[routes]]
path_prefix = "/rs/"
upstream = "api"
[routes.auth.jwt]
algorithm = "RS256"
public_key_pem = "{public}"
forward_claims = {{ sub = "x-user-id" }}
"#
    ))
    .await;
    // API keys.
    assert_eq!(
        send(gw, "GET", "/keys/x", &[("x-api-key", "k-123")], "")
            .await
            .status,
        StatusCode::OK
    );
    let r = send(gw, "GET", "/keys/x", &[("x-api-key", "nope")], "").await;
    assert_eq!(
        (r.status, r.json["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("unauthenticated"))
    );
    assert_eq!(r.headers.get("www-authenticate").unwrap(), "Bearer");

    // HS256 with issuer and audience.
    let hs = jsonwebtoken::EncodingKey::from_secret(b"s3cret");
    let good = token(
        jsonwebtoken::Algorithm::HS256,
        &hs,
        serde_json::json!({"sub": "user-7", "iss": "keel-test", "aud": "shop", "exp": now() + 60}),
    );
    let bearer = format!("Bearer {good}");
    let r = send(
        gw,
        "GET",
        "/hs/me",
        &[("authorization", &bearer), ("x-user-id", "forged")],
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json);
    assert_eq!(
        r.json["x_user_id"], "user-7",
        "the claim is forwarded, the forged header dropped"
    );
    let cases = [
        (
            "expired",
            serde_json::json!({"sub": "u", "iss": "keel-test", "aud": "shop", "exp": now() - 120}),
        ),
        (
            "wrong audience",
            serde_json::json!({"sub": "u", "iss": "keel-test", "aud": "other", "exp": now() + 60}),
        ),
        (
            "wrong issuer",
            serde_json::json!({"sub": "u", "iss": "evil", "aud": "shop", "exp": now() + 60}),
        ),
        (
            "not yet valid",
            serde_json::json!({"sub": "u", "iss": "keel-test", "aud": "shop", "exp": now() + 600, "nbf": now() + 300}),
        ),
    ];
    for (what, claims) in cases {
        let bearer = format!(
            "Bearer {}",
            token(jsonwebtoken::Algorithm::HS256, &hs, claims)
        );
        let r = send(gw, "GET", "/hs/me", &[("authorization", &bearer)], "").await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{what}: {}", r.json);
    }
    let forged = token(
        jsonwebtoken::Algorithm::HS256,
        &jsonwebtoken::EncodingKey::from_secret(b"guess"),
        serde_json::json!({"sub": "u", "iss": "keel-test", "aud": "shop", "exp": now() + 60}),
    );
    let bearer = format!("Bearer {forged}");
    assert_eq!(
        send(gw, "GET", "/hs/me", &[("authorization", &bearer)], "")
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        send(gw, "GET", "/hs/me", &[], "").await.status,
        StatusCode::UNAUTHORIZED
    );

    // RS256.
    let rs = jsonwebtoken::EncodingKey::from_rsa_pem(TEST_RSA_PRIVATE.as_bytes()).unwrap();
    let good = token(
        jsonwebtoken::Algorithm::RS256,
        &rs,
        serde_json::json!({"sub": "user-9", "exp": now() + 60}),
    );
    let bearer = format!("Bearer {good}");
    let r = send(gw, "GET", "/rs/me", &[("authorization", &bearer)], "").await;
    assert_eq!(
        (r.status, r.json["x_user_id"].as_str()),
        (StatusCode::OK, Some("user-9"))
    );
    // An HS256 token signed with the public key as a secret (the classic key-confusion attack).
    let confused = token(
        jsonwebtoken::Algorithm::HS256,
        &jsonwebtoken::EncodingKey::from_secret(TEST_RSA_PUBLIC.as_bytes()),
        serde_json::json!({"sub": "admin", "exp": now() + 60}),
    );
    let bearer = format!("Bearer {confused}");
    assert_eq!(
        send(gw, "GET", "/rs/me", &[("authorization", &bearer)], "")
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn malformed_and_ambiguous_requests_are_refused() {
    let a = upstream("a").await;
    let gw = one_upstream(a).await;
    // A request line that is not HTTP.
    let out = raw(gw, b"HELLO THERE\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out:?}");
    // Both Content-Length and Transfer-Encoding (request smuggling), in either order and
    // after a well-framed request on the same connection: 400, the connection closes, and
    // the request hidden behind it is never read.
    for attempt in [
        &b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        let out = raw(gw, attempt).await;
        assert!(out.starts_with("HTTP/1.1 400"), "{out:?}");
        assert!(out.contains("ambiguous_framing"), "{out:?}");
        assert!(!out.contains("smuggled"), "{out:?}");
        assert_eq!(out.matches("HTTP/1.1 ").count(), 1, "{out:?}");
        assert!(
            out.to_ascii_lowercase().contains("connection: close"),
            "{out:?}"
        );
    }
    let out = raw(
        gw,
        b"POST /first HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloGET /second HTTP/1.1\r\nHost: x\r\n\r\nPOST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert_eq!(out.matches("HTTP/1.1 200").count(), 2, "{out:?}");
    assert_eq!(out.matches("HTTP/1.1 400").count(), 1, "{out:?}");
    assert!(!out.contains("smuggled"), "{out:?}");
    // The same Content-Length twice (hyper would merge them).
    let out = raw(
        gw,
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nabcde",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out:?}");
    // Two different Content-Lengths.
    let out = raw(
        gw,
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out:?}");
    // Headers far over the limit.
    let big = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(1 << 20)
    );
    let out = raw(gw, big.as_bytes()).await;
    assert!(
        out.starts_with("HTTP/1.1 431") || out.starts_with("HTTP/1.1 400"),
        "{out:?}"
    );
    // A well-formed request on a fresh connection still works.
    let out = raw(
        gw,
        b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out:?}");
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let a = upstream("a").await;
    let gw = gateway_to(a, "header_timeout_ms = 300", "", "").await;
    let mut s = tokio::net::TcpStream::connect(gw).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    // Slowloris: no end of headers. The gateway closes the connection after its timeout.
    let mut out = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    assert!(closed.is_ok(), "the connection was held open");
}

#[tokio::test]
async fn an_upstream_killed_under_load_fails_no_idempotent_request() {
    // One upstream on its own runtime, so dropping that runtime kills it mid-request.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let doomed = {
        let _in = runtime.enter();
        let (tx, rx) = std::sync::mpsc::channel();
        runtime.spawn(async move {
            tx.send(upstream("doomed").await).unwrap();
        });
        rx.recv().unwrap()
    };
    let survivor = upstream("survivor").await;
    let gw = gateway(&format!(
        r#"
[upstreams.api]
servers = [{{ address = "{doomed}" }}, {{ address = "{survivor}" }}]
[[routes]]
path_prefix = "/"
upstream = "api"
"#
    ))
    .await;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let stop = tokio::time::Instant::now() + Duration::from_millis(1200);
    let mut workers = Vec::new();
    for _ in 0..16 {
        let client = client.clone();
        workers.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while tokio::time::Instant::now() < stop {
                let req = Request::get(format!("http://{gw}/item"))
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let resp = client.request(req).await.unwrap();
                let status = resp.status();
                let _ = resp.into_body().collect().await;
                if status == StatusCode::OK {
                    ok += 1;
                } else {
                    failed.push(status);
                }
            }
            (ok, failed)
        }));
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    runtime.shutdown_background();
    let (mut ok, mut failed) = (0, Vec::new());
    for w in workers {
        let (o, f) = w.await.unwrap();
        ok += o;
        failed.extend(f);
    }
    assert!(ok > 100, "{ok} requests served");
    assert!(
        failed.is_empty(),
        "{} GETs failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
}

#[tokio::test]
async fn odd_paths_cannot_slip_past_a_guarded_route() {
    let server = upstream("open").await;
    let gw = gateway(&format!(
        r#"
[upstreams.api]
servers = [{{ address = "{server}" }}]
[[routes]]
path_prefix = "/admin/"
upstream = "api"
deny = ["127.0.0.0/8"]
[[routes]]
path_prefix = "/"
upstream = "api"
"#
    ))
    .await;
    assert_eq!(
        send(gw, "GET", "/admin/x", &[], "").await.status,
        StatusCode::FORBIDDEN
    );
    for path in ["//admin/x", "/%61dmin/x", "/%2Fadmin/x", "///admin//x"] {
        let r = send(gw, "GET", path, &[], "").await;
        assert!(
            r.status == StatusCode::FORBIDDEN || r.json["path"] == path,
            "{path}: {} {}",
            r.status,
            r.json
        );
        assert_ne!(r.json["path"], "/admin/x", "{path} reached /admin/x");
    }
    for path in ["/pub/../admin/x", "/pub/%2e%2e/admin/x", "/./admin/x"] {
        let answer = raw(
            gw,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{path}: {answer}");
    }
}

#[tokio::test]
async fn a_client_trickling_the_first_bytes_is_cut_off_and_big_heads_are_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = upstream("a").await;
    let gw = gateway_to(
        server,
        "header_timeout_ms = 300\nmax_header_bytes = 16384",
        "",
        "",
    )
    .await;
    // Part of the HTTP/2 preface, one byte at a time: hyper has not chosen a protocol yet.
    let mut s = tokio::net::TcpStream::connect(gw).await.unwrap();
    let started = std::time::Instant::now();
    let mut closed = false;
    for b in b"PRI * HTTP/2.0\r\n" {
        if s.write_all(&[*b]).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !closed {
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
            .await
            .expect("closed")
            .unwrap_or(0);
        assert_eq!(n, 0);
    }
    assert!(started.elapsed() < Duration::from_secs(3));

    let big = "x".repeat(20_000);
    let answer = raw(
        gw,
        format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    let fits = "y".repeat(4_000);
    assert_eq!(
        send(gw, "GET", "/", &[("x-fits", &fits)], "").await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn retries_stop_when_the_budget_is_spent() {
    let (dead, live) = (dead_addr(), upstream("live").await);
    let (gw, handle) = gateway_handle(&format!(
        r#"
[upstreams.api]
servers = [{{ address = "{dead}" }}, {{ address = "{live}" }}]
retry_budget_ratio = 0.0
retry_budget_min_per_sec = 2
outlier = {{ consecutive_failures = 0, error_rate = 2.0 }}
[[routes]]
path_prefix = "/"
upstream = "api"
"#
    ))
    .await;
    // Round robin sends every other request to the dead server first; two retries a second
    // are allowed, then such requests fail instead of doubling the load.
    let mut spent = 0;
    for _ in 0..10 {
        let r = send(gw, "GET", "/", &[], "").await;
        if r.status == StatusCode::BAD_GATEWAY {
            assert!(
                r.json["detail"].as_str().unwrap().contains("retry budget"),
                "{}",
                r.json
            );
            spent += 1;
        }
    }
    assert!(
        (1..=5).contains(&spent),
        "{spent} requests found the budget spent"
    );
    // The metrics count both: the retries made and those the budget refused.
    let metric = |name: &str| -> u64 {
        let line = format!("{name}{{upstream=\"api\"}} ");
        handle
            .render_metrics()
            .lines()
            .find_map(|l| l.strip_prefix(line.as_str())?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in the metrics"))
    };
    assert_eq!(
        metric("keel_gateway_upstream_retry_budget_exhausted_total"),
        spent
    );
    assert!(metric("keel_gateway_upstream_retries_total") >= 1);
}

#[tokio::test]
async fn an_undeclared_body_over_the_limit_gets_413_and_a_stalled_answer_is_cut() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = upstream("a").await;
    // A server that sends a head and 3 bytes of a 100-byte body, then nothing.
    let stalling = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stalling_addr = stalling.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = stalling.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
                    .await;
                tokio::time::sleep(Duration::from_secs(30)).await;
            });
        }
    });
    let gw = gateway(&format!(
        r#"
[server]
max_body_bytes = 1000
[upstreams.api]
servers = [{{ address = "{server}" }}]
[upstreams.stalling]
servers = [{{ address = "{stalling_addr}" }}]
[[routes]]
path_prefix = "/stall"
upstream = "stalling"
timeout_ms = 300
[[routes]]
path_prefix = "/"
upstream = "api"
"#
    ))
    .await;
    let chunk = "x".repeat(600);
    let chunked = format!(
        "POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n258\r\n{chunk}\r\n258\r\n{chunk}\r\n0\r\n\r\n"
    );
    let answer = raw(gw, chunked.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    let small = format!(
        "POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n258\r\n{chunk}\r\n0\r\n\r\n"
    );
    let answer = raw(gw, small.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    let started = std::time::Instant::now();
    let answer = raw(
        gw,
        b"GET /stall HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("abc"), "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "cut after {:?}",
        started.elapsed()
    );
}
