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

/// Where agents before issue 11 put a VM's NBD socket: `work/<tag>/vmr-<tag>-nbd.sock`. A VM
/// whose QEMU still runs the NBD server such an agent started keeps using it (it cannot be
/// started a second time elsewhere).
pub fn legacy_nbd_socket(agent_dir: &Path, uuid: uuid::Uuid) -> PathBuf {
    agent_dir
        .join("work")
        .join(tag(uuid))
        .join(format!("vmr-{}-nbd.sock", tag(uuid)))
}

/// Longest Unix socket path (`sun_path` has 108 bytes with the terminating NUL).
pub use vmr_proto::sockpath::MAX_SOCKET_PATH;

/// The NBD server socket the capture uses for a VM (the `{nbd}` placeholder):
/// `work/<uuid>/vmr-<tag>-nbd.sock`. When that path exceeds [`MAX_SOCKET_PATH`] (an agent
/// directory longer than 47 bytes), the directory part is shortened by the one rule of
/// [`vmr_proto::sockpath::socket_path`], never the identity:
/// `<runtime>/vmreplica/<agent>/vmr-<uuid>.sock`, `<agent>` being the first 16 hex digits of
/// the BLAKE3 of the agent directory's path (two agents on one host never share it).
pub fn nbd_socket(agent_dir: &Path, uuid: uuid::Uuid) -> PathBuf {
    vmr_proto::sockpath::socket_path(
        work_dir(agent_dir, uuid).join(format!("vmr-{}-nbd.sock", tag(uuid))),
        agent_dir,
        &format!("vmr-{}.sock", ident(uuid)),
    )
}

/// `kvm` when /dev/kvm can be opened and the CPU shows hardware virtualization (`vmx` or
/// `svm` in /proc/cpuinfo), `tcg` otherwise. A /dev/kvm without them (e.g. a paravirtual KVM
/// module inside a cloud VM) cannot boot an ordinary guest kernel: the guest would hang.
pub fn accel() -> &'static str {
    let opens = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    accel_for(opens, &cpuinfo)
}

/// [`accel`]'s rule on its facts.
fn accel_for(kvm_opens: bool, cpuinfo: &str) -> &'static str {
    let hw = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if kvm_opens && hw { "kvm" } else { "tcg" }
}

/// Does file name `name` match `pattern` (`*` matches any run of characters, every other
/// character itself)?
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = name.strip_prefix(first) else {
        return false;
    };
    let middle: Vec<&str> = parts.collect();
    let Some((last, middle)) = middle.split_last() else {
        // No `*`: the whole name.
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// The program a replicated definition may start on this host: its file name must match one
/// of `allowed` (the `allowed-programs` key of `config`), and it must exist (an absolute path,
/// or a bare name found on the agent's `PATH`). Returns the resolved path.
pub fn allowed_program(
    program: &str,
    allowed: &[String],
    config: &Path,
) -> Result<PathBuf, AgentError> {
    let file = Path::new(program)
        .file_name()
        .and_then(|f| f.to_str())
        .unwrap_or("");
    if !allowed.iter().any(|p| glob_match(p, file)) {
        return Err(AgentError::ProgramNotAllowed {
            program: program.to_owned(),
            allowed: allowed.to_vec(),
            config: config.to_path_buf(),
        });
    }
    let resolved = if program.contains('/') {
        Some(PathBuf::from(program)).filter(|p| p.is_absolute())
    } else {
        std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .map(|d| d.join(program))
                .find(|c| c.is_file())
        })
    };
    match resolved {
        Some(p) if p.is_file() => Ok(p),
        _ => Err(AgentError::ProgramNotFound {
            program: program.to_owned(),
        }),
    }
}

/// The command line a [`Command`] runs, for the admin to read (arguments with spaces quoted).
pub fn display_command(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| {
            let a = a.to_string_lossy();
            if a.is_empty() || a.contains(char::is_whitespace) {
                format!("{a:?}")
            } else {
                a.into_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The guest agent socket of a VM the agent starts with QMP socket `qmp`: `qga.sock` beside
/// it (`{qga}`), when the definition has a guest agent channel.
pub fn qga_socket(def: &VmDefinition, qmp: &Path) -> Option<PathBuf> {
    def.uses_qga().then(|| qmp.with_file_name("qga.sock"))
}

/// The command that starts `def`'s `program` (resolved by [`allowed_program`]) with the
/// given disk paths and sockets (`{qga}`: [`qga_socket`]).
pub fn command(
    def: &VmDefinition,
    program: &Path,
    disks: &dyn Fn(&str) -> Option<String>,
    qmp: &Path,
    nbd: &Path,
    test: bool,
    log: &Path,
) -> Result<Command, AgentError> {
    let qga = qmp.with_file_name("qga.sock").display().to_string();
    let args = def.render_args_qga(
        &qmp.display().to_string(),
        &nbd.display().to_string(),
        Some(&qga),
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
    let mut cmd = Command::new(program);
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
    fn kvm_needs_hardware_virtualization_flags() {
        let vmx = "processor : 0\nflags\t\t: fpu vme vmx sse\n";
        let svm = "flags : fpu svm\n";
        let none = "flags : fpu vme sse hypervisor\n";
        assert_eq!(accel_for(true, vmx), "kvm");
        assert_eq!(accel_for(true, svm), "kvm");
        assert_eq!(accel_for(true, none), "tcg");
        assert_eq!(accel_for(false, vmx), "tcg");
        assert_eq!(accel_for(true, ""), "tcg");
    }

    #[test]
    fn program_patterns() {
        for (pat, name, ok) in [
            ("qemu-system-*", "qemu-system-x86_64", true),
            ("qemu-system-*", "qemu-system-", true),
            ("qemu-system-*", "qemu-img", false),
            ("qemu-storage-daemon", "qemu-storage-daemon", true),
            ("qemu-storage-daemon", "qemu-storage-daemon2", false),
            ("qemu-storage-daemon", "sh", false),
            ("*", "sh", true),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "acb", false),
            ("ab*ba", "aba", false),
        ] {
            assert_eq!(glob_match(pat, name), ok, "{pat} ~ {name}");
        }
    }

    #[test]
    fn only_allowed_programs_that_exist_are_started() {
        let allowed = vmr_proto::api::default_allowed_programs();
        let cfg = Path::new("/v/config.toml");
        let e = allowed_program("/bin/sh", &allowed, cfg).expect_err("sh");
        let text = e.to_string();
        assert!(
            text.contains("\"/bin/sh\"")
                && text.contains("allowed-programs")
                && text.contains("/v/config.toml"),
            "{text}"
        );
        // Matched on the file name: a directory named like QEMU does not help.
        assert!(allowed_program("/tmp/qemu-system-x/sh", &allowed, cfg).is_err());
        assert!(matches!(
            allowed_program("/nonexistent/qemu-system-x86_64", &allowed, cfg),
            Err(AgentError::ProgramNotFound { .. })
        ));
        assert!(matches!(
            allowed_program("./qemu-storage-daemon", &allowed, cfg),
            Err(AgentError::ProgramNotFound { .. })
        ));
        // Installed here (the tests run qemu-storage-daemon): found on PATH.
        let p = allowed_program("qemu-storage-daemon", &allowed, cfg).expect("on PATH");
        assert!(p.is_absolute() && p.is_file(), "{}", p.display());
        assert!(allowed_program("sh", &["s*".to_owned()], cfg).is_ok());
    }

    #[test]
    fn a_too_long_socket_path_shortens_the_directory_not_the_identity() {
        let u = uuid::Uuid::new_v4();
        let fits = Path::new("/x").join("a".repeat(44));
        assert_eq!(fits.as_os_str().len(), 47);
        assert!(nbd_socket(&fits, u).starts_with(&fits));
        let long = Path::new("/x").join("a".repeat(45));
        let long2 = Path::new("/y").join("a".repeat(45));
        let s = nbd_socket(&long, u);
        assert!(!s.starts_with(&long), "{}", s.display());
        assert!(s.as_os_str().len() <= MAX_SOCKET_PATH, "{}", s.display());
        assert!(s.display().to_string().contains(&ident(u)));
        assert_ne!(s, nbd_socket(&long2, u), "two agents share a socket");
        let very = Path::new("/x").join("b".repeat(300));
        assert!(nbd_socket(&very, u).as_os_str().len() <= MAX_SOCKET_PATH);
    }

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
