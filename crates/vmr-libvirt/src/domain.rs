//! The libvirt calls: a connection, a domain, its checkpoints and its backup job. The
//! checkpoint and backup calls are not wrapped by the `virt` crate; they are made through its
//! `virt-sys` bindings here, the crate's only `unsafe` code, each call with the ownership rule
//! of its libvirt documentation.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use virt::connect::Connect;
use virt::error::ErrorNumber;
use virt_sys as sys;

use crate::LibvirtError;
use crate::xml::{self, BackupPlan, DomainDisk};

/// How often [`Domain::abort_job`] asks whether the aborted job has ended.
const JOB_END_POLL: Duration = Duration::from_millis(10);

/// An open connection to a libvirt daemon (closed on drop).
pub struct Libvirt {
    conn: Connect,
    uri: String,
}

impl std::fmt::Debug for Libvirt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Libvirt").field("uri", &self.uri).finish()
    }
}

fn cstring(what: &'static str, value: &str) -> Result<CString, LibvirtError> {
    CString::new(value).map_err(|_| LibvirtError::InvalidName {
        what,
        value: value.to_string(),
    })
}

fn call_err(call: &'static str, e: &virt::error::Error) -> LibvirtError {
    LibvirtError::Call {
        call,
        message: e.message().to_string(),
    }
}

/// A job message that means "another job holds the domain".
fn is_busy(e: &virt::error::Error) -> bool {
    let m = e.message();
    matches!(
        e.code(),
        ErrorNumber::OperationTimeout | ErrorNumber::ResourceBusy
    ) || (e.code() == ErrorNumber::OperationInvalid
        && (m.contains("job") || m.contains("backup"))
        && !m.contains("not running"))
}

impl Libvirt {
    /// Connect to `uri` (`qemu:///system`, `qemu+unix:///system?socket=...`).
    pub fn open(uri: &str) -> Result<Libvirt, LibvirtError> {
        cstring("connection URI", uri)?;
        // errors come back typed; libvirt's default handler would also print them to stderr
        virt::error::clear_error_callback();
        let conn = Connect::open(Some(uri)).map_err(|e| LibvirtError::Connect {
            uri: uri.to_string(),
            message: e.message().to_string(),
        })?;
        Ok(Libvirt {
            conn,
            uri: uri.to_string(),
        })
    }

    /// The URI this connection was opened with.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The domain named `name`.
    pub fn domain(&self, name: &str) -> Result<Domain, LibvirtError> {
        cstring("domain name", name)?;
        let dom = virt::domain::Domain::lookup_by_name(&self.conn, name).map_err(|e| {
            if e.code() == ErrorNumber::NoDomain {
                LibvirtError::NoDomain {
                    name: name.to_string(),
                }
            } else {
                call_err("virDomainLookupByName", &e)
            }
        })?;
        Ok(Domain {
            dom,
            name: name.to_string(),
        })
    }

    /// Define (persistently) a domain from `xml`; a domain of the same name or UUID is
    /// replaced, as `virsh define` does.
    pub fn define(&self, xml: &str) -> Result<Domain, LibvirtError> {
        cstring("domain XML", xml)?;
        let dom = virt::domain::Domain::define_xml(&self.conn, xml)
            .map_err(|e| call_err("virDomainDefineXML", &e))?;
        let name = dom
            .get_name()
            .map_err(|e| call_err("virDomainGetName", &e))?;
        Ok(Domain { dom, name })
    }
}

impl Drop for Libvirt {
    fn drop(&mut self) {
        if let Err(e) = self.conn.close() {
            tracing::debug!(error = %e, "closing the libvirt connection");
        }
    }
}

/// A running pull-mode backup job of a domain, as libvirt describes it.
#[derive(Debug, Clone)]
pub struct BackupJob {
    /// Its NBD server's Unix socket (`None` for a push-mode job or a TCP server).
    pub socket: Option<PathBuf>,
    /// The job's XML.
    pub xml: String,
}

/// One libvirt domain.
pub struct Domain {
    dom: virt::domain::Domain,
    name: String,
}

impl std::fmt::Debug for Domain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Domain").field("name", &self.name).finish()
    }
}

impl Domain {
    /// The domain's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The domain's UUID, as libvirt prints it.
    pub fn uuid(&self) -> Result<String, LibvirtError> {
        self.dom
            .get_uuid_string()
            .map_err(|e| call_err("virDomainGetUUIDString", &e))
    }

    /// The domain's XML: the persistent definition when `inactive` (what a replica defines
    /// from), the running one otherwise.
    pub fn xml(&self, inactive: bool) -> Result<String, LibvirtError> {
        let flags = if inactive {
            sys::VIR_DOMAIN_XML_INACTIVE
        } else {
            0
        };
        self.dom
            .get_xml_desc(flags)
            .map_err(|e| call_err("virDomainGetXMLDesc", &e))
    }

    /// The disks vmreplica replicates, from the running definition (see
    /// [`xml::parse_disks`]).
    pub fn disks(&self) -> Result<Vec<DomainDisk>, LibvirtError> {
        xml::parse_disks(&self.xml(false)?)
    }

    /// Whether the domain runs.
    pub fn is_running(&self) -> Result<bool, LibvirtError> {
        self.dom
            .is_active()
            .map_err(|e| call_err("virDomainIsActive", &e))
    }

    /// Start the defined domain.
    pub fn start(&self) -> Result<(), LibvirtError> {
        self.dom
            .create()
            .map(|_| ())
            .map_err(|e| call_err("virDomainCreate", &e))
    }

    /// Start the defined domain paused: QEMU runs (so a backup job can be taken of its
    /// disks) but the guest's CPUs never do, so nothing writes to the disks.
    pub fn start_paused(&self) -> Result<(), LibvirtError> {
        self.dom
            .create_with_flags(sys::VIR_DOMAIN_START_PAUSED)
            .map(|_| ())
            .map_err(|e| call_err("virDomainCreateWithFlags", &e))
    }

    /// Ask the guest to power down with the ACPI power button (the guest may ignore it).
    pub fn shutdown_acpi(&self) -> Result<(), LibvirtError> {
        self.dom
            .shutdown_flags(sys::VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
            .map(|_| ())
            .map_err(|e| call_err("virDomainShutdownFlags", &e))
    }

    /// Stop the domain at once (power off); a domain that does not run is not an error.
    pub fn destroy(&self) -> Result<(), LibvirtError> {
        if !self.is_running()? {
            return Ok(());
        }
        match self.dom.destroy() {
            Ok(()) => Ok(()),
            Err(_) if !self.is_running()? => Ok(()),
            Err(e) => Err(call_err("virDomainDestroy", &e)),
        }
    }

    /// Remove the domain's persistent definition (with its checkpoints' and snapshots'
    /// metadata, never its images).
    pub fn undefine(&self) -> Result<(), LibvirtError> {
        let flags = sys::VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
            | sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            | sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE;
        self.dom
            .undefine_flags(flags)
            .map_err(|e| call_err("virDomainUndefineFlags", &e))
    }

    /// Whether any job (a backup, a migration, ...) runs on the domain.
    pub fn job_active(&self) -> Result<bool, LibvirtError> {
        let info = self
            .dom
            .get_job_info()
            .map_err(|e| call_err("virDomainGetJobInfo", &e))?;
        Ok(info.r#type != sys::VIR_DOMAIN_JOB_NONE as i32)
    }

    /// Names of all the domain's checkpoints (vmreplica's and others').
    pub fn checkpoints(&self) -> Result<Vec<String>, LibvirtError> {
        let mut list: *mut sys::virDomainCheckpointPtr = std::ptr::null_mut();
        // SAFETY: the domain pointer is valid for `self`'s life; on success libvirt hands us
        // an array of `n` checkpoint references, each freed with virDomainCheckpointFree, and
        // the array itself, freed with free().
        let n = unsafe { sys::virDomainListAllCheckpoints(self.dom.as_ptr(), &mut list, 0) };
        if n < 0 {
            return Err(call_err(
                "virDomainListAllCheckpoints",
                &virt::error::Error::last_error(),
            ));
        }
        let mut names = Vec::with_capacity(n as usize);
        for i in 0..n as usize {
            // SAFETY: `i < n`, the array has `n` valid entries; the name belongs to the
            // checkpoint object and is copied before it is freed.
            unsafe {
                let cp = *list.add(i);
                let name = sys::virDomainCheckpointGetName(cp);
                if !name.is_null() {
                    names.push(CStr::from_ptr(name).to_string_lossy().into_owned());
                }
                sys::virDomainCheckpointFree(cp);
            }
        }
        if !list.is_null() {
            // SAFETY: the array was allocated by libvirt with malloc and is not used again.
            unsafe { libc::free(list.cast()) };
        }
        Ok(names)
    }

    /// The running backup job, if any.
    pub fn backup_job(&self) -> Result<Option<BackupJob>, LibvirtError> {
        // SAFETY: valid domain pointer; a non-null result is a malloc'ed string we own.
        let p = unsafe { sys::virDomainBackupGetXMLDesc(self.dom.as_ptr(), 0) };
        if p.is_null() {
            let e = virt::error::Error::last_error();
            if e.code() == ErrorNumber::NoDomainBackup || e.code() == ErrorNumber::OperationInvalid
            {
                return Ok(None);
            }
            return Err(call_err("virDomainBackupGetXMLDesc", &e));
        }
        // SAFETY: `p` is a NUL-terminated string owned by us, freed right after the copy.
        let xml = unsafe {
            let s = CStr::from_ptr(p).to_string_lossy().into_owned();
            libc::free(p.cast());
            s
        };
        Ok(Some(BackupJob {
            socket: xml::backup_socket(&xml),
            xml,
        }))
    }

    /// Start the pull-mode backup job of `plan` with its new checkpoint, atomically. Another
    /// job on the domain is [`LibvirtError::Busy`] (asked first, so the caller never waits for
    /// libvirt's job lock); a missing or damaged `<incremental>` checkpoint is
    /// [`LibvirtError::CheckpointMissing`] / [`LibvirtError::CheckpointInconsistent`].
    pub fn begin_backup(&self, plan: &BackupPlan) -> Result<(), LibvirtError> {
        if !self.is_running()? {
            return Err(LibvirtError::NotRunning {
                name: self.name.clone(),
            });
        }
        if self.job_active()? {
            return Err(LibvirtError::Busy {
                detail: "a job is running on the domain".into(),
            });
        }
        let backup = cstring("backup XML", &xml::backup_xml(plan))?;
        let checkpoint = cstring("checkpoint XML", &xml::checkpoint_xml(plan))?;
        // SAFETY: valid domain pointer and NUL-terminated strings that outlive the call.
        let r = unsafe {
            sys::virDomainBackupBegin(self.dom.as_ptr(), backup.as_ptr(), checkpoint.as_ptr(), 0)
        };
        if r == 0 {
            return Ok(());
        }
        let e = virt::error::Error::last_error();
        let from = plan.incremental.clone().unwrap_or_default();
        let m = e.message();
        Err(match e.code() {
            ErrorNumber::NoDomainCheckpoint => LibvirtError::CheckpointMissing { name: from },
            ErrorNumber::CheckpointInconsistent => LibvirtError::CheckpointInconsistent {
                name: from,
                message: m.to_string(),
            },
            // the new checkpoint's bitmap is left in the images (libvirt's metadata lost)
            _ if m.contains("already exists") => LibvirtError::CheckpointInconsistent {
                name: plan.checkpoint.clone(),
                message: m.to_string(),
            },
            _ if m.contains("inconsistent") => LibvirtError::CheckpointInconsistent {
                name: from,
                message: m.to_string(),
            },
            _ if is_busy(&e) => LibvirtError::Busy {
                detail: m.to_string(),
            },
            _ => call_err("virDomainBackupBegin", &e),
        })
    }

    /// End the domain's running job (the cycle's backup job after the acknowledgement, or a
    /// failed one) and wait, up to `wait`, until libvirt no longer reports a job. No job is
    /// not an error.
    ///
    /// `virDomainAbortJob` returns once the job's block jobs are told to cancel; a backup job
    /// ends later, when QEMU reports them cancelled, and until then the domain still has a job,
    /// so a backup begun at once would be refused as busy. A job still reported after `wait`
    /// is left to end by itself (the next begin finds the domain busy and retries).
    pub fn abort_job(&self, wait: Duration) -> Result<(), LibvirtError> {
        // SAFETY: valid domain pointer.
        let r = unsafe { sys::virDomainAbortJob(self.dom.as_ptr()) };
        if r != 0 {
            let e = virt::error::Error::last_error();
            if e.code() == ErrorNumber::OperationInvalid && !self.job_active()? {
                return Ok(());
            }
            return Err(call_err("virDomainAbortJob", &e));
        }
        let deadline = Instant::now() + wait;
        while self.job_active()? {
            if Instant::now() >= deadline {
                tracing::warn!(domain = %self.name, "the aborted job still runs after {wait:?}");
                return Ok(());
            }
            std::thread::sleep(JOB_END_POLL);
        }
        Ok(())
    }

    /// The description of checkpoint `name`, with the domain definition it was taken of
    /// (what redefining it needs). A checkpoint that does not exist is
    /// [`LibvirtError::CheckpointMissing`].
    pub fn checkpoint_xml(&self, name: &str) -> Result<String, LibvirtError> {
        let c = cstring("checkpoint name", name)?;
        // SAFETY: valid domain pointer and name; a non-null result is a reference we free.
        let cp = unsafe { sys::virDomainCheckpointLookupByName(self.dom.as_ptr(), c.as_ptr(), 0) };
        if cp.is_null() {
            let e = virt::error::Error::last_error();
            if e.code() == ErrorNumber::NoDomainCheckpoint {
                return Err(LibvirtError::CheckpointMissing {
                    name: name.to_string(),
                });
            }
            return Err(call_err("virDomainCheckpointLookupByName", &e));
        }
        // SAFETY: `cp` is valid until freed below; a non-null result is a malloc'ed string we
        // own, copied and freed; the error is read before the reference is freed.
        let (xml, e) = unsafe {
            let p = sys::virDomainCheckpointGetXMLDesc(cp, 0);
            let out = if p.is_null() {
                (None, Some(virt::error::Error::last_error()))
            } else {
                let s = CStr::from_ptr(p).to_string_lossy().into_owned();
                libc::free(p.cast());
                (Some(s), None)
            };
            sys::virDomainCheckpointFree(cp);
            out
        };
        match (xml, e) {
            (Some(x), _) => Ok(x),
            (None, Some(e)) => Err(call_err("virDomainCheckpointGetXMLDesc", &e)),
            (None, None) => Err(LibvirtError::Call {
                call: "virDomainCheckpointGetXMLDesc",
                message: "failed without an error".into(),
            }),
        }
    }

    /// Redefine a checkpoint whose libvirt metadata was lost (after a migration or a state
    /// loss) from its recorded description (`VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE`), with
    /// libvirt checking that its bitmap is in every disk's image, persistent, recording and
    /// consistent (`..._REDEFINE_VALIDATE`). A bitmap missing or broken is
    /// [`LibvirtError::CheckpointInconsistent`]: only a resync is correct then.
    pub fn redefine_checkpoint(&self, name: &str, xml: &str) -> Result<(), LibvirtError> {
        let c = cstring("checkpoint XML", xml)?;
        let flags = sys::VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE
            | sys::VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE;
        // SAFETY: valid domain pointer and NUL-terminated XML; a non-null result is a
        // reference we free at once.
        let cp = unsafe { sys::virDomainCheckpointCreateXML(self.dom.as_ptr(), c.as_ptr(), flags) };
        if !cp.is_null() {
            // SAFETY: a valid reference, freed once.
            unsafe { sys::virDomainCheckpointFree(cp) };
            return Ok(());
        }
        let e = virt::error::Error::last_error();
        Err(match e.code() {
            _ if is_busy(&e) => LibvirtError::Busy {
                detail: e.message().to_string(),
            },
            ErrorNumber::CheckpointInconsistent | ErrorNumber::InvalidArg => {
                LibvirtError::CheckpointInconsistent {
                    name: name.to_string(),
                    message: e.message().to_string(),
                }
            }
            _ => call_err("virDomainCheckpointCreateXML", &e),
        })
    }

    /// Delete checkpoint `name` (its bitmap on every disk, and its metadata). A checkpoint
    /// that does not exist is [`LibvirtError::CheckpointMissing`].
    pub fn delete_checkpoint(&self, name: &str) -> Result<(), LibvirtError> {
        self.delete_checkpoint_flags(name, 0)
    }

    /// Forget checkpoint `name`'s libvirt metadata only, leaving the disks' bitmaps as they are
    /// (for checkpoints of images the domain no longer uses).
    pub fn forget_checkpoint(&self, name: &str) -> Result<(), LibvirtError> {
        self.delete_checkpoint_flags(name, sys::VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
    }

    fn delete_checkpoint_flags(&self, name: &str, flags: u32) -> Result<(), LibvirtError> {
        let c = cstring("checkpoint name", name)?;
        // SAFETY: valid domain pointer and name; a non-null result is a reference we free.
        let cp = unsafe { sys::virDomainCheckpointLookupByName(self.dom.as_ptr(), c.as_ptr(), 0) };
        if cp.is_null() {
            let e = virt::error::Error::last_error();
            if e.code() == ErrorNumber::NoDomainCheckpoint {
                return Err(LibvirtError::CheckpointMissing {
                    name: name.to_string(),
                });
            }
            return Err(call_err("virDomainCheckpointLookupByName", &e));
        }
        // SAFETY: `cp` is a valid reference, freed once after the call.
        let (r, e) = unsafe {
            let r = sys::virDomainCheckpointDelete(cp, flags);
            let e = (r != 0).then(virt::error::Error::last_error);
            sys::virDomainCheckpointFree(cp);
            (r, e)
        };
        match (r, e) {
            (0, _) => Ok(()),
            (_, Some(e)) if is_busy(&e) => Err(LibvirtError::Busy {
                detail: e.message().to_string(),
            }),
            (_, Some(e)) => Err(call_err("virDomainCheckpointDelete", &e)),
            (_, None) => Err(LibvirtError::Call {
                call: "virDomainCheckpointDelete",
                message: "failed without an error".into(),
            }),
        }
    }
}
