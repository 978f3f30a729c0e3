//! Finished spool files kept for reuse instead of deleted: `.free.PID.N` in the directory
//! they served in (`msg/`, `queue/QUEUE/`).
//!
//! On ext4 without a journal, creating a file scans the inodes of its block group that were
//! freed in the last minutes (the kernel avoids handing them out again soon); under mail
//! churn that scan costs more than writing the file. So a finished job or message file is
//! renamed to a free name, and a new one is made by renaming a free one into place and
//! truncating it or writing over it, or by writing over a free one where it lies, locked,
//! and renaming it into place once written (`Pool::take_in_place`). Renames allocate no
//! inode, and within one directory they also avoid the file system's single lock for
//! renames between directories. A file that held
//! a message is emptied a second after it enters the pool unless it was taken again by then
//! (see `EMPTY_AFTER`), so nothing of a delivered message stays on disk for long (job files, a
//! block of envelope each, are written over when reused); each pool has a cap; files that held
//! credentials are deleted, never kept.

use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Files kept at most per directory; past this, finished files are deleted. Big enough that
/// a backlog delivered after a burst comes back here rather than freeing inodes (whose
/// creation later costs the scan): an empty inode costs a directory entry, the inode table
/// is there anyway.
const CAPACITY: usize = 32768;
/// The names of free files start with this; no job or message name does.
pub const PREFIX: &str = ".free.";
/// Count the directory again after this many files were put in.
const RECOUNT_EVERY: usize = 4096;
/// Names taken from one refill.
const BATCH: usize = 256;
/// Directory entries one refill looks at, at most. A refill goes on from where the last one
/// stopped (wrapping at the end), so no part of the directory is read more often than the
/// rest, and the cost of a refill does not grow with the directory: a queue that held
/// 100,000 jobs is a directory of megabytes even once empty (ext4 never shrinks one), and
/// reading it all for a few free files made new mail half as fast as on a fresh spool.
const LOOK: usize = 4 * BATCH;
/// Refill at most this often after one that found less than a batch; the wait doubles
/// while refills keep finding less, up to REFILL_MAX. Meanwhile new files are created.
const REFILL_EVERY: Duration = Duration::from_millis(200);
const REFILL_MAX: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct Refill {
    names: Vec<OsString>,
    next: Option<Instant>,
    wait: Duration,
    /// Where the last refill stopped reading the directory.
    cursor: Option<fs::ReadDir>,
}

#[derive(Debug)]
pub struct Pool {
    dir: PathBuf,
    /// Names to try, and when to read the directory again once they run out.
    names: Mutex<Refill>,
    retired: AtomicUsize,
    /// How many files the pool held at the last count.
    size: AtomicUsize,
    /// Our effective user: only files it owns are worth keeping.
    euid: u32,
}

impl Pool {
    pub fn new(dir: PathBuf) -> Pool {
        Pool {
            dir,
            names: Mutex::new(Refill {
                names: Vec::new(),
                next: None,
                wait: REFILL_EVERY,
                cursor: None,
            }),
            retired: AtomicUsize::new(0),
            size: AtomicUsize::new(0),
            euid: nix::unistd::geteuid().as_raw(),
        }
    }

    fn take_name(&self) -> Option<OsString> {
        let mut guard = self.names.lock().ok()?;
        let r = &mut *guard;
        if r.names.is_empty() && r.next.is_none_or(|t| Instant::now() >= t) {
            self.refill(r);
        }
        r.names.pop()
    }

    /// Looks at up to [`LOOK`] more entries of the directory for free names; returns how
    /// many it looked at.
    fn refill(&self, r: &mut Refill) -> usize {
        let (mut looked, mut wrapped) = (0, false);
        while r.names.len() < BATCH && looked < LOOK {
            let rd = match r.cursor.as_mut() {
                Some(rd) => rd,
                None => match fs::read_dir(&self.dir) {
                    Ok(rd) => r.cursor.insert(rd),
                    Err(_) => break,
                },
            };
            match rd.next() {
                Some(Ok(e)) => {
                    looked += 1;
                    let name = e.file_name();
                    if name.as_encoded_bytes().starts_with(PREFIX.as_bytes()) {
                        r.names.push(name);
                    }
                }
                // The end (or a read error): go on from the top, once a refill.
                _ => {
                    r.cursor = None;
                    if wrapped {
                        break;
                    }
                    wrapped = true;
                }
            }
        }
        // Processes read the same directory: take its names in different orders.
        let names = &mut r.names;
        let mut x = (u64::from(std::process::id()) << 32) | names.len() as u64 | 1;
        for i in (1..names.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            names.swap(i, (x % (i as u64 + 1)) as usize);
        }
        // A refill that found a batch may come again as soon as it is used up; one that
        // found less waits, longer each time.
        if names.len() < BATCH {
            r.next = Some(Instant::now() + r.wait);
            r.wait = (r.wait * 2).min(REFILL_MAX);
        } else {
            r.next = None;
            r.wait = REFILL_EVERY;
        }
        looked
    }

    /// An empty file at `path`, open for reading and writing and locked: a free one renamed
    /// there, or a new one. Fails with `AlreadyExists` when `path` exists (ids are claimed
    /// this way).
    pub fn create(&self, path: &Path) -> io::Result<File> {
        self.take(path, true)
    }

    /// Like [`Pool::create`], but a free file keeps what it held: the caller writes the new
    /// text whole and then cuts the file to its length (`File::set_len`) before anyone can
    /// see it. A job written over a job of about its size keeps its block, which saves the
    /// file system freeing it and allocating another.
    pub fn overwrite(&self, path: &Path) -> io::Result<File> {
        self.take(path, false)
    }

    /// A free file taken where it lies, open for reading and writing and locked, with its
    /// path: the caller writes over it and renames it into place itself, and lets go of the
    /// lock only after that rename (before it, the emptier or another taker could take the
    /// file back). This saves the rename that [`Pool::overwrite`] makes. None when the pool
    /// has no free file to give.
    pub fn take_in_place(&self) -> Option<(File, PathBuf)> {
        while let Some(name) = self.take_name() {
            let path = self.dir.join(&name);
            let f = match OpenOptions::new().read(true).write(true).open(&path) {
                Ok(f) => f,
                // Not ours to write (another user's): out of the pool.
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                    let _ = fs::remove_file(&path);
                    continue;
                }
                // Gone (taken by another process): the next one.
                Err(_) => continue,
            };
            if let Some(f) = hold_if_free(f, &path) {
                return Some((f, path));
            }
        }
        None
    }

    fn take(&self, path: &Path, truncate: bool) -> io::Result<File> {
        // Taken as every taker takes a free file: locked under its free name first (a file
        // written where it lies is held that way until its writer renames it), then renamed.
        if let Some((f, from)) = self.take_in_place() {
            match renameat2(
                AT_FDCWD,
                &from,
                AT_FDCWD,
                path,
                RenameFlags::RENAME_NOREPLACE,
            ) {
                Ok(()) if truncate => return f.set_len(0).map(|()| f),
                Ok(()) => return Ok(f),
                // `path` exists (ids are claimed this way); the free file stays free.
                Err(nix::errno::Errno::EEXIST) => return Err(io::ErrorKind::AlreadyExists.into()),
                // Not allowed here: a new file will do.
                Err(_) => {}
            }
        }
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o640)
            .open(path)?;
        fs2::FileExt::lock_exclusive(&f)?;
        Ok(f)
    }

    /// Takes `path`, a file nothing refers to any more, out of its directory: into the pool,
    /// or deleted when the pool is full. `owner` is its owner's uid, if the caller knows it.
    /// `empty`: truncate it on the way in (message files: their text must not stay on disk;
    /// a job file is emptied when it is reused).
    pub fn retire(&self, path: &Path, owner: Option<u32>, empty: bool) -> io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let owner = owner.or_else(|| fs::metadata(path).ok().map(|m| m.uid()));
        // Only files this user may write again are worth keeping.
        if owner != Some(self.euid) {
            return fs::remove_file(path);
        }
        let n = self.retired.fetch_add(1, Ordering::Relaxed);
        if n.is_multiple_of(RECOUNT_EVERY) {
            let count = fs::read_dir(&self.dir)
                .map(|rd| {
                    rd.flatten()
                        .filter(|e| {
                            e.file_name()
                                .as_encoded_bytes()
                                .starts_with(PREFIX.as_bytes())
                        })
                        .count()
                })
                .unwrap_or(0);
            self.size.store(count, Ordering::Relaxed);
        }
        if self.size.load(Ordering::Relaxed) >= CAPACITY {
            return fs::remove_file(path);
        }
        self.size.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}{}.{n}", qms_common::pid());
        let free = self.dir.join(&name);
        fs::rename(path, &free)?;
        // Emptied now, not at reuse: a delivered message's text is gone from the disk and
        // its space is free again (a crash just before leaves a free file to empty later).
        if empty {
            empty_soon(free);
        }
        // This process's next file can be this one, without reading the directory.
        if let Ok(mut guard) = self.names.lock() {
            if guard.names.len() < BATCH {
                guard.names.push(name.into());
            }
        }
        Ok(())
    }
}

/// A retired file is emptied this long after it entered the pool, if no one took it
/// meanwhile: under load a file is taken again within milliseconds and written over (a
/// block kept is a block neither freed nor allocated again, and on a file system mounted
/// with `discard` freeing one waits for the device); idle, a delivered message's text is
/// gone from the disk a second after delivery.
const EMPTY_AFTER: Duration = Duration::from_secs(1);

/// Retired files waiting for the emptier, oldest first.
struct Pending {
    files: Mutex<std::collections::VecDeque<(Instant, PathBuf)>>,
    added: std::sync::Condvar,
}

static PENDING: std::sync::OnceLock<Pending> = std::sync::OnceLock::new();

fn pending() -> &'static Pending {
    PENDING.get_or_init(|| {
        // Truncates on a thread of its own: freeing a message's blocks costs the file
        // system more than the rest of a retire, and the worker need not wait for it.
        let _ = std::thread::Builder::new()
            .name("emptier".into())
            .spawn(|| loop {
                let p = pending();
                let mut files = p.files.lock().unwrap_or_else(|e| e.into_inner());
                let Some(&(at, _)) = files.front() else {
                    drop(p.added.wait(files));
                    continue;
                };
                let wait = (at + EMPTY_AFTER).saturating_duration_since(Instant::now());
                if !wait.is_zero() {
                    drop(p.added.wait_timeout(files, wait));
                    continue;
                }
                let next = files.pop_front();
                drop(files);
                if let Some((_, path)) = next {
                    let _ = empty_if_free(&path);
                }
            });
        Pending {
            files: Mutex::new(Default::default()),
            added: std::sync::Condvar::new(),
        }
    })
}

/// Has a retired file emptied [`EMPTY_AFTER`] from now, unless it was taken by then.
fn empty_soon(path: PathBuf) {
    let p = pending();
    let mut files = p.files.lock().unwrap_or_else(|e| e.into_inner());
    files.push_back((Instant::now(), path));
    // The emptier sleeps until its oldest file is due, and a new one is due after that:
    // only an empty list leaves it waiting with no time (a wake-up a delivery cost a
    // context switch each).
    if files.len() == 1 {
        p.added.notify_one();
    }
}

/// Empties now every retired file still waiting: a role calls it as it stops, so nothing of
/// a delivered message stays in the pool after it.
pub fn empty_pending() {
    let Some(p) = PENDING.get() else {
        return;
    };
    let waiting: Vec<_> = p
        .files
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .drain(..)
        .collect();
    for (_, path) in waiting {
        let _ = empty_if_free(&path);
    }
}

/// Empties the file at `path` if it is still a free file nobody holds. A taker locks a free
/// file where it lies, checks that it is still there under that name, and keeps the lock
/// until it has renamed it away: so a file this holds locked at its free name is no one's,
/// and one locked by a taker (or gone) is left alone. Returns whether it emptied it.
pub(crate) fn empty_if_free(path: &Path) -> bool {
    OpenOptions::new()
        .write(true)
        .open(path)
        .ok()
        .and_then(|f| hold_if_free(f, path))
        .is_some_and(|f| f.set_len(0).is_ok())
}

/// `f`, opened at `path`, locked, if no one else holds it and it is still there under that
/// name once locked (a taker that opened it earlier may have renamed it into place and let
/// go since): how every taker, the emptier and start-up make a free file theirs.
fn hold_if_free(f: File, path: &Path) -> Option<File> {
    use std::os::unix::fs::MetadataExt;
    fs2::FileExt::try_lock_exclusive(&f).ok()?;
    match (f.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) if a.ino() == b.ino() && a.dev() == b.dev() => Some(f),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::fs::MetadataExt;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("qms-free-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A queue directory that held a large backlog: a refill reads a bounded part of it,
    /// and successive refills go round all of it (the old refill read the whole directory
    /// each time it found less than a batch, and new mail went half as fast).
    #[test]
    fn refills_read_a_large_directory_a_part_at_a_time_and_all_of_it_in_turn() {
        let dir = scratch("large");
        for i in 0..3 * LOOK {
            fs::write(dir.join(format!("job{i}.json")), "").unwrap();
        }
        for i in 0..5 {
            fs::write(dir.join(format!("{PREFIX}1.{i}")), "").unwrap();
        }
        let pool = Pool::new(dir.clone());
        let mut found = Vec::new();
        for _ in 0..4 {
            let mut r = pool.names.lock().unwrap();
            let looked = pool.refill(&mut r);
            assert!(looked <= LOOK, "a refill looked at {looked} entries");
            found.append(&mut r.names);
            assert!(
                r.next.is_some(),
                "a refill that found less than a batch waits"
            );
        }
        found.sort();
        found.dedup();
        assert_eq!(
            found.len(),
            5,
            "every free file is found within a round: {found:?}"
        );
        let _ = fs::remove_dir_all(&dir);
    }

    /// A small directory is read once a refill, not again and again up to the bound.
    #[test]
    fn a_refill_reads_a_small_directory_at_most_twice() {
        let dir = scratch("small");
        for i in 0..10 {
            fs::write(dir.join(format!("job{i}.json")), "").unwrap();
        }
        let pool = Pool::new(dir.clone());
        let mut r = pool.names.lock().unwrap();
        assert!(pool.refill(&mut r) <= 20);
        assert!(r.names.is_empty());
        drop(r);
        let _ = fs::remove_dir_all(&dir);
    }

    /// A file taken where it lies stays its taker's until renamed into place: no other
    /// taker (another process's pool) gets it, and the emptier leaves what is written in it.
    #[test]
    fn a_file_taken_in_place_is_nobody_elses_until_renamed() {
        let dir = scratch("inplace");
        let pool = Pool::new(dir.clone());
        let a = dir.join("a");
        pool.create(&a).unwrap().write_all(b"old message").unwrap();
        pool.retire(&a, None, true).unwrap();
        let (mut f, free) = pool.take_in_place().expect("the retired file");
        assert!(free
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(PREFIX));
        f.write_all(b"new message").unwrap();
        // Another process reading the same directory finds nothing it may take.
        let other = Pool::new(dir.clone());
        assert!(other.take_in_place().is_none());
        // The emptier's time for the retired file comes and goes: the new text stays.
        std::thread::sleep(EMPTY_AFTER + Duration::from_millis(500));
        assert_eq!(fs::read(&free).unwrap(), b"new message");
        let job = dir.join("ID.json");
        fs::rename(&free, &job).unwrap();
        drop(f);
        assert_eq!(fs::read(&job).unwrap(), b"new message");
        assert!(other.take_in_place().is_none(), "a job is not free");
        let _ = fs::remove_dir_all(&dir);
    }

    /// The backlog bench's failure: smtpd wrote a message in a free file where it lay while
    /// a worker deferring a job took the same file for the job's new version by renaming
    /// it away; smtpd's commit found its file gone ("cannot commit: No such file or
    /// directory") and refused the message. A taker that renames takes only what it could
    /// lock under the free name.
    #[test]
    fn a_file_held_where_it_lies_is_not_renamed_away_by_another_taker() {
        let dir = scratch("steal");
        let smtpd = Pool::new(dir.clone());
        let a = dir.join("a");
        smtpd.create(&a).unwrap().write_all(b"old").unwrap();
        smtpd.retire(&a, None, false).unwrap();
        let (mut f, free) = smtpd.take_in_place().expect("the retired file");
        f.write_all(b"a message being written").unwrap();
        // Another process's taker, on a thread: before the fix it renamed the file away and
        // then waited for the writer's lock.
        let (tx, rx) = std::sync::mpsc::channel();
        let (d, tmp) = (dir.clone(), dir.join(".new-version.tmp"));
        let other = std::thread::spawn(move || {
            let mut g = Pool::new(d).overwrite(&tmp).unwrap();
            g.write_all(b"a job's new version").unwrap();
            let _ = tx.send(g.metadata().unwrap().ino());
        });
        let theirs = rx.recv_timeout(Duration::from_secs(5));
        let still = free.exists() && fs::read(&free).unwrap() == b"a message being written";
        drop(f);
        let _ = other.join();
        assert!(
            still,
            "the file being written was taken from under its writer"
        );
        let ino = fs::metadata(&free).unwrap().ino();
        assert_ne!(theirs.expect("the other taker got a file at once"), ino);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_retired_file_comes_back_empty_under_its_new_name() {
        let dir = std::env::temp_dir().join(format!("qms-free-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let pool = Pool::new(dir.clone());
        let a = dir.join("a");
        pool.create(&a).unwrap().write_all(b"old job").unwrap();
        let ino = fs::metadata(&a).unwrap().ino();
        pool.retire(&a, None, true).unwrap();
        assert!(!a.exists());
        // Emptied on the way in, by the emptier thread (issue #11: the pool kept finished
        // messages' text).
        let end = std::time::Instant::now() + Duration::from_secs(10);
        for e in fs::read_dir(&dir).unwrap().flatten() {
            while e.metadata().unwrap().len() != 0 {
                assert!(
                    std::time::Instant::now() < end,
                    "{:?} still holds data",
                    e.file_name()
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let b = dir.join("b");
        let mut f = pool.create(&b).unwrap();
        assert_eq!(fs::metadata(&b).unwrap().ino(), ino, "the inode was reused");
        let mut s = String::new();
        f.read_to_string(&mut s).unwrap();
        assert_eq!(s, "", "nothing of the old file is left");
        // An existing name is never replaced.
        pool.retire(&b, None, true).unwrap();
        fs::write(&a, "live").unwrap();
        let e = pool.create(&a).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read_to_string(&a).unwrap(), "live");
        let _ = fs::remove_dir_all(&dir);
    }
}
