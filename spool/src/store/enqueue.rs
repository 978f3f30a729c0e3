//! Writing new mail into the spool: a message written as it arrives (into `msg/`, or into
//! its one-file job beside an output queue's jobs), staged with its job, and committed:
//! synced and renamed into place, many at a time.

use super::*;

impl Spool {
    /// Starts a new message file in `msg/` for `queue`: the exclusive create (or a free file
    /// renamed into place) claims the id. What is written goes through a buffer, so a
    /// message of any size is written as it arrives; [`Spool::stage_written`] ends it.
    /// For an output queue, the message is written into its job's own file instead, beside
    /// the queue's jobs (see `inline`), after room for the job that `draft` (the job as
    /// known so far) will become; the id is then claimed when the job is renamed into
    /// place, which never replaces a file.
    pub fn writer(&self, draft: &Job) -> Result<Writer> {
        let queue = draft.queue.as_str();
        if queue != "incoming" {
            return self.inline_writer(queue, inline::room(draft));
        }
        for _ in 0..8 {
            let id = QueueId::generate();
            let body_name = format!("{id}.{queue}");
            let path = self.root.join("msg").join(&body_name);
            let file = match self.pool(&path).create(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_err("create", &path)(e)),
            };
            // The pool hands it over locked, and it stays locked while the message is
            // written, so start-up clean-up can tell debris from work.
            return Ok(Writer {
                id,
                body_name,
                out: std::io::BufWriter::with_capacity(WRITE_BUFFER, file),
                path,
                size: 0,
                at: 0,
                crc: crc32fast::Hasher::new(),
                queue: queue.to_string(),
                in_place: false,
            });
        }
        Err(SpoolError::Io {
            what: "find a free queue id in".into(),
            path: self.root.join("msg"),
            err: io::Error::other("ids collide"),
        })
    }

    /// Ends a message written with [`Spool::writer`] and stages its job (invisible until
    /// [`Spool::commit`]). On an error the message file is removed.
    pub fn stage_written(&self, mut job: Job, w: Writer) -> Result<Staged> {
        if w.at > 0 {
            return self.stage_inline(job, w);
        }
        let Writer {
            id,
            body_name,
            out,
            path,
            size,
            ..
        } = w;
        let file = match out.into_inner() {
            Ok(f) => f,
            Err(e) => {
                let _ = fs::remove_file(&path);
                return Err(io_err("write", &path)(e.into_error()));
            }
        };
        job.id = id.clone();
        job.body = body_name;
        job.size = size;
        match self.stage_job(&job) {
            Ok(staged) => Ok(Staged {
                id,
                body: Some((file, path)),
                inline: false,
                in_place: false,
                job: staged,
            }),
            Err(e) => {
                let _ = fs::remove_file(&path);
                Err(e)
            }
        }
    }

    /// Names a message being written for another queue than the one it was started for
    /// (`msg/ID.QUEUE`): smtpd's direct route, when the router must see the message after all.
    /// A one-file message is copied to a message file of its own (the router links it).
    pub fn refile(&self, w: &mut Writer, queue: &str) -> Result<()> {
        use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};
        if w.at > 0 {
            return self.refile_inline(w, queue);
        }
        let body_name = format!("{}.{queue}", w.id);
        let path = self.root.join("msg").join(&body_name);
        renameat2(
            AT_FDCWD,
            &w.path,
            AT_FDCWD,
            &path,
            RenameFlags::RENAME_NOREPLACE,
        )
        .map_err(|e| io_err("rename", &path)(io::Error::from(e)))?;
        w.body_name = body_name;
        w.path = path;
        Ok(())
    }

    /// Drops a message being written.
    pub fn discard(&self, w: Writer) {
        let _ = fs::remove_file(&w.path);
    }

    /// Writes a new message and its job into `tmp/` and `msg/`, without syncing. The id is
    /// claimed by the exclusive create of the message file; the job is invisible until
    /// [`Spool::commit`].
    /// `message` builds the bytes from the id (a Received: header names it).
    pub fn stage(&self, job: Job, message: &dyn Fn(&QueueId) -> Vec<u8>) -> Result<Staged> {
        let mut w = self.writer(&job)?;
        let body = message(&w.id);
        if let Err(e) = std::io::Write::write_all(&mut w, &body) {
            let path = w.path.clone();
            self.discard(w);
            return Err(io_err("write", &path)(e));
        }
        self.stage_written(job, w)
    }

    fn stage_job(&self, job: &Job) -> Result<safeio::Staged> {
        self.stage_job_at(job, self.job_path("queue", &job.queue, &job.id))
    }

    /// Makes staged messages durable and visible: one data sync for the batch, the renames,
    /// and one fsync per directory; or, for a batch of one-file jobs only, the renames and
    /// then one `syncfs` (see [`Spool::commit_sealed`]). Only after this returns may a
    /// message be acknowledged, each by its own result (a one-file job can lose its id to
    /// another process's).
    pub fn commit(&self, batch: Vec<Staged>) -> Result<Vec<Result<QueueId>>> {
        if !batch.is_empty() && batch.iter().all(|s| s.inline) {
            return self.commit_sealed(batch);
        }
        let files: Vec<&File> = batch
            .iter()
            .flat_map(|s| {
                s.body
                    .iter()
                    .map(|(f, _)| f)
                    .chain(std::iter::once(s.job.file()))
            })
            .collect();
        let res = safeio::sync_data(files.into_iter())
            // A syncfs made the new message files' directory entries durable too.
            .and_then(|whole_fs| {
                if whole_fs || batch.iter().all(|s| s.inline) {
                    Ok(())
                } else {
                    safeio::sync_dir(&self.root.join("msg"))
                }
            })
            .map_err(io_err("sync", &self.root));
        if let Err(e) = res {
            self.abandon(batch);
            return Err(e);
        }
        let mut jobs = Vec::with_capacity(batch.len());
        let mut ids = Vec::with_capacity(batch.len());
        let mut in_place = Vec::with_capacity(batch.len());
        for s in batch {
            ids.push(s.id);
            jobs.push(s.job);
            in_place.push(s.in_place);
        }
        // The data is on disk: make the jobs visible (renames, then one fsync per directory).
        // A new job is unlocked first, so the worker woken by the rename can claim it at once;
        // one whose file was taken from the pool where it lay, right after (under its free
        // name, unlocked, the emptier or another taker could take it back).
        let mut placed = Vec::with_capacity(jobs.len());
        let mut dests = Vec::with_capacity(jobs.len());
        for ((j, id), in_place) in jobs.into_iter().zip(ids).zip(in_place) {
            if !in_place {
                let _ = FileExt::unlock(j.file());
            }
            let done = j.place();
            if in_place {
                let _ = FileExt::unlock(j.file());
            }
            match done {
                Ok(()) => {
                    dests.push(j.dest().to_path_buf());
                    placed.push(Ok(id));
                }
                // A one-file job whose id another process took in that queue at the same
                // microsecond: this one is refused (the client sends it again).
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    let err = io_err("claim the queue id of", j.dest())(e);
                    j.abandon();
                    placed.push(Err(err));
                }
                Err(e) => return Err(io_err("rename", j.dest())(e)),
            }
        }
        safeio::sync_dirs(dests.iter().map(|d| d.as_path()))
            .map_err(io_err("sync", &self.root.join("queue")))?;
        Ok(placed)
    }

    /// Commits one-file jobs with one flush instead of two: each is renamed into place and
    /// unlocked (a worker woken by the rename may claim it at once), then one `syncfs`
    /// makes their files and entries durable together, before any is acknowledged. A
    /// machine crash before the sync can leave a job visible but torn; it carries a checksum
    /// (`inline::seal`), and the next start moves such a job to `corrupt/` (it was never
    /// acknowledged). A job a worker claims before the sync is whole in memory, and is
    /// delivered as it would be after it; if the sync fails, the round is refused and its
    /// jobs stay (a client that sends one again makes a duplicate, as RFC 5321 prefers).
    fn commit_sealed(&self, batch: Vec<Staged>) -> Result<Vec<Result<QueueId>>> {
        let mut results = Vec::with_capacity(batch.len());
        // Kept open until the sync: any of them names the file system to sync, and no job
        // placed can be answered without it.
        let mut placed = Vec::with_capacity(batch.len());
        for s in batch {
            match s.job.place() {
                Ok(()) => {
                    let _ = FileExt::unlock(s.job.file());
                    results.push(Ok(s.id));
                    placed.push(s.job);
                }
                // A one-file job whose id another process took in that queue at the same
                // microsecond: this one is refused (the client sends it again).
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    results.push(Err(io_err("claim the queue id of", s.job.dest())(e)));
                    s.job.abandon();
                }
                Err(e) => {
                    results.push(Err(io_err("rename", s.job.dest())(e)));
                    s.job.abandon();
                }
            }
        }
        if let Some(first) = placed.first() {
            nix::unistd::syncfs(first.file())
                .map_err(io::Error::from)
                .map_err(io_err("sync", &self.root))?;
        }
        Ok(results)
    }

    /// Drops staged messages that will not be committed.
    pub fn abandon(&self, batch: Vec<Staged>) {
        for s in batch {
            if let Some((_, path)) = s.body {
                let _ = fs::remove_file(path);
            }
            s.job.abandon();
        }
    }

    /// Stages and commits one message: the path `sendmail` takes.
    pub fn enqueue(&self, job: Job, message: &dyn Fn(&QueueId) -> Vec<u8>) -> Result<QueueId> {
        let s = self.stage(job, message)?;
        self.commit(vec![s])?.remove(0)
    }

    /// Stages a job for another queue that shares `parent`'s message file (the router's
    /// dispatch); on hold, when the child carries a quarantine. Returns `None` when that job
    /// exists already (a dispatch redone after a crash).
    /// With `message`, the child gets a message file of its own (the router rewrote the
    /// headers) instead of a link to its parent's.
    pub fn stage_child(
        &self,
        parent: &Claimed,
        child: &Job,
        message: Option<&[u8]>,
    ) -> Result<Option<Staged>> {
        let staged = self.stage_child_job(&parent.job, child, message)?;
        // Routed again after a crash: its deliveries may have been made from the first
        // routing, so the child starts as an interrupted attempt (see `attempt`).
        if let (Some(s), true) = (&staged, parent.interrupted()) {
            crate::attempt::mark_file(s.job.file()).map_err(io_err("mark", s.job.dest()))?;
        }
        Ok(staged)
    }

    fn stage_child_job(
        &self,
        parent: &Job,
        child: &Job,
        message: Option<&[u8]>,
    ) -> Result<Option<Staged>> {
        let area = if child.quarantine.is_some() {
            "hold"
        } else {
            "queue"
        };
        let dest = self.job_path(area, &child.queue, &child.id);
        // Already dispatched (a dispatch redone after a crash), and perhaps waiting since.
        if JOB_AREAS
            .iter()
            .any(|a| self.job_path(a, &child.queue, &child.id).exists())
        {
            return Ok(None);
        }
        let link = self.body_path(child);
        if let Some(data) = message {
            let write = (|| {
                use std::io::Write;
                let mut f = match self.pool(&link).create(&link) {
                    // A dispatch redone after a crash may find a part written: start again.
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => fs::OpenOptions::new()
                        .write(true)
                        .truncate(true)
                        .open(&link)?,
                    other => other?,
                };
                f.write_all(data)?;
                Ok::<File, io::Error>(f)
            })();
            let file = write.map_err(io_err("write", &link))?;
            return Ok(Some(Staged {
                id: child.id.clone(),
                body: Some((file, link)),
                inline: false,
                in_place: false,
                job: self.stage_job_at(child, dest.clone())?,
            }));
        }
        match fs::hard_link(self.body_path(parent), &link) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(SpoolError::Io {
                    what: "link".into(),
                    path: link,
                    err: e,
                })
            }
        }
        Ok(Some(Staged {
            id: child.id.clone(),
            body: None,
            inline: false,
            in_place: false,
            job: self.stage_job_at(child, dest.clone())?,
        }))
    }
}
