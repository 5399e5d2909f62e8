//! Failover network settings inside the guest: the shell script the guest agent runs after a
//! real failover (it finds each interface by MAC, detects the guest's network manager —
//! NetworkManager, systemd-networkd or ifupdown — writes a persistent configuration for it,
//! applies it and checks the addresses; every file it writes is named `*vmreplica-failover*`),
//! and the parsing of the script's report; and [`apply`], which waits for the guest agent of
//! a started VM and runs the script through it (`guest-exec`).

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use vmr_capture::qga::{GuestAgent, QgaError};
use vmr_proto::FailoverInterface;

/// How long [`apply`] waits for the guest agent of a just started VM (its boot included).
pub const AGENT_WAIT: Duration = Duration::from_secs(300);
/// How long the script may run in the guest.
const SCRIPT_LIMIT: Duration = Duration::from_secs(90);

/// Why the settings could not be applied at all.
#[derive(Debug, thiserror::Error)]
pub enum GuestNetError {
    /// The guest agent never answered.
    #[error(
        "the guest agent did not answer within {waited:?} (is qemu-guest-agent installed and running in the guest?)"
    )]
    NoAgent {
        /// How long it was waited for.
        waited: Duration,
        /// The last error.
        #[source]
        last: QgaError,
    },
    /// A guest agent call failed.
    #[error("guest agent call failed")]
    Agent(#[source] QgaError),
    /// The script did not finish in time.
    #[error("the network script did not finish within {0:?} in the guest")]
    ScriptTimeout(Duration),
    /// The guest's answer was not what guest-exec returns.
    #[error("unexpected guest-exec answer: {0}")]
    Unexpected(String),
    /// The script ran but reported nothing.
    #[error("the network script reported nothing (exit code {code:?}): {stderr}")]
    NoReport {
        /// Its exit code.
        code: Option<i64>,
        /// The end of its standard error.
        stderr: String,
    },
}

/// Wait (up to `wait`) for the guest agent at `qga` to answer, run the script for
/// `interfaces` in the guest and return each interface's outcome.
pub async fn apply(
    qga: &Path,
    interfaces: &[FailoverInterface],
    wait: Duration,
) -> Result<Vec<IfaceOutcome>, GuestNetError> {
    let deadline = Instant::now() + wait;
    let mut ga = loop {
        match GuestAgent::connect(qga, Duration::from_secs(5)).await {
            Ok(g) => break g,
            Err(last) => {
                if Instant::now() >= deadline {
                    return Err(GuestNetError::NoAgent { waited: wait, last });
                }
                // The socket exists from QEMU's start; the agent answers once the guest runs it.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    let started = ga
        .execute(
            "guest-exec",
            Some(json!({
                "path": "/bin/sh",
                "arg": ["-s"],
                "input-data": b64.encode(script(interfaces)),
                "capture-output": true,
            })),
        )
        .await
        .map_err(GuestNetError::Agent)?;
    let pid = started
        .get("pid")
        .and_then(Value::as_i64)
        .ok_or_else(|| GuestNetError::Unexpected(started.to_string()))?;
    let until = Instant::now() + SCRIPT_LIMIT;
    let status = loop {
        let st = ga
            .execute("guest-exec-status", Some(json!({ "pid": pid })))
            .await
            .map_err(GuestNetError::Agent)?;
        if st.get("exited").and_then(Value::as_bool) == Some(true) {
            break st;
        }
        if Instant::now() >= until {
            return Err(GuestNetError::ScriptTimeout(SCRIPT_LIMIT));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let text = |k: &str| {
        status
            .get(k)
            .and_then(Value::as_str)
            .and_then(|s| b64.decode(s).ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    };
    let outcomes = parse_report(&text("out-data"));
    if outcomes.is_empty() {
        let err = text("err-data");
        let tail: String = err
            .chars()
            .rev()
            .take(300)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        return Err(GuestNetError::NoReport {
            code: status.get("exitcode").and_then(Value::as_i64),
            stderr: tail,
        });
    }
    Ok(outcomes)
}

/// One interface's outcome, as the script reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfaceOutcome {
    /// The interface's MAC (or "-" for the only interface).
    pub mac: String,
    /// The guest's interface name, when it was found.
    pub ifname: Option<String>,
    /// The network manager configured (`networkmanager`, `networkd`, `ifupdown`, `runtime`).
    pub manager: Option<String>,
    /// `None` when every address is on the interface; else why not.
    pub error: Option<String>,
}

impl std::fmt::Display for IfaceOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ifname = self.ifname.as_deref().unwrap_or("?");
        match (&self.error, &self.manager) {
            (None, Some(m)) => write!(f, "{ifname} ({}) configured with {m}", self.mac),
            (None, None) => write!(f, "{ifname} ({}) configured", self.mac),
            (Some(e), _) => write!(f, "{ifname} ({}): {e}", self.mac),
        }
    }
}

/// Quote for POSIX sh (single quotes).
fn q(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The script for `interfaces` (validated settings). It prints one line per interface:
/// `VMR-NET ok MAC IFNAME MANAGER` or `VMR-NET fail MAC IFNAME-or-- REASON`.
pub fn script(interfaces: &[FailoverInterface]) -> String {
    let mut s = String::from(PRELUDE);
    for i in interfaces {
        let mac = i.mac.clone().unwrap_or_else(|| "-".to_owned());
        let v4: Vec<String> = i
            .addresses
            .iter()
            .filter(|a| a.addr.is_ipv4())
            .map(ToString::to_string)
            .collect();
        let v6: Vec<String> = i
            .addresses
            .iter()
            .filter(|a| a.addr.is_ipv6())
            .map(ToString::to_string)
            .collect();
        let gw = |v4: bool| {
            i.gateways
                .iter()
                .find(|g| g.is_ipv4() == v4)
                .map_or_else(String::new, IpAddr::to_string)
        };
        let dns: Vec<String> = i.dns.iter().map(IpAddr::to_string).collect();
        let _ = writeln!(
            s,
            "configure {} {} {} {} {} {}",
            q(&mac),
            q(&v4.join(" ")),
            q(&gw(true)),
            q(&v6.join(" ")),
            q(&gw(false)),
            q(&dns.join(" "))
        );
    }
    s
}

/// Parse the script's output: one outcome per `VMR-NET` line.
pub fn parse_report(out: &str) -> Vec<IfaceOutcome> {
    out.lines()
        .filter_map(|l| l.strip_prefix("VMR-NET "))
        .filter_map(|l| {
            let mut w = l.splitn(4, ' ');
            let verdict = w.next()?;
            let mac = w.next()?.to_owned();
            let ifname = w.next().filter(|x| *x != "-").map(str::to_owned);
            let rest = w.next().unwrap_or("").to_owned();
            Some(match verdict {
                "ok" => IfaceOutcome {
                    mac,
                    ifname,
                    manager: Some(rest),
                    error: None,
                },
                _ => IfaceOutcome {
                    mac,
                    ifname,
                    manager: None,
                    error: Some(if rest.is_empty() {
                        "failed".to_owned()
                    } else {
                        rest
                    }),
                },
            })
        })
        .collect()
}

/// The script's fixed part: helpers and `configure MAC V4 GW4 V6 GW6 DNS` (space-separated
/// lists; "-" as MAC = the only Ethernet interface with a device).
const PRELUDE: &str = r##"#!/bin/sh
# Written by vmreplica: applies this host's failover network settings after a failover.
set -u
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
TAG=vmreplica-failover

find_if() {
  if [ "$1" = - ]; then
    n=0; found=
    for d in /sys/class/net/*; do
      [ -e "$d/device" ] || continue
      [ "$(cat "$d/type" 2>/dev/null)" = 1 ] || continue
      n=$((n + 1)); found=${d##*/}
    done
    [ "$n" -eq 1 ] && { echo "$found"; return 0; }
    echo "found $n Ethernet interfaces, give a MAC" >&2; return 1
  fi
  for d in /sys/class/net/*; do
    [ "$(cat "$d/address" 2>/dev/null)" = "$1" ] && { echo "${d##*/}"; return 0; }
  done
  echo "no interface with MAC $1" >&2; return 1
}

manager() {
  if command -v nmcli >/dev/null 2>&1 && nmcli -t -f RUNNING general 2>/dev/null | grep -q '^running'; then
    echo networkmanager
  elif systemctl is-active -q systemd-networkd 2>/dev/null; then
    echo networkd
  elif command -v ifup >/dev/null 2>&1 && [ -f /etc/network/interfaces ]; then
    echo ifupdown
  elif [ -x /lib/systemd/systemd-networkd ] || [ -x /usr/lib/systemd/systemd-networkd ]; then
    echo networkd
  else
    echo runtime
  fi
}

prefix_of() { echo "${1#*/}"; }
addr_of() { echo "${1%/*}"; }

cfg_networkd() { # ifname mac v4 gw4 v6 gw6 dns
  f=/etc/systemd/network/05-$TAG-$1.network
  {
    echo "# Written by vmreplica (failover network settings)."
    echo "[Match]"
    echo "Name=$1"
    echo "[Network]"
    for a in $3 $5; do echo "Address=$a"; done
    if [ -n "$4" ]; then echo "Gateway=$4"; fi
    if [ -n "$6" ]; then echo "Gateway=$6"; fi
    for d in $7; do echo "DNS=$d"; done
    if [ -z "$5" ]; then echo "IPv6AcceptRA=no"; fi
  } > "$f.tmp" && mv "$f.tmp" "$f" || { echo "cannot write $f" >&2; return 1; }
  systemctl enable -q systemd-networkd >/dev/null 2>&1
  if systemctl is-active -q systemd-networkd; then
    networkctl reload >/dev/null 2>&1 || systemctl restart systemd-networkd
    networkctl reconfigure "$1" >/dev/null 2>&1 || systemctl restart systemd-networkd
  else
    systemctl start systemd-networkd
  fi
}

cfg_nm() { # ifname mac v4 gw4 v6 gw6 dns
  f=/etc/NetworkManager/system-connections/$TAG-$1.nmconnection
  d4=; d6=
  for d in $7; do case $d in *:*) d6="$d6$d;";; *) d4="$d4$d;";; esac; done
  {
    echo "# Written by vmreplica (failover network settings)."
    echo "[connection]"; echo "id=$TAG-$1"; echo "type=ethernet"; echo "interface-name=$1"
    echo "autoconnect-priority=100"
    echo "[ipv4]"
    if [ -n "$3" ]; then
      echo "method=manual"; i=1
      for a in $3; do echo "address$i=$a"; i=$((i + 1)); done
      if [ -n "$4" ]; then echo "gateway=$4"; fi
      if [ -n "$d4" ]; then echo "dns=$d4"; fi
    else echo "method=disabled"; fi
    echo "[ipv6]"
    if [ -n "$5" ]; then
      echo "method=manual"; i=1
      for a in $5; do echo "address$i=$a"; i=$((i + 1)); done
      if [ -n "$6" ]; then echo "gateway=$6"; fi
      if [ -n "$d6" ]; then echo "dns=$d6"; fi
    else echo "method=ignore"; fi
  } > "$f.tmp" && chmod 600 "$f.tmp" && mv "$f.tmp" "$f" || { echo "cannot write $f" >&2; return 1; }
  nmcli connection reload && nmcli connection up "$TAG-$1" >/dev/null
}

cfg_ifupdown() { # ifname mac v4 gw4 v6 gw6 dns
  ifdown "$1" >/dev/null 2>&1
  # Earlier stanzas for this interface would fight ours: comment them out (a copy stays).
  if grep -Eq "^[[:space:]]*(auto|allow-hotplug|iface)[[:space:]]+$1([[:space:]]|\$)" /etc/network/interfaces; then
    cp -p /etc/network/interfaces "/etc/network/interfaces.$TAG-backup"
    sed -i -E "/^[[:space:]]*(auto|allow-hotplug)[[:space:]]+$1([[:space:]]|\$)/s/^/# $TAG: /; /^[[:space:]]*iface[[:space:]]+$1[[:space:]]/,/^[[:space:]]*(iface|auto|allow-|source|mapping)/{/^[[:space:]]*iface[[:space:]]+$1[[:space:]]/s/^/# $TAG: /; /^[[:space:]]+[^#[:space:]]/s/^/# $TAG: /}" /etc/network/interfaces
  fi
  grep -Eq '^[[:space:]]*source(-directory)?[[:space:]]+/etc/network/interfaces.d' /etc/network/interfaces ||
    echo 'source /etc/network/interfaces.d/*' >> /etc/network/interfaces
  mkdir -p /etc/network/interfaces.d
  f=/etc/network/interfaces.d/$TAG-$1
  {
    echo "# Written by vmreplica (failover network settings)."
    echo "auto $1"
    first=1
    for a in $3; do
      if [ $first = 1 ]; then
        echo "iface $1 inet static"; echo "    address $a"
        if [ -n "$4" ]; then echo "    gateway $4"; fi
        if [ -n "$7" ]; then echo "    dns-nameservers $7"; fi
        first=0
      else echo "    up ip addr add $a dev $1"; fi
    done
    first=1
    for a in $5; do
      if [ $first = 1 ]; then
        echo "iface $1 inet6 static"; echo "    address $a"
        if [ -n "$6" ]; then echo "    gateway $6"; fi
        first=0
      else echo "    up ip -6 addr add $a dev $1"; fi
    done
  } > "$f.tmp" && mv "$f.tmp" "$f" || { echo "cannot write $f" >&2; return 1; }
  ifup "$1"
}

cfg_runtime() { # ifname mac v4 gw4 v6 gw6 dns
  ip link set "$1" up || return 1
  ip addr flush dev "$1" scope global
  for a in $3 $5; do ip addr add "$a" dev "$1" || return 1; done
  [ -n "$4" ] && { ip route replace default via "$4" dev "$1" || return 1; }
  [ -n "$6" ] && { ip -6 route replace default via "$6" dev "$1" || return 1; }
  return 0
}

configure() { # mac v4 gw4 v6 gw6 dns
  if ! ifn=$(find_if "$1" 2>/tmp/$TAG.err); then
    echo "VMR-NET fail $1 - $(cat /tmp/$TAG.err)"; return
  fi
  m=$(manager)
  case $m in
    networkmanager) cfg_nm "$ifn" "$1" "$2" "$3" "$4" "$5" "$6" ;;
    networkd) cfg_networkd "$ifn" "$1" "$2" "$3" "$4" "$5" "$6" ;;
    ifupdown) cfg_ifupdown "$ifn" "$1" "$2" "$3" "$4" "$5" "$6" ;;
    *) cfg_runtime "$ifn" "$1" "$2" "$3" "$4" "$5" "$6" ;;
  esac >/tmp/$TAG.log 2>&1
  rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "VMR-NET fail $1 $ifn $m configuration failed (exit $rc): $(tail -n 3 /tmp/$TAG.log | tr '\n' ' ')"
    return
  fi
  # The addresses must show up (a manager applies them asynchronously: wait up to 20 s).
  missing=
  for try in $(seq 1 40); do
    missing=
    for a in $2 $4; do
      ip -o addr show dev "$ifn" | grep -q " $(addr_of "$a")/$(prefix_of "$a") " || missing="$missing $a"
    done
    [ -z "$missing" ] && break
    sleep 0.5
  done
  if [ -z "$missing" ]; then
    echo "VMR-NET ok $1 $ifn $m"
  else
    echo "VMR-NET fail $1 $ifn $m did not bring up$missing: $(tail -n 3 /tmp/$TAG.log | tr '\n' ' ')"
  fi
}

"##;

#[cfg(test)]
mod tests {
    use super::*;
    use vmr_proto::FailoverSettings;

    fn ifaces() -> Vec<FailoverInterface> {
        FailoverSettings::interfaces_from_args(
            &[
                "52:54:00:12:34:56=10.2.0.5/24".into(),
                "52:54:00:12:34:56=fd00::5/64".into(),
                "52:54:00:12:34:57=10.3.0.5/16".into(),
            ],
            &["52:54:00:12:34:56=10.2.0.1".into()],
            &["52:54:00:12:34:56=10.2.0.2".into()],
        )
        .expect("valid")
    }

    #[test]
    fn script_has_one_configure_per_interface_and_is_valid_sh() {
        let s = script(&ifaces());
        let calls: Vec<&str> = s.lines().filter(|l| l.starts_with("configure ")).collect();
        assert_eq!(
            calls,
            [
                "configure '52:54:00:12:34:56' '10.2.0.5/24' '10.2.0.1' 'fd00::5/64' '' '10.2.0.2'",
                "configure '52:54:00:12:34:57' '10.3.0.5/16' '' '' '' ''",
            ]
        );
        // The guest runs it with /bin/sh: it must at least parse (dash -n).
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("s.sh");
        std::fs::write(&p, &s).expect("write");
        let st = std::process::Command::new("sh")
            .arg("-n")
            .arg(&p)
            .status()
            .expect("sh");
        assert!(st.success());
    }

    #[test]
    fn quoting_survives_quotes() {
        assert_eq!(q("a'b"), r"'a'\''b'");
    }

    #[test]
    fn report_lines_parse() {
        let out = "noise\nVMR-NET ok 52:54:00:12:34:56 enp0s2 networkd\n\
                   VMR-NET fail 52:54:00:12:34:57 - no interface with MAC 52:54:00:12:34:57\n\
                   VMR-NET fail - ens3 runtime did not bring up 10.2.0.5/24: x\n";
        let r = parse_report(out);
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].ifname.as_deref(), Some("enp0s2"));
        assert_eq!(r[0].manager.as_deref(), Some("networkd"));
        assert!(r[0].error.is_none());
        assert_eq!(r[1].ifname, None);
        assert_eq!(
            r[1].error.as_deref(),
            Some("no interface with MAC 52:54:00:12:34:57")
        );
        assert_eq!(
            r[2].to_string(),
            "ens3 (-): runtime did not bring up 10.2.0.5/24: x"
        );
    }
}
