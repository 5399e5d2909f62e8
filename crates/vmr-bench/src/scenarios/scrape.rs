//! Scenario 9 (issue 14): what Prometheus scraping `/metrics` every 15 s costs an agent that
//! holds 100 VMs; beside it (reported, not judged), what one render of the web dashboard's
//! `/` costs the same agent.

use std::io::{Read, Write};

use super::*;

/// The goal: scraping every 15 s costs the agent under 1 % of a core.
const S9_LIMIT_PERCENT: f64 = 1.0;
/// Prometheus's scrapes per minute at a 15 s interval.
const SCRAPES_PER_MIN: f64 = 4.0;

/// Scenario 9: per-scrape CPU of each agent (the primary of every VM, the replica of every
/// VM) with `n` VMs, as a share of a core at four scrapes a minute.
pub fn metrics_scrape(ctx: &Ctx) -> Outcome {
    let n = if ctx.quick { 10 } else { 100 };
    let mut o = Outcome::new(
        9,
        &format!("Metrics scrape cost: /metrics of {n} VMs every 15 s"),
        goal(9),
    );
    let r = scrape_run(ctx, &mut o, n);
    finish(o, r)
}

/// Stop `agent`, give it a loopback monitoring listener on a free port, start it again.
fn with_metrics(agent: &mut vmr_testkit::harness::Agent) -> anyhow::Result<u16> {
    agent.stop()?;
    let port = vmr_testkit::harness::free_port()?;
    agent.add_config(&format!("metrics-listen = \"127.0.0.1:{port}\""))?;
    agent.restart()?;
    Ok(port)
}

/// One GET of `path` over a new connection (as Prometheus does without keep-alive): the body.
fn scrape(port: u16, path: &str) -> anyhow::Result<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("no end of the HTTP header")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("{path} answered {}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_owned())
}

/// What scraping one agent costs.
struct Cost {
    /// CPU seconds per scrape, the agent's idle rate taken out.
    cpu_per_scrape: f64,
    /// Idle CPU of the agent, cores.
    idle_cores: f64,
    /// Scrape wall times, s.
    latencies: Vec<f64>,
    /// Bytes of one answer.
    bytes: usize,
    /// The same for the dashboard's `/`: CPU seconds per render, wall times, bytes.
    page: (f64, Vec<f64>, usize),
}

/// CPU seconds (idle rate `idle_cores` taken out) per GET of `path` over `n` back-to-back
/// requests, and their wall times.
fn per_request(
    pid: u32,
    port: u16,
    path: &str,
    n: usize,
    idle_cores: f64,
) -> anyhow::Result<(f64, Vec<f64>)> {
    let c0 = cpu_seconds(pid)?;
    let t = Instant::now();
    let mut latencies = Vec::with_capacity(n);
    for _ in 0..n {
        let s = Instant::now();
        scrape(port, path)?;
        latencies.push(s.elapsed().as_secs_f64());
    }
    let el = t.elapsed().as_secs_f64();
    let used = cpu_seconds(pid)? - c0 - idle_cores * el;
    Ok((used.max(0.0) / n as f64, latencies))
}

fn measure(pid: u32, port: u16, n: usize, scrapes: usize, idle: Duration) -> anyhow::Result<Cost> {
    // The answers name every VM, each answering.
    let body = scrape(port, "/metrics")?;
    let up = body
        .lines()
        .filter(|l| l.starts_with("vmreplica_up{") && l.ends_with(" 1"))
        .count();
    if up != n {
        bail!("the scrape shows {up} of {n} VMs up");
    }
    let page = scrape(port, "/")?;
    let rows = page.matches("<tr class=\"vm ").count();
    let unknown = page.matches("data-health=\"Unknown\"").count();
    if rows != n || unknown != 0 {
        bail!("the dashboard shows {rows} of {n} VMs, {unknown} not answering");
    }
    let c0 = cpu_seconds(pid)?;
    let t = Instant::now();
    std::thread::sleep(idle);
    let idle_cores = (cpu_seconds(pid)? - c0) / t.elapsed().as_secs_f64();
    let (cpu_per_scrape, latencies) = per_request(pid, port, "/metrics", scrapes, idle_cores)?;
    let (cpu_per_page, page_latencies) = per_request(pid, port, "/", scrapes, idle_cores)?;
    Ok(Cost {
        cpu_per_scrape,
        idle_cores,
        latencies,
        bytes: body.len(),
        page: (cpu_per_page, page_latencies, page.len()),
    })
}

fn scrape_run(ctx: &Ctx, o: &mut Outcome, n: usize) -> anyhow::Result<()> {
    let scrapes = if ctx.quick { 100 } else { 400 };
    let idle = Duration::from_secs(if ctx.quick { 10 } else { 30 });
    o.method = format!(
        "{n} qemu-storage-daemon stand-in VMs (a 16 MiB qcow2 disk each) registered on one \
         primary agent and enabled at 1 h towards one replica agent, both with their monitoring \
         listener on 127.0.0.1 (no token); measured after every VM's initial cycle is applied, \
         so no cycle runs meanwhile. Per agent: its idle CPU over {} s, then {scrapes} scrapes \
         of `/metrics` back to back, each on a new connection like Prometheus's; CPU = utime + \
         stime from /proc/PID/stat; per scrape = (CPU over the scrapes − idle rate × their wall \
         time) / {scrapes}; share of a core = per scrape × 4 scrapes a minute / 60 s. Each \
         answer is checked to show all {n} VMs up. The value judged is the costlier agent's. \
         Beside it, not judged: {scrapes} renders of the web dashboard's `/` (every VM's row \
         with its chart, the newest 20 events; checked to show all {n} VMs answering), \
         measured the same way.{}",
        idle.as_secs(),
        if n < 100 {
            " Quick mode: N = 10; the full run uses 100."
        } else {
            ""
        }
    );
    let mut pair = Pair::in_dir(&ctx.exe, TestDir::given(&ctx.dir("s9"))?)?;
    let pa = with_metrics(&mut pair.a)?;
    let pb = with_metrics(&mut pair.b)?;
    let mut vms = Vec::new();
    for i in 0..n {
        let name = format!("bench-s9-{i:03}");
        let vm = StandIn::start_in(
            &pair.root.path().join("vms"),
            &pair.a.dir,
            &name,
            &[StandInDisk::new("disk0", 16 * MIB)],
        )?;
        vm.register(&pair.a)?;
        vms.push(vm);
    }
    for vm in &vms {
        enable(&pair, &vm.def.name, "1h", 0)?;
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let applied = pair
            .b
            .statuses(None)?
            .iter()
            .filter(|r| r.last_cycle.unwrap_or(0) >= 1)
            .count();
        if applied >= n {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {applied} of {n} VMs finished initial replication in time");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let a = measure(pair.a.pid(), pa, n, scrapes, idle)?;
    let b = measure(pair.b.pid(), pb, n, scrapes, idle)?;
    let pct = |c: &Cost| c.cpu_per_scrape * SCRAPES_PER_MIN / 60.0 * 100.0;
    let (pa_pct, pb_pct) = (pct(&a), pct(&b));
    let worst = pa_pct.max(pb_pct);
    o.ours = format!("{worst:.3} % of a core ({n} VMs, every 15 s)");
    o.ratio = format!("{worst:.3} %");
    for (who, c, p) in [("primary", &a, pa_pct), ("replica", &b, pb_pct)] {
        o.detail(
            format!("{who} agent: CPU per scrape (idle rate taken out)"),
            format!(
                "{:.2} ms → {p:.3} % of a core at 4 scrapes a minute",
                c.cpu_per_scrape * 1e3
            ),
        );
        o.detail(
            format!("{who} agent: scrape wall time, median (max)"),
            format!(
                "{:.1} ms ({:.1} ms)",
                median(&c.latencies) * 1e3,
                c.latencies.iter().copied().fold(0.0, f64::max) * 1e3
            ),
        );
        o.detail(
            format!("{who} agent: idle CPU, answer size"),
            format!("{:.4} cores, {} bytes", c.idle_cores, c.bytes),
        );
        let (cpu, lat, bytes) = &c.page;
        o.detail(
            format!("{who} agent: dashboard `/` (not judged): CPU per render, wall time median (max), size"),
            format!(
                "{:.2} ms ({:.3} % of a core if rendered every 15 s), {:.1} ms ({:.1} ms), {bytes} bytes",
                cpu * 1e3,
                cpu * SCRAPES_PER_MIN / 60.0 * 100.0,
                median(lat) * 1e3,
                lat.iter().copied().fold(0.0, f64::max) * 1e3
            ),
        );
    }
    o.verdict = at_most(worst, S9_LIMIT_PERCENT);
    drop(vms);
    let _ = pair.stop();
    remove_dir(pair.root.path());
    Ok(())
}
