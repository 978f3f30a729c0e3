//! The local delivery agent (`qms deliver --queue local` and `--queue pipe`): Maildir, mbox,
//! file and program targets.
//!
//! Nothing in a job file is believed: before anything runs, each recipient's route and user
//! are derived again from the config and the aliases (`qms_common::expand`), and a job
//! whose route they do not give is deferred. Deliveries for a user run in a child that has
//! fully become that user (`runas`); configured mailboxes without a `user` are written by
//! this process, as qms's own user, and a batch of Maildir deliveries shares one disk sync.

use crate::{asuser, maildir, mbox, pipe, runas, settle, Agent};
use qms_common::address::{logged, logged_sender};
use qms_common::expand::{Dest, Expanded, Expander};
use qms_common::log::quote;
use qms_common::privs::{self, Account};
use qms_common::{qlog, safeio, Config};
use qms_spool::{Claimed, RcptState, Recipient, Spool};
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

mod attempt;

use attempt::{Attempted, Derived, Step};

pub struct LocalAgent {
    cfg: Arc<Config>,
    spool: Spool,
    aliases: qms_common::aliases::Cache,
    /// This process's own account: whom deliveries run as when qms runs unprivileged.
    me: Option<Account>,
    filtering: crate::filtering::Filtering,
    /// The spool's file system: a `syncfs` of it covers Maildirs on the same one.
    spool_dev: Option<u64>,
}

/// The result of one delivery attempt.
pub enum Outcome {
    Done,
    /// Done as a Sieve filter said: the delivery line's text, and the success report a
    /// NOTIFY=SUCCESS recipient gets (none for a discard).
    Filtered {
        text: String,
        report: Option<crate::dsn::Kind>,
    },
    /// Already in the mailbox: an attempt a crash cut short had delivered it.
    Found,
    Temp(String),
    Perm(String),
}

/// Starts the reply of a recipient whose copies may be stored already (a filter that could
/// not queue what it sends, a delivery process that ended without its report): the next
/// attempt looks for them before storing.
pub(crate) const LOOK_FIRST: &str = "4.3.0 (looked for before the next attempt) ";

impl LocalAgent {
    pub fn new(cfg: Arc<Config>, spool: Spool) -> LocalAgent {
        let aliases = qms_common::aliases::Cache::new(cfg.aliases.clone());
        let filtering = crate::filtering::Filtering::new(&cfg);
        let spool_dev = std::fs::metadata(spool.root()).map(|m| m.dev()).ok();
        LocalAgent {
            spool_dev,
            cfg,
            spool,
            aliases,
            me: Account::by_uid(nix::unistd::getuid()),
            filtering,
        }
    }
}

/// A batch's attempt marks, made durable once, before the first delivery that needs them.
struct Marks<'a> {
    spool: &'a Spool,
    synced: bool,
}

impl Marks<'_> {
    fn sync(&mut self) -> Result<(), Outcome> {
        if !self.synced {
            self.spool
                .sync_all()
                .map_err(|e| Outcome::Temp(format!("4.3.0 {e}")))?;
            self.synced = true;
        }
        Ok(())
    }
}

impl LocalAgent {
    /// Makes the batch's staged Maildir files durable and moves them into `new/`: one sync
    /// for all (which covers the attempt marks too when it is a `syncfs` of the spool's file
    /// system). Returns why it failed.
    fn commit_staged(
        &self,
        staged: &[(usize, usize, safeio::Staged)],
        marks: &mut Marks,
    ) -> Option<String> {
        let on_spool = staged
            .iter()
            .all(|(_, _, s)| s.file().metadata().ok().map(|m| m.dev()) == self.spool_dev);
        // The marks' syncfs, when it comes now that the files are written, covers them too.
        let covered = on_spool && !marks.synced;
        if covered || !(on_spool && staged.len() > 1) {
            if let Err(Outcome::Temp(e)) = marks.sync() {
                return Some(e);
            }
        }
        let data = match covered {
            true => Ok(()),
            false => safeio::sync_data(staged.iter().map(|(_, _, s)| s.file())).map(|_| ()),
        };
        let commit = data
            .and_then(|()| staged.iter().try_for_each(|(_, _, s)| s.place()))
            .and_then(|()| safeio::sync_dirs(staged.iter().map(|(_, _, s)| s.dest())));
        commit.err().map(|e| format!("4.3.0 Maildir write: {e}"))
    }
}

impl Agent for LocalAgent {
    fn deliver(&mut self, mut batch: Vec<Claimed>) {
        // On disk before anything is delivered (see `Marks`): a worker that dies leaves them.
        if let Err(e) = self.spool.mark_attempts(batch.iter_mut(), false) {
            let why = format!("4.3.0 {e}");
            for c in batch.iter_mut() {
                for ri in 0..c.job.recipients.len() {
                    if !c.job.recipients[ri].state.is_final() {
                        record(c, ri, Outcome::Temp(why.clone()));
                    }
                }
            }
            settle::settle_all(&self.cfg, &self.spool, batch);
            return;
        }
        let mut marks = Marks {
            spool: &self.spool,
            synced: false,
        };
        let mut run = Run {
            privileged: privs::can_switch_user(),
            derived: Derived::new(),
            staged: Vec::new(),
            reports: Reports::new(),
            pending: asuser::Pending::default(),
        };
        for ji in 0..batch.len() {
            self.attempt_job(&mut batch, ji, &mut run, &mut marks);
            if run.pending.full() {
                self.as_users(&mut batch, &mut run.pending, &mut marks, &mut run.reports);
            }
        }
        self.as_users(&mut batch, &mut run.pending, &mut marks, &mut run.reports);
        if !run.staged.is_empty() {
            let err = self.commit_staged(&run.staged, &mut marks);
            for (ji, ri, s) in run.staged {
                let result = match &err {
                    None => Outcome::Done,
                    Some(e) => {
                        s.abandon();
                        Outcome::Temp(e.clone())
                    }
                };
                record(&mut batch[ji], ri, result);
            }
        }
        for (ji, c) in batch.iter().enumerate() {
            let kind = |ri: usize| {
                run.reports
                    .get(&(ji, ri))
                    .copied()
                    .unwrap_or(Some(crate::dsn::Kind::Success))
            };
            settle::report_deliveries(&self.cfg, &self.spool, &c.job, &kind);
        }
        settle::settle_all(&self.cfg, &self.spool, batch);
    }
}

/// What a batch's attempts gather until its commit.
struct Run {
    privileged: bool,
    derived: Derived,
    /// Maildir deliveries made in this process, committed together: (job, recipient, file).
    staged: Vec<(usize, usize, safeio::Staged)>,
    /// The success report of each filtered recipient, by (job, recipient).
    reports: Reports,
    /// Deliveries to be made as their users, one child per user.
    pending: asuser::Pending,
}

impl LocalAgent {
    /// Attempts every recipient of job `ji` not yet final: each is staged, left for its
    /// user's child, or recorded.
    fn attempt_job(&self, batch: &mut [Claimed], ji: usize, run: &mut Run, marks: &mut Marks) {
        let c = &mut batch[ji];
        let body = match self.spool.message(c) {
            Ok(b) => Arc::new(b),
            Err(e) => {
                for r in c.job.recipients.iter_mut().filter(|r| !r.state.is_final()) {
                    r.state = RcptState::Deferred;
                    r.reply = Some(format!("4.3.0 {e}"));
                }
                return;
            }
        };
        let sender = c
            .job
            .sender
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default();
        for ri in 0..c.job.recipients.len() {
            if c.job.recipients[ri].state.is_final() {
                continue;
            }
            let mut step = Step {
                derived: &mut run.derived,
                marks,
                privileged: run.privileged,
            };
            match self.attempt(c, ri, &body, &sender, &mut step) {
                Attempted::Staged(s) => run.staged.push((ji, ri, s)),
                Attempted::AsUser(user, mut item) => {
                    item.ji = ji;
                    run.pending.add(user, item);
                }
                Attempted::Done(o) => {
                    note_report(&mut run.reports, ji, ri, &o);
                    record(c, ri, o)
                }
            }
        }
    }
}

/// The success report each filtered recipient earns, by (job, recipient).
type Reports = HashMap<(usize, usize), Option<crate::dsn::Kind>>;

fn note_report(reports: &mut Reports, ji: usize, ri: usize, o: &Outcome) {
    if let Outcome::Filtered { report, .. } = o {
        reports.insert((ji, ri), *report);
    }
}

impl LocalAgent {
    /// Makes the waiting deliveries, one child per user, after the batch's attempt marks
    /// are on disk, and records each.
    fn as_users(
        &self,
        batch: &mut [Claimed],
        pending: &mut asuser::Pending,
        marks: &mut Marks,
        reports: &mut Reports,
    ) {
        let groups = pending.take();
        if groups.is_empty() {
            return;
        }
        let ready = marks.sync().map_err(|o| match o {
            Outcome::Temp(t) | Outcome::Perm(t) => t,
            _ => "4.3.0 the attempt marks could not be synced".to_string(),
        });
        for (user, items) in groups {
            let outcomes = match &ready {
                Ok(()) => asuser::deliver(
                    &self.cfg,
                    &self.spool,
                    &self.filtering,
                    &user,
                    batch,
                    &items,
                ),
                Err(why) => items.iter().map(|_| Outcome::Temp(why.clone())).collect(),
            };
            for (it, o) in items.iter().zip(outcomes) {
                note_report(reports, it.ji, it.ri, &o);
                record(&mut batch[it.ji], it.ri, o);
            }
        }
    }
}

fn record(c: &mut Claimed, ri: usize, result: Outcome) {
    use crate::dsn::{status_of, Kind};
    let id = c.job.id.clone();
    let delay = qms_common::time::now() - c.job.arrival;
    let sender = logged_sender(&c.job.sender);
    let r = &mut c.job.recipients[ri];
    let route = r.route.clone().unwrap_or_default();
    let (state, status, reply, kind) = match result {
        Outcome::Done => (
            RcptState::Delivered,
            "sent",
            "delivered".to_string(),
            Kind::Success,
        ),
        Outcome::Found => (
            RcptState::Delivered,
            "sent",
            "delivered (found in the mailbox: an attempt cut short by a crash had made it)"
                .to_string(),
            Kind::Success,
        ),
        Outcome::Filtered { text, .. } => (RcptState::Delivered, "sent", text, Kind::Success),
        Outcome::Temp(t) => (RcptState::Deferred, "deferred", t, Kind::Delay),
        Outcome::Perm(t) => (RcptState::Failed, "bounced", t, Kind::Failure),
    };
    qlog!(
        "qid={id} from={sender} to={} relay=local route={} delay={delay} dsn={} status={status} ({})",
        logged(&r.address),
        quote(&route),
        status_of(&reply, kind),
        reply
    );
    crate::settle::count_attempt(&c.job.queue, &c.job.id, &r.address, status);
    let event = if state == RcptState::Delivered {
        "delivered"
    } else {
        state.as_str()
    };
    qms_common::track::emit(crate::settle::attempt_event(
        &c.job,
        &c.job.recipients[ri],
        event,
        &reply,
        "local",
    ));
    let r = &mut c.job.recipients[ri];
    r.state = state;
    r.reply = Some(reply);
}
