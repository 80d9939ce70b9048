//! When a server process should stop: Ctrl-C, SIGTERM, or its supervisor gone.

/// The environment variable a supervisor (`keel up`) sets in its children: its own process
/// id. A child whose parent is no longer that process was orphaned (the supervisor was
/// killed with SIGKILL, say) and stops rather than outlive the system it belonged to.
pub const SUPERVISOR_ENV: &str = "KEEL_UP_PID";

/// Resolves on Ctrl-C (SIGINT) or SIGTERM, or — in a process started by a supervisor that
/// set [`SUPERVISOR_ENV`] — once that supervisor is gone (checked every 500 ms).
pub async fn stop_requested() {
    let supervisor: Option<u32> = std::env::var(SUPERVISOR_ENV)
        .ok()
        .and_then(|p| p.parse().ok());
    let orphaned = async {
        match supervisor {
            Some(pid) => loop {
                if std::os::unix::process::parent_id() != pid {
                    tracing::warn!(supervisor = pid, "the supervisor is gone; stopping");
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            },
            None => std::future::pending::<()>().await,
        }
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let terminated = async {
        match term.as_mut() {
            Some(t) => {
                t.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminated => {}
        () = orphaned => {}
    }
}
