//! Starting `keel up` for the tests, and talking HTTP to it.
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The admin token of the tests' sales.
pub const TOKEN: &str = "up-test-admin-token";

/// One HTTP request (with the admin token) on its own connection: status and body.
pub fn call(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    (
        status,
        out.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default(),
    )
}

/// Waits (up to 60 s) for a line containing `needle`.
pub fn wait_for(lines: &mpsc::Receiver<String>, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match lines.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return line,
            Ok(_) => {}
            Err(_) => break,
        }
    }
    panic!("no line with {needle:?}");
}

/// A running `keel up` in a temporary directory; stopped with SIGINT when dropped (also when
/// a test fails).
pub struct Up {
    /// The `keel up` process.
    pub child: Child,
    /// Its output, line by line.
    pub lines: mpsc::Receiver<String>,
    /// The gateway's address.
    pub gateway: String,
    /// Each part's first pid, by name.
    pub started: BTreeMap<String, u32>,
    /// Each part's address, by name; `gateway-admin` for the gateway's admin port.
    pub addrs: BTreeMap<String, String>,
    /// The directory it runs in.
    pub dir: tempfile::TempDir,
    stopped: bool,
}

/// A temporary directory with a keel.toml on free ports, these `[limits]` lines, and
/// `inventory` added to the `[inventory]` section.
pub fn configured(limits: &str, inventory: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("keel.toml"),
        format!(
            "data_dir = \"data\"\nadmin_token = \"{TOKEN}\"\n[gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[registry]\nlisten = \"127.0.0.1:0\"\n[api]\nlisten = \"127.0.0.1:0\"\n[inventory]\nlisten = \"127.0.0.1:0\"\n{inventory}[orders]\nlisten = \"127.0.0.1:0\"\npayment_window_ms = 60000\n[chat]\nlisten = \"127.0.0.1:0\"\n[limits]\n{limits}"
        ),
    )
    .unwrap();
    dir
}

/// Spawns `keel up` in `dir`; the process and its stdout, line by line.
pub fn spawn_up(dir: &std::path::Path) -> (Child, mpsc::Receiver<String>) {
    spawn_keel(dir, &["up"])
}

/// Spawns `keel <args>` in `dir`; the process and its stdout, line by line (stdout and stderr
/// are also echoed into the test's captured output).
pub fn spawn_keel(dir: &std::path::Path, args: &[&str]) -> (Child, mpsc::Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, lines) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    // Both streams are echoed into the test's captured output, so a failing test shows what
    // `keel` and its parts said (a part's exit and its error among them).
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("| {line}");
            let _ = tx.send(line);
        }
    });
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            println!("|! {line}");
        }
    });
    (child, lines)
}

impl Up {
    /// Starts `keel up` on free ports with these `[limits]` lines, and waits until it is up.
    pub fn start(limits: &str) -> Up {
        Up::start_with(limits, "")
    }

    /// Like [`Up::start`], with `inventory` added to the `[inventory]` section.
    pub fn start_with(limits: &str, inventory: &str) -> Up {
        Up::run_in(configured(limits, inventory))
    }

    /// Starts `keel up` in `dir` (which holds its keel.toml) and waits until it is up.
    pub fn run_in(dir: tempfile::TempDir) -> Up {
        let (child, lines) = spawn_up(dir.path());
        let mut up = Up {
            child,
            lines,
            gateway: String::new(),
            started: BTreeMap::new(),
            addrs: BTreeMap::new(),
            dir,
            stopped: false,
        };
        // Every part's banner, until the system is up.
        let ready = loop {
            let line = wait_for(&up.lines, "");
            if line.contains("Keel is up") {
                break line;
            }
            if let Some(rest) = line.strip_prefix("started ") {
                let name = rest.split(' ').next().unwrap().to_owned();
                up.started.insert(name.clone(), pid_of(&line));
                if let Some((_, addr)) = rest.rsplit_once(" on ") {
                    up.addrs.insert(name, addr.to_owned());
                }
            }
            if let Some((_, addr)) = line.split_once("[gateway] admin API on http://") {
                up.addrs
                    .insert("gateway-admin".into(), addr.trim().to_owned());
            }
        };
        up.gateway = ready
            .split("http://")
            .nth(1)
            .and_then(|r| r.split('/').next())
            .unwrap()
            .to_owned();
        up
    }

    /// Stops it with SIGINT and returns how it exited (within 30 s).
    pub fn stop(&mut self) -> ExitStatus {
        self.stopped = true;
        interrupt(self.child.id());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "keel up did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if !self.stopped {
            interrupt(self.child.id());
            let _ = self.child.wait();
        }
    }
}

/// A `keel up` process that is stopped with SIGINT when dropped, unless it has exited: also
/// when a test fails before it stops it.
pub struct Interrupted(pub Child);

impl Drop for Interrupted {
    fn drop(&mut self) {
        if !matches!(self.0.try_wait(), Ok(Some(_))) {
            interrupt(self.0.id());
            let _ = self.0.wait();
        }
    }
}

fn interrupt(pid: u32) {
    let _ = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// The pid in a `started NAME (pid N) on ADDRESS` line.
pub fn pid_of(line: &str) -> u32 {
    line.split("(pid ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .and_then(|p| p.parse().ok())
        .unwrap()
}

/// Whether process `pid` is alive.
pub fn alive(pid: u32) -> bool {
    Command::new("kill")
        .args(["-0", &pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `keel bench seckill` (50 units, 16 at a time) against the gateway; it must exit
/// successfully; returns its summary.
pub fn bench(gw: &str, buyers: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["--buyers", buyers, "--stock", "50", "--concurrency", "16"];
    args.extend_from_slice(extra);
    bench_with(gw, &args)
}

/// `keel bench seckill` against the gateway `gw` with `args` (buyers, stock, load); its
/// summary (the last line).
pub fn bench_with(gw: &str, args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["bench", "seckill", "--gateway", gw, "--token", TOKEN])
        .args(args)
        .stderr(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    serde_json::from_str(text.lines().last().unwrap()).unwrap()
}

/// An open-loop sale through `gw` — `buyers` arriving at `rate` a second for `stock` units —
/// with the processes `victims` names SIGKILLed 1.5 s in; the sale's summary, checked: every
/// unit sold, nothing oversold, no acknowledged buy without its order, the invariants whole.
pub fn sale_with_kill(
    gw: &str,
    (buyers, stock, rate): (u64, u64, u64),
    victims: impl FnOnce() -> Vec<u32>,
) -> serde_json::Value {
    let gw = gw.to_owned();
    let sale = std::thread::spawn(move || {
        bench_with(
            &gw,
            &[
                "--buyers",
                &buyers.to_string(),
                "--stock",
                &stock.to_string(),
                "--rate",
                &rate.to_string(),
            ],
        )
    });
    std::thread::sleep(Duration::from_millis(1500));
    let pids: Vec<String> = victims().iter().map(u32::to_string).collect();
    assert!(
        Command::new("kill")
            .arg("-9")
            .args(&pids)
            .status()
            .unwrap()
            .success(),
        "killing {pids:?}"
    );
    let summary = sale.join().unwrap();
    assert_eq!(
        (
            summary["bought"].as_u64(),
            summary["oversold"].as_u64(),
            summary["lost_acks"].as_u64(),
            summary["ok"].as_bool(),
        ),
        (Some(stock), Some(0), Some(0), Some(true)),
        "{summary}"
    );
    summary
}
