//! The owners and modes of the spool, as docs/security.md lists them, and the one routine
//! that creates and fixes them (`qms set-permissions`, and `qms start` as root).
//!
//! The walk never follows a symbolic link and never leaves the spool's file system: every
//! entry is opened relative to its directory's descriptor with `O_NOFOLLOW`, checked with
//! `fstat` on that descriptor, and changed through it (`fchown`, `fchmod`), so a link or a
//! file swapped in between cannot redirect a change.

use nix::fcntl::AtFlags;
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::{fchmod, fstat, fstatat, mkdirat, FileStat, Mode, SFlag};
use nix::unistd::{fchown, Gid, Uid};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

/// The drop directory: group-writable so `qms-postdrop` (set-group-id qms) can create files,
/// sticky so no one removes another's, and not group-readable or listable.
pub const MAILDROP_MODE: u32 = 0o1730;
/// The spool's top: others may pass through it to `public/` and nothing else.
pub const ROOT_MODE: u32 = 0o711;
/// `public/`: the `showq` socket, for `mailq` run by anyone.
pub const PUBLIC_MODE: u32 = 0o711;
/// Every other directory: the qms user alone.
pub const PRIVATE_MODE: u32 = 0o700;

/// The top-level directories and their modes.
pub const LAYOUT: [(&str, u32); 11] = [
    ("tmp", PRIVATE_MODE),
    ("msg", PRIVATE_MODE),
    ("queue", PRIVATE_MODE),
    // Jobs waiting for a later attempt, out of the way of new mail.
    ("deferred", PRIVATE_MODE),
    ("hold", PRIVATE_MODE),
    ("corrupt", PRIVATE_MODE),
    ("run", PRIVATE_MODE),
    ("track", PRIVATE_MODE),
    // MTA-STS policies and TLS report counts.
    ("tls", PRIVATE_MODE),
    ("maildrop", MAILDROP_MODE),
    ("public", PUBLIC_MODE),
];

/// What a fix did, for the command's report.
#[derive(Default, Debug)]
pub struct Report {
    pub created: usize,
    pub changed: usize,
    /// Symbolic links, devices, sockets of others, other file systems: left alone.
    pub skipped: Vec<String>,
}

fn io(what: &str, path: &Path) -> impl Fn(nix::Error) -> String {
    let (what, path) = (what.to_string(), path.display().to_string());
    move |e| format!("cannot {what} {path}: {e}")
}

fn open_dir_at(dir: &impl AsFd, name: &str, path: &Path) -> Result<OwnedFd, String> {
    openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(io("open", path))
}

/// Sets owner and mode through the descriptor when they differ.
fn fix(
    fd: &OwnedFd,
    st: &FileStat,
    uid: Uid,
    gid: Gid,
    mode: u32,
    r: &mut Report,
) -> Result<(), String> {
    let mut changed = false;
    if st.st_uid != uid.as_raw() || st.st_gid != gid.as_raw() {
        fchown(fd, Some(uid), Some(gid)).map_err(|e| format!("fchown: {e}"))?;
        changed = true;
    }
    // chown clears set-id bits, so the mode is set after it.
    if changed || st.st_mode & 0o7777 != mode {
        fchmod(fd, Mode::from_bits_truncate(mode)).map_err(|e| format!("fchmod: {e}"))?;
        changed = true;
    }
    if changed {
        r.changed += 1;
    }
    Ok(())
}

/// Creates (when missing) and fixes the spool at `root` for `uid:gid`. Must run as root.
pub fn fix_spool(root: &Path, queues: &[String], uid: Uid, gid: Gid) -> Result<Report, String> {
    let mut r = Report::default();
    if let Some(parent) = root.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    match nix::unistd::mkdir(root, Mode::from_bits_truncate(ROOT_MODE)) {
        Ok(()) => r.created += 1,
        Err(nix::Error::EEXIST) => {}
        Err(e) => return Err(format!("cannot create {}: {e}", root.display())),
    }
    let top = nix::fcntl::open(
        root,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(io("open (it must be a directory, not a link)", root))?;
    let st = fstat(&top).map_err(io("stat", root))?;
    let dev = st.st_dev;
    fix(&top, &st, uid, gid, ROOT_MODE, &mut r)?;
    for (name, mode) in LAYOUT {
        let path = root.join(name);
        let fd = ensure_dir(&top, name, &path, &mut r)?;
        let st = fstat(&fd).map_err(io("stat", &path))?;
        if st.st_dev != dev {
            r.skipped
                .push(format!("{}: another file system", path.display()));
            continue;
        }
        fix(&fd, &st, uid, gid, mode, &mut r)?;
        match name {
            // Files in the drop directory keep their owner: it says who submitted them.
            "maildrop" | "public" => {}
            "queue" | "deferred" | "hold" | "corrupt" => {
                for q in queues.iter().map(String::as_str).chain(["incoming"]) {
                    ensure_dir(&fd, q, &path.join(q), &mut r)?;
                }
                walk(&fd, &path, dev, uid, gid, &mut r)?;
            }
            _ => walk(&fd, &path, dev, uid, gid, &mut r)?,
        }
    }
    Ok(r)
}

fn ensure_dir(
    parent: &OwnedFd,
    name: &str,
    path: &Path,
    r: &mut Report,
) -> Result<OwnedFd, String> {
    match mkdirat(parent, name, Mode::from_bits_truncate(PRIVATE_MODE)) {
        Ok(()) => r.created += 1,
        Err(nix::Error::EEXIST) => {}
        Err(e) => return Err(format!("cannot create {}: {e}", path.display())),
    }
    open_dir_at(parent, name, path)
}

/// Below a spool directory: directories 0700, regular files without group-write or any
/// bit for others, all owned by the qms user. Anything else is reported and left alone.
fn walk(
    dir: &OwnedFd,
    path: &Path,
    dev: u64,
    uid: Uid,
    gid: Gid,
    r: &mut Report,
) -> Result<(), String> {
    let names: Vec<String> = {
        let dup = nix::unistd::dup(dir).map_err(io("read", path))?;
        let mut d = nix::dir::Dir::from_fd(dup).map_err(io("read", path))?;
        d.iter()
            .flatten()
            .filter_map(|e| e.file_name().to_str().ok().map(str::to_string))
            .filter(|n| n != "." && n != "..")
            .collect()
    };
    for name in names {
        // A file already as it should be costs one stat, not an open: a queue of 100,000
        // jobs is walked at every start as root (the change, when one is due, still goes
        // through a descriptor opened without following links).
        if let Ok(st) = fstatat(dir, name.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            let regular =
                SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFREG;
            let fine = st.st_uid == uid.as_raw()
                && st.st_gid == gid.as_raw()
                && st.st_mode & 0o7777 == st.st_mode & 0o750;
            if regular && fine && st.st_dev == dev {
                continue;
            }
        }
        let p = path.join(&name);
        let fd = match openat(
            dir,
            name.as_str(),
            OFlag::O_RDONLY
                | OFlag::O_NOFOLLOW
                | OFlag::O_NONBLOCK
                | OFlag::O_NOCTTY
                | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(nix::Error::ELOOP) => {
                r.skipped.push(format!("{}: a symbolic link", p.display()));
                continue;
            }
            Err(nix::Error::ENOENT) => continue,
            Err(e) => {
                r.skipped.push(format!("{}: {e}", p.display()));
                continue;
            }
        };
        let st = fstat(&fd).map_err(io("stat", &p))?;
        if st.st_dev != dev {
            r.skipped
                .push(format!("{}: another file system", p.display()));
            continue;
        }
        let kind = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits());
        if kind == SFlag::S_IFDIR {
            fix(&fd, &st, uid, gid, PRIVATE_MODE, r)?;
            walk(&fd, &p, dev, uid, gid, r)?;
        } else if kind == SFlag::S_IFREG {
            let mode = st.st_mode & 0o750;
            fix(&fd, &st, uid, gid, mode, r)?;
        } else {
            r.skipped
                .push(format!("{}: not a file or directory", p.display()));
        }
    }
    Ok(())
}

/// Makes the drop helper `root:gid` mode 2755 (set-group-id), through a descriptor opened
/// without following links. Refuses anything but a regular file.
pub fn fix_helper(path: &Path, gid: Gid) -> Result<bool, String> {
    let fd = nix::fcntl::open(
        path,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(io("open (it must be a file, not a link)", path))?;
    let st = fstat(&fd).map_err(io("stat", path))?;
    if SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) != SFlag::S_IFREG {
        return Err(format!("{} is not a regular file", path.display()));
    }
    let mut r = Report::default();
    fix(&fd, &st, Uid::from_raw(0), gid, 0o2755, &mut r)?;
    Ok(r.changed > 0)
}

/// Removes any set-id bit from `path` (the `qms` binary itself is never set-id).
pub fn clear_setid(path: &Path) -> Result<bool, String> {
    let fd = nix::fcntl::open(
        path,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(io("open", path))?;
    let st = fstat(&fd).map_err(io("stat", path))?;
    if st.st_mode & 0o6000 == 0 {
        return Ok(false);
    }
    fchmod(&fd, Mode::from_bits_truncate(st.st_mode & 0o1777)).map_err(io("chmod", path))?;
    Ok(true)
}
