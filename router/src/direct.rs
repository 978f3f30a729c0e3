//! The direct route: a message the router would only pass on unchanged, every recipient to
//! one destination in one output queue, is filed there by smtpd itself, in the commit that
//! makes it durable. It saves the router's second job file, link, sync and removal per message
//! (as Postfix's cleanup does the address rewriting before its queue manager sees a message).
//!
//! The router must still see a message when any of these holds: a recipient reached through an
//! alias (expanding it may read files and give many), recipients in two queues, a `BX-` or
//! `X-B-` field (tracked sending), results of `[auth_checks]` to write, a DKIM signature to
//! add, or a tracked envelope. The output job is the one the router would have written, and
//! local delivery checks every route again before it delivers (`common/src/expand.rs`).

use qms_common::address::{logged, logged_sender};
use qms_common::aliases::Aliases;
use qms_common::config::Agent;
use qms_common::expand::{Dest, Expander};
use qms_common::headers;
use qms_common::log::quote;
use qms_common::track::Event;
use qms_common::{qlog, Address, Config};
use qms_spool::{Job, RcptState, Recipient};

/// Where the recipients of a transaction go, decided from its envelope when it starts.
pub struct Plan {
    queue: String,
    /// Route and run-as user of each recipient, in the transaction's order.
    routes: Vec<(String, Option<String>)>,
}

impl Plan {
    /// The plan for these recipients when the router would file them all into one queue
    /// without a change; None when the router must route the message.
    pub fn of(
        cfg: &Config,
        aliases: &Aliases,
        sender: Option<&Address>,
        recipients: &[Recipient],
        trusted: bool,
    ) -> Option<Plan> {
        let tracked_envelope = sender.is_some() && sender == cfg.tracking.envelope.as_ref();
        if !cfg.scheduler.direct_routing || recipients.is_empty() || tracked_envelope {
            return None;
        }
        let expander = Expander::new(cfg, aliases);
        let mut queue: Option<String> = None;
        let mut routes = Vec::with_capacity(recipients.len());
        let mut seen = std::collections::HashSet::with_capacity(recipients.len());
        for r in recipients {
            // The router removes duplicates; leave them to it.
            if !seen.insert(&r.address) {
                return None;
            }
            let Some(Dest::Queue {
                queue: q,
                route,
                user,
            }) = expander.direct(&r.address)
            else {
                return None;
            };
            if queue.get_or_insert_with(|| q.clone()) != &q {
                return None;
            }
            routes.push((route, user));
        }
        let queue = queue?;
        // The router signs what a trusted submitter sends out by SMTP.
        if trusted && !cfg.dkim.is_empty() && cfg.agent_of(&queue) == Agent::Smtp {
            return None;
        }
        Some(Plan { queue, routes })
    }

    /// The output queue the message goes to (its message file is named for it).
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// Makes `job` the output job. False leaves it as it was, for the router: when it has
    /// results of `[auth_checks]` to be written into the message.
    pub fn apply(&self, job: &mut Job) -> bool {
        if job.auth_results.is_some() || job.recipients.len() != self.routes.len() {
            return false;
        }
        job.queue = self.queue.clone();
        for (r, (route, user)) in job.recipients.iter_mut().zip(&self.routes) {
            r.route = Some(route.clone());
            r.user = user.clone();
            r.state = RcptState::Pending;
        }
        true
    }

    /// Logs, as the router does, the routing of the job committed as `id` (`job` as it was
    /// before [`Plan::apply`]), and returns its tracking events; `at` is a time (µs) before
    /// the job could be seen, so the events keep their order.
    pub fn announce(&self, id: &str, job: &Job, at: u64) -> Vec<Event> {
        let sender = logged_sender(&job.sender);
        let mut events = Vec::with_capacity(self.routes.len());
        for (r, (route, _)) in job.recipients.iter().zip(&self.routes) {
            log_routed(id, &sender, &r.address, &r.address, &self.queue, route);
            let mut ev = job
                .track(&r.address, "routed", "queued", "routed")
                .relay(route);
            ev.qid = id.to_string();
            ev.time = at;
            events.push(ev);
        }
        events
    }
}

/// True when a message whose whole header section is `head` asks nothing of the router: no
/// tracked-sending field (`BX-`, `X-B-`), which it acts on or removes.
pub fn asks_nothing(head: &[u8]) -> bool {
    !headers::named_fields(head)
        .iter()
        .any(|(name, _)| crate::msp::is_msp(name))
}

/// The router's line for a recipient routed to `queue`.
pub(crate) fn log_routed(
    id: &str,
    sender: &str,
    to: &Address,
    orig_to: &Address,
    queue: &str,
    route: &str,
) {
    qlog!(
        "qid={id} from={sender} to={} orig_to={} queue={queue} route={} status=routed",
        logged(to),
        logged(orig_to),
        quote(route)
    );
}
