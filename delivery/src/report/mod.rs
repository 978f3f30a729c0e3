//! Reading mail that comes back: RFC 3464 delivery status notifications, RFC 8098
//! disposition notifications, RFC 5965 complaint (feedback) reports, RFC 3834 auto-replies,
//! and the text bounces of MTAs and providers that send no standard report. Each recipient
//! gets an action and a reason a sender can act on (`reason.rs`).
//!
//! Input is taken as mailboxes really hold it (`input.rs`); mail-parser finds the MIME parts
//! and decodes their charsets; the fields inside report parts are read in `fields.rs`, text
//! bounces in `text.rs`, provider notifications in `notice.rs`.

mod fields;
mod input;
mod notice;
mod text;

use mail_parser::{Message, MessageParser, MimeHeaders, PartType};
pub use qms_common::reason::{self, Reason};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReportKind {
    Dsn,
    Mdn,
    /// A failure or delay report written as text, without an RFC 3464 part.
    Bounce,
    /// An RFC 5965 (ARF) complaint report.
    Feedback,
    Autoreply,
    Other,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RcptReport {
    pub address: String,
    /// failed, delayed, delivered, relayed, expanded (DSN); displayed, deleted, … (MDN);
    /// complained (feedback).
    pub action: String,
    pub status: Option<String>,
    /// Why, in the vocabulary of `Reason`; for failures and delays.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    pub diagnostic: Option<String>,
    /// `Original-Recipient:` (the address as the sender gave it, before any forwarding).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub original_recipient: Option<String>,
}

impl RcptReport {
    pub fn new(
        address: String,
        action: String,
        status: Option<String>,
        diagnostic: Option<String>,
        original_recipient: Option<String>,
    ) -> RcptReport {
        let reason = matches!(action.as_str(), "failed" | "delayed").then(|| {
            match reason::of(status.as_deref(), diagnostic.as_deref()) {
                // A failure for a passing condition: the mail was retried until it expired.
                Reason::Network if action == "failed" => Reason::Expired,
                r => r,
            }
        });
        RcptReport {
            address,
            action,
            status,
            reason,
            diagnostic,
            original_recipient,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub kind: ReportKind,
    pub recipients: Vec<RcptReport>,
    pub original_message_id: Option<String>,
    pub envid: Option<String>,
    pub reporting_mta: Option<String>,
    /// An ARF report's `Feedback-Type` (abuse, fraud, virus, not-spam, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub feedback_type: Option<String>,
    /// The header section of the returned message, when the report carries it.
    #[serde(skip)]
    pub returned_headers: Option<Vec<u8>>,
    /// The Message-IDs of the report's own In-Reply-To: and References: fields: a last way
    /// to find the message when the report returns nothing of it.
    #[serde(skip)]
    pub references: Vec<String>,
}

impl Report {
    fn empty() -> Report {
        Report {
            kind: ReportKind::Other,
            recipients: Vec::new(),
            original_message_id: None,
            envid: None,
            reporting_mta: None,
            feedback_type: None,
            returned_headers: None,
            references: Vec::new(),
        }
    }

    /// The JSON object `qms dsn classify` prints for one file.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

/// Classifies one message as saved by a mail reader or a mailbox.
pub fn classify(raw: &[u8]) -> Result<Report, String> {
    let raw = input::normalise(raw)?;
    let msg = MessageParser::default()
        .parse(&raw)
        .ok_or("not a mail message")?;
    Ok(read(&msg, 0))
}

/// How deep a report may be forwarded inside other messages and still be read.
const MAX_NESTING: usize = 3;

fn read(msg: &Message, depth: usize) -> Report {
    let mut report = Report::empty();
    report.references = references_of(&header_section(msg.raw_message()));
    let feedback = read_parts(msg, &mut report);
    let head = head_of(msg);
    if feedback.is_some() || report.kind == ReportKind::Feedback {
        finish_feedback(&mut report, feedback.unwrap_or_default(), &head);
        return report;
    }
    let text = text_of(msg);
    if report.recipients.is_empty() && fields::has_dsn_fields(&text) {
        fields::parse_dsn(&text, &mut report);
        report.kind = ReportKind::Dsn;
    }
    if !report.recipients.is_empty() {
        if report.kind == ReportKind::Dsn {
            fill_domains(&mut report, &head, &text);
            borrow_diagnostics(&mut report, &head, &text);
        }
        return report;
    }
    if report.kind == ReportKind::Dsn {
        report.kind = ReportKind::Other; // a delivery-status part that names no one
    }
    if let Some(n) = notice::provider(&text) {
        report.kind = n.kind;
        report.recipients = n.recipients;
        report.feedback_type = n.feedback_type;
        return report;
    }
    // A person's auto-reply may speak of mail not delivered and name other addresses; a
    // mail system's report may carry Auto-Submitted too, so who sent it decides first.
    let person = !head.sent_by_mail_system() && head.failed_header.is_empty();
    if person && is_autoreply(msg, &head.subject) {
        return autoreply(msg, report);
    }
    let lower = text.to_ascii_lowercase();
    if head.is_bounce(&lower) {
        let body = text::report_text(&text);
        let returned = returned_text(&report, &text, body.len());
        let action = if text::is_delay(&head, body) {
            "delayed"
        } else {
            "failed"
        };
        report.recipients = text::recipients(&head, body, None, action);
        if report.recipients.is_empty() {
            // A report that names no one may carry the real one as an attachment.
            if let Some(inner) = forwarded(msg, depth) {
                return inner;
            }
            report.recipients = text::recipients(&head, body, Some(&returned), action);
        }
        if !report.recipients.is_empty() {
            report.kind = ReportKind::Bounce;
            report.original_message_id = report
                .original_message_id
                .or_else(|| original_id_in(&returned));
            return report;
        }
    }
    if is_autoreply(msg, &head.subject) {
        return autoreply(msg, report);
    }
    forwarded(msg, depth).unwrap_or(report)
}

/// The responder is the message's From:; it names no recipient that failed.
fn autoreply(msg: &Message, mut report: Report) -> Report {
    report.kind = ReportKind::Autoreply;
    report.original_message_id = msg.in_reply_to().as_text().map(fields::strip_id);
    report
}

/// A report forwarded as an attachment of another message (to postmaster, to a help desk).
fn forwarded(msg: &Message, depth: usize) -> Option<Report> {
    if depth >= MAX_NESTING {
        return None;
    }
    msg.parts.iter().find_map(|p| match &p.body {
        PartType::Message(inner) => {
            let r = read(inner, depth + 1);
            (r.kind != ReportKind::Other).then_some(r)
        }
        _ => None,
    })
}

/// Reads the machine-readable parts; returns the complainants of a feedback report.
fn read_parts(msg: &Message, report: &mut Report) -> Option<Vec<String>> {
    let mut feedback = None;
    for p in &msg.parts {
        let ct = ctype(p);
        let body = String::from_utf8_lossy(p.contents()).into_owned();
        match ct.as_str() {
            "message/delivery-status" | "message/global-delivery-status" => {
                report.kind = ReportKind::Dsn;
                fields::parse_dsn(&body, report);
            }
            "message/disposition-notification" | "message/global-disposition-notification" => {
                report.kind = ReportKind::Mdn;
                fields::parse_mdn(&body, report);
            }
            "message/feedback-report" => {
                report.kind = ReportKind::Feedback;
                feedback = Some(fields::parse_feedback(&body, report));
            }
            "message/rfc822" | "message/global" if report.returned_headers.is_none() => {
                if report.original_message_id.is_none() {
                    report.original_message_id = match &p.body {
                        PartType::Message(m) => m.message_id().map(fields::strip_id),
                        _ => None,
                    }
                    .or_else(|| original_id_in(&body));
                }
                report.returned_headers = Some(header_section(p.contents()));
                // Microsoft's junk mail reporting program (JMRP) sends the reported message
                // alone, its complainant in a header field of its own.
                if let PartType::Message(m) = &p.body {
                    if let Some(who) = m.header_raw("X-HmXmrOriginalRecipient") {
                        report.kind = ReportKind::Feedback;
                        report.feedback_type = Some("abuse".into());
                        feedback
                            .get_or_insert_with(Vec::new)
                            .push(fields::typed_value(who));
                    }
                }
            }
            "text/rfc822-headers" | "text/global-headers" if report.returned_headers.is_none() => {
                if report.original_message_id.is_none() {
                    report.original_message_id = original_id_in(&body);
                }
                report.returned_headers = Some(header_section(p.contents()));
            }
            _ => {}
        }
    }
    feedback
}

/// An ARF report names the complainant, or its returned message's `To:` does.
fn finish_feedback(report: &mut Report, complainants: Vec<String>, head: &text::Head) {
    report.kind = ReportKind::Feedback;
    let mut who = complainants;
    if who.is_empty() {
        let returned = report
            .returned_headers
            .as_deref()
            .map(|h| String::from_utf8_lossy(h).into_owned())
            .unwrap_or_default();
        let f = fields::fields(&returned.replace("\r\n", "\n"));
        if let Some(to) = fields::get(&f, "to") {
            who.extend(
                to.split(',')
                    .map(fields::typed_value)
                    .filter(|a| a.contains('@')),
            );
        }
    }
    let what = report
        .feedback_type
        .clone()
        .unwrap_or_else(|| "abuse".into());
    for a in who {
        if !head.to.contains(&a.to_ascii_lowercase()) || report.recipients.is_empty() {
            let mut r = RcptReport::new(a, "complained".into(), None, Some(what.clone()), None);
            r.reason = None;
            report.recipients.push(r);
        }
    }
}

/// A DSN that names a program, a file or a bare local part (`Final-Recipient: rfc822;
/// |/usr/bin/procmail`, `kijitora`): the mailbox is what `X-Failed-Recipients:` or the
/// report's text names in its place.
fn fill_domains(report: &mut Report, head: &text::Head, text: &str) {
    let is_mailbox = |a: &str| {
        a.split_once('@')
            .is_some_and(|(l, d)| !l.is_empty() && !d.is_empty())
            && !a.starts_with(['|', '/'])
    };
    let bad = report
        .recipients
        .iter()
        .filter(|r| !is_mailbox(&r.address))
        .count();
    if bad == 0 {
        return;
    }
    let mut named: Vec<String> = head.failed_header.clone();
    if named.len() < bad {
        let listed = text::recipients(head, text::report_text(text), None, "failed");
        named = listed.into_iter().map(|r| r.address).collect();
    }
    let taken: Vec<String> = report
        .recipients
        .iter()
        .map(|r| r.address.to_ascii_lowercase())
        .collect();
    named.retain(|a| !taken.contains(&a.to_ascii_lowercase()));
    for r in report
        .recipients
        .iter_mut()
        .filter(|r| !is_mailbox(&r.address))
    {
        let local = r.address.to_ascii_lowercase();
        let pick = named
            .iter()
            .position(|a| a.to_ascii_lowercase().starts_with(&format!("{local}@")))
            .or((named.len() == 1 || bad == named.len()).then_some(0))
            .filter(|&i| i < named.len());
        if let Some(i) = pick {
            r.address = named.remove(i);
        }
    }
}

/// A DSN recipient without a `Diagnostic-Code:` takes what the text part says of it, so that
/// its reason is known.
fn borrow_diagnostics(report: &mut Report, head: &text::Head, text: &str) {
    if report.recipients.iter().all(|r| r.diagnostic.is_some()) {
        return;
    }
    let listed = text::recipients(head, text::report_text(text), None, "failed");
    for r in report
        .recipients
        .iter_mut()
        .filter(|r| r.diagnostic.is_none())
    {
        let said = listed
            .iter()
            .find(|l| l.address.eq_ignore_ascii_case(&r.address))
            .or((listed.len() == 1).then(|| &listed[0]));
        if let Some(d) = said.and_then(|l| l.diagnostic.clone()) {
            let again = RcptReport::new(
                r.address.clone(),
                r.action.clone(),
                r.status.clone(),
                Some(d),
                r.original_recipient.clone(),
            );
            r.reason = again.reason;
            r.diagnostic = again.diagnostic;
        }
    }
}

fn head_of(msg: &Message) -> text::Head {
    let addr = |list: Option<&mail_parser::Address>| -> Vec<(String, String)> {
        list.map(|l| {
            l.iter()
                .map(|a| {
                    (
                        a.address().unwrap_or("").to_ascii_lowercase(),
                        a.name().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
    };
    let from = addr(msg.from()).into_iter().next().unwrap_or_default();
    let mut to: Vec<String> = addr(msg.to()).into_iter().map(|a| a.0).collect();
    to.extend(addr(msg.cc()).into_iter().map(|a| a.0));
    let raw = |name: &str| msg.header_raw(name).map(|v| v.trim().to_string());
    let failed_header = raw("X-Failed-Recipients")
        .map(|v| {
            v.split(',')
                .map(fields::typed_value)
                .filter(|a| a.contains('@') && !a.starts_with(['|', '/']))
                .collect()
        })
        .unwrap_or_default();
    text::Head {
        subject: msg.subject().unwrap_or("").to_ascii_lowercase(),
        from: from.0,
        from_name: from.1,
        to,
        null_sender: raw("Return-Path").is_some_and(|v| v == "<>" || v == "<<>>"),
        failed_header,
    }
}

/// The returned message's header section, from its own part or from after the report text.
fn returned_text(report: &Report, text: &str, report_len: usize) -> String {
    match &report.returned_headers {
        Some(h) => String::from_utf8_lossy(h).replace("\r\n", "\n"),
        None => text[report_len..].to_string(),
    }
}

/// The human-readable text of a message: its text/plain parts, or its HTML made plain.
fn text_of(msg: &Message) -> String {
    let mut out = String::new();
    let mut html = String::new();
    for p in &msg.parts {
        let ct = ctype(p);
        match &p.body {
            PartType::Text(t) if ct.is_empty() || ct == "text/plain" || ct == "text/" => {
                out.push_str(t);
                out.push('\n');
            }
            PartType::Html(h) => {
                html.push_str(&plain_of_html(h));
                html.push('\n');
            }
            _ => {}
        }
    }
    if out.trim().is_empty() {
        out = html;
    }
    if out.trim().is_empty() {
        // A multipart whose boundary never comes (a report cut short, a broken MTA): what a
        // mail reader shows then is the body as it stands.
        let raw = msg.raw_message();
        let start = (msg.root_part().offset_body as usize).min(raw.len());
        out = String::from_utf8_lossy(&raw[start..]).into_owned();
    }
    out.replace("\r\n", "\n").replace('\r', "\n")
}

/// Tags dropped, line-breaking tags made line ends, the common entities decoded.
fn plain_of_html(h: &str) -> String {
    let mut out = String::with_capacity(h.len());
    let mut rest = h;
    while let Some(i) = rest.find('<') {
        out.push_str(&rest[..i]);
        let Some(j) = rest[i..].find('>') else {
            rest = "";
            break;
        };
        let tag = rest[i + 1..i + j].to_ascii_lowercase();
        if [
            "br", "p", "/p", "div", "/div", "tr", "/tr", "li", "/li", "/h1", "/h2", "/h3",
        ]
        .iter()
        .any(|t| {
            tag == *t || tag.starts_with(&format!("{t} ")) || tag.starts_with(&format!("{t}/"))
        }) {
            out.push('\n');
        }
        rest = &rest[i + j + 1..];
    }
    out.push_str(rest);
    out.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&nbsp;", " ")
        .replace("&quot;", "\"")
        .replace("&#64;", "@")
        .replace("&amp;", "&")
}

fn ctype(p: &mail_parser::MessagePart) -> String {
    p.content_type()
        .map(|c| format!("{}/{}", c.ctype(), c.subtype().unwrap_or("")).to_ascii_lowercase())
        .unwrap_or_default()
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
            .then(|| fields::strip_id(v))
            .filter(|v| v.contains('@'))
    })
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
        "auto reply",
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
