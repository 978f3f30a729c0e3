//! One SMTP session (RFC 5321) on any stream: a TCP connection, or stdin/stdout for
//! `sendmail -bs`. It ends in a durable job in the `incoming` queue or in nothing.
//!
//! Here: the greeting, the command loop and HELO/EHLO. The envelope (MAIL, RCPT) is in
//! `session/envelope.rs`, the message (DATA, BDAT and the job it becomes) in
//! `session/message.rs`, STARTTLS and AUTH in `session/secure.rs`.

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

mod envelope;
mod message;
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

impl Transaction {
    /// A transaction that MAIL is starting: no sender yet, no recipients.
    fn new() -> Transaction {
        Transaction {
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
        }
    }
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
}
