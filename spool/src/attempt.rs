//! The mark of a delivery attempt in progress: the owner's execute bit on the job file.
//!
//! A worker sets it on the jobs of a batch, durably, before it delivers anything of them. It
//! goes away with the job file: the results are recorded in a new version of the job (a new
//! file), or the job is finished. So a job claimed with the mark still on was being
//! delivered by a worker that died: some of its deliveries may have been made, and the local
//! agent looks in each mailbox before delivering again. A job the router routes again after
//! a crash passes the mark on to its output jobs. `ls -l` shows such a job as `-rwx------`.
//!
//! A mode bit costs no directory entry, no new file and no write of the job: one `fchmod`
//! a job and one `syncfs` a batch.

use crate::store::{Claimed, Spool, SpoolError};
use std::fs::{File, Permissions};
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

/// The mode bit that marks an attempt in progress.
pub(crate) const MARK: u32 = 0o100;

impl Claimed {
    /// True when the job was claimed with the attempt mark on: a worker died delivering it.
    pub fn interrupted(&self) -> bool {
        self.mode & MARK != 0
    }
}

/// Sets the mark on an open job file (not synced).
pub(crate) fn mark_file(f: &File) -> io::Result<()> {
    let mode = f.metadata()?.mode();
    f.set_permissions(Permissions::from_mode((mode | MARK) & 0o7777))
}

/// Clears the mark this process or a dead worker left on a claimed job's file.
pub(crate) fn unmark(c: &Claimed) {
    if c.marked || c.mode & MARK != 0 {
        let _ = c
            .file
            .set_permissions(Permissions::from_mode(c.mode & !MARK & 0o7777));
    }
}

impl Spool {
    /// Marks each job as being delivered (see the module comment). With `sync`, the marks
    /// are on disk when this returns (one `syncfs` of the spool); without, the caller's next
    /// sync of the spool's file system must come before any delivery it makes.
    pub fn mark_attempts<'a>(
        &self,
        jobs: impl Iterator<Item = &'a mut Claimed>,
        sync: bool,
    ) -> Result<(), SpoolError> {
        let mut any = None;
        for c in jobs {
            if c.mode & MARK == 0 && !c.marked {
                c.file
                    .set_permissions(Permissions::from_mode((c.mode | MARK) & 0o7777))
                    .map_err(|err| SpoolError::Io {
                        what: "mark".into(),
                        path: c.path().to_path_buf(),
                        err,
                    })?;
                c.marked = true;
            }
            any = Some(());
        }
        if sync && any.is_some() {
            self.sync_all()?;
        }
        Ok(())
    }

    /// Flushes the spool's whole file system (`syncfs`).
    pub fn sync_all(&self) -> Result<(), SpoolError> {
        let dir =
            File::open(self.root()).and_then(|d| nix::unistd::syncfs(&d).map_err(io::Error::from));
        dir.map_err(|err| SpoolError::Io {
            what: "sync".into(),
            path: self.root().to_path_buf(),
            err,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::{Claim, Client, Job, Recipient, Spool};

    fn claim(spool: &Spool, id: &crate::QueueId) -> Box<crate::Claimed> {
        match spool.claim("local", id).unwrap() {
            Claim::Got(c) => c,
            _ => panic!("the job cannot be claimed"),
        }
    }

    #[test]
    fn only_a_mark_left_by_another_claim_means_interrupted() {
        let root = std::env::temp_dir().join(format!("qms-attempt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let spool = Spool::open(&root, &["local".to_string()]).unwrap();
        let timing = qms_common::config::Outgoing {
            min_backoff: 60,
            max_backoff: 600,
            delay_warning: 3600,
            max_queue_lifetime: 86400,
        };
        let to = Recipient::new("a@b.test".parse().unwrap());
        let job = Job::new("local", None, vec![to], Client::default(), "smtp", &timing);
        let id = spool
            .enqueue(job, &|_| b"Subject: x\r\n\r\nx\r\n".to_vec())
            .unwrap();
        let mut c = claim(&spool, &id);
        assert!(!c.interrupted());
        spool.mark_attempts(std::iter::once(&mut *c), true).unwrap();
        // Our own mark is not an interruption: the claim that set it is still going.
        assert!(!c.interrupted());
        drop(c);
        // The worker died: the next claim finds the mark.
        let mut c = claim(&spool, &id);
        assert!(c.interrupted());
        // The results written clear it.
        spool.update(&mut c).unwrap();
        drop(c);
        assert!(!claim(&spool, &id).interrupted());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
