//! Shared test harness: real QEMU processes (qemu-storage-daemon, qemu-nbd) and temp dirs that
//! are always cleaned up, even when a test panics. Used by integration tests and benchmarks.

pub mod harness;
pub mod img;
pub mod proc;
pub mod qsd;

pub use proc::{ChildGuard, SpawnError, wait_for_path};
