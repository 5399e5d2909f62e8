//! `failover prepare --shutdown`: carries out the guest shutdown that
//! [`vmr_core::shutdown::GuestShutdown`] decides (guest agent `guest-shutdown`, ACPI
//! `system_powerdown` through the VM's QMP monitor, looking at the VM until it is down or the
//! timeout passes). The VM is down when its QEMU exited or reports status `shutdown`
//! (`-no-shutdown`).

use std::time::Duration;

use serde_json::Value;
use vmr_capture::Endpoint;
use vmr_capture::qmp::{QmpClient, QmpError};
use vmr_core::shutdown::{GuestShutdown, ShutdownAction, ShutdownEvent};
use vmr_proto::record::VmRecord;

use crate::errors::AgentError;
use crate::util::now_ms;

/// How long `guest-shutdown` may take to come back with an error (silence is success).
const AGENT_ANSWER: Duration = Duration::from_secs(2);
/// Per QMP command while shutting down.
const QMP_TIMEOUT: Duration = Duration::from_secs(5);

/// Shut the guest of `rec` down within `timeout`; returns how long it took (ms). On timeout
/// nothing else is done: [`AgentError::ShutdownTimedOut`].
pub async fn shutdown_guest(rec: &VmRecord, timeout: Duration) -> Result<u64, AgentError> {
    let mut m = GuestShutdown::new();
    let mut agent = match crate::cycle::guest_agent(rec).await {
        Ok(a) => Some(a),
        Err(why) => {
            tracing::info!(vm = %rec.name, "guest agent not usable, shutting down with ACPI: {why}");
            None
        }
    };
    let mut qmp: Option<QmpClient> = None;
    let mut acts = m
        .step(ShutdownEvent::Begin {
            now_ms: now_ms(),
            timeout_ms: timeout.as_millis() as u64,
            agent: agent.is_some(),
        })
        .map_err(AgentError::ShutdownRefused)?;
    loop {
        let mut next = None;
        for a in acts {
            match a {
                ShutdownAction::GuestAgent => {
                    let r = match agent.as_mut() {
                        Some(g) => g.shutdown(AGENT_ANSWER).await,
                        None => Err(vmr_capture::qga::QgaError::Closed),
                    };
                    match r {
                        Ok(()) => {
                            tracing::info!(vm = %rec.name, "guest-shutdown sent through the guest agent");
                        }
                        Err(e) => {
                            tracing::warn!(vm = %rec.name, "guest-shutdown failed: {}", crate::util::chain(&e));
                            next = Some(ShutdownEvent::AgentFailed { now_ms: now_ms() });
                        }
                    }
                    // the channel is of no more use; free it for others
                    agent = None;
                }
                ShutdownAction::AcpiPowerdown => match powerdown(rec, &mut qmp).await {
                    Ok(()) => tracing::info!(vm = %rec.name, "ACPI system_powerdown sent"),
                    Err(e) => {
                        tracing::warn!(vm = %rec.name, "system_powerdown failed: {}", crate::util::chain(&e))
                    }
                },
                ShutdownAction::Poll { at_ms } => {
                    let wait = at_ms.saturating_sub(now_ms());
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                    let down = is_down(rec, &mut qmp).await;
                    next = next.or(Some(ShutdownEvent::Observed {
                        now_ms: now_ms(),
                        down,
                    }));
                }
                ShutdownAction::Proceed { waited_ms } => {
                    tracing::info!(vm = %rec.name, waited_ms, "guest is down");
                    return Ok(waited_ms);
                }
                ShutdownAction::GiveUp { waited_ms, asked } => {
                    return Err(AgentError::ShutdownTimedOut {
                        name: rec.name.clone(),
                        waited_s: waited_ms / 1000,
                        asked,
                    });
                }
            }
        }
        let Some(ev) = next else {
            return Err(AgentError::ShutdownRefused(
                vmr_core::shutdown::ShutdownRefusal {
                    event: "no event",
                    phase: m.phase(),
                },
            ));
        };
        acts = m.step(ev).map_err(AgentError::ShutdownRefused)?;
    }
}

async fn connect(rec: &VmRecord, qmp: &mut Option<QmpClient>) -> Result<(), QmpError> {
    if qmp.is_none() {
        let ep = Endpoint::Unix(rec.qmp.clone().into());
        *qmp = Some(QmpClient::connect(&ep, QMP_TIMEOUT).await?);
    }
    Ok(())
}

async fn powerdown(rec: &VmRecord, qmp: &mut Option<QmpClient>) -> Result<(), QmpError> {
    connect(rec, qmp).await?;
    let Some(q) = qmp.as_mut() else {
        return Err(QmpError::Closed);
    };
    let r = q.execute_value("system_powerdown", None).await;
    if r.is_err() {
        *qmp = None;
    }
    r.map(|_| ())
}

/// Down: QEMU is gone (nobody listens on its monitor, or the connection closed), or it
/// reports the guest shut down (`-no-shutdown`).
async fn is_down(rec: &VmRecord, qmp: &mut Option<QmpClient>) -> bool {
    match connect(rec, qmp).await {
        Ok(()) => {}
        Err(QmpError::Connect { .. }) | Err(QmpError::Closed) => return true,
        Err(_) => return false,
    }
    let Some(q) = qmp.as_mut() else {
        return false;
    };
    match q.execute_value("query-status", None).await {
        Ok(v) => v.get("status").and_then(Value::as_str) == Some("shutdown"),
        Err(QmpError::Closed) | Err(QmpError::Io(_)) => {
            *qmp = None;
            true
        }
        Err(_) => {
            *qmp = None;
            false
        }
    }
}
