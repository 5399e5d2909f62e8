//! The primary side of a planned failover of a libvirt-managed VM (`failover prepare NAME
//! [--shutdown]`): the driver that shuts its domain down through libvirt (ACPI power button;
//! when the guest is still up at the admin's timeout, `virDomainDestroy`), and takes the final
//! cycle from the shut-off domain's disks. libvirt takes backup jobs of active domains only,
//! so the domain is started *paused* for the final cycle (QEMU opens the disks and their
//! persistent checkpoint bitmaps; the guest's CPUs never run, so nothing writes) and destroyed
//! again after it. When to ask, look again and give up is
//! [`vmr_core::shutdown::GuestShutdown`]'s decision (ACPI, no guest agent); `failover.rs`
//! calls this module. Every libvirt call blocks, so each runs in `spawn_blocking`. See
//! docs/libvirt.md.

use std::time::Duration;

use vmr_core::shutdown::{GuestShutdown, ShutdownAction, ShutdownEvent};
use vmr_libvirt::{Domain, Libvirt, LibvirtError};
use vmr_proto::vmdef::LibvirtSource;

use crate::errors::AgentError;
use crate::util::now_ms;

/// How the domain came to be shut off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutOff {
    /// The guest powered down after the ACPI request, after this many ms.
    Clean {
        /// Since the request.
        waited_ms: u64,
    },
    /// The guest was still up at the timeout: the domain was destroyed (powered off).
    Destroyed {
        /// Since the request.
        waited_ms: u64,
    },
}

fn err(src: &LibvirtSource, doing: &'static str, source: LibvirtError) -> AgentError {
    AgentError::FailoverDomain {
        uri: src.uri.clone(),
        doing,
        domain: src.domain.clone(),
        source,
    }
}

/// Run `f` on the VM's domain in a blocking task.
async fn on_domain<T: Send + 'static>(
    src: &LibvirtSource,
    doing: &'static str,
    f: impl FnOnce(&Domain) -> Result<T, LibvirtError> + Send + 'static,
) -> Result<T, AgentError> {
    let s = src.clone();
    tokio::task::spawn_blocking(move || {
        Libvirt::open(&s.uri)
            .and_then(|lv| lv.domain(&s.domain))
            .and_then(|d| f(&d))
            .map_err(|e| err(&s, doing, e))
    })
    .await
    .map_err(AgentError::Task)?
}

/// Whether the domain runs (paused counts as running).
pub async fn runs(src: &LibvirtSource) -> Result<bool, AgentError> {
    on_domain(src, "asking about", |d| d.is_running()).await
}

/// Shut the domain down: ACPI power button, looked at until it is off; at `timeout` it is
/// destroyed. A domain already shut off is [`ShutOff::Clean`] at once.
pub async fn shut_down(src: &LibvirtSource, timeout: Duration) -> Result<ShutOff, AgentError> {
    let mut m = GuestShutdown::new();
    let mut acts = m
        .step(ShutdownEvent::Begin {
            now_ms: now_ms(),
            timeout_ms: timeout.as_millis() as u64,
            agent: false,
        })
        .map_err(AgentError::ShutdownRefused)?;
    loop {
        let mut next = None;
        for a in acts {
            match a {
                // no guest agent is used for a libvirt VM (Begin says so): ACPI only
                ShutdownAction::GuestAgent => {
                    next = Some(ShutdownEvent::AgentFailed { now_ms: now_ms() });
                }
                ShutdownAction::AcpiPowerdown => {
                    match on_domain(src, "shutting down", |d| {
                        if d.is_running()? {
                            d.shutdown_acpi()
                        } else {
                            Ok(())
                        }
                    })
                    .await
                    {
                        Ok(()) => {
                            tracing::info!(domain = %src.domain, "ACPI shutdown requested through libvirt")
                        }
                        Err(e) => {
                            tracing::warn!(domain = %src.domain, "ACPI shutdown through libvirt failed: {}", crate::util::chain(&e))
                        }
                    }
                }
                ShutdownAction::Poll { at_ms } => {
                    tokio::time::sleep(Duration::from_millis(at_ms.saturating_sub(now_ms()))).await;
                    let down = !runs(src).await?;
                    next = next.or(Some(ShutdownEvent::Observed {
                        now_ms: now_ms(),
                        down,
                    }));
                }
                ShutdownAction::Proceed { waited_ms } => {
                    tracing::info!(domain = %src.domain, waited_ms, "the domain is shut off");
                    return Ok(ShutOff::Clean { waited_ms });
                }
                ShutdownAction::GiveUp { waited_ms, .. } => {
                    tracing::warn!(domain = %src.domain, waited_ms, "the guest ignored the ACPI shutdown: destroying the domain");
                    power_off(src).await?;
                    return Ok(ShutOff::Destroyed { waited_ms });
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

/// Start the shut-off domain paused, for the final cycle's backup job.
pub async fn start_paused(src: &LibvirtSource) -> Result<(), AgentError> {
    on_domain(src, "starting (paused)", |d| d.start_paused()).await
}

/// Power the domain off (`virDomainDestroy`; a domain that is off is fine).
pub async fn power_off(src: &LibvirtSource) -> Result<(), AgentError> {
    on_domain(src, "destroying", |d| d.destroy()).await
}
