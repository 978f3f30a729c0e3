//! `qms dsnproc`: reads the reports that come back to the envelope mailbox (a Maildir, into
//! which `imap` also fetches those of a remote mailbox when `[tracking.imap]` says so),
//! classifies them, ties each to its tracked message and recipient, records what they say
//! as tracking events, and, when asked, tells the other To/Cc recipients of a message that
//! one of them did not get it.
//!
//! A report is tied to its message by the returned Message-ID, else by ENVID (qms sets it to
//! the `X-B-CrossRef` or the Message-ID of tracked mail). A processed report moves from
//! `new/` to `cur/`, as a mail reader would mark it read.

use crate::report::{self, RcptReport, Report, ReportKind};
use mail_builder::headers::raw::Raw;
use mail_builder::MessageBuilder;
use qms_common::log::quote;
use qms_common::track::Event;
use qms_common::{qlog, Address, Config};
use qms_spool::{Client, Job, Notify, QueueId, Recipient, Spool};
use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

const NOTICE_EVENT: &str = "co-recipient-notified";

/// The address a report was delivered to (the first Delivered-To: of the mailbox copy).
fn delivered_to(raw: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(&raw[..raw.len().min(8192)]).into_owned();
    text.lines().take_while(|l| !l.is_empty()).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("delivered-to")
            .then(|| v.trim().to_string())
    })
}

/// How long a report that matches no tracked message is looked at again before it is set
/// aside (the tracker ingests events a moment after they happen).
const GIVE_UP: Duration = Duration::from_secs(300);

pub struct DsnProc<'a> {
    cfg: &'a Config,
    spool: &'a Spool,
    db: qms_tracker::Db,
    /// Notices sent by this process (the tracker may not have the events yet).
    notified: HashSet<(String, String)>,
}

/// Runs until `stop` is set, looking at the Maildir every half second.
pub fn run(cfg: &Config, spool: &Spool, stop: &AtomicBool) -> Result<(), String> {
    let maildir = cfg
        .tracking
        .envelope_maildir
        .clone()
        .ok_or("no [tracking] envelope_maildir in the config")?;
    let db = qms_tracker::Db::connect(cfg)?;
    let mut p = DsnProc {
        cfg,
        spool,
        db,
        notified: HashSet::new(),
    };
    crate::maildir::ensure(&maildir, true).map_err(|e| format!("{}: {e}", maildir.display()))?;
    let mut next_poll = std::time::Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if let Some(imap) = cfg
            .tracking
            .imap
            .as_ref()
            .filter(|_| next_poll.elapsed() > Duration::ZERO)
        {
            match crate::imap::poll(imap, &maildir) {
                Ok(0) => {}
                Ok(n) => qlog!("imap={}:{} status=fetched count={n}", imap.host, imap.port),
                Err(e) => qlog!(
                    "imap={}:{} status=error reason={}",
                    imap.host,
                    imap.port,
                    quote(&e)
                ),
            }
            next_poll = std::time::Instant::now() + Duration::from_secs(imap.interval);
        }
        if p.pass(&maildir) == 0 {
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    Ok(())
}

impl DsnProc<'_> {
    /// Handles every report waiting in `new/`; returns how many.
    fn pass(&mut self, maildir: &Path) -> usize {
        let mut done = 0;
        let Ok(rd) = std::fs::read_dir(maildir.join("new")) else {
            return 0;
        };
        let mut names: Vec<_> = rd.flatten().map(|e| e.file_name()).collect();
        names.sort();
        for name in &names {
            let path = maildir.join("new").join(name);
            let age = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .unwrap_or_default();
            let raw = std::fs::read(&path).unwrap_or_default();
            match report::classify(&raw) {
                Ok(r) => {
                    if !self.handle(
                        &r,
                        delivered_to(&raw).as_deref(),
                        &name.to_string_lossy(),
                        age >= GIVE_UP,
                    ) {
                        continue; // the tracker may not have the message yet: look again later
                    }
                }
                Err(e) => qlog!(
                    "file={} status=unreadable reason={}",
                    name.to_string_lossy(),
                    quote(&e)
                ),
            }
            let seen = maildir
                .join("cur")
                .join(format!("{}:2,S", name.to_string_lossy()));
            if let Err(e) = std::fs::rename(&path, &seen) {
                qlog!(
                    "file={} status=error reason={}",
                    name.to_string_lossy(),
                    quote(&e.to_string())
                );
            }
            done += 1;
        }
        done
    }

    /// Returns false to keep the report for another look.
    fn handle(&mut self, r: &Report, came_to: Option<&str>, file: &str, last_try: bool) -> bool {
        let signed_qid = match self.signed_qid(r, came_to) {
            Ok(q) => q,
            Err((qid, address)) => {
                qlog!("file={file} qid={qid} to={address} status=forged reason=\"bad VERP signature; not believed\"");
                return true;
            }
        };
        // The ways to the message, surest first.
        let keys: Vec<String> = signed_qid
            .iter()
            .chain(&r.original_message_id)
            .chain(&r.envid)
            .chain(&r.references)
            .cloned()
            .collect();
        let key = keys.first().cloned();
        let found = keys
            .iter()
            .find_map(|k| self.db.find_message(k).ok().flatten());
        let correlated = found.is_some();
        let (qid, message_id) = match found {
            Some((q, m)) => (q, m.or(r.original_message_id.clone())),
            None => ("-".to_string(), r.original_message_id.clone()),
        };
        let kind = serde_json::to_value(r.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        if matches!(r.kind, ReportKind::Other | ReportKind::Autoreply) {
            qlog!("file={file} kind={kind} qid={qid} status=ignored");
            return true;
        }
        if !correlated {
            if !last_try && key.is_some() {
                return false;
            }
            // Not one of ours, or a forgery: recorded in the log, believed nowhere.
            qlog!(
                "file={file} kind={kind} status=uncorrelated message_id={}",
                quote(key.as_deref().unwrap_or("-"))
            );
            return true;
        }
        let about = About {
            qid: &qid,
            message_id: message_id.as_deref(),
            kind: &kind,
            file,
        };
        for rr in &r.recipients {
            self.record(r, rr, &about);
        }
        true
    }

    /// The queue id a VERP address signs for this report's recipients, when qms sent it
    /// with one; Err with the id and address when a signature is forged (the report is not
    /// believed at all).
    fn signed_qid(
        &self,
        r: &Report,
        came_to: Option<&str>,
    ) -> Result<Option<String>, (String, String)> {
        use qms_common::verp::{check, Token};
        let (Some(base), Some(to)) = (&self.cfg.tracking.envelope, came_to) else {
            return Ok(None);
        };
        let key = &self.cfg.tracking.key;
        let mut signed = None;
        for rr in &r.recipients {
            // Signed for the address qms sent to: the Original-Recipient when the next hop
            // forwarded the message and reports the final one.
            let check = |a: &str| check(base, key, to, a);
            let token = match rr.original_recipient.as_deref().map(check) {
                Some(t @ Token::Valid { .. }) => t,
                _ => check(&rr.address),
            };
            match token {
                Token::Valid { qid } => signed = Some(qid),
                Token::Forged { qid } => return Err((qid, rr.address.clone())),
                Token::None => {}
            }
        }
        Ok(signed)
    }

    /// Records what a correlated report says of one recipient: a tracking event and a log
    /// line, and for a hard failure the co-recipients' notice when one is asked for.
    fn record(&mut self, r: &Report, rr: &RcptReport, about: &About) {
        let About {
            qid,
            message_id,
            kind,
            file,
        } = *about;
        let soft = rr.status.as_deref().is_some_and(|s| s.starts_with('4'));
        let (event, to) = match (r.kind, rr.action.as_str()) {
            (ReportKind::Mdn, a) => (a.to_string(), a.to_string()),
            // A temporary failure reported as final: noted, the recipient not failed.
            (_, "failed") if soft => ("soft-failed".into(), "relayed".into()),
            (_, "failed") => ("failed".into(), "failed".into()),
            (_, "delayed") => ("delayed".into(), "delayed".into()),
            (_, "delivered") => ("confirmed-delivered".into(), "confirmed-delivered".into()),
            (_, "relayed") => ("relayed".into(), "relayed".into()),
            (_, other) => (other.to_string(), other.to_string()),
        };
        // Recorded for the address the sender used, where the report tells it.
        let addressed = rr.original_recipient.as_deref().unwrap_or(&rr.address);
        let mut ev = Event::new(qid, message_id, addressed, &event, "relayed", &to);
        ev.reply = rr.diagnostic.clone().or(rr.status.clone());
        ev.reason = rr.reason.map(|x| x.as_str().to_string());
        ev.relay = r.reporting_mta.clone();
        qms_common::track::emit(ev);
        qlog!(
            "qid={qid} to={} status={event} report={kind} dsn={} reason={} file={file}",
            rr.address,
            rr.status.as_deref().unwrap_or("-"),
            quote(rr.reason.map_or("-", |x| x.as_str()))
        );
        let hard = rr.action == "failed" && rr.status.as_deref().is_none_or(|s| s.starts_with('5'));
        if let (true, Some(mid), Some(head)) = (hard, message_id, &r.returned_headers) {
            self.notify_co_recipients(qid, mid, addressed, head);
        }
    }

    /// Tells the other To/Cc recipients that `failed` did not receive the message: only when
    /// asked, never to the failed address or Bcc recipients, never for a list's member, once.
    fn notify_co_recipients(&mut self, qid: &str, message_id: &str, failed: &str, head: &[u8]) {
        let actions = qms_common::headers::value(head, "X-B-Non-Delivery-Notification-Actions")
            .unwrap_or_default()
            .to_ascii_lowercase();
        if !self.cfg.tracking.co_recipient_notices && !actions.contains("notify-co-recipients") {
            return;
        }
        let Some((subject, others)) = co_recipients(head, failed) else {
            return;
        };
        let key = (message_id.to_string(), failed.to_ascii_lowercase());
        if self.notified.contains(&key)
            || self
                .db
                .has_event(message_id, failed, NOTICE_EVENT)
                .unwrap_or(false)
        {
            return;
        }
        let to_line = others
            .iter()
            .map(|a| format!("<{a}>"))
            .collect::<Vec<_>>()
            .join(", ");
        let notice = Notice {
            host: &self.cfg.hostname,
            others: &others,
            failed,
            subject: &subject,
            message_id,
        };
        match self
            .spool
            .enqueue(notice_job(&others, self.cfg), &|id| notice.text(id))
        {
            Ok(nid) => {
                self.notified.insert(key);
                qms_common::track::emit(
                    Event::new(
                        qid,
                        Some(message_id),
                        failed,
                        NOTICE_EVENT,
                        "failed",
                        "failed",
                    )
                    .reply(Some(&format!("notice {nid} to {to_line}"))),
                );
                qlog!(
                    "qid={qid} to={failed} status={NOTICE_EVENT} notice_qid={nid} recipients={}",
                    quote(&to_line)
                );
            }
            Err(e) => qlog!(
                "qid={qid} to={failed} status=notice-error reason={}",
                quote(&e.to_string())
            ),
        }
    }
}

/// The message a report was correlated with, for the events and log lines of its recipients.
struct About<'a> {
    qid: &'a str,
    message_id: Option<&'a str>,
    kind: &'a str,
    file: &'a str,
}

/// Who else the sender wrote to (To and Cc) when `failed` is one of them, and the subject;
/// None when `failed` was not addressed by the sender (a member of a list the sender wrote
/// to) or was alone.
fn co_recipients(head: &[u8], failed: &str) -> Option<(String, Vec<Address>)> {
    let parsed = mail_parser::MessageParser::new().parse_headers(head)?;
    let visible: Vec<String> = [parsed.to(), parsed.cc()]
        .into_iter()
        .flatten()
        .flat_map(|list| list.iter())
        .filter_map(|a| a.address())
        .map(|a| a.to_ascii_lowercase())
        .collect();
    let failed = failed.to_ascii_lowercase();
    if !visible.contains(&failed) {
        return None;
    }
    let others: Vec<Address> = visible
        .iter()
        .filter(|a| **a != failed)
        .filter_map(|a| Address::parse(a).ok())
        .collect();
    let subject = parsed
        .subject()
        .unwrap_or("(no subject)")
        .replace(['\r', '\n'], " ");
    (!others.is_empty()).then_some((subject, others))
}

/// The notice's job: from the mail system, to the co-recipients, never reported on itself.
fn notice_job(others: &[Address], cfg: &Config) -> Job {
    let rcpts: Vec<Recipient> = others
        .iter()
        .map(|a| {
            let mut r = Recipient::new(a.clone());
            r.notify = vec![Notify::Never];
            r
        })
        .collect();
    let client = Client {
        local_user: Some("dsnproc".into()),
        trusted: true,
        ..Client::default()
    };
    Job::new("incoming", None, rcpts, client, "notice", &cfg.outgoing)
}

/// What a co-recipient notice says.
struct Notice<'a> {
    host: &'a str,
    others: &'a [Address],
    failed: &'a str,
    subject: &'a str,
    message_id: &'a str,
}

impl Notice<'_> {
    /// The notice as queued under `id`. The subject is the reader's text, in any script:
    /// the builder encodes it (RFC 2047).
    fn text(&self, id: &QueueId) -> Vec<u8> {
        let Notice {
            host,
            others,
            failed,
            subject,
            message_id,
        } = self;
        let to: Vec<String> = others.iter().map(|a| a.to_string()).collect();
        MessageBuilder::new()
            .from(("Mail Delivery System", format!("MAILER-DAEMON@{host}").as_str()))
            .to(to)
            .subject(format!("Not delivered to {failed}: {subject}"))
            .date(qms_common::time::now())
            .message_id(format!("{id}.notice@{host}"))
            .in_reply_to(*message_id)
            .references(*message_id)
            .header("Auto-Submitted", Raw::new("auto-generated"))
            .text_body(format!(
                "The message \"{subject}\" that you also received could not be delivered to\r\n{failed}. This notice goes to its other recipients, once.\r\n"
            ))
            .write_to_vec()
            .unwrap_or_default()
    }
}
