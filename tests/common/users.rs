//! Ordinary and system users made by a test (as root) and removed after it, and running
//! commands as them: how the privilege tests act as a local user would.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A user account that exists for the life of the value.
pub struct SystemUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

impl SystemUser {
    /// An ordinary login with a home directory (uid from the login range).
    pub fn ordinary(tag: &str) -> SystemUser {
        SystemUser::make(tag, &["-m", "-s", "/bin/sh"])
    }

    /// A system account with a group of its own and no login: a qms user, as an install
    /// makes one.
    pub fn system(tag: &str) -> SystemUser {
        SystemUser::make(
            tag,
            &[
                "-r",
                "-U",
                "-M",
                "-s",
                "/usr/sbin/nologin",
                "-d",
                "/nonexistent",
            ],
        )
    }

    fn make(tag: &str, opts: &[&str]) -> SystemUser {
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let name = format!("qt{tag}{}x{n}", std::process::id() % 100_000);
        let ok = accounts(|| Command::new("useradd").args(opts).arg(&name).output());
        assert!(ok, "useradd {name}");
        let u = nix::unistd::User::from_name(&name).unwrap().unwrap();
        SystemUser {
            name,
            uid: u.uid.as_raw(),
            gid: u.gid.as_raw(),
            home: u.dir,
        }
    }
}

impl Drop for SystemUser {
    fn drop(&mut self) {
        let _ = Command::new("pkill")
            .args(["-KILL", "-u", &self.name])
            .status();
        accounts(|| Command::new("userdel").args(["-r", &self.name]).output());
        let _ = Command::new("groupdel").arg(&self.name).output();
    }
}

/// `cmd` as `u`: real and effective ids, no supplementary groups, a plain environment.
pub fn as_user<'a>(cmd: &'a mut Command, u: &SystemUser) -> &'a mut Command {
    cmd.uid(u.uid)
        .gid(u.gid)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", &u.home)
        .env("USER", &u.name)
        .env("LOGNAME", &u.name)
}

/// A shell command run in a mount namespace of its own, where `dir` is mounted over
/// /etc/qms: qms-postdrop reads only the system config, and this is how a test gives it
/// one without touching the host's.
pub fn in_system_config(dir: &Path, script: &str) -> Command {
    std::fs::create_dir_all("/etc/qms").unwrap();
    let mut c = Command::new("unshare");
    c.args(["-m", "sh", "-c"]).arg(format!(
        "mount --bind '{}' /etc/qms && {script}",
        dir.display()
    ));
    c
}

/// Runs a change to the account files, one at a time in this process, trying again while
/// the files are locked (exit 10 of useradd/userdel); true when it succeeded.
fn accounts(run: impl Fn() -> std::io::Result<std::process::Output>) -> bool {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _held = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..50 {
        match run() {
            Ok(o) if o.status.success() => return true,
            Ok(o) if o.status.code() == Some(10) => {
                std::thread::sleep(std::time::Duration::from_millis(100))
            }
            _ => return false,
        }
    }
    false
}
