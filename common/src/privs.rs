//! Who a process is. See docs/security.md for the model this module carries out.
//!
//! Every change of user sets the real, effective and saved ids together (`setresuid`,
//! `setresgid`) and is checked afterwards. Root is kept only by the supervisor while it binds
//! its ports and by `qms set-permissions`. Local delivery keeps two capabilities instead
//! (CAP_SETUID, CAP_SETGID) so that a forked child can become a recipient's user; the child
//! drops them for good before it touches anything of that user's.

use caps::{CapSet, Capability, CapsHashSet};
use nix::unistd::{getresgid, getresuid, initgroups, setresgid, setresuid, Gid, Uid, User};
use std::ffi::CString;
use std::path::PathBuf;

/// A system account as delivery and the spool need it.
#[derive(Clone, Debug)]
pub struct Account {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
    pub home: PathBuf,
}

impl Account {
    pub fn lookup(name: &str) -> Result<Account, String> {
        let u = User::from_name(name)
            .ok()
            .flatten()
            .ok_or_else(|| format!("user {name:?} does not exist"))?;
        Ok(Account::from(u))
    }

    pub fn by_uid(uid: Uid) -> Option<Account> {
        User::from_uid(uid).ok().flatten().map(Account::from)
    }
}

impl From<User> for Account {
    fn from(u: User) -> Account {
        Account {
            name: u.name,
            uid: u.uid,
            gid: u.gid,
            home: u.dir,
        }
    }
}

/// The lowest uid of an ordinary login (`UID_MIN` in /etc/login.defs, 1000 by default).
pub fn uid_min() -> u32 {
    std::fs::read_to_string("/etc/login.defs")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                let mut w = l.split_whitespace();
                (w.next() == Some("UID_MIN")).then(|| w.next()?.parse().ok())?
            })
        })
        .unwrap_or(1000)
}

/// True for accounts that receive mail in their home: ordinary logins, never root, `nobody`
/// or the qms user. System accounts get mail only through an alias (`root: admin`).
pub fn is_mail_account(a: &Account, qms_user: Option<&str>) -> bool {
    let uid = a.uid.as_raw();
    uid >= uid_min() && uid != 65534 && Some(a.name.as_str()) != qms_user
}

/// Gives up any set-user-id or set-group-id privilege the program was started with, for
/// good: real, effective and saved ids all become the caller's. `qms` is never installed
/// set-id; this makes a mistaken install harmless.
pub fn drop_setid() -> Result<(), String> {
    let (ruid, euid, suid) = ids_u();
    let (rgid, egid, sgid) = ids_g();
    if rgid != egid || rgid != sgid {
        setresgid(rgid, rgid, rgid).map_err(|e| format!("setresgid: {e}"))?;
    }
    if ruid != euid || ruid != suid {
        setresuid(ruid, ruid, ruid).map_err(|e| format!("setresuid: {e}"))?;
    }
    let (u, g) = (ids_u(), ids_g());
    if u != (ruid, ruid, ruid) || g != (rgid, rgid, rgid) {
        return Err("set-id privilege could not be given up".into());
    }
    Ok(())
}

fn ids_u() -> (Uid, Uid, Uid) {
    getresuid()
        .map(|r| (r.real, r.effective, r.saved))
        .unwrap_or((Uid::current(), Uid::effective(), Uid::effective()))
}

fn ids_g() -> (Gid, Gid, Gid) {
    getresgid()
        .map(|r| (r.real, r.effective, r.saved))
        .unwrap_or((Gid::current(), Gid::effective(), Gid::effective()))
}

/// Becomes `account` for good: groups, then gid, then uid, each real, effective and saved,
/// and checks the result. Refuses uid 0.
fn become_fully(a: &Account) -> Result<(), String> {
    if a.uid.is_root() {
        return Err(format!("refusing to run as {} (uid 0)", a.name));
    }
    let cname = CString::new(a.name.as_str()).map_err(|_| "bad user name".to_string())?;
    initgroups(&cname, a.gid).map_err(|e| format!("initgroups {}: {e}", a.name))?;
    setresgid(a.gid, a.gid, a.gid).map_err(|e| format!("setresgid {}: {e}", a.name))?;
    setresuid(a.uid, a.uid, a.uid).map_err(|e| format!("setresuid {}: {e}", a.name))?;
    if ids_u() != (a.uid, a.uid, a.uid) || ids_g() != (a.gid, a.gid, a.gid) {
        return Err(format!("ids not all those of {} after the change", a.name));
    }
    Ok(())
}

/// The two capabilities local delivery keeps.
fn delivery_caps() -> CapsHashSet {
    [Capability::CAP_SETUID, Capability::CAP_SETGID]
        .into_iter()
        .collect()
}

/// True when this process may change to another user (root, or the delivery capabilities).
pub fn can_switch_user() -> bool {
    Uid::effective().is_root()
        || caps::has_cap(None, CapSet::Effective, Capability::CAP_SETUID).unwrap_or(false)
}

/// Becomes `user` for good (a no-op when not root or when no user is configured).
pub fn drop_to(user: Option<&str>) -> Result<(), String> {
    let Some(name) = user else { return Ok(()) };
    if !Uid::current().is_root() && !Uid::effective().is_root() {
        return Ok(());
    }
    become_fully(&Account::lookup(name)?)?;
    clear_caps()
}

/// As root: becomes `user` for good but keeps CAP_SETUID and CAP_SETGID (permitted,
/// effective and inheritable), so that it can fork children that become other users.
/// Used by the supervisor after binding and by the local delivery agent. Already running as
/// `user` with those capabilities (started by the supervisor): nothing to do.
pub fn drop_keeping_setuid(user: &str) -> Result<(), String> {
    let a = Account::lookup(user)?;
    if !Uid::current().is_root() && !Uid::effective().is_root() {
        return Ok(());
    }
    let keep = delivery_caps();
    // Safety: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) } != 0 {
        return Err(format!(
            "prctl(KEEPCAPS): {}",
            std::io::Error::last_os_error()
        ));
    }
    become_fully(&a)?;
    // Safety: as above.
    unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) };
    caps::set(None, CapSet::Permitted, &keep).map_err(|e| format!("capset: {e}"))?;
    caps::set(None, CapSet::Effective, &keep).map_err(|e| format!("capset: {e}"))?;
    caps::set(None, CapSet::Inheritable, &keep).map_err(|e| format!("capset: {e}"))?;
    Ok(())
}

/// In a child about to exec a process that must keep the delivery capabilities (the local
/// and pipe delivery agents): raises them into the ambient set, which survives exec.
/// Every other child gets an empty ambient set and so no capability at all after exec.
pub fn pass_setuid_on_exec(pass: bool) -> std::io::Result<()> {
    if !pass {
        return caps::clear(None, CapSet::Ambient).map_err(std::io::Error::other);
    }
    for c in delivery_caps() {
        if caps::has_cap(None, CapSet::Permitted, c).unwrap_or(false) {
            caps::raise(None, CapSet::Ambient, c).map_err(std::io::Error::other)?;
        }
    }
    Ok(())
}

fn clear_caps() -> Result<(), String> {
    // A process that never had any has nothing to clear; errors here mean no capability API.
    for set in [
        CapSet::Ambient,
        CapSet::Effective,
        CapSet::Inheritable,
        CapSet::Permitted,
    ] {
        if !caps::read(None, set).map(|s| s.is_empty()).unwrap_or(true) {
            caps::clear(None, set).map_err(|e| format!("cannot drop capabilities: {e}"))?;
        }
    }
    Ok(())
}

/// True when `uid` is the mail system's own user (`user` in the config): the owner of the
/// queue, whom no command or file named by mail may run as.
pub fn is_mail_system_user(cfg: &crate::Config, uid: Uid) -> bool {
    cfg.user
        .as_deref()
        .and_then(|name| Account::lookup(name).ok())
        .is_some_and(|a| a.uid == uid)
}

/// In a forked child of the local delivery agent: becomes `a` entirely (never root), drops
/// every capability, and checks both.
pub fn become_user(a: &Account) -> Result<(), String> {
    if can_switch_user() {
        become_fully(a)?;
    } else if Uid::current() != a.uid {
        return Err(format!(
            "cannot run as {}: qms runs unprivileged as uid {}",
            a.name,
            Uid::current()
        ));
    }
    clear_caps()?;
    if ids_u().0.is_root() || ids_u().1.is_root() || ids_u().2.is_root() {
        return Err("still uid 0 after the change".into());
    }
    if caps::read(None, CapSet::Permitted).is_ok_and(|s| !s.is_empty()) {
        return Err("capabilities left after the change".into());
    }
    Ok(())
}

/// The environment of a delivery command: nothing inherited, only what local(8) gives.
pub fn delivery_env(a: &Account) -> Vec<(String, String)> {
    vec![
        ("HOME".into(), a.home.display().to_string()),
        ("PATH".into(), "/usr/bin:/bin".into()),
        ("LOGNAME".into(), a.name.clone()),
        ("USER".into(), a.name.clone()),
        ("SHELL".into(), "/bin/sh".into()),
    ]
}
