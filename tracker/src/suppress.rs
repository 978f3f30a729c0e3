//! The suppression list: recipients tracked sending does not send to again. Filled by hand
//! (`qms suppress add`) and, as `[tracking] suppress` says, from the events the tracker
//! ingests: hard bounces with a lasting reason ("user unknown", "has moved") and complaints.

use super::{err, Db};
use rusqlite::{params, OptionalExtension, Transaction};

/// One suppressed recipient.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Suppressed {
    pub address: String,
    /// Why: a reason of the vocabulary ("user unknown", …), "complaint", or what an
    /// administrator wrote.
    pub reason: String,
    /// `auto` (from an event) or `manual`.
    pub source: String,
    /// The queue id of the message whose bounce or complaint put it here.
    pub qid: Option<String>,
    /// Unix seconds.
    pub time: i64,
}

pub(crate) const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS suppressed (
    address TEXT PRIMARY KEY, reason TEXT NOT NULL, source TEXT NOT NULL, qid TEXT,
    time INTEGER NOT NULL);";

/// Addresses compare without regard to case: the list is kept in lower case.
fn key(address: &str) -> String {
    address
        .trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .to_lowercase()
}

/// Whether an event puts its recipient on the list, and with which reason: a hard failure
/// whose reason `auto` names, or a complaint when `auto` names "complaint".
pub(crate) fn auto_reason(ev: &qms_common::track::Event, auto: &[String]) -> Option<String> {
    let reason = match ev.event.as_str() {
        "failed" => ev.reason.clone()?,
        "complained" => "complaint".to_string(),
        _ => return None,
    };
    // A failure reported with a transient status is not a hard bounce.
    let soft = ev
        .reply
        .as_deref()
        .and_then(qms_common::reason::status_in)
        .is_some_and(|s| s.starts_with('4'));
    (!soft && auto.iter().any(|a| a.eq_ignore_ascii_case(&reason))).then_some(reason)
}

/// Adds an automatic entry inside the ingest transaction; an existing entry is kept.
/// A report read from outside (dsnproc) counts only for an address the message was really
/// sent to: a forged report must not suppress whom it likes. Returns whether it counted.
pub(crate) fn add_auto(
    tx: &Transaction,
    ev: &qms_common::track::Event,
    reason: &str,
) -> Result<bool, String> {
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

impl Db {
    /// Adds or replaces an entry by hand.
    pub fn suppress(&self, address: &str, reason: &str) -> Result<(), String> {
        self.conn
            .execute(
                "INSERT INTO suppressed (address, reason, source, qid, time) VALUES (?1, ?2, 'manual', NULL, ?3)
                 ON CONFLICT(address) DO UPDATE SET reason = ?2, source = 'manual', qid = NULL, time = ?3",
                params![key(address), reason, qms_common::time::now()],
            )
            .map_err(err)?;
        Ok(())
    }

    /// Removes an entry; false when there was none.
    pub fn unsuppress(&self, address: &str) -> Result<bool, String> {
        let n = self
            .conn
            .execute(
                "DELETE FROM suppressed WHERE address = ?1",
                params![key(address)],
            )
            .map_err(err)?;
        Ok(n > 0)
    }

    /// The entry for an address, if it is suppressed.
    pub fn suppressed(&self, address: &str) -> Result<Option<Suppressed>, String> {
        self.conn
            .query_row(
                "SELECT address, reason, source, qid, time FROM suppressed WHERE address = ?1",
                params![key(address)],
                row,
            )
            .optional()
            .map_err(err)
    }

    /// Every entry, by address.
    pub fn suppression_list(&self) -> Result<Vec<Suppressed>, String> {
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
