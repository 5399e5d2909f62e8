//! The e2e tests' glue to the shared harness (`vmr_testkit::harness`, which every test uses):
//! the binary under test, and replica points read through `vmr-store` (which the harness
//! does not link, so that it depends on nothing of the agent's side).
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

pub use vmr_testkit::harness::*;

/// What a test returns: harness and other errors fail it with their message.
pub type TestResult<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

/// The binary under test.
pub fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_vmreplica"))
}

/// The store of `agent`'s replica VMs, opened from outside the agent once the prune that
/// follows VM `vm`'s last commit has ended ([`Agent::settle`]): every test that reads a
/// replica's catalog or layers directly goes through here.
pub fn settled_store(agent: &Agent, vm: uuid::Uuid) -> TestResult<vmr_store::Store> {
    agent.settle(vm)?;
    Ok(vmr_store::Store::open(&agent.storage())?)
}

/// Hashes of every disk of the replica's point (`None` = latest), by disk id. This reads the
/// replica's store from outside, so it first waits for the prune that follows the last
/// commit ([`Agent::settle`]). A cycle that arrives meanwhile brings a prune of its own (one
/// right after a commit renames the latest point's layer to the chain's base and deletes the
/// old file): the layers are read again after hashing, and the whole read is repeated when
/// they changed or one vanished.
pub fn replica_hashes(
    replica: &Agent,
    vm: uuid::Uuid,
    point: Option<u64>,
) -> TestResult<Vec<(String, [u8; 32])>> {
    let layers = || -> TestResult<Vec<(String, std::path::PathBuf)>> {
        Ok(settled_store(replica, vm)?.point_layers(vm, point)?)
    };
    let mut attempt = 0;
    loop {
        attempt += 1;
        let before = layers()?;
        if attempt < 50 && !before.iter().all(|(_, l)| l.exists()) {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        let hashed: TestResult<Vec<(String, [u8; 32])>> = before
            .iter()
            .map(|(disk, layer)| Ok((disk.clone(), hash_image(layer)?)))
            .collect();
        if attempt < 50 && layers()? != before {
            continue;
        }
        return hashed;
    }
}

/// Entries of the temp dir named `vmr-*` that carry process `pid` in their name
/// (`vmr-qsd-<pid>-<n>.qmp`, `vmr-store-<pid>-<n>.sock`: where stores before issue 12 put
/// their sockets, which a killed process left behind).
pub fn temp_sockets_of(pid: u32) -> Vec<String> {
    let tag = format!("-{pid}-");
    std::fs::read_dir(std::env::temp_dir())
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("vmr-") && n.contains(&tag))
                .collect()
        })
        .unwrap_or_default()
}

/// The sockets in a store's socket directory (`<root>/sock`, or its shortened form when a
/// 37-byte socket name would not fit there: vmr-store's rule).
pub fn store_sockets(root: &Path) -> Vec<String> {
    std::fs::read_dir(vmr_proto::sockpath::socket_dir(root.join("sock"), root, 37))
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Wait for a cycle cut after the last write, pause replication (it stays paused), and compare
/// the replica's latest point with the primary's disks.
pub fn assert_equal_at_cut(p: &Pair, vm: &StandIn) -> TestResult {
    const LONG: Duration = Duration::from_secs(90);
    let name = &vm.def.name;
    // A point cut after now holds every write (the writes are done).
    p.wait_point_cut_after(name, epoch_ms(), LONG)?;
    p.a.ok(&["pause", name])?;
    let last = p.a.status(name)?.last_cycle.unwrap_or(0);
    p.b.wait_cycle(name, last, LONG)?;
    for (disk, h) in replica_hashes(&p.b, vm.def.uuid, None)? {
        assert_eq!(h, vm.hash(&disk)?, "disk {disk} differs at the cut");
    }
    Ok(())
}

/// Stop `agent`, give it a monitoring listener on a free port (with `token` in a 0600 file
/// when given) and start it again; returns the port. Shared by the monitoring and dashboard
/// tests.
pub fn with_metrics(agent: &mut Agent, token: Option<&str>) -> TestResult<u16> {
    use std::os::unix::fs::PermissionsExt;
    agent.stop()?;
    let port = free_port()?;
    let mut keys = format!("metrics-listen = \"127.0.0.1:{port}\"\n");
    if let Some(t) = token {
        let f = agent.dir.join("metrics.token");
        std::fs::write(&f, format!("{t}\n"))?;
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600))?;
        keys.push_str("metrics-token-file = \"metrics.token\"\n");
    }
    // Top-level keys go before the first table (`init` writes `[events]` at the end).
    agent.add_config(&keys)?;
    agent.restart()?;
    Ok(port)
}
