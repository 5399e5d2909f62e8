//! End-to-end lifecycle commands of an administrator, with real agents and a
//! qemu-storage-daemon stand-in VM: `vm remove` and `vm set` (refused while replication is
//! enabled, with the reason and the command to run first; confirmed on a terminal, `--yes`
//! without one).

mod common;

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;
use vmr_proto::api::ReplicationState;

const LONG: Duration = Duration::from_secs(90);

fn code(o: &Output) -> Option<i32> {
    o.status.code()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Run `vmreplica --dir DIR ARGS` on a pseudo-terminal (util-linux `script`), typing `typed`.
fn on_terminal(agent: &Agent, args: &[&str], typed: &str) -> TestResult<Output> {
    let mut cmd = format!("{} --dir {}", exe().display(), agent.dir.display());
    for a in args {
        cmd.push(' ');
        cmd.push_str(a);
    }
    let mut child = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut i) = child.stdin.take() {
        use std::io::Write;
        i.write_all(typed.as_bytes())?;
    }
    Ok(child.wait_with_output()?)
}

#[test]
fn vm_remove_and_set_are_refused_while_enabled_and_confirmed() -> TestResult {
    let mut p = Pair::new(exe())?;
    let vm = StandIn::create(p.root.path(), &p.a, "adm-vm", &["disk0"], 16)?;
    let name = vm.def.name.clone();
    let qmp = vm.qmp.display().to_string();
    vm.register(&p.a)?;
    p.enable(&name, &["--frequency", "5s"])?;
    p.wait_cycle(&name, 1, LONG)?;

    // Refused while enabled, with the reason and the command to run first; the refusal comes
    // before any question (exit 5 also without --yes and without a terminal).
    for args in [
        vec!["vm", "remove", &name, "--yes"],
        vec!["vm", "remove", &name],
    ] {
        let r = p.a.cli(&args)?;
        assert_eq!(code(&r), Some(5), "{r:?}");
        let e = stderr(&r);
        assert!(e.contains("vmreplica disable adm-vm"), "{e}");
        assert!(e.contains("change tracking"), "{e}");
    }
    let r =
        p.a.cli(&["vm", "set", &name, "--qmp", "/nonexistent.qmp", "--yes"])?;
    assert_eq!(code(&r), Some(5), "{r:?}");
    assert!(stderr(&r).contains("QMP socket"), "{}", stderr(&r));
    let r = p.a.cli(&["vm", "set", &name, "--disk", "disk0", "--yes"])?;
    assert_eq!(code(&r), Some(5), "{r:?}");
    assert!(stderr(&r).contains("the replica holds"), "{}", stderr(&r));
    // On the replica, `vm remove` names `replica remove`.
    let r = p.b.cli(&["vm", "remove", &name, "--yes"])?;
    assert_eq!(code(&r), Some(5), "{r:?}");
    assert!(
        stderr(&r).contains("vmreplica replica remove adm-vm"),
        "{}",
        stderr(&r)
    );
    // Nothing changed: replication goes on.
    let next = p.a.status(&name)?.last_cycle.unwrap_or(0) + 1;
    p.wait_cycle(&name, next, LONG)?;

    p.a.ok(&["disable", &name])?;
    // Without a terminal and without --yes: refused (2), nothing removed.
    let r = p.a.cli(&["vm", "remove", &name])?;
    assert_eq!(code(&r), Some(2), "{r:?}");
    assert!(stderr(&r).contains("--yes"), "{}", stderr(&r));
    assert_eq!(p.a.status(&name)?.name, name);
    // A terminal: the question names what is about to happen; "n" cancels (1).
    let r = on_terminal(&p.a, &["vm", "remove", &name], "n\n")?;
    let shown = String::from_utf8_lossy(&r.stdout).into_owned();
    assert_eq!(code(&r), Some(1), "{shown}");
    assert!(
        shown.contains("About to unregister VM \"adm-vm\""),
        "{shown}"
    );
    assert!(shown.contains("cancelled"), "{shown}");
    assert_eq!(p.a.status(&name)?.name, name);

    // `vm set` while disabled: checked (a disk the definition lacks, another VM's UUID), kept
    // across a restart, shown in its answer.
    let r =
        p.a.cli(&["vm", "set", &name, "--disk", "nodisk", "--yes"])?;
    assert_eq!(code(&r), Some(2), "{r:?}");
    let other = p.root.path().join("other.toml");
    let toml = std::fs::read_to_string(&vm.launch)?
        .replace(&vm.def.uuid.to_string(), &uuid::Uuid::new_v4().to_string());
    std::fs::write(&other, toml)?;
    let r = p.a.cli(&[
        "vm",
        "set",
        &name,
        "--launch",
        &other.display().to_string(),
        "--yes",
    ])?;
    assert_eq!(code(&r), Some(2), "{r:?}");
    assert!(stderr(&r).contains("identity"), "{}", stderr(&r));
    let out =
        p.a.ok(&["vm", "set", &name, "--qmp", "/elsewhere/vm.qmp", "--yes"])?;
    assert!(
        out.contains(&format!("qmp {qmp} -> /elsewhere/vm.qmp")),
        "{out}"
    );
    p.a.restart()?;
    let r = on_terminal(&p.a, &["vm", "set", &name, "--qmp", &qmp], "y\n")?;
    let shown = String::from_utf8_lossy(&r.stdout).into_owned();
    assert_eq!(code(&r), Some(0), "{shown}");
    assert!(
        shown.contains(&format!("qmp /elsewhere/vm.qmp -> {qmp}")),
        "{shown}"
    );
    // Replication works again with the registration put back.
    p.enable(&name, &["--frequency", "5s", "--initial", "existing"])?;
    wait_until(LONG, "replication enabled again", || {
        let s = p.a.status(&name)?;
        Ok(s.state == ReplicationState::Replicating && s.last_cycle.is_some())
    })?;
    p.a.ok(&["disable", &name])?;

    // Removed with --yes; gone after a restart too; the same VM can be added again.
    let out = p.a.ok(&["vm", "remove", &name, "--yes"])?;
    assert!(out.contains("removed"), "{out}");
    let r = p.a.cli(&["status", &name])?;
    assert_eq!(code(&r), Some(4), "{r:?}");
    p.a.restart()?;
    let r = p.a.cli(&["status", &name])?;
    assert_eq!(code(&r), Some(4), "{r:?}");
    vm.register(&p.a)?;
    assert_eq!(p.a.status(&name)?.name, name);
    p.stop()?;
    Ok(())
}
