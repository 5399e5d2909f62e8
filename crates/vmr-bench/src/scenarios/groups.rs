//! Scenario 12 (issue 17, part 3): how long a consistency group's cut pauses its members: four
//! stand-in VMs in one group, each group cut's pause (from the first member's `stop` to the
//! last member's `cont` answer, as the primary agent measures it) over several cuts.

use super::*;

/// The goal: a cut pauses 4 VMs for less than 20 ms.
const S12_LIMIT_MS: f64 = 20.0;
/// Members of the group.
const MEMBERS: usize = 4;

/// Scenario 12: the pause of a 4-VM group cut.
pub fn group_pause(ctx: &Ctx) -> Outcome {
    let mut o = Outcome::new(12, "Consistency group pause (4 VMs)", goal(12));
    let r = group_run(ctx, &mut o);
    finish(o, r)
}

fn group_run(ctx: &Ctx, o: &mut Outcome) -> anyhow::Result<()> {
    let cuts = if ctx.quick { 5 } else { 20 };
    o.method = format!(
        "{MEMBERS} qemu-storage-daemon stand-in VMs (one 16 MiB qcow2 disk each) replicated by \
         two agents on 127.0.0.1 every 5 s, in one group (`group create`). Each group cut \
         pauses every member (QMP `stop`; a stand-in has no vCPUs and no `stop`, so it counts \
         as stopped at once), runs each member's cycle transaction, and resumes every member \
         (`cont`); the pause is the primary agent's measure from the first `stop` order to the \
         last `cont` answer (`group list`, `last_pause_ms`), read after each of {cuts} \
         consecutive complete cuts. The machine was shared with other builds and test runs.{}",
        if ctx.quick {
            " Quick mode: 5 cuts; the full run takes 20."
        } else {
            ""
        }
    );
    let mut pair = Pair::in_dir(&ctx.exe, TestDir::given(&ctx.dir("s12"))?)?;
    let mut vms = Vec::new();
    let mut names = Vec::new();
    for i in 0..MEMBERS {
        let name = format!("bench-s12-{i}");
        let vm = StandIn::start_in(
            &pair.root.path().join("vms"),
            &pair.a.dir,
            &name,
            &[StandInDisk::new("disk0", 16 * MIB)],
        )?;
        vm.register(&pair.a)?;
        enable(&pair, &name, "5s", 0)?;
        names.push(name);
        vms.push(vm);
    }
    for name in &names {
        pair.a.wait_cycle(name, 2, Duration::from_secs(600))?;
    }
    let mut args = vec!["group", "create", "bench"];
    args.extend(names.iter().map(String::as_str));
    pair.a.ok(&args)?;
    let mut pauses = Vec::new();
    let mut seen = 0;
    let until = Instant::now() + Duration::from_secs(60 + 15 * cuts as u64);
    while pauses.len() < cuts {
        if Instant::now() > until {
            bail!("only {} complete group cuts in time", pauses.len());
        }
        let g = pair
            .a
            .groups()?
            .into_iter()
            .next()
            .context("the group is not listed")?;
        if g.cuts > seen {
            seen = g.cuts;
            pauses.push(g.last_pause_ms.context("a cut without a pause")? as f64);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let p50 = median(&pauses);
    let max = pauses.iter().copied().fold(0.0, f64::max);
    o.detail("pauses (ms)", samples(&pauses, |v| format!("{v:.0}")));
    o.ours = format!("median pause {p50:.0} ms, longest {max:.0} ms ({MEMBERS} VMs)");
    o.baseline = "- (Hyper-V Replica has no consistency groups)".into();
    o.ratio = format!("{p50:.0} ms");
    o.verdict = at_most(p50, S12_LIMIT_MS);
    drop(vms);
    let _ = pair.stop();
    remove_dir(pair.root.path());
    Ok(())
}
