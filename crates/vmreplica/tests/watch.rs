//! End-to-end tests of the live view and of following long operations, with two real agents
//! and a qemu-storage-daemon stand-in VM: `status --watch` without a terminal prints one plain
//! snapshot per interval while an initial copy runs (its percentage grows, then the lag shows);
//! `start-initial --wait` and `resume --resync --wait` print progress lines and end with exit
//! code 0, a failing initial copy (`enable --initial existing --wait` with nothing to compare
//! with) with 1; on a pseudo-terminal (util-linux `script`) the view redraws in 80 columns and
//! gives the terminal back on Ctrl-C.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use vmr_proto::api::ReplicationState;

const LONG: Duration = Duration::from_secs(120);

/// Percentages (`12.5%`) found in `text`.
fn percentages(text: &str) -> Vec<f64> {
    text.split_whitespace()
        .filter_map(|w| w.strip_suffix('%'))
        .filter_map(|n| n.parse().ok())
        .collect()
}

#[test]
fn watch_snapshots_and_waited_operations() -> TestResult {
    let p = Pair::new(exe())?;
    let vm = StandIn::create(p.root.path(), &p.a, "wv1", &["disk0"], 64)?;
    // 32 MiB of data in 4 MiB pieces, each held 700 ms by the test hook: a copy of ~6 s.
    vm.write_seq("disk0", 0, 512, 3)?;
    std::fs::write(p.a.dir.join("test-copy-slow-ms"), "700").expect("test hook");
    vm.register(&p.a)?;
    p.enable(
        "wv1",
        &["--frequency", "5s", "--initial-at", "2099-01-01T00:00:00Z"],
    )?;

    // The view, without a terminal, 80 columns.
    let mut watch = Command::new(exe())
        .arg("--dir")
        .arg(&p.a.dir)
        .args(["status", "--watch", "--interval", "1s"])
        .env("COLUMNS", "80")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let (tx, rx) = mpsc::channel::<String>();
    let out = watch.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        // One block per interval, ended by an empty line.
        let mut block = String::new();
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if line.is_empty() {
                if tx.send(std::mem::take(&mut block)).is_err() {
                    break;
                }
            } else {
                block.push_str(&line);
                block.push('\n');
            }
        }
    });
    let first = rx.recv_timeout(Duration::from_secs(20))?;
    assert!(
        first.contains("wv1") && first.contains("ReadyForInitial"),
        "{first}"
    );

    // The copy, waited for: plain progress lines, then the final line; exit code 0.
    let started = Instant::now();
    let out = p.a.cli(&["start-initial", "wv1", "--wait"])?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!(
        "start-initial --wait took {:?}:\n{text}{}",
        started.elapsed(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(text.contains("wv1: initial replication done"), "{text}");
    let pcts = percentages(&text);
    assert!(pcts.len() >= 2, "progress lines: {text}");
    assert!(pcts.windows(2).all(|w| w[0] <= w[1]), "{pcts:?}");
    assert!(text.contains("ETA"), "{text}");
    assert!(
        !text.contains('\x1b'),
        "no escape codes without a terminal: {text:?}"
    );
    assert_eq!(p.state("wv1")?, ReplicationState::Replicating);

    // The snapshots taken meanwhile, and one after the copy showing a lag.
    let mut blocks = vec![first];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let b = rx.recv_timeout(Duration::from_secs(20))?;
        let done = b.contains("Replicating");
        blocks.push(b);
        if done {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no Replicating snapshot: {blocks:?}"
        );
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(watch.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )?;
    let status = wait_exit(&mut watch, Duration::from_secs(10))?;
    let _ = reader.join();
    let mut err = String::new();
    if let Some(mut e) = watch.stderr.take() {
        e.read_to_string(&mut err)?;
    }
    assert_eq!(status.code(), Some(0), "watch exit: {err}");
    let all = blocks.join("\n");
    eprintln!("{all}");
    for l in all.lines() {
        assert!(
            l.chars().count() <= 80,
            "{} columns: {l:?}",
            l.chars().count()
        );
        assert!(!l.contains('\x1b'), "{l:?}");
    }
    let copying: Vec<f64> = blocks
        .iter()
        .filter(|b| b.contains("InitialReplicationIn") || b.contains("InitialInProgress"))
        .filter_map(|b| percentages(b).first().copied())
        .collect();
    assert!(
        copying.len() >= 3,
        "3 snapshots of the running copy with a percentage: {all}"
    );
    assert!(copying.windows(2).all(|w| w[0] <= w[1]), "{copying:?}");
    assert!(
        copying.last() > copying.first(),
        "the progress grows: {copying:?}"
    );
    let last = blocks.last().expect("a block");
    let row = last
        .lines()
        .find(|l| l.starts_with("wv1"))
        .expect("the VM's row");
    // Lag: the time since the last point, in seconds.
    let lag = row
        .split_whitespace()
        .find(|w| w.ends_with('s') && w[..w.len() - 1].parse::<u64>().is_ok());
    assert!(lag.is_some(), "a lag in {row:?}");
    assert!(
        last.lines().nth(1).is_some_and(|h| h.contains("LAG")),
        "{last}"
    );

    // A resync, waited for: differing blocks held 30 ms each by the resync's hook.
    std::fs::remove_file(p.a.dir.join("test-copy-slow-ms")).expect("hook");
    std::fs::write(p.a.dir.join("test-resync-slow-ms"), "30").expect("test hook");
    p.a.ok(&["pause", "wv1"])?;
    vm.write_seq("disk0", 600, 64, 4)?;
    let out = p.a.cli(&["resume", "wv1", "--resync", "--wait"])?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(text.contains("wv1: resynchronization done"), "{text}");
    assert_eq!(p.state("wv1")?, ReplicationState::Replicating);
    Ok(())
}

/// Wait for `child` to exit, killing it after `limit`.
fn wait_exit(
    child: &mut std::process::Child,
    limit: Duration,
) -> TestResult<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(s);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            return Err(format!("pid {} did not exit within {limit:?}", child.id()).into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn waiting_for_a_failing_initial_copy_exits_1_and_for_an_export_0() -> TestResult {
    let p = Pair::new(exe())?;
    let vm = StandIn::create(p.root.path(), &p.a, "wv2", &["disk0"], 16)?;
    vm.register(&p.a)?;
    // `--initial existing` with no copy on the replica: the initial replication stops in Error.
    let out = p.a.cli(&[
        "enable",
        "wv2",
        "--replica",
        &p.b.addr,
        "--replica-fingerprint",
        &p.b.fingerprint,
        "--frequency",
        "5s",
        "--initial",
        "existing",
        "--wait",
    ])?;
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("{}{err}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(err.contains("stopped in state Error"), "{err}");
    assert!(
        err.contains("vmreplica import"),
        "the reason says what to do: {err}"
    );

    // An export to a directory, waited for: it ends with where the copy is and what to run.
    let vm = StandIn::create(p.root.path(), &p.a, "wv4", &["disk0"], 16)?;
    vm.write_seq("disk0", 0, 64, 6)?;
    vm.register(&p.a)?;
    let dir = p.root.path().join("export-wv4");
    std::fs::create_dir_all(&dir)?;
    let out = p.a.cli(&[
        "enable",
        "wv4",
        "--replica",
        &p.b.addr,
        "--replica-fingerprint",
        &p.b.fingerprint,
        "--frequency",
        "5s",
        "--initial",
        &format!("export:{}", dir.display()),
        "--wait",
    ])?;
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        text.contains("wv4: initial copy exported to") && text.contains("vmreplica import wv4"),
        "{text}"
    );
    assert!(dir.join(vmr_proto::api::EXPORT_MANIFEST).exists());
    Ok(())
}

/// What the view wrote to the pseudo-terminal, split into frames, each line without its
/// erase sequences.
fn frames(raw: &str) -> Vec<Vec<String>> {
    raw.split("\x1b[H")
        .skip(1)
        .map(|f| {
            // The terminal turns each "\n" into "\r\n".
            f.split('\n')
                .map(|l| {
                    l.trim_end_matches('\r')
                        .replace("\x1b[K", "")
                        .replace("\x1b[J", "")
                        .replace("\x1b[?25h\x1b[?1049l", "")
                })
                .filter(|l| !l.is_empty())
                .collect()
        })
        .collect()
}

/// Run `cmd` on a pseudo-terminal of 80 × 24 (util-linux `script`) until what it wrote
/// satisfies `until`, then type Ctrl-C; its exit status and everything it wrote.
fn on_terminal(
    cmd: &str,
    until: impl Fn(&str) -> bool,
) -> TestResult<(std::process::ExitStatus, String)> {
    let cmd = format!("stty cols 80 rows 24; exec {cmd}");
    let mut child = Command::new("script")
        .args(["-q", "-e", "-c", &cmd, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().expect("stdin");
    let mut out = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut raw = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !until(&String::from_utf8_lossy(&raw)) {
        assert!(
            Instant::now() < deadline,
            "not seen on the terminal: {:?}",
            String::from_utf8_lossy(&raw)
        );
        if let Ok(b) = rx.recv_timeout(Duration::from_millis(500)) {
            raw.extend(b);
        }
    }
    // Ctrl-C typed on the terminal.
    stdin.write_all(b"\x03")?;
    stdin.flush()?;
    let status = wait_exit(&mut child, Duration::from_secs(10))?;
    drop(stdin);
    let _ = reader.join();
    while let Ok(b) = rx.try_recv() {
        raw.extend(b);
    }
    Ok((status, String::from_utf8_lossy(&raw).into_owned()))
}

#[test]
fn a_progress_bar_on_a_terminal_detaches_on_ctrl_c() -> TestResult {
    let p = Pair::new(exe())?;
    let vm = StandIn::create(p.root.path(), &p.a, "wv3", &["disk0"], 64)?;
    vm.write_seq("disk0", 0, 512, 5)?;
    std::fs::write(p.a.dir.join("test-copy-slow-ms"), "500").expect("test hook");
    vm.register(&p.a)?;
    p.enable(
        "wv3",
        &["--frequency", "5s", "--initial-at", "2099-01-01T00:00:00Z"],
    )?;
    // The bar shows a percentage of the copy; Ctrl-C then detaches.
    let (status, raw) = on_terminal(
        &format!(
            "{} --dir {} start-initial wv3",
            exe().display(),
            p.a.dir.display()
        ),
        |raw| raw.contains("wv3 initial replication") && raw.contains("MiB/64.00 MiB"),
    )?;
    eprintln!("{raw:?}");
    assert_eq!(status.code(), Some(0), "{raw:?}");
    assert!(
        raw.contains("ReadyForInitialReplication -> InitialReplicationInProgress"),
        "{raw:?}"
    );
    assert!(
        raw.contains("detached at ")
            && raw.contains("%: the initial replication of wv3 goes on in the agent")
            && raw.contains("vmreplica status wv3 --watch"),
        "{raw:?}"
    );
    // It went on.
    std::fs::remove_file(p.a.dir.join("test-copy-slow-ms")).expect("hook");
    wait_until(LONG, "the detached copy to end", || {
        Ok(p.state("wv3")? == ReplicationState::Replicating)
    })?;
    Ok(())
}

#[test]
fn watch_on_a_terminal_fits_80_columns_and_restores_it() -> TestResult {
    let p = Pair::new(exe())?;
    let vm = StandIn::create(
        p.root.path(),
        &p.a,
        "long-vm-name-for-the-view-28",
        &["disk0"],
        16,
    )?;
    vm.register(&p.a)?;
    p.enable("long-vm-name-for-the-view-28", &["--frequency", "5s"])?;
    p.wait_cycle("long-vm-name-for-the-view-28", 1, LONG)?;
    let (status, raw) = on_terminal(
        &format!(
            "{} --dir {} status --watch --interval 200ms",
            exe().display(),
            p.a.dir.display()
        ),
        |raw| raw.matches("\x1b[H").count() >= 4,
    )?;
    assert_eq!(status.code(), Some(0), "{raw:?}");
    assert!(
        raw.contains("\x1b[?1049h\x1b[?25l"),
        "the alternate screen: {raw:?}"
    );
    assert!(
        raw.trim_end_matches(['\r', '\n'])
            .ends_with("\x1b[?25h\x1b[?1049l"),
        "the terminal given back last: {raw:?}"
    );
    let frames = frames(&raw);
    assert!(frames.len() >= 3, "{raw:?}");
    for f in &frames {
        for l in f {
            assert!(
                l.chars().count() < 80,
                "{} columns: {l:?}",
                l.chars().count()
            );
        }
    }
    let shown = frames
        .iter()
        .find(|f| f.iter().any(|l| l.starts_with("NAME")))
        .expect("a table frame");
    eprintln!("{}", shown.join("\n"));
    assert!(
        shown.iter().any(|l| l.starts_with("long-vm-name-for")),
        "{shown:?}"
    );
    assert!(shown.iter().any(|l| l.contains("Replicating")), "{shown:?}");
    Ok(())
}

#[test]
fn watch_rides_out_an_agent_that_goes_away() -> TestResult {
    let root = TestDir::temp("vmr-watch-gone")?;
    let mut a = Agent::start(exe(), root.path(), "solo")?;
    let mut watch = Command::new(exe())
        .arg("--dir")
        .arg(&a.dir)
        .args(["status", "--watch", "--interval", "200ms"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let (tx, rx) = mpsc::channel::<String>();
    let out = watch.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut block = String::new();
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if line.is_empty() {
                if tx.send(std::mem::take(&mut block)).is_err() {
                    break;
                }
            } else {
                block.push_str(&line);
                block.push('\n');
            }
        }
    });
    let next = |what: &str| -> TestResult<String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let b = rx.recv_timeout(Duration::from_secs(10))?;
            if b.contains(what) {
                return Ok(b);
            }
            assert!(
                Instant::now() < deadline,
                "no block with {what:?}; last {b}"
            );
        }
    };
    next("no VMs")?;
    // The agent stops: the view says so and keeps asking; back again, the table returns.
    a.stop()?;
    let gone = next("retrying: ")?;
    assert!(gone.contains("cannot reach the vmreplica agent"), "{gone}");
    a.restart()?;
    next("no VMs")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(watch.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )?;
    let status = wait_exit(&mut watch, Duration::from_secs(10))?;
    let _ = reader.join();
    assert_eq!(status.code(), Some(0));
    Ok(())
}
