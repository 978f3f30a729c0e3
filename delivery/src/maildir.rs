//! Maildir delivery: a uniquely named file in `tmp/`, synced, renamed into `new/`. Many
//! deliveries of one batch share one sync (see `safeio::commit`).
//!
//! The unique name is the same at every attempt for one recipient of one job
//! (`ARRIVAL.QqidRhash.host,S=size`), so after a crash the agent can tell whether a delivery
//! was made: it is in `new/`, or in `cur/` with flags added by a mail reader.

use qms_common::safeio;
use std::io;
use std::path::Path;

/// Makes `tmp`, `new` and `cur` (mode 0700) when `create` is set; otherwise a missing
/// Maildir is an error for the caller to treat as temporary. Every directory made here is
/// synced into its parent, so the first delivery into a new Maildir survives a crash.
pub fn ensure(dir: &Path, create: bool) -> io::Result<()> {
    let subs = ["tmp", "new", "cur"].map(|s| dir.join(s));
    if subs.iter().all(|p| p.is_dir()) {
        return Ok(());
    }
    if !create {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("Maildir {} does not exist", dir.display()),
        ));
    }
    let mut made = Vec::new();
    make_dir(dir, &mut made)?;
    for p in &subs {
        make_dir(p, &mut made)?;
    }
    safeio::sync_dirs(made.iter().map(|p| p.as_path()))
}

/// Makes `dir` and its missing parents, noting each one made.
fn make_dir(dir: &Path, made: &mut Vec<std::path::PathBuf>) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        make_dir(parent, made)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {
            made.push(dir.to_path_buf());
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// A delivery's file name: its stable part (`ARRIVAL.UNIQUE.`) and the rest.
pub struct Name {
    stem: String,
    full: String,
}

impl Name {
    /// `unique` names the job and recipient (see `local::delivery_key`); `arrival` is the
    /// job's, so readers sort the mail by when it came.
    pub fn new(arrival: i64, unique: &str, host: &str, size: usize) -> Name {
        let stem = format!("{arrival}.{unique}.");
        let host = host.replace(['/', ':'], "_");
        let full = format!("{stem}{host},S={size}");
        Name { stem, full }
    }
}

/// Writes the message into `dir/tmp` under its name; commit moves it to `new/`, or with
/// `info` (Maildir flags such as `2,FS`) to `cur/` as a reader would have put it. The part
/// written by an attempt that a crash cut short is replaced.
pub fn stage(dir: &Path, name: &Name, message: &[u8], info: &str) -> io::Result<safeio::Staged> {
    let tmp = dir.join("tmp").join(&name.full);
    let dest = match info {
        "" => dir.join("new").join(&name.full),
        i => dir.join("cur").join(format!("{}:{i}", name.full)),
    };
    match safeio::stage(tmp.clone(), dest.clone(), message) {
        // What an attempt a crash cut short left: removed, and written again.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            std::fs::remove_file(&tmp)?;
            safeio::stage(tmp, dest, message)
        }
        r => r,
    }
}

/// Stages one delivery into `dir` (made when missing if `create`), unless `recheck` finds
/// that an attempt a crash cut short already made it (None).
pub fn stage_once(
    dir: &Path,
    create: bool,
    name: &Name,
    message: &[u8],
    recheck: bool,
) -> io::Result<Option<safeio::Staged>> {
    // One look at `new/` (the commit's rename needs it) instead of three a delivery: a
    // missing `tmp/` shows when the file is made there, and the whole Maildir is seen to then.
    if !dir.join("new").is_dir() {
        ensure(dir, create)?;
    }
    if recheck && holds(dir, name)? {
        return Ok(None);
    }
    match stage(dir, name, message, "") {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            ensure(dir, create)?;
            stage(dir, name, message, "")
        }
        r => r,
    }
    .map(Some)
}

/// True when a delivery of this name is in the Maildir: in `new/`, or in `cur/` where a
/// reader moved it (adding `:2,` and flags). Reads `cur/`: for interrupted attempts only.
pub fn holds(dir: &Path, name: &Name) -> io::Result<bool> {
    if dir.join("new").join(&name.full).exists() {
        return Ok(true);
    }
    for sub in ["new", "cur"] {
        let entries = match std::fs::read_dir(dir.join(sub)) {
            Ok(rd) => rd,
            // Not there, so nothing in it: the delivery makes what it needs.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for e in entries {
            if e?
                .file_name()
                .as_encoded_bytes()
                .starts_with(name.stem.as_bytes())
            {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// The message as a local mailbox stores it: Return-Path and Delivered-To first, LF line ends.
pub fn local_copy(sender: &str, recipient: &str, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 128);
    out.extend_from_slice(
        format!("Return-Path: <{sender}>\nDelivered-To: {recipient}\n").as_bytes(),
    );
    let mut i = 0;
    while i < body.len() {
        if body[i] == b'\r' && body.get(i + 1) == Some(&b'\n') {
            i += 1;
            continue;
        }
        out.push(body[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("qms-maildir-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn deliver(dir: &Path, create: bool) -> io::Result<()> {
        let name = Name::new(1, "Qtest", "host", 5);
        let staged = stage_once(dir, create, &name, b"hello", false)?;
        safeio::commit(std::slice::from_ref(&staged.expect("staged")))?;
        assert!(dir.join("new").join(&name.full).is_file());
        Ok(())
    }

    #[test]
    fn a_missing_maildir_is_made_whole_when_allowed_and_refused_otherwise() {
        let d = scratch("missing");
        let err = deliver(&d.join("box"), false).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(!d.join("box").exists());
        deliver(&d.join("box"), true).unwrap();
        for sub in ["tmp", "new", "cur"] {
            assert!(d.join("box").join(sub).is_dir(), "{sub} made");
        }
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_recheck_finds_a_delivery_made_and_copes_without_cur() {
        let d = scratch("recheck");
        ensure(&d, true).unwrap();
        std::fs::remove_dir(d.join("cur")).unwrap();
        let name = Name::new(1, "Qtest", "host", 5);
        let staged = stage_once(&d, true, &name, b"hello", true).unwrap();
        safeio::commit(std::slice::from_ref(&staged.expect("not there yet"))).unwrap();
        assert!(stage_once(&d, true, &name, b"hello", true)
            .unwrap()
            .is_none());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_maildir_missing_one_part_gets_it_back() {
        for (part, create) in [("tmp", true), ("new", true), ("cur", true), ("tmp", false)] {
            let d = scratch(&format!("part-{part}-{create}"));
            ensure(&d, true).unwrap();
            std::fs::remove_dir(d.join(part)).unwrap();
            let r = deliver(&d, create);
            match create {
                true => {
                    r.unwrap();
                    // `cur/` alone missing is seen only when something else is.
                    if part != "cur" {
                        assert!(d.join(part).is_dir(), "{part} made again");
                    }
                }
                false => assert_eq!(r.unwrap_err().kind(), io::ErrorKind::NotFound),
            }
            let _ = std::fs::remove_dir_all(&d);
        }
    }
}
