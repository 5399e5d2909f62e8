//! vmr-capture: the primary side of vmreplica. Reads, at one consistent instant across all of a
//! running VM's disks, exactly the blocks that changed since the last cycle, while the VM keeps
//! writing, and never loses a change on any failure path.
//!
//! How (see `docs/capture.md`): a persistent dirty bitmap per disk (`vmr-<tag>-<gen>`) tracks
//! writes; [`VmCapture::begin_cycle`] issues one QMP `transaction` that starts the next bitmap,
//! freezes the current one and starts a `blockdev-backup sync=none` job per disk whose
//! copy-before-write filter gives a point-in-time view; a `snapshot-access` node on that filter
//! is exported over NBD together with the frozen bitmap, and [`CaptureCycle::next_extent`]
//! reads the dirty ranges (pipelined, bounded memory). [`CaptureCycle::commit`] drops the frozen
//! bitmap; [`CaptureCycle::abort`] (or the next [`VmCapture::open`] after a crash) merges it
//! back into the active one. [`VmCapture::begin_cycle_quiesced`] freezes the guest's file
//! systems through its guest agent ([`qga`]) around that transaction: an app-consistent cut.
//!
//! A libvirt-managed VM is captured through libvirt's incremental-backup API instead
//! ([`libvirt`]): same NBD reading, libvirt's backup job and checkpoints in place of our QMP
//! transaction and bitmaps.

mod capture;
mod error;
pub mod gate;
mod graph;
pub mod libvirt;
mod names;
pub mod qga;
pub mod qmp;
mod reader;

pub use capture::{
    CaptureConfig, CaptureCycle, CycleMode, Quiesce, QuiesceReport, Tracking, VmCapture,
};
pub use error::{CaptureError, ConfigFault, GroupCutReason, ReadFault, ResyncReason};
pub use names::Names;
pub use qmp::Endpoint;

/// Dirty bitmap granularity (= the default qcow2 cluster size).
pub const BITMAP_GRANULARITY: u32 = 64 * 1024;
/// Largest data extent handed out by [`CaptureCycle::next_extent`], and so the largest NBD read.
/// The VM's own QEMU allocates a buffer of the read's size for every read it serves; with 4 MiB
/// reads, 8 at a time, its heap grew and shrank with every read and each one paid for fresh
/// pages (page faults and zeroing: about a third of that QEMU's CPU in an initial copy, see
/// BENCHMARKS.md stop 46). At 1 MiB it reuses the same memory.
pub const PIECE_SIZE: u32 = 1 << 20;
/// Default number of NBD reads in flight per cycle (memory bound = this × [`PIECE_SIZE`]).
pub const DEFAULT_MAX_IN_FLIGHT: usize = 8;
