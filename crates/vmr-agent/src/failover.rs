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

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use vmr_capture::qmp::{QmpClient, QmpError};
use vmr_capture::{Endpoint, Names};
use vmr_core::{FailoverOp, failover_transition};
use vmr_proto::VmDefinition;
use vmr_proto::api::{
    BecomeReplica, EnableArgs, FailoverRecord, FailoverResult, FailoverVm, ReplicationMode,
    ReplicationState, ReplicationStats, Request, VmRecord,
};
use vmr_proto::wire::RemoteError;
use vmr_store::RetentionPolicy;
use vmr_transport::{Client, Peer};

use super::Agent;
use crate::exit;
use crate::util::{coded, now_ms};

/// VM processes started by this agent, by pid (reaped when ended).
static CHILDREN: Mutex<BTreeMap<u32, Child>> = Mutex::new(BTreeMap::new());

/// How long a started VM's QMP socket may take to answer.
const QMP_START_TIMEOUT: Duration = Duration::from_secs(30);

fn record_path(agent: &Agent, vm: uuid::Uuid) -> PathBuf {
    agent.dir.join("failover").join(format!("{vm}.json"))
}

/// The failover bookkeeping of a VM (empty when none).
pub fn load(agent: &Agent, vm: uuid::Uuid) -> anyhow::Result<FailoverRecord> {
    let p = record_path(agent, vm);
    match std::fs::read(&p) {
        Ok(b) => serde_json::from_slice(&b).with_context(|| format!("reading {}", p.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(FailoverRecord {
            vm,
            ..Default::default()
        }),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

fn save(agent: &Agent, fr: &FailoverRecord) -> anyhow::Result<()> {
    let p = record_path(agent, fr.vm);
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d)?;
    }
    let tmp = p.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(fr)?)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, &p).with_context(|| format!("writing {}", p.display()))?;
    Ok(())
}

/// Remember the primary agent's listener (reported with each `replica-info` call).
pub fn remember_primary(agent: &Agent, vm: uuid::Uuid, listen: &str) {
    let r = (|| -> anyhow::Result<()> {
        let mut fr = load(agent, vm)?;
        if fr.primary_listen.as_deref() != Some(listen) {
            fr.primary_listen = Some(listen.to_owned());
            save(agent, &fr)?;
        }
        Ok(())
    })();
    if let Err(e) = r {
        tracing::warn!(%vm, "cannot record the primary's address: {e:#}");
    }
}

/// Dispatch a failover control request.
pub async fn handle(agent: &Arc<Agent>, req: Request) -> anyhow::Result<Value> {
    let r = match req {
        Request::FailoverPrepare { name } => prepare(agent, &name).await?,
        Request::FailoverStart {
            name,
            point,
            no_start,
            force,
        } => start(agent, &name, point, no_start, force, false).await?,
        Request::FailoverTest { name, point } => {
            start(agent, &name, point, false, true, true).await?
        }
        Request::FailoverStopTest { name, test_id } => stop_test(agent, &name, test_id).await?,
        Request::FailoverCancel { name } => cancel(agent, &name).await?,
        Request::FailoverComplete { name } => complete(agent, &name).await?,
        Request::Reverse {
            name,
            replica,
            replica_fingerprint,
            frequency_secs,
        } => reverse(agent, &name, replica, replica_fingerprint, frequency_secs).await?,
        other => bail!("not a failover request: {other:?}"),
    };
    Ok(serde_json::to_value(r)?)
}

fn record(agent: &Agent, name: &str) -> anyhow::Result<VmRecord> {
    agent.vm_record(name)?.ok_or_else(|| {
        coded(
            exit::NOT_FOUND,
            format!("unknown VM {name:?} (see `vmreplica vm list`)"),
        )
    })
}

fn refused(e: impl std::fmt::Display) -> anyhow::Error {
    coded(exit::INVALID_STATE, e.to_string())
}

// ------------------------------------------------------------------ processes

fn proc_matches(pid: u32, qmp: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(qmp))
        .unwrap_or(false)
}

/// Is the VM process started for `f` alive?
fn running(f: &FailoverVm) -> bool {
    let (Some(pid), Some(qmp)) = (f.pid, f.qmp.as_deref()) else {
        return false;
    };
    let mut kids = CHILDREN.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(c) = kids.get_mut(&pid) {
        return matches!(c.try_wait(), Ok(None));
    }
    proc_matches(pid, qmp)
}

/// End the VM process of `f` (QMP `quit`, then SIGKILL) and wait for it.
async fn kill_vm(f: &FailoverVm) {
    let (Some(pid), Some(qmp)) = (f.pid, f.qmp.clone()) else {
        return;
    };
    if let Ok(mut q) =
        QmpClient::connect(&Endpoint::Unix(qmp.clone().into()), Duration::from_secs(3)).await
    {
        let _ = q.execute_value("quit", None).await;
    }
    let child = CHILDREN
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&pid);
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
            if proc_matches(pid, &qmp) {
                let _ = std::process::Command::new("kill")
                    .args(["-9", &pid.to_string()])
                    .status();
            }
        }
    }
    let _ = std::fs::remove_file(&qmp);
}

/// Start the definition's QEMU program on `disks`; returns (pid, qmp path) once QMP answers,
/// with change tracking (`vmr-<tag>-1` on every disk) added before the guest runs unless
/// `test`.
async fn launch_vm(
    agent: &Agent,
    def: &VmDefinition,
    disks: &[(String, PathBuf)],
    dest: &Path,
    test: bool,
) -> anyhow::Result<(u32, PathBuf)> {
    let qmp = dest.join("qmp.sock");
    let nbd = if test {
        dest.join("nbd.sock")
    } else {
        crate::launch::nbd_socket(&agent.dir, def.uuid)
    };
    for s in [&qmp, &nbd] {
        let _ = std::fs::remove_file(s);
    }
    let mut cmd = crate::launch::command(
        def,
        &|n| {
            disks
                .iter()
                .find(|(d, _)| d == n)
                .map(|(_, p)| p.display().to_string())
        },
        &qmp,
        &nbd,
        test,
        &dest.join("vm.log"),
    )
    .context("building the VM command from the replicated definition")?;
    // A real VM starts paused so that tracking exists before the guest's first write.
    let paused = def.program.contains("qemu-system");
    if paused {
        cmd.arg("-S");
    }
    // Its own process group: a signal to the agent does not reach the VM.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", def.program))?;
    let pid = child.id();
    let started = async {
        let deadline = Instant::now() + QMP_START_TIMEOUT;
        let mut q = loop {
            if let Ok(Some(st)) = child.try_wait() {
                let log = std::fs::read_to_string(dest.join("vm.log")).unwrap_or_default();
                bail!("{} exited ({st}) at start:\n{}", def.program, log.trim());
            }
            if qmp.exists()
                && let Ok(q) =
                    QmpClient::connect(&Endpoint::Unix(qmp.clone()), Duration::from_secs(5)).await
            {
                break q;
            }
            if Instant::now() > deadline {
                bail!("the VM's QMP socket {} did not answer", qmp.display());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        if !test {
            let names = Names::new(&crate::launch::tag(def.uuid))?;
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
                        .with_context(|| format!("starting change tracking on {node}"))?;
                }
            }
        }
        if paused {
            q.execute_value("cont", None)
                .await
                .context("resuming the VM")?;
        }
        Ok(())
    }
    .await;
    if let Err(e) = started {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e);
    }
    CHILDREN
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(pid, child);
    Ok((pid, qmp))
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
    }
}

fn replica_record(agent: &Agent, name: &str) -> anyhow::Result<VmRecord> {
    let rec = record(agent, name)?;
    if rec.mode != ReplicationMode::Replica {
        return Err(refused(format!(
            "{name:?} is a primary VM on this host; run this on its replica"
        )));
    }
    Ok(rec)
}

/// `failover start` (live) and `failover test`.
async fn start(
    agent: &Arc<Agent>,
    name: &str,
    point: Option<u64>,
    no_start: bool,
    force: bool,
    test: bool,
) -> anyhow::Result<FailoverResult> {
    let t0 = Instant::now();
    let mut rec = replica_record(agent, name)?;
    let store = super::replica::store_of(agent, &rec)?;
    let has_point = store.latest_point(rec.uuid)?.is_some();
    let op = if test {
        FailoverOp::Test
    } else {
        FailoverOp::Start
    };
    let next =
        failover_transition(ReplicationMode::Replica, rec.state, op, has_point).map_err(refused)?;
    let mut fr = load(agent, rec.uuid)?;
    if !test && !force {
        split_brain_guard(agent, &rec, &fr).await?;
    }
    let before = rec.state;
    if !test {
        // From now on cycles from the old primary are refused.
        rec.state = next;
        agent.db().put_vm(&rec)?;
    }
    let made = async {
        let slot = if test {
            format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
        } else {
            "live".to_owned()
        };
        let dest = agent
            .dir
            .join("fo")
            .join(crate::launch::tag(rec.uuid))
            .join(slot);
        if dest.exists() {
            std::fs::remove_dir_all(&dest)?;
        }
        let view = store
            .create_view(rec.uuid, point, &dest)
            .await
            .context("creating the failover overlays")?;
        let mut def = VmDefinition::from_toml(&store.definition(rec.uuid)?)
            .context("the replicated VM definition is invalid")?;
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
        };
        if !no_start {
            match launch_vm(agent, &def, &view.disks, &dest, test).await {
                Ok((pid, qmp)) => {
                    f.pid = Some(pid);
                    f.qmp = Some(qmp.display().to_string());
                }
                Err(e) => {
                    let _ = store.remove_view(rec.uuid, view.id);
                    return Err(e);
                }
            }
        }
        anyhow::Ok(f)
    }
    .await;
    let f = match made {
        Ok(f) => f,
        Err(e) => {
            if !test {
                rec.state = before;
                agent.db().put_vm(&rec)?;
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
        fr.before = Some(before);
        fr.live = Some(f.clone());
        fr.planned = planned;
        if let Some(q) = &f.qmp {
            rec.qmp = q.clone();
            agent.db().put_vm(&rec)?;
        }
    }
    save(agent, &fr)?;
    let what = match (test, no_start) {
        (true, _) => format!("test copy {:?} started", f.name),
        (false, true) => "disks prepared (not started)".to_owned(),
        (false, false) => format!("VM {:?} started", f.name),
    };
    let msg = format!(
        "{what} from recovery point {}{}; state {}",
        f.point,
        if planned && !test { " (planned)" } else { "" },
        rec.state
    );
    tracing::info!(vm = %name, point = f.point, test, "failover: {msg}");
    Ok(result(name, rec.state, Some(&f), t0, msg))
}

/// Refuse an unplanned failover while the primary answers and its VM runs.
async fn split_brain_guard(
    agent: &Agent,
    rec: &VmRecord,
    fr: &FailoverRecord,
) -> anyhow::Result<()> {
    let Some(addr) = fr.primary_listen.clone() else {
        tracing::warn!(vm = %rec.name, "the primary's address is unknown; split-brain check skipped");
        return Ok(());
    };
    let fp = agent
        .db()
        .allowed()?
        .into_iter()
        .find(|e| e.primary == rec.primary)
        .map(|e| e.fingerprint);
    let Some(fp) = fp else {
        return Ok(());
    };
    let probe = async {
        let c = Client::connect(&addr, &agent.identity, &fp, Default::default()).await?;
        c.call("primary-vm-state", &json!({ "uuid": rec.uuid }))
            .await
    };
    match tokio::time::timeout(Duration::from_secs(5), probe).await {
        Ok(Ok(v)) => {
            if v.get("running").and_then(Value::as_bool).unwrap_or(true) {
                return Err(refused(format!(
                    "the primary {} ({addr}) still answers and its VM {:?} runs ({}); shut it \
                     down (or `failover prepare` it) first, or pass --force",
                    rec.primary,
                    rec.name,
                    v.get("state").and_then(Value::as_str).unwrap_or("?")
                )));
            }
            Ok(())
        }
        Ok(Err(e)) if !e.is_retryable() => Err(refused(format!(
            "the primary {} ({addr}) answers but the VM's state cannot be checked ({}); pass \
             --force to fail over anyway",
            rec.primary,
            crate::util::chain(&e)
        ))),
        // Unreachable or timed out: the primary is lost.
        _ => Ok(()),
    }
}

async fn stop_test(
    agent: &Arc<Agent>,
    name: &str,
    test_id: Option<uuid::Uuid>,
) -> anyhow::Result<FailoverResult> {
    let t0 = Instant::now();
    let rec = replica_record(agent, name)?;
    let store = super::replica::store_of(agent, &rec)?;
    let mut fr = load(agent, rec.uuid)?;
    let (gone, keep): (Vec<_>, Vec<_>) = fr
        .tests
        .drain(..)
        .partition(|t| test_id.is_none_or(|id| id == t.view));
    if gone.is_empty() {
        return Err(coded(
            exit::NOT_FOUND,
            format!(
                "{name:?} has no test failover copy{}",
                match test_id {
                    Some(id) => format!(" {id}"),
                    None => String::new(),
                }
            ),
        ));
    }
    fr.tests = keep;
    for t in &gone {
        kill_vm(t).await;
        store.remove_view(rec.uuid, t.view)?;
        if let Some(dir) = t.disks.first().and_then(|(_, p)| Path::new(p).parent()) {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    save(agent, &fr)?;
    Ok(result(
        name,
        rec.state,
        gone.first(),
        t0,
        format!(
            "{} test cop{} removed",
            gone.len(),
            if gone.len() == 1 { "y" } else { "ies" }
        ),
    ))
}

async fn cancel(agent: &Arc<Agent>, name: &str) -> anyhow::Result<FailoverResult> {
    let t0 = Instant::now();
    let mut rec = replica_record(agent, name)?;
    let next = failover_transition(
        ReplicationMode::Replica,
        rec.state,
        FailoverOp::Cancel,
        true,
    )
    .map_err(refused)?;
    let store = super::replica::store_of(agent, &rec)?;
    let mut fr = load(agent, rec.uuid)?;
    if let Some(live) = fr.live.take() {
        kill_vm(&live).await;
        match store.remove_view(rec.uuid, live.view) {
            Ok(()) | Err(vmr_store::StoreError::NoSuchView(_)) => {}
            Err(e) => return Err(e.into()),
        }
        if let Some(dir) = live.disks.first().and_then(|(_, p)| Path::new(p).parent()) {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    rec.state = match fr.before.take() {
        Some(ReplicationState::Suspended) => ReplicationState::Suspended,
        _ => next,
    };
    rec.qmp = String::new();
    fr.planned = false;
    save(agent, &fr)?;
    agent.db().put_vm(&rec)?;
    Ok(result(
        name,
        rec.state,
        None,
        t0,
        format!(
            "failover cancelled: what the failed-over VM wrote is discarded; state {}",
            rec.state
        ),
    ))
}

async fn complete(agent: &Arc<Agent>, name: &str) -> anyhow::Result<FailoverResult> {
    let t0 = Instant::now();
    let mut rec = replica_record(agent, name)?;
    let next = failover_transition(
        ReplicationMode::Replica,
        rec.state,
        FailoverOp::Complete,
        true,
    )
    .map_err(refused)?;
    let store = super::replica::store_of(agent, &rec)?;
    let fr = load(agent, rec.uuid)?;
    let live = fr
        .live
        .clone()
        .ok_or_else(|| refused(format!("{name:?} has no failed-over VM")))?;
    if let Some(t) = fr.tests.iter().find(|t| t.point != live.point) {
        return Err(refused(format!(
            "test copy {} (point {}) pins another recovery point; `failover stop-test` it first",
            t.view, t.point
        )));
    }
    if running(&live) {
        store.discard_points_above(rec.uuid, live.point).await?;
    } else {
        store
            .discard_points_except(rec.uuid, Some(live.point))
            .await?;
    }
    rec.state = next;
    rec.last_cycle = Some(live.point);
    agent.db().put_vm(&rec)?;
    Ok(result(
        name,
        rec.state,
        Some(&live),
        t0,
        format!(
            "failover completed on point {}; the other recovery points are dropped",
            live.point
        ),
    ))
}

// ------------------------------------------------------------------ primary side

/// Is the primary VM running? `PreparedForFailover` counts as not running (locked); a QMP
/// monitor that does not answer as not running; QEMU's `query-status` decides otherwise; a
/// qemu-storage-daemon stand-in (no `query-status`) counts as running.
async fn vm_runs(rec: &VmRecord, state: ReplicationState) -> bool {
    if state == ReplicationState::PreparedForFailover || rec.qmp.is_empty() {
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

/// Agent-to-agent `primary-vm-state`: the split-brain probe of a replica.
pub async fn primary_vm_state(agent: &Arc<Agent>, uuid: uuid::Uuid) -> Result<Value, RemoteError> {
    let rec = agent
        .vm_by_uuid(uuid)
        .map_err(|e| RemoteError::Internal {
            message: e.to_string(),
        })?
        .ok_or(RemoteError::UnknownVm { vm: uuid })?;
    let state = current_state(agent, &rec);
    let running = rec.mode == ReplicationMode::Primary && vm_runs(&rec, state).await;
    Ok(json!({ "state": state, "running": running }))
}

fn current_state(agent: &Agent, rec: &VmRecord) -> ReplicationState {
    let vm = agent
        .primaries
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&rec.name)
        .cloned();
    vm.map_or(rec.state, |v| super::primary::state_of(&v))
}

/// `failover prepare`: the VM must be shut down; ship the final (planned) cycle; lock.
async fn prepare(agent: &Arc<Agent>, name: &str) -> anyhow::Result<FailoverResult> {
    let t0 = Instant::now();
    let rec = record(agent, name)?;
    let state = current_state(agent, &rec);
    failover_transition(rec.mode, state, FailoverOp::Prepare, true).map_err(refused)?;
    // The driver holds the VM's (single-client) QMP monitor: stop it first.
    let vm = super::primary::stop_driver(agent, name).await?;
    if let Err(e) = check_shut_down(&rec).await {
        super::primary::restart_driver(agent, &vm)?;
        return Err(e);
    }
    let id = super::primary::prepare_failover(agent, vm).await?;
    Ok(result(
        name,
        ReplicationState::PreparedForFailover,
        None,
        t0,
        format!(
            "final cycle {id} shipped and acknowledged; {name:?} is PreparedForFailover (do not \
             start it here); run `vmreplica failover start {name}` on the replica"
        ),
    ))
    .map(|mut r| {
        r.point = Some(id);
        r
    })
}

/// "Shut down": a real VM reports a non-running status (shutdown with -no-shutdown, or
/// paused); a stand-in has no guest (no query-status): its writers are the admin's to stop.
async fn check_shut_down(rec: &VmRecord) -> anyhow::Result<()> {
    let name = &rec.name;
    let ep = Endpoint::Unix(rec.qmp.clone().into());
    let mut q = QmpClient::connect(&ep, Duration::from_secs(5))
        .await
        .with_context(|| {
            format!(
                "the VM's QMP monitor {} must answer to ship the final cycle",
                rec.qmp
            )
        })?;
    match q.execute_value("query-status", None).await {
        Ok(v) if v.get("running").and_then(Value::as_bool) == Some(true) => {
            return Err(refused(format!(
                "{name:?} is running ({}); shut the guest down first (e.g. `system_powerdown` \
                 with QEMU's -no-shutdown, or `stop`)",
                v.get("status").and_then(Value::as_str).unwrap_or("running")
            )));
        }
        Ok(_) => {}
        Err(QmpError::Command { class, .. }) if class == "CommandNotFound" => {}
        Err(e) => return Err(e).context("querying the VM's status"),
    }
    Ok(())
}

// ------------------------------------------------------------------ reverse

/// `reverse` on the failed-over side.
async fn reverse(
    agent: &Arc<Agent>,
    name: &str,
    replica: Option<String>,
    replica_fingerprint: Option<String>,
    frequency_secs: Option<u64>,
) -> anyhow::Result<FailoverResult> {
    let t0 = Instant::now();
    let mut rec = replica_record(agent, name)?;
    failover_transition(
        ReplicationMode::Replica,
        rec.state,
        FailoverOp::Reverse,
        true,
    )
    .map_err(refused)?;
    let frequency_secs = frequency_secs.unwrap_or(300);
    if frequency_secs < 5 {
        return Err(coded(exit::USAGE, "frequency must be at least 5 s"));
    }
    let mut fr = load(agent, rec.uuid)?;
    let live = fr
        .live
        .clone()
        .ok_or_else(|| refused(format!("{name:?} has no failed-over VM")))?;
    let qmp = live.qmp.clone().filter(|_| running(&live)).ok_or_else(|| {
        refused(format!(
            "the failed-over VM {name:?} is not running; reverse needs it running with change \
             tracking (failover start without --no-start)"
        ))
    })?;
    let addr = replica.or(fr.primary_listen.clone()).ok_or_else(|| {
        coded(
            exit::USAGE,
            "the old primary's address is unknown: pass --replica HOST:PORT",
        )
    })?;
    let fp = match replica_fingerprint {
        Some(f) => f,
        None => agent
            .db()
            .allowed()?
            .into_iter()
            .find(|e| e.primary == rec.primary)
            .map(|e| e.fingerprint)
            .ok_or_else(|| coded(exit::USAGE, "pass --replica-fingerprint"))?,
    };
    let store = super::replica::store_of(agent, &rec)?;
    let point = store
        .points(rec.uuid)?
        .into_iter()
        .find(|p| p.id == live.point)
        .context("the failover point is gone from the store")?;
    // The new definition: same VM, its disks are now the failover overlays.
    let mut def = VmDefinition::from_toml(&store.definition(rec.uuid)?)?;
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
    let client = Client::connect(&addr, &agent.identity, &fp, Default::default())
        .await
        .with_context(|| format!("connecting to the old primary {addr}"))?;
    let answer = client
        .call("become-replica", &serde_json::to_value(&req)?)
        .await
        .context("the old primary refused to become the replica")?;
    let resync = answer
        .get("resync")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let args = EnableArgs {
        name: rec.name.clone(),
        replica: addr.clone(),
        replica_fingerprint: fp,
        frequency_secs,
        recovery_points: 0,
        app_consistent_every_hours: 0,
        exclude_disks: vec![],
        compression: true,
        initial_at_ms: None,
        auto_resync: None,
        initial: Default::default(),
    };
    rec.mode = ReplicationMode::Primary;
    rec.qmp = qmp;
    rec.launch_toml = def.to_toml();
    rec.disks = point.disks.iter().map(|(d, _)| d.clone()).collect();
    rec.enable = Some(args);
    // After an unplanned failover the old primary's disks differ from the point: resync now.
    rec.state = if resync {
        ReplicationState::WaitingForStartResynchronize
    } else {
        ReplicationState::Replicating
    };
    rec.paused_from = None;
    rec.last_cycle = Some(live.point);
    rec.disk_sizes = Some(point.disks.iter().map(|(_, s)| *s).collect());
    rec.stats = ReplicationStats {
        window_start_ms: now_ms(),
        ..Default::default()
    };
    rec.initial_at_ms = resync.then(now_ms);
    rec.primary = agent.config.name.clone();
    rec.trust_group = None;
    rec.last_error = None;
    agent.db().put_vm(&rec)?;
    fr.before = None;
    save(agent, &fr)?;
    super::primary::spawn(agent, rec.clone(), true)?;
    Ok(result(
        name,
        rec.state,
        Some(&live),
        t0,
        format!(
            "replication reversed: {name:?} now replicates from here to {addr} every \
             {frequency_secs} s, starting after point {}{}",
            live.point,
            if resync {
                "; the old primary's disks are resynchronised first (only differing blocks)"
            } else {
                ""
            }
        ),
    ))
}

/// Agent-to-agent `become-replica` on the old primary (reverse after a planned failover): the
/// prepared VM's own disks become the first recovery point of a new replica VM, nothing is
/// copied.
pub async fn become_replica(
    agent: &Arc<Agent>,
    peer: &Peer,
    req: BecomeReplica,
) -> Result<Value, RemoteError> {
    let internal = |e: anyhow::Error| RemoteError::Internal {
        message: format!("{e:#}"),
    };
    let bad = |m: String| RemoteError::BadRequest { message: m };
    let rec = agent
        .vm_by_uuid(req.uuid)
        .map_err(internal)?
        .ok_or(RemoteError::UnknownVm { vm: req.uuid })?;
    let args = rec
        .enable
        .clone()
        .ok_or_else(|| bad("replication is not enabled".into()))?;
    if rec.mode != ReplicationMode::Primary || args.replica_fingerprint != peer.fingerprint {
        return Err(bad(format!(
            "{} is not replicating to {} from this host",
            rec.name, peer.name
        )));
    }
    let state = current_state(agent, &rec);
    // Planned: both sides hold exactly the final cycle. Otherwise (unplanned failover, or a
    // failover to an older point) this host's disks differ: the new primary resynchronises
    // them (only differing blocks travel; this host's writes after the cut are overwritten).
    let planned =
        state == ReplicationState::PreparedForFailover && rec.last_cycle == Some(req.point);
    let became = async {
        // Stop the driver and the (shut down) VM process: its images become the replica's.
        let vm = agent
            .primaries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&rec.name);
        if let Some(vm) = &vm {
            vm.stop().await;
        }
        let ep = Endpoint::Unix(rec.qmp.clone().into());
        if !planned
            && !matches!(
                QmpClient::connect(&ep, Duration::from_secs(3)).await,
                Err(QmpError::Connect { .. })
            )
        {
            if let Some(vm) = &vm {
                super::primary::restart_driver(agent, vm)?;
            }
            bail!(
                "the old primary's VM {:?} still runs here ({}); shut it down first: its \
                 writes after the failover are discarded by the reverse resync",
                rec.name,
                rec.qmp
            );
        }
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
        let old = VmDefinition::from_toml(&rec.launch_toml)?;
        let mut disks = Vec::new();
        for d in &req.disks {
            let img = old
                .disks
                .iter()
                .find(|x| x.node == d.id)
                .with_context(|| format!("disk {} is not in the old definition", d.id))?;
            disks.push((d.id.clone(), PathBuf::from(&img.path), d.size));
        }
        let entry = agent
            .db()
            .allowed()?
            .into_iter()
            .find(|e| e.fingerprint == peer.fingerprint)
            .context("the new primary is not authorized on this host (`server allow`)")?;
        let store = agent.store(Path::new(&entry.storage))?;
        store.add_vm(req.uuid, &req.launch_toml, RetentionPolicy::default())?;
        store
            .import_point(req.uuid, req.point, req.taken_at_ms, &disks)
            .await?;
        let new = VmRecord {
            name: rec.name.clone(),
            uuid: rec.uuid,
            mode: ReplicationMode::Replica,
            qmp: String::new(),
            launch_toml: req.launch_toml.clone(),
            disks: req.disks.iter().map(|d| d.id.clone()).collect(),
            enable: None,
            state: ReplicationState::Replicating,
            paused_from: None,
            last_cycle: Some(req.point),
            disk_sizes: Some(req.disks.iter().map(|d| d.size).collect()),
            stats: ReplicationStats {
                window_start_ms: now_ms(),
                ..Default::default()
            },
            initial_at_ms: None,
            primary: peer.name.clone(),
            trust_group: peer.trust_group.clone(),
            last_error: None,
        };
        agent.db().put_vm(&new)?;
        anyhow::Ok(())
    }
    .await;
    became.map_err(internal)?;
    tracing::info!(vm = %rec.name, new_primary = %peer.name, point = req.point, planned, "reverse: this host is now the replica");
    Ok(json!({ "state": ReplicationState::Replicating, "point": req.point, "resync": !planned }))
}
