//! `qms router`: turns each job of the `incoming` queue into one job per output queue.
//!
//! For each recipient, in this order: an exact address in `[routes]`, an alias, a mailbox in
//! `[mailboxes]`, a system user (local domains), the domain in `[routes]`, the default route.
//! The output jobs share the message file (hard links) and are committed together before
//! the incoming jobs are removed, so a crash can only make the router route a job again.

pub mod direct;
pub mod dkim;
mod expansion;
mod msp;
mod smarthost;
mod suppress;

use qms_common::address::{logged, logged_sender};
use qms_common::log::quote;
use qms_common::track::Event;
use qms_common::{qlog, Config};
use qms_delivery::plugin::{self, Pre};
use qms_spool::{Claimed, Job, RcptState, Spool};
use std::sync::Arc;

pub struct Router {
    cfg: Arc<Config>,
    spool: Spool,
    aliases: qms_common::aliases::Cache,
    suppression: suppress::Suppression,
    dkim: dkim::Signers,
}

impl Router {
    /// A router for `cfg`; fails when a DKIM key cannot be read.
    pub fn new(cfg: Arc<Config>, spool: Spool) -> Result<Router, String> {
        let aliases = qms_common::aliases::Cache::new(cfg.aliases.clone());
        let suppression = suppress::Suppression::new(cfg.clone());
        let dkim = dkim::Signers::load(&cfg)?;
        Ok(Router {
            cfg,
            spool,
            aliases,
            suppression,
            dkim,
        })
    }

    /// The message an output job gets: signed when it leaves by SMTP from a trusted
    /// submitter and its From: domain has DKIM keys; else None (the message as it is).
    fn signed(&self, child: &Job, message: &[u8]) -> Option<Vec<u8>> {
        if self.dkim.is_empty()
            || !child.client.trusted
            || self.cfg.agent_of(&child.queue) != qms_common::config::Agent::Smtp
        {
            return None;
        }
        match self.dkim.sign(message) {
            Ok(signed) => signed,
            Err(e) => {
                qlog!("qid={} status=warning reason={}", child.id, quote(&e));
                None
            }
        }
    }

    /// Routes a batch of incoming jobs; their output jobs are made durable in one commit.
    pub fn dispatch(&mut self, mut batch: Vec<Claimed>) {
        // Marked before any output job exists, so a job routed again after a crash passes
        // the mark on and local delivery looks in the mailboxes first. The local agent's
        // sync of its own marks comes before it delivers, and flushes these too.
        if let Err(e) = self.spool.mark_attempts(batch.iter_mut(), false) {
            qlog!("status=warning reason={}", quote(&e.to_string()));
        }
        let mut staged = Vec::new();
        let mut routed = Vec::new();
        for mut c in batch {
            let original = c.job.clone();
            let prepared = self.prepare(&mut c);
            if let Some(why) = prepared.refusal.as_deref().filter(|w| w.starts_with('4')) {
                // Leave the job as it came for a later try; nothing of this pass is kept.
                qlog!("qid={} status=deferred reason={}", c.job.id, quote(why));
                c.job = original;
                c.job.next_attempt = qms_common::time::now() + 60;
                if let Err(e) = self.spool.update(&mut c) {
                    qlog!(
                        "qid={} status=error reason={}",
                        c.job.id,
                        quote(&e.to_string())
                    );
                }
                continue;
            }
            let mut events = Vec::new();
            if let Some(why) = &prepared.refusal {
                refuse(&mut c, why, &mut events);
            }
            match self.route(&mut c, &mut events) {
                Ok(children) if c.job.dryrun => {
                    log_dryrun(&c, &children, &mut events);
                    routed.push((c, events));
                }
                Ok(children) => {
                    if self.stage_children(&c, &children, &prepared, &mut staged) {
                        routed.push((c, events));
                    }
                }
                Err(e) => qlog!("qid={} status=error reason={}", c.job.id, quote(&e)),
            }
        }
        // Recipients that failed at routing (unknown user, error: route) get error mail, made
        // durable before their incoming job can go (a crash before the commit sends it twice).
        for (c, _) in &routed {
            if let Err(e) = qms_delivery::settle::report_failures(&self.cfg, &self.spool, &c.job) {
                qlog!("qid={} status=bounce-error reason={}", c.job.id, quote(&e));
            }
        }
        // The router's jobs replace nothing and are never refused one by one: only the whole
        // commit can fail.
        if let Err(e) = self.spool.commit(staged) {
            // The incoming jobs stay; the periodic scan brings them back for another try.
            qlog!("status=error reason={}", quote(&e.to_string()));
            return;
        }
        // From the commit until its incoming job is gone, a killed router would route a job
        // again and an SMTP copy could go twice: the incoming jobs go first, all of them, and
        // only then the events are written.
        let mut all_events = Vec::new();
        for (c, events) in routed {
            all_events.push(events);
            let id = c.job.id.clone();
            if c.job
                .recipients
                .iter()
                .any(|r| r.state == RcptState::Deferred)
            {
                self.hold_back(c);
            } else if let Err(e) = self.spool.finish(c) {
                qlog!("qid={id} status=error reason={}", quote(&e.to_string()));
            }
        }
        qms_common::track::emit_all(all_events.into_iter().flatten());
    }

    /// What comes before routing a job: its tracked-sending fields (they can change the
    /// sender and the DSN requests), smtpd's authentication results, the pre-plugins.
    fn prepare(&self, c: &mut Claimed) -> Prepared {
        let msg = match self.spool.message(c) {
            Ok(msg) => msg,
            Err(e) => {
                qlog!(
                    "qid={} status=warning reason={}",
                    c.job.id,
                    quote(&e.to_string())
                );
                return Prepared::default();
            }
        };
        let applied = msp::apply(&self.cfg, &mut c.job, &msg);
        let mut message = applied.message;
        let mut refusal = applied.refusal;
        // `[auth_checks]`: smtpd's results go on the message, which is then rewritten anyway.
        if let Some(ar) = &c.job.auth_results {
            let base = message.as_deref().unwrap_or(&msg);
            message = Some(qms_common::headers::set_auth_results(
                base,
                &self.cfg.hostname,
                ar,
            ));
        }
        if refusal.is_none() {
            for name in &applied.pre_plugins {
                let input = message.as_deref().unwrap_or(&msg);
                match plugin::pre(&self.cfg, &c.job, name, input) {
                    Pre::Keep => {}
                    Pre::Replace(m) => message = Some(m),
                    Pre::Refuse(why) => {
                        refusal = Some(format!("5.7.0 {why}"));
                        break;
                    }
                    Pre::Later(why) => {
                        refusal = Some(format!("4.3.0 {why}"));
                        break;
                    }
                }
                qlog!("qid={} plugin={name} stage=pre status=ok", c.job.id);
            }
        }
        Prepared {
            body: Some(msg),
            rewritten: message,
            refusal,
        }
    }

    /// Stages one output job per child, signed or sealed where due. False when one could
    /// not be staged: the incoming job then stays for another try.
    fn stage_children(
        &self,
        c: &Claimed,
        children: &[Job],
        prepared: &Prepared,
        staged: &mut Vec<qms_spool::Staged>,
    ) -> bool {
        let mut ok = true;
        let rewritten = prepared.rewritten.as_deref();
        let last = rewritten.or(prepared.body.as_deref());
        for child in children {
            if let Some(why) = &child.quarantine {
                qlog!(
                    "qid={} queue={} status=quarantined reason={}",
                    child.id,
                    child.queue,
                    quote(why)
                );
            }
            let signed = last
                .and_then(|m| self.signed(child, m))
                .or_else(|| last.and_then(|m| sealed(&self.cfg, &c.job, child, m)));
            let message = signed.as_deref().or(rewritten);
            match self.spool.stage_child(c, child, message) {
                Ok(Some(s)) => staged.push(s),
                Ok(None) => {}
                Err(e) => {
                    qlog!(
                        "qid={} status=error reason={}",
                        c.job.id,
                        quote(&e.to_string())
                    );
                    ok = false;
                }
            }
        }
        ok
    }

    /// Keeps the incoming job for its deferred recipients only, to be routed again later;
    /// past the queue lifetime they fail instead.
    fn hold_back(&self, mut c: Claimed) {
        let now = qms_common::time::now();
        c.job.recipients.retain(|r| r.state == RcptState::Deferred);
        c.job.attempts += 1;
        c.job.next_attempt =
            now + qms_delivery::settle::backoff(&self.cfg, &c.job.queue, c.job.attempts);
        if now - c.job.arrival > self.cfg.outgoing.max_queue_lifetime {
            for r in c.job.recipients.iter_mut() {
                let last = r.reply.take().unwrap_or_default();
                r.state = RcptState::Failed;
                r.reply = Some(format!(
                    "5.4.7 delivery time expired; the last problem was: {last}"
                ));
            }
            if let Err(e) = qms_delivery::settle::report_failures(&self.cfg, &self.spool, &c.job) {
                qlog!("qid={} status=bounce-error reason={}", c.job.id, quote(&e));
            }
            let _ = self.spool.finish(c);
            return;
        }
        if let Err(e) = self.spool.update(&mut c) {
            qlog!(
                "qid={} status=error reason={}",
                c.job.id,
                quote(&e.to_string())
            );
        }
    }
}

/// The copy of `message` for `child` with the ARC set smtpd sealed `job` with, when the
/// child carries a recipient an alias forwards to another domain (`[arc]`); else None.
fn sealed(cfg: &Config, job: &Job, child: &Job, message: &[u8]) -> Option<Vec<u8>> {
    let set = job.arc_seal.as_deref()?;
    let forwarded = child.recipients.iter().any(|r| r.original.is_some());
    if !forwarded || cfg.agent_of(&child.queue) != qms_common::config::Agent::Smtp {
        return None;
    }
    let mut out = Vec::with_capacity(set.len() + message.len());
    out.extend_from_slice(set.as_bytes());
    out.extend_from_slice(message);
    Some(out)
}

/// A job's message before routing: as read, as rewritten (None: unchanged), and why it
/// cannot be sent as it asks (a 4xx: not now; a 5xx: never).
#[derive(Default)]
struct Prepared {
    body: Option<Vec<u8>>,
    rewritten: Option<Vec<u8>>,
    refusal: Option<String>,
}

/// Fails every recipient still open with `why`, logged and tracked.
fn refuse(c: &mut Claimed, why: &str, events: &mut Vec<Event>) {
    let (id, sender) = (c.job.id.clone(), logged_sender(&c.job.sender));
    for r in c.job.recipients.iter_mut().filter(|r| !r.state.is_final()) {
        qlog!(
            "qid={id} from={sender} to={} status=bounced ({why})",
            logged(&r.address)
        );
        r.state = RcptState::Failed;
        r.reply = Some(why.to_string());
    }
    for r in &c.job.recipients {
        let mut ev = c.job.track(&r.address, "failed", "queued", "failed");
        ev.crossref = c.job.crossref.clone();
        events.push(ev.reply(Some(why)));
    }
}

/// A dry run: where each recipient would have gone, logged and tracked, nothing staged.
fn log_dryrun(c: &Claimed, children: &[Job], events: &mut Vec<Event>) {
    for r in children.iter().flat_map(|j| j.recipients.iter()) {
        qlog!(
            "qid={} to={} status=dryrun (routed via {}, not sent)",
            c.job.id,
            r.address,
            r.route.as_deref().unwrap_or("-")
        );
        events.push(
            c.job
                .track(&r.address, "dryrun", "routed", "dryrun")
                .relay(r.route.as_deref().unwrap_or("")),
        );
    }
}
