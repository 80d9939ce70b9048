//! kill -9 of the registry process in the middle of a burst of registrations: after a restart
//! on the same data directory, every registration that was acknowledged is there.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use keel_registry::RegistryHandle;
use keel_registry::proto::{GrantLeaseRequest, Instance, RegisterRequest, ServiceRef};
use keel_rpc::{Channel, ChannelConfig};
use parking_lot::Mutex;

/// Starts `keel registry` on a free port and returns it with its address.
fn start_registry(data_dir: &std::path::Path) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["registry", "--addr", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start keel registry");
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let addr = line
        .split_whitespace()
        .nth(3)
        .unwrap_or_else(|| panic!("unexpected banner: {line:?}"))
        .to_owned();
    (child, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_registration_burst_loses_no_acknowledged_registration() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = start_registry(dir.path());
    let channel = Channel::connect(addr.clone(), ChannelConfig::default())
        .await
        .unwrap();
    let handle = RegistryHandle::new(channel);
    let acked: Arc<Mutex<BTreeSet<String>>> = Arc::default();

    let mut tasks = Vec::new();
    for worker in 0..32 {
        let handle = handle.clone();
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            let Ok(lease) = handle
                .client()
                .grant_lease_with(&GrantLeaseRequest { ttl_ms: 3_600_000 }, handle.options())
                .await
            else {
                return;
            };
            for n in 0..10_000u32 {
                let id = format!("w{worker}-{n}");
                let request = RegisterRequest {
                    instance: Some(Instance {
                        namespace: "crash".into(),
                        service: "burst".into(),
                        id: id.clone(),
                        address: format!("127.0.0.1:{}", 1024 + n % 60_000),
                        lease_id: lease.id,
                        ..Instance::default()
                    }),
                };
                match handle
                    .client()
                    .register_with(&request, handle.options())
                    .await
                {
                    Ok(_) => {
                        acked.lock().insert(id);
                    }
                    // The registry died: this call may or may not have been written.
                    Err(_) => return,
                }
            }
        }));
    }
    // Let the burst run, then kill the registry without warning.
    for _ in 0..500 {
        if acked.lock().len() >= 2_000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    for t in tasks {
        let _ = t.await;
    }
    let acked = acked.lock().clone();
    assert!(
        acked.len() >= 100,
        "the burst acknowledged only {} registrations",
        acked.len()
    );

    let (mut child, addr) = start_registry(dir.path());
    let channel = Channel::connect(addr, ChannelConfig::default())
        .await
        .unwrap();
    let handle = RegistryHandle::new(channel);
    let listed: BTreeSet<String> = handle
        .client()
        .list_instances(&ServiceRef {
            namespace: "crash".into(),
            service: "burst".into(),
        })
        .await
        .unwrap()
        .instances
        .into_iter()
        .map(|i| i.id)
        .collect();
    let lost: Vec<&String> = acked.difference(&listed).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged registrations lost, e.g. {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(5)]
    );
    child.kill().unwrap();
    child.wait().unwrap();
}
