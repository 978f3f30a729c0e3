//! Group commit: many threads enqueue at once, one thread makes their files durable together.
//!
//! Each SMTP session stages its message and waits here; the committer takes everything staged
//! since its last round and commits it with one `syncfs` and one fsync per directory, so the
//! disk sees a few flushes per round instead of a few per message.

use crate::id::QueueId;
use crate::store::{Claimed, Spool, SpoolError, Staged};
use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use qms_common::safeio;
use std::io;

type Reply = Sender<Result<QueueId, SpoolError>>;

#[derive(Clone)]
pub struct Committer {
    tx: Sender<(Staged, Reply)>,
}

/// The most messages one round commits; bounds the latency of the last one in a round.
const MAX_BATCH: usize = 512;

impl Committer {
    pub fn start(spool: Spool) -> Committer {
        let (tx, rx) = unbounded::<(Staged, Reply)>();
        std::thread::Builder::new()
            .name("committer".into())
            .spawn(move || run(spool, rx))
            .map(|_| ())
            .unwrap_or_else(|e| panic!("cannot start the committer thread: {e}"));
        Committer { tx }
    }

    /// Commits one staged message, sharing the disk flush with whoever else is waiting.
    pub fn commit(&self, staged: Staged) -> Result<QueueId, SpoolError> {
        let (rtx, rrx) = bounded(1);
        self.tx.send((staged, rtx)).map_err(|_| gone())?;
        rrx.recv().map_err(|_| gone())?
    }
}

fn gone() -> SpoolError {
    SpoolError::Io {
        what: "commit".into(),
        path: Default::default(),
        err: io::Error::other("committer thread is gone"),
    }
}

fn run(spool: Spool, rx: Receiver<(Staged, Reply)>) {
    while let Ok(first) = rx.recv() {
        let mut round = vec![first];
        while round.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(more) => round.push(more),
                Err(_) => break,
            }
        }
        let (staged, replies): (Vec<Staged>, Vec<Reply>) = round.into_iter().unzip();
        match spool.commit(staged) {
            Ok(ids) => {
                for (id, reply) in ids.into_iter().zip(replies) {
                    let _ = reply.send(id);
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
                    let _ = reply.send(Err(SpoolError::Io {
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
            c.file = s.into_file();
            c.job.message_at = at;
            c.mode &= !crate::attempt::MARK;
            c.marked = false;
        }
        Ok(())
    }
}
