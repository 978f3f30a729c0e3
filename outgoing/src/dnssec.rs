//! DNS answers whose security matters (DANE, RFC 7672): one query to the resolver with the
//! AD bit set, and whether the answer came back authenticated. qms does not validate
//! signatures itself: it trusts the AD bit of the resolver it was given (`[dns] server`) or of
//! a system resolver on this host, and of no other, since a resolver across the network
//! could have its answers changed on the way.

use hickory_resolver::proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::str::FromStr;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(5);

/// An answer and whether a trusted validating resolver vouched for it.
#[derive(Debug)]
pub(crate) struct Answer {
    /// The AD bit was set by a trusted resolver.
    pub(crate) secure: bool,
    /// The records of the type asked (CNAMEs followed by the resolver are left out).
    pub(crate) records: Vec<RData>,
}

/// Why no answer can be used: the resolver failed (SERVFAIL, as a failed validation is
/// reported) or did not answer.
pub(crate) type Failed = String;

pub(crate) struct Resolver {
    server: Option<SocketAddr>,
    trusted: bool,
}

impl Resolver {
    /// Asks `[dns] server`, else the first `nameserver` of /etc/resolv.conf; its AD bit is
    /// believed when it was configured or is on this host.
    pub(crate) fn new(configured: Option<SocketAddr>) -> Resolver {
        let server = configured.or_else(system_resolver);
        let trusted = configured.is_some() || server.is_some_and(|s| s.ip().is_loopback());
        Resolver { server, trusted }
    }

    /// `name`'s records of type `rtype`. NXDOMAIN and NODATA are an empty answer, secure
    /// when the resolver proved the denial.
    pub(crate) fn ask(&self, name: &str, rtype: RecordType) -> Result<Answer, Failed> {
        let server = self.server.ok_or("no DNS resolver is configured")?;
        let fqdn = Name::from_str(&format!("{}.", name.trim_end_matches('.')))
            .map_err(|e| format!("bad DNS name {name}: {e}"))?;
        let mut q = Message::new(query_id(), MessageType::Query, OpCode::Query);
        q.add_query(Query::query(fqdn, rtype));
        q.metadata.recursion_desired = true;
        // RFC 6840 5.7: AD in the query asks for AD in the answer; DO too, for resolvers
        // that want it.
        q.metadata.authentic_data = true;
        let mut edns = Edns::new();
        edns.set_max_payload(1232).set_dnssec_ok(true);
        q.set_edns(edns);
        let wire = q.to_vec().map_err(|e| e.to_string())?;
        let mut reply = udp(server, &wire)?;
        if reply.metadata.truncation {
            reply = tcp(server, &wire)?;
        }
        if reply.metadata.id != q.metadata.id {
            return Err(format!("DNS reply for {name} has the wrong id"));
        }
        let secure = self.trusted && reply.metadata.authentic_data;
        match reply.metadata.response_code {
            ResponseCode::NoError | ResponseCode::NXDomain => Ok(Answer {
                secure,
                records: reply
                    .answers
                    .iter()
                    .filter(|r| r.record_type() == rtype)
                    .map(|r| r.data.clone())
                    .collect(),
            }),
            code => Err(format!("DNS lookup of {rtype} {name} failed: {code}")),
        }
    }
}

fn udp(server: SocketAddr, wire: &[u8]) -> Result<Message, Failed> {
    let bind: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse().map_err(|_| "bad address")?
    } else {
        "[::]:0".parse().map_err(|_| "bad address")?
    };
    let sock = UdpSocket::bind(bind).map_err(|e| format!("DNS socket: {e}"))?;
    sock.connect(server)
        .and_then(|_| sock.set_read_timeout(Some(TIMEOUT)))
        .map_err(|e| format!("DNS server {server}: {e}"))?;
    let mut buf = vec![0u8; 4096];
    for _ in 0..2 {
        sock.send(wire)
            .map_err(|e| format!("DNS server {server}: {e}"))?;
        match sock.recv(&mut buf) {
            Ok(n) => return Message::from_vec(&buf[..n]).map_err(|e| e.to_string()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(format!("DNS server {server}: {e}")),
        }
    }
    Err(format!("DNS server {server} did not answer"))
}

fn tcp(server: SocketAddr, wire: &[u8]) -> Result<Message, Failed> {
    let fail = |e: std::io::Error| format!("DNS server {server} over TCP: {e}");
    let mut s = TcpStream::connect_timeout(&server, TIMEOUT).map_err(fail)?;
    s.set_read_timeout(Some(TIMEOUT)).map_err(fail)?;
    let len = u16::try_from(wire.len()).map_err(|_| "DNS query too long")?;
    s.write_all(&len.to_be_bytes()).map_err(fail)?;
    s.write_all(wire).map_err(fail)?;
    let mut l = [0u8; 2];
    s.read_exact(&mut l).map_err(fail)?;
    let mut buf = vec![0u8; u16::from_be_bytes(l) as usize];
    s.read_exact(&mut buf).map_err(fail)?;
    Message::from_vec(&buf).map_err(|e| e.to_string())
}

/// A query id no one on the path can guess from the last one.
fn query_id() -> u16 {
    let mut b = [0u8; 2];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_err()
    {
        return qms_common::time::now_micros() as u16;
    }
    u16::from_ne_bytes(b)
}

/// The first `nameserver` of /etc/resolv.conf.
fn system_resolver() -> Option<SocketAddr> {
    let text = std::fs::read_to_string("/etc/resolv.conf").ok()?;
    text.lines().find_map(|l| {
        let mut w = l.split_whitespace();
        (w.next() == Some("nameserver"))
            .then(|| w.next()?.parse::<std::net::IpAddr>().ok())
            .flatten()
            .map(|ip| SocketAddr::new(ip, 53))
    })
}
