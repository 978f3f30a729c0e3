//! One SMTP transaction's words and what the replies mean: MAIL and RCPT with their
//! parameters (SIZE, BODY, SMTPUTF8, RFC 3461 DSN), what must be refused before sending
//! (RFC 6152, 6531, 1870), and the verdict per recipient.

use crate::client::{Client, Reply};
use qms_spool::{Job, Notify};

#[derive(Clone, Copy)]
pub(crate) enum Verdict {
    Sent { peer_dsn: bool },
    Deferred,
    Failed,
}

/// What the peer cannot take, decided before anything is sent (RFC 6152, 6531, 1870).
pub(crate) fn refuse_before_sending(
    job: &Job,
    ris: &[usize],
    c: &Client,
    size: usize,
) -> Option<String> {
    let host = format!("{}{}", c.name, c.peer.at());
    let utf8 = job.smtputf8
        || job.sender.as_ref().is_some_and(|s| s.is_utf8())
        || ris.iter().any(|&ri| job.recipients[ri].address.is_utf8());
    if utf8 && !c.ext.smtputf8 {
        return Some(format!(
            "5.6.7 {host} does not support SMTPUTF8, which this message needs"
        ));
    }
    if job.eightbit && !c.ext.eightbit {
        return Some(format!(
            "5.6.3 {host} does not support 8BITMIME, which this message needs"
        ));
    }
    if c.ext.size.is_some_and(|max| size as u64 > max) {
        return Some(format!(
            "5.3.4 message size {size} exceeds the limit of {host}"
        ));
    }
    None
}

/// RFC 3461 xtext: `+XX` for `+`, `=` and anything outside printable ASCII.
fn xtext(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if (33..=126).contains(&b) && b != b'+' && b != b'=' {
                (b as char).to_string()
            } else {
                format!("+{b:02X}")
            }
        })
        .collect()
}

pub(crate) fn mail_command(job: &Job, c: &Client, size: usize) -> String {
    let mut m = format!(
        "MAIL FROM:<{}>",
        job.sender
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default()
    );
    if c.ext.size.is_some() {
        m.push_str(&format!(" SIZE={size}"));
    }
    if job.eightbit && c.ext.eightbit {
        m.push_str(" BODY=8BITMIME");
    }
    if job.smtputf8 && c.ext.smtputf8 {
        m.push_str(" SMTPUTF8");
    }
    if c.ext.dsn {
        match job.ret {
            Some(qms_spool::DsnRet::Full) => m.push_str(" RET=FULL"),
            Some(qms_spool::DsnRet::Hdrs) => m.push_str(" RET=HDRS"),
            None => {}
        }
        if let Some(e) = &job.envid {
            m.push_str(&format!(" ENVID={}", xtext(e)));
        }
    }
    m
}

pub(crate) fn rcpt_command(job: &Job, ri: usize, c: &Client) -> String {
    let r = &job.recipients[ri];
    let mut cmd = format!("RCPT TO:<{}>", r.address);
    if c.ext.dsn {
        if !r.notify.is_empty() {
            let n: Vec<&str> = r
                .notify
                .iter()
                .map(|n| match n {
                    Notify::Never => "NEVER",
                    Notify::Success => "SUCCESS",
                    Notify::Failure => "FAILURE",
                    Notify::Delay => "DELAY",
                })
                .collect();
            cmd.push_str(&format!(" NOTIFY={}", n.join(",")));
        }
        if let Some(o) = &r.orcpt {
            if let Some((kind, addr)) = o.split_once(';') {
                cmd.push_str(&format!(" ORCPT={kind};{}", xtext(addr)));
            }
        }
    }
    cmd
}

/// The verdict for one recipient from the replies to MAIL, its RCPT and the data.
pub(crate) fn judge(
    mail: &Reply,
    rcpt: Option<&Reply>,
    data: Option<&Reply>,
    peer_dsn: bool,
) -> (Verdict, String) {
    let by = |r: &Reply| {
        if r.is_permanent() {
            Verdict::Failed
        } else {
            Verdict::Deferred
        }
    };
    if !mail.is_ok() {
        return (by(mail), mail.text.clone());
    }
    let Some(rcpt) = rcpt else {
        return (Verdict::Deferred, "4.4.2 no reply to RCPT".into());
    };
    if !rcpt.is_ok() {
        return (by(rcpt), rcpt.text.clone());
    }
    match data {
        Some(d) if d.is_ok() => (Verdict::Sent { peer_dsn }, d.text.clone()),
        Some(d) => (by(d), d.text.clone()),
        None => (Verdict::Deferred, "4.4.2 the message was not sent".into()),
    }
}
