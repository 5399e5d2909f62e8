//! Automatic failover's witness role with real agents (docs/auto-failover.md): three agents on
//! 127.0.0.1-3 (the shared harness's `Witnessed`), the lease calls made over real mutual TLS
//! with the primary's and the replica's own agent identities, the witness's leases in its
//! SQLite across a SIGKILL and restart. The agent drivers (renewing, fencing, taking over) are
//! not built yet, so the test plays the two parties' calls itself.

mod common;

use std::time::{Duration, Instant};

use common::*;
use vmr_proto::api::Request;
use vmr_proto::lease::{WitnessLease, WitnessRequest, WitnessResponse};
use vmr_transport::{Client, ClientOptions, Identity, TransportError};

/// The lease of this test: the shortest whose run window (`L - D`) is not empty.
const LEASE_MS: u64 = 3_000;

fn runtime() -> TestResult<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// A connection to the witness as the agent `who` (its own identity, from its own address).
async fn as_agent(who: &Agent, w: &Agent, protocol: u16) -> Result<Client, TransportError> {
    let id = Identity::load(&who.dir).map_err(|e| TransportError::Protocol(e.to_string()))?;
    let ip = who
        .addr
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or("127.0.0.1");
    Client::connect(
        &w.addr,
        &id,
        &w.fingerprint,
        ClientOptions {
            protocol,
            bind: ip.parse().ok(),
            ..Default::default()
        },
    )
    .await
}

fn leases(w: &Agent) -> TestResult<Vec<WitnessLease>> {
    let v = w.ctl(&Request::ServerShow)?;
    Ok(serde_json::from_value(
        v.get("witness").cloned().unwrap_or_default(),
    )?)
}

#[test]
fn witness_grants_hands_over_and_keeps_leases_across_a_crash() -> TestResult {
    let mut t = Witnessed::new(exe())?;
    let rt = runtime()?;
    let vm = uuid::Uuid::new_v4();
    let renew = |epoch| WitnessRequest::Renew { vm, epoch };
    let take = WitnessRequest::Takeover { vm };

    rt.block_on(async {
        let a = as_agent(&t.a, &t.w, vmr_proto::wire::PROTOCOL_VERSION).await?;
        let b = as_agent(&t.b, &t.w, vmr_proto::wire::PROTOCOL_VERSION).await?;

        // The primary registers the relationship: it holds epoch 1.
        let got = a
            .witness(WitnessRequest::Register {
                vm,
                replica: t.b.fingerprint.clone(),
                lease_ms: LEASE_MS,
            })
            .await?;
        assert_eq!(
            got,
            WitnessResponse::Granted {
                epoch: 1,
                lease_ms: LEASE_MS
            }
        );
        // The replica cannot take a live lease; renewing is the holder's.
        assert!(matches!(
            b.witness(take.clone()).await?,
            WitnessResponse::Held {
                epoch: 1,
                by_peer: true,
                ..
            }
        ));
        assert!(matches!(
            b.witness(renew(1)).await?,
            WitnessResponse::Held { by_peer: true, .. }
        ));
        // The primary renews, then stops renewing (its host "died"): the replica gets the
        // lease only once it expired, never sooner than a lease after the last renewal was sent.
        let sent = Instant::now();
        assert!(matches!(
            a.witness(renew(1)).await?,
            WitnessResponse::Granted { epoch: 1, .. }
        ));
        let deadline = Instant::now() + Duration::from_secs(60);
        let granted_after = loop {
            match b.witness(take.clone()).await? {
                WitnessResponse::Granted { epoch: 2, .. } => break sent.elapsed(),
                WitnessResponse::Held { .. } if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                other => panic!("takeover: {other:?}"),
            }
        };
        assert!(
            granted_after >= Duration::from_millis(LEASE_MS),
            "granted {granted_after:?} after the renewal"
        );
        // The old primary is told the replica holds it now (it fences; it never renews again).
        assert!(matches!(
            a.witness(renew(1)).await?,
            WitnessResponse::Held {
                epoch: 2,
                by_peer: true,
                ..
            }
        ));
        // An agent speaking protocol 5 never sends the call.
        let old = as_agent(&t.a, &t.w, 5).await?;
        assert!(matches!(
            old.witness(renew(1)).await,
            Err(TransportError::Protocol(_))
        ));
        Ok::<_, Box<dyn std::error::Error>>(())
    })?;

    // `server show` on the witness lists the lease (JSON and text).
    let l = leases(&t.w)?;
    assert_eq!(l.len(), 1);
    assert_eq!(
        (l[0].entry.vm, l[0].entry.epoch, &l[0].entry.holder),
        (vm, 2, &t.b.fingerprint)
    );
    let text = t.w.ok(&["server", "show"])?;
    assert!(
        text.contains("witness of") && text.contains(&vm.to_string()),
        "{text}"
    );

    // The witness crashes and restarts: the lease is still the replica's, and counts as
    // renewed at the restart, so the old primary cannot take it back at once.
    t.w.restart()?;
    rt.block_on(async {
        let a = as_agent(&t.a, &t.w, vmr_proto::wire::PROTOCOL_VERSION).await?;
        let b = as_agent(&t.b, &t.w, vmr_proto::wire::PROTOCOL_VERSION).await?;
        assert!(matches!(
            a.witness(take.clone()).await?,
            WitnessResponse::Held {
                epoch: 2,
                by_peer: true,
                remaining_ms: 1..,
            }
        ));
        assert!(matches!(
            b.witness(renew(2)).await?,
            WitnessResponse::Granted { epoch: 2, .. }
        ));
        // Only the holder removes it.
        assert!(matches!(
            a.witness(WitnessRequest::Remove { vm, epoch: 1 }).await?,
            WitnessResponse::Held { .. }
        ));
        assert_eq!(
            b.witness(WitnessRequest::Remove { vm, epoch: 2 }).await?,
            WitnessResponse::Removed
        );
        assert_eq!(
            a.witness(WitnessRequest::Query { vm }).await?,
            WitnessResponse::Unknown
        );
        Ok::<_, Box<dyn std::error::Error>>(())
    })?;
    assert!(leases(&t.w)?.is_empty());

    // An agent the witness does not authorize never reaches it.
    let stranger = TestDir::temp("vmr-stranger-")?;
    let id = Identity::generate(stranger.path(), "stranger")?;
    let refused = rt.block_on(Client::connect(
        &t.w.addr,
        &id,
        &t.w.fingerprint,
        ClientOptions::default(),
    ));
    assert!(refused.is_err());
    t.stop()?;
    Ok(())
}
