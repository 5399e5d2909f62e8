//! The network of the network faults: two network namespaces made by the runner (one per
//! agent) joined by a veth pair in the private test subnet 10.231.0.0/30, with a blackhole
//! route for that subnet in the host's namespace added first, so that no packet for a test
//! address can ever leave through the host's default route. Faults are iptables rules inside
//! the namespaces only (a cut: DROP on the veth; loss: `-m statistic --mode random`).
//! Everything is removed on drop, and namespaces left by a runner that died are removed at
//! the next start.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// The test subnet (never routed anywhere: blackholed on the host, only inside namespaces).
pub const SUBNET: &str = "10.231.0.0/30";
/// The primary's address (in namespace `a`).
pub const ADDR_A: &str = "10.231.0.1";
/// The replica's address (in namespace `b`).
pub const ADDR_B: &str = "10.231.0.2";
const PREFIX: &str = "vmrf-";

/// Run `prog args`, failing with its stderr.
pub fn run(prog: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(prog)
        .args(args)
        .output()
        .with_context(|| format!("run {prog}"))?;
    if !out.status.success() {
        bail!(
            "{prog} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Whether network namespaces (and iptables in them) can be used here: the harness's probe
/// (tries one and removes it); the reason if not.
pub fn probe() -> Result<(), String> {
    vmr_testkit::harness::netns_unavailable().map_or(Ok(()), Err)
}

/// Remove namespaces named `vmrf-PID-*` whose runner (PID) no longer lives.
pub fn remove_stale() {
    vmr_testkit::harness::remove_stale_namespaces(PREFIX, "vmr-faults");
}

/// Two namespaces `a` (primary, 10.231.0.1) and `b` (replica, 10.231.0.2) joined by a veth
/// pair; removed on drop.
#[derive(Debug)]
pub struct Netns {
    /// Namespace of the primary.
    pub a: String,
    /// Namespace of the replica.
    pub b: String,
    veth_a: String,
    veth_b: String,
    route: bool,
    made: Vec<String>,
    cut: bool,
    loss: bool,
}

impl Netns {
    /// Make both namespaces (blackhole route first).
    pub fn create() -> anyhow::Result<Netns> {
        remove_stale();
        let pid = std::process::id();
        let mut n = Netns {
            a: format!("{PREFIX}{pid}-a"),
            b: format!("{PREFIX}{pid}-b"),
            veth_a: format!("vf{pid}a"),
            veth_b: format!("vf{pid}b"),
            route: false,
            made: Vec::new(),
            cut: false,
            loss: false,
        };
        // The blackhole route may exist already (an earlier run that could not remove it):
        // then it is kept as it is.
        let have = Command::new("ip")
            .args(["route", "show", "type", "blackhole", SUBNET])
            .output()
            .map(|o| !o.stdout.is_empty())
            .unwrap_or(false);
        if !have {
            run("ip", &["route", "add", "blackhole", SUBNET])?;
            n.route = true;
        }
        for ns in [n.a.clone(), n.b.clone()] {
            run("ip", &["netns", "add", &ns])?;
            n.made.push(ns);
        }
        run(
            "ip",
            &[
                "link", "add", &n.veth_a, "type", "veth", "peer", "name", &n.veth_b,
            ],
        )?;
        run("ip", &["link", "set", &n.veth_a, "netns", &n.a])?;
        run("ip", &["link", "set", &n.veth_b, "netns", &n.b])?;
        for (ns, dev, ip) in [(&n.a, &n.veth_a, ADDR_A), (&n.b, &n.veth_b, ADDR_B)] {
            let cidr = format!("{ip}/30");
            n.exec(ns, &["ip", "addr", "add", &cidr, "dev", dev])?;
            n.exec(ns, &["ip", "link", "set", dev, "up"])?;
            n.exec(ns, &["ip", "link", "set", "lo", "up"])?;
        }
        Ok(n)
    }

    fn exec(&self, ns: &str, cmd: &[&str]) -> anyhow::Result<()> {
        let mut args = vec!["netns", "exec", ns];
        args.extend_from_slice(cmd);
        run("ip", &args)
    }

    /// A wrapper script in `dir` that runs `exe` with its arguments inside namespace `ns`
    /// (`exec`, so the process keeps the wrapper's pid).
    pub fn wrapper(&self, dir: &Path, ns: &str, exe: &Path) -> anyhow::Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join(format!("in-{ns}"));
        std::fs::write(
            &p,
            format!(
                "#!/bin/sh\nexec ip netns exec {ns} {} \"$@\"\n",
                exe.display()
            ),
        )?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
        Ok(p)
    }

    /// The path of namespace `ns` (for setns).
    pub fn path(ns: &str) -> PathBuf {
        Path::new("/run/netns").join(ns)
    }

    /// Cut (or restore) the link: every packet on the primary's veth is dropped.
    pub fn set_cut(&mut self, on: bool) -> anyhow::Result<()> {
        if on == self.cut {
            return Ok(());
        }
        let op = if on { "-A" } else { "-D" };
        let (a, v) = (self.a.clone(), self.veth_a.clone());
        self.exec(&a, &["iptables", op, "INPUT", "-i", &v, "-j", "DROP"])?;
        self.exec(&a, &["iptables", op, "OUTPUT", "-o", &v, "-j", "DROP"])?;
        self.cut = on;
        Ok(())
    }

    /// Drop (or stop dropping) 5 % of the packets arriving on each side's veth.
    pub fn set_loss(&mut self, on: bool) -> anyhow::Result<()> {
        if on == self.loss {
            return Ok(());
        }
        let op = if on { "-A" } else { "-D" };
        for (ns, v) in [
            (self.a.clone(), self.veth_a.clone()),
            (self.b.clone(), self.veth_b.clone()),
        ] {
            self.exec(
                &ns,
                &[
                    "iptables",
                    op,
                    "INPUT",
                    "-i",
                    &v,
                    "-m",
                    "statistic",
                    "--mode",
                    "random",
                    "--probability",
                    "0.05",
                    "-j",
                    "DROP",
                ],
            )?;
        }
        self.loss = on;
        Ok(())
    }
}

impl Netns {
    /// Packets dropped so far by the loss rules (both namespaces).
    pub fn loss_drops(&self) -> anyhow::Result<u64> {
        let mut n = 0;
        for ns in [&self.a, &self.b] {
            let out = Command::new("ip")
                .args([
                    "netns", "exec", ns, "iptables", "-L", "INPUT", "-v", "-x", "-n",
                ])
                .output()?;
            for l in String::from_utf8_lossy(&out.stdout).lines() {
                if l.contains("statistic") {
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

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of the veth pair and with it the other end.
        for ns in self.made.drain(..) {
            if let Err(e) = run("ip", &["netns", "del", &ns]) {
                eprintln!("vmr-faults: {e:#}");
            }
        }
        if self.route
            && let Err(e) = run("ip", &["route", "del", "blackhole", SUBNET])
        {
            eprintln!("vmr-faults: {e:#}");
        }
    }
}

/// Delete every namespace of this runner and the blackhole route (Ctrl-C path).
pub fn cleanup_this_run() {
    let pid = std::process::id();
    for s in ["a", "b", "probe"] {
        let ns = format!("{PREFIX}{pid}-{s}");
        if Netns::path(&ns).exists() {
            let _ = run("ip", &["netns", "del", &ns]);
        }
    }
    let _ = run("ip", &["route", "del", "blackhole", SUBNET]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_test_addresses_are_in_the_private_test_subnet() {
        for a in [ADDR_A, ADDR_B] {
            let ip: std::net::Ipv4Addr = a.parse().expect("address");
            assert!(ip.is_private(), "{ip}");
            assert_eq!(ip.octets()[..3], [10, 231, 0], "{ip} in {SUBNET}");
        }
    }
}
