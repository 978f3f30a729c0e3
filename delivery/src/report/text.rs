//! Bounces written for people: the text reports of MTAs that send no RFC 3464 part (qmail,
//! old Sendmail, Exchange, Lotus Notes, Google Groups, webmail providers) and the text part of
//! those that do. The report text ends where the returned message begins; its recipients are
//! the addresses that lead a line, or failing that any address it names that is not the
//! sender's; failing that, `X-Failed-Recipients:`, then the returned message's `To:`.

use super::{fields, RcptReport};
use qms_common::reason::{self, status_in, Reason};

/// What the report's own header says about it.
pub struct Head {
    pub subject: String,
    /// The report's From: address, lower case.
    pub from: String,
    pub from_name: String,
    /// Addresses of the report's own To:/Cc: (the original sender, never a recipient).
    pub to: Vec<String>,
    pub null_sender: bool,
    pub failed_header: Vec<String>,
}

#[rustfmt::skip]
const DAEMONS: &[&str] = &[
    "mailer-daemon", "mailer_daemon", "mailerdaemon", "postmaster", "post_master",
    "mail.delivery.system", "maildelivery", "mail-delivery", "mdaemon", "bounce", "nobody",
    "mail-daemon", "mmsc", "sysadmin", "administrator", "daemon",
];

#[rustfmt::skip]
const SUBJECTS: &[&str] = &[
    "undeliver", "undelivered", "returned mail", "failure notice", "delivery status",
    "delivery failure", "delivery failed", "mail delivery failed", "non-delivery",
    "nondelivery", "not delivered", "could not be delivered", "mail system error",
    "delivery notification", "delayed", "delivery problem", "message delivery has failed",
    "failed delivery", "returned to sender", "delivery report", "unzustellbar",
    "nicht zustellbar", "non remis", "no entregado", "niet bezorgd", "non recapitabile",
    "mail failure", "error sending", "rejected", "delivery error", "bounce",
    "warning: message", "not member", "mail error", "returned message", "error", "エラー", "不達",
];

#[rustfmt::skip]
const BODIES: &[&str] = &[
    "this is the qmail-send program",
    "this message was created automatically by mail delivery software",
    "could not be delivered to one or more", "unable to deliver your message to the following",
    "delivery to the following recipient", "the following address(es) failed",
    "the following addresses had permanent fatal errors",
    "the following addresses had delivery problems", "did not reach the following recipient",
    "delivery has failed to these recipients", "your message could not be delivered",
    "could not be delivered to the following", "permanent error", "could not be delivered",
    "could not send mail", "this is an automatically generated delivery status notification",
    "undeliverable", "delivery failed", "message not delivered",
    "transcript of session follows",
];

impl Head {
    /// Whether the report's From: is a mail system (MAILER-DAEMON, postmaster, …), not a person.
    pub fn sent_by_mail_system(&self) -> bool {
        let local = self.from.split('@').next().unwrap_or("");
        let name = self.from_name.to_ascii_lowercase();
        DAEMONS.iter().any(|d| local.contains(d))
            || name.contains("mail delivery")
            || name.contains("mailer-daemon")
            || name.contains("postmaster")
            || self.from.is_empty()
    }

    /// Whether the message is a report about mail that did not get through.
    pub fn is_bounce(&self, lower_text: &str) -> bool {
        if !self.failed_header.is_empty() {
            return true;
        }
        let daemon = self.sent_by_mail_system();
        let subject = SUBJECTS.iter().any(|s| self.subject.contains(s));
        let body = BODIES.iter().any(|s| lower_text.contains(s));
        // From a mail system, words of failure or an SMTP error reply are enough.
        let failure_words = [
            "error",
            "fail",
            "could not",
            "unable to",
            "rejected",
            "unknown",
            "not delivered",
            "undeliver",
            "returned",
            "not be delivered",
        ]
        .iter()
        .any(|w| lower_text.contains(w));
        let system = daemon || self.null_sender;
        (daemon && self.null_sender)
            || system && (subject || body || failure_words)
            || subject && body
    }
}

/// Marks that begin the returned message inside a text report.
#[rustfmt::skip]
const RETURNED: &[&str] = &[
    "below this line is a copy of the message", "this is a copy of the message",
    "original message -----", "--- original message", "original message follows",
    "unsent message follows", "returned message --------", "header of the original message",
    "below is a copy of the original message", "-------original message", "original message:",
    "message header follows", "copy of the original message", "original message headers",
    "this is a copy of the headers", "included is a copy of the message",
    "content-type: message/rfc822", "------- original message",
    "the original message headers are", "message headers follow", "original header:",
];

/// The report proper: the text before the returned message.
pub fn report_text(text: &str) -> &str {
    let lower = text.to_ascii_lowercase();
    let mut cut = RETURNED
        .iter()
        .filter_map(|m| lower.find(m))
        .map(|i| lower[..i].rfind('\n').map(|n| n + 1).unwrap_or(0))
        .min()
        .unwrap_or(text.len());
    // A returned header section needs no mark: no report's prose starts a line so.
    let mut at = 0;
    for line in lower.split_inclusive('\n') {
        if at >= cut {
            break;
        }
        if line.starts_with("received: from ") || line.starts_with("return-path: <") {
            cut = at;
            break;
        }
        at += line.len();
    }
    &text[..cut]
}

#[rustfmt::skip]
const GAVE_UP: &[&str] = &[
    "not going to try again", "permanent error", "permanently", "given up", "gave up",
    "retry timeout exceeded", "will not be retried", "no further delivery attempts",
    "could not be delivered", "fatal error",
];

#[rustfmt::skip]
const DELAYED: &[&str] = &[
    "has been delayed", "has not yet been delivered", "still trying", "will be retried",
    "will retry", "not yet been delivered", "delivery is delayed", "will continue trying",
    "still being retried",
];

/// Words only a warning has: they decide even where failure words appear too.
#[rustfmt::skip]
const WARNING: &[&str] = &[
    "warning message only", "do not need to resend", "will be retried for",
    "delivery attempts will continue", "no action is required on your part",
];

/// Whether a text report speaks of a delay rather than a failure.
pub fn is_delay(head: &Head, report: &str) -> bool {
    let lower = report.to_ascii_lowercase();
    let says = |words: &[&str]| words.iter().any(|w| lower.contains(w));
    let delayed = says(DELAYED) || head.subject.contains("delay");
    says(WARNING) || delayed && !says(GAVE_UP)
}

/// The recipients of a text report, surest way first.
/// `returned` is the returned message's header section, for the last way; `None` to leave
/// it out.
pub fn recipients(
    head: &Head,
    report: &str,
    returned: Option<&str>,
    action: &str,
) -> Vec<RcptReport> {
    let lines: Vec<&str> = report.lines().collect();
    let mut found = addresses(head, &lines);
    if found.iter().any(|f| !f.own) {
        found.retain(|f| !f.own);
    } else {
        found.retain(|f| f.leading);
    }
    let leading: Vec<&Found> = found.iter().filter(|f| f.leading).collect();
    let chosen: Vec<(String, usize)> = if !head.failed_header.is_empty() {
        head.failed_header
            .iter()
            .map(|a| {
                let line = found
                    .iter()
                    .find(|f| f.address.eq_ignore_ascii_case(a))
                    .map(|f| f.line);
                (a.clone(), line.unwrap_or(usize::MAX))
            })
            .collect()
    } else if !leading.is_empty() {
        leading
            .iter()
            .map(|f| (f.address.clone(), f.line))
            .collect()
    } else if !found.is_empty() {
        found.iter().map(|f| (f.address.clone(), f.line)).collect()
    } else {
        returned
            .map(|r| returned_to(head, r))
            .unwrap_or_default()
            .into_iter()
            .map(|a| (a, usize::MAX))
            .collect()
    };
    let mut out: Vec<RcptReport> = Vec::new();
    for (address, line) in chosen {
        if out.iter().any(|r| r.address.eq_ignore_ascii_case(&address)) {
            continue;
        }
        let diagnostic = diagnostic_at(&lines, line).or_else(|| first_reply(&lines));
        // A failure reported with a transient reply (the last try of a queue that gave up)
        // is still final: its class follows the action, as RFC 3464 2.3.4 has it.
        let status = diagnostic
            .as_deref()
            .and_then(status_in)
            .map(|s| match action {
                "failed" if s.starts_with('4') => format!("5{}", &s[1..]),
                _ => s,
            });
        let mut r = RcptReport::new(address, action.into(), status, diagnostic, None);
        if r.reason == Some(Reason::Other) {
            // What the report says in general, when it says nothing of this recipient.
            r.reason = Some(reason::of(r.status.as_deref(), Some(report)));
        }
        out.push(r);
    }
    out
}

struct Found {
    address: String,
    line: usize,
    /// First on its line after at most a label or a bullet: how reports list recipients.
    leading: bool,
    /// The report's own sender or addressee: a recipient only when it is all there is (mail
    /// sent to oneself).
    own: bool,
}

fn addresses(head: &Head, lines: &[&str]) -> Vec<Found> {
    let mut out: Vec<Found> = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let lower = line.to_ascii_lowercase();
        if lower.contains("message-id") || lower.contains("message id") || excluded_field(line) {
            continue;
        }
        for (at, address) in scan(line) {
            let a = address.to_ascii_lowercase();
            let own = head.to.contains(&a) || a == head.from;
            if out.iter().any(|f| f.address.eq_ignore_ascii_case(&address)) {
                continue;
            }
            let before = line[..at].trim();
            let lower_before = before.to_ascii_lowercase();
            if lower_before.ends_with("from:")
                || lower_before.ends_with("from: <")
                || lower_before.ends_with("from:<")
                || lower_before.ends_with("sender")
                || lower_before.ends_with("mailto:")
            {
                continue;
            }
            out.push(Found {
                address,
                line: i,
                leading: leads(before),
                own,
            });
        }
    }
    out
}

/// Lines of the returned message's header that a report quotes: `To: a@b` names the
/// original's addressee, not the failed one.
fn excluded_field(line: &str) -> bool {
    let Some((name, _)) = line.trim_start().split_once(':') else {
        return false;
    };
    let name = name.to_ascii_lowercase();
    const QUOTED: &[&str] = &[
        "from",
        "to",
        "cc",
        "bcc",
        "reply-to",
        "sender",
        "return-path",
        "delivered-to",
        "x-original-to",
        "envelope-to",
        "errors-to",
        "disposition-notification-to",
        "received",
        "references",
        "in-reply-to",
        "subject",
        "date",
        "dkim-signature",
        "authentication-results",
        "x-envelope-from",
        "x-sender",
        "resent-from",
        "resent-to",
        "return-receipt-to",
    ];
    QUOTED.contains(&name.as_str()) || name.starts_with("list-") || name.starts_with("arc-")
}

/// Whether what comes before an address on its line is only a label or a bullet.
fn leads(before: &str) -> bool {
    let b = before.trim_end_matches(['<', '"', '\'', '(', '[', ' ', '\t']);
    // Sendmail's `554 <a@b>... reason` and `<<< 550 5.1.1 <a@b>... User unknown`.
    let reply = b.trim_start_matches(['<', '>', ' ']);
    let code = reply.split_whitespace().collect::<Vec<_>>();
    let is_reply = matches!(code.len(), 1 | 2)
        && code[0].len() == 3
        && code[0].bytes().all(|c| c.is_ascii_digit())
        && code.get(1).is_none_or(|s| s.split('.').count() == 3);
    b.is_empty()
        || is_reply
        || b.chars()
            .all(|c| "*->•#.:|".contains(c) || c.is_whitespace())
        || (b.ends_with(':') && b.len() < 60)
        || b.to_ascii_lowercase().ends_with(" to")
}

/// The addresses on a line, with where each starts.
fn scan(line: &str) -> Vec<(usize, String)> {
    let b = line.as_bytes();
    let local_ok = |c: u8| c.is_ascii_alphanumeric() || b".!#$%&'*+/=?^_`{|}~-\"".contains(&c);
    let domain_ok = |c: u8| c.is_ascii_alphanumeric() || c == b'.' || c == b'-';
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(off) = line[i..].find('@') {
        let at = i + off;
        let mut s = at;
        while s > 0 && local_ok(b[s - 1]) {
            s -= 1;
        }
        let mut e = at + 1;
        while e < b.len() && domain_ok(b[e]) {
            e += 1;
        }
        i = at + 1;
        let mut local = &line[s..at];
        let domain = line[at + 1..e].trim_end_matches(['.', '-']);
        // A quoted whole address keeps no quotes; a quoted local part keeps its own.
        let quoted_local = local.starts_with('"') && local.len() > 1 && local.ends_with('"');
        if !quoted_local {
            local = local.trim_start_matches(['"', '\'', '.']);
        }
        let bracketed = s > 0 && b[s - 1] == b'<';
        let dotted =
            domain.contains('.') && domain.rsplit('.').next().is_some_and(|t| t.len() >= 2);
        if local.is_empty()
            || local.contains('"') && !quoted_local
            || domain.is_empty()
            || !(dotted || bracketed)
        {
            continue;
        }
        out.push((s, format!("{local}@{domain}")));
    }
    out
}

/// The lines after a recipient's up to the next empty line or recipient: its diagnostic.
fn diagnostic_at(lines: &[&str], at: usize) -> Option<String> {
    if at >= lines.len() {
        return None;
    }
    let mut parts = Vec::new();
    let own = lines[at].trim();
    if let Some(i) = own.find('@') {
        let rest = own[i..]
            .split_once([' ', '\t', '>'])
            .map(|(_, r)| r.trim())
            .unwrap_or("");
        if !rest.is_empty() {
            parts.push(rest.trim_start_matches([':', '.', ' ']).to_string());
        }
    }
    for l in &lines[at + 1..] {
        let t = l.trim();
        if t.is_empty() || !scan(t).is_empty() && leads(&t[..t.find('@').unwrap_or(0)]) {
            break;
        }
        parts.push(t.to_string());
    }
    let d = parts.join(" ").trim().to_string();
    (!d.is_empty()).then_some(d)
}

/// The first SMTP reply in a report, for reports that give one reason for all.
fn first_reply(lines: &[&str]) -> Option<String> {
    lines
        .iter()
        .map(|l| l.trim().trim_start_matches("<<< "))
        .find_map(|l| {
            let code = l.get(..3)?;
            (code.starts_with(['4', '5']) && code.bytes().all(|b| b.is_ascii_digit()))
                .then(|| l.to_string())
        })
}

/// The returned message's addressees (`returned` is its header section), as a last way to
/// name the recipient.
fn returned_to(head: &Head, returned: &str) -> Vec<String> {
    let f = fields::fields(returned);
    let to = f
        .iter()
        .find(|(k, _)| k == "to")
        .map(|(_, v)| v.as_str())
        .unwrap_or("");
    scan(to)
        .into_iter()
        .map(|(_, a)| a)
        .filter(|a| !head.to.contains(&a.to_ascii_lowercase()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_addresses_as_reports_write_them() {
        let got: Vec<String> = scan("Sent <<< RCPT TO:<a@example.org> and \"b@example.net\"")
            .into_iter()
            .map(|(_, a)| a)
            .collect();
        assert_eq!(got, ["a@example.org", "b@example.net"]);
        assert_eq!(scan("\"x..y\"@example.org")[0].1, "\"x..y\"@example.org");
        assert!(scan("see http://example.org/@foo").is_empty());
        assert!(leads("Could not be delivered to: <"));
        assert!(leads(">>> "));
        assert!(!leads("550 5.1.1 user"));
    }
}
