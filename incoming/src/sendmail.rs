//! `sendmail` for cron, mail(1), mutt and scripts: reads a message on stdin and enqueues it
//! through the same spool path as the SMTP server. Flags follow sendmail(8); exit codes
//! follow sysexits.h.

use crate::session::{Kind, Peer, Session, Shared};
pub use crate::submission::{Caller, Refusal, Submission};
use qms_common::conn::Conn;
use qms_common::Config;
use qms_spool::{Committer, Spool};
use std::io::{self, Read, Write};
use std::sync::Arc;

pub const EX_OK: i32 = 0;
pub const EX_USAGE: i32 = 64;
pub const EX_DATAERR: i32 = 65;
pub const EX_NOINPUT: i32 = 66;
pub const EX_NOUSER: i32 = 67;
pub const EX_SOFTWARE: i32 = 70;
pub const EX_CANTCREAT: i32 = 73;
pub const EX_TEMPFAIL: i32 = 75;
pub const EX_CONFIG: i32 = 78;

/// What the command line asks for.
#[derive(Debug, Default, PartialEq)]
pub struct Args {
    pub mode: Mode,
    pub from: Option<String>,
    pub full_name: Option<String>,
    pub extract: bool,
    pub ignore_dots: bool,
    pub config: Option<String>,
    pub notify: Option<String>,
    pub ret: Option<String>,
    pub envid: Option<String>,
    pub recipients: Vec<String>,
}

#[derive(Debug, Default, PartialEq, Clone, Copy)]
pub enum Mode {
    #[default]
    Deliver,
    Smtp,
    ListQueue,
    Newaliases,
}

/// Parses sendmail(8) flags. Flags of other sendmails that make no sense here are accepted
/// and ignored, as Postfix does; modes qms does not offer are refused with a reason.
pub fn parse_args(args: &[String]) -> Result<Args, String> {
    let mut a = Args::default();
    let mut i = 0;
    // Flags that take a value, either attached (-fme) or as the next word (-f me).
    let value = |i: &mut usize, flag: &str, arg: &str| -> Result<String, String> {
        if arg.len() > flag.len() {
            return Ok(arg[flag.len()..].to_string());
        }
        *i += 1;
        args.get(*i)
            .cloned()
            .ok_or_else(|| format!("option {flag} needs a value"))
    };
    while i < args.len() {
        let arg = args[i].as_str();
        if arg == "--" {
            a.recipients.extend(args[i + 1..].iter().cloned());
            break;
        }
        if !arg.starts_with('-') || arg == "-" {
            a.recipients.push(arg.to_string());
            i += 1;
            continue;
        }
        match arg {
            "-t" => a.extract = true,
            "-i" | "-oi" => a.ignore_dots = true,
            "-bm" => a.mode = Mode::Deliver,
            "-bs" => a.mode = Mode::Smtp,
            "-bp" => a.mode = Mode::ListQueue,
            "-bi" | "-I" => a.mode = Mode::Newaliases,
            "-bd" | "-bD" => {
                return Err("daemon mode is not run through sendmail: use 'qms start'".into())
            }
            "-bv" | "-bt" | "-bh" | "-bH" => {
                return Err(format!("mode {arg} is not supported by qms"))
            }
            "-q" => {
                return Err("queue runs are automatic in qms: use 'qms queue retry --all'".into())
            }
            "-v" | "-n" | "-U" | "-G" | "-m" | "-Am" | "-Ac" | "-s" => {}
            _ if arg.starts_with("-f") => a.from = Some(value(&mut i, "-f", arg)?),
            _ if arg.starts_with("-r") => a.from = Some(value(&mut i, "-r", arg)?),
            _ if arg.starts_with("-F") => a.full_name = Some(value(&mut i, "-F", arg)?),
            _ if arg.starts_with("-C") => a.config = Some(value(&mut i, "-C", arg)?),
            _ if arg.starts_with("-N") => a.notify = Some(value(&mut i, "-N", arg)?),
            _ if arg.starts_with("-R") => a.ret = Some(value(&mut i, "-R", arg)?),
            _ if arg.starts_with("-V") => a.envid = Some(value(&mut i, "-V", arg)?),
            // Values we accept and ignore: delivery mode, error mode, hop count, body type, …
            _ if arg.starts_with("-O")
                || arg.starts_with("-B")
                || arg.starts_with("-h")
                || arg.starts_with("-L")
                || arg.starts_with("-X") =>
            {
                if arg.len() == 2 {
                    i += 1;
                }
            }
            _ if arg.starts_with("-o") || arg.starts_with("-q") || arg.starts_with("-A") => {}
            _ => return Err(format!("unknown option {arg}")),
        }
        i += 1;
    }
    Ok(a)
}

fn fail(code: i32, msg: &str) -> i32 {
    eprintln!("sendmail: {msg}");
    code
}

/// True when `me` writes into the spool itself: root and the qms user, or anyone when
/// the instance runs without a `user` (unprivileged, as in examples/qms.toml).
fn writes_spool(cfg: &Config, me: &Caller) -> bool {
    me.uid == 0
        || match &cfg.user {
            None => true,
            Some(u) => {
                qms_common::privs::Account::lookup(u).is_ok_and(|a| a.uid.as_raw() == me.uid)
            }
        }
}

/// Runs `sendmail ARGS` (already parsed into `a`); returns the exit code. `ListQueue` and
/// `Newaliases` are left to the caller (they are `qms queue list` and `qms newaliases`).
pub fn run(cfg: &Config, raw: &[String], a: &Args) -> i32 {
    qms_common::log::init("sendmail");
    // Silent on success like every sendmail: what it logs goes to the mail log, and only a
    // refusal is written to stderr, for the user or program that called it.
    qms_common::log::for_command(cfg);
    let me = match Caller::for_uid(cfg, nix::unistd::getuid().as_raw()) {
        Ok(c) => c,
        Err(e) => return fail(EX_NOUSER, &e),
    };
    if !writes_spool(cfg, &me) {
        if a.mode == Mode::Smtp {
            return fail(
                EX_USAGE,
                "sendmail -bs is for root and the mail system's user; use sendmail without -bs",
            );
        }
        return via_postdrop(cfg, raw, a, &me);
    }
    // Root writes into the spool as the qms user, so the other roles can read what it wrote.
    if let Err(e) = qms_common::privs::drop_to(cfg.user.as_deref()) {
        return fail(EX_SOFTWARE, &e);
    }
    let spool = match Spool::open(&cfg.spool, &cfg.queue_names()) {
        Ok(s) => s,
        Err(e) => return fail(EX_CANTCREAT, &e.to_string()),
    };
    if let Err(why) =
        qms_spool::reserve::check(&cfg.spool, &qms_spool::reserve::Reserve::of(cfg), 0)
    {
        return fail(
            EX_TEMPFAIL,
            &format!("insufficient storage, try again later: {why}"),
        );
    }
    let _ = qms_common::track::open(&cfg.spool, "sendmail");
    if a.mode == Mode::Smtp {
        return smtp_on_stdio(cfg, spool, me);
    }
    let sub = match Submission::prepare(cfg, a, &me, &mut io::stdin().lock()) {
        Ok(s) => s,
        Err((code, why)) => return fail(code, &why),
    };
    match sub.enqueue(cfg, &spool) {
        Ok(_) => EX_OK,
        Err((code, why)) => fail(code, &why),
    }
}

/// Where the drop helper is: `[local] postdrop`, else `qms-postdrop` beside this program.
pub fn postdrop_path(cfg: &Config) -> std::path::PathBuf {
    cfg.local.postdrop.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("qms-postdrop")))
            .unwrap_or_else(|| "/usr/local/sbin/qms-postdrop".into())
    })
}

/// An ordinary user's message: read (up to the size limit) and checked here, so that every
/// mistake is reported at once, then handed with the arguments to `qms-postdrop`, which
/// stores it for `pickup`, which checks it again.
fn via_postdrop(cfg: &Config, raw: &[String], a: &Args, me: &Caller) -> i32 {
    let limit = cfg.limits.message_size;
    let mut message = Vec::new();
    if let Err(e) = io::stdin().lock().take(limit + 1).read_to_end(&mut message) {
        return fail(EX_NOINPUT, &format!("cannot read the message: {e}"));
    }
    if message.len() as u64 > limit {
        return fail(
            EX_DATAERR,
            &format!("message too large (the limit is {limit} bytes)"),
        );
    }
    if let Err((code, why)) = Submission::prepare(cfg, a, me, &mut io::Cursor::new(&message)) {
        return fail(code, &why);
    }
    let helper = postdrop_path(cfg);
    let line = qms_spool::maildrop::DropHeader { args: raw.to_vec() }.line();
    let child = std::process::Command::new(&helper)
        .env_clear()
        .stdin(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            return fail(
                EX_TEMPFAIL,
                &format!(
                    "cannot run {}: {e} (has `qms set-permissions` been run?)",
                    helper.display()
                ),
            )
        }
    };
    let copied = child
        .stdin
        .take()
        .map(|mut w| w.write_all(&line).and_then(|()| w.write_all(&message)));
    match (child.wait(), copied) {
        (Ok(s), Some(Ok(()))) if s.success() => EX_OK,
        (Ok(s), _) => s.code().unwrap_or(EX_TEMPFAIL),
        (Err(e), _) => fail(EX_TEMPFAIL, &format!("{}: {e}", helper.display())),
    }
}

struct Stdio;

impl Read for Stdio {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        io::stdin().read(buf)
    }
}

impl Write for Stdio {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        io::stdout().write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        io::stdout().flush()
    }
}

/// `sendmail -bs`: an SMTP dialogue on stdin and stdout, as the local user.
fn smtp_on_stdio(cfg: &Config, spool: Spool, me: Caller) -> i32 {
    let shared = Shared {
        cfg: Arc::new(cfg.clone()),
        committer: Committer::start(spool.clone()),
        spool,
        aliases: qms_common::aliases::Cache::new(cfg.aliases.clone()),
        tls: None,
        throttle: Default::default(),
        checks: None,
    };
    let forced = (!me.trusted).then(|| me.address.clone());
    let peer = Peer {
        addr: None,
        local_user: Some(me.name),
        forced_sender: forced,
    };
    Session::new(&shared, Kind::Local, peer, Conn::new(Box::new(Stdio))).run();
    EX_OK
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn parses_cron_and_mail_flags() {
        let a = parse_args(&args("-FCronDaemon -i -B8BITMIME -oem root")).unwrap();
        assert_eq!(a.full_name.as_deref(), Some("CronDaemon"));
        assert!(a.ignore_dots);
        assert_eq!(a.recipients, vec!["root"]);
        let a = parse_args(&args("-oi -f me@x.test -t")).unwrap();
        assert_eq!(a.from.as_deref(), Some("me@x.test"));
        assert!(a.extract);
        assert_eq!(parse_args(&args("-bs")).unwrap().mode, Mode::Smtp);
        assert!(parse_args(&args("-bd")).is_err());
        assert!(parse_args(&args("-Z")).is_err());
        assert!(parse_args(&args("-f")).is_err());
    }
}
