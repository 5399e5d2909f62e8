//! `vmr-bench`: the vmreplica benchmark runner (issue 7). Builds the release `vmreplica` (with
//! `--profile`, the `profiling` profile's: release plus debug info for perf),
//! runs the ten scenarios with real agents and QEMU on 127.0.0.1, each beside its baseline in
//! the same run, and rewrites the results section of BENCHMARKS.md.
//!
//! `cargo run --release -p vmr-bench -- [--quick] [--profile] [--only 1,2] [--no-write]`

mod load;
mod probe;
mod profile;
mod report;
mod scenarios;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Parser;

use report::{Outcome, Verdict};
use scenarios::Ctx;

/// vmreplica benchmark runner.
#[derive(Debug, Parser)]
#[command(name = "vmr-bench", about)]
struct Args {
    /// Sanity check in under 5 minutes (smaller disks, fewer repeats, 10 VMs).
    #[arg(long)]
    quick: bool,
    /// Also perf-profile one extra repeat of each scenario's hot side.
    #[arg(long)]
    profile: bool,
    /// Run only these scenarios (comma separated numbers 1-13).
    #[arg(long, value_delimiter = ',')]
    only: Vec<u8>,
    /// Print the results instead of rewriting BENCHMARKS.md.
    #[arg(long)]
    no_write: bool,
    /// The file to rewrite (default: BENCHMARKS.md at the workspace root).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Use this vmreplica binary instead of building one.
    #[arg(long)]
    vmreplica: Option<PathBuf>,
    /// Keep the run's directory (agent logs) instead of deleting it.
    #[arg(long)]
    keep: bool,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Build (or find) the vmreplica binary of `profile` (`release`, or `profiling` for `--profile`:
/// release plus debug info, so that perf names the functions) in the runner's target directory.
fn vmreplica_binary(repo: &Path, profile: &str) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("vmr-bench: cargo build --profile {profile} -p vmreplica");
    let st = Command::new(&cargo)
        .args(["build", "--profile", profile, "-p", "vmreplica"])
        .current_dir(repo)
        .status();
    // The runner is target/<its profile>/vmr-bench; the binary is target/<profile>/vmreplica.
    let exe = std::env::current_exe()?
        .parent()
        .and_then(Path::parent)
        .context("no target directory above the runner")?
        .join(profile)
        .join("vmreplica");
    match st {
        Ok(s) if s.success() => {}
        Ok(s) if exe.exists() => {
            eprintln!(
                "vmr-bench: building vmreplica failed ({s}); using the existing {}",
                exe.display()
            )
        }
        Ok(s) => bail!("cargo build --profile {profile} -p vmreplica failed ({s})"),
        Err(e) if exe.exists() => {
            eprintln!(
                "vmr-bench: cannot run cargo ({e}); using the existing {}",
                exe.display()
            )
        }
        Err(e) => bail!("cannot run cargo to build vmreplica: {e}"),
    }
    if !exe.exists() {
        bail!(
            "{} does not exist after the build; pass --vmreplica PATH",
            exe.display()
        );
    }
    Ok(exe)
}

/// rsync, installing it with scripts/install-deps.sh full when missing; the reason when absent.
fn ensure_rsync(repo: &Path) -> Option<String> {
    let have = || {
        Command::new("rsync")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if have() {
        return None;
    }
    eprintln!("vmr-bench: rsync is missing; running scripts/install-deps.sh full");
    let st = Command::new("bash")
        .arg(repo.join("scripts/install-deps.sh"))
        .arg("full")
        .status();
    if have() {
        None
    } else {
        Some(format!(
            "rsync is not installed and `scripts/install-deps.sh full` did not install it ({st:?})"
        ))
    }
}

/// The most disk space each scenario's run directory took in a measured run (full run, quick
/// run), in GiB, rounded up with a margin of about a tenth (stop 45: the file system's used
/// space sampled every 1-5 s through a full `--profile` run, an `--only 4` run and a quick run;
/// a full run needs 47 GiB, scenario 5's). Scenarios run one after another
/// and each removes its images when it ends, so a run needs the largest of its scenarios'.
const DISK_GIB: [(u8, u64, u64); 13] = [
    (1, 18, 5),
    (2, 36, 5),
    (3, 36, 5),
    (4, 29, 7),
    (5, 47, 7),
    (6, 3, 1),
    (7, 36, 7),
    (8, 36, 4),
    (9, 1, 1),
    (10, 1, 1),
    (11, 18, 5),
    (12, 1, 1),
    (13, 46, 6),
];

/// The selected scenario that needs the most disk space, and that space in GiB.
fn disk_need(quick: bool, want: &dyn Fn(u8) -> bool) -> Option<(u8, u64)> {
    DISK_GIB
        .iter()
        .filter(|(n, ..)| want(*n))
        .map(|&(n, full, q)| (n, if quick { q } else { full }))
        .max_by_key(|&(_, need)| need)
}

/// Fail before the first scenario when `dir`'s file system has less free space than the
/// selected scenarios need ([`DISK_GIB`]): a run that runs out of it fails its scenario
/// (ENOSPC) after up to an hour.
fn check_disk_space(dir: &Path, quick: bool, want: &dyn Fn(u8) -> bool) -> anyhow::Result<()> {
    let Some((n, need)) = disk_need(quick, want) else {
        return Ok(());
    };
    let st = nix::sys::statvfs::statvfs(dir)
        .with_context(|| format!("reading the free space of {}", dir.display()))?;
    let free_gib = st.blocks_available() as f64 * st.fragment_size() as f64 / (1u64 << 30) as f64;
    if free_gib < need as f64 {
        bail!(
            "{} has {free_gib:.1} GiB free, and this {} run needs about {need} GiB there \
             (scenario {n}'s images, the largest of the selected scenarios'); free some space, \
             or leave that scenario out with --only",
            dir.display(),
            if quick { "quick" } else { "full" },
        );
    }
    eprintln!(
        "vmr-bench: {} has {free_gib:.1} GiB free; this run needs about {need} GiB (scenario {n})",
        dir.display()
    );
    Ok(())
}

fn main() {
    let args = Args::parse();
    match run(args) {
        Ok(()) => {}
        Err(e) => {
            eprintln!("vmr-bench: error: {e:#}");
            std::process::exit(1);
        }
    }
}

/// Detail row of every scenario: the machine probe taken right before it.
const PROBE_DETAIL: &str = "machine probe before the scenario (one thread)";

/// Runs the machine probe and logs it.
fn probe_now() -> probe::Probe {
    let p = probe::measure();
    eprintln!("vmr-bench: machine probe: {p}");
    p
}

/// Runs a scenario after the machine probe and records the probe in its details.
fn probed(scenario: impl FnOnce() -> Outcome) -> Outcome {
    let p = probe_now();
    let mut o = scenario();
    o.detail(PROBE_DETAIL, p.to_string());
    o
}

fn run(args: Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let repo = std::path::absolute(repo_root())?;
    let exe = match &args.vmreplica {
        Some(p) => std::path::absolute(p)?,
        None => vmreplica_binary(&repo, if args.profile { "profiling" } else { "release" })?,
    };
    // qemu-storage-daemon and friends (QEMU 10) are needed by every scenario.
    if Command::new("qemu-storage-daemon")
        .arg("--version")
        .output()
        .is_err()
    {
        let _ = Command::new("bash")
            .arg(repo.join("scripts/install-deps.sh"))
            .status();
    }
    let want = |n: u8| args.only.is_empty() || args.only.contains(&n);
    let rsync_missing = if want(2) || want(8) || want(13) {
        ensure_rsync(&repo)
    } else {
        None
    };
    let base = Path::new("/var/tmp");
    check_disk_space(base, args.quick, &want)?;
    let tmp = tempfile::Builder::new()
        .prefix("vmr-bench-")
        .tempdir_in(base)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    scenarios::KEEP_LOGS.store(args.keep, std::sync::atomic::Ordering::Relaxed);
    let ctx = Ctx {
        exe,
        root: tmp.path().to_path_buf(),
        quick: args.quick,
        profile: args.profile,
        rt,
    };
    let mode = if args.quick { "quick" } else { "full" };
    let mut cmdline = String::from("cargo run --release -p vmr-bench --");
    if args.quick {
        cmdline.push_str(" --quick");
    }
    if args.profile {
        cmdline.push_str(" --profile");
    }
    if !args.only.is_empty() {
        let s: Vec<String> = args.only.iter().map(u8::to_string).collect();
        cmdline.push_str(&format!(" --only {}", s.join(",")));
    }
    let mut info = report::run_info(&repo, mode, &cmdline);
    eprintln!(
        "vmr-bench: {mode} run in {} with {}",
        ctx.root.display(),
        ctx.exe.display()
    );

    // Every process started is a ChildGuard (killed when its scenario ends, also on errors).
    // Ctrl-C reaches the whole foreground process group: agents, QEMU and perf stop with us.
    let mut outcomes: Vec<Outcome> = Vec::new();
    let skipped = |n: u8, title: &str, goal: &str| {
        let mut o = Outcome::new(n, title, goal);
        o.verdict = Verdict::Skipped("not selected with --only".into());
        o
    };
    let t = Instant::now();
    outcomes.push(if want(1) {
        probed(|| scenarios::primary_overhead(&ctx))
    } else {
        skipped(1, "Primary overhead", scenarios::goal(1))
    });
    eprintln!(
        "vmr-bench: scenario 1 took {:.0} s",
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    if want(2) || want(3) {
        let p = probe_now();
        let (mut o2, mut o3) = scenarios::delta_cycle(&ctx, rsync_missing.as_deref());
        for o in [&mut o2, &mut o3] {
            o.detail(PROBE_DETAIL, p.to_string());
        }
        outcomes.push(if want(2) {
            o2
        } else {
            skipped(2, "Delta cycle versus rsync", scenarios::goal(2))
        });
        outcomes.push(if want(3) {
            o3
        } else {
            skipped(
                3,
                "Delta cycle versus the physical limit",
                scenarios::goal(3),
            )
        });
    } else {
        outcomes.push(skipped(2, "Delta cycle versus rsync", scenarios::goal(2)));
        outcomes.push(skipped(
            3,
            "Delta cycle versus the physical limit",
            scenarios::goal(3),
        ));
    }
    eprintln!(
        "vmr-bench: scenarios 2-3 took {:.0} s",
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    outcomes.push(if want(4) {
        probed(|| scenarios::initial(&ctx))
    } else {
        skipped(4, "Initial replication", scenarios::goal(4))
    });
    eprintln!(
        "vmr-bench: scenario 4 took {:.0} s",
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    outcomes.push(if want(5) {
        probed(|| scenarios::churn(&ctx))
    } else {
        skipped(5, "Sustained churn", scenarios::goal(5))
    });
    eprintln!(
        "vmr-bench: scenario 5 took {:.0} s",
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    outcomes.push(if want(6) {
        probed(|| scenarios::failover(&ctx))
    } else {
        skipped(6, "Failover time", scenarios::goal(6))
    });
    eprintln!(
        "vmr-bench: scenario 6 took {:.0} s",
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    outcomes.push(if want(7) {
        probed(|| scenarios::scale(&ctx))
    } else {
        skipped(7, "Scale", scenarios::goal(7))
    });
    eprintln!(
        "vmr-bench: scenario 7 took {:.0} s",
        t.elapsed().as_secs_f64()
    );

    let t = Instant::now();
    outcomes.push(if want(8) {
        probed(|| scenarios::resync_vs_rsync(&ctx, rsync_missing.as_deref()))
    } else {
        skipped(8, "Resync versus rsync", scenarios::goal(8))
    });
    eprintln!(
        "vmr-bench: scenario 8 took {:.0} s",
        t.elapsed().as_secs_f64()
    );

    let t = Instant::now();
    outcomes.push(if want(9) {
        probed(|| scenarios::metrics_scrape(&ctx))
    } else {
        skipped(9, "Metrics scrape cost", scenarios::goal(9))
    });
    eprintln!(
        "vmr-bench: scenario 9 took {:.0} s",
        t.elapsed().as_secs_f64()
    );

    let t = Instant::now();
    outcomes.push(if want(10) {
        probed(|| scenarios::bandwidth_limit(&ctx))
    } else {
        skipped(10, "Bandwidth limit accuracy", scenarios::goal(10))
    });
    eprintln!(
        "vmr-bench: scenario 10 took {:.0} s",
        t.elapsed().as_secs_f64()
    );

    let t = Instant::now();
    outcomes.push(if want(11) {
        probed(|| scenarios::continuous_lag(&ctx))
    } else {
        skipped(11, "Continuous mode: lag under churn", scenarios::goal(11))
    });
    eprintln!(
        "vmr-bench: scenario 11 took {:.0} s",
        t.elapsed().as_secs_f64()
    );

    let t = Instant::now();
    outcomes.push(if want(12) {
        probed(|| scenarios::group_pause(&ctx))
    } else {
        skipped(12, "Consistency group pause (4 VMs)", scenarios::goal(12))
    });
    eprintln!(
        "vmr-bench: scenario 12 took {:.0} s",
        t.elapsed().as_secs_f64()
    );

    let t = Instant::now();
    outcomes.push(if want(13) {
        probed(|| scenarios::extended_cycle(&ctx, rsync_missing.as_deref()))
    } else {
        skipped(
            13,
            "Extended replication: B → C cycle versus rsync; A's cycle with B forwarding",
            scenarios::goal(13),
        )
    });
    eprintln!(
        "vmr-bench: scenario 13 took {:.0} s",
        t.elapsed().as_secs_f64()
    );

    info.wall_secs = started.elapsed().as_secs_f64();
    let section = report::render(&info, &outcomes);
    if args.no_write {
        println!("{section}");
    } else {
        let out = args
            .out
            .clone()
            .unwrap_or_else(|| repo.join("BENCHMARKS.md"));
        report::write_section(&out, &section)
            .with_context(|| format!("writing {}", out.display()))?;
        println!("{section}");
        eprintln!("vmr-bench: wrote {}", out.display());
    }
    if args.keep {
        let kept = tmp.keep();
        eprintln!("vmr-bench: run directory kept in {}", kept.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_needs_the_disk_space_of_its_largest_selected_scenario() {
        let all = |_: u8| true;
        let largest = |quick: bool| {
            DISK_GIB
                .iter()
                .map(|&(_, f, q)| if quick { q } else { f })
                .max()
        };
        for quick in [false, true] {
            assert_eq!(disk_need(quick, &all).map(|(_, g)| g), largest(quick));
        }
        // Every scenario has its figure, in order; a full run needs more than a quick one.
        for (i, &(n, full, quick)) in DISK_GIB.iter().enumerate() {
            assert_eq!(usize::from(n), i + 1);
            assert!(
                full >= quick && quick > 0,
                "scenario {n}: {full} / {quick} GiB"
            );
        }
        let only = |n: u8| n == 9;
        assert_eq!(disk_need(false, &only), Some((9, DISK_GIB[8].1)));
        assert_eq!(disk_need(false, &|_| false), None);
    }
}
