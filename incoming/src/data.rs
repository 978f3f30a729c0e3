//! The DATA reader. The end of the message is CRLF . CRLF and nothing else: a bare LF or
//! bare CR is never taken for a line end, so a message cannot smuggle a second one past us
//! (the CVE-2023-51764 class). Text after a refused line is read and dropped up to the real end.

use qms_common::conn::{Conn, Line};
use std::io;

#[derive(Debug, PartialEq, Eq)]
pub enum DataError {
    /// A bare LF or CR in the text.
    BareLineEnd,
    TooBig,
    LineTooLong,
}

impl DataError {
    pub fn reply(&self, limit_size: u64, limit_line: usize) -> String {
        match self {
            DataError::BareLineEnd => {
                "554 5.6.11 Message refused: bare LF or CR in the text (only CRLF ends a line)"
                    .into()
            }
            DataError::TooBig => format!("552 5.3.4 Message too big (limit {limit_size} bytes)"),
            DataError::LineTooLong => {
                format!("554 5.6.0 Message has a line longer than {limit_line} bytes")
            }
        }
    }
}

pub enum Data {
    /// The message, with CRLF line ends and dot-stuffing undone.
    Message(Vec<u8>),
    Refused(DataError),
    /// The client went away before the end: nothing is kept.
    Eof,
}

pub fn read_data(conn: &mut Conn, max_size: u64, max_line: usize) -> io::Result<Data> {
    let mut msg = Vec::with_capacity(8192);
    let mut error = None;
    let mut prev_crlf = true;
    loop {
        let (line, crlf) = match conn.read_line(max_line)? {
            Line::Eof => return Ok(Data::Eof),
            Line::Crlf(l) => (l, true),
            Line::BareLf(l) => (l, false),
            Line::TooLong { crlf } => {
                error.get_or_insert(DataError::LineTooLong);
                prev_crlf = crlf;
                continue;
            }
        };
        if crlf && prev_crlf && line == b"." {
            break;
        }
        prev_crlf = crlf;
        if error.is_some() {
            continue;
        }
        if !crlf || line.contains(&b'\r') {
            error = Some(DataError::BareLineEnd);
            continue;
        }
        let text = line.strip_prefix(b".").unwrap_or(&line);
        if (msg.len() + text.len() + 2) as u64 > max_size {
            error = Some(DataError::TooBig);
            msg = Vec::new();
            continue;
        }
        msg.extend_from_slice(text);
        msg.extend_from_slice(b"\r\n");
    }
    Ok(match error {
        Some(e) => Data::Refused(e),
        None => Data::Message(msg),
    })
}

/// Checks a message received by BDAT (no dot-stuffing) for the same line-end rules.
pub fn check_chunked(msg: &[u8], max_line: usize) -> Result<(), DataError> {
    let mut line_start = 0;
    for (i, &b) in msg.iter().enumerate() {
        match b {
            b'\n' if i == 0 || msg[i - 1] != b'\r' => return Err(DataError::BareLineEnd),
            b'\n' => {
                if i - line_start > max_line + 1 {
                    return Err(DataError::LineTooLong);
                }
                line_start = i + 1;
            }
            b'\r' if msg.get(i + 1) != Some(&b'\n') => return Err(DataError::BareLineEnd),
            _ => {}
        }
    }
    if msg.len() - line_start > max_line {
        return Err(DataError::LineTooLong);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(input: &[u8]) -> (Option<Vec<u8>>, Option<DataError>, Vec<u8>) {
        let mut conn = Conn::new(Box::new(io::Cursor::new(input.to_vec())));
        let r = read_data(&mut conn, 1 << 20, 1000).unwrap();
        let mut rest = Vec::new();
        while let Ok(Line::Crlf(l)) = conn.read_line(1000) {
            rest.extend_from_slice(&l);
            rest.push(b'|');
        }
        match r {
            Data::Message(m) => (Some(m), None, rest),
            Data::Refused(e) => (None, Some(e), rest),
            Data::Eof => (None, None, rest),
        }
    }

    #[test]
    fn unstuffs_dots() {
        let (m, _, rest) = run(b"a\r\n..b\r\n.\r\nQUIT\r\n");
        assert_eq!(m.unwrap(), b"a\r\n.b\r\n");
        assert_eq!(rest, b"QUIT|");
    }

    #[test]
    fn smuggling_payloads_do_not_end_data() {
        for payload in [&b"\n.\n"[..], b"\r\n.\n", b"\n.\r\n", b"\r.\r"] {
            let mut input = b"hi".to_vec();
            input.extend_from_slice(payload);
            input.extend_from_slice(b"MAIL FROM:<evil@x.test>\r\n\r\n.\r\nNOOP\r\n");
            let (m, e, rest) = run(&input);
            assert!(m.is_none(), "payload {payload:?} accepted");
            assert_eq!(e, Some(DataError::BareLineEnd), "payload {payload:?}");
            assert_eq!(rest, b"NOOP|", "payload {payload:?} ended DATA early");
        }
    }

    #[test]
    fn eof_mid_data_keeps_nothing() {
        assert!(run(b"half a message\r\n").0.is_none());
    }

    #[test]
    fn chunked_rules() {
        assert!(check_chunked(b"a\r\nb\r\n", 1000).is_ok());
        assert_eq!(check_chunked(b"a\nb", 1000), Err(DataError::BareLineEnd));
        assert_eq!(check_chunked(b"a\rb", 1000), Err(DataError::BareLineEnd));
    }
}
