//! `keel up` and its parts as a new user meets them when something is wrong: a second process
//! on one data directory, a configuration file that does not exist, a port in use, a part that
//! cannot start, a closed stdout, secrets kept off the command line, bounded request bodies on
//! every HTTP server, and `keel serve`'s server settings.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{TOKEN, Up, alive};

/// Runs `keel ARGS` in `dir` to its end (at most 60 s); its output.
fn keel(dir: &std::path::Path, args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("keel {args:?} still runs after 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A keel.toml on fixed ports taken from free ones, with `edit` applied to its text.
fn config(dir: &std::path::Path, edit: impl Fn(String) -> String) {
    let text = format!(
        "data_dir = \"data\"\nadmin_token = \"{TOKEN}\"\n[gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[registry]\nlisten = \"127.0.0.1:0\"\n[api]\nlisten = \"127.0.0.1:0\"\n[inventory]\nlisten = \"127.0.0.1:0\"\n[orders]\nlisten = \"127.0.0.1:0\"\npayment_window_ms = 60000\n[chat]\nlisten = \"127.0.0.1:0\"\n[limits]\n"
    );
    std::fs::write(dir.join("keel.toml"), edit(text)).unwrap();
}

#[test]
fn a_second_keel_up_or_part_on_one_data_directory_is_refused_naming_the_holder() {
    let up = Up::start("");
    let dir = up.dir.path();
    // A second `keel up` on the same keel.toml (so the same data_dir), other ports (all 0).
    let out = keel(dir, &["up", "--seconds", "5"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(&format!("process {}", up.child.id())) && err.contains("data"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    // Every part on the directory of its running twin: refused at once, naming the twin.
    let data = dir.join("data");
    let path = |name: &str| data.join(name).to_string_lossy().into_owned();
    let cases: Vec<(&str, Vec<String>)> = vec![
        (
            "registry",
            vec![
                "registry".into(),
                "--addr".into(),
                "127.0.0.1:0".into(),
                "--data-dir".into(),
                path("registry"),
            ],
        ),
        (
            "inventory-0",
            vec![
                "seckill".into(),
                "inventory".into(),
                "--addr".into(),
                "127.0.0.1:0".into(),
                "--data-dir".into(),
                path("inventory-0"),
                "--shard".into(),
                "inv-0".into(),
            ],
        ),
        (
            "orders-0",
            vec![
                "seckill".into(),
                "orders".into(),
                "--addr".into(),
                "127.0.0.1:0".into(),
                "--data-dir".into(),
                path("orders-0"),
                "--inventory".into(),
                "inv-0=127.0.0.1:1".into(),
            ],
        ),
    ];
    for (part, args) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = keel(dir, &args);
        let err = stderr(&out);
        assert!(!out.status.success(), "{part}: {err}");
        let pid = up.started[part];
        assert!(
            err.contains(&format!("process {pid}")) && err.contains(&path(part)),
            "{part}: {err}"
        );
    }
    let mut api = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args([
            "seckill",
            "api",
            "--addr",
            "127.0.0.1:0",
            "--data-dir",
            &path("catalog"),
            "--inventory",
            "inv-0=127.0.0.1:1",
        ])
        .env("KEEL_ADMIN_TOKEN", TOKEN)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = String::new();
    api.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(!api.wait().unwrap().success(), "{err}");
    assert!(
        err.contains(&format!("process {}", up.started["api"])),
        "{err}"
    );
    // The sale is unharmed: the first `keel up` still serves.
    let (status, _) = common::call(&up.gateway, "GET", "/api/items", "");
    assert_eq!(status, 200);
}

#[test]
fn a_named_configuration_file_must_exist() {
    let dir = tempfile::tempdir().unwrap();
    let out = keel(
        dir.path(),
        &["up", "--config", "typo.toml", "--seconds", "1"],
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("typo.toml: no such configuration file"),
        "{err}"
    );
    assert!(
        !dir.path().join("typo.toml").exists(),
        "a named file was made up"
    );
    assert!(!dir.path().join("keel-data").exists(), "a sale was started");
}

#[test]
fn start_failures_name_the_field_or_the_parts_own_error() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let cases = [
        (
            format!("[api]\nlisten = \"127.0.0.1:{port}\""),
            "api.listen = \"127.0.0.1:",
            "cannot listen there",
        ),
        (
            "[registry]\nlisten = \"127.0.0.1:99999\"".to_owned(),
            "registry.listen = \"127.0.0.1:99999\"",
            "is not an IP address and port",
        ),
        (
            "data_dir = \"data\"".to_owned(),
            "data_dir keel.toml/data",
            "cannot create it",
        ),
    ];
    for (i, (replace, field, reason)) in cases.into_iter().enumerate() {
        config(dir.path(), |text| {
            let (section, _) = replace.split_once('\n').unwrap_or((&replace, ""));
            match i {
                0 | 1 => {
                    text.replacen(&format!("{section}\nlisten = \"127.0.0.1:0\""), &replace, 1)
                }
                _ => text.replacen(&replace, "data_dir = \"keel.toml/data\"", 1),
            }
        });
        let out = keel(dir.path(), &["up", "--seconds", "1"]);
        let err = stderr(&out);
        assert!(!out.status.success(), "{err}");
        assert!(err.contains(field) && err.contains(reason), "{err}");
        // Checked before anything started.
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("started "),
            "{err}"
        );
    }
    drop(taken);

    // A failure only the part itself can see: its own error is shown, not just that it
    // exited.
    config(dir.path(), |text| text);
    let registry = dir.path().join("data/registry");
    std::fs::create_dir_all(&registry).unwrap();
    std::fs::write(
        registry.join("00000000000000000001.wal"),
        b"this is not a journal segment",
    )
    .unwrap();
    let out = keel(dir.path(), &["up", "--seconds", "1"]);
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("registry exited before it listened")
            && err.contains("00000000000000000001.wal is damaged at byte 0"),
        "{err}"
    );
}

#[test]
fn a_closed_stdout_stops_nothing_and_secrets_stay_off_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    config(dir.path(), |text| text);
    let log = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["up", "--seconds", "20"])
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    // `keel up | head -3`: three lines read, then the pipe is closed.
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut first = Vec::new();
    for _ in 0..3 {
        first.push(lines.next().unwrap().unwrap());
    }
    drop(lines);
    // It goes on: every part starts (each started line now falls on a closed pipe), and the
    // system serves.
    let pids = dir.path().join("data/pids.json");
    let deadline = Instant::now() + Duration::from_secs(60);
    let parts = loop {
        assert!(Instant::now() < deadline, "the parts did not start");
        assert!(child.try_wait().unwrap().is_none(), "keel up ended early");
        if let Ok(text) = std::fs::read_to_string(&pids)
            && let Ok(map) = serde_json::from_str::<std::collections::BTreeMap<String, u32>>(&text)
            && map.len() == 9
        {
            break map;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // No process's command line carries the admin token.
    for (name, pid) in &parts {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&cmdline).contains(TOKEN),
            "{name}'s command line shows the admin token"
        );
    }
    let own = std::fs::read(format!("/proc/{}/cmdline", child.id())).unwrap();
    assert!(!String::from_utf8_lossy(&own).contains(TOKEN));
    // keel.toml and the gateway's file hold the token: readable by their owner alone.
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(dir.path().join("data/gateway.toml"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o077,
        0,
        "gateway.toml is readable by others: {mode:o}"
    );
    // Ended by SIGINT: it stops as usual, without a panic.
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    let err = std::fs::read_to_string(dir.path().join("stderr.log")).unwrap();
    assert!(!err.contains("panicked"), "{err}");
    assert!(status.success(), "{status}: {err}");
    // Logs written to a file carry no colour codes.
    assert!(!err.contains('\u{1b}'), "{err}");
    for pid in parts.values() {
        let deadline = Instant::now() + Duration::from_secs(20);
        while alive(*pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Sends `head` and nothing more; the answer's status code and how long it took (None if no
/// status line came within `within`).
fn answer_to_stall(addr: &str, head: &str, within: Duration) -> Option<(u16, Duration)> {
    use std::io::Write as _;
    let started = Instant::now();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(within)).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while got.len() < 12 {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    let status = std::str::from_utf8(got.get(9..12)?).ok()?.parse().ok()?;
    Some((status, started.elapsed()))
}

/// Every HTTP server of the system other than the gateway's proxy port (the registry, an
/// RPC port's HTTP side, the sale's API, the gateway's admin port): a declared body over the
/// limit gets 413 at once, and a body that stalls gets 408 once the documented 10 s are over.
#[test]
fn every_http_server_refuses_lying_and_stalled_bodies() {
    let up = Up::start("");
    let admin = match up.addrs.get("gateway-admin") {
        Some(a) => a.clone(),
        None => common::wait_for(&up.lines, "admin API on http://")
            .split("http://")
            .nth(1)
            .unwrap()
            .trim()
            .to_owned(),
    };
    let servers = [
        (
            "registry",
            up.addrs["registry"].clone(),
            "/keel.registry.v1.Registry/GetConfig",
        ),
        (
            "inventory",
            up.addrs["inventory-0"].clone(),
            "/keel.seckill.v1.Inventory/Reserve",
        ),
        ("api", up.addrs["api"].clone(), "/api/admin/items"),
        ("gateway admin", admin, "/admin/reload"),
    ];
    for (name, addr, path) in &servers {
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 10000000000\r\n\r\n"
        );
        let (status, took) = answer_to_stall(addr, &head, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("{name}: no answer to a declared 10 GB body"));
        assert_eq!(status, 413, "{name}");
        assert!(took < Duration::from_secs(2), "{name}: {took:?}");
    }
    let stalled: Vec<_> = servers
        .iter()
        .map(|(name, addr, path)| {
            let head = format!(
                "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 100\r\n\r\n{{\"par"
            );
            let (name, addr) = (name.to_string(), addr.clone());
            std::thread::spawn(move || {
                (name, answer_to_stall(&addr, &head, Duration::from_secs(20)))
            })
        })
        .collect();
    for probe in stalled {
        let (name, answer) = probe.join().unwrap();
        let (status, took) = answer.unwrap_or_else(|| panic!("{name}: no answer to a stall"));
        assert_eq!(status, 408, "{name}");
        assert!(
            took >= Duration::from_secs(9) && took < Duration::from_secs(15),
            "{name}: {took:?}"
        );
    }
}

/// `keel serve --server-config` applies every key of the file and refuses an unknown one.
#[test]
fn keel_serve_reads_its_server_settings_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bad.toml"), "max_frame_sise = 1024\n").unwrap();
    let out = keel(dir.path(), &["serve", "--server-config", "bad.toml"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("max_frame_sise"), "{}", stderr(&out));

    std::fs::write(
        dir.path().join("server.toml"),
        "max_frame_size = 1024\nbody_timeout_ms = 300\n",
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut server = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["serve", "--addr", &addr, "--server-config", "server.toml"])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(Instant::now() < deadline, "keel serve did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    let path = "/keel.echo.v1.Echo/Echo";
    let over = answer_to_stall(
        &addr,
        &format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n"),
        Duration::from_secs(5),
    );
    let stalled = answer_to_stall(
        &addr,
        &format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n\r\n{{"),
        Duration::from_secs(5),
    );
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(over.map(|a| a.0), Some(413), "max_frame_size applied");
    let (status, took) = stalled.unwrap();
    assert_eq!(status, 408);
    assert!(
        took < Duration::from_secs(3),
        "body_timeout_ms applied: {took:?}"
    );
}

/// Every port of the system other than the gateway's proxy port (whose paths belong to its
/// routes) serves `/health`, `/metrics` and `/status`: the registry, the inventory shards and
/// orders instances (RPC ports), the sale's API, the chat instances and the gateway's admin
/// port.
#[test]
fn every_port_serves_health_metrics_and_status() {
    let up = Up::start("");
    let admin = match up.addrs.get("gateway-admin") {
        Some(a) => a.clone(),
        None => common::wait_for(&up.lines, "admin API on http://")
            .split("http://")
            .nth(1)
            .unwrap()
            .trim()
            .to_owned(),
    };
    let mut ports: Vec<(String, String)> = up
        .addrs
        .iter()
        .filter(|(name, _)| name.as_str() != "gateway" && name.as_str() != "gateway-admin")
        .map(|(n, a)| (n.clone(), a.clone()))
        .collect();
    ports.push(("gateway admin".into(), admin));
    assert_eq!(ports.len(), 9, "{ports:?}");
    for (name, addr) in &ports {
        let get = |path: &str| {
            use std::io::Write as _;
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            write!(
                s,
                "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            .unwrap();
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            let status: u16 = out.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
            (
                status,
                out.split_once("\r\n\r\n")
                    .map(|(_, b)| b.to_owned())
                    .unwrap_or_default(),
            )
        };
        let (status, body) = get("/health");
        assert_eq!(status, 200, "{name} /health: {body}");
        assert!(body.contains("serving"), "{name} /health: {body}");
        let (status, body) = get("/metrics");
        assert_eq!(status, 200, "{name} /metrics");
        assert!(body.contains("# TYPE "), "{name} /metrics: {body}");
        let (status, body) = get("/status");
        assert_eq!(status, 200, "{name} /status");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        assert!(v.get("uptime_s").is_some(), "{name} /status: {body}");
    }
}

/// `keel bench seckill` as a new user runs it: the token from keel.toml, a warning when the
/// rate limits refused most attempts, and a system that stops mid-run reported as "could not
/// check", not as lost acknowledgements.
#[test]
fn the_sale_bench_tells_a_limited_run_and_an_unreachable_system_from_a_broken_one() {
    // A low limit per client address: most attempts of one machine's buyers are refused.
    let mut up = Up::start("buy_per_ip_per_second = 20.0\n");
    let dir = up.dir.path().to_owned();
    let out = keel(
        &dir,
        &[
            "bench",
            "seckill",
            "--gateway",
            &up.gateway,
            "--buyers",
            "400",
            "--stock",
            "20",
            "--concurrency",
            "64",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text} {}", stderr(&out));
    let summary: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(summary["verdict"], "ok", "{summary}");
    assert!(
        summary["rate_limited"].as_u64().unwrap() * 2 > summary["attempts"].as_u64().unwrap(),
        "{summary}"
    );
    assert!(
        summary["warnings"][0]
            .as_str()
            .unwrap()
            .contains("rate limits"),
        "{summary}"
    );
    assert!(stderr(&out).contains("warning: "), "{}", stderr(&out));

    // The system stops while the bench runs: nothing can be checked, nothing is called lost.
    let mut bench = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args([
            "bench",
            "seckill",
            "--gateway",
            &up.gateway,
            "--buyers",
            "20000",
            "--stock",
            "100",
            "--concurrency",
            "32",
        ])
        .current_dir(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut progress = BufReader::new(bench.stderr.take().unwrap()).lines();
    // The progress line shows errors as they happen.
    let first = progress.next().unwrap().unwrap();
    assert!(first.contains("errors"), "{first}");
    up.stop();
    let said: Vec<String> = progress.map_while(Result::ok).collect();
    let last = said.join("\n");
    let mut out = String::new();
    bench
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let status = bench.wait().unwrap();
    assert!(!status.success());
    assert!(last.contains("could not check the invariants"), "{last}");
    let summary: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(summary["verdict"], "unchecked", "{summary}");
    assert_eq!(summary["lost_acks"], 0, "{summary}");
    assert!(
        summary["breaches"].as_array().unwrap().is_empty(),
        "{summary}"
    );
}
