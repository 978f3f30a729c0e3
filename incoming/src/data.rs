//! The DATA reader. The end of the message is CRLF . CRLF and nothing else: a bare LF or
//! bare CR is never taken for a line end, so a message cannot smuggle a second one past us
//! (the CVE-2023-51764 class). Text after a refused line is read and dropped up to the real end.

use qms_common::conn::{Conn, LineEnd};
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
    /// The whole message went to the sink: CRLF line ends, dot-stuffing undone.
    Complete,
    Refused(DataError),
    /// The client went away before the end: nothing is kept.
    Eof,
}

/// Reads DATA up to CRLF . CRLF, handing each line (with its CRLF) to `sink` as it arrives,
/// so nothing of the message is held here. After a refused line the rest is read and
/// dropped; what went to the sink before is the caller's to throw away.
pub fn read_data(
    conn: &mut Conn,
    max_size: u64,
    max_line: usize,
    sink: &mut dyn FnMut(&[u8]),
) -> io::Result<Data> {
    let mut size = 0u64;
    let mut error = None;
    let mut prev_crlf = true;
    // One buffer for every line: it is handed to the sink with its CRLF put back.
    let mut line = Vec::with_capacity(max_line.min(8192) + 2);
    loop {
        let crlf = match conn.read_line_into(max_line, &mut line)? {
            LineEnd::Eof => return Ok(Data::Eof),
            LineEnd::Crlf => true,
            LineEnd::BareLf => false,
            LineEnd::TooLong { crlf } => {
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
        let stuffed = usize::from(line.first() == Some(&b'.'));
        size += (line.len() - stuffed) as u64 + 2;
        if size > max_size {
            error = Some(DataError::TooBig);
            continue;
        }
        line.extend_from_slice(b"\r\n");
        sink(&line[stuffed..]);
    }
    Ok(match error {
        Some(e) => Data::Refused(e),
        None => Data::Complete,
    })
}

/// The line-end rules for a message received by BDAT (no dot-stuffing), checked as the
/// chunks arrive: a CR is always followed by LF and a LF always preceded by CR.
#[derive(Default)]
pub struct ChunkCheck {
    prev_cr: bool,
    line_len: usize,
    pub error: Option<DataError>,
}

impl ChunkCheck {
    pub fn feed(&mut self, bytes: &[u8], max_line: usize) {
        for &b in bytes {
            if self.error.is_some() {
                return;
            }
            match b {
                b'\n' if !self.prev_cr => self.error = Some(DataError::BareLineEnd),
                b'\n' => {
                    if self.line_len > max_line + 1 {
                        self.error = Some(DataError::LineTooLong);
                    }
                    self.line_len = 0;
                    self.prev_cr = false;
                    continue;
                }
                _ if self.prev_cr => self.error = Some(DataError::BareLineEnd),
                _ => {}
            }
            self.prev_cr = b == b'\r';
            self.line_len += 1;
        }
    }

    /// The verdict once the last chunk is in.
    pub fn finish(&mut self, max_line: usize) -> Result<(), DataError> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        if self.prev_cr {
            return Err(DataError::BareLineEnd);
        }
        if self.line_len > max_line {
            return Err(DataError::LineTooLong);
        }
        Ok(())
    }
}

/// Checks a whole message received by BDAT (see [`ChunkCheck`]).
#[cfg(test)]
pub fn check_chunked(msg: &[u8], max_line: usize) -> Result<(), DataError> {
    let mut c = ChunkCheck::default();
    c.feed(msg, max_line);
    c.finish(max_line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use qms_common::conn::Line;

    fn run(input: &[u8]) -> (Option<Vec<u8>>, Option<DataError>, Vec<u8>) {
        let mut conn = Conn::new(Box::new(io::Cursor::new(input.to_vec())));
        let mut got = Vec::new();
        let r = read_data(&mut conn, 1 << 20, 1000, &mut |l| got.extend_from_slice(l)).unwrap();
        let mut rest = Vec::new();
        while let Ok(Line::Crlf(l)) = conn.read_line(1000) {
            rest.extend_from_slice(&l);
            rest.push(b'|');
        }
        match r {
            Data::Complete => (Some(got), None, rest),
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
        assert_eq!(check_chunked(b"a\r", 1000), Err(DataError::BareLineEnd));
        // A CRLF split across two chunks is one line end; a bare CR across them is not.
        let mut c = ChunkCheck::default();
        c.feed(b"a\r", 1000);
        c.feed(b"\nb\r\n", 1000);
        assert!(c.finish(1000).is_ok());
        let mut c = ChunkCheck::default();
        c.feed(b"a\r", 1000);
        c.feed(b"b\r\n", 1000);
        assert_eq!(c.finish(1000), Err(DataError::BareLineEnd));
    }
}
