//! The qemu-storage-daemon the agent runs on a primary VM's own images when the VM's QEMU has
//! exited (`failover prepare` after a clean guest shutdown without `-no-shutdown`, libvirt's
//! default): it opens the definition's disks under the VM's node names, which loads the
//! persistent dirty bitmaps QEMU's clean exit stored, and serves a QMP monitor the normal
//! capture runs a cycle through. Stopped cleanly afterwards (SIGTERM: the bitmaps are stored
//! again and the images unlocked). A process that still holds an image makes QEMU's image
//! locking refuse the open: reported as [`AgentError::ImagesInUse`]. A daemon that dies by a
//! crash signal before its QMP answered (QEMU 10.0's start-up race) is started again, at most
//! [`crate::util::START_ATTEMPTS`] starts.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use vmr_capture::Endpoint;
use vmr_capture::qmp::QmpClient;
use vmr_proto::VmDefinition;
use vmr_proto::record::VmRecord;

use crate::errors::AgentError;

/// How long the daemon may take to open the images and answer QMP, and to exit.
const DAEMON_TIMEOUT: Duration = Duration::from_secs(30);

/// The running daemon; killed if dropped without [`ImageDaemon::stop`].
#[derive(Debug)]
pub struct ImageDaemon {
    name: String,
    qmp: PathBuf,
    log: PathBuf,
    child: tokio::process::Child,
    /// The crash signals of the starts before the one that runs (none, normally).
    crashes: Vec<&'static str>,
}

/// Test hook (cargo feature `test-hooks` only, [`crate::util::crash_at_start_hook`]): a file
/// of this name in the agent directory holding a number N makes the next N starts of the
/// image daemon crash at once: `sh -c 'kill -SEGV $$'` runs in its place, so the crash comes
/// before any image is opened, whatever the machine's load.
const CRASH_HOOK: &str = "test-image-daemon-crash";

/// `PATH`'s format: `qcow2` when it starts with the qcow2 magic, `raw` otherwise (a raw disk
/// has no persistent bitmaps: the capture then reports that a resync is required).
fn format_of(path: &Path) -> Result<&'static str, AgentError> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path).map_err(AgentError::io("opening", path))?;
    match f.read_exact(&mut magic) {
        Ok(()) if magic == *b"QFI\xfb" => Ok("qcow2"),
        Ok(()) => Ok("raw"),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok("raw"),
        Err(e) => Err(AgentError::io("reading", path)(e)),
    }
}

/// The image of each of the record's disks, from its definition (after a reverse: the
/// failover overlays the VM ran on).
pub fn images(rec: &VmRecord) -> Result<Vec<(String, PathBuf)>, AgentError> {
    let def = VmDefinition::from_toml(&rec.launch_toml).map_err(AgentError::BadDefinition)?;
    rec.disks
        .iter()
        .map(|node| {
            def.disks
                .iter()
                .find(|d| &d.node == node)
                .map(|d| (node.clone(), PathBuf::from(&d.path)))
                .ok_or_else(|| AgentError::DiskNotInDefinition { disk: node.clone() })
        })
        .collect()
}

/// The first image a lock error of the daemon's output names.
fn locked_image<'a>(out: &str, disks: &'a [(String, PathBuf)]) -> Option<&'a Path> {
    let lock = out.contains("Failed to get") && out.contains("lock");
    if !lock {
        return None;
    }
    disks
        .iter()
        .map(|(_, p)| p.as_path())
        .find(|p| out.contains(&p.display().to_string()))
        .or_else(|| disks.first().map(|(_, p)| p.as_path()))
}

/// Processes whose command line names `qmp` (a daemon an earlier agent started there).
fn daemons_at(qmp: &Path) -> Vec<i32> {
    let needle = qmp.display().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&needle))
                .unwrap_or(false)
        })
        .collect()
}

/// End a daemon an earlier agent left at `qmp` (QMP `quit`: bitmaps stored; SIGKILL after
/// the timeout) and wait until its process is gone, so that its image locks are released.
async fn quit_leftover(qmp: &Path, name: &str) -> Result<(), AgentError> {
    let pids = daemons_at(qmp);
    if pids.is_empty() {
        return Ok(());
    }
    tracing::warn!(vm = %name, qmp = %qmp.display(), ?pids, "ending the qemu-storage-daemon an earlier agent left on the VM's images");
    if let Ok(mut q) =
        QmpClient::connect(&Endpoint::Unix(qmp.to_path_buf()), Duration::from_secs(5)).await
    {
        let _ = q.execute_value("quit", None).await;
    }
    let deadline = Instant::now() + DAEMON_TIMEOUT;
    loop {
        let left = daemons_at(qmp);
        if left.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            for pid in left {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            return Err(AgentError::ImageDaemon {
                name: name.to_owned(),
                what: "left by an earlier agent did not quit (killed; its bitmaps are not stored)",
                detail: qmp.display().to_string(),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Why one start of the daemon did not give a daemon that answers.
enum Start {
    /// It died by a crash signal before its QMP answered: started again.
    Crashed { signal: &'static str, log: String },
    /// Anything else: the error is final.
    Failed(AgentError),
}

impl ImageDaemon {
    /// Start the daemon on `rec`'s images, its monitor in `work_dir`; returns once QMP
    /// answers.
    pub async fn start(
        rec: &VmRecord,
        work_dir: &Path,
        agent_dir: &Path,
    ) -> Result<Self, AgentError> {
        let disks = images(rec)?;
        std::fs::create_dir_all(work_dir).map_err(AgentError::io("creating", work_dir))?;
        let tag = crate::launch::tag(rec.uuid);
        let qmp = vmr_proto::sockpath::socket_path(
            work_dir.join(format!("vmr-{tag}-prep.qmp")),
            agent_dir,
            &format!("vmr-{}-prep.qmp", crate::launch::ident(rec.uuid)),
        );
        if let Some(p) = qmp.parent() {
            std::fs::create_dir_all(p).map_err(AgentError::io("creating", p))?;
        }
        // A daemon an earlier agent left (it was killed mid-prepare) still holds the images:
        // this socket is the agent's own, so it is ended first (cleanly: bitmaps stored).
        quit_leftover(&qmp, &rec.name).await?;
        let _ = std::fs::remove_file(&qmp);
        let log = work_dir.join("prepare-qsd.log");
        let started = crate::util::start_again_on_crash(
            "qemu-storage-daemon on the VM's images",
            &rec.name,
            || Self::start_once(rec, &disks, &qmp, &log, agent_dir),
            |e| match e {
                Start::Crashed { signal, .. } => Some(*signal),
                Start::Failed(_) => None,
            },
            || {
                let _ = std::fs::remove_file(&qmp);
            },
        )
        .await;
        match started {
            Ok((mut d, crashes)) => {
                d.crashes = crashes;
                Ok(d)
            }
            Err((Start::Failed(e), _)) => Err(e),
            Err((Start::Crashed { log, .. }, crashes)) => Err(AgentError::ImageDaemon {
                name: rec.name.clone(),
                what: "crashed at start, before its QMP answered",
                detail: format!(
                    "{} ({} start{}): {log}",
                    crashes.join(", "),
                    crashes.len(),
                    if crashes.len() == 1 { "" } else { "s" }
                ),
            }),
        }
    }

    /// One start of [`ImageDaemon::start`].
    async fn start_once(
        rec: &VmRecord,
        disks: &[(String, PathBuf)],
        qmp: &Path,
        log: &Path,
        agent_dir: &Path,
    ) -> Result<Self, Start> {
        let out = std::fs::File::create(log)
            .map_err(|e| Start::Failed(AgentError::io("creating", log)(e)))?;
        let err = out
            .try_clone()
            .map_err(|e| Start::Failed(AgentError::io("duplicating", log)(e)))?;
        let tag = crate::launch::tag(rec.uuid);
        let mut cmd = if crate::util::crash_at_start_hook(agent_dir, CRASH_HOOK) {
            let mut c = tokio::process::Command::new("sh");
            c.arg("-c").arg("kill -SEGV $$");
            c
        } else {
            tokio::process::Command::new("qemu-storage-daemon")
        };
        for (i, (node, path)) in disks.iter().enumerate() {
            // Not `vmr-<tag>-*`: the capture removes nodes of that prefix as its leftovers.
            let file = format!("vmrprep{tag}f{i}");
            cmd.arg("--blockdev").arg(format!(
                "driver=file,node-name={file},filename={}",
                path.display().to_string().replace(',', ",,")
            ));
            cmd.arg("--blockdev").arg(format!(
                "driver={},node-name={node},file={file}",
                format_of(path).map_err(Start::Failed)?
            ));
        }
        cmd.arg("--chardev")
            .arg(format!(
                "socket,id=vmr,path={},server=on,wait=off",
                qmp.display().to_string().replace(',', ",,")
            ))
            .arg("--monitor")
            .arg("chardev=vmr")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true);
        // Its own process group: a signal to the agent does not reach it.
        cmd.process_group(0);
        let child = cmd.spawn().map_err(|e| {
            Start::Failed(AgentError::ImageDaemon {
                name: rec.name.clone(),
                what: "did not start",
                detail: e.to_string(),
            })
        })?;
        let mut d = ImageDaemon {
            name: rec.name.clone(),
            qmp: qmp.to_path_buf(),
            log: log.to_path_buf(),
            child,
            crashes: Vec::new(),
        };
        let deadline = Instant::now() + DAEMON_TIMEOUT;
        loop {
            if let Ok(Some(status)) = d.child.try_wait() {
                let text = d.output();
                if let Some(signal) = crate::util::crash_signal(&status) {
                    return Err(Start::Crashed { signal, log: text });
                }
                return Err(Start::Failed(match locked_image(&text, disks) {
                    Some(image) => AgentError::ImagesInUse {
                        name: rec.name.clone(),
                        qmp: rec.qmp.clone(),
                        image: image.display().to_string(),
                        detail: text,
                    },
                    None => AgentError::ImageDaemon {
                        name: rec.name.clone(),
                        what: "did not start",
                        detail: text,
                    },
                }));
            }
            if d.qmp.exists()
                && QmpClient::connect(&Endpoint::Unix(d.qmp.clone()), Duration::from_secs(5))
                    .await
                    .is_ok()
            {
                tracing::info!(vm = %rec.name, qmp = %d.qmp.display(), "qemu-storage-daemon runs on the VM's images");
                return Ok(d);
            }
            if Instant::now() > deadline {
                let _ = d.child.kill().await;
                return Err(Start::Failed(AgentError::ImageDaemon {
                    name: rec.name.clone(),
                    what: "did not answer QMP in time",
                    detail: d.output(),
                }));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The crash signals of the starts that crashed before the one that runs (QEMU's start-up
    /// race; empty normally).
    pub fn crashes(&self) -> &[&'static str] {
        &self.crashes
    }

    /// Its QMP socket.
    pub fn qmp(&self) -> &Path {
        &self.qmp
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .trim()
            .to_owned()
    }

    /// Stop it cleanly (SIGTERM: bitmaps stored, images unlocked) and wait; SIGKILL and an
    /// error after the timeout.
    pub async fn stop(mut self) -> Result<(), AgentError> {
        if let Some(pid) = self.child.id().and_then(|p| i32::try_from(p).ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let st = tokio::time::timeout(DAEMON_TIMEOUT, self.child.wait()).await;
        let _ = std::fs::remove_file(&self.qmp);
        match st {
            Ok(Ok(st)) if st.success() => Ok(()),
            Ok(Ok(st)) => Err(AgentError::ImageDaemon {
                name: self.name.clone(),
                what: "did not stop cleanly",
                detail: format!("{st}: {}", self.output()),
            }),
            Ok(Err(e)) => Err(AgentError::ImageDaemon {
                name: self.name.clone(),
                what: "could not be waited for",
                detail: e.to_string(),
            }),
            Err(_) => {
                let _ = self.child.kill().await;
                Err(AgentError::ImageDaemon {
                    name: self.name.clone(),
                    what: "did not stop within 30 s of SIGTERM",
                    detail: self.output(),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_error_names_the_image() {
        let disks = vec![
            ("disk0".to_owned(), PathBuf::from("/v/a.qcow2")),
            ("disk1".to_owned(), PathBuf::from("/v/b.qcow2")),
        ];
        let out = "qemu-storage-daemon: --blockdev driver=file,node-name=x,filename=/v/b.qcow2: \
                   Failed to get \"write\" lock\nIs another process using the image [/v/b.qcow2]?";
        assert_eq!(locked_image(out, &disks), Some(Path::new("/v/b.qcow2")));
        assert_eq!(locked_image("No such file or directory", &disks), None);
    }

    #[test]
    fn the_format_is_read_from_the_image() {
        let dir = tempfile::tempdir().expect("dir");
        let q = dir.path().join("q");
        std::fs::write(&q, b"QFI\xfb\0\0\0\x03").expect("write");
        let r = dir.path().join("r");
        std::fs::write(&r, b"").expect("write");
        assert_eq!(format_of(&q).expect("q"), "qcow2");
        assert_eq!(format_of(&r).expect("r"), "raw");
    }
}
