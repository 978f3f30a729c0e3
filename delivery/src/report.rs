//! Reading reports that come back: RFC 3464 delivery status notifications, RFC 8098
//! disposition notifications, the non-standard bounces common MTAs send (qmail's QSBMF,
//! Exim, Yahoo, old Gmail and the like), auto-replies, and everything else.
//!
//! mail-parser finds the MIME parts; the delivery-status and disposition fields inside them
//! are parsed here.

use mail_parser::{Message, MessageParser, MimeHeaders, PartType};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReportKind {
    Dsn,
    Mdn,
    Bounce,
    Autoreply,
    Other,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RcptReport {
    pub address: String,
    /// failed, delayed, delivered, relayed, expanded (DSN); displayed, deleted, … (MDN).
    pub action: String,
    pub status: Option<String>,
    pub diagnostic: Option<String>,
    /// `Original-Recipient:` (the address as the sender gave it, before any forwarding).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub original_recipient: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub kind: ReportKind,
    pub recipients: Vec<RcptReport>,
    pub original_message_id: Option<String>,
    pub envid: Option<String>,
    pub reporting_mta: Option<String>,
    /// The header section of the returned message, when the report carries it.
    #[serde(skip)]
    pub returned_headers: Option<Vec<u8>>,
    /// The Message-IDs of the report's own In-Reply-To: and References: fields: a last way
    /// to find the message when the report returns nothing of it.
    #[serde(skip)]
    pub references: Vec<String>,
}

/// Unfolds a block of header-style fields into (lower-case name, value) pairs.
fn fields(text: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        if line.starts_with([' ', '\t']) {
            if let Some(last) = out.last_mut() {
                last.1.push(' ');
                last.1.push_str(line.trim());
            }
        } else if let Some((k, v)) = line.split_once(':') {
            out.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    out
}

fn get<'a>(f: &'a [(String, String)], name: &str) -> Option<&'a str> {
    f.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// `rfc822; a@b` → `a@b`; `dns; mx.example.net` → `mx.example.net`.
fn typed_value(v: &str) -> String {
    let v = v.split_once(';').map(|(_, a)| a).unwrap_or(v);
    v.trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .to_string()
}

fn strip_id(v: &str) -> String {
    v.trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .to_string()
}

/// Blocks separated by empty lines.
fn blocks(text: &str) -> Vec<String> {
    let norm = text.replace("\r\n", "\n");
    norm.split("\n\n")
        .map(str::to_string)
        .filter(|b| !b.trim().is_empty())
        .collect()
}

fn parse_dsn(body: &str, report: &mut Report) {
    let mut bs = blocks(body).into_iter();
    if let Some(first) = bs.next() {
        let f = fields(&first);
        report.reporting_mta = get(&f, "reporting-mta").map(typed_value);
        report.envid = get(&f, "original-envelope-id").map(|v| v.trim().to_string());
        // Some MTAs put no per-message block: the first block is then a recipient's.
        if get(&f, "final-recipient").is_some() {
            push_rcpt(&f, report);
        }
    }
    for b in bs {
        push_rcpt(&fields(&b), report);
    }
}

fn push_rcpt(f: &[(String, String)], report: &mut Report) {
    let Some(addr) = get(f, "final-recipient").or_else(|| get(f, "original-recipient")) else {
        return;
    };
    report.recipients.push(RcptReport {
        address: typed_value(addr),
        action: get(f, "action")
            .unwrap_or("failed")
            .trim()
            .to_ascii_lowercase(),
        status: get(f, "status").map(|s| s.split_whitespace().next().unwrap_or("").to_string()),
        diagnostic: get(f, "diagnostic-code").map(typed_value),
        original_recipient: get(f, "original-recipient").map(typed_value),
    });
}

fn parse_mdn(body: &str, report: &mut Report) {
    let f = fields(&body.replace("\r\n", "\n"));
    // Reporting-UA: host; product
    report.reporting_mta =
        get(&f, "reporting-ua").map(|v| v.split(';').next().unwrap_or("").trim().to_string());
    report.original_message_id = get(&f, "original-message-id").map(strip_id);
    // Disposition: automatic-action/MDN-sent-automatically; displayed
    let disposition = get(&f, "disposition").unwrap_or("");
    let action = disposition
        .rsplit(';')
        .next()
        .unwrap_or("")
        .trim()
        .split(['/', ' '])
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    if let Some(r) = get(&f, "final-recipient").or_else(|| get(&f, "original-recipient")) {
        report.recipients.push(RcptReport {
            address: typed_value(r),
            action,
            status: None,
            diagnostic: None,
            original_recipient: get(&f, "original-recipient").map(typed_value),
        });
    }
}

fn text_of(msg: &Message) -> String {
    let mut out = String::new();
    for p in &msg.parts {
        if let PartType::Text(t) = &p.body {
            let is_plain = p.content_type().is_none_or(|c| {
                c.ctype().eq_ignore_ascii_case("text")
                    && c.subtype().is_none_or(|s| s.eq_ignore_ascii_case("plain"))
            });
            if is_plain {
                out.push_str(t);
                out.push('\n');
            }
        }
    }
    out
}

fn ctype(p: &mail_parser::MessagePart) -> String {
    p.content_type()
        .map(|c| format!("{}/{}", c.ctype(), c.subtype().unwrap_or("")).to_ascii_lowercase())
        .unwrap_or_default()
}

/// Classifies one message.
pub fn classify(raw: &[u8]) -> Result<Report, String> {
    // mail-parser makes a message of anything: insist on a header section that looks like one.
    let first = raw.split(|b| *b == b'\n').next().unwrap_or(&[]);
    let is_field = first
        .iter()
        .position(|b| *b == b':')
        .is_some_and(|i| i > 0 && first[..i].iter().all(|b| b.is_ascii_graphic()));
    let head_len = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .or_else(|| raw.windows(2).position(|w| w == b"\n\n"))
        .unwrap_or(raw.len());
    if !is_field || raw[..head_len].contains(&0) {
        return Err("not a mail message: it does not start with header fields".into());
    }
    let msg = MessageParser::default()
        .parse(raw)
        .ok_or("not a mail message")?;
    let mut report = Report {
        kind: ReportKind::Other,
        recipients: Vec::new(),
        original_message_id: None,
        envid: None,
        reporting_mta: None,
        returned_headers: None,
        references: references_of(&header_section(raw)),
    };
    for p in &msg.parts {
        let ct = ctype(p);
        let body = String::from_utf8_lossy(p.contents()).into_owned();
        match ct.as_str() {
            "message/delivery-status" | "message/global-delivery-status" => {
                report.kind = ReportKind::Dsn;
                parse_dsn(&body, &mut report);
            }
            "message/disposition-notification" | "message/global-disposition-notification" => {
                report.kind = ReportKind::Mdn;
                parse_mdn(&body, &mut report);
            }
            "message/rfc822" | "message/global" if report.original_message_id.is_none() => {
                report.original_message_id = match &p.body {
                    PartType::Message(m) => m.message_id().map(strip_id),
                    _ => None,
                }
                .or_else(|| original_id_in(&body));
                report.returned_headers = Some(header_section(p.contents()));
            }
            "text/rfc822-headers" | "text/global-headers"
                if report.original_message_id.is_none() =>
            {
                report.original_message_id = original_id_in(&body);
                report.returned_headers = Some(header_section(p.contents()));
            }
            _ => {}
        }
    }
    if matches!(report.kind, ReportKind::Dsn | ReportKind::Mdn) {
        return Ok(report);
    }
    let text = text_of(&msg);
    let subject = msg.subject().unwrap_or("").to_ascii_lowercase();
    let from = msg
        .from()
        .and_then(|a| a.first())
        .and_then(|a| a.address())
        .unwrap_or("")
        .to_ascii_lowercase();
    if let Some(rcpts) = nonstandard_bounce(&text, &subject, &from) {
        report.kind = ReportKind::Bounce;
        report.recipients = rcpts;
        report.original_message_id = report.original_message_id.or_else(|| original_id_in(&text));
        return Ok(report);
    }
    if is_autoreply(&msg, &subject) {
        report.kind = ReportKind::Autoreply;
        report.original_message_id = msg.in_reply_to().as_text().map(strip_id);
        return Ok(report);
    }
    Ok(report)
}

/// The `<id>`s of In-Reply-To: and References:, nearest first.
fn references_of(head: &[u8]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let refs = qms_common::headers::value(head, "References").unwrap_or_default();
    let reply = qms_common::headers::value(head, "In-Reply-To").unwrap_or_default();
    // The last of References: is the message replied to, as In-Reply-To: names it.
    let mut ids: Vec<&str> = reply.split('<').skip(1).collect();
    ids.extend(
        refs.split('<')
            .skip(1)
            .collect::<Vec<_>>()
            .into_iter()
            .rev(),
    );
    for id in ids {
        if let Some((id, _)) = id.split_once('>') {
            if !id.is_empty() && !out.iter().any(|o| o == id) {
                out.push(id.to_string());
            }
        }
    }
    out
}

fn header_section(raw: &[u8]) -> Vec<u8> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 2)
        .or_else(|| raw.windows(2).position(|w| w == b"\n\n").map(|i| i + 1))
        .unwrap_or(raw.len());
    // Reports read from a mailbox have LF line ends; the header helpers work on CRLF.
    let mut out = Vec::with_capacity(end + 64);
    for (i, &b) in raw[..end].iter().enumerate() {
        if b == b'\n' && (i == 0 || raw[i - 1] != b'\r') {
            out.push(b'\r');
        }
        out.push(b);
    }
    out
}

/// The Message-ID of a returned copy found in text (after the usual "copy of the message" lines).
fn original_id_in(text: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("message-id")
            .then(|| strip_id(v))
            .filter(|v| v.contains('@'))
    })
}

/// An enhanced status code in text (`5.1.1`), or one derived from an SMTP reply code.
fn status_in(text: &str) -> Option<String> {
    for w in text.split(|c: char| c.is_whitespace() || "()[],;#<>".contains(c)) {
        let parts: Vec<&str> = w.trim_end_matches('.').split('.').collect();
        if parts.len() == 3
            && matches!(parts[0], "2" | "4" | "5")
            && parts[1..]
                .iter()
                .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
        {
            return Some(parts.join("."));
        }
    }
    text.split_whitespace()
        .find_map(|w| match w.trim_end_matches(['-', ':']) {
            c if c.len() == 3
                && (c.starts_with('5') || c.starts_with('4'))
                && c.bytes().all(|b| b.is_ascii_digit()) =>
            {
                Some(format!("{}.0.0", &c[..1]))
            }
            _ => None,
        })
}

fn looks_like_address(s: &str) -> Option<String> {
    let s = s
        .trim()
        .trim_end_matches(':')
        .trim()
        .trim_start_matches('<')
        .trim_end_matches('>');
    let ok = s.contains('@')
        && !s.contains(char::is_whitespace)
        && s.len() < 320
        && !s.starts_with('@')
        && !s.ends_with('@');
    ok.then(|| s.to_string())
}

/// The text bounces of MTAs that do not send RFC 3464 reports.
fn nonstandard_bounce(text: &str, subject: &str, from: &str) -> Option<Vec<RcptReport>> {
    let lower = text.to_ascii_lowercase();
    let daemon =
        from.starts_with("mailer-daemon") || from.starts_with("postmaster") || from.is_empty();
    let known = lower.contains("this is the qmail-send program")
        || lower.contains("this message was created automatically by mail delivery software")
        || lower.contains("could not be delivered to one or more of its recipients")
        || lower.contains("unable to deliver your message to the following address")
        || lower.contains("delivery to the following recipient")
        || lower.contains("the following address(es) failed")
        || (daemon
            && [
                "undeliver",
                "returned mail",
                "failure notice",
                "delivery status notification",
                "delivery failure",
                "mail delivery failed",
            ]
            .iter()
            .any(|s| subject.contains(s)));
    if !known {
        return None;
    }
    // Only the report, not the returned copy of the message.
    let cut = [
        "--- below this line is a copy of the message",
        "------ this is a copy of the message",
        "----- original message -----",
        "--- original message ---",
        "----- transcript of session follows",
    ]
    .iter()
    .filter_map(|m| lower.find(m))
    .min()
    .unwrap_or(text.len());
    let report_text = &text[..cut];
    let delayed = lower.contains("i'm still trying")
        || lower.contains("still trying to deliver")
        || lower.contains("has not yet been delivered")
        || lower.contains("delivery has been delayed");
    let action = if delayed { "delayed" } else { "failed" };
    let mut out: Vec<RcptReport> = Vec::new();
    let lines: Vec<&str> = report_text.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i].trim();
        // "<addr>:" (qmail, Yahoo) or an address alone on an indented line (Exim, Gmail).
        let candidate = if line.starts_with('<') && line.contains('>') {
            looks_like_address(line.split('>').next().unwrap_or(""))
        } else if lines[i].starts_with([' ', '\t']) || line.ends_with(':') {
            looks_like_address(line)
        } else {
            None
        };
        if let Some(addr) = candidate {
            // The reason: the following lines up to the next empty line.
            let mut reason = Vec::new();
            let mut j = i + 1;
            while j < lines.len()
                && !lines[j].trim().is_empty()
                && looks_like_address(lines[j].trim()).is_none()
            {
                reason.push(lines[j].trim());
                j += 1;
            }
            let reason = reason.join(" ");
            let status = status_in(&reason).or_else(|| {
                Some(if delayed {
                    "4.0.0".into()
                } else {
                    "5.0.0".into()
                })
            });
            if !out.iter().any(|r| r.address.eq_ignore_ascii_case(&addr)) {
                out.push(RcptReport {
                    address: addr,
                    action: action.into(),
                    status,
                    diagnostic: (!reason.is_empty()).then_some(reason),
                    original_recipient: None,
                });
            }
            i = j;
            continue;
        }
        i += 1;
    }
    Some(out)
}

fn is_autoreply(msg: &Message, subject: &str) -> bool {
    let h = |name: &str| msg.header_raw(name).map(|v| v.trim().to_ascii_lowercase());
    if h("Auto-Submitted").is_some_and(|v| v.starts_with("auto-replied")) {
        return true;
    }
    if h("X-Autoreply").is_some() || h("X-Autorespond").is_some() || h("X-Autoresponder").is_some()
    {
        return true;
    }
    if h("Precedence").is_some_and(|v| v == "auto_reply") {
        return true;
    }
    [
        "out of office",
        "automatic reply",
        "auto-reply",
        "autoreply",
        "auto:",
        "abwesenheitsnotiz",
        "absence du bureau",
        "vacation",
    ]
    .iter()
    .any(|p| subject.contains(p))
}

impl Report {
    /// The JSON object `qms dsn classify` prints for one file.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_that_returns_nothing_is_found_by_its_references() {
        let mdn = "From: Frank <frank@far.test>\r\nTo: app@sender.test\r\nSubject: Read\r\n\
In-Reply-To: <offer-20@sender.test>\r\nReferences: <thread-1@sender.test>\r\n <offer-20@sender.test>\r\n\
MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=disposition-notification; boundary=\"M\"\r\n\r\n\
--M\r\nContent-Type: message/disposition-notification\r\n\r\nReporting-UA: ua.far.test; Mailer\r\n\
Original-Recipient: rfc822;frank@sender-list.test\r\nFinal-Recipient: rfc822;frank@far.test\r\n\
Disposition: manual-action/MDN-sent-manually; displayed\r\n\r\n--M--\r\n";
        let r = classify(mdn.as_bytes()).unwrap();
        assert_eq!(r.kind, ReportKind::Mdn);
        assert_eq!(r.original_message_id, None);
        assert_eq!(
            r.references,
            ["offer-20@sender.test", "thread-1@sender.test"]
        );
        assert_eq!(r.recipients[0].address, "frank@far.test");
        assert_eq!(
            r.recipients[0].original_recipient.as_deref(),
            Some("frank@sender-list.test")
        );
    }
}
