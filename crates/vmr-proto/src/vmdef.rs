//! The VM definition (`--launch FILE`, TOML): identity, disks, and how to start the VM with QEMU.
//! It is replicated with the disks so that the replica can start the VM on failover.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A VM definition as written by the admin in TOML.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct VmDefinition {
    /// Human name (may collide across primaries; the UUID does not).
    pub name: String,
    /// Stable identity of the VM.
    pub uuid: Uuid,
    /// The QEMU program to run (`qemu-system-x86_64`, `qemu-storage-daemon`, ...).
    pub program: String,
    /// Arguments; placeholders `{disk:NODE}` (path of that disk's image), `{qmp}` (QMP socket
    /// path), `{nbd}` (the NBD server socket vmreplica reads the VM's disks through: only a
    /// qemu-storage-daemon stand-in, which serves its "guest" I/O over NBD, starts that server
    /// itself; a real VM leaves it out and vmreplica starts it), `{qga}` (the host end of the
    /// VM's qemu-guest-agent channel, e.g. `-chardev socket,path={qga},server=on,wait=off,id=qga0`
    /// with a `virtserialport` named `org.qemu.guest_agent.0`: vmreplica then starts a
    /// failed-over VM with its agent channel beside its QMP socket, `{dir}/qga.sock`, and uses
    /// it for app-consistent points and guest shutdown), `{name}`, `{uuid}`,
    /// `{accel}` (`kvm` or `tcg`) and `{dir}` (the directory the VM is started in: the one
    /// holding its `{qmp}` socket; for a failover `DIR/fo/<uuid>/live` or
    /// `DIR/fo/<uuid>/t<id>`, a fresh one per start, e.g. for `-serial file:{dir}/serial.log`)
    /// are substituted when vmreplica starts the VM (failover, test failover): `{nbd}` then is
    /// the agent's own socket (`DIR/work/<uuid>/vmr-<uuid8>-nbd.sock`). A stand-in the admin
    /// starts names its NBD socket at `vm add --nbd SOCK` instead.
    pub args: Vec<String>,
    /// Arguments added only when the VM is started for a test failover (e.g. an isolated NIC);
    /// the `network-args` run is dropped from `args` for a test failover.
    #[serde(default)]
    pub test_args: Vec<String>,
    /// Arguments that attach the VM to production networks: one contiguous run of `args`,
    /// repeated here. Removed for a test failover; replaced by the failover host's
    /// `vm set --replica-network-args` for a real failover there.
    #[serde(default)]
    pub network_args: Vec<String>,
    /// The disks: block node name and image path on the primary.
    pub disks: Vec<DiskDef>,
    /// A libvirt-managed VM (`vm add --libvirt`): the domain's persistent XML, replicated with
    /// the definition and stored by the replica. Such a VM is not started with `program` and
    /// `args`: a failover of it is refused until failover through libvirt is built
    /// (docs/libvirt.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libvirt_xml: Option<String>,
}

/// One disk of a VM definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DiskDef {
    /// The block node name QEMU knows the disk's format node by (e.g. `disk0`).
    pub node: String,
    /// Path of the image on the primary host.
    pub path: String,
}

/// Why a VM definition is not usable.
#[derive(Debug, thiserror::Error)]
pub enum VmDefinitionError {
    /// Not valid TOML or not the expected shape.
    #[error("VM definition is not valid TOML")]
    Parse(#[from] toml::de::Error),
    /// Semantically wrong.
    #[error("VM definition is invalid: {0}")]
    Invalid(DefinitionFault),
}

/// What is wrong in a VM definition that parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DefinitionFault {
    /// The name is empty, longer than 64 characters, or holds a control character or `/`
    /// (the name as shown: at most its first 64 characters).
    #[error("bad VM name {0:?} (1 to 64 characters, no control characters or '/')")]
    BadName(String),
    /// `program` is empty.
    #[error("program is empty")]
    EmptyProgram,
    /// No disk is listed.
    #[error("a VM needs at least one disk")]
    NoDisks,
    /// A disk's node name is empty or listed twice.
    #[error("disk node {0:?} empty or repeated")]
    BadDiskNode(String),
    /// An argument names a placeholder that does not exist.
    #[error("unknown placeholder {{{placeholder}}} in argument {arg:?}")]
    UnknownPlaceholder {
        /// The placeholder, without braces.
        placeholder: String,
        /// The argument.
        arg: String,
    },
    /// `network-args` is not one contiguous run of `args`, in the same order.
    #[error("network-args {0:?} must appear in args as one contiguous run, in the same order")]
    NetworkArgsNotInArgs(Vec<String>),
    /// `{qga}` is used but no guest agent socket was given.
    #[error("no guest agent socket for {{qga}}")]
    NoQgaSocket,
    /// `{disk:NODE}` names a node without a path.
    #[error("no path for {{{0}}}")]
    NoDiskPath(String),
}

impl VmDefinition {
    /// Parse and validate a definition.
    pub fn from_toml(text: &str) -> Result<Self, VmDefinitionError> {
        let def: VmDefinition = toml::from_str(text)?;
        def.validate()?;
        Ok(def)
    }

    /// Render as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }

    /// Check names, disks and placeholders.
    pub fn validate(&self) -> Result<(), VmDefinitionError> {
        let bad = |f: DefinitionFault| Err(VmDefinitionError::Invalid(f));
        // Also what a replica accepts from a primary: 1 to 64 characters, no control
        // character (a newline would break the status table and the logs), no '/'.
        if self.name.is_empty()
            || self.name.contains('/')
            || self.name.chars().count() > 64
            || self.name.chars().any(char::is_control)
        {
            let shown: String = self.name.chars().take(64).collect();
            return bad(DefinitionFault::BadName(shown));
        }
        if self.program.is_empty() {
            return bad(DefinitionFault::EmptyProgram);
        }
        if self.disks.is_empty() {
            return bad(DefinitionFault::NoDisks);
        }
        let mut seen = std::collections::BTreeSet::new();
        for d in &self.disks {
            if d.node.is_empty() || !seen.insert(d.node.as_str()) {
                return bad(DefinitionFault::BadDiskNode(d.node.clone()));
            }
        }
        for a in self.args.iter().chain(&self.test_args) {
            for ph in placeholders(a) {
                let ok = matches!(
                    ph,
                    "qmp" | "nbd" | "qga" | "name" | "uuid" | "accel" | "dir"
                ) || ph
                    .strip_prefix("disk:")
                    .is_some_and(|n| self.disks.iter().any(|d| d.node == n));
                if !ok {
                    return bad(DefinitionFault::UnknownPlaceholder {
                        placeholder: ph.to_owned(),
                        arg: a.clone(),
                    });
                }
            }
        }
        if self.network_run().is_none() {
            return bad(DefinitionFault::NetworkArgsNotInArgs(
                self.network_args.clone(),
            ));
        }
        Ok(())
    }

    /// Where the `network-args` run is in `args` (an empty run is at the end).
    fn network_run(&self) -> Option<std::ops::Range<usize>> {
        let n = self.network_args.len();
        if n == 0 {
            return Some(self.args.len()..self.args.len());
        }
        self.args
            .windows(n)
            .position(|w| w == self.network_args.as_slice())
            .map(|i| i..i + n)
    }

    /// This definition with its `network-args` run replaced by `new` (a real failover on a host
    /// whose networks differ: `vm set --replica-network-args`).
    pub fn with_network_args(&self, new: &[String]) -> Result<VmDefinition, VmDefinitionError> {
        let run = self.network_run().ok_or_else(|| {
            VmDefinitionError::Invalid(DefinitionFault::NetworkArgsNotInArgs(
                self.network_args.clone(),
            ))
        })?;
        let mut d = self.clone();
        d.args.splice(run, new.iter().cloned());
        d.network_args = new.to_vec();
        d.validate()?;
        Ok(d)
    }
}

impl VmDefinition {
    /// Whether the VM is started with a guest agent channel (`{qga}` in its arguments).
    pub fn uses_qga(&self) -> bool {
        self.args
            .iter()
            .chain(&self.test_args)
            .any(|a| placeholders(a).contains(&"qga"))
    }

    /// Substitute placeholders in every argument. `disk` maps a node name to its image path;
    /// `{dir}` becomes the directory of `qmp` (`.` when it has none). A `{qga}` placeholder is
    /// an error here: see [`Self::render_args_qga`].
    pub fn render_args(
        &self,
        qmp: &str,
        nbd: &str,
        accel: &str,
        test: bool,
        disk: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Vec<String>, VmDefinitionError> {
        self.render_args_qga(qmp, nbd, None, accel, test, disk)
    }

    /// [`Self::render_args`] with the guest agent socket for `{qga}`.
    pub fn render_args_qga(
        &self,
        qmp: &str,
        nbd: &str,
        qga: Option<&str>,
        accel: &str,
        test: bool,
        disk: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Vec<String>, VmDefinitionError> {
        let mut out = Vec::new();
        let run = self.network_run().ok_or_else(|| {
            VmDefinitionError::Invalid(DefinitionFault::NetworkArgsNotInArgs(
                self.network_args.clone(),
            ))
        })?;
        let args = self
            .args
            .iter()
            .enumerate()
            .filter(|(i, _)| !(test && run.contains(i)))
            .map(|(_, a)| a);
        let extra = if test { self.test_args.as_slice() } else { &[] };
        for a in args.chain(extra) {
            let mut r = a.clone();
            for ph in placeholders(a) {
                let val = match ph {
                    "qmp" => qmp.to_owned(),
                    "nbd" => nbd.to_owned(),
                    "qga" => qga
                        .map(str::to_owned)
                        .ok_or(VmDefinitionError::Invalid(DefinitionFault::NoQgaSocket))?,
                    "accel" => accel.to_owned(),
                    "dir" => match std::path::Path::new(qmp).parent() {
                        Some(d) if !d.as_os_str().is_empty() => d.display().to_string(),
                        _ => ".".to_owned(),
                    },
                    "name" => self.name.clone(),
                    "uuid" => self.uuid.to_string(),
                    other => other.strip_prefix("disk:").and_then(disk).ok_or_else(|| {
                        VmDefinitionError::Invalid(DefinitionFault::NoDiskPath(other.to_owned()))
                    })?,
                };
                r = r.replace(&format!("{{{ph}}}"), &val);
            }
            out.push(r);
        }
        Ok(out)
    }
}

/// The `{...}` placeholders in one argument.
pub fn placeholders(arg: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = arg;
    while let Some(start) = rest.find('{') {
        let Some(len) = rest[start..].find('}') else {
            break;
        };
        out.push(&rest[start + 1..start + len]);
        rest = &rest[start + len + 1..];
    }
    out
}

/// Where a libvirt-managed VM lives: its connection and domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LibvirtSource {
    /// libvirt connection URI (`vm add --connect`, default `qemu:///system`).
    pub uri: String,
    /// The domain's name.
    pub domain: String,
    /// The last checkpoint the replica acknowledged (`vmreplica-<n>`); absent before the
    /// first acknowledged cycle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acked_checkpoint: Option<String>,
    /// That checkpoint's description (`virDomainCheckpointGetXMLDesc`, without its parent):
    /// its libvirt metadata, when lost, is redefined from it. Absent when it could not be read
    /// (or in records written before it was kept): a lost checkpoint is then a resync.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acked_checkpoint_xml: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const QSD: &str = r#"
name = "web1"
uuid = "6c1f6d7e-5a8b-4d67-9d3e-2b1f1c0a9e01"
program = "qemu-storage-daemon"
args = ["--blockdev", "file,node-name=f0,filename={disk:disk0}", "--chardev", "socket,path={qmp},server=on,wait=off,id=m"]
[[disks]]
node = "disk0"
path = "/var/lib/vm/web1.qcow2"
"#;

    #[test]
    fn parses_and_validates() {
        let d = VmDefinition::from_toml(QSD).expect("valid");
        assert_eq!(d.disks[0].node, "disk0");
        let again = VmDefinition::from_toml(&d.to_toml()).expect("round trip");
        assert_eq!(again, d);
    }

    const KVM: &str = include_str!("../../../examples/kvm-vm.toml");

    #[test]
    fn test_failover_drops_only_the_network_run() {
        let d = VmDefinition::from_toml(KVM).expect("valid");
        let disk = |_: &str| Some("/x.qcow2".to_owned());
        let real = d
            .render_args("q", "n", "tcg", false, &disk)
            .expect("render");
        let test = d.render_args("q", "n", "tcg", true, &disk).expect("render");
        assert_eq!(
            real.len(),
            test.len() + d.network_args.len() - d.test_args.len()
        );
        // The disk's -device stays: only the NIC's -netdev/-device pair goes.
        assert!(test.iter().any(|a| a.starts_with("virtio-blk-pci")));
        let dev = test
            .iter()
            .position(|a| a.starts_with("virtio-blk-pci"))
            .expect("disk");
        assert_eq!(test[dev - 1], "-device");
        assert!(!test.iter().any(|a| a.contains("virtio-net-pci")));
        assert!(real.iter().any(|a| a.contains("virtio-net-pci")));
    }

    #[test]
    fn replica_network_args_replace_the_run() {
        let d = VmDefinition::from_toml(KVM).expect("valid");
        let new: Vec<String> = [
            "-netdev",
            "bridge,id=net0,br=br7",
            "-device",
            "e1000,netdev=net0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let r = d.with_network_args(&new).expect("replaced");
        assert!(r.args.iter().any(|a| a.contains("br=br7")));
        assert!(!r.args.iter().any(|a| a.contains("br=br0")));
        assert_eq!(r.args.len(), d.args.len());
        // A test failover of the replaced definition still drops the (new) network run.
        let t = r
            .render_args("q", "n", "tcg", true, &|_| Some("/x".into()))
            .expect("render");
        assert!(!t.iter().any(|a| a.contains("br7")));
        let mut bad = d.clone();
        bad.network_args.swap(0, 2);
        assert!(bad.validate().is_err());
    }

    #[test]
    fn rejects_unknown_placeholder() {
        let bad = QSD.replace("{disk:disk0}", "{disk:disk9}");
        let e = VmDefinition::from_toml(&bad).expect_err("unknown placeholder");
        assert!(
            matches!(
                &e,
                VmDefinitionError::Invalid(DefinitionFault::UnknownPlaceholder { placeholder, .. })
                    if placeholder == "disk:disk9"
            ),
            "{e:?}"
        );
        assert!(
            e.to_string()
                .contains("unknown placeholder {disk:disk9} in argument"),
            "{e}"
        );
    }

    #[test]
    fn rejects_names_that_break_tables() {
        for name in ["a\nb", "esc\u{1b}", &"n".repeat(65)] {
            let mut d = VmDefinition::from_toml(QSD).expect("valid");
            d.name = name.to_owned();
            let e = d.validate().expect_err(name);
            assert!(!e.to_string().contains('\n'), "{e}");
        }
        let mut d = VmDefinition::from_toml(QSD).expect("valid");
        d.name = "n".repeat(64);
        d.validate().expect("64 characters");
    }

    #[test]
    fn qga_placeholder() {
        let with = QSD.replace(
            "id=m\"]",
            "id=m\", \"-chardev\", \"socket,path={qga},server=on,wait=off,id=qga0\"]",
        );
        let d = VmDefinition::from_toml(&with).expect("valid");
        assert!(d.uses_qga());
        assert!(!VmDefinition::from_toml(QSD).expect("valid").uses_qga());
        let disk = |n: &str| Some(format!("/d/{n}"));
        let args = d
            .render_args_qga("/q", "/n", Some("/fo/qga.sock"), "tcg", false, &disk)
            .expect("render");
        assert!(
            args.iter()
                .any(|a| a == "socket,path=/fo/qga.sock,server=on,wait=off,id=qga0")
        );
        assert!(d.render_args("/q", "/n", "tcg", false, &disk).is_err());
    }

    #[test]
    fn dir_is_the_directory_of_the_qmp_socket() {
        let mut d = VmDefinition::from_toml(QSD).expect("valid");
        d.args.push("file:{dir}/serial.log".to_owned());
        d.validate().expect("{dir} is known");
        let args = d
            .render_args("/a/fo/x/live/qmp.sock", "/n", "tcg", false, &|_| {
                Some("/d".to_owned())
            })
            .expect("render");
        assert_eq!(
            args.last().map(String::as_str),
            Some("file:/a/fo/x/live/serial.log")
        );
        let args = d
            .render_args("qmp.sock", "/n", "tcg", false, &|_| Some("/d".to_owned()))
            .expect("render");
        assert_eq!(args.last().map(String::as_str), Some("file:./serial.log"));
    }

    #[test]
    fn rejects_unknown_field() {
        let bad = format!("{QSD}\nbogus = 1\n");
        assert!(matches!(
            VmDefinition::from_toml(&bad),
            Err(VmDefinitionError::Parse(_))
        ));
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    #[test]
    fn shipped_examples_are_valid() {
        for text in [
            include_str!("../../../examples/standin-vm.toml"),
            include_str!("../../../examples/kvm-vm.toml"),
        ] {
            let def = VmDefinition::from_toml(text).expect("example must parse");
            let args = def
                .render_args("/q", "/n", "kvm", true, &|n| Some(format!("/d/{n}")))
                .expect("render");
            assert!(args.iter().all(|a| !a.contains('{')), "{args:?}");
            assert!(!args.iter().any(|a| a.contains("br=br0")));
        }
    }
}

#[cfg(test)]
mod libvirt_tests {
    use super::*;

    #[test]
    fn the_domain_xml_travels_in_the_definition_and_old_definitions_parse() {
        let def = VmDefinition {
            name: "web1".into(),
            uuid: Uuid::nil(),
            program: "libvirt".into(),
            args: vec![],
            test_args: vec![],
            network_args: vec![],
            disks: vec![DiskDef {
                node: "vda".into(),
                path: "/var/lib/libvirt/images/web1.qcow2".into(),
            }],
            libvirt_xml: Some("<domain type='kvm'><name>web1</name></domain>".into()),
        };
        let text = def.to_toml();
        assert_eq!(VmDefinition::from_toml(&text).expect("parses"), def);
        let plain = VmDefinition {
            libvirt_xml: None,
            ..def
        };
        let text = plain.to_toml();
        assert!(!text.contains("libvirt-xml"), "{text}");
        assert_eq!(
            VmDefinition::from_toml(&text).expect("parses").libvirt_xml,
            None
        );
    }
}
