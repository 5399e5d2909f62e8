//! End-to-end checks of hostile or mistaken local use (issue 11): a second agent on a running
//! agent's directory, VMs whose UUIDs share a prefix, the replica's program allow-list, and
//! the authorization entries' revocation.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

const LONG: Duration = Duration::from_secs(90);

/// Every file under `dir` (but the agent's log, which the test does not own) with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir").flatten() {
            let p = e.path();
            let ft = e.file_type().expect("file type");
            if ft.is_dir() {
                todo.push(p);
            } else if ft.is_file() && p.file_name().is_some_and(|n| n != "agent.log") {
                out.insert(p.clone(), std::fs::read(&p).expect("read"));
            }
        }
    }
    out
}

#[test]
fn a_second_agent_on_the_same_dir_fails_fast_and_changes_nothing() -> TestResult {
    let p = Pair::new(exe())?;
    let vm = StandIn::create(p.root.path(), &p.a, "web1", &["disk0"], 32)?;
    vm.register(&p.a)?;
    p.enable("web1", &["--frequency", "5s"])?;
    p.wait_cycle("web1", 2, LONG)?;
    p.a.ok(&["pause", "web1"])?;
    let last = p.a.status("web1")?.last_cycle.unwrap_or(0);
    p.b.wait_cycle("web1", last, LONG)?;

    // A layer the replica's recovery would delete as a stray (as it deleted a running
    // agent's in-progress layers): a second agent must not get that far.
    let disk_dir =
        p.b.storage()
            .join("vms")
            .join(vm.def.uuid.to_string())
            .join("disks")
            .join("disk0");
    assert!(disk_dir.is_dir(), "{}", disk_dir.display());
    let pending = disk_dir.join("c999999.qcow2");
    std::fs::write(&pending, b"in progress")?;
    let before = snapshot(&p.b.dir);

    let started = Instant::now();
    let out = p.b.cli(&["agent"])?;
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "exit code; stderr: {stderr}");
    assert!(
        stderr.contains("already serves") && stderr.contains(&format!("pid {}", p.b.pid())),
        "{stderr}"
    );
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert_eq!(snapshot(&p.b.dir), before, "the second agent changed files");
    assert!(pending.exists());

    // The first agent keeps replicating.
    std::fs::remove_file(&pending)?;
    vm.write_random("disk0", 50, 3)?;
    p.a.ok(&["resume", "web1"])?;
    p.wait_cycle("web1", last + 2, LONG)?;
    assert_equal_at_cut(&p, &vm)?;
    Ok(())
}

#[test]
fn two_vms_whose_uuids_share_their_first_8_hex_digits_replicate_side_by_side() -> TestResult {
    let p = Pair::new(exe())?;
    let u1 = uuid::Uuid::new_v4();
    let mut bytes = *u1.as_bytes();
    bytes[15] ^= 0xff;
    let u2 = uuid::Uuid::from_bytes(bytes);
    assert_eq!(u1.simple().to_string()[..8], u2.simple().to_string()[..8]);
    let disks = [StandInDisk::new("disk0", 32 << 20)];
    let root = p.root.path();
    let vms = [
        StandIn::start_with_uuid(&root.join("vm-a"), &p.a.dir, "vma", &disks, u1)?,
        StandIn::start_with_uuid(&root.join("vm-b"), &p.a.dir, "vmb", &disks, u2)?,
    ];
    for (i, vm) in vms.iter().enumerate() {
        vm.write_random("disk0", 100, i as u64 + 1)?;
        vm.register(&p.a)?;
    }
    for vm in &vms {
        p.enable(vm.name(), &["--frequency", "5s"])?;
    }
    // Both change and ship at once, cycle after cycle.
    for round in 0..3u64 {
        for (i, vm) in vms.iter().enumerate() {
            vm.write_random("disk0", 40, 10 * round + i as u64)?;
        }
        for vm in &vms {
            let next = p.a.status(vm.name())?.last_cycle.unwrap_or(0) + 1;
            p.wait_cycle(vm.name(), next, LONG)?;
        }
    }
    for vm in &vms {
        assert_equal_at_cut(&p, vm)?;
        let st = p.a.status(vm.name())?;
        assert_eq!(st.stats.errors, 0, "{}: {st:?}", vm.name());
    }
    Ok(())
}

#[test]
fn the_replica_starts_only_programs_on_its_allow_list() -> TestResult {
    let p = Pair::new(exe())?;
    let root = p.root.path();
    // A primary (or its stolen key) registers a VM whose definition runs a shell.
    let mut evil = StandIn::create(root, &p.a, "evil", &["disk0"], 16)?;
    let marker = root.join("ran");
    evil.def.program = "/bin/sh".to_owned();
    evil.def.args = vec![
        "-c".to_owned(),
        format!("touch {}", marker.display()),
        "{qmp}".to_owned(),
    ];
    std::fs::write(&evil.launch, evil.def.to_toml())?;
    evil.register(&p.a)?;
    let good = StandIn::create(root, &p.a, "good", &["disk0"], 16)?;
    good.register(&p.a)?;
    for vm in [&evil, &good] {
        p.enable(vm.name(), &["--frequency", "5s"])?;
        p.wait_cycle(vm.name(), 1, LONG)?;
    }

    // The replica shows what a failover would run, and whether it may.
    let st = p.b.status("evil")?;
    let f = st.failover_program.expect("replica VM");
    assert_eq!(f.program, "/bin/sh");
    assert!(f.refused.is_some_and(|r| r.contains("allowed-programs")));
    assert!(p.b.ok(&["measure", "evil"])?.contains("/bin/sh (REFUSED"));
    let f = p.b.status("good")?.failover_program.expect("replica VM");
    assert_eq!(
        (f.program.as_str(), f.refused),
        ("qemu-storage-daemon", None)
    );
    assert!(
        p.b.ok(&["measure", "good"])?
            .contains("qemu-storage-daemon (allowed)")
    );
    assert!(p.a.status("good")?.failover_program.is_none());

    for op in ["test", "start"] {
        let before = p.b.status("evil")?.state;
        let out =
            p.b.cli(&["failover", op, "evil", "--force"][..if op == "start" { 4 } else { 3 }])?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{op}: {stderr}");
        assert!(
            stderr.contains("\"/bin/sh\"")
                && stderr.contains("allowed-programs")
                && stderr.contains("config.toml"),
            "{op}: {stderr}"
        );
        assert!(!marker.exists(), "{op}: the shell ran");
        assert_eq!(p.b.status("evil")?.state, before, "{op} changed the state");
    }

    // An allowed program runs, and the output shows what runs.
    let out = p.b.ok(&["failover", "test", "good"])?;
    assert!(
        out.contains("runs: ") && out.contains("qemu-storage-daemon"),
        "{out}"
    );
    p.b.ok(&["failover", "stop-test", "good"])?;
    Ok(())
}

/// `fp` (`SHA256:<hex>`) as `openssl x509 -fingerprint -sha256` prints it: upper case, pairs
/// separated by `:`.
fn openssl_style(fp: &str) -> String {
    let hex = fp.trim_start_matches("SHA256:").to_ascii_uppercase();
    hex.as_bytes()
        .chunks(2)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join(":")
}

#[test]
fn authorization_entries_are_validated_revoked_and_removed() -> TestResult {
    let p = Pair::new(exe())?;
    let code = |out: &std::process::Output| out.status.code();
    let err = |out: &std::process::Output| String::from_utf8_lossy(&out.stderr).into_owned();

    // Fingerprints that can never match are refused (exit 2).
    for bad in ["abc", "SHA256:xyz", &format!("{}0", p.a.fingerprint)] {
        let out =
            p.b.cli(&["server", "allow", "--primary", "x", "--fingerprint", bad])?;
        assert_eq!(code(&out), Some(2), "{bad}: {}", err(&out));
        assert!(
            err(&out).contains("is not a certificate fingerprint"),
            "{}",
            err(&out)
        );
    }
    // A duplicate (the same certificate in another spelling) is a clear error (exit 5).
    let out = p.b.cli(&[
        "server",
        "allow",
        "--primary",
        "other",
        "--fingerprint",
        &openssl_style(&p.a.fingerprint),
    ])?;
    assert_eq!(code(&out), Some(5), "{}", err(&out));
    assert!(
        err(&out).contains("already authorized for primary \"host-a\"")
            && !err(&out).contains("UNIQUE"),
        "{}",
        err(&out)
    );

    let vm = StandIn::create(p.root.path(), &p.a, "web1", &["disk0"], 16)?;
    vm.register(&p.a)?;
    p.enable("web1", &["--frequency", "5s"])?;
    p.wait_cycle("web1", 2, LONG)?;

    // Revoked: effective at once, on the connection the primary already holds.
    let errors = p.a.status("web1")?.stats.errors;
    let msg = p.b.ok(&["server", "deny", "--primary", "host-a"])?;
    assert!(msg.contains("revoked"), "{msg}");
    assert!(p.b.ok(&["server", "show"])?.contains("(revoked)"));
    vm.write_random("disk0", 20, 5)?;
    // The refusal is fatal: the primary stops in Error, a state that starts no cycle as time
    // passes (`vmr-core` `idle_states_start_nothing_as_time_passes`), so nothing more can
    // reach the replica until `resume`, and no sleep is needed to see that.
    p.a.wait_status(
        "web1",
        LONG,
        Duration::from_millis(100),
        "a refused cycle",
        |s| s.stats.errors > errors && s.state == vmr_proto::api::ReplicationState::Error,
    )?;
    let held = p.b.status("web1")?.last_cycle;

    // Its replica VM keeps the entry's storage: removing the entry is refused (exit 5).
    let out = p.b.cli(&["server", "remove", "--primary", "host-a"])?;
    assert_eq!(code(&out), Some(5), "{}", err(&out));
    assert!(
        err(&out).contains("web1") && err(&out).contains("server deny"),
        "{}",
        err(&out)
    );
    let out = p.b.cli(&["server", "deny", "--primary", "nobody"])?;
    assert_eq!(code(&out), Some(4), "{}", err(&out));

    // Allowed again (in openssl's spelling, normalised): replication resumes.
    p.b.ok(&[
        "server",
        "allow",
        "--primary",
        "host-a",
        "--fingerprint",
        &openssl_style(&p.a.fingerprint),
    ])?;
    let show = p.b.ok(&["server", "show"])?;
    assert!(
        show.contains(&p.a.fingerprint) && !show.contains("(revoked)"),
        "{show}"
    );
    let _ = p.a.cli(&["resume", "web1"])?;
    let next = held.unwrap_or(0) + 1;
    p.b.wait_cycle("web1", next, LONG)?;

    // An entry no VM needs is deleted.
    let other = format!("SHA256:{}", "ab".repeat(32));
    p.b.ok(&[
        "server",
        "allow",
        "--primary",
        "host-c",
        "--fingerprint",
        &other,
    ])?;
    p.b.ok(&["server", "remove", "--primary", "host-c"])?;
    assert!(!p.b.ok(&["server", "show"])?.contains("host-c"));
    let out = p.b.cli(&["server", "remove", "--primary", "host-c"])?;
    assert_eq!(code(&out), Some(4), "{}", err(&out));
    Ok(())
}

#[test]
fn private_files_bounded_requests_and_clear_start_errors() -> TestResult {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::fs::PermissionsExt;
    let root = TestDir::temp("vmr-e2e-")?;
    let a = Agent::start(exe(), root.path(), "host-a")?;
    let mode =
        |p: PathBuf| -> TestResult<u32> { Ok(std::fs::metadata(&p)?.permissions().mode() & 0o777) };
    for f in ["config.toml", "state.db", "agent.key"] {
        assert_eq!(mode(a.dir.join(f))?, 0o600, "{f}");
    }

    // A 2 MiB control line without a newline: a clear error, and the agent keeps serving.
    let mut s = std::os::unix::net::UnixStream::connect(a.dir.join("agent.sock"))?;
    let junk = vec![b'x'; 2 << 20];
    // The agent may close the socket before the whole line is written.
    let _ = s.write_all(&junk);
    let mut answer = String::new();
    BufReader::new(&s).read_line(&mut answer)?;
    assert!(
        answer.contains("longer than 1048576 bytes") && answer.contains("\"code\":2"),
        "{answer}"
    );
    a.statuses(None)?;

    // VM names that would break the status table are refused at `vm add` (exit 2).
    let launch = a.dir.join("config.toml").display().to_string();
    for bad in ["two\nlines", &"n".repeat(4096), "bell\u{7}"] {
        let out = a.cli(&[
            "vm",
            "add",
            bad,
            "--qmp",
            "/nowhere.qmp",
            "--launch",
            &launch,
        ])?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("bad VM name"), "{stderr}");
    }

    // A second agent directory: an exposed key is refused, a taken port is named.
    let dir = root.path().join("host-c");
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = taken.local_addr()?.to_string();
    let run = |args: &[&str]| {
        std::process::Command::new(exe())
            .arg("--dir")
            .arg(&dir)
            .args(args)
            .output()
    };
    assert!(
        run(&["init", "--name", "host-c", "--listen", &addr])?
            .status
            .success()
    );
    let key = dir.join("agent.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644))?;
    let out = run(&["agent"])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("chmod 600"), "{stderr}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
    let out = run(&["agent"])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot bind {addr}: ")),
        "{stderr}"
    );
    assert!(!stderr.contains("connection to"), "{stderr}");
    drop(taken);
    Ok(())
}

#[test]
fn an_agent_dir_too_long_for_the_nbd_socket_still_replicates() -> TestResult {
    let tmp = TestDir::temp("vmr-e2e-")?;
    // Agent directories of 80 bytes, whatever the temp dir: work/<32 hex>/vmr-<8 hex>-nbd.sock
    // under them exceeds 107 bytes, their control socket (agent.sock) does not.
    let pad = 80usize
        .saturating_sub(tmp.path().as_os_str().len() + "/host-a".len() + 1)
        .max(1);
    let root = TestDir::given(&tmp.path().join("d".repeat(pad)))?;
    let p = Pair::in_dir(exe(), root)?;
    let sock = nbd_socket(&p.a.dir, uuid::Uuid::nil());
    assert!(!sock.starts_with(&p.a.dir) && sock.as_os_str().len() <= 107);
    let vm = StandIn::create(p.root.path(), &p.a, "long1", &["disk0"], 16)?;
    vm.write_random("disk0", 50, 1)?;
    vm.register(&p.a)?;
    p.enable("long1", &["--frequency", "5s"])?;
    p.wait_cycle("long1", 2, LONG)?;
    assert_equal_at_cut(&p, &vm)?;
    Ok(())
}

#[test]
fn a_vm_whose_qemu_serves_nbd_at_the_old_path_keeps_replicating() -> TestResult {
    let p = Pair::new(exe())?;
    let mut vm = StandIn::create(p.root.path(), &p.a, "old1", &["disk0"], 16)?;
    // As an agent before issue 11 left it: the NBD server in the VM's QEMU at
    // work/<first 8 hex>/vmr-<first 8 hex>-nbd.sock (QEMU runs one NBD server only).
    let tag = &vm.def.uuid.simple().to_string()[..8];
    vm.nbd =
        p.a.dir
            .join("work")
            .join(tag)
            .join(format!("vmr-{tag}-nbd.sock"));
    vm.start()?;
    vm.write_random("disk0", 50, 1)?;
    vm.register(&p.a)?;
    p.enable("old1", &["--frequency", "5s"])?;
    p.wait_cycle("old1", 2, LONG)?;
    assert_equal_at_cut(&p, &vm)?;
    Ok(())
}
