//! The tracking database: `qms tracker` ingests the event files of every process into
//! SQLite (one file under the spool), and `qms track` reads a message's history back.
//!
//! Exactly once: the offset read so far in each event file is stored in the same
//! transaction as the events read, so a tracker killed at any point resumes where its last
//! commit left off. A file is removed only once fully read and no longer locked by its writer.

mod suppress;

pub use suppress::Suppressed;

use qms_common::track::Event;
use rusqlite::{params, Connection};
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

pub struct Db {
    conn: Connection,
    /// The time (µs) of the oldest event stored by the last `ingest`, if it stored any.
    pub oldest_ingested: Option<u64>,
}

/// Which events `qms track` shows.
#[derive(Default, Debug)]
pub struct Query {
    /// A queue id, a Message-ID (with or without angle brackets) or an `X-B-CrossRef`; None
    /// for all messages.
    pub id: Option<String>,
    pub recipient: Option<String>,
    /// An event name or a state reached (`delivered`, `failed`, …).
    pub state: Option<String>,
    /// Unix seconds.
    pub since: Option<i64>,
    pub until: Option<i64>,
}

fn err(e: rusqlite::Error) -> String {
    format!("tracking database: {e}")
}

impl Db {
    pub fn open(path: &Path) -> Result<Db, String> {
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
             CREATE TABLE IF NOT EXISTS files (name TEXT PRIMARY KEY, offset INTEGER NOT NULL);",
        )
        .map_err(err)?;
        // Added after the first schema: present in new databases, added to old ones.
        let _ = conn.execute("ALTER TABLE events ADD COLUMN crossref TEXT", []);
        let _ = conn.execute("ALTER TABLE events ADD COLUMN reason TEXT", []);
        conn.execute_batch(suppress::SCHEMA).map_err(err)?;
        conn.execute(
            "CREATE INDEX IF NOT EXISTS events_crossref ON events(crossref)",
            [],
        )
        .map_err(err)?;
        Ok(Db {
            conn,
            oldest_ingested: None,
        })
    }

    /// One pass over the event files in `dir`: reads every complete line not read yet, and
    /// puts on the suppression list the recipients of hard failures and complaints whose
    /// reason `auto` names. Returns the number of events stored.
    pub fn ingest(&mut self, dir: &Path, auto: &[String]) -> Result<usize, String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.ends_with(".jsonl"))
            .collect();
        names.sort();
        self.oldest_ingested = None;
        let mut oldest: Option<u64> = None;
        let tx = self.conn.transaction().map_err(err)?;
        let mut stored = 0;
        let mut finished = Vec::new();
        for name in &names {
            let path = dir.join(name);
            let Ok(mut f) = std::fs::File::open(&path) else {
                continue;
            };
            // Whether the writer is gone must be known before reading, or lines written
            // between the read and the check would be lost with the file.
            let writer_gone = f.try_lock_shared().is_ok();
            let offset: u64 = tx
                .query_row(
                    "SELECT offset FROM files WHERE name = ?1",
                    params![name],
                    |r| r.get::<_, i64>(0),
                )
                .map(|o| o as u64)
                .unwrap_or(0);
            let mut data = Vec::new();
            if f.seek(SeekFrom::Start(offset))
                .and_then(|_| f.read_to_end(&mut data))
                .is_err()
            {
                continue;
            }
            let complete = data.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
            {
                let mut insert = tx
                    .prepare_cached("INSERT INTO events (time, qid, message_id, recipient, event, state_from, state_to, reply, relay, attempt, role, crossref, reason) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)")
                    .map_err(err)?;
                for line in data[..complete]
                    .split(|b| *b == b'\n')
                    .filter(|l| !l.is_empty())
                {
                    match serde_json::from_slice::<Event>(line) {
                        Ok(ev) => {
                            oldest = Some(oldest.map_or(ev.time, |o| o.min(ev.time)));
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
                                    ev.reason
                                ])
                                .map_err(err)?;
                            let why = suppress::auto_reason(&ev, auto);
                            if let Some(why) = why.filter(|w| {
                                suppress::add_auto(&tx, &ev, w).unwrap_or_else(|e| {
                                    qms_common::qlog!(
                                        "status=error reason={}",
                                        qms_common::log::quote(&e)
                                    );
                                    false
                                })
                            }) {
                                qms_common::qlog!(
                                    "qid={} to={} status=suppressed reason={}",
                                    ev.qid,
                                    ev.recipient,
                                    qms_common::log::quote(&why)
                                );
                            }
                            stored += 1;
                        }
                        Err(e) => qms_common::qlog!(
                            "file={name} status=skipped reason={}",
                            qms_common::log::quote(&format!("bad event line: {e}"))
                        ),
                    }
                }
            }
            let new_offset = offset + complete as u64;
            tx.execute("INSERT INTO files (name, offset) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET offset = ?2", params![name, new_offset as i64])
                .map_err(err)?;
            if writer_gone {
                if complete < data.len() {
                    qms_common::qlog!("file={name} status=skipped reason=\"unfinished last line of a writer that died\"");
                }
                finished.push(name.clone());
            }
        }
        tx.commit().map_err(err)?;
        self.oldest_ingested = oldest;
        // Remove the file before forgetting its offset: the other order could read it twice.
        for name in finished {
            if std::fs::remove_file(dir.join(&name)).is_ok() {
                self.conn
                    .execute("DELETE FROM files WHERE name = ?1", params![name])
                    .map_err(err)?;
            }
        }
        Ok(stored)
    }

    /// Removes the events older than `cutoff` (Unix seconds): `[tracking] keep`. The
    /// suppression list is kept whatever its age. Returns how many went.
    pub fn prune(&self, cutoff: i64) -> Result<usize, String> {
        self.conn
            .execute(
                "DELETE FROM events WHERE time < ?1",
                params![cutoff.saturating_mul(1_000_000)],
            )
            .map_err(err)
    }

    /// The queue id and Message-ID of a tracked message, by its Message-ID or `X-B-CrossRef`.
    pub fn find_message(&self, key: &str) -> Result<Option<(String, Option<String>)>, String> {
        let key = key.trim().trim_start_matches('<').trim_end_matches('>');
        let mut stmt = self
            .conn
            .prepare_cached("SELECT qid, message_id FROM events WHERE qid = ?1 OR message_id = ?1 OR crossref = ?1 ORDER BY time LIMIT 1")
            .map_err(err)?;
        let mut rows = stmt.query(params![key]).map_err(err)?;
        match rows.next().map_err(err)? {
            Some(r) => Ok(Some((r.get(0).map_err(err)?, r.get(1).map_err(err)?))),
            None => Ok(None),
        }
    }

    /// True when an event of this kind was recorded for the message and recipient.
    pub fn has_event(
        &self,
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

    /// The events a query selects, oldest first.
    pub fn history(&self, q: &Query) -> Result<Vec<Event>, String> {
        let mut sql = String::from(
            "SELECT time, qid, message_id, recipient, event, state_from, state_to, reply, relay, attempt, role, crossref, reason FROM events WHERE 1=1",
        );
        let mut args: Vec<rusqlite::types::Value> = Vec::new();
        if let Some(id) = &q.id {
            let id = id
                .trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_string();
            args.push(id.into());
            // A queue id also finds the rest of its message's history by Message-ID.
            sql.push_str(&format!(
                " AND (qid = ?{n} OR message_id = ?{n} OR crossref = ?{n} OR message_id IN (SELECT message_id FROM events WHERE (qid = ?{n} OR crossref = ?{n}) AND message_id IS NOT NULL))",
                n = args.len()
            ));
        }
        if let Some(r) = &q.recipient {
            args.push(format!("%{}%", r.to_lowercase()).into());
            sql.push_str(&format!(" AND lower(recipient) LIKE ?{}", args.len()));
        }
        if let Some(s) = &q.state {
            args.push(s.clone().into());
            sql.push_str(&format!(
                " AND (event = ?{n} OR state_to = ?{n})",
                n = args.len()
            ));
        }
        if let Some(t) = q.since {
            args.push((t * 1_000_000).into());
            sql.push_str(&format!(" AND time >= ?{}", args.len()));
        }
        if let Some(t) = q.until {
            args.push((t * 1_000_000).into());
            sql.push_str(&format!(" AND time < ?{}", args.len()));
        }
        sql.push_str(" ORDER BY recipient, time, rowid");
        let mut stmt = self.conn.prepare(&sql).map_err(err)?;
        let rows = stmt
            .query_map(rusqlite::params_from_iter(args), |r| {
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
                })
            })
            .map_err(err)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(err)
    }
}

/// The database file of a spool.
pub fn db_path(spool: &Path) -> std::path::PathBuf {
    spool.join("track.db")
}
