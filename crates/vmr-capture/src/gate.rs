//! A member's side of a consistency group's cut (docs/groups.md): the [`Gate`] a capture
//! passes through around its cycle transaction when its VM is cut with others. The capture
//! reports each step and waits for the coordinator's order: pause the VM (QMP `stop`), run the
//! transaction, resume (`cont`). It resumes a VM it paused in every path: also when the
//! coordinator orders no transaction, or is gone (its channel closed).

use std::time::Duration;

use tokio::sync::mpsc;

use crate::qmp::{Endpoint, QmpClient};

/// What the coordinator orders a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateOrder {
    /// Pause the VM.
    Stop,
    /// Run the cycle transaction.
    Cut,
    /// Cut on your own, outside the group (the round failed before any pause).
    Alone,
    /// Resume the VM; `grouped`: the cut is the group point.
    Cont {
        /// Every member's transaction succeeded.
        grouped: bool,
    },
}

/// What a member reports to the coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GateReport {
    /// Prepared up to the transaction.
    Ready,
    /// `stop` answered: `Ok(true)` paused, `Ok(false)` nothing to pause (no vCPUs: a
    /// qemu-storage-daemon).
    Stopped(Result<bool, String>),
    /// The transaction answered.
    Cut(Result<(), String>),
    /// `cont` answered (or nothing was paused).
    Continued(Result<(), String>),
}

/// One member's channels to the coordinator of one round.
#[derive(Debug)]
pub struct Gate {
    /// Orders from the coordinator.
    pub orders: mpsc::Receiver<GateOrder>,
    /// Reports to the coordinator.
    pub reports: mpsc::Sender<GateReport>,
    /// Set by the capture: the coordinator said the cut is the group point.
    pub grouped: bool,
}

impl Gate {
    /// Report (a coordinator that is gone does not hear it).
    pub(crate) async fn report(&self, r: GateReport) {
        let _ = self.reports.send(r).await;
    }

    /// The next order; `None` when the coordinator is gone.
    pub(crate) async fn order(&mut self) -> Option<GateOrder> {
        self.orders.recv().await
    }
}

/// Armed while the capture holds its VM paused: when the cycle is dropped in between (its task
/// cancelled: pause, disable, shutdown), a task of its own connects to the monitor once the
/// capture's connection is gone and sends `cont`, so that no path leaves the VM paused.
pub(crate) struct ResumeGuard {
    qmp: Option<(Endpoint, Duration)>,
}

impl ResumeGuard {
    /// Armed for the VM behind `qmp`.
    pub(crate) fn armed(qmp: Endpoint, timeout: Duration) -> ResumeGuard {
        ResumeGuard {
            qmp: Some((qmp, timeout)),
        }
    }

    /// The capture resumed the VM itself (or tried): nothing to do on drop.
    pub(crate) fn disarm(mut self) {
        self.qmp = None;
    }
}

impl Drop for ResumeGuard {
    fn drop(&mut self) {
        let Some((ep, timeout)) = self.qmp.take() else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::error!("a group member's VM may still be paused: no runtime to send cont");
            return;
        };
        rt.spawn(async move {
            // The monitor serves one client: this connection is served once the capture's
            // own one is closed (the capture is dropped right after its cycle).
            match QmpClient::connect(&ep, timeout).await {
                Ok(mut c) => match c.execute_value("cont", None).await {
                    Ok(_) => tracing::warn!("a cancelled group cut's VM was resumed (cont)"),
                    Err(e) => tracing::error!("resuming a cancelled group cut's VM failed: {e}"),
                },
                Err(e) => tracing::error!("resuming a cancelled group cut's VM failed: {e}"),
            }
        });
    }
}
