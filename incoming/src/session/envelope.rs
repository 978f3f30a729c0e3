//! The envelope of a mail transaction: MAIL FROM and RCPT TO, their parameters (SIZE, BODY,
//! SMTPUTF8, RET, ENVID, NOTIFY, ORCPT), and who may send and relay.

use super::*;

impl Session<'_> {
    pub(super) fn mail(&mut self, arg: &str) -> Flow {
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
        let mut tx = Transaction::new();
        let declared = match self.mail_parameters(&params, &mut tx) {
            Ok(size) => size,
            Err(reply) => return self.error(&reply),
        };
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
        if let Err(reply) = self.may_send_as(&mut sender) {
            return self.error(&reply);
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

    /// MAIL's parameters (RFC 1870 SIZE, 6152 BODY, 6531 SMTPUTF8, 3461 RET and ENVID) into
    /// `tx`: the size declared, or the reply that refuses them.
    fn mail_parameters(&self, params: &[&str], tx: &mut Transaction) -> Result<u64, String> {
        let mut declared = 0;
        for p in params {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            match k.to_ascii_uppercase().as_str() {
                "SIZE" => match v.parse::<u64>() {
                    Ok(n) if n > self.cfg().limits.message_size => {
                        return Err("552 5.3.4 Message size exceeds fixed limit".into());
                    }
                    Ok(n) => declared = n,
                    Err(_) => return Err("501 5.5.4 Bad SIZE parameter".into()),
                },
                "BODY" => match v.to_ascii_uppercase().as_str() {
                    "7BIT" => {}
                    "8BITMIME" => tx.eightbit = true,
                    _ => return Err("501 5.5.4 BODY is 7BIT or 8BITMIME".into()),
                },
                "SMTPUTF8" if v.is_empty() => tx.smtputf8 = true,
                "RET" => match v.to_ascii_uppercase().as_str() {
                    "FULL" => tx.ret = Some(DsnRet::Full),
                    "HDRS" => tx.ret = Some(DsnRet::Hdrs),
                    _ => return Err("501 5.5.4 RET is FULL or HDRS".into()),
                },
                "ENVID" => match xtext_decode(v) {
                    Some(id) if id.len() <= 100 && printable(&id) => tx.envid = Some(id),
                    _ => return Err("501 5.5.4 Bad ENVID parameter".into()),
                },
                "AUTH" => {}
                _ => return Err(format!("555 5.5.4 Unsupported parameter {k}")),
            }
        }
        Ok(declared)
    }

    /// Whom this session may send as: an authenticated user only as themselves, on every
    /// listener (else the reply that refuses); an untrusted local user (`sendmail -bs`) as
    /// the address they are held to, which replaces any other.
    fn may_send_as(&self, sender: &mut Option<Address>) -> Result<(), String> {
        if let (Some(user), Some(addr)) = (&self.auth_user, sender.as_ref()) {
            if !crate::auth::may_send_as(self.cfg(), user, addr) {
                qlog!("client={} sasl_user={user} from={addr} status=reject reason=\"sender not owned\"", client_name(&self.peer));
                return Err(format!(
                    "553 5.7.1 <{addr}>: Sender address rejected: not owned by user {user}"
                ));
            }
        }
        if let Some(forced) = &self.peer.forced_sender {
            if sender.as_ref() != Some(forced) {
                qlog!(
                    "client={} status=sender-replaced from={} to={forced}",
                    client_name(&self.peer),
                    qms_common::address::show_sender(sender)
                );
                *sender = Some(forced.clone());
            }
        }
        Ok(())
    }

    /// The checker and the client's address, when `[auth_checks]` checks this session: mail
    /// over SMTP from a client neither authenticated nor in mynetworks.
    pub(super) fn checked(&self) -> Option<(&crate::authcheck::Checker, std::net::IpAddr)> {
        let ip = self.peer.addr?;
        (self.kind == Kind::Smtp && !self.may_relay())
            .then_some(())
            .and(self.shared.checks.as_ref())
            .map(|c| (c, ip))
    }

    pub(super) fn rcpt(&mut self, arg: &str) -> Flow {
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

/// RFC 3461: a decoded ENVID or ORCPT is printable US-ASCII; a CR or LF in one would reach
/// the reports qms writes.
fn printable(s: &str) -> bool {
    s.bytes().all(|b| (0x20..0x7f).contains(&b))
}

/// RFC 3461 xtext: `+XX` is a hex-encoded byte.
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
