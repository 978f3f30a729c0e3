//! The tracking database: `qms tracker` ingests the event files of every process into a
//! database, and `qms track` reads a message's history back. The database is SQLite under
//! the spool for one machine, or PostgreSQL shared by a fleet (`[tracking] database`), where
//! each node's tracker loads its own node's files and every event carries the node.
//!
//! Exactly once: the offset read so far in each event file is stored in the same
//! transaction as the events read, so a tracker killed at any point, or a database that
//! goes away, resumes where the last commit left off. A file is removed only once fully
//! read and no longer locked by its writer.

mod pg;
mod sqlite;
mod suppress;

pub use suppress::Suppressed;

use qms_common::track::Event;
use qms_common::Config;
use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// At most this much of the event files is read in one pass (one transaction), so a
/// database that comes back after hours loads the backlog in batches.
const BATCH_BYTES: u64 = 8 << 20;

pub struct Db {
    store: RefCell<Box<dyn Store>>,
    node: String,
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
    /// Only the events of this node.
    pub node: Option<String>,
}

/// How far behind a node's tracker is, as it last said.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeLag {
    pub node: String,
    /// Seconds between an event and its storing, at the last pass that stored any.
    pub lag: f64,
    /// When the node's tracker last stored events (Unix seconds).
    pub updated: i64,
}

/// The new complete lines of one event file.
pub(crate) struct Chunk {
    pub(crate) name: String,
    /// The offset after the lines read.
    pub(crate) offset: u64,
    pub(crate) events: Vec<Event>,
}

/// What a database backend does; `Db` holds one.
pub(crate) trait Store {
    /// The offsets read so far in this node's files.
    fn offsets(&mut self, node: &str) -> Result<HashMap<String, u64>, String>;
    /// Stores the events, the new offsets, the automatic suppressions and the node's lag
    /// (when events came) in one transaction; returns the number of events stored.
    fn commit(
        &mut self,
        node: &str,
        chunks: &[Chunk],
        auto: &[String],
        lag: Option<f64>,
    ) -> Result<usize, String>;
    /// Forgets a file that was removed.
    fn forget(&mut self, node: &str, name: &str) -> Result<(), String>;
    fn lags(&mut self) -> Result<Vec<NodeLag>, String>;
    fn prune(&mut self, cutoff_micros: i64) -> Result<usize, String>;
    fn find_message(&mut self, key: &str) -> Result<Option<(String, Option<String>)>, String>;
    fn has_event(&mut self, message_id: &str, recipient: &str, event: &str)
        -> Result<bool, String>;
    fn history(&mut self, q: &Query) -> Result<Vec<Event>, String>;
    fn suppress(&mut self, address: &str, reason: &str) -> Result<(), String>;
    fn unsuppress(&mut self, address: &str) -> Result<bool, String>;
    fn suppressed(&mut self, address: &str) -> Result<Option<Suppressed>, String>;
    fn suppression_list(&mut self) -> Result<Vec<Suppressed>, String>;
}

impl Db {
    /// The SQLite database at `path`, for this machine alone.
    pub fn open(path: &Path) -> Result<Db, String> {
        Ok(Db {
            store: RefCell::new(Box::new(sqlite::Sqlite::open(path)?)),
            node: String::new(),
            oldest_ingested: None,
        })
    }

    /// The database the config names: PostgreSQL with `[tracking] database`, else the
    /// spool's SQLite file. Events are stored as this config's node's.
    pub fn connect(cfg: &Config) -> Result<Db, String> {
        let store: Box<dyn Store> = match &cfg.tracking.database {
            Some(url) => Box::new(pg::Pg::connect(
                url,
                cfg.tracking.password_file.as_deref(),
                cfg.tracking.database_ca_file.as_deref(),
            )?),
            None => Box::new(sqlite::Sqlite::open(&db_path(&cfg.spool))?),
        };
        Ok(Db {
            store: RefCell::new(store),
            node: cfg.node.clone(),
            oldest_ingested: None,
        })
    }

    /// One pass over the event files in `dir`: reads complete lines not read yet (up to
    /// `BATCH_BYTES`), and puts on the suppression list the recipients of hard failures and
    /// complaints whose reason `auto` names. Returns the number of events stored.
    pub fn ingest(&mut self, dir: &Path, auto: &[String]) -> Result<usize, String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.ends_with(".jsonl"))
            .collect();
        names.sort();
        self.oldest_ingested = None;
        let store = self.store.get_mut();
        let offsets = store.offsets(&self.node)?;
        let mut budget = BATCH_BYTES;
        let mut chunks = Vec::new();
        let mut finished = Vec::new();
        for name in &names {
            if budget == 0 {
                break;
            }
            let offset = offsets.get(name).copied().unwrap_or(0);
            if let Some((chunk, done)) = read_file(dir, name, offset, &mut budget, &self.node) {
                if done {
                    finished.push(name.clone());
                }
                chunks.push(chunk);
            }
        }
        let oldest = chunks.iter().flat_map(|c| &c.events).map(|e| e.time).min();
        let lag = oldest.map(|t| qms_common::time::now_micros().saturating_sub(t) as f64 / 1e6);
        let stored = store.commit(&self.node, &chunks, auto, lag)?;
        self.oldest_ingested = oldest;
        // Remove the file before forgetting its offset: the other order could read it twice.
        for name in finished {
            if std::fs::remove_file(dir.join(&name)).is_ok() {
                store.forget(&self.node, &name)?;
            }
        }
        Ok(stored)
    }

    /// Removes the events older than `cutoff` (Unix seconds): `[tracking] keep`. The
    /// suppression list is kept whatever its age. Returns how many went.
    pub fn prune(&self, cutoff: i64) -> Result<usize, String> {
        self.store
            .borrow_mut()
            .prune(cutoff.saturating_mul(1_000_000))
    }

    /// The queue id and Message-ID of a tracked message, by its Message-ID or `X-B-CrossRef`.
    pub fn find_message(&self, key: &str) -> Result<Option<(String, Option<String>)>, String> {
        let key = key.trim().trim_start_matches('<').trim_end_matches('>');
        self.store.borrow_mut().find_message(key)
    }

    /// True when an event of this kind was recorded for the message and recipient.
    pub fn has_event(
        &self,
        message_id: &str,
        recipient: &str,
        event: &str,
    ) -> Result<bool, String> {
        self.store
            .borrow_mut()
            .has_event(message_id, recipient, event)
    }

    /// The events a query selects, by recipient, oldest first.
    pub fn history(&self, q: &Query) -> Result<Vec<Event>, String> {
        self.store.borrow_mut().history(q)
    }

    /// Each node's tracker lag, as last stored.
    pub fn lags(&self) -> Result<Vec<NodeLag>, String> {
        self.store.borrow_mut().lags()
    }

    /// Adds or replaces an entry of the suppression list by hand.
    pub fn suppress(&self, address: &str, reason: &str) -> Result<(), String> {
        self.store
            .borrow_mut()
            .suppress(&suppress::key(address), reason)
    }

    /// Removes an entry; false when there was none.
    pub fn unsuppress(&self, address: &str) -> Result<bool, String> {
        self.store.borrow_mut().unsuppress(&suppress::key(address))
    }

    /// The entry for an address, if it is suppressed.
    pub fn suppressed(&self, address: &str) -> Result<Option<Suppressed>, String> {
        self.store.borrow_mut().suppressed(&suppress::key(address))
    }

    /// Every entry, by address.
    pub fn suppression_list(&self) -> Result<Vec<Suppressed>, String> {
        self.store.borrow_mut().suppression_list()
    }
}

/// The new complete lines of one file from `offset`, within `budget` bytes; and whether
/// the file is done (its writer gone and every line read).
fn read_file(
    dir: &Path,
    name: &str,
    offset: u64,
    budget: &mut u64,
    node: &str,
) -> Option<(Chunk, bool)> {
    let mut f = std::fs::File::open(dir.join(name)).ok()?;
    // Whether the writer is gone must be known before reading, or lines written between
    // the read and the check would be lost with the file.
    let writer_gone = f.try_lock_shared().is_ok();
    let mut data = Vec::new();
    f.seek(SeekFrom::Start(offset)).ok()?;
    (&mut f).take(*budget).read_to_end(&mut data).ok()?;
    let at_end = (data.len() as u64) < *budget
        || f.metadata()
            .is_ok_and(|m| m.len() == offset + data.len() as u64);
    let complete = data.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    *budget = budget.saturating_sub(complete as u64);
    let mut events = Vec::new();
    for line in data[..complete]
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
    {
        match serde_json::from_slice::<Event>(line) {
            Ok(mut ev) => {
                ev.node = node.to_string();
                events.push(ev);
            }
            Err(e) => qms_common::qlog!(
                "file={name} status=skipped reason={}",
                qms_common::log::quote(&format!("bad event line: {e}"))
            ),
        }
    }
    let done = writer_gone && at_end;
    if done && complete < data.len() {
        qms_common::qlog!(
            "file={name} status=skipped reason=\"unfinished last line of a writer that died\""
        );
    }
    let chunk = Chunk {
        name: name.to_string(),
        offset: offset + complete as u64,
        events,
    };
    Some((chunk, done))
}

/// A value of a query, for either backend.
pub(crate) enum Arg {
    Text(String),
    Int(i64),
}

/// The SQL of a history query, its parameters written by `ph` (`?1` or `$1`).
pub(crate) fn history_sql(q: &Query, ph: fn(usize) -> String) -> (String, Vec<Arg>) {
    let mut sql = String::from(
        "SELECT time, qid, message_id, recipient, event, state_from, state_to, reply, relay, attempt, role, crossref, reason, node FROM events WHERE 1=1",
    );
    let mut args = Vec::new();
    if let Some(id) = &q.id {
        let id = id.trim().trim_start_matches('<').trim_end_matches('>');
        args.push(Arg::Text(id.to_string()));
        // A queue id also finds the rest of its message's history by Message-ID.
        sql.push_str(&format!(
            " AND (qid = {n} OR message_id = {n} OR crossref = {n} OR message_id IN (SELECT message_id FROM events WHERE (qid = {n} OR crossref = {n}) AND message_id IS NOT NULL))",
            n = ph(args.len())
        ));
    }
    if let Some(r) = &q.recipient {
        args.push(Arg::Text(format!("%{}%", r.to_lowercase())));
        sql.push_str(&format!(" AND lower(recipient) LIKE {}", ph(args.len())));
    }
    if let Some(s) = &q.state {
        args.push(Arg::Text(s.clone()));
        sql.push_str(&format!(
            " AND (event = {n} OR state_to = {n})",
            n = ph(args.len())
        ));
    }
    if let Some(t) = q.since {
        args.push(Arg::Int(t * 1_000_000));
        sql.push_str(&format!(" AND time >= {}", ph(args.len())));
    }
    if let Some(t) = q.until {
        args.push(Arg::Int(t * 1_000_000));
        sql.push_str(&format!(" AND time < {}", ph(args.len())));
    }
    if let Some(n) = &q.node {
        args.push(Arg::Text(n.clone()));
        sql.push_str(&format!(" AND node = {}", ph(args.len())));
    }
    (sql, args)
}

/// The database file of a spool.
pub fn db_path(spool: &Path) -> std::path::PathBuf {
    spool.join("track.db")
}
