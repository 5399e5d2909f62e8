//! Failover through libvirt on a replica host: the driver that carries out `failover start`,
//! `failover test`, `failover cancel` and `failover stop-test` for a VM replicated from a
//! libvirt domain (its replicated definition holds the domain XML). It owns defining the
//! failed-over domain from the replicated XML on this host's libvirt (`libvirt-connect` in
//! config.toml, `qemu:///system` when absent), starting it, and destroying and undefining it
//! again. A VM replicated from a plain-QEMU primary gets a domain XML generated from its QEMU
//! definition ([`generate`]) when this host's agent manages VMs through libvirt (which
//! launcher is [`vmr_core::failover_launcher`]'s decision). Which name, UUID and interfaces the domain has is [`vmr_core::failover_domain`]'s
//! decision, its XML [`vmr_libvirt::xml::failover_xml`]; when a failover may happen, and what cancel and
//! complete mean, stay the failover machine's decisions (`vmr_core`), driven by
//! `failover.rs`. Every libvirt call blocks, so each runs in `spawn_blocking`. See
//! docs/libvirt.md.

use std::path::PathBuf;

use vmr_libvirt::{FailoverDomain, Libvirt, LibvirtError};
use vmr_proto::api::FailoverDomainRef;

use crate::errors::AgentError;
use crate::host::Host;

/// The URI used when config.toml has no `libvirt-connect`.
pub const DEFAULT_URI: &str = "qemu:///system";

/// The `program` marker of a definition made from a libvirt domain (`vm add --libvirt`): it
/// has no QEMU command line.
pub const LIBVIRT_PROGRAM: &str = "libvirt";

/// The libvirt network the NICs of a domain generated from a plain-QEMU definition are
/// attached to (libvirt's own default NAT network).
pub const GENERATED_NETWORK: &str = "default";

/// The libvirt connection URI failovers use on this host.
pub fn uri(host: &Host) -> String {
    host.config
        .libvirt_connect
        .clone()
        .unwrap_or_else(|| DEFAULT_URI.to_owned())
}

fn err(uri: &str, doing: &'static str, domain: &str, source: LibvirtError) -> AgentError {
    AgentError::FailoverDomain {
        uri: uri.to_owned(),
        doing,
        domain: domain.to_owned(),
        source,
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AgentError> + Send + 'static,
) -> Result<T, AgentError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(AgentError::Task)?
}

/// Check, before anything changes, that this host's libvirt answers and that the replicated
/// XML can be made into the failed-over domain (`plan`'s disks match it): a bad setup is
/// refused with nothing changed. Returns the domain's name in the replicated XML.
pub async fn check(uri: String, xml: String) -> Result<String, AgentError> {
    blocking(move || {
        let name = vmr_libvirt::xml::domain_name(&xml).map_err(|e| err(&uri, "reading", "-", e))?;
        Libvirt::open(&uri).map_err(|e| err(&uri, "connecting for", &name, e))?;
        Ok(name)
    })
    .await
}

/// Does this host's libvirt at `uri` answer? (A short blocking call in `spawn_blocking`.)
pub async fn answers(uri: String) -> bool {
    tokio::task::spawn_blocking(move || Libvirt::open(&uri).is_ok())
        .await
        .unwrap_or(false)
}

/// The domain XML of a failover of a plain-QEMU definition into this host's libvirt
/// ([`vmr_libvirt::generate::domain_from_qemu`]): the replicated disks `ids` (the point's
/// order; the definition's when empty) become `vda`, `vdb`, ... (returned by id), the
/// domain type follows this host's KVM, the NICs go on [`GENERATED_NETWORK`]. The disks'
/// sources are the primary's paths until the failover points them at its overlays.
pub fn generate(
    def: &vmr_proto::VmDefinition,
    ids: &[String],
    uri: &str,
) -> Result<(String, Vec<(String, String)>), AgentError> {
    let ids: Vec<String> = if ids.is_empty() {
        def.disks.iter().map(|d| d.node.clone()).collect()
    } else {
        ids.to_vec()
    };
    let paths: Vec<PathBuf> = ids
        .iter()
        .map(|id| {
            def.disks
                .iter()
                .find(|d| &d.node == id)
                .map_or_else(|| PathBuf::from(id), |d| PathBuf::from(&d.path))
        })
        .collect();
    let uuid = def.uuid.to_string();
    let vm = vmr_libvirt::generate::QemuVm {
        name: &def.name,
        uuid: &uuid,
        program: &def.program,
        args: &def.args,
        disks: &paths,
        domain_type: if crate::launch::accel() == "kvm" {
            "kvm"
        } else {
            "qemu"
        },
        network: GENERATED_NETWORK,
    };
    let xml = vmr_libvirt::generate::domain_from_qemu(&vm)
        .map_err(|e| err(uri, "generating the XML of", &def.name, e))?;
    let targets = ids
        .into_iter()
        .enumerate()
        .map(|(i, id)| (id, vmr_libvirt::generate::disk_target(i)))
        .collect();
    Ok((xml, targets))
}

/// Define the failed-over domain from the replicated `xml` as `plan` says and, when `start`,
/// start it. A domain that cannot be started is undefined again (nothing is left). A domain
/// of that name already defined is refused unless it is the VM's own, shut off (failing back:
/// [`vmr_core::existing_domain`]): then it is replaced, its old definition kept in the result
/// for `cancel`.
pub async fn define(
    uri: String,
    xml: String,
    plan: FailoverDomain,
    start: bool,
) -> Result<FailoverDomainRef, AgentError> {
    blocking(move || {
        let name = plan.name.clone();
        let doc = vmr_libvirt::xml::failover_xml(&xml, &plan)
            .map_err(|e| err(&uri, "making the XML of", &name, e))?;
        let lv = Libvirt::open(&uri).map_err(|e| err(&uri, "connecting for", &name, e))?;
        let mut replaced_xml = None;
        if let Ok(d) = lv.domain(&name) {
            // never replace a domain of someone else's (or an earlier copy still defined); the
            // VM's own definition, shut off, is replaced (failing back: this host ran the VM)
            let own = vmr_libvirt::xml::domain_uuid(&doc)
                .map_err(|e| err(&uri, "making the XML of", &name, e))?;
            let uuid = d.uuid().unwrap_or_default();
            let existing = vmr_core::ExistingDomain {
                same_uuid: own.is_some_and(|o| o.eq_ignore_ascii_case(&uuid)),
                running: d.is_running().unwrap_or(true),
            };
            match vmr_core::existing_domain(Some(existing), plan.keep_uuid) {
                Ok(_) => {
                    let old = d
                        .xml(true)
                        .map_err(|e| err(&uri, "reading the definition of", &name, e))?;
                    // vmreplica's checkpoints of it describe the images it used before (this
                    // host's replica overlays now): their metadata goes, the bitmaps stay
                    let ours = d
                        .checkpoints()
                        .map_err(|e| err(&uri, "listing the checkpoints of", &name, e))?;
                    for c in ours.iter().filter(|c| c.starts_with("vmreplica-")) {
                        d.forget_checkpoint(c)
                            .map_err(|e| err(&uri, "forgetting a checkpoint of", &name, e))?;
                    }
                    tracing::info!(domain = %name, %uuid, "the VM's own definition on this host (shut off) is replaced by the failover's; cancel restores it");
                    replaced_xml = Some(old);
                }
                Err(why) => {
                    return Err(err(
                        &uri,
                        "defining",
                        &name,
                        LibvirtError::Call {
                            call: "virDomainDefineXML",
                            message: match why {
                                vmr_core::ExistingDomainRefusal::Running => format!(
                                    "the VM's domain {name:?} runs on this host (uuid {uuid}): shut it down first"
                                ),
                                vmr_core::ExistingDomainRefusal::Other => format!(
                                    "a domain named {name:?} is already defined on this host (uuid {uuid})"
                                ),
                            },
                        },
                    ));
                }
            }
        }
        let dom = lv
            .define(&doc)
            .map_err(|e| err(&uri, "defining", &name, e))?;
        let uuid = dom.uuid().map_err(|e| err(&uri, "reading", &name, e))?;
        if start && let Err(e) = dom.start() {
            let back = match &replaced_xml {
                Some(old) => lv.define(old).map(|_| ()),
                None => dom.undefine(),
            };
            if let Err(u) = back {
                tracing::warn!(domain = %name, "undoing the definition of the domain that did not start: {u}");
            }
            return Err(err(&uri, "starting", &name, e));
        }
        Ok(FailoverDomainRef {
            uri: uri.clone(),
            domain: name,
            uuid,
            replaced_xml,
        })
    })
    .await
}

/// Destroy (power off) and undefine the failed-over domain `r` (or, when it replaced the VM's
/// own definition on this host, restore that one). A domain already gone is fine; a domain of that name with another UUID is not this failover's and is left alone.
pub async fn remove(r: FailoverDomainRef) -> Result<(), AgentError> {
    blocking(move || {
        let lv = Libvirt::open(&r.uri).map_err(|e| err(&r.uri, "connecting for", &r.domain, e))?;
        let dom = match lv.domain(&r.domain) {
            Ok(d) => d,
            Err(LibvirtError::NoDomain { .. }) => return Ok(()),
            Err(e) => return Err(err(&r.uri, "looking up", &r.domain, e)),
        };
        let uuid = dom
            .uuid()
            .map_err(|e| err(&r.uri, "reading", &r.domain, e))?;
        if !uuid.eq_ignore_ascii_case(&r.uuid) {
            tracing::warn!(domain = %r.domain, %uuid, recorded = %r.uuid,
                "a domain of this name with another UUID is not this failover's: left alone");
            return Ok(());
        }
        dom.destroy()
            .map_err(|e| err(&r.uri, "destroying", &r.domain, e))?;
        match &r.replaced_xml {
            // the definition the failover replaced comes back (on its own images)
            Some(old) => lv
                .define(old)
                .map(|_| ())
                .map_err(|e| err(&r.uri, "restoring the definition of", &r.domain, e)),
            None => dom
                .undefine()
                .map_err(|e| err(&r.uri, "undefining", &r.domain, e)),
        }
    })
    .await
}

/// Does the failed-over domain `r` run? (A short blocking call to the local daemon; a
/// daemon that does not answer counts as not running.)
pub fn runs(r: &FailoverDomainRef) -> bool {
    let Ok(lv) = Libvirt::open(&r.uri) else {
        return false;
    };
    lv.domain(&r.domain)
        .and_then(|d| Ok(d.uuid()?.eq_ignore_ascii_case(&r.uuid) && d.is_running()?))
        .unwrap_or(false)
}

/// The failed-over domain's plan: [`vmr_core::failover_domain`]'s identity, with the
/// replicated disks on the view's overlays.
pub fn plan(domain: &str, disks: &[(String, PathBuf)], test: bool) -> FailoverDomain {
    let id = vmr_core::failover_domain(domain, test);
    FailoverDomain {
        name: id.name,
        keep_uuid: id.keep_uuid,
        disks: disks.to_vec(),
        remove_interfaces: !id.keep_interfaces,
    }
}
