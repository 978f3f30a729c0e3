//! Where mail goes and who may relay: routes and their next hops, and client networks.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;

/// How mail for an address or domain leaves the router.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    Local,
    /// MX lookup for the recipient's domain.
    Smtp,
    /// A fixed next hop, no MX lookup: `smtp:[host]:port`.
    Relay {
        host: String,
        port: u16,
    },
    Pipe(String),
    /// LMTP (RFC 2033) to a post office such as Dovecot: `lmtp:[host]:port` (port 24 unless
    /// given), delivered by the smtp agent with one reply per recipient after the data.
    Lmtp {
        host: String,
        port: u16,
    },
    /// LMTP on a local socket: `lmtp:unix:/run/dovecot/lmtp` (Dovecot's default).
    LmtpUnix(PathBuf),
    Discard,
    Error(String),
}

impl Route {
    pub fn parse(s: &str) -> Result<Route, String> {
        let s = s.trim();
        match s {
            "local" => return Ok(Route::Local),
            "smtp" => return Ok(Route::Smtp),
            "discard" => return Ok(Route::Discard),
            _ => {}
        }
        if let Some(cmd) = s.strip_prefix("pipe:") {
            if cmd.trim().is_empty() {
                return Err("pipe: needs a command".into());
            }
            return Ok(Route::Pipe(cmd.trim().to_string()));
        }
        if let Some(text) = s.strip_prefix("error:") {
            return Ok(Route::Error(text.trim().to_string()));
        }
        if let Some(hop) = s.strip_prefix("smtp:") {
            let (host, port) = parse_hop(hop, 25)?;
            return Ok(Route::Relay { host, port });
        }
        if let Some(path) = s.strip_prefix("lmtp:unix:") {
            if !path.starts_with('/') {
                return Err(format!("lmtp:unix: needs an absolute path, not {path:?}"));
            }
            return Ok(Route::LmtpUnix(PathBuf::from(path)));
        }
        if let Some(hop) = s.strip_prefix("lmtp:") {
            let (host, port) = parse_hop(hop, 24)?;
            return Ok(Route::Lmtp { host, port });
        }
        Err(format!(
            "unknown route {s:?} (expected local, smtp, smtp:[host]:port, lmtp:[host]:port, lmtp:unix:PATH, pipe:COMMAND, discard or error:TEXT)"
        ))
    }

    /// The output queue that carries mail on this route, if it leaves the router at all.
    pub fn queue(&self) -> Option<&'static str> {
        match self {
            Route::Local => Some("local"),
            Route::Smtp | Route::Relay { .. } | Route::Lmtp { .. } | Route::LmtpUnix(_) => {
                Some("smtp")
            }
            Route::Pipe(_) => Some("pipe"),
            Route::Discard | Route::Error(_) => None,
        }
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Route::Local => write!(f, "local"),
            Route::Smtp => write!(f, "smtp"),
            Route::Relay { host, port } => write!(f, "smtp:[{host}]:{port}"),
            Route::Lmtp { host, port } => write!(f, "lmtp:[{host}]:{port}"),
            Route::LmtpUnix(p) => write!(f, "lmtp:unix:{}", p.display()),
            Route::Pipe(c) => write!(f, "pipe:{c}"),
            Route::Discard => write!(f, "discard"),
            Route::Error(t) => write!(f, "error:{t}"),
        }
    }
}

/// `[host]:port`, `host:port`, `[host]` or `host`; the port defaults to `default`.
pub(super) fn parse_hop(hop: &str, default: u16) -> Result<(String, u16), String> {
    let (host, rest) = if let Some(h) = hop.strip_prefix('[') {
        let end = h
            .find(']')
            .ok_or_else(|| format!("unclosed [ in {hop:?}"))?;
        (&h[..end], &h[end + 1..])
    } else {
        match hop.rfind(':') {
            Some(i) => (&hop[..i], &hop[i..]),
            None => (hop, ""),
        }
    };
    if host.is_empty() {
        return Err(format!("no host in {hop:?}"));
    }
    let port = match rest.strip_prefix(':') {
        Some(p) => p
            .parse::<u16>()
            .map_err(|_| format!("bad port in {hop:?}"))?,
        None if rest.is_empty() => default,
        None => return Err(format!("unexpected {rest:?} in {hop:?}")),
    };
    Ok((host.to_string(), port))
}

/// The network an address counts in for limits on clients: its /24 (IPv4) or /64 (IPv6).
pub fn network_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            IpAddr::V4(std::net::Ipv4Addr::new(o[0], o[1], o[2], 0))
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => network_of(IpAddr::V4(v4)),
            None => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & (u128::MAX << 64))),
        },
    }
}

/// An IP network such as `127.0.0.0/8` or `::1/128`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    bits: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (ip, bits) = match s.split_once('/') {
            Some((ip, b)) => (ip, Some(b)),
            None => (s, None),
        };
        let net: IpAddr = ip
            .trim()
            .parse()
            .map_err(|_| format!("bad network {s:?}"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            Some(b) => b
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|b| *b <= max)
                .ok_or_else(|| format!("bad prefix in {s:?}"))?,
            None => max,
        };
        Ok(Cidr { net, bits })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map(IpAddr::V4)
                .unwrap_or(IpAddr::V6(v6)),
            v4 => v4,
        };
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = if self.bits == 0 {
                    0
                } else {
                    u32::MAX << (32 - self.bits)
                };
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = if self.bits == 0 {
                    0
                } else {
                    u128::MAX << (128 - self.bits)
                };
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.bits)
    }
}
