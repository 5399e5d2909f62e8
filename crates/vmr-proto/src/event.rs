//! The agent's events (`vmreplica events`, the webhook and command sinks): what happened to a
//! VM (or the host), when, how severe, for people and as structured fields; the JSON body a
//! sink receives (version [`EVENT_FORMAT`]); the `[events]` section of `config.toml` (log
//! bounds and sinks); and the query of the event log.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::state::{Health, ReplicationMode, ReplicationState};

/// Version of an event's JSON form (its `version` field). Readers ignore fields they do not
/// know; a change that removes or retypes a field bumps this.
pub const EVENT_FORMAT: u32 = 1;

/// How severe an event is (the sinks' filter, the CLI's colour).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Severity {
    /// Something happened; nothing to do.
    Info,
    /// Needs attention soon (replication is behind, a cycle failed).
    Warning,
    /// Replication is not protecting the VM.
    Critical,
}

impl Severity {
    /// The severity of a health level.
    pub fn of_health(h: Health) -> Severity {
        match h {
            Health::Normal => Severity::Info,
            Health::Warning => Severity::Warning,
            Health::Critical => Severity::Critical,
        }
    }
}

impl std::fmt::Display for Severity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// The replication state changed (fields `from`, `to`).
    StateChanged,
    /// The health level changed (fields `from`, `to`, `reason`).
    HealthChanged,
    /// A cycle failed (rate-limited: the first failure, every Nth in a row, and a changed
    /// error; fields `consecutive`, `error`).
    CycleFailed,
    /// A cycle was not completed within its interval (field `missed`).
    CycleMissed,
    /// Change tracking was lost or the replica refused the base: a resync must be started.
    ResyncRequired,
    /// The replica store has no room for a cycle (field `error`).
    StoreFull,
    /// The time since the last point's cut passed the RPO alert (fields `lag_ms`, `rpo_ms`).
    RpoExceeded,
    /// The lag is back under the RPO alert (fields `lag_ms`, `rpo_ms`, `alert`: the id of the
    /// `rpo-exceeded` event it ends).
    RpoRecovered,
    /// `failover prepare` shipped the final cycle (primary).
    FailoverPrepared,
    /// `failover start` ran the VM from a recovery point (field `point`).
    FailoverStarted,
    /// `failover test` started a test copy (fields `point`, `copy`).
    FailoverTestStarted,
    /// `failover stop-test` removed test copies.
    FailoverTestStopped,
    /// `failover cancel` undid a failover.
    FailoverCancelled,
    /// `failover complete` committed a failover.
    FailoverCompleted,
    /// `reverse` made the failed-over VM a primary replicating back.
    Reversed,
    /// The agent started (host-wide).
    AgentStarted,
    /// The agent is stopping (host-wide).
    AgentStopped,
    /// A verification found the replica's point differing from the primary (Critical; fields
    /// `point`, `mismatched_blocks`, `ranges`: per disk, every differing byte range).
    VerifyMismatch,
    /// Automatic failover fenced the primary's VM (paused it, or killed it by the power-off
    /// policy) because its right to run ran out or the replica took over (Critical; fields
    /// `reason`, `how`).
    Fenced,
    /// Automatic failover on the replica: the witness granted the lease and the VM was
    /// started here (Critical; fields `epoch`, `point`); also a refused or failed takeover.
    AutoFailover,
}

impl EventKind {
    /// The kind's name in JSON and in `VMR_EVENT_KIND` (`state-changed`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::StateChanged => "state-changed",
            EventKind::HealthChanged => "health-changed",
            EventKind::CycleFailed => "cycle-failed",
            EventKind::CycleMissed => "cycle-missed",
            EventKind::ResyncRequired => "resync-required",
            EventKind::StoreFull => "store-full",
            EventKind::RpoExceeded => "rpo-exceeded",
            EventKind::RpoRecovered => "rpo-recovered",
            EventKind::FailoverPrepared => "failover-prepared",
            EventKind::FailoverStarted => "failover-started",
            EventKind::FailoverTestStarted => "failover-test-started",
            EventKind::FailoverTestStopped => "failover-test-stopped",
            EventKind::FailoverCancelled => "failover-cancelled",
            EventKind::FailoverCompleted => "failover-completed",
            EventKind::Reversed => "reversed",
            EventKind::AgentStarted => "agent-started",
            EventKind::AgentStopped => "agent-stopped",
            EventKind::VerifyMismatch => "verify-mismatch",
            EventKind::Fenced => "fenced",
            EventKind::AutoFailover => "auto-failover",
        }
    }

    /// The kind of a name (`as_str`'s inverse).
    pub fn parse(s: &str) -> Option<EventKind> {
        ALL_KINDS.iter().copied().find(|k| k.as_str() == s)
    }
}

/// Every event kind.
pub const ALL_KINDS: [EventKind; 20] = [
    EventKind::StateChanged,
    EventKind::HealthChanged,
    EventKind::CycleFailed,
    EventKind::CycleMissed,
    EventKind::ResyncRequired,
    EventKind::StoreFull,
    EventKind::RpoExceeded,
    EventKind::RpoRecovered,
    EventKind::FailoverPrepared,
    EventKind::FailoverStarted,
    EventKind::FailoverTestStarted,
    EventKind::FailoverTestStopped,
    EventKind::FailoverCancelled,
    EventKind::FailoverCompleted,
    EventKind::Reversed,
    EventKind::AgentStarted,
    EventKind::AgentStopped,
    EventKind::VerifyMismatch,
    EventKind::Fenced,
    EventKind::AutoFailover,
];

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The VM an event is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventVm {
    /// VM name.
    pub name: String,
    /// VM UUID.
    pub uuid: Uuid,
    /// This host's side for the VM.
    pub role: ReplicationMode,
    /// Its replication state when the event was made.
    pub state: ReplicationState,
}

/// One event of the agent's event log, and the JSON body of a sink (one object).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// [`EVENT_FORMAT`].
    pub version: u32,
    /// Increasing id in this agent's log (health reasons name it: "(event 42)").
    pub id: u64,
    /// When it happened, ms since the epoch.
    pub time_ms: u64,
    /// The agent's name (`config.toml` `name`).
    pub host: String,
    /// The VM; absent for host-wide events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<EventVm>,
    /// What happened.
    pub kind: EventKind,
    /// How severe.
    pub severity: Severity,
    /// For people.
    pub message: String,
    /// Structured details (by kind; documented in docs/monitoring.md).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub fields: BTreeMap<String, serde_json::Value>,
}

impl Event {
    /// The event as one JSON line (no newline): the sinks' body and `events --json`.
    pub fn to_json(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string(self)
    }

    /// The event's environment for a command sink: `VMR_EVENT_*` variables.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut v = vec![
            ("VMR_EVENT_VERSION".to_owned(), self.version.to_string()),
            ("VMR_EVENT_ID".to_owned(), self.id.to_string()),
            ("VMR_EVENT_TIME_MS".to_owned(), self.time_ms.to_string()),
            ("VMR_EVENT_HOST".to_owned(), self.host.clone()),
            ("VMR_EVENT_KIND".to_owned(), self.kind.as_str().to_owned()),
            ("VMR_EVENT_SEVERITY".to_owned(), self.severity.to_string()),
            ("VMR_EVENT_MESSAGE".to_owned(), self.message.clone()),
        ];
        if let Some(vm) = &self.vm {
            v.push(("VMR_EVENT_VM".to_owned(), vm.name.clone()));
            v.push(("VMR_EVENT_VM_UUID".to_owned(), vm.uuid.to_string()));
            v.push(("VMR_EVENT_ROLE".to_owned(), format!("{:?}", vm.role)));
            v.push(("VMR_EVENT_STATE".to_owned(), vm.state.to_string()));
        }
        v
    }
}

/// A query of the event log: newest `limit` events matching, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventQuery {
    /// Only this VM's events (by name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    /// Only events at or after this time (ms since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_ms: Option<u64>,
    /// Only events with a larger id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_id: Option<u64>,
    /// At most this many (the newest); `None` = [`DEFAULT_QUERY_LIMIT`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// Events a query returns when it names no limit.
pub const DEFAULT_QUERY_LIMIT: u32 = 1000;

impl EventQuery {
    /// Whether `e` matches the query's VM, time and id (not its limit).
    pub fn matches(&self, e: &Event) -> bool {
        self.vm
            .as_ref()
            .is_none_or(|n| e.vm.as_ref().is_some_and(|v| &v.name == n))
            && self.since_ms.is_none_or(|t| e.time_ms >= t)
            && self.after_id.is_none_or(|id| e.id > id)
    }
}

/// The `[events]` section of `config.toml`: the log's bounds and the sinks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct EventsConfig {
    /// Keep at most this many events (the oldest are deleted).
    #[serde(default = "default_max_events")]
    pub max_events: u64,
    /// Delete events older than this many days.
    #[serde(default = "default_max_age_days")]
    pub max_age_days: u64,
    /// Cycle failures in a row between two `cycle-failed` events of one VM (the first and
    /// a changed error always make one).
    #[serde(default = "default_failure_every")]
    pub failure_every: u32,
    /// Webhooks: each event is POSTed as JSON.
    #[serde(default, rename = "webhook", skip_serializing_if = "Vec::is_empty")]
    pub webhooks: Vec<WebhookSink>,
    /// Commands: each event runs the command.
    #[serde(default, rename = "command", skip_serializing_if = "Vec::is_empty")]
    pub commands: Vec<CommandSink>,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            max_events: default_max_events(),
            max_age_days: default_max_age_days(),
            failure_every: default_failure_every(),
            webhooks: Vec::new(),
            commands: Vec::new(),
        }
    }
}

fn default_max_events() -> u64 {
    10_000
}
fn default_max_age_days() -> u64 {
    30
}
fn default_failure_every() -> u32 {
    10
}
fn default_min_severity() -> Severity {
    Severity::Info
}
fn default_queue() -> usize {
    1000
}
fn default_timeout_secs() -> u64 {
    10
}
fn default_retries() -> u32 {
    5
}

/// A webhook sink (`[[events.webhook]]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct WebhookSink {
    /// `http://HOST[:PORT]/PATH` or `https://...`.
    pub url: String,
    /// Sent as `Authorization: Bearer TOKEN`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bearer_token: Option<String>,
    /// Only events at least this severe.
    #[serde(default = "default_min_severity")]
    pub min_severity: Severity,
    /// Events waiting to be sent at most; more are dropped (counted and logged).
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// One attempt's timeout, seconds.
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
    /// Attempts after the first (1 s, 2 s, 4 s ... apart, at most 60 s).
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// https: trust these PEM certificates instead of the system's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
}

/// A command sink (`[[events.command]]`): run without a shell, the event in `VMR_EVENT_*`
/// variables and as JSON on stdin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CommandSink {
    /// The program and its arguments.
    pub argv: Vec<String>,
    /// Only events at least this severe.
    #[serde(default = "default_min_severity")]
    pub min_severity: Severity,
    /// Events waiting to be run at most; more are dropped (counted and logged).
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// Killed after this many seconds.
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev() -> Event {
        Event {
            version: EVENT_FORMAT,
            id: 42,
            time_ms: 1_700_000_000_000,
            host: "host-b".into(),
            vm: Some(EventVm {
                name: "web1".into(),
                uuid: Uuid::nil(),
                role: ReplicationMode::Replica,
                state: ReplicationState::Replicating,
            }),
            kind: EventKind::RpoExceeded,
            severity: Severity::Warning,
            message: "behind".into(),
            fields: BTreeMap::from([("lag_ms".into(), serde_json::json!(12_000))]),
        }
    }

    #[test]
    fn the_json_body_is_pinned() {
        let j = ev().to_json().expect("json");
        assert_eq!(
            j,
            r#"{"version":1,"id":42,"time_ms":1700000000000,"host":"host-b","vm":{"name":"web1","uuid":"00000000-0000-0000-0000-000000000000","role":"Replica","state":"Replicating"},"kind":"rpo-exceeded","severity":"Warning","message":"behind","fields":{"lag_ms":12000}}"#
        );
        let back: Event = serde_json::from_str(&j).expect("parse");
        assert_eq!(back, ev());
    }

    #[test]
    fn kinds_name_themselves_and_parse_back() {
        for k in ALL_KINDS {
            assert_eq!(EventKind::parse(k.as_str()), Some(k));
            let j = serde_json::to_string(&k).expect("json");
            assert_eq!(j, format!("\"{}\"", k.as_str()));
        }
        assert_eq!(EventKind::parse("nope"), None);
    }

    #[test]
    fn queries_match_vm_time_and_id() {
        let e = ev();
        assert!(EventQuery::default().matches(&e));
        let q = |vm: Option<&str>, since: Option<u64>, after: Option<u64>| EventQuery {
            vm: vm.map(str::to_owned),
            since_ms: since,
            after_id: after,
            limit: None,
        };
        assert!(q(Some("web1"), None, None).matches(&e));
        assert!(!q(Some("web2"), None, None).matches(&e));
        assert!(q(None, Some(e.time_ms), None).matches(&e));
        assert!(!q(None, Some(e.time_ms + 1), None).matches(&e));
        assert!(q(None, None, Some(41)).matches(&e));
        assert!(!q(None, None, Some(42)).matches(&e));
        let mut host_wide = ev();
        host_wide.vm = None;
        assert!(!q(Some("web1"), None, None).matches(&host_wide));
    }

    #[test]
    fn the_config_section_has_defaults_and_refuses_unknown_keys() {
        let c: EventsConfig = toml::from_str(
            r#"
            [[webhook]]
            url = "http://127.0.0.1:9/hook"
            [[command]]
            argv = ["/usr/local/bin/notify", "--fast"]
            min-severity = "Warning"
            "#,
        )
        .expect("parse");
        assert_eq!(c.max_events, 10_000);
        assert_eq!(c.webhooks[0].retries, 5);
        assert_eq!(c.commands[0].min_severity, Severity::Warning);
        assert!(toml::from_str::<EventsConfig>("bogus = 1").is_err());
        let env = ev().env();
        assert!(env.contains(&("VMR_EVENT_KIND".into(), "rpo-exceeded".into())));
        assert!(env.contains(&("VMR_EVENT_VM".into(), "web1".into())));
    }
}
