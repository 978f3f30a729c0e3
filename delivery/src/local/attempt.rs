//! One recipient's attempt: its route and user derived again from the config and aliases
//! (nothing in the job is believed), what an attempt cut short delivered looked for, and
//! then the delivery: a Maildir file staged for the batch's commit, a delivery handed to a
//! child as its user, or one made here.

use super::*;

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
pub(super) type Derived = HashMap<String, Vec<Expanded>>;

impl LocalAgent {
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

/// What one recipient's attempt needs from its batch.
pub(super) struct Step<'a, 'b> {
    pub(super) derived: &'a mut Derived,
    pub(super) marks: &'a mut Marks<'b>,
    pub(super) privileged: bool,
}

/// Where one recipient's attempt ended.
pub(super) enum Attempted {
    /// A Maildir file staged, for the batch's commit.
    Staged(safeio::Staged),
    /// A Maildir delivery for a user, made with the batch's others for that user.
    AsUser(Account, asuser::Item),
    Done(Outcome),
}

impl LocalAgent {
    /// Checks and delivers recipient `ri` of `c`: in a child as its user, or here.
    pub(super) fn attempt(
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
        let account = match user.as_deref().map(Account::lookup).transpose() {
            Ok(a) => a,
            Err(e) => {
                let why =
                    format!("4.3.5 cannot deliver to {rcpt_s}: {e} (fix the config or aliases)");
                return Attempted::Done(Outcome::Temp(why));
            }
        };
        // A user's Maildir, when qms may become users: with the batch's others for that
        // user, in one child (`asuser`).
        if let (Target::Maildir(dir), Some(a), true) = (&t, &account, step.privileged) {
            let mut item = self.user_item(dir, a, r, body, sender, at);
            item.ri = ri;
            return Attempted::AsUser(a.clone(), item);
        }
        let copy = maildir::local_copy(sender, &rcpt_s, body);
        if let Target::Maildir(dir) = &t {
            if let Some(plan) =
                self.filtering
                    .plan(&self.cfg, dir, account.as_ref(), step.privileged)
            {
                let d = crate::filtering::Delivery {
                    job: &c.job,
                    rcpt: r,
                    body,
                    inbox: dir,
                    key: &at.key,
                    recheck: at.recheck,
                };
                return Attempted::Done(self.filter_here(plan, &d, step.marks));
            }
        }
        let outcome = match (account, &t) {
            // For a user, in a child that has become the user.
            (Some(a), _) if step.privileged => match step.marks.sync() {
                Ok(()) => {
                    // A command's own time limit comes on top of the child's.
                    let time = runas::CHILD_TIME
                        + std::time::Duration::from_secs(self.cfg.limits.pipe_timeout);
                    runas::deliver(&a, time, || {
                        self.deliver_here(&t, &a, sender, r, &copy, &at)
                    })
                }
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

    /// A Maildir delivery for user `a`, to be made in the child of the batch's deliveries
    /// for that user; its place in the batch (`ji`, `ri`) is set by the caller.
    fn user_item(
        &self,
        dir: &Path,
        a: &Account,
        r: &Recipient,
        body: &Arc<Vec<u8>>,
        sender: &str,
        at: Attempt,
    ) -> asuser::Item {
        let plan = self.filtering.plan(&self.cfg, dir, Some(a), true);
        let message = match plan {
            Some(_) => body.clone(),
            None => Arc::new(maildir::local_copy(sender, &r.address.to_string(), body)),
        };
        asuser::Item {
            ji: 0,
            ri: 0,
            dir: dir.to_path_buf(),
            message,
            plan,
            create: self.may_create(dir),
            arrival: at.arrival,
            key: at.key,
            recheck: at.recheck,
        }
    }

    /// Runs the Sieve filter of a Maildir this process writes, once the batch's attempt
    /// marks are on disk.
    fn filter_here(
        &self,
        plan: crate::filtering::Plan,
        d: &crate::filtering::Delivery,
        marks: &mut Marks,
    ) -> Outcome {
        match marks.sync() {
            Ok(()) => self.filtering.deliver(&self.cfg, &self.spool, plan, d),
            Err(o) => o,
        }
    }
}
