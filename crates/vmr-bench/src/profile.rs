//! `--profile`: `perf record -g` of given processes (the agents, the stand-in VM) over the hot
//! side of one extra repeat of a scenario, summarised as the top cost centres
//! (`perf report --no-children --sort comm,dso,symbol`); and the CPU time and peak memory of a
//! process from `/proc`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context;

use vmr_testkit::ChildGuard;

/// A running `perf record`.
pub struct Perf {
    guard: ChildGuard,
    out: PathBuf,
}

/// Start `perf record` on `pids`, writing into `dir`; `None` when perf is not available.
pub fn start(dir: &Path, label: &str, pids: &[u32]) -> Option<Perf> {
    let out = dir.join(format!("perf-{label}.data"));
    let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
    let mut cmd = Command::new("perf");
    cmd.args(["record", "-q", "-F", "499", "-g", "-o"])
        .arg(&out)
        .arg("-p")
        .arg(pids.join(","))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let guard = ChildGuard::spawn(cmd, "perf record").ok()?;
    // Let perf attach before the measured work starts.
    std::thread::sleep(Duration::from_millis(300));
    Some(Perf { guard, out })
}

impl Perf {
    /// Stop recording and return the top cost centres as a markdown block.
    pub fn finish(mut self, what: &str) -> String {
        let _ = self.guard.terminate_int(Duration::from_secs(30));
        let out = Command::new("perf")
            .args([
                "report",
                "--stdio",
                "--no-children",
                "--sort",
                "comm,dso,symbol",
                "--percent-limit",
                "1.5",
                "-g",
                "none",
                "-i",
            ])
            .arg(&self.out)
            .stderr(Stdio::null())
            .output();
        let text = match out {
            Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
            Ok(o) => return format!("Profile of {what}: perf report failed ({})", o.status),
            Err(e) => return format!("Profile of {what}: perf report could not run ({e})"),
        };
        let rows: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .take(14)
            .collect();
        let _ = std::fs::remove_file(&self.out);
        format!(
            "Profile of {what} (`perf record -g -F 499` on the listed processes, `perf report --no-children --sort comm,dso,symbol`, top entries ≥ 1.5 % of samples):\n\n```\n{}\n```",
            rows.join("\n")
        )
    }
}

/// SIGINT so perf writes its data file, then wait.
trait TerminateInt {
    fn terminate_int(&mut self, timeout: Duration) -> anyhow::Result<()>;
}

impl TerminateInt for ChildGuard {
    fn terminate_int(&mut self, timeout: Duration) -> anyhow::Result<()> {
        if let Ok(pid) = i32::try_from(self.pid()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGINT,
            );
        }
        let deadline = std::time::Instant::now() + timeout;
        while self.is_running() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

/// CPU seconds (user + system) a process has used so far, from `/proc/PID/stat`.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("bad /proc stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime field 15.
    let ut: f64 = f.get(11).context("no utime")?.parse()?;
    let st: f64 = f.get(12).context("no stime")?.parse()?;
    Ok((ut + st) / clock_ticks())
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// The direct children of a process (every thread's `children` list in `/proc`).
pub fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(t.path().join("children")) {
            out.extend(
                text.split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// CPU seconds used so far by each of `procs` (label, pid) and, added to the same label, by
/// its children (the QEMU processes an agent runs). A process that ended counts as 0.
pub fn cpu_by_process(procs: &[(&str, u32)]) -> Vec<(String, f64)> {
    procs
        .iter()
        .map(|(label, pid)| {
            let own = cpu_seconds(*pid).unwrap_or(0.0);
            let kids: f64 = children(*pid)
                .into_iter()
                .map(|c| cpu_seconds(c).unwrap_or(0.0))
                .sum();
            ((*label).to_owned(), own + kids)
        })
        .collect()
}

/// Peak resident set size (VmHWM) of a process, bytes.
pub fn peak_rss(pid: u32) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = text
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("no VmHWM")?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .context("bad VmHWM")?
        .parse()?;
    Ok(kb * 1024)
}
