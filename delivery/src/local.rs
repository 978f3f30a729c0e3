//! The local delivery agent (`qms deliver --queue local` and `--queue pipe`): Maildir, mbox,
//! file and program targets. As root, each delivery runs in a child process as the
//! recipient's user; otherwise Maildir deliveries of a whole batch share one disk sync.

use crate::{maildir, mbox, pipe, settle, Agent};
use qms_common::address::show_sender;
use qms_common::log::quote;
use qms_common::{qlog, safeio, Config};
use qms_spool::{Claimed, RcptState, Spool};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub struct LocalAgent {
    cfg: Arc<Config>,
    spool: Spool,
}

enum Result_ {
    Done,
    Temp(String),
    Perm(String),
}

impl LocalAgent {
    pub fn new(cfg: Arc<Config>, spool: Spool) -> LocalAgent {
        LocalAgent { cfg, spool }
    }

    /// A configured mailbox's Maildir is made when missing; any other (a system user's
    /// ~/Maildir) must exist, and its absence is a temporary failure.
    fn may_create(&self, dir: &Path) -> bool {
        self.cfg
            .mailboxes
            .values()
            .any(|m| matches!(&m.mailbox, qms_common::config::Mailbox::Maildir(p) if p == dir))
    }
}

/// Where the router sent a recipient: `maildir:PATH`, `mbox:PATH`, `file:PATH`, `pipe:CMD`.
enum Target<'a> {
    Maildir(&'a Path),
    Mbox(&'a Path),
    Pipe(&'a str),
}

fn target(route: &str) -> Option<Target<'_>> {
    let (kind, arg) = route.split_once(':')?;
    match kind {
        "maildir" => Some(Target::Maildir(Path::new(arg))),
        "mbox" | "file" => Some(Target::Mbox(Path::new(arg))),
        "pipe" => Some(Target::Pipe(arg)),
        _ => None,
    }
}

fn io_result(e: std::io::Error, what: &str) -> Result_ {
    // A full disk or quota is temporary; so is almost everything else on a local disk.
    Result_::Temp(format!("4.3.0 {what}: {e}"))
}

impl LocalAgent {
    /// Does one delivery now, in this process (already running as the right user).
    fn deliver_one(
        &self,
        target: &Target,
        sender: &str,
        rcpt: &qms_spool::Recipient,
        copy: &[u8],
        create: bool,
    ) -> Result_ {
        match target {
            Target::Maildir(dir) => {
                if let Err(e) = maildir::ensure(dir, create && self.may_create(dir)) {
                    return io_result(e, &format!("Maildir {}", dir.display()));
                }
                match maildir::stage(dir, &self.cfg.hostname, copy) {
                    Ok(s) => match safeio::commit(std::slice::from_ref(&s)) {
                        Ok(()) => Result_::Done,
                        Err(e) => {
                            s.abandon();
                            io_result(e, &format!("Maildir {}", dir.display()))
                        }
                    },
                    Err(e) => io_result(e, &format!("Maildir {}", dir.display())),
                }
            }
            Target::Mbox(path) => match mbox::append(path, &mbox::mbox_entry(sender, copy)) {
                Ok(()) => Result_::Done,
                Err(e) => io_result(e, &format!("mailbox {}", path.display())),
            },
            Target::Pipe(cmd) => {
                let a = &rcpt.address;
                let (user, ext) = match self.cfg.recipient_delimiter {
                    Some(sep) => a.split_extension(sep),
                    None => (a.local(), None),
                };
                let env = pipe::Envelope {
                    sender,
                    recipient: &a.to_string(),
                    user: rcpt.user.as_deref().unwrap_or(user),
                    extension: ext.unwrap_or(""),
                    domain: a.domain(),
                    local: a.local(),
                };
                match pipe::run(
                    cmd,
                    &env,
                    copy,
                    Duration::from_secs(self.cfg.limits.pipe_timeout),
                ) {
                    pipe::Outcome::Delivered => Result_::Done,
                    pipe::Outcome::Deferred(r) => Result_::Temp(r),
                    pipe::Outcome::Failed(r) => Result_::Perm(r),
                }
            }
        }
    }

    /// As root: fork, become the recipient's user, deliver, report through the exit code.
    /// The refusal to use root is in `privs::become_user`.
    fn deliver_as(
        &self,
        user: &str,
        target: &Target,
        sender: &str,
        rcpt: &qms_spool::Recipient,
        copy: &[u8],
    ) -> Result_ {
        use nix::sys::wait::{waitpid, WaitStatus};
        use nix::unistd::{fork, ForkResult};
        let (rfd, wfd) = match nix::unistd::pipe() {
            Ok(p) => p,
            Err(e) => return Result_::Temp(format!("4.3.0 pipe: {e}")),
        };
        // Safety: this process is single-threaded while it delivers (workers use no threads).
        match unsafe { fork() } {
            Ok(ForkResult::Child) => {
                drop(rfd);
                let (code, text) = match qms_common::privs::become_user(user) {
                    Err(e) => (75, format!("4.3.0 cannot become {user}: {e}")),
                    Ok(()) => match self.deliver_one(target, sender, rcpt, copy, true) {
                        Result_::Done => (0, String::new()),
                        Result_::Temp(t) => (75, t),
                        Result_::Perm(t) => (1, t),
                    },
                };
                let _ = nix::unistd::write(&wfd, text.as_bytes());
                // Safety: _exit skips destructors and atexit handlers of the parent's state.
                unsafe { libc::_exit(code) }
            }
            Ok(ForkResult::Parent { child }) => {
                drop(wfd);
                let mut text = Vec::new();
                let _ = std::io::Read::read_to_end(&mut std::fs::File::from(rfd), &mut text);
                let text = String::from_utf8_lossy(&text).into_owned();
                match waitpid(child, None) {
                    Ok(WaitStatus::Exited(_, 0)) => Result_::Done,
                    Ok(WaitStatus::Exited(_, 75)) => Result_::Temp(text),
                    Ok(WaitStatus::Exited(_, _)) => Result_::Perm(text),
                    other => Result_::Temp(format!(
                        "4.3.0 delivery process ended abnormally: {other:?}"
                    )),
                }
            }
            Err(e) => Result_::Temp(format!("4.3.0 fork: {e}")),
        }
    }
}

impl Agent for LocalAgent {
    fn deliver(&mut self, mut batch: Vec<Claimed>) {
        let root = nix::unistd::getuid().is_root();
        // Maildir deliveries made in this process, committed together: (job, recipient, file).
        let mut staged: Vec<(usize, usize, safeio::Staged)> = Vec::new();
        for (ji, c) in batch.iter_mut().enumerate() {
            let body = match self.spool.read_body(&c.job) {
                Ok(b) => b,
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
                let r = &c.job.recipients[ri];
                if r.state.is_final() {
                    continue;
                }
                let rcpt_s = r.address.to_string();
                let result = if crate::loops::delivered_to(&body, &rcpt_s) {
                    Result_::Perm(format!("5.4.6 mail forwarding loop for {rcpt_s}"))
                } else {
                    let copy = maildir::local_copy(&sender, &rcpt_s, &body);
                    match r.route.as_deref().and_then(target) {
                        None => {
                            Result_::Perm(format!("5.3.5 no local delivery route for {rcpt_s}"))
                        }
                        Some(t) => match (&t, root, r.user.as_deref()) {
                            (_, true, Some(user)) => self.deliver_as(user, &t, &sender, r, &copy),
                            (_, true, None) if nix::unistd::geteuid().is_root() => {
                                Result_::Perm("5.7.1 no user to run this delivery as (set `user` in the config; root is never used)".into())
                            }
                            (Target::Maildir(dir), _, _) => match maildir::ensure(dir, self.may_create(dir))
                                .and_then(|()| maildir::stage(dir, &self.cfg.hostname, &copy))
                            {
                                Ok(s) => {
                                    staged.push((ji, ri, s));
                                    continue;
                                }
                                Err(e) => io_result(e, &format!("Maildir {}", dir.display())),
                            },
                            (t, _, _) => self.deliver_one(t, &sender, r, &copy, true),
                        },
                    }
                };
                record(c, ri, result);
            }
        }
        if !staged.is_empty() {
            let commit = safeio::sync_data(staged.iter().map(|(_, _, s)| s.file()))
                .and_then(|_| staged.iter().try_for_each(|(_, _, s)| s.place()))
                .and_then(|()| safeio::sync_dirs(staged.iter().map(|(_, _, s)| s.dest())));
            let err = commit.err().map(|e| format!("4.3.0 Maildir write: {e}"));
            for (ji, ri, s) in staged {
                let result = match &err {
                    None => Result_::Done,
                    Some(e) => {
                        s.abandon();
                        Result_::Temp(e.clone())
                    }
                };
                record(&mut batch[ji], ri, result);
            }
        }
        for c in batch {
            settle::settle(&self.cfg, &self.spool, c);
        }
    }
}

fn record(c: &mut Claimed, ri: usize, result: Result_) {
    let id = c.job.id.clone();
    let delay = qms_common::time::now() - c.job.arrival;
    let sender = show_sender(&c.job.sender);
    let r = &mut c.job.recipients[ri];
    let route = r.route.clone().unwrap_or_default();
    let (state, status, reply) = match result {
        Result_::Done => (RcptState::Delivered, "sent", "delivered".to_string()),
        Result_::Temp(t) => (RcptState::Deferred, "deferred", t),
        Result_::Perm(t) => (RcptState::Failed, "bounced", t),
    };
    qlog!(
        "qid={id} from={sender} to={} relay=local route={} delay={delay} dsn={} status={status} ({})",
        r.address,
        quote(&route),
        crate::dsn::status_of(&reply, if state == RcptState::Delivered { crate::dsn::Kind::Success } else if state == RcptState::Failed { crate::dsn::Kind::Failure } else { crate::dsn::Kind::Delay }),
        reply
    );
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
