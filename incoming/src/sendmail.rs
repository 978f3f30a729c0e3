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

/// The user who submits a message and the envelope sender they may use.
pub struct Caller {
    pub name: String,
    pub uid: u32,
    pub trusted: bool,
    pub address: Address,
}

impl Caller {
    /// The caller for `uid`: its login name at the first local domain; trusted (may choose
    /// the envelope sender) when root or in `trusted_users`.
    pub fn for_uid(cfg: &Config, uid: u32) -> Result<Caller, String> {
        let name = qms_common::privs::Account::by_uid(nix::unistd::Uid::from_raw(uid))
            .map(|a| a.name)
            .unwrap_or_else(|| format!("uid{uid}"));
        let address = Address::new(&name, &origin(cfg))
            .map_err(|e| format!("cannot make an address for user {name}: {e}"))?;
        let trusted = uid == 0 || cfg.trusted_users.iter().any(|t| t == &name);
        Ok(Caller {
            name,
            uid,
            trusted,
            address,
        })
    }
}

fn origin(cfg: &Config) -> String {
    cfg.local_domains
        .first()
        .cloned()
        .unwrap_or_else(|| cfg.hostname.clone())
}

/// `user` becomes `user@origin`; full addresses are kept.
fn qualify(s: &str, cfg: &Config) -> Result<Address, String> {
    let s = s.trim().trim_start_matches('<').trim_end_matches('>');
    if s.contains('@') {
        return Address::parse(s).map_err(|e| e.to_string());
    }
    Address::new(s, &origin(cfg)).map_err(|e| e.to_string())
}

/// Reads the message: LF or CRLF line ends become CRLF; a lone "." ends it unless -i. A
/// bare CR inside a line becomes a line end too, so that no CR reaches the spool alone (a
/// `\r.\r` would otherwise end the message early at a next hop that takes CR as a line end).
/// More than `limit` bytes is an error, found while reading.
fn read_message(input: &mut dyn BufRead, ignore_dots: bool, limit: u64) -> io::Result<Vec<u8>> {
    let mut msg = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut *input).take(limit + 2).read_until(b'\n', &mut line)?;
        if n == 0 {
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
        for part in line.split(|b| *b == b'\r') {
            msg.extend_from_slice(part);
            msg.extend_from_slice(b"\r\n");
        }
        if msg.len() as u64 > limit {
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                format!("message too large (the limit is {limit} bytes)"),
            ));
        }
    }
    Ok(msg)
}

fn fail(code: i32, msg: &str) -> i32 {
    eprintln!("sendmail: {msg}");
    code
}

/// A message read and checked against what its submitter may do, ready to enqueue.
pub struct Submission {
    job: Job,
    msg: Vec<u8>,
    caller: String,
    from_header: Option<String>,
    added_id: Option<String>,
    single: Option<String>,
}

/// Why a submission was refused: a sysexits code and the reason.
pub type Refusal = (i32, String);

impl Submission {
    /// Applies the arguments `a` for `me` to the message on `input`: the envelope sender
    /// (only trusted callers choose it), recipients (arguments and, with -t, the headers),
    /// DSN requests, and the size limit.
    pub fn prepare(
        cfg: &Config,
        a: &Args,
        me: &Caller,
        input: &mut dyn BufRead,
    ) -> Result<Submission, Refusal> {
        let sender = sender_for(cfg, a, me)?;
        let mut msg = match read_message(input, a.ignore_dots, cfg.limits.message_size) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::FileTooLarge => {
                return Err((EX_DATAERR, e.to_string()))
            }
            Err(e) => return Err((EX_NOINPUT, format!("cannot read the message: {e}"))),
        };
        if msg.iter().all(|b| b.is_ascii_whitespace()) {
            return Err((EX_NOINPUT, "no message on standard input".into()));
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
        let recipients = recipients(cfg, a, &names)?;
        let client = Client {
            local_user: Some(me.name.clone()),
            trusted: true,
            ..Client::default()
        };
        let mut job = Job::new(
            "incoming",
            sender,
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
        // RFC 3461: an ENVID is printable US-ASCII; anything else is dropped, never stored.
        job.envid = a
            .envid
            .clone()
            .filter(|e| e.len() <= 100 && e.bytes().all(|b| (0x21..0x7f).contains(&b)));
        let single = (job.recipients.len() == 1).then(|| job.recipients[0].address.to_string());
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
        Ok(Submission {
            job,
            msg,
            caller: me.name.clone(),
            from_header,
            added_id,
            single,
        })
    }

    /// Writes the message into the spool's `incoming` queue, durably; logs and tracks it.
    pub fn enqueue(self, cfg: &Config, spool: &Spool) -> Result<QueueId, Refusal> {
        let build = |id: &QueueId| -> Vec<u8> {
            let now = qms_common::time::now();
            let hop = headers::Hop {
                helo: None,
                addr: None,
                local_user: Some(&self.caller),
                by: &cfg.hostname,
                proto: "local",
                tls: None,
                for_rcpt: self.single.clone(),
            };
            let mut out = headers::received(&hop, id.as_str(), now).into_bytes();
            if let Some(f) = &self.from_header {
                out.extend_from_slice(f.as_bytes());
            }
            if !headers::has(&self.msg, "date") {
                out.extend_from_slice(headers::date(now).as_bytes());
            }
            if let Some(mid) = &self.added_id {
                out.extend_from_slice(format!("Message-ID: <{mid}>\r\n").as_bytes());
            }
            out.extend_from_slice(&self.msg);
            out
        };
        let rcpts: Vec<String> = self
            .job
            .recipients
            .iter()
            .map(|r| r.address.to_string())
            .collect();
        match spool.enqueue(self.job.clone(), &build) {
            Ok(id) => {
                for r in &self.job.recipients {
                    let mut ev = self.job.track(&r.address, "received", "", "queued");
                    ev.qid = id.to_string();
                    qms_common::track::emit(ev);
                }
                qlog!(
                    "qid={id} uid={} from={} to={} size={} status=queued",
                    quote(&self.caller),
                    quote(&qms_common::address::show_sender(&self.job.sender)),
                    quote(&rcpts.join(",")),
                    self.msg.len()
                );
                Ok(id)
            }
            Err(e) => {
                qlog!(
                    "uid={} status=tempfail reason={}",
                    quote(&self.caller),
                    quote(&e.to_string())
                );
                let code = if e.is_no_space() {
                    EX_TEMPFAIL
                } else {
                    EX_CANTCREAT
                };
                Err((code, e.to_string()))
            }
        }
    }
}

/// The envelope sender: the caller's own address unless the caller is trusted.
fn sender_for(cfg: &Config, a: &Args, me: &Caller) -> Result<Option<Address>, Refusal> {
    Ok(match &a.from {
        None => Some(me.address.clone()),
        Some(f) if f.is_empty() || f == "<>" => (!me.trusted).then(|| me.address.clone()),
        Some(f) => match qualify(f, cfg) {
            Ok(addr) if me.trusted || addr == me.address => Some(addr),
            Ok(addr) => {
                qlog!(
                    "user={} status=sender-replaced requested={} used={}",
                    quote(&me.name),
                    quote(&addr.to_string()),
                    me.address
                );
                Some(me.address.clone())
            }
            Err(e) => return Err((EX_USAGE, format!("bad sender address {f:?}: {e}"))),
        },
    })
}

fn recipients(cfg: &Config, a: &Args, names: &[String]) -> Result<Vec<Recipient>, Refusal> {
    let mut out: Vec<Recipient> = Vec::new();
    for n in names.iter().map(|n| n.trim()).filter(|n| !n.is_empty()) {
        let addr = qualify(n, cfg)
            .map_err(|e| (EX_DATAERR, format!("bad recipient address {n:?}: {e}")))?;
        if out.iter().any(|r| r.address == addr) {
            continue;
        }
        if out.len() >= cfg.limits.recipients {
            return Err((
                EX_DATAERR,
                format!("more than {} recipients", cfg.limits.recipients),
            ));
        }
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
        out.push(r);
    }
    if out.is_empty() {
        return Err((
            EX_USAGE,
            "no recipients given (name them as arguments or use -t)".into(),
        ));
    }
    Ok(out)
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

    #[test]
    fn reads_lf_and_dot() {
        let mut input = io::Cursor::new(b"a\nb\r\n.\nafter\n".to_vec());
        assert_eq!(read_message(&mut input, false, 100).unwrap(), b"a\r\nb\r\n");
        let mut input = io::Cursor::new(b"a\n.\nb\n".to_vec());
        assert_eq!(
            read_message(&mut input, true, 100).unwrap(),
            b"a\r\n.\r\nb\r\n"
        );
        // A bare CR never reaches the spool alone.
        let mut input = io::Cursor::new(b"x\r.\ry\n".to_vec());
        assert_eq!(
            read_message(&mut input, true, 100).unwrap(),
            b"x\r\n.\r\ny\r\n"
        );
        let mut input = io::Cursor::new(vec![b'a'; 500]);
        assert!(read_message(&mut input, true, 100).is_err());
    }
}
