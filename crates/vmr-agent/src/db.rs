//! The agent's state in SQLite (`DIR/state.db`): authorization entries and one record per VM.
//! Every change is one transaction; the file survives `kill -9` (WAL, synchronous=FULL).

use std::path::Path;

use anyhow::Context;
use rusqlite::{Connection, OptionalExtension, params};
use vmr_proto::api::{AllowEntry, VmRecord};

const SCHEMA_VERSION: i64 = 1;

/// An open state database.
pub struct Db {
    conn: Connection,
}

impl Db {
    /// Open (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let conn = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS allow (
                 primary_name TEXT PRIMARY KEY, fingerprint TEXT NOT NULL UNIQUE,
                 storage TEXT NOT NULL, trust_group TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS vms (
                 name TEXT PRIMARY KEY, uuid TEXT NOT NULL UNIQUE, record TEXT NOT NULL);",
        )?;
        let v: Option<i64> = conn
            .query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| {
                r.get(0)
            })
            .optional()?;
        match v {
            None => {
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema', ?1)",
                    [SCHEMA_VERSION],
                )?;
            }
            Some(SCHEMA_VERSION) => {}
            Some(other) => anyhow::bail!(
                "{} has schema version {other}; this vmreplica understands {SCHEMA_VERSION}",
                path.display()
            ),
        }
        Ok(Self { conn })
    }

    /// Add or replace an authorization entry.
    pub fn put_allow(&self, e: &AllowEntry) -> anyhow::Result<()> {
        self.conn.execute(
            "INSERT INTO allow (primary_name, fingerprint, storage, trust_group) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(primary_name) DO UPDATE SET fingerprint = ?2, storage = ?3, trust_group = ?4",
            params![e.primary, e.fingerprint, e.storage, e.trust_group],
        )?;
        Ok(())
    }

    /// All authorization entries.
    pub fn allowed(&self) -> anyhow::Result<Vec<AllowEntry>> {
        let mut st = self
            .conn
            .prepare("SELECT primary_name, fingerprint, storage, trust_group FROM allow ORDER BY primary_name")?;
        let rows = st.query_map([], |r| {
            Ok(AllowEntry {
                primary: r.get(0)?,
                fingerprint: r.get(1)?,
                storage: r.get(2)?,
                trust_group: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Insert or update a VM record.
    pub fn put_vm(&self, rec: &VmRecord) -> anyhow::Result<()> {
        let json = serde_json::to_string(rec)?;
        self.conn.execute(
            "INSERT INTO vms (name, uuid, record) VALUES (?1, ?2, ?3)
             ON CONFLICT(name) DO UPDATE SET uuid = ?2, record = ?3",
            params![rec.name, rec.uuid.to_string(), json],
        )?;
        Ok(())
    }

    /// All VM records.
    pub fn vms(&self) -> anyhow::Result<Vec<VmRecord>> {
        let mut st = self.conn.prepare("SELECT record FROM vms ORDER BY name")?;
        let rows = st.query_map([], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for row in rows {
            out.push(serde_json::from_str(&row?).context("corrupt VM record in state.db")?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmr_proto::api::{ReplicationMode, ReplicationState, ReplicationStats};

    #[test]
    fn round_trip_on_a_real_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.db");
        let rec = VmRecord {
            name: "web1".into(),
            uuid: uuid::Uuid::new_v4(),
            mode: ReplicationMode::Primary,
            qmp: "/run/q.sock".into(),
            launch_toml: String::new(),
            disks: vec!["disk0".into()],
            enable: None,
            state: ReplicationState::Replicating,
            paused_from: None,
            last_cycle: Some(4),
            disk_sizes: Some(vec![1 << 20]),
            stats: ReplicationStats::default(),
            initial_at_ms: None,
            primary: "a".into(),
            trust_group: None,
            last_error: None,
            before_failover: None,
        };
        {
            let db = Db::open(&path).expect("open");
            db.put_vm(&rec).expect("put");
            db.put_allow(&AllowEntry {
                primary: "a".into(),
                fingerprint: "SHA256:00".into(),
                storage: "/s".into(),
                trust_group: "g".into(),
            })
            .expect("allow");
        }
        let db = Db::open(&path).expect("reopen");
        assert_eq!(db.vms().expect("vms"), vec![rec]);
        assert_eq!(db.allowed().expect("allowed").len(), 1);
    }
}
