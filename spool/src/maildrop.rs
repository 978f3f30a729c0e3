//! The drop directory, `SPOOL/maildrop/`: how mail from local users gets in.
//!
//! `qms-postdrop` (set-group-id qms, run by `sendmail` as the user) writes one file per
//! message: a first line of JSON with the `sendmail` arguments, then the message as the user
//! gave it. The file belongs to the user, which is how `pickup` knows who sent it; nothing
//! inside the file is believed beyond that. `pickup` (the qms user) reads each file as
//! untrusted input, enqueues it as qms's own files and removes it.
//!
//! ```text
//! SPOOL/maildrop/.ID.tmp   being written by qms-postdrop (debris when old)
//! SPOOL/maildrop/ID        complete, synced, waiting for pickup
//! ```

use crate::id::QueueId;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Room for the argument line on top of the message size limit.
pub const HEADER_ROOM: u64 = 64 * 1024;

/// The first line of a drop file.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct DropHeader {
    /// The `sendmail` arguments (never -C: pickup uses the system config).
    pub args: Vec<String>,
}

impl DropHeader {
    /// The header as the first line of a drop file, newline included.
    pub fn line(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec());
        v.push(b'\n');
        v
    }
}

#[derive(Debug)]
pub enum DropError {
    TooLarge(u64),
    Io(String),
}

impl std::fmt::Display for DropError {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            DropError::TooLarge(n) => write!(f, "message too large (the limit is {n} bytes)"),
            DropError::Io(e) => f.write_str(e),
        }
    }
}

pub fn dir(spool_root: &Path) -> PathBuf {
    spool_root.join("maildrop")
}

/// Copies `input` into a new drop file, at most `limit` bytes of message after the argument
/// line; synced and renamed into place before it returns. Used by `qms-postdrop`.
pub fn write(spool_root: &Path, input: &mut dyn Read, limit: u64) -> Result<QueueId, DropError> {
    let dir = dir(spool_root);
    let io_err = |what: &str, p: &Path, e: io::Error| {
        DropError::Io(format!("cannot {what} {}: {e}", p.display()))
    };
    for _ in 0..8 {
        let id = QueueId::generate();
        let tmp = dir.join(format!(".{id}.tmp"));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o640)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp);
        let mut file = match file {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err("create", &tmp, e)),
        };
        let copied = copy_limited(input, &mut file, limit + HEADER_ROOM);
        let done = copied.and_then(|()| file.sync_all().map_err(|e| io_err("sync", &tmp, e)));
        let dest = dir.join(id.as_str());
        // The directory cannot be opened to fsync it (it is not readable by the group that
        // writes it): syncfs through the file makes the rename durable instead.
        let done = done
            .and_then(|()| std::fs::rename(&tmp, &dest).map_err(|e| io_err("rename", &tmp, e)))
            .and_then(|()| syncfs(&file).map_err(|e| io_err("sync", &dir, e)));
        if let Err(e) = done {
            let _ = std::fs::remove_file(&tmp);
            return Err(match e {
                DropError::TooLarge(_) => DropError::TooLarge(limit),
                e => e,
            });
        }
        return Ok(id);
    }
    Err(DropError::Io(
        "cannot find a free name in the drop directory".into(),
    ))
}

fn copy_limited(input: &mut dyn Read, out: &mut File, limit: u64) -> Result<(), DropError> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(DropError::Io(format!("cannot read the message: {e}"))),
        };
        total += n as u64;
        if total > limit {
            return Err(DropError::TooLarge(limit));
        }
        out.write_all(&buf[..n])
            .map_err(|e| DropError::Io(format!("cannot write the drop file: {e}")))?;
    }
}

/// A drop file as `pickup` finds it.
pub struct Dropped {
    /// The file's owner: the user who ran `sendmail`. The only thing believed.
    pub uid: u32,
    pub header: DropHeader,
    pub message: Vec<u8>,
}

/// Reads a drop file without following links; refuses anything but a plain file with one
/// link and at most `limit` bytes of message.
pub fn read(path: &Path, limit: u64) -> Result<Dropped, String> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("cannot open: {e}"))?;
    let meta = file.metadata().map_err(|e| format!("cannot stat: {e}"))?;
    if !meta.file_type().is_file() || meta.nlink() != 1 {
        return Err("not a plain file with one link".into());
    }
    if meta.len() > limit + HEADER_ROOM {
        return Err(format!(
            "larger than the message size limit ({limit} bytes)"
        ));
    }
    let mut data = Vec::with_capacity(meta.len() as usize);
    (&file)
        .take(limit + HEADER_ROOM + 1)
        .read_to_end(&mut data)
        .map_err(|e| format!("cannot read: {e}"))?;
    let nl = data
        .iter()
        .position(|b| *b == b'\n')
        .ok_or("no argument line")?;
    let header: DropHeader =
        serde_json::from_slice(&data[..nl]).map_err(|e| format!("bad argument line: {e}"))?;
    if header.args.len() > 10_000 {
        return Err("too many arguments".into());
    }
    data.drain(..=nl);
    Ok(Dropped {
        uid: meta.uid(),
        header,
        message: data,
    })
}

fn syncfs(file: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // Safety: syncfs on a descriptor this function borrows.
    if unsafe { libc::syncfs(file.as_raw_fd()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
