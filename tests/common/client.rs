//! A minimal SMTP client for load under faults: one session, many transactions, and a plain
//! yes or no for each message (was it acknowledged with 250 after its text?).

use std::io::{self, BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

pub struct SmtpClient {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl SmtpClient {
    /// Connects, reads the greeting and says EHLO.
    pub fn connect(port: u16) -> io::Result<SmtpClient> {
        let s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut c = SmtpClient {
            r: BufReader::new(s.try_clone()?),
            w: s,
        };
        c.expect(2)?;
        c.w.write_all(b"EHLO client.test\r\n")?;
        c.expect(2)?;
        Ok(c)
    }

    /// The reply's code, after reading all its lines.
    fn reply(&mut self) -> io::Result<u16> {
        loop {
            let mut line = String::new();
            if self.r.read_line(&mut line)? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                return line
                    .get(..3)
                    .and_then(|c| c.parse().ok())
                    .ok_or_else(|| io::Error::other(format!("bad reply {line:?}")));
            }
        }
    }

    fn expect(&mut self, class: u16) -> io::Result<()> {
        let code = self.reply()?;
        if code / 100 != class {
            return Err(io::Error::other(format!("reply {code}")));
        }
        Ok(())
    }

    /// Sends one message (LF line ends are made CRLF, dots doubled); Ok(()) means acknowledged.
    pub fn send(&mut self, from: &str, to: &str, text: &str) -> io::Result<()> {
        write!(self.w, "MAIL FROM:<{from}>\r\n")?;
        self.expect(2)?;
        write!(self.w, "RCPT TO:<{to}>\r\n")?;
        self.expect(2)?;
        self.w.write_all(b"DATA\r\n")?;
        self.expect(3)?;
        let mut data = String::with_capacity(text.len() + 64);
        for line in text.lines() {
            if line.starts_with('.') {
                data.push('.');
            }
            data.push_str(line);
            data.push_str("\r\n");
        }
        data.push_str(".\r\n");
        self.w.write_all(data.as_bytes())?;
        self.expect(2)
    }
}
