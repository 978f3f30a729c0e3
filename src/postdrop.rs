//! `qms-postdrop`: the one set-group-id program of qms (group `qms`, mode 2755, made so by
//! `qms set-permissions`). `sendmail` run by a local user hands it the message on stdin; it
//! writes that into `SPOOL/maildrop/` as one file owned by the user, and nothing else.
//!
//! It takes no options. Unless its caller is root it reads only the system config
//! (/etc/qms/qms.toml), never `$QMS_CONFIG`, so a user cannot point it at a spool of their
//! choice. It believes nothing it reads from stdin: `pickup` checks every field.
//! Exit codes follow sysexits.h: 0 stored, 65 too large, 75 try again, 78 config.

use std::process::ExitCode;

fn main() -> ExitCode {
    // Files it makes are readable by group qms (pickup) and by no one else.
    // Safety: umask only changes this process's file-creation mask.
    unsafe { libc::umask(0o027) };
    let root_caller = nix::unistd::getuid().is_root();
    let path = if root_caller {
        qms_common::config::locate(None)
    } else {
        std::path::PathBuf::from(qms_common::config::DEFAULT_PATH)
    };
    if std::env::args_os().len() > 1 {
        eprintln!("qms-postdrop: takes no arguments (it is run by sendmail)");
        return ExitCode::from(64);
    }
    let cfg = match qms_common::Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("qms-postdrop: {e}");
            return ExitCode::from(78);
        }
    };
    let limit = cfg.limits.message_size;
    let reserve = qms_spool::reserve::Reserve::of(&cfg);
    if let Err(why) = qms_spool::reserve::check(&cfg.spool, &reserve, 0) {
        eprintln!("qms-postdrop: insufficient storage, try again later: {why}");
        return ExitCode::from(75);
    }
    match qms_spool::maildrop::write(&cfg.spool, &mut std::io::stdin().lock(), limit) {
        Ok(_) => ExitCode::SUCCESS,
        Err(qms_spool::maildrop::DropError::TooLarge(n)) => {
            eprintln!("qms-postdrop: message too large (the limit is {n} bytes)");
            ExitCode::from(65)
        }
        Err(e) => {
            eprintln!("qms-postdrop: {e}");
            ExitCode::from(75)
        }
    }
}
