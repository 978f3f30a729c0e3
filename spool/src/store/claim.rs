//! A worker's side of the spool: claiming a job (a lock on its file), writing its new state
//! beside it, moving a job that now waits to `deferred/`, and finishing it.

use super::*;

impl Spool {
    /// Takes the lock of a job in `queue` (new, or waiting in `deferred/`), if nobody else
    /// has it.
    pub fn claim(&self, queue: &str, id: &QueueId) -> Result<Claim> {
        match self.claim_in("queue", queue, id, false)? {
            Claim::Gone => self.claim_in("deferred", queue, id, false),
            other => Ok(other),
        }
    }

    /// Like [`Spool::claim`] for the tools: waits up to `wait` for a busy job.
    pub fn claim_wait(
        &self,
        area: &str,
        queue: &str,
        id: &QueueId,
        wait: std::time::Duration,
    ) -> Result<Claim> {
        let end = std::time::Instant::now() + wait;
        loop {
            match self.claim_in(area, queue, id, true)? {
                Claim::Busy if std::time::Instant::now() < end => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => return Ok(other),
            }
        }
    }

    fn claim_in(&self, area: &str, queue: &str, id: &QueueId, tool: bool) -> Result<Claim> {
        let path = self.job_path(area, queue, id);
        for _ in 0..3 {
            let file = match fs::OpenOptions::new().read(true).open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Claim::Gone),
                Err(e) => {
                    return Err(SpoolError::Io {
                        what: "open".into(),
                        path,
                        err: e,
                    })
                }
            };
            if file.try_lock_exclusive().is_err() {
                return Ok(Claim::Busy);
            }
            // The file may have been replaced or removed between open and lock.
            let (fmeta, pmeta) = (file.metadata(), fs::metadata(&path));
            let (mode, uid, len) = match (fmeta, pmeta) {
                (Ok(f), Ok(p)) if f.ino() == p.ino() && f.dev() == p.dev() => {
                    (f.mode(), f.uid(), f.len())
                }
                (_, Err(e)) if e.kind() == io::ErrorKind::NotFound => return Ok(Claim::Gone),
                _ => continue,
            };
            let (mut data, whole) = inline::read_head_of(&file, inline::CLAIM_READ, Some(len))
                .map_err(io_err("read", &path))?;
            let parsed = inline::parse(&data).and_then(|job| {
                if whole && job.message_at > data.len() as u64 {
                    return Err(format!(
                        "its message should start at byte {} of a file of {}",
                        job.message_at,
                        data.len()
                    ));
                }
                Ok(job)
            });
            return match parsed {
                Ok(job) => {
                    let at = usize::try_from(job.message_at).unwrap_or(usize::MAX);
                    let message = (job.message_at > 0 && whole && at <= data.len())
                        .then(|| data.split_off(at));
                    Ok(Claim::Got(Box::new(Claimed {
                        job,
                        file,
                        path,
                        mode,
                        uid,
                        marked: false,
                        message,
                    })))
                }
                Err(reason) if !tool || area == "queue" => {
                    let dest = self
                        .root
                        .join("corrupt")
                        .join(queue)
                        .join(path.file_name().unwrap_or_default());
                    let _ = fs::rename(&path, &dest);
                    qlog!(
                        "queue={queue} file={} status=corrupt reason={} moved_to={}",
                        path.display(),
                        qms_common::log::quote(&reason),
                        dest.display()
                    );
                    Err(SpoolError::Corrupt { path: dest, reason })
                }
                Err(reason) => Err(SpoolError::Corrupt { path, reason }),
            };
        }
        Ok(Claim::Busy)
    }

    /// Writes the claimed job's new state durably, keeping the claim.
    pub fn update(&self, c: &mut Claimed) -> Result<()> {
        self.park(std::slice::from_mut(c))?;
        let (s, at) = self.stage_update(c)?;
        if let Err(e) = safeio::commit(std::slice::from_ref(&s)) {
            s.abandon();
            return Err(SpoolError::Io {
                what: "write".into(),
                path: c.path.clone(),
                err: e,
            });
        }
        // The new file was locked before it became visible; dropping the old one unlocks it.
        c.rewritten(s, at);
        Ok(())
    }

    /// Stages the new version of a claimed job over it; a one-file job's message is copied
    /// into the new file. Returns where its message starts now (0 for a version-1 job).
    pub(crate) fn stage_update(&self, c: &Claimed) -> Result<(safeio::Staged, u64)> {
        if c.job.message_at == 0 {
            return Ok((self.stage_job_at(&c.job, c.path.clone())?, 0));
        }
        self.stage_update_inline(c)
    }

    pub(crate) fn stage_job_at(&self, job: &Job, dest: PathBuf) -> Result<safeio::Staged> {
        let data = serde_json::to_vec(job).map_err(|e| SpoolError::Io {
            what: "encode job".into(),
            path: dest.clone(),
            err: io::Error::other(e),
        })?;
        // Staged beside its destination: the rename into place stays in one directory.
        let tmp = dest.with_file_name(format!(".{}.{}.tmp", job.id, qms_common::pid()));
        let file = self
            .pool(&tmp)
            .overwrite(&tmp)
            .map_err(io_err("create", &tmp))?;
        let s =
            safeio::stage_file(file, tmp.clone(), dest, &data).map_err(io_err("write", &tmp))?;
        // What an older job left past the end of this one goes before the sync (`overwrite`).
        s.file()
            .set_len(data.len() as u64)
            .map_err(io_err("write", &tmp))?;
        self.ready(s, job)
    }

    /// The last of staging a job: its next attempt as its modification time.
    pub(crate) fn ready(&self, s: safeio::Staged, job: &Job) -> Result<safeio::Staged> {
        let path = s.dest().to_path_buf();
        // A job that waits carries its next attempt as its modification time (as Postfix's
        // deferred queue does), so a worker learns when it is due from a stat, not a read.
        if job.next_attempt > qms_common::time::now() {
            let at =
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(job.next_attempt as u64);
            s.file()
                .set_modified(at)
                .map_err(io_err("set the time of", &path))?;
        }
        // Already locked: the pool locks every file it hands out (see `free`).
        Ok(s)
    }

    /// Moves the jobs that now wait for a later attempt out of `queue/QUEUE/`, the directory
    /// new mail passes through, into `deferred/QUEUE/` (as Postfix's deferred queue): a
    /// backlog there does not make every new job's rename and directory sync dearer. Each
    /// move is one rename of the locked file, then both directories are synced, before the
    /// new state is written over it where it now lies. A job that cannot move stays.
    pub(crate) fn park(&self, jobs: &mut [Claimed]) -> Result<()> {
        let now = qms_common::time::now();
        let queue_root = self.root.join("queue");
        let mut moved = Vec::new();
        for c in jobs.iter_mut() {
            let dir = c.path.parent();
            let in_queue = dir.and_then(Path::parent) == Some(queue_root.as_path());
            let (Some(queue), Some(name)) = (dir.and_then(Path::file_name), c.path.file_name())
            else {
                continue;
            };
            if c.job.next_attempt <= now || !in_queue {
                continue;
            }
            let dest = self.root.join("deferred").join(queue).join(name);
            // Its time first, so a worker woken by the move leaves it be (see `ready`).
            let secs = std::time::Duration::from_secs(c.job.next_attempt as u64);
            let _ = c.file.set_modified(std::time::UNIX_EPOCH + secs);
            let (cwd, flags) = (
                nix::fcntl::AT_FDCWD,
                nix::fcntl::RenameFlags::RENAME_NOREPLACE,
            );
            if nix::fcntl::renameat2(cwd, &c.path, cwd, &dest, flags).is_ok() {
                let from = std::mem::replace(&mut c.path, dest.clone());
                moved.push(from);
                moved.push(dest);
            }
        }
        match moved.first() {
            Some(first) => {
                safeio::sync_dirs(moved.iter().map(PathBuf::as_path)).map_err(io_err("sync", first))
            }
            None => Ok(()),
        }
    }

    /// Removes a finished job and its link to the message file (the files go to `free/`).
    pub fn finish(&self, c: Claimed) -> Result<()> {
        // A file kept for reuse must not carry the attempt mark into its next job.
        crate::attempt::unmark(&c);
        // Out of the queue while still locked, so no worker can claim it in between.
        let done = if c.job.smarthost.is_some() {
            fs::remove_file(&c.path) // it held credentials: gone for good
        } else {
            // A one-file job held its message: emptied as it goes (see `free`).
            self.pool(&c.path)
                .retire(&c.path, Some(c.uid), c.job.message_at > 0)
        };
        done.map_err(io_err("remove", &c.path))?;
        drop(c.file);
        if c.job.message_at > 0 {
            return Ok(());
        }
        // Links are only added while the incoming job exists, so a count of one is final.
        let body = self.body_path(&c.job);
        match fs::metadata(&body) {
            Ok(m) if m.nlink() == 1 => {
                let _ = self.pool(&body).retire(&body, Some(m.uid()), true);
            }
            _ => {
                let _ = fs::remove_file(&body);
            }
        }
        Ok(())
    }

    /// Moves a claimed job between areas (`queue` ↔ `hold`), keeping its queue.
    pub fn move_to(&self, c: Claimed, area: &str) -> Result<()> {
        let dest = self.job_path(area, &c.job.queue, &c.job.id);
        fs::rename(&c.path, &dest).map_err(io_err("move", &c.path))?;
        safeio::sync_dirs([dest.as_path(), c.path.as_path()].into_iter())
            .map_err(io_err("sync", &dest))?;
        Ok(())
    }
}
