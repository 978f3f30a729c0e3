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

/// What makes one recipient's delivery the same at every attempt, so that an attempt after
/// a crash can find what the one before it delivered.
struct Attempt {
    arrival: i64,
    /// `QqidRhash`: the job and the recipient (address and route) within it.
    key: String,
    /// The job carries the attempt mark of a worker that died: look before delivering.
    recheck: bool,
}

impl Attempt {
    fn new(c: &Claimed, r: &Recipient) -> Attempt {
        // FNV-1a: stable across builds and machines, unlike std's hasher.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let route = r.route.as_deref().unwrap_or("");
        for b in r
            .address
            .to_string()
            .bytes()
            .chain([0])
            .chain(route.bytes())
        {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        Attempt {
            arrival: c.job.arrival,
            key: format!("Q{}R{:08x}", c.job.id, h as u32),
            recheck: c.interrupted()
                || r.reply
                    .as_deref()
                    .is_some_and(|t| t.starts_with(LOOK_FIRST)),
        }
    }
}

/// Where a recipient goes, as the config and aliases give it.
enum Target {
    Maildir(PathBuf),
    Mbox(PathBuf),
    Pipe(String),
}

fn target(route: &str) -> Option<Target> {
    let (kind, arg) = route.split_once(':')?;
    match kind {
        "maildir" => Some(Target::Maildir(PathBuf::from(arg))),
        "mbox" | "file" => Some(Target::Mbox(PathBuf::from(arg))),
        "pipe" => Some(Target::Pipe(arg.to_string())),
        _ => None,
    }
}

fn io_result(e: std::io::Error, what: &str) -> Outcome {
    // A full disk or quota is temporary; so is almost everything else on a local disk.
    Outcome::Temp(format!("4.3.0 {what}: {e}"))
}

/// Expansions of the recipients' original addresses, computed once per batch.
type Derived = HashMap<String, Vec<Expanded>>;

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

    /// A configured mailbox's Maildir is made when missing; any other (a system user's
    /// ~/Maildir) must exist, and its absence is a temporary failure.
    fn may_create(&self, dir: &Path) -> bool {
        self.cfg
            .mailboxes
            .values()
            .any(|m| matches!(&m.mailbox, qms_common::config::Mailbox::Maildir(p) if p == dir))
    }

    /// The target and user the config and aliases give for `r` now, or why not to deliver.
    fn check(
        &self,
        r: &Recipient,
        derived: &mut Derived,
    ) -> Result<(Target, Option<String>), Outcome> {
        let origin = r.original.as_ref().unwrap_or(&r.address);
        let expansions = derived.entry(origin.lookup_key()).or_insert_with(|| {
            let aliases = self.aliases.get();
            Expander::new(&self.cfg, &aliases).expand(origin)
        });
        let route = r.route.as_deref().unwrap_or("");
        let mut why = None;
        for e in expansions.iter().filter(|e| e.addr == r.address) {
            match &e.dest {
                Dest::Queue {
                    route: want, user, ..
                } if want == route => {
                    let t = target(route).ok_or_else(|| {
                        Outcome::Perm(format!("5.3.5 no local delivery route for {}", r.address))
                    })?;
                    return Ok((t, user.clone()));
                }
                Dest::Defer(t) => why = Some(Outcome::Temp(t.clone())),
                Dest::Fail(t) => why = why.or(Some(Outcome::Perm(t.clone()))),
                _ => {}
            }
        }
        qlog!(
            "status=warning to={} route={} reason=\"the job's route is not what the config and aliases give now; not run\"",
            r.address,
            quote(route)
        );
        Err(why.unwrap_or_else(|| {
            Outcome::Temp(format!(
                "4.3.0 the route of {} in the job is not given by the config or aliases now (changed aliases, or a job not written by qms); see the log",
                r.address
            ))
        }))
    }

    /// Stages a Maildir delivery, unless an interrupted attempt already made it.
    fn stage_maildir(
        &self,
        dir: &Path,
        at: &Attempt,
        copy: &[u8],
    ) -> std::io::Result<Option<safeio::Staged>> {
        let name = maildir::Name::new(at.arrival, &at.key, &self.cfg.hostname, copy.len());
        maildir::stage_once(dir, self.may_create(dir), &name, copy, at.recheck)
    }

    /// Delivers to `t` in this process, which already runs as `user`.
    fn deliver_here(
        &self,
        t: &Target,
        user: &Account,
        sender: &str,
        r: &Recipient,
        copy: &[u8],
        at: &Attempt,
    ) -> Outcome {
        match t {
            Target::Maildir(dir) => match self.stage_maildir(dir, at, copy) {
                Ok(None) => Outcome::Found,
                Ok(Some(s)) => match safeio::commit(std::slice::from_ref(&s)) {
                    Ok(()) => Outcome::Done,
                    Err(e) => {
                        s.abandon();
                        io_result(e, &format!("Maildir {}", dir.display()))
                    }
                },
                Err(e) => io_result(e, &format!("Maildir {}", dir.display())),
            },
            Target::Mbox(path) => {
                let entry = mbox::mbox_entry(sender, at.arrival, copy);
                let done = match at.recheck {
                    true => mbox::holds(path, &entry),
                    false => Ok(false),
                };
                match done.and_then(|found| match found {
                    true => Ok(Outcome::Found),
                    false => mbox::append(path, &entry).map(|()| Outcome::Done),
                }) {
                    Ok(o) => o,
                    Err(e) => io_result(e, &format!("mailbox {}", path.display())),
                }
            }
            Target::Pipe(cmd) => {
                if at.recheck {
                    // A command cannot be asked whether it ran: as for SMTP, a second run
                    // is better than a lost message.
                    qlog!(
                        "to={} status=warning reason=\"an attempt was interrupted by a crash; the command may run a second time\"",
                        logged(&r.address)
                    );
                }
                let a = &r.address;
                let ext = self
                    .cfg
                    .recipient_delimiter
                    .and_then(|sep| a.split_extension(sep).1)
                    .unwrap_or("");
                let original = r.original.as_ref().unwrap_or(a).to_string();
                let env = pipe::Envelope {
                    sender,
                    recipient: &a.to_string(),
                    original_recipient: &original,
                    extension: ext,
                    domain: a.domain(),
                    local: a.local(),
                };
                let timeout = Duration::from_secs(self.cfg.limits.pipe_timeout);
                match pipe::run(cmd, user, &env, copy, timeout) {
                    pipe::Outcome::Delivered => Outcome::Done,
                    pipe::Outcome::Deferred(r) => Outcome::Temp(r),
                    pipe::Outcome::Failed(r) => Outcome::Perm(r),
                }
            }
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

/// What one recipient's attempt needs from its batch.
struct Step<'a, 'b> {
    derived: &'a mut Derived,
    marks: &'a mut Marks<'b>,
    privileged: bool,
}

/// Where one recipient's attempt ended.
enum Attempted {
    /// A Maildir file staged, for the batch's commit.
    Staged(safeio::Staged),
    /// A Maildir delivery for a user, made with the batch's others for that user.
    AsUser(Account, asuser::Item),
    Done(Outcome),
}

impl LocalAgent {
    /// Checks and delivers recipient `ri` of `c`: in a child as its user, or here.
    fn attempt(
        &self,
        c: &Claimed,
        ri: usize,
        body: &Arc<Vec<u8>>,
        sender: &str,
        step: &mut Step,
    ) -> Attempted {
        let r = &c.job.recipients[ri];
        let rcpt_s = r.address.to_string();
        if crate::loops::delivered_to(body, &rcpt_s) {
            let why = format!("5.4.6 mail forwarding loop for {rcpt_s}");
            return Attempted::Done(Outcome::Perm(why));
        }
        let (t, user) = match self.check(r, step.derived) {
            Ok(x) => x,
            Err(o) => return Attempted::Done(o),
        };
        let at = Attempt::new(c, r);
        let account = match user.as_deref().map(Account::lookup) {
            Some(Ok(a)) => Some(a),
            Some(Err(e)) => {
                let why =
                    format!("4.3.5 cannot deliver to {rcpt_s}: {e} (fix the config or aliases)");
                return Attempted::Done(Outcome::Temp(why));
            }
            None => None,
        };
        // A user's Maildir, when qms may become users: with the batch's others for that
        // user, in one child (`asuser`).
        if let (Target::Maildir(dir), Some(a), true) = (&t, &account, step.privileged) {
            let plan = self.filtering.plan(&self.cfg, dir, Some(a), true);
            let message = match plan {
                Some(_) => body.clone(),
                None => Arc::new(maildir::local_copy(sender, &rcpt_s, body)),
            };
            let item = asuser::Item {
                ji: 0,
                ri,
                dir: dir.clone(),
                message,
                plan,
                create: self.may_create(dir),
                arrival: at.arrival,
                key: at.key.clone(),
                recheck: at.recheck,
            };
            return Attempted::AsUser(a.clone(), item);
        }
        let copy = maildir::local_copy(sender, &rcpt_s, body);
        if let Target::Maildir(dir) = &t {
            if let Some(plan) =
                self.filtering
                    .plan(&self.cfg, dir, account.as_ref(), step.privileged)
            {
                if let Err(o) = step.marks.sync() {
                    return Attempted::Done(o);
                }
                let d = crate::filtering::Delivery {
                    job: &c.job,
                    rcpt: r,
                    body,
                    inbox: dir,
                    key: &at.key,
                    recheck: at.recheck,
                };
                return Attempted::Done(self.filtering.deliver(&self.cfg, &self.spool, plan, &d));
            }
        }
        let outcome = match (account, &t) {
            // For a user, in a child that has become the user.
            (Some(a), _) if step.privileged => match step.marks.sync() {
                Ok(()) => runas::deliver(&a, || self.deliver_here(&t, &a, sender, r, &copy, &at)),
                Err(o) => o,
            },
            // Unprivileged, or a configured mailbox without a user: as this process.
            (_, Target::Maildir(dir)) => match self.stage_maildir(dir, &at, &copy) {
                Ok(Some(s)) => return Attempted::Staged(s),
                Ok(None) => Outcome::Found,
                Err(e) => io_result(e, &format!("Maildir {}", dir.display())),
            },
            (_, t) => match (&self.me, step.marks.sync()) {
                (_, Err(o)) => o,
                (Some(me), Ok(())) => self.deliver_here(t, me, sender, r, &copy, &at),
                (None, _) => Outcome::Temp("4.3.5 this process's uid has no account".into()),
            },
        };
        Attempted::Done(outcome)
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
        let privileged = privs::can_switch_user();
        let mut derived = Derived::new();
        // Maildir deliveries made in this process, committed together: (job, recipient, file).
        let mut staged: Vec<(usize, usize, safeio::Staged)> = Vec::new();
        // The success report of each filtered recipient, by (job, recipient).
        let mut reports = Reports::new();
        // Deliveries to be made as their users, one child per user.
        let mut pending = asuser::Pending::default();
        for ji in 0..batch.len() {
            let c = &mut batch[ji];
            let body = match self.spool.message(c) {
                Ok(b) => Arc::new(b),
                Err(e) => {
                    for r in c.job.recipients.iter_mut().filter(|r| !r.state.is_final()) {
                        r.state = RcptState::Deferred;
                        r.reply = Some(format!("4.3.0 {e}"));
                    }
                    continue;
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
                    derived: &mut derived,
                    marks: &mut marks,
                    privileged,
                };
                match self.attempt(c, ri, &body, &sender, &mut step) {
                    Attempted::Staged(s) => staged.push((ji, ri, s)),
                    Attempted::AsUser(user, mut item) => {
                        item.ji = ji;
                        pending.add(user, item);
                    }
                    Attempted::Done(o) => {
                        note_report(&mut reports, ji, ri, &o);
                        record(c, ri, o)
                    }
                }
            }
            if pending.full() {
                self.as_users(&mut batch, &mut pending, &mut marks, &mut reports);
            }
        }
        self.as_users(&mut batch, &mut pending, &mut marks, &mut reports);
        if !staged.is_empty() {
            let err = self.commit_staged(&staged, &mut marks);
            for (ji, ri, s) in staged {
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
                reports
                    .get(&(ji, ri))
                    .copied()
                    .unwrap_or(Some(crate::dsn::Kind::Success))
            };
            settle::report_deliveries(&self.cfg, &self.spool, &c.job, &kind);
        }
        settle::settle_all(&self.cfg, &self.spool, batch);
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
