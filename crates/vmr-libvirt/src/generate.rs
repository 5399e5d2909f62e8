//! A libvirt domain definition generated from a plain-QEMU VM definition (the `--launch` TOML:
//! program and arguments, no domain XML), for a failover into a host whose agent manages VMs
//! through libvirt (issue 16 part 4, mixed setups). Pure functions, table-tested: what the
//! QEMU arguments say about memory, vCPUs, machine type, CPU, firmware and NICs becomes the
//! domain's; the replicated disks become virtio qcow2 disks `vda`, `vdb`, ... in the order
//! given. Everything else on the command line (displays, USB, CD-ROMs, passthrough devices,
//! `-drive`/`-blockdev` wiring) is not carried over: docs/libvirt.md lists it. The other way
//! ([`qemu_from_domain`]): a QEMU command line made from a domain XML, for a VM replicated from
//! a libvirt domain failing over on a host without libvirt.

use std::path::PathBuf;

use crate::LibvirtError;
use crate::error::QemuFault;
use crate::xml::escape;

/// QEMU's default guest memory when the arguments have no `-m` (128 MiB), in KiB.
pub const DEFAULT_MEMORY_KIB: u64 = 128 * 1024;

/// What the domain is generated from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuVm<'a> {
    /// The domain's name (the VM's).
    pub name: &'a str,
    /// The domain's UUID (the VM's).
    pub uuid: &'a str,
    /// The definition's program (`qemu-system-x86_64`, `/usr/bin/qemu-system-aarch64`, ...).
    pub program: &'a str,
    /// The definition's arguments (placeholders left as they are: they are not read).
    pub args: &'a [String],
    /// The replicated disks in order: each becomes `vda`, `vdb`, ... with this image.
    pub disks: &'a [PathBuf],
    /// libvirt's domain type: `kvm` when this host has usable KVM, else `qemu` (TCG).
    pub domain_type: &'a str,
    /// The libvirt network every NIC of the definition is attached to.
    pub network: &'a str,
}

/// One NIC found on the QEMU command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    /// The guest-visible model, as libvirt names it (`virtio`, `e1000`, ...); `None` leaves
    /// libvirt's default.
    pub model: Option<String>,
    /// The MAC address, when the command line gives one.
    pub mac: Option<String>,
}

/// What the domain takes from the QEMU arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuFacts {
    /// Guest memory in KiB.
    pub memory_kib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Machine type (`q35`, `pc-i440fx-8.2`), when given.
    pub machine: Option<String>,
    /// `-cpu host`.
    pub cpu_host: bool,
    /// UEFI firmware (an OVMF/edk2 image on the command line).
    pub efi: bool,
    /// The NICs, in order.
    pub nics: Vec<Nic>,
}

fn bad(fault: QemuFault) -> LibvirtError {
    LibvirtError::QemuDefinition(Box::new(fault))
}

/// `-m` / `--m`: the option's name without its dashes, when `a` is an option.
fn option(a: &str) -> Option<&str> {
    a.strip_prefix("--")
        .or_else(|| a.strip_prefix('-'))
        .filter(|o| !o.is_empty())
}

/// The value of `key=` in a comma-separated option value.
fn key<'a>(value: &'a str, k: &str) -> Option<&'a str> {
    value
        .split(',')
        .find_map(|p| p.strip_prefix(k).and_then(|r| r.strip_prefix('=')))
}

/// The first comma-separated part when it is not `key=value` (QEMU's implied key).
fn implied(value: &str) -> Option<&str> {
    value
        .split(',')
        .next()
        .filter(|p| !p.is_empty() && !p.contains('='))
}

/// A QEMU size (`2048`, `512M`, `2G`, `1T`; no suffix = MiB, as `-m` reads it) in KiB.
fn memory_kib(v: &str) -> Result<u64, LibvirtError> {
    let v = v.trim();
    let (num, unit) = match v.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => v.split_at(i),
        None => (v, "M"),
    };
    let mult: u64 = match unit.trim_end_matches(['b', 'B']) {
        "k" | "K" => 1,
        "" | "m" | "M" => 1024,
        "g" | "G" => 1024 * 1024,
        "t" | "T" => 1024 * 1024 * 1024,
        _ => return Err(bad(QemuFault::MemoryUnit(v.to_owned()))),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|&k| k > 0)
        .ok_or_else(|| bad(QemuFault::MemorySize(v.to_owned())))
}

fn number(what: &str, v: &str) -> Result<u32, LibvirtError> {
    v.parse::<u32>().ok().filter(|&n| n > 0).ok_or_else(|| {
        bad(QemuFault::CpuCount {
            what: what.to_owned(),
            value: v.to_owned(),
        })
    })
}

/// `-smp`: `N`, `cpus=N`, or the product of `sockets`, `dies`, `clusters`, `cores` and
/// `threads`.
fn vcpus(v: &str) -> Result<u32, LibvirtError> {
    if let Some(n) = implied(v) {
        return number("cpus", n);
    }
    if let Some(n) = key(v, "cpus") {
        return number("cpus", n);
    }
    let mut total = 1u32;
    for k in ["sockets", "dies", "clusters", "cores", "threads"] {
        if let Some(n) = key(v, k) {
            total = total.saturating_mul(number(k, n)?);
        }
    }
    Ok(total)
}

/// libvirt's model name of a QEMU NIC device or `-nic model=`.
fn nic_model(device: &str) -> Option<String> {
    match device {
        "virtio-net-pci" | "virtio-net" | "virtio-net-device" | "virtio" => {
            Some("virtio".to_owned())
        }
        "e1000" | "e1000e" | "rtl8139" | "vmxnet3" | "ne2k_pci" | "pcnet" | "i82559er" => {
            Some(device.to_owned())
        }
        _ => None,
    }
}

/// What the QEMU arguments say about the machine (the rest is ignored).
pub fn qemu_facts(args: &[String]) -> Result<QemuFacts, LibvirtError> {
    let mut f = QemuFacts {
        memory_kib: DEFAULT_MEMORY_KIB,
        vcpus: 1,
        machine: None,
        cpu_host: false,
        efi: false,
        nics: Vec::new(),
    };
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        let lower = a.to_ascii_lowercase();
        if lower.contains("ovmf") || lower.contains("edk2") {
            f.efi = true;
        }
        let Some(opt) = option(a) else {
            i += 1;
            continue;
        };
        let Some(value) = args.get(i + 1).map(String::as_str) else {
            if matches!(
                opt,
                "m" | "smp" | "M" | "machine" | "cpu" | "nic" | "net" | "device"
            ) {
                return Err(bad(QemuFault::NoValue(a.clone())));
            }
            i += 1;
            continue;
        };
        match opt {
            "m" => {
                let v = value;
                let size = key(v, "size").or_else(|| implied(v)).unwrap_or(v);
                f.memory_kib = memory_kib(size)?;
            }
            "smp" => f.vcpus = vcpus(value)?,
            "M" | "machine" => {
                let v = value;
                f.machine = key(v, "type").or_else(|| implied(v)).map(str::to_owned);
            }
            "cpu" => f.cpu_host = value.split(',').next() == Some("host"),
            "nic" => {
                let v = value;
                if implied(v) != Some("none") {
                    f.nics.push(Nic {
                        model: key(v, "model").and_then(nic_model),
                        mac: key(v, "mac").map(str::to_owned),
                    });
                }
            }
            "net" => {
                let v = value;
                if implied(v) == Some("nic") {
                    f.nics.push(Nic {
                        model: key(v, "model").and_then(nic_model),
                        mac: key(v, "macaddr").map(str::to_owned),
                    });
                }
            }
            "device" => {
                let v = value;
                let driver = key(v, "driver").or_else(|| implied(v)).unwrap_or_default();
                if let Some(model) = nic_model(driver) {
                    f.nics.push(Nic {
                        model: Some(model),
                        mac: key(v, "mac").map(str::to_owned),
                    });
                }
            }
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    Ok(f)
}

/// The target name of the `i`th disk: `vda` ... `vdz`, `vdaa`, ...
pub fn disk_target(i: usize) -> String {
    let mut n = i;
    let mut s = Vec::new();
    loop {
        s.push(b'a' + (n % 26) as u8);
        if n < 26 {
            break;
        }
        n = n / 26 - 1;
    }
    s.reverse();
    format!("vd{}", String::from_utf8_lossy(&s))
}

/// The architecture of a `qemu-system-ARCH` program; `x86_64` for any other program (a
/// qemu-storage-daemon stand-in, a wrapper script).
fn arch(program: &str) -> String {
    std::path::Path::new(program)
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("qemu-system-"))
        .filter(|a| !a.is_empty())
        .unwrap_or("x86_64")
        .to_owned()
}

/// The persistent domain XML of `vm`: its name and UUID, memory, vCPUs, machine type, CPU
/// (`host-passthrough` for `-cpu host` under KVM), UEFI firmware when the arguments name an
/// OVMF/edk2 image, the disks as virtio qcow2 `vda`, ..., every NIC on `network` (its MAC and
/// model kept), a serial console; `<emulator>` only when the program is an absolute path to a
/// `qemu-system-*` binary (otherwise libvirt picks its default emulator for the type and
/// architecture).
pub fn domain_from_qemu(vm: &QemuVm<'_>) -> Result<String, LibvirtError> {
    if vm.disks.is_empty() {
        return Err(LibvirtError::NoDisks);
    }
    let f = qemu_facts(vm.args)?;
    let arch = arch(vm.program);
    let x86 = arch == "x86_64" || arch == "i386";
    let mut x = format!(
        "<domain type='{}'>\n  <name>{}</name>\n  <uuid>{}</uuid>\n  <description>generated by vmreplica from the replicated QEMU definition of {}</description>\n  <memory unit='KiB'>{}</memory>\n  <vcpu>{}</vcpu>\n",
        escape(vm.domain_type),
        escape(vm.name),
        escape(vm.uuid),
        escape(vm.name),
        f.memory_kib,
        f.vcpus
    );
    x.push_str(&format!(
        "  <os{}>\n    <type arch='{}'{}>hvm</type>\n    <boot dev='hd'/>\n  </os>\n",
        if f.efi { " firmware='efi'" } else { "" },
        escape(&arch),
        f.machine
            .as_deref()
            .map(|m| format!(" machine='{}'", escape(m)))
            .unwrap_or_default()
    ));
    if x86 {
        x.push_str("  <features>\n    <acpi/>\n    <apic/>\n  </features>\n");
    }
    if f.cpu_host && vm.domain_type == "kvm" {
        x.push_str("  <cpu mode='host-passthrough'/>\n");
    }
    x.push_str("  <devices>\n");
    if vm.program.starts_with('/') && vm.program.contains("qemu-system-") {
        x.push_str(&format!(
            "    <emulator>{}</emulator>\n",
            escape(vm.program)
        ));
    }
    for (i, p) in vm.disks.iter().enumerate() {
        x.push_str(&format!(
            "    <disk type='file' device='disk'>\n      <driver name='qemu' type='qcow2'/>\n      <source file='{}'/>\n      <target dev='{}' bus='virtio'/>\n    </disk>\n",
            escape(&p.to_string_lossy()),
            disk_target(i)
        ));
    }
    for n in &f.nics {
        x.push_str("    <interface type='network'>\n");
        if let Some(m) = &n.mac {
            x.push_str(&format!("      <mac address='{}'/>\n", escape(m)));
        }
        x.push_str(&format!(
            "      <source network='{}'/>\n",
            escape(vm.network)
        ));
        if let Some(m) = &n.model {
            x.push_str(&format!("      <model type='{}'/>\n", escape(m)));
        }
        x.push_str("    </interface>\n");
    }
    x.push_str("    <serial type='pty'/>\n    <console type='pty'/>\n  </devices>\n</domain>\n");
    Ok(x)
}

/// A plain-QEMU command line made from a domain definition ([`qemu_from_domain`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuCommand {
    /// The program: the domain's `<emulator>`, else `qemu-system-ARCH`.
    pub program: String,
    /// The arguments, with vmreplica's placeholders (`{disk:vda}`, `{qmp}`, `{accel}`,
    /// `{name}`, `{uuid}`); the NICs are the contiguous run `network_args`.
    pub args: Vec<String>,
    /// The NICs' arguments (a run of `args`): dropped for a test failover.
    pub network_args: Vec<String>,
}

/// The first child of `n` named `tag`.
fn child<'a, 'i>(n: roxmltree::Node<'a, 'i>, tag: &str) -> Option<roxmltree::Node<'a, 'i>> {
    n.children().find(|c| c.has_tag_name(tag))
}

/// A domain size element (`<memory unit='GiB'>4</memory>`) in MiB.
fn domain_memory_mib(n: roxmltree::Node<'_, '_>) -> Result<u64, LibvirtError> {
    let text = n.text().unwrap_or_default().trim();
    let v: u64 = text
        .parse()
        .map_err(|_| bad(QemuFault::DomainMemory(text.to_owned())))?;
    let kib = match n.attribute("unit").unwrap_or("KiB") {
        "b" | "bytes" => v / 1024,
        "KB" => v * 1000 / 1024,
        "k" | "KiB" => v,
        "MB" => v * 1_000_000 / 1024,
        "M" | "MiB" => v * 1024,
        "GB" => v * 1_000_000_000 / 1024,
        "G" | "GiB" => v * 1024 * 1024,
        "T" | "TiB" => v * 1024 * 1024 * 1024,
        u => return Err(bad(QemuFault::DomainMemoryUnit(u.to_owned()))),
    };
    Ok((kib / 1024).max(1))
}

/// The QEMU command line of a domain definition, for a failover of a VM replicated from a
/// libvirt domain on a host without libvirt: memory, vCPUs, machine type and architecture,
/// the qcow2 disks as virtio-blk devices whose block nodes are named by target (`vda`, the
/// replicated disks' ids), interfaces of type `user` (`-nic user`) and `bridge` (`-nic
/// bridge,br=...`, which needs qemu-bridge-helper) with their MAC and model, a QMP monitor
/// (`{qmp}`) and no display. Refused, naming the element: a disk not on the virtio bus, an
/// interface of another type (a libvirt network has no plain-QEMU equivalent), UEFI firmware.
/// Everything else of the domain (graphics, USB, consoles, CD-ROMs, passthrough) is left out.
pub fn qemu_from_domain(domain_xml: &str) -> Result<QemuCommand, LibvirtError> {
    let disks = crate::xml::parse_disks(domain_xml)?;
    let doc = roxmltree::Document::parse(domain_xml).map_err(|e| bad(QemuFault::Xml(e)))?;
    let root = doc.root_element();
    let mib = match child(root, "memory") {
        Some(m) => domain_memory_mib(m)?,
        None => DEFAULT_MEMORY_KIB / 1024,
    };
    let vcpus = match child(root, "vcpu").and_then(|v| v.text()) {
        Some(t) => number("cpus", t.trim())?,
        None => 1,
    };
    let os = child(root, "os");
    if os.is_some_and(|o| o.attribute("firmware") == Some("efi") || child(o, "loader").is_some()) {
        return Err(bad(QemuFault::Uefi));
    }
    let ty = os.and_then(|o| child(o, "type"));
    let arch = ty.and_then(|t| t.attribute("arch")).unwrap_or("x86_64");
    let machine = ty.and_then(|t| t.attribute("machine"));
    let devices = child(root, "devices");
    let program = devices
        .and_then(|d| child(d, "emulator"))
        .and_then(|e| e.text())
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| format!("qemu-system-{arch}"));
    let mut args: Vec<String> = vec![
        "-name".into(),
        "{name}".into(),
        "-uuid".into(),
        "{uuid}".into(),
        "-machine".into(),
        match machine {
            Some(m) => format!("{m},accel={{accel}}"),
            None => "accel={accel}".into(),
        },
        "-m".into(),
        format!("{mib}M"),
        "-smp".into(),
        vcpus.to_string(),
        "-display".into(),
        "none".into(),
        "-chardev".into(),
        "socket,id=vmr,path={qmp},server=on,wait=off".into(),
        "-mon".into(),
        "chardev=vmr,mode=control".into(),
    ];
    for disk in devices
        .into_iter()
        .flat_map(|d| d.children().filter(|n| n.has_tag_name("disk")))
        .filter(|d| d.attribute("device").unwrap_or("disk") == "disk")
    {
        let target = child(disk, "target");
        let dev = target.and_then(|t| t.attribute("dev")).unwrap_or_default();
        let bus = target
            .and_then(|t| t.attribute("bus"))
            .unwrap_or(if dev.starts_with("vd") { "virtio" } else { "" });
        if bus != "virtio" {
            return Err(bad(QemuFault::DiskBus {
                disk: dev.to_owned(),
                bus: bus.to_owned(),
            }));
        }
    }
    for d in &disks {
        let t = &d.target;
        args.extend([
            "-blockdev".into(),
            format!("driver=file,node-name={t}-file,filename={{disk:{t}}}"),
            "-blockdev".into(),
            format!("driver=qcow2,node-name={t},file={t}-file"),
            "-device".into(),
            format!("virtio-blk-pci,drive={t},id={t}-dev"),
        ]);
    }
    let mut nics: Vec<String> = Vec::new();
    for (i, n) in devices
        .into_iter()
        .flat_map(|d| d.children().filter(|n| n.has_tag_name("interface")))
        .enumerate()
    {
        let kind = n.attribute("type").unwrap_or_default();
        let mut v = match kind {
            "user" => "user".to_owned(),
            "bridge" => {
                let br = child(n, "source")
                    .and_then(|s| s.attribute("bridge"))
                    .ok_or_else(|| bad(QemuFault::BridgeWithoutSource(i)))?;
                format!("bridge,br={br}")
            }
            other => {
                return Err(bad(QemuFault::InterfaceType {
                    index: i,
                    kind: other.to_owned(),
                }));
            }
        };
        let model = child(n, "model").and_then(|m| m.attribute("type"));
        v.push_str(&format!(
            ",model={}",
            match model {
                Some("virtio") | None => "virtio-net-pci",
                Some(m) => m,
            }
        ));
        if let Some(mac) = child(n, "mac").and_then(|m| m.attribute("address")) {
            v.push_str(&format!(",mac={mac}"));
        }
        nics.extend(["-nic".into(), v]);
    }
    if nics.is_empty() {
        nics.extend(["-nic".into(), "none".into()]);
    }
    args.extend(nics.iter().cloned());
    Ok(QemuCommand {
        program,
        args,
        network_args: nics,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn facts_of_command_lines() {
        let nic = |model: Option<&str>, mac: Option<&str>| Nic {
            model: model.map(String::from),
            mac: mac.map(String::from),
        };
        // (arguments, memory KiB, vcpus, machine, cpu host, efi, nics)
        type Row = (
            &'static str,
            u64,
            u32,
            Option<&'static str>,
            bool,
            bool,
            Vec<Nic>,
        );
        let rows: Vec<Row> = vec![
            ("", DEFAULT_MEMORY_KIB, 1, None, false, false, vec![]),
            (
                "-m 2048 -smp 4 -machine q35,accel=kvm -cpu host",
                2048 * 1024,
                4,
                Some("q35"),
                true,
                false,
                vec![],
            ),
            (
                "--m 2G --smp cpus=2,sockets=1 -M pc-i440fx-8.2",
                2 * 1024 * 1024,
                2,
                Some("pc-i440fx-8.2"),
                false,
                false,
                vec![],
            ),
            (
                "-m size=512M,slots=2,maxmem=4G -smp sockets=2,cores=2,threads=2 -machine type=q35",
                512 * 1024,
                8,
                Some("q35"),
                false,
                false,
                vec![],
            ),
            (
                "-drive if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE.fd -cpu max",
                DEFAULT_MEMORY_KIB,
                1,
                None,
                false,
                true,
                vec![],
            ),
            (
                "-netdev tap,id=n0 -device virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56 \
                 -nic user,model=e1000 -nic none -device virtio-blk-pci,drive=d0 \
                 -net nic,model=rtl8139,macaddr=52:54:00:00:00:02 -net user",
                DEFAULT_MEMORY_KIB,
                1,
                None,
                false,
                false,
                vec![
                    nic(Some("virtio"), Some("52:54:00:12:34:56")),
                    nic(Some("e1000"), None),
                    nic(Some("rtl8139"), Some("52:54:00:00:00:02")),
                ],
            ),
            // a qemu-storage-daemon stand-in: nothing about a machine
            (
                "--blockdev driver=file,node-name=f,filename={disk:disk0} --chardev socket,id=vmr,path={qmp},server=on,wait=off --monitor chardev=vmr",
                DEFAULT_MEMORY_KIB,
                1,
                None,
                false,
                false,
                vec![],
            ),
        ];
        for (a, mem, cpus, machine, host, efi, nics) in rows {
            let f = qemu_facts(&args(a)).unwrap_or_else(|e| panic!("{a}: {e}"));
            assert_eq!(
                f,
                QemuFacts {
                    memory_kib: mem,
                    vcpus: cpus,
                    machine: machine.map(String::from),
                    cpu_host: host,
                    efi,
                    nics,
                },
                "{a}"
            );
        }
    }

    #[test]
    fn bad_command_lines_are_refused_naming_the_argument() {
        for (a, says) in [
            ("-m lots", "-m \"lots\""),
            ("-m 0", "not a memory size"),
            ("-m 2X", "unknown size unit"),
            ("-smp 0", "-smp cpus"),
            ("-smp cores=x", "-smp cores"),
            ("-m", "has no value"),
        ] {
            let e = qemu_facts(&args(a)).expect_err(a).to_string();
            assert!(e.contains(says), "{a}: {e}");
        }
    }

    #[test]
    fn disk_targets() {
        assert_eq!(disk_target(0), "vda");
        assert_eq!(disk_target(1), "vdb");
        assert_eq!(disk_target(25), "vdz");
        assert_eq!(disk_target(26), "vdaa");
        assert_eq!(disk_target(27), "vdab");
    }

    #[test]
    fn a_domain_from_a_qemu_definition() {
        let a = args(
            "-m 1G -smp 2 -machine q35 -cpu host -device virtio-net-pci,netdev=n0,mac=52:54:00:aa:bb:cc",
        );
        let disks = [
            PathBuf::from("/s/disk0 & co.qcow2"),
            PathBuf::from("/s/d1.qcow2"),
        ];
        let vm = QemuVm {
            name: "web1",
            uuid: "6f1c3a52-0000-4000-8000-000000000001",
            program: "/usr/bin/qemu-system-x86_64",
            args: &a,
            disks: &disks,
            domain_type: "kvm",
            network: "default",
        };
        let x = domain_from_qemu(&vm).expect("generated");
        for want in [
            "<domain type='kvm'>",
            "<name>web1</name>",
            "<uuid>6f1c3a52-0000-4000-8000-000000000001</uuid>",
            "<memory unit='KiB'>1048576</memory>",
            "<vcpu>2</vcpu>",
            "<type arch='x86_64' machine='q35'>hvm</type>",
            "<cpu mode='host-passthrough'/>",
            "<emulator>/usr/bin/qemu-system-x86_64</emulator>",
            "<mac address='52:54:00:aa:bb:cc'/>",
            "<source network='default'/>",
            "<model type='virtio'/>",
        ] {
            assert!(x.contains(want), "{want} missing in\n{x}");
        }
        // what vmreplica replicates and fails over reads it back: two qcow2 file disks
        let d = crate::xml::parse_disks(&x).expect("parses");
        assert_eq!(
            d.iter()
                .map(|d| (d.target.as_str(), d.path.clone()))
                .collect::<Vec<_>>(),
            vec![("vda", disks[0].clone()), ("vdb", disks[1].clone())]
        );
        assert_eq!(crate::xml::domain_name(&x).expect("name"), "web1");

        // TCG, a program that is not a qemu-system binary: no host CPU, no emulator
        let stand_in = QemuVm {
            program: "qemu-storage-daemon",
            domain_type: "qemu",
            ..vm.clone()
        };
        let x = domain_from_qemu(&stand_in).expect("generated");
        assert!(x.contains("<domain type='qemu'>"), "{x}");
        assert!(
            !x.contains("<emulator>") && !x.contains("host-passthrough"),
            "{x}"
        );
        assert!(x.contains("<type arch='x86_64' machine='q35'>"), "{x}");
        let arm = QemuVm {
            program: "qemu-system-aarch64",
            args: &[],
            ..vm.clone()
        };
        let x = domain_from_qemu(&arm).expect("generated");
        assert!(
            x.contains("<type arch='aarch64'>") && !x.contains("<acpi/>"),
            "{x}"
        );
        assert!(!x.contains("<interface"), "{x}");
        assert!(matches!(
            domain_from_qemu(&QemuVm { disks: &[], ..vm }),
            Err(LibvirtError::NoDisks)
        ));
    }

    #[test]
    fn a_qemu_command_line_from_a_domain() {
        let x = "<domain type='kvm'><name>web1</name><uuid>u</uuid><memory unit='GiB'>2</memory><vcpu placement='static'>4</vcpu>\
            <os><type arch='x86_64' machine='pc-q35-8.2'>hvm</type></os><devices><emulator>/usr/bin/qemu-system-x86_64</emulator>\
            <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/a.qcow2'/><target dev='vda' bus='virtio'/></disk>\
            <disk type='file' device='cdrom'><driver name='qemu' type='raw'/><source file='/i.iso'/><target dev='sda' bus='sata'/></disk>\
            <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/b.qcow2'/><target dev='vdb' bus='virtio'/></disk>\
            <interface type='user'><mac address='52:54:00:00:00:01'/><model type='virtio'/></interface>\
            <interface type='bridge'><source bridge='br0'/><model type='e1000'/></interface></devices></domain>";
        let q = qemu_from_domain(x).expect("converted");
        assert_eq!(q.program, "/usr/bin/qemu-system-x86_64");
        let line = q.args.join(" ");
        for want in [
            "-machine pc-q35-8.2,accel={accel}",
            "-m 2048M",
            "-smp 4",
            "-chardev socket,id=vmr,path={qmp},server=on,wait=off -mon chardev=vmr,mode=control",
            "-blockdev driver=file,node-name=vda-file,filename={disk:vda}",
            "-blockdev driver=qcow2,node-name=vdb,file=vdb-file",
            "-device virtio-blk-pci,drive=vdb,id=vdb-dev",
            "-nic user,model=virtio-net-pci,mac=52:54:00:00:00:01 -nic bridge,br=br0,model=e1000",
        ] {
            assert!(line.contains(want), "{want} missing in {line}");
        }
        assert!(!line.contains("i.iso"), "{line}");
        assert_eq!(q.network_args.len(), 4);
        // a minimal domain: defaults, no NIC
        let q = qemu_from_domain(
            "<domain type='qemu'><name>m</name><memory>65536</memory><os><type arch='aarch64'>hvm</type></os><devices>\
             <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/a.qcow2'/><target dev='vda' bus='virtio'/></disk></devices></domain>",
        )
        .expect("converted");
        assert_eq!(q.program, "qemu-system-aarch64");
        let line = q.args.join(" ");
        assert!(
            line.contains("-machine accel={accel} -m 64M -smp 1"),
            "{line}"
        );
        assert_eq!(q.network_args, vec!["-nic", "none"]);
    }

    #[test]
    fn domains_plain_qemu_cannot_start_are_refused_naming_the_element() {
        let disk = |bus: &str| {
            format!(
                "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/a.qcow2'/><target dev='sda' bus='{bus}'/></disk>"
            )
        };
        let vda = "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/a.qcow2'/><target dev='vda' bus='virtio'/></disk>";
        for (inner, os, says) in [
            (disk("sata"), "", "disk sda is on the \"sata\" bus"),
            (
                format!("{vda}<interface type='network'><source network='default'/></interface>"),
                "",
                "type \"network\"",
            ),
            (
                vda.to_owned(),
                "<os firmware='efi'><type arch='x86_64'>hvm</type></os>",
                "UEFI",
            ),
        ] {
            let x =
                format!("<domain type='kvm'><name>w</name>{os}<devices>{inner}</devices></domain>");
            let e = qemu_from_domain(&x).expect_err(says).to_string();
            assert!(e.contains(says), "{e}");
        }
    }
}
