//! A report as it really arrives: saved from a mailbox with an mbox `From ` line, with LF,
//! CRLF or bare CR line ends, with 8-bit text in any charset. What a mail reader would open
//! is made into one message with CRLF line ends; only what is plainly not mail is refused.

/// The message in `raw`, ready for the MIME parser.
pub fn normalise(raw: &[u8]) -> Result<Vec<u8>, String> {
    let mut start = 0;
    // Blank lines before the header section (some tools write them).
    while start < raw.len() && matches!(raw[start], b'\r' | b'\n' | b' ' | b'\t') {
        start += 1;
    }
    // The mbox separator: `From sender date`, and the `>From ` of a quoting mailbox.
    let rest = &raw[start..];
    if rest.starts_with(b"From ") || rest.starts_with(b">From ") {
        start += line_len(rest);
    }
    let body = &raw[start..];
    if !starts_with_field(body) {
        return Err("not a mail message: it does not start with header fields".into());
    }
    let head_end = memchr::memmem::find(body, b"\n\n")
        .or_else(|| memchr::memmem::find(body, b"\r\r"))
        .or_else(|| memchr::memmem::find(body, b"\n\r\n"))
        .unwrap_or(body.len());
    if body[..head_end].contains(&0) {
        return Err("not a mail message: its header section holds binary data".into());
    }
    Ok(crlf(body))
}

/// The length of the first line, its end included.
fn line_len(s: &[u8]) -> usize {
    match s.iter().position(|&b| b == b'\n' || b == b'\r') {
        Some(i) if s[i] == b'\r' && s.get(i + 1) == Some(&b'\n') => i + 2,
        Some(i) => i + 1,
        None => s.len(),
    }
}

/// `Name: value` on the first line, the name printable ASCII without spaces.
fn starts_with_field(s: &[u8]) -> bool {
    let first = &s[..line_len(s)];
    first
        .iter()
        .position(|&b| b == b':')
        .is_some_and(|i| i > 0 && first[..i].iter().all(|b| b.is_ascii_graphic()))
}

/// Every line end as CRLF: bare CR (old Macintosh files) and bare LF (Unix mailboxes) alike.
pub fn crlf(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len() + s.len() / 32);
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'\r' => {
                out.extend_from_slice(b"\r\n");
                if s.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
            }
            b'\n' => out.extend_from_slice(b"\r\n"),
            b => out.push(b),
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_a_mail_reader_opens() {
        let mbox = b"From MAILER-DAEMON Thu Apr 29 23:34:45 2010\nFrom: a@b\n\nbody\n";
        assert_eq!(normalise(mbox).unwrap(), b"From: a@b\r\n\r\nbody\r\n");
        let cr = b"From: a@b\rSubject: x\r\rbody\r";
        assert_eq!(
            normalise(cr).unwrap(),
            b"From: a@b\r\nSubject: x\r\n\r\nbody\r\n"
        );
        let crlf = b"\r\nFrom: a@b\r\n\r\nbody\r\n";
        assert_eq!(normalise(crlf).unwrap(), b"From: a@b\r\n\r\nbody\r\n");
        assert!(normalise(b"\x7fELF\x02\x01\x01\0\0\0").is_err());
        assert!(normalise(b"just some text\n").is_err());
    }
}
