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

fn dotlock(path: &Path) -> io::Result<DotLock> {
    let lock = PathBuf::from(format!("{}.lock", path.display()));
    let end = Instant::now() + Duration::from_secs(120);
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
                    return Err(io::Error::new(
                        io::ErrorKind::WouldBlock,
                        format!("{} is locked", path.display()),
                    ));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            // No permission to make a dotlock in the directory: rely on the kernel lock alone.
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                return Ok(DotLock(PathBuf::new()))
            }
            Err(e) => return Err(e),
        }
    }
}

/// The mbox form of a message: a `From ` line, the body with LF line ends and `>From `
/// quoting, and an empty line after it.
pub fn mbox_entry(sender: &str, local_copy: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(local_copy.len() + 100);
    let date = qms_common::time::rfc5322(qms_common::time::now());
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

/// Waits for a whole-file fcntl write lock (released when the file is closed).
fn fcntl_lock(f: &std::fs::File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // Safety: a zeroed flock is valid; the fields we need are set below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    loop {
        // Safety: F_SETLKW with a valid descriptor and a pointer to a live flock struct.
        let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLKW, &fl) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

pub fn append(path: &Path, entry: &[u8]) -> io::Result<()> {
    let _dot = dotlock(path)?;
    let mut f = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)?;
    fcntl_lock(&f)?;
    f.lock_exclusive()?;
    let start = f.seek(SeekFrom::End(0))?;
    let res = f.write_all(entry).and_then(|()| f.sync_data());
    if let Err(e) = res {
        let _ = f.set_len(start);
        let _ = f.sync_data();
        return Err(e);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_from_lines() {
        let e = mbox_entry("a@b.test", b"Subject: x\n\nFrom here\n>From there\nok\n");
        let text = String::from_utf8(e).unwrap();
        assert!(text.starts_with("From a@b.test "));
        assert!(text.contains("\n>From here\n>>From there\nok\n\n"));
    }
}
