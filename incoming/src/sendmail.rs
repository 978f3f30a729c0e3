//! `sendmail` for cron, mail(1), mutt and scripts: reads a message on stdin and enqueues it
//! through the same spool path as the SMTP server. Flags follow sendmail(8); exit codes
//! follow sysexits.h.

use crate::session::{Kind, Peer, Session, Shared};
use qms_common::conn::Conn;
use qms_common::headers;
use qms_common::log::quote;
use qms_common::{qlog, Address, Config};
use qms_spool::{Client, Committer, Job, Notify, QueueId, Recipient, Spool};
use std::io::{self, BufRead, Read, Write};
use std::path::Path;
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

/// The user running the command and the envelope sender they may use.
struct Caller {
    name: String,
    trusted: bool,
    address: Address,
}

fn caller(cfg: &Config) -> Result<Caller, String> {
    let uid = nix::unistd::getuid();
    let name = nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| format!("uid{}", uid.as_raw()));
    let domain = cfg
        .local_domains
        .first()
        .cloned()
        .unwrap_or_else(|| cfg.hostname.clone());
    let address = Address::new(&name, &domain)
        .map_err(|e| format!("cannot make an address for user {name}: {e}"))?;
    let trusted = uid.is_root() || cfg.trusted_users.iter().any(|t| t == &name);
    Ok(Caller {
        name,
        trusted,
        address,
    })
}

/// `user` becomes `user@origin`; full addresses are kept.
fn qualify(s: &str, cfg: &Config) -> Result<Address, String> {
    let s = s.trim().trim_start_matches('<').trim_end_matches('>');
    if s.contains('@') {
        return Address::parse(s).map_err(|e| e.to_string());
    }
    let domain = cfg
        .local_domains
        .first()
        .cloned()
        .unwrap_or_else(|| cfg.hostname.clone());
    Address::new(s, &domain).map_err(|e| e.to_string())
}

/// Reads the message: LF or CRLF line ends become CRLF; a lone "." ends it unless -i.
fn read_message(input: &mut dyn BufRead, ignore_dots: bool) -> io::Result<Vec<u8>> {
    let mut msg = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        if input.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        if line.last() == Some(&b'\n') {
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
        }
        if !ignore_dots && line == b"." {
            break;
        }
        msg.extend_from_slice(&line);
        msg.extend_from_slice(b"\r\n");
    }
    Ok(msg)
}

fn fail(code: i32, msg: &str) -> i32 {
    eprintln!("sendmail: {msg}");
    code
}

/// Runs `sendmail ARGS`; returns the exit code. `ListQueue` and `Newaliases` are left to the
/// caller (they are `qms queue list` and `qms newaliases`).
pub fn run(cfg: &Config, a: &Args) -> i32 {
    qms_common::log::init("sendmail");
    let me = match caller(cfg) {
        Ok(c) => c,
        Err(e) => return fail(EX_NOUSER, &e),
    };
    // Root writes into the spool as the qms user, so the other roles can read what it wrote.
    if let Err(e) = qms_common::privs::drop_to(cfg.user.as_deref()) {
        return fail(EX_SOFTWARE, &e);
    }
    let spool = match Spool::open(&cfg.spool, &cfg.queue_names()) {
        Ok(s) => s,
        Err(e) => return fail(EX_CANTCREAT, &e.to_string()),
    };
    let _ = qms_common::track::open(&cfg.spool, "sendmail");
    if a.mode == Mode::Smtp {
        return smtp_on_stdio(cfg, spool, me);
    }
    let sender = match &a.from {
        None => Some(me.address.clone()),
        Some(f) if f.is_empty() || f == "<>" => {
            if me.trusted {
                None
            } else {
                Some(me.address.clone())
            }
        }
        Some(f) => match qualify(f, cfg) {
            Ok(addr) if me.trusted || addr == me.address => Some(addr),
            Ok(addr) => {
                qlog!(
                    "user={} status=sender-replaced requested={addr} used={}",
                    me.name,
                    me.address
                );
                Some(me.address.clone())
            }
            Err(e) => return fail(EX_USAGE, &format!("bad sender address {f:?}: {e}")),
        },
    };
    let mut msg = match read_message(&mut io::stdin().lock(), a.ignore_dots) {
        Ok(m) => m,
        Err(e) => return fail(EX_NOINPUT, &format!("cannot read the message: {e}")),
    };
    if msg.iter().all(|b| b.is_ascii_whitespace()) {
        return fail(EX_NOINPUT, "no message on standard input");
    }
    let mut names: Vec<String> = a
        .recipients
        .iter()
        .flat_map(|r| r.split(','))
        .map(str::to_string)
        .collect();
    if a.extract {
        names.extend(headers::recipients(&msg));
        msg = headers::remove(&msg, "bcc");
    }
    let mut recipients: Vec<Recipient> = Vec::new();
    for n in names.iter().map(|n| n.trim()).filter(|n| !n.is_empty()) {
        let addr = match qualify(n, cfg) {
            Ok(a) => a,
            Err(e) => return fail(EX_DATAERR, &format!("bad recipient address {n:?}: {e}")),
        };
        if recipients.iter().all(|r| r.address != addr) {
            let mut r = Recipient::new(addr);
            if let Some(notify) = &a.notify {
                r.notify = notify
                    .split(',')
                    .filter_map(|n| match n.trim().to_ascii_lowercase().as_str() {
                        "never" => Some(Notify::Never),
                        "success" => Some(Notify::Success),
                        "failure" => Some(Notify::Failure),
                        "delay" => Some(Notify::Delay),
                        _ => None,
                    })
                    .collect();
            }
            recipients.push(r);
        }
    }
    if recipients.is_empty() {
        return fail(
            EX_USAGE,
            "no recipients given (name them as arguments or use -t)",
        );
    }
    let client = Client {
        local_user: Some(me.name.clone()),
        trusted: true,
        ..Client::default()
    };
    let mut job = Job::new(
        "incoming",
        sender.clone(),
        recipients,
        client,
        "sendmail",
        &cfg.outgoing,
    );
    job.ret = match a.ret.as_deref().map(str::to_ascii_lowercase).as_deref() {
        Some("full") => Some(qms_spool::DsnRet::Full),
        Some("hdrs") => Some(qms_spool::DsnRet::Hdrs),
        _ => None,
    };
    job.envid = a.envid.clone();
    let rcpts: Vec<String> = job
        .recipients
        .iter()
        .map(|r| r.address.to_string())
        .collect();
    let single = (rcpts.len() == 1).then(|| rcpts[0].clone());
    let from_header = (!headers::has(&msg, "from")).then(|| match &a.full_name {
        Some(n) => format!(
            "From: \"{}\" <{}>\r\n",
            n.replace(['"', '\r', '\n'], ""),
            me.address
        ),
        None => format!("From: {}\r\n", me.address),
    });
    let added_id =
        (!headers::has(&msg, "message-id")).then(|| headers::new_message_id(&cfg.hostname));
    job.message_id = added_id.clone().or_else(|| headers::message_id_of(&msg));
    let tracked = job.clone();
    let build = |id: &QueueId| -> Vec<u8> {
        let now = qms_common::time::now();
        let hop = headers::Hop {
            helo: None,
            addr: None,
            local_user: Some(&me.name),
            by: &cfg.hostname,
            proto: "local",
            tls: None,
            for_rcpt: single.clone(),
        };
        let mut out = headers::received(&hop, id.as_str(), now).into_bytes();
        if let Some(f) = &from_header {
            out.extend_from_slice(f.as_bytes());
        }
        if !headers::has(&msg, "date") {
            out.extend_from_slice(headers::date(now).as_bytes());
        }
        if added_id.is_some() {
            out.extend_from_slice(
                format!(
                    "Message-ID: <{}>\r\n",
                    added_id.as_deref().unwrap_or_default()
                )
                .as_bytes(),
            );
        }
        out.extend_from_slice(&msg);
        out
    };
    match spool.enqueue(job, &build) {
        Ok(id) => {
            for r in &tracked.recipients {
                let mut ev = tracked.track(&r.address, "received", "", "queued");
                ev.qid = id.to_string();
                qms_common::track::emit(ev);
            }
            qlog!(
                "qid={id} uid={} from={} to={} size={} status=queued",
                me.name,
                qms_common::address::show_sender(&sender),
                rcpts.join(","),
                msg.len()
            );
            EX_OK
        }
        Err(e) => {
            qlog!(
                "uid={} status=tempfail reason={}",
                me.name,
                quote(&e.to_string())
            );
            fail(
                if e.is_no_space() {
                    EX_TEMPFAIL
                } else {
                    EX_CANTCREAT
                },
                &e.to_string(),
            )
        }
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

/// True when `path` is the config a setgid sendmail may trust: the system one.
pub fn is_system_config(path: &Path) -> bool {
    path == Path::new(qms_common::config::DEFAULT_PATH)
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

    #[test]
    fn reads_lf_and_dot() {
        let mut input = io::Cursor::new(b"a\nb\r\n.\nafter\n".to_vec());
        assert_eq!(read_message(&mut input, false).unwrap(), b"a\r\nb\r\n");
        let mut input = io::Cursor::new(b"a\n.\nb\n".to_vec());
        assert_eq!(read_message(&mut input, true).unwrap(), b"a\r\n.\r\nb\r\n");
    }
}
