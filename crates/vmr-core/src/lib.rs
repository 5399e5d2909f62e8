//! Sans-IO replication decisions: per-VM state machines that take events (ticks, cycle
//! results, admin commands) and return actions for an I/O driver to carry out, plus Hyper-V's
//! health rules as a pure function.
//!
//! Architecture Invariant: nothing in this crate does I/O, reads the clock or spawns tasks;
//! time comes in with every event, so every decision is reproducible in a test.

pub mod failover;
pub mod health;
pub mod primary;

pub use failover::{FailoverOp, FailoverRefusal, failover_transition};
pub use health::{HealthReport, primary_health, replica_health};
pub use primary::{Action, Event, Failure, InitialKind, PrimaryMachine, Schedule};
