//! Where a connection goes: an address and port found for a host, or the local socket of a
//! post office (`lmtp:unix:/run/dovecot/lmtp`), and the socket opened to it.

use qms_common::conn::Stream;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Peer {
    Inet(SocketAddr),
    Unix(PathBuf),
}

impl Peer {
    /// How the log names it after the host name: `[192.0.2.1]:25`, `[/run/dovecot/lmtp]`.
    pub fn place(&self) -> String {
        match self {
            Peer::Inet(a) => format!("[{}]:{}", a.ip(), a.port()),
            Peer::Unix(p) => format!("[{}]", p.display()),
        }
    }

    /// The same without the port, as replies quote a host: `[192.0.2.1]`.
    pub fn at(&self) -> String {
        match self {
            Peer::Inet(a) => format!("[{}]", a.ip()),
            Peer::Unix(p) => format!("[{}]", p.display()),
        }
    }

    /// The name TLS checks when the host has none (an address, or this host).
    pub fn server_name(&self) -> rustls::pki_types::ServerName<'static> {
        match self {
            Peer::Inet(a) => rustls::pki_types::ServerName::IpAddress(a.ip().into()),
            Peer::Unix(_) => rustls::pki_types::ServerName::try_from("localhost").unwrap_or(
                rustls::pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
            ),
        }
    }

    /// Connects within `timeout`, with `io_timeout` for every read and write.
    pub fn connect(&self, timeout: Duration, io_timeout: Duration) -> io::Result<Socket> {
        let s = match self {
            Peer::Inet(a) => {
                let s = TcpStream::connect_timeout(a, timeout)?;
                let _ = s.set_nodelay(true);
                Socket::Tcp(s)
            }
            Peer::Unix(p) => Socket::Unix(UnixStream::connect(p)?),
        };
        s.set_read_timeout(io_timeout)?;
        s.set_write_timeout(io_timeout)?;
        Ok(s)
    }
}

/// An open connection's socket, kept beside its stream to change the read timeout.
pub enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Socket {
    pub fn set_read_timeout(&self, t: Duration) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => s.set_read_timeout(Some(t)),
            Socket::Unix(s) => s.set_read_timeout(Some(t)),
        }
    }

    fn set_write_timeout(&self, t: Duration) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => s.set_write_timeout(Some(t)),
            Socket::Unix(s) => s.set_write_timeout(Some(t)),
        }
    }

    /// A second handle on the same connection, for the buffered stream.
    pub fn stream(&self) -> io::Result<Box<dyn Stream>> {
        Ok(match self {
            Socket::Tcp(s) => Box::new(s.try_clone()?),
            Socket::Unix(s) => Box::new(s.try_clone()?),
        })
    }
}
