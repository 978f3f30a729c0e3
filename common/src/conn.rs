//! A buffered SMTP connection, for the server and the client alike: reads CRLF-terminated
//! lines with a length limit and exact byte counts (BDAT), and batches what it writes until
//! the peer waits for it (PIPELINING).

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;

pub trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// A TCP socket read and written through a shared handle, so the session, its timeouts and
/// the lifetime watcher hold one descriptor instead of a duplicate each (two `dup`s and two
/// `close`s a connection).
pub struct SharedSocket(pub Arc<TcpStream>);

impl Read for SharedSocket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self.0).read(buf)
    }
}

impl Write for SharedSocket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self.0).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        (&*self.0).flush()
    }
}

pub struct Conn {
    stream: Box<dyn Stream>,
    /// The socket under the stream (TLS or not), to change its read timeout.
    socket: Option<Arc<TcpStream>>,
    buf: Vec<u8>,
    pos: usize,
    out: Vec<u8>,
    /// What one read takes from the socket: zeroed once per connection, not once a read.
    chunk: Box<[u8]>,
}

/// The most one read takes from the socket.
const READ_SIZE: usize = 8192;

/// One line as read from the client, without its line end.
pub enum Line {
    /// Ended by CRLF.
    Crlf(Vec<u8>),
    /// Ended by a bare LF: never a line end in SMTP, reported so the caller can refuse it.
    BareLf(Vec<u8>),
    /// Longer than the limit; the rest of it up to the next LF was skipped. `crlf` tells
    /// whether that LF had a CR before it.
    TooLong {
        crlf: bool,
    },
    Eof,
}

/// How a line read by [`Conn::read_line_into`] ended (see [`Line`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineEnd {
    Crlf,
    BareLf,
    TooLong { crlf: bool },
    Eof,
}

/// Where the bytes of a BDAT chunk go as they arrive.
pub type ChunkSink<'a> = dyn FnMut(&[u8]) + 'a;

impl Conn {
    pub fn new(stream: Box<dyn Stream>) -> Conn {
        Conn {
            stream,
            socket: None,
            buf: Vec::with_capacity(4096),
            pos: 0,
            out: Vec::with_capacity(512),
            chunk: vec![0; READ_SIZE].into_boxed_slice(),
        }
    }

    /// Keeps a handle on the TCP socket so timeouts can follow the protocol phase.
    pub fn with_socket(mut self, socket: Option<Arc<TcpStream>>) -> Conn {
        self.socket = socket;
        self
    }

    /// Sets how long a read may wait (RFC 5321 4.5.3.2: commands and data differ).
    pub fn set_timeout(&self, secs: u64) {
        if let Some(s) = &self.socket {
            let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(secs.max(1))));
        }
    }

    /// True when the client has sent more than we have read (pipelined commands).
    pub fn has_buffered(&self) -> bool {
        self.pos < self.buf.len()
    }

    fn fill(&mut self) -> io::Result<usize> {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        if !self.out.is_empty() {
            self.flush()?;
        }
        let n = loop {
            match self.stream.read(&mut self.chunk) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => break r?,
            }
        };
        self.buf.extend_from_slice(&self.chunk[..n]);
        Ok(n)
    }

    /// Reads up to and including the next LF; lines over `limit` bytes come back as TooLong.
    pub fn read_line(&mut self, limit: usize) -> io::Result<Line> {
        let mut line = Vec::new();
        Ok(match self.read_line_into(limit, &mut line)? {
            LineEnd::Crlf => Line::Crlf(line),
            LineEnd::BareLf => Line::BareLf(line),
            LineEnd::TooLong { crlf } => Line::TooLong { crlf },
            LineEnd::Eof => Line::Eof,
        })
    }

    /// [`Conn::read_line`] into the caller's buffer (cleared first, its line end left off),
    /// so a loop over a message's lines allocates nothing per line.
    pub fn read_line_into(&mut self, limit: usize, line: &mut Vec<u8>) -> io::Result<LineEnd> {
        line.clear();
        let mut skipping = false;
        let mut last = 0u8;
        loop {
            if let Some(i) = self.buf[self.pos..].iter().position(|&b| b == b'\n') {
                let end = self.pos + i;
                if skipping || line.len() + i > limit + 1 {
                    let crlf = if end > self.pos {
                        self.buf[end - 1] == b'\r'
                    } else {
                        last == b'\r'
                    };
                    self.pos = end + 1;
                    line.clear();
                    return Ok(LineEnd::TooLong { crlf });
                }
                line.extend_from_slice(&self.buf[self.pos..end]);
                self.pos = end + 1;
                return Ok(if line.last() == Some(&b'\r') {
                    line.pop();
                    LineEnd::Crlf
                } else {
                    LineEnd::BareLf
                });
            }
            if let Some(&b) = self.buf.last() {
                last = b;
            }
            if !skipping {
                line.extend_from_slice(&self.buf[self.pos..]);
                if line.len() > limit + 1 {
                    skipping = true;
                    line.clear();
                }
            }
            self.pos = self.buf.len();
            if self.fill()? == 0 {
                let cut = skipping || !line.is_empty();
                line.clear();
                return Ok(if cut {
                    LineEnd::TooLong { crlf: false }
                } else {
                    LineEnd::Eof
                });
            }
        }
    }

    /// Reads exactly `n` bytes (a BDAT chunk), handing them to `into` piece by piece as they
    /// arrive, or dropping them when `into` is None (a chunk being discarded). Returns false
    /// on EOF before the end.
    pub fn read_exact_into(
        &mut self,
        mut n: u64,
        mut into: Option<&mut ChunkSink>,
    ) -> io::Result<bool> {
        while n > 0 {
            if self.pos == self.buf.len() && self.fill()? == 0 {
                return Ok(false);
            }
            let take = ((self.buf.len() - self.pos) as u64).min(n) as usize;
            if let Some(f) = into.as_deref_mut() {
                f(&self.buf[self.pos..self.pos + take]);
            }
            self.pos += take;
            n -= take as u64;
        }
        Ok(true)
    }

    /// Queues a line (a reply, or a client's command); it goes out at the next flush, or
    /// before the next read that has to wait.
    pub fn reply(&mut self, text: &str) {
        self.out.extend_from_slice(text.as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    /// Queues raw bytes (message data).
    pub fn send_raw(&mut self, data: &[u8]) {
        self.out.extend_from_slice(data);
    }

    pub fn flush(&mut self) -> io::Result<()> {
        if !self.out.is_empty() {
            self.stream.write_all(&self.out)?;
            self.out.clear();
        }
        self.stream.flush()
    }

    /// Runs `f` on the transport to replace it (a TLS handshake); anything still buffered
    /// is dropped, since it was sent before the new transport existed.
    pub fn upgrade<T>(
        &mut self,
        f: impl FnOnce(Box<dyn Stream>) -> Result<(Box<dyn Stream>, T), String>,
    ) -> Result<T, String> {
        self.buf.clear();
        self.pos = 0;
        let old = std::mem::replace(&mut self.stream, Box::new(Closed));
        let (new, info) = f(old)?;
        self.stream = new;
        Ok(info)
    }
}

/// The transport of a connection whose handshake failed: nothing more goes through.
struct Closed;

impl Read for Closed {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        Ok(0)
    }
}

impl Write for Closed {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::Error::new(
            io::ErrorKind::NotConnected,
            "connection closed",
        ))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
