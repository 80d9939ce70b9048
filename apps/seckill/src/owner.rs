//! Shard ownership: one owner per inventory shard at a time, chosen by an election in the
//! naming backend (Keel's registry or etcd), with standbys ready to take over.
//!
//! Every inventory process of a shard runs [`run`]. It campaigns in the election
//! `seckill-inventory-<shard>` under a lease of its own; the winner replays the shard's
//! journal, claims it (an owner record appended right after the replay, fenced by the
//! journal's expected last sequence on a stream) and only then registers as the shard's
//! instance, which is how the API and the orders find it. The others wait in the election,
//! answering calls `unavailable`.
//!
//! An owner steps down, and becomes a standby again, when
//! - its lease is gone (`not_found` on a renewal), or it could not renew it for a whole TTL
//!   (a partition: by then the naming backend may have elected another owner);
//! - its journal failed — on a stream, an append refused because another writer appended
//!   (it was replaced while it did not know it).
//!
//! A standby does not only wait for the owner's lease to run out: it asks the owner it waits
//! for whether it is alive (`GET /health` on the owner's address, six times per lease TTL)
//! and, once the owner has not answered for a whole TTL, revokes the owner's lease, so the
//! election moves on at once. The lease would run out by itself, but later when the naming
//! backend lost its leader with the owner's host: etcd's next leader renews every lease to its
//! full TTL when it takes office, the dead owner's too.
//!
//! The election keeps two owners from serving at once in the normal case; the journal's
//! fencing keeps a deposed owner that has not noticed from recording anything after the new
//! owner's claim, so it cannot sell: a reservation is acknowledged only once its record is in
//! the journal. Whatever the old owner recorded before the claim, the new one has replayed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use keel_registry::{NamingBackend, Registration, proto as reg};
use keel_rpc::Code;
use keel_rpc::client::Backoff;
use keel_store::{LogTarget, StoreError};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::peers;
use crate::{Inventory, InventoryError, InventoryService};

/// How many times a new owner replays and claims again when the previous owner's last
/// appends keep landing after its replay.
const CLAIM_ATTEMPTS: u32 = 10;

/// How many leases of abandoned campaigns a process keeps trying to revoke.
const MAX_ABANDONED: usize = 8;

/// How many times per lease TTL a standby asks the owner whether it is alive.
const PROBES_PER_TTL: u32 = 6;

/// The owner a standby waits for: its lease, its address, and when it last answered (or was
/// first seen).
type Watched = (u64, String, Instant);

/// What a process remembers from one campaign to the next.
#[derive(Debug, Default)]
struct Memory {
    /// The owner it waits for. A standby that loses its own lease (the naming backend
    /// electing a leader of its own) campaigns again without forgetting since when the owner
    /// has been silent.
    watched: Option<Watched>,
    /// Leases of its own ended campaigns that could not be revoked (the backend did not
    /// answer). Their keys still queue in the election, ahead of its next campaign, until
    /// they are revoked or run out; etcd's next leader even renews them in full.
    abandoned: Vec<u64>,
}

/// What one inventory process of a shard needs to take part in its election.
#[derive(Debug, Clone)]
pub struct Ownership {
    /// The shard.
    pub shard: String,
    /// The shard's journal (a stream shared by the owner and its standbys).
    pub target: LogTarget,
    /// The election lease's TTL: how long a dead owner keeps the shard before a standby is
    /// elected.
    pub lease_ttl: Duration,
    /// Where this process serves (published as the election's value and registered); it
    /// answers `GET /health` there, which is how the standbys know it is alive.
    pub address: SocketAddr,
}

/// What the process is doing, for status pages and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Waiting in the election (or for the naming backend).
    Standby,
    /// Owner of the shard, elected with this fencing token.
    Owner {
        /// The election's fencing token.
        token: u64,
    },
}

/// The election's name for `shard`.
pub fn election(shard: &str) -> String {
    peers::inventory_service(shard)
}

/// Takes part in the shard's election until `stop` is cancelled: serves the shard through
/// `service` while it owns it, and is a standby otherwise. `role` follows what it does.
pub async fn run<B: NamingBackend + Clone>(
    backend: B,
    ownership: Ownership,
    service: InventoryService,
    role: watch::Sender<Role>,
    stop: CancellationToken,
) {
    let backoff = Backoff {
        initial: Duration::from_millis(100),
        max: ownership.lease_ttl.max(Duration::from_millis(200)),
        ..Backoff::default()
    };
    let mut failures = 0u32;
    let mut memory = Memory::default();
    while !stop.is_cancelled() {
        match own_once(&backend, &ownership, &service, &role, &stop, &mut memory).await {
            Ok(()) => failures = 0,
            Err(e) => {
                tracing::warn!(shard = %ownership.shard, error = %e, "shard ownership: trying again");
                tokio::select! {
                    () = stop.cancelled() => {}
                    () = tokio::time::sleep(backoff.delay(failures)) => {}
                }
                failures = failures.saturating_add(1);
            }
        }
    }
}

/// One term: a lease, a campaign, and — if elected — serving until the term ends.
async fn own_once<B: NamingBackend + Clone>(
    backend: &B,
    ownership: &Ownership,
    service: &InventoryService,
    role: &watch::Sender<Role>,
    stop: &CancellationToken,
    memory: &mut Memory,
) -> anyhow::Result<()> {
    let ttl = ownership.lease_ttl;
    // The backend's expiry of the lease is no earlier than the sending of the grant.
    let asked = tokio::time::Instant::now();
    let lease = backend.grant_lease(ttl).await?;
    let lost = CancellationToken::new();
    let renewer = backend.clone();
    let renew = move || {
        let backend = renewer.clone();
        async move { backend.keep_alive(lease).await }
    };
    let keeper = tokio::spawn(keep_lease(renew, lease, asked + ttl, ttl, lost.clone()));
    let _stop_keeper = AbortOnDrop(keeper);
    let result = async {
        let name = election(&ownership.shard);
        let value = Bytes::from(ownership.address.to_string());
        let holder = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            () = lost.cancelled() => anyhow::bail!("the election lease was lost while campaigning"),
            elected = backend.campaign(peers::NAMESPACE, &name, lease, value, None) => elected?,
            never = stand_by(backend, ownership, memory) => match never {},
        };
        memory.watched = None;
        serve_term(backend, ownership, service, role, stop, &lost, holder.token).await
    }
    .await;
    // Whatever ended the term: serve nothing, and let the next candidate in at once.
    service.install(None);
    role.send_replace(Role::Standby);
    if !revoked(tokio::time::timeout(ttl, backend.revoke_lease(lease)).await) {
        // Bounded: a lease left out runs out by itself once the backend answers again.
        if memory.abandoned.len() >= MAX_ABANDONED {
            memory.abandoned.remove(0);
        }
        memory.abandoned.push(lease);
    }
    result
}

/// Whether a revocation took effect, or had nothing left to do (the lease ran out first).
fn revoked(answer: Result<Result<(), keel_rpc::Status>, tokio::time::error::Elapsed>) -> bool {
    match answer {
        Ok(Ok(())) => true,
        Ok(Err(e)) => e.code() == Code::NotFound,
        Err(_) => false,
    }
}

/// Serves the shard as its elected owner (fencing `token`) until the term ends.
async fn serve_term<B: NamingBackend + Clone>(
    backend: &B,
    ownership: &Ownership,
    service: &InventoryService,
    role: &watch::Sender<Role>,
    stop: &CancellationToken,
    lost: &CancellationToken,
    token: u64,
) -> anyhow::Result<()> {
    let name = election(&ownership.shard);
    tracing::info!(shard = %ownership.shard, token, "elected owner of the shard; replaying its journal");
    let owner = format!("{}/{}", ownership.address, std::process::id());
    let inventory = tokio::select! {
        () = stop.cancelled() => return Ok(()),
        () = lost.cancelled() => anyhow::bail!("the election lease was lost during the replay"),
        taken = take_over(&ownership.target, &owner, token) => Arc::new(taken?),
    };
    service.install(Some(inventory.clone()));
    role.send_replace(Role::Owner { token });
    let instance = reg::Instance {
        namespace: peers::NAMESPACE.into(),
        service: peers::inventory_service(&ownership.shard),
        id: owner.clone(),
        address: ownership.address.to_string(),
        ..Default::default()
    };
    let registration = tokio::select! {
        () = stop.cancelled() => Err(keel_rpc::Status::cancelled("stopping")),
        () = lost.cancelled() => Err(keel_rpc::Status::unavailable("the election lease was lost")),
        r = Registration::start(backend.clone(), instance, ownership.lease_ttl) => r,
    };
    let ended = match &registration {
        Err(e) => Err(anyhow::anyhow!("registering the shard's owner failed: {e}")),
        Ok(_) => {
            tracing::info!(shard = %ownership.shard, token, "serving the shard");
            tokio::select! {
                () = stop.cancelled() => Ok(()),
                () = lost.cancelled() => Err(anyhow::anyhow!("stepped down: the election lease was lost")),
                () = inventory.failed() => Err(anyhow::anyhow!(
                    "stepped down: the journal refused an append (another owner took over)"
                )),
            }
        }
    };
    service.install(None);
    if let Ok(registration) = registration {
        let _ = tokio::time::timeout(ownership.lease_ttl, registration.deregister()).await;
    }
    // Appends under way end (durable, fenced or timed out) before a successor is let in.
    let _ = tokio::time::timeout(ownership.lease_ttl, inventory.close()).await;
    let _ = tokio::time::timeout(
        ownership.lease_ttl,
        backend.resign(peers::NAMESPACE, &name, token),
    )
    .await;
    ended
}

/// While this process waits in the election, on a beat of [`PROBES_PER_TTL`] per lease TTL that
/// no slow answer delays (all three asked at once):
/// - revokes the leases of its own abandoned campaigns ([`Memory::abandoned`]), which would
///   otherwise hold the election up for a TTL after the backend answers again;
/// - asks the owner it waits for whether it is alive (`GET /health` on the address it
///   published), and once it has not answered for a whole TTL (counted from when it was first
///   seen), revokes its lease so that the election moves on. Revoking the lease of an owner
///   that is alive after all (only this standby cannot reach it) is safe: the owner finds its
///   lease gone and steps down, and the journal's fencing refuses anything it still appends.
async fn stand_by<B: NamingBackend>(
    backend: &B,
    ownership: &Ownership,
    memory: &mut Memory,
) -> Infallible {
    let ttl = ownership.lease_ttl;
    let every = (ttl / PROBES_PER_TTL).max(Duration::from_millis(20));
    let name = election(&ownership.shard);
    let me = ownership.address.to_string();
    let patience = every.max(Duration::from_millis(200));
    // Rounds on a fixed beat, whatever each round waited for: a backend that does not answer
    // must not make the standby notice a dead owner later.
    let mut beat = tokio::time::interval(every);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        beat.tick().await;
        let Memory { watched, abandoned } = &mut *memory;
        // The owner known so far is asked while the backend is asked who owns the shard now.
        let known = watched.as_ref().map(|w| w.1.clone()).filter(|a| *a != me);
        let (_, holder, alive) = tokio::join!(
            revoke_abandoned(backend, abandoned, every),
            tokio::time::timeout(every, backend.leader(peers::NAMESPACE, &name)),
            async {
                match &known {
                    Some(address) => keel_net::answers_ok(address, "/health", patience).await,
                    None => false,
                }
            },
        );
        match holder {
            Ok(Ok(Some(holder))) if watched.as_ref().map(|w| w.0) != Some(holder.lease_id) => {
                let address = String::from_utf8_lossy(&holder.value).into_owned();
                *watched = Some((holder.lease_id, address, Instant::now()));
                continue;
            }
            Ok(Ok(None)) => {
                *watched = None;
                continue;
            }
            // The same owner, or no answer from the backend (it may be electing a leader of
            // its own): the owner known goes on being asked.
            _ => {}
        }
        let Some((lease, address, answered)) = watched else {
            continue;
        };
        if *address == me {
            continue;
        }
        if alive {
            *answered = Instant::now();
        } else if answered.elapsed() >= ttl {
            tracing::warn!(shard = %ownership.shard, owner = %address, lease = *lease,
                "the shard's owner has not answered for a whole lease TTL; revoking its lease");
            match tokio::time::timeout(ttl, backend.revoke_lease(*lease)).await {
                // Revoked, or gone already (it ran out meanwhile): the election moves on.
                // Asked again only after another whole TTL without an answer.
                Ok(Ok(())) => *answered = Instant::now(),
                Ok(Err(e)) if e.code() == Code::NotFound => *answered = Instant::now(),
                // The backend may be electing a leader of its own: tried again next round.
                Ok(Err(e)) => tracing::warn!(shard = %ownership.shard, lease = *lease, error = %e,
                    "revoking the owner's lease failed"),
                Err(_) => tracing::warn!(shard = %ownership.shard, lease = *lease,
                    "revoking the owner's lease timed out"),
            }
        }
    }
}

/// Revokes the leases of abandoned campaigns, all at once, each given `patience`; changes the
/// list only once every answer is in (the caller may be dropped whenever its campaign ends,
/// and a lease must not be forgotten then).
async fn revoke_abandoned<B: NamingBackend>(
    backend: &B,
    abandoned: &mut Vec<u64>,
    patience: Duration,
) {
    if abandoned.is_empty() {
        return;
    }
    let answers = futures_util::future::join_all(abandoned.iter().map(|&lease| async move {
        let answer = tokio::time::timeout(patience, backend.revoke_lease(lease)).await;
        (lease, revoked(answer))
    }))
    .await;
    abandoned.retain(|lease| !answers.contains(&(*lease, true)));
}

/// Replays the journal and claims it; replays again while the previous owner's last appends
/// land between a replay and the claim.
async fn take_over(target: &LogTarget, owner: &str, token: u64) -> anyhow::Result<Inventory> {
    for _ in 0..CLAIM_ATTEMPTS {
        let inventory = Inventory::open_at(target.clone()).await?;
        match inventory.claim(owner, token).await {
            Ok(()) => return Ok(inventory),
            Err(InventoryError::Journal(StoreError::Fenced { .. })) => {
                tracing::info!(owner, "the journal grew during the replay; replaying again");
                let _ = inventory.close().await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    anyhow::bail!(
        "the journal kept growing during {CLAIM_ATTEMPTS} replays: another writer is still appending"
    )
}

/// Renews `lease` (valid until `valid_until` as granted) every third of `ttl` (a quarter of
/// that after a failed renewal) and cancels `lost` once it is gone: refused (`not_found`), or
/// at the end of a whole TTL counted from the sending of the last renewal that was answered
/// (the backend's expiry is no earlier than that).
async fn keep_lease<R, F>(
    renew: R,
    lease: u64,
    mut valid_until: tokio::time::Instant,
    ttl: Duration,
    lost: CancellationToken,
) where
    R: Fn() -> F,
    F: Future<Output = Result<(), keel_rpc::Status>>,
{
    use tokio::time::Instant;
    let every = (ttl / 3).max(Duration::from_millis(20));
    // After a renewal that failed, the next comes sooner: a backend electing a leader may answer
    // again before the TTL ends, and one renewal then keeps the shard where it is.
    let again = (every / 4).max(Duration::from_millis(20));
    let mut wait = every;
    loop {
        // Never past the lease's end: the owner learns it has lost the lease at that instant.
        tokio::time::sleep_until((Instant::now() + wait).min(valid_until)).await;
        let sent = Instant::now();
        let left = valid_until.saturating_duration_since(sent);
        if left.is_zero() {
            lost.cancel();
            return;
        }
        wait = again;
        match tokio::time::timeout(left.min(every), renew()).await {
            Ok(Ok(())) => {
                valid_until = sent + ttl;
                wait = every;
            }
            Ok(Err(e)) if e.code() == Code::NotFound => {
                lost.cancel();
                return;
            }
            Ok(Err(e)) => tracing::warn!(lease, error = %e, "renewing the election lease failed"),
            Err(_) => tracing::warn!(lease, "renewing the election lease timed out"),
        }
        if Instant::now() >= valid_until {
            lost.cancel();
            return;
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;
    use tokio_util::sync::CancellationToken;

    #[tokio::test]
    async fn a_standby_revokes_the_leases_of_its_abandoned_campaigns() {
        use keel_registry::NamingBackend;
        let test = "a_standby_revokes_the_leases_of_its_abandoned_campaigns";
        let Some(etcd) = keel_registry::testing::etcd(test).await else {
            return;
        };
        let backend = etcd.backend.clone();
        let ownership = super::Ownership {
            shard: "inv-0".into(),
            target: keel_store::LogTarget::Dir {
                dir: std::env::temp_dir().join("unused"),
                options: keel_store::JournalOptions::default(),
            },
            lease_ttl: Duration::from_secs(2),
            address: "127.0.0.1:9".parse().unwrap(),
        };
        let name = super::election(&ownership.shard);
        let me = bytes::Bytes::from(ownership.address.to_string());
        // An earlier campaign of this process, whose lease could not be revoked when it ended:
        // its key leads the election, under a lease that would last 60 s more.
        let old = backend.grant_lease(Duration::from_secs(60)).await.unwrap();
        let ns = crate::peers::NAMESPACE;
        backend
            .campaign(ns, &name, old, me.clone(), None)
            .await
            .unwrap();
        let mut memory = super::Memory {
            abandoned: vec![old],
            ..Default::default()
        };

        let new = backend.grant_lease(Duration::from_secs(60)).await.unwrap();
        let elected = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::select! {
                elected = backend.campaign(ns, &name, new, me, None) => elected.unwrap(),
                never = super::stand_by(&backend, &ownership, &mut memory) => match never {},
            }
        })
        .await
        .expect("the new campaign waited behind the abandoned one");
        assert_eq!(elected.lease_id, new);
        // Gone from etcd (the list itself may end the campaign still naming it: the next
        // revocation is then answered `not_found`, which also takes it off).
        let renewed = backend.keep_alive(old).await;
        assert_eq!(renewed.unwrap_err().code(), keel_rpc::Code::NotFound);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_outlives_a_silence_shorter_than_its_ttl() {
        let ttl = Duration::from_millis(1500);
        let start = Instant::now();
        let hangs = move || {
            let now = Instant::now();
            let silent = now >= start + Duration::from_millis(900)
                && now < start + Duration::from_millis(1600);
            async move {
                if silent {
                    std::future::pending::<()>().await;
                }
                Ok(())
            }
        };
        let lost = CancellationToken::new();
        let keeper = tokio::spawn(super::keep_lease(hangs, 1, start + ttl, ttl, lost.clone()));
        // Renewals at 0.5 s (answered), 1.0 s (unanswered until its patience ends at 1.5 s),
        // then 1.625 s: answered, 0.375 s before the lease would have run out.
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert!(
            !lost.is_cancelled(),
            "the lease was given up during a short silence"
        );
        keeper.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_not_renewed_for_a_ttl_is_given_up_when_it_ends() {
        let ttl = Duration::from_millis(1500);
        let start = Instant::now();
        // From 0.9 s on, every renewal is refused after 50 ms (the backend has no leader): the
        // refusals do not fall on the lease's end.
        let refused = move || {
            let failing = Instant::now() >= start + Duration::from_millis(900);
            async move {
                if failing {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    return Err(keel_rpc::Status::unavailable("no leader"));
                }
                Ok(())
            }
        };
        let lost = CancellationToken::new();
        let keeper = tokio::spawn(super::keep_lease(
            refused,
            1,
            start + ttl,
            ttl,
            lost.clone(),
        ));
        // The last answered renewal was sent at 0.5 s: the lease is valid until 2.0 s at least,
        // and the owner must not count on it any longer.
        tokio::time::sleep(Duration::from_millis(1990)).await;
        assert!(!lost.is_cancelled(), "given up while still valid");
        tokio::time::timeout(Duration::from_millis(12), lost.cancelled())
            .await
            .expect("the lease is given up when a TTL has passed since the last renewal sent");
        keeper.await.unwrap();
    }
}
