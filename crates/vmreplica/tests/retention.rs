//! Grid retention (issue 17 part 1) with real agents and a stand-in VM: `enable --retain` at
//! a 5 s frequency with 10-second and one-minute periods keeps exactly the points the policy
//! names (checked against the test's own reading of the policy, over every point the replica
//! showed), `points` gives each point's reasons, `points --estimate` says what another policy
//! would keep without applying it, and `set --retain` on the primary reaches the replica and
//! takes effect at its next prune; `status --json` shows the policy on both sides.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use vmr_proto::api::{PointInfo, VmStatus};

const LONG: Duration = Duration::from_secs(90);

fn points(b: &Agent, vm: &str, extra: &[&str]) -> Result<Vec<PointInfo>> {
    let mut args = vec!["points", vm];
    args.extend_from_slice(extra);
    serde_json::from_str(&b.json(&args)?).map_err(|e| HarnessError::Io {
        what: format!("parsing `points {vm}`: {e}"),
        source: std::io::Error::other(e),
    })
}

/// The test's reading of `10s=3,1min=2`: the latest point, and for each rule the last point
/// of each of the N most recent periods (epoch-aligned) that hold a point; the reasons in
/// the order `latest`, then the rules as given.
fn expected(seen: &BTreeMap<u64, u64>) -> BTreeMap<u64, Vec<String>> {
    let mut keep: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    let Some((&latest, _)) = seen.iter().max_by_key(|(id, t)| (**t, **id)) else {
        return keep;
    };
    keep.entry(latest).or_default().push("latest".into());
    for (name, len, n) in [("10s", 10_000u64, 3usize), ("1min", 60_000, 2)] {
        // period -> (time, id) of its last point
        let mut last: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
        for (&id, &t) in seen {
            let e = last.entry(t / len).or_insert((t, id));
            if (t, id) > *e {
                *e = (t, id);
            }
        }
        for (rank, (_, (_, id))) in last.iter().rev().take(n).enumerate() {
            keep.entry(*id)
                .or_default()
                .push(format!("{name} #{}", rank + 1));
        }
    }
    keep
}

#[test]
fn grid_keeps_the_expected_points_and_changes_at_run_time() -> TestResult {
    let p = Pair::new(exe())?;
    let vm = StandIn::create(p.root.path(), &p.a, "ret1", &["disk0"], 16)?;
    vm.write_random("disk0", 20, 7)?;
    vm.register(&p.a)?;

    // Usage errors change nothing: an ambiguous unit, both forms at once.
    for (args, says) in [
        (vec!["--retain", "1m=2"], "ambiguous"),
        (
            vec!["--retain", "10s=3", "--recovery-points", "2"],
            "--recovery-points",
        ),
    ] {
        let mut all = vec![
            "enable",
            "ret1",
            "--replica",
            &p.b.addr,
            "--replica-fingerprint",
            &p.b.fingerprint,
        ];
        all.extend_from_slice(&args);
        let out = p.a.cli(&all)?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }

    p.enable("ret1", &["--frequency", "5s", "--retain", "10s=3,1min=2"])?;
    let grid = serde_json::json!({"hourly": 0, "app-consistent-every-hours": null,
        "grid": {"rules": ["10s=3", "1min=2"], "prefer-app-consistent": false}});
    for agent in [&p.a, &p.b] {
        let st: serde_json::Value = serde_json::from_str(&agent.json(&["status", "ret1"])?)?;
        assert_eq!(st[0]["retention"], grid, "{st}");
    }

    // Every point the replica shows (each is the latest for a whole cycle, so none is
    // missed; a missed one would be a dropped one, which changes nothing below), until the
    // points span four 10-second periods.
    let mut seen: BTreeMap<u64, u64> = BTreeMap::new();
    let mut last = Vec::new();
    wait_until(LONG, "points over four 10 s periods", || {
        let pts = points(&p.b, "ret1", &[])?;
        for pt in &pts {
            seen.insert(pt.id, pt.time_ms);
        }
        let periods: std::collections::BTreeSet<u64> = seen.values().map(|t| t / 10_000).collect();
        last = pts;
        Ok(periods.len() >= 4)
    })?;
    let want = expected(&seen);
    let got: BTreeMap<u64, Vec<String>> = last
        .iter()
        .map(|pt| (pt.id, pt.kept_because.clone()))
        .collect();
    assert_eq!(got, want, "seen {seen:?}");
    assert!(seen.len() > got.len(), "nothing was pruned: seen {seen:?}");
    assert!(last.iter().all(|pt| pt.size_bytes > 0), "{last:?}");

    // What `1min=1` would keep: only the latest point, at the cost of all of them; the
    // estimate applies nothing.
    let est = points(&p.b, "ret1", &["--estimate", "--retain", "1min=1"])?;
    let latest = est.iter().map(|pt| pt.id).max().ok_or("no points")?;
    let total: u64 = est.iter().map(|pt| pt.size_bytes).sum();
    for pt in &est {
        if pt.id == latest {
            assert_eq!(pt.kept_because, vec!["latest", "1min #1"], "{est:?}");
            assert_eq!(pt.estimated_bytes, Some(total), "{est:?}");
        } else {
            assert!(
                pt.kept_because.is_empty() && pt.estimated_bytes.is_none(),
                "{est:?}"
            );
        }
    }
    assert!(est.len() > 1, "{est:?}");
    let text =
        p.b.ok(&["points", "ret1", "--estimate", "--retain", "1min=1"])?;
    assert!(
        text.contains(&format!("keeps 1 of {} points", est.len())),
        "{text}"
    );
    let now = points(&p.b, "ret1", &[])?;
    assert!(
        now.len() > 1 && now.iter().all(|pt| !pt.kept_because.is_empty()),
        "{now:?}"
    );

    // At run time, from the primary: the replica has it at once (its points show what the
    // next prune drops) and applies it at that prune. Paused meanwhile, so that no cycle
    // lands between the change and the look at what it will drop.
    p.a.ok(&["pause", "ret1"])?;
    let out = p.a.ok(&["set", "ret1", "--retain", "1min=1"])?;
    assert!(out.contains("1min=1"), "{out}");
    let st: serde_json::Value = serde_json::from_str(&p.b.json(&["status", "ret1"])?)?;
    assert_eq!(
        st[0]["retention"]["grid"]["rules"],
        serde_json::json!(["1min=1"]),
        "{st}"
    );
    let before = points(&p.b, "ret1", &[])?;
    let top = before.iter().map(|pt| pt.id).max().ok_or("no points")?;
    assert!(
        before.iter().any(|pt| pt.kept_because.is_empty()),
        "nothing marked for the next prune: {before:?}"
    );
    let text = p.b.ok(&["points", "ret1"])?;
    assert!(text.contains("(pruned next)"), "{text}");
    p.a.ok(&["resume", "ret1"])?;
    let mut after = Vec::new();
    wait_until(LONG, "the next point, pruned by the new policy", || {
        after = points(&p.b, "ret1", &[])?;
        Ok(after.iter().any(|pt| pt.id > top))
    })?;
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(
        after[0].kept_because,
        vec!["latest", "1min #1"],
        "{after:?}"
    );
    let st: serde_json::Value = serde_json::from_str(&p.a.json(&["status", "ret1"])?)?;
    assert_eq!(
        st[0]["retention"]["grid"]["rules"],
        serde_json::json!(["1min=1"]),
        "{st}"
    );

    // Back to Hyper-V's form: exclusive with a grid in one `set`.
    let out =
        p.a.cli(&["set", "ret1", "--retain", "1h=2", "--recovery-points", "2"])?;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    p.a.ok(&["set", "ret1", "--recovery-points", "3"])?;
    let st: serde_json::Value = serde_json::from_str(&p.b.json(&["status", "ret1"])?)?;
    assert_eq!(st[0]["retention"]["hourly"], 3, "{st}");
    assert!(st[0]["retention"].get("grid").is_none(), "{st}");
    Ok(())
}

/// A replica step held at one of the store's test gates, and the replica's `status` asked
/// while it was held.
struct Held {
    p: Pair,
    vm: StandIn,
    /// The point (prune) or cycle (commit) the store held.
    id: u64,
    status: VmStatus,
}

/// A pair whose replica holds the step `step` (`PRUNE`, `COMMIT`) at the store's test gate
/// named by `var`; VM `name` (one 16 MiB disk) enabled at 5 s; `status` of the replica asked
/// while the first such step is held, then the gate opened.
fn status_while_held(var: &str, step: &str, name: &str) -> TestResult<Held> {
    let mut p = Pair::new(exe())?;
    let gate = p.root.path().join("gate");
    p.b.set_env(var, &gate.display().to_string());
    p.b.restart()?;
    let vm = StandIn::create(p.root.path(), &p.a, name, &["disk0"], 16)?;
    vm.write_random("disk0", 20, 7)?;
    vm.register(&p.a)?;
    p.enable(name, &["--frequency", "5s"])?;
    let waits = format!("{step} WAITS ");
    let mut held = None;
    wait_until(LONG, &format!("{step} held at the gate"), || {
        held =
            p.b.log()
                .lines()
                .find_map(|l| l.strip_prefix(waits.as_str())?.trim().parse::<u64>().ok());
        Ok(held.is_some())
    })?;
    let id = held.expect("seen");

    // Asked from a thread: an owner that waited for the held step would never answer, and
    // the gate opens either way so that the agent can stop.
    let (tx, rx) = std::sync::mpsc::channel();
    let answered = std::thread::scope(|s| {
        s.spawn(|| {
            let _ = tx.send(p.b.status(name));
        });
        let r = rx.recv_timeout(LONG);
        std::fs::write(&gate, b"").expect("open the gate");
        r
    });
    let status = answered.map_err(|_| HarnessError::Io {
        what: format!("the replica's status while {step} was held"),
        source: std::io::Error::other("no answer while the step was held"),
    })??;
    Ok(Held { p, vm, id, status })
}

/// The prune that follows a cycle runs beside the VM's owner on the replica: while a merge
/// runs (held at the store's test gate), `status` answers at once and shows the new point,
/// without the point being merged; the cycles that must wait for the merge go on once it
/// ends, and `points` lists what retention kept.
#[test]
fn status_answers_while_the_replica_merges_a_point() -> TestResult {
    // The default retention keeps the latest point only: the second point drops the first.
    // `_vm` keeps the stand-in VM running to the end.
    let Held {
        p,
        vm: _vm,
        id: merging,
        status: st,
    } = status_while_held("VMR_STORE_TEST_PRUNE_GATE", "PRUNE", "merge1")?;
    let latest = st.last_cycle.unwrap_or(0);
    assert!(latest > merging, "latest {latest}, merging {merging}");
    assert_eq!(st.recovery_points, Some(1), "{st:?}");

    // The merge ends; the next cycles come in and each drops the one before.
    p.wait_cycle("merge1", latest + 2, LONG)?;
    wait_until(LONG, "the points before the latest merged away", || {
        let pts = points(&p.b, "merge1", &[])?;
        Ok(pts.len() == 1 && pts[0].id >= latest + 2)
    })?;
    Ok(())
}

/// The commit of a received cycle (flush, fsync, catalog rename) runs beside the VM's owner
/// on the replica: while it is held at the store's test gate, `status` answers at once (the
/// metrics' deadline is 2 s, and the fsync of a large layer can take longer) and does not show
/// the point yet; once the gate opens the cycle is acknowledged and the next ones follow.
#[test]
fn status_answers_while_the_replica_commits_a_cycle() -> TestResult {
    let Held {
        p,
        vm,
        id: held,
        status: st,
    } = status_while_held("VMR_STORE_TEST_COMMIT_GATE", "COMMIT", "commit1")?;
    assert!(
        st.last_cycle.is_none_or(|c| c < held),
        "the held cycle {held} shows before its commit: {st:?}"
    );

    p.wait_cycle("commit1", held + 1, LONG)?;
    let st = p.b.status("commit1")?;
    assert!(st.last_cycle.unwrap_or(0) > held, "{st:?}");
    assert_equal_at_cut(&p, &vm)?;
    Ok(())
}
