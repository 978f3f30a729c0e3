//! The tracking database of one machine: SQLite (WAL) under the spool.

use crate::suppress::{auto_reason, key, Suppressed};
use crate::{history_sql, Arg, Chunk, NodeLag, Query, Store};
use qms_common::track::Event;
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use std::collections::HashMap;
use std::path::Path;

fn err(e: rusqlite::Error) -> String {
    format!("tracking database: {e}")
}

pub(crate) struct Sqlite {
    conn: Connection,
}

impl Sqlite {
    pub(crate) fn open(path: &Path) -> Result<Sqlite, String> {
        let conn = Connection::open(path).map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(err)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             CREATE TABLE IF NOT EXISTS events (
                 time INTEGER NOT NULL, qid TEXT NOT NULL, message_id TEXT, recipient TEXT NOT NULL,
                 event TEXT NOT NULL, state_from TEXT NOT NULL, state_to TEXT NOT NULL,
                 reply TEXT, relay TEXT, attempt INTEGER, role TEXT);
             CREATE INDEX IF NOT EXISTS events_qid ON events(qid);
             CREATE INDEX IF NOT EXISTS events_message_id ON events(message_id);
             CREATE INDEX IF NOT EXISTS events_recipient ON events(recipient);
             CREATE TABLE IF NOT EXISTS files (name TEXT PRIMARY KEY, offset INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS suppressed (
                 address TEXT PRIMARY KEY, reason TEXT NOT NULL, source TEXT NOT NULL, qid TEXT,
                 time INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS nodes (
                 node TEXT PRIMARY KEY, lag REAL NOT NULL, updated INTEGER NOT NULL);",
        )
        .map_err(err)?;
        // Added after the first schema: present in new databases, added to old ones.
        for column in ["crossref", "reason", "node"] {
            let _ = conn.execute(&format!("ALTER TABLE events ADD COLUMN {column} TEXT"), []);
        }
        conn.execute(
            "CREATE INDEX IF NOT EXISTS events_crossref ON events(crossref)",
            [],
        )
        .map_err(err)?;
        Ok(Sqlite { conn })
    }
}

/// Adds an automatic entry inside the ingest transaction; an existing entry is kept.
/// A report read from outside (dsnproc) counts only for an address the message was really
/// sent to: a forged report must not suppress whom it likes. Returns whether it counted.
fn add_auto(tx: &Transaction, ev: &Event, reason: &str) -> Result<bool, String> {
    if ev.role.starts_with("dsnproc") {
        let sent: bool = tx
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM events WHERE qid = ?1 AND lower(recipient) = lower(?2)
                 AND event IN ('received', 'routed', 'relayed', 'delivered'))",
                params![ev.qid, ev.recipient],
                |r| r.get(0),
            )
            .map_err(err)?;
        if !sent {
            return Ok(false);
        }
    }
    tx.execute(
        "INSERT INTO suppressed (address, reason, source, qid, time) VALUES (?1, ?2, 'auto', ?3, ?4)
         ON CONFLICT(address) DO NOTHING",
        params![key(&ev.recipient), reason, ev.qid, (ev.time / 1_000_000) as i64],
    )
    .map_err(err)?;
    Ok(true)
}

impl Store for Sqlite {
    fn offsets(&mut self, _: &str) -> Result<HashMap<String, u64>, String> {
        let mut stmt = self
            .conn
            .prepare("SELECT name, offset FROM files")
            .map_err(err)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
            })
            .map_err(err)?;
        rows.collect::<Result<_, _>>().map_err(err)
    }

    fn commit(
        &mut self,
        node: &str,
        chunks: &[Chunk],
        auto: &[String],
        lag: Option<f64>,
    ) -> Result<usize, String> {
        let tx = self.conn.transaction().map_err(err)?;
        let mut stored = 0;
        for c in chunks {
            {
                let mut insert = tx
                    .prepare_cached("INSERT INTO events (time, qid, message_id, recipient, event, state_from, state_to, reply, relay, attempt, role, crossref, reason, node) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)")
                    .map_err(err)?;
                for ev in &c.events {
                    insert
                        .execute(params![
                            ev.time as i64,
                            ev.qid,
                            ev.message_id,
                            ev.recipient,
                            ev.event,
                            ev.from,
                            ev.to,
                            ev.reply,
                            ev.relay,
                            ev.attempt,
                            ev.role,
                            ev.crossref,
                            ev.reason,
                            (!node.is_empty()).then_some(node)
                        ])
                        .map_err(err)?;
                    if let Some(why) = auto_reason(ev, auto) {
                        crate::suppress::added(ev, &why, add_auto(&tx, ev, &why));
                    }
                    stored += 1;
                }
            }
            tx.execute(
                "INSERT INTO files (name, offset) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET offset = ?2",
                params![c.name, c.offset as i64],
            )
            .map_err(err)?;
        }
        if let Some(lag) = lag {
            tx.execute(
                "INSERT INTO nodes (node, lag, updated) VALUES (?1, ?2, ?3)
                 ON CONFLICT(node) DO UPDATE SET lag = ?2, updated = ?3",
                params![node, lag, qms_common::time::now()],
            )
            .map_err(err)?;
        }
        tx.commit().map_err(err)?;
        Ok(stored)
    }

    fn forget(&mut self, _: &str, name: &str) -> Result<(), String> {
        self.conn
            .execute("DELETE FROM files WHERE name = ?1", params![name])
            .map(|_| ())
            .map_err(err)
    }

    fn lags(&mut self) -> Result<Vec<NodeLag>, String> {
        let mut stmt = self
            .conn
            .prepare("SELECT node, lag, updated FROM nodes ORDER BY node")
            .map_err(err)?;
        let rows = stmt
            .query_map([], |r| {
                Ok(NodeLag {
                    node: r.get(0)?,
                    lag: r.get(1)?,
                    updated: r.get(2)?,
                })
            })
            .map_err(err)?;
        rows.collect::<Result<_, _>>().map_err(err)
    }

    fn prune(&mut self, cutoff_micros: i64) -> Result<usize, String> {
        self.conn
            .execute("DELETE FROM events WHERE time < ?1", params![cutoff_micros])
            .map_err(err)
    }

    fn find_message(&mut self, key: &str) -> Result<Option<(String, Option<String>)>, String> {
        self.conn
            .query_row(
                "SELECT qid, message_id FROM events WHERE qid = ?1 OR message_id = ?1 OR crossref = ?1 ORDER BY time LIMIT 1",
                params![key],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(err)
    }

    fn has_event(
        &mut self,
        message_id: &str,
        recipient: &str,
        event: &str,
    ) -> Result<bool, String> {
        self.conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM events WHERE message_id = ?1 AND lower(recipient) = lower(?2) AND event = ?3)",
                params![message_id, recipient, event],
                |r| r.get(0),
            )
            .map_err(err)
    }

    fn history(&mut self, q: &Query) -> Result<Vec<Event>, String> {
        let (mut sql, args) = history_sql(q, |n| format!("?{n}"));
        sql.push_str(" ORDER BY recipient, time, rowid");
        let values: Vec<rusqlite::types::Value> = args
            .into_iter()
            .map(|a| match a {
                Arg::Text(t) => t.into(),
                Arg::Int(i) => i.into(),
            })
            .collect();
        let mut stmt = self.conn.prepare(&sql).map_err(err)?;
        let rows = stmt
            .query_map(rusqlite::params_from_iter(values), |r| {
                Ok(Event {
                    time: r.get::<_, i64>(0)? as u64,
                    qid: r.get(1)?,
                    message_id: r.get(2)?,
                    recipient: r.get(3)?,
                    event: r.get(4)?,
                    from: r.get(5)?,
                    to: r.get(6)?,
                    reply: r.get(7)?,
                    relay: r.get(8)?,
                    attempt: r.get::<_, Option<i64>>(9)?.map(|a| a as u32),
                    role: r.get::<_, Option<String>>(10)?.unwrap_or_default(),
                    crossref: r.get(11)?,
                    reason: r.get(12)?,
                    node: r.get::<_, Option<String>>(13)?.unwrap_or_default(),
                })
            })
            .map_err(err)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(err)
    }

    fn suppress(&mut self, address: &str, reason: &str) -> Result<(), String> {
        self.conn
            .execute(
                "INSERT INTO suppressed (address, reason, source, qid, time) VALUES (?1, ?2, 'manual', NULL, ?3)
                 ON CONFLICT(address) DO UPDATE SET reason = ?2, source = 'manual', qid = NULL, time = ?3",
                params![address, reason, qms_common::time::now()],
            )
            .map(|_| ())
            .map_err(err)
    }

    fn unsuppress(&mut self, address: &str) -> Result<bool, String> {
        self.conn
            .execute(
                "DELETE FROM suppressed WHERE address = ?1",
                params![address],
            )
            .map(|n| n > 0)
            .map_err(err)
    }

    fn suppressed(&mut self, address: &str) -> Result<Option<Suppressed>, String> {
        self.conn
            .query_row(
                "SELECT address, reason, source, qid, time FROM suppressed WHERE address = ?1",
                params![address],
                row,
            )
            .optional()
            .map_err(err)
    }

    fn suppression_list(&mut self) -> Result<Vec<Suppressed>, String> {
        let mut stmt = self
            .conn
            .prepare("SELECT address, reason, source, qid, time FROM suppressed ORDER BY address")
            .map_err(err)?;
        let rows = stmt.query_map([], row).map_err(err)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(err)
    }
}

fn row(r: &rusqlite::Row) -> rusqlite::Result<Suppressed> {
    Ok(Suppressed {
        address: r.get(0)?,
        reason: r.get(1)?,
        source: r.get(2)?,
        qid: r.get(3)?,
        time: r.get(4)?,
    })
}
