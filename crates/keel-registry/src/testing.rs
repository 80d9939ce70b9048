//! Support for test suites that need a real etcd (hidden from the docs; not part of the API):
//! an etcd process started on free loopback ports with its data in a temporary directory,
//! killed and removed when dropped (also when a test fails). Without an `etcd` binary the
//! test is skipped with a message, or fails under `KEEL_REQUIRE_SERVICES=1`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{EtcdBackend, NamingBackend};

/// An etcd process a test started.
#[derive(Debug)]
pub struct Etcd {
    /// A backend on it, keeping its keys under `/keel-test`.
    pub backend: EtcdBackend,
    /// Its client URL (`http://127.0.0.1:PORT`).
    pub endpoint: String,
    child: Child,
    dir: PathBuf,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Starts an etcd for `test` and waits until it answers; `None` (after saying so) when there is
/// no `etcd` binary, a panic instead when `KEEL_REQUIRE_SERVICES=1`.
pub async fn etcd(test: &str) -> Option<Etcd> {
    let available = Command::new("etcd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !available {
        assert!(
            std::env::var("KEEL_REQUIRE_SERVICES").as_deref() != Ok("1"),
            "{test}: etcd is required (KEEL_REQUIRE_SERVICES=1) but no `etcd` binary was found"
        );
        eprintln!("skipping {test}: no `etcd` binary (apt-get install etcd-server)");
        return None;
    }
    // A port found free may be taken again before etcd binds it (tests run side by side):
    // etcd then exits at once, and it is started again on other ports.
    let mut attempt = 0;
    loop {
        attempt += 1;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!("keel-etcd-{}-{nanos}", std::process::id()));
        let (client, peer) = (free_port(), free_port());
        let endpoint = format!("http://127.0.0.1:{client}");
        let child = Command::new("etcd")
            .args(["--name", "keel-test", "--data-dir"])
            .arg(dir.join("data"))
            .args([
                "--listen-client-urls",
                &endpoint,
                "--advertise-client-urls",
                &endpoint,
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
                "--initial-cluster",
                &format!("keel-test=http://127.0.0.1:{peer}"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start etcd");
        let backend = EtcdBackend::connect(std::slice::from_ref(&endpoint), "/keel-test")
            .await
            .unwrap_or_else(|e| panic!("etcd client: {e}"));
        let mut etcd = Etcd {
            backend,
            endpoint,
            child,
            dir,
        };
        // Ready when it answers a read.
        let mut exited = None;
        for _ in 0..200 {
            if etcd.backend.list("default", "probe").await.is_ok() {
                return Some(etcd);
            }
            if let Ok(Some(status)) = etcd.child.try_wait() {
                exited = Some(status);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        match exited {
            Some(status) if attempt < 5 => {
                eprintln!(
                    "{test}: etcd exited at start ({status}) on ports {client}/{peer}; again"
                );
            }
            Some(status) => panic!("etcd exited at start {attempt} times, the last: {status}"),
            None => panic!("etcd did not become ready on port {client}"),
        }
    }
}
