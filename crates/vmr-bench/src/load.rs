//! The guest side of a benchmark, through the stand-in VM's live NBD exports (vmr-nbd client):
//! random 64 KiB writers (free-running or rate-limited), filling a disk, dirtying a set of
//! blocks, and the "physical limit" baseline: a plain copy of given ranges to a file.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use futures::StreamExt;
use rand::{Rng, SeedableRng};
use vmr_nbd::{Endpoint, NbdClient};
use vmr_testkit::harness::{BLOCK, READY_TIMEOUT, connect_nbd, slice};

/// Connect to export `export` of the NBD socket `nbd` (once its server greets).
pub async fn connect(nbd: &Path, export: &str) -> anyhow::Result<NbdClient> {
    connect_nbd(&Endpoint::Unix(nbd.to_path_buf()), export, READY_TIMEOUT)
        .await
        .with_context(|| format!("connecting to export {export} at {}", nbd.display()))
}

/// Write `data` bytes of incompressible data in 4 MiB chunks: the whole disk from offset 0 when
/// `data >= size`, else at random distinct 4 MiB-aligned slots (a sparse disk holding data).
pub async fn fill(c: &NbdClient, pool: &Bytes, data: u64, seed: u64) -> anyhow::Result<()> {
    let chunk = 4u64 << 20;
    let size = c.size();
    let slots = size / chunk;
    let want = data.min(size) / chunk;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let offs: Vec<u64> = if want >= slots {
        (0..slots).map(|i| i * chunk).collect()
    } else {
        let mut set = std::collections::BTreeSet::new();
        while (set.len() as u64) < want {
            set.insert(rng.gen_range(0..slots) * chunk);
        }
        set.into_iter().collect()
    };
    let datas: Vec<Bytes> = offs.iter().map(|_| slice(pool, &mut rng, chunk)).collect();
    futures::stream::iter(offs.into_iter().zip(datas))
        .map(|(o, d)| {
            let c = c.clone();
            async move { c.write(o, d, false).await }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    c.flush().await?;
    Ok(())
}

/// Overwrite `count` distinct random 64 KiB blocks with new data and flush; their offsets.
pub async fn dirty(c: &NbdClient, count: u64, seed: u64) -> anyhow::Result<Vec<u64>> {
    let blocks = c.size() / BLOCK;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut set = std::collections::BTreeSet::new();
    while (set.len() as u64) < count.min(blocks) {
        set.insert(rng.gen_range(0..blocks) * BLOCK);
    }
    let offs: Vec<u64> = set.into_iter().collect();
    // Fresh random data, not slices of the pool: content that already occurs somewhere in the
    // image would let rsync's rolling checksum match it at another offset and send nothing.
    let datas: Vec<Bytes> = offs
        .iter()
        .map(|_| {
            let mut v = vec![0u8; BLOCK as usize];
            rng.fill(&mut v[..]);
            Bytes::from(v)
        })
        .collect();
    futures::stream::iter(offs.iter().copied().zip(datas))
        .map(|(o, d)| {
            let c = c.clone();
            async move { c.write(o, d, false).await }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    c.flush().await?;
    Ok(offs)
}

/// Coalesce sorted 64 KiB block offsets into ranges of at most 4 MiB.
pub fn ranges(blocks: &[u64]) -> Vec<(u64, u32)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &b in blocks {
        match out.last_mut() {
            Some((o, l)) if *o + *l == b && *l < (4 << 20) => *l += BLOCK,
            _ => out.push((b, BLOCK)),
        }
    }
    out.into_iter().map(|(o, l)| (o, l as u32)).collect()
}

/// The physical limit: read `blocks` at their offsets from the live export (16 reads in
/// flight) and write them one after another into `out`, then fsync. Time of all of it.
pub async fn plain_copy(
    nbd: &Path,
    export: &str,
    blocks: &[u64],
    out: &Path,
) -> anyhow::Result<Duration> {
    use tokio::io::AsyncWriteExt;
    let t = Instant::now();
    let c = connect(nbd, export).await?;
    let mut f = tokio::fs::File::create(out).await?;
    let r = ranges(blocks);
    let mut s = futures::stream::iter(r)
        .map(|(o, l)| {
            let c = c.clone();
            async move { c.read(o, l).await }
        })
        .buffered(16);
    while let Some(d) = s.next().await {
        f.write_all(&d?).await?;
    }
    f.sync_all().await?;
    let el = t.elapsed();
    drop(s);
    c.disconnect().await?;
    Ok(el)
}
