//! Scenario 10 (issue 17, part 2): how closely a VM's sending limit holds: incremental cycles
//! of incompressible data under two limits, the rate the agent measured on the wire over
//! each cycle's body against the limit, and the same cycle unlimited beside them.

use super::*;

/// The goal: the limit holds within ±10 % (issue 17's 10 s windows).
const S10_TOLERANCE: f64 = 0.10;

/// Scenario 10: achieved / limit at two limits.
pub fn bandwidth_limit(ctx: &Ctx) -> Outcome {
    let mut o = Outcome::new(10, "Bandwidth limit accuracy", goal(10));
    let r = bandwidth_run(ctx, &mut o);
    finish(o, r)
}

/// One cycle's body as the primary's status reports it: bytes on the wire, send time (ms),
/// time waited for the limit (ms).
fn last_body(pair: &Pair, name: &str) -> anyhow::Result<(u64, u64, u64)> {
    let b = pair
        .a
        .status(name)?
        .bandwidth
        .context("the primary's status has no bandwidth field")?;
    Ok((b.wire_bytes, b.send_ms, b.wait_ms))
}

/// Pause, write `mib` MiB of noise, set the limit, resume: the next cycle carries it all.
fn cycle_at(
    pair: &Pair,
    vm: &StandIn,
    name: &str,
    mib: u64,
    limit: &str,
    seed: u64,
) -> anyhow::Result<(u64, u64, u64)> {
    pair.a.ok(&["pause", name])?;
    pair.a.ok(&["set", name, "--bandwidth", limit])?;
    let last = pair.a.status(name)?.last_cycle.unwrap_or(0);
    vm.write_noise("disk0", 0, mib * 16, seed)?;
    pair.a.ok(&["resume", name])?;
    pair.a
        .wait_cycle(name, last + 1, Duration::from_secs(600))?;
    let body = last_body(pair, name)?;
    if body.0 < mib * MIB {
        bail!(
            "the cycle at {limit} carried {} bytes, not the {mib} MiB written",
            body.0
        );
    }
    Ok(body)
}

fn bandwidth_run(ctx: &Ctx, o: &mut Outcome) -> anyhow::Result<()> {
    let mib = if ctx.quick { 48 } else { 96 };
    let limits: [(&str, f64); 2] = [("4M", 4e6), ("8M", 8e6)];
    o.method = format!(
        "One qemu-storage-daemon stand-in VM (a {} MiB qcow2 disk) replicated by two agents on \
         127.0.0.1 (frequency 1 h, compression on). For each limit: pause, `set --bandwidth \
         LIMIT`, write {mib} MiB of incompressible bytes, resume; the cycle that follows \
         carries them all. Achieved = the bytes that cycle put on the wire (after compression \
         and framing, counted by the primary agent's bucket) over the time from its first \
         body chunk to its last (`status --json` `bandwidth.wire_bytes` / `send_ms`); ratio = \
         achieved / limit. Beside them, the same cycle unlimited (`--bandwidth 0`).{}",
        mib * 2,
        if ctx.quick {
            " Quick mode: 48 MiB; the full run writes 96 MiB."
        } else {
            ""
        }
    );
    let mut pair = Pair::in_dir(&ctx.exe, TestDir::given(&ctx.dir("s10"))?)?;
    let name = "bench-s10";
    let vm = StandIn::start_in(
        &pair.root.path().join("vms"),
        &pair.a.dir,
        name,
        &[StandInDisk::new("disk0", 2 * mib * MIB)],
    )?;
    vm.register(&pair.a)?;
    enable(&pair, name, "1h", 0)?;
    pair.a.wait_cycle(name, 1, Duration::from_secs(600))?;
    let mut worst: f64 = 0.0;
    let mut ratios = Vec::new();
    for (i, (text, limit)) in limits.iter().enumerate() {
        let (bytes, send_ms, wait_ms) = cycle_at(&pair, &vm, name, mib, text, 10 + i as u64)?;
        let achieved = bytes as f64 / (send_ms.max(1) as f64 / 1e3);
        let ratio = achieved / limit;
        worst = worst.max((ratio - 1.0).abs());
        ratios.push(format!("{ratio:.3}"));
        o.detail(
            format!("limit {text} ({:.0} MB/s)", limit / MB),
            format!(
                "{} in {} → {:.2} MB/s = {ratio:.3} × the limit; waited {}",
                size(bytes),
                secs(send_ms as f64 / 1e3),
                achieved / MB,
                secs(wait_ms as f64 / 1e3)
            ),
        );
    }
    let (bytes, send_ms, wait_ms) = cycle_at(&pair, &vm, name, mib, "0", 20)?;
    let free = bytes as f64 / (send_ms.max(1) as f64 / 1e3);
    o.detail(
        "unlimited (not judged)",
        format!(
            "{} in {} → {:.1} MB/s; waited {}",
            size(bytes),
            secs(send_ms as f64 / 1e3),
            free / MB,
            secs(wait_ms as f64 / 1e3)
        ),
    );
    o.ours = format!("achieved / limit: {} (4 MB/s, 8 MB/s)", ratios.join(", "));
    o.baseline = format!("unlimited: {:.1} MB/s", free / MB);
    o.ratio = format!("worst {:.1} % off", worst * 100.0);
    o.verdict = at_most(worst, S10_TOLERANCE);
    drop(vm);
    let _ = pair.stop();
    remove_dir(pair.root.path());
    Ok(())
}
