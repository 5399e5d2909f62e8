//! Starting a VM from its replicated definition, and where vmreplica keeps per-VM work files.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use vmr_proto::VmDefinition;

use crate::errors::AgentError;

/// The short tag naming a VM's QEMU nodes, jobs and bitmaps (`vmr-<tag>-*`): the first 8 hex
/// digits of its UUID. These names live only in the VM's own QEMU process, so VMs whose UUIDs
/// share the tag never meet there (and QEMU limits node names to 31 characters). Everything
/// VMs share on the host — the work directory with the fleecing files and the NBD socket (so
/// the NBD server and its exports), the failover directory — is named by the full UUID
/// ([`ident`]).
pub fn tag(uuid: uuid::Uuid) -> String {
    uuid.simple().to_string()[..8].to_owned()
}

/// A VM's identity in host-wide names: its UUID's 32 hex digits.
pub fn ident(uuid: uuid::Uuid) -> String {
    uuid.simple().to_string()
}

/// Per-VM work directory of an agent (fleecing temp files, the NBD socket): `work/<uuid>`.
pub fn work_dir(agent_dir: &Path, uuid: uuid::Uuid) -> PathBuf {
    agent_dir.join("work").join(ident(uuid))
}

/// Per-VM failover directory of an agent (overlays, a started VM's sockets): `fo/<uuid>`.
pub fn failover_dir(agent_dir: &Path, uuid: uuid::Uuid) -> PathBuf {
    agent_dir.join("fo").join(ident(uuid))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vms_sharing_a_uuid_prefix_get_their_own_paths() {
        let a = uuid::Uuid::parse_str("abcdef01-0000-4000-8000-000000000001").expect("uuid");
        let b = uuid::Uuid::parse_str("abcdef01-0000-4000-8000-000000000002").expect("uuid");
        let dir = Path::new("/var/lib/vmreplica");
        assert_eq!(tag(a), tag(b));
        assert_ne!(work_dir(dir, a), work_dir(dir, b));
        assert_ne!(nbd_socket(dir, a), nbd_socket(dir, b));
        assert_ne!(failover_dir(dir, a), failover_dir(dir, b));
        assert_eq!(
            nbd_socket(dir, a).display().to_string(),
            format!(
                "/var/lib/vmreplica/work/{}/vmr-abcdef01-nbd.sock",
                a.simple()
            )
        );
    }
}
