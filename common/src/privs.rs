//! Privilege changes: roles give up root for the configured `user`; local delivery keeps a
//! real uid of root only to start per-recipient children.

use nix::unistd::{chown, getuid, initgroups, setegid, seteuid, setgid, setuid, User};
use std::ffi::CString;
use std::path::Path;

fn lookup(name: &str) -> Result<User, String> {
    User::from_name(name)
        .ok()
        .flatten()
        .ok_or_else(|| format!("user {name:?} does not exist"))
}

/// Becomes `user` for good (a no-op when not root or when no user is configured).
pub fn drop_to(user: Option<&str>) -> Result<(), String> {
    let Some(name) = user else { return Ok(()) };
    if !getuid().is_root() {
        return Ok(());
    }
    let u = lookup(name)?;
    let cname = CString::new(name).map_err(|_| "bad user name".to_string())?;
    initgroups(&cname, u.gid).map_err(|e| format!("initgroups {name}: {e}"))?;
    setgid(u.gid).map_err(|e| format!("setgid {name}: {e}"))?;
    setuid(u.uid).map_err(|e| format!("setuid {name}: {e}"))?;
    Ok(())
}

/// Works as `user` while keeping root as the real uid, so [`become_user`] can still switch
/// a forked child to another user.
pub fn work_as(user: Option<&str>) -> Result<(), String> {
    let Some(name) = user else { return Ok(()) };
    if !getuid().is_root() {
        return Ok(());
    }
    let u = lookup(name)?;
    setegid(u.gid).map_err(|e| format!("setegid {name}: {e}"))?;
    seteuid(u.uid).map_err(|e| format!("seteuid {name}: {e}"))?;
    Ok(())
}

/// In a forked child of a [`work_as`] process: becomes `name` entirely. Never root.
pub fn become_user(name: &str) -> Result<(), String> {
    let u = lookup(name)?;
    if u.uid.is_root() {
        return Err("refusing to deliver as root".into());
    }
    let cname = CString::new(name).map_err(|_| "bad user name".to_string())?;
    let _ = seteuid(nix::unistd::Uid::from_raw(0));
    initgroups(&cname, u.gid).map_err(|e| format!("initgroups {name}: {e}"))?;
    setgid(u.gid).map_err(|e| format!("setgid {name}: {e}"))?;
    setuid(u.uid).map_err(|e| format!("setuid {name}: {e}"))?;
    Ok(())
}

/// Gives the spool to `user` (when root): every directory and file under `root`.
pub fn own_tree(root: &Path, user: Option<&str>) -> Result<(), String> {
    let Some(name) = user else { return Ok(()) };
    if !getuid().is_root() {
        return Ok(());
    }
    let u = lookup(name)?;
    fn walk(p: &Path, uid: nix::unistd::Uid, gid: nix::unistd::Gid) {
        use std::os::unix::fs::MetadataExt;
        if let Ok(m) = std::fs::symlink_metadata(p) {
            if m.uid() != uid.as_raw() || m.gid() != gid.as_raw() {
                let _ = chown(p, Some(uid), Some(gid));
            }
            if m.is_dir() {
                for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
                    walk(&e.path(), uid, gid);
                }
            }
        }
    }
    walk(root, u.uid, u.gid);
    Ok(())
}
