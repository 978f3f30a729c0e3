//! One SMTP session (RFC 5321) on any stream: a TCP connection, or stdin/stdout for
//! `sendmail -bs`. It ends in a durable job in the `incoming` queue or in nothing.

use crate::data::{self, Data};
use crate::policy;
use crate::receive::Receiver;
use qms_common::aliases;
use qms_common::conn::{Conn, LineEnd};
use qms_common::headers;
use qms_common::log::quote;
use qms_common::{qlog, Address, Config};
use qms_spool::{Client, Committer, DsnRet, Job, Notify, QueueId, Recipient, Spool};
use std::net::IpAddr;
use std::sync::Arc;

mod secure;

/// What every session of a process shares.
pub struct Shared {
    pub cfg: Arc<Config>,
    pub spool: Spool,
    pub committer: Committer,
    pub aliases: aliases::Cache,
    pub tls: Option<Arc<crate::tls::Server>>,
    pub throttle: crate::auth::Throttle,
    /// `[auth_checks]`, when enabled.
    pub checks: Option<crate::authcheck::Checker>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Port 25's role: mail from other MTAs.
    Smtp,
    /// Port 587's role: users' clients, AUTH required.
    Submission,
    /// Port 465's role: submission with implicit TLS.
    Submissions,
    /// `sendmail -bs`: a local user on stdin/stdout.
    Local,
}

impl Kind {
    pub fn protocol(self) -> &'static str {
        match self {
            Kind::Smtp => "smtp",
            Kind::Submission => "submission",
            Kind::Submissions => "submissions",
            Kind::Local => "sendmail",
        }
    }
}

pub struct Peer {
    pub addr: Option<IpAddr>,
    /// The local user of a `sendmail -bs` session.
    pub local_user: Option<String>,
    /// The envelope sender an untrusted local user is held to.
    pub forced_sender: Option<Address>,
}

struct Transaction {
    sender: Option<Address>,
    recipients: Vec<Recipient>,
    ret: Option<DsnRet>,
    envid: Option<String>,
    smtputf8: bool,
    eightbit: bool,
    /// The message being received by BDAT, and the line-end check over its chunks.
    chunks: Option<Receiver>,
    chunk_check: data::ChunkCheck,
    chunk_error: Option<data::DataError>,
    /// What SPF said at MAIL FROM, when `[auth_checks]` checks this session's mail.
    spf: Option<mail_auth::SpfOutput>,
    /// The output queue the message goes to without the router, decided when it starts.
    direct: Option<qms_router::direct::Plan>,
}

pub struct Session<'a> {
    shared: &'a Shared,
    kind: Kind,
    peer: Peer,
    conn: Conn,
    helo: Option<String>,
    esmtp: bool,
    auth_user: Option<String>,
    tls: Option<String>,
    /// The certificate the client showed in the TLS handshake, as checked.
    tls_client: Option<crate::tls::ClientCert>,
    tx: Option<Transaction>,
    errors: u32,
}

enum Flow {
    Continue,
    Close,
}

fn client_name(peer: &Peer) -> String {
    match (&peer.addr, &peer.local_user) {
        (Some(a), _) => format!("[{a}]"),
        (None, Some(u)) => format!("local:{u}"),
        _ => "unknown".into(),
    }
}

impl<'a> Session<'a> {
    pub fn new(shared: &'a Shared, kind: Kind, peer: Peer, conn: Conn) -> Session<'a> {
        Session {
            shared,
            kind,
            peer,
            conn,
            helo: None,
            esmtp: false,
            auth_user: None,
            tls: None,
            tls_client: None,
            tx: None,
            errors: 0,
        }
    }

    /// Marks the session as encrypted from the start (port 465's role).
    pub fn with_tls(mut self, h: crate::tls::Handshake) -> Session<'a> {
        self.tls = Some(h.info);
        self.tls_client = h.client;
        self
    }

    /// AUTH is offered under TLS, or in the clear from loopback when the config allows it.
    fn auth_offered(&self) -> bool {
        (self.cfg().auth.users.is_some() || self.cfg().auth.dovecot.is_some())
            && (self.tls.is_some()
                || (self.cfg().auth.plaintext_loopback
                    && self.peer.addr.is_some_and(|a| a.is_loopback())))
    }

    fn cfg(&self) -> &Config {
        &self.shared.cfg
    }

    /// Relaying to any domain is allowed for authenticated users, `mynetworks` and local users.
    fn may_relay(&self) -> bool {
        self.auth_user.is_some()
            || self.tls_client.as_ref().is_some_and(|c| c.relay)
            || self.kind == Kind::Local
            || self
                .peer
                .addr
                .is_some_and(|ip| self.cfg().mynetworks.iter().any(|n| n.contains(ip)))
    }

    pub fn run(mut self) {
        let client = client_name(&self.peer);
        qlog!(
            "event=connect client={client} service={}",
            self.kind.protocol()
        );
        let service = [("service", self.kind.protocol())];
        qms_common::metrics::count("qms_connections_total", &service, 1.0);
        let banner = format!("220 {} ESMTP qms", self.cfg().hostname);
        self.conn.reply(&banner);
        // One buffer for every command line of the session.
        let mut line = Vec::new();
        loop {
            let limit = self.cfg().limits.command_line;
            let end = match self.conn.read_line_into(limit, &mut line) {
                Ok(end) => end,
                Err(e) => {
                    qlog!(
                        "event=disconnect client={client} reason={}",
                        quote(&e.to_string())
                    );
                    return;
                }
            };
            let flow = match end {
                LineEnd::Eof => break,
                LineEnd::TooLong { .. } => self.error("500 5.5.2 Line too long"),
                LineEnd::BareLf => self.error("500 5.5.2 Bare LF in command: lines end with CRLF"),
                LineEnd::Crlf => match std::str::from_utf8(&line) {
                    Ok(cmd) => self.command(cmd),
                    Err(_) => self.error("500 5.5.2 Command is not UTF-8"),
                },
            };
            if let Flow::Close = flow {
                break;
            }
            if !self.conn.has_buffered() && self.conn.flush().is_err() {
                break;
            }
        }
        let _ = self.conn.flush();
        qlog!("event=disconnect client={client}");
    }

    fn error(&mut self, reply: &str) -> Flow {
        self.errors += 1;
        if self.errors >= self.cfg().limits.errors {
            self.conn
                .reply("421 4.7.0 Too many errors, closing connection");
            return Flow::Close;
        }
        self.conn.reply(reply);
        Flow::Continue
    }

    fn command(&mut self, line: &str) -> Flow {
        let (verb, arg) = match line.find(' ') {
            Some(i) => (&line[..i], line[i + 1..].trim()),
            None => (line, ""),
        };
        // The verb in capitals on the stack: no verb we know is longer than eight letters.
        let mut upper = [0u8; 8];
        let verb: &[u8] = match upper.get_mut(..verb.len()) {
            Some(up) => {
                up.copy_from_slice(verb.as_bytes());
                up.make_ascii_uppercase();
                up
            }
            None => b"?",
        };
        match verb {
            b"EHLO" => self.hello(arg, true),
            b"HELO" => self.hello(arg, false),
            b"MAIL" => self.mail(arg),
            b"RCPT" => self.rcpt(arg),
            b"DATA" => self.data(arg),
            b"BDAT" => self.bdat(arg),
            b"RSET" => {
                self.tx = None;
                self.conn.reply("250 2.0.0 Ok");
                Flow::Continue
            }
            b"NOOP" => {
                self.conn.reply("250 2.0.0 Ok");
                Flow::Continue
            }
            b"QUIT" => {
                self.conn.reply("221 2.0.0 Bye");
                Flow::Close
            }
            b"VRFY" => {
                self.conn.reply(
                    "252 2.5.2 Cannot VRFY user, but will accept message and attempt delivery",
                );
                Flow::Continue
            }
            b"EXPN" => self.error("502 5.5.1 EXPN is disabled"),
            b"HELP" => {
                self.conn.reply("214 2.0.0 See RFC 5321; commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP");
                Flow::Continue
            }
            b"STARTTLS" => self.starttls(arg),
            b"AUTH" => self.auth(arg),
            b"" => self.error("500 5.5.2 Error: empty command"),
            _ => self.error("500 5.5.2 Error: command not recognized"),
        }
    }

    fn hello(&mut self, arg: &str, esmtp: bool) -> Flow {
        let name = arg.split_whitespace().next().unwrap_or("");
        if name.is_empty() {
            return self.error(&format!(
                "501 5.5.4 Syntax: {} hostname",
                if esmtp { "EHLO" } else { "HELO" }
            ));
        }
        self.helo = Some(name.to_string());
        self.esmtp = esmtp;
        self.tx = None;
        let host = self.cfg().hostname.clone();
        if !esmtp {
            self.conn.reply(&format!("250 {host}"));
            return Flow::Continue;
        }
        let size = self.cfg().limits.message_size;
        let lines = [
            host,
            "PIPELINING".into(),
            format!("SIZE {size}"),
            "8BITMIME".into(),
            "SMTPUTF8".into(),
            "ENHANCEDSTATUSCODES".into(),
            "DSN".into(),
            "CHUNKING".into(),
        ];
        let mut lines = lines.to_vec();
        if self.shared.tls.is_some() && self.tls.is_none() {
            lines.push("STARTTLS".into());
        }
        if self.auth_offered() && self.auth_user.is_none() {
            lines.push("AUTH PLAIN LOGIN".into());
        }
        lines.push("HELP".into());
        for (i, l) in lines.iter().enumerate() {
            let sep = if i + 1 == lines.len() { ' ' } else { '-' };
            self.conn.reply(&format!("250{sep}{l}"));
        }
        Flow::Continue
    }

    fn mail(&mut self, arg: &str) -> Flow {
        if self.helo.is_none() {
            return self.error("503 5.5.1 Error: send HELO/EHLO first");
        }
        if self.tx.is_some() {
            return self.error("503 5.5.1 Error: nested MAIL command");
        }
        if matches!(self.kind, Kind::Submission | Kind::Submissions) && self.auth_user.is_none() {
            return self.error("530 5.7.0 Authentication required");
        }
        let Some((path, params)) = parse_path(arg, "FROM:") else {
            return self.error("501 5.5.4 Syntax: MAIL FROM:<address>");
        };
        let mut sender = if path.is_empty() {
            None
        } else {
            match Address::parse(&path) {
                Ok(a) => Some(a),
                Err(e) => return self.error(&format!("501 5.1.7 Bad sender address syntax: {e}")),
            }
        };
        let mut tx = Transaction {
            sender: None,
            recipients: Vec::new(),
            ret: None,
            envid: None,
            smtputf8: false,
            eightbit: false,
            chunks: None,
            chunk_check: data::ChunkCheck::default(),
            chunk_error: None,
            spf: None,
            direct: None,
        };
        let mut declared = 0;
        for p in params {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            match k.to_ascii_uppercase().as_str() {
                "SIZE" => match v.parse::<u64>() {
                    Ok(n) if n > self.cfg().limits.message_size => {
                        return self.error("552 5.3.4 Message size exceeds fixed limit");
                    }
                    Ok(n) => declared = n,
                    Err(_) => return self.error("501 5.5.4 Bad SIZE parameter"),
                },
                "BODY" => match v.to_ascii_uppercase().as_str() {
                    "7BIT" => {}
                    "8BITMIME" => tx.eightbit = true,
                    _ => return self.error("501 5.5.4 BODY is 7BIT or 8BITMIME"),
                },
                "SMTPUTF8" if v.is_empty() => tx.smtputf8 = true,
                "RET" => match v.to_ascii_uppercase().as_str() {
                    "FULL" => tx.ret = Some(DsnRet::Full),
                    "HDRS" => tx.ret = Some(DsnRet::Hdrs),
                    _ => return self.error("501 5.5.4 RET is FULL or HDRS"),
                },
                "ENVID" => match xtext_decode(v) {
                    Some(id) if id.len() <= 100 && printable(&id) => tx.envid = Some(id),
                    _ => return self.error("501 5.5.4 Bad ENVID parameter"),
                },
                "AUTH" => {}
                _ => return self.error(&format!("555 5.5.4 Unsupported parameter {k}")),
            }
        }
        if sender.as_ref().is_some_and(Address::is_utf8) && !tx.smtputf8 {
            return self.error("553 5.6.7 Non-ASCII address needs SMTPUTF8");
        }
        let reserve = qms_spool::reserve::Reserve::of(self.cfg());
        if let Err(why) = qms_spool::reserve::check(self.shared.spool.root(), &reserve, declared) {
            qlog!(
                "client={} status=reject reason={}",
                client_name(&self.peer),
                quote(&why)
            );
            self.conn.reply("452 4.3.1 Insufficient system storage");
            return Flow::Continue;
        }
        // An authenticated user sends only as themselves, on every listener.
        if let (Some(user), Some(addr)) = (&self.auth_user, &sender) {
            if !crate::auth::may_send_as(self.cfg(), user, addr) {
                qlog!("client={} sasl_user={user} from={addr} status=reject reason=\"sender not owned\"", client_name(&self.peer));
                return self.error(&format!(
                    "553 5.7.1 <{addr}>: Sender address rejected: not owned by user {user}"
                ));
            }
        }
        if let Some(forced) = &self.peer.forced_sender {
            if sender.as_ref() != Some(forced) {
                qlog!(
                    "client={} status=sender-replaced from={} to={forced}",
                    client_name(&self.peer),
                    qms_common::address::show_sender(&sender)
                );
                sender = Some(forced.clone());
            }
        }
        if let Some((checks, ip)) = self.checked() {
            let helo = self.helo.clone().unwrap_or_default();
            let from = sender.as_ref().map(|a| a.to_string()).unwrap_or_default();
            let (spf, refuse) = checks.spf(ip, &helo, &from);
            if let Some(reply) = refuse {
                qlog!(
                    "client={} status=reject from={} spf={} reason={}",
                    client_name(&self.peer),
                    quote(&from),
                    spf.result(),
                    quote(&reply)
                );
                return self.error(&reply);
            }
            tx.spf = Some(spf);
        }
        tx.sender = sender;
        self.tx = Some(tx);
        self.conn.reply("250 2.1.0 Ok");
        Flow::Continue
    }

    /// The checker and the client's address, when `[auth_checks]` checks this session: mail
    /// over SMTP from a client neither authenticated nor in mynetworks.
    fn checked(&self) -> Option<(&crate::authcheck::Checker, std::net::IpAddr)> {
        let ip = self.peer.addr?;
        (self.kind == Kind::Smtp && !self.may_relay())
            .then_some(())
            .and(self.shared.checks.as_ref())
            .map(|c| (c, ip))
    }

    fn rcpt(&mut self, arg: &str) -> Flow {
        if self.tx.is_none() {
            return self.error("503 5.5.1 Error: need MAIL command");
        }
        let Some((path, params)) = parse_path(arg, "TO:") else {
            return self.error("501 5.5.4 Syntax: RCPT TO:<address>");
        };
        let path = if path.eq_ignore_ascii_case("postmaster") {
            self.cfg().postmaster.to_string()
        } else {
            path
        };
        let addr = match Address::parse(&path) {
            Ok(a) => a,
            Err(e) => return self.error(&format!("501 5.1.3 Bad recipient address syntax: {e}")),
        };
        let mut rcpt = Recipient::new(addr.clone());
        for p in params {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            match k.to_ascii_uppercase().as_str() {
                "NOTIFY" => {
                    let mut notify = Vec::new();
                    for n in v.split(',') {
                        notify.push(match n.to_ascii_uppercase().as_str() {
                            "NEVER" => Notify::Never,
                            "SUCCESS" => Notify::Success,
                            "FAILURE" => Notify::Failure,
                            "DELAY" => Notify::Delay,
                            _ => return self.error("501 5.5.4 Bad NOTIFY parameter"),
                        });
                    }
                    if notify.contains(&Notify::Never) && notify.len() > 1 {
                        return self.error("501 5.5.4 NOTIFY=NEVER cannot be combined");
                    }
                    rcpt.notify = notify;
                }
                "ORCPT" => match v
                    .split_once(';')
                    .and_then(|(t, a)| Some(format!("{t};{}", xtext_decode(a)?)))
                {
                    Some(o) if o.len() <= 500 && printable(&o) => rcpt.orcpt = Some(o),
                    _ => return self.error("501 5.5.4 Bad ORCPT parameter"),
                },
                _ => return self.error(&format!("555 5.5.4 Unsupported parameter {k}")),
            }
        }
        let tx = self
            .tx
            .as_ref()
            .map(|t| (t.recipients.len(), t.smtputf8))
            .unwrap_or_default();
        if tx.0 >= self.cfg().limits.recipients {
            self.conn.reply("452 4.5.3 Error: too many recipients");
            return Flow::Continue;
        }
        if addr.is_utf8() && !tx.1 {
            return self.error("553 5.6.7 Non-ASCII address needs SMTPUTF8");
        }
        let aliases = self.shared.aliases.get();
        if let Some(reply) = policy::check_recipient(self.cfg(), &aliases, &addr, self.may_relay())
        {
            qlog!(
                "client={} status=reject from={} to={} reply={}",
                client_name(&self.peer),
                self.tx
                    .as_ref()
                    .map(|t| qms_common::address::logged_sender(&t.sender))
                    .unwrap_or_default(),
                qms_common::address::logged(&addr),
                quote(&reply)
            );
            qms_common::metrics::count("qms_rejects_total", &[("stage", "rcpt")], 1.0);
            return self.error(&reply);
        }
        if let Some(t) = self.tx.as_mut() {
            t.recipients.push(rcpt);
        }
        self.conn.reply("250 2.1.5 Ok");
        Flow::Continue
    }

    fn data(&mut self, arg: &str) -> Flow {
        if !arg.is_empty() {
            return self.error("501 5.5.4 Syntax: DATA");
        }
        match &self.tx {
            None => return self.error("503 5.5.1 Error: need MAIL command"),
            Some(t) if t.recipients.is_empty() => {
                return self.error("554 5.5.1 Error: no valid recipients")
            }
            Some(t) if t.chunks.is_some() => return self.error("503 5.5.1 Error: DATA after BDAT"),
            _ => {}
        }
        self.conn.reply("354 End data with <CR><LF>.<CR><LF>");
        if self.conn.flush().is_err() {
            return Flow::Close;
        }
        self.conn.set_timeout(self.cfg().limits.data_timeout);
        let flow = self.read_message();
        self.conn.set_timeout(self.cfg().limits.command_timeout);
        flow
    }

    fn read_message(&mut self) -> Flow {
        let (max, line) = (self.cfg().limits.message_size, self.cfg().limits.text_line);
        let mut rx = self.receiver();
        match data::read_data(&mut self.conn, max, line, &mut |l| rx.feed(l)) {
            Err(_) | Ok(Data::Eof) => {
                drop(rx);
                qlog!(
                    "client={} status=lost reason=\"connection lost in DATA\"",
                    client_name(&self.peer)
                );
                self.tx = None;
                Flow::Close
            }
            Ok(Data::Refused(e)) => {
                drop(rx);
                self.tx = None;
                let reply = e.reply(max, line);
                self.error(&reply)
            }
            Ok(Data::Complete) => {
                self.finish(rx);
                Flow::Continue
            }
        }
    }

    /// Starts receiving the transaction's message into its spool file: in `msg/ID.QUEUE`
    /// of the queue the direct route plans for it, else of `incoming`.
    fn receiver(&mut self) -> Receiver {
        // A checked message gets an Authentication-Results field from the router: no plan.
        let checked = self.checked().is_some();
        let plan = self.tx.as_ref().filter(|_| !checked).and_then(|t| {
            let aliases = self.shared.aliases.get();
            let (sender, rcpts) = (t.sender.as_ref(), &t.recipients[..]);
            qms_router::direct::Plan::of(
                &self.shared.cfg,
                &aliases,
                sender,
                rcpts,
                self.may_relay(),
            )
        });
        let queue = plan.as_ref().map_or("incoming", |p| p.queue()).to_string();
        if let Some(t) = self.tx.as_mut() {
            t.direct = plan;
        }
        let cfg = &self.shared.cfg;
        let proto = match (self.esmtp, self.tls.is_some(), self.auth_user.is_some()) {
            (false, _, _) => "SMTP",
            (true, false, false) => "ESMTP",
            (true, true, false) => "ESMTPS",
            (true, false, true) => "ESMTPA",
            (true, true, true) => "ESMTPSA",
        };
        let addr = self.peer.addr.map(|a| a.to_string());
        let for_rcpt = self
            .tx
            .as_ref()
            .filter(|t| t.recipients.len() == 1)
            .map(|t| t.recipients[0].address.to_string());
        let hop = headers::Hop {
            helo: self.helo.as_deref(),
            addr: addr.as_deref(),
            local_user: self.peer.local_user.as_deref(),
            by: &cfg.hostname,
            proto,
            tls: self.tls.as_deref(),
            for_rcpt,
        };
        let submission = matches!(
            self.kind,
            Kind::Submission | Kind::Submissions | Kind::Local
        );
        let received = |id: &QueueId| headers::received(&hop, id.as_str(), qms_common::time::now());
        Receiver::start(
            &self.shared.spool,
            &queue,
            &received,
            submission,
            &cfg.hostname,
        )
    }

    fn bdat(&mut self, arg: &str) -> Flow {
        let mut words = arg.split_whitespace();
        let size = words.next().and_then(|s| s.parse::<u64>().ok());
        let last = match words.next() {
            None => Some(false),
            Some(w) if w.eq_ignore_ascii_case("LAST") => Some(true),
            Some(_) => None,
        };
        let (Some(size), Some(last)) = (size, last) else {
            // Without a valid size the chunk cannot be skipped: the stream is out of step.
            self.conn.reply("501 5.5.4 Syntax: BDAT size [LAST]");
            return Flow::Close;
        };
        let (max, line) = (self.cfg().limits.message_size, self.cfg().limits.text_line);
        let ok_tx = self.tx.as_ref().is_some_and(|t| !t.recipients.is_empty());
        if ok_tx && self.tx.as_ref().is_some_and(|t| t.chunks.is_none()) {
            let rx = self.receiver();
            if let Some(t) = self.tx.as_mut() {
                t.chunks = Some(rx);
            }
        }
        let room = self
            .tx
            .as_ref()
            .and_then(|t| t.chunks.as_ref())
            .map_or(0, |r| r.size)
            + size
            <= max;
        self.conn.set_timeout(self.cfg().limits.data_timeout);
        let read = match self.tx.as_mut() {
            Some(t) if ok_tx && room && t.chunk_error.is_none() => {
                let (rx, check) = (&mut t.chunks, &mut t.chunk_check);
                let mut sink = |b: &[u8]| {
                    check.feed(b, line);
                    if let Some(rx) = rx.as_mut() {
                        rx.feed(b);
                    }
                };
                self.conn.read_exact_into(size, Some(&mut sink))
            }
            _ => self.conn.read_exact_into(size, None),
        };
        self.conn.set_timeout(self.cfg().limits.command_timeout);
        match read {
            Ok(true) => {}
            _ => {
                self.tx = None;
                return Flow::Close;
            }
        }
        if !ok_tx {
            return self.error(if self.tx.is_none() {
                "503 5.5.1 Error: need MAIL command"
            } else {
                "554 5.5.1 Error: no valid recipients"
            });
        }
        let Some(t) = self.tx.as_mut() else {
            return Flow::Continue;
        };
        if !room {
            t.chunk_error = Some(data::DataError::TooBig);
        }
        if !last {
            self.conn.reply(&format!("250 2.0.0 {size} bytes received"));
            return Flow::Continue;
        }
        let err = t
            .chunk_error
            .take()
            .or_else(|| t.chunk_check.finish(line).err());
        let rx = t.chunks.take();
        if let Some(e) = err {
            drop(rx);
            self.tx = None;
            let reply = e.reply(max, line);
            return self.error(&reply);
        }
        match rx {
            Some(rx) => self.finish(rx),
            None => self.tx = None,
        }
        Flow::Continue
    }

    /// `[auth_checks]` at the end of DATA: the results go into the job for the router to
    /// write, or the message is refused (and its file dropped; None).
    fn verdict(
        &mut self,
        spf: Option<&mail_auth::SpfOutput>,
        job: &mut Job,
        mut w: qms_spool::Writer,
    ) -> Option<qms_spool::Writer> {
        let (Some(spf), Some((checks, ip))) = (spf, self.checked()) else {
            return Some(w);
        };
        let msg = match w.map() {
            Ok(m) => m,
            Err(e) => {
                qlog!(
                    "client={} status=warning reason={}",
                    client_name(&self.peer),
                    quote(&e.to_string())
                );
                return Some(w);
            }
        };
        let helo = self.helo.clone().unwrap_or_default();
        let from = qms_common::address::show_sender(&job.sender);
        let from = from.trim_matches(['<', '>']);
        let seal = self.may_forward(job);
        let v = checks.message(&msg, spf, ip, &helo, from, seal);
        drop(msg);
        if let Some(reply) = v.refuse {
            qlog!(
                "client={} status=reject from={} results={} reply={}",
                client_name(&self.peer),
                quote(from),
                quote(&v.results),
                quote(&reply)
            );
            self.shared.spool.discard(w);
            self.conn.reply(&reply);
            return None;
        }
        job.auth_results = Some(v.results);
        job.arc_seal = v.arc_set;
        job.quarantine = v.quarantine;
        Some(w)
    }

    /// With `[arc]`: whether a recipient is reached through an alias (which may forward it to
    /// another domain): such a message is sealed. Others are only passed on as they came.
    fn may_forward(&self, job: &Job) -> bool {
        let cfg = &self.shared.cfg;
        if cfg.arc.is_none() {
            return false;
        }
        let aliases = self.shared.aliases.get();
        let expander = qms_common::expand::Expander::new(cfg, &aliases);
        job.recipients
            .iter()
            .any(|r| expander.direct(&r.address).is_none())
    }

    /// Spools the message and answers 250 only once it is durable.
    fn finish(&mut self, mut rx: Receiver) {
        let spool = &self.shared.spool;
        let Some(tx) = self.tx.take() else {
            drop(rx);
            return;
        };
        let cfg = self.shared.cfg.clone();
        if headers::count(rx.head(), "received") >= cfg.limits.hops {
            drop(rx);
            self.conn.reply("554 5.4.6 Too many hops (mail loop?)");
            return;
        }
        let client = Client {
            addr: self.peer.addr.map(|a| a.to_string()),
            helo: self.helo.clone(),
            auth: self.auth_user.clone(),
            tls: self.tls.clone(),
            local_user: self.peer.local_user.clone(),
            trusted: self.may_relay(),
        };
        let mut job = Job::new(
            "incoming",
            tx.sender.clone(),
            tx.recipients,
            client,
            self.kind.protocol(),
            &cfg.outgoing,
        );
        job.ret = tx.ret;
        job.envid = tx.envid;
        job.smtputf8 = tx.smtputf8;
        job.eightbit = tx.eightbit;
        let rcpts: Vec<String> = job
            .recipients
            .iter()
            .map(|r| r.address.to_string())
            .collect();
        let sender = qms_common::address::logged_sender(&job.sender);
        job.message_id = rx
            .added_id
            .clone()
            .or_else(|| headers::message_id_of(rx.head()));
        let size = rx.size;
        let tracked = job.clone();
        // Stamped before the job can be seen: the router's "routed" must come after it.
        let received_at = qms_common::time::now_micros();
        let plain = rx
            .whole_head()
            .is_some_and(qms_router::direct::asks_nothing);
        let written = match rx.end() {
            Ok(w) => match self.verdict(tx.spf.as_ref(), &mut job, w) {
                Some(w) => Ok(w),
                None => return,
            },
            Err(e) => Err(e),
        };
        let planned = tx.direct.is_some();
        let direct = tx.direct.filter(|p| plain && p.apply(&mut job));
        // Started for an output queue, but the router must see it after all.
        let written = written.and_then(|mut w| match (planned, &direct) {
            (true, None) => match spool.refile(&mut w, "incoming") {
                Ok(()) => Ok(w),
                Err(e) => {
                    spool.discard(w);
                    Err(e)
                }
            },
            _ => Ok(w),
        });
        // `spf=pass dkim=none arc=none dmarc=pass`, when the checks ran: for the log, tracking, metrics.
        let checked = job.auth_results.as_deref().map(crate::authcheck::summary);
        let result = written
            .and_then(|w| spool.stage_written(job, w))
            .and_then(|staged| self.shared.committer.commit(staged));
        match result {
            Ok(id) => {
                self.log_queued(
                    &id,
                    &Queued {
                        sender: &sender,
                        rcpts: &rcpts,
                        size,
                        job: &tracked,
                        checked: checked.as_ref(),
                        received_at,
                        direct: direct.as_ref(),
                    },
                );
                self.conn.reply(&format!("250 2.0.0 Ok: queued as {id}"));
            }
            Err(e) => {
                qlog!(
                    "client={} from={sender} status=tempfail reason={}",
                    client_name(&self.peer),
                    quote(&e.to_string())
                );
                if e.is_no_space() {
                    self.conn.reply("452 4.3.1 Insufficient system storage");
                } else {
                    self.conn.reply("451 4.3.0 Error: queue file write error");
                }
            }
        }
    }
}

/// What the log line and tracking events of a message just queued say.
struct Queued<'a> {
    /// The envelope sender as a log value.
    sender: &'a str,
    rcpts: &'a [String],
    size: u64,
    /// The job as it was before the direct route or the checks changed it.
    job: &'a Job,
    checked: Option<&'a crate::authcheck::Summary>,
    /// When the message was received (µs), stamped before its job could be seen.
    received_at: u64,
    direct: Option<&'a qms_router::direct::Plan>,
}

impl Session<'_> {
    /// Logs and tracks a message queued as `id`: the `queued` line and, by the direct route,
    /// the `routed` line go out in one write.
    fn log_queued(&self, id: &QueueId, q: &Queued) {
        qms_common::log::together(|| {
            qlog!(
                "qid={id} client={} helo={} from={} to={} size={} nrcpt={} msgid={} tls={} sasl_user={} {}status=queued",
                client_name(&self.peer),
                quote(self.helo.as_deref().unwrap_or("")),
                q.sender,
                quote(&q.rcpts.join(",")),
                q.size,
                q.rcpts.len(),
                quote(q.job.message_id.as_deref().unwrap_or("")),
                quote(self.tls.as_deref().unwrap_or("none")),
                quote(self.auth_user.as_deref().unwrap_or("-")),
                // One line per message, so log readers count it once.
                q.checked.map(|c| format!("{} ", c.line())).unwrap_or_default()
            );
            if let Some(c) = q.checked {
                c.count();
            }
            let protocol = [("protocol", self.kind.protocol())];
            qms_common::metrics::count("qms_messages_received_total", &protocol, 1.0);
            let mut events: Vec<_> = q
                .job
                .recipients
                .iter()
                .map(|r| {
                    let mut ev = q.job.track(&r.address, "received", "", "queued");
                    ev.qid = id.to_string();
                    ev.time = q.received_at;
                    ev.reply = q.checked.map(|c| c.line());
                    ev
                })
                .collect();
            if let Some(plan) = q.direct {
                events.extend(plan.announce(id.as_str(), q.job, q.received_at + 1));
            }
            qms_common::track::emit_all(events);
        });
    }
}

/// Splits `FROM:<addr> PARAM=V …` into the address (without brackets) and the parameters.
fn parse_path<'l>(arg: &'l str, prefix: &str) -> Option<(String, Vec<&'l str>)> {
    // `get` and not indexing: the client's bytes may put a UTF-8 character across the cut.
    if !arg.get(..prefix.len())?.eq_ignore_ascii_case(prefix) {
        return None;
    }
    let rest = arg.get(prefix.len()..)?.trim_start();
    let rest = rest.strip_prefix('<')?;
    let end = rest.find('>')?;
    let mut path = &rest[..end];
    // A source route (@a,@b:user@host) is accepted and ignored (RFC 5321 4.1.2).
    if path.starts_with('@') {
        path = path.split_once(':').map(|(_, p)| p)?;
    }
    let params = rest[end + 1..].split_whitespace().collect();
    Some((path.to_string(), params))
}

/// RFC 3461 xtext: `+XX` is a hex-encoded byte.
/// RFC 3461: a decoded ENVID or ORCPT is printable US-ASCII; a CR or LF in one would reach
/// the reports qms writes.
fn printable(s: &str) -> bool {
    s.bytes().all(|b| (0x20..0x7f).contains(&b))
}

fn xtext_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'+' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else if (33..=126).contains(&b[i]) && b[i] != b'=' {
            out.push(b[i]);
            i += 1;
        } else {
            return None;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_paths() {
        let (p, params) = parse_path("FROM:<a@b.test> SIZE=10 BODY=8BITMIME", "FROM:").unwrap();
        assert_eq!(p, "a@b.test");
        assert_eq!(params, vec!["SIZE=10", "BODY=8BITMIME"]);
        assert_eq!(parse_path("from: <>", "FROM:").unwrap().0, "");
        assert_eq!(
            parse_path("TO:<@r1,@r2:u@h.test>", "TO:").unwrap().0,
            "u@h.test"
        );
        assert!(parse_path("TO:u@h.test", "TO:").is_none());
        assert_eq!(xtext_decode("a+2Bb").unwrap(), "a+b");
    }

    /// Found by the fuzzer: a multi-byte character across the `FROM:` prefix length.
    #[test]
    fn non_ascii_at_the_prefix_boundary() {
        assert!(parse_path("\r\0.OO\u{42f}\r\r", "FROM:").is_none());
        assert!(parse_path("TO:\u{42f}", "FROM:").is_none());
        assert!(parse_path("ЯЯЯ", "TO:").is_none());
    }
}
