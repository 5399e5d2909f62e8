//! Image helpers for tests (qemu-img create/info/compare/convert, content hashes). Owned by
//! the replica-store work.

use std::path::Path;
use std::process::Command;

fn run(cmd: &mut Command, what: &str) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run {what}: {e}"))?;
    if !out.status.success() {
        anyhow::bail!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `qemu-img create -f <fmt> path size`, optionally on a qcow2 backing file.
pub fn create(path: &Path, fmt: &str, size: u64, backing: Option<&Path>) -> anyhow::Result<()> {
    let mut c = Command::new("qemu-img");
    c.args(["create", "-q", "-f", fmt]);
    if let Some(b) = backing {
        c.arg("-b").arg(b).args(["-F", "qcow2"]);
    }
    c.arg(path).arg(size.to_string());
    run(&mut c, "qemu-img create").map(|_| ())
}

/// `qemu-img info --output=json` (with `--backing-chain` when asked), as text.
pub fn info_json(path: &Path, backing_chain: bool) -> anyhow::Result<String> {
    let mut c = Command::new("qemu-img");
    c.args(["info", "-U", "--output=json"]);
    if backing_chain {
        c.arg("--backing-chain");
    }
    run(c.arg(path), "qemu-img info")
}

/// `qemu-img info --backing-chain` in human form (what an admin sees).
pub fn backing_chain_text(path: &Path) -> anyhow::Result<String> {
    run(
        Command::new("qemu-img")
            .args(["info", "-U", "--backing-chain"])
            .arg(path),
        "qemu-img info",
    )
}

/// `qemu-img check` passes (no corruption; leaks allowed).
pub fn check(path: &Path) -> anyhow::Result<()> {
    let out = Command::new("qemu-img")
        .args(["check", "-U", "-q"])
        .arg(path)
        .output()?;
    // Exit 0 = clean, 3 = leaked clusters only.
    match out.status.code() {
        Some(0) | Some(3) => Ok(()),
        _ => anyhow::bail!(
            "qemu-img check {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// `qemu-img compare` (auto-detected formats): true when the guest-visible contents are equal.
pub fn compare(a: &Path, b: &Path) -> anyhow::Result<bool> {
    let out = Command::new("qemu-img")
        .args(["compare", "-U", "-q"])
        .arg(a)
        .arg(b)
        .output()?;
    match out.status.code() {
        Some(0) => Ok(true),
        Some(1) => Ok(false),
        _ => anyhow::bail!(
            "qemu-img compare failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// The whole guest-visible content of an image (any format, through its backing chain), read
/// with `qemu-img convert -O raw`. For small test disks.
pub fn raw_content(path: &Path) -> anyhow::Result<Vec<u8>> {
    let dir = tempfile::tempdir()?;
    let raw = dir.path().join("content.raw");
    run(
        Command::new("qemu-img")
            .args(["convert", "-U", "-O", "raw"])
            .arg(path)
            .arg(&raw),
        "qemu-img convert",
    )?;
    Ok(std::fs::read(&raw)?)
}

/// SHA-256 (hex) of an image's guest-visible content (converted to raw, hashed by
/// `sha256sum`); works for any size without holding the content in memory.
pub fn content_sha256(path: &Path) -> anyhow::Result<String> {
    let dir = tempfile::tempdir()?;
    let raw = dir.path().join("content.raw");
    run(
        Command::new("qemu-img")
            .args(["convert", "-U", "-O", "raw"])
            .arg(path)
            .arg(&raw),
        "qemu-img convert",
    )?;
    let out = run(Command::new("sha256sum").arg(&raw), "sha256sum")?;
    out.split_whitespace()
        .next()
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("sha256sum printed nothing"))
}

/// Write `data` at `offset` of an image with `qemu-io` (test setup).
pub fn qemu_io_write_pattern(
    path: &Path,
    fmt: &str,
    pattern: u8,
    offset: u64,
    len: u64,
) -> anyhow::Result<()> {
    run(
        Command::new("qemu-io")
            .args(["-f", fmt, "-c"])
            .arg(format!("write -P {pattern} {offset} {len}"))
            .arg(path),
        "qemu-io",
    )
    .map(|_| ())
}

/// Whether `len` bytes at `offset` of qcow2 image `path` (through its backing chain) all hold
/// `pattern`: `qemu-io -r -U` (read-only, sharing the image with the VM that runs on it).
pub fn qemu_io_holds_pattern(
    path: &Path,
    pattern: u8,
    offset: u64,
    len: u64,
) -> anyhow::Result<bool> {
    let out = Command::new("qemu-io")
        .args(["-r", "-U", "-f", "qcow2", "-c"])
        .arg(format!("read -P {pattern} {offset} {len}"))
        .arg(path)
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run qemu-io: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    // a mismatch exits 1 and says so; anything else that fails is an error
    if text.contains("Pattern verification failed") {
        return Ok(false);
    }
    if !out.status.success() || !text.contains("read ") {
        anyhow::bail!(
            "qemu-io read of {}: {} {}",
            path.display(),
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(true)
}
