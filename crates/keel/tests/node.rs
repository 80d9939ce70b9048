//! `keel node`: three hosts of one sale on this machine (loopback addresses), over a real etcd
//! (started here), the NATS server on 127.0.0.1:4222 (or `KEEL_NATS_URL`) and PostgreSQL (a
//! database of its own). Every process of the host whose inventory processes own the shards
//! is SIGKILLed in the middle of a sale: the standbys on the other hosts take over, the sale
//! goes on through another host's gateway, nothing is oversold and no acknowledged buy is
//! lost. Skipped with a message when a server is missing, failed instead when
//! `KEEL_REQUIRE_SERVICES=1`.

mod common;

use std::collections::BTreeMap;
use std::process::{Child, Command};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{TOKEN, call};
use keel_store::testing::{DeleteStreams, nats_up, nats_url, unique_stream};

/// A `keel node` process, stopped with SIGINT when dropped (and its parts with it).
struct Node {
    child: Child,
    lines: mpsc::Receiver<String>,
    gateway: Option<String>,
}

impl Node {
    fn start(dir: &std::path::Path, host: &str) -> Node {
        let (child, lines) =
            common::spawn_keel(dir, &["node", "--config", "cluster.toml", "--host", host]);
        let mut node = Node {
            child,
            lines,
            gateway: None,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = node
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("keel node {host} did not come up"));
            if line.starts_with(&format!("Keel node {host} is up")) {
                node.gateway = line
                    .split("http://")
                    .nth(1)
                    .map(|a| a.trim_end_matches(['/', ';']).to_owned())
                    .map(|a| a.split('/').next().unwrap().to_owned());
                return node;
            }
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            let _ = Command::new("kill")
                .args(["-INT", &self.child.id().to_string()])
                .status();
            let _ = self.child.wait();
        }
    }
}

#[test]
fn a_host_is_lost_mid_sale_and_the_others_sell_on() {
    let test = "a_host_is_lost_mid_sale_and_the_others_sell_on";
    if !nats_up(test) {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let Some(etcd) = rt.block_on(keel_registry::testing::etcd(test)) else {
        return;
    };
    let Some(db) = keel_seckill::testing::temp_database(test) else {
        return;
    };
    let streams = unique_stream("node");
    let _delete = DeleteStreams::new(vec![format!("{streams}-inv-0"), format!("{streams}-inv-1")]);
    let dir = tempfile::tempdir().unwrap();
    let host = |name: &str, gateway: bool| {
        format!(
            "[[hosts]]\nname = \"{name}\"\n{}api = \"127.0.0.1:0\"\ninventory = \"127.0.0.1:0\"\nshards = [\"inv-0\", \"inv-1\"]\norders = \"127.0.0.1:0\"\n",
            if gateway {
                "gateway = \"127.0.0.1:0\"\n"
            } else {
                ""
            }
        )
    };
    std::fs::write(
        dir.path().join("cluster.toml"),
        format!(
            "admin_token = \"{TOKEN}\"\n[engines]\nregistry = \"{}\"\njournal = \"{}\"\nstreams = \"{streams}\"\ndatabase = \"{}\"\n[sale]\nshards = 2\nlease_ttl_ms = 1000\n[limits]\nbuy_per_ip_per_second = 0\nbuy_per_user_per_second = 0\n{}{}{}",
            etcd.endpoint.replace("http://", "etcd://"),
            nats_url(),
            db.url,
            host("h1", true),
            host("h2", true),
            host("h3", false),
        ),
    )
    .unwrap();
    // h1 first: its inventory processes are elected owners of both shards; h2 and h3 stand by.
    let h1 = Node::start(dir.path(), "h1");
    let h2 = Node::start(dir.path(), "h2");
    let _h3 = Node::start(dir.path(), "h3");
    let gw = h2.gateway.clone().expect("h2 runs a gateway");
    // Through either gateway, the same sale.
    let (status, body) = call(&gw, "GET", "/api/items", "");
    assert_eq!(status, 200, "{body}");
    let (status, body) = call(h1.gateway.as_ref().unwrap(), "GET", "/api/items", "");
    assert_eq!(status, 200, "{body}");

    // A sale through h2's gateway; 1.5 s in, every process of h1 is SIGKILLed: the node, its
    // gateway, API, orders and both shard owners.
    common::sale_with_kill(&gw, (2000, 1000, 500), || {
        let pids: BTreeMap<String, u32> = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("keel-node/h1/pids.json")).unwrap(),
        )
        .unwrap();
        assert!(pids.contains_key("inventory-inv-0"), "{pids:?}");
        pids.values().copied().chain([h1.child.id()]).collect()
    });
    drop(h1);
}
