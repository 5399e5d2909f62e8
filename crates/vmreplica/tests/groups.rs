//! Consistency groups end to end (issue 17, part 3; docs/groups.md) with real agents and three
//! qemu-storage-daemon stand-in VMs: `group create` refuses what cannot form a group and
//! changes nothing; a group's members are cut together and each group point the replica lists
//! exists for every member (each member's point tagged with it in its catalog); `status --json`
//! shows the group and its pause; a member whose cycle fails after the cut (test hook) leaves
//! that group point incomplete on the replica, never listed, and the next one is complete; a
//! member that cannot cut (paused) means no group point for anyone while the others keep
//! replicating on their own, and the next group point after it resumes is complete; the group
//! points survive a kill -9 of the replica agent; `group failover --test` starts every member's
//! test copy at its point of one group point; the membership survives a kill -9 of the primary
//! agent; `group remove` ends the group; a planned `group failover` starts every member at its
//! planned final point (refused while only some members are prepared), losing no write.

mod common;

use std::time::Duration;

use common::*;

const LONG: Duration = Duration::from_secs(120);
const VMS: [&str; 3] = ["grp-a", "grp-b", "grp-c"];

/// The replica's group tags of `vm`'s points, read from its store's catalog.
fn tags(p: &Pair, vm: &StandIn) -> TestResult<Vec<(u64, Option<vmr_proto::GroupTag>)>> {
    Ok(settled_store(&p.b, vm.def.uuid)?.group_tags(vm.def.uuid)?)
}

#[test]
fn group_points_exist_for_all_members_or_none() -> TestResult {
    let mut p = Pair::new(exe())?;
    let mut vms = Vec::new();
    for (i, name) in VMS.iter().enumerate() {
        let vm = StandIn::create(p.root.path(), &p.a, name, &["disk0"], 8)?;
        vm.write_random("disk0", 20, i as u64 + 1)?;
        vm.register(&p.a)?;
        vms.push(vm);
    }
    // Not enabled yet: refused, nothing recorded.
    let out = p.a.cli(&["group", "create", "db", VMS[0], VMS[1]])?;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not enabled"),
        "{out:?}"
    );
    // Every point kept (one a second): the test reads the catalogs' tags of past points.
    for name in VMS {
        p.enable(name, &["--frequency", "5s", "--retain", "1s=300"])?;
    }
    for name in VMS {
        p.wait_cycle(name, 2, LONG)?;
    }
    for (args, why) in [
        (vec!["bad name", VMS[0], VMS[1]], "invalid group name"),
        (vec!["db", VMS[0]], "2 to 32 members"),
        (vec!["db", VMS[0], VMS[0]], "named twice"),
        (vec!["db", VMS[0], "nope"], "no VM named nope"),
    ] {
        let mut a = vec!["group", "create"];
        a.extend_from_slice(&args);
        let out = p.a.cli(&a)?;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(why),
            "{args:?}: {out:?}"
        );
    }
    assert!(p.a.groups()?.is_empty());
    assert!(p.a.status(VMS[0])?.group.is_none());

    p.a.ok(&["group", "create", "db", VMS[0], VMS[1], VMS[2]])?;
    let created = std::time::Instant::now();
    let st = p.a.status(VMS[1])?;
    assert_eq!(st.group.as_ref().map(|g| g.name.as_str()), Some("db"));
    // A member of one group cannot join another.
    let out = p.a.cli(&["group", "create", "db2", VMS[0], VMS[1]])?;
    assert_eq!(out.status.code(), Some(2), "{out:?}");

    // Group cuts happen and each group point the replica lists has every member.
    for (i, vm) in vms.iter().enumerate() {
        vm.write_random("disk0", 10, 10 + i as u64)?;
    }
    wait_until(LONG, "two complete group cuts", || {
        Ok(p.a.groups()?.first().is_some_and(|g| g.cuts >= 2))
    })?;
    wait_until(LONG, "a complete group point on the replica", || {
        Ok(!p.b.group_points("db")?.is_empty())
    })?;
    let g = p.a.groups()?.remove(0);
    // Seen, not judged (the machine may be loaded): members cycle every 5 s, so a cut about
    // every 5 s; many more would mean members nudging each other into back-to-back cycles.
    eprintln!(
        "{} complete and {} failed cuts in {:.1} s",
        g.cuts,
        g.failed_cuts,
        created.elapsed().as_secs_f64()
    );
    assert_eq!(g.members.len(), 3);
    assert!(g.last_pause_ms.is_some(), "{g:?}");
    let st = p.a.status(VMS[2])?;
    let sg = st.group.expect("the status shows the group");
    assert!(sg.cuts >= 2 && sg.last_pause_ms.is_some(), "{sg:?}");
    let points = p.b.group_points("db")?;
    for gp in &points {
        assert_eq!(gp.members.len(), 3, "{gp:?}");
        for (name, id) in &gp.members {
            let vm = vms.iter().find(|v| &v.def.name == name).expect("a member");
            let t = tags(&p, vm)?;
            let tag = t
                .iter()
                .find(|(pid, _)| pid == id)
                .and_then(|(_, t)| t.clone())
                .expect("the member's point is tagged");
            assert_eq!((tag.group.as_str(), tag.point), ("db", gp.point));
            assert_eq!(tag.members.len(), 3);
        }
    }

    // A member whose cycle fails after the cut (test hook): the others' points of that group
    // point reach the replica, but the group point is never complete; the next one is.
    std::fs::write(p.a.dir.join("test-group-fail-after-cut"), VMS[1])?;
    wait_until(LONG, "the member's cycle failing after the cut", || {
        Ok(!p.a.dir.join("test-group-fail-after-cut").exists())
    })?;
    let b_tags = |p: &Pair| -> TestResult<Vec<u64>> {
        Ok(tags(p, &vms[1])?
            .into_iter()
            .filter_map(|(_, t)| t.map(|t| t.point))
            .collect())
    };
    // The group point the member missed: on grp-a's replica, tagged, without grp-b.
    let deadline = std::time::Instant::now() + LONG;
    let missed = loop {
        let have_b = b_tags(&p)?;
        let last_b = have_b.iter().max().copied().unwrap_or(0);
        let found = tags(&p, &vms[0])?
            .into_iter()
            .filter_map(|(_, t)| t.map(|t| t.point))
            .find(|gp| !have_b.contains(gp) && *gp < last_b);
        if let Some(gp) = found {
            break gp;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no group point without grp-b and a later one with it"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let listed = p.b.group_points("db")?;
    assert!(
        listed.iter().all(|g| g.point != missed),
        "group point {missed} is listed without grp-b: {listed:?}"
    );
    assert!(
        listed.iter().any(|g| g.point > missed),
        "a later group point is complete: {listed:?}"
    );

    // A member that cannot cut: no group point for anyone while it is paused; the others
    // keep replicating (ordinary points).
    p.a.ok(&["pause", VMS[2]])?;
    let failed_before = p.a.groups()?[0].failed_cuts;
    let a_cycle = p.a.status(VMS[0])?.last_cycle.unwrap_or(0);
    wait_until(LONG, "a failed group cut", || {
        Ok(p.a.groups()?[0].failed_cuts > failed_before)
    })?;
    // Once the failure is seen no complete point appears; note the newest complete one.
    let newest = p.b.group_points("db")?.first().map(|g| g.point);
    p.wait_cycle(VMS[0], a_cycle + 2, LONG)?;
    assert_eq!(
        p.b.group_points("db")?.first().map(|g| g.point),
        newest,
        "no group point while a member is paused"
    );
    let g = p.a.groups()?.remove(0);
    assert!(
        g.last_error.as_deref().unwrap_or("").contains("left"),
        "{g:?}"
    );
    // Resumed: the next group point is complete again.
    p.a.ok(&["resume", VMS[2]])?;
    wait_until(LONG, "a new complete group point", || {
        Ok(p.b.group_points("db")?.first().map(|g| g.point) > newest)
    })?;
    let latest = p.b.group_points("db")?.remove(0);
    assert_eq!(latest.members.len(), 3);

    // The replica agent killed: the group points are in the catalogs, still complete.
    p.b.kill9();
    p.b.restart()?;
    let after = p.b.group_points("db")?;
    assert!(after.iter().any(|g| g == &latest), "{after:?}");

    // Test failover of the group: every member's test copy starts at its point of one
    // group point (the latest complete one).
    let out =
        p.b.cli(&["group", "failover", "db", "--test", "--point", "1"])?;
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let newest = p.b.group_points("db")?.remove(0);
    let r: vmr_proto::api::GroupFailoverResult =
        serde_json::from_str(&p.b.json(&["group", "failover", "db", "--test"])?)?;
    assert_eq!(r.point, newest.point);
    assert_eq!(r.members.len(), 3);
    for ((name, id), fr) in newest.members.iter().zip(&r.members) {
        assert_eq!(fr.point, Some(*id), "{name}: {fr:?}");
        assert!(fr.test_id.is_some(), "{name}: {fr:?}");
    }
    for name in VMS {
        p.b.ok(&["failover", "stop-test", name])?;
    }

    // The primary agent killed: the membership is in the records; cuts go on after restart.
    p.a.kill9();
    p.a.restart()?;
    let g = p.a.groups()?.remove(0);
    assert_eq!(g.members.len(), 3, "{g:?}");
    wait_until(LONG, "a group cut after the primary's restart", || {
        Ok(p.a.groups()?.first().is_some_and(|g| g.cuts >= 1))
    })?;

    // Removed: no group any more.
    p.a.ok(&["group", "remove", "db"])?;
    assert!(p.a.groups()?.is_empty());
    assert!(p.a.status(VMS[0])?.group.is_none());
    let out = p.a.cli(&["group", "remove", "db"])?;
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    p.stop()?;
    Ok(())
}

/// Retention of a group (docs/groups.md, "Retention"): the members' policies differ (grp-a
/// keeps the points of 2 seconds, grp-b of 4); each group point is kept or pruned for both
/// together, so both hold the same group points, as many as the more generous policy keeps
/// (pruning each member on its own would leave grp-a with 2 of grp-b's 4, which the replica
/// then could not list as complete).
#[test]
fn group_retention_keeps_each_group_point_for_every_member() -> TestResult {
    let mut p = Pair::new(exe())?;
    let names = ["ret-a", "ret-b"];
    let mut vms = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let vm = StandIn::create(p.root.path(), &p.a, name, &["disk0"], 8)?;
        vm.write_random("disk0", 20, i as u64 + 1)?;
        vm.register(&p.a)?;
        vms.push(vm);
    }
    p.enable(names[0], &["--frequency", "5s", "--retain", "1s=2"])?;
    p.enable(names[1], &["--frequency", "5s", "--retain", "1s=4"])?;
    for name in names {
        p.wait_cycle(name, 1, LONG)?;
    }
    p.a.ok(&["group", "create", "rg", names[0], names[1]])?;
    // Six group cuts: more group points than either policy keeps.
    wait_until(Duration::from_secs(300), "six group cuts", || {
        Ok(p.a.groups()?.first().is_some_and(|g| g.cuts >= 6))
    })?;
    let group_points = |vm: &StandIn| -> TestResult<Vec<u64>> {
        let mut v: Vec<u64> = tags(&p, vm)?
            .into_iter()
            .filter_map(|(_, t)| t.filter(|t| t.group == "rg").map(|t| t.point))
            .collect();
        v.sort_unstable();
        Ok(v)
    };
    // Between one member's commit (and prune) and the other's, they differ for a moment.
    // Every group point held is complete, and listed (read together: a new cut may come
    // between two reads).
    let deadline = std::time::Instant::now() + LONG;
    loop {
        let a = group_points(&vms[0])?;
        let b = group_points(&vms[1])?;
        let listed: Vec<u64> = p.b.group_points("rg")?.iter().map(|g| g.point).collect();
        if a == b && a.len() == 4 && a.iter().all(|g| listed.contains(g)) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "both members holding the same 4 group points, all listed: {a:?} and {b:?}, \
             listed {listed:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // `points` names the group point as the reason each member point is kept (a point the
    // group drops shows no reason: the other member may have committed a newer group point
    // between the two reads).
    for vm in &vms {
        let listed: Vec<vmr_proto::api::PointInfo> =
            serde_json::from_str(&p.b.json(&["points", &vm.def.name])?)?;
        let mut by_group = 0;
        for (id, t) in tags(&p, vm)? {
            let (Some(t), Some(row)) = (t, listed.iter().find(|r| r.id == id)) else {
                continue;
            };
            let want = format!("group rg point {}", t.point);
            if row.kept_because.contains(&want) {
                by_group += 1;
            } else {
                assert!(row.kept_because.is_empty(), "{row:?}");
            }
        }
        assert!(by_group >= 3, "{listed:?}");
    }
    // ret-a's own untagged points from before the group are gone: its policy keeps 2
    // seconds of points and its group points are newer (a point it cut alone after a failed
    // round may be newer and kept).
    let a_tags = tags(&p, &vms[0])?;
    let first_tagged = a_tags
        .iter()
        .filter(|(_, t)| t.is_some())
        .map(|(id, _)| *id)
        .min()
        .expect("a tagged point");
    assert!(
        a_tags
            .iter()
            .all(|(id, t)| t.is_some() || *id > first_tagged),
        "{a_tags:?}"
    );
    p.stop()?;
    Ok(())
}

/// `group reverse` (docs/groups.md): refused while the members are not failed over (nothing
/// reversed); after a planned `group failover` it reverses every member and forms the group on
/// the new primary, whose cuts make complete group points on the old primary, now the replica.
#[test]
fn group_reverse_reverses_every_member_and_forms_the_group_there() -> TestResult {
    let mut p = Pair::new(exe())?;
    p.a.allow(&p.b)?;
    let names = ["rv-a", "rv-b"];
    let mut vms = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let vm = StandIn::create(p.root.path(), &p.a, name, &["disk0"], 8)?;
        vm.write_random("disk0", 20, i as u64 + 1)?;
        vm.register(&p.a)?;
        vms.push(vm);
    }
    // rv-a with a grid, rv-b with Hyper-V's form: the reversed relationships keep them.
    p.enable(names[0], &["--frequency", "5s", "--retain", "1h=24,1d=7"])?;
    p.enable(names[1], &["--frequency", "5s", "--recovery-points", "3"])?;
    for name in names {
        p.wait_cycle(name, 1, LONG)?;
    }
    p.a.ok(&["group", "create", "rg", names[0], names[1]])?;
    wait_until(LONG, "a complete group point on the replica", || {
        Ok(!p.b.group_points("rg")?.is_empty())
    })?;
    // Not failed over: refused, naming a member; nothing reversed.
    let out = p.b.cli(&["group", "reverse", "rg"])?;
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot be reversed"),
        "{out:?}"
    );
    for name in names {
        assert_eq!(
            p.b.status(name)?.mode,
            vmr_proto::api::ReplicationMode::Replica
        );
    }
    let out = p.b.cli(&["group", "reverse", "nope"])?;
    assert_eq!(out.status.code(), Some(4), "{out:?}");

    // Planned: each member prepared on the primary, the group failed over at the members'
    // planned final points (no resync needed: the old primary's VMs stay as they are).
    for name in names {
        p.a.ok(&["failover", "prepare", name])?;
    }
    let f: vmr_proto::api::GroupFailoverResult =
        serde_json::from_str(&p.b.json(&["group", "failover", "rg"])?)?;
    assert_eq!(f.members.len(), 2);
    assert!(f.planned, "{f:?}");
    let r: vmr_proto::api::GroupReverseResult =
        serde_json::from_str(&p.b.json(&["group", "reverse", "rg", "--frequency", "5s"])?)?;
    assert_eq!(r.members.len(), 2, "{r:?}");
    let groups = p.b.groups()?;
    assert_eq!(groups.len(), 1, "{groups:?}");
    assert_eq!(groups[0].name, "rg");
    assert_eq!(groups[0].members.len(), 2);
    for name in names {
        let st = p.b.status(name)?;
        assert_eq!(st.mode, vmr_proto::api::ReplicationMode::Primary);
        assert_eq!(st.group.map(|g| g.name), Some("rg".to_owned()));
        let policy = st.retention.expect("the reversed primary's retention");
        if name == names[0] {
            assert_eq!(
                policy.grid.map(|g| g.to_string()).as_deref(),
                Some("1h=24,1d=7")
            );
        } else {
            assert_eq!((policy.hourly, policy.grid), (3, None));
        }
        // The old primary is the replica now and no longer in a group.
        let sa = p.a.status(name)?;
        assert_eq!(sa.mode, vmr_proto::api::ReplicationMode::Replica);
        assert!(sa.group.is_none());
    }
    assert!(p.a.groups()?.is_empty());
    // The reversed group cuts together: complete group points on the old primary.
    wait_until(
        Duration::from_secs(300),
        "a complete group point on the old primary",
        || Ok(!p.a.group_points("rg")?.is_empty()),
    )?;
    for gp in p.a.group_points("rg")? {
        assert_eq!(gp.members.len(), 2, "{gp:?}");
    }
    // Nothing left to reverse here.
    let out = p.b.cli(&["group", "reverse", "rg"])?;
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    p.stop()?;
    Ok(())
}

/// Planned failover of a group (docs/groups.md, "Planned failover of a group"): `group
/// prepare` refuses a group with a paused member (nothing prepared); writes no group point
/// holds; with one member prepared `group failover` is refused (exit 5, naming the member not
/// prepared) and nothing starts; `group prepare` prepares the rest (skipping the prepared
/// one); with every member prepared each member starts at
/// its planned final point and its started VM holds every write (hashes), while its point of
/// the latest group point does not; `group reverse` then replicates back without a resync (only
/// new writes travel), and the old primary's replica matches.
#[test]
fn planned_group_failover_starts_every_member_at_its_final_point() -> TestResult {
    let mut p = Pair::new(exe())?;
    p.a.allow(&p.b)?;
    let names = ["pl-a", "pl-b"];
    let mut vms = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let vm = StandIn::create(p.root.path(), &p.a, name, &["disk0"], 8)?;
        vm.write_random("disk0", 20, i as u64 + 1)?;
        vm.register(&p.a)?;
        vms.push(vm);
    }
    // 30 s cycles: the writes below and the first prepare come well before the next cut
    // (after a member is prepared no group cut can happen any more).
    for name in names {
        p.enable(name, &["--frequency", "30s"])?;
    }
    for name in names {
        p.wait_cycle(name, 1, LONG)?;
    }
    p.a.ok(&["group", "create", "pg", names[0], names[1]])?;
    // `group prepare` checks every member first: one paused → refused (exit 5) naming it,
    // nothing prepared; an unknown group exits 4.
    p.a.ok(&["pause", names[1]])?;
    let out = p.a.cli(&["group", "prepare", "pg"])?;
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("\"pl-b\" cannot be prepared"),
        "{out:?}"
    );
    assert_eq!(
        p.a.status(names[0])?.state,
        vmr_proto::api::ReplicationState::Replicating
    );
    p.a.ok(&["resume", names[1]])?;
    let out = p.a.cli(&["group", "prepare", "nope"])?;
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    wait_until(LONG, "a complete group point on the replica", || {
        Ok(!p.b.group_points("pg")?.is_empty())
    })?;
    // The guests write after the group point, then are prepared for a planned failover.
    let mut finals = Vec::new();
    for (i, vm) in vms.iter().enumerate() {
        vm.write_random("disk0", 30, 50 + i as u64)?;
        finals.push(vm.hash("disk0")?);
    }
    let prepare = |name: &str| -> TestResult<u64> {
        let r: vmr_proto::api::FailoverResult =
            serde_json::from_str(&p.a.json(&["failover", "prepare", name])?)?;
        Ok(r.point.expect("a final cycle"))
    };
    let mut planned = vec![prepare(names[0])?];
    p.b.wait_cycle(names[0], planned[0], LONG)?;
    // One member prepared, the other not: refused, naming it; nothing starts.
    let out = p.b.cli(&["group", "failover", "pg"])?;
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("but pl-b not") && err.contains("--latest-group-point"),
        "{out:?}"
    );
    for name in names {
        let st = p.b.status(name)?;
        assert_eq!(st.mode, vmr_proto::api::ReplicationMode::Replica);
        assert_ne!(
            st.state,
            vmr_proto::api::ReplicationState::FailedOverWaitingCompletion
        );
    }
    // `group prepare` prepares the rest (pl-a, prepared already, is skipped).
    let gpr: vmr_proto::api::GroupPrepareResult =
        serde_json::from_str(&p.a.json(&["group", "prepare", "pg"])?)?;
    assert_eq!(gpr.members.len(), 1, "{gpr:?}");
    assert_eq!(gpr.members[0].name, names[1]);
    planned.push(gpr.members[0].point.expect("a final cycle"));
    p.b.wait_cycle(names[1], planned[1], LONG)?;
    for name in names {
        assert_eq!(
            p.a.status(name)?.state,
            vmr_proto::api::ReplicationState::PreparedForFailover
        );
    }

    let gp = p.b.group_points("pg")?.remove(0);
    let f: vmr_proto::api::GroupFailoverResult =
        serde_json::from_str(&p.b.json(&["group", "failover", "pg"])?)?;
    assert!(f.planned, "{f:?}");
    assert_eq!(f.point, gp.point);
    assert_eq!(f.members.len(), 2);
    let mut started = Vec::new();
    for (i, vm) in vms.iter().enumerate() {
        // Members come in the group point's order.
        let fr = f
            .members
            .iter()
            .find(|r| r.name == names[i])
            .expect("the member's failover");
        assert_eq!(fr.point, Some(planned[i]), "{fr:?}");
        let (_, at_gp) = gp
            .members
            .iter()
            .find(|(m, _)| m == names[i])
            .expect("the member's point of the group point");
        assert!(planned[i] > *at_gp, "{planned:?} {gp:?}");
        // The group point lacks the last writes; the started VM has them all.
        let old = replica_hashes(&p.b, vm.def.uuid, Some(*at_gp))?;
        assert_ne!(
            old[0].1, finals[i],
            "{}: the group point holds the writes",
            names[i]
        );
        let on_b = StandIn::attach(vm.def.clone(), nbd_socket(&p.b.dir, vm.def.uuid));
        assert_eq!(
            on_b.hash("disk0")?,
            finals[i],
            "{}: the planned group failover lost writes",
            names[i]
        );
        started.push(on_b);
    }

    // Reverse: the old primary's VMs are at the planned points, so only new writes travel.
    let r: vmr_proto::api::GroupReverseResult =
        serde_json::from_str(&p.b.json(&["group", "reverse", "pg", "--frequency", "5s"])?)?;
    assert_eq!(r.members.len(), 2, "{r:?}");
    let mut new_hashes = Vec::new();
    for (i, vm) in started.iter().enumerate() {
        vm.write_random("disk0", 8, 70 + i as u64)?;
        new_hashes.push(vm.hash("disk0")?);
    }
    // The newest complete group point on the old primary comes to hold the new writes of
    // both members (a cut in flight during the writes may hold only part of them).
    wait_every(
        Duration::from_secs(300),
        Duration::from_secs(1),
        "a complete group point on the old primary with the new writes",
        || {
            let Some(newest) = p.a.group_points("pg")?.into_iter().next() else {
                return Ok(false);
            };
            for (i, vm) in vms.iter().enumerate() {
                let Some((_, id)) = newest.members.iter().find(|(m, _)| m == names[i]) else {
                    return Ok(false);
                };
                // A read racing a prune is retried at the next poll.
                let Ok(h) = replica_hashes(&p.a, vm.def.uuid, Some(*id)) else {
                    return Ok(false);
                };
                if h[0].1 != new_hashes[i] {
                    return Ok(false);
                }
            }
            Ok(true)
        },
    )?;
    for name in names {
        let st = p.b.status(name)?;
        assert_eq!(st.mode, vmr_proto::api::ReplicationMode::Primary);
        assert!(
            st.stats.total_bytes <= 8 * 65536 * 2,
            "{name}: the reverse sent more than the new writes: {}",
            st.stats.total_bytes
        );
    }
    p.stop()?;
    Ok(())
}
