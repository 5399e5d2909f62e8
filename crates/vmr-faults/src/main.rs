//! `vmr-faults`: the vmreplica fault campaign (issue 11). Real agents (the `vmreplica`
//! binary, built with the agent's test hooks, which the fleecing fault needs), stand-in VMs
//! and guest writers from the shared harness; SIGKILLs of either agent, a network cut and
//! 5 % loss plus 200 ms delay between two network namespaces, a full replica store, a full
//! fleecing file system and a second agent on the same directory. Prints a table and, with
//! `--write`, keeps it in RELIABILITY.md.
//!
//! `cargo run -p vmr-faults -- [--quick] [--trials N] [--only 1,3] [--write]` (as root:
//! namespaces, iptables and tmpfs mounts).

mod faults;
mod net;
mod proxy;
mod report;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Parser;
use rand::SeedableRng;

use faults::{Ctx, Fault};
use report::Row;

/// vmreplica fault campaign.
#[derive(Debug, Parser)]
#[command(name = "vmr-faults", about)]
struct Args {
    /// The CI form: 2 trials of faults 1, 2, 4 and 6, one of 3 (each kind) and 5.
    #[arg(long)]
    quick: bool,
    /// Run this many trials of every selected fault.
    #[arg(long)]
    trials: Option<usize>,
    /// Run only these faults (comma separated numbers 1-6).
    #[arg(long, value_delimiter = ',')]
    only: Vec<u8>,
    /// Keep the results in RELIABILITY.md (or --out).
    #[arg(long)]
    write: bool,
    /// The file --write rewrites (default: RELIABILITY.md at the workspace root).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Use this vmreplica binary (built with `--features vmreplica/test-hooks`) instead of
    /// building one.
    #[arg(long)]
    vmreplica: Option<PathBuf>,
    /// Seed of the random moments (printed; default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// Exit 0 even when trials failed (the table still says so).
    #[arg(long)]
    no_fail: bool,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Build vmreplica with the test hooks, in this runner's profile; its path.
fn vmreplica_binary(repo: &Path) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut args = vec![
        "build",
        "-p",
        "vmreplica",
        "--features",
        "vmreplica/test-hooks,vmr-store/failpoints",
    ];
    if !cfg!(debug_assertions) {
        args.push("--release");
    }
    eprintln!("vmr-faults: cargo {}", args.join(" "));
    let st = Command::new(&cargo)
        .args(&args)
        .current_dir(repo)
        .status()
        .context("run cargo")?;
    if !st.success() {
        bail!("cargo {} failed ({st})", args.join(" "));
    }
    let exe = std::env::current_exe()?
        .parent()
        .context("no directory of the runner")?
        .join("vmreplica");
    if !exe.exists() {
        bail!("{} does not exist after the build", exe.display());
    }
    Ok(exe)
}

/// Unmount every mount under `root` (lazily), deepest first.
fn unmount_under(root: &Path) {
    let Ok(m) = std::fs::read_to_string("/proc/mounts") else {
        return;
    };
    let mut points: Vec<&str> = m
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|p| Path::new(p).starts_with(root))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = Command::new("umount").arg("-l").arg(p).status();
    }
}

fn main() {
    let args = Args::parse();
    match run(args) {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("vmr-faults: error: {e:#}");
            std::process::exit(2);
        }
    }
}

fn run(args: Args) -> anyhow::Result<bool> {
    let started = Instant::now();
    if !nix::unistd::geteuid().is_root() {
        bail!("the campaign needs root (network namespaces, iptables, tmpfs mounts)");
    }
    let repo = std::path::absolute(repo_root())?;
    let exe = match &args.vmreplica {
        Some(p) => std::path::absolute(p)?,
        None => vmreplica_binary(&repo)?,
    };
    let want = |f: Fault| args.only.is_empty() || args.only.contains(&f.number());
    let net_reason = if want(Fault::NetCut) {
        net::probe().err()
    } else {
        None
    };
    let root = tempfile::Builder::new()
        .prefix("vmr-faults-")
        .tempdir_in("/var/tmp")?;
    let root_path = root.path().to_path_buf();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // Ctrl-C or SIGTERM: kill what the run started, unmount, remove the namespaces.
    {
        let root = root_path.clone();
        rt.spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut int), Ok(mut term)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) else {
                return;
            };
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            eprintln!("vmr-faults: interrupted; cleaning up");
            vmr_testkit::harness::kill_processes_under(&root);
            unmount_under(&root);
            net::cleanup_this_run();
            let _ = std::fs::remove_dir_all(&root);
            std::process::exit(130);
        });
    }
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mode = if args.quick { "quick" } else { "full" };
    eprintln!(
        "vmr-faults: {mode} run in {} with {} (seed {seed})",
        root_path.display(),
        exe.display()
    );
    let network = match &net_reason {
        None => format!(
            "both agents in network namespaces made by the runner, joined by a veth pair in \
             {} (blackholed on the host); loss by iptables statistic, delay by the runner's \
             proxy",
            net::SUBNET
        ),
        Some(r) => format!("network namespaces unavailable ({r}): fault 3 not run"),
    };
    eprintln!("vmr-faults: network faults: {network}");
    let ctx = Ctx {
        exe: exe.clone(),
        root: root_path.clone(),
        rt,
        pool: vmr_testkit::harness::pool(seed),
    };
    let mut rows = Vec::new();
    for f in Fault::ALL {
        let runnable =
            want(f) && !(matches!(f, Fault::NetCut | Fault::LossDelay) && net_reason.is_some());
        let trials = if runnable {
            let n = args.trials.unwrap_or(f.trials(args.quick));
            let t = Instant::now();
            let out = faults::run(&ctx, f, n, &mut rng);
            eprintln!(
                "vmr-faults: {}: {n} trials in {:.0} s",
                f.label(),
                t.elapsed().as_secs_f64()
            );
            out
        } else {
            Vec::new()
        };
        rows.push(Row { fault: f, trials });
    }
    unmount_under(&root_path);
    drop(root);

    let table = report::table(&rows);
    let mut cmd = String::from("scripts/faults.sh");
    if args.quick {
        cmd.push_str(" --quick");
    }
    if let Some(n) = args.trials {
        cmd.push_str(&format!(" --trials {n}"));
    }
    if !args.only.is_empty() {
        let s: Vec<String> = args.only.iter().map(u8::to_string).collect();
        cmd.push_str(&format!(" --only {}", s.join(",")));
    }
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(&repo)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let info = format!(
        "`{cmd}` ({mode}), {date}, commit {commit}, {cores} cores, seed {seed}, took {:.1} min. \
         Network: {network}.",
        started.elapsed().as_secs_f64() / 60.0
    );
    println!("{info}\n\n{table}");
    if args.write {
        let out = args
            .out
            .clone()
            .unwrap_or_else(|| repo.join("RELIABILITY.md"));
        report::write_section(&out, &report::section(&info, &table))
            .with_context(|| format!("write {}", out.display()))?;
        eprintln!("vmr-faults: wrote {}", out.display());
    }
    let ok = rows.iter().all(|r| r.failures() == 0);
    Ok(ok || args.no_fail)
}
