//! `qms smtpd`: accepts connections on every configured listener, one thread per session,
//! with limits on connections in total and per client address. A thread whose session ended
//! waits a while for the next connection: with one message per connection, creating threads
//! was a tenth of smtpd's CPU.

use crate::seats::Threads;
use crate::session::{Kind, Peer, Session, Shared};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use qms_common::conn::{Conn, SharedSocket};
use qms_common::log::quote;
use qms_common::qlog;
use std::collections::HashMap;
use std::io::Write;
use std::net::{IpAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, FromRawFd, IntoRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The environment variable through which the supervisor hands bound sockets to smtpd
/// (`smtp=3,submission=4`), so smtpd needs no privilege to use port 25.
pub const LISTEN_FDS_ENV: &str = "QMS_LISTEN_FDS";

pub fn kind_name(k: Kind) -> &'static str {
    k.protocol()
}

fn kind_from(name: &str) -> Option<Kind> {
    match name {
        "smtp" => Some(Kind::Smtp),
        "submission" => Some(Kind::Submission),
        "submissions" => Some(Kind::Submissions),
        _ => None,
    }
}

/// Binds every listener of the config.
pub fn bind(cfg: &qms_common::Config) -> std::io::Result<Vec<(Kind, TcpListener)>> {
    let mut out = Vec::new();
    for (kind, l) in [
        (Kind::Smtp, &cfg.smtp),
        (Kind::Submission, &cfg.submission),
        (Kind::Submissions, &cfg.submissions),
    ] {
        for addr in &l.listen {
            let sock = TcpListener::bind(addr).map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("cannot listen on {addr} ({}): {e}", kind.protocol()),
                )
            })?;
            out.push((kind, sock));
        }
    }
    Ok(out)
}

/// The listeners handed down by the supervisor, if any.
pub fn inherited() -> Option<Vec<(Kind, TcpListener)>> {
    let spec = std::env::var(LISTEN_FDS_ENV).ok()?;
    let mut out = Vec::new();
    for item in spec.split(',').filter(|s| !s.is_empty()) {
        let (name, fd) = item.split_once('=')?;
        let fd: RawFd = fd.parse().ok()?;
        // Safety: the supervisor passed this descriptor to us for exactly this use.
        let l = unsafe { TcpListener::from_raw_fd(fd) };
        out.push((kind_from(name)?, l));
    }
    Some(out)
}

/// Encodes listeners for [`LISTEN_FDS_ENV`], giving up ownership of the descriptors.
pub fn export(listeners: Vec<(Kind, TcpListener)>) -> (String, Vec<RawFd>) {
    let mut fds = Vec::new();
    let spec = listeners
        .into_iter()
        .map(|(k, l)| {
            let fd = l.into_raw_fd();
            fds.push(fd);
            format!("{}={fd}", k.protocol())
        })
        .collect::<Vec<_>>()
        .join(",");
    (spec, fds)
}

/// How long a session thread waits for another connection before it ends.
const IDLE: Duration = Duration::from_secs(30);

/// Connections open now, in all, per address and per network, as Postfix's anvil keeps
/// them: a few clients cannot take every slot.
struct Counts {
    total: AtomicUsize,
    per_client: Mutex<HashMap<IpAddr, usize>>,
    per_network: Mutex<HashMap<IpAddr, usize>>,
}

impl Counts {
    fn enter(&self, ip: IpAddr, limits: &qms_common::config::Limits) -> Result<(), &'static str> {
        let (Ok(mut map), Ok(mut nets)) = (self.per_client.lock(), self.per_network.lock()) else {
            return Err("421 4.3.0 Internal error, try again later");
        };
        let total = self.total.load(Ordering::SeqCst);
        if total >= limits.connections {
            return Err("421 4.7.0 Too many connections, try again later");
        }
        let n = map.get(&ip).copied().unwrap_or(0);
        if n >= limits.connections_per_client {
            return Err("421 4.7.0 Too many connections from your address");
        }
        let net = qms_common::config::network_of(ip);
        let m = nets.get(&net).copied().unwrap_or(0);
        if m >= limits.connections_per_network {
            return Err("421 4.7.0 Too many connections from your network");
        }
        // The last tenth of the slots is kept for clients that hold (almost) nothing yet:
        // an address with none open, from a network with few.
        let reserve = limits.connections / 10;
        if total >= limits.connections - reserve && (n > 0 || m >= (reserve / 4).max(1)) {
            return Err("421 4.7.0 Server busy, try again later");
        }
        map.insert(ip, n + 1);
        nets.insert(net, m + 1);
        self.total.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn leave(&self, ip: IpAddr) {
        let down = |map: &mut HashMap<IpAddr, usize>, k: IpAddr| {
            if let Some(n) = map.get_mut(&k) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&k);
                }
            }
        };
        if let Ok(mut map) = self.per_client.lock() {
            down(&mut map, ip);
        }
        if let Ok(mut nets) = self.per_network.lock() {
            down(&mut nets, qms_common::config::network_of(ip));
        }
        self.total.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A session's end of life, its socket and its client.
type Watched = (std::time::Instant, Arc<TcpStream>, IpAddr);

/// Sessions past their lifetime: their sockets are shut down, which ends the session at its
/// next read or write however slowly the client trickles bytes.
#[derive(Default)]
struct Lifetimes {
    open: Mutex<HashMap<u64, Watched>>,
    next: std::sync::atomic::AtomicU64,
}

impl Lifetimes {
    fn add(&self, until: std::time::Instant, s: Arc<TcpStream>, ip: IpAddr) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut m) = self.open.lock() {
            m.insert(id, (until, s, ip));
        }
        id
    }

    fn remove(&self, id: u64) {
        if let Ok(mut m) = self.open.lock() {
            m.remove(&id);
        }
    }

    /// Ends the sessions whose time is up; called about once a second.
    fn reap(&self) {
        let now = std::time::Instant::now();
        if let Ok(mut m) = self.open.lock() {
            m.retain(|_, (until, s, ip)| {
                if *until > now {
                    return true;
                }
                qlog!("client=[{ip}] status=disconnect reason=\"session lifetime reached\"");
                let _ = s.shutdown(std::net::Shutdown::Both);
                false
            });
        }
    }
}

/// Serves until `stop` is set, then waits (up to a minute) for sessions in progress.
pub fn run(shared: Arc<Shared>, listeners: Vec<(Kind, TcpListener)>, stop: &AtomicBool) {
    for (kind, l) in &listeners {
        let _ = l.set_nonblocking(true);
        if let Ok(a) = l.local_addr() {
            qlog!("event=listen service={} addr={a}", kind.protocol());
        }
    }
    let counts = Arc::new(Counts {
        total: AtomicUsize::new(0),
        per_client: Mutex::new(HashMap::new()),
        per_network: Mutex::new(HashMap::new()),
    });
    let lifetimes = Arc::new(Lifetimes::default());
    let threads = Threads::new(IDLE);
    let mut reaped = std::time::Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if reaped.elapsed() >= Duration::from_secs(1) {
            lifetimes.reap();
            reaped = std::time::Instant::now();
        }
        let mut fds: Vec<PollFd> = listeners
            .iter()
            .map(|(_, l)| PollFd::new(l.as_fd(), PollFlags::POLLIN))
            .collect();
        if poll(&mut fds, PollTimeout::from(500u16)).unwrap_or(0) == 0 {
            continue;
        }
        for (kind, l) in &listeners {
            loop {
                match l.accept() {
                    Ok((stream, addr)) => accept(
                        &shared,
                        &counts,
                        &lifetimes,
                        &threads,
                        *kind,
                        stream,
                        addr.ip(),
                    ),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        // Out of descriptors or memory: the listener stays readable, so wait a
                        // little instead of spinning; the client waits in the backlog.
                        qlog!("event=accept-error reason={}", quote(&e.to_string()));
                        std::thread::sleep(Duration::from_millis(100));
                        break;
                    }
                }
            }
        }
    }
    let end = std::time::Instant::now() + Duration::from_secs(60);
    while counts.total.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn accept(
    shared: &Arc<Shared>,
    counts: &Arc<Counts>,
    lifetimes: &Arc<Lifetimes>,
    threads: &Threads,
    kind: Kind,
    mut stream: TcpStream,
    ip: IpAddr,
) {
    let limits = &shared.cfg.limits;
    // No set_nonblocking(false): on Linux an accepted socket does not inherit the
    // listener's O_NONBLOCK.
    if let Err(reply) = counts.enter(ip, limits) {
        qlog!("event=refused client=[{ip}] reply={}", quote(reply));
        let _ = stream.write_all(format!("{reply}\r\n").as_bytes());
        return;
    }
    let timeout = Some(Duration::from_secs(limits.command_timeout));
    let _ = stream.set_read_timeout(timeout);
    let _ = stream.set_write_timeout(timeout);
    let _ = stream.set_nodelay(true);
    let (shared, counts, counts2) = (shared.clone(), counts.clone(), counts.clone());
    let lifetimes = lifetimes.clone();
    let until = std::time::Instant::now() + Duration::from_secs(limits.session_lifetime);
    let spawned = threads.run(Box::new(move || {
        let peer = Peer {
            addr: Some(ip),
            local_user: None,
            forced_sender: None,
        };
        let stream = Arc::new(stream);
        let watched = lifetimes.add(until, stream.clone(), ip);
        let conn = Box::new(SharedSocket(stream.clone()));
        serve(&shared, kind, peer, conn, Some(stream));
        lifetimes.remove(watched);
        counts.leave(ip);
    }));
    if let Err(e) = spawned {
        counts2.leave(ip);
        qlog!(
            "event=refused client=[{ip}] reason={}",
            quote(&e.to_string())
        );
    }
}

fn serve(
    shared: &Shared,
    kind: Kind,
    peer: Peer,
    stream: Box<dyn qms_common::conn::Stream>,
    socket: Option<Arc<TcpStream>>,
) {
    if kind != Kind::Submissions {
        Session::new(shared, kind, peer, Conn::new(stream).with_socket(socket)).run();
        return;
    }
    // Port 465's role: TLS from the first byte (RFC 8314).
    let client = peer.addr.map(|a| a.to_string()).unwrap_or_default();
    match shared.tls.as_ref().map(|cfg| crate::tls::accept(cfg, stream)) {
        Some(Ok((tls_stream, h))) => {
            qlog!("client=[{client}] service=submissions tls={}", quote(&h.info));
            qms_common::metrics::count("qms_tls_sessions_total", &[("service", "submissions")], 1.0);
            Session::new(shared, kind, peer, Conn::new(tls_stream).with_socket(socket)).with_tls(h).run();
        }
        Some(Err(e)) => qlog!("client=[{client}] service=submissions status=tls-failed reason={}", quote(&e)),
        None => qlog!("client=[{client}] service=submissions status=refused reason=\"no [tls] certificate configured\""),
    }
}
