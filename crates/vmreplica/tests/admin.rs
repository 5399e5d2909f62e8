//! End-to-end lifecycle commands of an administrator, with real agents and a
//! qemu-storage-daemon stand-in VM: `vm remove` and `vm set` (refused while replication is
//! enabled, with the reason and the command to run first; confirmed on a terminal, `--yes`
//! without one) and `replica remove [--keep-data]` on the replica.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

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

    // The guest agent socket is not part of the registration: `vm set --qga` is allowed while
    // replication runs, without a question, shown by `vm list`, and cleared by `--no-qga`;
    // on the replica (where the agent sets it itself for a failed-over VM) it is refused.
    let qga_of = |a: &Agent| -> TestResult<Option<String>> {
        let list: Vec<vmr_proto::api::VmEntry> =
            serde_json::from_str(&a.ok(&["vm", "list", "--json"])?)?;
        Ok(list
            .into_iter()
            .find(|e| e.name == name)
            .and_then(|e| e.qga))
    };
    assert_eq!(qga_of(&p.a)?, None);
    let sock = p.root.path().join("adm-qga.sock").display().to_string();
    let out = p.a.ok(&["vm", "set", &name, "--qga", &sock])?;
    assert!(out.contains(&format!("guest agent socket {sock}")), "{out}");
    assert_eq!(qga_of(&p.a)?, Some(sock.clone()));
    assert!(p.a.ok(&["vm", "list"])?.contains(&format!("({sock})")));
    let long = format!("/{}.sock", "x".repeat(120));
    let r = p.a.cli(&["vm", "set", &name, "--qga", &long])?;
    assert_eq!(code(&r), Some(2), "{r:?}");
    let r = p.b.cli(&["vm", "set", &name, "--qga", &sock])?;
    assert_eq!(code(&r), Some(5), "{r:?}");
    let out = p.a.ok(&["vm", "set", &name, "--no-qga"])?;
    assert!(out.contains("no guest agent socket"), "{out}");
    assert_eq!(qga_of(&p.a)?, None);
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

#[test]
fn replica_remove_is_refused_while_it_would_break_something_and_keeps_data_on_request() -> TestResult
{
    let p = Pair::new(exe())?;
    let vm = StandIn::create(p.root.path(), &p.a, "rr-vm", &["disk0"], 16)?;
    let name = vm.def.name.clone();
    let data = p.b.storage().join("vms").join(vm.def.uuid.to_string());
    vm.register(&p.a)?;
    p.enable(&name, &["--frequency", "5s"])?;
    p.wait_cycle(&name, 1, LONG)?;
    vm.write_random("disk0", 40, 7)?;
    let next = p.a.status(&name)?.last_cycle.unwrap_or(0) + 1;
    p.wait_cycle(&name, next, LONG)?;

    // Active replication: refused with the reason and what to run first.
    let r = p.b.cli(&["replica", "remove", &name, "--yes"])?;
    assert_eq!(code(&r), Some(5), "{r:?}");
    assert!(
        stderr(&r).contains("active (Replicating)"),
        "{}",
        stderr(&r)
    );
    assert!(stderr(&r).contains("vmreplica disable"), "{}", stderr(&r));
    // On the primary it names `vm remove`.
    let r = p.a.cli(&["replica", "remove", &name, "--yes"])?;
    assert_eq!(code(&r), Some(5), "{r:?}");
    assert!(stderr(&r).contains("vm remove"), "{}", stderr(&r));

    // Paused here, but a test copy runs: refused until it is stopped.
    p.b.ok(&["pause", &name])?;
    p.b.ok(&["failover", "test", &name])?;
    let r = p.b.cli(&["replica", "remove", &name, "--yes"])?;
    assert_eq!(code(&r), Some(5), "{r:?}");
    assert!(stderr(&r).contains("rr-vm-test"), "{}", stderr(&r));
    assert!(stderr(&r).contains("stop-test"), "{}", stderr(&r));
    p.b.ok(&["failover", "stop-test", &name])?;

    // Without a terminal and without --yes: refused, nothing removed.
    let r = p.b.cli(&["replica", "remove", &name, "--keep-data"])?;
    assert_eq!(code(&r), Some(2), "{r:?}");
    assert_eq!(p.b.status(&name)?.name, name);
    // --keep-data: the record goes, the recovery points stay. (The primary's disable reaches
    // the paused replica VM: it shows Disabled.)
    let out = p.a.ok(&["disable", &name])?;
    assert!(out.contains("shows Disabled"), "{out}");
    assert_eq!(p.b.status(&name)?.state, ReplicationState::Disabled);
    let out =
        p.b.ok(&["replica", "remove", &name, "--keep-data", "--yes"])?;
    assert!(out.contains("stay in"), "{out}");
    assert_eq!(code(&p.b.cli(&["status", &name])?), Some(4));
    assert!(data.read_dir()?.next().is_some(), "the kept data is gone");
    // Enabling again starts from the kept points: only what changed meanwhile travels.
    vm.write_seq("disk0", 100, 4, 8)?;
    p.enable(&name, &["--frequency", "5s", "--initial", "existing"])?;
    wait_until(LONG, "replication from the kept points", || {
        let s = p.a.status(&name)?;
        Ok(s.state == ReplicationState::Replicating && s.last_cycle.is_some())
    })?;
    let sent = p.a.status(&name)?.stats.total_bytes;
    assert!(
        sent < 16 * 65536,
        "re-enable sent {sent} bytes for 4 changed blocks"
    );
    assert_equal_at_cut(&p, &vm)?;

    // Disabled on the primary (the replica hears of it), removed with its data.
    p.a.ok(&["disable", &name])?;
    let out = p.b.ok(&["replica", "remove", &name, "--yes"])?;
    assert!(out.contains("recovery point(s) removed"), "{out}");
    assert!(!data.exists(), "{} still exists", data.display());
    assert_eq!(code(&p.b.cli(&["status", &name])?), Some(4));
    // A fresh replica VM can be created again (a full initial copy).
    p.enable(&name, &["--frequency", "5s"])?;
    wait_until(LONG, "a new replica VM", || {
        Ok(p.b.status(&name).is_ok_and(|s| s.last_cycle.is_some()))
    })?;
    Ok(())
}

#[test]
fn disable_on_the_primary_tells_the_replica_also_when_it_comes_back_later() -> TestResult {
    let mut p = Pair::new(exe())?;
    let vm = StandIn::create(p.root.path(), &p.a, "dis-vm", &["disk0"], 16)?;
    let name = vm.def.name.clone();
    vm.register(&p.a)?;
    p.enable(&name, &["--frequency", "5s"])?;
    p.wait_cycle(&name, 1, LONG)?;
    assert_eq!(p.b.status(&name)?.state, ReplicationState::Replicating);

    let out = p.a.ok(&["disable", &name])?;
    assert!(out.contains("-> Disabled"), "{out}");
    assert!(out.contains("shows Disabled"), "{out}");
    assert_eq!(p.b.status(&name)?.state, ReplicationState::Disabled);
    // Enabled again: the replica replicates again from what it holds.
    p.enable(&name, &["--frequency", "5s", "--initial", "existing"])?;
    wait_until(LONG, "replication enabled again", || {
        let s = p.a.status(&name)?;
        Ok(s.state == ReplicationState::Replicating && s.last_cycle.is_some())
    })?;
    assert_eq!(p.b.status(&name)?.state, ReplicationState::Replicating);

    // An unreachable replica does not block the disable; it is told when it is back.
    p.b.stop()?;
    let t = Instant::now();
    let out = p.a.ok(&["disable", &name])?;
    let took = t.elapsed();
    assert!(took < Duration::from_secs(12), "disable took {took:?}");
    assert!(out.contains("-> Disabled"), "{out}");
    assert!(out.contains("could not be told"), "{out}");
    assert!(out.contains("vmreplica disable dis-vm"), "{out}");
    p.b.restart()?;
    wait_until(LONG, "the replica to hear of the disable", || {
        Ok(p.b.status(&name)?.state == ReplicationState::Disabled)
    })?;
    p.stop()?;
    Ok(())
}

#[test]
fn errors_and_lists_are_for_people() -> TestResult {
    let p = Pair::new(exe())?;
    let vm = StandIn::create(p.root.path(), &p.a, "err-vm", &["disk0"], 16)?;
    let name = vm.def.name.clone();
    vm.register(&p.a)?;

    // A primary the replica does not authorize is told what to run there.
    p.b.ok(&["server", "deny", "--primary", "host-a"])?;
    let r = p.a.cli(&[
        "enable",
        &name,
        "--replica",
        &p.b.addr,
        "--replica-fingerprint",
        &p.b.fingerprint,
    ])?;
    assert_eq!(code(&r), Some(5), "{r:?}");
    let want = format!(
        "run `vmreplica server allow --primary host-a --fingerprint {}` on the replica",
        p.a.fingerprint
    );
    assert!(stderr(&r).contains(&want), "{}", stderr(&r));
    p.b.allow(&p.a)?;
    p.enable(&name, &["--frequency", "5s"])?;
    p.wait_cycle(&name, 1, LONG)?;

    // The replica's status: the primary's frequency and address (it reports it with its
    // calls).
    wait_until(LONG, "the primary's address on the replica", || {
        Ok(p.b.status(&name)?.primary_address.is_some())
    })?;
    let st = p.b.status(&name)?;
    assert_eq!(st.frequency_secs, 5);
    assert_eq!(st.primary, "host-a");
    assert_eq!(st.primary_address.as_deref(), Some(p.a.addr.as_str()));
    let table = p.b.ok(&["status", &name])?;
    assert!(table.contains(&format!("host-a ({})", p.a.addr)), "{table}");
    assert!(table.contains("    5s "), "{table}");

    // `vm list`: the VMs registered here as primaries, not the status table.
    let list: Vec<vmr_proto::api::VmEntry> = serde_json::from_str(&p.a.json(&["vm", "list"])?)?;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].name, name);
    assert_eq!(list[0].uuid, vm.def.uuid);
    assert_eq!(list[0].qmp, vm.qmp.display().to_string());
    assert_eq!(list[0].disks, vec!["disk0".to_owned()]);
    assert_eq!(list[0].replica.as_deref(), Some(p.b.addr.as_str()));
    let table = p.a.ok(&["vm", "list"])?;
    assert!(
        table.starts_with("NAME") && table.contains("err-vm"),
        "{table}"
    );
    let on_replica: Vec<vmr_proto::api::VmEntry> =
        serde_json::from_str(&p.b.json(&["vm", "list"])?)?;
    assert!(on_replica.is_empty(), "{on_replica:?}");

    // A point the replica does not hold: named with the points it has, exit 4, nothing left.
    let points: Vec<u64> =
        serde_json::from_str::<Vec<vmr_proto::api::PointInfo>>(&p.b.json(&["points", &name])?)?
            .iter()
            .map(|x| x.id)
            .collect();
    let fo = p.b.dir.join("fo").join(vm.def.uuid.simple().to_string());
    for what in ["test", "start"] {
        let r = p.b.cli(
            &["failover", what, &name, "--point", "999", "--force"]
                [..if what == "test" { 5 } else { 6 }],
        )?;
        assert_eq!(code(&r), Some(4), "{r:?}");
        let listed = points
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        assert!(
            stderr(&r).contains(&format!(
                "VM \"err-vm\" has no recovery point 999 (points: {listed}"
            )),
            "{}",
            stderr(&r)
        );
        assert!(!fo.exists(), "{} was left behind", fo.display());
    }
    assert_eq!(p.b.status(&name)?.state, ReplicationState::Replicating);

    // `stop-test` says what it removed, not a running copy.
    p.b.ok(&["failover", "test", &name])?;
    let out = p.b.ok(&["failover", "stop-test", &name])?;
    assert!(
        out.contains("1 test copy stopped and deleted: err-vm-test"),
        "{out}"
    );
    assert!(!out.contains("qmp:") && !out.contains("disk:"), "{out}");
    Ok(())
}

/// `--json` stderr of a failed command: the one error object.
fn json_err(o: &Output) -> serde_json::Value {
    serde_json::from_str(stderr(o).trim()).unwrap_or_else(|e| panic!("{e}: {}", stderr(o)))
}

#[test]
fn json_output_has_one_shape_per_command_and_errors_are_json() -> TestResult {
    // init --json: an object with the fingerprint.
    let tmp = TestDir::temp("vmr-json-")?;
    let dir = tmp.path().join("agent");
    let out = Command::new(exe())
        .args(["--dir", &dir.display().to_string(), "--json", "init"])
        .args(["--name", "j1", "--listen", "127.0.0.1:0"])
        .output()?;
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v["name"], "j1");
    assert!(
        v["fingerprint"]
            .as_str()
            .is_some_and(|f| f.starts_with("SHA256:")),
        "{v}"
    );
    // No agent: exit 3, kind no-agent.
    let out = Command::new(exe())
        .args(["--dir", &dir.display().to_string(), "--json", "status"])
        .output()?;
    assert_eq!(code(&out), Some(3));
    assert_eq!(json_err(&out)["kind"], "no-agent");
    // A bad command line: exit 2, kind usage, as JSON too.
    let out = Command::new(exe())
        .args(["--json", "no-such-command"])
        .output()?;
    assert_eq!(code(&out), Some(2));
    let e = json_err(&out);
    assert_eq!(
        (e["exit_code"].as_i64(), e["kind"].as_str()),
        (Some(2), Some("usage"))
    );

    let p = Pair::new(exe())?;
    let vm = StandIn::create(p.root.path(), &p.a, "json-vm", &["disk0"], 16)?;
    let name = vm.def.name.clone();
    let v: serde_json::Value = serde_json::from_str(&p.a.json(&[
        "vm",
        "add",
        &name,
        "--qmp",
        &vm.qmp.display().to_string(),
        "--launch",
        &vm.launch.display().to_string(),
    ])?)?;
    assert!(
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("registered")),
        "{v}"
    );
    p.enable(&name, &["--frequency", "5s"])?;
    p.wait_cycle(&name, 1, LONG)?;
    // pause/resume: an object with the states.
    let v: serde_json::Value = serde_json::from_str(&p.a.json(&["pause", &name])?)?;
    assert_eq!(
        (v["name"].as_str(), v["from"].as_str(), v["to"].as_str()),
        (Some("json-vm"), Some("Replicating"), Some("Suspended")),
        "{v}"
    );
    let v: serde_json::Value = serde_json::from_str(&p.a.json(&["resume", &name])?)?;
    assert_eq!(v["to"], "Replicating", "{v}");
    // The text form prints the message.
    let out = p.a.ok(&["pause", &name])?;
    assert_eq!(out.trim(), "json-vm: Replicating -> Suspended");
    // Errors: the agent's code and its name.
    let r = p.a.cli(&["--json", "pause", &name])?;
    assert_eq!(code(&r), Some(5));
    let e = json_err(&r);
    assert_eq!(e["kind"], "invalid-state", "{e}");
    assert_eq!(e["exit_code"], 5, "{e}");
    assert!(
        e["error"].as_str().is_some_and(|m| m.contains("pause")),
        "{e}"
    );
    let r = p.a.cli(&["--json", "status", "nosuch"])?;
    assert_eq!(code(&r), Some(4));
    assert_eq!(json_err(&r)["kind"], "not-found");
    let r = p.a.cli(&[
        "--json",
        "enable",
        &name,
        "--replica",
        "x:1",
        "--replica-fingerprint",
        "y",
        "--frequency",
        "25h",
    ])?;
    assert_eq!(code(&r), Some(2));
    assert_eq!(json_err(&r)["kind"], "usage");
    Ok(())
}

#[test]
fn vm_add_registers_only_a_vm_that_is_there_and_takes_its_nbd_socket() -> TestResult {
    let p = Pair::new(exe())?;
    let mut vm = StandIn::create(p.root.path(), &p.a, "there", &["disk0"], 16)?;
    let name = vm.def.name.clone();
    let qmp = vm.qmp.display().to_string();
    let add = |qmp: &str, launch: &std::path::Path, extra: &[&str]| {
        let mut args = vec![
            "vm".to_owned(),
            "add".into(),
            name.clone(),
            "--qmp".into(),
            qmp.to_owned(),
            "--launch".into(),
            launch.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        p.a.cli(&args)
    };
    let registered = || -> TestResult<bool> {
        let v: serde_json::Value = serde_json::from_str(&p.a.json(&["vm", "list"])?)?;
        Ok(v.as_array().is_some_and(|a| !a.is_empty()))
    };
    // No VM answers at the QMP socket.
    let gone = p.root.path().join("nothing.qmp");
    let out = add(&gone.display().to_string(), &vm.launch, &[])?;
    assert_eq!(code(&out), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("does not answer"), "{}", stderr(&out));
    // A definition whose disk node the VM does not have: the error names the VM's nodes.
    let mut def = vm.def.clone();
    def.disks[0].node = "disk9".into();
    def.args = def
        .args
        .iter()
        .map(|a| a.replace("disk0", "disk9"))
        .collect();
    let wrong_node = p.root.path().join("wrong-node.toml");
    std::fs::write(&wrong_node, def.to_toml())?;
    let out = add(&qmp, &wrong_node, &[])?;
    assert_eq!(code(&out), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("\"disk9\" of the definition is not a block node")
            && stderr(&out).contains("disk0"),
        "{}",
        stderr(&out)
    );
    // A definition whose disk path is not what the VM opened.
    let mut def = vm.def.clone();
    def.disks[0].path = "/var/lib/elsewhere/disk0.qcow2".into();
    let wrong_path = p.root.path().join("wrong-path.toml");
    std::fs::write(&wrong_path, def.to_toml())?;
    let out = add(&qmp, &wrong_path, &[])?;
    assert_eq!(code(&out), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("the VM opens") && stderr(&out).contains("/var/lib/elsewhere"),
        "{}",
        stderr(&out)
    );
    // A relative or too long --nbd.
    let out = add(
        &qmp,
        &vm.launch,
        &["--nbd", &format!("/{}", "n".repeat(120))],
    )?;
    assert_eq!(code(&out), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("107 bytes"), "{}", stderr(&out));
    assert!(!registered()?, "a refused `vm add` registered the VM");

    // The stand-in serves its disks on a socket of the admin's choice; `--nbd` names it and
    // replication reads through it (without it the agent would try to start its own NBD
    // server in the daemon, which already has one).
    vm.stop()?;
    vm.nbd = p.root.path().join("there-nbd.sock");
    vm.start()?;
    let nbd = vm.nbd.display().to_string();
    let out = add(&qmp, &vm.launch, &["--nbd", &nbd])?;
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert!(registered()?);
    vm.write_random("disk0", 40, 3)?;
    p.enable(&name, &["--frequency", "5s"])?;
    p.wait_cycle(&name, 2, LONG)?;
    assert_equal_at_cut(&p, &vm)?;
    // The agent logs every admin action, with its arguments and outcome, and no query.
    let log = p.a.log();
    let actions: Vec<&str> = log.lines().filter(|l| l.contains("admin action")).collect();
    assert!(
        actions.iter().any(|l| l.contains("admin action failed")
            && l.contains(r#""op":"vm-add""#)
            && l.contains("does not answer")
            && l.contains("code=1")),
        "{actions:#?}"
    );
    assert!(
        actions.iter().any(|l| l.contains("admin action done")
            && l.contains(r#""op":"vm-add""#)
            && l.contains(&nbd)),
        "{actions:#?}"
    );
    assert!(
        actions.iter().any(|l| l.contains("admin action done")
            && l.contains(r#""op":"pause""#)
            && l.contains("there")),
        "{actions:#?}"
    );
    assert!(
        !actions
            .iter()
            .any(|l| l.contains(r#""op":"status""#) || l.contains("vm-list")),
        "{actions:#?}"
    );
    Ok(())
}
