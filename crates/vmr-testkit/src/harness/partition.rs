//! A three-host network in network namespaces made by the test, for the partition tests of
//! automatic failover (docs/auto-failover.md): a primary, a replica and a witness, each in a
//! namespace of its own with one address in a private test subnet (`10.231.N.0/24`, one per
//! network), joined by a bridge in a fourth "switch" namespace (one veth per host, both ends
//! created directly inside the namespaces: no end ever exists in the host's namespace). A
//! blackhole route for the subnet is added in the host's namespace first, so no packet for a
//! test address can leave through the host's default route. Each pair's link is cut (and
//! healed) independently by iptables DROP rules for the peer's address in one host's namespace,
//! both directions. Agents run inside their namespace through a wrapper script (`ip netns exec
//! NS exe`, optionally in a Linux time namespace with shifted monotonic and boot-time clocks);
//! the CLI reaches them from the host over their Unix control socket, as usual. Namespaces left
//! by a killed run (its pid gone) are removed at the next start; everything is removed on drop.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use super::{Agent, HarnessError, Result, TestDir, enable_witnessed, io_err};

const PREFIX: &str = "vmrp-";

/// One of the three hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Host {
    /// The primary (`.1`).
    Primary,
    /// The replica (`.2`).
    Replica,
    /// The witness (`.3`).
    Witness,
}

impl Host {
    /// The three hosts.
    pub const ALL: [Host; 3] = [Host::Primary, Host::Replica, Host::Witness];

    fn tag(self) -> &'static str {
        match self {
            Host::Primary => "a",
            Host::Replica => "b",
            Host::Witness => "w",
        }
    }

    fn octet(self) -> u8 {
        match self {
            Host::Primary => 1,
            Host::Replica => 2,
            Host::Witness => 3,
        }
    }
}

fn run(prog: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(prog)
        .args(args)
        .output()
        .map_err(io_err(format!("run {prog}")))?;
    if !out.status.success() {
        return Err(HarnessError::Tool {
            tool: format!("{prog} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// Whether network namespaces and iptables in them can be used here (tries one, removes it);
/// the reason if not.
pub fn netns_unavailable() -> Option<String> {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let name = format!("{PREFIX}{}-probe{n}", std::process::id());
    if let Err(e) = run("ip", &["netns", "add", &name]) {
        return Some(e.to_string());
    }
    let ipt = run("ip", &["netns", "exec", &name, "iptables", "-S"]);
    let _ = run("ip", &["netns", "del", &name]);
    ipt.err().map(|e| format!("iptables in a namespace: {e}"))
}

/// Remove namespaces named `vmrp-PID-*` whose test process (PID) no longer lives.
fn remove_stale() {
    remove_stale_namespaces(PREFIX, "harness");
}

/// Remove the network namespaces named `<prefix>PID-*` whose process PID no longer lives (left
/// by a test or a fault campaign that was killed); `who` names the caller in the message.
pub fn remove_stale_namespaces(prefix: &str, who: &str) {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(rest) = name.strip_prefix(prefix) else {
            continue;
        };
        let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            eprintln!("{who}: removing stale namespace {name}");
            let _ = run("ip", &["netns", "del", name]);
        }
    }
}

/// A three-host network (primary, replica, witness) behind a bridge; removed on drop.
#[derive(Debug)]
pub struct Net3 {
    /// This network's number (subnet `10.231.(16 + n).0/24`).
    n: u32,
    route: Option<String>,
    made: Vec<String>,
    /// Pairs cut now (ordered pair, smaller first).
    cut: BTreeSet<(Host, Host)>,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl Net3 {
    /// Make the four namespaces, the bridge and the links (blackhole route first).
    pub fn create() -> Result<Net3> {
        remove_stale();
        let n = NEXT.fetch_add(1, Ordering::Relaxed) % 200;
        let mut net = Net3 {
            n,
            route: None,
            made: Vec::new(),
            cut: BTreeSet::new(),
        };
        let subnet = net.subnet();
        // The blackhole route may exist already (a run that could not remove it): kept as is.
        let have = Command::new("ip")
            .args(["route", "show", "type", "blackhole", &subnet])
            .output()
            .map(|o| !o.stdout.is_empty())
            .unwrap_or(false);
        if !have {
            run("ip", &["route", "add", "blackhole", &subnet])?;
            net.route = Some(subnet);
        }
        let sw = net.switch();
        run("ip", &["netns", "add", &sw])?;
        net.made.push(sw.clone());
        exec(&sw, &["ip", "link", "add", "br0", "type", "bridge"])?;
        exec(&sw, &["ip", "link", "set", "br0", "up"])?;
        for h in Host::ALL {
            let ns = net.ns(h);
            run("ip", &["netns", "add", &ns])?;
            net.made.push(ns.clone());
            let port = format!("p{}", h.tag());
            // Both ends made inside the namespaces.
            run(
                "ip",
                &[
                    "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &port,
                    "netns", &sw,
                ],
            )?;
            exec(&sw, &["ip", "link", "set", &port, "master", "br0"])?;
            exec(&sw, &["ip", "link", "set", &port, "up"])?;
            let cidr = format!("{}/24", net.addr(h));
            exec(&ns, &["ip", "addr", "add", &cidr, "dev", "eth0"])?;
            exec(&ns, &["ip", "link", "set", "eth0", "up"])?;
            exec(&ns, &["ip", "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }

    /// The test subnet of this network.
    pub fn subnet(&self) -> String {
        format!("10.231.{}.0/24", 16 + self.n)
    }

    /// The address of host `h`.
    pub fn addr(&self, h: Host) -> String {
        format!("10.231.{}.{}", 16 + self.n, h.octet())
    }

    /// The namespace of host `h`.
    pub fn ns(&self, h: Host) -> String {
        format!("{PREFIX}{}-{}-{}", std::process::id(), self.n, h.tag())
    }

    fn switch(&self) -> String {
        format!("{PREFIX}{}-{}-s", std::process::id(), self.n)
    }

    /// A wrapper script in `dir` that runs `exe` with its arguments inside host `h`'s
    /// namespace (`exec` all the way, so the process keeps the wrapper's pid); with
    /// `mono_offset_s`, inside a new time namespace whose monotonic and boot-time clocks are
    /// shifted by that many seconds (`unshare --time`: the process enters it at its exec).
    pub fn wrapper(
        &self,
        dir: &Path,
        h: Host,
        exe: &Path,
        mono_offset_s: Option<i64>,
    ) -> Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        let tool = exe
            .file_name()
            .map_or("exe".into(), |n| n.to_string_lossy());
        let p = dir.join(format!("in-{}-{tool}", self.ns(h)));
        let time = mono_offset_s
            .map(|o| format!("unshare --time --monotonic={o} --boottime={o} "))
            .unwrap_or_default();
        std::fs::write(
            &p,
            format!(
                "#!/bin/sh\nexec {time}ip netns exec {} {} \"$@\"\n",
                self.ns(h),
                exe.display()
            ),
        )
        .map_err(io_err("write the namespace wrapper"))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))
            .map_err(io_err("make the namespace wrapper executable"))?;
        Ok(p)
    }

    fn key(x: Host, y: Host) -> (Host, Host) {
        if x <= y { (x, y) } else { (y, x) }
    }

    /// Cut (`true`) or heal the link between `x` and `y`: every packet between their
    /// addresses, both directions, dropped in `x`'s (the smaller's) namespace.
    pub fn set_cut(&mut self, x: Host, y: Host, on: bool) -> Result<()> {
        let (x, y) = Self::key(x, y);
        if x == y || self.cut.contains(&(x, y)) == on {
            return Ok(());
        }
        let op = if on { "-I" } else { "-D" };
        let (ns, peer) = (self.ns(x), self.addr(y));
        exec(&ns, &["iptables", op, "INPUT", "-s", &peer, "-j", "DROP"])?;
        exec(&ns, &["iptables", op, "OUTPUT", "-d", &peer, "-j", "DROP"])?;
        if on {
            self.cut.insert((x, y));
        } else {
            self.cut.remove(&(x, y));
        }
        Ok(())
    }

    /// Cut both links of `h` (the host isolated).
    pub fn isolate(&mut self, h: Host) -> Result<()> {
        for o in Host::ALL {
            if o != h {
                self.set_cut(h, o, true)?;
            }
        }
        Ok(())
    }

    /// Cut every link.
    pub fn cut_all(&mut self) -> Result<()> {
        self.isolate(Host::Primary)?;
        self.set_cut(Host::Replica, Host::Witness, true)
    }

    /// Heal every link.
    pub fn heal(&mut self) -> Result<()> {
        for (x, y) in std::mem::take(&mut self.cut) {
            self.cut.insert((x, y));
            self.set_cut(x, y, false)?;
        }
        Ok(())
    }

    /// Whether `x` and `y` can reach each other now (as far as the rules say).
    pub fn is_cut(&self, x: Host, y: Host) -> bool {
        self.cut.contains(&Self::key(x, y))
    }

    /// Packets dropped so far by the cut rules of host `h`'s namespace.
    pub fn drops(&self, h: Host) -> Result<u64> {
        let mut n = 0;
        for chain in ["INPUT", "OUTPUT"] {
            let out = Command::new("ip")
                .args(["netns", "exec", &self.ns(h)])
                .args(["iptables", "-L", chain, "-v", "-x", "-n"])
                .output()
                .map_err(io_err("run iptables -L"))?;
            for l in String::from_utf8_lossy(&out.stdout).lines() {
                if l.contains("DROP") {
                    n += l
                        .split_whitespace()
                        .next()
                        .and_then(|p| p.parse::<u64>().ok())
                        .unwrap_or(0);
                }
            }
        }
        Ok(n)
    }
}

/// Automatic failover's three agents each in its own namespace of a [`Net3`]: the primary
/// `host-a`, the replica `host-b` and the witness `host-w`, each listening on its namespace's
/// address (port 7700); b allows a (replication), w allows a and b (the lease calls). Dropped
/// in order: the agents, the directory (kills leftovers such as failover VMs and fence
/// watchdogs), then the network.
#[derive(Debug)]
pub struct Partitioned {
    /// The primary.
    pub a: Agent,
    /// The replica.
    pub b: Agent,
    /// The witness.
    pub w: Agent,
    /// Their directory.
    pub root: TestDir,
    /// The network.
    pub net: Net3,
}

/// The port every agent of a [`Partitioned`] listens on (each in its own namespace).
pub const PARTITION_PORT: u16 = 7700;

impl Partitioned {
    /// `enable VM` on the primary to the replica with automatic failover after `auto`,
    /// witnessed by the witness ([`enable_witnessed`]).
    pub fn enable(&self, vm: &str, auto: &str, extra: &[&str]) -> Result<()> {
        enable_witnessed([&self.a, &self.b, &self.w], vm, auto, extra)
    }

    /// Make the network and start the three agents in it, with their authorizations;
    /// `mono_offsets_s` shifts the monotonic clock of the primary, replica and witness (in
    /// that order; `None`: the host's).
    pub fn new(exe: &Path, mono_offsets_s: [Option<i64>; 3]) -> Result<Partitioned> {
        let net = Net3::create()?;
        let root = TestDir::temp("vmr-part-")?;
        let start = |h: Host, name: &str, off: Option<i64>| -> Result<Agent> {
            let launcher = net.wrapper(root.path(), h, exe, off)?;
            Agent::start_launched(
                exe,
                &launcher,
                root.path(),
                name,
                &net.addr(h),
                PARTITION_PORT,
            )
        };
        let a = start(Host::Primary, "host-a", mono_offsets_s[0])?;
        let b = start(Host::Replica, "host-b", mono_offsets_s[1])?;
        let w = start(Host::Witness, "host-w", mono_offsets_s[2])?;
        b.allow(&a)?;
        w.allow(&a)?;
        w.allow(&b)?;
        Ok(Partitioned { a, b, w, root, net })
    }

    /// Stop the three agents cleanly.
    pub fn stop(&mut self) -> Result<()> {
        self.a.stop()?;
        self.b.stop()?;
        self.w.stop()
    }
}

fn exec(ns: &str, cmd: &[&str]) -> Result<()> {
    let mut args = vec!["netns", "exec", ns];
    args.extend_from_slice(cmd);
    run("ip", &args)
}

impl Drop for Net3 {
    fn drop(&mut self) {
        // Deleting a namespace deletes its veth ends and with them the other ends.
        for ns in self.made.drain(..) {
            if let Err(e) = run("ip", &["netns", "del", &ns]) {
                eprintln!("harness: {e}");
            }
        }
        if let Some(subnet) = self.route.take()
            && let Err(e) = run("ip", &["route", "del", "blackhole", &subnet])
        {
            eprintln!("harness: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_test_addresses_are_private_and_distinct_per_host() {
        let net = Net3 {
            n: 3,
            route: None,
            made: Vec::new(),
            cut: BTreeSet::new(),
        };
        let mut seen = BTreeSet::new();
        for h in Host::ALL {
            let ip: std::net::Ipv4Addr = net.addr(h).parse().expect("address");
            assert!(ip.is_private(), "{ip}");
            assert_eq!(ip.octets()[..3], [10, 231, 19], "{ip} in {}", net.subnet());
            assert!(seen.insert(ip));
            assert!(net.ns(h).len() < 64);
        }
    }
}
