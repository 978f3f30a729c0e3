//! The machine-readable parts of reports: RFC 3464 delivery-status fields (also where an MTA
//! put them in a text part), RFC 8098 disposition fields and RFC 5965 feedback fields.

use super::{reason, RcptReport, Report};

/// Unfolds header-style lines into (lower-case name, value) pairs, in order.
pub fn fields(text: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        if line.starts_with([' ', '\t']) {
            if let Some(last) = out.last_mut() {
                last.1.push(' ');
                last.1.push_str(line.trim());
            }
        } else if let Some((k, v)) = line.split_once(':') {
            let k = k.trim();
            if !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                out.push((k.to_ascii_lowercase(), v.trim().to_string()));
            }
        }
    }
    out
}

pub fn get<'a>(f: &'a [(String, String)], name: &str) -> Option<&'a str> {
    f.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// `rfc822; <a@b>` → `a@b`; `dns; mx.example.net` → `mx.example.net`. A quoted whole
/// address loses its quotes; a quoted local part keeps them.
pub fn typed_value(v: &str) -> String {
    let v = v.split_once(';').map(|(_, a)| a).unwrap_or(v).trim();
    let v = v.split_whitespace().next().unwrap_or("");
    let v = v.trim_start_matches('<').trim_end_matches(['>', ',']);
    // An RFC 821 source route, `@relay:user@domain`: the mailbox is after the colon.
    let v = match v.rsplit_once(':') {
        Some((route, mailbox)) if route.starts_with('@') => mailbox,
        _ => v,
    };
    let unquoted = v.trim_matches('"');
    if v.starts_with('"') && v.ends_with('"') && unquoted.contains('@') {
        return unquoted.to_string();
    }
    v.to_string()
}

pub fn strip_id(v: &str) -> String {
    v.trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .to_string()
}

/// Whether a text part carries delivery-status fields (some MTAs send them as text/plain).
pub fn has_dsn_fields(text: &str) -> bool {
    let f = fields(text);
    get(&f, "final-recipient")
        .or(get(&f, "original-recipient"))
        .is_some()
        && (get(&f, "action").is_some() || get(&f, "status").is_some())
}

/// Reads delivery-status fields into `report`. Recipients are told apart by their
/// `Final-Recipient`/`Original-Recipient` fields, not by empty lines, which some MTAs leave
/// out and others put in the middle of a recipient's fields.
pub fn parse_dsn(body: &str, report: &mut Report) {
    let all = fields(&body.replace("\r\n", "\n"));
    let mut group: Vec<(String, String)> = Vec::new();
    let has = |g: &[(String, String)], name: &str| g.iter().any(|(n, _)| n == name);
    for (k, v) in all {
        match k.as_str() {
            "reporting-mta" => report.reporting_mta = Some(typed_value(&v)),
            "original-envelope-id" => report.envid = Some(v.trim().to_string()),
            "arrival-date" | "received-from-mta" | "x-postfix-queue-id" | "x-postfix-sender" => {}
            _ => {
                // A field the group already has begins the next recipient's; so does a
                // recipient field after the previous one's action or status. (RFC 3464 puts
                // Original- before Final-Recipient, Postfix the other way round; some MTAs
                // put Action first.)
                let first_named = group
                    .iter()
                    .position(|(n, _)| RCPT_FIELDS.contains(&n.as_str()));
                let rcpt_field = RCPT_FIELDS.contains(&k.as_str());
                let starts_new = first_named.is_some_and(|i| {
                    has(&group, &k)
                        || rcpt_field
                            && group[i..]
                                .iter()
                                .any(|(n, _)| n == "action" || n == "status")
                });
                if starts_new {
                    push_rcpt(&group, report);
                    group.clear();
                }
                group.push((k, v));
            }
        }
    }
    push_rcpt(&group, report);
}

const RCPT_FIELDS: &[&str] = &[
    "final-recipient",
    "original-recipient",
    "x-actual-recipient",
];

fn push_rcpt(f: &[(String, String)], report: &mut Report) {
    let final_rcpt = get(f, "final-recipient").map(typed_value);
    let original = get(f, "original-recipient").map(typed_value);
    let Some(address) = final_rcpt
        .clone()
        .filter(|a| a.contains('@'))
        .or(original.clone().filter(|a| a.contains('@')))
        .or(get(f, "x-actual-recipient").map(typed_value))
        .or(final_rcpt)
    else {
        return;
    };
    let status = get(f, "status")
        .and_then(|s| s.split_whitespace().next())
        .map(str::to_string)
        .filter(|s| !s.is_empty());
    let diagnostic = get(f, "diagnostic-code")
        .map(|d| {
            d.split_once(';')
                .map(|(_, t)| t)
                .unwrap_or(d)
                .trim()
                .to_string()
        })
        .filter(|d| !d.is_empty());
    let action = action_of(get(f, "action"), status.as_deref(), diagnostic.as_deref());
    report.recipients.push(RcptReport::new(
        address,
        action,
        status,
        diagnostic,
        original.filter(|o| o.contains('@')),
    ));
}

/// The RFC 3464 action, spelled as the RFC spells it; where missing or mangled, what the
/// status class or the diagnostic says.
fn action_of(field: Option<&str>, status: Option<&str>, diagnostic: Option<&str>) -> String {
    let f = field.unwrap_or("").trim().to_ascii_lowercase();
    for (prefix, action) in [
        ("fail", "failed"),
        ("delay", "delayed"),
        ("deliver", "delivered"),
        ("relay", "relayed"),
        ("expand", "expanded"),
    ] {
        if f.starts_with(prefix) {
            return action.into();
        }
    }
    match status.map(|s| s.as_bytes()[0]) {
        Some(b'2') => "delivered".into(),
        Some(b'4') => "delayed".into(),
        Some(b'5') => "failed".into(),
        _ => match diagnostic.and_then(reason::reply_class) {
            Some('4') => "delayed".into(),
            Some('2') => "delivered".into(),
            _ => "failed".into(),
        },
    }
}

pub fn parse_mdn(body: &str, report: &mut Report) {
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
        report.recipients.push(RcptReport::new(
            typed_value(r),
            action,
            None,
            None,
            get(&f, "original-recipient").map(typed_value),
        ));
    }
}

/// RFC 5965 fields: the feedback type and, where the reporter gives it, the complaining
/// recipient (`Original-Rcpt-To`, or `Removal-Recipient` of older reporters).
pub fn parse_feedback(body: &str, report: &mut Report) -> Vec<String> {
    let f = fields(&body.replace("\r\n", "\n"));
    report.feedback_type = get(&f, "feedback-type").map(|t| t.trim().to_ascii_lowercase());
    report.reporting_mta = get(&f, "reporting-mta")
        .map(typed_value)
        .or_else(|| get(&f, "user-agent").map(|v| v.trim().to_string()));
    if let Some(id) = get(&f, "original-message-id") {
        report.original_message_id = Some(strip_id(id));
    }
    f.iter()
        .filter(|(k, _)| k == "original-rcpt-to" || k == "removal-recipient")
        .map(|(_, v)| typed_value(v))
        .filter(|a| a.contains('@'))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipients_without_blank_lines_between_them() {
        let mut r = Report::empty();
        parse_dsn(
            "Reporting-MTA: dns; mx.example.net\nFinal-Recipient: rfc822; a@example.org\nAction: failed\n\
Status: 5.1.1\nFinal-Recipient: rfc822; \"b@example.org\"\nAction: Delayed (will retry)\nStatus: 4.4.1\n",
            &mut r,
        );
        let got: Vec<_> = r
            .recipients
            .iter()
            .map(|x| (x.address.as_str(), x.action.as_str()))
            .collect();
        assert_eq!(
            got,
            [("a@example.org", "failed"), ("b@example.org", "delayed")]
        );
        assert_eq!(r.reporting_mta.as_deref(), Some("mx.example.net"));
    }

    #[test]
    fn original_recipient_alone_names_the_recipient() {
        let mut r = Report::empty();
        parse_dsn(
            "Original-Recipient: <c@example.org>\nAction: failed\nDiagnostic-Code: smtp; 550 Unknown user\n",
            &mut r,
        );
        assert_eq!(r.recipients[0].address, "c@example.org");
        assert_eq!(r.recipients[0].action, "failed");
        assert_eq!(
            typed_value("rfc822; \"a..b\"@example.org"),
            "\"a..b\"@example.org"
        );
    }
}
