//! `qms set-permissions` (as root), like `postfix set-permissions`: creates the spool and
//! gives it and the drop helper the owners and modes docs/security.md lists. `qms start` as
//! root runs the same fix before it gives up root.

use qms_common::privs::Account;
use qms_common::{qlog, Config};
use qms_spool::perms;
use std::process::ExitCode;

/// What was done, in words for the sysadmin.
pub struct Done {
    pub lines: Vec<String>,
}

/// Fixes the spool and the helper. Needs root and a `user` that is not root.
pub fn fix(cfg: &Config) -> Result<Done, String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("set-permissions must be run as root".into());
    }
    let name = cfg.user.as_deref().ok_or_else(|| {
        format!(
            "{}: `user` is not set; qms running as root needs an unprivileged user of its own (see docs/security.md)",
            cfg.path.display()
        )
    })?;
    let a = Account::lookup(name)?;
    if a.uid.is_root() || a.gid.as_raw() == 0 {
        return Err(format!("user {name} must not be root or in group 0"));
    }
    let mut lines = Vec::new();
    let r = perms::fix_spool(&cfg.spool, &cfg.queue_names(), a.uid, a.gid)?;
    lines.push(format!(
        "{}: {} created, {} changed, owner {name}",
        cfg.spool.display(),
        r.created,
        r.changed
    ));
    for s in r.skipped {
        lines.push(format!("left alone: {s}"));
    }
    let helper = qms_incoming::sendmail::postdrop_path(cfg);
    match perms::fix_helper(&helper, a.gid) {
        Ok(changed) => lines.push(format!(
            "{}: root:{} mode 2755{}",
            helper.display(),
            a.gid,
            if changed { " (changed)" } else { "" }
        )),
        Err(e) => lines.push(format!(
            "warning: {e}; local users cannot submit mail until it is installed"
        )),
    }
    if let Ok(exe) = std::env::current_exe() {
        if perms::clear_setid(&exe)? {
            lines.push(format!(
                "{}: set-id bit removed (qms is never set-id)",
                exe.display()
            ));
        }
    }
    Ok(Done { lines })
}

pub fn run(cfg: &Config) -> ExitCode {
    match fix(cfg) {
        Ok(done) => {
            for l in done.lines {
                println!("{l}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("qms: {e}");
            ExitCode::from(77)
        }
    }
}

/// For `qms start` as root: the same fix, logged.
pub fn at_start(cfg: &Config) -> Result<(), String> {
    for l in fix(cfg)?.lines {
        qlog!("event=set-permissions {}", qms_common::log::quote(&l));
    }
    Ok(())
}
