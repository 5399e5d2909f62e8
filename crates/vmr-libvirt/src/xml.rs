//! The XML vmreplica reads from and gives to libvirt: the disks of a domain definition, the
//! pull-mode backup and checkpoint documents of a cycle, and the socket of a running backup
//! job. Pure functions (no libvirt calls), table-tested.

use std::path::{Path, PathBuf};

use crate::LibvirtError;

/// One disk of a domain that vmreplica replicates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainDisk {
    /// Target name (`vda`): libvirt's name of the disk in backups and checkpoints.
    pub target: String,
    /// The image file.
    pub path: PathBuf,
    /// The image format (`qcow2`).
    pub format: String,
}

/// What one cycle asks libvirt for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupPlan {
    /// `<incremental>`: the checkpoint the delta is taken from; `None` = a full backup.
    pub incremental: Option<String>,
    /// The checkpoint created atomically with the job.
    pub checkpoint: String,
    /// The NBD server's Unix socket.
    pub socket: PathBuf,
    /// The disks (targets) backed up, each with its scratch file.
    pub disks: Vec<(String, PathBuf)>,
}

fn xml_err(reason: impl Into<String>) -> LibvirtError {
    LibvirtError::DomainXml {
        reason: reason.into(),
    }
}

/// The disks of a domain definition that vmreplica replicates: every `<disk device='disk'>`
/// (CD-ROMs and floppies are skipped), which must be a file-backed qcow2 image. Errors name
/// the first disk that is not.
pub fn parse_disks(domain_xml: &str) -> Result<Vec<DomainDisk>, LibvirtError> {
    let doc = roxmltree::Document::parse(domain_xml).map_err(|e| xml_err(e.to_string()))?;
    let root = doc.root_element();
    if root.tag_name().name() != "domain" {
        return Err(xml_err(format!(
            "root element is <{}>, not <domain>",
            root.tag_name().name()
        )));
    }
    let Some(devices) = root.children().find(|n| n.has_tag_name("devices")) else {
        return Err(LibvirtError::NoDisks);
    };
    let mut out = Vec::new();
    for disk in devices.children().filter(|n| n.has_tag_name("disk")) {
        if disk.attribute("device").unwrap_or("disk") != "disk" {
            continue;
        }
        let target = disk
            .children()
            .find(|n| n.has_tag_name("target"))
            .and_then(|t| t.attribute("dev"))
            .ok_or_else(|| xml_err("a <disk> without <target dev=...>"))?
            .to_string();
        let kind = disk.attribute("type").unwrap_or("file");
        if kind != "file" {
            return Err(LibvirtError::NotFile {
                disk: target,
                kind: kind.to_string(),
            });
        }
        let format = disk
            .children()
            .find(|n| n.has_tag_name("driver"))
            .and_then(|d| d.attribute("type"))
            .unwrap_or("raw")
            .to_string();
        if format != "qcow2" {
            return Err(LibvirtError::NotQcow2 {
                disk: target,
                format,
            });
        }
        let path = disk
            .children()
            .find(|n| n.has_tag_name("source"))
            .and_then(|s| s.attribute("file"))
            .ok_or_else(|| xml_err(format!("disk {target} has no <source file=...>")))?;
        out.push(DomainDisk {
            target,
            path: PathBuf::from(path),
            format,
        });
    }
    if out.is_empty() {
        return Err(LibvirtError::NoDisks);
    }
    Ok(out)
}

/// `s` as XML character data or attribute value.
pub fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '\'' => o.push_str("&apos;"),
            '"' => o.push_str("&quot;"),
            c => o.push(c),
        }
    }
    o
}

fn path_str(p: &Path) -> String {
    escape(&p.to_string_lossy())
}

/// The `<domainbackup mode='pull'>` document of a plan.
pub fn backup_xml(plan: &BackupPlan) -> String {
    let mut x = String::from("<domainbackup mode='pull'>\n");
    if let Some(c) = &plan.incremental {
        x.push_str(&format!("  <incremental>{}</incremental>\n", escape(c)));
    }
    x.push_str(&format!(
        "  <server transport='unix' socket='{}'/>\n  <disks>\n",
        path_str(&plan.socket)
    ));
    for (target, scratch) in &plan.disks {
        x.push_str(&format!(
            "    <disk name='{}' backup='yes' type='file'><scratch file='{}'/></disk>\n",
            escape(target),
            path_str(scratch)
        ));
    }
    x.push_str("  </disks>\n</domainbackup>\n");
    x
}

/// The `<domaincheckpoint>` document of a plan's new checkpoint, on the plan's disks.
pub fn checkpoint_xml(plan: &BackupPlan) -> String {
    let mut x = format!(
        "<domaincheckpoint>\n  <name>{}</name>\n  <description>vmreplica replication cycle</description>\n  <disks>\n",
        escape(&plan.checkpoint)
    );
    for (target, _) in &plan.disks {
        x.push_str(&format!(
            "    <disk name='{}' checkpoint='bitmap'/>\n",
            escape(target)
        ));
    }
    x.push_str("  </disks>\n</domaincheckpoint>\n");
    x
}

/// The Unix socket of a running pull-mode backup job's description, if it has one.
pub fn backup_socket(backup_xml: &str) -> Option<PathBuf> {
    let doc = roxmltree::Document::parse(backup_xml).ok()?;
    doc.root_element()
        .children()
        .find(|n| n.has_tag_name("server"))
        .and_then(|s| s.attribute("socket"))
        .map(PathBuf::from)
}

/// The export name and dirty-bitmap meta context of a disk in a backup job (libvirt's
/// defaults: the target name and `backup-<target>`).
pub fn export_of(target: &str) -> (String, String) {
    (
        target.to_string(),
        format!("qemu:dirty-bitmap:backup-{target}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dom(disks: &str) -> String {
        format!("<domain type='kvm'><name>web1</name><devices>{disks}</devices></domain>")
    }

    const QCOW: &str = "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/var/lib/libvirt/images/a &amp; b.qcow2'/><target dev='vda' bus='virtio'/></disk>";

    #[test]
    fn disks_of_a_domain() {
        let cd = "<disk type='file' device='cdrom'><driver name='qemu' type='raw'/><source file='/iso'/><target dev='sda'/></disk>";
        let second = "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/b.qcow2'/><target dev='vdb'/></disk>";
        let d = parse_disks(&dom(&format!("{QCOW}{cd}{second}"))).expect("parse");
        assert_eq!(
            d,
            vec![
                DomainDisk {
                    target: "vda".into(),
                    path: "/var/lib/libvirt/images/a & b.qcow2".into(),
                    format: "qcow2".into()
                },
                DomainDisk {
                    target: "vdb".into(),
                    path: "/b.qcow2".into(),
                    format: "qcow2".into()
                },
            ]
        );
    }

    #[test]
    fn disks_that_cannot_be_replicated() {
        let raw = "<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='/r.img'/><target dev='vdc'/></disk>";
        let blk = "<disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='/dev/sdz'/><target dev='vdd'/></disk>";
        let nosrc = "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><target dev='vde'/></disk>";
        let cases: Vec<(String, &str)> = vec![
            (dom(&format!("{QCOW}{raw}")), "vdc"),
            (dom(blk), "vdd"),
            (dom(nosrc), "vde"),
            (dom(""), "no file-backed disk"),
            (
                "<domain><name>x</name></domain>".into(),
                "no file-backed disk",
            ),
            ("<network/>".into(), "not <domain>"),
            ("<domain".into(), "domain XML"),
        ];
        for (xml, want) in cases {
            let e = parse_disks(&xml).expect_err(&xml).to_string();
            assert!(e.contains(want), "{xml}: {e}");
        }
        match parse_disks(&dom(raw)) {
            Err(LibvirtError::NotQcow2 { disk, format }) => {
                assert_eq!((disk.as_str(), format.as_str()), ("vdc", "raw"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn backup_and_checkpoint_documents() {
        let plan = BackupPlan {
            incremental: Some("vmreplica-3".into()),
            checkpoint: "vmreplica-4".into(),
            socket: "/run/x/'nbd'.sock".into(),
            disks: vec![("vda".into(), "/w/s-vda".into())],
        };
        let b = backup_xml(&plan);
        assert!(b.contains("<incremental>vmreplica-3</incremental>"), "{b}");
        assert!(b.contains("socket='/run/x/&apos;nbd&apos;.sock'"), "{b}");
        assert!(
            b.contains(
                "<disk name='vda' backup='yes' type='file'><scratch file='/w/s-vda'/></disk>"
            ),
            "{b}"
        );
        // both parse as XML and the socket reads back
        assert_eq!(backup_socket(&b), Some(PathBuf::from("/run/x/'nbd'.sock")));
        let c = checkpoint_xml(&plan);
        let doc = roxmltree::Document::parse(&c).expect("checkpoint xml");
        assert_eq!(
            doc.descendants()
                .find(|n| n.has_tag_name("name"))
                .and_then(|n| n.text()),
            Some("vmreplica-4")
        );
        let full = backup_xml(&BackupPlan {
            incremental: None,
            ..plan
        });
        assert!(!full.contains("incremental"), "{full}");
        assert_eq!(
            export_of("vdb"),
            (
                "vdb".to_string(),
                "qemu:dirty-bitmap:backup-vdb".to_string()
            )
        );
        assert_eq!(backup_socket("<domainbackup mode='push'/>"), None);
    }
}
