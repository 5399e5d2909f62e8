//! Consistency groups' decisions (docs/groups.md): who may form a group
//! ([`check_group_create`]), one group cut's rounds ([`GroupCut`]: gather the members, pause
//! them all, run each member's transaction, resume them all in every path, measure the pause),
//! which group points a replica holds complete ([`complete_points`]), and which of a member's
//! points retention keeps so that a group point is kept or pruned for all members together
//! ([`group_retention`]), which members `group reverse` reverses ([`plan_group_reverse`]),
//! which members `group prepare` prepares ([`plan_group_prepare`]) and at which point each
//! member `group failover` starts ([`plan_group_failover`]).
//! Sans-IO like the rest of the crate: time arrives with every event.

use std::collections::BTreeSet;

use vmr_proto::GroupTag;
use vmr_proto::Uuid;
use vmr_proto::api::ReplicationMode;
use vmr_proto::state::ReplicationState;
use vmr_proto::store::PointKind;

use crate::failover::failover_transition;
use crate::refusal::{Op, Refusal};

/// Most members of one group.
pub const MAX_MEMBERS: usize = 32;
/// Longest group name, bytes.
pub const MAX_NAME_LEN: usize = 64;
/// How long a round waits for all members to become ready, and then for each later phase,
/// before it gives up (ms).
pub const PHASE_TIMEOUT_MS: u64 = 30_000;

/// Why a group cannot be created as asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GroupRefusal {
    /// The name is empty, too long or has characters outside `[A-Za-z0-9._-]`.
    #[error("invalid group name {0:?}: use 1 to 64 of A-Z a-z 0-9 . _ -")]
    BadName(String),
    /// A group of this name exists.
    #[error("a group named {0} exists already")]
    Exists(String),
    /// Fewer than two members, or more than [`MAX_MEMBERS`].
    #[error("a group has 2 to {MAX_MEMBERS} members, not {0}")]
    Size(usize),
    /// More members than cycles may run at once: they could never all cut together.
    #[error(
        "a group of {members} VMs cannot be cut at once: the agent runs at most {slots} cycles \
         at a time (max-concurrent-cycles in config.toml)"
    )]
    Slots {
        /// Members asked for.
        members: usize,
        /// The agent's concurrent cycle limit.
        slots: usize,
    },
    /// A VM named twice.
    #[error("VM {0} is named twice")]
    Twice(String),
    /// No VM of this name is registered.
    #[error("no VM named {0} is registered on this agent")]
    Unknown(String),
    /// The VM is a replica here.
    #[error("VM {0} is a replica VM on this host; a group's members are primary VMs")]
    Replica(String),
    /// The VM's replication is not enabled.
    #[error("replication of VM {0} is not enabled (enable it first)")]
    NotEnabled(String),
    /// The VM is libvirt-managed: its cut is a libvirt backup job, which cannot join a group's
    /// pause.
    #[error("VM {0} is libvirt-managed: consistency groups are not built for libvirt VMs yet")]
    Libvirt(String),
    /// The VM belongs to another group.
    #[error("VM {0} is a member of group {1} already")]
    InGroup(String, String),
    /// The members replicate to different replica agents.
    #[error(
        "VM {0} replicates to {1} but VM {2} to {3}: a group's members share one replica agent"
    )]
    Replicas(String, String, String, String),
}

/// What the agent knows of one VM named in `group create`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Candidate {
    /// Not registered.
    Unknown,
    /// A replica VM here.
    Replica,
    /// A primary VM whose replication is not enabled.
    NotEnabled,
    /// A libvirt-managed VM (captured through libvirt's backup API, which cannot join a
    /// group's cut).
    Libvirt,
    /// An enabled primary VM: its replica agent's address and its group, if any.
    Enabled {
        /// The replica agent (`host:port`).
        replica: String,
        /// The group it is in.
        group: Option<String>,
    },
}

/// Whether a group name is valid.
pub fn check_group_name(name: &str) -> Result<(), GroupRefusal> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(GroupRefusal::BadName(name.to_owned()))
    }
}

/// The one rule for `group create NAME VM...`: `existing` are the groups there are, `members`
/// each named VM with what the agent knows of it, in the order given; `slots` how many cycles
/// the agent runs at once.
pub fn check_group_create(
    name: &str,
    existing: &[String],
    members: &[(String, Candidate)],
    slots: usize,
) -> Result<(), GroupRefusal> {
    check_group_name(name)?;
    if existing.iter().any(|g| g == name) {
        return Err(GroupRefusal::Exists(name.to_owned()));
    }
    if members.len() < 2 || members.len() > MAX_MEMBERS {
        return Err(GroupRefusal::Size(members.len()));
    }
    if members.len() > slots {
        return Err(GroupRefusal::Slots {
            members: members.len(),
            slots,
        });
    }
    let mut first: Option<(&str, &str)> = None;
    for (i, (vm, c)) in members.iter().enumerate() {
        if members[..i].iter().any(|(o, _)| o == vm) {
            return Err(GroupRefusal::Twice(vm.clone()));
        }
        match c {
            Candidate::Unknown => return Err(GroupRefusal::Unknown(vm.clone())),
            Candidate::Replica => return Err(GroupRefusal::Replica(vm.clone())),
            Candidate::NotEnabled => return Err(GroupRefusal::NotEnabled(vm.clone())),
            Candidate::Libvirt => return Err(GroupRefusal::Libvirt(vm.clone())),
            Candidate::Enabled { group: Some(g), .. } => {
                return Err(GroupRefusal::InGroup(vm.clone(), g.clone()));
            }
            Candidate::Enabled { replica, .. } => match first {
                None => first = Some((vm, replica)),
                Some((fvm, frep)) if frep != replica => {
                    return Err(GroupRefusal::Replicas(
                        fvm.to_owned(),
                        frep.to_owned(),
                        vm.clone(),
                        replica.clone(),
                    ));
                }
                Some(_) => {}
            },
        }
    }
    Ok(())
}

/// An event of one group cut round. `member` is the index in the round's member list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupEvent {
    /// The member's cycle is prepared up to its transaction.
    Ready {
        /// Member.
        member: usize,
        /// Now.
        now_ms: u64,
    },
    /// The member will not take part (its cycle could not start, or ended before its cut).
    Left {
        /// Member.
        member: usize,
        /// Now.
        now_ms: u64,
        /// Why.
        reason: String,
    },
    /// The member's `stop` answered: `Ok(true)` paused, `Ok(false)` nothing to pause (a
    /// storage daemon without vCPUs).
    Stopped {
        /// Member.
        member: usize,
        /// Now.
        now_ms: u64,
        /// The outcome.
        result: Result<bool, String>,
    },
    /// The member's transaction answered.
    Cut {
        /// Member.
        member: usize,
        /// Now.
        now_ms: u64,
        /// The outcome.
        result: Result<(), String>,
    },
    /// The member's `cont` answered (or nothing needed continuing).
    Continued {
        /// Member.
        member: usize,
        /// Now.
        now_ms: u64,
        /// The outcome.
        result: Result<(), String>,
    },
    /// Time passed.
    Tick {
        /// Now.
        now_ms: u64,
    },
}

/// What the coordinator carries out for a round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupAction {
    /// Pause these members (QMP `stop`).
    Stop(Vec<usize>),
    /// Run these members' transactions.
    Cut(Vec<usize>),
    /// These ready members cut on their own, outside the group (the round failed before any
    /// pause).
    Alone(Vec<usize>),
    /// Resume these members (QMP `cont` where they were paused); `grouped`: their points are
    /// the group point (every member's transaction succeeded).
    Cont {
        /// Members.
        members: Vec<usize>,
        /// Tag the points with the group point.
        grouped: bool,
    },
    /// The round ended.
    Finished(GroupOutcome),
}

/// How a round ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupOutcome {
    /// The group point's id.
    pub point: u64,
    /// Every member was cut inside one pause: the group point exists (once all are applied).
    pub complete: bool,
    /// From the first `stop` to the last `cont` answer, when members were paused.
    pub pause_ms: Option<u64>,
    /// Why the round failed.
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum M {
    Waiting,
    Ready,
    Stopping,
    Stopped,
    Cutting,
    Cut,
    Continuing,
    Done,
    Out,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Gathering,
    Stopping,
    Cutting,
    Continuing,
    Done,
}

/// One group cut round: gather, stop all, cut each, cont all.
#[derive(Debug, Clone)]
pub struct GroupCut {
    point: u64,
    members: Vec<M>,
    phase: Phase,
    phase_since_ms: u64,
    first_stop_ms: Option<u64>,
    failure: Option<String>,
    grouped: bool,
}

impl GroupCut {
    /// A round of `members` members for group point `point`, started at `now_ms`.
    pub fn new(point: u64, members: usize, now_ms: u64) -> GroupCut {
        GroupCut {
            point,
            members: vec![M::Waiting; members],
            phase: Phase::Gathering,
            phase_since_ms: now_ms,
            first_stop_ms: None,
            failure: None,
            grouped: false,
        }
    }

    /// The group point's id.
    pub fn point(&self) -> u64 {
        self.point
    }

    /// The round ended.
    pub fn finished(&self) -> bool {
        self.phase == Phase::Done
    }

    /// Whether `member` is still waited for to become ready.
    pub fn waiting(&self, member: usize) -> bool {
        self.phase == Phase::Gathering && self.members.get(member) == Some(&M::Waiting)
    }

    fn all(&self, pick: impl Fn(&M) -> bool) -> Vec<usize> {
        (0..self.members.len())
            .filter(|i| pick(&self.members[*i]))
            .collect()
    }

    fn fail(&mut self, why: String) {
        if self.failure.is_none() {
            self.failure = Some(why);
        }
    }

    fn set(&mut self, member: usize, from: &[M], to: M) -> bool {
        match self.members.get_mut(member) {
            Some(m) if from.contains(m) => {
                *m = to;
                true
            }
            _ => false,
        }
    }

    /// Feed an event; the actions to carry out, in order. Events that do not fit the round's
    /// phase (late, repeated, unknown member) change nothing, except that a member ready after
    /// the gathering ended is told to cut alone.
    pub fn step(&mut self, ev: GroupEvent) -> Vec<GroupAction> {
        let mut out = Vec::new();
        match ev {
            GroupEvent::Ready { member, now_ms } => {
                if self.phase == Phase::Gathering {
                    if self.set(member, &[M::Waiting], M::Ready) {
                        self.after_gathering(now_ms, &mut out);
                    }
                } else if self.set(member, &[M::Waiting, M::Out], M::Out) {
                    out.push(GroupAction::Alone(vec![member]));
                }
            }
            GroupEvent::Left {
                member,
                now_ms,
                reason,
            } => {
                if self.phase == Phase::Gathering
                    && self.set(member, &[M::Waiting, M::Ready], M::Out)
                {
                    self.fail(format!("member {member} left: {reason}"));
                    self.after_gathering(now_ms, &mut out);
                } else {
                    self.set(member, &[M::Waiting], M::Out);
                }
            }
            GroupEvent::Stopped {
                member,
                now_ms,
                result,
            } => {
                if self.phase == Phase::Stopping && self.set(member, &[M::Stopping], M::Stopped) {
                    if let Err(e) = result {
                        self.fail(format!("member {member}: stop failed: {e}"));
                    }
                    self.after_stopping(now_ms, &mut out);
                }
            }
            GroupEvent::Cut {
                member,
                now_ms,
                result,
            } => {
                if self.phase == Phase::Cutting && self.set(member, &[M::Cutting], M::Cut) {
                    if let Err(e) = result {
                        self.fail(format!("member {member}: transaction failed: {e}"));
                    }
                    self.after_cutting(now_ms, &mut out);
                }
            }
            GroupEvent::Continued {
                member,
                now_ms,
                result,
            } => {
                if self.phase == Phase::Continuing && self.set(member, &[M::Continuing], M::Done) {
                    if let Err(e) = result {
                        // The cut stands; the VM may still be paused: the driver logs it.
                        self.fail(format!("member {member}: cont failed: {e}"));
                    }
                    self.after_continuing(now_ms, &mut out);
                }
            }
            GroupEvent::Tick { now_ms } => {
                if self.phase != Phase::Done
                    && now_ms.saturating_sub(self.phase_since_ms) >= PHASE_TIMEOUT_MS
                {
                    self.timeout(now_ms, &mut out);
                }
            }
        }
        out
    }

    fn timeout(&mut self, now_ms: u64, out: &mut Vec<GroupAction>) {
        let phase = self.phase;
        self.fail(format!(
            "timed out after {} s in phase {phase:?}",
            PHASE_TIMEOUT_MS / 1000
        ));
        match phase {
            Phase::Gathering => {
                for m in self.members.iter_mut() {
                    if *m == M::Waiting {
                        *m = M::Out;
                    }
                }
                self.after_gathering(now_ms, out);
            }
            Phase::Stopping | Phase::Cutting => {
                // Resume everyone ordered to stop, whatever they answered.
                for m in self.members.iter_mut() {
                    if matches!(m, M::Stopping | M::Stopped | M::Cutting | M::Cut) {
                        *m = M::Cut;
                    }
                }
                self.phase = Phase::Cutting;
                self.after_cutting(now_ms, out);
            }
            Phase::Continuing => {
                for m in self.members.iter_mut() {
                    if *m == M::Continuing {
                        *m = M::Done;
                    }
                }
                self.after_continuing(now_ms, out);
            }
            Phase::Done => {}
        }
    }

    fn after_gathering(&mut self, now_ms: u64, out: &mut Vec<GroupAction>) {
        if self.members.contains(&M::Waiting) {
            return;
        }
        if self.failure.is_some() {
            let ready = self.all(|m| *m == M::Ready);
            for i in &ready {
                self.members[*i] = M::Out;
            }
            if !ready.is_empty() {
                out.push(GroupAction::Alone(ready));
            }
            self.finish(now_ms, out);
            return;
        }
        let all: Vec<usize> = (0..self.members.len()).collect();
        for m in self.members.iter_mut() {
            *m = M::Stopping;
        }
        self.phase = Phase::Stopping;
        self.phase_since_ms = now_ms;
        self.first_stop_ms = Some(now_ms);
        out.push(GroupAction::Stop(all));
    }

    fn after_stopping(&mut self, now_ms: u64, out: &mut Vec<GroupAction>) {
        if self.members.contains(&M::Stopping) {
            return;
        }
        if self.failure.is_some() {
            // No transaction: resume everyone at once.
            for m in self.members.iter_mut() {
                *m = M::Cut;
            }
            self.phase = Phase::Cutting;
            self.after_cutting(now_ms, out);
            return;
        }
        let all = self.all(|m| *m == M::Stopped);
        for i in &all {
            self.members[*i] = M::Cutting;
        }
        self.phase = Phase::Cutting;
        self.phase_since_ms = now_ms;
        out.push(GroupAction::Cut(all));
    }

    fn after_cutting(&mut self, now_ms: u64, out: &mut Vec<GroupAction>) {
        if self.members.contains(&M::Cutting) {
            return;
        }
        let all = self.all(|m| *m == M::Cut);
        for i in &all {
            self.members[*i] = M::Continuing;
        }
        self.grouped = self.failure.is_none();
        self.phase = Phase::Continuing;
        self.phase_since_ms = now_ms;
        out.push(GroupAction::Cont {
            members: all,
            grouped: self.grouped,
        });
    }

    fn after_continuing(&mut self, now_ms: u64, out: &mut Vec<GroupAction>) {
        if self.members.contains(&M::Continuing) {
            return;
        }
        self.finish(now_ms, out);
    }

    fn finish(&mut self, now_ms: u64, out: &mut Vec<GroupAction>) {
        self.phase = Phase::Done;
        out.push(GroupAction::Finished(GroupOutcome {
            point: self.point,
            complete: self.grouped,
            pause_ms: self.first_stop_ms.map(|s| now_ms.saturating_sub(s)),
            reason: self.failure.clone(),
        }));
    }
}

/// One complete group point on a replica: every member listed in its tag holds its point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupPoint {
    /// The group point's id.
    pub point: u64,
    /// Each member's VM and recovery point id, in the tag's member order.
    pub members: Vec<(Uuid, u64)>,
}

/// One VM's recovery points on a replica, each with the group point tag it carries.
pub type TaggedPoints = (Uuid, Vec<(u64, Option<GroupTag>)>);

/// The complete points of group `group`, newest first, from each VM's recovery points with
/// their tags: a tagged point counts only when every member its tag names holds a point
/// tagged with the same group and group point.
pub fn complete_points(group: &str, vms: &[TaggedPoints]) -> Vec<GroupPoint> {
    let find = |vm: Uuid, point: u64| -> Option<u64> {
        vms.iter().find(|(u, _)| *u == vm).and_then(|(_, pts)| {
            pts.iter()
                .find(|(_, t)| {
                    t.as_ref()
                        .is_some_and(|t| t.group == group && t.point == point)
                })
                .map(|(id, _)| *id)
        })
    };
    let mut out: Vec<GroupPoint> = Vec::new();
    for (_, pts) in vms {
        for (_, tag) in pts {
            let Some(t) = tag.as_ref().filter(|t| t.group == group) else {
                continue;
            };
            if out.iter().any(|g| g.point == t.point) || t.members.is_empty() {
                continue;
            }
            let members: Option<Vec<(Uuid, u64)>> = t
                .members
                .iter()
                .map(|m| find(*m, t.point).map(|id| (*m, id)))
                .collect();
            if let Some(members) = members {
                out.push(GroupPoint {
                    point: t.point,
                    members,
                });
            }
        }
    }
    out.sort_by_key(|g| std::cmp::Reverse(g.point));
    out
}

/// Where one member of a group stands on the failed-over host, for `group reverse`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReverseMember {
    /// Still this host's replica VM, in this state.
    Replica(ReplicationState),
    /// A primary VM here already: reversed by an earlier `group reverse` that stopped part way.
    Primary,
}

/// `group reverse NAME` (docs/groups.md): the members to reverse, in the order given, or the
/// first member whose reverse the replica machine's rule refuses (`failover_transition`, the
/// same rule each member's machine applies), with its refusal, before anything is reversed.
/// Members already primary here are skipped, so a `group reverse` that stopped part way can be
/// run again.
pub fn plan_group_reverse(
    members: &[(String, ReverseMember)],
) -> Result<Vec<String>, (String, Refusal)> {
    let mut out = Vec::new();
    for (name, m) in members {
        match m {
            ReverseMember::Primary => {}
            ReverseMember::Replica(state) => {
                failover_transition(ReplicationMode::Replica, *state, Op::Reverse, true)
                    .map_err(|r| (name.clone(), r))?;
                out.push(name.clone());
            }
        }
    }
    Ok(out)
}

/// How `group failover` was asked to choose its members' points (docs/groups.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailoverPick {
    /// No option: every member's planned final point when every member has one, the group
    /// point when none has, refused when only some have.
    Default,
    /// `--latest-group-point`, `--point` or `--test`: the group point, whatever planned
    /// final points exist.
    GroupPoint,
}

/// One member of a group as `group failover` sees it on the replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailoverMember {
    /// The member VM's name.
    pub name: String,
    /// Its recovery point of the chosen group point.
    pub group_point: u64,
    /// Its planned final point (`failover prepare`'s final cycle), when its latest point is
    /// one.
    pub planned: Option<u64>,
}

/// Where `group failover` starts its members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailoverPlan {
    /// Each member's name and the recovery point it starts at, in the group's member order.
    pub members: Vec<(String, u64)>,
    /// The points are the members' planned final points (every member was prepared), not
    /// the group point's.
    pub planned: bool,
}

/// Why `group failover` refuses to choose.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GroupFailoverRefusal {
    /// Some members were prepared for a planned failover and some were not: the planned
    /// points are not one consistent set, and the group point would drop the prepared
    /// members' final cycles.
    #[error(
        "group {group}: {} prepared for a planned failover (failover prepare) but {} not; \
         prepare {} too, or fail over at the latest group point with --latest-group-point \
         (the prepared members' final cycles are then not used)",
        prepared.join(", "),
        not_prepared.join(", "),
        if not_prepared.len() == 1 { "it" } else { "them" }
    )]
    PartlyPrepared {
        /// The group.
        group: String,
        /// Members with a planned final point.
        prepared: Vec<String>,
        /// Members without one.
        not_prepared: Vec<String>,
    },
}

/// `group failover NAME` (docs/groups.md): each member's starting point. Every member's VM
/// was stopped before its planned final cycle, so when **every** member has a planned final
/// point the set of final points is consistent (nothing runs after any of them) and newer
/// than any group point: they are used, and nothing written before the shutdown is lost.
/// When none has one, the group point's member points are used (an unplanned failover).
/// When only some have one, the command is refused naming the members not prepared, unless
/// `pick` asks for the group point explicitly.
pub fn plan_group_failover(
    group: &str,
    members: &[FailoverMember],
    pick: FailoverPick,
) -> Result<FailoverPlan, GroupFailoverRefusal> {
    let at_group_point = || FailoverPlan {
        members: members
            .iter()
            .map(|m| (m.name.clone(), m.group_point))
            .collect(),
        planned: false,
    };
    if pick == FailoverPick::GroupPoint {
        return Ok(at_group_point());
    }
    let (prepared, not_prepared): (Vec<&FailoverMember>, Vec<&FailoverMember>) =
        members.iter().partition(|m| m.planned.is_some());
    if prepared.is_empty() {
        return Ok(at_group_point());
    }
    if !not_prepared.is_empty() {
        let names = |v: &[&FailoverMember]| v.iter().map(|m| m.name.clone()).collect();
        return Err(GroupFailoverRefusal::PartlyPrepared {
            group: group.to_owned(),
            prepared: names(&prepared),
            not_prepared: names(&not_prepared),
        });
    }
    Ok(FailoverPlan {
        members: members
            .iter()
            .map(|m| (m.name.clone(), m.planned.unwrap_or(m.group_point)))
            .collect(),
        planned: true,
    })
}

/// `group prepare NAME` (the primary; docs/groups.md): the members to prepare for a planned
/// failover, in the order given, or the first member whose prepare the primary machine's
/// rule refuses (`failover_transition`, the rule each member's machine applies), with its
/// refusal, before any is prepared. A member is given with its state and whether it has a
/// replicated point; members already PreparedForFailover (by `failover prepare` or an earlier
/// `group prepare` that stopped part way) are skipped.
pub fn plan_group_prepare(
    members: &[(String, ReplicationState, bool)],
) -> Result<Vec<String>, (String, Refusal)> {
    let mut out = Vec::new();
    for (name, state, has_point) in members {
        if *state == ReplicationState::PreparedForFailover {
            continue;
        }
        failover_transition(ReplicationMode::Primary, *state, Op::Prepare, *has_point)
            .map_err(|r| (name.clone(), r))?;
        out.push(name.clone());
    }
    Ok(out)
}

/// One recovery point as group retention sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetainPoint {
    /// The point's id.
    pub id: u64,
    /// Its cut time, ms since the Unix epoch.
    pub taken_at_ms: u64,
    /// Its consistency type.
    pub kind: PointKind,
    /// The group point it belongs to, if any.
    pub group: Option<GroupTag>,
}

/// One VM's points on a replica, for [`group_retention`].
pub type RetainPoints = (Uuid, Vec<RetainPoint>);

/// The ids of VM `vm`'s points that retention drops, ascending, when some of its points belong
/// to consistency group points (docs/groups.md, "Retention"): each group point is kept or
/// dropped for all its members together.
///
/// `vms` holds every VM of the replica store that may be a member (at least `vm`), each with
/// its points. `keeps(member, points)` is that member's own retention policy applied to
/// `points` (their `group` is None): the ids it keeps. The rules, per group name `g` of
/// `vm`'s points:
///
/// * the **group points** are every group point of `g` any VM holds a point of; each is seen
///   as one point whose id and time are the group point's id (the coordinator's clock at the
///   cut, the same for every member) and whose kind is crash-consistent (a group cut is);
/// * a group point is kept when it is the newest, or when any member's policy (every VM its
///   tags name) applied to that list keeps it: the union of the members' policies;
/// * `vm`'s point of a group point is kept exactly when the group point is.
///
/// Then `vm`'s untagged points go through its own policy together with its kept tagged points
/// (so that a kept group point counts in its period), and `vm`'s latest point is always kept.
/// The decision for a group point depends only on the list of group points and the members'
/// policies, which every member sees alike: a member that prunes later finds the group point
/// still in its own catalog and drops it too (a policy never keeps again what it dropped once
/// newer points arrive), so the order in which members prune does not matter.
pub fn group_retention(
    vm: Uuid,
    vms: &[RetainPoints],
    keeps: &dyn Fn(Uuid, &[RetainPoint]) -> BTreeSet<u64>,
) -> Vec<u64> {
    let Some((_, own)) = vms.iter().find(|(u, _)| *u == vm) else {
        return Vec::new();
    };
    let Some(latest) = own.iter().map(|p| p.id).max() else {
        return Vec::new();
    };
    let mut groups: Vec<&str> = own
        .iter()
        .filter_map(|p| p.group.as_ref().map(|t| t.group.as_str()))
        .collect();
    groups.sort_unstable();
    groups.dedup();
    // `vm`'s tagged points the group decision keeps.
    let mut tagged_keep: BTreeSet<u64> = BTreeSet::new();
    for g in groups {
        let tags = || {
            vms.iter()
                .flat_map(|(_, pts)| pts.iter())
                .filter_map(|p| p.group.as_ref().filter(|t| t.group == g))
        };
        let points: BTreeSet<u64> = tags().map(|t| t.point).collect();
        let mut members: Vec<Uuid> = tags().flat_map(|t| t.members.iter().copied()).collect();
        members.sort_unstable();
        members.dedup();
        let list: Vec<RetainPoint> = points
            .iter()
            .map(|&gp| RetainPoint {
                id: gp,
                taken_at_ms: gp,
                kind: PointKind::CrashConsistent,
                group: None,
            })
            .collect();
        let mut kept: BTreeSet<u64> = points.last().copied().into_iter().collect();
        for m in members {
            kept.extend(keeps(m, &list));
        }
        for p in own {
            if p.group
                .as_ref()
                .is_some_and(|t| t.group == g && kept.contains(&t.point))
            {
                tagged_keep.insert(p.id);
            }
        }
    }
    let candidates: Vec<RetainPoint> = own
        .iter()
        .filter(|p| p.group.is_none() || tagged_keep.contains(&p.id))
        .map(|p| RetainPoint {
            group: None,
            ..p.clone()
        })
        .collect();
    let own_kept = keeps(vm, &candidates);
    let mut drop: Vec<u64> = own
        .iter()
        .map(|p| p.id)
        .filter(|id| {
            *id != latest
                && !tagged_keep.contains(id)
                && !(own_kept.contains(id) && own.iter().any(|p| p.id == *id && p.group.is_none()))
        })
        .collect();
    drop.sort_unstable();
    drop.dedup();
    drop
}

#[cfg(test)]
mod tests {
    use super::*;

    fn en(replica: &str) -> Candidate {
        Candidate::Enabled {
            replica: replica.into(),
            group: None,
        }
    }

    #[test]
    fn create_rules() {
        let ok = [("a".to_owned(), en("r:1")), ("b".to_owned(), en("r:1"))];
        let long = "x".repeat(65);
        type Row<'a> = (
            &'a str,
            Vec<(String, Candidate)>,
            Vec<String>,
            Result<(), GroupRefusal>,
        );
        let table: Vec<Row> = vec![
            ("g", ok.to_vec(), vec![], Ok(())),
            (
                "",
                ok.to_vec(),
                vec![],
                Err(GroupRefusal::BadName("".into())),
            ),
            (
                "a b",
                ok.to_vec(),
                vec![],
                Err(GroupRefusal::BadName("a b".into())),
            ),
            (
                &long,
                ok.to_vec(),
                vec![],
                Err(GroupRefusal::BadName(long.clone())),
            ),
            (
                "g",
                ok.to_vec(),
                vec!["g".into()],
                Err(GroupRefusal::Exists("g".into())),
            ),
            ("g", ok[..1].to_vec(), vec![], Err(GroupRefusal::Size(1))),
            (
                "g",
                vec![("a".into(), en("r:1")), ("a".into(), en("r:1"))],
                vec![],
                Err(GroupRefusal::Twice("a".into())),
            ),
            (
                "g",
                vec![("a".into(), en("r:1")), ("z".into(), Candidate::Unknown)],
                vec![],
                Err(GroupRefusal::Unknown("z".into())),
            ),
            (
                "g",
                vec![("a".into(), en("r:1")), ("z".into(), Candidate::Replica)],
                vec![],
                Err(GroupRefusal::Replica("z".into())),
            ),
            (
                "g",
                vec![("a".into(), en("r:1")), ("z".into(), Candidate::NotEnabled)],
                vec![],
                Err(GroupRefusal::NotEnabled("z".into())),
            ),
            (
                "g",
                vec![("a".into(), en("r:1")), ("z".into(), Candidate::Libvirt)],
                vec![],
                Err(GroupRefusal::Libvirt("z".into())),
            ),
            (
                "g",
                vec![
                    ("a".into(), en("r:1")),
                    (
                        "z".into(),
                        Candidate::Enabled {
                            replica: "r:1".into(),
                            group: Some("h".into()),
                        },
                    ),
                ],
                vec!["h".into()],
                Err(GroupRefusal::InGroup("z".into(), "h".into())),
            ),
            (
                "g",
                vec![("a".into(), en("r:1")), ("b".into(), en("r:2"))],
                vec![],
                Err(GroupRefusal::Replicas(
                    "a".into(),
                    "r:1".into(),
                    "b".into(),
                    "r:2".into(),
                )),
            ),
        ];
        for (name, members, existing, want) in table {
            assert_eq!(
                check_group_create(name, &existing, &members, 8),
                want,
                "{name:?} {members:?}"
            );
        }
        let three: Vec<(String, Candidate)> = ["a", "b", "c"]
            .iter()
            .map(|v| ((*v).to_owned(), en("r:1")))
            .collect();
        assert_eq!(
            check_group_create("g", &[], &three, 2),
            Err(GroupRefusal::Slots {
                members: 3,
                slots: 2
            })
        );
        assert_eq!(check_group_create("g", &[], &three, 3), Ok(()));
    }

    fn ok_round(n: usize) -> (GroupCut, Vec<GroupAction>) {
        let mut g = GroupCut::new(7, n, 1000);
        let mut acts = Vec::new();
        for i in 0..n {
            acts.extend(g.step(GroupEvent::Ready {
                member: i,
                now_ms: 1000 + i as u64,
            }));
        }
        (g, acts)
    }

    #[test]
    fn a_whole_round_pauses_cuts_and_resumes_everyone() {
        let (mut g, acts) = ok_round(3);
        assert_eq!(acts, vec![GroupAction::Stop(vec![0, 1, 2])]);
        let mut acts = Vec::new();
        for i in 0..3 {
            acts.extend(g.step(GroupEvent::Stopped {
                member: i,
                now_ms: 1003,
                result: Ok(i != 1),
            }));
        }
        assert_eq!(acts, vec![GroupAction::Cut(vec![0, 1, 2])]);
        let mut acts = Vec::new();
        for i in [2, 0, 1] {
            acts.extend(g.step(GroupEvent::Cut {
                member: i,
                now_ms: 1005,
                result: Ok(()),
            }));
        }
        assert_eq!(
            acts,
            vec![GroupAction::Cont {
                members: vec![0, 1, 2],
                grouped: true
            }]
        );
        assert!(
            g.step(GroupEvent::Continued {
                member: 0,
                now_ms: 1006,
                result: Ok(())
            })
            .is_empty()
        );
        // Repeated and unknown members change nothing.
        assert!(
            g.step(GroupEvent::Continued {
                member: 0,
                now_ms: 1006,
                result: Ok(())
            })
            .is_empty()
        );
        assert!(
            g.step(GroupEvent::Continued {
                member: 9,
                now_ms: 1006,
                result: Ok(())
            })
            .is_empty()
        );
        g.step(GroupEvent::Continued {
            member: 1,
            now_ms: 1007,
            result: Ok(()),
        });
        let last = g.step(GroupEvent::Continued {
            member: 2,
            now_ms: 1012,
            result: Ok(()),
        });
        assert_eq!(
            last,
            vec![GroupAction::Finished(GroupOutcome {
                point: 7,
                complete: true,
                pause_ms: Some(10),
                reason: None,
            })]
        );
        assert!(g.finished());
    }

    #[test]
    fn a_failed_transaction_resumes_everyone_and_tags_no_one() {
        let (mut g, _) = ok_round(2);
        for i in 0..2 {
            g.step(GroupEvent::Stopped {
                member: i,
                now_ms: 1002,
                result: Ok(true),
            });
        }
        assert!(
            g.step(GroupEvent::Cut {
                member: 0,
                now_ms: 1003,
                result: Err("boom".into())
            })
            .is_empty()
        );
        let acts = g.step(GroupEvent::Cut {
            member: 1,
            now_ms: 1003,
            result: Ok(()),
        });
        assert_eq!(
            acts,
            vec![GroupAction::Cont {
                members: vec![0, 1],
                grouped: false
            }]
        );
        g.step(GroupEvent::Continued {
            member: 0,
            now_ms: 1004,
            result: Ok(()),
        });
        let acts = g.step(GroupEvent::Continued {
            member: 1,
            now_ms: 1004,
            result: Ok(()),
        });
        match &acts[..] {
            [GroupAction::Finished(o)] => {
                assert!(!o.complete);
                assert_eq!(o.pause_ms, Some(3));
                assert!(o.reason.as_deref().unwrap_or("").contains("boom"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_failed_stop_skips_every_transaction_and_resumes_everyone() {
        let (mut g, _) = ok_round(2);
        g.step(GroupEvent::Stopped {
            member: 0,
            now_ms: 1002,
            result: Err("no".into()),
        });
        let acts = g.step(GroupEvent::Stopped {
            member: 1,
            now_ms: 1002,
            result: Ok(true),
        });
        assert_eq!(
            acts,
            vec![GroupAction::Cont {
                members: vec![0, 1],
                grouped: false
            }]
        );
    }

    #[test]
    fn a_member_that_leaves_before_ready_sends_the_others_alone() {
        let mut g = GroupCut::new(1, 3, 0);
        assert!(
            g.step(GroupEvent::Ready {
                member: 0,
                now_ms: 1
            })
            .is_empty()
        );
        assert!(
            g.step(GroupEvent::Left {
                member: 1,
                now_ms: 2,
                reason: "refused".into()
            })
            .is_empty()
        );
        let acts = g.step(GroupEvent::Ready {
            member: 2,
            now_ms: 3,
        });
        assert_eq!(acts.len(), 2);
        assert_eq!(acts[0], GroupAction::Alone(vec![0, 2]));
        match &acts[1] {
            GroupAction::Finished(o) => {
                assert!(!o.complete);
                assert_eq!(o.pause_ms, None);
            }
            other => panic!("{other:?}"),
        }
        // A ready member that leaves while the others gather fails the round too.
        let mut h = GroupCut::new(2, 2, 0);
        h.step(GroupEvent::Ready {
            member: 0,
            now_ms: 1,
        });
        h.step(GroupEvent::Left {
            member: 0,
            now_ms: 2,
            reason: "cancelled".into(),
        });
        let acts = h.step(GroupEvent::Ready {
            member: 1,
            now_ms: 3,
        });
        assert_eq!(acts[0], GroupAction::Alone(vec![1]));
        assert!(h.finished());
        // A member that left and comes after all cuts alone too.
        assert_eq!(
            g.step(GroupEvent::Ready {
                member: 1,
                now_ms: 4
            }),
            vec![GroupAction::Alone(vec![1])]
        );
    }

    #[test]
    fn timeouts_in_every_phase_end_the_round_and_resume_whoever_was_stopped() {
        // Gathering: member 1 never comes.
        let mut g = GroupCut::new(1, 2, 0);
        g.step(GroupEvent::Ready {
            member: 0,
            now_ms: 5,
        });
        assert!(
            g.step(GroupEvent::Tick {
                now_ms: PHASE_TIMEOUT_MS - 1
            })
            .is_empty()
        );
        let acts = g.step(GroupEvent::Tick {
            now_ms: PHASE_TIMEOUT_MS,
        });
        assert_eq!(acts[0], GroupAction::Alone(vec![0]));
        assert!(g.finished());
        // A late ready after the timeout: alone.
        assert_eq!(
            g.step(GroupEvent::Ready {
                member: 1,
                now_ms: PHASE_TIMEOUT_MS + 1
            }),
            vec![GroupAction::Alone(vec![1])]
        );

        // Stopping: member 1's stop never answers.
        let (mut g, _) = ok_round(2);
        g.step(GroupEvent::Stopped {
            member: 0,
            now_ms: 1002,
            result: Ok(true),
        });
        let acts = g.step(GroupEvent::Tick {
            now_ms: 1001 + PHASE_TIMEOUT_MS,
        });
        assert_eq!(
            acts,
            vec![GroupAction::Cont {
                members: vec![0, 1],
                grouped: false
            }]
        );
        // Continuing: nobody answers; the round ends anyway with the pause so far.
        let acts = g.step(GroupEvent::Tick {
            now_ms: 1001 + 2 * PHASE_TIMEOUT_MS,
        });
        match &acts[..] {
            [GroupAction::Finished(o)] => {
                assert!(!o.complete);
                assert_eq!(o.pause_ms, Some(2 * PHASE_TIMEOUT_MS));
            }
            other => panic!("{other:?}"),
        }
    }

    fn tag(point: u64, members: &[Uuid]) -> Option<GroupTag> {
        Some(GroupTag {
            group: "g".into(),
            point,
            members: members.to_vec(),
        })
    }

    #[test]
    fn a_group_point_is_complete_only_with_every_member() {
        let a = Uuid::from_u128(1);
        let b = Uuid::from_u128(2);
        let both = [a, b];
        let vms = vec![
            (
                a,
                vec![
                    (10, tag(100, &both)),
                    (11, tag(200, &both)),
                    (12, None),
                    (13, tag(300, &both)),
                ],
            ),
            (b, vec![(4, tag(100, &both)), (5, tag(200, &both))]),
        ];
        let got = complete_points("g", &vms);
        assert_eq!(
            got,
            vec![
                GroupPoint {
                    point: 200,
                    members: vec![(a, 11), (b, 5)]
                },
                GroupPoint {
                    point: 100,
                    members: vec![(a, 10), (b, 4)]
                },
            ]
        );
        assert!(complete_points("other", &vms).is_empty());
        // A member missing from the replica: nothing is complete.
        assert!(complete_points("g", &vms[..1]).is_empty());
    }

    /// A fake policy: keep the `n` newest points given (what a count-based retention does).
    fn newest(n: usize, pts: &[RetainPoint]) -> BTreeSet<u64> {
        let mut v: Vec<(u64, u64)> = pts.iter().map(|p| (p.taken_at_ms, p.id)).collect();
        v.sort_unstable();
        v.iter().rev().take(n).map(|(_, id)| *id).collect()
    }

    /// A point `id` at time `id * 1000` ms (group point `gp` at `gp` ms: the same order).
    fn rp(id: u64, group: Option<GroupTag>) -> RetainPoint {
        RetainPoint {
            id,
            taken_at_ms: id * 1000,
            kind: PointKind::CrashConsistent,
            group,
        }
    }

    type Keeps = Box<dyn Fn(Uuid, &[RetainPoint]) -> BTreeSet<u64>>;

    #[test]
    fn group_retention_keeps_or_drops_a_group_point_for_all_members() {
        let a = Uuid::from_u128(1);
        let b = Uuid::from_u128(2);
        let both = [a, b];
        // Group points 100, 200, 300 on both; A also has untagged 12 (cut alone after 200).
        let full: Vec<RetainPoints> = vec![
            (
                a,
                vec![
                    rp(10, tag(100, &both)),
                    rp(11, tag(200, &both)),
                    rp(12, None),
                    rp(13, tag(300, &both)),
                ],
            ),
            (
                b,
                vec![
                    rp(4, tag(100, &both)),
                    rp(5, tag(200, &both)),
                    rp(6, tag(300, &both)),
                ],
            ),
        ];
        let per = |na: usize, nb: usize| -> Keeps {
            Box::new(move |m, pts: &[RetainPoint]| newest(if m == a { na } else { nb }, pts))
        };
        // (name, vms, policies, VM pruned, its expected drop)
        type Row<'a> = (&'a str, Vec<RetainPoints>, Keeps, Uuid, Vec<u64>);
        let rows: Vec<Row> = vec![
            // Both keep 2: group points 200 and 300 stay everywhere, 100 goes everywhere.
            // A's untagged 12 goes through A's policy with its kept tagged 11 and 13: kept.
            ("keep 2, A", full.clone(), per(2, 2), a, vec![10]),
            ("keep 2, B", full.clone(), per(2, 2), b, vec![4]),
            // B's policy keeps more: the union keeps 100 on A too.
            ("union, A", full.clone(), per(1, 3), a, vec![12]),
            ("union, B", full.clone(), per(1, 3), b, vec![]),
            // Keep 1: only the newest group point (and each VM's latest).
            ("keep 1, A", full.clone(), per(1, 1), a, vec![10, 11, 12]),
            ("keep 1, B", full.clone(), per(1, 1), b, vec![4, 5]),
            // A pruned 100 already; B's 100 is still one of the group points and the same
            // policies drop it again.
            (
                "finishing another member's prune",
                vec![
                    (a, vec![rp(11, tag(200, &both)), rp(13, tag(300, &both))]),
                    full[1].clone(),
                ],
                per(2, 2),
                b,
                vec![4],
            ),
            // A holds 400, B not yet: 400 is the newest group point, kept; the group decision
            // is the one B makes once it holds 400 too.
            (
                "a member ahead",
                vec![
                    (
                        a,
                        vec![
                            rp(10, tag(100, &both)),
                            rp(11, tag(200, &both)),
                            rp(14, tag(400, &both)),
                        ],
                    ),
                    (b, vec![rp(4, tag(100, &both)), rp(5, tag(200, &both))]),
                ],
                per(2, 2),
                b,
                vec![4],
            ),
            // A group point only one member holds (the other's cycle failed after the cut)
            // is one more group point: kept or dropped like the others.
            (
                "incomplete",
                vec![
                    (a, vec![rp(10, tag(100, &both)), rp(11, tag(200, &both))]),
                    (b, vec![rp(5, tag(200, &both))]),
                ],
                per(2, 2),
                a,
                vec![],
            ),
            // Only untagged points: the VM's own policy.
            (
                "ungrouped",
                vec![(a, vec![rp(1, None), rp(2, None), rp(3, None)])],
                per(2, 2),
                a,
                vec![1],
            ),
            // An unknown VM: nothing to drop.
            (
                "unknown vm",
                full.clone(),
                per(1, 1),
                Uuid::from_u128(9),
                vec![],
            ),
        ];
        for (name, vms, keeps, vm, want) in rows {
            assert_eq!(group_retention(vm, &vms, &*keeps), want, "{name}");
        }
    }

    #[test]
    fn group_retention_is_the_same_whatever_the_order_of_the_members_prunes() {
        let a = Uuid::from_u128(1);
        let b = Uuid::from_u128(2);
        let c = Uuid::from_u128(3);
        let all = [a, b, c];
        // Ten group points; C missed 500 (its cycle failed after the cut).
        let vms: Vec<RetainPoints> = all
            .iter()
            .map(|u| {
                let pts = (1..=10u64)
                    .filter(|i| !(*u == c && *i == 5))
                    .map(|i| rp(i, tag(i * 1000, &all)))
                    .collect();
                (*u, pts)
            })
            .collect();
        let keeps: Keeps = Box::new(|_, pts: &[RetainPoint]| newest(3, pts));
        for order in [[a, b, c], [c, a, b], [b, c, a]] {
            let mut state = vms.clone();
            for vm in order {
                let drop = group_retention(vm, &state, &*keeps);
                let entry = state.iter_mut().find(|(u, _)| *u == vm).expect("vm");
                entry.1.retain(|p| !drop.contains(&p.id));
            }
            for (_, pts) in &state {
                let ids: Vec<u64> = pts.iter().map(|p| p.id).collect();
                assert_eq!(ids, vec![8, 9, 10], "{order:?}");
            }
            // Pruning again drops nothing.
            for vm in all {
                assert!(group_retention(vm, &state, &*keeps).is_empty());
            }
        }
        // A member that prunes before the others received the newest group point, then
        // again after: the same group points survive everywhere.
        let mut state: Vec<RetainPoints> = vms
            .iter()
            .map(|(u, pts)| {
                let n = if *u == a { 10 } else { 9 };
                (*u, pts.iter().filter(|p| p.id <= n).cloned().collect())
            })
            .collect();
        for vm in all {
            let drop = group_retention(vm, &state, &*keeps);
            let entry = state.iter_mut().find(|(u, _)| *u == vm).expect("vm");
            entry.1.retain(|p| !drop.contains(&p.id));
        }
        for u in [b, c] {
            let entry = state.iter_mut().find(|(x, _)| *x == u).expect("vm");
            entry.1.push(rp(10, tag(10_000, &all)));
            let drop = group_retention(u, &state, &*keeps);
            let entry = state.iter_mut().find(|(x, _)| *x == u).expect("vm");
            entry.1.retain(|p| !drop.contains(&p.id));
        }
        for (_, pts) in &state {
            let ids: Vec<u64> = pts.iter().map(|p| p.id).collect();
            assert_eq!(ids, vec![8, 9, 10]);
        }
    }

    #[test]
    fn group_reverse_reverses_failed_over_members_and_refuses_before_anything() {
        use ReplicationState as S;
        use ReverseMember as R;
        let m = |n: &str, r: R| (n.to_owned(), r);
        type Row = (Vec<(String, R)>, Result<Vec<&'static str>, &'static str>);
        let rows: Vec<Row> = vec![
            (
                vec![
                    m("a", R::Replica(S::FailedOver)),
                    m("b", R::Replica(S::FailedOverWaitingCompletion)),
                ],
                Ok(vec!["a", "b"]),
            ),
            // b was reversed by a run that stopped part way: skipped.
            (
                vec![m("a", R::Replica(S::FailedOver)), m("b", R::Primary)],
                Ok(vec!["a"]),
            ),
            (vec![m("a", R::Primary), m("b", R::Primary)], Ok(vec![])),
            // A member not failed over: refused, naming it, nothing reversed.
            (
                vec![
                    m("a", R::Replica(S::FailedOver)),
                    m("b", R::Replica(S::Replicating)),
                ],
                Err("b"),
            ),
            (
                vec![
                    m("a", R::Replica(S::Suspended)),
                    m("b", R::Replica(S::FailedOver)),
                ],
                Err("a"),
            ),
        ];
        for (members, want) in rows {
            let got = plan_group_reverse(&members);
            match (got, want) {
                (Ok(names), Ok(w)) => assert_eq!(names, w, "{members:?}"),
                (Err((name, r)), Err(w)) => {
                    assert_eq!(name, w, "{members:?}");
                    assert!(
                        matches!(
                            r,
                            Refusal::State {
                                op: Op::Reverse,
                                ..
                            }
                        ),
                        "{r:?}"
                    );
                }
                (got, want) => panic!("{members:?}: {got:?} vs {want:?}"),
            }
        }
    }

    #[test]
    fn group_failover_uses_planned_points_only_when_every_member_has_one() {
        let m = |name: &str, gp: u64, planned: Option<u64>| FailoverMember {
            name: name.into(),
            group_point: gp,
            planned,
        };
        let at = |v: &[(&str, u64)], planned: bool| {
            Ok(FailoverPlan {
                members: v.iter().map(|(n, p)| ((*n).to_owned(), *p)).collect(),
                planned,
            })
        };
        type Row = (
            Vec<FailoverMember>,
            FailoverPick,
            Result<FailoverPlan, GroupFailoverRefusal>,
        );
        let table: Vec<Row> = vec![
            // Nobody prepared: an unplanned failover at the group point.
            (
                vec![m("a", 5, None), m("b", 7, None)],
                FailoverPick::Default,
                at(&[("a", 5), ("b", 7)], false),
            ),
            // Everybody prepared: each member's planned final point.
            (
                vec![m("a", 5, Some(9)), m("b", 7, Some(8))],
                FailoverPick::Default,
                at(&[("a", 9), ("b", 8)], true),
            ),
            // A final cycle that was itself the group point's cut: the same point.
            (
                vec![m("a", 5, Some(5)), m("b", 7, Some(10))],
                FailoverPick::Default,
                at(&[("a", 5), ("b", 10)], true),
            ),
            // Some prepared: refused, naming who is not prepared.
            (
                vec![m("a", 5, Some(9)), m("b", 7, None), m("c", 2, None)],
                FailoverPick::Default,
                Err(GroupFailoverRefusal::PartlyPrepared {
                    group: "g".into(),
                    prepared: vec!["a".into()],
                    not_prepared: vec!["b".into(), "c".into()],
                }),
            ),
            // ... unless the group point is asked for explicitly.
            (
                vec![m("a", 5, Some(9)), m("b", 7, None)],
                FailoverPick::GroupPoint,
                at(&[("a", 5), ("b", 7)], false),
            ),
            // The explicit group point also wins over a fully prepared group.
            (
                vec![m("a", 5, Some(9)), m("b", 7, Some(8))],
                FailoverPick::GroupPoint,
                at(&[("a", 5), ("b", 7)], false),
            ),
        ];
        for (i, (members, pick, want)) in table.into_iter().enumerate() {
            assert_eq!(plan_group_failover("g", &members, pick), want, "row {i}");
        }
        let e = plan_group_failover(
            "g",
            &[m("a", 5, Some(9)), m("b", 7, None)],
            FailoverPick::Default,
        )
        .expect_err("partly prepared")
        .to_string();
        assert!(
            e.contains("a prepared")
                && e.contains("but b not")
                && e.contains("--latest-group-point"),
            "{e}"
        );
    }

    #[test]
    fn group_prepare_checks_every_member_first_and_skips_the_prepared() {
        use ReplicationState as S;
        let m = |n: &str, s: S, p: bool| (n.to_owned(), s, p);
        type Row = (
            Vec<(String, S, bool)>,
            Result<Vec<String>, (String, Refusal)>,
        );
        let table: Vec<Row> = vec![
            (
                vec![m("a", S::Replicating, true), m("b", S::Replicating, true)],
                Ok(vec!["a".into(), "b".into()]),
            ),
            // An earlier run stopped part way: the prepared member is skipped.
            (
                vec![
                    m("a", S::PreparedForFailover, true),
                    m("b", S::Replicating, true),
                ],
                Ok(vec!["b".into()]),
            ),
            (
                vec![
                    m("a", S::PreparedForFailover, true),
                    m("b", S::PreparedForFailover, true),
                ],
                Ok(vec![]),
            ),
            // A paused member: refused before anything is prepared, naming it.
            (
                vec![m("a", S::Replicating, true), m("b", S::Suspended, true)],
                Err((
                    "b".into(),
                    Refusal::State {
                        op: Op::Prepare,
                        state: S::Suspended,
                    },
                )),
            ),
            // No initial copy yet.
            (
                vec![m("a", S::Replicating, false), m("b", S::Replicating, true)],
                Err(("a".into(), Refusal::NoInitialCopy { op: Op::Prepare })),
            ),
        ];
        for (i, (members, want)) in table.into_iter().enumerate() {
            assert_eq!(plan_group_prepare(&members), want, "row {i}");
        }
    }
}
