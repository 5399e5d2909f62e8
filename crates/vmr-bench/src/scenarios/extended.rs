//! Scenario 13 (issue 15): extended replication A → B → C. An extended cycle of 1 % of the
//! disk (B forwards its newest point to C) against rsync of the same image content; and the
//! primary's cycle time A → B with an extended cycle running on B against B without one.

use vmr_testkit::harness::Chain;

use super::*;

/// The goal: A's cycle time with B forwarding to C, as a ratio to without (without / with).
const S13_MUST: f64 = 0.95;

/// Scenario 13: extended cycle versus rsync, and what forwarding costs the primary's cycle.
pub fn extended_cycle(ctx: &Ctx, rsync_missing: Option<&str>) -> Outcome {
    let mut o = Outcome::new(
        13,
        "Extended replication: B → C cycle versus rsync; A's cycle with B forwarding",
        goal(13),
    );
    let r = extended_run(ctx, rsync_missing, &mut o);
    finish(o, r)
}

/// `pause|resume NAME --extended` on B.
fn extended_cmd(ch: &Chain, op: &str, name: &str) -> anyhow::Result<()> {
    ch.b.ok(&[op, name, "--extended"])?;
    Ok(())
}

/// B's point C acknowledged last.
fn forwarded(ch: &Chain, name: &str) -> anyhow::Result<Option<u64>> {
    Ok(ch
        .b
        .status(name)?
        .extended
        .context("B shows no extended relationship")?
        .last_point_sent)
}

/// Wait until C acknowledged B's point `id`.
fn wait_forwarded(ch: &Chain, name: &str, id: u64) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if forwarded(ch, name)?.is_some_and(|p| p >= id) {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            bail!("C did not get point {id} within 600 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Writes back every dirty page of the host before a timed run, so that no run pays for the
/// writeback of what the guest or the runs before it wrote (the kernel's flusher would otherwise
/// start at a moment of its own and lengthen whichever run's fsyncs it meets). The page cache is
/// kept: the extended cycle reads the point B just received, and rsync reads both whole files,
/// as they would on a host that has them cached.
fn writeback() {
    nix::unistd::sync();
}

/// One A → B cycle of what the guest wrote while A was paused: resume A, wait until B applied
/// it, pause A. (seconds to applied, B's new point)
fn a_cycle(ch: &Chain, name: &str) -> anyhow::Result<(f64, u64)> {
    let last = ch.a.status(name)?.last_cycle.unwrap_or(0);
    let t = Instant::now();
    ch.a.ok(&["resume", name])?;
    let (st, applied) = ch.b.wait_cycle(name, last + 1, Duration::from_secs(600))?;
    let el = applied.duration_since(t).as_secs_f64();
    ch.a.wait_cycle(name, last + 1, Duration::from_secs(600))?;
    ch.a.ok(&["pause", name])?;
    Ok((el, st.last_cycle.unwrap_or(last + 1)))
}

fn extended_run(ctx: &Ctx, rsync_missing: Option<&str>, o: &mut Outcome) -> anyhow::Result<()> {
    let (disk, reps, pairs) = if ctx.quick {
        (GIB, 3usize, 2usize)
    } else {
        (8 * GIB, 5, 15)
    };
    let count = disk / BLOCK / 100;
    let dirty_bytes = count * BLOCK;
    o.method = format!(
        "Three agents on 127.0.0.1: A (primary, a stand-in VM with one {} qcow2 disk completely \
         filled with incompressible data), B (A's replica, frequency 60 min, driven by pause / \
         resume, `--retain 1s=N` keeping every point of the run, so that the point C acknowledged is never \
         merged while the extended relationship is paused) and C (B's extended replica, `enable --extended --frequency 5s`). Part 1, \
         {reps} repeats, order alternating: the guest overwrites 1 % of the 64 KiB blocks \
         ({count} random blocks, {}) while A and the extended relationship are paused; one A → \
         B cycle brings them to B as point N; then (a) the extended cycle: from `resume NAME \
         --extended` on B until B's status shows point N acknowledged by C (B reads the \
         changed clusters from its qcow2 chain through read-only NBD exports, zstd, mutual-TLS \
         HTTP/2, committed as a point on C); (b) the baseline: `rsync --inplace \
         --no-whole-file --ignore-times` of the image holding point N's content (A's image \
         file, A paused: its content is B's point N, as the e2e tests check) into a directory \
         holding the previous version, then fsync. Part 2, {pairs} pairs alternating \
         (without, with): A's cycle of a new 1 % (from `resume` on A to applied on B) with B \
         not forwarding (extended relationship paused, the point left for later), and with B \
         forwarding the previous point to C at the same time (`resume --extended` on B, A \
         resumed once B's extended cycle runs). C stands for a third host: its agent and \
         its QEMU daemons run at nice 19, so that on this machine's two cores they take only \
         the CPU A and B leave and part 2 measures what B's forwarding costs A's cycle (they \
         still share the one disk). Ratio = median time without / median time with. Every \
         timed run starts after `sync` (no run pays for the writeback of what the guest or \
         the run before it wrote; the page cache is kept). The machine was shared with other \
         builds and test runs.{}",
        size(disk),
        size(dirty_bytes),
        if ctx.quick {
            " Quick mode: a 1 GiB disk instead of 8 GiB, 3 repeats and 2 pairs (5 and 15)."
        } else {
            ""
        }
    );
    let ch = Chain::in_dir(&ctx.exe, TestDir::given(&ctx.dir("s13"))?)?;
    // C stands for a third host: on this machine its agent and daemons take only the CPU
    // that A and B leave, so that what part 2 measures is what B's forwarding costs A's
    // cycle, not what C's receiving does on cores that a real C would not share.
    let c_nice = renice_tree(ch.c.pid(), 19);
    let vm = StandIn::start_in(
        &ch.root.path().join("vm"),
        &ch.a.dir,
        "bench-s13",
        &[StandInDisk::new("disk0", disk)],
    )?;
    let name = vm.def.name.clone();
    let pool = vmr_testkit::harness::pool(13);
    let c = ctx.block(load::connect(&vm.nbd, "disk0"))?;
    ctx.block(load::fill(&c, &pool, disk, 1))?;
    let img = vm.disks()[0].1.clone();
    let dst = ch.root.path().join("rsync-dst");
    std::fs::create_dir_all(&dst)?;
    if rsync_missing.is_none() {
        resync::copy_for_rsync(&img, &dst)?;
    }
    vm.register(&ch.a)?;
    // B keeps every point of the run: the point C acknowledged must still exist when the
    // paused extended relationship resumes (while paused nothing is kept for C, and a merged
    // acknowledged point makes the next extended cycle carry every range of the disk).
    let keep = format!("1s={}", 1 + reps + 2 * pairs + 2);
    ch.enable(&name, &["--frequency", "60m", "--retain", &keep])?;
    let (st, _) = ch.b.wait_cycle(&name, 1, Duration::from_secs(1800))?;
    ch.a.wait_cycle(&name, 1, Duration::from_secs(1800))?;
    ch.a.ok(&["pause", &name])?;
    ch.enable_extended(&name, &["--frequency", "5s", "--recovery-points", "0"])?;
    // The daemons C started for the new chain, should any have come from a thread the first
    // renice missed.
    let c_nice = c_nice.and_then(|()| renice_tree(ch.c.pid(), 19));
    o.detail(
        "C's CPU priority",
        match &c_nice {
            Ok(()) => "nice 19 (agent and its daemons)".to_owned(),
            Err(e) => format!("not lowered: {e}"),
        },
    );
    let first = st.last_cycle.unwrap_or(1);
    let t = Instant::now();
    wait_forwarded(&ch, &name, first)?;
    let init = t.elapsed().as_secs_f64();
    log(format!("s13: first extended cycle (full copy) {init:.1} s"));
    extended_cmd(&ch, "pause", &name)?;

    // Part 1: an extended cycle of 1 % versus rsync.
    let (mut ext, mut rs, mut ext_bytes, mut rs_literal) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut seed = 1300;
    for r in 0..reps {
        seed += 1;
        ctx.block(load::dirty(&c, count, seed))?;
        let (_, n) = a_cycle(&ch, &name)?;
        let run_ext = |ext: &mut Vec<f64>, bytes: &mut Vec<f64>| -> anyhow::Result<()> {
            let before = ch.b.status(&name)?.extended.context("no extended row")?;
            writeback();
            let t = Instant::now();
            extended_cmd(&ch, "resume", &name)?;
            let done = wait_forwarded(&ch, &name, n)?;
            ext.push(done.duration_since(t).as_secs_f64());
            extended_cmd(&ch, "pause", &name)?;
            let after = ch.b.status(&name)?.extended.context("no extended row")?;
            bytes.push(
                after
                    .stats
                    .total_bytes
                    .saturating_sub(before.stats.total_bytes) as f64,
            );
            Ok(())
        };
        let run_rsync = |rs: &mut Vec<f64>, lit: &mut Vec<f64>| -> anyhow::Result<()> {
            if rsync_missing.is_some() {
                return Ok(());
            }
            writeback();
            let x = resync::rsync_once(&img, &dst)?;
            rs.push(x.secs);
            lit.push(x.literal as f64);
            Ok(())
        };
        if r % 2 == 0 {
            run_ext(&mut ext, &mut ext_bytes)?;
            run_rsync(&mut rs, &mut rs_literal)?;
        } else {
            run_rsync(&mut rs, &mut rs_literal)?;
            run_ext(&mut ext, &mut ext_bytes)?;
        }
        log(format!(
            "s13: repeat {r}: extended cycle {:.3} s, rsync {}",
            ext.last().copied().unwrap_or(f64::NAN),
            rs.last().map_or("-".into(), |x| format!("{x:.2} s"))
        ));
    }

    // Part 2: A's cycle without and with B forwarding at the same time.
    let (mut without, mut with, mut overlapped) = (Vec::new(), Vec::new(), 0usize);
    for p in 0..pairs * 2 {
        seed += 1;
        ctx.block(load::dirty(&c, count, seed))?;
        writeback();
        if p % 2 == 0 {
            // Leaves B's new point unforwarded: the next "with" run forwards it.
            let (el, _) = a_cycle(&ch, &name)?;
            without.push(el);
        } else {
            let pending = ch.b.status(&name)?.last_cycle.unwrap_or(0);
            extended_cmd(&ch, "resume", &name)?;
            let deadline = Instant::now() + Duration::from_secs(60);
            while ch
                .b
                .status(&name)?
                .extended
                .context("no extended row")?
                .running_point
                .is_none()
            {
                if forwarded(&ch, &name)?.is_some_and(|f| f >= pending) {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("B's extended cycle did not start within 60 s");
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            let (el, _) = a_cycle(&ch, &name)?;
            // Whether B's extended cycle still ran when A's cycle was applied.
            if forwarded(&ch, &name)?.is_none_or(|f| f < pending) {
                overlapped += 1;
            }
            with.push(el);
            wait_forwarded(&ch, &name, pending)?;
            extended_cmd(&ch, "pause", &name)?;
        }
        let (runs, what) = if p % 2 == 0 {
            (&without, "without")
        } else {
            (&with, "with")
        };
        log(format!(
            "s13: pair run {p}: A's cycle {:.3} s ({what} forwarding)",
            runs.last().copied().unwrap_or(f64::NAN)
        ));
    }

    let me = median(&ext);
    o.ours = format!(
        "{} per extended cycle ({} changed)",
        secs(me),
        size(dirty_bytes)
    );
    o.detail(
        "extended cycle to acknowledged by C (repeats)",
        samples(&ext, secs),
    );
    o.detail(
        "data bytes the extended cycle shipped (B's statistics, before compression)",
        samples(&ext_bytes, |v| size(v as u64)),
    );
    o.detail(
        "first extended cycle (a full copy of the filled disk)",
        secs(init),
    );
    if rsync_missing.is_none() {
        let mr = median(&rs);
        o.baseline = format!("{} per rsync", secs(mr));
        o.detail(
            "rsync --inplace --no-whole-file --ignore-times (repeats)",
            samples(&rs, secs),
        );
        o.detail(
            "rsync --stats literal data sent (repeats)",
            samples(&rs_literal, |v| size(v as u64)),
        );
        o.detail(
            "extended cycle versus rsync",
            format!("{:.1}× faster", mr / me),
        );
    } else {
        o.baseline = "- (rsync not installed)".into();
    }
    let (mo, mw) = (median(&without), median(&with));
    let ratio = mo / mw;
    o.detail(
        "A's cycle to applied on B, B not forwarding (repeats)",
        samples(&without, secs),
    );
    o.detail(
        "A's cycle to applied on B, B forwarding its previous point to C meanwhile (repeats)",
        samples(&with, secs),
    );
    o.detail(
        "runs where B's extended cycle was still running when A's cycle was applied",
        format!("{overlapped} of {}", with.len()),
    );
    o.ratio = format!("{ratio:.2} (A's cycle without / with forwarding)");
    o.verdict = at_least(ratio, S13_MUST, None);
    ctx.block(c.disconnect())?;
    drop(vm);
    let mut ch = ch;
    let _ = ch.stop();
    remove_dir(ch.root.path());
    Ok(())
}
