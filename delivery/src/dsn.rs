//! Error mail: RFC 3464 delivery status notifications, sent with the null sender to the
//! envelope sender (a bounce of a bounce goes to the postmaster, and no further).

use mail_builder::headers::content_type::ContentType;
use mail_builder::headers::raw::Raw;
use mail_builder::mime::{BodyPart, MimePart};
use mail_builder::MessageBuilder;
use qms_common::{qlog, time, Address, Config};
use qms_spool::{Client, DsnRet, Job, Notify, QueueId, Recipient, Spool};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Failure,
    Delay,
    Success,
    /// Delivered to a next hop that does not do DSN: the last word the sender will get.
    Relayed,
}

impl Kind {
    fn action(self) -> &'static str {
        match self {
            Kind::Failure => "failed",
            Kind::Delay => "delayed",
            Kind::Success => "delivered",
            Kind::Relayed => "relayed",
        }
    }
}

/// The protocol name of error mail in job files: how a bounce of a bounce is recognised.
pub const BOUNCE_PROTOCOL: &str = "bounce";

fn wants(r: &Recipient, kind: Kind) -> bool {
    if r.notify.contains(&Notify::Never) {
        return false;
    }
    match kind {
        Kind::Failure => r.notify.is_empty() || r.notify.contains(&Notify::Failure),
        Kind::Delay => r.notify.is_empty() || r.notify.contains(&Notify::Delay),
        Kind::Success | Kind::Relayed => r.notify.contains(&Notify::Success),
    }
}

/// The enhanced status code in a reply (`5.1.1`), or a default for the kind.
/// RFC 3461 xtext: `+`, `=`, and everything outside `!`..`~` as `+HH`. What a client gave
/// as ENVID or ORCPT goes into a report only in this form, so it cannot add fields or parts.
pub fn xtext(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x21..0x7f).contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

pub fn status_of(reply: &str, kind: Kind) -> String {
    for w in reply.split(|c: char| c.is_whitespace() || c == '(' || c == ')' || c == ',') {
        let parts: Vec<&str> = w.split('.').collect();
        if parts.len() == 3
            && matches!(parts[0], "2" | "4" | "5")
            && parts[1..]
                .iter()
                .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
        {
            // The class follows the action: a failure is permanent (5), a delay temporary
            // (4), whatever the reply that led to it said (RFC 3464 2.3.4).
            let class = match kind {
                Kind::Failure => "5",
                Kind::Delay => "4",
                Kind::Success | Kind::Relayed => "2",
            };
            return format!("{class}.{}.{}", parts[1], parts[2]);
        }
    }
    match kind {
        Kind::Failure => "5.0.0".into(),
        Kind::Delay => "4.0.0".into(),
        Kind::Success | Kind::Relayed => "2.0.0".into(),
    }
}

/// Sends a report about `rcpts` of `job` to its sender, as far as their NOTIFY allows.
pub fn bounce(
    cfg: &Config,
    spool: &Spool,
    job: &Job,
    rcpts: &[Recipient],
    kind: Kind,
) -> Result<(), String> {
    let rcpts: Vec<&Recipient> = rcpts.iter().filter(|r| wants(r, kind)).collect();
    if rcpts.is_empty() {
        return Ok(());
    }
    let to = match &job.sender {
        Some(a) => a.clone(),
        None if job.protocol == BOUNCE_PROTOCOL && kind == Kind::Failure => cfg.postmaster.clone(),
        None => {
            qlog!("qid={} status=bounce-dropped reason=\"failure of error mail to the postmaster; not bounced again\"", job.id);
            return Ok(());
        }
    };
    // Error mail about error mail goes to the postmaster and stops there.
    let protocol = if job.sender.is_none() {
        "double-bounce"
    } else {
        BOUNCE_PROTOCOL
    };
    // BX- fields are local and may hold credentials: they never go back in a report.
    let original = spool.read_body(job).map_err(|e| e.to_string())?;
    let original = qms_common::headers::remove_prefixed(&original, "BX-");
    let client = Client {
        local_user: Some("MAILER-DAEMON".into()),
        trusted: true,
        ..Client::default()
    };
    let mut r = Recipient::new(to.clone());
    r.notify = vec![Notify::Never];
    let new = Job::new("incoming", None, vec![r], client, protocol, &cfg.outgoing);
    let mut new = new;
    new.message_id = Some(format!(
        "{}.{}.dsn@{}",
        job.id,
        qms_common::time::now_micros(),
        cfg.hostname
    ));
    let tracked = new.clone();
    let mid = tracked.message_id.clone().unwrap_or_default();
    let build = |_: &QueueId| report(cfg, job, &rcpts, kind, &to, &original, &mid);
    let received_at = time::now_micros();
    let id = spool.enqueue(new, &build).map_err(|e| e.to_string())?;
    let mut ev = tracked.track(&to, "received", "", "queued");
    ev.qid = id.to_string();
    ev.time = received_at;
    qms_common::track::emit(ev);
    qlog!(
        "qid={} status=bounce-sent dsn_qid={id} kind={} to={to} nrcpt={}",
        job.id,
        kind.action(),
        rcpts.len()
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn report(
    cfg: &Config,
    job: &Job,
    rcpts: &[&Recipient],
    kind: Kind,
    to: &Address,
    original: &[u8],
    message_id: &str,
) -> Vec<u8> {
    let now = time::now();
    let host = &cfg.hostname;
    let subject = match kind {
        Kind::Failure => "Undelivered Mail Returned to Sender",
        Kind::Delay => "Delayed Mail (still being retried)",
        Kind::Success | Kind::Relayed => "Successful Mail Delivery Report",
    };
    let mut text = format!("This is the mail system at host {host}.\r\n\r\n");
    text.push_str(match kind {
        Kind::Failure => "I'm sorry to have to inform you that your message could not\r\nbe delivered to one or more recipients. The reasons follow.\r\n\r\n",
        Kind::Delay => "Your message could not yet be delivered to one or more recipients.\r\nIt will be retried until it is too old; you need not send it again.\r\n\r\n",
        Kind::Success => "Your message was delivered to the recipients below.\r\n\r\n",
        Kind::Relayed => "Your message was relayed to the recipients' mail servers, which do not\r\nreport delivery: this is the last report you will get.\r\n\r\n",
    });
    for r in rcpts {
        let said = r.reply.as_deref().unwrap_or(kind.action());
        text.push_str(&format!("<{}>: {said}\r\n", r.address));
    }
    let headers_only = job.ret == Some(DsnRet::Hdrs);
    let (desc, ctype, returned) = if headers_only || kind != Kind::Failure {
        let end = original
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|i| i + 2)
            .unwrap_or(original.len());
        (
            "Undelivered Message Headers",
            "text/rfc822-headers",
            &original[..end],
        )
    } else {
        ("Undelivered Message", "message/rfc822", original)
    };
    // A returned message is never re-encoded (RFC 2046 5.2.1): 8bit when it has 8-bit bytes.
    let cte = if returned.is_ascii() { "7bit" } else { "8bit" };
    let leaf = |ctype: &'static str, desc: &'static str, body: Vec<u8>, cte: &'static str| {
        MimePart::new(ContentType::new(ctype), BodyPart::Binary(body.into()))
            .transfer_encoding(cte)
            .header("Content-Description", Raw::new(desc))
    };
    let parts = vec![
        MimePart::new("text/plain", text).header("Content-Description", Raw::new("Notification")),
        leaf(
            "message/delivery-status",
            "Delivery report",
            delivery_status(cfg, job, rcpts, kind, now).into_bytes(),
            "7bit",
        ),
        leaf(ctype, desc, returned.to_vec(), cte),
    ];
    let report = ContentType::new("multipart/report").attribute("report-type", "delivery-status");
    MessageBuilder::new()
        .from((
            "Mail Delivery System",
            format!("MAILER-DAEMON@{host}").as_str(),
        ))
        .to(to.to_string())
        .subject(subject)
        .date(now)
        .message_id(message_id)
        .header("Auto-Submitted", Raw::new("auto-replied"))
        .body(MimePart::new(report, parts))
        .write_to_vec()
        .unwrap_or_default()
}

/// The `message/delivery-status` fields (RFC 3464): the per-message fields, then one block
/// per recipient whose Action and Status always agree.
fn delivery_status(cfg: &Config, job: &Job, rcpts: &[&Recipient], kind: Kind, now: i64) -> String {
    let mut m = format!(
        "Reporting-MTA: dns; {}\r\nX-Qms-Queue-ID: {}\r\n",
        cfg.hostname, job.id
    );
    if let Some(envid) = &job.envid {
        m.push_str(&format!("Original-Envelope-Id: {}\r\n", xtext(envid)));
    }
    if let Some(s) = &job.sender {
        m.push_str(&format!("X-Qms-Sender: rfc822; {s}\r\n"));
    }
    m.push_str(&format!("Arrival-Date: {}\r\n", time::rfc5322(job.arrival)));
    for r in rcpts {
        let reply = r.reply.as_deref().unwrap_or("");
        m.push_str(&format!("\r\nFinal-Recipient: rfc822; {}\r\n", r.address));
        if let Some(o) = &r.orcpt {
            let (kind, addr) = o.split_once(';').unwrap_or(("rfc822", o));
            m.push_str(&format!(
                "Original-Recipient: {}; {}\r\n",
                xtext(kind.trim()),
                xtext(addr.trim())
            ));
        } else if let Some(o) = &r.original {
            m.push_str(&format!("Original-Recipient: rfc822; {o}\r\n"));
        }
        m.push_str(&format!(
            "Action: {}\r\nStatus: {}\r\n",
            kind.action(),
            status_of(reply, kind)
        ));
        if !reply.is_empty() {
            let dtype = if reply.starts_with(|c: char| c.is_ascii_digit()) {
                "smtp"
            } else {
                "x-unix"
            };
            // The fields are 7-bit text (RFC 3464 2.1.1): other bytes of a reply as xtext.
            let reply = reply.replace(['\r', '\n'], " ");
            let reply = if reply.is_ascii() {
                reply
            } else {
                xtext(&reply)
            };
            m.push_str(&format!("Diagnostic-Code: {dtype}; {reply}\r\n"));
        }
        m.push_str(&format!("Last-Attempt-Date: {}\r\n", time::rfc5322(now)));
        if kind == Kind::Delay {
            m.push_str(&format!(
                "Will-Retry-Until: {}\r\n",
                time::rfc5322(job.expires_at)
            ));
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_status_codes() {
        assert_eq!(
            status_of("550 5.1.1 <x@y>: User unknown", Kind::Failure),
            "5.1.1"
        );
        assert_eq!(
            status_of(
                "connect to mx.example.net[192.0.2.1]:25: Connection refused",
                Kind::Delay
            ),
            "4.0.0"
        );
        assert_eq!(status_of("(4.2.2 mailbox full)", Kind::Delay), "4.2.2");
        // An action never contradicts its status (issue #11: failed with 4.3.0).
        assert_eq!(
            status_of("4.3.0 cannot read include file", Kind::Failure),
            "5.3.0"
        );
        assert_eq!(status_of("5.7.1 later", Kind::Delay), "4.7.1");
        assert_eq!(xtext("a b+c=\r\n"), "a+20b+2Bc+3D+0D+0A");
    }
}
