//! The verify cycle (`vmreplica verify`, `docs/verify.md`): an incremental cycle whose view is
//! kept whole (`CycleMode::Verify`: nothing trimmed). It ships the blocks written since the
//! last cycle like any cycle; once the replica acknowledged it, the replica's new point must
//! equal the cut. Then every block of the cut is read and hashed (BLAKE3 per 64 KiB block, as
//! a resync does) and compared with the replica's hashes of that point, which the replica
//! reads from the point's data (`read`: never from its block-hash index, which records what
//! was written, not what the layers hold now). Nothing is changed by the comparison: the cycle
//! is committed as usual whatever it finds, and the result goes to the owner.

use vmr_capture::{CycleMode, VmCapture};
use vmr_core::Failure;
use vmr_proto::api::{DiskVerify, EnableArgs, OperationKind, VerifyReport};
use vmr_proto::record::VmRecord;
use vmr_proto::{CycleConsistency, CycleHeader, CycleKind, DiskInfo};
use vmr_transport::Client;

use crate::cycle::{CycleCtx, Outcome, Session, classify_capture, disk_bases, position};
use crate::resync::{Assembler, BLOCK_SIZE, CHUNK_BLOCKS, Hashing, fetch};
use crate::util::now_ms;

/// Run verify cycle `id` on `base`; the comparison's result is left in `session.verify`.
pub(crate) async fn run(ctx: &CycleCtx, session: &mut Session, id: u64, base: u64) -> Outcome {
    let rec = &ctx.rec;
    session.verify = None;
    let Some(args) = rec.enable.clone() else {
        return Outcome::Failed(Failure::Fatal("not enabled".into()));
    };
    if session.capture.is_none() {
        match VmCapture::open(crate::cycle::capture_config(&ctx.host, rec, ctx.slot)).await {
            Ok(c) => session.capture = Some(c),
            Err(e) => return Outcome::Failed(classify_capture(&e)),
        }
    }
    let client = match crate::cycle::client(&ctx.host, rec, session).await {
        Ok(c) => c.clone(),
        Err(f) => return Outcome::Failed(f),
    };
    let Some(capture) = session.capture.as_mut() else {
        return Outcome::Failed(Failure::Retryable("no capture".into()));
    };
    let (outcome, report, reset_capture, reset_client) =
        verify_with(ctx, capture, &client, rec, &args, (id, base)).await;
    session.verify = report;
    if reset_capture {
        session.capture = None;
    }
    if reset_client {
        session.client = None;
    }
    outcome
}

type Compared = Option<Result<VerifyReport, Failure>>;

/// The verify cycle on an open capture and connection: the outcome, the comparison (`None`
/// when the cycle itself failed), and whether the capture and the connection must be reopened.
async fn verify_with(
    ctx: &CycleCtx,
    capture: &mut VmCapture,
    client: &Client,
    rec: &VmRecord,
    args: &EnableArgs,
    (id, base): (u64, u64),
) -> (Outcome, Compared, bool, bool) {
    let taken_at_ms = now_ms();
    let mut cycle = match capture.begin_cycle(CycleMode::Verify).await {
        Ok(c) => c,
        Err(e) => return (Outcome::Failed(classify_capture(&e)), None, true, false),
    };
    let disks = cycle.disks().to_vec();
    let sizes: Vec<u64> = disks.iter().map(|d| d.size).collect();
    ctx.progress.start(OperationKind::Cycle, 0, taken_at_ms);
    let header = CycleHeader {
        vm: rec.uuid,
        id,
        base: Some(base),
        kind: CycleKind::Incremental,
        consistency: CycleConsistency::CrashConsistent,
        taken_at_ms,
        disks: disks.clone(),
        group: None,
    };
    // A verify cycle ships the dirty extents like any cycle: under the same sending limit.
    let (produced, sent) = crate::cycle::ship(
        ctx,
        client,
        &header,
        &mut cycle,
        args.compression,
        std::time::Instant::now(),
    )
    .await;
    let bytes = match (produced, sent) {
        (Ok((bytes, _)), Ok(_ack)) => bytes,
        (p, s) => {
            let (o, rc, rl) = crate::cycle::failed(p, s, cycle, "verify cycle").await;
            return (o, None, rc, rl);
        }
    };
    // The replica committed point `id`: it must now hold exactly the cut.
    tracing::info!(vm = %rec.name, cycle = id, bytes, "verify cycle replicated; comparing every block");
    let compared = compare(ctx, &mut cycle, client, rec, id, &disks, taken_at_ms).await;
    match cycle.commit().await {
        Ok(()) => {
            let pending = capture.pending_bytes().await.ok();
            let done = Outcome::Done {
                id,
                bytes,
                sizes,
                app: false,
                pending,
            };
            (done, Some(compared), false, false)
        }
        Err(e) => {
            let (o, rc, rl) = crate::cycle::commit_failed(&e);
            (o, Some(compared), rc, rl)
        }
    }
}

/// Read the whole cut, hash it per block, and compare with the replica's point `point`.
async fn compare(
    ctx: &CycleCtx,
    cycle: &mut vmr_capture::CaptureCycle<'_>,
    client: &Client,
    rec: &VmRecord,
    point: u64,
    disks: &[DiskInfo],
    cut_ms: u64,
) -> Result<VerifyReport, Failure> {
    cycle.read_all().map_err(|e| classify_capture(&e))?;
    let total: u64 = disks.iter().map(|d| d.size).sum();
    ctx.progress.start(OperationKind::Cycle, total, now_ms());
    let mut asm: Vec<Assembler> = disks
        .iter()
        .enumerate()
        .map(|(i, d)| Assembler::new(i as u32, d.size))
        .collect();
    let mut ours: Vec<Vec<[u8; 32]>> = disks
        .iter()
        .map(|d| Vec::with_capacity(d.size.div_ceil(BLOCK_SIZE) as usize))
        .collect();
    let bases = disk_bases(&disks.iter().map(|d| d.size).collect::<Vec<_>>());
    while let Some(e) = cycle
        .next_extent()
        .await
        .map_err(|e| classify_capture(&e))?
    {
        let disk = e.disk as usize;
        let done_to = position(&bases, &e);
        let (Some(a), Some(list)) = (asm.get_mut(disk), ours.get_mut(disk)) else {
            return Err(Failure::Retryable("extent of an unknown disk".into()));
        };
        let blocks = a.push(e)?;
        for (index, _, h) in Hashing::start(blocks).get().await? {
            if index != list.len() as u64 {
                return Err(Failure::Retryable(format!(
                    "block {index} of disk {disk} out of order"
                )));
            }
            list.push(h);
        }
        ctx.progress.advance(done_to, 0);
    }
    if !asm.iter().all(Assembler::done) {
        return Err(Failure::Retryable(
            "the view ended before every disk was read".into(),
        ));
    }
    let mut out = Vec::with_capacity(disks.len());
    for (d, mine) in disks.iter().zip(&ours) {
        let blocks = mine.len() as u64;
        let mut bad = Vec::new();
        let mut first = 0u64;
        while first < blocks {
            let (p, theirs) = fetch(client, rec.uuid, d, first, Some(point), true).await?;
            if p != point || theirs.is_empty() {
                return Err(Failure::Retryable(format!(
                    "the replica answered for point {p} with {} hashes, not point {point}",
                    theirs.len()
                )));
            }
            for (i, h) in theirs.iter().enumerate() {
                let b = first + i as u64;
                if mine.get(b as usize) != Some(h) {
                    bad.push(b);
                }
            }
            first += (theirs.len() as u64).min(CHUNK_BLOCKS);
        }
        out.push(DiskVerify {
            disk: d.id.clone(),
            size: d.size,
            blocks,
            mismatched_blocks: bad.len() as u64,
            mismatched: ranges(&bad, d.size),
        });
    }
    let report = VerifyReport {
        name: rec.name.clone(),
        point,
        cut_ms,
        block_size: BLOCK_SIZE,
        disks: out,
    };
    tracing::info!(vm = %rec.name, point, mismatched_blocks = report.mismatched_blocks(), "verification compared every block: {}", report.summary(4));
    Ok(report)
}

/// Merge sorted block indexes into byte ranges `(offset, length)` of a disk of `size` bytes.
fn ranges(blocks: &[u64], size: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &b in blocks {
        let start = b * BLOCK_SIZE;
        let len = BLOCK_SIZE.min(size.saturating_sub(start));
        match out.last_mut() {
            Some((o, l)) if *o + *l == start => *l += len,
            _ => out.push((start, len)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_adjacent_blocks_and_end_at_the_disk() {
        let size = 10 * BLOCK_SIZE + 100;
        assert_eq!(ranges(&[], size), vec![]);
        assert_eq!(
            ranges(&[0, 1, 2, 5, 7, 8, 10], size),
            vec![
                (0, 3 * BLOCK_SIZE),
                (5 * BLOCK_SIZE, BLOCK_SIZE),
                (7 * BLOCK_SIZE, 2 * BLOCK_SIZE),
                (10 * BLOCK_SIZE, 100),
            ]
        );
    }
}
