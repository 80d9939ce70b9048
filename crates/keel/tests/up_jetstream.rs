//! `keel up` with the inventory shards' journals in NATS JetStream (`[inventory] journal`):
//! the sale runs, a SIGKILLed shard comes back from its stream, a restart of the whole system
//! finds every sale with no local inventory files, and a data directory is never switched
//! between local journals and JetStream; standbys take over a killed shard owner; the orders
//! in PostgreSQL, fed from the streams, outlive a killed orders instance. Needs the NATS
//! server on 127.0.0.1:4222 (or `KEEL_NATS_URL`) and, for the orders, PostgreSQL (on
//! 127.0.0.1:5432 or `KEEL_POSTGRES_URL`); skipped with a message without them, failed
//! instead when `KEEL_REQUIRE_SERVICES=1`.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Up, bench, call, wait_for};
use keel_store::testing::{DeleteStreams, nats_up, nats_url};

fn buy(gw: &str, user: &str) -> u16 {
    call(
        gw,
        "POST",
        "/api/items/item-1/buy",
        &format!(r#"{{"user_id": "{user}"}}"#),
    )
    .0
}

#[test]
fn a_sale_with_its_inventory_in_jetstream_survives_a_killed_shard_and_a_restart() {
    if !nats_up("a_sale_with_its_inventory_in_jetstream_survives_a_killed_shard_and_a_restart") {
        return;
    }
    let journal = format!("journal = \"{}\"\n", nats_url());
    let limits = "buy_per_ip_per_second = 0\nbuy_per_user_per_second = 0\n";
    let mut up = Up::start_with(limits, &journal);
    let data = up.dir.path().join("data");
    let streams = shard_streams(&up);
    let gw = up.gateway.clone();
    let (status, created) = call(
        &gw,
        "POST",
        "/api/admin/items",
        r#"{"name": "Kettle", "price_cents": 2500, "stock": 10}"#,
    );
    assert_eq!(status, 201, "{created}");
    assert_eq!(buy(&gw, "ann"), 200);

    // SIGKILL both shards: each comes back from its stream and the sale goes on.
    for shard in ["inventory-0", "inventory-1"] {
        let pid = up.started[shard];
        assert!(
            Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status()
                .unwrap()
                .success()
        );
        wait_for(&up.lines, &format!("restarted {shard}"));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while buy(&gw, "bob") != 200 {
        assert!(Instant::now() < deadline, "buying after the restarts");
        std::thread::sleep(Duration::from_millis(100));
    }
    // A sale under load, with the invariants checked by the bench through the API.
    let summary = bench(&gw, "300", &[]);
    assert_eq!(
        (
            summary["bought"].as_u64(),
            summary["oversold"].as_u64(),
            summary["lost_acks"].as_u64()
        ),
        (Some(50), Some(0), Some(0)),
        "{summary}"
    );
    let audit = |gw: &str| {
        let (_, audit) = call(gw, "GET", "/api/admin/items/item-1/audit", "");
        let audit: serde_json::Value = serde_json::from_str(&audit).unwrap();
        (audit["stock_left"].as_u64(), audit["reserved"].as_u64())
    };
    assert_eq!(audit(&gw), (Some(8), Some(2)));
    assert!(up.stop().success());

    // The shards' records are in their streams, and nowhere on the local disk.
    let counts = streams.messages();
    assert!(counts.iter().all(|n| *n > 0), "{counts:?}");
    for shard in ["inventory-0", "inventory-1"] {
        assert!(
            !data.join(shard).exists(),
            "{shard} wrote a local journal although its journal is in JetStream"
        );
    }

    // The whole system again on the same directory: the shards replay their streams.
    let dir = std::mem::replace(&mut up.dir, tempfile::tempdir().unwrap());
    let again = Up::run_in(dir);
    assert_eq!(audit(&again.gateway), (Some(8), Some(2)));
    assert_eq!(
        buy(&again.gateway, "ann"),
        409,
        "ann holds her unit already"
    );
    drop(again);
    drop(streams);
}

#[test]
fn a_standby_takes_over_a_shard_whose_owner_is_killed_mid_sale() {
    if !nats_up("a_standby_takes_over_a_shard_whose_owner_is_killed_mid_sale") {
        return;
    }
    let inventory = format!(
        "journal = \"{}\"\nstandbys = 1\nlease_ttl_ms = 1000\n",
        nats_url()
    );
    let limits = "buy_per_ip_per_second = 0\nbuy_per_user_per_second = 0\n";
    let up = Up::start_with(limits, &inventory);
    let _streams = shard_streams(&up);
    for part in ["inventory-0-standby-1", "inventory-1-standby-1"] {
        assert!(up.started.contains_key(part), "{:?}", up.started.keys());
    }
    // An open-loop sale (2,000 buyers at 500/s for 1,000 units); 1.5 s in, the owner of
    // shard inv-0 (its first process, elected first) is SIGKILLed.
    let summary = common::sale_with_kill(&up.gateway, (2000, 1000, 500), || {
        vec![up.started["inventory-0"]]
    });
    // The buys in doubt were answered by the standby: none ended as an error.
    assert_eq!(summary["errors"].as_u64(), Some(0), "{summary}");
    drop(up);
}

#[test]
fn orders_in_postgresql_follow_the_streams_and_outlive_a_killed_orders_instance() {
    let test = "orders_in_postgresql_follow_the_streams_and_outlive_a_killed_orders_instance";
    if !nats_up(test) {
        return;
    }
    let Some(db) = keel_seckill::testing::temp_database(test) else {
        return;
    };
    let limits = "buy_per_ip_per_second = 0\nbuy_per_user_per_second = 0\n";
    let dir = common::configured(limits, &format!("journal = \"{}\"\n", nats_url()));
    let config = dir.path().join("keel.toml");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "payment_window_ms = 60000\n",
        &format!("payment_window_ms = 60000\ndatabase = \"{}\"\n", db.url),
    );
    std::fs::write(&config, text).unwrap();
    let up = Up::run_in(dir);
    let _streams = shard_streams(&up);
    // The database URL reaches the orders by environment, not on their command line.
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", up.started["orders-0"])).unwrap();
    assert!(
        !String::from_utf8_lossy(&cmdline).contains("postgres://"),
        "the database URL is on the command line"
    );
    // An open-loop sale; 1.5 s in, orders-0 is SIGKILLed (keel up starts it again, and it goes
    // on from its durable consumer).
    common::sale_with_kill(&up.gateway, (2000, 1000, 500), || {
        vec![up.started["orders-0"]]
    });
    // Every order is a row in PostgreSQL, one per reservation, and none is in a local journal.
    let rows: (i64, i64) = tokio::runtime::Runtime::new().unwrap().block_on(async {
        use sqlx::Connection as _;
        let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
        sqlx::query_as(
            "SELECT count(*), count(DISTINCT (inventory, reservation_id)) FROM seckill_orders",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap()
    });
    assert_eq!(rows, (1000, 1000));
    assert!(!up.dir.path().join("data").join("orders-0").exists());
    drop(up);
}

#[test]
fn the_scale_out_profile_runs_on_etcd_jetstream_and_postgresql() {
    let test = "the_scale_out_profile_runs_on_etcd_jetstream_and_postgresql";
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
    // Names, config, elections in etcd; journals in JetStream; orders in PostgreSQL; a standby
    // per shard. No registry of Keel's is started.
    let naming = etcd.endpoint.replace("http://", "etcd://");
    let limits = "buy_per_ip_per_second = 0\nbuy_per_user_per_second = 0\n";
    let inventory = format!(
        "journal = \"{}\"\nstandbys = 1\nlease_ttl_ms = 1000\n",
        nats_url()
    );
    let dir = common::configured(limits, &inventory);
    let config = dir.path().join("keel.toml");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(
            "[registry]\nlisten = \"127.0.0.1:0\"\n",
            &format!("[registry]\nlisten = \"127.0.0.1:0\"\nexternal = \"{naming}\"\n"),
        )
        .replace(
            "payment_window_ms = 60000\n",
            &format!("payment_window_ms = 60000\ndatabase = \"{}\"\n", db.url),
        );
    std::fs::write(&config, text).unwrap();
    let up = Up::run_in(dir);
    let _streams = shard_streams(&up);
    assert!(!up.started.contains_key("registry"), "{:?}", up.started);
    // The parts are registered in etcd, under Keel's default prefix.
    let listed = rt.block_on(async {
        use keel_registry::NamingBackend as _;
        let naming = keel_registry::Naming::connect(&naming).await.unwrap();
        let mut names = Vec::new();
        for service in [
            "seckill-api",
            "seckill-inventory-inv-0",
            "seckill-orders-inv-1",
        ] {
            names.push((
                service,
                naming
                    .list("default", service)
                    .await
                    .unwrap()
                    .instances
                    .len(),
            ));
        }
        names
    });
    assert_eq!(
        listed,
        [
            ("seckill-api", 1),
            ("seckill-inventory-inv-0", 1),
            ("seckill-orders-inv-1", 1)
        ]
    );
    // The gateway's opening-time gate follows etcd.
    let gw = up.gateway.clone();
    let later = humantime::format_rfc3339_seconds(
        std::time::SystemTime::now() + Duration::from_secs(3_600),
    );
    let (status, created) = call(
        &gw,
        "POST",
        "/api/admin/items",
        &format!(r#"{{"name": "Later", "price_cents": 1, "stock": 5, "starts_at": "{later}"}}"#),
    );
    assert_eq!(status, 201, "{created}");
    let later_id = serde_json::from_str::<serde_json::Value>(&created).unwrap()["item_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = call(
            &gw,
            "POST",
            &format!("/api/items/{later_id}/buy"),
            r#"{"user_id": "dan"}"#,
        );
        assert_eq!(status, 403, "{body}");
        if body.contains("opens in") {
            break;
        }
        assert!(Instant::now() < deadline, "the gate never closed: {body}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // A sale with shard inv-0's owner SIGKILLed 1.5 s in: its standby, elected in etcd, goes on.
    let summary =
        common::sale_with_kill(&gw, (2000, 1000, 500), || vec![up.started["inventory-0"]]);
    assert_eq!(summary["errors"].as_u64(), Some(0), "{summary}");
    drop(up);
    drop(etcd);
}

#[test]
fn a_bad_external_registry_is_named_with_the_field() {
    let dir = common::configured("", "");
    let config = dir.path().join("keel.toml");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "[registry]\nlisten = \"127.0.0.1:0\"\n",
        "[registry]\nlisten = \"127.0.0.1:0\"\nexternal = \"http://h1:2379\"\n",
    );
    std::fs::write(&config, text).unwrap();
    let err = refused(dir.path());
    assert!(
        err.contains("registry.external: registry address \"http://h1:2379\""),
        "{err}"
    );
}

/// Runs `keel up` in `dir`, which must refuse to start; what it wrote to stderr.
fn refused(dir: &std::path::Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["up", "--seconds", "5"])
        .current_dir(dir)
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_data_directory_is_not_switched_between_local_journals_and_jetstream() {
    // A sale with local inventory journals, then a configuration naming JetStream: refused
    // before anything starts (no server is needed to be refused).
    let mut up = Up::start("");
    let status = up.stop();
    assert!(status.success(), "{status:?}");
    let dir = up.dir.path().to_owned();
    let text = std::fs::read_to_string(dir.join("keel.toml")).unwrap();
    let with_journal = text.replace(
        "[inventory]\nlisten = \"127.0.0.1:0\"\n",
        "[inventory]\nlisten = \"127.0.0.1:0\"\njournal = \"nats://127.0.0.1:4222\"\n",
    );
    assert_ne!(text, with_journal);
    std::fs::write(dir.join("keel.toml"), &with_journal).unwrap();
    let err = refused(&dir);
    assert!(
        err.contains("local files") && err.contains("would start empty"),
        "{err}"
    );
    assert!(!dir.join("data/journal-id").exists());

    // A bad address is named with the field.
    std::fs::write(
        dir.join("keel.toml"),
        text.replace(
            "[inventory]\nlisten = \"127.0.0.1:0\"\n",
            "[inventory]\nlisten = \"127.0.0.1:0\"\njournal = \"nats://h1:4222?replicas=2\"\n",
        ),
    )
    .unwrap();
    let err = refused(&dir);
    assert!(
        err.contains("inventory.journal") && err.contains("replicas must be 1, 3 or 5"),
        "{err}"
    );
}

#[test]
fn orders_in_postgresql_need_the_streams_and_a_sale_keeps_its_order_book() {
    // No server is needed to be refused: each check comes before anything starts.
    let dir = common::configured("", "");
    let config = dir.path().join("keel.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let with = |inventory: &str, database: &str| {
        text.replace(
            "[inventory]\nlisten = \"127.0.0.1:0\"\n",
            &format!("[inventory]\nlisten = \"127.0.0.1:0\"\n{inventory}"),
        )
        .replace(
            "payment_window_ms = 60000\n",
            &format!("payment_window_ms = 60000\n{database}"),
        )
    };
    let journal = "journal = \"nats://127.0.0.1:4222\"\n";
    std::fs::write(&config, with("", "database = \"postgres://db/sale\"\n")).unwrap();
    let err = refused(dir.path());
    assert!(
        err.contains("orders.database needs inventory.journal"),
        "{err}"
    );
    std::fs::write(&config, with(journal, "database = \"mysql://db/sale\"\n")).unwrap();
    let err = refused(dir.path());
    assert!(
        err.contains("orders.database = \"mysql://db/sale\": use postgres://"),
        "{err}"
    );
    // A sale whose orders are local journals is not moved to a database, and the other way.
    std::fs::create_dir_all(dir.path().join("data/orders-0")).unwrap();
    std::fs::write(
        &config,
        with(journal, "database = \"postgres://db/sale\"\n"),
    )
    .unwrap();
    let err = refused(dir.path());
    assert!(err.contains("orders are in local journals"), "{err}");
    std::fs::remove_dir_all(dir.path().join("data/orders-0")).unwrap();
    std::fs::write(dir.path().join("data/orders-database"), "postgres\n").unwrap();
    std::fs::write(&config, with(journal, "")).unwrap();
    let err = refused(dir.path());
    assert!(
        err.contains("keeps its orders in PostgreSQL, but orders.database is not set"),
        "{err}"
    );
}

/// The two shard streams of `up` (named after its data directory's journal id), deleted when
/// the guard drops.
fn shard_streams(up: &Up) -> DeleteStreams {
    let id = std::fs::read_to_string(up.dir.path().join("data").join("journal-id")).unwrap();
    let prefix = id.lines().next().unwrap();
    DeleteStreams::new(vec![format!("{prefix}-inv-0"), format!("{prefix}-inv-1")])
}
