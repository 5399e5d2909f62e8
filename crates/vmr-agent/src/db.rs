//! The agent's state in SQLite (`DIR/state.db`): authorization entries and one record per VM
//! (the VM's settings and its machine's snapshot, `vmr_proto::record`). Every change is one
//! transaction; the file survives `kill -9` (WAL, synchronous=FULL). A schema-1 database
//! (machine fields loose in the record) is migrated to schema 2 in one transaction on open;
//! schema 3 adds the event log (`events`: one row per event, its JSON), which a schema-2
//! file gains on open; schema 4 adds the witness's leases (`witness_leases`: one row per VM
//! relationship this agent is the witness of, its `vmr_proto::lease::LeaseEntry` as JSON;
//! `witness.rs`), which older files gain on open. The event log has its own connection ([`EventDb`]), used only by the
//! event log's writer thread (`events.rs`).

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};
use vmr_proto::api::AllowEntry;
use vmr_proto::event::{DEFAULT_QUERY_LIMIT, Event, EventQuery};
use vmr_proto::lease::LeaseEntry;
use vmr_proto::record::{VmRecord, VmRecordV1};

/// The schema this agent writes.
pub const SCHEMA_VERSION: i64 = 4;

/// What went wrong with the state database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// SQLite failed.
    #[error("state database {path}: {source}")]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
    /// Creating the file or setting its mode failed.
    #[error("state database {path}: {source}")]
    Io {
        /// The database file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A newer (or unknown) schema.
    #[error("{path} has schema version {found}; this vmreplica understands up to {SCHEMA_VERSION}")]
    Schema {
        /// The database file.
        path: PathBuf,
        /// The version found.
        found: i64,
    },
    /// A VM record does not parse.
    #[error("corrupt VM record {name:?} in {path}: {source}")]
    CorruptRecord {
        /// The database file.
        path: PathBuf,
        /// The record's VM name.
        name: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// An event row does not parse.
    #[error("corrupt event {id} in {path}: {source}")]
    CorruptEvent {
        /// The database file.
        path: PathBuf,
        /// The event's id.
        id: i64,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// An event does not encode.
    #[error("encoding event {id}: {source}")]
    EncodeEvent {
        /// The event's id.
        id: u64,
        /// The encoder's error.
        #[source]
        source: serde_json::Error,
    },
    /// A witness's lease row does not parse.
    #[error("corrupt witness lease of VM {vm} in {path}: {source}")]
    CorruptLease {
        /// The database file.
        path: PathBuf,
        /// The VM (as stored).
        vm: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// A witness's lease does not encode.
    #[error("encoding the witness lease of VM {vm}: {source}")]
    EncodeLease {
        /// The VM.
        vm: uuid::Uuid,
        /// The encoder's error.
        #[source]
        source: serde_json::Error,
    },
    /// A VM record does not encode.
    #[error("encoding the record of VM {name:?}: {source}")]
    Encode {
        /// The VM name.
        name: String,
        /// The encoder's error.
        #[source]
        source: serde_json::Error,
    },
}

/// An open state database.
pub struct Db {
    conn: Connection,
    path: PathBuf,
}

impl Db {
    fn sql(&self, source: rusqlite::Error) -> DbError {
        DbError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// Open (creating if needed, migrating if old) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, DbError> {
        let sql = |source| DbError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        // Mode 0600: the file holds the authorization entries and every VM's definition.
        // SQLite gives its -wal and -shm files the database file's mode.
        let io = |source| DbError::Io {
            path: path.to_path_buf(),
            source,
        };
        {
            use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
            {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                        .map_err(io)?;
                }
                Err(e) => return Err(io(e)),
            }
        }
        let conn = Connection::open(path).map_err(sql)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sql)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(sql)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS allow (
                 primary_name TEXT PRIMARY KEY, fingerprint TEXT NOT NULL UNIQUE,
                 storage TEXT NOT NULL, trust_group TEXT NOT NULL,
                 revoked INTEGER NOT NULL DEFAULT 0);
             CREATE TABLE IF NOT EXISTS vms (
                 name TEXT PRIMARY KEY, uuid TEXT NOT NULL UNIQUE, record TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS events (
                 id INTEGER PRIMARY KEY, time_ms INTEGER NOT NULL, vm TEXT,
                 event TEXT NOT NULL);
             CREATE INDEX IF NOT EXISTS events_vm ON events (vm, id);
             CREATE TABLE IF NOT EXISTS witness_leases (vm TEXT PRIMARY KEY, entry TEXT NOT NULL);",
        )
        .map_err(sql)?;
        // `revoked` came after schema 2's first release; older files gain it (default 0).
        let has_revoked: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM pragma_table_info('allow') WHERE name = 'revoked'",
                [],
                |r| r.get(0),
            )
            .map_err(sql)?;
        if has_revoked == 0 {
            conn.execute_batch("ALTER TABLE allow ADD COLUMN revoked INTEGER NOT NULL DEFAULT 0")
                .map_err(sql)?;
        }
        let mut db = Self {
            conn,
            path: path.to_path_buf(),
        };
        let v: Option<i64> = db
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(sql)?;
        match v {
            None => {
                db.conn
                    .execute(
                        "INSERT INTO meta (key, value) VALUES ('schema', ?1)",
                        [SCHEMA_VERSION],
                    )
                    .map_err(sql)?;
            }
            Some(1) => {
                db.migrate_v1()?;
                db.set_schema()?;
            }
            // Schema 2 to 3 and 3 to 4: the events and witness_leases tables were created
            // above.
            Some(2) | Some(3) => db.set_schema()?,
            Some(SCHEMA_VERSION) => {}
            Some(found) => {
                return Err(DbError::Schema {
                    path: path.to_path_buf(),
                    found,
                });
            }
        }
        Ok(db)
    }

    /// Schema 1 to 2: each record's loose machine fields become the machine's snapshot.
    fn migrate_v1(&mut self) -> Result<(), DbError> {
        let path = self.path.clone();
        let sql = |source| DbError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(sql)?;
        let rows: Vec<(String, String)> = {
            let mut st = tx.prepare("SELECT name, record FROM vms").map_err(sql)?;
            let rows = st
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(sql)?;
            rows.collect::<Result<_, _>>().map_err(sql)?
        };
        for (name, json) in rows {
            let old: VmRecordV1 =
                serde_json::from_str(&json).map_err(|source| DbError::CorruptRecord {
                    path: path.clone(),
                    name: name.clone(),
                    source,
                })?;
            let rec = VmRecord::from(old);
            let json = serde_json::to_string(&rec).map_err(|source| DbError::Encode {
                name: name.clone(),
                source,
            })?;
            tx.execute(
                "UPDATE vms SET record = ?2 WHERE name = ?1",
                params![name, json],
            )
            .map_err(sql)?;
        }
        tx.execute("UPDATE meta SET value = 2 WHERE key = 'schema'", [])
            .map_err(sql)?;
        tx.commit().map_err(sql)
    }

    fn set_schema(&self) -> Result<(), DbError> {
        self.conn
            .execute(
                "UPDATE meta SET value = ?1 WHERE key = 'schema'",
                [SCHEMA_VERSION],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// Add or replace an authorization entry.
    pub fn put_allow(&self, e: &AllowEntry) -> Result<(), DbError> {
        self.conn.execute(
            "INSERT INTO allow (primary_name, fingerprint, storage, trust_group, revoked) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(primary_name) DO UPDATE SET fingerprint = ?2, storage = ?3, trust_group = ?4, revoked = ?5",
            params![e.primary, e.fingerprint, e.storage, e.trust_group, e.revoked],
        )
        .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// Delete the authorization entry of `primary`; whether there was one.
    pub fn remove_allow(&self, primary: &str) -> Result<bool, DbError> {
        let n = self
            .conn
            .execute("DELETE FROM allow WHERE primary_name = ?1", [primary])
            .map_err(|e| self.sql(e))?;
        Ok(n > 0)
    }

    /// All authorization entries.
    pub fn allowed(&self) -> Result<Vec<AllowEntry>, DbError> {
        let mut st = self
            .conn
            .prepare("SELECT primary_name, fingerprint, storage, trust_group, revoked FROM allow ORDER BY primary_name")
            .map_err(|e| self.sql(e))?;
        let rows = st
            .query_map([], |r| {
                Ok(AllowEntry {
                    primary: r.get(0)?,
                    fingerprint: r.get(1)?,
                    storage: r.get(2)?,
                    trust_group: r.get(3)?,
                    revoked: r.get(4)?,
                })
            })
            .map_err(|e| self.sql(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.sql(e))
    }

    /// Insert or replace a lease this agent keeps as a witness.
    pub fn put_lease(&self, e: &LeaseEntry) -> Result<(), DbError> {
        let json =
            serde_json::to_string(e).map_err(|source| DbError::EncodeLease { vm: e.vm, source })?;
        self.conn
            .execute(
                "INSERT INTO witness_leases (vm, entry) VALUES (?1, ?2)
                 ON CONFLICT(vm) DO UPDATE SET entry = ?2",
                params![e.vm.to_string(), json],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// Delete the witness's lease of VM `vm`.
    pub fn delete_lease(&self, vm: uuid::Uuid) -> Result<(), DbError> {
        self.conn
            .execute("DELETE FROM witness_leases WHERE vm = ?1", [vm.to_string()])
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// Every lease this agent keeps as a witness.
    pub fn leases(&self) -> Result<Vec<LeaseEntry>, DbError> {
        self.json_rows(
            "SELECT vm, entry FROM witness_leases ORDER BY vm",
            |path, vm, source| DbError::CorruptLease { path, vm, source },
        )
    }

    /// The rows of `query` (a key, then a JSON text), each decoded; a row that does not
    /// decode is the error `corrupt` makes of the database's path, its key and the cause.
    fn json_rows<T: serde::de::DeserializeOwned>(
        &self,
        query: &str,
        corrupt: impl Fn(PathBuf, String, serde_json::Error) -> DbError,
    ) -> Result<Vec<T>, DbError> {
        let mut st = self.conn.prepare(query).map_err(|e| self.sql(e))?;
        let rows = st
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(|e| self.sql(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (key, json) = row.map_err(|e| self.sql(e))?;
            out.push(
                serde_json::from_str(&json)
                    .map_err(|source| corrupt(self.path.clone(), key, source))?,
            );
        }
        Ok(out)
    }

    /// Insert or update a VM record.
    pub fn put_vm(&self, rec: &VmRecord) -> Result<(), DbError> {
        let json = serde_json::to_string(rec).map_err(|source| DbError::Encode {
            name: rec.name.clone(),
            source,
        })?;
        self.conn
            .execute(
                "INSERT INTO vms (name, uuid, record) VALUES (?1, ?2, ?3)
                 ON CONFLICT(name) DO UPDATE SET uuid = ?2, record = ?3",
                params![rec.name, rec.uuid.to_string(), json],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// Delete the record of VM `name`; whether there was one.
    pub fn delete_vm(&self, name: &str) -> Result<bool, DbError> {
        let n = self
            .conn
            .execute("DELETE FROM vms WHERE name = ?1", [name])
            .map_err(|e| self.sql(e))?;
        Ok(n > 0)
    }

    /// All VM records.
    pub fn vms(&self) -> Result<Vec<VmRecord>, DbError> {
        self.json_rows(
            "SELECT name, record FROM vms ORDER BY name",
            |path, name, source| DbError::CorruptRecord { path, name, source },
        )
    }
}

/// The event log's own connection to the state database (opened after [`Db::open`] made
/// the table); used by one thread only.
pub struct EventDb {
    conn: Connection,
    path: PathBuf,
}

impl EventDb {
    fn sql(&self, source: rusqlite::Error) -> DbError {
        DbError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// Open the state database's event log.
    pub fn open(path: &Path) -> Result<Self, DbError> {
        let sql = |source| DbError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open(path).map_err(sql)?;
        // Another connection (VM records) writes too: wait for it rather than fail.
        conn.busy_timeout(std::time::Duration::from_secs(30))
            .map_err(sql)?;
        // An event lost in a power cut costs less than an fsync per batch on a busy host:
        // WAL with synchronous=NORMAL survives a crashed agent, not a crashed kernel.
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(sql)?;
        Ok(Self {
            conn,
            path: path.to_path_buf(),
        })
    }

    /// The largest event id (0 when none).
    pub fn max_id(&self) -> Result<u64, DbError> {
        let id: Option<i64> = self
            .conn
            .query_row("SELECT MAX(id) FROM events", [], |r| r.get(0))
            .map_err(|e| self.sql(e))?;
        Ok(id.map_or(0, |i| u64::try_from(i).unwrap_or(0)))
    }

    /// Append events (one transaction).
    pub fn insert(&mut self, events: &[std::sync::Arc<Event>]) -> Result<(), DbError> {
        let path = self.path.clone();
        let sql = |source| DbError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(sql)?;
        for e in events {
            let json = e
                .to_json()
                .map_err(|source| DbError::EncodeEvent { id: e.id, source })?;
            tx.execute(
                "INSERT OR REPLACE INTO events (id, time_ms, vm, event) VALUES (?1, ?2, ?3, ?4)",
                params![
                    i64::try_from(e.id).unwrap_or(i64::MAX),
                    i64::try_from(e.time_ms).unwrap_or(i64::MAX),
                    e.vm.as_ref().map(|v| v.name.as_str()),
                    json
                ],
            )
            .map_err(sql)?;
        }
        tx.commit().map_err(sql)
    }

    /// Keep the newest `max_events` events and none older than `min_time_ms`; how many were
    /// deleted.
    pub fn prune(&self, max_events: u64, min_time_ms: u64) -> Result<usize, DbError> {
        let keep = i64::try_from(max_events).unwrap_or(i64::MAX);
        let min = i64::try_from(min_time_ms).unwrap_or(i64::MAX);
        self.conn
            .execute(
                "DELETE FROM events WHERE time_ms < ?2
                   OR id <= (SELECT MAX(id) FROM events) - ?1",
                params![keep, min],
            )
            .map_err(|e| self.sql(e))
    }

    /// The newest events matching `q` (at most its limit), oldest first.
    pub fn query(&self, q: &EventQuery) -> Result<Vec<Event>, DbError> {
        let limit = i64::from(q.limit.unwrap_or(DEFAULT_QUERY_LIMIT));
        let since = q.since_ms.map(|t| i64::try_from(t).unwrap_or(i64::MAX));
        let after = q.after_id.map(|t| i64::try_from(t).unwrap_or(i64::MAX));
        let mut st = self
            .conn
            .prepare(
                "SELECT id, event FROM events
                 WHERE (?1 IS NULL OR vm = ?1) AND (?2 IS NULL OR time_ms >= ?2)
                   AND (?3 IS NULL OR id > ?3)
                 ORDER BY id DESC LIMIT ?4",
            )
            .map_err(|e| self.sql(e))?;
        let rows = st
            .query_map(params![q.vm, since, after, limit], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
            })
            .map_err(|e| self.sql(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, json) = row.map_err(|e| self.sql(e))?;
            out.push(
                serde_json::from_str(&json).map_err(|source| DbError::CorruptEvent {
                    path: self.path.clone(),
                    id,
                    source,
                })?,
            );
        }
        out.reverse();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmr_proto::api::{ReplicationMode, ReplicationState, ReplicationStats};
    use vmr_proto::machine::PrimarySnapshot;
    use vmr_proto::record::MachineSnapshot;

    fn record() -> VmRecord {
        VmRecord {
            name: "web1".into(),
            uuid: uuid::Uuid::new_v4(),
            qmp: "/run/q.sock".into(),
            launch_toml: String::new(),
            disks: vec!["disk0".into()],
            enable: None,
            primary: "a".into(),
            trust_group: None,
            frequency_secs: None,
            nbd: None,
            qga: None,
            failover: vmr_proto::FailoverSettings {
                interfaces: vmr_proto::FailoverSettings::interfaces_from_args(
                    &["10.2.0.5/24".into()],
                    &["10.2.0.1".into()],
                    &[],
                )
                .expect("valid"),
                network_args: None,
            },
            machine: MachineSnapshot::Primary(PrimarySnapshot {
                state: ReplicationState::Replicating,
                last_cycle: Some(4),
                disk_sizes: Some(vec![1 << 20]),
                stats: ReplicationStats::default(),
                last_error: None,
                initial_at_ms: None,
                paused_from: None,
                ..Default::default()
            }),
            rpo_alert_secs: Some(40),
            extended: None,
            group: None,
            libvirt: None,
            fanout: Vec::new(),
            auto_failover: None,
            lease: Default::default(),
        }
    }

    fn event(id: u64, time_ms: u64, vm: Option<&str>) -> std::sync::Arc<Event> {
        use vmr_proto::event::{EVENT_FORMAT, EventKind, EventVm, Severity};
        std::sync::Arc::new(Event {
            version: EVENT_FORMAT,
            id,
            time_ms,
            host: "h".into(),
            vm: vm.map(|n| EventVm {
                name: n.into(),
                uuid: uuid::Uuid::nil(),
                role: ReplicationMode::Primary,
                state: ReplicationState::Replicating,
            }),
            kind: EventKind::CycleMissed,
            severity: Severity::Warning,
            message: format!("event {id}"),
            fields: Default::default(),
        })
    }

    #[test]
    fn a_schema_2_database_gains_the_event_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.db");
        {
            let conn = Connection::open(&path).expect("open");
            conn.execute_batch(
                "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
                 INSERT INTO meta VALUES ('schema', 2);
                 CREATE TABLE allow (primary_name TEXT PRIMARY KEY, fingerprint TEXT NOT NULL UNIQUE,
                     storage TEXT NOT NULL, trust_group TEXT NOT NULL,
                     revoked INTEGER NOT NULL DEFAULT 0);
                 CREATE TABLE vms (
                     name TEXT PRIMARY KEY, uuid TEXT NOT NULL UNIQUE, record TEXT NOT NULL);",
            )
            .expect("schema 2");
        }
        let db = Db::open(&path).expect("migrate");
        let v: i64 = db
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| {
                r.get(0)
            })
            .expect("schema");
        assert_eq!(v, SCHEMA_VERSION);
        let mut ev = EventDb::open(&path).expect("events");
        assert_eq!(ev.max_id().expect("max"), 0);
        ev.insert(&[event(1, 10, Some("a"))]).expect("insert");
        assert_eq!(ev.max_id().expect("max"), 1);
    }

    #[test]
    fn witness_leases_survive_a_reopen_and_a_schema_3_file_gains_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.db");
        {
            let db = Db::open(&path).expect("open");
            // An agent of schema 3 wrote this file.
            db.conn
                .execute_batch(
                    "DROP TABLE witness_leases; UPDATE meta SET value = 3 WHERE key = 'schema';",
                )
                .expect("schema 3");
        }
        let entry = |epoch| LeaseEntry {
            vm: uuid::Uuid::from_u128(18),
            parties: ["SHA256:aa".into(), "SHA256:bb".into()],
            holder: "SHA256:bb".into(),
            epoch,
            lease_ms: 30_000,
        };
        {
            let db = Db::open(&path).expect("migrate");
            assert!(db.leases().expect("leases").is_empty());
            db.put_lease(&entry(1)).expect("put");
            db.put_lease(&entry(2)).expect("replace");
        }
        let db = Db::open(&path).expect("reopen");
        let v: i64 = db
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| {
                r.get(0)
            })
            .expect("schema");
        assert_eq!(v, 4);
        assert_eq!(db.leases().expect("leases"), vec![entry(2)]);
        db.delete_lease(uuid::Uuid::from_u128(18)).expect("delete");
        assert!(db.leases().expect("leases").is_empty());
        // A row that does not parse is a clear error naming it.
        db.conn
            .execute(
                "INSERT INTO witness_leases (vm, entry) VALUES ('x', '{')",
                [],
            )
            .expect("bad row");
        assert!(matches!(
            db.leases(),
            Err(DbError::CorruptLease { vm, .. }) if vm == "x"
        ));
    }

    #[test]
    fn the_event_log_answers_queries_and_stays_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.db");
        let _db = Db::open(&path).expect("open");
        let mut ev = EventDb::open(&path).expect("events");
        let all: Vec<_> = (1..=20)
            .map(|i| event(i, i * 100, if i % 2 == 0 { Some("even") } else { None }))
            .collect();
        ev.insert(&all).expect("insert");
        let ids = |q: EventQuery| -> Vec<u64> {
            ev.query(&q).expect("query").iter().map(|e| e.id).collect()
        };
        assert_eq!(ids(EventQuery::default()).len(), 20);
        assert_eq!(
            ids(EventQuery {
                limit: Some(3),
                ..Default::default()
            }),
            vec![18, 19, 20]
        );
        assert_eq!(
            ids(EventQuery {
                vm: Some("even".into()),
                limit: Some(2),
                ..Default::default()
            }),
            vec![18, 20]
        );
        assert_eq!(
            ids(EventQuery {
                since_ms: Some(1800),
                ..Default::default()
            }),
            vec![18, 19, 20]
        );
        assert_eq!(
            ids(EventQuery {
                after_id: Some(19),
                ..Default::default()
            }),
            vec![20]
        );
        assert_eq!(ev.query(&EventQuery::default()).expect("q")[4], *all[4]);
        // Newest 10, none before 1500.
        assert_eq!(ev.prune(10, 1500).expect("prune"), 14);
        assert_eq!(ids(EventQuery::default()), (15..=20).collect::<Vec<_>>());
        assert_eq!(ev.max_id().expect("max"), 20);
    }

    #[test]
    fn round_trip_on_a_real_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.db");
        let rec = record();
        {
            let db = Db::open(&path).expect("open");
            db.put_vm(&rec).expect("put");
            db.put_allow(&AllowEntry {
                primary: "a".into(),
                fingerprint: "SHA256:00".into(),
                storage: "/s".into(),
                trust_group: "g".into(),
                revoked: false,
            })
            .expect("allow");
        }
        let db = Db::open(&path).expect("reopen");
        assert_eq!(db.vms().expect("vms"), vec![rec]);
        assert_eq!(db.allowed().expect("allowed").len(), 1);
        let mut e = db.allowed().expect("allowed").remove(0);
        e.revoked = true;
        db.put_allow(&e).expect("revoke");
        assert!(db.allowed().expect("allowed")[0].revoked);
        assert!(db.remove_allow("a").expect("remove"));
        assert!(!db.remove_allow("a").expect("remove again"));
        assert!(db.allowed().expect("allowed").is_empty());
        assert!(db.delete_vm("web1").expect("delete"));
        assert!(!db.delete_vm("web1").expect("delete again"));
        drop(db);
        assert!(
            Db::open(&path)
                .expect("reopen")
                .vms()
                .expect("vms")
                .is_empty()
        );
    }

    #[test]
    fn the_file_is_private_and_a_corrupt_one_is_named() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.db");
        drop(Db::open(&path).expect("open"));
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        // An existing world-readable one is tightened.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        drop(Db::open(&path).expect("reopen"));
        assert_eq!(mode(&path), 0o600);
        // Garbage: the error names the file.
        let bad = dir.path().join("bad.db");
        std::fs::write(&bad, vec![0x5a; 8192]).expect("write");
        let e = Db::open(&bad).err().expect("corrupt");
        assert!(e.to_string().contains(&*bad.display().to_string()), "{e}");
    }

    #[test]
    fn an_allow_table_without_revoked_gains_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.db");
        {
            let conn = Connection::open(&path).expect("open");
            conn.execute_batch(
                "CREATE TABLE allow (primary_name TEXT PRIMARY KEY, fingerprint TEXT NOT NULL UNIQUE,
                     storage TEXT NOT NULL, trust_group TEXT NOT NULL);
                 INSERT INTO allow VALUES ('a', 'SHA256:00', '/s', 'g');",
            )
            .expect("old table");
        }
        let db = Db::open(&path).expect("open");
        let all = db.allowed().expect("allowed");
        assert_eq!(all.len(), 1);
        assert!(!all[0].revoked);
    }

    #[test]
    fn a_schema_1_database_is_migrated() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.db");
        let uuid = uuid::Uuid::new_v4();
        {
            let conn = Connection::open(&path).expect("open");
            conn.execute_batch(
                "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
                 INSERT INTO meta VALUES ('schema', 1);
                 CREATE TABLE vms (
                     name TEXT PRIMARY KEY, uuid TEXT NOT NULL UNIQUE, record TEXT NOT NULL);",
            )
            .expect("schema 1");
            let old = serde_json::json!({
                "name": "db1", "uuid": uuid, "mode": "Replica", "qmp": "",
                "launch_toml": "", "disks": ["disk0"], "enable": null,
                "state": "Suspended", "paused_from": "Replicating", "last_cycle": 7,
                "disk_sizes": null, "stats": { "window_start_ms": 5 }, "initial_at_ms": null,
                "primary": "host-a", "trust_group": "g", "last_error": "boom"
            });
            conn.execute(
                "INSERT INTO vms VALUES ('db1', ?1, ?2)",
                params![uuid.to_string(), old.to_string()],
            )
            .expect("old row");
        }
        let db = Db::open(&path).expect("migrate");
        let recs = db.vms().expect("vms");
        assert_eq!(recs.len(), 1);
        let r = &recs[0];
        assert_eq!(r.mode(), ReplicationMode::Replica);
        assert_eq!(r.state(), ReplicationState::Suspended);
        assert_eq!(r.last_cycle(), Some(7));
        match &r.machine {
            MachineSnapshot::Replica(s) => {
                assert_eq!(s.paused_from, Some(ReplicationState::Replicating));
                assert_eq!(s.last_error.as_deref(), Some("boom"));
            }
            other => panic!("not a replica snapshot: {other:?}"),
        }
        drop(db);
        // Migrated once: the schema is 3 now and opening again changes nothing.
        let again = Db::open(&path).expect("reopen");
        assert_eq!(again.vms().expect("vms"), recs);
    }
}
