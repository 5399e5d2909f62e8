//! The checkpoint chain of a VM captured through libvirt's incremental-backup API: which
//! checkpoint a cycle's backup job starts from (`<incremental>`), the name of the checkpoint
//! created with it, which of vmreplica's checkpoints are deleted when, and when the chain can
//! no longer be trusted (a resynchronization, never a silent wrong delta). Sans-IO: the
//! driver (`vmr_capture::libvirt`) reports what it found and what happened, with the time, and
//! carries out the actions.
//!
//! Rules (every libvirt checkpoint's bitmap records every write since its creation, so a
//! delta from an older checkpoint contains everything a newer one would):
//!
//! | event | state | actions, new state |
//! |---|---|---|
//! | `Start`, a job of ours left running (a crash) | any | `AbortJob`, then as below |
//! | `Start`, another tool's job on the domain | any | `Wait` (counted), no cycle |
//! | `Start`, acked checkpoint present | acked = c | delete our other checkpoints, `Begin { from: c, new }` |
//! | `Start`, acked checkpoint missing, its description recorded, not tried yet | acked = c | `Redefine(c)`, delete our others, `Begin { from: c, new }` |
//! | `RedefineFailed` (a bitmap missing, inconsistent) | cycle redefining c | `Resync(RedefineRefused)`, `Record(none)`, no cycle: the next `Start` is a full one |
//! | `Start`, acked checkpoint missing, otherwise | acked = c | `Resync(CheckpointMissing)`, delete ours, `Begin { from: none, new }` |
//! | `Start` | no acked | delete ours, `Begin { from: none, new }` (full) |
//! | `BeginFailed(Busy)` | cycle | `Wait` (counted), acked kept (a redefinition under way is tried again) |
//! | `BeginFailed(Resync)` | cycle | `Resync`, acked = none: the next is a full cycle |
//! | `BeginFailed(Other)` | cycle | acked kept |
//! | `Acknowledged` | cycle from c to n | `AbortJob`, `Delete(c)`, acked = n, `Record` |
//! | `Failed` | cycle from c to n | `AbortJob`, `Delete(n)`, acked = c kept |
//!
//! `new` is `vmreplica-<k>`, k one more than the highest of vmreplica's checkpoints present,
//! the acked one (also when it vanished: its bitmap may still be in the images) and every
//! name this chain tried before (a failed job's bitmap may outlive libvirt's metadata), so a
//! name is not reused while its bitmap might exist.
//!
//! [`definition_change`] decides, at each cycle, whether the domain's definition changed
//! since the one the replica holds (the domain XML is refreshed on the replica with that
//! cycle) and whether its replicated disks did (the recorded disks are what the replica's
//! chain holds):
//!
//! | domain XML | its disks (targets, in order) | decision |
//! |---|---|---|
//! | as recorded | any | `Unchanged` |
//! | changed | as recorded | `Refresh` (sent to the replica, then recorded) |
//! | changed | disks added after the recorded ones | `DisksAdded(added)` (replicated from this cycle: a full first layer each) |
//! | changed | a disk removed, or the order changed | `DisksChanged { added, removed }` (refused) |

/// An event that does not fit the chain's state (a driver bug); it changes nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainRefusal {
    /// `Start` while a cycle's job is running.
    #[error("a libvirt backup cycle is already running")]
    CycleRunning,
    /// An outcome with no cycle running.
    #[error("no libvirt backup cycle is running")]
    NoCycle,
}

/// Prefix of vmreplica's checkpoints (the same as `vmr_libvirt::CHECKPOINT_PREFIX`).
pub const PREFIX: &str = "vmreplica-";

/// First wait after another job was seen, doubled per consecutive busy start up to
/// [`MAX_WAIT_MS`].
pub const FIRST_WAIT_MS: u64 = 1_000;
/// Longest wait between two tries while another job holds the domain.
pub const MAX_WAIT_MS: u64 = 60_000;

/// Why the chain cannot be trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResyncCause {
    /// The acknowledged checkpoint is gone from the domain.
    CheckpointMissing(String),
    /// libvirt refused the checkpoint as missing or inconsistent when the job began.
    Refused(String),
    /// The checkpoint's lost metadata could not be redefined from its recorded description
    /// (its bitmap is missing from an image or inconsistent): the name and libvirt's reason.
    RedefineRefused(String, String),
}

/// How a backup job's start failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BeginFailure {
    /// Another job holds the domain.
    Busy,
    /// The `<incremental>` checkpoint is missing or inconsistent.
    Resync,
    /// Anything else (the domain stopped, libvirt unreachable): nothing changed.
    Other,
}

/// What the driver reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainEvent {
    /// A cycle should start: the domain's checkpoint names and its running job.
    Start {
        /// All of the domain's checkpoints (others' too; only `vmreplica-*` count).
        present: Vec<String>,
        /// A backup job of ours (its socket in our work directory) runs.
        own_job: bool,
        /// Another job runs on the domain.
        other_job: bool,
        /// The acked checkpoint's description is recorded (its lost metadata can be
        /// redefined).
        redefinable: bool,
        /// The captured disks (targets) the acked checkpoint has no bitmap for: disks added to
        /// the domain since it was created.
        uncovered: Vec<String>,
        /// Milliseconds since the epoch.
        now_ms: u64,
    },
    /// Redefining the acked checkpoint (`Redefine`) failed; no job began.
    RedefineFailed {
        /// libvirt's reason.
        message: String,
        /// Milliseconds since the epoch.
        now_ms: u64,
    },
    /// `virDomainBackupBegin` failed.
    BeginFailed {
        /// How.
        failure: BeginFailure,
        /// Milliseconds since the epoch.
        now_ms: u64,
    },
    /// The replica acknowledged the cycle.
    Acknowledged {
        /// Milliseconds since the epoch.
        now_ms: u64,
    },
    /// The cycle failed after its job began.
    Failed {
        /// Milliseconds since the epoch.
        now_ms: u64,
    },
}

/// What the driver does, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainAction {
    /// End the domain's backup job.
    AbortJob,
    /// Delete one of vmreplica's checkpoints (a missing one is fine).
    Delete(String),
    /// In the incremental job that follows, back these disks up whole (`backupmode='full'`):
    /// the `<incremental>` checkpoint has no bitmap for them (added to the domain since). The
    /// new checkpoint covers them, so the next delta includes them.
    FullDisks(Vec<String>),
    /// Redefine the acked checkpoint's lost metadata from its recorded description, with
    /// libvirt validating its bitmaps; on failure report `RedefineFailed` and carry out nothing
    /// else of this step.
    Redefine(String),
    /// Begin the backup job: a delta from `from`, or a full backup; `new` created with it.
    Begin {
        /// `<incremental>`.
        from: Option<String>,
        /// The new checkpoint.
        new: String,
    },
    /// Another job holds the domain: try again after this long.
    Wait {
        /// Milliseconds.
        ms: u64,
    },
    /// The chain cannot be trusted: the cycle (or the next) is a full one, a resync.
    Resync(ResyncCause),
    /// Persist the acknowledged checkpoint.
    Record(Option<String>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct InFlight {
    from: Option<String>,
    new: String,
    /// The cycle began by redefining `from`.
    redefining: bool,
}

/// The counters `status` shows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChainStats {
    /// Starts that met another job.
    pub busy: u64,
    /// Consecutive busy starts now (0 once a job began).
    pub busy_streak: u32,
    /// When the current busy streak began.
    pub busy_since_ms: Option<u64>,
    /// Resyncs the chain required.
    pub resyncs: u64,
    /// Lost checkpoint metadata redefined from the record (attempts; a failed one is also a
    /// resync).
    pub redefines: u64,
}

/// The chain of one VM.
#[derive(Debug, Clone, Default)]
pub struct CheckpointChain {
    acked: Option<String>,
    cycle: Option<InFlight>,
    stats: ChainStats,
    /// The highest number this chain gave a checkpoint: a name whose job failed is not tried
    /// again (its bitmap may outlive libvirt's metadata: "Bitmap already exists").
    floor: u64,
    /// The acked checkpoint whose redefinition was tried: never tried twice.
    redefined: Option<String>,
}

fn seq(name: &str) -> Option<u64> {
    name.strip_prefix(PREFIX)?.parse().ok()
}

impl CheckpointChain {
    /// A chain whose last acknowledged checkpoint is `acked` (from the VM's record).
    pub fn new(acked: Option<String>) -> CheckpointChain {
        CheckpointChain {
            acked,
            ..CheckpointChain::default()
        }
    }

    /// The last acknowledged checkpoint: the next delta starts there.
    pub fn acked(&self) -> Option<&str> {
        self.acked.as_deref()
    }

    /// The counters.
    pub fn stats(&self) -> ChainStats {
        self.stats
    }

    fn wait(&mut self, now_ms: u64) -> ChainAction {
        self.stats.busy += 1;
        self.stats.busy_streak = self.stats.busy_streak.saturating_add(1);
        self.stats.busy_since_ms.get_or_insert(now_ms);
        let shift = (self.stats.busy_streak - 1).min(16);
        ChainAction::Wait {
            ms: FIRST_WAIT_MS.saturating_mul(1 << shift).min(MAX_WAIT_MS),
        }
    }

    /// Feed one event; a refused event changes nothing.
    pub fn step(&mut self, ev: ChainEvent) -> Result<Vec<ChainAction>, ChainRefusal> {
        match ev {
            ChainEvent::Start {
                present,
                own_job,
                other_job,
                redefinable,
                uncovered,
                now_ms,
            } => {
                if self.cycle.is_some() {
                    return Err(ChainRefusal::CycleRunning);
                }
                let mut acts = Vec::new();
                if own_job {
                    acts.push(ChainAction::AbortJob);
                } else if other_job {
                    return Ok(vec![self.wait(now_ms)]);
                }
                let ours: Vec<&String> = present.iter().filter(|n| seq(n).is_some()).collect();
                // a vanished acked checkpoint's bitmap may still be in the images
                let acked_seq = self.acked.as_deref().and_then(seq).unwrap_or(0);
                let mut redefining = false;
                if let Some(c) = &self.acked
                    && !ours.contains(&c)
                    && redefinable
                    && self.redefined.as_ref() != Some(c)
                {
                    // libvirt's metadata lost, the bitmaps perhaps still in the images
                    self.redefined = Some(c.clone());
                    self.stats.redefines += 1;
                    redefining = true;
                    acts.push(ChainAction::Redefine(c.clone()));
                } else if let Some(c) = &self.acked
                    && !ours.contains(&c)
                {
                    acts.push(ChainAction::Resync(ResyncCause::CheckpointMissing(
                        c.clone(),
                    )));
                    self.stats.resyncs += 1;
                    self.acked = None;
                    acts.push(ChainAction::Record(None));
                }
                for n in &ours {
                    if Some(n.as_str()) != self.acked.as_deref() {
                        acts.push(ChainAction::Delete((*n).clone()));
                    }
                }
                let top = ours
                    .iter()
                    .filter_map(|n| seq(n))
                    .chain([acked_seq, self.floor])
                    .max()
                    .unwrap_or(0)
                    .saturating_add(1);
                self.floor = top;
                let new = format!("{PREFIX}{top}");
                self.cycle = Some(InFlight {
                    from: self.acked.clone(),
                    new: new.clone(),
                    redefining,
                });
                if self.acked.is_some() && !uncovered.is_empty() {
                    acts.push(ChainAction::FullDisks(uncovered));
                }
                acts.push(ChainAction::Begin {
                    from: self.acked.clone(),
                    new,
                });
                Ok(acts)
            }
            ChainEvent::RedefineFailed { message, .. } => {
                if !self.cycle.as_ref().is_some_and(|c| c.redefining) {
                    return Err(ChainRefusal::NoCycle);
                }
                let c = self.cycle.take();
                self.stats.resyncs += 1;
                self.acked = None;
                Ok(vec![
                    ChainAction::Resync(ResyncCause::RedefineRefused(
                        c.and_then(|c| c.from).unwrap_or_default(),
                        message,
                    )),
                    ChainAction::Record(None),
                ])
            }
            ChainEvent::BeginFailed { failure, now_ms } => {
                let Some(c) = self.cycle.take() else {
                    return Err(ChainRefusal::NoCycle);
                };
                if c.redefining && failure == BeginFailure::Busy {
                    // the redefinition was not judged: it is tried again
                    self.redefined = None;
                }
                Ok(match failure {
                    BeginFailure::Busy => vec![self.wait(now_ms)],
                    BeginFailure::Resync => {
                        self.stats.resyncs += 1;
                        self.acked = None;
                        vec![
                            ChainAction::Resync(ResyncCause::Refused(c.from.unwrap_or_default())),
                            ChainAction::Record(None),
                        ]
                    }
                    BeginFailure::Other => Vec::new(),
                })
            }
            ChainEvent::Acknowledged { .. } => {
                let Some(c) = self.cycle.take() else {
                    return Err(ChainRefusal::NoCycle);
                };
                self.stats.busy_streak = 0;
                self.stats.busy_since_ms = None;
                let mut acts = vec![ChainAction::AbortJob];
                if let Some(from) = c.from {
                    acts.push(ChainAction::Delete(from));
                }
                self.acked = Some(c.new.clone());
                acts.push(ChainAction::Record(Some(c.new)));
                Ok(acts)
            }
            ChainEvent::Failed { .. } => {
                let Some(c) = self.cycle.take() else {
                    return Err(ChainRefusal::NoCycle);
                };
                self.stats.busy_streak = 0;
                self.stats.busy_since_ms = None;
                Ok(vec![ChainAction::AbortJob, ChainAction::Delete(c.new)])
            }
        }
    }
}

/// What a cycle does about the domain's definition ([`definition_change`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DefinitionChange {
    /// The domain XML is the one recorded (and held by the replica).
    Unchanged,
    /// The XML changed, the replicated disks did not: send it to the replica, then record it.
    Refresh,
    /// Disks were added to the domain, after the recorded ones (which it still has, in order):
    /// they are replicated from this cycle on (refresh the definition with them).
    DisksAdded(Vec<String>),
    /// The domain's replicated disks differ from the recorded ones otherwise (a disk removed,
    /// the order changed).
    DisksChanged {
        /// Targets of the domain not in the record.
        added: Vec<String>,
        /// Recorded targets the domain no longer has.
        removed: Vec<String>,
    },
}

/// Compare the domain's current XML and disk targets with the recorded ones.
pub fn definition_change(
    recorded_xml: Option<&str>,
    recorded_disks: &[String],
    current_xml: &str,
    current_disks: &[String],
) -> DefinitionChange {
    if recorded_xml == Some(current_xml) {
        return DefinitionChange::Unchanged;
    }
    if recorded_disks == current_disks {
        return DefinitionChange::Refresh;
    }
    let added: Vec<String> = current_disks
        .iter()
        .filter(|d| !recorded_disks.contains(d))
        .cloned()
        .collect();
    let removed: Vec<String> = recorded_disks
        .iter()
        .filter(|d| !current_disks.contains(d))
        .cloned()
        .collect();
    if current_disks.starts_with(recorded_disks) && !added.is_empty() {
        return DefinitionChange::DisksAdded(added);
    }
    DefinitionChange::DisksChanged { added, removed }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ChainAction::*;

    #[test]
    fn definition_change_table() {
        let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        /// (recorded XML, recorded disks, current XML, current disks) -> decision
        type Case<'a> = (
            Option<&'a str>,
            Vec<String>,
            &'a str,
            Vec<String>,
            DefinitionChange,
        );
        let cases: Vec<Case> = vec![
            (
                Some("<a/>"),
                v(&["vda", "vdb"]),
                "<a/>",
                v(&["vda", "vdb"]),
                DefinitionChange::Unchanged,
            ),
            (
                Some("<a/>"),
                v(&["vda", "vdb"]),
                "<b/>",
                v(&["vda", "vdb"]),
                DefinitionChange::Refresh,
            ),
            // a record without XML (never the case for a libvirt VM) is refreshed
            (
                None,
                v(&["vda"]),
                "<b/>",
                v(&["vda"]),
                DefinitionChange::Refresh,
            ),
            (
                Some("<a/>"),
                v(&["vda", "vdb"]),
                "<b/>",
                v(&["vda", "vdb", "vdc"]),
                DefinitionChange::DisksAdded(v(&["vdc"])),
            ),
            // a disk added before a recorded one changes the extent order: refused
            (
                Some("<a/>"),
                v(&["vdb", "vdc"]),
                "<b/>",
                v(&["vda", "vdb", "vdc"]),
                DefinitionChange::DisksChanged {
                    added: v(&["vda"]),
                    removed: vec![],
                },
            ),
            // one added, one removed
            (
                Some("<a/>"),
                v(&["vda", "vdb"]),
                "<b/>",
                v(&["vda", "vdc"]),
                DefinitionChange::DisksChanged {
                    added: v(&["vdc"]),
                    removed: v(&["vdb"]),
                },
            ),
            (
                Some("<a/>"),
                v(&["vda", "vdb"]),
                "<b/>",
                v(&["vda"]),
                DefinitionChange::DisksChanged {
                    added: vec![],
                    removed: v(&["vdb"]),
                },
            ),
            // the same disks in another order are another extent index order: a change
            (
                Some("<a/>"),
                v(&["vda", "vdb"]),
                "<b/>",
                v(&["vdb", "vda"]),
                DefinitionChange::DisksChanged {
                    added: vec![],
                    removed: vec![],
                },
            ),
        ];
        for (rx, rd, cx, cd, want) in cases {
            assert_eq!(
                definition_change(rx, &rd, cx, &cd),
                want,
                "{rx:?} {rd:?} {cx} {cd:?}"
            );
        }
    }

    fn start(present: &[&str], own_job: bool, other_job: bool) -> ChainEvent {
        ChainEvent::Start {
            present: present.iter().map(|s| s.to_string()).collect(),
            own_job,
            other_job,
            redefinable: false,
            uncovered: vec![],
            now_ms: 1_000,
        }
    }

    #[test]
    fn added_disks_are_backed_up_whole_in_a_delta() {
        let start = |present: &[&str], uncovered: &[&str]| ChainEvent::Start {
            present: present.iter().map(|s| s.to_string()).collect(),
            own_job: false,
            other_job: false,
            redefinable: false,
            uncovered: uncovered.iter().map(|s| s.to_string()).collect(),
            now_ms: 1,
        };
        // vdc was attached after vmreplica-4: a delta for the others, vdc whole
        let mut c = CheckpointChain::new(Some(s("vmreplica-4")));
        let a = c.step(start(&["vmreplica-4"], &["vdc"])).expect("start");
        assert_eq!(
            a,
            vec![
                FullDisks(vec![s("vdc")]),
                Begin {
                    from: Some(s("vmreplica-4")),
                    new: s("vmreplica-5")
                }
            ]
        );
        // acknowledged: the new checkpoint covers vdc, the next start reports none uncovered
        c.step(ChainEvent::Acknowledged { now_ms: 2 }).expect("ack");
        let a = c.step(start(&["vmreplica-5"], &[])).expect("start");
        assert_eq!(
            a,
            vec![Begin {
                from: Some(s("vmreplica-5")),
                new: s("vmreplica-6")
            }]
        );
        // a failed cycle: vdc is still uncovered by the older checkpoint, whole again
        c.step(ChainEvent::Failed { now_ms: 3 }).expect("failed");
        let a = c.step(start(&["vmreplica-5"], &["vdc"])).expect("start");
        assert_eq!(a[0], FullDisks(vec![s("vdc")]));
        // a full cycle reads every disk anyway
        let mut c = CheckpointChain::new(None);
        let a = c.step(start(&[], &["vdc"])).expect("start");
        assert_eq!(
            a,
            vec![Begin {
                from: None,
                new: s("vmreplica-1")
            }]
        );
    }

    fn start_redefinable(present: &[&str]) -> ChainEvent {
        ChainEvent::Start {
            present: present.iter().map(|s| s.to_string()).collect(),
            own_job: false,
            other_job: false,
            redefinable: true,
            uncovered: vec![],
            now_ms: 1_000,
        }
    }

    #[test]
    fn lost_metadata_is_redefined_once_then_resynced() {
        // the acked checkpoint's metadata is gone, its description recorded: redefined, and
        // the delta is taken from it
        let mut c = CheckpointChain::new(Some(s("vmreplica-4")));
        let a = c
            .step(start_redefinable(&["vmreplica-5", "other"]))
            .expect("start");
        assert_eq!(
            a,
            vec![
                Redefine(s("vmreplica-4")),
                Delete(s("vmreplica-5")),
                Begin {
                    from: Some(s("vmreplica-4")),
                    new: s("vmreplica-6"),
                },
            ]
        );
        assert_eq!(c.stats().redefines, 1);
        // the job ran and was acknowledged: the chain goes on
        let a = c.step(ChainEvent::Acknowledged { now_ms: 2 }).expect("ack");
        assert_eq!(
            a,
            vec![
                AbortJob,
                Delete(s("vmreplica-4")),
                Record(Some(s("vmreplica-6")))
            ]
        );
        assert_eq!(c.stats().resyncs, 0);

        // a bitmap missing or inconsistent: libvirt refuses the redefinition, which is a
        // resync (the acked checkpoint dropped), never a delta
        let mut c = CheckpointChain::new(Some(s("vmreplica-4")));
        c.step(start_redefinable(&[])).expect("start");
        let a = c
            .step(ChainEvent::RedefineFailed {
                message: s("missing or broken bitmap"),
                now_ms: 2,
            })
            .expect("redefine failed");
        assert_eq!(
            a,
            vec![
                Resync(ResyncCause::RedefineRefused(
                    s("vmreplica-4"),
                    s("missing or broken bitmap")
                )),
                Record(None)
            ]
        );
        assert_eq!(c.acked(), None);
        assert_eq!(c.stats().resyncs, 1);
        // the next start is a full one under a name never tried
        let a = c.step(start_redefinable(&[])).expect("start");
        assert_eq!(
            a,
            vec![Begin {
                from: None,
                new: s("vmreplica-6")
            }]
        );

        // a redefinition is tried once per checkpoint: a job that then fails to begin
        // (another way) and a second start with the metadata still missing is a resync
        let mut c = CheckpointChain::new(Some(s("vmreplica-4")));
        c.step(start_redefinable(&[])).expect("start");
        c.step(ChainEvent::BeginFailed {
            failure: BeginFailure::Other,
            now_ms: 2,
        })
        .expect("failed");
        let a = c.step(start_redefinable(&[])).expect("start");
        assert_eq!(
            a[0],
            Resync(ResyncCause::CheckpointMissing(s("vmreplica-4")))
        );
        assert_eq!(c.stats().redefines, 1);

        // another job held the domain while redefining: tried again at the next start
        let mut c = CheckpointChain::new(Some(s("vmreplica-4")));
        c.step(start_redefinable(&[])).expect("start");
        let a = c
            .step(ChainEvent::BeginFailed {
                failure: BeginFailure::Busy,
                now_ms: 2,
            })
            .expect("busy");
        assert_eq!(a, vec![Wait { ms: FIRST_WAIT_MS }]);
        let a = c.step(start_redefinable(&[])).expect("start");
        assert_eq!(a[0], Redefine(s("vmreplica-4")));

        // without a recorded description: a resync, as before
        let mut c = CheckpointChain::new(Some(s("vmreplica-4")));
        let a = c.step(start(&[], false, false)).expect("start");
        assert_eq!(
            a[0],
            Resync(ResyncCause::CheckpointMissing(s("vmreplica-4")))
        );
        // a RedefineFailed without a redefinition under way is refused
        let mut c = CheckpointChain::new(Some(s("vmreplica-4")));
        c.step(start(&["vmreplica-4"], false, false))
            .expect("start");
        assert!(
            c.step(ChainEvent::RedefineFailed {
                message: s("x"),
                now_ms: 3
            })
            .is_err()
        );
    }

    fn s(x: &str) -> String {
        x.to_string()
    }

    /// (acked, present, own job, other job) -> actions
    type StartCase = (
        Option<&'static str>,
        Vec<&'static str>,
        bool,
        bool,
        Vec<ChainAction>,
    );

    #[test]
    fn start_table() {
        let cases: Vec<StartCase> = vec![
            (
                None,
                vec![],
                false,
                false,
                vec![Begin {
                    from: None,
                    new: s("vmreplica-1"),
                }],
            ),
            (
                Some("vmreplica-4"),
                vec!["vmreplica-4", "nightly-backup"],
                false,
                false,
                vec![Begin {
                    from: Some(s("vmreplica-4")),
                    new: s("vmreplica-5"),
                }],
            ),
            // a failed cycle's checkpoint left behind: deleted, never reused as a name
            (
                Some("vmreplica-4"),
                vec!["vmreplica-4", "vmreplica-5"],
                false,
                false,
                vec![
                    Delete(s("vmreplica-5")),
                    Begin {
                        from: Some(s("vmreplica-4")),
                        new: s("vmreplica-6"),
                    },
                ],
            ),
            // a crash left our job running
            (
                Some("vmreplica-4"),
                vec!["vmreplica-4", "vmreplica-5"],
                true,
                true,
                vec![
                    AbortJob,
                    Delete(s("vmreplica-5")),
                    Begin {
                        from: Some(s("vmreplica-4")),
                        new: s("vmreplica-6"),
                    },
                ],
            ),
            // the acked checkpoint vanished (libvirt state lost, migrated)
            (
                Some("vmreplica-4"),
                vec!["vmreplica-2", "other"],
                false,
                false,
                vec![
                    Resync(ResyncCause::CheckpointMissing(s("vmreplica-4"))),
                    Record(None),
                    Delete(s("vmreplica-2")),
                    Begin {
                        from: None,
                        new: s("vmreplica-5"),
                    },
                ],
            ),
            // no acked checkpoint: everything of ours is stale, others' untouched
            (
                None,
                vec!["vmreplica-9", "vmreplica-x", "mine"],
                false,
                false,
                vec![
                    Delete(s("vmreplica-9")),
                    Begin {
                        from: None,
                        new: s("vmreplica-10"),
                    },
                ],
            ),
            // another tool's job: wait, nothing else
            (
                Some("vmreplica-4"),
                vec!["vmreplica-4"],
                false,
                true,
                vec![Wait { ms: FIRST_WAIT_MS }],
            ),
        ];
        for (acked, present, own, other, want) in cases {
            let mut c = CheckpointChain::new(acked.map(s));
            let got = c.step(start(&present, own, other)).expect("start");
            assert_eq!(got, want, "acked {acked:?} present {present:?}");
        }
    }

    #[test]
    fn acknowledged_cycle_moves_the_chain() {
        let mut c = CheckpointChain::new(None);
        c.step(start(&[], false, false)).expect("start");
        let a = c.step(ChainEvent::Acknowledged { now_ms: 2 }).expect("ack");
        assert_eq!(a, vec![AbortJob, Record(Some(s("vmreplica-1")))]);
        assert_eq!(c.acked(), Some("vmreplica-1"));
        c.step(start(&["vmreplica-1"], false, false))
            .expect("start");
        let a = c.step(ChainEvent::Acknowledged { now_ms: 3 }).expect("ack");
        assert_eq!(
            a,
            vec![
                AbortJob,
                Delete(s("vmreplica-1")),
                Record(Some(s("vmreplica-2")))
            ]
        );
    }

    #[test]
    fn failed_cycle_keeps_the_older_checkpoint() {
        let mut c = CheckpointChain::new(Some(s("vmreplica-1")));
        c.step(start(&["vmreplica-1"], false, false))
            .expect("start");
        let a = c.step(ChainEvent::Failed { now_ms: 2 }).expect("failed");
        assert_eq!(a, vec![AbortJob, Delete(s("vmreplica-2"))]);
        assert_eq!(c.acked(), Some("vmreplica-1"));
        // the next delta is from the older checkpoint again, under a name not tried before
        let a = c
            .step(start(&["vmreplica-1"], false, false))
            .expect("start");
        assert_eq!(
            a,
            vec![Begin {
                from: Some(s("vmreplica-1")),
                new: s("vmreplica-3")
            }]
        );
    }

    #[test]
    fn names_whose_bitmaps_may_remain_are_not_reused() {
        // libvirt's metadata of the acked checkpoint was lost, its bitmap stays in the images
        let mut c = CheckpointChain::new(Some(s("vmreplica-1")));
        let a = c.step(start(&[], false, false)).expect("start");
        assert_eq!(
            a.last(),
            Some(&Begin {
                from: None,
                new: s("vmreplica-2")
            })
        );
        // ... and so was a failed job's: "Bitmap already exists" is a resync, and the next
        // start takes a new name rather than failing on the same one forever
        c.step(ChainEvent::BeginFailed {
            failure: BeginFailure::Resync,
            now_ms: 2,
        })
        .expect("failed");
        let a = c.step(start(&[], false, false)).expect("start");
        assert_eq!(
            a,
            vec![Begin {
                from: None,
                new: s("vmreplica-3")
            }]
        );
    }

    #[test]
    fn begin_failures() {
        let mut c = CheckpointChain::new(Some(s("vmreplica-3")));
        c.step(start(&["vmreplica-3"], false, false))
            .expect("start");
        let a = c
            .step(ChainEvent::BeginFailed {
                failure: BeginFailure::Busy,
                now_ms: 5,
            })
            .expect("busy");
        assert_eq!(a, vec![Wait { ms: FIRST_WAIT_MS }]);
        c.step(start(&["vmreplica-3"], false, true)).expect("start");
        c.step(start(&["vmreplica-3"], false, true)).expect("start");
        let st = c.stats();
        assert_eq!((st.busy, st.busy_streak, st.busy_since_ms), (3, 3, Some(5)));
        // the waits grow and stop growing
        for _ in 0..20 {
            c.step(start(&["vmreplica-3"], false, true)).expect("start");
        }
        assert_eq!(
            c.step(start(&["vmreplica-3"], false, true)).expect("start"),
            vec![Wait { ms: MAX_WAIT_MS }]
        );
        assert_eq!(c.acked(), Some("vmreplica-3"));
        c.step(start(&["vmreplica-3"], false, false))
            .expect("start");
        let a = c
            .step(ChainEvent::BeginFailed {
                failure: BeginFailure::Resync,
                now_ms: 6,
            })
            .expect("resync");
        assert_eq!(
            a,
            vec![Resync(ResyncCause::Refused(s("vmreplica-3"))), Record(None)]
        );
        assert_eq!(c.acked(), None);
        assert_eq!(c.stats().resyncs, 1);
        c.step(start(&["vmreplica-3"], false, false))
            .expect("start");
        let a = c
            .step(ChainEvent::BeginFailed {
                failure: BeginFailure::Other,
                now_ms: 7,
            })
            .expect("other");
        assert!(a.is_empty());
    }

    #[test]
    fn refusals_change_nothing() {
        let mut c = CheckpointChain::new(Some(s("vmreplica-1")));
        assert!(c.step(ChainEvent::Acknowledged { now_ms: 1 }).is_err());
        assert!(c.step(ChainEvent::Failed { now_ms: 1 }).is_err());
        assert!(
            c.step(ChainEvent::BeginFailed {
                failure: BeginFailure::Busy,
                now_ms: 1
            })
            .is_err()
        );
        c.step(start(&["vmreplica-1"], false, false))
            .expect("start");
        assert!(c.step(start(&["vmreplica-1"], false, false)).is_err());
        assert_eq!(c.acked(), Some("vmreplica-1"));
        assert_eq!(c.stats(), ChainStats::default());
    }
}
