//! Tracking events: every change of a recipient's state, appended as one JSON line to a
//! file of this process's own under `SPOOL/track/` (no lock shared between processes).
//! `qms tracker` ingests the files into the tracking database.
//!
//! The file is locked (flock) while its process lives, so the tracker can tell a finished
//! file from one still being written. Lines are written whole with O_APPEND; a process
//! killed in the middle of a line leaves at most that line unfinished, and the tracker
//! only reads up to the last newline.

use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::OnceLock;

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Event {
    /// Unix time in microseconds: orders events of one recipient.
    pub time: u64,
    pub qid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    pub recipient: String,
    /// received, routed, discarded, deferred, delivered, relayed, failed, expired,
    /// delay-warned, bounce-sent, held, released, deleted.
    pub event: String,
    /// The recipient's state before and after.
    pub from: String,
    pub to: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<String>,
    /// Why a recipient failed or waits, in the words of `reason::Reason` ("user unknown", …);
    /// derived from the reply when the emitter knows no better.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// The application's reference of a tracked message (`X-B-CrossRef`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crossref: Option<String>,
    #[serde(default)]
    pub role: String,
    /// The node of a fleet whose tracker stored the event (set by the tracker, not written
    /// in the event files: every file under a spool is its own node's).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node: String,
}

impl Event {
    pub fn new(
        qid: &str,
        message_id: Option<&str>,
        recipient: &str,
        event: &str,
        from: &str,
        to: &str,
    ) -> Event {
        Event {
            time: crate::time::now_micros(),
            qid: qid.to_string(),
            message_id: message_id.map(str::to_string),
            recipient: recipient.to_string(),
            event: event.to_string(),
            from: from.to_string(),
            to: to.to_string(),
            ..Event::default()
        }
    }

    pub fn reply(mut self, reply: Option<&str>) -> Event {
        self.reply = reply.map(str::to_string);
        self
    }

    pub fn relay(mut self, relay: &str) -> Event {
        self.relay = Some(relay.to_string());
        self
    }

    pub fn attempt(mut self, n: u32) -> Event {
        self.attempt = Some(n);
        self
    }
}

/// Events that say a recipient failed or must wait: those get a reason.
pub fn is_trouble(event: &str) -> bool {
    matches!(
        event,
        "failed" | "deferred" | "expired" | "delayed" | "soft-failed" | "suppressed"
    )
}

/// This process's event file and role. Shared by its threads without a lock: every
/// message's events are one write to a file opened with O_APPEND, which another thread's
/// write cannot cut.
struct Writer {
    file: File,
    role: String,
}

static WRITER: OnceLock<Writer> = OnceLock::new();

/// Opens this process's event file; until then [`emit`] writes nothing.
pub fn open(spool: &Path, role: &str) -> std::io::Result<()> {
    let role = role.replace('/', "-");
    let name = format!("{role}.{}.{}", crate::pid(), crate::time::now_micros());
    let dir = spool.join("track");
    // Locked before it gets the name the tracker looks for: an unlocked .jsonl file is one
    // whose writer is gone.
    let tmp = dir.join(format!("{name}.new"));
    let file = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&tmp)?;
    fs2::FileExt::try_lock_exclusive(&file)?;
    std::fs::rename(&tmp, dir.join(format!("{name}.jsonl")))?;
    let _ = WRITER.set(Writer { file, role });
    Ok(())
}

/// Appends an event. Errors are logged, never fatal: tracking must not stop mail.
pub fn emit(ev: Event) {
    emit_all(std::iter::once(ev));
}

/// Appends events in one write (a message's events as one, and one system call).
pub fn emit_all(events: impl IntoIterator<Item = Event>) {
    let Some(w) = WRITER.get() else { return };
    let mut lines = Vec::new();
    for mut ev in events {
        ev.role.clone_from(&w.role);
        if ev.reason.is_none() && is_trouble(&ev.event) {
            let reply = ev.reply.as_deref();
            ev.reason = reply.map(|r| crate::reason::of(None, Some(r)).as_str().to_string());
        }
        let start = lines.len();
        match serde_json::to_writer(&mut lines, &ev) {
            Ok(()) => lines.push(b'\n'),
            Err(_) => lines.truncate(start),
        }
    }
    if lines.is_empty() {
        return;
    }
    if let Err(e) = (&w.file).write_all(&lines) {
        crate::qlog!(
            "status=warning reason={}",
            crate::log::quote(&format!("cannot write tracking event: {e}"))
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_writing_events_at_once_leave_every_line_whole() {
        let spool = std::env::temp_dir().join(format!("qms-track-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&spool);
        std::fs::create_dir_all(spool.join("track")).unwrap();
        open(&spool, "smtpd").unwrap();
        std::thread::scope(|s| {
            for t in 0..8 {
                s.spawn(move || {
                    for i in 0..500 {
                        let rcpt = format!("{}@example.test", "r".repeat(200 + t * 50 + i % 7));
                        let ev =
                            Event::new(&format!("Q{t}N{i}"), None, &rcpt, "received", "", "queued");
                        emit_all([ev.clone(), ev]);
                    }
                });
            }
        });
        let mut files = std::fs::read_dir(spool.join("track")).unwrap();
        let path = files.next().unwrap().unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let mut seen = std::collections::HashMap::new();
        for line in text.lines() {
            let ev: Event = serde_json::from_str(line).expect("a whole event on every line");
            assert_eq!(ev.role, "smtpd");
            *seen.entry(ev.qid).or_insert(0) += 1;
        }
        assert_eq!(seen.len(), 8 * 500);
        assert!(
            seen.values().all(|&n| n == 2),
            "each message's two events once each"
        );
        let _ = std::fs::remove_dir_all(&spool);
    }
}
