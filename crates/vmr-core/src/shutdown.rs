//! The guest shutdown of `failover prepare --shutdown`, as a sans-IO machine: how the guest is
//! asked to power down (its guest agent's `guest-shutdown` when the agent answers, else ACPI
//! `system_powerdown`; ACPI also when the agent accepted but the guest is still up after
//! [`AGENT_GRACE_MS`]), when to look again, and when to give up (the admin's timeout: nothing
//! else changes, the caller resumes replication and reports the error).
//!
//! | phase \ event      | Begin (agent)  | Begin (no agent) | AgentFailed      | Observed down | Observed up, before deadline     | Observed up, at deadline |
//! |--------------------|----------------|------------------|------------------|---------------|----------------------------------|--------------------------|
//! | Idle               | GuestAgent     | AcpiPowerdown    | -                | -             | -                                | -                        |
//! | AgentAsked         | -              | -                | AcpiPowerdown    | Proceed       | Poll (AcpiPowerdown after grace) | GiveUp                   |
//! | AcpiAsked          | -              | -                | -                | Proceed       | Poll                             | GiveUp                   |
//! | Done / GaveUp      | -              | -                | -                | -             | -                                | -                        |
//!
//! `-` = refused ([`ShutdownRefusal`]); a refused event changes nothing.

/// After the guest agent accepted `guest-shutdown`, how long the guest may stay up before
/// ACPI `system_powerdown` is sent as well (an agent may accept and then not act, e.g.
/// without systemd-logind).
pub const AGENT_GRACE_MS: u64 = 30_000;
/// How often the driver looks at the VM while waiting.
pub const POLL_MS: u64 = 250;

/// An input. Every event carries the time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownEvent {
    /// Start: `agent` = the guest agent answered its sync.
    Begin {
        /// Now.
        now_ms: u64,
        /// The admin's timeout.
        timeout_ms: u64,
        /// The guest agent answers.
        agent: bool,
    },
    /// `guest-shutdown` failed (an error answer, the channel gone).
    AgentFailed {
        /// Now.
        now_ms: u64,
    },
    /// The driver looked: `down` = QEMU exited, or reports the guest shut down.
    Observed {
        /// Now.
        now_ms: u64,
        /// The guest is down.
        down: bool,
    },
}

/// What the driver does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownAction {
    /// Send `guest-shutdown` (powerdown) through the guest agent.
    GuestAgent,
    /// Send ACPI `system_powerdown` through QMP.
    AcpiPowerdown,
    /// Look at the VM again at this time.
    Poll {
        /// When.
        at_ms: u64,
    },
    /// The guest is down: ship the final cycle.
    Proceed {
        /// Since [`ShutdownEvent::Begin`].
        waited_ms: u64,
    },
    /// The timeout passed with the guest still up: change nothing, report the error.
    GiveUp {
        /// Since [`ShutdownEvent::Begin`].
        waited_ms: u64,
        /// How the guest was asked: `guest agent`, `ACPI`, or both.
        asked: &'static str,
    },
}

/// An event the machine does not take in its phase.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("guest shutdown: {event} refused in phase {phase:?}")]
pub struct ShutdownRefusal {
    /// The event.
    pub event: &'static str,
    /// The phase.
    pub phase: Phase,
}

/// Where a shutdown is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Not begun.
    Idle,
    /// The guest agent was asked.
    AgentAsked,
    /// ACPI powerdown was sent (maybe after the agent).
    AcpiAsked,
    /// The guest is down.
    Done,
    /// The timeout passed.
    GaveUp,
}

/// One guest shutdown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestShutdown {
    phase: Phase,
    started_ms: u64,
    deadline_ms: u64,
    agent_asked: bool,
}

impl Default for GuestShutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl GuestShutdown {
    /// Not begun.
    pub fn new() -> Self {
        GuestShutdown {
            phase: Phase::Idle,
            started_ms: 0,
            deadline_ms: 0,
            agent_asked: false,
        }
    }

    /// The phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Feed one event.
    pub fn step(&mut self, ev: ShutdownEvent) -> Result<Vec<ShutdownAction>, ShutdownRefusal> {
        let refuse = |event| {
            Err(ShutdownRefusal {
                event,
                phase: self.phase,
            })
        };
        match (self.phase, ev) {
            (
                Phase::Idle,
                ShutdownEvent::Begin {
                    now_ms,
                    timeout_ms,
                    agent,
                },
            ) => {
                self.started_ms = now_ms;
                self.deadline_ms = now_ms.saturating_add(timeout_ms);
                let first = if agent {
                    self.agent_asked = true;
                    self.phase = Phase::AgentAsked;
                    ShutdownAction::GuestAgent
                } else {
                    self.phase = Phase::AcpiAsked;
                    ShutdownAction::AcpiPowerdown
                };
                Ok(vec![first, self.poll(now_ms)])
            }
            (_, ShutdownEvent::Begin { .. }) => refuse("Begin"),
            (Phase::AgentAsked, ShutdownEvent::AgentFailed { now_ms }) => {
                self.phase = Phase::AcpiAsked;
                Ok(vec![ShutdownAction::AcpiPowerdown, self.poll(now_ms)])
            }
            (_, ShutdownEvent::AgentFailed { .. }) => refuse("AgentFailed"),
            (Phase::AgentAsked | Phase::AcpiAsked, ShutdownEvent::Observed { now_ms, down }) => {
                let waited_ms = now_ms.saturating_sub(self.started_ms);
                if down {
                    self.phase = Phase::Done;
                    return Ok(vec![ShutdownAction::Proceed { waited_ms }]);
                }
                if now_ms >= self.deadline_ms {
                    let asked = match (self.agent_asked, self.phase) {
                        (true, Phase::AcpiAsked) => "guest agent, then ACPI",
                        (true, _) => "guest agent",
                        _ => "ACPI",
                    };
                    self.phase = Phase::GaveUp;
                    return Ok(vec![ShutdownAction::GiveUp { waited_ms, asked }]);
                }
                if self.phase == Phase::AgentAsked && waited_ms >= AGENT_GRACE_MS {
                    self.phase = Phase::AcpiAsked;
                    return Ok(vec![ShutdownAction::AcpiPowerdown, self.poll(now_ms)]);
                }
                Ok(vec![self.poll(now_ms)])
            }
            (_, ShutdownEvent::Observed { .. }) => refuse("Observed"),
        }
    }

    fn poll(&self, now_ms: u64) -> ShutdownAction {
        ShutdownAction::Poll {
            at_ms: now_ms
                .saturating_add(POLL_MS)
                .min(self.deadline_ms.max(now_ms)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ShutdownAction as A;
    use ShutdownEvent as E;

    const T: u64 = 120_000;

    fn begin(agent: bool) -> (GuestShutdown, Vec<ShutdownAction>) {
        let mut m = GuestShutdown::new();
        let a = m
            .step(E::Begin {
                now_ms: 1_000,
                timeout_ms: T,
                agent,
            })
            .expect("begin");
        (m, a)
    }

    /// Each row: agent answers, events after Begin, the last event's expected actions, phase.
    #[test]
    fn table() {
        let up = |t| E::Observed {
            now_ms: t,
            down: false,
        };
        let down = |t| E::Observed {
            now_ms: t,
            down: true,
        };
        let rows: Vec<(bool, Vec<ShutdownEvent>, Vec<ShutdownAction>, Phase)> = vec![
            (
                true,
                vec![down(5_000)],
                vec![A::Proceed { waited_ms: 4_000 }],
                Phase::Done,
            ),
            (
                false,
                vec![down(2_000)],
                vec![A::Proceed { waited_ms: 1_000 }],
                Phase::Done,
            ),
            (
                true,
                vec![up(2_000)],
                vec![A::Poll { at_ms: 2_250 }],
                Phase::AgentAsked,
            ),
            (
                true,
                vec![E::AgentFailed { now_ms: 1_100 }],
                vec![A::AcpiPowerdown, A::Poll { at_ms: 1_350 }],
                Phase::AcpiAsked,
            ),
            // the agent accepted, the guest stayed up: ACPI after the grace, once
            (
                true,
                vec![up(1_000 + AGENT_GRACE_MS)],
                vec![
                    A::AcpiPowerdown,
                    A::Poll {
                        at_ms: 1_250 + AGENT_GRACE_MS,
                    },
                ],
                Phase::AcpiAsked,
            ),
            (
                true,
                vec![up(1_000 + AGENT_GRACE_MS), up(2_000 + AGENT_GRACE_MS)],
                vec![A::Poll {
                    at_ms: 2_250 + AGENT_GRACE_MS,
                }],
                Phase::AcpiAsked,
            ),
            (
                true,
                vec![up(1_000 + AGENT_GRACE_MS), up(1_000 + T)],
                vec![A::GiveUp {
                    waited_ms: T,
                    asked: "guest agent, then ACPI",
                }],
                Phase::GaveUp,
            ),
            (
                false,
                vec![up(1_000 + T)],
                vec![A::GiveUp {
                    waited_ms: T,
                    asked: "ACPI",
                }],
                Phase::GaveUp,
            ),
            // a poll never goes past the deadline
            (
                false,
                vec![up(T + 900)],
                vec![A::Poll { at_ms: T + 1_000 }],
                Phase::AcpiAsked,
            ),
        ];
        for (agent, events, want, phase) in rows {
            let (mut m, first) = begin(agent);
            let lead = if agent {
                A::GuestAgent
            } else {
                A::AcpiPowerdown
            };
            assert_eq!(first, vec![lead, A::Poll { at_ms: 1_250 }]);
            let mut last = Vec::new();
            for e in &events {
                last = m.step(*e).expect("accepted");
            }
            assert_eq!(last, want, "{agent} {events:?}");
            assert_eq!(m.phase(), phase, "{agent} {events:?}");
        }
    }

    #[test]
    fn refusals_change_nothing() {
        let mut m = GuestShutdown::new();
        assert!(
            m.step(E::Observed {
                now_ms: 1,
                down: true
            })
            .is_err()
        );
        assert!(m.step(E::AgentFailed { now_ms: 1 }).is_err());
        assert_eq!(m, GuestShutdown::new());
        let (mut m, _) = begin(false);
        let before = m.clone();
        assert!(m.step(E::AgentFailed { now_ms: 2 }).is_err());
        assert!(
            m.step(E::Begin {
                now_ms: 2,
                timeout_ms: 1,
                agent: true
            })
            .is_err()
        );
        assert_eq!(m, before);
        m.step(E::Observed {
            now_ms: 3,
            down: true,
        })
        .expect("down");
        assert!(
            m.step(E::Observed {
                now_ms: 4,
                down: true
            })
            .is_err()
        );
    }
}
