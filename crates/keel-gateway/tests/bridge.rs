//! The HTTP → RPC bridge: JSON over HTTP through the gateway to Keel echo services, with fixed
//! instances and with instances from the registry, errors mapped to HTTP, and an instance
//! stopped under traffic.

mod common;

use std::net::SocketAddr;

use common::*;
use http::StatusCode;
use keel_echo::{EchoServer, EchoService};
use keel_registry::proto::Instance;
use keel_registry::{Registration, Registry, RegistryConfig, RegistryHandle};
use keel_rpc::{Channel, ChannelConfig, Server};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// An echo server; sending on (or dropping) the returned sender stops it.
async fn echo_server() -> (SocketAddr, oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = Server::builder()
        .add_service(EchoServer::new(EchoService))
        .build();
    tokio::spawn(server.serve(listener, async {
        let _ = stopped.await;
    }));
    (addr, stop)
}

#[tokio::test]
async fn json_over_http_reaches_rpc_services_through_governance() {
    let (one, stop_one) = echo_server().await;
    let (two, _stop_two) = echo_server().await;
    let gw = gateway(&format!(
        r#"
[[routes]]
path_prefix = "/rpc/echo/"
strip_prefix = "/rpc/echo"
rpc = {{ service = "keel.echo.v1.Echo", servers = ["{one}", "{two}"], timeout_ms = 2000 }}
"#
    ))
    .await;
    let ok = send(gw, "POST", "/rpc/echo/Echo", &[], r#"{"message": "hi"}"#).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.json);
    assert_eq!(ok.json["message"], "hi");
    assert_eq!(ok.headers["content-type"], "application/json");

    // Errors come back as HTTP statuses with the RPC code.
    let bad = send(gw, "POST", "/rpc/echo/Echo", &[], "{not json").await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST, "{}", bad.json);
    assert_eq!(bad.json["error"], "invalid_argument");
    let missing = send(gw, "POST", "/rpc/echo/Shout", &[], "{}").await;
    assert!(
        missing.status == StatusCode::NOT_FOUND || missing.status == StatusCode::NOT_IMPLEMENTED,
        "{} {}",
        missing.status,
        missing.json
    );
    let get = send(gw, "GET", "/rpc/echo/Echo", &[], "").await;
    assert_eq!(get.status, StatusCode::METHOD_NOT_ALLOWED);
    let odd = send(gw, "POST", "/rpc/echo/a/b", &[], "{}").await;
    assert_eq!(odd.status, StatusCode::NOT_FOUND);

    // One instance stops: calls keep succeeding on the other.
    let _ = stop_one.send(());
    for i in 0..100 {
        let body = format!(r#"{{"message": "m{i}"}}"#);
        let r = send(gw, "POST", "/rpc/echo/Echo", &[], &body).await;
        assert_eq!(r.status, StatusCode::OK, "call {i}: {}", r.json);
        assert_eq!(r.json["message"], format!("m{i}"));
    }
}

/// An echo service that answers with the call's `x-user-id` metadata as its message.
#[derive(Clone, Copy)]
struct WhoCalls;

impl keel_echo::proto::Echo for WhoCalls {
    async fn echo(
        &self,
        ctx: keel_rpc::Context,
        _request: keel_echo::EchoRequest,
    ) -> Result<keel_echo::EchoReply, keel_rpc::Status> {
        let user = ctx
            .metadata()
            .get("x-user-id")
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default();
        Ok(keel_echo::EchoReply {
            message: user,
            payload: Default::default(),
        })
    }

    async fn count(
        &self,
        _ctx: keel_rpc::Context,
        _request: keel_echo::CountRequest,
    ) -> Result<keel_rpc::ResponseStream<keel_echo::CountReply>, keel_rpc::Status> {
        Err(keel_rpc::Status::unimplemented("count"))
    }
}

#[tokio::test]
async fn jwt_claims_reach_the_service_as_metadata_and_cannot_be_forged() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Server::builder()
        .add_service(EchoServer::new(WhoCalls))
        .build();
    tokio::spawn(server.serve(listener, std::future::pending::<()>()));
    let gw = gateway(&format!(
        r#"
[[routes]]
path_prefix = "/rpc/who/"
strip_prefix = "/rpc/who"
rpc = {{ service = "keel.echo.v1.Echo", servers = ["{addr}"], timeout_ms = 2000 }}
[routes.auth.jwt]
algorithm = "HS256"
secret = "s3cret"
forward_claims = {{ sub = "x-user-id" }}
"#
    ))
    .await;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 60;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"sub": "user-7", "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(b"s3cret"),
    )
    .unwrap();
    let bearer = format!("Bearer {token}");
    // A header and a metadata header of the claim's name, both forged: the claim wins.
    let r = send(
        gw,
        "POST",
        "/rpc/who/Echo",
        &[
            ("authorization", &bearer),
            ("x-user-id", "forged"),
            ("keel-meta-x-user-id", "forged"),
        ],
        "{}",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json);
    assert_eq!(r.json["message"], "user-7");
    let r = send(
        gw,
        "POST",
        "/rpc/who/Echo",
        &[("x-user-id", "forged")],
        "{}",
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.json);
}

#[tokio::test]
async fn the_bridge_finds_instances_in_the_registry() {
    let registry = Registry::open(RegistryConfig::default()).await.unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let registry_addr = listener.local_addr().unwrap();
    tokio::spawn(
        Server::builder()
            .add_service(registry.service())
            .build()
            .serve(listener, std::future::pending::<()>()),
    );
    let (echo, _stop) = echo_server().await;
    let handle = RegistryHandle::new(
        Channel::connect(registry_addr.to_string(), ChannelConfig::default())
            .await
            .unwrap(),
    );
    let _registration = Registration::start(
        handle,
        Instance {
            namespace: "default".into(),
            service: "echo".into(),
            id: "echo-1".into(),
            address: echo.to_string(),
            weight: 100,
            ..Instance::default()
        },
        std::time::Duration::from_secs(10),
    )
    .await
    .unwrap();
    let gw = gateway(&format!(
        r#"
[[routes]]
path_prefix = "/echo/"
strip_prefix = "/echo"
[routes.rpc]
service = "keel.echo.v1.Echo"
discovery = {{ registry = "{registry_addr}", service = "echo" }}
"#
    ))
    .await;
    let r = send(gw, "POST", "/echo/Echo", &[], r#"{"message": "found"}"#).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json);
    assert_eq!(r.json["message"], "found");
}
