//! The agent's event log: [`EventLog::emit`] gives an event its id at once (health reasons
//! name it), publishes it to followers (a broadcast) and offers it to the sinks, and hands it
//! to the log's writer thread, which appends it to the state database (`events` table) and
//! keeps the log bounded (`[events] max-events`, `max-age-days`). Emitting never waits for
//! SQLite or a sink. Queries ([`EventLog::query`]: newest N, per VM, since a time or id, for
//! `vmreplica events` and a dashboard in the same process) go through the writer thread too,
//! so a query sees every event emitted before it.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{broadcast, oneshot};
use vmr_proto::event::{
    EVENT_FORMAT, Event, EventKind, EventQuery, EventVm, EventsConfig, Severity,
};

use crate::db::{DbError, EventDb};
use crate::sinks::Sinks;

/// How many events a slow follower may fall behind before it misses some.
const FOLLOW_BUFFER: usize = 1024;
/// The writer prunes after this many inserted events (and at start).
const PRUNE_EVERY: u64 = 256;

/// Why a query failed.
#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    /// The database failed.
    #[error("event log: {0}")]
    Db(#[from] DbError),
    /// The writer thread has stopped.
    #[error("the event log's writer has stopped")]
    Stopped,
    /// The writer thread could not be started.
    #[error("starting the event log's writer: {0}")]
    Thread(#[source] std::io::Error),
}

enum Job {
    Write(Arc<Event>),
    Query(EventQuery, oneshot::Sender<Result<Vec<Event>, DbError>>),
}

/// A new event before it has its id and time.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// The VM (`None`: host-wide).
    pub vm: Option<EventVm>,
    /// What happened.
    pub kind: EventKind,
    /// How severe.
    pub severity: Severity,
    /// For people.
    pub message: String,
    /// Structured details.
    pub fields: BTreeMap<String, serde_json::Value>,
}

impl NewEvent {
    /// An event without fields.
    pub fn new(
        vm: Option<EventVm>,
        kind: EventKind,
        severity: Severity,
        message: impl Into<String>,
    ) -> NewEvent {
        NewEvent {
            vm,
            kind,
            severity,
            message: message.into(),
            fields: BTreeMap::new(),
        }
    }

    /// Add a field.
    pub fn field(mut self, k: &str, v: impl Into<serde_json::Value>) -> NewEvent {
        self.fields.insert(k.to_owned(), v.into());
        self
    }
}

/// The event log of one agent.
pub struct EventLog {
    host: String,
    next_id: AtomicU64,
    tx: std::sync::mpsc::Sender<Job>,
    follow: broadcast::Sender<Arc<Event>>,
    sinks: Sinks,
}

impl EventLog {
    /// Open the log in the state database at `path` (already opened by `Db::open`, which made
    /// the table) and start its writer thread and the sinks (inside the agent's runtime).
    pub fn open(path: &Path, host: &str, cfg: &EventsConfig) -> Result<EventLog, EventsError> {
        let db = EventDb::open(path)?;
        let next = db.max_id()? + 1;
        let (tx, rx) = std::sync::mpsc::channel();
        let bounds = (cfg.max_events, cfg.max_age_days);
        std::thread::Builder::new()
            .name("vmr-events".into())
            .spawn(move || writer(db, rx, bounds))
            .map_err(EventsError::Thread)?;
        let (follow, _) = broadcast::channel(FOLLOW_BUFFER);
        Ok(EventLog {
            host: host.to_owned(),
            next_id: AtomicU64::new(next),
            tx,
            follow,
            sinks: Sinks::start(&cfg.webhooks, &cfg.commands),
        })
    }

    /// Record an event now; its id.
    pub fn emit(&self, e: NewEvent) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let ev = Arc::new(Event {
            version: EVENT_FORMAT,
            id,
            time_ms: crate::util::now_ms(),
            host: self.host.clone(),
            vm: e.vm,
            kind: e.kind,
            severity: e.severity,
            message: e.message,
            fields: e.fields,
        });
        match ev.severity {
            Severity::Info => {
                tracing::info!(event = id, kind = %ev.kind, vm = ?ev.vm.as_ref().map(|v| &v.name), "{}", ev.message)
            }
            _ => {
                tracing::warn!(event = id, kind = %ev.kind, severity = %ev.severity, vm = ?ev.vm.as_ref().map(|v| &v.name), "{}", ev.message)
            }
        }
        if self.tx.send(Job::Write(ev.clone())).is_err() {
            tracing::warn!(
                event = id,
                "the event log's writer has stopped: event not stored"
            );
        }
        // No follower is fine.
        let _ = self.follow.send(ev.clone());
        self.sinks.offer(&ev);
        id
    }

    /// The newest events matching `q`, oldest first.
    pub async fn query(&self, q: EventQuery) -> Result<Vec<Event>, EventsError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Job::Query(q, tx))
            .map_err(|_| EventsError::Stopped)?;
        Ok(rx.await.map_err(|_| EventsError::Stopped)??)
    }

    /// Every event emitted from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.follow.subscribe()
    }

    /// Events each sink dropped because its queue was full.
    pub fn dropped(&self) -> Vec<(String, u64)> {
        self.sinks.dropped()
    }
}

fn writer(
    mut db: EventDb,
    rx: std::sync::mpsc::Receiver<Job>,
    (max_events, max_age_days): (u64, u64),
) {
    let prune = |db: &EventDb| {
        let min = crate::util::now_ms().saturating_sub(max_age_days.saturating_mul(86_400_000));
        if let Err(e) = db.prune(max_events, min) {
            tracing::warn!("pruning the event log: {e}");
        }
    };
    prune(&db);
    let mut since_prune = 0u64;
    let mut batch = Vec::new();
    while let Ok(first) = rx.recv() {
        // Everything queued meanwhile goes into one transaction; queries wait their turn.
        let mut jobs = vec![first];
        jobs.extend(rx.try_iter());
        for job in jobs {
            match job {
                Job::Write(e) => batch.push(e),
                Job::Query(q, reply) => {
                    flush(&mut db, &mut batch, &mut since_prune);
                    let _ = reply.send(db.query(&q));
                }
            }
        }
        flush(&mut db, &mut batch, &mut since_prune);
        if since_prune >= PRUNE_EVERY {
            prune(&db);
            since_prune = 0;
        }
    }
}

fn flush(db: &mut EventDb, batch: &mut Vec<Arc<Event>>, since_prune: &mut u64) {
    if batch.is_empty() {
        return;
    }
    if let Err(e) = db.insert(batch) {
        tracing::warn!(events = batch.len(), "writing the event log: {e}");
    }
    *since_prune += batch.len() as u64;
    batch.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn emitted_events_are_numbered_followed_stored_and_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.db");
        let _db = crate::db::Db::open(&path).expect("db");
        let cfg = EventsConfig {
            max_events: 300,
            ..Default::default()
        };
        let log = EventLog::open(&path, "h", &cfg).expect("open");
        let mut follower = log.subscribe();
        let first = log.emit(NewEvent::new(
            None,
            EventKind::AgentStarted,
            Severity::Info,
            "agent started",
        ));
        assert_eq!(first, 1);
        assert_eq!(follower.recv().await.expect("follow").id, 1);
        for i in 0..400 {
            log.emit(
                NewEvent::new(None, EventKind::CycleMissed, Severity::Warning, "missed")
                    .field("n", i),
            );
        }
        let all = log.query(EventQuery::default()).await.expect("query");
        // Pruned after 256 writes to the newest 300; the last 144 came after.
        assert!(all.len() <= 300 + usize::try_from(PRUNE_EVERY).expect("fits"));
        assert_eq!(all.last().map(|e| e.id), Some(401));
        drop(log);
        // A reopened log continues the ids.
        let log = EventLog::open(&path, "h", &cfg).expect("reopen");
        let id = log.emit(NewEvent::new(
            None,
            EventKind::AgentStopped,
            Severity::Info,
            "stopped",
        ));
        assert_eq!(id, 402);
        let newest = log
            .query(EventQuery {
                limit: Some(2),
                ..Default::default()
            })
            .await
            .expect("query");
        assert_eq!(newest.iter().map(|e| e.id).collect::<Vec<_>>(), [401, 402]);
        // Reopening pruned to the newest 300.
        let all = log.query(EventQuery::default()).await.expect("query");
        assert!(all.len() <= 301, "{}", all.len());
    }
}
