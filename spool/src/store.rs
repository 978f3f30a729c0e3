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
//! Here: opening the spool and reading it; writing new mail into it (writers, staging, the
//! commits) is in `store/enqueue.rs`, the worker's side (claim, update, park, finish) in
//! `store/claim.rs`.

mod claim;
mod enqueue;

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
