//! The local control API: a Unix socket (mode 0600) in the agent directory; one JSON
//! [`Request`] line in, one [`Response`] line out; `events --follow` gets a line per new
//! event until it closes the connection.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Value, json};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use vmr_proto::VmDefinition;
use vmr_proto::api::{AllowEntry, Request, Response, VmStatus};
use vmr_proto::event::{Event, EventQuery};
use vmr_proto::lease::WitnessLease;

use crate::errors::AgentError;
use crate::exit;
use crate::host::Host;
use crate::vm::{Command, FailoverChange, FailoverCmd, Registry, VmHandle};
use vmr_proto::machine::PrimarySnapshot;
use vmr_proto::record::{LibvirtSource, MachineSnapshot, VmRecord};

/// Longest request line the control socket reads (1 MiB; a VM definition is a few KiB).
pub const MAX_REQUEST_LINE: usize = 1 << 20;

/// One request line read from the control socket.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// A line (without its newline; the last one may lack it).
    Text(Vec<u8>),
    /// More than `max` bytes without a newline: answered with an error, then the connection
    /// is closed (what follows is the rest of that line).
    TooLong,
    /// End of input.
    End,
}

/// Read one line of at most `max` bytes (the newline not counted) from `r`, never buffering
/// more than `max + 1` bytes.
async fn read_line(r: &mut (impl AsyncBufRead + Unpin), max: usize) -> std::io::Result<Line> {
    let mut buf = Vec::new();
    let n = r.take(max as u64 + 1).read_until(b'\n', &mut buf).await?;
    if n == 0 {
        return Ok(Line::End);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
    } else if buf.len() > max {
        return Ok(Line::TooLong);
    }
    Ok(Line::Text(buf))
}

/// What the control API serves from.
pub struct Control {
    /// Host resources.
    pub host: Arc<Host>,
    /// Every VM's owner.
    pub vms: Arc<Registry>,
}

/// Bind the control socket and serve it in the background; returns its path.
pub async fn start(agent: Arc<Control>) -> Result<PathBuf, AgentError> {
    let path = crate::config::socket_path(&agent.host.dir);
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            return Err(AgentError::ControlSocketBusy { path });
        }
        std::fs::remove_file(&path).ok();
    }
    let listener = UnixListener::bind(&path).map_err(AgentError::io("binding", &path))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(AgentError::io("setting the mode of", &path))?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let agent = agent.clone();
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut r = BufReader::new(r);
                loop {
                    let line = match read_line(&mut r, MAX_REQUEST_LINE).await {
                        Ok(Line::Text(l)) => l,
                        Ok(Line::TooLong) => {
                            let resp = Response::Err {
                                chain: vec![format!(
                                    "bad request: the request line is longer than {} bytes",
                                    MAX_REQUEST_LINE
                                )],
                                code: exit::USAGE,
                            };
                            if let Ok(mut out) = serde_json::to_string(&resp) {
                                out.push('\n');
                                let _ = w.write_all(out.as_bytes()).await;
                            }
                            break;
                        }
                        Ok(Line::End) | Err(_) => break,
                    };
                    let resp = match serde_json::from_slice::<Request>(&line) {
                        Ok(Request::Events {
                            query,
                            follow: true,
                        }) => {
                            // Streams until the client goes; then the connection ends.
                            if let Err(e) = follow(&agent, query, &mut r, &mut w).await {
                                let _ = write_response(&mut w, &to_response(&e)).await;
                            }
                            break;
                        }
                        Ok(req) => {
                            let action = admin_action(&req);
                            let resp = match handle(&agent, req).await {
                                Ok(value) => Response::Ok { value },
                                Err(e) => to_response(&e),
                            };
                            if let Some(action) = action {
                                log_action(&action, &resp);
                            }
                            resp
                        }
                        Err(e) => Response::Err {
                            chain: vec![format!("bad request: {e}")],
                            code: exit::USAGE,
                        },
                    };
                    let mut out = match serde_json::to_string(&resp) {
                        Ok(s) => s,
                        Err(e) => format!(
                            "{{\"Err\":{{\"chain\":[\"encoding the answer: {e}\"],\"code\":1}}}}"
                        ),
                    };
                    out.push('\n');
                    if w.write_all(out.as_bytes()).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(path)
}

async fn write_response(
    w: &mut (impl tokio::io::AsyncWrite + Unpin),
    resp: &Response,
) -> std::io::Result<()> {
    let mut out = serde_json::to_string(resp).map_err(std::io::Error::other)?;
    out.push('\n');
    w.write_all(out.as_bytes()).await
}

/// The events of `query` (its VM must exist).
async fn events(agent: &Control, query: EventQuery) -> Result<Vec<Event>, AgentError> {
    if let Some(n) = &query.vm {
        vm(agent, n)?;
    }
    Ok(agent.host.events.query(query).await?)
}

/// `events --follow`: the matching events as one list, then each new matching event on its
/// own line, until the client closes the connection (or sends anything).
async fn follow(
    agent: &Control,
    query: EventQuery,
    r: &mut (impl AsyncBufRead + Unpin),
    w: &mut (impl tokio::io::AsyncWrite + Unpin),
) -> Result<(), AgentError> {
    use tokio::sync::broadcast::error::RecvError;
    // Subscribe before reading the log: nothing falls between the two.
    let mut rx = agent.host.events.subscribe();
    let backlog = events(agent, query.clone()).await?;
    let mut last = backlog.last().map_or(0, |e| e.id);
    let io = |source| AgentError::Io {
        doing: "writing events to",
        path: PathBuf::from("the control socket"),
        source,
    };
    write_response(
        w,
        &Response::Ok {
            value: to_value(&backlog)?,
        },
    )
    .await
    .map_err(io)?;
    let mut scratch = Vec::new();
    loop {
        let next: Vec<Event> = tokio::select! {
            got = rx.recv() => match got {
                Ok(e) => vec![(*e).clone()],
                // A slow reader: catch up from the log.
                Err(RecvError::Lagged(_)) => {
                    let q = EventQuery { after_id: Some(last), limit: None, ..query.clone() };
                    agent.host.events.query(q).await?
                }
                Err(RecvError::Closed) => return Ok(()),
            },
            n = r.read_buf(&mut scratch) => {
                // The client closed (or spoke): stop.
                let _ = n;
                return Ok(());
            }
            () = agent.host.shutdown.cancelled() => return Ok(()),
        };
        for e in next {
            if e.id <= last || !query.matches(&e) {
                continue;
            }
            last = e.id;
            write_response(
                w,
                &Response::Ok {
                    value: to_value(&e)?,
                },
            )
            .await
            .map_err(io)?;
        }
    }
}

/// The admin action a control request is, as the agent logs it: the request's JSON form (its
/// command and arguments; a VM definition's text replaced by its length). `None` for what
/// changes nothing: the queries (`status`, `measure` without `--reset`, `vm list`, `points`,
/// `server show`) and the dry runs the CLI makes before asking for confirmation.
fn admin_action(req: &Request) -> Option<String> {
    match req {
        Request::ServerShow
        | Request::VmList
        | Request::GroupList
        | Request::GroupPoints { .. }
        | Request::Status { .. }
        | Request::Points { .. }
        | Request::Events { .. }
        | Request::Measure { reset: false, .. }
        | Request::VmRemove { check: true, .. }
        | Request::ReplicaRemove { check: true, .. }
        | Request::VmSet { check: true, .. } => return None,
        _ => {}
    }
    let mut v = serde_json::to_value(req).ok()?;
    if let Some(toml) = v.get_mut("launch_toml")
        && let Some(len) = toml.as_str().map(str::len)
    {
        *toml = json!(format!("<definition, {len} bytes>"));
    }
    Some(v.to_string())
}

/// One info line per admin action with its outcome (the error chain and exit code when it
/// failed).
fn log_action(action: &str, resp: &Response) {
    match resp {
        Response::Ok { .. } => tracing::info!(request = %action, "admin action done"),
        Response::Err { chain, code } => tracing::info!(
            request = %action,
            code,
            error = %chain.join(": "),
            "admin action failed"
        ),
    }
}

fn to_response(e: &AgentError) -> Response {
    Response::Err {
        chain: e.chain(),
        code: e.exit_code(),
    }
}

fn vm(agent: &Control, name: &str) -> Result<VmHandle, AgentError> {
    agent.vms.get(name).ok_or_else(|| AgentError::UnknownVm {
        name: name.to_owned(),
    })
}

fn to_value(v: impl serde::Serialize) -> Result<Value, AgentError> {
    serde_json::to_value(v).map_err(|source| AgentError::JsonEncode {
        what: "the answer",
        source,
    })
}

async fn handle(agent: &Control, req: Request) -> Result<Value, AgentError> {
    let host = &agent.host;
    match req {
        Request::ServerAllow {
            primary,
            fingerprint,
            storage,
            trust_group,
        } => {
            let fingerprint = normalize_fingerprint(&fingerprint)?;
            let storage = storage.unwrap_or_else(|| host.config.storage.clone());
            std::fs::create_dir_all(&storage)
                .map_err(AgentError::io("creating storage", &storage))?;
            let entry = AllowEntry {
                trust_group: trust_group.unwrap_or_else(|| primary.clone()),
                primary,
                fingerprint,
                storage,
                revoked: false,
            };
            let msg = format!(
                "primary {:?} authorized (trust group {:?})",
                entry.primary, entry.trust_group
            );
            host.put_allow(entry)?;
            Ok(json!(msg))
        }
        Request::ServerDeny { primary } => {
            let e = host.revoke_allow(&primary)?;
            Ok(json!(format!(
                "primary {:?} revoked: its certificate {} authorizes nothing from now on (the \
                 entry and its storage {} stay; `server allow` restores it)",
                e.primary, e.fingerprint, e.storage
            )))
        }
        Request::ServerRemove { primary } => {
            let vms: Vec<String> = all_status(agent)
                .await?
                .into_iter()
                .filter(|s| {
                    s.mode == vmr_proto::api::ReplicationMode::Replica && s.primary == primary
                })
                .map(|s| s.name)
                .collect();
            if !vms.is_empty() {
                return Err(AgentError::AllowEntryInUse { primary, vms });
            }
            host.remove_allow(&primary)?;
            Ok(json!(format!(
                "authorization entry of primary {primary:?} removed"
            )))
        }
        Request::ServerShow => Ok(json!({
            "name": host.config.name,
            "listen": host.config.listen,
            "fingerprint": host.identity.fingerprint(),
            "cpu_priority": host.data.priority(),
            "allowed": host.allowed(),
            "witness": host
                .witness_leases()
                .into_iter()
                .map(|(entry, remaining_ms)| WitnessLease { entry, remaining_ms })
                .collect::<Vec<_>>(),
        })),
        Request::VmAdd {
            name,
            qmp,
            launch_toml,
            disks,
            nbd,
            qga,
            libvirt,
        } => {
            crate::config::validate_vm_name(&name)?;
            let (def, launch_toml, disks) = match &libvirt {
                Some(lv) => {
                    let def = libvirt_definition(&name, lv).await?;
                    let disks = def.disks.iter().map(|d| d.node.clone()).collect();
                    (def.clone(), def.to_toml(), disks)
                }
                None => (
                    checked_definition(&name, &launch_toml, &disks)?,
                    launch_toml,
                    disks,
                ),
            };
            if let Some(existing) = agent.vms.get(&name).or_else(|| agent.vms.by_uuid(def.uuid)) {
                return Err(AgentError::AlreadyRegistered {
                    name: existing.name,
                    uuid: existing.uuid,
                });
            }
            let disks = if disks.is_empty() {
                def.disks.iter().map(|d| d.node.clone()).collect()
            } else {
                disks
            };
            if let Some(n) = &nbd {
                check_nbd_socket("--nbd", n)?;
            }
            if let Some(n) = &qga {
                check_nbd_socket("--qga", n)?;
            }
            if libvirt.is_none() {
                check_vm_is_there(&qmp, &def, &disks).await?;
            }
            let rec = VmRecord {
                name: name.clone(),
                uuid: def.uuid,
                qmp,
                launch_toml,
                disks,
                enable: None,
                primary: host.config.name.clone(),
                trust_group: None,
                frequency_secs: None,
                nbd,
                qga,
                failover: Default::default(),
                machine: MachineSnapshot::Primary(PrimarySnapshot::default()),
                rpo_alert_secs: None,
                extended: None,
                group: None,
                libvirt,
                fanout: Vec::new(),
                auto_failover: None,
                lease: Default::default(),
            };
            host.save_vm(&rec)?;
            agent.vms.spawn(host, rec, false)?;
            Ok(json!(format!("VM {name:?} ({}) registered", def.uuid)))
        }
        Request::VmRemove { name, check } => remove(agent, &name, None, check).await,
        Request::ReplicaRemove {
            name,
            keep_data,
            check,
        } => remove(agent, &name, Some(keep_data), check).await,
        Request::VmSet {
            name,
            qmp,
            launch_toml,
            disks,
            failover_interfaces,
            failover_network_args,
            qga,
            check,
        } => {
            let h = vm(agent, &name)?;
            if qmp.is_some() || launch_toml.is_some() || !disks.is_empty() || qga.is_some() {
                let rec = h.ask(Command::Record).await?;
                if let Some(lv) = &rec.libvirt {
                    return Err(AgentError::LibvirtNotBuilt {
                        name,
                        domain: lv.domain.clone(),
                        what: "changing the QMP socket, definition, disks or guest agent \
                               (they come from the domain)",
                    });
                }
            }
            if let Some(q) = qga.as_deref().filter(|q| !q.is_empty()) {
                check_nbd_socket("--qga", q)?;
            }
            let failover = FailoverChange {
                interfaces: failover_interfaces,
                network_args: failover_network_args,
            };
            failover.check().map_err(AgentError::FailoverSettings)?;
            let launch = match launch_toml {
                Some(t) => {
                    let def = checked_definition(&name, &t, &disks)?;
                    Some((t, def))
                }
                None => None,
            };
            let change = crate::vm::VmChange {
                qmp,
                launch,
                disks: (!disks.is_empty()).then_some(disks),
                failover,
                qga: qga.map(|q| (!q.is_empty()).then_some(q)),
            };
            Ok(json!(
                h.ask(|r| Command::Set(Box::new(change), check, r)).await?
            ))
        }
        Request::VmList => to_value(vm_list(agent).await?),
        Request::GroupCreate { name, vms } => group_create(agent, &name, &vms).await,
        Request::GroupRemove { name } => group_remove(agent, &name).await,
        Request::GroupList => to_value(group_list(agent).await?),
        Request::GroupPoints { name } => to_value(group_points(agent, &name).await?),
        Request::GroupFailover {
            name,
            test,
            point,
            latest_group_point,
        } => {
            let pick = if test || point.is_some() || latest_group_point {
                vmr_core::group::FailoverPick::GroupPoint
            } else {
                vmr_core::group::FailoverPick::Default
            };
            to_value(group_failover(agent, &name, test, point, pick).await?)
        }
        Request::GroupPrepare {
            name,
            shutdown_timeout_secs,
        } => to_value(
            group_prepare(
                agent,
                &name,
                shutdown_timeout_secs.map(std::time::Duration::from_secs),
            )
            .await?,
        ),
        Request::GroupReverse {
            name,
            replica,
            replica_fingerprint,
            frequency_secs,
        } => to_value(
            group_reverse(
                agent,
                &name,
                FailoverCmd::Reverse {
                    replica,
                    replica_fingerprint,
                    frequency_secs,
                    follow: false,
                },
            )
            .await?,
        ),
        Request::Status { name: None } => to_value(all_status(agent).await?),
        Request::Status { name: Some(name) } => {
            let st = vm(agent, &name)?.ask(Command::Status).await?;
            to_value(vec![st])
        }
        Request::Measure { name, reset } => {
            let handles = match &name {
                Some(n) => vec![vm(agent, n)?],
                None => agent.vms.all(),
            };
            let mut rows: Vec<VmStatus> = Vec::new();
            for h in &handles {
                rows.push(h.ask(Command::Status).await?);
                if reset {
                    h.ask(Command::ResetStats).await?;
                }
            }
            to_value(rows)
        }
        Request::Enable(args) => {
            let h = vm(agent, &args.name)?;
            Ok(json!(h.ask(|r| Command::Enable(Box::new(args), r)).await?))
        }
        Request::StartInitial { name } => {
            to_value(vm(agent, &name)?.ask(Command::StartInitial).await?)
        }
        Request::Pause { name } => to_value(vm(agent, &name)?.ask(Command::Pause).await?),
        Request::Resume { name } => to_value(vm(agent, &name)?.ask(Command::Resume).await?),
        Request::Unfence { name } => Ok(json!(vm(agent, &name)?.ask(Command::Unfence).await?)),
        Request::AutoFailoverOff { name } => Ok(json!(
            vm(agent, &name)?.ask(Command::AutoFailoverOff).await?
        )),
        Request::ResumeResync { name, at_ms } => to_value(
            vm(agent, &name)?
                .ask(|r| Command::ResumeResync(at_ms, r))
                .await?,
        ),
        Request::Disable { name } => to_value(vm(agent, &name)?.ask(Command::Disable).await?),
        Request::Verify { name, point, local } => Ok(vm(agent, &name)?
            .ask(|r| Command::Verify(point, local, r))
            .await?),
        Request::Points { name, estimate } => to_value(
            vm(agent, &name)?
                .ask(|r| Command::Points(estimate, r))
                .await?,
        ),
        Request::SetRetention { name, policy } => Ok(json!(
            vm(agent, &name)?
                .ask(|r| Command::SetRetention(Box::new(policy), r))
                .await?
        )),
        Request::Relationship {
            name,
            replica,
            what,
        } => {
            use crate::primary::Cmd;
            use vmr_proto::api::RelationshipOp as Op;
            let cmd = match what {
                Op::Pause => Cmd::Pause,
                Op::Resume => Cmd::Resume,
                Op::Disable => Cmd::Disable,
                Op::StartInitial => Cmd::StartInitial,
                Op::ResumeResync { at_ms } => Cmd::ResumeResync(at_ms),
                Op::SetRetention { policy } => {
                    return Ok(json!(
                        vm(agent, &name)?
                            .ask(|r| Command::RelationshipRetention(replica, Box::new(policy), r))
                            .await?
                    ));
                }
            };
            to_value(
                vm(agent, &name)?
                    .ask(|r| Command::Relationship(replica, cmd, r))
                    .await?,
            )
        }
        Request::Extended { name, what } => Ok(json!(
            vm(agent, &name)?
                .ask(|r| Command::Extended(what, r))
                .await?
        )),
        Request::Events { query, follow: _ } => to_value(events(agent, query).await?),
        Request::SetVerifyEvery {
            name,
            verify_every_secs,
        } => Ok(json!(
            vm(agent, &name)?
                .ask(|r| Command::SetVerifyEvery(verify_every_secs, r))
                .await?
        )),
        Request::SetRpoAlert {
            name,
            rpo_alert_secs,
        } => Ok(json!(
            vm(agent, &name)?
                .ask(|r| Command::SetRpoAlert(rpo_alert_secs, r))
                .await?
        )),
        Request::SetBandwidth {
            name: Some(name),
            bandwidth,
        } => Ok(json!(
            vm(agent, &name)?
                .ask(|r| Command::SetBandwidth(bandwidth, r))
                .await?
        )),
        Request::SetBandwidth {
            name: None,
            bandwidth,
        } => {
            crate::config::write_bandwidth(&host.dir, &bandwidth)?;
            host.pace.set_schedule(Some(bandwidth.clone()));
            Ok(json!(format!(
                "agent-wide bandwidth limit is {bandwidth} (time zone {}); written to {}",
                host.pace.zone,
                crate::config::CONFIG_FILE
            )))
        }
        Request::SetCpuPriority { priority } => {
            host.data.set_priority(priority)?;
            crate::config::write_cpu_priority(&host.dir, priority)?;
            Ok(json!(format!(
                "the data path runs at CPU priority {priority} (nice {}); written to {}",
                host.data.nice_of(priority),
                crate::config::CONFIG_FILE
            )))
        }
        Request::Import { name, dir } => Ok(json!(
            vm(agent, &name)?
                .ask(|r| Command::Import(dir.into(), r))
                .await?
        )),
        Request::FailoverPrepare {
            name,
            shutdown_timeout_secs,
        } => {
            let shutdown = shutdown_timeout_secs.map(std::time::Duration::from_secs);
            failover(agent, &name, FailoverCmd::Prepare { shutdown }).await
        }
        Request::FailoverStart {
            name,
            point,
            no_start,
            force,
        } => {
            failover(
                agent,
                &name,
                FailoverCmd::Start {
                    point,
                    no_start,
                    force,
                },
            )
            .await
        }
        Request::FailoverTest { name, point } => {
            failover(agent, &name, FailoverCmd::Test { point }).await
        }
        Request::FailoverStopTest { name, test_id } => {
            failover(agent, &name, FailoverCmd::StopTest { test_id }).await
        }
        Request::FailoverCancel { name } => failover(agent, &name, FailoverCmd::Cancel).await,
        Request::FailoverComplete { name } => failover(agent, &name, FailoverCmd::Complete).await,
        Request::Reverse {
            name,
            replica,
            replica_fingerprint,
            frequency_secs,
            follow,
        } => {
            failover(
                agent,
                &name,
                FailoverCmd::Reverse {
                    replica,
                    replica_fingerprint,
                    frequency_secs,
                    follow,
                },
            )
            .await
        }
    }
}

/// `vm remove` (`replica: None`) or `replica remove` (`Some(keep_data)`): the owner checks and
/// removes, then stops; its handle is forgotten here.
async fn remove(
    agent: &Control,
    name: &str,
    replica: Option<bool>,
    check: bool,
) -> Result<Value, AgentError> {
    let r = vm(agent, name)?
        .ask(|r| Command::Remove(replica, check, r))
        .await?;
    if !check {
        agent.vms.remove(name);
    }
    Ok(json!(r))
}

/// A VM definition for VM `name` (`vm add`, `vm set --launch`): valid, of that name, and
/// holding every disk of `disks`.
/// `vm add --libvirt`: the definition of a libvirt-managed VM, from its running domain: its
/// UUID, its disks (every one a file-backed qcow2 image, named by target) and its persistent
/// XML. `program` only marks it (`libvirt`): such a VM is never started from the definition.
async fn libvirt_definition(name: &str, lv: &LibvirtSource) -> Result<VmDefinition, AgentError> {
    let (uri, domain) = (lv.uri.clone(), lv.domain.clone());
    let err = |source| AgentError::LibvirtDomain {
        domain: lv.domain.clone(),
        uri: lv.uri.clone(),
        source,
    };
    let read = tokio::task::spawn_blocking(move || {
        let conn = vmr_libvirt::Libvirt::open(&uri)?;
        let dom = conn.domain(&domain)?;
        if !dom.is_running()? {
            return Err(vmr_libvirt::LibvirtError::NotRunning { name: domain });
        }
        Ok((dom.uuid()?, dom.disks()?, dom.xml(true)?))
    })
    .await
    .map_err(AgentError::Task)?;
    let (uuid, disks, xml) = read.map_err(err)?;
    let uuid = uuid::Uuid::parse_str(&uuid).map_err(|_| {
        err(vmr_libvirt::LibvirtError::DomainXml(Box::new(
            vmr_libvirt::XmlFault::BadUuid(uuid.clone()),
        )))
    })?;
    let def = VmDefinition {
        name: name.to_owned(),
        uuid,
        program: crate::lvfailover::LIBVIRT_PROGRAM.into(),
        args: vec![],
        test_args: vec![],
        network_args: vec![],
        disks: disks
            .iter()
            .map(|d| vmr_proto::vmdef::DiskDef {
                node: d.target.clone(),
                path: d.path.display().to_string(),
            })
            .collect(),
        libvirt_xml: Some(xml),
    };
    def.validate().map_err(AgentError::BadDefinition)?;
    Ok(def)
}

fn checked_definition(
    name: &str,
    launch_toml: &str,
    disks: &[String],
) -> Result<VmDefinition, AgentError> {
    let def = VmDefinition::from_toml(launch_toml).map_err(AgentError::BadDefinition)?;
    if def.name != name {
        return Err(AgentError::DefinitionName {
            def_name: def.name,
            name: name.to_owned(),
        });
    }
    for d in disks {
        if !def.disks.iter().any(|x| &x.node == d) {
            return Err(AgentError::DiskNotInDefinition { disk: d.clone() });
        }
    }
    Ok(def)
}

/// `vm add --nbd` and `--qga`: an absolute path a Unix socket can have (at most 107 bytes).
fn check_nbd_socket(option: &'static str, path: &str) -> Result<(), AgentError> {
    let bad = |reason| AgentError::BadNbdSocket {
        option,
        path: path.to_owned(),
        reason,
    };
    if !Path::new(path).is_absolute() {
        return Err(bad("not an absolute path"));
    }
    if path.len() > vmr_proto::sockpath::MAX_SOCKET_PATH {
        return Err(bad("longer than the 107 bytes a Unix socket path may have"));
    }
    Ok(())
}

/// How long `vm add` waits for the VM's QMP monitor.
const VM_ADD_QMP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// `vm add` checks what it can see at once, so that it never registers a VM that is not there:
/// the QMP socket answers, every disk to replicate is a block node of that QEMU, and the node
/// opens the image the definition names (compared as given, or both canonicalised).
async fn check_vm_is_there(
    qmp: &str,
    def: &VmDefinition,
    disks: &[String],
) -> Result<(), AgentError> {
    let ep = vmr_capture::Endpoint::Unix(qmp.into());
    let mut client = vmr_capture::qmp::QmpClient::connect(&ep, VM_ADD_QMP_TIMEOUT)
        .await
        .map_err(|source| AgentError::VmNotAnswering {
            qmp: qmp.to_owned(),
            source,
        })?;
    let nodes = client
        .execute_value("query-named-block-nodes", Some(json!({ "flat": true })))
        .await
        .map_err(|source| AgentError::QueryNodes {
            qmp: qmp.to_owned(),
            source,
        })?;
    let nodes = nodes.as_array().map(Vec::as_slice).unwrap_or_default();
    let name_of = |n: &Value| n["node-name"].as_str().map(str::to_owned);
    for d in def.disks.iter().filter(|d| disks.contains(&d.node)) {
        let Some(node) = nodes
            .iter()
            .find(|n| name_of(n).as_deref() == Some(&d.node))
        else {
            let mut names: Vec<String> = nodes
                .iter()
                .filter_map(name_of)
                .filter(|n| !n.starts_with('#'))
                .collect();
            names.sort();
            return Err(AgentError::DiskNodeMissing {
                node: d.node.clone(),
                qmp: qmp.to_owned(),
                nodes: if names.is_empty() {
                    "none".into()
                } else {
                    names.join(", ")
                },
            });
        };
        let qemu = node["file"].as_str().unwrap_or_default();
        let same = qemu == d.path
            || matches!(
                (std::fs::canonicalize(qemu), std::fs::canonicalize(&d.path)),
                (Ok(a), Ok(b)) if a == b
            );
        if !same {
            return Err(AgentError::DiskPathMismatch {
                node: d.node.clone(),
                definition: d.path.clone(),
                qemu: qemu.to_owned(),
            });
        }
    }
    Ok(())
}

async fn failover(agent: &Control, name: &str, cmd: FailoverCmd) -> Result<Value, AgentError> {
    let r = vm(agent, name)?.ask(|r| Command::Failover(cmd, r)).await?;
    to_value(r)
}

/// A certificate fingerprint as `server allow` takes it: 64 hex digits, upper or lower case,
/// optionally `:`-separated in pairs (as `openssl x509 -fingerprint -sha256` prints them), with
/// or without the `SHA256:` prefix; normalised to `SHA256:<64 lower-case hex>`, the form the
/// agent compares.
pub fn normalize_fingerprint(given: &str) -> Result<String, AgentError> {
    let bad = || AgentError::BadFingerprint {
        fingerprint: given.to_owned(),
    };
    let s = given.trim();
    let hex = match s.get(..7) {
        Some(p) if p.eq_ignore_ascii_case("sha256:") => &s[7..],
        _ => s,
    };
    let hex: String = if hex.contains(':') {
        let pairs: Vec<&str> = hex.split(':').collect();
        if pairs.iter().any(|p| p.len() != 2) {
            return Err(bad());
        }
        pairs.concat()
    } else {
        hex.to_owned()
    };
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    Ok(format!("SHA256:{}", hex.to_ascii_lowercase()))
}

/// The VMs registered on this host as primaries (`vm list`), by name.
pub async fn vm_list(agent: &Control) -> Result<Vec<vmr_proto::api::VmEntry>, AgentError> {
    let mut out = Vec::new();
    for h in agent.vms.all() {
        let rec = h.ask(Command::Record).await?;
        if rec.mode() != vmr_proto::api::ReplicationMode::Primary {
            continue;
        }
        let st = h.ask(Command::Status).await?;
        let program = VmDefinition::from_toml(&rec.launch_toml)
            .map(|d| d.program)
            .unwrap_or_default();
        out.push(vmr_proto::api::VmEntry {
            replica: rec.enable.as_ref().map(|e| e.replica.clone()),
            name: rec.name,
            uuid: rec.uuid,
            qmp: rec.qmp,
            program,
            disks: rec.disks,
            state: st.state,
            qga: rec.qga,
            libvirt: rec.libvirt,
        });
    }
    Ok(out)
}

/// Status rows of every VM on this host.
pub async fn all_status(agent: &Control) -> Result<Vec<VmStatus>, AgentError> {
    let mut out = Vec::new();
    for h in agent.vms.all() {
        out.push(h.ask(Command::Status).await?);
    }
    Ok(out)
}

/// Every registered VM's record.
async fn records(agent: &Control) -> Result<Vec<(VmHandle, VmRecord)>, AgentError> {
    let mut out = Vec::new();
    for h in agent.vms.all() {
        let rec = h.ask(Command::Record).await?;
        out.push((h, rec));
    }
    Ok(out)
}

/// `group create NAME VM...` (docs/groups.md): the one rule (`check_group_create`) first, then
/// each member's owner records the group; a member that refuses undoes the others.
async fn group_create(agent: &Control, name: &str, vms: &[String]) -> Result<Value, AgentError> {
    use vmr_core::group::Candidate;
    let all = records(agent).await?;
    let mut existing: Vec<String> = all.iter().filter_map(|(_, r)| r.group.clone()).collect();
    existing.sort();
    existing.dedup();
    let members: Vec<(String, Candidate)> = vms
        .iter()
        .map(|v| {
            let c = match all.iter().find(|(_, r)| &r.name == v) {
                None => Candidate::Unknown,
                Some((_, r)) if r.mode() != vmr_proto::api::ReplicationMode::Primary => {
                    Candidate::Replica
                }
                Some((_, r)) if r.libvirt.is_some() => Candidate::Libvirt,
                Some((_, r)) => match &r.enable {
                    None => Candidate::NotEnabled,
                    Some(e) => Candidate::Enabled {
                        replica: e.replica.clone(),
                        group: r.group.clone(),
                    },
                },
            };
            (v.clone(), c)
        })
        .collect();
    vmr_core::group::check_group_create(
        name,
        &existing,
        &members,
        agent.host.config.max_concurrent_cycles,
    )?;
    let mut done: Vec<&VmHandle> = Vec::new();
    for v in vms {
        let Some((h, _)) = all.iter().find(|(_, r)| &r.name == v) else {
            continue;
        };
        if let Err(e) = h.ask(|r| Command::SetGroup(Some(name.to_owned()), r)).await {
            for d in done {
                let _ = d.ask(|r| Command::SetGroup(None, r)).await;
            }
            return Err(e);
        }
        done.push(h);
    }
    agent.host.groups.set_members(name, vms.to_vec());
    Ok(json!(format!(
        "group {name} created: {} (their incremental cycles are cut together from now on)",
        vms.join(", ")
    )))
}

/// `group remove NAME`: each member replicates on its own again.
async fn group_remove(agent: &Control, name: &str) -> Result<Value, AgentError> {
    let all = records(agent).await?;
    let members: Vec<&(VmHandle, VmRecord)> = all
        .iter()
        .filter(|(_, r)| r.group.as_deref() == Some(name))
        .collect();
    if members.is_empty() {
        return Err(AgentError::UnknownGroup {
            name: name.to_owned(),
        });
    }
    for (h, _) in &members {
        h.ask(|r| Command::SetGroup(None, r)).await?;
    }
    agent.host.groups.set_members(name, Vec::new());
    Ok(json!(format!(
        "group {name} removed; {} replicate on their own",
        members
            .iter()
            .map(|(_, r)| r.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    )))
}

/// `group list`: every group of this agent's VMs, with its cut figures.
async fn group_list(agent: &Control) -> Result<Vec<vmr_proto::api::GroupStatus>, AgentError> {
    let all = records(agent).await?;
    let mut groups: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for (_, r) in &all {
        if let Some(g) = &r.group {
            groups.entry(g.clone()).or_default().push(r.name.clone());
        }
    }
    Ok(groups
        .into_iter()
        .map(|(name, members)| {
            let mut st = agent.host.groups.status(&name).unwrap_or_default();
            st.name = name;
            st.members = members;
            st
        })
        .collect())
}

/// `group points NAME` (replica): the complete group points, newest first, from every replica
/// VM's catalog (`vmr_core::group::complete_points`).
async fn group_points(
    agent: &Control,
    name: &str,
) -> Result<Vec<vmr_proto::api::GroupPointInfo>, AgentError> {
    vmr_core::group::check_group_name(name)?;
    let mut vms = Vec::new();
    let mut names = Vec::new();
    for (h, r) in records(agent).await? {
        if r.mode() != vmr_proto::api::ReplicationMode::Replica {
            continue;
        }
        let tags = h.ask(Command::GroupTags).await?;
        if tags
            .iter()
            .any(|(_, t)| t.as_ref().is_some_and(|t| t.group == name))
        {
            names.push((r.uuid, r.name.clone()));
            vms.push((r.uuid, tags));
        }
    }
    if vms.is_empty() {
        return Err(AgentError::UnknownGroup {
            name: name.to_owned(),
        });
    }
    let name_of = |u: uuid::Uuid| {
        names
            .iter()
            .find(|(x, _)| *x == u)
            .map_or_else(|| u.to_string(), |(_, n)| n.clone())
    };
    Ok(vmr_core::group::complete_points(name, &vms)
        .into_iter()
        .map(|g| vmr_proto::api::GroupPointInfo {
            point: g.point,
            members: g
                .members
                .into_iter()
                .map(|(u, id)| (name_of(u), id))
                .collect(),
        })
        .collect())
}

/// `group failover NAME [--test] [--point GP] [--latest-group-point]` (replica): every member
/// failed over (or a test copy of each started) at the member points of one complete group
/// point, the latest by default, or at each member's planned final point when every member
/// was prepared (`vmr_core::group::plan_group_failover` decides; only some prepared is
/// refused unless `pick` asks for the group point). All or none: when a member fails, the members already started are undone (test
/// copies stopped, failovers cancelled) and the error is returned.
async fn group_failover(
    agent: &Control,
    name: &str,
    test: bool,
    point: Option<u64>,
    pick: vmr_core::group::FailoverPick,
) -> Result<vmr_proto::api::GroupFailoverResult, AgentError> {
    let points = group_points(agent, name).await?;
    let gp = match point {
        None => points.into_iter().next(),
        Some(p) => points.into_iter().find(|g| g.point == p),
    }
    .ok_or_else(|| AgentError::NoGroupPoint {
        name: name.to_owned(),
        point,
    })?;
    let mut members = Vec::new();
    for (member, id) in &gp.members {
        let planned = if pick == vmr_core::group::FailoverPick::Default {
            vm(agent, member)?.ask(Command::PlannedFinal).await?
        } else {
            None
        };
        members.push(vmr_core::group::FailoverMember {
            name: member.clone(),
            group_point: *id,
            planned,
        });
    }
    let plan = vmr_core::group::plan_group_failover(name, &members, pick)?;
    if plan.planned {
        tracing::info!(
            group = name,
            "every member was prepared for a planned failover: each starts at its planned final point"
        );
    }
    let mut done: Vec<(String, vmr_proto::api::FailoverResult)> = Vec::new();
    for (member, id) in &plan.members {
        let cmd = if test {
            FailoverCmd::Test { point: Some(*id) }
        } else {
            FailoverCmd::Start {
                point: Some(*id),
                no_start: false,
                force: false,
            }
        };
        match vm(agent, member)?.ask(|r| Command::Failover(cmd, r)).await {
            Ok(r) => done.push((member.clone(), r)),
            Err(e) => {
                for (m, r) in done.iter().rev() {
                    let undo = if test {
                        FailoverCmd::StopTest { test_id: r.test_id }
                    } else {
                        FailoverCmd::Cancel
                    };
                    if let Ok(h) = vm(agent, m)
                        && let Err(u) = h.ask(|r| Command::Failover(undo, r)).await
                    {
                        tracing::error!(vm = %m, group = name, "undoing the member's group failover failed: {}", crate::util::chain(&u));
                    }
                }
                tracing::warn!(group = name, member = %member, "group failover failed; the members started before it were undone");
                return Err(e);
            }
        }
    }
    Ok(vmr_proto::api::GroupFailoverResult {
        point: gp.point,
        members: done.into_iter().map(|(_, r)| r).collect(),
        planned: plan.planned,
    })
}

/// `group prepare NAME` (primary; docs/groups.md): the members are this agent's VMs whose
/// record names the group; `vmr_core::group::plan_group_prepare` checks every member before
/// any is prepared (members already PreparedForFailover are skipped); each is prepared as
/// `failover prepare` does, in the members' order. A member whose prepare fails stops the
/// command: the members prepared before it stay prepared (PreparedForFailover; `group
/// failover` on the replica refuses until every member is) and running it again goes on.
async fn group_prepare(
    agent: &Control,
    name: &str,
    shutdown: Option<std::time::Duration>,
) -> Result<vmr_proto::api::GroupPrepareResult, AgentError> {
    vmr_core::group::check_group_name(name)?;
    let mut members = Vec::new();
    for (h, r) in records(agent).await? {
        if r.group.as_deref() != Some(name) {
            continue;
        }
        let st = h.ask(Command::Status).await?;
        members.push((r.name.clone(), st.state, st.last_cycle.is_some()));
    }
    if members.is_empty() {
        return Err(AgentError::UnknownGroup {
            name: name.to_owned(),
        });
    }
    let todo = vmr_core::group::plan_group_prepare(&members).map_err(|(member, refusal)| {
        AgentError::GroupPrepareRefused {
            group: name.to_owned(),
            member,
            refusal,
        }
    })?;
    let mut done = Vec::new();
    for member in &todo {
        let r = vm(agent, member)?
            .ask(|r| Command::Failover(FailoverCmd::Prepare { shutdown }, r))
            .await
            .inspect_err(|e| {
                tracing::warn!(group = name, member = %member, "group prepare stopped at this member (the ones before it are prepared; run it again to go on): {}", crate::util::chain(e));
            })?;
        done.push(r);
    }
    Ok(vmr_proto::api::GroupPrepareResult {
        group: name.to_owned(),
        members: done,
    })
}

/// `group reverse NAME` (the failed-over host, after `group failover`; docs/groups.md): the
/// members are the VMs the group points' tags name (read from this host's replica VMs'
/// catalogs); `vmr_core::group::plan_group_reverse` checks every member before any is
/// reversed (members already primary here, reversed by an earlier run, are skipped); each is
/// reversed as `reverse` does, in the tags' member order; then the group is formed here
/// (`group create`'s rule and recording), so the reversed replication cuts its members
/// together. A member whose reverse fails stops the command: the members reversed before it
/// stay reversed (a reverse cannot be undone) and running it again continues.
async fn group_reverse(
    agent: &Control,
    name: &str,
    how: FailoverCmd,
) -> Result<vmr_proto::api::GroupReverseResult, AgentError> {
    vmr_core::group::check_group_name(name)?;
    let all = records(agent).await?;
    let mut uuids: Vec<uuid::Uuid> = Vec::new();
    for (h, r) in &all {
        if r.mode() != vmr_proto::api::ReplicationMode::Replica {
            continue;
        }
        for (_, t) in h.ask(Command::GroupTags).await? {
            if let Some(t) = t.filter(|t| t.group == name) {
                for m in t.members {
                    if !uuids.contains(&m) {
                        uuids.push(m);
                    }
                }
            }
        }
    }
    if uuids.is_empty() {
        return Err(AgentError::UnknownGroup {
            name: name.to_owned(),
        });
    }
    let mut members: Vec<(String, vmr_core::group::ReverseMember)> = Vec::new();
    for u in &uuids {
        let Some((h, r)) = all.iter().find(|(_, r)| r.uuid == *u) else {
            return Err(AgentError::GroupMemberMissing {
                group: name.to_owned(),
                uuid: *u,
            });
        };
        let m = match r.mode() {
            vmr_proto::api::ReplicationMode::Primary => vmr_core::group::ReverseMember::Primary,
            vmr_proto::api::ReplicationMode::Replica => {
                vmr_core::group::ReverseMember::Replica(h.ask(Command::Status).await?.state)
            }
        };
        members.push((r.name.clone(), m));
    }
    let todo = vmr_core::group::plan_group_reverse(&members).map_err(|(member, refusal)| {
        AgentError::GroupMemberRefused {
            group: name.to_owned(),
            member,
            refusal,
        }
    })?;
    let mut done = Vec::new();
    for member in &todo {
        let r = vm(agent, member)?
            .ask(|r| Command::Failover(how.clone(), r))
            .await
            .inspect_err(|e| {
                tracing::warn!(group = name, member = %member, "group reverse stopped at this member (the ones before it are reversed; run it again to go on): {}", crate::util::chain(e));
            })?;
        done.push(r);
    }
    let names: Vec<String> = members.into_iter().map(|(n, _)| n).collect();
    let grouped = records(agent)
        .await?
        .iter()
        .any(|(_, r)| r.group.as_deref() == Some(name));
    if !grouped {
        group_create(agent, name, &names).await?;
    }
    Ok(vmr_proto::api::GroupReverseResult {
        group: name.to_owned(),
        members: done,
        grouped: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_actions_are_named_with_their_arguments_and_queries_are_not() {
        let add = admin_action(&Request::VmAdd {
            name: "web1".into(),
            qmp: "/run/web1.qmp".into(),
            launch_toml: "name = \"web1\"".into(),
            disks: vec!["disk0".into()],
            nbd: None,
            qga: None,
            libvirt: None,
        })
        .expect("vm add is an action");
        assert!(
            add.contains(r#""op":"vm-add""#)
                && add.contains("/run/web1.qmp")
                && add.contains("<definition, 13 bytes>")
                && !add.contains("name = "),
            "{add}"
        );
        let pause = admin_action(&Request::Pause {
            name: "web1".into(),
        })
        .expect("pause is an action");
        assert_eq!(pause, r#"{"name":"web1","op":"pause"}"#);
        assert!(
            admin_action(&Request::Measure {
                name: None,
                reset: true
            })
            .is_some()
        );
        for q in [
            Request::VmList,
            Request::ServerShow,
            Request::Status { name: None },
            Request::Measure {
                name: None,
                reset: false,
            },
            Request::VmRemove {
                name: "web1".into(),
                check: true,
            },
        ] {
            assert_eq!(admin_action(&q), None, "{q:?}");
        }
    }

    #[tokio::test]
    async fn request_lines_are_bounded() {
        let input = b"{\"op\":\"vm-list\"}\nlast".to_vec();
        let mut r = BufReader::new(&input[..]);
        assert_eq!(
            read_line(&mut r, 64).await.expect("read"),
            Line::Text(b"{\"op\":\"vm-list\"}".to_vec())
        );
        assert_eq!(
            read_line(&mut r, 64).await.expect("read"),
            Line::Text(b"last".to_vec())
        );
        assert_eq!(read_line(&mut r, 64).await.expect("read"), Line::End);
        // Exactly max bytes is a line; one more without a newline is refused.
        let mut fits = vec![b'x'; 64];
        fits.push(b'\n');
        let mut r = BufReader::new(&fits[..]);
        assert!(
            matches!(read_line(&mut r, 64).await.expect("read"), Line::Text(l) if l.len() == 64)
        );
        let long = vec![b'x'; 10_000];
        let mut r = BufReader::new(&long[..]);
        assert_eq!(read_line(&mut r, 64).await.expect("read"), Line::TooLong);
    }

    #[test]
    fn fingerprints_are_normalised_or_refused() {
        let hex = "0123456789abcdef".repeat(4);
        let want = format!("SHA256:{hex}");
        let upper = hex.to_ascii_uppercase();
        let colons = upper
            .as_bytes()
            .chunks(2)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect::<Vec<_>>()
            .join(":");
        for ok in [
            want.clone(),
            format!("sha256:{upper}"),
            upper.clone(),
            format!("SHA256:{colons}"),
            colons.clone(),
            format!("  {want}\n"),
        ] {
            assert_eq!(normalize_fingerprint(&ok).expect(&ok), want, "{ok}");
        }
        for bad in [
            String::new(),
            "SHA256:".to_owned(),
            format!("SHA256:{}", &hex[..63]),
            format!("SHA256:{hex}0"),
            format!("SHA256:{}g", &hex[..63]),
            format!("SHA1:{hex}"),
            format!("{}:{}", &hex[..3], &hex[3..]),
            "SHA256:xyz".to_owned(),
        ] {
            let e = normalize_fingerprint(&bad).expect_err(&bad);
            assert!(matches!(e, AgentError::BadFingerprint { .. }), "{bad}");
            assert_eq!(e.exit_code(), exit::USAGE);
        }
    }
}
