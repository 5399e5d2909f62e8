//! The consistency groups' cut coordinator (docs/groups.md), host-wide: one round at a time per
//! group, each a task that drives a `vmr_core::group::GroupCut` machine. A member's cycle task
//! joins the round ([`Groups::join`]) and gets the [`Gate`] its capture passes through around
//! its transaction; the round asks the other members' owners for a cycle now (a [`Nudge`],
//! which `lib.rs` hands to the owners), orders stop, cut and cont, measures the pause, and keeps
//! each group's cut figures for `status` and `group list`. Membership itself is in the VM
//! records (written by their owners); this module keeps only what runs and the figures.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;
use vmr_capture::gate::{Gate, GateOrder, GateReport};
use vmr_core::group::{GroupAction, GroupCut, GroupEvent};
use vmr_proto::GroupTag;
use vmr_proto::api::GroupStatus;

use crate::util::now_ms;

/// How often a round's machine sees time pass.
const ROUND_TICK: Duration = Duration::from_millis(100);
/// After a failed round, members cut alone this long before a new round starts (a member
/// that cannot take part must not make the others cycle back to back).
const AFTER_FAILED: Duration = Duration::from_secs(10);

/// A round asks a member's owner for a cycle now; the owner answers `Ok` when a cycle that
/// joins the round started (or starts when the running one ends), else why not.
pub struct Nudge {
    /// The member.
    pub vm: Uuid,
    /// Where the owner answers.
    pub reply: oneshot::Sender<Result<(), String>>,
}

/// What a member's cycle gets from [`Groups::join`].
pub struct Joined {
    /// The capture's gate.
    pub gate: Gate,
    /// The tag of the member's point when the cut is the group point.
    pub tag: GroupTag,
}

enum In {
    Join(usize, mpsc::Sender<GateOrder>, mpsc::Receiver<GateReport>),
    Report(usize, Option<GateReport>),
    Left(usize, String),
}

struct Round {
    members: Vec<Uuid>,
    joined: Vec<bool>,
    gathering: bool,
    tx: mpsc::UnboundedSender<In>,
}

#[derive(Default)]
struct Group {
    status: GroupStatus,
    last_point: u64,
    round: Option<Round>,
    failed_at: Option<Instant>,
}

type Map = Arc<Mutex<BTreeMap<String, Group>>>;

/// Every group's running round and figures.
pub struct Groups {
    map: Map,
    nudge: mpsc::UnboundedSender<Nudge>,
    nudges: Mutex<Option<mpsc::UnboundedReceiver<Nudge>>>,
}

fn lock(m: &Map) -> std::sync::MutexGuard<'_, BTreeMap<String, Group>> {
    // Plain values only: a panicking holder leaves nothing half-written that matters.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Default for Groups {
    fn default() -> Groups {
        let (nudge, rx) = mpsc::unbounded_channel();
        Groups {
            map: Arc::default(),
            nudge,
            nudges: Mutex::new(Some(rx)),
        }
    }
}

impl Groups {
    /// The nudges for the owners (taken once, by `lib.rs`).
    pub fn take_nudges(&self) -> Option<mpsc::UnboundedReceiver<Nudge>> {
        self.nudges
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// Group `name` has these members now (`group create`, start-up); an empty list forgets it
    /// (`group remove`).
    pub fn set_members(&self, name: &str, members: Vec<String>) {
        let mut m = lock(&self.map);
        if members.is_empty() {
            m.remove(name);
        } else {
            let g = m.entry(name.to_owned()).or_default();
            g.status.name = name.to_owned();
            g.status.members = members;
        }
    }

    /// The figures of group `name`.
    pub fn status(&self, name: &str) -> Option<GroupStatus> {
        lock(&self.map).get(name).map(|g| g.status.clone())
    }

    /// Member `vm`'s cycle is about to cut: join the gathering round of `group` (whose members
    /// are `members`, from the records), or start one. `None`: cut alone (no round can take
    /// it now, e.g. one is past gathering).
    pub fn join(&self, group: &str, vm: Uuid, members: Vec<Uuid>) -> Option<Joined> {
        let idx = members.iter().position(|m| *m == vm)?;
        let mut map = lock(&self.map);
        let g = map.entry(group.to_owned()).or_default();
        if g.status.name.is_empty() {
            g.status.name = group.to_owned();
        }
        let fresh = match &g.round {
            Some(r) => {
                if !r.gathering || r.members != members || r.joined[idx] {
                    return None;
                }
                false
            }
            None if g.failed_at.is_some_and(|t| t.elapsed() < AFTER_FAILED) => return None,
            None => true,
        };
        if fresh {
            let point = now_ms().max(g.last_point + 1);
            g.last_point = point;
            let (tx, rx) = mpsc::unbounded_channel();
            g.round = Some(Round {
                members: members.clone(),
                joined: vec![false; members.len()],
                gathering: true,
                tx: tx.clone(),
            });
            tokio::spawn(run_round(
                self.map.clone(),
                group.to_owned(),
                point,
                members.len(),
                rx,
            ));
            // Ask every other member for a cycle now; one that cannot leaves the round.
            for (i, m) in members.iter().enumerate() {
                if i == idx {
                    continue;
                }
                let (reply, answer) = oneshot::channel();
                if self.nudge.send(Nudge { vm: *m, reply }).is_err() {
                    let _ = tx.send(In::Left(i, "the agent is stopping".into()));
                    continue;
                }
                let tx = tx.clone();
                tokio::spawn(async move {
                    let why = match answer.await {
                        Ok(Ok(())) => return,
                        Ok(Err(why)) => why,
                        Err(_) => "its owner did not answer".into(),
                    };
                    let _ = tx.send(In::Left(i, why));
                });
            }
        }
        let round = g.round.as_mut()?;
        round.joined[idx] = true;
        let (otx, orx) = mpsc::channel(4);
        let (rtx, rrx) = mpsc::channel(4);
        let _ = round.tx.send(In::Join(idx, otx, rrx));
        Some(Joined {
            gate: Gate {
                orders: orx,
                reports: rtx,
                grouped: false,
            },
            tag: GroupTag {
                group: group.to_owned(),
                point: g.last_point,
                members,
            },
        })
    }

    /// Member `vm`'s cycle ended without joining: a round gathering for it goes on without it
    /// (and fails: the group point cannot exist).
    pub fn leave(&self, group: &str, vm: Uuid, why: &str) {
        let map = lock(&self.map);
        if let Some(r) = map.get(group).and_then(|g| g.round.as_ref())
            && r.gathering
            && let Some(i) = r.members.iter().position(|m| *m == vm)
            && !r.joined[i]
        {
            let _ = r.tx.send(In::Left(i, why.to_owned()));
        }
    }
}

/// One round: the machine decides, this carries its orders to the members' gates.
async fn run_round(
    map: Map,
    group: String,
    point: u64,
    n: usize,
    mut rx: mpsc::UnboundedReceiver<In>,
) {
    let mut cut = GroupCut::new(point, n, now_ms());
    let mut orders: Vec<Option<mpsc::Sender<GateOrder>>> = vec![None; n];
    let (fwd_tx, mut fwd_rx) = mpsc::unbounded_channel::<In>();
    let mut tick = tokio::time::interval(ROUND_TICK);
    let mut first_stop: Option<Instant> = None;
    let mut last_cont: Option<Instant> = None;
    loop {
        let events: Vec<GroupEvent> = tokio::select! {
            Some(msg) = rx.recv() => on_in(msg, &mut orders, &fwd_tx, &mut last_cont),
            Some(msg) = fwd_rx.recv() => on_in(msg, &mut orders, &fwd_tx, &mut last_cont),
            _ = tick.tick() => vec![GroupEvent::Tick { now_ms: now_ms() }],
        };
        for ev in events {
            for a in cut.step(ev) {
                match a {
                    GroupAction::Stop(ms) => {
                        if let Some(r) = lock(&map).get_mut(&group).and_then(|g| g.round.as_mut()) {
                            r.gathering = false;
                        }
                        first_stop = Some(Instant::now());
                        send(&orders, &ms, GateOrder::Stop);
                    }
                    GroupAction::Cut(ms) => send(&orders, &ms, GateOrder::Cut),
                    GroupAction::Alone(ms) => send(&orders, &ms, GateOrder::Alone),
                    GroupAction::Cont { members, grouped } => {
                        send(&orders, &members, GateOrder::Cont { grouped });
                    }
                    GroupAction::Finished(o) => {
                        let pause_ms = match (first_stop, last_cont) {
                            (Some(a), Some(b)) if b >= a => {
                                Some(b.duration_since(a).as_millis() as u64)
                            }
                            _ => o.pause_ms,
                        };
                        let pause_us = match (first_stop, last_cont) {
                            (Some(a), Some(b)) if b >= a => {
                                Some(b.duration_since(a).as_micros() as u64)
                            }
                            _ => None,
                        };
                        let mut m = lock(&map);
                        if let Some(g) = m.get_mut(&group) {
                            g.round = None;
                            let s = &mut g.status;
                            if let Some(p) = pause_ms {
                                s.last_pause_ms = Some(p);
                                s.max_pause_ms = Some(s.max_pause_ms.unwrap_or(0).max(p));
                            }
                            if o.complete {
                                s.cuts += 1;
                                s.last_point = Some(o.point);
                                g.failed_at = None;
                            } else {
                                g.failed_at = Some(Instant::now());
                                s.failed_cuts += 1;
                                s.last_error = o.reason.clone();
                            }
                        }
                        drop(m);
                        if o.complete {
                            tracing::info!(
                                group,
                                point = o.point,
                                pause_ms,
                                pause_us,
                                "group cut: every member cut inside one pause"
                            );
                        } else {
                            tracing::warn!(
                                group,
                                point = o.point,
                                pause_ms,
                                "group cut failed, no group point for any member: {}",
                                o.reason.as_deref().unwrap_or("unknown")
                            );
                        }
                        return;
                    }
                }
            }
        }
    }
}

fn send(orders: &[Option<mpsc::Sender<GateOrder>>], members: &[usize], o: GateOrder) {
    for i in members {
        if let Some(Some(tx)) = orders.get(*i) {
            // At most three orders per member in a channel of four: never full.
            let _ = tx.try_send(o);
        }
    }
}

fn on_in(
    msg: In,
    orders: &mut [Option<mpsc::Sender<GateOrder>>],
    fwd: &mpsc::UnboundedSender<In>,
    last_cont: &mut Option<Instant>,
) -> Vec<GroupEvent> {
    let now = now_ms();
    match msg {
        In::Join(i, otx, mut rrx) => {
            if let Some(slot) = orders.get_mut(i) {
                *slot = Some(otx);
            }
            let fwd = fwd.clone();
            tokio::spawn(async move {
                while let Some(r) = rrx.recv().await {
                    if fwd.send(In::Report(i, Some(r))).is_err() {
                        return;
                    }
                }
                let _ = fwd.send(In::Report(i, None));
            });
            Vec::new()
        }
        In::Left(member, reason) => vec![GroupEvent::Left {
            member,
            now_ms: now,
            reason,
        }],
        In::Report(member, Some(r)) => vec![match r {
            GateReport::Ready => GroupEvent::Ready {
                member,
                now_ms: now,
            },
            GateReport::Stopped(result) => GroupEvent::Stopped {
                member,
                now_ms: now,
                result,
            },
            GateReport::Cut(result) => GroupEvent::Cut {
                member,
                now_ms: now,
                result,
            },
            GateReport::Continued(result) => {
                *last_cont = Some(Instant::now());
                GroupEvent::Continued {
                    member,
                    now_ms: now,
                    result,
                }
            }
        }],
        // The member's gate is gone (its cycle ended or failed): whatever step it was at
        // failed. The machine takes the one that fits its phase.
        In::Report(member, None) => {
            let gone = || "its cycle ended".to_owned();
            vec![
                GroupEvent::Left {
                    member,
                    now_ms: now,
                    reason: gone(),
                },
                GroupEvent::Stopped {
                    member,
                    now_ms: now,
                    result: Err(gone()),
                },
                GroupEvent::Cut {
                    member,
                    now_ms: now,
                    result: Err(gone()),
                },
                GroupEvent::Continued {
                    member,
                    now_ms: now,
                    result: Err(gone()),
                },
            ]
        }
    }
}
