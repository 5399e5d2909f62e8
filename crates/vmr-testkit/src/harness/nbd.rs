//! NBD and QMP readiness, guest writes and content hashes: [`connect_nbd`] is the one way the
//! harness reaches an NBD server, retrying the vmr-nbd client's connect until the server
//! greets or a deadline passes (qemu-nbd and qemu-storage-daemon create the socket file at
//! bind(), before listen(): a connect in between is refused).

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmr_nbd::{ConnectOptions, Endpoint, NbdClient};

use super::{HarnessError, READY_TIMEOUT, Result, io_err, rt};
use crate::proc::ChildGuard;

/// Connect to export `export` at `ep`, retrying every 10 ms until the server completes the
/// handshake or `timeout` passes (then the last connect error).
pub async fn connect_nbd(ep: &Endpoint, export: &str, timeout: Duration) -> Result<NbdClient> {
    let deadline = Instant::now() + timeout;
    loop {
        let opts = ConnectOptions {
            export: export.into(),
            ..Default::default()
        };
        match NbdClient::connect(ep, opts).await {
            Ok(c) => return Ok(c),
            Err(source) if Instant::now() >= deadline => {
                return Err(HarnessError::Nbd {
                    what: format!("connect to export {export:?} at {ep:?} within {timeout:?}"),
                    source,
                });
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Wait until the QMP server at `sock` sends its greeting (`{"QMP": ...}`), then disconnect.
pub fn wait_qmp_greeting(sock: &Path, timeout: Duration) -> Result<()> {
    super::wait_every(
        timeout,
        Duration::from_millis(10),
        &format!("the QMP greeting at {}", sock.display()),
        || qmp_greets(sock),
    )
}

/// [`wait_qmp_greeting`] of `child`'s own QMP server: fails at once when `child` has exited
/// (it will never greet), not at the timeout.
pub fn wait_child_qmp_greeting(
    child: &mut ChildGuard,
    sock: &Path,
    timeout: Duration,
) -> Result<()> {
    let mut exited = false;
    super::wait_every(
        timeout,
        Duration::from_millis(10),
        &format!("the QMP greeting at {}", sock.display()),
        || {
            if !child.is_running() {
                exited = true;
                return Ok(true);
            }
            qmp_greets(sock)
        },
    )?;
    if exited {
        return Err(HarnessError::Exited {
            what: format!("the process of the QMP server at {}", sock.display()),
            log: String::new(),
        });
    }
    Ok(())
}

fn qmp_greets(sock: &Path) -> Result<bool> {
    let s = UnixStream::connect(sock).map_err(io_err("connect to QMP"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(io_err("set a read timeout"))?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .map_err(io_err("read the QMP greeting"))?;
    Ok(line.contains("\"QMP\""))
}

fn nbd_err(what: impl Into<String>) -> impl FnOnce(vmr_nbd::NbdError) -> HarnessError {
    let what = what.into();
    move |source| HarnessError::Nbd { what, source }
}

/// BLAKE3 of the whole content of export `export` at `ep` (waits for the server to greet).
pub async fn hash_export_async(ep: &Endpoint, export: &str) -> Result<[u8; 32]> {
    let c = connect_nbd(ep, export, READY_TIMEOUT).await?;
    let size = c.size();
    let mut h = blake3::Hasher::new();
    let mut off = 0;
    while off < size {
        let n = (4u64 << 20).min(size - off) as u32;
        h.update(&c.read(off, n).await.map_err(nbd_err("read"))?);
        off += u64::from(n);
    }
    c.disconnect().await.map_err(nbd_err("disconnect"))?;
    Ok(*h.finalize().as_bytes())
}

/// [`hash_export_async`] on its own runtime (not from inside a Tokio runtime).
pub fn hash_export(sock: &Path, export: &str) -> Result<[u8; 32]> {
    rt()?.block_on(hash_export_async(
        &Endpoint::Unix(sock.to_path_buf()),
        export,
    ))
}

/// BLAKE3 of a qcow2 image's guest-visible content (through its backing chain), served by a
/// read-only `qemu-nbd` that is killed afterwards.
pub async fn hash_image_async(path: &Path) -> Result<[u8; 32]> {
    let dir = tempfile::Builder::new()
        .prefix("vmr-hash-")
        .tempdir()
        .map_err(io_err("create a temp dir"))?;
    let sock = dir.path().join("nbd.sock");
    let mut cmd = Command::new("qemu-nbd");
    cmd.args(["--read-only", "--format=qcow2", "--shared=1"])
        .arg(format!("--socket={}", sock.display()))
        .arg(path)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let _guard = ChildGuard::spawn(cmd, "qemu-nbd")?;
    hash_export_async(&Endpoint::Unix(sock), "").await
}

/// [`hash_image_async`] on its own runtime (not from inside a Tokio runtime).
pub fn hash_image(path: &Path) -> Result<[u8; 32]> {
    rt()?.block_on(hash_image_async(path))
}

/// Write `blocks` 64 KiB blocks at random block offsets of export `disk` at `sock` (contents
/// from `seed`), flush.
pub fn write_random(sock: &Path, disk: &str, blocks: u64, seed: u64) -> Result<()> {
    rt()?.block_on(async {
        let c = connect_nbd(&Endpoint::Unix(sock.to_path_buf()), disk, READY_TIMEOUT).await?;
        let n = (c.size() / 65536).max(1);
        let mut x = seed | 1;
        for i in 0..blocks {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut data = vec![(x % 251) as u8; 65536];
            data[..16].copy_from_slice(&[seed.to_le_bytes(), i.to_le_bytes()].concat());
            c.write((x % n) * 65536, data.into(), false)
                .await
                .map_err(nbd_err("write"))?;
        }
        c.flush().await.map_err(nbd_err("flush"))?;
        c.disconnect().await.map_err(nbd_err("disconnect"))
    })
}

/// Write `count` consecutive 64 KiB blocks from block `first` of export `disk` at `sock`
/// (contents from `seed`), flush: exactly `count` blocks differ afterwards.
pub fn write_seq(sock: &Path, disk: &str, first: u64, count: u64, seed: u64) -> Result<()> {
    rt()?.block_on(async {
        let c = connect_nbd(&Endpoint::Unix(sock.to_path_buf()), disk, READY_TIMEOUT).await?;
        for i in first..first + count {
            let mut data = vec![(seed as u8) ^ (i as u8) | 1; 65536];
            data[..16].copy_from_slice(&[seed.to_le_bytes(), i.to_le_bytes()].concat());
            c.write(i * 65536, data.into(), false)
                .await
                .map_err(nbd_err("write"))?;
        }
        c.flush().await.map_err(nbd_err("flush"))?;
        c.disconnect().await.map_err(nbd_err("disconnect"))
    })
}

/// Write `count` consecutive 64 KiB blocks of incompressible pseudo-random bytes (xorshift
/// from `seed`) from block `first` of export `disk` at `sock`, flush.
pub fn write_noise(sock: &Path, disk: &str, first: u64, count: u64, seed: u64) -> Result<()> {
    rt()?.block_on(async {
        let c = connect_nbd(&Endpoint::Unix(sock.to_path_buf()), disk, READY_TIMEOUT).await?;
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        for i in first..first + count {
            let mut data = Vec::with_capacity(65536);
            for _ in 0..65536 / 8 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                data.extend_from_slice(&x.to_le_bytes());
            }
            c.write(i * 65536, data.into(), false)
                .await
                .map_err(nbd_err("write"))?;
        }
        c.flush().await.map_err(nbd_err("flush"))?;
        c.disconnect().await.map_err(nbd_err("disconnect"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qemu_img_create(path: &Path, size: &str) {
        let st = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(path)
            .arg(size)
            .status()
            .expect("qemu-img");
        assert!(st.success());
    }

    #[test]
    fn hash_image_equals_the_hash_of_the_content_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = dir.path().join("a.qcow2");
        qemu_img_create(&img, "1M");
        let zero = hash_image(&img).expect("hash");
        assert_eq!(zero, *blake3::hash(&vec![0u8; 1 << 20]).as_bytes());
        let st = Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 7 65536 65536"])
            .arg(&img)
            .stdout(Stdio::null())
            .status()
            .expect("qemu-io");
        assert!(st.success());
        let mut want = vec![0u8; 1 << 20];
        want[65536..131072].fill(7);
        assert_eq!(
            hash_image(&img).expect("hash"),
            *blake3::hash(&want).as_bytes()
        );
    }

    #[test]
    fn connect_waits_for_a_server_that_starts_late_and_gives_up_at_the_deadline() {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = dir.path().join("a.qcow2");
        qemu_img_create(&img, "1M");
        let sock = dir.path().join("late.sock");
        let rt = rt().expect("rt");
        let ep = Endpoint::Unix(sock.clone());
        let e = rt
            .block_on(connect_nbd(&ep, "", Duration::from_millis(100)))
            .expect_err("nobody listens");
        assert!(matches!(e, HarnessError::Nbd { .. }), "{e}");
        // The server starts only after the client began to try.
        let starter = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let mut cmd = Command::new("qemu-nbd");
            cmd.args(["--read-only", "--format=qcow2", "--shared=1"])
                .arg(format!("--socket={}", sock.display()))
                .arg(&img);
            ChildGuard::spawn(cmd, "qemu-nbd").expect("qemu-nbd")
        });
        let c = rt
            .block_on(connect_nbd(&ep, "", Duration::from_secs(20)))
            .expect("connects once the server greets");
        assert_eq!(c.size(), 1 << 20);
        rt.block_on(c.disconnect()).expect("disconnect");
        drop(starter.join().expect("starter"));
    }
}
