//! Events and alerts end to end (issue 14, item 4): real agents replicating a stand-in VM
//! every 5 s (RPO alert: the default 10 s) with a webhook sink served by the test on
//! 127.0.0.1. A stopped primary agent, a cut link (a test-owned TCP proxy between the agents
//! that the test closes), a full replica store and a required resync each raise an alert at
//! the webhook within two intervals (10 s) of the fault; the command sink runs; a webhook that
//! never answers does not delay a cycle; `events --json` and `events --follow`.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use common::*;
use vmr_proto::api::{Health, ReplicationState};
use vmr_proto::event::{Event, EventKind};

const LONG: Duration = Duration::from_secs(90);
/// Two intervals of 5 s: the alert deadline the issue sets.
const TWO_INTERVALS: Duration = Duration::from_secs(10);
/// What delivering the alert may add (the webhook POST on a loaded 2-core machine).
const DELIVERY: Duration = Duration::from_secs(2);

/// What the webhook received: arrival time, event, request head.
type Received = Arc<(Mutex<Vec<(Instant, Event, String)>>, Condvar)>;

/// A webhook served by the test: every POST's event with its arrival time and headers.
struct Hook {
    url: String,
    got: Received,
    stop: Arc<AtomicBool>,
}

impl Hook {
    fn start() -> TestResult<Hook> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let url = format!("http://{}/hook", l.local_addr()?);
        let got: Received = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (g, s) = (got.clone(), stop.clone());
        std::thread::spawn(move || {
            for c in l.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(c) = c else { continue };
                let g = g.clone();
                std::thread::spawn(move || {
                    if let Some((head, e)) = read_post(c) {
                        let (m, cv) = &*g;
                        m.lock().expect("hook lock").push((Instant::now(), e, head));
                        cv.notify_all();
                    }
                });
            }
        });
        Ok(Hook { url, got, stop })
    }

    /// Wait for an event matching `f`; its arrival time and the event.
    fn wait(&self, what: &str, timeout: Duration, f: impl Fn(&Event) -> bool) -> (Instant, Event) {
        let (m, cv) = &*self.got;
        let deadline = Instant::now() + timeout;
        let mut g = m.lock().expect("hook lock");
        loop {
            if let Some((t, e, _)) = g.iter().find(|(_, e, _)| f(e)) {
                return (*t, e.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no {what} at the webhook within {timeout:?}; got: {:?}",
                g.iter()
                    .map(|(_, e, _)| format!("{} {} {}", e.host, e.kind, e.message))
                    .collect::<Vec<_>>()
            );
            g = cv.wait_timeout(g, left).expect("hook wait").0;
        }
    }

    fn events(&self) -> Vec<(Event, String)> {
        self.got
            .0
            .lock()
            .expect("hook lock")
            .iter()
            .map(|(_, e, h)| (e.clone(), h.clone()))
            .collect()
    }
}

impl Drop for Hook {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees the flag.
        if let Some(a) = self
            .url
            .strip_prefix("http://")
            .and_then(|u| u.split('/').next())
        {
            let _ = TcpStream::connect(a);
        }
    }
}

/// Read one HTTP/1.1 POST (headers, then Content-Length bytes), answer 200; the headers and
/// the parsed event.
fn read_post(mut c: TcpStream) -> Option<(String, Event)> {
    c.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut r = BufReader::new(c.try_clone().ok()?);
    let mut head = String::new();
    let mut len = 0usize;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().ok()?;
        }
        head.push_str(&line);
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).ok()?;
    c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        .ok()?;
    Some((head, serde_json::from_slice(&body).ok()?))
}

/// Add sinks to the agent's config (after the `[events]` table `init` wrote) and restart it.
fn configure(agent: &mut Agent, section: &str) -> TestResult {
    let path = agent.dir.join("config.toml");
    let mut text = std::fs::read_to_string(&path)?;
    assert!(
        text.contains("[events]"),
        "init writes the events table: {text}"
    );
    text.push('\n');
    text.push_str(section);
    std::fs::write(&path, text)?;
    agent.restart()?;
    Ok(())
}

fn webhook(url: &str) -> String {
    format!("[[events.webhook]]\nurl = \"{url}\"\nbearer-token = \"s3cret\"\nretries = 2\n")
}

fn is(e: &Event, kind: EventKind, host: &str, vm: &str) -> bool {
    e.kind == kind && e.host == host && e.vm.as_ref().is_some_and(|v| v.name == vm)
}

/// A pair replicating stand-in `name` every 5 s, cycle 2 applied.
fn replicating(p: &Pair, name: &str, to: Option<&str>) -> TestResult<StandIn> {
    let vm = StandIn::create(p.root.path(), &p.a, name, &["disk0"], 32)?;
    vm.write_random("disk0", 64, 1)?;
    vm.register(&p.a)?;
    match to {
        None => p.enable(name, &["--frequency", "5s"])?,
        Some(addr) => {
            p.a.ok(&[
                "enable",
                name,
                "--replica",
                addr,
                "--replica-fingerprint",
                &p.b.fingerprint,
                "--frequency",
                "5s",
            ])?;
        }
    }
    p.wait_cycle(name, 2, LONG)?;
    Ok(vm)
}

fn report(what: &str, took: Duration) {
    eprintln!("{what}: alert {:.1} s after the fault", took.as_secs_f64());
    assert!(
        took <= TWO_INTERVALS + DELIVERY,
        "{what}: the alert came {took:?} after the fault (two intervals: {TWO_INTERVALS:?})"
    );
}

#[test]
fn a_stopped_primary_raises_rpo_exceeded_on_the_replica() -> TestResult {
    let mut p = Pair::new(exe())?;
    let hook = Hook::start()?;
    configure(&mut p.b, &webhook(&hook.url))?;
    let vm = replicating(&p, "rpo1", None)?;
    let s = p.b.status("rpo1")?;
    assert_eq!(
        s.rpo_alert_secs,
        Some(10),
        "the default is twice the frequency"
    );
    assert!(s.lag_ms.is_some());

    let fault = Instant::now();
    p.a.kill9();
    let (at, e) = hook.wait("rpo-exceeded", LONG, |e| {
        is(e, EventKind::RpoExceeded, "host-b", "rpo1")
    });
    report("stopped primary", at - fault);
    assert_eq!(e.fields["rpo_ms"], 10_000);
    // The health reason names the event.
    let s = p.b.status("rpo1")?;
    assert_eq!(s.health, Health::Warning, "{}", s.health_reason);
    assert!(
        s.health_reason
            .contains("replica is behind its RPO alert of 10s by"),
        "{}",
        s.health_reason
    );
    assert!(
        s.health_reason.contains(&format!("(event {})", e.id)),
        "{}",
        s.health_reason
    );
    // The bearer token and the JSON body's version.
    let (_, head) = &hook.events()[0];
    assert!(
        head.to_ascii_lowercase()
            .contains("authorization: bearer s3cret"),
        "{head}"
    );
    assert_eq!(e.version, 1);

    // The primary is back: cycles arrive again and the alert clears.
    p.a.restart()?;
    let (_, rec) = hook.wait("rpo-recovered", LONG, |e| {
        is(e, EventKind::RpoRecovered, "host-b", "rpo1")
    });
    assert_eq!(rec.fields["alert"], e.id);
    p.b.wait_status(
        "rpo1",
        LONG,
        Duration::from_millis(200),
        "Normal health",
        |s| s.health == Health::Normal,
    )?;

    // `events --json`: one object per line, the alert among them; a table without.
    let out = p.b.json(&["events", "rpo1"])?;
    let events: Vec<Event> = out
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert!(
        events
            .iter()
            .any(|x| x.id == e.id && x.kind == EventKind::RpoExceeded)
    );
    assert!(
        events
            .iter()
            .all(|x| x.vm.as_ref().is_some_and(|v| v.name == "rpo1"))
    );
    let table = p.b.ok(&["events", "--since", "10m"])?;
    eprintln!("{table}");
    assert!(table.starts_with("    ID TIME"), "{table}");
    assert!(
        table.contains("rpo-exceeded") && table.contains("agent-started"),
        "{table}"
    );
    // An unknown VM is exit code 4 (not found).
    let bad = p.b.cli(&["events", "nope"])?;
    assert_eq!(bad.status.code(), Some(4), "{bad:?}");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown VM"));
    drop(vm);
    Ok(())
}

/// A TCP proxy owned by the test between the primary and the replica; `cut` closes every
/// connection and refuses new ones.
struct Proxy {
    addr: String,
    cut: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(upstream: &str) -> TestResult<Proxy> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let addr = l.local_addr()?.to_string();
        let cut = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (c2, k2, up) = (cut.clone(), conns.clone(), upstream.to_owned());
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(c) = c else { continue };
                if c2.load(Ordering::SeqCst) {
                    let _ = c.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(u) = TcpStream::connect(&up) else {
                    continue;
                };
                let mut k = k2.lock().expect("proxy lock");
                for s in [&c, &u] {
                    if let Ok(s) = s.try_clone() {
                        k.push(s);
                    }
                }
                for (mut from, mut to) in [
                    (c.try_clone(), u.try_clone()),
                    (u.try_clone(), c.try_clone()),
                ]
                .into_iter()
                .filter_map(|(a, b)| Some((a.ok()?, b.ok()?)))
                {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(Shutdown::Write);
                    });
                }
            }
        });
        Ok(Proxy { addr, cut, conns })
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for s in self.conns.lock().expect("proxy lock").drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

#[test]
fn a_cut_link_raises_rpo_exceeded_on_the_primary_and_runs_the_command_sink() -> TestResult {
    let mut p = Pair::new(exe())?;
    let hook = Hook::start()?;
    // The command sink: a script (run directly, no shell in between) that records its
    // environment and stdin.
    let out = p.root.path().join("command-sink.out");
    let script = p.root.path().join("sink.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nread -r body\nprintf '%s %s %s\\n' \"$VMR_EVENT_KIND\" \"$VMR_EVENT_VM\" \"$body\" >> {}\n",
            out.display()
        ),
    )?;
    std::fs::set_permissions(
        &script,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755),
    )?;
    configure(
        &mut p.a,
        &format!(
            "{}[[events.command]]\nargv = [\"{}\"]\nmin-severity = \"Warning\"\n",
            webhook(&hook.url),
            script.display()
        ),
    )?;
    let proxy = Proxy::start(&p.b.addr)?;
    let _vm = replicating(&p, "cut1", Some(&proxy.addr))?;

    let fault = Instant::now();
    proxy.cut();
    let (at, e) = hook.wait("rpo-exceeded", LONG, |e| {
        is(e, EventKind::RpoExceeded, "host-a", "cut1")
    });
    report("cut link", at - fault);
    let s = p.a.status("cut1")?;
    assert!(
        s.health_reason.contains(&format!("(event {})", e.id)),
        "{}",
        s.health_reason
    );
    // Failed cycles are reported, but not one per retry: the first, then every 10th or a
    // changed error.
    let (_, failed) = hook.wait("cycle-failed", LONG, |e| {
        is(e, EventKind::CycleFailed, "host-a", "cut1")
    });
    assert_eq!(failed.fields["consecutive"], 1);
    // The command sink ran with the event in its environment and on stdin (Warning and up).
    wait_until(LONG, "the command sink to record the alert", || {
        Ok(std::fs::read_to_string(&out)
            .unwrap_or_default()
            .lines()
            .any(|l| l.starts_with("rpo-exceeded cut1 {")))
    })?;
    let lines = std::fs::read_to_string(&out)?;
    assert!(
        !lines.contains("agent-started"),
        "Info events are below the sink's min-severity: {lines}"
    );
    let status_now = p.a.status("cut1")?;
    let failures = hook
        .events()
        .iter()
        .filter(|(e, _)| e.kind == EventKind::CycleFailed)
        .count() as u64;
    assert!(
        failures < status_now.stats.errors.max(2),
        "{failures} cycle-failed events for {} failures",
        status_now.stats.errors
    );
    Ok(())
}

struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_replica_store_raises_store_full() -> TestResult {
    let mut p = Pair::new(exe())?;
    let hook = Hook::start()?;
    p.b.stop()?;
    let store = p.b.storage();
    std::fs::create_dir_all(&store)?;
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=48m", "tmpfs"])
        .arg(&store)
        .status();
    if !matches!(mounted, Ok(s) if s.success()) {
        eprintln!("skipping: cannot mount a tmpfs here ({mounted:?})");
        return Ok(());
    }
    let _m = Mount(store.clone());
    configure(&mut p.b, &webhook(&hook.url))?;
    let vm = replicating(&p, "full1", None)?;

    // Ballast leaves 2 MiB; the next cycle carries 10 MiB.
    let ballast = store.join("ballast");
    let fill = available(&store)?.saturating_sub(2 << 20);
    let st = Command::new("fallocate")
        .args(["-l", &fill.to_string()])
        .arg(&ballast)
        .status()?;
    assert!(st.success(), "fallocate the ballast");
    let fault = Instant::now();
    vm.write_random("disk0", 160, 2)?;
    let (at, e) = hook.wait("store-full", LONG, |e| {
        is(e, EventKind::StoreFull, "host-b", "full1")
    });
    report("full replica store", at - fault);
    assert!(e.message.contains("full"), "{}", e.message);
    // One event for the full store, not one per refused retry.
    std::fs::remove_file(&ballast)?;
    assert_equal_at_cut(&p, &vm)?;
    let n = hook
        .events()
        .iter()
        .filter(|(e, _)| e.kind == EventKind::StoreFull)
        .count();
    assert_eq!(n, 1);
    Ok(())
}

#[test]
fn a_required_resync_raises_an_alert() -> TestResult {
    let mut p = Pair::new(exe())?;
    let hook = Hook::start()?;
    configure(&mut p.a, &webhook(&hook.url))?;
    let mut vm = replicating(&p, "resync1", None)?;
    // QEMU dies uncleanly and comes back: change tracking is lost.
    let fault = Instant::now();
    vm.kill9();
    vm.start()?;
    let (at, e) = hook.wait("resync-required", LONG, |e| {
        is(e, EventKind::ResyncRequired, "host-a", "resync1")
    });
    report("required resync", at - fault);
    assert_eq!(e.severity, vmr_proto::event::Severity::Critical);
    let (_, st) = hook.wait("state change", LONG, |e| {
        is(e, EventKind::StateChanged, "host-a", "resync1")
            && e.fields["to"] == "WaitingForStartResynchronize"
    });
    assert!(st.id < e.id);
    assert_eq!(
        p.state("resync1")?,
        ReplicationState::WaitingForStartResynchronize
    );
    Ok(())
}

#[test]
fn a_dead_webhook_never_delays_cycles_and_follow_streams_events() -> TestResult {
    let mut p = Pair::new(exe())?;
    // A webhook that accepts and never answers, with a queue of 1: every POST waits for its
    // timeout, the queue overflows.
    let dead = TcpListener::bind("127.0.0.1:0")?;
    let held: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    let h2 = held.clone();
    let dead_addr = dead.local_addr()?;
    std::thread::spawn(move || {
        for c in dead.incoming().flatten() {
            h2.lock().expect("held").push(c);
        }
    });
    configure(
        &mut p.a,
        &format!(
            "[[events.webhook]]\nurl = \"http://{dead_addr}/hook\"\nqueue = 1\ntimeout-secs = 30\nretries = 10\n"
        ),
    )?;
    // `events --follow --json` on the primary, from before the VM exists.
    let mut follow = Command::new(exe())
        .arg("--dir")
        .arg(&p.a.dir)
        .args(["events", "--follow", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let lines = Arc::new(Mutex::new(Vec::<Event>::new()));
    let l2 = lines.clone();
    let stdout = follow.stdout.take().ok_or("no stdout")?;
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(e) = serde_json::from_str(&line) {
                l2.lock().expect("lines").push(e);
            }
        }
    });

    let _vm = replicating(&p, "dead1", None)?;
    // Many events while the webhook hangs: pause/resume a few times.
    for _ in 0..3 {
        p.a.ok(&["pause", "dead1"])?;
        p.a.ok(&["resume", "dead1"])?;
    }
    // Cycles keep their 5 s interval: 3 more cycles in at most 3 intervals and a margin.
    let from = p.a.status("dead1")?.last_cycle.unwrap_or(0);
    let t = Instant::now();
    p.a.wait_cycle("dead1", from + 3, LONG)?;
    let took = t.elapsed();
    eprintln!("3 cycles with a dead webhook: {:.1} s", took.as_secs_f64());
    assert!(took <= Duration::from_secs(15 + 5), "{took:?}");
    wait_until(LONG, "the overflow to be logged", || {
        Ok(p.a.log().contains("event sink queue full"))
    })?;

    // The follower saw the state changes as they happened, in id order, no duplicates.
    wait_until(LONG, "the follower to see the pauses", || {
        Ok(lines
            .lock()
            .expect("lines")
            .iter()
            .filter(|e| e.kind == EventKind::StateChanged && e.fields["to"] == "Suspended")
            .count()
            == 3)
    })?;
    let seen = lines.lock().expect("lines").clone();
    assert!(seen.windows(2).all(|w| w[0].id < w[1].id), "ids increase");
    assert!(seen.iter().any(|e| e.kind == EventKind::AgentStarted));
    let _ = follow.kill();
    let _ = follow.wait();
    drop(held);
    Ok(())
}
