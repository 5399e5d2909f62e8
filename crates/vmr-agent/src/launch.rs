//! Starting a VM from its replicated definition, and where vmreplica keeps per-VM work files.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::Context;
use vmr_proto::VmDefinition;

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
) -> anyhow::Result<Command> {
    let args = def.render_args(
        &qmp.display().to_string(),
        &nbd.display().to_string(),
        accel(),
        test,
        disks,
    )?;
    if let Some(p) = nbd.parent() {
        std::fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
    }
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let mut cmd = Command::new(&def.program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    Ok(cmd)
}
