//! Durable file writes: write under a temporary name, fsync, rename into place, fsync the
//! directory. A reader sees either the old file or the whole new one, never a part, and a
//! write that returned survives a crash.
//!
//! Writes can be batched: [`commit`] makes many staged files durable with one `syncfs` and
//! one fsync per directory, which is how concurrent SMTP sessions share the cost of the disk.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};

/// A file written under its temporary name, waiting for [`commit`].
pub struct Staged {
    file: File,
    tmp: PathBuf,
    dest: PathBuf,
    /// The rename must not replace a file at `dest` (a new name being claimed).
    new_only: bool,
}

impl Staged {
    /// A file the caller wrote at `tmp` itself, to be renamed over `dest` by [`commit`].
    pub fn replacing(file: File, tmp: PathBuf, dest: PathBuf) -> Staged {
        Staged {
            file,
            tmp,
            dest,
            new_only: false,
        }
    }

    /// A file the caller wrote at `tmp` itself, to be renamed to `dest` (which must not
    /// exist then) by [`commit`].
    pub fn new_at(file: File, tmp: PathBuf, dest: PathBuf) -> Staged {
        Staged {
            file,
            tmp,
            dest,
            new_only: true,
        }
    }

    /// The open file: callers lock it before commit so the new file is never seen unlocked.
    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Gives up the file after commit, keeping it open (and any lock on it held).
    pub fn into_file(self) -> File {
        self.file
    }

    /// Renames the file into place (after its data was synced); the directory is not synced.
    pub fn place(&self) -> io::Result<()> {
        if self.new_only {
            use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};
            let (from, to) = (&self.tmp, &self.dest);
            return renameat2(AT_FDCWD, from, AT_FDCWD, to, RenameFlags::RENAME_NOREPLACE)
                .map_err(io::Error::from);
        }
        std::fs::rename(&self.tmp, &self.dest)
    }

    /// Removes the temporary file of a staged write that will not be committed.
    pub fn abandon(self) {
        let _ = std::fs::remove_file(&self.tmp);
    }
}

/// Where a test wants a commit to fail, to prove that nothing half-done is left visible.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Fault {
    None = 0,
    BeforeSync = 1,
    BeforeRename = 2,
}

static FAULT: AtomicU8 = AtomicU8::new(0);

/// Injects a failure into every following commit of this process (tests only).
pub fn inject_fault(f: Fault) {
    FAULT.store(f as u8, Ordering::SeqCst);
}

fn fault(at: Fault) -> io::Result<()> {
    if FAULT.load(Ordering::Relaxed) == at as u8 {
        return Err(io::Error::other(format!("injected fault {at:?}")));
    }
    Ok(())
}

/// Creates `tmp` exclusively and writes `data` into it; nothing is synced yet.
pub fn stage(tmp: PathBuf, dest: PathBuf, data: &[u8]) -> io::Result<Staged> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o640)
        .open(&tmp)?;
    stage_file(file, tmp, dest, data)
}

/// Like [`stage`], for an empty file the caller made at `tmp`.
pub fn stage_file(mut file: File, tmp: PathBuf, dest: PathBuf, data: &[u8]) -> io::Result<Staged> {
    if let Err(e) = file.write_all(data) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(Staged {
        file,
        tmp,
        dest,
        new_only: false,
    })
}

/// Makes every staged file durable and moves it into place. On error no file of the batch
/// has been renamed unless the failure came after the sync (then the caller must assume
/// some are in place; they are whole files either way).
pub fn commit(batch: &[Staged]) -> io::Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    fault(Fault::BeforeSync)?;
    sync_data(batch.iter().map(|s| &s.file))?;
    fault(Fault::BeforeRename)?;
    for s in batch {
        s.place()?;
    }
    sync_dirs(batch.iter().map(|s| s.dest.as_path()))
}

/// Writes one file durably: the simple case of [`stage`] and [`commit`].
pub fn write_atomic(tmp: PathBuf, dest: PathBuf, data: &[u8]) -> io::Result<()> {
    let s = stage(tmp, dest, data)?;
    match commit(std::slice::from_ref(&s)) {
        Ok(()) => Ok(()),
        Err(e) => {
            s.abandon();
            Err(e)
        }
    }
}

/// Flushes the given files: one fsync for one file, a `syncfs` for many (one journal commit
/// for the whole batch instead of one per file). Returns true when it was a `syncfs`, which
/// also made every directory entry made so far durable.
pub fn sync_data<'a>(files: impl Iterator<Item = &'a File>) -> io::Result<bool> {
    let files: Vec<&File> = files.collect();
    match files.len() {
        0 => Ok(false),
        1 => files[0].sync_all().map(|()| false),
        _ => nix::unistd::syncfs(files[0])
            .map(|()| true)
            .map_err(io::Error::from),
    }
}

/// Reads an open file to its end. Unlike `read_to_end` on a `File`, it does not ask the
/// kernel for the size first: spool files are small, and those are two system calls a read.
pub fn read_all(mut file: &File) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let mut buf = vec![0u8; 8192];
    let mut len = 0;
    loop {
        if len == buf.len() {
            buf.resize(len * 2, 0);
        }
        match file.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(len);
    Ok(buf)
}

/// Reads the file at `path`, as [`read_all`].
pub fn read_path(path: &Path) -> io::Result<Vec<u8>> {
    read_all(&File::open(path)?)
}

/// Fsyncs each distinct parent directory of the given paths once.
pub fn sync_dirs<'a>(paths: impl Iterator<Item = &'a Path>) -> io::Result<()> {
    let dirs: BTreeSet<&Path> = paths.filter_map(Path::parent).collect();
    for d in dirs {
        sync_dir(d)?;
    }
    Ok(())
}

pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn injected_fault_leaves_nothing_in_place() {
        let dir = std::env::temp_dir().join(format!("qms-safeio-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        std::fs::create_dir_all(dir.join("new")).unwrap();
        write_atomic(dir.join("tmp/a"), dir.join("new/a"), b"one").unwrap();
        assert_eq!(std::fs::read(dir.join("new/a")).unwrap(), b"one");
        inject_fault(Fault::BeforeRename);
        assert!(write_atomic(dir.join("tmp/b"), dir.join("new/b"), b"two").is_err());
        inject_fault(Fault::None);
        assert!(!dir.join("new/b").exists());
        assert!(!dir.join("tmp/b").exists());
        let batch: Vec<Staged> = (0..5)
            .map(|i| {
                stage(
                    dir.join(format!("tmp/{i}")),
                    dir.join(format!("new/{i}")),
                    b"x",
                )
                .unwrap()
            })
            .collect();
        commit(&batch).unwrap();
        assert_eq!(std::fs::read_dir(dir.join("new")).unwrap().count(), 6);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
