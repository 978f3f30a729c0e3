//! Group commit: many threads enqueue at once, one thread makes their files durable together.
//!
//! Each SMTP session stages its message and waits here; the committer takes everything staged
//! since its last round and commits it with one `syncfs` and one fsync per directory (or, for
//! a round of one-file jobs, with the renames first and one `syncfs` after them; see
//! `Spool::commit`), so the disk sees one or two flushes a round instead of a few a message.

use crate::id::QueueId;
use crate::store::{Claimed, Spool, SpoolError, Staged};
use qms_common::safeio;
use std::io;
use std::sync::{Arc, Condvar, Mutex, PoisonError};

#[derive(Clone)]
pub struct Committer {
    inbox: Arc<Inbox>,
}

/// What waits for the next round. The committer sleeps on it only when it is empty, and is
/// woken only then: a channel's receive spins and yields first, and a wake-up a message
/// would cost a system call each while the committer is busy anyway.
#[derive(Default)]
struct Inbox {
    state: Mutex<Waiting>,
    more: Condvar,
}

#[derive(Default)]
struct Waiting {
    staged: Vec<(Staged, Reply)>,
    asleep: bool,
    /// The committer thread has ended (it should not): commits fail at once.
    closed: bool,
}

/// Held by the committer thread: however it ends, even by a panic, what waits is answered
/// with an error and later commits fail at once, instead of waiting for no one.
struct Closing(std::sync::Weak<Inbox>);

impl Drop for Closing {
    fn drop(&mut self) {
        if let Some(inbox) = self.0.upgrade() {
            let mut w = inbox.state.lock().unwrap_or_else(PoisonError::into_inner);
            w.closed = true;
            // Dropped replies answer with an error.
            w.staged.clear();
        }
    }
}

/// The most messages one round commits; bounds the latency of the last one in a round.
const MAX_BATCH: usize = 512;

/// Where a round's result for one message goes. A session sleeps on it without spinning (a
/// channel's receive spins and yields the CPU a few times first: with a session thread per
/// client waiting on every round, that was the most of smtpd's system calls). Dropped unsent,
/// as when the committer thread dies, it answers with an error, so no session waits forever.
struct Reply(Option<Arc<Slot>>);

#[derive(Default)]
struct Slot {
    result: Mutex<Option<Result<QueueId, SpoolError>>>,
    done: Condvar,
}

impl Reply {
    fn send(mut self, r: Result<QueueId, SpoolError>) {
        if let Some(slot) = self.0.take() {
            slot.put(r);
        }
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if let Some(slot) = self.0.take() {
            slot.put(Err(gone()));
        }
    }
}

impl Slot {
    fn put(&self, r: Result<QueueId, SpoolError>) {
        *self.result.lock().unwrap_or_else(PoisonError::into_inner) = Some(r);
        self.done.notify_one();
    }

    fn wait(&self) -> Result<QueueId, SpoolError> {
        let mut slot = self.result.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(r) = slot.take() {
                return r;
            }
            slot = self.done.wait(slot).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

impl Committer {
    pub fn start(spool: Spool) -> Committer {
        let inbox = Arc::new(Inbox::default());
        let theirs = Arc::downgrade(&inbox);
        std::thread::Builder::new()
            .name("committer".into())
            .spawn(move || run(spool, theirs))
            .map(|_| ())
            .unwrap_or_else(|e| panic!("cannot start the committer thread: {e}"));
        Committer { inbox }
    }

    /// Commits one staged message, sharing the disk flush with whoever else is waiting.
    pub fn commit(&self, staged: Staged) -> Result<QueueId, SpoolError> {
        let slot = Arc::new(Slot::default());
        {
            let mut w = self
                .inbox
                .state
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if w.closed {
                return Err(gone());
            }
            w.staged.push((staged, Reply(Some(slot.clone()))));
            if w.asleep {
                self.inbox.more.notify_one();
            }
        }
        slot.wait()
    }
}

fn gone() -> SpoolError {
    SpoolError::Io {
        what: "commit".into(),
        path: Default::default(),
        err: io::Error::other("committer thread is gone"),
    }
}

/// Takes what waits, up to a round's worth; None once every `Committer` is gone.
fn next_round(inbox: &std::sync::Weak<Inbox>) -> Option<Vec<(Staged, Reply)>> {
    loop {
        let inbox = inbox.upgrade()?;
        let mut w = inbox.state.lock().unwrap_or_else(PoisonError::into_inner);
        if !w.staged.is_empty() {
            let n = w.staged.len().min(MAX_BATCH);
            return Some(w.staged.drain(..n).collect());
        }
        w.asleep = true;
        // Woken by a commit; the timeout only notices that the committers are gone.
        let (mut w, _) = inbox
            .more
            .wait_timeout(w, std::time::Duration::from_secs(1))
            .unwrap_or_else(PoisonError::into_inner);
        w.asleep = false;
    }
}

fn run(spool: Spool, inbox: std::sync::Weak<Inbox>) {
    let _closing = Closing(inbox.clone());
    while let Some(round) = next_round(&inbox) {
        let (staged, replies): (Vec<Staged>, Vec<Reply>) = round.into_iter().unzip();
        match spool.commit(staged) {
            Ok(ids) => {
                for (id, reply) in ids.into_iter().zip(replies) {
                    reply.send(id);
                }
            }
            Err(e) => {
                let (kind, text) = match &e {
                    SpoolError::Io { err, .. } => (err.kind(), e.to_string()),
                    other => (io::ErrorKind::Other, other.to_string()),
                };
                let raw = match &e {
                    SpoolError::Io { err, .. } => err.raw_os_error(),
                    _ => None,
                };
                for reply in replies {
                    let err = match raw {
                        Some(code) => io::Error::from_raw_os_error(code),
                        None => io::Error::new(kind, text.clone()),
                    };
                    reply.send(Err(SpoolError::Io {
                        what: "commit".into(),
                        path: spool.root().to_path_buf(),
                        err,
                    }));
                }
            }
        }
    }
}

impl Spool {
    /// Writes the new state of many claimed jobs, keeping the claims: as [`Spool::update`],
    /// with one sync for them all (a worker that defers a batch to a dead host writes it in
    /// one go, not one flush a job).
    pub fn update_many(&self, jobs: &mut [Claimed]) -> Result<(), SpoolError> {
        self.park(jobs)?;
        let mut staged = Vec::with_capacity(jobs.len());
        for c in jobs.iter() {
            match self.stage_update(c) {
                Ok(s) => staged.push(s),
                Err(e) => {
                    staged
                        .into_iter()
                        .for_each(|(s, _): (safeio::Staged, u64)| s.abandon());
                    return Err(e);
                }
            }
        }
        let (staged, at): (Vec<safeio::Staged>, Vec<u64>) = staged.into_iter().unzip();
        if let Err(err) = safeio::commit(&staged) {
            // Some may be in place (whole files); the rest are dropped and tried again.
            staged.into_iter().for_each(safeio::Staged::abandon);
            return Err(SpoolError::Io {
                what: "write jobs in".into(),
                path: self.root().to_path_buf(),
                err,
            });
        }
        for ((c, s), at) in jobs.iter_mut().zip(staged).zip(at) {
            c.rewritten(s, at);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Once the committer thread has ended, a session waiting for its round and one that
    /// comes later both get an error, instead of waiting for no one.
    #[test]
    fn commits_fail_at_once_when_the_committer_is_gone() {
        let inbox = Arc::new(Inbox::default());
        let committer = Committer {
            inbox: inbox.clone(),
        };
        let slot = Arc::new(Slot::default());
        inbox
            .state
            .lock()
            .unwrap()
            .staged
            .push((staged_nothing(), Reply(Some(slot.clone()))));
        drop(Closing(Arc::downgrade(&inbox)));
        assert!(slot.wait().is_err(), "the waiting session is answered");
        assert!(inbox.state.lock().unwrap().closed);
        assert!(committer.commit(staged_nothing()).is_err());
        let _ = std::fs::remove_dir_all(scratch());
    }

    fn scratch() -> std::path::PathBuf {
        std::env::temp_dir().join(format!("qms-commit-{}", std::process::id()))
    }

    /// A staged message with no files: enough for the inbox.
    fn staged_nothing() -> Staged {
        let dir = scratch();
        let _ = std::fs::create_dir_all(&dir);
        let tmp = dir.join("job");
        let file = std::fs::File::create(&tmp).unwrap();
        Staged {
            id: QueueId::generate(),
            body: None,
            inline: true,
            in_place: false,
            job: safeio::Staged::new_at(file, tmp, dir.join("dest")),
        }
    }
}
