//! Error mail: RFC 3464 delivery status notifications, sent with the null sender to the
//! envelope sender (a bounce of a bounce goes to the postmaster, and no further).

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
    let build = |id: &QueueId| report(cfg, job, &rcpts, kind, &to, id, &original, &mid);
    let id = spool.enqueue(new, &build).map_err(|e| e.to_string())?;
    let mut ev = tracked.track(&to, "received", "", "queued");
    ev.qid = id.to_string();
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
    id: &QueueId,
    original: &[u8],
    message_id: &str,
) -> Vec<u8> {
    let now = time::now();
    let host = &cfg.hostname;
    let boundary = format!("{id}.{now}/{host}");
    let subject = match kind {
        Kind::Failure => "Undelivered Mail Returned to Sender",
        Kind::Delay => "Delayed Mail (still being retried)",
        Kind::Success | Kind::Relayed => "Successful Mail Delivery Report",
    };
    let mut m = String::new();
    m.push_str(&format!(
        "From: Mail Delivery System <MAILER-DAEMON@{host}>\r\n"
    ));
    m.push_str(&format!("To: <{to}>\r\nSubject: {subject}\r\n"));
    m.push_str(&format!(
        "Date: {}\r\nMessage-ID: <{message_id}>\r\n",
        time::rfc5322(now)
    ));
    m.push_str("Auto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\n");
    m.push_str(&format!("Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\"\r\n\r\n"));
    m.push_str("This is a MIME-encapsulated message.\r\n\r\n");
    m.push_str(&format!("--{boundary}\r\nContent-Description: Notification\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"));
    m.push_str(&format!("This is the mail system at host {host}.\r\n\r\n"));
    m.push_str(match kind {
        Kind::Failure => "I'm sorry to have to inform you that your message could not\r\nbe delivered to one or more recipients. The reasons follow.\r\n\r\n",
        Kind::Delay => "Your message could not yet be delivered to one or more recipients.\r\nIt will be retried until it is too old; you need not send it again.\r\n\r\n",
        Kind::Success => "Your message was delivered to the recipients below.\r\n\r\n",
        Kind::Relayed => "Your message was relayed to the recipients' mail servers, which do not\r\nreport delivery: this is the last report you will get.\r\n\r\n",
    });
    for r in rcpts {
        m.push_str(&format!(
            "<{}>: {}\r\n",
            r.address,
            r.reply.as_deref().unwrap_or(kind.action())
        ));
    }
    m.push_str(&format!("\r\n--{boundary}\r\nContent-Description: Delivery report\r\nContent-Type: message/delivery-status\r\n\r\n"));
    m.push_str(&format!(
        "Reporting-MTA: dns; {host}\r\nX-Qms-Queue-ID: {}\r\n",
        job.id
    ));
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
            m.push_str(&format!(
                "Diagnostic-Code: {dtype}; {}\r\n",
                reply.replace(['\r', '\n'], " ")
            ));
        }
        m.push_str(&format!("Last-Attempt-Date: {}\r\n", time::rfc5322(now)));
        if kind == Kind::Delay {
            m.push_str(&format!(
                "Will-Retry-Until: {}\r\n",
                time::rfc5322(job.expires_at)
            ));
        }
    }
    let headers_only = job.ret == Some(DsnRet::Hdrs);
    let (desc, ctype, body) = if headers_only || kind != Kind::Failure {
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
    m.push_str(&format!(
        "\r\n--{boundary}\r\nContent-Description: {desc}\r\nContent-Type: {ctype}\r\n\r\n"
    ));
    let mut out = m.into_bytes();
    out.extend_from_slice(body);
    if !body.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
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
