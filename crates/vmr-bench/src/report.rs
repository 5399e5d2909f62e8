//! Results of a run and how they are written: per-scenario outcomes with method, figures, goal,
//! ratio and verdict; the machine, date and commit; the markdown section between the
//! `vmr-bench` markers of BENCHMARKS.md.

use std::path::Path;
use std::process::Command;

/// Start marker of the generated section.
pub const BEGIN: &str = "<!-- vmr-bench:begin -->";
/// End marker of the generated section.
pub const END: &str = "<!-- vmr-bench:end -->";

/// How a scenario came out.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// The goal is met.
    Pass,
    /// The must-reach bar is met, the further goal beyond it not; by how much.
    PassBelowGoal(String),
    /// The goal is missed by the given amount.
    Miss(String),
    /// Not run; why.
    Skipped(String),
    /// It failed to run; the error.
    Error(String),
}

impl Verdict {
    fn short(&self) -> String {
        match self {
            Verdict::Pass => "PASS".into(),
            Verdict::PassBelowGoal(by) => format!("PASS (goal not reached: {by})"),
            Verdict::Miss(by) => format!("MISS ({by})"),
            Verdict::Skipped(_) => "SKIPPED".into(),
            Verdict::Error(_) => "ERROR".into(),
        }
    }
}

/// One scenario's outcome.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Scenario number (1-10).
    pub id: u8,
    /// Title.
    pub title: String,
    /// How it was measured.
    pub method: String,
    /// The vmreplica figure (this machine).
    pub ours: String,
    /// The baseline figure (this machine).
    pub baseline: String,
    /// The ratio or judged value.
    pub ratio: String,
    /// The goal.
    pub goal: String,
    /// Verdict.
    pub verdict: Verdict,
    /// Further measured figures (label, value).
    pub details: Vec<(String, String)>,
    /// Notes and profile findings.
    pub notes: Vec<String>,
}

impl Outcome {
    /// An outcome with only the identity, method and goal filled in.
    pub fn new(id: u8, title: &str, goal: &str) -> Outcome {
        Outcome {
            id,
            title: title.into(),
            method: String::new(),
            ours: "-".into(),
            baseline: "-".into(),
            ratio: "-".into(),
            goal: goal.into(),
            verdict: Verdict::Skipped("not run".into()),
            details: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// Add a detail row.
    pub fn detail(&mut self, k: impl Into<String>, v: impl Into<String>) {
        self.details.push((k.into(), v.into()));
    }
}

/// Run identity: machine, date, commit, mode.
#[derive(Debug, Clone)]
pub struct RunInfo {
    /// `quick` or `full`.
    pub mode: String,
    /// The command line that produced it.
    pub command: String,
    /// Date and time (UTC).
    pub date: String,
    /// Short commit, `-dirty` when the tree had changes.
    pub commit: String,
    /// CPU, cores, RAM, kernel, tool versions.
    pub machine: Vec<(String, String)>,
    /// Wall time of the run, s.
    pub wall_secs: f64,
}

fn sh(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into())
}

/// Collect the run identity (the repository at `repo`).
pub fn run_info(repo: &Path, mode: &str, command: &str) -> RunInfo {
    let repo_s = repo.display().to_string();
    let mut commit = sh("git", &["-C", &repo_s, "rev-parse", "--short", "HEAD"]);
    if !sh("git", &["-C", &repo_s, "status", "--porcelain"]).is_empty() {
        commit.push_str("-dirty");
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown".into(), |(_, v)| v.trim().to_owned());
    let mem = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let ram = mem
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|k| k.parse::<u64>().ok())
        .map_or("unknown".into(), |k| {
            format!("{:.1} GiB", k as f64 / 1024.0 / 1024.0)
        });
    let first = |s: String| s.lines().next().unwrap_or("unknown").to_owned();
    RunInfo {
        mode: mode.into(),
        command: command.into(),
        date: sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        commit,
        machine: vec![
            ("CPU".into(), cpu),
            ("cores".into(), sh("nproc", &[])),
            ("RAM".into(), ram),
            ("kernel".into(), sh("uname", &["-r"])),
            ("QEMU".into(), first(sh("qemu-img", &["--version"]))),
            ("rsync".into(), first(sh("rsync", &["--version"]))),
        ],
        wall_secs: 0.0,
    }
}

fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

/// The markdown section (without the markers).
pub fn render(info: &RunInfo, outcomes: &[Outcome]) -> String {
    let mut m = String::new();
    m.push_str(&format!(
        "## Results ({} mode)\n\nGenerated by `{}` on {}, commit `{}`, wall time {:.0} s. \
         Every figure below comes from that run. Absolute times and rates are **this machine's**; \
         the goals are judged on the ratios (or, where the goal is an absolute limit, on that limit).\n\n",
        info.mode, info.command, info.date, info.commit, info.wall_secs
    ));
    m.push_str("Machine: ");
    m.push_str(
        &info
            .machine
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join("; "),
    );
    m.push_str(".\n\n");
    m.push_str("| # | scenario | vmreplica (this machine) | baseline (this machine) | ratio / value | goal | verdict |\n");
    m.push_str("|---|---|---|---|---|---|---|\n");
    for o in outcomes {
        m.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            o.id,
            cell(&o.title),
            cell(&o.ours),
            cell(&o.baseline),
            cell(&o.ratio),
            cell(&o.goal),
            cell(&o.verdict.short())
        ));
    }
    for o in outcomes {
        m.push_str(&format!("\n### {}. {}\n\n", o.id, o.title));
        match &o.verdict {
            Verdict::Skipped(why) => m.push_str(&format!("**Skipped:** {why}\n\n")),
            Verdict::Error(e) => m.push_str(&format!(
                "**Error:** the scenario could not complete: {e}\n\n"
            )),
            Verdict::Miss(by) => m.push_str(&format!("**Goal missed:** {by}.\n\n")),
            Verdict::PassBelowGoal(by) => m.push_str(&format!(
                "**Passed** the must-reach bar; **goal not reached:** {by}.\n\n"
            )),
            Verdict::Pass => {}
        }
        if !o.method.is_empty() {
            m.push_str(&format!("Method: {}\n\n", o.method));
        }
        if !o.details.is_empty() {
            m.push_str("| measure | value |\n|---|---|\n");
            for (k, v) in &o.details {
                m.push_str(&format!("| {} | {} |\n", cell(k), cell(v)));
            }
            m.push('\n');
        }
        for n in &o.notes {
            m.push_str(n);
            if !n.ends_with('\n') {
                m.push('\n');
            }
            m.push('\n');
        }
    }
    m
}

/// The file's head when BENCHMARKS.md does not exist yet.
pub const HEAD: &str = "# vmreplica benchmarks\n\n\
## How to run\n\n\
```sh\n\
scripts/install-deps.sh full        # QEMU 10 tools, qemu-system-x86, rsync (the runner calls it when rsync is missing)\n\
cargo run --release -p vmr-bench -- --quick   # sanity check, < 5 minutes on 2 cores\n\
cargo run --release -p vmr-bench              # full run (8 GiB / 16 GiB disks, 100 VMs), < 45 minutes\n\
cargo run --release -p vmr-bench -- --quick --profile   # also perf-profile the hot side of each scenario once\n\
```\n\n\
The runner builds the release `vmreplica` binary (`cargo build --release -p vmreplica`; with\n\
`--profile`, `cargo build --profile profiling -p vmreplica`: release plus debug info, so that perf\n\
names functions; release builds carry none), starts two\n\
real agents on 127.0.0.1 per scenario and qemu-storage-daemon stand-in VMs, drives them through the\n\
CLI like an admin, takes each scenario's baseline in the same run, quotes medians, and rewrites the\n\
section between the markers below (`--no-write` prints it instead; `--only 2,3` runs some\n\
scenarios). Everything it starts is stopped when it ends, also on Ctrl-C.\n\n";

/// Replace the marked section of `path` with `section` (creating the file when missing).
pub fn write_section(path: &Path, section: &str) -> anyhow::Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => format!("{HEAD}{BEGIN}\n{END}\n"),
        Err(e) => return Err(e.into()),
    };
    let new = match (text.find(BEGIN), text.find(END)) {
        (Some(b), Some(e)) if b < e => format!(
            "{}{BEGIN}\n{}\n{}",
            &text[..b],
            section.trim_end(),
            &text[e..]
        ),
        _ => format!(
            "{}\n{BEGIN}\n{}\n{END}\n",
            text.trim_end(),
            section.trim_end()
        ),
    };
    let tmp = path.with_extension("md.tmp");
    std::fs::write(&tmp, new)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// How far `value` is from `limit`: `0.50 against ≥ 0.6: 17 % short` (higher is better) or
/// `0.70 against ≤ 0.6: 17 % over` (lower is better).
pub fn miss_by(value: f64, limit: f64, higher_is_better: bool) -> String {
    if higher_is_better {
        format!(
            "{value:.2} against ≥ {limit}: {:.0} % short",
            (1.0 - value / limit) * 100.0
        )
    } else {
        format!(
            "{value:.2} against ≤ {limit}: {:.0} % over",
            (value / limit - 1.0) * 100.0
        )
    }
}

/// Judge a higher-is-better `value` against the bar it must reach and, when given, a further
/// goal: `Pass` at or above the goal (or the bar when there is none), `PassBelowGoal` between
/// them, `Miss` below the bar (also for a value that is not a number).
pub fn at_least(value: f64, must: f64, goal: Option<f64>) -> Verdict {
    if value.is_nan() || value < must {
        return Verdict::Miss(miss_by(value, must, true));
    }
    match goal {
        Some(g) if value < g => Verdict::PassBelowGoal(miss_by(value, g, true)),
        _ => Verdict::Pass,
    }
}

/// Judge a lower-is-better `value` against the limit it must not exceed (`Miss` also for a
/// value that is not a number).
pub fn at_most(value: f64, limit: f64) -> Verdict {
    if value.is_nan() || value > limit {
        Verdict::Miss(miss_by(value, limit, false))
    } else {
        Verdict::Pass
    }
}

/// Combine the verdicts of conditions that must all hold, each named: `Miss` naming every
/// condition that failed when any did, else `PassBelowGoal` naming every goal not reached when
/// any was not, else `Pass`. An `Error` or `Skipped` condition makes the whole so.
pub fn all_of(conditions: &[(&str, Verdict)]) -> Verdict {
    let named = |pick: fn(&Verdict) -> Option<&String>| -> Vec<String> {
        conditions
            .iter()
            .filter_map(|(name, v)| pick(v).map(|why| format!("{name}: {why}")))
            .collect()
    };
    for (name, v) in conditions {
        match v {
            Verdict::Error(e) => return Verdict::Error(format!("{name}: {e}")),
            Verdict::Skipped(w) => return Verdict::Skipped(format!("{name}: {w}")),
            _ => {}
        }
    }
    let missed = named(|v| match v {
        Verdict::Miss(w) => Some(w),
        _ => None,
    });
    if !missed.is_empty() {
        return Verdict::Miss(missed.join("; "));
    }
    let short = named(|v| match v {
        Verdict::PassBelowGoal(w) => Some(w),
        _ => None,
    });
    if short.is_empty() {
        Verdict::Pass
    } else {
        Verdict::PassBelowGoal(short.join("; "))
    }
}

/// Median of samples (upper middle for even counts); `NaN` when empty.
pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

/// `1.23 s` / `456 ms`.
pub fn secs(s: f64) -> String {
    if s >= 10.0 {
        format!("{s:.1} s")
    } else if s >= 1.0 {
        format!("{s:.2} s")
    } else {
        format!("{:.0} ms", s * 1e3)
    }
}

/// Bytes as MiB/GiB.
pub fn size(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.0} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

/// The samples, comma separated, for the details.
pub fn samples(v: &[f64], f: impl Fn(f64) -> String) -> String {
    v.iter().map(|x| f(*x)).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0]), 4.0);
        assert!(median(&[]).is_nan());
    }

    fn is_pass(v: &Verdict) -> bool {
        matches!(v, Verdict::Pass)
    }

    #[test]
    fn at_least_has_a_bar_and_a_goal() {
        assert!(is_pass(&at_least(0.85, 0.6, Some(0.8))));
        assert!(is_pass(&at_least(0.8, 0.6, Some(0.8))));
        match at_least(0.72, 0.6, Some(0.8)) {
            Verdict::PassBelowGoal(w) => assert_eq!(w, "0.72 against ≥ 0.8: 10 % short"),
            v => panic!("{v:?}"),
        }
        assert!(matches!(
            at_least(0.6, 0.6, Some(0.8)),
            Verdict::PassBelowGoal(_)
        ));
        match at_least(0.3, 0.6, Some(0.8)) {
            Verdict::Miss(w) => assert_eq!(w, "0.30 against ≥ 0.6: 50 % short"),
            v => panic!("{v:?}"),
        }
        assert!(is_pass(&at_least(31.0, 30.0, None)));
        assert!(matches!(at_least(29.9, 30.0, None), Verdict::Miss(_)));
        assert!(matches!(at_least(f64::NAN, 0.6, None), Verdict::Miss(_)));
    }

    #[test]
    fn at_most_is_a_limit() {
        assert!(is_pass(&at_most(0.5, 0.5)));
        assert!(is_pass(&at_most(0.45, 0.6)));
        match at_most(0.75, 0.6) {
            Verdict::Miss(w) => assert_eq!(w, "0.75 against ≤ 0.6: 25 % over"),
            v => panic!("{v:?}"),
        }
        assert!(matches!(at_most(f64::NAN, 0.6), Verdict::Miss(_)));
    }

    #[test]
    fn all_of_names_what_failed() {
        let both = all_of(&[
            ("speed", at_least(2.0, 1.5, None)),
            ("bytes", at_most(0.4, 0.5)),
        ]);
        assert!(is_pass(&both));
        match all_of(&[
            ("speed", at_least(1.2, 1.5, None)),
            ("bytes", at_most(0.4, 0.5)),
        ]) {
            Verdict::Miss(w) => assert_eq!(w, "speed: 1.20 against ≥ 1.5: 20 % short"),
            v => panic!("{v:?}"),
        }
        match all_of(&[
            ("speed", at_least(2.0, 1.5, None)),
            ("bytes", at_most(0.6, 0.5)),
        ]) {
            Verdict::Miss(w) => assert_eq!(w, "bytes: 0.60 against ≤ 0.5: 20 % over"),
            v => panic!("{v:?}"),
        }
        match all_of(&[
            ("speed", at_least(1.0, 1.5, None)),
            ("bytes", at_most(0.6, 0.5)),
        ]) {
            Verdict::Miss(w) => {
                assert!(w.starts_with("speed: 1.00 against ≥ 1.5"), "{w}");
                assert!(w.contains("; bytes: 0.60 against ≤ 0.5"), "{w}");
            }
            v => panic!("{v:?}"),
        }
        // A goal not reached stays a pass, named; a miss elsewhere wins over it.
        match all_of(&[
            ("ratio", at_least(0.75, 0.7, Some(0.9))),
            ("half", at_most(0.55, 0.6)),
        ]) {
            Verdict::PassBelowGoal(w) => assert!(w.starts_with("ratio: 0.75 against ≥ 0.9"), "{w}"),
            v => panic!("{v:?}"),
        }
        assert!(matches!(
            all_of(&[("ratio", at_least(0.75, 0.7, Some(0.9))), ("half", at_most(0.65, 0.6))]),
            Verdict::Miss(w) if w.starts_with("half: ")
        ));
        assert!(matches!(
            all_of(&[("a", Verdict::Pass), ("b", Verdict::Error("x".into()))]),
            Verdict::Error(e) if e == "b: x"
        ));
    }

    #[test]
    fn section_is_replaced_and_the_rest_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("B.md");
        write_section(&p, "first").expect("create");
        let t = std::fs::read_to_string(&p).expect("read");
        assert!(t.starts_with("# vmreplica benchmarks"));
        assert!(t.contains(&format!("{BEGIN}\nfirst\n{END}")));
        std::fs::write(&p, t.replace(END, &format!("{END}\n\nmaintainer text\n"))).expect("w");
        write_section(&p, "second").expect("replace");
        let t = std::fs::read_to_string(&p).expect("read");
        assert!(t.contains(&format!("{BEGIN}\nsecond\n{END}")));
        assert!(!t.contains("first"));
        assert!(t.contains("maintainer text"));
        assert!(t.contains("How to run"));
    }

    #[test]
    fn render_has_every_scenario() {
        let info = RunInfo {
            mode: "quick".into(),
            command: "vmr-bench --quick".into(),
            date: "d".into(),
            commit: "c".into(),
            machine: vec![("cores".into(), "2".into())],
            wall_secs: 1.0,
        };
        let mut a = Outcome::new(1, "one", "goal");
        a.verdict = Verdict::Miss("by 5 %".into());
        let b = Outcome::new(2, "two", "goal");
        let mut c = Outcome::new(3, "three", "≥ 0.6 (goal 0.8)");
        c.verdict = at_least(0.72, 0.6, Some(0.8));
        let md = render(&info, &[a, b, c]);
        assert!(md.contains("| 1 | one |"));
        assert!(md.contains("MISS (by 5 %)"));
        assert!(md.contains("**Skipped:** not run"));
        assert!(md.contains("| PASS (goal not reached: 0.72 against ≥ 0.8: 10 % short) |"));
        assert!(md.contains("**goal not reached:** 0.72 against ≥ 0.8"));
    }
}
