//! One incoming job's recipients decided: suppressed, held back, or expanded (aliases,
//! lists, routes) into the output jobs to write, one per queue and envelope sender.

use crate::{direct, Router};
use qms_common::address::{logged, logged_sender, Address};
use qms_common::expand::{Dest, Expanded, Expander};
use qms_common::qlog;
use qms_common::track::Event;
use qms_spool::{Claimed, Job, QueueId, RcptState, Recipient};
use std::collections::BTreeMap;

/// The output jobs' recipients, by queue and envelope sender (a list with an owner, a
/// tracked or forwarded recipient has its own sender).
type ByQueue = BTreeMap<(String, Option<Address>), Vec<Recipient>>;

/// What the log lines and tracking events of one job's routing share.
struct Pass<'a> {
    id: QueueId,
    /// The sender as logged.
    sender: String,
    message_id: Option<String>,
    crossref: Option<String>,
    /// Tracked sending: a crossref, or mail from the tracked envelope.
    tracked: bool,
    events: &'a mut Vec<Event>,
}

impl Pass<'_> {
    /// A tracking event for the recipient `a`, to be pushed to `events`.
    fn event(&self, a: &Address, event: &str, from: &str, to: &str) -> Event {
        let id = self.id.as_str();
        let mut ev = Event::new(
            id,
            self.message_id.as_deref(),
            &a.to_string(),
            event,
            from,
            to,
        );
        ev.crossref = self.crossref.clone();
        ev
    }
}

impl Router {
    /// Decides every recipient of `c`: the output jobs to write, one per queue. Recipients
    /// that end here (discard, error, unknown) are marked final in `c.job`.
    pub(crate) fn route(
        &self,
        c: &mut Claimed,
        events: &mut Vec<Event>,
    ) -> Result<Vec<Job>, String> {
        let aliases = self.aliases.get();
        let mut expander = Expander::new(&self.cfg, &aliases);
        let mut by_queue = ByQueue::new();
        let job = &mut c.job;
        let mut pass = Pass {
            id: job.id.clone(),
            sender: logged_sender(&job.sender),
            message_id: job.message_id.clone(),
            crossref: job.crossref.clone(),
            tracked: job.crossref.is_some()
                || (job.sender.is_some() && job.sender == self.cfg.tracking.envelope),
            events,
        };
        let consult = pass.tracked && !job.ignore_suppression;
        let from = job.sender.clone();
        for r in job.recipients.iter_mut() {
            if r.state.is_final() || (consult && self.suppressed(&mut pass, r)) {
                continue;
            }
            let expanded = expander.expand(&r.address);
            if held_back(&mut pass, r, &expanded) {
                continue;
            }
            r.state = RcptState::Pending;
            for e in expanded {
                let owner = self.envelope_for(&pass, from.as_ref(), r, &e);
                if let Some((queue, out)) = place(&mut pass, r, e) {
                    if let Some(o) = &owner {
                        qlog!(
                            "qid={} to={} sender={o} status=own-sender",
                            pass.id,
                            out.address
                        );
                    }
                    let list = by_queue.entry((queue, owner)).or_default();
                    if !list
                        .iter()
                        .any(|x| x.address == out.address && x.route == out.route)
                    {
                        list.push(out);
                    }
                }
            }
        }
        Ok(self.output_jobs(&c.job, by_queue))
    }

    /// A tracked recipient on the suppression list: failed here, with its reason.
    fn suppressed(&self, pass: &mut Pass, r: &mut Recipient) -> bool {
        let Some(s) = self.suppression.check(&r.address) else {
            return false;
        };
        qlog!(
            "qid={} from={} to={} status=suppressed ({})",
            pass.id,
            pass.sender,
            logged(&r.address),
            s.reply
        );
        let mut ev = pass
            .event(&r.address, "suppressed", "queued", "failed")
            .reply(Some(&s.reply));
        ev.reason = Some(s.reason);
        pass.events.push(ev);
        r.state = RcptState::Failed;
        r.reply = Some(s.reply);
        true
    }

    /// The envelope sender of one expanded address's copy, when not the message's own: a
    /// signed envelope per recipient for tracked mail (so that its reports name it); SRS
    /// for mail an alias forwards to another domain by SMTP (so that the next hop's SPF
    /// check asks about us rather than the original sender); else the list's owner.
    fn envelope_for(
        &self,
        pass: &Pass,
        from: Option<&Address>,
        r: &Recipient,
        e: &Expanded,
    ) -> Option<Address> {
        let mut owner = e.owner.clone();
        if let (Some(base), true) = (&self.cfg.tracking.envelope, pass.tracked) {
            let verp = qms_common::verp::envelope(
                base,
                &self.cfg.tracking.key,
                pass.id.as_str(),
                &e.addr.to_string(),
            );
            owner = verp.or(owner);
        }
        if let (None, true, Some(srs), Some(from), Dest::Queue { queue, .. }) =
            (&owner, e.addr != r.address, &self.cfg.srs, from, &e.dest)
        {
            let remote = !self.cfg.is_local_domain(from.domain());
            if remote && self.cfg.agent_of(queue) == qms_common::config::Agent::Smtp {
                owner = srs.forward(from);
            }
        }
        owner
    }

    /// One output job per queue and envelope sender, each a copy of `job` with its share of
    /// the recipients.
    fn output_jobs(&self, job: &Job, by_queue: ByQueue) -> Vec<Job> {
        let now = qms_common::time::now();
        let pass = job.attempts;
        by_queue
            .into_iter()
            .map(|((queue, owner), recipients)| {
                let mut out = job.clone();
                if let Some(o) = owner {
                    out.id = out.id.derive(&o.to_string());
                    out.sender = Some(o);
                }
                // Recipients held back on an earlier pass get jobs of their own.
                if pass > 0 {
                    out.id = out.id.derive(&format!("pass{pass}"));
                }
                out.body = format!("{}.{queue}", out.id);
                if self.cfg.agent_of(&queue) != qms_common::config::Agent::Smtp {
                    // Credentials stay only where they are used.
                    out.smarthost = None;
                }
                out.queue = queue;
                out.recipients = recipients;
                out.attempts = 0;
                out.next_attempt = now;
                out
            })
            .collect()
    }
}

/// A configuration problem on the way (an unreadable include file, a missing mailbox
/// owner) holds back the whole recipient until it is fixed: routing only part of a list
/// now would deliver the rest twice later.
fn held_back(pass: &mut Pass, r: &mut Recipient, expanded: &[Expanded]) -> bool {
    let Some(Dest::Defer(text)) = expanded
        .iter()
        .map(|e| &e.dest)
        .find(|d| matches!(d, Dest::Defer(_)))
    else {
        return false;
    };
    qlog!(
        "qid={} from={} to={} status=deferred ({text})",
        pass.id,
        pass.sender,
        logged(&r.address)
    );
    let ev = pass.event(&r.address, "deferred", "queued", "deferred");
    pass.events.push(ev.reply(Some(text)));
    r.state = RcptState::Deferred;
    r.reply = Some(text.clone());
    true
}

/// Where one expanded address of `r` goes: its queue and its copy of the recipient; none
/// when it ends here (discarded, or failed, which fails `r`).
fn place(pass: &mut Pass, r: &mut Recipient, e: Expanded) -> Option<(String, Recipient)> {
    let Expanded { addr, dest, .. } = e;
    let (id, sender) = (pass.id.clone(), pass.sender.clone());
    let qaddr = logged(&addr);
    let (queue, route, user) = match dest {
        Dest::Queue { queue, route, user } => (queue, route, user),
        Dest::Discard => {
            qlog!("qid={id} from={sender} to={qaddr} status=discarded");
            let ev = pass.event(&addr, "discarded", "queued", "discarded");
            pass.events.push(ev);
            return None;
        }
        Dest::Defer(_) => return None,
        Dest::Fail(text) => {
            qlog!("qid={id} from={sender} to={qaddr} status=bounced ({text})");
            let ev = pass.event(&addr, "failed", "queued", "failed");
            pass.events.push(ev.reply(Some(&text)));
            r.state = RcptState::Failed;
            r.reply = Some(text);
            return None;
        }
    };
    direct::log_routed(id.as_str(), &sender, &addr, &r.address, &queue, &route);
    let ev = pass.event(&addr, "routed", "queued", "routed");
    pass.events.push(ev.relay(&route));
    let mut out = r.clone();
    if addr != r.address {
        out.original = Some(r.address.clone());
        out.address = addr;
    }
    out.route = Some(route);
    out.user = user;
    out.state = RcptState::Pending;
    Some((queue, out))
}
