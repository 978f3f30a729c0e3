//! A local submission checked against what its submitter may do: the envelope sender (only
//! trusted users choose it), recipients from the arguments and, with -t, the headers, DSN
//! requests, the size limit, line ends and bare CRs. `sendmail` (root and the qms user) and
//! `pickup` (everyone else, through the drop directory) enqueue through it.

use crate::sendmail::{Args, EX_CANTCREAT, EX_DATAERR, EX_NOINPUT, EX_TEMPFAIL, EX_USAGE};
use qms_common::headers;
use qms_common::log::quote;
use qms_common::{qlog, Address, Config};
use qms_spool::{Client, Job, Notify, QueueId, Recipient, Spool};
use std::io::{self, BufRead, Read};

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
        // Stamped before the job can be seen: the router's "routed" must come after it.
        let received_at = qms_common::time::now_micros();
        match spool.enqueue(self.job.clone(), &build) {
            Ok(id) => {
                let protocol = [("protocol", self.job.protocol.as_str())];
                qms_common::metrics::count("qms_messages_received_total", &protocol, 1.0);
                for r in &self.job.recipients {
                    let mut ev = self.job.track(&r.address, "received", "", "queued");
                    ev.qid = id.to_string();
                    ev.time = received_at;
                    qms_common::track::emit(ev);
                }
                qlog!(
                    "qid={id} uid={} from={} to={} size={} msgid={} status=queued",
                    quote(&self.caller),
                    quote(&qms_common::address::show_sender(&self.job.sender)),
                    quote(&rcpts.join(",")),
                    self.msg.len(),
                    quote(self.job.message_id.as_deref().unwrap_or(""))
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

#[cfg(test)]
mod tests {
    use super::*;

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
