//! The local control API: a Unix socket (mode 0600) in the agent directory; one JSON
//! [`Request`] line in, one [`Response`] line out.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use vmr_proto::VmDefinition;
use vmr_proto::api::{AllowEntry, Request, Response, VmStatus};

use crate::errors::AgentError;
use crate::exit;
use crate::host::Host;
use crate::vm::{Command, FailoverCmd, Registry, VmHandle};
use vmr_proto::machine::PrimarySnapshot;
use vmr_proto::record::{MachineSnapshot, VmRecord};

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
                let mut lines = BufReader::new(r).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let resp = match Request::from_line(&line) {
                        Ok(req) => match handle(&agent, req).await {
                            Ok(value) => Response::Ok { value },
                            Err(e) => to_response(&e),
                        },
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
            if !fingerprint.starts_with("SHA256:") || fingerprint.len() != 7 + 64 {
                return Err(AgentError::BadFingerprint { fingerprint });
            }
            let storage = storage.unwrap_or_else(|| host.config.storage.clone());
            std::fs::create_dir_all(&storage)
                .map_err(AgentError::io("creating storage", &storage))?;
            let entry = AllowEntry {
                trust_group: trust_group.unwrap_or_else(|| primary.clone()),
                primary,
                fingerprint,
                storage,
            };
            let msg = format!(
                "primary {:?} authorized (trust group {:?})",
                entry.primary, entry.trust_group
            );
            host.put_allow(entry)?;
            Ok(json!(msg))
        }
        Request::ServerShow => Ok(json!({
            "name": host.config.name,
            "listen": host.config.listen,
            "fingerprint": host.identity.fingerprint(),
            "allowed": host.allowed(),
        })),
        Request::VmAdd {
            name,
            qmp,
            launch_toml,
            disks,
        } => {
            let def = VmDefinition::from_toml(&launch_toml).map_err(AgentError::BadDefinition)?;
            if def.name != name {
                return Err(AgentError::DefinitionName {
                    def_name: def.name,
                    name,
                });
            }
            for d in &disks {
                if !def.disks.iter().any(|x| &x.node == d) {
                    return Err(AgentError::DiskNotInDefinition { disk: d.clone() });
                }
            }
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
            let rec = VmRecord {
                name: name.clone(),
                uuid: def.uuid,
                qmp,
                launch_toml,
                disks,
                enable: None,
                primary: host.config.name.clone(),
                trust_group: None,
                machine: MachineSnapshot::Primary(PrimarySnapshot::default()),
            };
            host.save_vm(&rec)?;
            agent.vms.spawn(host, rec, false)?;
            Ok(json!(format!("VM {name:?} ({}) registered", def.uuid)))
        }
        Request::VmList | Request::Status { name: None } => to_value(all_status(agent).await?),
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
            Ok(json!(vm(agent, &name)?.ask(Command::StartInitial).await?))
        }
        Request::Pause { name } => Ok(json!(vm(agent, &name)?.ask(Command::Pause).await?)),
        Request::Resume { name } => Ok(json!(vm(agent, &name)?.ask(Command::Resume).await?)),
        Request::ResumeResync { name, at_ms } => Ok(json!(
            vm(agent, &name)?
                .ask(|r| Command::ResumeResync(at_ms, r))
                .await?
        )),
        Request::Disable { name } => Ok(json!(vm(agent, &name)?.ask(Command::Disable).await?)),
        Request::Points { name } => to_value(vm(agent, &name)?.ask(Command::Points).await?),
        Request::Import { name, dir } => Ok(json!(
            vm(agent, &name)?
                .ask(|r| Command::Import(dir.into(), r))
                .await?
        )),
        Request::FailoverPrepare { name } => failover(agent, &name, FailoverCmd::Prepare).await,
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
        } => {
            failover(
                agent,
                &name,
                FailoverCmd::Reverse {
                    replica,
                    replica_fingerprint,
                    frequency_secs,
                },
            )
            .await
        }
    }
}

async fn failover(agent: &Control, name: &str, cmd: FailoverCmd) -> Result<Value, AgentError> {
    let r = vm(agent, name)?.ask(|r| Command::Failover(cmd, r)).await?;
    to_value(r)
}

/// Status rows of every VM on this host.
pub async fn all_status(agent: &Control) -> Result<Vec<VmStatus>, AgentError> {
    let mut out = Vec::new();
    for h in agent.vms.all() {
        out.push(h.ask(Command::Status).await?);
    }
    Ok(out)
}
