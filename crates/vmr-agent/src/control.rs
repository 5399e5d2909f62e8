//! The local control API: a Unix socket (mode 0600) in the agent directory; one JSON
//! [`Request`] line in, one [`Response`] line out.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use vmr_proto::VmDefinition;
use vmr_proto::api::{
    AllowEntry, ReplicationMode, ReplicationState, ReplicationStats, Request, Response, VmRecord,
    VmStatus,
};

use super::Agent;
use crate::exit;
use crate::util::{Coded, coded, now_ms};

/// Bind the control socket and serve it in the background; returns its path.
pub async fn start(agent: &Arc<Agent>) -> anyhow::Result<PathBuf> {
    let path = crate::config::socket_path(&agent.dir);
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            anyhow::bail!("another agent is already serving {}", path.display());
        }
        std::fs::remove_file(&path).ok();
    }
    let listener =
        UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let agent = agent.clone();
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
                    let resp = match serde_json::from_str::<Request>(&line) {
                        Ok(req) => match handle(&agent, req).await {
                            Ok(value) => Response::Ok { value },
                            Err(e) => to_response(&e),
                        },
                        Err(e) => Response::Err {
                            chain: vec![format!("bad request: {e}")],
                            code: exit::USAGE,
                        },
                    };
                    let mut out = serde_json::to_string(&resp).unwrap_or_default();
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

fn to_response(e: &anyhow::Error) -> Response {
    let code = e
        .chain()
        .find_map(|c| c.downcast_ref::<Coded>())
        .map_or(exit::FAILURE, |c| c.code);
    Response::Err {
        chain: e.chain().map(|c| c.to_string()).collect(),
        code,
    }
}

fn unknown_vm(name: &str) -> anyhow::Error {
    coded(
        exit::NOT_FOUND,
        format!("unknown VM {name:?} (see `vmreplica vm list`)"),
    )
}

async fn handle(agent: &Arc<Agent>, req: Request) -> anyhow::Result<Value> {
    match req {
        Request::ServerAllow {
            primary,
            fingerprint,
            storage,
            trust_group,
        } => {
            if !fingerprint.starts_with("SHA256:") || fingerprint.len() != 7 + 64 {
                return Err(coded(
                    exit::USAGE,
                    format!("{fingerprint:?} is not a certificate fingerprint (SHA256:<64 hex>)"),
                ));
            }
            let storage = storage.unwrap_or_else(|| agent.config.storage.clone());
            std::fs::create_dir_all(&storage)
                .with_context(|| format!("creating storage {storage}"))?;
            let entry = AllowEntry {
                trust_group: trust_group.unwrap_or_else(|| primary.clone()),
                primary,
                fingerprint,
                storage,
            };
            agent.db().put_allow(&entry)?;
            Ok(json!(format!(
                "primary {:?} authorized (trust group {:?})",
                entry.primary, entry.trust_group
            )))
        }
        Request::ServerShow => Ok(json!({
            "name": agent.config.name,
            "listen": agent.config.listen,
            "fingerprint": agent.identity.fingerprint(),
            "allowed": agent.db().allowed()?,
        })),
        Request::VmAdd {
            name,
            qmp,
            launch_toml,
            disks,
        } => {
            let def = VmDefinition::from_toml(&launch_toml).context("invalid --launch file")?;
            if def.name != name {
                return Err(coded(
                    exit::USAGE,
                    format!("the definition names the VM {:?}, not {name:?}", def.name),
                ));
            }
            for d in &disks {
                if !def.disks.iter().any(|x| &x.node == d) {
                    return Err(coded(
                        exit::USAGE,
                        format!("--disk {d:?} is not a disk of the definition"),
                    ));
                }
            }
            if let Some(existing) = agent
                .db()
                .vms()?
                .into_iter()
                .find(|r| r.name == name || r.uuid == def.uuid)
            {
                return Err(coded(
                    exit::INVALID_STATE,
                    format!(
                        "VM {:?} ({}) is already registered",
                        existing.name, existing.uuid
                    ),
                ));
            }
            let disks = if disks.is_empty() {
                def.disks.iter().map(|d| d.node.clone()).collect()
            } else {
                disks
            };
            let rec = VmRecord {
                name: name.clone(),
                uuid: def.uuid,
                mode: ReplicationMode::Primary,
                qmp,
                launch_toml,
                disks,
                enable: None,
                state: ReplicationState::Disabled,
                paused_from: None,
                last_cycle: None,
                disk_sizes: None,
                stats: ReplicationStats::default(),
                initial_at_ms: None,
                primary: agent.config.name.clone(),
                trust_group: None,
                last_error: None,
            };
            agent.db().put_vm(&rec)?;
            Ok(json!(format!("VM {name:?} ({}) registered", def.uuid)))
        }
        Request::VmList | Request::Status { name: None } => {
            Ok(serde_json::to_value(all_status(agent)?)?)
        }
        Request::Status { name: Some(name) } => {
            let rows: Vec<_> = all_status(agent)?
                .into_iter()
                .filter(|s| s.name == name)
                .collect();
            if rows.is_empty() {
                return Err(unknown_vm(&name));
            }
            Ok(serde_json::to_value(rows)?)
        }
        Request::Measure { name, reset } => {
            let rows: Vec<_> = all_status(agent)?
                .into_iter()
                .filter(|s| name.as_ref().is_none_or(|n| &s.name == n))
                .collect();
            if let Some(n) = &name
                && rows.is_empty()
            {
                return Err(unknown_vm(n));
            }
            if reset {
                for r in &rows {
                    super::primary::reset_stats(agent, &r.name)?;
                    super::replica::reset_stats(agent, r.uuid)?;
                }
            }
            Ok(serde_json::to_value(rows)?)
        }
        Request::Enable(args) => {
            let rec = agent
                .vm_record(&args.name)?
                .ok_or_else(|| unknown_vm(&args.name))?;
            if rec.mode != ReplicationMode::Primary {
                return Err(coded(
                    exit::INVALID_STATE,
                    format!("{:?} is a replica VM on this host", args.name),
                ));
            }
            if rec.enable.is_some() && rec.state != ReplicationState::Disabled {
                return Err(coded(
                    exit::INVALID_STATE,
                    format!(
                        "replication of {:?} is already enabled ({})",
                        args.name, rec.state
                    ),
                ));
            }
            if args.frequency_secs < 5 {
                return Err(coded(exit::USAGE, "frequency must be at least 5 s"));
            }
            for d in &args.exclude_disks {
                if !rec.disks.contains(d) {
                    return Err(coded(
                        exit::USAGE,
                        format!("--exclude-disk {d:?} is not a disk of {:?}", args.name),
                    ));
                }
            }
            if rec.disks.iter().all(|d| args.exclude_disks.contains(d)) {
                return Err(coded(
                    exit::USAGE,
                    "every disk is excluded; nothing to replicate",
                ));
            }
            super::primary::enable(agent, rec, args).await
        }
        Request::StartInitial { name } => {
            super::primary::command(agent, &name, super::primary::Cmd::StartInitial).await
        }
        Request::Pause { name } => pause_resume(agent, &name, true).await,
        Request::Resume { name } => pause_resume(agent, &name, false).await,
        Request::ResumeResync { name, at_ms } => {
            let rec = agent.vm_record(&name)?.ok_or_else(|| unknown_vm(&name))?;
            if rec.mode != ReplicationMode::Primary {
                return Err(coded(
                    exit::INVALID_STATE,
                    format!(
                        "{name:?} is a replica VM on this host; resynchronize from its primary"
                    ),
                ));
            }
            super::primary::command(agent, &name, super::primary::Cmd::ResumeResync(at_ms)).await
        }
        Request::Disable { name } => {
            let rec = agent.vm_record(&name)?.ok_or_else(|| unknown_vm(&name))?;
            match rec.mode {
                ReplicationMode::Primary => {
                    super::primary::command(agent, &name, super::primary::Cmd::Disable).await
                }
                ReplicationMode::Replica => {
                    super::replica::set_state(agent, rec, ReplicationState::Disabled)
                }
            }
        }
        Request::Points { name } => {
            let rec = agent.vm_record(&name)?.ok_or_else(|| unknown_vm(&name))?;
            if rec.mode != ReplicationMode::Replica {
                return Err(coded(
                    exit::INVALID_STATE,
                    format!(
                        "{name:?} is not a replica VM on this host; run `points` on its replica"
                    ),
                ));
            }
            Ok(serde_json::to_value(super::replica::points(agent, &rec)?)?)
        }
        Request::Import { name, dir } => {
            let rec = agent.vm_record(&name)?.ok_or_else(|| unknown_vm(&name))?;
            if rec.mode != ReplicationMode::Replica {
                return Err(coded(
                    exit::INVALID_STATE,
                    format!(
                        "{name:?} is not a replica VM on this host; enable replication on its \
                         primary first (the replica VM is created then), and import here"
                    ),
                ));
            }
            super::replica::import(agent, rec, std::path::Path::new(&dir)).await
        }
        req @ (Request::FailoverPrepare { .. }
        | Request::FailoverStart { .. }
        | Request::FailoverTest { .. }
        | Request::FailoverStopTest { .. }
        | Request::FailoverCancel { .. }
        | Request::FailoverComplete { .. }
        | Request::Reverse { .. }) => super::failover::handle(agent, req).await,
    }
}

async fn pause_resume(agent: &Arc<Agent>, name: &str, pause: bool) -> anyhow::Result<Value> {
    let rec = agent.vm_record(name)?.ok_or_else(|| unknown_vm(name))?;
    match rec.mode {
        ReplicationMode::Primary => {
            let cmd = if pause {
                super::primary::Cmd::Pause
            } else {
                super::primary::Cmd::Resume
            };
            super::primary::command(agent, name, cmd).await
        }
        ReplicationMode::Replica => {
            let target = if pause {
                ReplicationState::Suspended
            } else if rec.last_cycle.is_some() {
                ReplicationState::Replicating
            } else {
                ReplicationState::WaitingForInitialReplication
            };
            super::replica::set_state(agent, rec, target)
        }
    }
}

/// Status rows of every VM on this host.
pub fn all_status(agent: &Arc<Agent>) -> anyhow::Result<Vec<VmStatus>> {
    let now = now_ms();
    let mut out = Vec::new();
    let records = agent.db().vms()?;
    for rec in records {
        out.push(match rec.mode {
            ReplicationMode::Primary => super::primary::status(agent, &rec, now),
            ReplicationMode::Replica => super::replica::status(agent, &rec, now),
        });
    }
    Ok(out)
}
