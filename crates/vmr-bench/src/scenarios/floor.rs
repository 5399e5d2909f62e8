//! Scenario 1's floor: the capture alone. This process cuts the stand-in VM's disks and reads
//! the point-in-time view over NBD with the primary agent's own capture code (`vmr-capture`:
//! the bitmap rotation in one transaction, copy-before-write fleecing, snapshot-access, NBD
//! reads of the dirty extents), then drops the data: no checksum, no compression, no TLS, no
//! network, no replica. Run on the guest's core, its cost is the part of the primary's cost
//! that no work in the agent can remove.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::runtime::Runtime;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use vmr_capture::{CaptureConfig, CaptureError, CycleMode, Endpoint, VmCapture};
use vmr_testkit::harness::StandIn;

use crate::report::size;

/// The capture-only cycles that ended while the floor ran.
#[derive(Default, Clone)]
pub(super) struct FloorCycles {
    pub(super) ok: u64,
    pub(super) errors: u64,
    /// Cycles still reading when their window ended: dropped there, as the agent's pause
    /// drops its running cycle, so that no cycle runs into an off window.
    pub(super) cancelled: u64,
    bytes: u64,
    busy: Duration,
}

impl std::ops::Sub for FloorCycles {
    type Output = FloorCycles;

    fn sub(self, before: FloorCycles) -> FloorCycles {
        FloorCycles {
            ok: self.ok.saturating_sub(before.ok),
            errors: self.errors.saturating_sub(before.errors),
            cancelled: self.cancelled.saturating_sub(before.cancelled),
            bytes: self.bytes.saturating_sub(before.bytes),
            busy: self.busy.saturating_sub(before.busy),
        }
    }
}

impl std::fmt::Display for FloorCycles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ok / {} errors / {} cancelled at a window's end",
            self.ok, self.errors, self.cancelled
        )?;
        if let Some(avg) = self.bytes.checked_div(self.ok) {
            write!(
                f,
                ", average {} in {:.1} s",
                size(avg),
                self.busy.as_secs_f64() / self.ok as f64
            )?;
        }
        Ok(())
    }
}

/// A capture-only replicator of one stand-in VM, cycling every `interval` while switched on.
pub(super) struct Floor {
    on: watch::Sender<bool>,
    stats: Arc<Mutex<FloorCycles>>,
    task: JoinHandle<Result<(), CaptureError>>,
    /// The first (full) cycle: bytes read and its duration.
    pub(super) first: (u64, Duration),
}

impl Floor {
    /// Opens the capture of `vm`'s disks `nodes` (reusing the stand-in's NBD server, like the
    /// agent), runs the first, full cycle, and leaves the floor switched off.
    pub(super) fn start(
        rt: &Runtime,
        vm: &StandIn,
        nodes: &[&str],
        work: &Path,
        interval: Duration,
    ) -> anyhow::Result<Floor> {
        let mut cfg = CaptureConfig::new(
            Endpoint::Unix(vm.qmp.clone()),
            nodes.iter().map(|n| (*n).to_owned()).collect(),
            work.to_path_buf(),
            "floor",
        );
        cfg.nbd_socket = Some(vm.nbd.clone());
        let (cap, first) = rt.block_on(async {
            let mut cap = VmCapture::open(cfg.clone()).await?;
            let t = Instant::now();
            let bytes = one_cycle(&mut cap, CycleMode::Full).await?;
            Ok::<_, CaptureError>((cap, (bytes, t.elapsed())))
        })?;
        let (on, rx) = watch::channel(false);
        let stats = Arc::default();
        let task = rt.spawn(cycles(cfg, cap, interval, rx, Arc::clone(&stats)));
        Ok(Floor {
            on,
            stats,
            task,
            first,
        })
    }

    /// Switches cycling on or off (off drops a running cycle).
    pub(super) fn set(&self, on: bool) {
        self.on.send_replace(on);
    }

    /// The cycles that ended so far.
    pub(super) fn cycles(&self) -> FloorCycles {
        self.stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Stops cycling (dropping a running cycle) and removes the capture's bitmaps, so that the
    /// VM is left as it was before [`Floor::start`].
    pub(super) fn stop(self, rt: &Runtime) -> anyhow::Result<()> {
        self.on.send_replace(false);
        drop(self.on);
        rt.block_on(self.task)??;
        Ok(())
    }
}

/// Cuts the disks, reads every extent of the view and drops it, commits; the bytes read.
async fn one_cycle(cap: &mut VmCapture, mode: CycleMode) -> Result<u64, CaptureError> {
    let mut cycle = cap.begin_cycle(mode).await?;
    loop {
        match cycle.next_extent().await {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) => {
                cycle.abort().await?;
                return Err(e);
            }
        }
    }
    let bytes = cycle.bytes_read();
    cycle.commit().await?;
    Ok(bytes)
}

/// Runs an incremental cycle whenever the floor is on and `interval` has passed since the last
/// one began (at once when switched on after a longer pause, like the agent's schedule), until
/// the switch is dropped; then removes the bitmaps. Switched off mid-cycle, it drops the cycle
/// and its capture and opens a fresh capture at once, which ends the dropped cycle's view and
/// merges its changes back, as the agent's `pause` does (`vmr_agent::cycle::end_cancelled`).
async fn cycles(
    cfg: CaptureConfig,
    cap: VmCapture,
    interval: Duration,
    mut on: watch::Receiver<bool>,
    stats: Arc<Mutex<FloorCycles>>,
) -> Result<(), CaptureError> {
    let mut cap = Some(cap);
    let mut last: Option<Instant> = None;
    loop {
        if on.wait_for(|v| *v).await.is_err() {
            break;
        }
        if let Some(due) = last.map(|t| t + interval)
            && Instant::now() < due
        {
            tokio::select! {
                () = tokio::time::sleep_until(due.into()) => {}
                r = on.changed() => if r.is_err() { break },
            }
            continue;
        }
        let t = Instant::now();
        last = Some(t);
        let mut c = match cap.take() {
            Some(c) => c,
            None => VmCapture::open(cfg.clone()).await?,
        };
        let r = tokio::select! {
            r = one_cycle(&mut c, CycleMode::Incremental) => Some(r),
            _ = on.wait_for(|v| !*v) => None,
        };
        let Some(r) = r else {
            // Dropped with its capture mid-command: a fresh one ends the cycle's view at once
            // and merges its changes back, as the agent does after a pause.
            drop(c);
            cap = Some(VmCapture::open(cfg.clone()).await?);
            stats
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .cancelled += 1;
            continue;
        };
        let mut s = stats.lock().unwrap_or_else(PoisonError::into_inner);
        match r {
            Ok(bytes) => {
                s.ok += 1;
                s.bytes += bytes;
                s.busy += t.elapsed();
                cap = Some(c);
            }
            Err(e) => {
                s.errors += 1;
                eprintln!("vmr-bench: s1 floor: cycle failed: {e}");
                cap = Some(c);
            }
        }
    }
    match cap {
        Some(mut c) => c.stop_tracking().await,
        None => VmCapture::open(cfg).await?.stop_tracking().await,
    }
}
