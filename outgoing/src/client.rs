//! The SMTP client: one connection to one host, EHLO and opportunistic STARTTLS (or TLS
//! from the first byte), AUTH for smarthosts, then transactions with a reply for every
//! recipient, pipelined when the server offers it. With `debug` set, every line of the
//! dialogue is logged (credentials and message text never).

use crate::peer::{Peer, Socket};
use base64::Engine;
use qms_common::config::TlsPolicy;
use qms_common::conn::{Conn, Line};
use qms_common::log::quote;
use qms_common::qlog;
use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

mod secure;

/// The most of one reply the agent holds: far more than any server's EHLO or banner, far
/// less than a server that never stops sending lines could make it hold.
const MAX_REPLY_BYTES: usize = 64 * 1024;

/// A server reply: its code and its text (lines joined with a space).
#[derive(Clone, Debug)]
pub struct Reply {
    pub code: u16,
    pub text: String,
}

impl Reply {
    pub fn is_ok(&self) -> bool {
        (200..400).contains(&self.code)
    }

    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// Why a connection could not be used; the text names host, address and port.
#[derive(Debug)]
pub struct Failure {
    pub text: String,
    /// The server refused us for good (5xx greeting or EHLO/HELO).
    pub permanent: bool,
}

#[derive(Default, Debug, Clone)]
pub struct Extensions {
    pub pipelining: bool,
    pub size: Option<u64>,
    pub eightbit: bool,
    pub smtputf8: bool,
    pub dsn: bool,
    pub starttls: bool,
    /// SASL mechanisms offered, upper case.
    pub auth: Vec<String>,
}

pub struct Client {
    conn: Conn,
    socket: Socket,
    pub name: String,
    pub peer: Peer,
    pub ext: Extensions,
    pub tls: Option<String>,
    pub idle_since: Instant,
    /// The TLS rule the connection was made under: it is reused only for the same rule.
    pub made_for: String,
    /// The server's certificate was checked (verify, secure, dane, credentials) and passed.
    pub verified: bool,
    /// What asked for the check: a level, `mta-sts`, or `credentials`.
    pub checked_by: Option<String>,
    /// Why the certificate would not have passed, when it was only observed (MTA-STS in
    /// `testing` mode).
    pub tls_problem: Option<String>,
    timeouts: (u64, u64),
    /// The timeout of the phase now (commands or data), in seconds: a reply's time.
    wait: u64,
    /// The queue id the dialogue is logged under, for `BX-Sending-Run-Control: debug`.
    debug: Option<String>,
    lmtp: bool,
}

/// What one transaction sends.
pub struct Transaction<'a> {
    /// `MAIL FROM:<…>` plus parameters, already formatted for this server.
    pub mail: String,
    /// `RCPT TO:<…>` lines, one per recipient.
    pub rcpts: Vec<String>,
    pub message: &'a [u8],
}

/// The server's answer to one transaction.
pub struct Outcome {
    pub mail: Reply,
    /// One reply per RCPT, in order.
    pub rcpts: Vec<Reply>,
    /// The reply to the end of data, if data was sent.
    pub data: Option<Reply>,
    /// LMTP: the reply to the end of data for each recipient, in the order of `rcpts`
    /// (None for a recipient refused at RCPT).
    pub each: Vec<Option<Reply>>,
}

pub struct Settings<'a> {
    pub helo: &'a str,
    pub tls: TlsPolicy,
    pub connect_timeout: u64,
    pub command_timeout: u64,
    pub data_timeout: u64,
    /// TLS from the first byte (a smarthost's `ssl`, port 465).
    pub implicit_tls: bool,
    /// A client certificate and key to present, when the server asks.
    pub client_cert: Option<(&'a Path, &'a Path)>,
    /// Log the whole dialogue under this queue id.
    pub debug: Option<&'a str>,
    /// Check the server's certificate (`verify`, `secure`, a smarthost that gets
    /// credentials): TLS is then required, never given up for a plain connection.
    pub verify: Option<Verify<'a>>,
    /// Speak LMTP (RFC 2033): LHLO, and a reply per recipient after the data.
    pub lmtp: bool,
}

/// How the server's certificate is checked.
#[derive(Clone, Copy)]
pub struct Verify<'a> {
    /// Trusted certificates instead of the system's roots.
    pub ca: Option<&'a Path>,
    /// Names the certificate may carry (`secure`); empty: the name of the host connected to.
    pub names: &'a [String],
    /// What asks for the check, said in a deferral: a level, `mta-sts`, or credentials.
    pub why: &'a str,
    /// DANE: TLSA records to match instead of trusted roots.
    pub tlsa: &'a [crate::dane::Tlsa],
    /// Checked and reported, not required (an MTA-STS policy in `testing` mode).
    pub report_only: bool,
}

impl Verify<'_> {
    /// Whether a certificate that fails the check stops the connection.
    pub fn required(&self) -> bool {
        !self.report_only
    }
}

fn io_fail(host: &str, peer: &Peer, what: &str, e: impl std::fmt::Display) -> Failure {
    Failure {
        text: format!("{what} {host}{}: {e}", peer.place()),
        permanent: false,
    }
}

impl Client {
    /// Connects, reads the greeting, says EHLO and starts TLS as the policy asks.
    pub fn connect(name: &str, peer: &Peer, s: &Settings) -> Result<Client, Failure> {
        match Client::connect_once(name, peer, s, s.tls) {
            // `may`: a failed handshake falls back to a plain connection.
            Err(f)
                if s.tls == TlsPolicy::May
                    && !s.verify.is_some_and(|v| v.required())
                    && f.text.contains("TLS handshake") =>
            {
                Client::connect_once(name, peer, s, TlsPolicy::None)
            }
            other => other,
        }
    }

    fn connect_once(
        name: &str,
        peer: &Peer,
        s: &Settings,
        tls: TlsPolicy,
    ) -> Result<Client, Failure> {
        let mut c = Client::open(name, peer, s)?;
        let server = rustls::pki_types::ServerName::try_from(name.to_string())
            .unwrap_or_else(|_| peer.server_name());
        let check = secure::tls_check(s);
        let tls = if s.verify.is_some_and(|v| v.required()) {
            TlsPolicy::Encrypt
        } else {
            tls
        };
        if s.implicit_tls {
            c.start_tls(server.clone(), s, check, "TLS from the start")?;
        }
        let greeting = c
            .read_reply()
            .map_err(|e| io_fail(name, peer, "lost connection with", e))?;
        if !greeting.is_ok() {
            return Err(Failure {
                text: format!("host {name}{} refused to talk to me: {greeting}", peer.at()),
                permanent: greeting.is_permanent(),
            });
        }
        c.hello(s.helo)?;
        if tls == TlsPolicy::None || c.tls.is_some() || !c.ask_starttls(tls)? {
            return Ok(c);
        }
        c.start_tls(server, s, check, "TLS started")?;
        c.hello(s.helo)?;
        Ok(c)
    }

    /// A connection to `peer`, nothing said yet.
    fn open(name: &str, peer: &Peer, s: &Settings) -> Result<Client, Failure> {
        let socket = peer
            .connect(
                Duration::from_secs(s.connect_timeout),
                Duration::from_secs(s.command_timeout),
            )
            .map_err(|e| io_fail(name, peer, "connect to", e))?;
        let stream = socket
            .stream()
            .map_err(|e| io_fail(name, peer, "connect to", e))?;
        Ok(Client {
            conn: Conn::new(stream),
            socket,
            name: name.to_string(),
            peer: peer.clone(),
            ext: Extensions::default(),
            tls: None,
            idle_since: Instant::now(),
            made_for: String::new(),
            verified: false,
            checked_by: s.verify.map(|v| v.why.to_string()),
            tls_problem: None,
            timeouts: (s.command_timeout, s.data_timeout),
            wait: s.command_timeout,
            debug: s.debug.map(str::to_string),
            lmtp: s.lmtp,
        })
    }

    /// Notes a finished handshake: what it was, and whether the certificate passed.
    fn secured(&mut self, (info, observed): (String, Option<String>), s: &Settings) {
        self.tls = Some(info);
        self.verified = match s.verify {
            Some(v) if v.report_only => observed.is_none(),
            Some(_) => true,
            None => false,
        };
        self.tls_problem = observed;
    }

    /// For the delivery line and tracking: `TLSv1.3 with cipher …, subject …, issuer …,
    /// verified` (or `not verified`); None for a plain connection.
    pub fn tls_summary(&self) -> Option<String> {
        let how = match (self.verified, self.checked_by.as_deref(), &self.tls_problem) {
            (true, Some(w @ ("dane" | "dane-only" | "mta-sts")), _) => format!("verified ({w})"),
            (true, _, _) => "verified".to_string(),
            (false, _, Some(p)) => format!("not verified ({p})"),
            (false, _, None) => "not verified".to_string(),
        };
        self.tls.as_ref().map(|t| format!("{t}, {how}"))
    }

    fn hello(&mut self, helo: &str) -> Result<(), Failure> {
        let (name, peer) = (self.name.clone(), self.peer.clone());
        let verb = if self.lmtp { "LHLO" } else { "EHLO" };
        let r = self
            .command(&format!("{verb} {helo}"))
            .map_err(|e| io_fail(&name, &peer, "lost connection with", e))?;
        if r.is_ok() {
            self.ext = parse_ehlo(&r.text);
            return Ok(());
        }
        if self.lmtp {
            return Err(Failure {
                text: format!("host {name}{} refused LHLO: {r}", peer.at()),
                permanent: r.is_permanent(),
            });
        }
        let r = self
            .command(&format!("HELO {helo}"))
            .map_err(|e| io_fail(&name, &peer, "lost connection with", e))?;
        if !r.is_ok() {
            return Err(Failure {
                text: format!("host {name}{} refused HELO: {r}", peer.at()),
                permanent: r.is_permanent(),
            });
        }
        self.ext = Extensions::default();
        Ok(())
    }

    /// Logs one line of the dialogue when this connection is being debugged.
    fn trace(&self, dir: &str, line: &str) {
        if let Some(id) = &self.debug {
            qlog!(
                "qid={id} debug=smtp relay={}{} dir={} line={}",
                self.name,
                self.peer.place(),
                if dir.is_empty() { "-" } else { dir },
                quote(line)
            );
        }
    }

    /// Queues a command line; `shown` is what the debug log says instead (credentials).
    fn put(&mut self, line: &str, shown: Option<&str>) {
        self.trace(">", shown.unwrap_or(line));
        self.conn.reply(line);
    }

    /// AUTH PLAIN, or LOGIN when that is all the server offers; only under TLS. A refusal
    /// is temporary, as in Postfix: the password may be fixed before the message expires.
    pub fn authenticate(&mut self, user: &str, password: &str) -> Result<(), Failure> {
        let host = format!("{}{}", self.name, self.peer.at());
        let fail = |text: String| Failure {
            text,
            permanent: false,
        };
        if self.tls.is_none() {
            return Err(fail(format!(
                "will not send credentials to {host} without TLS"
            )));
        }
        let b64 = |s: &[u8]| base64::engine::general_purpose::STANDARD.encode(s);
        let lost = |e: io::Error| fail(format!("lost connection with {host} during AUTH: {e}"));
        let r = if self.ext.auth.iter().any(|m| m == "PLAIN") {
            let token = b64(format!("\0{user}\0{password}").as_bytes());
            self.put(
                &format!("AUTH PLAIN {token}"),
                Some("AUTH PLAIN (credentials hidden)"),
            );
            self.exchange().map_err(lost)?
        } else if self.ext.auth.iter().any(|m| m == "LOGIN") {
            self.put("AUTH LOGIN", None);
            let mut r = self.exchange().map_err(lost)?;
            for secret in [user, password] {
                if r.code != 334 {
                    break;
                }
                self.put(&b64(secret.as_bytes()), Some("(credentials hidden)"));
                r = self.exchange().map_err(lost)?;
            }
            r
        } else {
            return Err(fail(format!(
                "{host} offers no AUTH mechanism qms uses (PLAIN, LOGIN)"
            )));
        };
        if r.code == 235 {
            return Ok(());
        }
        Err(fail(format!(
            "authentication as {user} to {host} failed: {r}"
        )))
    }

    fn exchange(&mut self) -> io::Result<Reply> {
        self.conn.flush()?;
        self.read_reply()
    }

    /// Reads one reply, single or multi-line. Its lines share the timeout of the phase (RFC
    /// 5321 4.5.3.2 times a reply, not a read): a line that starts after it is up is not
    /// waited for, and within a line each read has what was left when the line began. It
    /// holds at most [`MAX_REPLY_BYTES`]: a server that trickles lines, or never stops
    /// sending them, is cut off instead of keeping the agent, or its memory, for as long as
    /// it likes.
    fn read_reply(&mut self) -> io::Result<Reply> {
        let wait = Duration::from_secs(self.wait);
        let deadline = Instant::now() + wait;
        let mut text = String::new();
        let mut shortened = false;
        let reply = loop {
            if !text.is_empty() {
                // A continuation line gets only what is left of the reply's time.
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break Err(io::ErrorKind::TimedOut.into());
                }
                let _ = self.socket.set_read_timeout(left);
                shortened = true;
            }
            let line = match self.reply_line() {
                Ok(l) => l,
                Err(e) => break Err(e),
            };
            if text.len() + line.len() >= MAX_REPLY_BYTES {
                break Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("reply longer than {MAX_REPLY_BYTES} bytes"),
                ));
            }
            let Some(code) = line
                .get(..3)
                .and_then(|c| c.parse::<u16>().ok())
                .filter(|c| (200..600).contains(c))
            else {
                break Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("malformed reply {line:?}"),
                ));
            };
            if !text.is_empty() {
                text.push(' ');
            }
            text.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                break Ok(Reply { code, text });
            }
        };
        if shortened {
            let _ = self.socket.set_read_timeout(wait);
        }
        reply.map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no whole reply within {} s", self.wait),
            ),
            _ => e,
        })
    }

    /// One line of a reply, traced.
    fn reply_line(&mut self) -> io::Result<String> {
        let line = match self.conn.read_line(4096)? {
            Line::Crlf(l) | Line::BareLf(l) => l,
            Line::TooLong { .. } => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "reply line too long",
                ))
            }
            Line::Eof => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed",
                ))
            }
        };
        let line = String::from_utf8_lossy(&line).into_owned();
        self.trace("<", &line);
        Ok(line)
    }

    fn command(&mut self, cmd: &str) -> io::Result<Reply> {
        self.put(cmd, None);
        self.exchange()
    }

    /// Runs one transaction. An I/O error means the connection is gone; the caller defers
    /// whatever has no final reply.
    pub fn send(&mut self, tx: &Transaction) -> io::Result<Outcome> {
        self.idle_since = Instant::now();
        let (mail, rcpts, data_go) = match self.envelope(tx)? {
            Ok(replies) => replies,
            Err(stopped) => return Ok(stopped),
        };
        if data_go.code != 354 {
            // Nothing to send (all recipients refused, or DATA refused): clear the state.
            self.command("RSET")?;
            let data = (mail.is_ok() && rcpts.iter().any(Reply::is_ok)).then_some(data_go);
            return Ok(Outcome {
                mail,
                rcpts,
                data,
                each: Vec::new(),
            });
        }
        if !mail.is_ok() || !rcpts.iter().any(Reply::is_ok) {
            // A pipelining server that took DATA without recipients: end it empty.
            self.trace(">", ".");
            self.conn.send_raw(b".\r\n");
            self.conn.flush()?;
            let _ = self.read_reply()?;
            self.command("RSET")?;
            return Ok(stopped(mail, rcpts));
        }
        let (data, each) = self.message(tx, &rcpts)?;
        Ok(Outcome {
            mail,
            rcpts,
            data: Some(data),
            each,
        })
    }

    /// MAIL, RCPT and DATA: their replies, or (without pipelining, where the client stops at
    /// a refused MAIL or when every RCPT was refused) the outcome, the session reset.
    fn envelope(&mut self, tx: &Transaction) -> io::Result<Result<Replies, Outcome>> {
        let mut rcpts = Vec::with_capacity(tx.rcpts.len());
        if self.ext.pipelining {
            // RFC 2920: MAIL, every RCPT and DATA in one write; replies come back in order.
            self.put(&tx.mail, None);
            for r in &tx.rcpts {
                self.put(r, None);
            }
            self.put("DATA", None);
            self.conn.flush()?;
            let mail = self.read_reply()?;
            for _ in &tx.rcpts {
                rcpts.push(self.read_reply()?);
            }
            let data = self.read_reply()?;
            return Ok(Ok((mail, rcpts, data)));
        }
        let mail = self.command(&tx.mail)?;
        if !mail.is_ok() {
            self.command("RSET")?;
            return Ok(Err(stopped(mail, rcpts)));
        }
        for r in &tx.rcpts {
            rcpts.push(self.command(r)?);
        }
        if !rcpts.iter().any(Reply::is_ok) {
            self.command("RSET")?;
            return Ok(Err(stopped(mail, rcpts)));
        }
        let data = self.command("DATA")?;
        Ok(Ok((mail, rcpts, data)))
    }

    /// Sends the message after a 354 and reads the reply to it: one, or with LMTP (RFC 2033
    /// 4.2) one for each recipient RCPT accepted, in order (the first stands for all).
    fn message(
        &mut self,
        tx: &Transaction,
        rcpts: &[Reply],
    ) -> io::Result<(Reply, Vec<Option<Reply>>)> {
        self.wait = self.timeouts.1;
        let _ = self.socket.set_read_timeout(Duration::from_secs(self.wait));
        self.trace(">", &format!("(the message, {} bytes)", tx.message.len()));
        self.trace(">", ".");
        self.conn.send_raw(&dot_stuff(tx.message));
        self.conn.send_raw(b".\r\n");
        self.conn.flush()?;
        let mut each = Vec::new();
        if self.lmtp {
            for r in rcpts {
                each.push(if r.is_ok() {
                    Some(self.read_reply()?)
                } else {
                    None
                });
            }
        }
        let data = match each.iter().flatten().next() {
            Some(first) => Ok(first.clone()),
            None => self.read_reply(),
        };
        self.wait = self.timeouts.0;
        let _ = self.socket.set_read_timeout(Duration::from_secs(self.wait));
        Ok((data?, each))
    }

    /// Says goodbye; errors do not matter any more.
    pub fn quit(mut self) {
        let _ = self.command("QUIT");
    }
}

/// The stream and what `Conn::upgrade` keeps of a handshake.
fn split(d: crate::tls::Done) -> (Box<dyn qms_common::conn::Stream>, (String, Option<String>)) {
    (d.stream, (d.info, d.observed))
}

fn parse_ehlo(text: &str) -> Extensions {
    let mut e = Extensions::default();
    // The reply's lines were joined with spaces: split on the "250-" / "250 " markers.
    for line in text.split("250-").flat_map(|l| l.split("250 ")) {
        let mut words = line.split_whitespace();
        match words.next().map(str::to_ascii_uppercase).as_deref() {
            Some("PIPELINING") => e.pipelining = true,
            Some("SIZE") => e.size = words.next().and_then(|n| n.parse().ok()).filter(|n| *n > 0),
            Some("8BITMIME") => e.eightbit = true,
            Some("SMTPUTF8") => e.smtputf8 = true,
            Some("DSN") => e.dsn = true,
            Some("STARTTLS") => e.starttls = true,
            Some("AUTH") => e.auth = words.map(str::to_ascii_uppercase).collect(),
            _ => {}
        }
    }
    e
}

/// The message as DATA sends it: CRLF line ends, a dot doubled at the start of a line, and
/// a final CRLF (RFC 5321 4.5.2).
/// The replies to MAIL, to each RCPT and to DATA.
type Replies = (Reply, Vec<Reply>, Reply);

/// A transaction that ended before DATA: the replies so far, nothing sent.
fn stopped(mail: Reply, rcpts: Vec<Reply>) -> Outcome {
    Outcome {
        mail,
        rcpts,
        data: None,
        each: Vec::new(),
    }
}

pub fn dot_stuff(msg: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(msg.len() + msg.len() / 50 + 4);
    let mut at_line_start = true;
    for &b in msg {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    if !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stuffs_dots_and_reads_ehlo() {
        assert_eq!(dot_stuff(b".a\r\nb\r\n..c\r\n"), b"..a\r\nb\r\n...c\r\n");
        assert_eq!(dot_stuff(b"x"), b"x\r\n");
        let e = parse_ehlo("250-mx.example.test 250-PIPELINING 250-SIZE 1000 250-DSN 250 STARTTLS");
        assert!(e.pipelining && e.dsn && e.starttls && !e.eightbit);
        assert_eq!(e.size, Some(1000));
    }
}
