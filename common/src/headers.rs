//! Raw header work on messages as stored (CRLF): find, count, read and remove fields, and
//! write Received:, Date: and Message-ID:. The body of a message is never rewritten.

/// The byte ranges of each header field (name start .. end of its last continuation line,
/// CRLF included) and the offset where the body starts.
pub fn fields(msg: &[u8]) -> (Vec<(usize, usize)>, usize) {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < msg.len() {
        let line_end = match msg[pos..].windows(2).position(|w| w == b"\r\n") {
            Some(i) => pos + i + 2,
            None => msg.len(),
        };
        if line_end == pos + 2 {
            return (out, line_end); // the empty line
        }
        let line = &msg[pos..line_end];
        if line[0] == b' ' || line[0] == b'\t' {
            if let Some(last) = out.last_mut() {
                last.1 = line_end;
            }
        } else if line.contains(&b':') {
            out.push((pos, line_end));
        } else {
            return (out, pos); // not a header: the body starts here (no empty line)
        }
        pos = line_end;
    }
    (out, msg.len())
}

fn name_is(field: &[u8], name: &str) -> bool {
    let n = name.len();
    field.len() > n
        && field[..n].eq_ignore_ascii_case(name.as_bytes())
        && field[n..].iter().find(|b| **b != b' ' && **b != b'\t') == Some(&b':')
}

pub fn count(msg: &[u8], name: &str) -> usize {
    let (f, _) = fields(msg);
    f.iter()
        .filter(|(s, e)| name_is(&msg[*s..*e], name))
        .count()
}

pub fn has(msg: &[u8], name: &str) -> bool {
    count(msg, name) > 0
}

/// The message without any field called `name`.
pub fn remove(msg: &[u8], name: &str) -> Vec<u8> {
    remove_where(msg, |field| name_is(field, name))
}

/// The message without the fields whose name starts with `prefix` (any case), such as the
/// local `BX-` fields of tracked sending, which may carry credentials.
pub fn remove_prefixed(msg: &[u8], prefix: &str) -> Vec<u8> {
    let p = prefix.as_bytes();
    remove_where(msg, |field| {
        field.len() > p.len() && field[..p.len()].eq_ignore_ascii_case(p)
    })
}

/// The message with `value` as its first Authentication-Results field (RFC 8601), and
/// without those that came in claiming `host`'s name: only our own results carry it.
pub fn set_auth_results(msg: &[u8], host: &str, value: &str) -> Vec<u8> {
    let claims_us = |field: &[u8]| {
        if !name_is(field, "authentication-results") {
            return false;
        }
        let text = String::from_utf8_lossy(field);
        let v = text.split_once(':').map_or("", |(_, v)| v).trim_start();
        let id = v
            .split(|c: char| c == ';' || c.is_whitespace())
            .next()
            .unwrap_or("");
        id.eq_ignore_ascii_case(host)
    };
    let rest = remove_where(msg, claims_us);
    let mut out = format!("Authentication-Results: {value}\r\n").into_bytes();
    out.extend_from_slice(&rest);
    out
}

fn remove_where(msg: &[u8], drop: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let (f, _) = fields(msg);
    let mut out = Vec::with_capacity(msg.len());
    let mut pos = 0;
    for (s, e) in f {
        if drop(&msg[s..e]) {
            out.extend_from_slice(&msg[pos..s]);
            pos = e;
        }
    }
    out.extend_from_slice(&msg[pos..]);
    out
}

/// What a Received: field says about the hop (RFC 5321 4.4).
pub struct Hop<'a> {
    pub helo: Option<&'a str>,
    pub addr: Option<&'a str>,
    pub local_user: Option<&'a str>,
    pub by: &'a str,
    pub proto: &'a str,
    pub tls: Option<&'a str>,
    pub for_rcpt: Option<String>,
}

pub fn received(hop: &Hop, id: &str, now: i64) -> String {
    let mut s = String::from("Received: ");
    match (hop.addr, hop.local_user) {
        (Some(addr), _) => {
            let helo = hop.helo.unwrap_or("unknown");
            s.push_str(&format!("from {} ([{addr}])\r\n\t", clean(helo)));
        }
        (None, Some(user)) => s.push_str(&format!(
            "by {} (qms, from userid {})\r\n\t",
            hop.by,
            clean(user)
        )),
        (None, None) => {}
    }
    if hop.addr.is_some() || hop.local_user.is_none() {
        s.push_str(&format!("by {} (qms) ", hop.by));
    }
    s.push_str(&format!("with {} id {id}", hop.proto));
    if let Some(tls) = hop.tls {
        s.push_str(&format!("\r\n\t(using {})", clean(tls)));
    }
    if let Some(r) = &hop.for_rcpt {
        s.push_str(&format!("\r\n\tfor <{}>", clean(r)));
    }
    s.push_str(&format!("; {}\r\n", crate::time::rfc5322(now)));
    s
}

/// Keeps client-supplied words from breaking the header: no controls, no parentheses.
fn clean(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control() && *c != '(' && *c != ')')
        .take(200)
        .collect()
}

/// Every field as (name, unfolded value), in order.
pub fn named_fields(msg: &[u8]) -> Vec<(String, String)> {
    let (f, _) = fields(msg);
    f.into_iter()
        .filter_map(|(s, e)| {
            let text = String::from_utf8_lossy(&msg[s..e]);
            let (name, value) = text.split_once(':')?;
            Some((
                name.trim().to_string(),
                value.split_whitespace().collect::<Vec<_>>().join(" "),
            ))
        })
        .collect()
}

/// The value of the first field called `name`, unfolded and trimmed.
pub fn value(msg: &[u8], name: &str) -> Option<String> {
    let (f, _) = fields(msg);
    let (s, e) = f.into_iter().find(|(s, e)| name_is(&msg[*s..*e], name))?;
    let field = String::from_utf8_lossy(&msg[s..e]);
    let v = field.split_once(':')?.1;
    Some(v.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// The Message-ID of a message without angle brackets, if it has one.
pub fn message_id_of(msg: &[u8]) -> Option<String> {
    value(msg, "message-id")
        .map(|v| {
            v.trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_string()
        })
        .filter(|v| !v.is_empty())
}

/// A new Message-ID value (without brackets) for mail that lacks one.
pub fn new_message_id(host: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!("{}.{}.{n}@{host}", crate::time::now_micros(), crate::pid())
}

pub fn date(now: i64) -> String {
    format!("Date: {}\r\n", crate::time::rfc5322(now))
}

/// The recipients named in To:, Cc: and Bcc: (for `sendmail -t`).
pub fn recipients(msg: &[u8]) -> Vec<String> {
    let Some(parsed) = mail_parser::MessageParser::new().parse_headers(msg) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for list in [parsed.to(), parsed.cc(), parsed.bcc()]
        .into_iter()
        .flatten()
    {
        for a in list.iter() {
            match (a.address(), a.name()) {
                (Some(addr), _) => out.push(addr.to_string()),
                // A bare name (`To: root`, `To: ann, ben`) is a local recipient, as every
                // sendmail -t takes it; the caller adds the local domain.
                (None, Some(name)) if is_bare_name(name) => out.push(name.to_string()),
                _ => {}
            }
        }
    }
    out
}

/// A word that can be a local part on its own: no spaces, no `@`, no quoting or phrase.
fn is_bare_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~.".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_names_are_recipients() {
        // cron's `To: root`, and lists of bare names (issue #14.2).
        let m = b"To: root\r\nCc: ann, ben\r\nBcc: \"Carl\" <carl@x.test>, undisclosed-recipients:;\r\n\r\nbody\r\n";
        assert_eq!(recipients(m), ["root", "ann", "ben", "carl@x.test"]);
    }

    #[test]
    fn finds_and_removes_fields() {
        let m = b"Received: a\r\n\tb\r\nBcc: x@y.test,\r\n z@y.test\r\nSubject: hi\r\n\r\nBcc: body\r\n";
        assert_eq!(count(m, "received"), 1);
        assert!(has(m, "subject"));
        assert!(!has(m, "from"));
        assert_eq!(
            remove(m, "bcc"),
            b"Received: a\r\n\tb\r\nSubject: hi\r\n\r\nBcc: body\r\n"
        );
        assert_eq!(recipients(m), vec!["x@y.test", "z@y.test"]);
    }
}
