//! The README's two-host walk-through, run as written: the fenced `sh` blocks between
//! `<!-- walkthrough:begin -->` and `<!-- walkthrough:end -->` become one bash script. Only
//! what the README declares as variables changes: the first block (the addresses, the port
//! and the VM directory) is replaced by this test's values (127.0.0.2 and 127.0.0.3, a free
//! port, a temp dir), and each block's `# on host A|B` line selects that host's agent
//! directory (`VMREPLICA_DIR`). Every other line runs as it stands, so the README cannot drift
//! from what works: the script checks the data itself (`qemu-io read -P` fails on a
//! mismatch) and stops at the first failing command.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The whole walk-through, agents' starts and the waits for replication included.
const LIMIT: Duration = Duration::from_secs(300);

/// The README's walk-through blocks: the text of each fenced `sh` block of the marked section.
fn walkthrough_blocks(readme: &str) -> Result<Vec<String>, String> {
    let begin = readme
        .find("<!-- walkthrough:begin -->")
        .ok_or("README.md has no <!-- walkthrough:begin --> marker")?;
    let end = readme
        .find("<!-- walkthrough:end -->")
        .ok_or("README.md has no <!-- walkthrough:end --> marker")?;
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in readme[begin..end].lines() {
        match (&mut current, line.trim_end()) {
            (None, "```sh") => current = Some(String::new()),
            (None, l) if l.starts_with("```") => {
                return Err(format!("a fenced block that is not `sh`: {l}"));
            }
            (Some(_), "```") => blocks.extend(current.take()),
            (Some(b), l) => {
                b.push_str(l);
                b.push('\n');
            }
            (None, _) => {}
        }
    }
    if current.is_some() {
        return Err("an unterminated fenced block".into());
    }
    Ok(blocks)
}

/// The variables the first block declares, in order.
fn declared(block: &str) -> Vec<String> {
    block
        .lines()
        .filter_map(|l| l.split_once('=').map(|(n, _)| n.trim().to_owned()))
        .collect()
}

/// A port free on both 127.0.0.2 and 127.0.0.3, kept from other users (the harness's
/// [`vmr_testkit::harness::free_port`]: outside the ephemeral range, reserved by a lock).
fn free_port() -> TestResult<u16> {
    for _ in 0..20 {
        let port = vmr_testkit::harness::free_port()?;
        if std::net::TcpListener::bind(("127.0.0.2", port)).is_ok()
            && std::net::TcpListener::bind(("127.0.0.3", port)).is_ok()
        {
            return Ok(port);
        }
    }
    Err("no port free on both 127.0.0.2 and 127.0.0.3".into())
}

/// The script: the test's values for the declared variables, then every other block, each
/// run with its host's agent directory.
fn script(blocks: &[String], root: &Path, port: u16) -> Result<String, String> {
    let (vars, rest) = blocks.split_first().ok_or("no blocks")?;
    let names = declared(vars);
    if names != ["A", "B", "PORT", "VMS"] {
        return Err(format!(
            "the first block declares {names:?}, the test sets A, B, PORT, VMS"
        ));
    }
    let bin = exe().parent().ok_or("the binary has no directory")?;
    let mut s = format!(
        "set -euo pipefail\nexport PATH={}:$PATH\nA=127.0.0.2\nB=127.0.0.3\nPORT={port}\nVMS={}\n",
        bin.display(),
        root.join("vms").display()
    );
    for (i, b) in rest.iter().enumerate() {
        let mut lines = b.lines();
        let host = match lines.next().map(str::trim) {
            Some("# on host A") => "a",
            Some("# on host B") => "b",
            other => {
                return Err(format!(
                    "block {} does not start with `# on host A|B`: {other:?}",
                    i + 2
                ));
            }
        };
        s.push_str(&format!(
            "echo '+++ block {} on host {host}'\nexport VMREPLICA_DIR={}\n",
            i + 2,
            root.join(host).display()
        ));
        for l in lines {
            s.push_str(l);
            s.push('\n');
        }
    }
    s.push_str("echo '+++ walk-through done'\n");
    Ok(s)
}

#[test]
fn the_readme_walkthrough_runs_as_written() -> TestResult {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md"))?;
    let blocks = walkthrough_blocks(&readme)?;
    let root = TestDir::temp("vmr-walk")?;
    let script = script(&blocks, root.path(), free_port()?)?;
    let file = root.path().join("walkthrough.sh");
    std::fs::write(&file, &script)?;
    let log_path = root.path().join("walkthrough.log");
    let log = std::fs::File::create(&log_path)?;
    let started = Instant::now();
    let mut child = {
        use std::os::unix::process::CommandExt;
        Command::new("bash")
            .arg(&file)
            .current_dir(root.path())
            .env_remove("VMREPLICA_DIR")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group: the agents it starts in the background end with it.
            .process_group(0)
            .spawn()?
    };
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break Some(st);
        }
        if started.elapsed() > LIMIT {
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    // The walk-through ends with `reverse` on host A (failover ping-pong): host B is the
    // replica again.
    let again = status.filter(|s| s.success()).map(|_| {
        Command::new(exe())
            .env("VMREPLICA_DIR", root.path().join("b"))
            .args(["status", "web1"])
            .output()
    });
    let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
    let _ = child.wait();
    let mut out = String::new();
    std::fs::File::open(&log_path)?.read_to_string(&mut out)?;
    let shown = tail(&out, 120);
    match status {
        None => panic!("the walk-through did not end within {LIMIT:?}:\n{shown}"),
        Some(st) => assert!(
            st.success() && out.contains("+++ walk-through done"),
            "the walk-through failed ({st}):\n{shown}"
        ),
    }
    eprintln!("walk-through ran in {:?}", started.elapsed());
    if let Some(st) = again {
        let st = String::from_utf8_lossy(&st?.stdout).into_owned();
        assert!(
            st.lines()
                .any(|l| l.starts_with("web1") && l.contains("Replicating")),
            "{st}"
        );
    }
    Ok(())
}

#[test]
fn the_walkthrough_extraction_finds_every_block_and_refuses_other_fences() {
    let md = "x\n<!-- walkthrough:begin -->\n```sh\nA=1\n```\ntext\n```sh\n# on host A\necho hi\n```\n<!-- walkthrough:end -->\n```sh\nnot this\n```\n";
    let b = walkthrough_blocks(md).expect("blocks");
    assert_eq!(b, vec!["A=1\n".to_owned(), "# on host A\necho hi\n".into()]);
    let bad = "<!-- walkthrough:begin -->\n```toml\nx\n```\n<!-- walkthrough:end -->";
    assert!(walkthrough_blocks(bad).is_err());
    let s = script(
        &[
            "A=1\nB=2\nPORT=3\nVMS=/v\n".into(),
            "# on host B\necho hi\n".into(),
        ],
        Path::new("/r"),
        9,
    )
    .expect("script");
    assert!(s.contains("PORT=9\n") && s.contains("export VMREPLICA_DIR=/r/b\necho hi\n"));
    assert!(script(&["A=1\n".into()], Path::new("/r"), 9).is_err());
    assert!(
        script(
            &["A=1\nB=2\nPORT=3\nVMS=/v\n".into(), "echo no host\n".into()],
            Path::new("/r"),
            9
        )
        .is_err()
    );
}
