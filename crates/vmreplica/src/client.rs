//! The CLI side of the control API: turns a subcommand into a [`Request`], sends it to the
//! local agent over `DIR/agent.sock` (one JSON line each way) and prints the answer.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use anyhow::Context;
use vmr_proto::api::{EnableArgs, InitialMode, Request, Response, ResyncWindow};
use vmr_proto::retain::RetentionGrid;
use vmr_proto::store::RetentionPolicy;

use crate::cli::{
    Command, GroupCmd, ReplicaCmd, ServerCmd, VmCmd, parse_duration_secs, parse_enable_frequency,
    parse_frequency, parse_hours,
};
use crate::exit;
use crate::util::{coded, parse_time};

/// Send one request and return the agent's value, or its error as an anyhow chain.
pub fn call(dir: &Path, req: &Request) -> anyhow::Result<serde_json::Value> {
    call_within(dir, req, None)
}

/// [`call`], giving up after `limit` without an answer (a busy or hung agent) with the
/// unreachable agent's exit code.
pub fn call_within(
    dir: &Path,
    req: &Request,
    limit: Option<std::time::Duration>,
) -> anyhow::Result<serde_json::Value> {
    let path = vmr_agent::config::socket_path(dir);
    let mut stream = UnixStream::connect(&path).map_err(|e| {
        coded(
            exit::NO_AGENT,
            format!("cannot reach the vmreplica agent at {} ({e}); is `vmreplica agent --dir {}` running?", path.display(), dir.display()),
        )
    })?;
    stream
        .set_read_timeout(limit)
        .and_then(|()| stream.set_write_timeout(limit))
        .context("setting the control socket's timeout")?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    stream
        .write_all(line.as_bytes())
        .context("sending request to the agent")?;
    let mut reader = BufReader::new(stream);
    let mut answer = String::new();
    reader.read_line(&mut answer).map_err(|e| {
        if matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) {
            coded(exit::NO_AGENT, "the agent did not answer in time")
        } else {
            anyhow::Error::new(e).context("reading the agent's answer")
        }
    })?;
    if answer.is_empty() {
        return Err(coded(
            exit::NO_AGENT,
            "the agent closed the connection without answering",
        ));
    }
    match serde_json::from_str::<Response>(&answer).context("the agent's answer is not valid")? {
        Response::Ok { value } => Ok(value),
        Response::Err { chain, code } => {
            let mut it = chain.into_iter().rev();
            let mut err = coded(code, it.next().unwrap_or_else(|| "unknown error".into()));
            // Rebuild the chain outermost-first: wrap the innermost with each outer message.
            for outer in it {
                err = err.context(outer);
            }
            // Keep the code of the innermost coded error reachable through downcast.
            Err(err)
        }
    }
}

/// `--since`: a duration ago (`10m`) or a time (RFC 3339), as ms since the epoch.
fn parse_since(s: &str) -> anyhow::Result<u64> {
    match parse_duration_secs(s) {
        Ok(secs) => Ok(vmr_agent::util::now_ms().saturating_sub(secs.saturating_mul(1000))),
        Err(_) => parse_time(s),
    }
}

/// `events --follow`: print the backlog, then each new event as it comes, until the agent
/// stops or the user interrupts.
fn follow_events(dir: &Path, req: &Request, json: bool) -> anyhow::Result<()> {
    let path = vmr_agent::config::socket_path(dir);
    let mut stream = UnixStream::connect(&path).map_err(|e| {
        coded(
            exit::NO_AGENT,
            format!(
                "cannot reach the vmreplica agent at {} ({e})",
                path.display()
            ),
        )
    })?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    stream
        .write_all(line.as_bytes())
        .context("sending request to the agent")?;
    let reader = BufReader::new(stream);
    let mut first = true;
    for answer in reader.lines() {
        let answer = answer.context("reading the agent's events")?;
        let value = match serde_json::from_str::<Response>(&answer)
            .context("the agent's answer is not valid")?
        {
            Response::Ok { value } => value,
            Response::Err { chain, code } => {
                return Err(coded(code, chain.join(": ")));
            }
        };
        let events: Vec<vmr_proto::event::Event> = if first {
            serde_json::from_value(value).context("the agent's events are not valid")?
        } else {
            vec![serde_json::from_value(value).context("the agent's event is not valid")?]
        };
        crate::output::print_events(&events, json, first);
        first = false;
    }
    Ok(())
}

fn request_of(cmd: Command) -> anyhow::Result<Request> {
    Ok(match cmd {
        Command::Server(ServerCmd::Allow {
            primary,
            fingerprint,
            storage,
            trust_group,
        }) => Request::ServerAllow {
            primary,
            fingerprint,
            storage: storage.map(|p| absolute(&p)),
            trust_group,
        },
        Command::Server(ServerCmd::Deny { primary }) => Request::ServerDeny { primary },
        Command::Server(ServerCmd::Remove { primary }) => Request::ServerRemove { primary },
        Command::Server(ServerCmd::Show) => Request::ServerShow,
        Command::Group(GroupCmd::Create { name, vms }) => Request::GroupCreate { name, vms },
        Command::Group(GroupCmd::List) => Request::GroupList,
        Command::Group(GroupCmd::Remove { name }) => Request::GroupRemove { name },
        Command::Group(GroupCmd::Points { name }) => Request::GroupPoints { name },
        Command::Group(GroupCmd::Prepare {
            name,
            shutdown,
            timeout,
        }) => Request::GroupPrepare {
            name,
            shutdown_timeout_secs: shutdown.then_some(timeout),
        },
        Command::Group(GroupCmd::Failover {
            name,
            test,
            point,
            latest_group_point,
        }) => Request::GroupFailover {
            name,
            test,
            point,
            latest_group_point,
        },
        Command::Group(GroupCmd::Reverse {
            name,
            replica,
            replica_fingerprint,
            frequency,
        }) => Request::GroupReverse {
            name,
            replica,
            replica_fingerprint,
            frequency_secs: frequency
                .map(|f| parse_frequency(&f).map_err(|m| coded(exit::USAGE, m)))
                .transpose()?,
        },
        Command::Vm(VmCmd::Add {
            name,
            qmp,
            launch,
            disks,
            nbd,
            qga,
            libvirt,
            connect,
        }) => match (libvirt, qmp, launch) {
            (Some(domain), _, _) => Request::VmAdd {
                name,
                qmp: String::new(),
                launch_toml: String::new(),
                disks: vec![],
                nbd: None,
                qga: None,
                libvirt: Some(vmr_proto::record::LibvirtSource {
                    uri: connect,
                    domain,
                    acked_checkpoint: None,
                    acked_checkpoint_xml: None,
                }),
            },
            (None, Some(qmp), Some(launch)) => {
                let launch_toml = std::fs::read_to_string(&launch)
                    .with_context(|| format!("reading VM definition {}", launch.display()))?;
                Request::VmAdd {
                    name,
                    qmp: absolute(&qmp),
                    launch_toml,
                    disks,
                    nbd: nbd.map(|n| absolute(&n)),
                    qga: qga.map(|n| absolute(&n)),
                    libvirt: None,
                }
            }
            _ => anyhow::bail!("vm add needs --qmp and --launch, or --libvirt DOMAIN"),
        },
        Command::Vm(VmCmd::List) => Request::VmList,
        Command::Vm(VmCmd::Remove { name, .. }) => Request::VmRemove { name, check: false },
        Command::Replica(ReplicaCmd::Remove {
            name, keep_data, ..
        }) => Request::ReplicaRemove {
            name,
            keep_data,
            check: false,
        },
        Command::Vm(VmCmd::Set {
            name,
            qmp,
            launch,
            disks,
            failover_ip,
            failover_gateway,
            failover_dns,
            failover_clear,
            replica_network_args,
            qga,
            no_qga,
            ..
        }) => {
            let failover_interfaces = if failover_clear {
                Some(Vec::new())
            } else if failover_ip.is_empty()
                && failover_gateway.is_empty()
                && failover_dns.is_empty()
            {
                None
            } else {
                Some(
                    vmr_proto::FailoverSettings::interfaces_from_args(
                        &failover_ip,
                        &failover_gateway,
                        &failover_dns,
                    )
                    .map_err(|e| coded(exit::USAGE, e.to_string()))?,
                )
            };
            let failover_network_args = replica_network_args
                .map(|a| a.split_whitespace().map(str::to_owned).collect::<Vec<_>>());
            let launch_toml = launch
                .map(|l| {
                    std::fs::read_to_string(&l)
                        .with_context(|| format!("reading VM definition {}", l.display()))
                })
                .transpose()?;
            Request::VmSet {
                name,
                qmp: qmp.map(|q| absolute(&q)),
                launch_toml,
                disks,
                failover_interfaces,
                failover_network_args,
                qga: if no_qga {
                    Some(String::new())
                } else {
                    qga.map(|q| absolute(&q))
                },
                check: false,
            }
        }
        Command::Enable(e) => {
            let frequency_secs =
                parse_enable_frequency(&e.frequency).map_err(|m| coded(exit::USAGE, m))?;
            let app_consistent_every_hours = match &e.app_consistent_every {
                Some(h) => parse_hours(h).map_err(|m| coded(exit::USAGE, m))?,
                None => 0,
            };
            let initial_at_ms = e.initial_at.as_deref().map(parse_time).transpose()?;
            let auto_resync = e
                .auto_resync
                .as_deref()
                .map(ResyncWindow::parse)
                .transpose()
                .map_err(|m| coded(exit::USAGE, m))?;
            let initial = match InitialMode::parse(&e.initial).map_err(|m| coded(exit::USAGE, m))? {
                InitialMode::Export { dir } => InitialMode::Export {
                    dir: absolute(Path::new(&dir)),
                },
                other => other,
            };
            let args = EnableArgs {
                name: e.name.clone(),
                replica: e.replica,
                replica_fingerprint: e.replica_fingerprint,
                frequency_secs,
                recovery_points: e.recovery_points,
                retain: e
                    .retain
                    .as_deref()
                    .map(|s| RetentionGrid::parse(s, e.prefer_app_consistent))
                    .transpose()
                    .map_err(|m| coded(exit::USAGE, m.to_string()))?,
                app_consistent_every_hours,
                exclude_disks: e.exclude_disks,
                compression: !e.no_compression,
                initial_at_ms,
                auto_resync,
                initial,
                rpo_alert_secs: e
                    .rpo_alert
                    .as_deref()
                    .map(parse_duration_secs)
                    .transpose()
                    .map_err(|m| coded(exit::USAGE, m))?,
                verify_every_secs: e
                    .verify_every
                    .as_deref()
                    .map(parse_duration_secs)
                    .transpose()
                    .map_err(|m| coded(exit::USAGE, m))?,
                bandwidth: e.bandwidth,
                auto_failover: match e.auto_failover.as_deref() {
                    None => None,
                    Some(d) => Some(vmr_proto::lease::AutoFailover {
                        auto_failover_ms: parse_duration_secs(d)
                            .map_err(|m| coded(exit::USAGE, m))?
                            .saturating_mul(1000),
                        witness: e.witness.unwrap_or_default(),
                        witness_fingerprint: e.witness_fingerprint.unwrap_or_default(),
                        power_off: match e.fence.as_deref() {
                            None | Some("pause") => false,
                            Some("power-off") => true,
                            Some(other) => {
                                return Err(coded(
                                    exit::USAGE,
                                    format!("--fence {other:?}: give pause or power-off"),
                                ));
                            }
                        },
                        point: match e.auto_failover_point.as_deref() {
                            None | Some("latest") => vmr_proto::lease::TakeoverPoint::Latest,
                            Some("app-consistent") => {
                                vmr_proto::lease::TakeoverPoint::AppConsistent
                            }
                            Some(other) => {
                                return Err(coded(
                                    exit::USAGE,
                                    format!(
                                        "--auto-failover-point {other:?}: give latest or app-consistent"
                                    ),
                                ));
                            }
                        },
                    }),
                },
            };
            if e.extended {
                Request::Extended {
                    name: e.name,
                    what: vmr_proto::api::ExtendedOp::Enable(Box::new(args)),
                }
            } else {
                Request::Enable(args)
            }
        }
        Command::Set {
            name,
            bandwidth: Some(bandwidth),
            ..
        } => Request::SetBandwidth { name, bandwidth },
        Command::Set {
            name: None,
            cpu_priority: Some(priority),
            ..
        } => Request::SetCpuPriority { priority },
        Command::Set {
            name: Some(name),
            auto_failover: Some(v),
            ..
        } => {
            if v != "off" {
                return Err(coded(
                    exit::USAGE,
                    format!(
                        "set --auto-failover {v:?}: only `off` (turn it on with `enable --auto-failover`)"
                    ),
                ));
            }
            Request::AutoFailoverOff { name }
        }
        Command::Unfence { name } => Request::Unfence { name },
        Command::Set {
            name: Some(name),
            rpo_alert: Some(rpo_alert),
            ..
        } => Request::SetRpoAlert {
            name,
            rpo_alert_secs: if rpo_alert == "default" {
                None
            } else {
                Some(parse_duration_secs(&rpo_alert).map_err(|m| coded(exit::USAGE, m))?)
            },
        },
        Command::Set {
            name: Some(name),
            verify_every: Some(every),
            ..
        } => Request::SetVerifyEvery {
            name,
            verify_every_secs: if every == "never" {
                None
            } else {
                Some(parse_duration_secs(&every).map_err(|m| coded(exit::USAGE, m))?)
            },
        },
        Command::Set {
            name: Some(name),
            retain,
            recovery_points,
            prefer_app_consistent,
            replica,
            ..
        } => {
            let policy =
                retention_policy(retain.as_deref(), recovery_points, prefer_app_consistent)?;
            match replica {
                // one relationship of a VM that replicates to several replicas (fan-out)
                Some(replica) => Request::Relationship {
                    name,
                    replica,
                    what: vmr_proto::api::RelationshipOp::SetRetention { policy },
                },
                None => Request::SetRetention { name, policy },
            }
        }
        Command::Set { .. } => {
            return Err(coded(
                exit::USAGE,
                "set: give NAME with one setting, or --agent with --bandwidth or --cpu-priority",
            ));
        }
        Command::Events {
            name,
            since,
            limit,
            follow,
        } => Request::Events {
            query: vmr_proto::event::EventQuery {
                vm: name,
                since_ms: since.as_deref().map(parse_since).transpose()?,
                after_id: None,
                limit: Some(limit),
            },
            follow,
        },
        Command::StartInitial {
            name,
            replica: Some(replica),
            ..
        } => Request::Relationship {
            name,
            replica,
            what: vmr_proto::api::RelationshipOp::StartInitial,
        },
        Command::StartInitial { name, .. } => Request::StartInitial { name },
        Command::Status { name, .. } => Request::Status { name },
        Command::Measure { name, reset } => Request::Measure { name, reset },
        Command::Pause {
            name,
            replica: Some(replica),
            ..
        } => Request::Relationship {
            name,
            replica,
            what: vmr_proto::api::RelationshipOp::Pause,
        },
        Command::Pause {
            name,
            extended: true,
            ..
        } => Request::Extended {
            name,
            what: vmr_proto::api::ExtendedOp::Pause,
        },
        Command::Pause { name, .. } => Request::Pause { name },
        Command::Resume {
            name,
            replica: Some(replica),
            resync,
            at,
            ..
        } => Request::Relationship {
            name,
            replica,
            what: if resync {
                vmr_proto::api::RelationshipOp::ResumeResync {
                    at_ms: at.as_deref().map(parse_time).transpose()?,
                }
            } else {
                vmr_proto::api::RelationshipOp::Resume
            },
        },
        Command::Resume {
            name,
            extended: true,
            ..
        } => Request::Extended {
            name,
            what: vmr_proto::api::ExtendedOp::Resume,
        },
        Command::Resume {
            name,
            resync: true,
            at,
            ..
        } => Request::ResumeResync {
            name,
            at_ms: at.as_deref().map(parse_time).transpose()?,
        },
        Command::Resume { name, .. } => Request::Resume { name },
        Command::Disable {
            name,
            replica: Some(replica),
            ..
        } => Request::Relationship {
            name,
            replica,
            what: vmr_proto::api::RelationshipOp::Disable,
        },
        Command::Disable {
            name,
            extended: true,
            ..
        } => Request::Extended {
            name,
            what: vmr_proto::api::ExtendedOp::Disable,
        },
        Command::Disable { name, .. } => Request::Disable { name },
        Command::Verify { name, point, local } => Request::Verify { name, point, local },
        Command::Points {
            name,
            estimate,
            retain,
            recovery_points,
            prefer_app_consistent,
        } => Request::Points {
            name,
            estimate: if estimate {
                Some(retention_policy(
                    retain.as_deref(),
                    recovery_points,
                    prefer_app_consistent,
                )?)
            } else {
                None
            },
        },
        Command::Import { name, from } => Request::Import {
            name,
            dir: absolute(&from),
        },
        Command::Failover(f) => {
            use crate::cli::{FailoverCmd as F, parse_point};
            let point = |s: &str| parse_point(s).map_err(|m| coded(exit::USAGE, m));
            match f {
                F::Prepare {
                    name,
                    shutdown,
                    timeout,
                } => Request::FailoverPrepare {
                    name,
                    shutdown_timeout_secs: shutdown.then_some(timeout),
                },
                F::Start {
                    name,
                    point: p,
                    no_start,
                    force,
                } => Request::FailoverStart {
                    name,
                    point: point(&p)?,
                    no_start,
                    force,
                },
                F::Test { name, point: p } => Request::FailoverTest {
                    name,
                    point: point(&p)?,
                },
                F::StopTest { name, test_id } => Request::FailoverStopTest { name, test_id },
                F::Cancel { name } => Request::FailoverCancel { name },
                F::Complete { name } => Request::FailoverComplete { name },
            }
        }
        Command::Reverse {
            name,
            replica,
            replica_fingerprint,
            frequency,
            follow,
        } => Request::Reverse {
            name,
            replica,
            replica_fingerprint,
            follow,
            frequency_secs: frequency
                .map(|f| parse_frequency(&f).map_err(|m| coded(exit::USAGE, m)))
                .transpose()?,
        },
        Command::Init { .. }
        | Command::Agent
        | Command::FenceWatchdog { .. }
        | Command::Check { .. }
        | Command::Demo(_)
        | Command::GenerateDocs { .. } => {
            return Err(coded(exit::USAGE, "not a control command"));
        }
    })
}

/// The policy of `--retain SPEC [--prefer-app-consistent]` or `--recovery-points N` (a
/// usage error when neither or both are given, or the grid does not parse).
fn retention_policy(
    retain: Option<&str>,
    recovery_points: Option<u32>,
    prefer_app_consistent: bool,
) -> anyhow::Result<RetentionPolicy> {
    let usage = |m: String| coded(exit::USAGE, m);
    match (retain, recovery_points) {
        (Some(spec), None) => Ok(RetentionPolicy {
            grid: Some(
                RetentionGrid::parse(spec, prefer_app_consistent)
                    .map_err(|e| usage(e.to_string()))?,
            ),
            ..RetentionPolicy::default()
        }),
        (None, Some(n)) => Ok(RetentionPolicy {
            hourly: n,
            ..RetentionPolicy::default()
        }),
        (Some(_), Some(_)) => Err(usage(
            "--retain and --recovery-points are exclusive".to_owned(),
        )),
        (None, None) => Err(usage(
            "give a policy: --retain SPEC or --recovery-points N".to_owned(),
        )),
    }
}

fn absolute(p: &Path) -> String {
    std::path::absolute(p)
        .unwrap_or_else(|_| p.to_path_buf())
        .display()
        .to_string()
}

/// Whether `cmd` is confirmed before it runs, and then whether `--yes` was given.
fn confirmation(cmd: &Command) -> Option<bool> {
    match cmd {
        // Failover network settings and the guest agent socket alone are not a registration
        // change: no question.
        Command::Vm(VmCmd::Set {
            qmp: None,
            launch: None,
            disks,
            ..
        }) if disks.is_empty() => None,
        Command::Vm(VmCmd::Remove { yes, .. } | VmCmd::Set { yes, .. })
        | Command::Replica(ReplicaCmd::Remove { yes, .. }) => Some(*yes),
        _ => None,
    }
}

/// The check-only form of a request that is confirmed first: the agent says what it would
/// do, or why it refuses, and changes nothing.
fn check_only(req: &Request) -> Option<Request> {
    let mut r = req.clone();
    match &mut r {
        Request::VmRemove { check, .. }
        | Request::VmSet { check, .. }
        | Request::ReplicaRemove { check, .. } => *check = true,
        _ => return None,
    }
    Some(r)
}

/// Run a control subcommand and print its result. A command that changes what is hard to
/// undo is checked by the agent first (a refusal comes before any question), then confirmed
/// on the terminal unless `--yes`.
pub fn run(dir: &Path, cmd: Command, json: bool) -> anyhow::Result<()> {
    let kind = crate::output::Kind::of(&cmd);
    let yes = confirmation(&cmd);
    let req = request_of(cmd)?;
    if let Request::Events { follow: true, .. } = &req {
        return follow_events(dir, &req, json);
    }
    if let (Some(yes), Some(check)) = (yes, check_only(&req)) {
        let what = call(dir, &check)?;
        let what = what.as_str().unwrap_or("go on");
        let stdin = std::io::stdin();
        let terminal = std::io::IsTerminal::is_terminal(&stdin);
        crate::util::confirm(
            what,
            yes,
            terminal,
            &mut stdin.lock(),
            &mut std::io::stderr(),
        )?;
    }
    let value = call(dir, &req)?;
    crate::output::print(kind, &value, json);
    if let Some(differs) = crate::output::verify_failed(&value) {
        return Err(coded(exit::MISMATCH, differs));
    }
    Ok(())
}
