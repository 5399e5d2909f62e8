//! Scenario 11 (issue 17, part 4): continuous mode (`--frequency continuous`) under a steady
//! 50 MB/s guest churn: the lag the primary reports (now minus the last acknowledged point's
//! cut: the RPO achieved), sampled all along, its p50 and p99; and the guest's write throughput
//! with continuous replication on versus paused, the replica side pinned to the other core
//! (scenario 1's pinning).

use super::*;

/// The churn the lag is measured under, bytes/s.
const S11_CHURN: f64 = 50e6;
/// The goal: the lag's p99 at that churn, seconds (issue 17: "lag ≤ 5 s at 50 MB/s").
const S11_LAG: f64 = 5.0;

/// Scenario 11: continuous mode's lag under churn and the primary's cost.
pub fn continuous_lag(ctx: &Ctx) -> Outcome {
    let mut o = Outcome::new(11, "Continuous mode: lag under 50 MB/s churn", goal(11));
    let r = continuous_run(ctx, &mut o);
    finish(o, r)
}

/// The `q` quantile (nearest rank) of `v`.
fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

fn continuous_run(ctx: &Ctx, o: &mut Outcome) -> anyhow::Result<()> {
    let (disk, lag_secs, window, pairs) = if ctx.quick {
        (GIB, 30u64, 5u64, 2usize)
    } else {
        (4 * GIB, 120, 15, 4)
    };
    o.method = format!(
        "One stand-in VM (qemu-storage-daemon, one {} qcow2 disk with metadata preallocation) \
         replicated by two agents on 127.0.0.1 with `enable --frequency continuous` (a cycle as \
         soon as the last one is acknowledged, at most one a second). The replica side runs on \
         its own core (`taskset`: primary VM, primary agent and guest writer on CPU 0, replica \
         agent and its qemu-storage-daemon on CPU 1), as in scenario 1. Lag: a guest writer \
         doing random 64 KiB writes of incompressible data at {:.0} MB/s (4 in flight) for \
         {lag_secs} s after the initial copy; the primary's `status` is read every 100 ms over \
         its control socket and its `lag_ms` (now minus the cut time of the last acknowledged \
         point: the RPO achieved at that instant) recorded; p50 and p99 of those samples. \
         Throughput: the same writer unlimited, sampled over {window} s windows alternately \
         with continuous replication on (`resume`) and paused (`pause`), ABBA, {pairs} windows \
         each; ratio = median on / median off.{}",
        size(disk),
        S11_CHURN / MB,
        if ctx.quick {
            " Quick mode: a 1 GiB disk, 30 s of lag samples, 5 s windows."
        } else {
            ""
        }
    );
    let pair = Pair::in_dir(&ctx.exe, TestDir::given(&ctx.dir("s11"))?)?;
    let mut spec = StandInDisk::new("disk0", disk);
    spec.prealloc = true;
    let vm = StandIn::start_in(
        &pair.root.path().join("vm"),
        &pair.a.dir,
        "bench-s11",
        &[spec],
    )?;
    let name = vm.def.name.clone();
    let pinned = Pinning::split(&pair, &vm)?;
    o.detail("CPU pinning (taskset)", pinned.describe());
    vm.register(&pair.a)?;
    let (_, init) = enable_and_wait(&pair, &name, "continuous", 0, Duration::from_secs(600))?;
    pinned.repin_replica(&pair);
    o.detail("initial replication (enable → applied)", secs(init));

    // Lag under a steady churn.
    let before = pair.a.status(&name)?.stats.clone();
    let w = ctx.writer(&vm, Some(S11_CHURN), 4, 31)?;
    let b0 = w.bytes();
    let t0 = Instant::now();
    let mut lags = Vec::new();
    while t0.elapsed() < Duration::from_secs(lag_secs) {
        let st = pair.a.status(&name)?;
        if let Some(l) = st.lag_ms {
            lags.push(l as f64 / 1e3);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let churn = (w.bytes() - b0) as f64 / t0.elapsed().as_secs_f64() / MB;
    stop_writer(w, ctx)?;
    let after = pair.a.status(&name)?.stats.clone();
    let cycles = after.successful_cycles - before.successful_cycles;
    let (p50, p99) = (quantile(&lags, 0.5), quantile(&lags, 0.99));
    let max = lags.iter().copied().fold(f64::NAN, f64::max);
    log(format!(
        "s11: lag p50 {p50:.2} s, p99 {p99:.2} s, max {max:.2} s over {} samples, {cycles} cycles, churn {churn:.0} MB/s",
        lags.len()
    ));
    o.detail(
        "lag (now − last acknowledged cut), p50 / p99 / max",
        format!(
            "{} / {} / {} ({} samples)",
            secs(p50),
            secs(p99),
            secs(max),
            lags.len()
        ),
    );
    o.detail("guest churn achieved", format!("{churn:.1} MB/s"));
    o.detail(
        "cycles in the lag window (successful / missed / failed)",
        format!(
            "{cycles} in {lag_secs} s ({:.2} s per cycle) / {} / {}",
            lag_secs as f64 / cycles.max(1) as f64,
            after.missed_cycles - before.missed_cycles,
            after.errors - before.errors
        ),
    );
    let shipped = after.total_bytes - before.total_bytes;
    o.detail(
        "bytes shipped per cycle (average, before compression)",
        size(shipped / cycles.max(1)),
    );

    // The primary's throughput, continuous replication on versus paused.
    let w = ctx.writer(&vm, None, 4, 32)?;
    let rate = |w: &Writer, secs: u64| {
        let b0 = w.bytes();
        let t = Instant::now();
        std::thread::sleep(Duration::from_secs(secs));
        (w.bytes() - b0) as f64 / t.elapsed().as_secs_f64() / MB
    };
    let (mut on, mut off) = (Vec::new(), Vec::new());
    let mut running = true;
    for i in 0..pairs {
        for want in abba(i) {
            pinned.repin_replica(&pair);
            if want != running {
                if want {
                    resume(&pair, &name)?;
                } else {
                    pause(&pair, &name)?;
                }
                running = want;
            }
            let r = rate(&w, window);
            log(format!(
                "s11: continuous {} {r:.0} MB/s",
                if want { "on" } else { "off" }
            ));
            if want { on.push(r) } else { off.push(r) }
        }
    }
    stop_writer(w, ctx)?;
    drop(pinned);
    let (mon, moff) = (median(&on), median(&off));
    let ratio = mon / moff;
    o.detail(
        "writer MB/s, continuous on (windows)",
        samples(&on, |x| format!("{x:.0}")),
    );
    o.detail(
        "writer MB/s, continuous paused (windows)",
        samples(&off, |x| format!("{x:.0}")),
    );
    o.detail(
        "write throughput on / off (not judged; scenario 1 judges interval mode)",
        format!("{ratio:.3} ({mon:.0} / {moff:.0} MB/s)"),
    );
    o.ours = format!("lag p50 {} / p99 {}", secs(p50), secs(p99));
    o.baseline = format!("throughput on / off: {ratio:.3}");
    o.ratio = format!("p99 {}", secs(p99));
    o.verdict = at_most(p99, S11_LAG);
    drop(vm);
    let mut pair = pair;
    let _ = pair.stop();
    remove_dir(pair.root.path());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&[3.0], 0.99), 3.0);
        assert!(quantile(&[], 0.5).is_nan());
    }
}
