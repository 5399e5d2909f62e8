//! Progress of the long operations the CLI starts (`start-initial`, `resume --resync`,
//! `enable` when its initial copy or export starts at once): which commands
//! are followed, when a followed operation has ended and how (a pure verdict on the VM's
//! status), and how it is shown: an `indicatif` bar on a terminal, plain lines with `--wait`
//! otherwise. Ctrl-C detaches; the operation goes on in the agent. `vmreplica import`, which
//! waits for its answer, is shown while it waits ([`while_importing`]).

use std::path::Path;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use vmr_proto::api::{InitialMode, OperationKind, ReplicationState, VmStatus};

use crate::cli::Command;
use crate::exit;
use crate::util::{coded, fmt_bytes};
use crate::watch::{eta_secs, fmt_dur, fmt_rate, percent};

/// How often the agent is asked while following.
const POLL: Duration = Duration::from_millis(500);
/// Plain progress lines: at least this far apart, unless a 10 % step was crossed.
const PLAIN_EVERY: Duration = Duration::from_secs(5);
/// An agent unreachable this long ends the wait (exit code 3).
const GIVE_UP: Duration = Duration::from_secs(60);

/// What operation a command started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// An initial copy over the network (or of the differences, `--initial existing`).
    Initial,
    /// A resynchronization.
    Resync,
    /// An initial copy written to a directory (`enable --initial export:DIR`).
    Export,
}

impl Op {
    fn noun(self) -> &'static str {
        match self {
            Op::Initial => "initial replication",
            Op::Resync => "resynchronization",
            Op::Export => "export of the initial copy",
        }
    }
}

/// A command whose operation is followed after the agent accepted it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The VM.
    pub name: String,
    /// What runs.
    pub op: Op,
    /// `--wait`: follow also without a terminal.
    pub wait: bool,
    /// The relationship's replica (`--replica`): a VM that replicates to several replicas
    /// (fan-out) shows each relationship in its own row; `None` = the VM's own row.
    pub replica: Option<String>,
}

/// The row of the relationship to `replica` in a VM's status: the VM's own row when it names
/// that replica (or none is asked for), else its fan-out row of that replica; the VM's own row
/// when none matches (an agent without fan-out).
pub fn relationship_row(row: VmStatus, replica: Option<&str>) -> VmStatus {
    match replica {
        Some(r) if row.replica != r => match row.fanout.iter().position(|f| f.replica == r) {
            Some(i) => {
                let mut row = row;
                row.fanout.swap_remove(i)
            }
            None => row,
        },
        _ => row,
    }
}

impl Plan {
    /// The plan of `cmd`, if it starts a long operation at once.
    pub fn of(cmd: &Command) -> Option<Plan> {
        let plan = |name: &String, op, wait, replica: &Option<String>| {
            Some(Plan {
                name: name.clone(),
                op,
                wait,
                replica: replica.clone(),
            })
        };
        match cmd {
            Command::StartInitial {
                name,
                wait,
                replica,
            } => plan(name, Op::Initial, *wait, replica),
            Command::Resume {
                name,
                resync: true,
                at: None,
                wait,
                replica,
                ..
            } => plan(name, Op::Resync, *wait, replica),
            Command::Enable(e) if e.extended => None,
            Command::Enable(e) if e.initial_at.is_none() => {
                // A further relationship of a VM that replicates already has its own row.
                let replica = Some(e.replica.clone());
                match InitialMode::parse(&e.initial) {
                    Ok(InitialMode::Export { .. }) => plan(&e.name, Op::Export, e.wait, &replica),
                    Ok(_) => plan(&e.name, Op::Initial, e.wait, &replica),
                    Err(_) => None,
                }
            }
            _ => None,
        }
    }
}

/// Where a followed operation stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Still running (or about to).
    Running,
    /// Ended well: what to say.
    Done(String),
    /// Ended otherwise: why.
    Failed(String),
}

/// The verdict on `op` from the VM's status `s`.
pub fn verdict(op: Op, s: &VmStatus) -> Verdict {
    use ReplicationState as S;
    let why = || {
        let reason = if s.health_reason.is_empty() {
            String::new()
        } else {
            format!(": {}", s.health_reason)
        };
        Verdict::Failed(format!(
            "the {} of {} stopped in state {} ({}){reason}",
            op.noun(),
            s.name,
            s.state,
            s.health
        ))
    };
    match (op, s.state) {
        (Op::Initial | Op::Resync, S::Replicating) => Verdict::Done(format!(
            "{}: {} done; state Replicating, last point {}",
            s.name,
            op.noun(),
            s.last_cycle.map_or_else(|| "-".into(), |c| c.to_string())
        )),
        (Op::Export, S::Replicating) => Verdict::Done(format!(
            "{}: initial copy exported and already imported; state Replicating",
            s.name
        )),
        (Op::Export, S::InitialReplicationInProgress) if s.last_cycle.is_some() => {
            // The health reason says where the copy is and what to run on the replica.
            let r = &s.health_reason;
            let what = r
                .find("initial copy exported")
                .map_or(r.as_str(), |i| &r[i..]);
            Verdict::Done(format!("{}: {what}", s.name))
        }
        (
            Op::Initial | Op::Export,
            S::InitialReplicationInProgress | S::ReadyForInitialReplication,
        )
        | (Op::Resync, S::Resynchronizing) => Verdict::Running,
        _ => why(),
    }
}

/// Follow `plan` until its operation ends: a bar on stderr when `bar`, plain lines (on
/// stdout; on stderr with `--json`) otherwise. A failure is an error with exit code 1.
pub fn run(dir: &Path, plan: &Plan, bar: bool, json: bool) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let r = rt.block_on(follow(dir, plan, bar, json));
    rt.shutdown_timeout(Duration::from_millis(100));
    r
}

/// Run `f` (the blocking `import` request) while a thread asks the agent for the VM's
/// status and shows the import's progress: a bar on stderr when `bar`, else plain lines on
/// stderr once the import has run [`PLAIN_EVERY`] (every 10 % or [`PLAIN_EVERY`]), so a short
/// import prints nothing but its answer.
pub fn while_importing<T>(dir: &Path, name: &str, bar: bool, f: impl FnOnce() -> T) -> T {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let watcher = {
        let (dir, name, stop) = (dir.to_path_buf(), name.to_owned(), stop.clone());
        std::thread::spawn(move || show_import(&dir, &name, bar, &stop))
    };
    let r = f();
    stop.store(true, Ordering::Relaxed);
    let _ = watcher.join();
    r
}

/// The import's progress line for plain output.
fn import_line(name: &str, o: &vmr_proto::api::OperationProgress, rate: Option<f64>) -> String {
    let pct = percent(o.done, o.total).map_or_else(|| "-".into(), |p| format!("{p:.1}%"));
    format!(
        "{name}: import {pct} ({} of {}), {} written, {}, ETA {}",
        fmt_bytes(o.done),
        fmt_bytes(o.total),
        fmt_bytes(o.sent),
        rate.map_or_else(|| "-".into(), fmt_rate),
        rate.and_then(|r| eta_secs(o.done, o.total, r))
            .map_or_else(|| "-".into(), fmt_dur)
    )
}

fn show_import(dir: &Path, name: &str, bar: bool, stop: &std::sync::atomic::AtomicBool) {
    use std::sync::atomic::Ordering;
    let started = Instant::now();
    let pb = bar.then(|| {
        let pb = ProgressBar::new(0);
        pb.set_style(
            ProgressStyle::with_template("{spinner} {msg} {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        pb.set_message(format!("{name} importing"));
        pb.enable_steady_tick(Duration::from_millis(200));
        pb
    });
    let bar_style = ProgressStyle::with_template(
        "{msg} [{wide_bar}] {percent:>3}% {binary_bytes}/{binary_total_bytes} \
         {binary_bytes_per_sec} ETA {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("#>-");
    let mut rates = crate::watch::Rates::default();
    let mut last: Option<(Instant, u64)> = None;
    let req = vmr_proto::api::Request::Status {
        name: Some(name.to_owned()),
    };
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(POLL);
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let Ok(v) = crate::client::call_within(dir, &req, Some(POLL * 4)) else {
            continue;
        };
        let Ok(mut rows) = serde_json::from_value::<Vec<VmStatus>>(v) else {
            continue;
        };
        let Some(s) = (!rows.is_empty()).then(|| rows.swap_remove(0)) else {
            continue;
        };
        let Some(o) = s.operation.filter(|o| o.kind == OperationKind::Import) else {
            continue;
        };
        let r = rates.update(&s, crate::watch::now_ms());
        match &pb {
            Some(pb) if o.total > 0 => {
                if pb.length() != Some(o.total) {
                    pb.set_style(bar_style.clone());
                    pb.set_length(o.total);
                    pb.reset_eta();
                }
                pb.set_position(o.done);
            }
            Some(_) => {}
            None => {
                let step = percent(o.done, o.total).map_or(u64::MAX, |p| (p / 10.0) as u64);
                let due = started.elapsed() >= PLAIN_EVERY
                    && last.is_none_or(|(t, s)| t.elapsed() >= PLAIN_EVERY || s != step);
                if due {
                    eprintln!("{}", import_line(name, &o, r.op_rate));
                    last = Some((Instant::now(), step));
                }
            }
        }
    }
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
}

/// The plain progress line of `s` (whose operation runs) with its rate.
fn plain_line(plan: &Plan, s: &VmStatus, rate: Option<f64>) -> String {
    match s.operation {
        Some(o) => match percent(o.done, o.total) {
            Some(p) => format!(
                "{}: {} {p:.1}% ({} of {}), {}, ETA {}",
                s.name,
                o.kind,
                fmt_bytes(o.done),
                fmt_bytes(o.total),
                rate.map_or_else(|| "-".into(), fmt_rate),
                rate.and_then(|r| eta_secs(o.done, o.total, r))
                    .map_or_else(|| "-".into(), fmt_dur)
            ),
            None => format!("{}: {} {} sent", s.name, o.kind, fmt_bytes(o.sent)),
        },
        None => format!(
            "{}: {} {} ({}{}{})",
            s.name,
            plan.op.noun(),
            s.state,
            s.health,
            if s.health_reason.is_empty() { "" } else { ": " },
            s.health_reason
        ),
    }
}

async fn follow(dir: &Path, plan: &Plan, bar: bool, json: bool) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let started = Instant::now();
    // A spinner until the operation's total is known, then the bar.
    let bar_style = ProgressStyle::with_template(
        "{msg} [{wide_bar}] {percent:>3}% {binary_bytes}/{binary_total_bytes} \
         {binary_bytes_per_sec} ETA {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("#>-");
    let pb = bar.then(|| {
        let pb = ProgressBar::new(0);
        pb.set_style(
            ProgressStyle::with_template("{spinner} {msg} {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        pb.set_message(format!("{} {}", plan.name, plan.op.noun()));
        pb.enable_steady_tick(Duration::from_millis(200));
        pb
    });
    let say = |line: &str| {
        if json {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    };
    let mut rates = crate::watch::Rates::default();
    let mut last_line: Option<(Instant, u64)> = None;
    let mut unreachable_since: Option<Instant> = None;
    let mut ticks = tokio::time::interval(POLL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let outcome = loop {
        tokio::select! {
            _ = int.recv() => break None,
            _ = term.recv() => break None,
            _ = ticks.tick() => {}
        }
        let got = tokio::select! {
            _ = int.recv() => break None,
            _ = term.recv() => break None,
            r = crate::watch::sample(dir.to_path_buf(), Some(plan.name.clone())) => r,
        };
        let s = match got.and_then(|v| Ok(serde_json::from_value::<Vec<VmStatus>>(v)?)) {
            Ok(mut rows) if !rows.is_empty() => {
                unreachable_since = None;
                relationship_row(rows.swap_remove(0), plan.replica.as_deref())
            }
            Ok(_) => {
                break Some(Err(coded(
                    exit::NOT_FOUND,
                    format!("VM {:?} is gone", plan.name),
                )));
            }
            Err(e) if crate::util::exit_code(&e) == exit::NO_AGENT => {
                let since = *unreachable_since.get_or_insert_with(Instant::now);
                if since.elapsed() > GIVE_UP {
                    break Some(Err(e.context(format!(
                        "gave up following the {} of {}",
                        plan.op.noun(),
                        plan.name
                    ))));
                }
                match &pb {
                    Some(pb) => {
                        pb.set_message(format!("{} (agent unreachable, retrying)", plan.name))
                    }
                    None if last_line.is_none_or(|(t, _)| t.elapsed() >= PLAIN_EVERY) => {
                        say(&format!("{}: {e:#} (retrying)", plan.name));
                        last_line = Some((Instant::now(), u64::MAX));
                    }
                    None => {}
                }
                continue;
            }
            Err(e) => break Some(Err(e)),
        };
        let now = crate::watch::now_ms();
        let r = rates.update(&s, now);
        match verdict(plan.op, &s) {
            Verdict::Running => {}
            Verdict::Done(msg) => break Some(Ok(msg)),
            Verdict::Failed(msg) => break Some(Err(coded(exit::FAILURE, msg))),
        }
        if let Some(pb) = &pb {
            pb.set_message(format!("{} {}", plan.name, plan.op.noun()));
            if let Some(o) = s.operation
                && o.total > 0
            {
                if pb.length() != Some(o.total) {
                    pb.set_style(bar_style.clone());
                    pb.set_length(o.total);
                    pb.reset_eta();
                }
                pb.set_position(o.done);
            }
        } else {
            let step = s
                .operation
                .and_then(|o| percent(o.done, o.total))
                .map_or(u64::MAX, |p| (p / 10.0) as u64);
            let due = match last_line {
                None => true,
                Some((t, last_step)) => {
                    t.elapsed() >= PLAIN_EVERY || (step != u64::MAX && step != last_step)
                }
            };
            if due {
                say(&plain_line(plan, &s, r.op_rate));
                last_line = Some((Instant::now(), step));
            }
        }
    };
    let took = fmt_dur(started.elapsed().as_secs());
    match outcome {
        None => {
            let at = match &pb {
                Some(pb) => {
                    let at = pb
                        .length()
                        .filter(|l| *l > 0)
                        .and_then(|l| percent(pb.position(), l))
                        .map(|p| format!(" at {p:.1}%"))
                        .unwrap_or_default();
                    pb.finish_and_clear();
                    at
                }
                None => String::new(),
            };
            eprintln!(
                "detached{at}: the {} of {} goes on in the agent; watch it with `vmreplica status {} --watch`",
                plan.op.noun(),
                plan.name,
                plan.name
            );
            Ok(())
        }
        Some(Ok(msg)) => {
            if let Some(pb) = &pb {
                pb.finish_and_clear();
            }
            say(&format!("{msg} (followed {took})"));
            Ok(())
        }
        Some(Err(e)) => {
            if let Some(pb) = &pb {
                pb.finish_and_clear();
            }
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use vmr_proto::api::Health;

    fn status(state: ReplicationState, last_cycle: Option<u64>, reason: &str) -> VmStatus {
        serde_json::from_value(serde_json::json!({
            "name": "db1", "uuid": uuid::Uuid::nil(), "state": state, "health": Health::Normal,
            "health_reason": reason, "mode": "Primary", "frequency_secs": 30,
            "primary": "host-a", "replica": "127.0.0.1:1", "last_replication_ms": null,
            "last_cycle": last_cycle, "stats": vmr_proto::api::ReplicationStats::default(),
            "progress": null
        }))
        .expect("a status")
    }

    fn plan(args: &[&str]) -> Option<Plan> {
        let mut all = vec!["vmreplica"];
        all.extend_from_slice(args);
        Plan::of(
            &crate::cli::Cli::try_parse_from(all)
                .expect("parses")
                .command,
        )
    }

    #[test]
    fn which_commands_are_followed() {
        let en = [
            "enable",
            "db1",
            "--replica",
            "h:1",
            "--replica-fingerprint",
            "x",
        ];
        let p = |name: &str, op, wait| {
            Some(Plan {
                name: name.into(),
                op,
                wait,
                replica: None,
            })
        };
        let at = |plan: Option<Plan>, replica: &str| {
            plan.map(|mut p| {
                p.replica = Some(replica.into());
                p
            })
        };
        assert_eq!(
            plan(&["start-initial", "db1"]),
            p("db1", Op::Initial, false)
        );
        assert_eq!(
            plan(&["start-initial", "db1", "--wait"]),
            p("db1", Op::Initial, true)
        );
        assert_eq!(
            plan(&["resume", "db1", "--resync", "--wait"]),
            p("db1", Op::Resync, true)
        );
        assert_eq!(plan(&["resume", "db1"]), None);
        assert_eq!(
            plan(&["resume", "db1", "--resync", "--at", "2030-01-01T00:00:00Z"]),
            None
        );
        assert!(crate::cli::Cli::try_parse_from(["vmreplica", "resume", "db1", "--wait"]).is_err());
        assert_eq!(plan(&en), at(p("db1", Op::Initial, false), "h:1"));
        let mut ex = en.to_vec();
        ex.extend(["--initial", "export:/tmp/x", "--wait"]);
        assert_eq!(plan(&ex), at(p("db1", Op::Export, true), "h:1"));
        assert_eq!(
            plan(&["start-initial", "db1", "--replica", "c:1", "--wait"]),
            at(p("db1", Op::Initial, true), "c:1")
        );
        assert_eq!(
            plan(&["resume", "db1", "--resync", "--replica", "c:1"]),
            at(p("db1", Op::Resync, false), "c:1")
        );
        let mut later = en.to_vec();
        later.extend(["--initial-at", "2030-01-01T00:00:00Z"]);
        assert_eq!(plan(&later), None);
        assert_eq!(plan(&["status", "db1"]), None);
        assert_eq!(plan(&["import", "db1", "/tmp/x"]), None);
    }

    #[test]
    fn the_followed_row_is_the_relationships() {
        let mut row = status(ReplicationState::Replicating, Some(9), "");
        row.replica = "b:1".into();
        let mut c = status(ReplicationState::InitialReplicationInProgress, None, "");
        c.replica = "c:1".into();
        row.fanout = vec![c];
        let pick = |r: Option<&str>| relationship_row(row.clone(), r);
        assert_eq!(pick(None).replica, "b:1");
        assert_eq!(pick(Some("b:1")).replica, "b:1");
        let c = pick(Some("c:1"));
        assert_eq!(
            (c.replica.as_str(), c.state),
            ("c:1", ReplicationState::InitialReplicationInProgress)
        );
        // no such relationship (an older agent): the VM's row
        assert_eq!(pick(Some("d:1")).replica, "b:1");
    }

    #[test]
    fn verdicts() {
        use ReplicationState as S;
        let running = Verdict::Running;
        assert_eq!(
            verdict(
                Op::Initial,
                &status(S::InitialReplicationInProgress, None, "")
            ),
            running
        );
        assert_eq!(
            verdict(Op::Resync, &status(S::Resynchronizing, Some(3), "")),
            running
        );
        assert_eq!(
            verdict(
                Op::Export,
                &status(S::InitialReplicationInProgress, None, "")
            ),
            running
        );
        assert!(matches!(
            verdict(Op::Initial, &status(S::Replicating, Some(1), "")),
            Verdict::Done(m) if m.contains("last point 1")
        ));
        assert!(matches!(
            verdict(Op::Resync, &status(S::Replicating, Some(9), "")),
            Verdict::Done(_)
        ));
        let exported = status(
            S::InitialReplicationInProgress,
            Some(1),
            "initial replication is not complete; initial copy exported to /x: load it on the \
             replica with `vmreplica import db1 DIR`",
        );
        assert_eq!(
            verdict(Op::Export, &exported),
            Verdict::Done(
                "db1: initial copy exported to /x: load it on the replica with `vmreplica \
                 import db1 DIR`"
                    .into()
            )
        );
        for (op, st) in [
            (Op::Initial, S::Error),
            (Op::Initial, S::Suspended),
            (Op::Initial, S::WaitingForStartResynchronize),
            (Op::Resync, S::ResynchronizeSuspended),
            (Op::Resync, S::WaitingForStartResynchronize),
            (Op::Resync, S::Error),
            (Op::Export, S::Error),
            (Op::Initial, S::Disabled),
        ] {
            let v = verdict(op, &status(st, None, "the replica refused"));
            assert!(
                matches!(&v, Verdict::Failed(m) if m.contains(&st.to_string()) && m.contains("the replica refused")),
                "{op:?} {st}: {v:?}"
            );
        }
    }

    #[test]
    fn plain_lines() {
        let p = Plan {
            name: "db1".into(),
            op: Op::Initial,
            wait: true,
            replica: None,
        };
        let mut s = status(ReplicationState::InitialReplicationInProgress, None, "");
        assert_eq!(
            plain_line(&p, &s, None),
            "db1: initial replication InitialReplicationInProgress (Normal)"
        );
        s.operation = Some(vmr_proto::api::OperationProgress {
            kind: vmr_proto::api::OperationKind::InitialCopy,
            done: 1 << 30,
            total: 4 << 30,
            sent: 1 << 29,
            started_ms: 0,
        });
        assert_eq!(
            plain_line(&p, &s, Some((32u64 << 20) as f64)),
            "db1: initial copy 25.0% (1.0 GiB of 4.0 GiB), 32.0 MiB/s, ETA 1m36s"
        );
    }
}
