//! `keel gateway` as users run it: a configuration file, SIGHUP to reload it (a broken file is
//! refused and the old configuration keeps serving), and the admin port.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One HTTP/1.1 request on its own connection; the whole answer as text.
fn get(port: u16, path: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn config(port: u16, admin: u16, dir: &std::path::Path) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n[[routes]]\npath_prefix = \"/\"\nstatic_dir = \"{}\"\n",
        dir.display()
    )
}

fn hup(pid: u32) {
    let ok = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

/// Polls until `path` answers with `want` in its body (the reload is asynchronous).
fn wait_for(port: u16, path: &str, want: &str) -> String {
    let mut last = String::new();
    for _ in 0..100 {
        last = get(port, path);
        if last.ends_with(want) {
            return last;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("never saw {want:?}; last answer {last:?}");
}

#[test]
fn sighup_reloads_the_configuration_file() {
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    std::fs::create_dir_all(&one).unwrap();
    std::fs::create_dir_all(&two).unwrap();
    std::fs::write(one.join("hello.txt"), "first").unwrap();
    std::fs::write(two.join("hello.txt"), "second").unwrap();
    let (port, admin) = (free_port(), free_port());
    let file = dir.path().join("gateway.toml");
    std::fs::write(&file, config(port, admin, &one)).unwrap();

    let mut child = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["gateway", "--config"])
        .arg(&file)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start keel gateway");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut banner = String::new();
    stdout.read_line(&mut banner).unwrap();
    assert!(banner.contains(&format!("127.0.0.1:{port}")), "{banner}");
    // Keep reading what it prints, so its stdout never breaks.
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));

    wait_for(port, "/hello.txt", "first");
    std::fs::write(&file, config(port, admin, &two)).unwrap();
    hup(child.id());
    wait_for(port, "/hello.txt", "second");

    // A broken file: refused, and the running configuration stays.
    std::fs::write(&file, "[[routes]]\nupstream = 5\n").unwrap();
    hup(child.id());
    std::thread::sleep(Duration::from_millis(300));
    assert!(get(port, "/hello.txt").ends_with("second"));
    let metrics = wait_for(admin, "/metrics", "");
    assert!(
        metrics.contains("keel_gateway_reloads_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("keel_gateway_reloads_refused_total 1"),
        "{metrics}"
    );
    assert!(child.try_wait().unwrap().is_none(), "still running");
    child.kill().unwrap();
    child.wait().unwrap();
}
