//! The XML vmreplica reads from and gives to libvirt: the disks of a domain definition, the
//! pull-mode backup and checkpoint documents of a cycle, and the socket of a running backup
//! job. Pure functions (no libvirt calls), table-tested.

use std::path::{Path, PathBuf};

use crate::LibvirtError;
use crate::error::{FailoverDiskFault, XmlFault};

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
    /// Disks backed up whole in an incremental job (`backupmode='full'`): the
    /// `<incremental>` checkpoint has no bitmap for them (added to the domain since).
    pub full_disks: Vec<String>,
}

fn xml_err(fault: XmlFault) -> LibvirtError {
    LibvirtError::DomainXml(Box::new(fault))
}

/// The disks of a domain definition that vmreplica replicates: every `<disk device='disk'>`
/// (CD-ROMs and floppies are skipped), which must be a file-backed qcow2 image. Errors name
/// the first disk that is not.
pub fn parse_disks(domain_xml: &str) -> Result<Vec<DomainDisk>, LibvirtError> {
    let doc = roxmltree::Document::parse(domain_xml).map_err(|e| xml_err(XmlFault::Parse(e)))?;
    let root = doc.root_element();
    if root.tag_name().name() != "domain" {
        return Err(xml_err(XmlFault::WrongRoot {
            expected: "domain",
            found: root.tag_name().name().to_owned(),
        }));
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
            .ok_or_else(|| xml_err(XmlFault::DiskWithoutTarget))?
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
            .ok_or_else(|| xml_err(XmlFault::DiskWithoutSource(target.to_string())))?;
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
        let mode = if plan.incremental.is_some() && plan.full_disks.contains(target) {
            " backupmode='full'"
        } else {
            ""
        };
        x.push_str(&format!(
            "    <disk name='{}' backup='yes' type='file'{mode}><scratch file='{}'/></disk>\n",
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

/// A checkpoint's description (`virDomainCheckpointGetXMLDesc`, with its `<domain>`) as
/// vmreplica records it to redefine the checkpoint's lost metadata later: without its
/// `<parent>` element (the parent is deleted once the checkpoint is acknowledged, and a
/// redefined checkpoint names none). Errors when the document is not a checkpoint's.
pub fn redefinable_checkpoint(checkpoint_xml: &str) -> Result<String, LibvirtError> {
    let doc =
        roxmltree::Document::parse(checkpoint_xml).map_err(|e| xml_err(XmlFault::Parse(e)))?;
    let root = doc.root_element();
    if root.tag_name().name() != "domaincheckpoint" {
        return Err(xml_err(XmlFault::WrongRoot {
            expected: "domaincheckpoint",
            found: root.tag_name().name().to_owned(),
        }));
    }
    let mut out = checkpoint_xml.to_string();
    if let Some(parent) = root.children().find(|n| n.has_tag_name("parent")) {
        let r = parent.range();
        out.replace_range(r, "");
    }
    Ok(out)
}

/// The disks (names) a checkpoint description has a bitmap for.
pub fn checkpoint_disks(checkpoint_xml: &str) -> Result<Vec<String>, LibvirtError> {
    let doc =
        roxmltree::Document::parse(checkpoint_xml).map_err(|e| xml_err(XmlFault::Parse(e)))?;
    let root = doc.root_element();
    let Some(disks) = root.children().find(|n| n.has_tag_name("disks")) else {
        return Ok(Vec::new());
    };
    Ok(disks
        .children()
        .filter(|n| n.has_tag_name("disk"))
        .filter(|n| n.attribute("checkpoint").unwrap_or("bitmap") == "bitmap")
        .filter_map(|n| n.attribute("name").map(str::to_owned))
        .collect())
}

/// The name of a checkpoint description (`<domaincheckpoint><name>`).
pub fn checkpoint_name(checkpoint_xml: &str) -> Option<String> {
    let doc = roxmltree::Document::parse(checkpoint_xml).ok()?;
    let root = doc.root_element();
    if root.tag_name().name() != "domaincheckpoint" {
        return None;
    }
    root.children()
        .find(|n| n.has_tag_name("name"))
        .and_then(|n| n.text())
        .map(str::to_owned)
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

/// The `<name>` of a domain definition.
pub fn domain_name(domain_xml: &str) -> Result<String, LibvirtError> {
    let doc = roxmltree::Document::parse(domain_xml).map_err(|e| xml_err(XmlFault::Parse(e)))?;
    doc.root_element()
        .children()
        .find(|n| n.has_tag_name("name"))
        .and_then(|n| n.text())
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .ok_or_else(|| xml_err(XmlFault::NoName))
}

/// The `<uuid>` of a domain definition, when it has one.
pub fn domain_uuid(domain_xml: &str) -> Result<Option<String>, LibvirtError> {
    let doc = roxmltree::Document::parse(domain_xml).map_err(|e| xml_err(XmlFault::Parse(e)))?;
    Ok(doc
        .root_element()
        .children()
        .find(|n| n.has_tag_name("uuid"))
        .and_then(|n| n.text())
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty()))
}

/// How a failover turns the replicated domain definition into the domain it defines on the
/// replica host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailoverDomain {
    /// The new domain's name (the primary's for a failover, `NAME-test` for a test copy).
    pub name: String,
    /// Keep the definition's `<uuid>` (a failover: the VM stays the same machine); `false`
    /// drops it and libvirt gives the test copy a new one.
    pub keep_uuid: bool,
    /// Every replicated disk (target) with the image it now runs on (a store overlay).
    pub disks: Vec<(String, PathBuf)>,
    /// Drop every `<interface>` (a test copy must not meet the production network).
    pub remove_interfaces: bool,
}

/// The domain XML of a failover: `domain_xml` (the replicated persistent definition) with its
/// name replaced, its UUID kept or dropped, every replicated disk's `<source file>` pointed at
/// its overlay (a `<backingStore>` dropped: the overlay's chain is probed by libvirt) and, for a
/// test copy, its interfaces removed. Everything else is kept as the primary defined it. A
/// disk with no overlay, or an overlay for no disk of the definition, is
/// [`LibvirtError::FailoverDisk`].
pub fn failover_xml(domain_xml: &str, plan: &FailoverDomain) -> Result<String, LibvirtError> {
    let disks = parse_disks(domain_xml)?;
    for (target, _) in &plan.disks {
        if !disks.iter().any(|d| &d.target == target) {
            return Err(LibvirtError::FailoverDisk {
                disk: target.clone(),
                reason: FailoverDiskFault::NotInDefinition,
            });
        }
    }
    let doc = roxmltree::Document::parse(domain_xml).map_err(|e| xml_err(XmlFault::Parse(e)))?;
    let root = doc.root_element();
    // (byte range of the source, replacement), applied from the end
    let mut edits: Vec<(std::ops::Range<usize>, String)> = Vec::new();
    match root.children().find(|n| n.has_tag_name("name")) {
        Some(n) => edits.push((n.range(), format!("<name>{}</name>", escape(&plan.name)))),
        None => return Err(xml_err(XmlFault::NoName)),
    }
    if !plan.keep_uuid
        && let Some(u) = root.children().find(|n| n.has_tag_name("uuid"))
    {
        edits.push((u.range(), String::new()));
    }
    if let Some(devices) = root.children().find(|n| n.has_tag_name("devices")) {
        for disk in devices.children().filter(|n| n.has_tag_name("disk")) {
            if disk.attribute("device").unwrap_or("disk") != "disk" {
                continue;
            }
            let Some(target) = disk
                .children()
                .find(|n| n.has_tag_name("target"))
                .and_then(|t| t.attribute("dev"))
            else {
                continue;
            };
            let Some((_, overlay)) = plan.disks.iter().find(|(t, _)| t == target) else {
                return Err(LibvirtError::FailoverDisk {
                    disk: target.to_string(),
                    reason: FailoverDiskFault::NoImage,
                });
            };
            let source = disk
                .children()
                .find(|n| n.has_tag_name("source"))
                .and_then(|s| s.attribute_node("file"))
                .ok_or_else(|| xml_err(XmlFault::DiskWithoutSource(target.to_string())))?;
            edits.push((source.range_value(), path_str(overlay)));
            for b in disk.children().filter(|n| n.has_tag_name("backingStore")) {
                edits.push((b.range(), String::new()));
            }
        }
        if plan.remove_interfaces {
            for i in devices.children().filter(|n| n.has_tag_name("interface")) {
                edits.push((i.range(), String::new()));
            }
        }
    }
    edits.sort_by_key(|(r, _)| r.start);
    let mut out = domain_xml.to_string();
    for (range, text) in edits.into_iter().rev() {
        out.replace_range(range, &text);
    }
    // what libvirt will be given must still be a domain with those disks
    let check = parse_disks(&out)?;
    debug_assert_eq!(check.len(), disks.len());
    Ok(out)
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
            disks: vec![
                ("vda".into(), "/w/s-vda".into()),
                ("vdc".into(), "/w/s-vdc".into()),
            ],
            full_disks: vec!["vdc".into()],
        };
        let b = backup_xml(&plan);
        // an added disk is backed up whole in the incremental job
        assert!(
            b.contains("<disk name='vdc' backup='yes' type='file' backupmode='full'>"),
            "{b}"
        );
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
        assert!(!full.contains("backupmode"), "{full}");
        assert_eq!(
            export_of("vdb"),
            (
                "vdb".to_string(),
                "qemu:dirty-bitmap:backup-vdb".to_string()
            )
        );
        assert_eq!(backup_socket("<domainbackup mode='push'/>"), None);
    }
    #[test]
    fn failover_domain_documents() {
        let xml = "<domain type='kvm'>\n  <name>web1</name>\n  <uuid>0f8a2c1e-1111-2222-3333-444455556666</uuid>\n  <devices>\n    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/p/a.qcow2'/><backingStore type='file'><format type='qcow2'/><source file='/p/base.qcow2'/></backingStore><target dev='vda' bus='virtio'/></disk>\n    <disk type='file' device='cdrom'><driver name='qemu' type='raw'/><source file='/iso/x.iso'/><target dev='sda'/></disk>\n    <disk type=\"file\" device=\"disk\"><driver name='qemu' type='qcow2'/><source file=\"/p/b.qcow2\"/><target dev='vdb'/></disk>\n    <interface type='network'><mac address='52:54:00:aa:bb:cc'/><source network='default'/></interface>\n  </devices>\n</domain>";
        let overlays = vec![
            ("vda".to_string(), PathBuf::from("/r/fo/live/vda.qcow2")),
            (
                "vdb".to_string(),
                PathBuf::from("/r/fo/live/it's vdb.qcow2"),
            ),
        ];
        let live = failover_xml(
            xml,
            &FailoverDomain {
                name: "web1".into(),
                keep_uuid: true,
                disks: overlays.clone(),
                remove_interfaces: false,
            },
        )
        .expect("live");
        let disks = parse_disks(&live).expect("parses");
        assert_eq!(
            disks.iter().map(|d| d.path.clone()).collect::<Vec<_>>(),
            vec![
                PathBuf::from("/r/fo/live/vda.qcow2"),
                PathBuf::from("/r/fo/live/it's vdb.qcow2")
            ]
        );
        assert!(
            live.contains("<uuid>0f8a2c1e-1111-2222-3333-444455556666</uuid>"),
            "{live}"
        );
        assert!(live.contains("<interface type='network'>"), "{live}");
        assert!(live.contains("/iso/x.iso"), "the CD-ROM is kept: {live}");
        assert!(!live.contains("backingStore"), "{live}");
        assert!(!live.contains("/p/"), "no primary image is left: {live}");

        let test = failover_xml(
            xml,
            &FailoverDomain {
                name: "web1-test".into(),
                keep_uuid: false,
                disks: overlays.clone(),
                remove_interfaces: true,
            },
        )
        .expect("test");
        assert_eq!(domain_name(&test).expect("name"), "web1-test");
        assert_eq!(domain_name(xml).expect("name"), "web1");
        assert!(domain_name("<domain/>").is_err());
        let doc = roxmltree::Document::parse(&test).expect("xml");
        let root = doc.root_element();
        assert_eq!(
            root.children()
                .find(|n| n.has_tag_name("name"))
                .and_then(|n| n.text()),
            Some("web1-test")
        );
        assert!(!root.children().any(|n| n.has_tag_name("uuid")), "{test}");
        assert!(!test.contains("interface"), "{test}");
        assert_eq!(parse_disks(&test).expect("disks").len(), 2);

        // a disk without an overlay, an overlay for no disk: refused naming the disk
        for (disks, want) in [
            (vec![overlays[0].clone()], "vdb"),
            (
                vec![
                    overlays[0].clone(),
                    overlays[1].clone(),
                    ("vdz".to_string(), PathBuf::from("/z")),
                ],
                "vdz",
            ),
        ] {
            let e = failover_xml(
                xml,
                &FailoverDomain {
                    name: "x".into(),
                    keep_uuid: true,
                    disks,
                    remove_interfaces: false,
                },
            )
            .expect_err(want);
            assert!(
                matches!(&e, LibvirtError::FailoverDisk { disk, .. } if disk == want),
                "{e}"
            );
        }
    }

    #[test]
    fn redefinable_checkpoints_drop_their_parent() {
        let x = "<domaincheckpoint>\n  <name>vmreplica-3</name>\n  <parent>\n    <name>vmreplica-2</name>\n  </parent>\n  <creationTime>1700000000</creationTime>\n  <disks><disk name='vda' checkpoint='bitmap' bitmap='vmreplica-3'/></disks>\n  <domain type='qemu'><name>web1</name></domain>\n</domaincheckpoint>\n";
        let r = redefinable_checkpoint(x).expect("a checkpoint");
        assert!(!r.contains("<parent>") && !r.contains("vmreplica-2"), "{r}");
        assert!(r.contains("<creationTime>1700000000</creationTime>"), "{r}");
        assert!(
            r.contains("<domain type='qemu'><name>web1</name></domain>"),
            "{r}"
        );
        assert_eq!(checkpoint_name(&r).as_deref(), Some("vmreplica-3"));
        // no parent: unchanged
        let plain = "<domaincheckpoint><name>vmreplica-1</name></domaincheckpoint>";
        assert_eq!(redefinable_checkpoint(plain).expect("ok"), plain);
        assert!(redefinable_checkpoint("<domain/>").is_err());
        assert!(redefinable_checkpoint("<domaincheckpoint>").is_err());
        assert_eq!(checkpoint_name("<domain><name>x</name></domain>"), None);
        assert_eq!(checkpoint_disks(x).expect("disks"), vec!["vda".to_string()]);
        assert_eq!(
            checkpoint_disks("<domaincheckpoint><disks><disk name='vda' checkpoint='no'/><disk name='vdb' checkpoint='bitmap'/></disks></domaincheckpoint>").expect("disks"),
            vec!["vdb".to_string()]
        );
    }
}
