//! The spool directory and every operation on its files.
//!
//! ```text
//! SPOOL/tmp/                 the supervisor's status file being written
//! SPOOL/msg/ID.QUEUE         message files: one hard link per job, removed with the job
//! SPOOL/queue/QUEUE/ID.json  jobs waiting in QUEUE (incoming, local, smtp, pipe, …); a job
//!                            written straight into an output queue carries its message
//!                            after its JSON (see `inline`)
//! SPOOL/queue/QUEUE/.ID.PID.tmp  a job being written; left at start, it is debris
//! SPOOL/*/.free.PID.N        finished files kept for reuse (see `free`); never read
//! SPOOL/deferred/QUEUE/ID.json  jobs of QUEUE waiting for a later attempt, moved out of
//!                            queue/QUEUE/ by their first deferral (see `Spool::park`)
//! SPOOL/hold/QUEUE/ID.json   jobs put on hold, kept until released
//! SPOOL/corrupt/QUEUE/ID.json unreadable jobs, moved aside for a human
//! ```
//!
//! A job is claimed by an exclusive `flock` on its file. A new version of a job is written
//! beside it, locked, synced and renamed over the old one, so the job is never unlocked while
//! its worker holds it; a worker that dies drops its locks with its file descriptors.
//! Here: opening the spool and writing new mail into it; the worker's side (claim, update,
//! park, finish) is in `store/claim.rs`.

mod claim;

use crate::free::Pool;
use crate::id::QueueId;
use crate::inline;
use crate::job::Job;
use fs2::FileExt;
use qms_common::{qlog, safeio};
use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The areas where a job lives until it is finished: new (`queue/`), waiting for a later
/// attempt (`deferred/`), on hold (`hold/`); `corrupt/` is for a human.
pub const JOB_AREAS: [&str; 3] = ["queue", "deferred", "hold"];

#[derive(Debug)]
pub enum SpoolError {
    Io {
        what: String,
        path: PathBuf,
        err: io::Error,
    },
    /// The job file could not be read as a job; it was moved to `corrupt/`.
    Corrupt {
        path: PathBuf,
        reason: String,
    },
    NotFound(String),
    /// Another process holds the job.
    Busy(String),
}

impl fmt::Display for SpoolError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            SpoolError::Io { what, path, err } => {
                write!(f, "cannot {what} {}: {err}", path.display())
            }
            SpoolError::Corrupt { path, reason } => {
                write!(f, "corrupt job {}: {reason}", path.display())
            }
            SpoolError::NotFound(id) => write!(f, "no job {id} in the queue"),
            SpoolError::Busy(id) => write!(f, "job {id} is being worked on; try again"),
        }
    }
}

impl std::error::Error for SpoolError {}

impl SpoolError {
    /// True for errors that mean the disk is full or over quota (SMTP 452 rather than 451).
    pub fn is_no_space(&self) -> bool {
        matches!(self, SpoolError::Io { err, .. } if err.raw_os_error() == Some(libc::ENOSPC) || err.raw_os_error() == Some(libc::EDQUOT))
    }
}

pub(crate) fn io_err(what: &str, path: &Path) -> impl FnOnce(io::Error) -> SpoolError {
    let (what, path) = (what.to_string(), path.to_path_buf());
    move |err| SpoolError::Io { what, path, err }
}

pub(crate) type Result<T> = std::result::Result<T, SpoolError>;

/// A message being written goes through a buffer of this size. Under 64 KiB: freeing a
/// larger block makes glibc's malloc consolidate its free lists, once per message.
pub(crate) const WRITE_BUFFER: usize = 32 * 1024;

#[derive(Clone, Debug)]
pub struct Spool {
    root: PathBuf,
    /// The reuse pool of each directory files are made in (see `free`).
    pools: Arc<Mutex<HashMap<PathBuf, Arc<Pool>>>>,
}

/// A message being enqueued: its file is written and locked, its job staged in `tmp/`.
pub struct Staged {
    pub id: QueueId,
    /// The message file, for a new message; a child job reuses its parent's.
    pub(crate) body: Option<(File, PathBuf)>,
    /// The message is in the job's own file: nothing changed in `msg/`.
    pub(crate) inline: bool,
    /// The job's file was taken from the pool where it lay (see `Pool::take_in_place`): it
    /// stays locked until it is renamed into place.
    pub(crate) in_place: bool,
    pub(crate) job: safeio::Staged,
}

/// A message file being written as its text arrives (see [`Spool::writer`]).
pub struct Writer {
    pub(crate) id: QueueId,
    pub(crate) body_name: String,
    pub(crate) out: std::io::BufWriter<File>,
    pub(crate) path: PathBuf,
    pub(crate) size: u64,
    /// Where the message starts in the file: 0 for a message file under `msg/`, else the
    /// room left for its job (a one-file job being written beside its queue's jobs).
    pub(crate) at: u64,
    /// The queue whose directory the one-file job is being written in.
    pub(crate) queue: String,
    /// The file is a free one taken where it lay, at `path` (see `Pool::take_in_place`).
    pub(crate) in_place: bool,
    /// The checksum of the message as written, for a one-file job's seal.
    pub(crate) crc: crc32fast::Hasher,
}

impl Writer {
    pub fn id(&self) -> &QueueId {
        &self.id
    }

    /// The message as written so far, mapped from its file (the checks of `[auth_checks]`
    /// need it whole): its pages are the page cache's, so a session's own memory does not
    /// grow with the message.
    pub fn map(&mut self) -> std::io::Result<Mapped> {
        use std::io::Write;
        self.out.flush()?;
        Mapped::of(self.out.get_ref(), self.at, self.size)
    }

    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }
}

impl std::io::Write for Writer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.out.write(buf)?;
        self.size += n as u64;
        self.crc.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// A job this process holds the lock of.
pub struct Claimed {
    pub job: Job,
    pub(crate) file: File,
    pub(crate) path: PathBuf,
    /// The job file's mode and owner when claimed.
    pub(crate) mode: u32,
    pub(crate) uid: u32,
    /// This process set the attempt mark (see `attempt`).
    pub(crate) marked: bool,
    /// A one-file job's message, when it came whole with the job's first read.
    pub(crate) message: Option<Vec<u8>>,
}

impl Claimed {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The claim now holds the new version this process wrote in place of the old one, its
    /// message (if one-file) at `message_at`. It is a new file: no attempt mark (see
    /// `attempt`).
    pub(crate) fn rewritten(&mut self, new: safeio::Staged, message_at: u64) {
        self.file = new.into_file();
        self.job.message_at = message_at;
        self.mode &= !crate::attempt::MARK;
        self.marked = false;
        self.uid = nix::unistd::geteuid().as_raw();
    }
}

pub enum Claim {
    Got(Box<Claimed>),
    /// Another worker holds it.
    Busy,
    /// It is no longer there (finished, deleted or moved).
    Gone,
}

impl Spool {
    /// Opens the spool at `root`, creating any missing directory for the given queues.
    pub fn open(root: &Path, queues: &[String]) -> Result<Spool> {
        let spool = Spool {
            root: root.to_path_buf(),
            pools: Arc::new(Mutex::new(HashMap::new())),
        };
        for (d, _) in crate::perms::LAYOUT {
            let p = root.join(d);
            fs::create_dir_all(&p).map_err(io_err("create", &p))?;
        }
        let corrupt_drop = root.join("corrupt/maildrop");
        fs::create_dir_all(&corrupt_drop).map_err(io_err("create", &corrupt_drop))?;
        for q in queues.iter().map(String::as_str).chain(["incoming"]) {
            for area in ["queue", "deferred", "hold", "corrupt"] {
                let p = root.join(area).join(q);
                fs::create_dir_all(&p).map_err(io_err("create", &p))?;
            }
        }
        Ok(spool)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The reuse pool of the directory `path` is in.
    pub(crate) fn pool(&self, path: &Path) -> Arc<Pool> {
        let dir = path.parent().unwrap_or(&self.root).to_path_buf();
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools
            .entry(dir.clone())
            .or_insert_with(|| Arc::new(Pool::new(dir)))
            .clone()
    }

    pub fn queue_dir(&self, queue: &str) -> PathBuf {
        self.root.join("queue").join(queue)
    }

    pub(crate) fn job_path(&self, area: &str, queue: &str, id: &QueueId) -> PathBuf {
        self.root.join(area).join(queue).join(format!("{id}.json"))
    }

    pub fn body_path(&self, job: &Job) -> PathBuf {
        self.root.join("msg").join(&job.body)
    }

    /// The message of a job: its file under `msg/`, or the rest of the job's own file (in
    /// its queue or on hold). For a claimed job, [`Spool::message`] saves the opening.
    pub fn read_body(&self, job: &Job) -> Result<Vec<u8>> {
        if job.message_at == 0 {
            let p = self.body_path(job);
            return safeio::read_path(&p).map_err(io_err("read message", &p));
        }
        for area in JOB_AREAS {
            let p = self.job_path(area, &job.queue, &job.id);
            let file = match File::open(&p) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("read message", &p)(e)),
            };
            let (head, _) =
                inline::read_head(&file, inline::LOOK_READ).map_err(io_err("read message", &p))?;
            // The same job still (a finished job's file may be serving another by now).
            match inline::parse(&head) {
                Ok(j) if j.id == job.id && j.message_at == job.message_at => {
                    return inline::message(&file, j.message_at)
                        .map_err(io_err("read message", &p));
                }
                _ => continue,
            }
        }
        Err(SpoolError::NotFound(job.id.to_string()))
    }

    /// The message of a job this process holds.
    pub fn message(&self, c: &Claimed) -> Result<Vec<u8>> {
        if c.job.message_at == 0 {
            return self.read_body(&c.job);
        }
        match &c.message {
            Some(m) => Ok(m.clone()),
            None => {
                inline::message(&c.file, c.job.message_at).map_err(io_err("read message", &c.path))
            }
        }
    }

    /// The queues that have a directory, in name order.
    pub fn queues(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.root.join("queue"))
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Job ids in a queue (`queue`), hold area (`hold`) or corrupt area, sorted by arrival.
    pub fn list(&self, area: &str, queue: &str) -> Vec<QueueId> {
        let mut ids: Vec<QueueId> = fs::read_dir(self.root.join(area).join(queue))
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter_map(|n| n.strip_suffix(".json").and_then(QueueId::parse))
                    .collect()
            })
            .unwrap_or_default();
        ids.sort();
        ids
    }

    /// Reads a job without locking it: a snapshot for listings.
    pub fn load(&self, area: &str, queue: &str, id: &QueueId) -> Result<Job> {
        let p = self.job_path(area, queue, id);
        let data = File::open(&p)
            .and_then(|f| inline::read_head(&f, inline::LOOK_READ))
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => SpoolError::NotFound(id.to_string()),
                _ => SpoolError::Io {
                    what: "read".into(),
                    path: p.clone(),
                    err: e,
                },
            })?
            .0;
        match inline::parse(&data) {
            // A file reused (see `free`) between our open and read: this job is gone.
            Ok(job) if job.id != *id => Err(SpoolError::NotFound(id.to_string())),
            Ok(job) => Ok(job),
            Err(reason) => Err(SpoolError::Corrupt { path: p, reason }),
        }
    }

    // ---- enqueue -------------------------------------------------------------------------

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
        let mut placed: Option<File> = None;
        for s in batch {
            match s.job.place() {
                Ok(()) => {
                    let _ = FileExt::unlock(s.job.file());
                    results.push(Ok(s.id));
                    placed = placed.or_else(|| s.job.file().try_clone().ok());
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
        if let Some(f) = placed {
            nix::unistd::syncfs(&f)
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

    // ---- claiming and changing jobs -------------------------------------------------------
}

/// A read-only mapping of a whole file, unmapped when dropped.
pub struct Mapped {
    ptr: Option<(std::ptr::NonNull<std::ffi::c_void>, std::num::NonZeroUsize)>,
    /// Bytes of the file before the message (a one-file job's room for its JSON).
    skip: usize,
}

impl Mapped {
    /// `size` bytes from `skip` on (a reused file may hold more after them).
    fn of(f: &File, skip: u64, size: u64) -> io::Result<Mapped> {
        use nix::sys::mman::{mmap, MapFlags, ProtFlags};
        let len = f.metadata()?.len().min(skip.saturating_add(size));
        let len = usize::try_from(len).map_err(io::Error::other)?;
        let skip = usize::try_from(skip).map_err(io::Error::other)?.min(len);
        let Some(len) = std::num::NonZeroUsize::new(len) else {
            return Ok(Mapped { ptr: None, skip });
        };
        // Safety: a private read-only mapping of a file this process alone writes, which
        // nothing changes while the mapping lives (the session holds it until it answers).
        let p = unsafe { mmap(None, len, ProtFlags::PROT_READ, MapFlags::MAP_PRIVATE, f, 0) }
            .map_err(io::Error::from)?;
        Ok(Mapped {
            ptr: Some((p, len)),
            skip,
        })
    }
}

impl std::ops::Deref for Mapped {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self.ptr {
            // Safety: the mapping is `len` readable bytes for as long as `self` lives.
            Some((p, len)) => unsafe {
                &std::slice::from_raw_parts(p.as_ptr() as *const u8, len.get())[self.skip..]
            },
            None => &[],
        }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        if let Some((p, len)) = self.ptr.take() {
            // Safety: the mapping made in `of`, unmapped once.
            let _ = unsafe { nix::sys::mman::munmap(p, len.get()) };
        }
    }
}
