//! The web dashboard in a real browser (issue 14): two real agents with their monitoring
//! listeners on 127.0.0.1, two stand-in VMs replicating every 5 s (one paused after a
//! pause/resume of the other); Debian's `chromium` headless loads `/`, `/vm/NAME` and an
//! unknown VM's page and the DOM it built is checked (rows, state, health, the SVG chart with
//! data, the events, the 404 page); the replica's dashboard behind its token, opened with the
//! token as the HTTP Basic password. With `VMR_DASHBOARD_SHOT=PATH` the browser also saves a
//! 1280x800 screenshot of `/` there (how `docs/dashboard.png` was made; a relative PATH is
//! taken from the test's directory, `crates/vmreplica`).

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use vmr_proto::api::{Health, ReplicationState};
use vmr_testkit::ChildGuard;

const LONG: Duration = Duration::from_secs(90);

/// How long one browser run may take (Chromium starts slowly on 2 busy cores).
const BROWSER: Duration = Duration::from_secs(120);

/// One HTTP/1.1 GET with an optional `Authorization` value: (status code, head, body).
fn get(port: u16, path: &str, auth: Option<&str>) -> TestResult<(u16, String, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let auth = auth.map_or_else(String::new, |a| format!("Authorization: {a}\r\n"));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Connection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no header end")?;
    let code = head.split_whitespace().nth(1).ok_or("no status")?.parse()?;
    Ok((code, head.to_owned(), body.to_owned()))
}

/// Run headless Chromium on `url` with `args` (its profile under `profile`, inside the test's
/// directory, so the harness kills what it leaves): its stdout.
fn chromium(profile: &Path, args: &[&str], url: &str) -> TestResult<String> {
    let out = profile.join("stdout");
    let err = profile.join("stderr");
    let mut cmd = Command::new("chromium");
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--disable-dev-shm-usage",
    ])
    .arg(format!(
        "--user-data-dir={}",
        profile.join("profile").display()
    ))
    .args(args)
    .arg(url)
    .stdin(Stdio::null())
    .stdout(std::fs::File::create(&out)?)
    .stderr(std::fs::File::create(&err)?);
    let mut child = ChildGuard::spawn(cmd, "chromium").unwrap_or_else(|e| {
        panic!(
            "chromium did not start ({e}): run `scripts/install-deps.sh full` (Debian's \
             chromium package) so that the dashboard is tested in a browser"
        )
    });
    let status = child
        .wait_timeout(BROWSER)?
        .ok_or_else(|| format!("chromium on {url} did not finish within {BROWSER:?}"))?;
    let text = std::fs::read_to_string(&out)?;
    if !status.success() {
        return Err(format!(
            "chromium on {url}: {status}\n{}",
            tail(&std::fs::read_to_string(&err)?, 20)
        )
        .into());
    }
    Ok(text)
}

/// The DOM of `url` as the browser built it.
fn dom(profile: &Path, url: &str) -> TestResult<String> {
    let text = chromium(profile, &["--dump-dom"], url)?;
    assert!(text.contains("</html>"), "no document from {url}: {text}");
    Ok(text)
}

/// The table row (`<tr ...>...</tr>`) that starts with `start`.
fn row<'a>(dom: &'a str, start: &str) -> Option<&'a str> {
    let at = dom.find(start)?;
    let rest = &dom[at..];
    Some(&rest[..rest.find("</tr>")?])
}

/// The number in attribute `name="N"` of `text`.
fn attr_num(text: &str, name: &str) -> Option<u64> {
    let pat = format!("{name}=\"");
    let rest = &text[text.find(&pat)? + pat.len()..];
    rest[..rest.find('"')?].parse().ok()
}

#[test]
fn the_dashboard_in_a_real_browser() -> TestResult {
    let mut p = Pair::new(exe())?;
    let pa = with_metrics(&mut p.a, None)?;
    let token = "dashboard-token-for-the-test";
    let pb = with_metrics(&mut p.b, Some(token))?;
    let web1 = StandIn::create(p.root.path(), &p.a, "web1", &["disk0"], 16)?;
    let web2 = StandIn::create(p.root.path(), &p.a, "web2", &["disk0"], 16)?;
    for vm in [&web1, &web2] {
        vm.write_random("disk0", 64, 3)?;
        vm.register(&p.a)?;
        // An RPO alert of 30 s: a loaded machine's late cycle does not turn web1 Warning
        // between the wait below and the browser's load.
        p.enable(vm.name(), &["--frequency", "5s", "--rpo-alert", "30s"])?;
    }
    p.wait_cycle("web1", 2, LONG)?;
    p.wait_cycle("web2", 1, LONG)?;
    // Events to show: web1 paused and resumed, web2 paused (a Warning on the page).
    p.a.ok(&["pause", "web1"])?;
    p.a.ok(&["resume", "web1"])?;
    p.a.ok(&["pause", "web2"])?;
    web1.write_random("disk0", 32, 4)?;
    let next = p.a.status("web1")?.last_cycle.unwrap_or(0) + 1;
    p.wait_cycle("web1", next, LONG)?;
    wait_until(LONG, "web1 Replicating and Normal, web2 Warning", || {
        let (a, b) = (p.a.status("web1")?, p.a.status("web2")?);
        Ok(a.state == ReplicationState::Replicating
            && a.health == Health::Normal
            && b.state == ReplicationState::Suspended
            && b.health == Health::Warning)
    })?;

    let profile = p.root.path().join("chromium");
    std::fs::create_dir_all(&profile)?;
    let base = format!("http://127.0.0.1:{pa}");
    if let Some(shot) = std::env::var_os("VMR_DASHBOARD_SHOT") {
        let shot = std::path::absolute(shot)?;
        chromium(
            &profile,
            &[
                "--window-size=1280,800",
                "--hide-scrollbars",
                &format!("--screenshot={}", shot.display()),
            ],
            &format!("{base}/"),
        )?;
        let png = std::fs::read(&shot)
            .map_err(|e| format!("no screenshot at {}: {e}", shot.display()))?;
        assert!(png.starts_with(b"\x89PNG"), "no PNG at {}", shot.display());
    }

    // `/`: both rows, their state and health, web1's chart with data, the events.
    let page = dom(&profile, &format!("{base}/"))?;
    assert!(
        page.contains("<meta http-equiv=\"refresh\" content=\"5\">")
            && page.contains("refreshes itself every 5 s"),
        "{page}"
    );
    let r1 = row(
        &page,
        "<tr class=\"vm ok\" data-vm=\"web1\" data-state=\"Replicating\" data-health=\"Normal\">",
    )
    .ok_or_else(|| format!("no Normal, Replicating web1 row in\n{page}"))?;
    assert!(r1.contains("<a href=\"/vm/web1\">web1</a>"), "{r1}");
    assert!(r1.contains("<td>primary</td>"), "{r1}");
    assert!(
        r1.contains(&format!("<td class=\"hide-narrow\">{}</td>", p.b.addr)),
        "{r1}"
    );
    assert!(
        r1.contains(" / 30 s</span>"),
        "lag against the 30 s RPO alert: {r1}"
    );
    assert!(
        attr_num(r1, "data-cycles").unwrap_or(0) >= 3,
        "the chart counts web1's cycles: {r1}"
    );
    assert!(attr_num(r1, "data-bytes").unwrap_or(0) > 0, "{r1}");
    assert!(r1.contains("<rect class=\"b\""), "bars in the chart: {r1}");
    let r2 = row(
        &page,
        "<tr class=\"vm warn\" data-vm=\"web2\" data-state=\"Suspended\" data-health=\"Warning\">",
    )
    .ok_or_else(|| format!("no Warning, Suspended web2 row in\n{page}"))?;
    assert!(
        r2.contains("<span class=\"reason\">"),
        "the reason is shown: {r2}"
    );
    let events = &page[page
        .find("<table id=\"events\">")
        .ok_or("no events table")?..];
    let paused = events
        .match_indices("<tr class=\"event")
        .filter_map(|(i, _)| row(&events[i..], "<tr"))
        .any(|r| r.contains(">web2</a>") && r.contains("web2: Replicating -&gt; Suspended"));
    assert!(paused, "web2's pause in the events:\n{events}");
    assert!(
        events.contains("web1: Suspended -&gt; Replicating"),
        "web1's resume in the events:\n{events}"
    );

    // `/vm/web2`: its status, the command to run next, its events.
    let page = dom(&profile, &format!("{base}/vm/web2"))?;
    assert!(
        page.contains("<span id=\"state\">Suspended</span>"),
        "{page}"
    );
    assert!(page.contains("\u{25b2} Warning"), "{page}");
    assert!(page.contains("vmreplica resume web2"), "{page}");
    assert!(page.contains("<p id=\"operation\">None.</p>"), "{page}");
    assert!(
        page.contains("<dl class=\"fields\" id=\"stats\">"),
        "{page}"
    );
    assert!(
        page.contains("None on this host"),
        "no failover network: {page}"
    );
    assert!(!page.contains(">web1</a>"), "only web2's events: {page}");
    assert!(page.contains("web2: Replicating -&gt; Suspended"), "{page}");
    // The same page by UUID.
    let (code, _, body) = get(pa, &format!("/vm/{}", web1.def.uuid), None)?;
    assert_eq!(code, 200);
    assert!(body.contains("<title>web1 "), "{body}");

    // An unknown VM: the 404 page.
    let page = dom(&profile, &format!("{base}/vm/nosuch"))?;
    assert!(
        page.contains("<p id=\"not-found\">No VM named <b>nosuch</b>"),
        "{page}"
    );
    assert_eq!(get(pa, "/vm/nosuch", None)?.0, 404);

    // The replica's dashboard is behind its token: a browser gets asked for it (HTTP Basic),
    // the token as the password opens it.
    let (code, head, _) = get(pb, "/", None)?;
    assert_eq!(code, 401);
    assert!(
        head.to_ascii_lowercase()
            .contains("www-authenticate: basic realm=\"vmreplica\""),
        "{head}"
    );
    // base64("admin:dashboard-token-for-the-test") and base64("admin:wrong").
    let basic = "YWRtaW46ZGFzaGJvYXJkLXRva2VuLWZvci10aGUtdGVzdA==";
    assert_eq!(get(pb, "/", Some("Basic YWRtaW46d3Jvbmc="))?.0, 401);
    let (code, _, body) = get(pb, "/", Some(&format!("Basic {basic}")))?;
    assert_eq!(code, 200, "{body}");
    let r = row(&body, "<tr class=\"vm ok\" data-vm=\"web1\"")
        .ok_or_else(|| format!("no web1 row on the replica:\n{body}"))?;
    assert!(
        r.contains("<td>replica</td><td class=\"hide-narrow\">host-a</td>"),
        "{r}"
    );
    assert!(
        r.contains("<td class=\"num hide-narrow\">") && !r.contains("num hide-narrow\">\u{2013}"),
        "recovery points shown: {r}"
    );
    Ok(())
}
