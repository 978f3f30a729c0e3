//! `[log] format = "postfix"`: each key=value line said again the way Postfix says it, so
//! that pflogsumm, fail2ban's `postfix` filters and a sysadmin's greps read qms's log.
//!
//! One of our lines may become several of Postfix's: a queued message is `client=` (smtpd),
//! `message-id=` (cleanup) and `from=, size=, nrcpt=` (qmgr), as Postfix's processes each
//! log their part. Lines Postfix has no shape for keep ours, after the queue id.

use super::parse_pairs;

/// One line of output: the program name after `NAME/` in the tag, and the text.
pub(super) type Line = (String, String);

struct Pairs(Vec<(String, String)>);

impl Pairs {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// The lines Postfix would write for our line `line` of role `role`.
pub(super) fn lines(role: &str, line: &str) -> Vec<Line> {
    let (pairs, rest) = parse_pairs(line);
    let p = Pairs(pairs);
    let status = p.get("status").unwrap_or("");
    let event = p.get("event").unwrap_or("");
    if let Some(qid) = p.get("qid") {
        match status {
            "queued" => return queued(qid, &p),
            "sent" | "deferred" | "bounced" if p.get("to").is_some() => {
                return vec![delivery(qid, &p, &rest)];
            }
            "removed" => return vec![("qmgr".into(), format!("{qid}: removed"))],
            "expired" => {
                return vec![(
                    "qmgr".into(),
                    format!(
                        "{qid}: to={}, status=expired, returned to sender",
                        angle(p.get("to").unwrap_or(""))
                    ),
                )]
            }
            "bounce-sent" => return vec![notification(qid, &p)],
            _ => {}
        }
    }
    if let Some(client) = p.get("client") {
        let client = host(client);
        match (status, event) {
            ("reject", _) => return vec![("smtpd".into(), reject(&client, &p))],
            ("auth-failed", _) => {
                return vec![(
                    "smtpd".into(),
                    format!(
                        "warning: {client}: SASL {} authentication failed: authentication failure, sasl_username={}",
                        p.get("sasl_method").unwrap_or("LOGIN").to_ascii_uppercase(),
                        p.get("sasl_user").unwrap_or("")
                    ),
                )]
            }
            (_, "connect") => return vec![("smtpd".into(), format!("connect from {client}"))],
            (_, "disconnect") => {
                return vec![("smtpd".into(), format!("disconnect from {client}"))]
            }
            _ => {}
        }
    }
    vec![(role.into(), other(&p, &rest))]
}

/// A message in the queue: who sent it from where, its Message-ID, its envelope.
fn queued(qid: &str, p: &Pairs) -> Vec<Line> {
    let mut out = Vec::new();
    let from = angle(p.get("from").unwrap_or(""));
    if let Some(client) = p.get("client") {
        let mut l = format!("{qid}: client={}", host(client));
        if let Some(u) = p.get("sasl_user").filter(|u| *u != "-") {
            l.push_str(&format!(", sasl_username={u}"));
        }
        out.push(("smtpd".into(), l));
    } else {
        // Local submission: Postfix's pickup names the user.
        let uid = p.get("uid").unwrap_or("");
        out.push(("pickup".into(), format!("{qid}: uid={uid} from={from}")));
    }
    if let Some(id) = p.get("msgid").filter(|i| !i.is_empty()) {
        out.push(("cleanup".into(), format!("{qid}: message-id=<{id}>")));
    }
    let nrcpt = p.get("nrcpt").map(str::to_string).unwrap_or_else(|| {
        let to = p.get("to").unwrap_or("");
        to.split(',').filter(|t| !t.is_empty()).count().to_string()
    });
    out.push((
        "qmgr".into(),
        format!(
            "{qid}: from={from}, size={}, nrcpt={nrcpt} (queue active)",
            p.get("size").unwrap_or("0")
        ),
    ));
    out
}

/// One recipient's attempt, as smtp(8) or local(8) logs it.
fn delivery(qid: &str, p: &Pairs, rest: &str) -> Line {
    let relay = p.get("relay").unwrap_or("none");
    let prog = if relay == "local" { "local" } else { "smtp" };
    let mut l = format!(
        "{qid}: to={}, relay={relay}, delay={}",
        angle(p.get("to").unwrap_or("")),
        p.get("delay").unwrap_or("0")
    );
    if let Some(d) = p.get("delays") {
        l.push_str(&format!(", delays={d}"));
    }
    if let Some(d) = p.get("dsn") {
        l.push_str(&format!(", dsn={d}"));
    }
    l.push_str(&format!(", status={}", p.get("status").unwrap_or("")));
    if !rest.is_empty() {
        l.push(' ');
        l.push_str(rest);
    }
    (prog.into(), l)
}

/// A report about message `qid` sent to its sender, as bounce(8) logs it.
fn notification(qid: &str, p: &Pairs) -> Line {
    let what = match p.get("kind").unwrap_or("") {
        "delayed" => "delay",
        "delivered" | "relayed" | "expanded" => "delivery status",
        _ => "non-delivery",
    };
    (
        "bounce".into(),
        format!(
            "{qid}: sender {what} notification: {}",
            p.get("dsn_qid").unwrap_or("")
        ),
    )
}

/// A refusal in the SMTP dialogue. With the reply we sent, smtpd's `NOQUEUE: reject:`;
/// the two refusals of a whole session take the words fail2ban's filters know.
fn reject(client: &str, p: &Pairs) -> String {
    if let Some(reply) = p.get("reply") {
        let stage = if p.get("to").is_some() {
            "RCPT"
        } else {
            "MAIL"
        };
        return format!(
            "NOQUEUE: reject: {stage} from {client}: {reply}; from={} to={} proto=ESMTP",
            angle(p.get("from").unwrap_or("")),
            angle(p.get("to").unwrap_or(""))
        );
    }
    let reason = p.get("reason").unwrap_or("");
    if reason.contains("AUTH attempts") {
        format!("too many errors after AUTH from {client}")
    } else if reason.contains("pipelined") {
        format!("improper command pipelining after STARTTLS from {client}")
    } else {
        format!("warning: {client}: {reason}")
    }
}

/// Any other line: after the queue id as Postfix puts it, `warning:` for ours, the rest as
/// it was.
fn other(p: &Pairs, rest: &str) -> String {
    let mut text = String::new();
    if let Some(qid) = p.get("qid") {
        text.push_str(qid);
        text.push_str(": ");
    }
    match p.get("status") {
        Some("warning") => text.push_str("warning: "),
        Some("fatal") => text.push_str("fatal: "),
        _ => {}
    }
    let fields: Vec<String> =
        p.0.iter()
            .filter(|(k, v)| k != "qid" && !(k == "status" && (v == "warning" || v == "fatal")))
            .map(|(k, v)| format!("{k}={}", super::quote(v)))
            .collect();
    text.push_str(&fields.join(", "));
    if !rest.is_empty() {
        if !fields.is_empty() {
            text.push(' ');
        }
        text.push_str(rest);
    }
    text
}

/// Postfix's client form, `name[addr]`: our `[addr]` has no name, which Postfix writes
/// `unknown`.
fn host(client: &str) -> String {
    if client.starts_with('[') {
        format!("unknown{client}")
    } else {
        client.to_string()
    }
}

/// An address in angle brackets, `<>` for the null sender.
fn angle(a: &str) -> String {
    let a = a.trim_start_matches('<').trim_end_matches('>');
    format!("<{a}>")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(role: &str, line: &str) -> Vec<String> {
        lines(role, line)
            .into_iter()
            .map(|(p, t)| format!("{p}: {t}"))
            .collect()
    }

    #[test]
    fn a_queued_message_is_three_postfix_lines() {
        let l = texts(
            "smtpd",
            "qid=ABC client=[127.0.0.1] helo=x from=a@b.test to=c@d.test,e@d.test size=120 nrcpt=2 msgid=m1@b.test tls=none sasl_user=- status=queued",
        );
        assert_eq!(
            l,
            [
                "smtpd: ABC: client=unknown[127.0.0.1]",
                "cleanup: ABC: message-id=<m1@b.test>",
                "qmgr: ABC: from=<a@b.test>, size=120, nrcpt=2 (queue active)"
            ]
        );
    }

    #[test]
    fn deliveries_rejects_and_auth_failures_take_postfix_words() {
        let l = texts(
            "deliver/smtp",
            "qid=ABC from=<> to=c@d.test relay=mx.d.test[10.0.0.1]:25 delay=1 delays=0.10/0.00/0.20/0.30 dsn=2.0.0 status=sent (250 ok)",
        );
        assert_eq!(l, ["smtp: ABC: to=<c@d.test>, relay=mx.d.test[10.0.0.1]:25, delay=1, delays=0.10/0.00/0.20/0.30, dsn=2.0.0, status=sent (250 ok)"]);
        let l = texts(
            "smtpd",
            "client=[10.1.1.1] status=reject from=a@b.test to=x@y.test reply=\"554 5.7.1 <x@y.test>: Relay access denied\"",
        );
        assert_eq!(l, ["smtpd: NOQUEUE: reject: RCPT from unknown[10.1.1.1]: 554 5.7.1 <x@y.test>: Relay access denied; from=<a@b.test> to=<x@y.test> proto=ESMTP"]);
        let l = texts(
            "smtpd",
            "client=[10.1.1.1] sasl_method=plain sasl_user=bob status=auth-failed",
        );
        assert_eq!(l, ["smtpd: warning: unknown[10.1.1.1]: SASL PLAIN authentication failed: authentication failure, sasl_username=bob"]);
    }

    #[test]
    fn other_lines_keep_their_fields_after_the_queue_id() {
        assert_eq!(
            texts("router", "qid=ABC status=warning reason=\"odd thing\""),
            ["router: ABC: warning: reason=\"odd thing\""]
        );
        assert_eq!(
            texts("master", "event=start role=router"),
            ["master: event=start, role=router"]
        );
    }
}
