//! A member's side of a consistency group's cut (docs/groups.md): the [`Gate`] a capture
//! passes through around its cycle transaction when its VM is cut with others. The capture
//! reports each step and waits for the coordinator's order: pause the VM (QMP `stop`), run the
//! transaction, resume (`cont`). It resumes a VM it paused in every path: also when the
//! coordinator orders no transaction, or is gone (its channel closed).

use tokio::sync::mpsc;

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
