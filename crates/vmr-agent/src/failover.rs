//! Failover: starting a replica VM from a recovery point (live or as an isolated test copy),
//! cancelling and completing it, the planned failover's prepare on the primary, the
//! split-brain guard, and reverse replication (the failed-over VM becomes the primary, the old
//! primary its replica). See `docs/failover.md`.
//!
//! A failed-over VM runs on store *views* (qcow2 overlays on the chosen point's layers, instant
//! whatever the disk size); cycles are never applied into a view, and a view never sees later
//! cycles. Bookkeeping lives in `DIR/failover/<uuid>.json` ([`FailoverRecord`]); the VM
//! processes this agent started are kept in a process table so that cancel and stop-test can
//! end them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vmr_capture::qmp::{QmpClient, QmpError};
use vmr_capture::{Endpoint, Names};
use vmr_core::{
    Adoption, LocalCopy, Op, PrepareRefusal, PrepareSource, ReplicaEvent, VmProbe,
    failover_transition, prepare_source,
};

use crate::primary::PrimarySide;
use crate::replica::ReplicaSide;
use vmr_proto::VmDefinition;
use vmr_proto::api::{
    BecomeReplica, EnableArgs, FailoverRecord, FailoverResult, FailoverVm, ReplicationMode,
    ReplicationState,
};
use vmr_proto::peer::{BecameReplica, PrimaryVmState, SourceVmState, UpstreamProbe};
use vmr_proto::record::{MachineSnapshot, VmRecord};
use vmr_proto::wire::RemoteError;
use vmr_store::RetentionPolicy;
use vmr_transport::{Client, Peer, TransportError};

use crate::errors::AgentError;
use crate::host::Host;
use crate::imaged::ImageDaemon;
use crate::owned::Vm;
use crate::util::now_ms;

/// Why the old primary could not become the replica (`become-replica`, told to the new
/// primary as an internal error).
#[derive(Debug, thiserror::Error)]
enum BecomeError {
    /// A disk of the point is not in the old definition.
    #[error("disk {disk} is not in the old definition")]
    DiskNotInOldDefinition { disk: String },
    /// The new primary has no `server allow` entry here.
    #[error("the new primary is not authorized on this host (`server allow`)")]
    NotAuthorized,
    /// Re-adoption needs the failover view the VM runs on, and none is recorded.
    #[error("no failed-over VM is recorded here, so there is no view to re-adopt")]
    NoFailoverView,
    /// The replica store.
    #[error(transparent)]
    Store(#[from] vmr_store::StoreError),
    /// Anything the agent reports otherwise.
    #[error(transparent)]
    Agent(#[from] AgentError),
}

/// What this host's store holds of the VM (the facts of [`vmr_core::LocalCopy`]): whether it
/// is registered there, whether the VM's disks here are the store's view of the failed-over
/// VM recorded in `fr`, the other views, the latest point.
fn local_copy(
    store: &vmr_store::Store,
    rec: &VmRecord,
    fr: &FailoverRecord,
) -> Result<LocalCopy, vmr_store::StoreError> {
    if !store.vms().contains(&rec.uuid) {
        return Ok(LocalCopy::Absent);
    }
    let views = store.views(rec.uuid)?;
    let def = VmDefinition::from_toml(&rec.launch_toml).ok();
    let on_view = fr.live.as_ref().and_then(|live| {
        let view = views.iter().find(|w| w.id == live.view)?;
        let disks = &def.as_ref()?.disks;
        let same = !disks.is_empty()
            && disks.iter().all(|d| {
                view.disks
                    .iter()
                    .any(|(n, p)| n == &d.node && Path::new(&d.path) == p.as_path())
            });
        same.then_some(view)
    });
    Ok(LocalCopy::Held {
        disks_on_view: on_view.map(|w| w.point),
        other_views: (views.len() - usize::from(on_view.is_some())) as u32,
        latest: store.latest_point(rec.uuid)?,
    })
}

/// How long a started VM's QMP socket may take to answer.
const QMP_START_TIMEOUT: Duration = Duration::from_secs(30);

/// Remember the address to probe the primary agent at ([`vmr_core::probe_address`]: what it
/// reports with each `replica-info` call, a wildcard replaced by where the call came from).
pub fn remember_primary(vm: &Vm, listen: &str) {
    let r = (|| -> Result<(), AgentError> {
        let mut fr = vm.failover()?;
        if fr.primary_listen.as_deref() != Some(listen) {
            fr.primary_listen = Some(listen.to_owned());
            vm.save_failover(&fr)?;
        }
        Ok(())
    })();
    if let Err(e) = r {
        tracing::warn!(vm = %vm.rec.uuid, "cannot record the primary's address: {}", crate::util::chain(&e));
    }
}

// ------------------------------------------------------------------ processes

fn proc_matches(pid: u32, qmp: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(qmp))
        .unwrap_or(false)
}

/// Is the VM process started for `f` alive?
fn running(vm: &mut Vm, f: &FailoverVm) -> bool {
    if let Some(d) = &f.libvirt {
        return crate::lvfailover::runs(d);
    }
    let (Some(pid), Some(qmp)) = (f.pid, f.qmp.as_deref()) else {
        return false;
    };
    if let Some(c) = vm.children.get_mut(&pid) {
        return matches!(c.try_wait(), Ok(None));
    }
    proc_matches(pid, qmp)
}

/// Does the live failed-over VM recorded in `fr` run (this replica runs the VM)?
pub fn live_runs(vm: &mut Vm, fr: &FailoverRecord) -> bool {
    fr.live.as_ref().is_some_and(|f| running(vm, f))
}

/// End the VM process of `f` (QMP `quit`, then SIGKILL) and wait for it; a domain a failover
/// through libvirt defined is destroyed and undefined (the one error returned: libvirt
/// refused).
async fn kill_vm(vm: &mut Vm, f: &FailoverVm) -> Result<(), AgentError> {
    if let Some(d) = &f.libvirt {
        return crate::lvfailover::remove(d.clone()).await;
    }
    let (Some(pid), Some(qmp)) = (f.pid, f.qmp.clone()) else {
        return Ok(());
    };
    if let Ok(mut q) =
        QmpClient::connect(&Endpoint::Unix(qmp.clone().into()), Duration::from_secs(3)).await
    {
        let _ = q.execute_value("quit", None).await;
    }
    let child = vm.children.remove(&pid);
    match child {
        Some(mut c) => {
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        None => {
            let deadline = Instant::now() + Duration::from_secs(5);
            while proc_matches(pid, &qmp) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if proc_matches(pid, &qmp)
                && let Ok(raw) = i32::try_from(pid)
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(raw),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
    let _ = std::fs::remove_file(&qmp);
    Ok(())
}

/// Start the definition's QEMU program on `disks`; returns (pid, qmp path) once QMP answers,
/// with change tracking added before the guest runs: a first-generation bitmap
/// (`vmr-<tag>-1`) on every disk for each capture tag of `tracking` (none for a test copy; the
/// VM's own tag, and the extended replica's relationship's when this host forwards the VM).
async fn launch_vm(
    vm: &mut Vm,
    def: &VmDefinition,
    program: &Path,
    disks: &[(String, PathBuf)],
    dest: &Path,
    test: bool,
    tracking: &[String],
) -> Result<(u32, PathBuf, String), AgentError> {
    let qmp = dest.join("qmp.sock");
    let nbd = if test {
        dest.join("nbd.sock")
    } else {
        crate::launch::nbd_socket(&vm.host.dir, def.uuid)
    };
    let qga = dest.join("qga.sock");
    for s in [&qmp, &nbd, &qga] {
        let _ = std::fs::remove_file(s);
    }
    let shared: &Vm = vm;
    let started = crate::util::start_again_on_crash(
        "the VM's program",
        &def.name,
        || {
            launch_once(
                shared, def, program, disks, dest, test, tracking, &qmp, &nbd,
            )
        },
        crash_at_start,
        || {
            for s in [&qmp, &nbd, &qga] {
                let _ = std::fs::remove_file(s);
            }
        },
    )
    .await;
    let ((pid, child, mut line), crashes) = started.map_err(|(e, _)| e)?;
    vm.children.insert(pid, child);
    if !crashes.is_empty() {
        line.push_str(&format!(
            "\n(started again: it crashed at start before its QMP answered: {})",
            crashes.join(", ")
        ));
    }
    Ok((pid, qmp, line))
}

/// The signal's name when `e` says the program died by a crash signal before QMP answered.
fn crash_at_start(e: &AgentError) -> Option<&'static str> {
    let AgentError::VmExited { status, .. } = e else {
        return None;
    };
    crate::util::crash_signal(status)
}

/// One start of [`launch_vm`]: the child, its pid and its command line once QMP answered and
/// tracking exists.
#[allow(clippy::too_many_arguments)]
async fn launch_once(
    vm: &Vm,
    def: &VmDefinition,
    program: &Path,
    disks: &[(String, PathBuf)],
    dest: &Path,
    test: bool,
    tracking: &[String],
    qmp: &Path,
    nbd: &Path,
) -> Result<(u32, std::process::Child, String), AgentError> {
    let mut cmd = crate::launch::command(
        def,
        program,
        &|n| {
            disks
                .iter()
                .find(|(d, _)| d == n)
                .map(|(_, p)| p.display().to_string())
        },
        qmp,
        nbd,
        test,
        &dest.join("vm.log"),
    )
    .map_err(|e| AgentError::LaunchCommand(Box::new(e)))?;
    // A real VM starts paused so that tracking exists before the guest's first write.
    let paused = def.program.contains("qemu-system");
    if paused {
        cmd.arg("-S");
    }
    let line = crate::launch::display_command(&cmd);
    tracing::info!(vm = %def.name, command = %line, "starting the VM");
    // Its own process group: a signal to the agent does not reach the VM.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().map_err(|source| AgentError::SpawnVm {
        program: def.program.clone(),
        source,
    })?;
    let pid = child.id();
    launch_crash_hook(&vm.host.dir, &mut child);
    let started = async {
        let deadline = Instant::now() + QMP_START_TIMEOUT;
        let mut q = loop {
            if let Ok(Some(st)) = child.try_wait() {
                let log = std::fs::read_to_string(dest.join("vm.log")).unwrap_or_default();
                return Err(AgentError::VmExited {
                    program: def.program.clone(),
                    status: st,
                    log: log.trim().to_owned(),
                });
            }
            if qmp.exists()
                && let Ok(q) =
                    QmpClient::connect(&Endpoint::Unix(qmp.to_path_buf()), Duration::from_secs(5))
                        .await
            {
                break q;
            }
            if Instant::now() > deadline {
                return Err(AgentError::QmpTimeout {
                    path: qmp.to_path_buf(),
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        for tag in tracking {
            let names = Names::new(tag)?;
            for (node, _) in disks {
                let mut args = json!({
                    "node": node, "name": names.bitmap(1),
                    "granularity": vmr_capture::BITMAP_GRANULARITY, "persistent": true,
                });
                if q.execute_value("block-dirty-bitmap-add", Some(args.clone()))
                    .await
                    .is_err()
                {
                    args["persistent"] = json!(false);
                    q.execute_value("block-dirty-bitmap-add", Some(args))
                        .await
                        .map_err(|source| AgentError::StartTracking {
                            node: node.clone(),
                            source,
                        })?;
                }
            }
        }
        if paused {
            q.execute_value("cont", None)
                .await
                .map_err(AgentError::ResumeVm)?;
        }
        Ok(())
    }
    .await;
    if let Err(e) = started {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e);
    }
    Ok((pid, child, line))
}

/// Test hook (cargo feature `test-hooks` only, [`crate::util::crash_at_start_hook`]): a file of
/// this name in the agent directory holding a number N makes the next N starts of a VM
/// program crash at once (SIGSEGV right after the spawn; the agent waits for it to die).
const LAUNCH_CRASH_HOOK: &str = "test-launch-crash";

fn launch_crash_hook(dir: &Path, child: &mut std::process::Child) {
    if crate::util::crash_at_start_hook(dir, LAUNCH_CRASH_HOOK)
        && let Ok(pid) = i32::try_from(child.id())
    {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGSEGV,
        );
        let _ = child.wait();
    }
}

// ------------------------------------------------------------------ replica side

fn result(
    name: &str,
    state: ReplicationState,
    f: Option<&FailoverVm>,
    t0: Instant,
    message: String,
) -> FailoverResult {
    FailoverResult {
        name: f.map_or_else(|| name.to_owned(), |f| f.name.clone()),
        state,
        point: f.map(|f| f.point),
        disks: f.map(|f| f.disks.clone()).unwrap_or_default(),
        qmp: f.and_then(|f| f.qmp.clone()),
        pid: f.and_then(|f| f.pid),
        test_id: f.filter(|f| f.test).map(|f| f.view),
        elapsed_ms: t0.elapsed().as_millis() as u64,
        message,
        network: Vec::new(),
    }
}

fn replica_record(vm: &Vm) -> Result<VmRecord, AgentError> {
    let rec = vm.rec.clone();
    if rec.mode() != ReplicationMode::Replica {
        return Err(AgentError::OnPrimary {
            name: rec.name,
            what: "this".to_owned(),
        });
    }
    Ok(rec)
}

/// `failover start` (live) and `failover test`.
pub async fn start(
    vm: &mut Vm,
    side: &mut ReplicaSide,
    point: Option<u64>,
    no_start: bool,
    force: bool,
    test: bool,
) -> Result<FailoverResult, AgentError> {
    let t0 = Instant::now();
    let rec = replica_record(vm)?;
    let name = rec.name.clone();
    let name = name.as_str();
    let store = vm.host.store_of(&rec)?;
    let has_point = store.latest_point(rec.uuid)?.is_some();
    let op = if test { Op::Test } else { Op::Start };
    // Checked before anything is done; the machine decides again below.
    failover_transition(
        ReplicationMode::Replica,
        side.machine().state(),
        op,
        has_point,
    )
    .map_err(AgentError::Refused)?;
    if let Some(p) = point {
        let points: Vec<u64> = store.points(rec.uuid)?.iter().map(|x| x.id).collect();
        if !points.contains(&p) {
            return Err(AgentError::NoSuchPoint {
                name: name.to_owned(),
                point: p,
                points,
            });
        }
    }
    // The definition and its program are checked before anything changes: a program this
    // host does not allow is refused here, whoever registered the VM.
    let mut def = VmDefinition::from_toml(&store.definition(rec.uuid)?)
        .map_err(AgentError::ReplicatedDefinition)?;
    // Which launcher starts the VM here is vmr_core::failover_launcher's decision: a domain
    // XML (replicated, or generated from a plain-QEMU definition when this host's agent
    // manages VMs through libvirt) through this host's libvirt (lvfailover.rs), else QEMU.
    // The connection and the XML are checked before anything changes.
    let uri = crate::lvfailover::uri(&vm.host);
    let host_libvirt = vm.host.config.libvirt_connect.is_some();
    let qemu_command = def.program != crate::lvfailover::LIBVIRT_PROGRAM;
    let default_answers = !qemu_command
        && !host_libvirt
        && def.libvirt_xml.is_some()
        && crate::lvfailover::answers(uri.clone()).await;
    let launcher = vmr_core::failover_launcher(
        qemu_command,
        def.libvirt_xml.is_some(),
        host_libvirt,
        default_answers,
    )
    .map_err(|source| AgentError::FailoverLauncher {
        name: name.to_owned(),
        source,
    })?;
    // A VM replicated from a libvirt domain on a host without libvirt: QEMU with a command
    // line made from the domain XML (its NICs the network-args run).
    if launcher == vmr_core::FailoverLauncher::QemuFromDomainXml {
        let xml = def.libvirt_xml.take().unwrap_or_default();
        let q = vmr_libvirt::generate::qemu_from_domain(&xml).map_err(|source| {
            AgentError::DomainToQemu {
                name: name.to_owned(),
                source,
            }
        })?;
        def.program = q.program;
        def.args = q.args;
        def.network_args = q.network_args;
        // a test copy drops the NICs' run; without any NIC argument QEMU would add a default one
        def.test_args = vec!["-nic".into(), "none".into()];
        def.validate().map_err(AgentError::ReplicatedDefinition)?;
        tracing::info!(vm = %name, program = %def.program, args = %def.args.join(" "),
            "no libvirt on this host: QEMU is started from the domain XML");
    }
    // A real failover attaches the VM to this host's networks when they differ (QEMU
    // arguments, also read by a generated domain: a replicated domain keeps its own
    // interfaces).
    if !test
        && launcher != vmr_core::FailoverLauncher::LibvirtReplicatedXml
        && let Some(args) = &rec.failover.network_args
    {
        def = def
            .with_network_args(args)
            .map_err(AgentError::ReplicaNetworkArgs)?;
    }
    // (uri, domain XML, domain name, the replicated disks' targets by disk id)
    let libvirt = match launcher {
        vmr_core::FailoverLauncher::Qemu | vmr_core::FailoverLauncher::QemuFromDomainXml => None,
        vmr_core::FailoverLauncher::LibvirtReplicatedXml => {
            let xml = def.libvirt_xml.clone().unwrap_or_default();
            let domain = crate::lvfailover::check(uri.clone(), xml.clone()).await?;
            Some((uri, xml, domain, None))
        }
        vmr_core::FailoverLauncher::LibvirtGeneratedXml => {
            let points = store.points(rec.uuid)?;
            let ids: Vec<String> = points
                .iter()
                .rfind(|p| point.is_none_or(|k| p.id == k))
                .map(|p| p.disks.iter().map(|(d, _)| d.clone()).collect())
                .unwrap_or_default();
            let (xml, targets) = crate::lvfailover::generate(&def, &ids, &uri)?;
            let domain = crate::lvfailover::check(uri.clone(), xml.clone()).await?;
            Some((uri, xml, domain, Some(targets)))
        }
    };
    let program = if no_start || libvirt.is_some() {
        None
    } else {
        Some(crate::launch::allowed_program(
            &def.program,
            &vm.host.config.allowed_programs,
            &vm.host.dir.join(crate::config::CONFIG_FILE),
        )?)
    };
    let mut fr = vm.failover()?;
    if !test && !force {
        split_brain_guard(&vm.host, &rec, &fr).await?;
    }
    let now = now_ms();
    // From now on cycles from the old primary are refused (a test changes nothing).
    let ev = if test {
        ReplicaEvent::FailoverTest { now_ms: now }
    } else {
        ReplicaEvent::FailoverStart { now_ms: now }
    };
    side.step(vm, ev).map_err(AgentError::Refused)?;
    let made = async {
        let fo = crate::launch::failover_dir(&vm.host.dir, rec.uuid);
        let dest = if test {
            // A fresh slot: an existing test copy's directory is never reused.
            loop {
                let d = fo.join(format!(
                    "t{}",
                    &uuid::Uuid::new_v4().simple().to_string()[..8]
                ));
                if !d.exists() {
                    break d;
                }
            }
        } else {
            fo.join("live")
        };
        if dest.exists() {
            std::fs::remove_dir_all(&dest).map_err(AgentError::io("removing", &dest))?;
        }
        let view = match store.create_view(rec.uuid, point, &dest).await {
            Ok(v) => v,
            Err(e) => {
                // Nothing of a copy that was not made is left behind.
                let _ = std::fs::remove_dir_all(&dest);
                let _ = std::fs::remove_dir(&fo);
                return Err(AgentError::CreateOverlays(e));
            }
        };
        if test {
            def.name = format!("{}-test", def.name);
        }
        let mut f = FailoverVm {
            name: def.name.clone(),
            view: view.id,
            point: view.point,
            disks: view
                .disks
                .iter()
                .map(|(d, p)| (d.clone(), p.display().to_string()))
                .collect(),
            qmp: None,
            pid: None,
            test,
            network: Vec::new(),
            libvirt: None,
            extended_tracking: false,
        };
        let mut line = None;
        if let Some((uri, xml, domain, targets)) = &libvirt {
            // a generated domain names its disks vda, vdb, ...: the overlays by target
            let disks: Vec<(String, PathBuf)> = view
                .disks
                .iter()
                .map(|(d, p)| {
                    let t = targets
                        .as_ref()
                        .and_then(|t| t.iter().find(|(id, _)| id == d))
                        .map_or_else(|| d.clone(), |(_, t)| t.clone());
                    (t, p.clone())
                })
                .collect();
            let plan = crate::lvfailover::plan(domain, &disks, test);
            match crate::lvfailover::define(uri.clone(), xml.clone(), plan, !no_start).await {
                Ok(d) => {
                    f.name = d.domain.clone();
                    line = Some(format!(
                        "libvirt domain {} (uuid {}) at {}{}",
                        d.domain,
                        d.uuid,
                        d.uri,
                        if no_start {
                            ", defined, not started"
                        } else {
                            ""
                        }
                    ));
                    f.libvirt = Some(d);
                }
                Err(e) => {
                    let _ = store.remove_view(rec.uuid, view.id);
                    let _ = std::fs::remove_dir_all(&dest);
                    return Err(e);
                }
            }
        } else if let Some(program) = &program {
            // A VM this host forwards to an extended replica also gets that relationship's
            // bitmap, started with the reverse relationship's before the VM runs, so that
            // `reverse` can continue the extended relationship from the failover point
            // without missing a write (docs/extended.md).
            let tracking: Vec<String> = if test {
                Vec::new()
            } else {
                std::iter::once(crate::launch::tag(def.uuid))
                    .chain(
                        rec.extended
                            .is_some()
                            .then(|| crate::cycle::capture_tag(rec.uuid, ONWARD_SLOT)),
                    )
                    .collect()
            };
            match launch_vm(vm, &def, program, &view.disks, &dest, test, &tracking).await {
                Ok((pid, qmp, l)) => {
                    f.pid = Some(pid);
                    f.qmp = Some(qmp.display().to_string());
                    f.extended_tracking = tracking.len() > 1;
                    line = Some(l);
                }
                Err(e) => {
                    // Nothing of a copy that did not start is left behind (its log is in
                    // the error).
                    let _ = store.remove_view(rec.uuid, view.id);
                    let _ = std::fs::remove_dir_all(&dest);
                    return Err(e);
                }
            }
        }
        Ok::<_, AgentError>((f, line))
    }
    .await;
    let (f, line) = match made {
        Ok(f) => f,
        Err(e) => {
            if !test {
                side.step(vm, ReplicaEvent::FailoverCancel { now_ms: now_ms() })
                    .map_err(AgentError::Refused)?;
            }
            return Err(e);
        }
    };
    let planned = store
        .points(rec.uuid)?
        .last()
        .is_some_and(|p| p.id == f.point && p.kind == vmr_store::PointKind::Planned);
    if test {
        fr.tests.push(f.clone());
    } else {
        fr.live = Some(f.clone());
        fr.planned = planned;
        if let Some(q) = &f.qmp {
            vm.rec.qmp = q.clone();
            // The agent started this VM: its NBD socket is the agent's own, and so is its
            // guest agent channel.
            vm.rec.nbd = None;
            vm.rec.qga =
                crate::launch::qga_socket(&def, Path::new(q)).map(|p| p.display().to_string());
            vm.save()?;
        }
    }
    vm.save_failover(&fr)?;
    let what = match (test, no_start) {
        (true, true) if f.libvirt.is_some() => format!("test copy {:?} defined", f.name),
        (true, _) => format!("test copy {:?} started", f.name),
        (false, true) => "disks prepared (not started)".to_owned(),
        (false, false) => format!("VM {:?} started", f.name),
    };
    let msg = format!(
        "{what} from recovery point {}{}; state {}{}",
        f.point,
        if planned && !test { " (planned)" } else { "" },
        side.machine().state(),
        line.map(|l| format!("\nruns: {l}")).unwrap_or_default()
    );
    tracing::info!(vm = %name, point = f.point, test, "failover: {msg}");
    Ok(result(name, side.machine().state(), Some(&f), t0, msg))
}

/// The split-brain guard of an unplanned failover: probe the primary (`primary-vm-state`,
/// pinned to its authorization entry's fingerprint) at the address recorded from its calls,
/// never a wildcard or this agent's own listener; what the result means is
/// [`vmr_core::split_brain_verdict`]'s decision.
async fn split_brain_guard(
    host: &Host,
    rec: &VmRecord,
    fr: &FailoverRecord,
) -> Result<(), AgentError> {
    let addr = fr.primary_listen.clone();
    let probe = probe_primary(host, rec, addr.as_deref()).await;
    tracing::info!(vm = %rec.name, addr = addr.as_deref().unwrap_or("-"), ?probe, "split-brain probe");
    let addr = addr.unwrap_or_else(|| "unknown address".to_owned());
    match vmr_core::split_brain_verdict(probe.0, false) {
        vmr_core::SplitBrain::Proceed => Ok(()),
        vmr_core::SplitBrain::PrimaryRuns => Err(AgentError::PrimaryRuns {
            primary: rec.primary.clone(),
            addr,
            name: rec.name.clone(),
            state: probe.1.unwrap_or(ReplicationState::Replicating),
        }),
        vmr_core::SplitBrain::Unchecked { reason } => Err(AgentError::PrimaryUnchecked {
            primary: rec.primary.clone(),
            addr,
            reason,
        }),
    }
}

/// Probe the primary at `addr`: what was found, and the state it answered.
async fn probe_primary(
    host: &Host,
    rec: &VmRecord,
    addr: Option<&str>,
) -> (vmr_core::PrimaryProbe, Option<ReplicationState>) {
    use vmr_core::PrimaryProbe as P;
    let failed = |reason: String| (P::Failed { reason }, None);
    let own = host.config.listen.parse().ok();
    if let Err(e) = vmr_core::check_probe_target(addr, own) {
        return failed(e.to_string());
    }
    let Some(addr) = addr else {
        return failed(vmr_core::UnusableProbe::Unknown.to_string());
    };
    let fp = host
        .allowed()
        .into_iter()
        .find(|e| e.primary == rec.primary)
        .map(|e| e.fingerprint);
    let Some(fp) = fp else {
        return failed(format!(
            "no authorization entry names the primary {:?}",
            rec.primary
        ));
    };
    let probe = async {
        let c = Client::connect(
            addr,
            &host.identity,
            &fp,
            crate::config::client_options(&host.config),
        )
        .await?;
        // Across an extended chain the source answers for its own primary too; an older
        // source gets the two-host call.
        if let Some(v) = c.source_vm_state(rec.uuid).await? {
            let up = v.upstream.map(upstream_probe);
            let answered = P::Answered { running: v.running };
            // Where the VM runs, when it runs upstream and not on the source itself.
            let upstream_runs = !v.running && matches!(up, Some(P::Answered { running: true }));
            let probe = vmr_core::chain_probe(answered, up);
            return Ok((probe, v.state, upstream_runs));
        }
        let v = c.primary_vm_state(rec.uuid).await?;
        Ok((P::Answered { running: v.running }, v.state, false))
    };
    match tokio::time::timeout(PROBE_TIMEOUT + UPSTREAM_PROBE_TIMEOUT, probe).await {
        Ok(Ok((probe, state, upstream_runs))) => {
            if upstream_runs {
                tracing::info!(vm = %rec.name, source = %rec.primary, "split-brain probe: the VM runs on the source's own primary");
            }
            (probe, Some(state))
        }
        Ok(Err(e)) if primary_lost(&e) => (P::Lost, None),
        Ok(Err(e)) if agent_down(&e) => failed(format!(
            "the primary host answers at {addr} but no vmreplica agent listens there (connection \
             refused): its VM may still run"
        )),
        Ok(Err(e)) => failed(crate::util::chain(&e)),
        Err(_) => (P::Lost, None),
    }
}

/// How long a split-brain probe of the primary may take (connection and answer).
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a forwarding replica's probe of its own primary may take, inside the answer to
/// its extended replica's `source-vm-state` (which waits that much longer).
const UPSTREAM_PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// A relayed upstream probe as the core's probe.
fn upstream_probe(u: UpstreamProbe) -> vmr_core::PrimaryProbe {
    use vmr_core::PrimaryProbe as P;
    match u {
        UpstreamProbe::Answered { running, .. } => P::Answered { running },
        UpstreamProbe::Lost => P::Lost,
        UpstreamProbe::Failed { reason } => P::Failed { reason },
    }
}

/// Agent-to-agent `source-vm-state` on this host, the source of an extended relationship
/// (or the VM's primary): does the VM run here, and — when this host is itself a replica —
/// what its own probe of its primary finds (the same probe as `failover start`'s guard,
/// within [`UPSTREAM_PROBE_TIMEOUT`]). Runs outside the owner task: the owner hands it the
/// record, the failover record and its state.
pub async fn source_vm_state(
    host: Arc<Host>,
    rec: VmRecord,
    fr: FailoverRecord,
    state: ReplicationState,
    live_runs: bool,
) -> SourceVmState {
    if rec.mode() == ReplicationMode::Primary {
        let running = vm_runs(&rec, state).await;
        return SourceVmState {
            state,
            running,
            upstream: None,
        };
    }
    let probe = tokio::time::timeout(
        UPSTREAM_PROBE_TIMEOUT,
        probe_primary(&host, &rec, fr.primary_listen.as_deref()),
    )
    .await;
    use vmr_core::PrimaryProbe as P;
    let upstream = match probe {
        Ok((P::Answered { running }, st)) => UpstreamProbe::Answered {
            running,
            state: st.unwrap_or(ReplicationState::Replicating),
        },
        Ok((P::Lost, _)) | Err(_) => UpstreamProbe::Lost,
        Ok((P::Failed { reason }, _)) => UpstreamProbe::Failed { reason },
    };
    tracing::info!(vm = %rec.name, ?upstream, live_runs, "source-vm-state: probed this replica's primary for the extended replica");
    SourceVmState {
        state,
        running: live_runs,
        upstream: Some(upstream),
    }
}

/// Nothing answers at the primary's address: host or network unreachable, or no answer in
/// time. Anything else (a refused connection: the host is up; TLS, identity, the primary
/// refusing the call) is not "lost" (issue 11: the VM may still run there).
fn primary_lost(e: &TransportError) -> bool {
    use std::io::ErrorKind as K;
    match e {
        TransportError::Connect { source, .. } => matches!(
            source.kind(),
            K::HostUnreachable | K::NetworkUnreachable | K::TimedOut
        ),
        TransportError::Timeout(_) => true,
        _ => false,
    }
}

/// The primary's host answered, but no agent listens on its port.
fn agent_down(e: &TransportError) -> bool {
    matches!(e, TransportError::Connect { source, .. }
        if source.kind() == std::io::ErrorKind::ConnectionRefused)
}

pub async fn stop_test(
    vm: &mut Vm,
    test_id: Option<uuid::Uuid>,
) -> Result<FailoverResult, AgentError> {
    let t0 = Instant::now();
    let rec = replica_record(vm)?;
    let name = rec.name.clone();
    let name = name.as_str();
    let store = vm.host.store_of(&rec)?;
    let mut fr = vm.failover()?;
    let (gone, keep): (Vec<_>, Vec<_>) = fr
        .tests
        .drain(..)
        .partition(|t| test_id.is_none_or(|id| id == t.view));
    if gone.is_empty() {
        return Err(AgentError::NoTestCopy {
            name: name.to_owned(),
            id: test_id,
        });
    }
    fr.tests = keep;
    for t in &gone {
        end_failover_vm(vm, &store, t, false).await?;
    }
    vm.save_failover(&fr)?;
    // What was removed: no process, socket or disk of it is left to show.
    let removed = gone.first().map(|f| FailoverVm {
        disks: Vec::new(),
        qmp: None,
        pid: None,
        ..f.clone()
    });
    Ok(result(
        name,
        rec.state(),
        removed.as_ref(),
        t0,
        format!(
            "{} test cop{} stopped and deleted: {}",
            gone.len(),
            if gone.len() == 1 { "y" } else { "ies" },
            gone.iter()
                .map(|t| format!("{} (test id {})", t.name, t.view))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ))
}

/// End a failed-over VM or test copy: its process, its view in the store (`missing_ok`: a view
/// already gone is fine), and its directory of overlays.
async fn end_failover_vm(
    vm: &mut Vm,
    store: &vmr_store::Store,
    f: &FailoverVm,
    missing_ok: bool,
) -> Result<(), AgentError> {
    kill_vm(vm, f).await?;
    match store.remove_view(vm.rec.uuid, f.view) {
        Ok(()) => {}
        Err(vmr_store::StoreError::NoSuchView(_)) if missing_ok => {}
        Err(e) => return Err(e.into()),
    }
    if let Some(dir) = f.disks.first().and_then(|(_, p)| Path::new(p).parent()) {
        let _ = std::fs::remove_dir_all(dir);
    }
    Ok(())
}

pub async fn cancel(vm: &mut Vm, side: &mut ReplicaSide) -> Result<FailoverResult, AgentError> {
    let t0 = Instant::now();
    let rec = replica_record(vm)?;
    let name = rec.name.clone();
    let name = name.as_str();
    failover_transition(
        ReplicationMode::Replica,
        side.machine().state(),
        Op::Cancel,
        true,
    )
    .map_err(AgentError::Refused)?;
    let store = vm.host.store_of(&rec)?;
    let mut fr = vm.failover()?;
    if let Some(live) = fr.live.take() {
        end_failover_vm(vm, &store, &live, true).await?;
    }
    fr.before = None;
    fr.planned = false;
    vm.save_failover(&fr)?;
    vm.rec.qmp = String::new();
    side.step(vm, ReplicaEvent::FailoverCancel { now_ms: now_ms() })
        .map_err(AgentError::Refused)?;
    let state = side.machine().state();
    Ok(result(
        name,
        state,
        None,
        t0,
        format!("failover cancelled: what the failed-over VM wrote is discarded; state {state}"),
    ))
}

pub async fn complete(vm: &mut Vm, side: &mut ReplicaSide) -> Result<FailoverResult, AgentError> {
    let t0 = Instant::now();
    let rec = replica_record(vm)?;
    let name = rec.name.clone();
    let name = name.as_str();
    failover_transition(
        ReplicationMode::Replica,
        side.machine().state(),
        Op::Complete,
        true,
    )
    .map_err(AgentError::Refused)?;
    let store = vm.host.store_of(&rec)?;
    let fr = vm.failover()?;
    let live = fr.live.clone().ok_or_else(|| AgentError::NoFailedOverVm {
        name: name.to_owned(),
    })?;
    if let Some(t) = fr.tests.iter().find(|t| t.point != live.point) {
        return Err(AgentError::TestPinsPoint {
            view: t.view,
            point: t.point,
        });
    }
    if running(vm, &live) {
        store.discard_points_above(rec.uuid, live.point).await?;
    } else {
        store
            .discard_points_except(rec.uuid, Some(live.point))
            .await?;
    }
    side.step(
        vm,
        ReplicaEvent::FailoverComplete {
            now_ms: now_ms(),
            point: live.point,
        },
    )
    .map_err(AgentError::Refused)?;
    Ok(result(
        name,
        side.machine().state(),
        Some(&live),
        t0,
        format!(
            "failover completed on point {}; the other recovery points are dropped",
            live.point
        ),
    ))
}

// ------------------------------------------------------------------ primary side

/// Is the primary VM running? `PreparedForFailover` counts as not running (locked); a
/// libvirt-managed VM runs when libvirt says its domain is active; a QMP
/// monitor that does not answer as not running; QEMU's `query-status` decides otherwise; a
/// qemu-storage-daemon stand-in (no `query-status`) counts as running.
async fn vm_runs(rec: &VmRecord, state: ReplicationState) -> bool {
    if state == ReplicationState::PreparedForFailover {
        return false;
    }
    // A libvirt-managed VM has no QMP socket of ours: libvirt says whether its domain runs
    // (a daemon that cannot be asked counts as running: the guard must not be fooled).
    if let Some(src) = rec.libvirt.clone() {
        let asked = tokio::task::spawn_blocking(move || {
            vmr_libvirt::Libvirt::open(&src.uri)?
                .domain(&src.domain)?
                .is_running()
        })
        .await;
        return match asked {
            Ok(Ok(runs)) => runs,
            Ok(Err(vmr_libvirt::LibvirtError::NoDomain { .. })) => false,
            Ok(Err(e)) => {
                tracing::warn!(vm = %rec.name, "cannot ask libvirt whether the domain runs (counted as running): {e}");
                true
            }
            Err(_) => true,
        };
    }
    if rec.qmp.is_empty() {
        return false;
    }
    let ep = Endpoint::Unix(rec.qmp.clone().into());
    let mut q = match QmpClient::connect(&ep, Duration::from_secs(2)).await {
        Ok(q) => q,
        // Nobody listens: the VM process is gone.
        Err(QmpError::Connect { .. }) => return false,
        // The monitor is busy (our own capture holds it) or slow: the process is alive.
        Err(_) => return true,
    };
    match q.execute_value("query-status", None).await {
        Ok(v) => v.get("running").and_then(Value::as_bool).unwrap_or(true),
        Err(_) => true,
    }
}

/// Agent-to-agent `primary-vm-state`: the split-brain probe of a replica. `state`: the
/// machine's state of the VM on this host.
pub async fn primary_vm_state(vm: &Vm, state: ReplicationState) -> PrimaryVmState {
    let running = vm.rec.mode() == ReplicationMode::Primary && vm_runs(&vm.rec, state).await;
    PrimaryVmState { state, running }
}

/// `failover prepare`: the VM must be shut down (with `shutdown`, it is shut down first,
/// within that time); ship the final (planned) cycle; lock. Where the final cycle is read from
/// is [`vmr_core::prepare_source`]'s decision on what the VM's monitor shows: the VM's QEMU
/// (guest shut down, QEMU still running), or, when its QEMU has exited, the images themselves
/// through a qemu-storage-daemon of the agent's ([`crate::imaged`]).
pub async fn prepare(
    vm: &mut Vm,
    side: &mut PrimarySide,
    shutdown: Option<Duration>,
) -> Result<FailoverResult, AgentError> {
    let t0 = Instant::now();
    let name = vm.rec.name.clone();
    let name = name.as_str();
    failover_transition(vm.rec.mode(), side.state(), Op::Prepare, true)
        .map_err(AgentError::Refused)?;
    // The cycle task holds the VM's (single-client) QMP monitor: stop it first.
    side.stop().await;
    if let Some(src) = vm.rec.libvirt.clone() {
        return prepare_libvirt(vm, side, shutdown, &src, t0).await;
    }
    if let Some(limit) = shutdown
        && let Err(e) = crate::shutdown::shutdown_guest(&vm.rec, limit).await
    {
        side.resume_after_stop(vm);
        return Err(e);
    }
    let source = match prepare_source(probe_vm(&vm.rec).await) {
        Ok(s) => s,
        Err(r) => {
            side.resume_after_stop(vm);
            return Err(match r {
                PrepareRefusal::Running { status } => AgentError::VmStillRunning {
                    name: name.to_owned(),
                    status,
                },
                PrepareRefusal::Unresponsive { reason } => AgentError::VmMonitorUnresponsive {
                    name: name.to_owned(),
                    qmp: vm.rec.qmp.clone(),
                    reason,
                },
            });
        }
    };
    let (id, from) = match source {
        PrepareSource::Vm => (side.prepare_failover(vm, None).await, "the VM".to_owned()),
        PrepareSource::Images => {
            let work = crate::launch::work_dir(&vm.host.dir, vm.rec.uuid);
            let daemon = match ImageDaemon::start(&vm.rec, &work, &vm.host.dir).await {
                Ok(d) => d,
                Err(e) => {
                    side.resume_after_stop(vm);
                    return Err(e);
                }
            };
            let from = match daemon.crashes() {
                [] => "its images (QEMU had exited)".to_owned(),
                c => format!(
                    "its images (QEMU had exited; the qemu-storage-daemon on them was started \
                     again: it crashed at start before its QMP answered: {})",
                    c.join(", ")
                ),
            };
            let id = side
                .prepare_failover(vm, Some(daemon.qmp().to_path_buf()))
                .await;
            // Stopped whatever the cycle did: the bitmaps are stored, the images unlocked.
            let stopped = daemon.stop().await;
            if let Err(e) = &stopped {
                tracing::error!(vm = %name, "{}", crate::util::chain(e));
            }
            let id = match (id, stopped) {
                (Ok(id), Ok(())) => Ok(id),
                (Err(e), _) | (Ok(_), Err(e)) => Err(e),
            };
            (id, from)
        }
    };
    let id = match id {
        Ok(id) => id,
        Err(AgentError::FinalCycleFailed { reason })
            if side.state() == ReplicationState::WaitingForStartResynchronize =>
        {
            return Err(AgentError::FinalCycleNeedsResync {
                name: name.to_owned(),
                reason,
            });
        }
        Err(e) => return Err(e),
    };
    Ok(result(
        name,
        ReplicationState::PreparedForFailover,
        None,
        t0,
        format!(
            "final cycle {id} shipped from {from} and acknowledged; {name:?} is \
             PreparedForFailover (do not start it here); run `vmreplica failover start {name}` \
             on the replica"
        ),
    ))
    .map(|mut r| {
        r.point = Some(id);
        r
    })
}

/// `failover prepare` of a libvirt-managed VM (lvprepare.rs): the domain shut down through
/// libvirt (with `shutdown`) or found shut off, started paused for the final cycle's backup
/// job (libvirt takes backup jobs of active domains only; the guest never runs), and
/// destroyed again after it ([`vmr_core::libvirt_prepare`] decides the steps). The final
/// cycle is the machine's, as for any VM.
async fn prepare_libvirt(
    vm: &mut Vm,
    side: &mut PrimarySide,
    shutdown: Option<Duration>,
    src: &vmr_proto::vmdef::LibvirtSource,
    t0: Instant,
) -> Result<FailoverResult, AgentError> {
    let name = vm.rec.name.clone();
    let runs = match crate::lvprepare::runs(src).await {
        Ok(r) => r,
        Err(e) => {
            side.resume_after_stop(vm);
            return Err(e);
        }
    };
    let how = match vmr_core::libvirt_prepare(runs, shutdown.is_some()) {
        Err(r) => {
            side.resume_after_stop(vm);
            return Err(match r {
                PrepareRefusal::Running { .. } => AgentError::VmStillRunning {
                    name,
                    status: format!("libvirt domain {} is running", src.domain),
                },
                PrepareRefusal::Unresponsive { reason } => AgentError::VmMonitorUnresponsive {
                    name,
                    qmp: src.uri.clone(),
                    reason,
                },
            });
        }
        Ok(vmr_core::LibvirtPrepare::StartPaused) => None,
        Ok(vmr_core::LibvirtPrepare::ShutDownThenStartPaused) => {
            let limit = shutdown.unwrap_or(Duration::from_secs(120));
            match crate::lvprepare::shut_down(src, limit).await {
                Ok(how) => Some(how),
                Err(e) => {
                    side.resume_after_stop(vm);
                    return Err(e);
                }
            }
        }
    };
    if let Err(e) = crate::lvprepare::start_paused(src).await {
        side.resume_after_stop(vm);
        return Err(e);
    }
    let id = side.prepare_failover(vm, None).await;
    // the paused domain goes again whatever the cycle did (the guest never ran)
    let off = crate::lvprepare::power_off(src).await;
    let id = match id {
        Ok(id) => id,
        Err(AgentError::FinalCycleFailed { reason })
            if side.state() == ReplicationState::WaitingForStartResynchronize =>
        {
            return Err(AgentError::FinalCycleNeedsResync { name, reason });
        }
        Err(e) => return Err(e),
    };
    off?;
    let how = match how {
        None => "it was shut off".to_owned(),
        Some(crate::lvprepare::ShutOff::Clean { waited_ms }) => {
            format!("the guest shut down (ACPI) in {} s", waited_ms / 1000)
        }
        Some(crate::lvprepare::ShutOff::Destroyed { waited_ms }) => format!(
            "the guest ignored the ACPI shutdown for {} s, so the domain was destroyed (powered off)",
            waited_ms / 1000
        ),
    };
    let mut r = result(
        &name,
        ReplicationState::PreparedForFailover,
        None,
        t0,
        format!(
            "final cycle {id} shipped from the shut-off domain {}'s disks ({how}; taken with \
             the domain started paused, the guest never ran) and acknowledged; {name:?} is \
             PreparedForFailover (do not start the domain here); run `vmreplica failover start \
             {name}` on the replica",
            src.domain
        ),
    );
    r.point = Some(id);
    Ok(r)
}

/// What the VM's monitor shows, for [`prepare_source`]: a real VM's `query-status`; a
/// stand-in has no guest (no `query-status`: its writers are the admin's to stop); nothing
/// listening means the process exited.
async fn probe_vm(rec: &VmRecord) -> VmProbe {
    if rec.qmp.is_empty() || !Path::new(&rec.qmp).exists() {
        return VmProbe::NoListener;
    }
    let ep = Endpoint::Unix(rec.qmp.clone().into());
    let mut q = match QmpClient::connect(&ep, Duration::from_secs(5)).await {
        Ok(q) => q,
        Err(QmpError::Connect { source, .. })
            if matches!(
                source.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
            ) =>
        {
            return VmProbe::NoListener;
        }
        Err(e) => {
            return VmProbe::Unresponsive {
                reason: crate::util::chain(&e),
            };
        }
    };
    match q.execute_value("query-status", None).await {
        Ok(v) => VmProbe::Status {
            running: v.get("running").and_then(Value::as_bool) == Some(true),
            status: v
                .get("status")
                .and_then(Value::as_str)
                .unwrap_or("unknown")
                .to_owned(),
        },
        Err(QmpError::Command { class, .. }) if class == "CommandNotFound" => VmProbe::NoGuest,
        Err(e) => VmProbe::Unresponsive {
            reason: format!("query-status: {}", crate::util::chain(&e)),
        },
    }
}

// ------------------------------------------------------------------ reverse

/// `reverse` on the failed-over side.
pub async fn reverse(
    vm: &mut Vm,
    side: &ReplicaSide,
    replica: Option<String>,
    replica_fingerprint: Option<String>,
    frequency_secs: Option<u64>,
    follow: bool,
) -> Result<(FailoverResult, vmr_core::PrimaryMachine), AgentError> {
    let t0 = Instant::now();
    if follow && (replica.is_none() || replica_fingerprint.is_none()) {
        return Err(AgentError::FollowNeedsReplica);
    }
    let mut rec = replica_record(vm)?;
    let name = rec.name.clone();
    let name = name.as_str();
    side.machine()
        .check_reverse()
        .map_err(AgentError::Refused)?;
    let frequency_given = frequency_secs;
    let frequency_secs = frequency_secs.unwrap_or(300);
    let mut fr = vm.failover()?;
    let live = fr.live.clone().ok_or_else(|| AgentError::NoFailedOverVm {
        name: name.to_owned(),
    })?;
    if !running(vm, &live) {
        return Err(AgentError::FailedOverNotRunning {
            name: name.to_owned(),
        });
    }
    // A domain failed over through libvirt is captured through libvirt (backup jobs of the
    // failed-over domain, like any libvirt VM); otherwise through the QEMU this agent started.
    let lv_source = live
        .libvirt
        .as_ref()
        .map(|d| vmr_proto::vmdef::LibvirtSource {
            uri: d.uri.clone(),
            domain: d.domain.clone(),
            acked_checkpoint: None,
            acked_checkpoint_xml: None,
        });
    let qmp = match &lv_source {
        Some(_) => String::new(),
        None => live
            .qmp
            .clone()
            .ok_or_else(|| AgentError::FailedOverNotRunning {
                name: name.to_owned(),
            })?,
    };
    let addr = replica
        .or(fr.primary_listen.clone())
        .ok_or(AgentError::OldPrimaryAddressUnknown)?;
    let fp = match replica_fingerprint {
        Some(f) => f,
        None => vm
            .host
            .allowed()
            .into_iter()
            .find(|e| e.primary == rec.primary)
            .map(|e| e.fingerprint)
            .ok_or(AgentError::OldPrimaryFingerprintUnknown)?,
    };
    // Extended replication A → B → C, the VM failed over here on B: reversing to the
    // extended replica turns the outgoing relationship into this primary's (no
    // become-replica: C is a replica already; it drops what it had from here after the point).
    let takeover = rec
        .extended
        .as_ref()
        .filter(|x| x.args.replica_fingerprint == fp)
        .map(|x| x.args.clone());
    let way =
        vmr_core::follow::reverse_way(takeover.is_some(), follow).map_err(AgentError::Refused)?;
    let frequency_secs = match &takeover {
        Some(x) if frequency_given.is_none() => x.frequency_secs,
        _ => frequency_secs,
    };
    // The retention policy the admin gave this relationship, as this replica's store holds it
    // (the primary sent it at enable or `set`): the reversed relationship keeps it. The
    // bandwidth schedule is not kept: this host never learned the old primary's, and it
    // limited the other direction (docs/bandwidth.md).
    let policy = vm
        .host
        .store_of(&rec)
        .ok()
        .and_then(|s| s.retention_inputs(rec.uuid).ok())
        .map(|(_, p)| p)
        .unwrap_or_default();
    let args = EnableArgs {
        name: rec.name.clone(),
        replica: addr.clone(),
        replica_fingerprint: fp.clone(),
        frequency_secs,
        recovery_points: takeover
            .as_ref()
            .map_or(policy.hourly, |x| x.recovery_points),
        app_consistent_every_hours: 0,
        exclude_disks: vec![],
        compression: true,
        initial_at_ms: None,
        auto_resync: None,
        initial: Default::default(),
        rpo_alert_secs: None,
        verify_every_secs: None,
        retain: match &takeover {
            Some(x) => x.retain.clone(),
            None => policy.grid.clone(),
        },
        bandwidth: None,
        auto_failover: None,
    };
    let schedule = crate::primary::schedule_of(&args)?;
    let store = vm.host.store_of(&rec)?;
    let point = store
        .points(rec.uuid)?
        .into_iter()
        .find(|p| p.id == live.point)
        .ok_or(AgentError::FailoverPointGone { point: live.point })?;
    // The new definition: same VM, its disks are now the failover overlays.
    let mut def = VmDefinition::from_toml(&store.definition(rec.uuid)?)
        .map_err(AgentError::ReplicatedDefinition)?;
    for d in &mut def.disks {
        if let Some((_, p)) = live.disks.iter().find(|(n, _)| n == &d.node) {
            d.path = p.clone();
        }
    }
    let req = BecomeReplica {
        uuid: rec.uuid,
        point: live.point,
        taken_at_ms: point.taken_at_ms,
        launch_toml: def.to_toml(),
        disks: point
            .disks
            .iter()
            .map(|(id, size)| vmr_proto::DiskInfo {
                id: id.clone(),
                size: *size,
            })
            .collect(),
    };
    let client = Client::connect(
        &addr,
        &vm.host.identity,
        &fp,
        crate::config::client_options(&vm.host.config),
    )
    .await
    .map_err(|source| AgentError::ConnectOldPrimary {
        addr: addr.clone(),
        source,
    })?;
    let mut start_at = live.point;
    let mut followed = None;
    let (resync, discarded) = if way == vmr_core::follow::ReverseWay::Follow {
        // A sibling replica (fan-out): its ids are another relationship's, so it keeps its
        // newest point and this VM is resynchronised against it.
        let c = client.follow(rec.uuid).await.map_err(AgentError::Follow)?;
        tracing::info!(vm = %name, failover_point = live.point, kept = c.latest, "the sibling replica follows this failover; resync against its newest point");
        let (at, resync) = vmr_core::follow::follow_start(c.latest);
        start_at = at;
        followed = Some(c.latest);
        (resync, None)
    } else if takeover.is_some() {
        let c = client
            .continue_from(rec.uuid, live.point)
            .await
            .map_err(AgentError::BecomeReplica)?;
        tracing::info!(vm = %name, point = live.point, latest = c.latest, resync = c.resync, discarded = ?c.discarded, "the extended replica continues from this failover");
        (c.resync, Some(c.discarded))
    } else {
        let answer = client
            .become_replica(req)
            .await
            .map_err(AgentError::BecomeReplica)?;
        (answer.resync, None)
    };
    let sizes: Vec<u64> = point.disks.iter().map(|(_, s)| *s).collect();
    // Reversing to another host than the extended replica (to A): the outgoing relationship's
    // source was this store's points, and the VM runs here now. It continues from the failover
    // point as the VM's second relationship (fan-out) when it can, else it ends; the message
    // says which (vmr_core::onward).
    let (onward, ended) = match (&takeover, &rec.extended) {
        (None, Some(x)) => {
            let newest = store.points(rec.uuid)?.last().map_or(live.point, |p| p.id);
            let (f, m) = extended_onward(
                &vm.host,
                rec.uuid,
                x,
                &live,
                newest,
                &sizes,
                lv_source.is_some(),
            )
            .await;
            tracing::info!(vm = %name, continues = f.is_some(), "reverse{m}");
            (f, Some(m))
        }
        _ => (None, None),
    };
    // After an unplanned failover the old primary's disks differ from the point; a domain
    // failed over through libvirt has no checkpoint yet (~820 MiB shipped for the real test
    // guest after a planned failover, before this was a resync).
    let resync = vmr_core::reverse_resyncs(resync, lv_source.is_none());
    let machine = side
        .machine()
        .reverse(now_ms(), schedule, start_at, sizes.clone(), resync)
        .map_err(AgentError::Refused)?;
    rec.qga = match &lv_source {
        Some(_) => None,
        None => crate::launch::qga_socket(&def, Path::new(&qmp)).map(|p| p.display().to_string()),
    };
    rec.qmp = qmp;
    // no checkpoint yet: the first reverse cycle is a resync (a full backup job of the
    // domain compared block by block with the old primary's point: resync.rs, only the
    // differing blocks shipped), then the chain continues
    rec.libvirt = lv_source;
    rec.nbd = None;
    rec.launch_toml = def.to_toml();
    rec.disks = point.disks.iter().map(|(d, _)| d.clone()).collect();
    rec.enable = Some(args);
    rec.primary = vm.host.config.name.clone();
    rec.trust_group = None;
    // The outgoing relationship is this primary's relationship now (the first one when the
    // reverse went to the extended replica, else a further one or none).
    rec.extended = None;
    if let Some(f) = onward {
        rec.fanout.retain(|g| g.slot != f.slot);
        rec.fanout.push(f);
    }
    vm.rec = rec;
    crate::primary::save_snapshot(vm, machine.snapshot())?;
    fr.before = None;
    vm.save_failover(&fr)?;
    if live.extended_tracking && !vm.rec.fanout.iter().any(|f| f.slot == ONWARD_SLOT) {
        // The bitmap started for the extended replica tracks for no relationship.
        match crate::cycle::stop_tracking(&vm.host, &vm.rec, ONWARD_SLOT).await {
            Ok(()) => tracing::info!(vm = %name, "removed the extended replica's tracking bitmap"),
            Err(e) => {
                tracing::warn!(vm = %name, "removing the extended replica's tracking bitmap: {}", crate::util::chain(&e));
            }
        }
    }
    let state = machine.state();
    Ok((
        result(
            name,
            state,
            Some(&live),
            t0,
            format!(
                "replication reversed: {name:?} now replicates from here to {addr} every \
             {frequency_secs} s, starting after point {}{}",
                live.point,
                match (&discarded, resync) {
                    _ if followed.is_some() => format!(
                        "; the sibling replica follows: it keeps its newest point {} and is \
                         resynchronised against it first (only differing blocks)",
                        followed.unwrap_or_default()
                    ),
                    (Some(d), false) => format!(
                        "; the extended replica continues from that point (it dropped the later \
                         points {d:?})"
                    ),
                    (Some(d), true) => format!(
                        "; the extended replica did not hold that point: it is resynchronised \
                         first (only differing blocks; it dropped the later points {d:?})"
                    ),
                    (None, true) => "; the old primary's disks are resynchronised first (only \
                                     differing blocks)"
                        .to_owned(),
                    (None, false) => String::new(),
                } + ended.as_deref().unwrap_or_default()
            ),
        ),
        machine,
    ))
}

/// The fan-out slot of the relationship that continues the extended relationship after
/// `reverse` to the old primary (the VM's first further relationship: a replica has none). Its
/// tracking bitmap (`vmr-<tag>r1-1`) is started with the VM at `failover start`.
pub const ONWARD_SLOT: u32 = 1;

/// `reverse` to another host than the extended replica C: what becomes of the extended
/// relationship `x` (vmr_core::onward's decision, carried out): the fan-out relationship that
/// continues it from the failover point (C's point ids going on from there; C told to
/// `continue-from` that point first when it may not hold exactly it), or none; and the
/// sentence `reverse` adds to its message.
async fn extended_onward(
    host: &Host,
    uuid: uuid::Uuid,
    x: &vmr_proto::record::ExtendedRecord,
    live: &FailoverVm,
    newest: u64,
    sizes: &[u64],
    libvirt: bool,
) -> (Option<vmr_proto::record::FanoutRecord>, String) {
    let c = &x.args.replica;
    let ended = |why: String| {
        (
            None,
            format!(
                "; the extended replication to {c} ended ({why}; it keeps its points, the \
                 newest {}; enable replication to it anew from here)",
                x.machine
                    .acked
                    .map_or_else(|| "none".to_owned(), |p| p.to_string())
            ),
        )
    };
    let facts = vmr_core::OnwardFacts {
        to_extended_replica: false,
        state: x.machine.state,
        acked: x.machine.acked,
        point: live.point,
        newest: newest.max(live.point),
        tracked: live.extended_tracking,
        libvirt,
    };
    let (paused, resync, told) = match vmr_core::onward(facts) {
        vmr_core::Onward::TakenOver => return (None, String::new()),
        vmr_core::Onward::End(why) => return ended(why.to_string()),
        vmr_core::Onward::Continue { resync, paused, .. } => (paused, resync, None),
        vmr_core::Onward::ContinueFrom { point, paused } => {
            let answer = async {
                let client = Client::connect(
                    c,
                    &host.identity,
                    &x.args.replica_fingerprint,
                    crate::config::client_options(&host.config),
                )
                .await?;
                client.continue_from(uuid, point).await
            }
            .await;
            match answer {
                Ok(a) => {
                    tracing::info!(%uuid, point, latest = a.latest, resync = a.resync, discarded = ?a.discarded, "the extended replica continues from the failover point as a further relationship");
                    let resync = vmr_core::reverse_resyncs(a.resync, live.extended_tracking);
                    (paused, resync, Some(a))
                }
                Err(e) => {
                    return ended(format!(
                        "it could not be told to continue from point {point}: {}",
                        crate::util::chain(&e)
                    ));
                }
            }
        }
    };
    let mut args = x.args.clone();
    args.initial_at_ms = None;
    args.auto_failover = None;
    let schedule = match crate::primary::schedule_of(&args) {
        Ok(s) => s,
        Err(e) => return ended(format!("its settings: {}", crate::util::chain(&e))),
    };
    let now = now_ms();
    let mut machine =
        vmr_core::PrimaryMachine::reversed(schedule, now, live.point, sizes.to_vec(), resync);
    if paused {
        // paused it was, paused it stays (`resume NAME --replica C` goes on)
        let _ = machine.step(vmr_core::Event::Pause { now_ms: now });
    }
    let how = match (&told, resync) {
        (Some(a), false) if !a.discarded.is_empty() => {
            format!(" (it dropped the later points {:?})", a.discarded)
        }
        (Some(a), true) if a.resync => format!(
            " (it did not hold that point: resynchronised first from its point {}, only \
             differing blocks; it dropped the later points {:?})",
            a.latest, a.discarded
        ),
        (_, true) => " (resynchronised first: nothing tracked the VM's writes for it; only \
                      differing blocks)"
            .to_owned(),
        _ => String::new(),
    };
    (
        Some(vmr_proto::record::FanoutRecord {
            args,
            machine: machine.snapshot(),
            slot: ONWARD_SLOT,
        }),
        format!(
            "; the extended replication to {c} continues from point {} as a further \
             relationship (fan-out 2, every {} s, its point ids going on){how}{}",
            live.point,
            x.args.frequency_secs,
            if paused { "; paused, as it was" } else { "" }
        ),
    )
}

/// Agent-to-agent `become-replica` on the old primary (reverse after a planned failover): the
/// prepared VM's own disks become the first recovery point of a new replica VM, nothing is
/// copied. `side`: the VM's primary side (stopped here; the caller drops it on success).
pub async fn become_replica(
    vm: &mut Vm,
    side: Option<&mut PrimarySide>,
    peer: &Peer,
    req: BecomeReplica,
) -> Result<(BecameReplica, vmr_core::ReplicaMachine), RemoteError> {
    let internal = |e: BecomeError| RemoteError::Internal {
        message: crate::util::chain(&e),
    };
    let bad = |m: String| RemoteError::BadRequest { message: m };
    let rec = vm.rec.clone();
    let args = rec
        .enable
        .clone()
        .ok_or_else(|| bad("replication is not enabled".into()))?;
    if rec.mode() != ReplicationMode::Primary || args.replica_fingerprint != peer.fingerprint {
        return Err(bad(format!(
            "{} is not replicating to {} from this host",
            rec.name, peer.name
        )));
    }
    let Some(side) = side else {
        return Err(bad("replication is not enabled".into()));
    };
    // What this host's store holds of the VM decides how the point is taken in (fresh
    // import of the own images, or re-adopting the failover view the disks here are): the
    // machine decides from these facts.
    let entry = vm
        .host
        .allow_entry(&peer.fingerprint)
        .ok_or(BecomeError::NotAuthorized)
        .map_err(internal)?;
    let store = vm
        .host
        .store(Path::new(&entry.storage))
        .map_err(|e| internal(e.into()))?;
    let fr = vm.failover().map_err(|e| internal(BecomeError::Agent(e)))?;
    let local = local_copy(&store, &rec, &fr).map_err(|e| internal(e.into()))?;
    // Planned: both sides hold exactly the final cycle. Otherwise (unplanned failover, or a
    // failover to an older point) this host's disks differ: the new primary resynchronises
    // them (only differing blocks travel; this host's writes after the cut are overwritten).
    let handover = side
        .machine()
        .become_replica(now_ms(), req.point, local)
        .map_err(|r| bad(r.to_string()))?;
    let planned = handover.planned;
    // A libvirt domain here: libvirt says whether it still runs.
    if !planned && rec.libvirt.is_some() && vm_runs(&rec, ReplicationState::Replicating).await {
        return Err(bad(format!(
            "the old primary's libvirt domain of {:?} still runs here; shut it down first: its \
             writes after the failover are discarded by the reverse resync",
            rec.name
        )));
    }
    let ep = Endpoint::Unix(rec.qmp.clone().into());
    // A VM automatic failover fenced here is paused (or gone): it is ended below, its writes
    // after the cut discarded by the resync like any old primary's.
    let fenced = rec.lease.fenced.is_some();
    if !planned
        && !fenced
        && !matches!(
            QmpClient::connect(&ep, Duration::from_secs(3)).await,
            Err(QmpError::Connect { .. })
        )
    {
        return Err(bad(format!(
            "the old primary's VM {:?} still runs here ({}); shut it down first: its writes \
             after the failover are discarded by the reverse resync",
            rec.name, rec.qmp
        )));
    }
    // Stop the cycles and the (shut down) VM process: its images become the replica's.
    side.stop().await;
    let became = async {
        match fr.live.as_ref().filter(|f| f.pid.is_some()) {
            // A VM this agent started (failed over here earlier): quit and reaped.
            Some(live) => kill_vm(vm, live).await?,
            None => {
                if let Ok(mut q) = QmpClient::connect(&ep, Duration::from_secs(3)).await {
                    let _ = q.execute_value("quit", None).await;
                    let deadline = Instant::now() + Duration::from_secs(10);
                    while QmpClient::connect(&ep, Duration::from_millis(300))
                        .await
                        .is_ok()
                        && Instant::now() < deadline
                    {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
        match handover.adoption {
            Adoption::Import => {
                let old =
                    VmDefinition::from_toml(&rec.launch_toml).map_err(AgentError::Definition)?;
                let mut disks = Vec::new();
                for d in &req.disks {
                    let img = old.disks.iter().find(|x| x.node == d.id).ok_or_else(|| {
                        BecomeError::DiskNotInOldDefinition { disk: d.id.clone() }
                    })?;
                    disks.push((d.id.clone(), PathBuf::from(&img.path), d.size));
                }
                store
                    .add_vm(req.uuid, &req.launch_toml, RetentionPolicy::default())
                    .map_err(AgentError::Store)?;
                store
                    .import_point(req.uuid, req.point, req.taken_at_ms, &disks)
                    .await
                    .map_err(AgentError::Store)?;
            }
            Adoption::Readopt { .. } => {
                let live = fr.live.as_ref().ok_or(BecomeError::NoFailoverView)?;
                store
                    .readopt_view(
                        req.uuid,
                        live.view,
                        req.point,
                        req.taken_at_ms,
                        RetentionPolicy::default(),
                    )
                    .await
                    .map_err(AgentError::Store)?;
                store
                    .set_definition(req.uuid, &req.launch_toml)
                    .map_err(AgentError::Store)?;
            }
            Adoption::Kept => {
                store
                    .set_definition(req.uuid, &req.launch_toml)
                    .map_err(AgentError::Store)?;
            }
        }
        // The failed-over VM of earlier is gone: its bookkeeping and directory too.
        if let Some(live) = &fr.live {
            if let Some(dir) = live.disks.first().and_then(|(_, p)| Path::new(p).parent()) {
                let _ = std::fs::remove_dir_all(dir);
            }
            let mut fr = fr.clone();
            fr.live = None;
            fr.before = None;
            fr.planned = false;
            vm.save_failover(&fr)?;
        }
        let new = VmRecord {
            name: rec.name.clone(),
            uuid: rec.uuid,
            qmp: String::new(),
            launch_toml: req.launch_toml.clone(),
            disks: req.disks.iter().map(|d| d.id.clone()).collect(),
            enable: None,
            primary: peer.name.clone(),
            trust_group: peer.trust_group.clone(),
            frequency_secs: None,
            nbd: None,
            qga: None,
            failover: rec.failover.clone(),
            machine: MachineSnapshot::Replica(handover.replica.snapshot()),
            rpo_alert_secs: rec.rpo_alert_secs,
            extended: None,
            group: None,
            libvirt: None,
            fanout: Vec::new(),
            auto_failover: None,
            lease: Default::default(),
        };
        vm.rec = new;
        vm.save()?;
        Ok::<_, BecomeError>(())
    }
    .await;
    became.map_err(internal)?;
    tracing::info!(vm = %rec.name, new_primary = %peer.name, point = req.point, planned, adoption = ?handover.adoption, "reverse: this host is now the replica");
    Ok((
        BecameReplica {
            state: handover.replica.state(),
            point: req.point,
            resync: !planned,
        },
        handover.replica,
    ))
}

/// The guest agent socket of the live failed-over VM, when its definition has a guest agent
/// channel (`{qga}`) and the VM was started.
pub fn live_qga(vm: &Vm) -> Option<PathBuf> {
    let fr = vm.failover().ok()?;
    fr.live?.qmp.as_ref()?;
    // Set by `start` for the VM it started (`launch::qga_socket`).
    vm.rec.qga.as_ref().map(PathBuf::from)
}
