//! Upstream pools kept live by a registry watch: Keel's embedded registry, and a real etcd
//! when one is installed. Also passive health: a server answering 5xx is ejected and returns
//! once it recovers.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use http::StatusCode;
use keel_registry::proto::Instance;
use keel_registry::{NamingBackend, Registration, Registry, RegistryConfig, RegistryHandle};
use keel_rpc::{Channel, ChannelConfig, Server};
use tokio::net::TcpListener;

fn instance(id: &str, address: SocketAddr) -> Instance {
    Instance {
        namespace: "default".into(),
        service: "web".into(),
        id: id.into(),
        address: address.to_string(),
        weight: 100,
        ..Instance::default()
    }
}

/// The servers that answer `n` requests in a row.
async fn answering(gw: SocketAddr, n: usize) -> HashSet<String> {
    let mut seen = HashSet::new();
    for _ in 0..n {
        let a = send(gw, "GET", "/", &[], "").await;
        seen.insert(if a.status == StatusCode::OK {
            a.json["server"].as_str().unwrap().to_owned()
        } else {
            format!("{}", a.status.as_u16())
        });
    }
    seen
}

/// Polls until exactly `want` answer.
async fn until(gw: SocketAddr, want: &[&str]) {
    let want: HashSet<String> = want.iter().map(|s| (*s).to_owned()).collect();
    let mut last = HashSet::new();
    for _ in 0..100 {
        last = answering(gw, 8).await;
        if last == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("wanted {want:?}, still {last:?}");
}

/// Registers and deregisters instances of "web" through `backend` and checks that a gateway
/// following the service through `discovery` (a TOML table body) keeps up.
async fn follow<B: NamingBackend + Clone>(backend: B, discovery: &str) {
    let (a, b) = (upstream("a").await, upstream("b").await);
    let gw = gateway(&format!(
        "[upstreams.web.discovery]\n{discovery}service = \"web\"\n[[routes]]\npath_prefix = \"/\"\nupstream = \"web\"\n"
    ))
    .await;
    // Nothing registered yet: a clear 503.
    let none = send(gw, "GET", "/", &[], "").await;
    assert_eq!(none.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(none.json["error"], "no_healthy_upstream");

    let ttl = Duration::from_secs(10);
    let reg_a = Registration::start(backend.clone(), instance("a", a), ttl)
        .await
        .unwrap();
    until(gw, &["a"]).await;
    let reg_b = Registration::start(backend.clone(), instance("b", b), ttl)
        .await
        .unwrap();
    until(gw, &["a", "b"]).await;
    reg_a.deregister().await.unwrap();
    until(gw, &["b"]).await;
    reg_b.deregister().await.unwrap();
    until(gw, &["503"]).await;
}

/// A Keel registry on a free port in this process (kept while the first value lives): its
/// address and a handle to it.
async fn registry() -> (Registry, SocketAddr, RegistryHandle) {
    let registry = Registry::open(RegistryConfig::default()).await.unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Server::builder().add_service(registry.service()).build();
    tokio::spawn(server.serve(listener, std::future::pending::<()>()));
    let handle = RegistryHandle::new(
        Channel::connect(addr.to_string(), ChannelConfig::default())
            .await
            .unwrap(),
    );
    (registry, addr, handle)
}

#[tokio::test]
async fn pools_follow_keels_registry() {
    let (_registry, addr, handle) = registry().await;
    follow(handle, &format!("registry = \"{addr}\"\n")).await;
}

#[tokio::test]
async fn pools_follow_etcd() {
    let Some(etcd) = keel_registry::testing::etcd("pools_follow_etcd").await else {
        return;
    };
    // The fixture's backend keeps its keys under `/keel-test`.
    let discovery = format!(
        "etcd = [\"{}\"]\netcd_prefix = \"/keel-test\"\n",
        etcd.endpoint
    );
    follow(etcd.backend.clone(), &discovery).await;
}

#[tokio::test]
async fn a_server_answering_5xx_is_ejected_and_returns_when_it_recovers() {
    let sick = Arc::new(AtomicBool::new(false));
    let a = upstream_with_health("a", sick.clone()).await;
    let b = upstream("b").await;
    let gw = gateway(&format!(
        r#"
[upstreams.api]
servers = [{{ address = "{a}" }}, {{ address = "{b}" }}]
outlier = {{ consecutive_failures = 3, base_ejection_ms = 300 }}
[[routes]]
path_prefix = "/"
upstream = "api"
"#
    ))
    .await;
    sick.store(true, Ordering::SeqCst);
    let mut errors = 0;
    for _ in 0..40 {
        if send(gw, "GET", "/flaky", &[], "").await.status != StatusCode::OK {
            errors += 1;
        }
    }
    assert_eq!(errors, 3, "three 5xx in a row eject the server");
    sick.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut seen = HashSet::new();
    for _ in 0..20 {
        let r = send(gw, "GET", "/flaky", &[], "").await;
        assert_eq!(r.status, StatusCode::OK);
        seen.insert(r.json["server"].as_str().unwrap().to_owned());
    }
    assert_eq!(seen.len(), 2, "the recovered server is back: {seen:?}");
}

/// The opening-time gate: opening times set in the registry refuse early requests at the
/// gateway (403 not_started with Retry-After), follow changes, and leave other keys alone.
#[tokio::test]
async fn the_gate_refuses_requests_before_their_opening_time() {
    let (_registry, addr, handle) = registry().await;
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    let put = |key: &str, value: String| {
        let handle = handle.clone();
        let key = key.to_owned();
        async move {
            handle
                .put_config("default", &key, value.into_bytes().into())
                .await
                .unwrap();
        }
    };
    // One opening time before the gateway starts (it arrives with the watch's first reset).
    put("sale/opens/item-1", (now_ms() + 3_600_000).to_string()).await;
    let app = upstream("app").await;
    let gw = gateway(&format!(
        "[upstreams.app]\nservers = [{{ address = \"{app}\" }}]\n[[routes]]\npath_prefix = \"/api/items/\"\nupstream = \"app\"\ngate = {{ registry = \"{addr}\", prefix = \"sale/opens/\", path_segment = 3 }}\n"
    ))
    .await;
    let status_of = |item: &'static str| async move {
        let a = send(gw, "POST", &format!("/api/items/{item}/buy"), &[], "{}").await;
        (a.status, a)
    };
    // Closed until the watch has delivered; then refused with the wait.
    let mut refused = None;
    for _ in 0..100 {
        let (status, a) = status_of("item-1").await;
        if status == StatusCode::FORBIDDEN {
            refused = Some(a);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let refused = refused.expect("the gate never closed");
    assert_eq!(refused.json["error"], "not_started");
    let retry: u64 = refused.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((3_500..=3_600).contains(&retry), "{retry}");
    // Another item, without an opening time, passes.
    assert_eq!(status_of("item-2").await.0, StatusCode::OK);
    // An opening time in RFC 3339, already past: item-3 passes; moved into the future: refused.
    put("sale/opens/item-3", "2020-01-01T00:00:00Z".into()).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(status_of("item-3").await.0, StatusCode::OK);
    put(
        "sale/opens/item-3",
        humantime::format_rfc3339_seconds(std::time::SystemTime::now() + Duration::from_secs(600))
            .to_string(),
    )
    .await;
    let mut closed = false;
    for _ in 0..100 {
        if status_of("item-3").await.0 == StatusCode::FORBIDDEN {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(closed, "a changed opening time reaches the gate");
    // The sale opens (the time is moved to now): requests pass.
    put("sale/opens/item-1", now_ms().to_string()).await;
    let mut open = false;
    for _ in 0..100 {
        if status_of("item-1").await.0 == StatusCode::OK {
            open = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(open, "the gate opens");
}
