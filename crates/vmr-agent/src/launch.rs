//! Starting a VM from its replicated definition, and where vmreplica keeps per-VM work files.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use vmr_proto::VmDefinition;

use crate::errors::AgentError;

/// The short tag naming a VM's QEMU objects (`vmr-<tag>-*`): the first 8 hex digits of its UUID.
pub fn tag(uuid: uuid::Uuid) -> String {
    uuid.simple().to_string()[..8].to_owned()
}

/// Per-VM work directory of an agent (fleecing temp files, the NBD socket).
pub fn work_dir(agent_dir: &Path, uuid: uuid::Uuid) -> PathBuf {
    agent_dir.join("work").join(tag(uuid))
}

/// The NBD server socket the capture uses for a VM (the `{nbd}` placeholder).
pub fn nbd_socket(agent_dir: &Path, uuid: uuid::Uuid) -> PathBuf {
    work_dir(agent_dir, uuid).join(format!("vmr-{}-nbd.sock", tag(uuid)))
}

/// `kvm` when /dev/kvm can be opened, `tcg` otherwise.
pub fn accel() -> &'static str {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
    {
        "kvm"
    } else {
        "tcg"
    }
}

/// The command that starts `def` with the given disk paths and sockets.
pub fn command(
    def: &VmDefinition,
    disks: &dyn Fn(&str) -> Option<String>,
    qmp: &Path,
    nbd: &Path,
    test: bool,
    log: &Path,
) -> Result<Command, AgentError> {
    let args = def.render_args(
        &qmp.display().to_string(),
        &nbd.display().to_string(),
        accel(),
        test,
        disks,
    )?;
    if let Some(p) = nbd.parent() {
        std::fs::create_dir_all(p).map_err(AgentError::io("creating", p))?;
    }
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(AgentError::io("opening", log))?;
    let mut cmd = Command::new(&def.program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(
            out.try_clone()
                .map_err(AgentError::io("duplicating", log))?,
        )
        .stderr(out);
    Ok(cmd)
}
