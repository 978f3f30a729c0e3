//! mbox delivery: `From ` line, `>From ` quoting, locked with a dotlock, an fcntl lock and
//! flock (Linux keeps the two kernel locks apart, and mutt, procmail and Dovecot each use
//! some of the three), synced; a failed write is cut back so no half message stays.

use fs2::FileExt;
use std::fs::OpenOptions;
use std::io::{self, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

struct DotLock(PathBuf);

impl Drop for DotLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// How long a delivery waits for all three locks of an mbox, as Postfix's
/// `deliver_lock_attempts` × `deliver_lock_delay`: the owner of a mailbox may hold its lock
/// for ever, and must not hold the delivery agent with it.
const LOCK_WAIT: Duration = Duration::from_secs(20);

/// How often a held lock is tried again.
const LOCK_RETRY: Duration = Duration::from_millis(50);

fn locked(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::WouldBlock,
        format!("{} is locked by another process", path.display()),
    )
}

fn dotlock(path: &Path, end: Instant) -> io::Result<DotLock> {
    let lock = PathBuf::from(format!("{}.lock", path.display()));
    loop {
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&lock)
        {
            Ok(_) => return Ok(DotLock(lock)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                // A lock older than five minutes is left by a dead program (procmail's rule).
                let stale = std::fs::metadata(&lock)
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(300));
                if stale {
                    let _ = std::fs::remove_file(&lock);
                    continue;
                }
                if Instant::now() > end {
                    return Err(locked(path));
                }
                std::thread::sleep(LOCK_RETRY);
            }
            // No permission to make a dotlock in the directory: rely on the kernel lock alone.
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                return Ok(DotLock(PathBuf::new()))
            }
            Err(e) => return Err(e),
        }
    }
}

/// The mbox form of a message: a `From ` line (the date in asctime form, as mail readers
/// expect it, and the job's arrival, so every attempt writes the same bytes), the body with
/// LF line ends and `>From ` quoting, and an empty line after it.
pub fn mbox_entry(sender: &str, arrival: i64, local_copy: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(local_copy.len() + 100);
    let date = qms_common::time::asctime(arrival);
    out.extend_from_slice(
        format!(
            "From {} {date}\n",
            if sender.is_empty() {
                "MAILER-DAEMON"
            } else {
                sender
            }
        )
        .as_bytes(),
    );
    for line in local_copy.split_inclusive(|b| *b == b'\n') {
        let stripped = line
            .iter()
            .position(|b| *b != b'>')
            .map(|i| &line[i..])
            .unwrap_or(&[]);
        if stripped.starts_with(b"From ") {
            out.push(b'>');
        }
        out.extend_from_slice(line);
    }
    if !out.ends_with(b"\n") {
        out.push(b'\n');
    }
    out.push(b'\n');
    out
}

/// Takes a whole-file fcntl write lock (released when the file is closed) and an flock,
/// trying again until `end`.
fn kernel_locks(f: &std::fs::File, path: &Path, end: Instant) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // Safety: a zeroed flock is valid; the fields we need are set below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    until_taken(path, end, || {
        // Safety: F_SETLK with a valid descriptor and a pointer to a live flock struct.
        match unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLK, &fl) } {
            0 => Ok(()),
            _ => Err(io::Error::last_os_error()),
        }
    })?;
    until_taken(path, end, || f.try_lock_exclusive())
}

/// Tries `take` until it succeeds, fails for another reason than a lock held, or `end`.
fn until_taken(
    path: &Path,
    end: Instant,
    mut take: impl FnMut() -> io::Result<()>,
) -> io::Result<()> {
    loop {
        match take() {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EACCES | libc::EINTR)) => {}
            Err(e) => return Err(e),
        }
        if Instant::now() > end {
            return Err(locked(path));
        }
        std::thread::sleep(LOCK_RETRY);
    }
}

/// Opens the mailbox without waiting (a FIFO would wait for its other end) and refuses
/// anything but a regular file.
fn open_regular(path: &Path, how: &mut OpenOptions) -> io::Result<std::fs::File> {
    let not_regular = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a regular file", path.display()),
        )
    };
    let f = match how.custom_flags(libc::O_NONBLOCK).open(path) {
        Ok(f) => f,
        // A FIFO opened for writing that nobody reads.
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Err(not_regular()),
        Err(e) => return Err(e),
    };
    if !f.metadata()?.is_file() {
        return Err(not_regular());
    }
    Ok(f)
}

/// Appends `entry` to the mbox at `path` under its three locks, waiting [`LOCK_WAIT`] for
/// them at most. Anything but a regular file is refused: opening a FIFO for writing would
/// wait for a reader for ever.
pub fn append(path: &Path, entry: &[u8]) -> io::Result<()> {
    let end = Instant::now() + LOCK_WAIT;
    let _dot = dotlock(path, end)?;
    let mut f = open_regular(
        path,
        OpenOptions::new().append(true).create(true).mode(0o600),
    )?;
    kernel_locks(&f, path, end)?;
    let start = f.seek(SeekFrom::End(0))?;
    let res = f.write_all(entry).and_then(|()| f.sync_data());
    if let Err(e) = res {
        let _ = f.set_len(start);
        let _ = f.sync_data();
        return Err(e);
    }
    Ok(())
}

/// True when the mailbox holds `entry` whole, at the start of a line: an interrupted
/// attempt's append went through. Reads the whole file: for interrupted attempts only.
pub fn holds(path: &Path, entry: &[u8]) -> io::Result<bool> {
    use std::io::Read;
    let mut f = match open_regular(path, OpenOptions::new().read(true)) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    // The entry's bytes after a newline (or at the file's start), found in a window that
    // slides over the file and keeps the entry's length of overlap.
    let mut needle = Vec::with_capacity(entry.len() + 1);
    needle.push(b'\n');
    needle.extend_from_slice(entry);
    let mut window: Vec<u8> = vec![b'\n'];
    let mut chunk = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut chunk)?;
        if n == 0 {
            return Ok(false);
        }
        window.extend_from_slice(&chunk[..n]);
        if memchr::memmem::find(&window, &needle).is_some() {
            return Ok(true);
        }
        let keep = window.len().min(needle.len() - 1);
        window.drain(..window.len() - keep);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_whole_entry_only() {
        let dir = std::env::temp_dir().join(format!("qms-mbox-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mbox = dir.join("box");
        let one = mbox_entry("a@b.test", 0, b"Subject: one\n\nbody\n");
        let two = mbox_entry("a@b.test", 0, b"Subject: two\n\nbody\n");
        assert!(!holds(&mbox, &one).unwrap());
        append(&mbox, &one).unwrap();
        assert!(holds(&mbox, &one).unwrap());
        assert!(!holds(&mbox, &two).unwrap());
        append(&mbox, &two).unwrap();
        assert!(holds(&mbox, &two).unwrap());
        assert!(std::fs::read_to_string(&mbox)
            .unwrap()
            .starts_with("From a@b.test Thu Jan  1 00:00:00 1970\n"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn quotes_from_lines() {
        let e = mbox_entry("a@b.test", 0, b"Subject: x\n\nFrom here\n>From there\nok\n");
        let text = String::from_utf8(e).unwrap();
        assert!(text.starts_with("From a@b.test "));
        assert!(text.contains("\n>From here\n>>From there\nok\n\n"));
    }
}
