//! STARTTLS (RFC 3207) and AUTH PLAIN/LOGIN (RFC 4954) for a session: the two commands that
//! change who the session is talking to, kept apart from the mail transaction.

use super::{client_name, Flow, Session};
use qms_common::conn::Line;
use qms_common::log::quote;
use qms_common::qlog;

impl Session<'_> {
    pub(super) fn starttls(&mut self, arg: &str) -> Flow {
        let Some(cfg) = self.shared.tls.clone() else {
            return self.error("454 4.7.0 TLS not available");
        };
        if self.tls.is_some() {
            return self.error("503 5.5.1 Error: TLS already active");
        }
        if !arg.is_empty() {
            return self.error("501 5.5.4 Syntax: STARTTLS");
        }
        // Anything sent after STARTTLS in the same packet is plaintext injection (CVE-2011-0411).
        if self.conn.has_buffered() {
            qlog!(
                "client={} status=reject reason=\"command pipelined after STARTTLS\"",
                client_name(&self.peer)
            );
            self.conn
                .reply("554 5.5.1 Error: command pipelined after STARTTLS");
            return Flow::Close;
        }
        self.conn.reply("220 2.0.0 Ready to start TLS");
        if self.conn.flush().is_err() {
            return Flow::Close;
        }
        match self.conn.upgrade(|s| crate::tls::accept(&cfg, s)) {
            Ok(h) => {
                qlog!("client={} tls={}", client_name(&self.peer), quote(&h.info));
                let service = [("service", self.kind.protocol())];
                qms_common::metrics::count("qms_tls_sessions_total", &service, 1.0);
                // RFC 3207: forget everything learnt before the handshake.
                self.tls = Some(h.info);
                self.tls_client = h.client;
                self.helo = None;
                self.esmtp = false;
                self.tx = None;
                self.auth_user = None;
                Flow::Continue
            }
            Err(e) => {
                qlog!(
                    "client={} status=tls-failed reason={}",
                    client_name(&self.peer),
                    quote(&e)
                );
                Flow::Close
            }
        }
    }

    pub(super) fn auth(&mut self, arg: &str) -> Flow {
        if let Some(refusal) = self.auth_refusal() {
            return self.error(refusal);
        }
        let mut words = arg.split_whitespace();
        let mech = words.next().unwrap_or("").to_ascii_uppercase();
        let initial = words.next().map(str::to_string);
        let creds = match mech.as_str() {
            "PLAIN" => self.plain(initial),
            "LOGIN" => self.login(initial),
            _ => return self.error("504 5.5.4 Unrecognized authentication type"),
        };
        let Some((user, pass)) = creds else {
            return self.error("501 5.5.2 Authentication cancelled or malformed");
        };
        // Counted before it is checked, and checked only when a check is free.
        let attempt = match self
            .shared
            .throttle
            .begin(self.peer.addr, self.cfg().auth.max_failures)
        {
            Ok(a) => a,
            Err(crate::auth::Refused::LockedOut) => {
                qlog!(
                    "client={} status=reject reason=\"too many failed AUTH attempts\"",
                    client_name(&self.peer)
                );
                self.conn
                    .reply("421 4.7.0 Too many failed authentication attempts, try again later");
                return Flow::Close;
            }
            Err(crate::auth::Refused::Busy) => {
                return self.error("454 4.7.0 Temporary authentication failure, try again later");
            }
        };
        let verdict = self.verify(&user, &pass);
        self.auth_verdict(verdict, attempt, &mech, user)
    }

    /// Why AUTH cannot be taken now, as the reply to give; None when it can.
    fn auth_refusal(&self) -> Option<&'static str> {
        if self.helo.is_none() || !self.esmtp {
            return Some("503 5.5.1 Error: send EHLO first");
        }
        if self.cfg().auth.users.is_none() && self.cfg().auth.dovecot.is_none() {
            return Some("502 5.5.1 Error: authentication not enabled");
        }
        if !self.auth_offered() {
            return Some("538 5.7.11 Encryption required for requested authentication mechanism");
        }
        if self.auth_user.is_some() || self.tx.is_some() {
            return Some("503 5.5.1 Error: already authenticated or in a transaction");
        }
        None
    }

    /// SASL PLAIN (RFC 4616): the user and password, from the initial response or one
    /// challenge; None when cancelled (`*`) or malformed.
    fn plain(&mut self, initial: Option<String>) -> Option<(String, String)> {
        let data = match initial {
            Some(d) => Some(d),
            None => self.challenge("334 "),
        };
        data.filter(|d| d != "*")
            .and_then(|d| crate::auth::decode_plain(&d))
    }

    /// SASL LOGIN: the user (initial response or first challenge), then the password.
    fn login(&mut self, initial: Option<String>) -> Option<(String, String)> {
        let user = match initial {
            Some(d) => Some(d),
            None => self.challenge("334 VXNlcm5hbWU6"),
        };
        let user = user
            .filter(|d| d != "*")
            .and_then(|d| crate::auth::decode_text(&d))?;
        let pass = self
            .challenge("334 UGFzc3dvcmQ6")
            .filter(|d| d != "*")
            .and_then(|d| crate::auth::decode_text(&d))?;
        Some((user, pass))
    }

    /// Checks the credentials: with Dovecot's auth service when configured, else against
    /// `[auth] users`.
    fn verify(&self, user: &str, pass: &str) -> crate::dovecot::Verdict {
        match &self.cfg().auth.dovecot {
            Some(socket) => {
                crate::dovecot::verify(socket, user, pass, self.tls.is_some(), self.peer.addr)
            }
            None => match crate::auth::verify(self.cfg(), user, pass) {
                true => crate::dovecot::Verdict::Pass,
                false => crate::dovecot::Verdict::Fail,
            },
        }
    }

    /// Answers a checked AUTH: authenticated, refused (after the failure's wait), or
    /// unavailable (not counted against the client).
    fn auth_verdict(
        &mut self,
        verdict: crate::dovecot::Verdict,
        attempt: crate::auth::Attempt,
        mech: &str,
        user: String,
    ) -> Flow {
        if let crate::dovecot::Verdict::Unavailable(why) = &verdict {
            // Not the client's fault: not counted against it, and said plainly in the log.
            self.shared.throttle.succeed(attempt);
            qlog!(
                "client={} sasl_method={mech} status=auth-unavailable reason={}",
                client_name(&self.peer),
                quote(why)
            );
            return self.error("454 4.7.0 Temporary authentication failure, try again later");
        }
        if verdict == crate::dovecot::Verdict::Pass {
            self.shared.throttle.succeed(attempt);
            qlog!(
                "client={} sasl_method={mech} sasl_user={} status=authenticated",
                client_name(&self.peer),
                quote(&user)
            );
            self.auth_user = Some(user);
            self.conn.reply("235 2.7.0 Authentication successful");
            return Flow::Continue;
        }
        let wait = self.shared.throttle.fail(attempt);
        let service = [("service", self.kind.protocol())];
        qms_common::metrics::count("qms_auth_failures_total", &service, 1.0);
        qlog!(
            "client={} sasl_method={mech} sasl_user={} status=auth-failed",
            client_name(&self.peer),
            quote(&user)
        );
        // The failure's delay (longer with each failure from this client), then the answer.
        std::thread::sleep(wait);
        self.error("535 5.7.8 Authentication credentials invalid")
    }

    /// Sends a 334 challenge and reads the client's one-line answer.
    fn challenge(&mut self, prompt: &str) -> Option<String> {
        self.conn.reply(prompt);
        self.conn.flush().ok()?;
        match self.conn.read_line(self.cfg().limits.command_line) {
            Ok(Line::Crlf(l)) => String::from_utf8(l).ok(),
            _ => None,
        }
    }
}
