//! The local agent's side of Sieve: whether a Maildir delivery is filtered, and what the
//! agent does with the filter's report: log it, queue its redirects and vacation replies,
//! and turn it into the recipient's outcome.

use crate::dsn::Kind;
use crate::local::Outcome;
use crate::sieve::{self, Cache, Filtered, Filters, Request};
use qms_common::address::logged;
use qms_common::config::{Config, Mailbox};
use qms_common::log::quote;
use qms_common::privs::Account;
use qms_common::{qlog, Address};
use qms_spool::{Client, Job, Recipient, Spool};
use std::cell::RefCell;
use std::path::{Path, PathBuf};

/// The protocol of the mail a filter sends (redirects and vacation replies) in job files.
pub const SIEVE_PROTOCOL: &str = "sieve";

pub struct Filtering {
    runtime: ::sieve::Runtime,
    compiler: ::sieve::Compiler,
    cache: RefCell<Cache>,
}

/// How one delivery is filtered.
pub struct Plan {
    script: Option<PathBuf>,
    user_owned: bool,
    run_as: Option<Account>,
    /// qms may become users: then a script never runs without `run_as`.
    privileged: bool,
    create_inbox: bool,
}

/// One filtered delivery: the job, the recipient, and the stable name of its copies.
pub struct Delivery<'a> {
    pub job: &'a Job,
    pub rcpt: &'a Recipient,
    pub body: &'a [u8],
    pub inbox: &'a Path,
    pub key: &'a str,
    pub recheck: bool,
}

impl Filtering {
    pub fn new(cfg: &Config) -> Filtering {
        Filtering {
            runtime: sieve::runtime(&cfg.sieve, &cfg.hostname),
            compiler: sieve::compiler(&cfg.sieve),
            cache: RefCell::new(Cache::default()),
        }
    }

    /// The filtering of a delivery into the Maildir `dir` for `account`, if any applies:
    /// the mailbox's script, else the user's own, else only `[sieve] before` and `after`.
    /// A user's script applies when qms can run it as that user (`privileged`: qms may
    /// become users).
    pub fn plan(
        &self,
        cfg: &Config,
        dir: &Path,
        account: Option<&Account>,
        privileged: bool,
    ) -> Option<Plan> {
        let mailbox = cfg
            .mailboxes
            .values()
            .find(|m| matches!(&m.mailbox, Mailbox::Maildir(p) if p == dir));
        let (script, user_owned) = match (mailbox, account, &cfg.sieve.user_script) {
            (Some(m), _, _) => (m.sieve.clone(), false),
            (None, Some(a), Some(rel)) if privileged || a.uid == nix::unistd::getuid() => {
                (Some(a.home.join(rel)), true)
            }
            _ => (None, false),
        };
        let global = cfg.sieve.before.is_some() || cfg.sieve.after.is_some();
        // The system's scripts skip a mailbox that names no user: they would run as qms.
        if script.is_none() && (!global || (privileged && account.is_none())) {
            return None;
        }
        Some(Plan {
            script,
            user_owned,
            run_as: account.filter(|_| privileged).cloned(),
            privileged,
            create_inbox: mailbox.is_some(),
        })
    }

    /// Runs the filter for `d` as its plan says (in a child of its own), queues what it
    /// sends, and says how the recipient's delivery ended.
    pub fn deliver(&self, cfg: &Config, spool: &Spool, plan: Plan, d: &Delivery) -> Outcome {
        if plan.privileged && plan.run_as.is_none() {
            // Never run a script as qms or root: a mailbox with a script names its user.
            return Outcome::Temp(format!(
                "4.3.5 the filter of {} has no user to run as (set user = in [mailboxes])",
                d.rcpt.address
            ));
        }
        let result = self.with_request(cfg, &plan, d, sieve::filter);
        self.finish(cfg, spool, d, result)
    }

    /// Runs the filter for `d` in this process, which has already become its user (a
    /// child that delivers a batch for one user, `asuser`); its copies are staged, for the
    /// caller to make durable with the others.
    pub fn prepare_here(
        &self,
        cfg: &Config,
        plan: &Plan,
        d: &Delivery,
    ) -> Result<sieve::Prepared, String> {
        self.with_request(cfg, plan, d, sieve::prepare)
    }

    /// `run` with the request for `d` under `plan`.
    fn with_request<R>(
        &self,
        cfg: &Config,
        plan: &Plan,
        d: &Delivery,
        run: impl FnOnce(&Filters, &Request) -> R,
    ) -> R {
        let sender = d
            .job
            .sender
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default();
        let orcpt = d
            .rcpt
            .original
            .as_ref()
            .unwrap_or(&d.rcpt.address)
            .to_string();
        let rcpt = d.rcpt.address.to_string();
        let cache = self.cache.borrow();
        let filters = Filters {
            cfg: &cfg.sieve,
            runtime: &self.runtime,
            compiler: &self.compiler,
            cache: &cache,
            hostname: &cfg.hostname,
        };
        let req = Request {
            account: plan.run_as.as_ref(),
            inbox: d.inbox,
            create_inbox: plan.create_inbox,
            script: plan.script.clone(),
            user_owned: plan.user_owned,
            message: d.body,
            sender: &sender,
            recipient: &rcpt,
            orcpt: &orcpt,
            arrival: d.job.arrival,
            key: d.key,
            recheck: d.recheck,
        };
        run(&filters, &req)
    }

    /// What the agent does with a filter's report: the cache learns, the log says what was
    /// set aside, redirects and replies are queued, and the recipient's outcome is given
    /// (with the kind of success report it earns).
    pub fn finish(
        &self,
        cfg: &Config,
        spool: &Spool,
        d: &Delivery,
        result: Result<Filtered, String>,
    ) -> Outcome {
        let mut done = match result {
            Ok(f) => f,
            // The filter may have stored copies before it failed: look before storing.
            Err(e) => {
                let look = crate::local::LOOK_FIRST;
                return Outcome::Temp(format!("{look}filter for {}: {e}", d.rcpt.address));
            }
        };
        self.cache
            .borrow_mut()
            .learn(&self.compiler, std::mem::take(&mut done.learned));
        self.log(d, &done);
        if let Some(reason) = &done.rejected {
            let reason = reason.replace(['\r', '\n'], " ");
            if let Err(e) = self.send_out(cfg, spool, d, &done) {
                qlog!("qid={} status=warning reason={}", d.job.id, quote(&e));
            }
            return Outcome::Perm(format!("5.7.1 refused by the recipient's filter: {reason}"));
        }
        if let Err(e) = self.send_out(cfg, spool, d, &done) {
            return Outcome::Temp(format!("{}{e}", crate::local::LOOK_FIRST));
        }
        let (text, report) = summary(&done);
        Outcome::Filtered { text, report }
    }

    fn log(&self, d: &Delivery, done: &Filtered) {
        let to = logged(&d.rcpt.address);
        if let Some(e) = &done.error {
            qlog!(
                "qid={} to={to} status=warning reason={}",
                d.job.id,
                quote(&format!("Sieve: {e}; the message is kept"))
            );
        }
        for n in &done.notes {
            qlog!(
                "qid={} to={to} status=warning reason={}",
                d.job.id,
                quote(&format!("Sieve: {n}"))
            );
        }
    }

    /// Queues the filter's redirects and vacation replies. A redirect keeps the sender
    /// (rewritten by SRS for another domain) and carries this recipient's Delivered-To, so a
    /// loop back here is found; a reply goes with the null sender (RFC 5230 5.1).
    fn send_out(
        &self,
        cfg: &Config,
        spool: &Spool,
        d: &Delivery,
        done: &Filtered,
    ) -> Result<(), String> {
        for o in &done.outgoing {
            let to = match Address::parse(&o.to) {
                Ok(a) => a,
                Err(e) => {
                    qlog!(
                        "qid={} status=warning reason={}",
                        d.job.id,
                        quote(&format!("Sieve: {:?}: {e}; not sent", o.to))
                    );
                    continue;
                }
            };
            let sender = match (o.vacation, &d.job.sender, &cfg.srs) {
                (true, _, _) => None,
                (false, Some(s), Some(srs))
                    if !cfg.is_local_domain(s.domain()) && !cfg.is_local_domain(to.domain()) =>
                {
                    srs.forward(s).or(Some(s.clone()))
                }
                (false, s, _) => s.clone(),
            };
            let message = match o.message() {
                Some(m) if o.vacation => m,
                m => {
                    let mut out = format!("Delivered-To: {}\r\n", d.rcpt.address).into_bytes();
                    out.extend_from_slice(m.as_deref().unwrap_or(d.body));
                    out
                }
            };
            let client = Client {
                local_user: d.rcpt.user.clone(),
                ..Client::default()
            };
            let job = Job::new(
                "incoming",
                sender,
                vec![Recipient::new(to.clone())],
                client,
                SIEVE_PROTOCOL,
                &cfg.outgoing,
            );
            let id = spool
                .enqueue(job, &|_| message.clone())
                .map_err(|e| format!("the filter's mail to {to} was not queued: {e}"))?;
            qlog!(
                "qid={} to={} status={} {}_qid={id} {}={}",
                d.job.id,
                logged(&d.rcpt.address),
                if o.vacation {
                    "vacation-sent"
                } else {
                    "redirected"
                },
                if o.vacation { "reply" } else { "redirect" },
                if o.vacation {
                    "reply_to"
                } else {
                    "redirect_to"
                },
                logged(&to)
            );
        }
        Ok(())
    }
}

/// The delivery line's text, and the success report a NOTIFY=SUCCESS recipient gets:
/// stored copies are deliveries, a redirect alone is relayed, a discard is neither.
fn summary(done: &Filtered) -> (String, Option<Kind>) {
    let redirects: Vec<&str> = done
        .outgoing
        .iter()
        .filter(|o| !o.vacation)
        .map(|o| o.to.as_str())
        .collect();
    let mut parts = Vec::new();
    if !done.stored.is_empty() {
        parts.push(format!("delivered to {}", done.stored.join(", ")));
    }
    if !redirects.is_empty() {
        parts.push(format!("redirected to {}", redirects.join(", ")));
    }
    if parts.is_empty() {
        parts.push("discarded".into());
    }
    let report = match (done.stored.is_empty(), redirects.is_empty()) {
        (false, _) => Some(Kind::Success),
        (true, false) => Some(Kind::Relayed),
        (true, true) => None,
    };
    (format!("{} by the Sieve filter", parts.join("; ")), report)
}
