//! Sans-IO replication decisions: the per-VM primary machine ([`PrimaryMachine`]) and replica
//! machine ([`ReplicaMachine`]) that take events (ticks, cycle results, admin commands, each
//! with the current time) and return the actions for an I/O driver to carry out or a typed
//! [`Refusal`]; the validation of `enable` arguments ([`Schedule::from_enable`]); the RPO alert and
//! the rate limit of failure events (`alert`); automatic failover's leases, fencing and takeover
//! (`autofailover`); the failover rules; the checkpoint chain of a VM captured through libvirt
//! (`checkpoints`); what `reverse` does with a failed-over replica's extended relationship
//! (`onward`); and Hyper-V's health rules as pure functions. The machines' persisted snapshots are
//! `vmr_proto::machine` types.
//!
//! Architecture Invariant: nothing in this crate does I/O, reads the clock or spawns tasks;
//! time comes in with every event, so every decision is reproducible in a test.

pub mod alert;
pub mod autofailover;
pub mod checkpoints;
pub mod extended;
pub mod failover;
pub mod fanout;
pub mod follow;
pub mod group;
pub mod handover;
pub mod health;
pub mod onward;
pub mod primary;
pub mod refusal;
pub mod replica;
pub mod schedule;
pub mod shutdown;

pub use alert::{
    RpoChange, RpoVerdict, assess_rpo, decide_rpo, report_failure, rpo_alert_ms, rpo_health,
};
pub use extended::{ExtAction, ExtEvent, ExtSchedule, ExtendedMachine};
pub use failover::{
    DefineFailoverDomain, ExistingDomain, ExistingDomainRefusal, FailoverDomainIdentity,
    FailoverLauncher, LauncherRefusal, LibvirtPrepare, PrepareRefusal, PrepareSource, PrimaryProbe,
    SplitBrain, UnusableProbe, VmProbe, chain_probe, check_probe_target, existing_domain,
    failover_domain, failover_launcher, failover_transition, libvirt_prepare, prepare_source,
    probe_address, reverse_resyncs, split_brain_verdict,
};
pub use handover::{Adoption, Handover, LocalCopy};
pub use health::{HealthReport, primary_health, replica_health};
pub use onward::{Onward, OnwardEnd, OnwardFacts, onward};
pub use primary::{Action, Event, Failure, PrimaryMachine, QuiesceOutcome};
pub use refusal::{Op, Refusal};
pub use replica::{Continued, ReplicaAction, ReplicaEvent, ReplicaMachine};
pub use schedule::{
    CONTINUOUS, CONTINUOUS_FLOOR_MS, CONTINUOUS_TARGET_SECS, InitialKind, InvalidEnable,
    MAX_RPO_ALERT_SECS, Schedule, check_retention, check_rpo_alert, check_verify_every,
    verify_point_accepted,
};
