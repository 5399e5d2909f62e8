//! Failover decisions as pure functions: which replication state a failover operation
//! (prepare, start, test, cancel, complete, reverse) leads to from the current state and
//! mode, following Hyper-V's rules, or why it is refused; and the split-brain guard of an
//! unplanned failover: which address the replica probes the primary at
//! ([`probe_address`], [`check_probe_target`]) and what the probe's result means
//! ([`split_brain_verdict`]); and where a planned failover's final cycle is read from
//! ([`prepare_source`]: the running QEMU, or the images once QEMU has exited; for a
//! libvirt-managed VM [`libvirt_prepare`]), how a failover through libvirt presents the
//! domain ([`failover_domain`]), and which launcher starts the VM on the failover host
//! ([`failover_launcher`]: the replicated domain XML or one generated from a plain-QEMU
//! definition through libvirt, or QEMU, with a command line made from a domain XML on a host
//! without libvirt). The primary and
//! replica machines apply them; the agent carries out what they decide.

use std::net::{IpAddr, SocketAddr};

use vmr_proto::api::{ReplicationMode, ReplicationState};

use crate::refusal::{Op, Refusal};

/// The state `op` (one of [`Op::Prepare`], [`Op::Start`], [`Op::Test`], [`Op::Cancel`],
/// [`Op::Complete`], [`Op::Reverse`]) leads to (for `Test`: the unchanged state; for `Cancel`:
/// `Replicating`, which the replica machine replaces by the state before the failover), or
/// why it is refused. `has_point`: the replica holds at least one recovery point.
pub fn failover_transition(
    mode: ReplicationMode,
    state: ReplicationState,
    op: Op,
    has_point: bool,
) -> Result<ReplicationState, Refusal> {
    use ReplicationMode as M;
    use ReplicationState as S;
    let side = |wanted: M| {
        if mode == wanted {
            Ok(())
        } else {
            Err(Refusal::WrongSide {
                op,
                wanted,
                actual: mode,
            })
        }
    };
    let refuse = || Err(Refusal::State { op, state });
    match op {
        Op::Prepare => {
            side(M::Primary)?;
            match state {
                S::Replicating if has_point => Ok(S::PreparedForFailover),
                S::Replicating => Err(Refusal::NoInitialCopy { op }),
                S::Disabled => Err(Refusal::NotEnabled { op }),
                _ => refuse(),
            }
        }
        Op::Start | Op::Test => {
            side(M::Replica)?;
            match state {
                S::Replicating
                | S::Suspended
                | S::Resynchronizing
                | S::ResynchronizeSuspended
                | S::WaitingForInitialReplication => {
                    if !has_point {
                        return Err(Refusal::NoInitialCopy { op });
                    }
                    Ok(if op == Op::Start {
                        S::FailedOverWaitingCompletion
                    } else {
                        state
                    })
                }
                S::Disabled => Err(Refusal::Disabled { op }),
                _ => refuse(),
            }
        }
        Op::Cancel => {
            side(M::Replica)?;
            match state {
                S::FailedOverWaitingCompletion => Ok(S::Replicating),
                _ => refuse(),
            }
        }
        Op::Complete => {
            side(M::Replica)?;
            match state {
                S::FailedOverWaitingCompletion => Ok(S::FailedOver),
                _ => refuse(),
            }
        }
        Op::Reverse => {
            side(M::Replica)?;
            match state {
                S::FailedOverWaitingCompletion | S::FailedOver => Ok(S::Replicating),
                _ => refuse(),
            }
        }
        _ => refuse(),
    }
}

/// The address the replica probes the primary at, from what the primary reports with each
/// `replica-info` call (`reported`: its advertised address, else its listen address) and the
/// address its authenticated connection came from (`seen`). A reported wildcard host
/// (`0.0.0.0`, `::`), or a loopback host while the connection came from elsewhere (it would
/// name this host here), is replaced by the seen address with the reported port; another
/// reported address (or host name) is used as is; without a report there is nothing to probe.
pub fn probe_address(reported: Option<&str>, seen: Option<IpAddr>) -> Option<String> {
    let reported = reported?.trim();
    let seen = seen.map(|ip| ip.to_canonical());
    let from_elsewhere = seen.is_some_and(|ip| !ip.is_loopback());
    match reported.parse::<SocketAddr>() {
        Ok(a) if a.ip().is_unspecified() || (a.ip().is_loopback() && from_elsewhere) => {
            let ip = seen?;
            (!ip.is_unspecified()).then(|| SocketAddr::new(ip, a.port()).to_string())
        }
        Ok(a) => Some(a.to_string()),
        Err(_) => (!reported.is_empty()).then(|| reported.to_owned()),
    }
}

/// Why an address cannot be probed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnusableProbe {
    /// The primary's address is not known (no `replica-info` call since the agent started
    /// recording it).
    #[error("the primary's address is unknown (it has not called since)")]
    Unknown,
    /// A wildcard address names no host.
    #[error("{addr} is a wildcard address")]
    Wildcard {
        /// The address.
        addr: String,
    },
    /// Port 0 or no port.
    #[error("{addr} has no port")]
    NoPort {
        /// The address.
        addr: String,
    },
    /// The address is this agent's own listener.
    #[error("{addr} is this agent's own listener")]
    OwnListener {
        /// The address.
        addr: String,
    },
}

/// Checks that `addr` can be probed: known, not a wildcard, with a port, and not this agent's
/// own listener `own` (the same address, or the same port on a loopback address while `own`
/// is a wildcard). Host names pass (the pinned fingerprint refuses a wrong host).
pub fn check_probe_target(
    addr: Option<&str>,
    own: Option<SocketAddr>,
) -> Result<(), UnusableProbe> {
    let addr = addr.ok_or(UnusableProbe::Unknown)?;
    let Ok(a) = addr.parse::<SocketAddr>() else {
        let port = addr
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok());
        return match port {
            Some(p) if p != 0 => Ok(()),
            _ => Err(UnusableProbe::NoPort {
                addr: addr.to_owned(),
            }),
        };
    };
    let ip = a.ip().to_canonical();
    if ip.is_unspecified() {
        return Err(UnusableProbe::Wildcard {
            addr: addr.to_owned(),
        });
    }
    if a.port() == 0 {
        return Err(UnusableProbe::NoPort {
            addr: addr.to_owned(),
        });
    }
    if let Some(own) = own {
        let own_ip = own.ip().to_canonical();
        let same_host = own_ip == ip || (own_ip.is_unspecified() && ip.is_loopback());
        if own.port() == a.port() && same_host {
            return Err(UnusableProbe::OwnListener {
                addr: addr.to_owned(),
            });
        }
    }
    Ok(())
}

/// What the replica's split-brain probe of the primary found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrimaryProbe {
    /// The primary answered `primary-vm-state`.
    Answered {
        /// Its VM runs (a `PreparedForFailover` VM counts as not running).
        running: bool,
    },
    /// Nothing answers at the primary's address: host or network unreachable, or no answer in
    /// time. The primary is lost.
    Lost,
    /// The probe could not be made or its answer cannot be trusted: no usable address, the
    /// primary's host answering with no agent listening (connection refused: its VM may still
    /// run), a TLS failure, another identity answering, or the primary refusing the call.
    Failed {
        /// Why, for the message.
        reason: String,
    },
}

/// What the split-brain guard decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SplitBrain {
    /// Fail over.
    Proceed,
    /// Refuse: the primary's VM runs.
    PrimaryRuns,
    /// Refuse: the primary's state cannot be checked (`--force` overrides).
    Unchecked {
        /// Why.
        reason: String,
    },
}

/// The split-brain guard of an unplanned `failover start`: proceed when forced, when the
/// primary is lost, or when it answers that its VM does not run; refuse otherwise.
pub fn split_brain_verdict(probe: PrimaryProbe, force: bool) -> SplitBrain {
    if force {
        return SplitBrain::Proceed;
    }
    match probe {
        PrimaryProbe::Answered { running: false } | PrimaryProbe::Lost => SplitBrain::Proceed,
        PrimaryProbe::Answered { running: true } => SplitBrain::PrimaryRuns,
        PrimaryProbe::Failed { reason } => SplitBrain::Unchecked { reason },
    }
}

/// What a probe across an extended chain found, as one probe of the VM's primary. `source` is
/// what the replica's probe of its source found (the source answered whether the VM runs
/// there, or the source could not be reached); `upstream` is what the source, itself a
/// replica forwarding the VM's points, found when it probed its own primary, relayed in its
/// answer (`None`: the source is the VM's primary, or an older agent that does not relay).
///
/// The VM runs when it runs on either host; when the source answered that it does not run
/// there, its primary's probe decides (lost → lost, unchecked → unchecked, naming the hop); a
/// source that cannot be reached is the probe's result whatever lies behind it (the same rules
/// as a two-host failover: unreachable = lost, refused = unchecked).
pub fn chain_probe(source: PrimaryProbe, upstream: Option<PrimaryProbe>) -> PrimaryProbe {
    match (source, upstream) {
        (PrimaryProbe::Answered { running: true }, _) => PrimaryProbe::Answered { running: true },
        (PrimaryProbe::Answered { running: false }, None) => {
            PrimaryProbe::Answered { running: false }
        }
        (PrimaryProbe::Answered { running: false }, Some(PrimaryProbe::Failed { reason })) => {
            PrimaryProbe::Failed {
                reason: format!("the source could not check its own primary: {reason}"),
            }
        }
        (PrimaryProbe::Answered { running: false }, Some(up)) => up,
        (other, _) => other,
    }
}

/// What `failover prepare` found at the primary VM's QMP monitor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmProbe {
    /// QEMU answered `query-status`.
    Status {
        /// Its `running` field (a guest shut down with `-no-shutdown`, or paused: false).
        running: bool,
        /// Its `status` field, for the message.
        status: String,
    },
    /// The monitor answered but knows no `query-status`: a qemu-storage-daemon stand-in (no
    /// guest; its writers are the admin's to stop).
    NoGuest,
    /// Nothing listens at the monitor's socket (the socket is missing, or the connection is
    /// refused): the VM's process has exited (or runs without that monitor: the images'
    /// locks tell).
    NoListener,
    /// Something listens but does not answer (busy, hung), or `query-status` failed: the
    /// process may still run.
    Unresponsive {
        /// Why, for the message.
        reason: String,
    },
}

/// Where the final cycle of a planned failover is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrepareSource {
    /// The VM's own QEMU (still running, guest shut down), through its QMP monitor.
    Vm,
    /// The VM's images, opened by a qemu-storage-daemon of the agent's (QEMU exited; a clean
    /// exit stored the persistent dirty bitmaps in them, which the daemon loads). The daemon
    /// cannot open images a running process holds (QEMU's image locking), and lost or
    /// inconsistent bitmaps make the cycle fail with a resynchronisation required: never a
    /// delta from tracking that missed writes.
    Images,
}

/// Why `failover prepare` refuses to ship the final cycle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrepareRefusal {
    /// The guest runs: it must be shut down first.
    Running {
        /// QEMU's status.
        status: String,
    },
    /// The monitor is there but does not answer: the VM may run.
    Unresponsive {
        /// Why.
        reason: String,
    },
}

/// Where `failover prepare` reads the final cycle from, given what the VM's monitor showed.
pub fn prepare_source(probe: VmProbe) -> Result<PrepareSource, PrepareRefusal> {
    match probe {
        VmProbe::Status {
            running: true,
            status,
        } => Err(PrepareRefusal::Running { status }),
        VmProbe::Status { running: false, .. } | VmProbe::NoGuest => Ok(PrepareSource::Vm),
        VmProbe::NoListener => Ok(PrepareSource::Images),
        VmProbe::Unresponsive { reason } => Err(PrepareRefusal::Unresponsive { reason }),
    }
}

/// How a failover presents a VM replicated from a libvirt domain on the replica host's
/// libvirt ([`failover_domain`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailoverDomainIdentity {
    /// The domain's name there.
    pub name: String,
    /// The primary's UUID is kept (otherwise libvirt gives the domain a new one).
    pub keep_uuid: bool,
    /// The domain's network interfaces are kept (otherwise every one is removed).
    pub keep_interfaces: bool,
}

/// A failover is the same machine (the domain's name and UUID, its interfaces on the replica
/// host's networks); a test copy must coexist with it and never meet the production network:
/// `DOMAIN-test`, a new UUID, no interfaces.
pub fn failover_domain(domain: &str, test: bool) -> FailoverDomainIdentity {
    FailoverDomainIdentity {
        name: if test {
            format!("{domain}-test")
        } else {
            domain.to_owned()
        },
        keep_uuid: !test,
        keep_interfaces: !test,
    }
}

/// Whether reverse replication starts with a resync (block hashes compared with the old
/// primary's point, only differing blocks shipped) rather than a cycle on top of the failover
/// point: when the old primary's disks differ from that point (`old_differs`: it says so,
/// after an unplanned failover), or when nothing tracked the failed-over VM's writes since
/// the failover (`tracked`: false for a domain failed over through libvirt, which has no
/// checkpoint yet: its first cycle reads every block either way, and as a resync it ships only
/// what changed instead of the whole disks).
pub fn reverse_resyncs(old_differs: bool, tracked: bool) -> bool {
    old_differs || !tracked
}

/// A domain of the failed-over domain's name already defined on the replica host's libvirt
/// ([`existing_domain`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExistingDomain {
    /// Its UUID is the VM's own (the primary's).
    pub same_uuid: bool,
    /// It is active.
    pub running: bool,
}

/// What a failover does on the replica host's libvirt ([`existing_domain`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefineFailoverDomain {
    /// No domain of that name: define it.
    Define,
    /// The VM's own definition, shut off (this host ran the VM before: failing back after a
    /// planned failover and reverse): replace it with the failover's (on this host's overlays),
    /// keeping the old one to restore at `cancel`; vmreplica's checkpoints of it describe the
    /// old images and go.
    Replace,
}

/// Why a failover does not define its domain ([`existing_domain`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExistingDomainRefusal {
    /// A domain of that name with another UUID (someone else's, or an earlier test copy).
    Other,
    /// The VM's own domain runs on this host: the VM would run twice.
    Running,
}

/// A failover meets a domain of its name on the replica host (`existing`, `None`: none):
/// only the VM's own definition, shut off, is replaced, and only by a real failover (a test
/// copy has a new UUID, so a domain of its name is another copy's or someone else's).
pub fn existing_domain(
    existing: Option<ExistingDomain>,
    keep_uuid: bool,
) -> Result<DefineFailoverDomain, ExistingDomainRefusal> {
    match existing {
        None => Ok(DefineFailoverDomain::Define),
        Some(e) if !keep_uuid || !e.same_uuid => Err(ExistingDomainRefusal::Other),
        Some(ExistingDomain { running: true, .. }) => Err(ExistingDomainRefusal::Running),
        Some(_) => Ok(DefineFailoverDomain::Replace),
    }
}

/// How `failover prepare` of a libvirt-managed VM gets to its final cycle
/// ([`libvirt_prepare`]). libvirt takes backup jobs of active domains only, so the final
/// cycle is always taken from the domain started paused (the guest never runs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LibvirtPrepare {
    /// Shut the guest down through libvirt (ACPI; at the admin's timeout the domain is
    /// destroyed: the admin asked for the shutdown), then start it paused.
    ShutDownThenStartPaused,
    /// The domain is shut off: start it paused.
    StartPaused,
}

/// The libvirt counterpart of [`prepare_source`]: `runs` = libvirt reports the domain active,
/// `shutdown` = `--shutdown` was given. A running domain without `--shutdown` is refused.
pub fn libvirt_prepare(runs: bool, shutdown: bool) -> Result<LibvirtPrepare, PrepareRefusal> {
    match (runs, shutdown) {
        (true, false) => Err(PrepareRefusal::Running {
            status: "running (libvirt)".to_owned(),
        }),
        (true, true) => Ok(LibvirtPrepare::ShutDownThenStartPaused),
        (false, _) => Ok(LibvirtPrepare::StartPaused),
    }
}

/// What a failover starts the VM with ([`failover_launcher`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailoverLauncher {
    /// This host's libvirt, from the replicated domain XML (a VM replicated from a libvirt
    /// domain).
    LibvirtReplicatedXml,
    /// This host's libvirt, from a domain XML generated from the replicated QEMU definition
    /// (a plain-QEMU primary failing over into a host whose agent manages VMs through
    /// libvirt: `virsh list` shows it, reverse captures it through libvirt).
    LibvirtGeneratedXml,
    /// Plain QEMU: the definition's program and arguments, started by the agent.
    Qemu,
    /// Plain QEMU with a command line made from the replicated domain XML (a VM replicated
    /// from a libvirt domain failing over on a host without libvirt).
    QemuFromDomainXml,
}

/// Why a failover cannot start the replicated definition on this host.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LauncherRefusal {
    /// Neither a QEMU command line nor a domain XML.
    #[error("the replicated definition has neither a QEMU command line nor a libvirt domain XML")]
    NothingToStart,
}

/// Which launcher a failover uses. `qemu_command`: the replicated definition has a QEMU
/// program and arguments (not the `libvirt` marker); `domain_xml`: it carries a libvirt
/// domain's XML; `host_libvirt`: this host's agent manages VMs through libvirt
/// (`libvirt-connect` in its config.toml); `libvirt_default_reachable`: without that setting,
/// the default `qemu:///system` answers (the behaviour before mixed setups: a domain XML was
/// always started through it).
///
/// | QEMU command | domain XML | host libvirt | launcher |
/// |---|---|---|---|
/// | any | yes | yes | libvirt, the replicated XML |
/// | no | yes | no | libvirt at the default URI when it answers, else QEMU from the domain XML |
/// | yes | yes | no | QEMU |
/// | yes | no | yes | libvirt, an XML generated from the QEMU definition |
/// | yes | no | no | QEMU |
pub fn failover_launcher(
    qemu_command: bool,
    domain_xml: bool,
    host_libvirt: bool,
    libvirt_default_reachable: bool,
) -> Result<FailoverLauncher, LauncherRefusal> {
    use FailoverLauncher as L;
    match (qemu_command, domain_xml, host_libvirt) {
        (_, true, true) => Ok(L::LibvirtReplicatedXml),
        (false, true, false) if libvirt_default_reachable => Ok(L::LibvirtReplicatedXml),
        (false, true, false) => Ok(L::QemuFromDomainXml),
        (true, true, false) => Ok(L::Qemu),
        (true, false, true) => Ok(L::LibvirtGeneratedXml),
        (true, false, false) => Ok(L::Qemu),
        (false, false, _) => Err(LauncherRefusal::NothingToStart),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Op as O;
    use ReplicationMode as M;
    use ReplicationState as S;

    #[test]
    fn launcher_table() {
        use FailoverLauncher as L;
        use LauncherRefusal as R;
        // (qemu command, domain xml, host libvirt, default libvirt answers, expected)
        type Row = (bool, bool, bool, bool, Result<L, R>);
        let rows: &[Row] = &[
            (true, true, true, false, Ok(L::LibvirtReplicatedXml)),
            (false, true, true, false, Ok(L::LibvirtReplicatedXml)),
            (false, true, false, true, Ok(L::LibvirtReplicatedXml)),
            (false, true, false, false, Ok(L::QemuFromDomainXml)),
            (true, true, false, false, Ok(L::Qemu)),
            (true, true, false, true, Ok(L::Qemu)),
            (true, false, true, false, Ok(L::LibvirtGeneratedXml)),
            (true, false, true, true, Ok(L::LibvirtGeneratedXml)),
            (true, false, false, true, Ok(L::Qemu)),
            (true, false, false, false, Ok(L::Qemu)),
            (false, false, true, true, Err(R::NothingToStart)),
            (false, false, false, false, Err(R::NothingToStart)),
        ];
        for (q, x, h, d, want) in rows {
            assert_eq!(
                &failover_launcher(*q, *x, *h, *d),
                want,
                "qemu {q} xml {x} host libvirt {h} default answers {d}"
            );
        }
    }

    #[test]
    fn table() {
        // (mode, state, op, has_point, expected: Some(state) or None = refused)
        let rows: &[(M, S, O, bool, Option<S>)] = &[
            (
                M::Primary,
                S::Replicating,
                O::Prepare,
                true,
                Some(S::PreparedForFailover),
            ),
            (M::Primary, S::Suspended, O::Prepare, true, None),
            (
                M::Primary,
                S::InitialReplicationInProgress,
                O::Prepare,
                false,
                None,
            ),
            (M::Replica, S::Replicating, O::Prepare, true, None),
            (
                M::Replica,
                S::Replicating,
                O::Start,
                true,
                Some(S::FailedOverWaitingCompletion),
            ),
            (
                M::Replica,
                S::Suspended,
                O::Start,
                true,
                Some(S::FailedOverWaitingCompletion),
            ),
            (
                M::Replica,
                S::WaitingForInitialReplication,
                O::Start,
                false,
                None,
            ),
            (
                M::Replica,
                S::FailedOverWaitingCompletion,
                O::Start,
                true,
                None,
            ),
            (M::Replica, S::FailedOver, O::Start, true, None),
            (M::Primary, S::Replicating, O::Start, true, None),
            (
                M::Replica,
                S::Replicating,
                O::Test,
                true,
                Some(S::Replicating),
            ),
            (M::Replica, S::Replicating, O::Test, false, None),
            (
                M::Replica,
                S::FailedOverWaitingCompletion,
                O::Test,
                true,
                None,
            ),
            (
                M::Replica,
                S::FailedOverWaitingCompletion,
                O::Cancel,
                true,
                Some(S::Replicating),
            ),
            (M::Replica, S::FailedOver, O::Cancel, true, None),
            (M::Replica, S::Replicating, O::Cancel, true, None),
            (
                M::Replica,
                S::FailedOverWaitingCompletion,
                O::Complete,
                true,
                Some(S::FailedOver),
            ),
            (M::Replica, S::Replicating, O::Complete, true, None),
            (
                M::Replica,
                S::FailedOver,
                O::Reverse,
                true,
                Some(S::Replicating),
            ),
            (
                M::Replica,
                S::FailedOverWaitingCompletion,
                O::Reverse,
                true,
                Some(S::Replicating),
            ),
            (M::Replica, S::Replicating, O::Reverse, true, None),
            (M::Primary, S::PreparedForFailover, O::Reverse, true, None),
        ];
        for (mode, state, op, has, want) in rows {
            let got = failover_transition(*mode, *state, *op, *has).ok();
            assert_eq!(got, *want, "{mode:?} {state} {op:?} has_point={has}");
        }
    }

    #[test]
    fn probe_address_table() {
        let seen = |s: &str| Some(s.parse::<IpAddr>().expect("ip"));
        let rows: &[(Option<&str>, Option<IpAddr>, Option<&str>)] = &[
            // A wildcard listener: the address the connection came from, the reported port.
            (
                Some("0.0.0.0:7000"),
                seen("10.0.0.5"),
                Some("10.0.0.5:7000"),
            ),
            (Some("[::]:7000"), seen("10.0.0.5"), Some("10.0.0.5:7000")),
            (
                Some("[::]:7000"),
                seen("::ffff:10.0.0.5"),
                Some("10.0.0.5:7000"),
            ),
            (Some("[::]:7000"), seen("fd00::5"), Some("[fd00::5]:7000")),
            (Some("0.0.0.0:7000"), None, None),
            (Some("0.0.0.0:7000"), seen("0.0.0.0"), None),
            // A specific listener or an advertised address: as reported.
            (
                Some("127.0.0.2:7000"),
                seen("127.0.0.1"),
                Some("127.0.0.2:7000"),
            ),
            (
                Some("primary.example:7000"),
                seen("10.0.0.5"),
                Some("primary.example:7000"),
            ),
            (
                Some("10.0.0.7:7000"),
                seen("10.0.0.5"),
                Some("10.0.0.7:7000"),
            ),
            // A loopback listener of a primary on another host would name this host here.
            (
                Some("127.0.0.1:7000"),
                seen("10.0.0.5"),
                Some("10.0.0.5:7000"),
            ),
            (Some("[::1]:7000"), seen("10.0.0.5"), Some("10.0.0.5:7000")),
            (None, seen("10.0.0.5"), None),
            (Some(""), seen("10.0.0.5"), None),
        ];
        for (reported, seen, want) in rows {
            assert_eq!(
                probe_address(*reported, *seen).as_deref(),
                *want,
                "{reported:?} seen {seen:?}"
            );
        }
    }

    #[test]
    fn probe_targets_table() {
        let own = |s: &str| Some(s.parse::<SocketAddr>().expect("addr"));
        let rows: &[(Option<&str>, Option<SocketAddr>, bool)] = &[
            (Some("127.0.0.2:7000"), own("127.0.0.3:7000"), true),
            (Some("127.0.0.1:7001"), own("127.0.0.1:7000"), true),
            (Some("10.0.0.5:7000"), own("0.0.0.0:7000"), true),
            (Some("primary.example:7000"), own("0.0.0.0:7000"), true),
            (None, own("127.0.0.3:7000"), false),
            (Some("0.0.0.0:7000"), own("127.0.0.3:7000"), false),
            (Some("[::]:7000"), own("127.0.0.3:7000"), false),
            (Some("127.0.0.2:0"), own("127.0.0.3:7000"), false),
            (Some("primary.example"), None, false),
            (Some("127.0.0.3:7000"), own("127.0.0.3:7000"), false),
            (Some("127.0.0.1:7000"), own("0.0.0.0:7000"), false),
            (
                Some("[::ffff:127.0.0.3]:7000"),
                own("127.0.0.3:7000"),
                false,
            ),
        ];
        for (addr, own, ok) in rows {
            assert_eq!(
                check_probe_target(*addr, *own).is_ok(),
                *ok,
                "{addr:?} own {own:?}: {:?}",
                check_probe_target(*addr, *own)
            );
        }
    }

    #[test]
    fn split_brain_table() {
        use PrimaryProbe as P;
        use SplitBrain as V;
        let failed = || P::Failed {
            reason: "tls".into(),
        };
        let rows: &[(P, bool, V)] = &[
            (P::Answered { running: true }, false, V::PrimaryRuns),
            (P::Answered { running: false }, false, V::Proceed),
            (P::Lost, false, V::Proceed),
            (
                failed(),
                false,
                V::Unchecked {
                    reason: "tls".into(),
                },
            ),
            (P::Answered { running: true }, true, V::Proceed),
            (failed(), true, V::Proceed),
        ];
        for (probe, force, want) in rows {
            assert_eq!(
                split_brain_verdict(probe.clone(), *force),
                *want,
                "{probe:?} force={force}"
            );
        }
    }

    #[test]
    fn chain_probe_table() {
        use PrimaryProbe as P;
        let failed = |r: &str| P::Failed { reason: r.into() };
        let runs = P::Answered { running: true };
        let off = P::Answered { running: false };
        let via = "the source could not check its own primary: refused";
        // (C's probe of B, B's probe of A relayed, the combined probe, the verdict)
        let rows: &[(P, Option<P>, P)] = &[
            // B is the primary itself (or relays nothing): B's answer alone.
            (runs.clone(), None, runs.clone()),
            (off.clone(), None, off.clone()),
            // B runs the VM (failed over there): refused whatever A says.
            (runs.clone(), Some(P::Lost), runs.clone()),
            (runs.clone(), Some(off.clone()), runs.clone()),
            // B does not run it: A decides.
            (off.clone(), Some(runs.clone()), runs.clone()),
            (off.clone(), Some(off.clone()), off.clone()),
            (off.clone(), Some(P::Lost), P::Lost),
            (off.clone(), Some(failed("refused")), failed(via)),
            // B cannot be reached: the two-host rules on B's result.
            (P::Lost, None, P::Lost),
            (P::Lost, Some(runs.clone()), P::Lost),
            (failed("tls"), None, failed("tls")),
            (failed("tls"), Some(off.clone()), failed("tls")),
        ];
        for (source, up, want) in rows {
            assert_eq!(
                chain_probe(source.clone(), up.clone()),
                *want,
                "{source:?} / {up:?}"
            );
        }
        // What the guard then decides, end to end of the rules.
        let verdict = |s: P, u: Option<P>| split_brain_verdict(chain_probe(s, u), false);
        assert_eq!(
            verdict(off.clone(), Some(runs.clone())),
            SplitBrain::PrimaryRuns
        );
        assert_eq!(verdict(off.clone(), Some(P::Lost)), SplitBrain::Proceed);
        assert_eq!(
            verdict(off.clone(), Some(failed("refused"))),
            SplitBrain::Unchecked { reason: via.into() }
        );
        assert_eq!(
            verdict(failed("connection refused"), None),
            SplitBrain::Unchecked {
                reason: "connection refused".into()
            }
        );
    }

    #[test]
    fn refusals_explain() {
        let e =
            failover_transition(M::Primary, S::Replicating, O::Start, true).expect_err("refused");
        assert!(e.to_string().contains("Replica"), "{e}");
        let e = failover_transition(M::Replica, S::WaitingForInitialReplication, O::Start, false)
            .expect_err("refused");
        assert_eq!(e, Refusal::NoInitialCopy { op: O::Start });
        assert!(e.to_string().contains("initial replication"), "{e}");
    }

    #[test]
    fn prepare_source_table() {
        let st = |running: bool, status: &str| VmProbe::Status {
            running,
            status: status.to_owned(),
        };
        let rows: Vec<(VmProbe, Result<PrepareSource, PrepareRefusal>)> = vec![
            (
                st(true, "running"),
                Err(PrepareRefusal::Running {
                    status: "running".into(),
                }),
            ),
            (st(false, "shutdown"), Ok(PrepareSource::Vm)),
            (st(false, "paused"), Ok(PrepareSource::Vm)),
            (VmProbe::NoGuest, Ok(PrepareSource::Vm)),
            (VmProbe::NoListener, Ok(PrepareSource::Images)),
            (
                VmProbe::Unresponsive {
                    reason: "timed out".into(),
                },
                Err(PrepareRefusal::Unresponsive {
                    reason: "timed out".into(),
                }),
            ),
        ];
        for (probe, want) in rows {
            assert_eq!(prepare_source(probe.clone()), want, "{probe:?}");
        }
    }

    #[test]
    fn libvirt_failover_domain_and_prepare() {
        let live = failover_domain("web1", false);
        assert_eq!(
            live,
            FailoverDomainIdentity {
                name: "web1".into(),
                keep_uuid: true,
                keep_interfaces: true
            }
        );
        let test = failover_domain("web1", true);
        assert_eq!(
            test,
            FailoverDomainIdentity {
                name: "web1-test".into(),
                keep_uuid: false,
                keep_interfaces: false
            }
        );
        // (domain runs, --shutdown) -> step
        let table = [
            (true, true, Ok(LibvirtPrepare::ShutDownThenStartPaused)),
            (false, true, Ok(LibvirtPrepare::StartPaused)),
            (false, false, Ok(LibvirtPrepare::StartPaused)),
            (
                true,
                false,
                Err(PrepareRefusal::Running {
                    status: "running (libvirt)".into(),
                }),
            ),
        ];
        for (runs, shutdown, want) in table {
            assert_eq!(libvirt_prepare(runs, shutdown), want, "{runs} {shutdown}");
        }
    }

    #[test]
    fn existing_domain_table() {
        use DefineFailoverDomain::*;
        use ExistingDomainRefusal::*;
        let e = |same_uuid, running| Some(ExistingDomain { same_uuid, running });
        // (existing, keep_uuid = a real failover) -> decision
        let cases = [
            (None, true, Ok(Define)),
            (None, false, Ok(Define)),
            // failing back: the VM's own definition, shut off
            (e(true, false), true, Ok(Replace)),
            (e(true, true), true, Err(Running)),
            // someone else's domain of that name: never replaced, running or not
            (e(false, false), true, Err(Other)),
            (e(false, true), true, Err(Other)),
            // a test copy's name taken (an earlier copy): refused whatever its UUID
            (e(true, false), false, Err(Other)),
            (e(false, false), false, Err(Other)),
        ];
        for (existing, keep_uuid, want) in cases {
            assert_eq!(
                existing_domain(existing, keep_uuid),
                want,
                "{existing:?} keep_uuid={keep_uuid}"
            );
        }
    }

    #[test]
    fn reverse_resyncs_table() {
        // (old primary's disks differ, writes tracked since the failover) -> resync
        let cases = [
            (false, true, false), // planned failover, QMP tracking: a cycle on top
            (true, true, true),   // unplanned: the old primary differs
            (false, false, true), // planned, through libvirt: no checkpoint yet
            (true, false, true),
        ];
        for (differs, tracked, want) in cases {
            assert_eq!(
                reverse_resyncs(differs, tracked),
                want,
                "{differs} {tracked}"
            );
        }
    }
}
