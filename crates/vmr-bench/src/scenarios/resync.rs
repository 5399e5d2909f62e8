//! Scenario 8 (issue 6): resynchronization after lost tracking versus rsync of the image.

use super::*;

/// Scenario 8: one resync of a disk with 1 % of its blocks changed, versus `rsync --inplace
/// --no-whole-file` of the same image file; wall time and bytes sent.
pub fn resync_vs_rsync(ctx: &Ctx, rsync_missing: Option<&str>) -> Outcome {
    let mut o = Outcome::new(
        8,
        "Resync (block-hash comparison) versus rsync, 1 % of blocks differing",
        goal(8),
    );
    if let Some(why) = rsync_missing {
        o.verdict = Verdict::Skipped(why.to_owned());
        return o;
    }
    let r = resync_run(ctx, &mut o);
    finish(o, r)
}

/// rsync --stats figures of one run.
pub(super) struct RsyncRun {
    pub(super) secs: f64,
    /// "Total bytes sent" (sender to receiver, including its checksums and literal data).
    pub(super) sent: u64,
    /// "Literal data": bytes of the file sent as such.
    pub(super) literal: u64,
}

/// The rsync baseline's starting point: a sparse copy of `img` in `dst`.
pub(super) fn copy_for_rsync(img: &Path, dst: &Path) -> anyhow::Result<()> {
    let st = Command::new("cp")
        .arg("--sparse=always")
        .arg(img)
        .arg(dst)
        .status()?;
    if !st.success() {
        bail!("copying the image for rsync failed");
    }
    Ok(())
}

fn stat_number(stats: &str, label: &str) -> Option<u64> {
    let line = stats.lines().find(|l| l.starts_with(label))?;
    let digits: String = line[label.len()..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == ',' || *c == ' ')
        .filter(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// One `rsync --inplace --no-whole-file --ignore-times` of `img` into `dst` (which holds its
/// previous version), fsynced. `--ignore-times` makes rsync always run its delta algorithm:
/// its quick check (same size, same modification second) would skip an image the guest wrote
/// within the second of the previous run.
pub(super) fn rsync_once(img: &Path, dst: &Path) -> anyhow::Result<RsyncRun> {
    let t = Instant::now();
    let out = Command::new("rsync")
        .args(["--inplace", "--no-whole-file", "--ignore-times", "--stats"])
        .arg(img)
        .arg(format!("{}/", dst.display()))
        .output()?;
    if !out.status.success() {
        bail!(
            "rsync failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let name = img.file_name().context("image name")?;
    fsync(&dst.join(name))?;
    let secs = t.elapsed().as_secs_f64();
    let stats = String::from_utf8_lossy(&out.stdout);
    let sent = stat_number(&stats, "Total bytes sent:").context("rsync --stats: bytes sent")?;
    let literal = stat_number(&stats, "Literal data:").context("rsync --stats: literal data")?;
    if literal == 0 {
        bail!("rsync sent no literal data although 1 % of the disk changed");
    }
    Ok(RsyncRun {
        secs,
        sent,
        literal,
    })
}

/// Scenario 8's verdict: `speed` (rsync time / resync time) ≥ 1.5 and `bytes` (resync bytes /
/// rsync bytes) ≤ 0.5 must both hold; the miss names the one (or both) that failed.
pub(super) fn s8_verdict(speed: f64, bytes: f64) -> Verdict {
    all_of(&[
        ("speed versus rsync", at_least(speed, S8_SPEED, None)),
        ("bytes as a fraction of rsync's", at_most(bytes, S8_BYTES)),
    ])
}

fn resync_run(ctx: &Ctx, o: &mut Outcome) -> anyhow::Result<()> {
    let (disk, reps) = if ctx.quick {
        (GIB, 1usize)
    } else {
        (8 * GIB, 3)
    };
    let count = disk / BLOCK / 100;
    o.method = format!(
        "one stand-in VM with a {} qcow2 disk filled with incompressible data, replicated (cycles \
         every 60 min, so none runs by itself). Each repeat pauses replication, overwrites 1 % of \
         the 64 KiB blocks ({count} random blocks, {}) with new data, then runs both contenders \
         in alternating order. vmreplica: `vmreplica resume NAME --resync` (a forced resync: \
         the same path as after lost tracking) until the replica shows the resync's point \
         applied: the primary cuts a point-in-time view, both sides hash every 64 KiB block \
         (BLAKE3, the replica's hashes streamed over the mutual-TLS connection), only differing \
         blocks travel (zstd), into a new layer. Bytes = data bytes the agent counted. Baseline: \
         `rsync --inplace --no-whole-file --ignore-times --stats` of the image file into a \
         directory holding its previous version (same file system); bytes = rsync's \"Total \
         bytes sent\". Median of {reps}{}. Both must hold: speed = rsync time / resync time \
         ≥ {S8_SPEED}, and bytes = resync bytes / rsync bytes ≤ {S8_BYTES}.",
        size(disk),
        size(count * BLOCK),
        if ctx.quick {
            " (quick mode: 1 GiB disk instead of 8 GiB)"
        } else {
            ""
        }
    );
    let pair = Pair::in_dir(&ctx.exe, TestDir::given(&ctx.dir("s8"))?)?;
    let vm = StandIn::start_in(
        &pair.root.path().join("vm"),
        &pair.a.dir,
        "bench-s8",
        &[StandInDisk::new("disk0", disk)],
    )?;
    let c = ctx.block(load::connect(&vm.nbd, "disk0"))?;
    ctx.block(load::fill(&c, &vmr_testkit::harness::pool(81), disk, 81))?;
    let img = vm.disks()[0].1.clone();
    let dst = pair.root.path().join("rsync-dst");
    std::fs::create_dir_all(&dst)?;
    copy_for_rsync(&img, &dst)?;
    vm.register(&pair.a)?;
    enable_and_wait(&pair, &vm.def.name, "60m", 0, Duration::from_secs(1800))?;
    let (mut ours, mut ours_bytes, mut theirs, mut theirs_bytes) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r in 0..reps {
        pause(&pair, &vm.def.name)?;
        ctx.block(load::dirty(&c, count, 800 + r as u64))?;
        let run_resync = |ours: &mut Vec<f64>, bytes: &mut Vec<f64>| -> anyhow::Result<()> {
            let before = pair.a.status(&vm.def.name)?;
            let last = before.last_cycle.unwrap_or(0);
            let t = Instant::now();
            pair.a.json(&["resume", &vm.def.name, "--resync"])?;
            let (st, _) = pair
                .a
                .wait_cycle(&vm.def.name, last + 1, Duration::from_secs(1800))?;
            let applied = pair
                .b
                .wait_cycle(&vm.def.name, last + 1, Duration::from_secs(1800))?
                .1;
            if st.state != ReplicationState::Replicating {
                bail!("after the resync the primary is {:?}", st.state);
            }
            ours.push(applied.duration_since(t).as_secs_f64());
            bytes.push(
                st.stats
                    .total_bytes
                    .saturating_sub(before.stats.total_bytes) as f64,
            );
            Ok(())
        };
        if r % 2 == 0 {
            let x = rsync_once(&img, &dst)?;
            theirs.push(x.secs);
            theirs_bytes.push(x.sent as f64);
            run_resync(&mut ours, &mut ours_bytes)?;
        } else {
            run_resync(&mut ours, &mut ours_bytes)?;
            let x = rsync_once(&img, &dst)?;
            theirs.push(x.secs);
            theirs_bytes.push(x.sent as f64);
        }
        log(format!(
            "s8: repeat {r}: resync {:.2} s ({}), rsync {:.2} s ({})",
            ours.last().copied().unwrap_or(f64::NAN),
            size(ours_bytes.last().copied().unwrap_or(0.0) as u64),
            theirs.last().copied().unwrap_or(f64::NAN),
            size(theirs_bytes.last().copied().unwrap_or(0.0) as u64)
        ));
    }
    let (mt, mb, rt, rb) = (
        median(&ours),
        median(&ours_bytes),
        median(&theirs),
        median(&theirs_bytes),
    );
    o.ours = format!("{} per resync, {} sent", secs(mt), size(mb as u64));
    o.baseline = format!("{} per rsync, {} sent", secs(rt), size(rb as u64));
    let speed = rt / mt;
    let bytes = mb / rb.max(1.0);
    o.ratio = format!("{speed:.2}× faster, {bytes:.2}× rsync's bytes");
    o.detail("resync to applied (repeats)", samples(&ours, secs));
    o.detail(
        "resync data bytes sent (repeats)",
        samples(&ours_bytes, |b| size(b as u64)),
    );
    o.detail("rsync (repeats)", samples(&theirs, secs));
    o.detail(
        "rsync total bytes sent (repeats)",
        samples(&theirs_bytes, |b| size(b as u64)),
    );
    o.detail("blocks changed per repeat", format!("{count} of 64 KiB"));
    o.verdict = s8_verdict(speed, bytes);
    ctx.block(c.disconnect())?;
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
    fn rsync_stats_numbers() {
        let s =
            "Number of files: 1\nLiteral data: 10,485,760 bytes\nTotal bytes sent: 12,001,234\n";
        assert_eq!(stat_number(s, "Total bytes sent:"), Some(12_001_234));
        assert_eq!(stat_number(s, "Literal data:"), Some(10_485_760));
        assert_eq!(stat_number(s, "Matched data:"), None);
    }

    #[test]
    fn resync_needs_both_speed_and_bytes() {
        assert!(matches!(s8_verdict(1.5, 0.5), Verdict::Pass));
        assert!(matches!(s8_verdict(2.0, 0.3), Verdict::Pass));
        // Faster but too many bytes, and the other way round: each names what failed.
        match s8_verdict(2.0, 0.6) {
            Verdict::Miss(w) => {
                assert!(w.starts_with("bytes as a fraction of rsync's: 0.60"), "{w}");
                assert!(!w.contains("speed"), "{w}");
            }
            v => panic!("{v:?}"),
        }
        match s8_verdict(1.1, 0.46) {
            Verdict::Miss(w) => {
                assert!(
                    w.starts_with("speed versus rsync: 1.10 against ≥ 1.5"),
                    "{w}"
                );
                assert!(!w.contains("bytes"), "{w}");
            }
            v => panic!("{v:?}"),
        }
        match s8_verdict(0.9, 0.9) {
            Verdict::Miss(w) => assert!(w.contains("speed") && w.contains("bytes"), "{w}"),
            v => panic!("{v:?}"),
        }
    }
}
