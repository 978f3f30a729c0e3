//! The qms configuration: one TOML file, read into typed values and checked as a whole,
//! so a mistake is reported once, with file, line and key, before any process starts.

use crate::address::Address;
mod arc;
mod local;
mod queues;
mod raw;
mod show;
mod sieve;

pub use arc::Arc as ArcSeal;
pub use local::{Local, Origin};
pub use queues::{Agent, Overrides, Routing};
pub use show::Effective;
pub use sieve::Sieve;

use raw::{OneOrMany, Raw, RawListener, Secs};
use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

pub const DEFAULT_PATH: &str = "/etc/qms/qms.toml";

/// Where the config comes from: `-c FILE`, else `$QMS_CONFIG`, else `/etc/qms/qms.toml`.
pub fn locate(explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    match std::env::var_os("QMS_CONFIG") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(DEFAULT_PATH),
    }
}

#[derive(Debug)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
        }
        if let Some(k) = &self.key {
            write!(f, ": key {k}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

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
fn parse_hop(hop: &str, default: u16) -> Result<(String, u16), String> {
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

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mailbox {
    Maildir(PathBuf),
    Mbox(PathBuf),
}

#[derive(Clone, Debug)]
pub struct MailboxEntry {
    pub mailbox: Mailbox,
    /// The system user that owns the mailbox; deliveries run as this user when qms is root.
    pub user: Option<String>,
    /// A Sieve script that filters the mailbox's mail (Maildir only), run as `user`.
    pub sieve: Option<PathBuf>,
}

#[derive(Clone, Debug, Default)]
pub struct Listener {
    pub listen: Vec<SocketAddr>,
}

#[derive(Clone, Debug)]
pub struct Limits {
    pub message_size: u64,
    pub recipients: usize,
    pub command_line: usize,
    pub text_line: usize,
    pub connections: usize,
    pub connections_per_client: usize,
    /// Connections from one /24 (IPv4) or /64 (IPv6) at once.
    pub connections_per_network: usize,
    /// Seconds a session may last in all, however busy it keeps the connection.
    pub session_lifetime: u64,
    pub command_timeout: u64,
    pub data_timeout: u64,
    pub errors: u32,
    pub hops: usize,
    /// Seconds a delivery program may run before it is killed and the delivery retried.
    pub pipe_timeout: u64,
    /// Bytes and inodes the spool's file system keeps free for mail already accepted;
    /// None: the defaults of `qms_spool::reserve`.
    pub spool_min_free: Option<u64>,
    pub spool_min_free_inodes: Option<u64>,
}

#[derive(Clone, Debug)]
pub struct Outgoing {
    pub min_backoff: i64,
    pub max_backoff: i64,
    pub delay_warning: i64,
    pub max_queue_lifetime: i64,
}

/// How the SMTP client reaches other MTAs.
#[derive(Clone, Debug)]
pub struct Client {
    /// The port for MX hosts (25; tests point it elsewhere).
    pub port: u16,
    /// `may`: STARTTLS when offered, plain if the handshake fails; `encrypt`: TLS or defer;
    /// `none`: never.
    pub tls: TlsPolicy,
    /// Per-route TLS policy, by route key (domain or `*`).
    pub tls_routes: BTreeMap<String, TlsRule>,
    /// `[outgoing] ca_file`: certificates `verify` and `secure` trust besides the system's.
    pub ca_file: Option<PathBuf>,
    pub recipient_limit: usize,
    pub destination_concurrency: usize,
    pub connect_timeout: u64,
    pub command_timeout: u64,
    pub data_timeout: u64,
    /// Seconds an idle connection is kept for reuse.
    pub connection_reuse: u64,
    /// `[dns] server`: the resolver to ask (else the system's).
    pub dns_server: Option<SocketAddr>,
    /// MTA-STS (RFC 8461): a domain's published policy is fetched, cached and applied.
    pub mta_sts: bool,
    /// The port policies are fetched from (443; tests point it elsewhere).
    pub mta_sts_port: u16,
    /// TLS reporting (RFC 8460): results are counted per policy domain for the daily report.
    pub tls_reports: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TlsPolicy {
    /// Never TLS.
    None,
    /// STARTTLS when offered; a failed handshake falls back to plain text.
    May,
    /// TLS or defer; any certificate.
    Encrypt,
    /// TLS with a certificate that chains to a trusted root and names the host connected to
    /// (the MX name, or the relay's).
    Verify,
    /// As verify, the certificate naming the next-hop domain or the configured names.
    Secure,
    /// DANE (RFC 7672) where the MX hosts have DNSSEC-signed TLSA records, else `may`.
    Dane,
    /// DANE or nothing: a host without usable TLSA records is not used.
    DaneOnly,
}

impl TlsPolicy {
    fn parse(s: &str) -> Option<TlsPolicy> {
        match s {
            "none" => Some(TlsPolicy::None),
            "may" => Some(TlsPolicy::May),
            "encrypt" => Some(TlsPolicy::Encrypt),
            "verify" => Some(TlsPolicy::Verify),
            "secure" => Some(TlsPolicy::Secure),
            "dane" => Some(TlsPolicy::Dane),
            "dane-only" => Some(TlsPolicy::DaneOnly),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TlsPolicy::None => "none",
            TlsPolicy::May => "may",
            TlsPolicy::Encrypt => "encrypt",
            TlsPolicy::Verify => "verify",
            TlsPolicy::Secure => "secure",
            TlsPolicy::Dane => "dane",
            TlsPolicy::DaneOnly => "dane-only",
        }
    }

    /// Whether the peer's certificate is checked against trusted roots.
    pub fn authenticates(self) -> bool {
        matches!(self, TlsPolicy::Verify | TlsPolicy::Secure)
    }

    /// Whether TLSA records are looked up for the hosts.
    pub fn dane(self) -> bool {
        matches!(self, TlsPolicy::Dane | TlsPolicy::DaneOnly)
    }
}

/// The TLS policy of one destination: its level, the CA file to trust, and for `secure` the
/// names the certificate may carry (empty: the next-hop domain).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TlsRule {
    pub level: TlsPolicy,
    pub ca_file: Option<PathBuf>,
    pub names: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct Tls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Other certificates by the name a client asks for (SNI), lower case.
    pub sni: BTreeMap<String, (PathBuf, PathBuf)>,
    /// Client certificates are asked for, and checked against these CAs (PEM).
    pub client_ca: Option<PathBuf>,
    /// Clients whose certificate verifies for one of these names may relay, lower case.
    pub relay_clients: Vec<String>,
}

#[derive(Clone, Debug, Default)]
pub struct Auth {
    /// `user:hash` lines; hashes are argon2 PHC strings or `$6$` sha-crypt (`qms passwd`).
    pub users: Option<PathBuf>,
    /// Dovecot's `auth-client` socket: logins are checked by Dovecot instead of `users`.
    pub dovecot: Option<PathBuf>,
    /// Allow AUTH without TLS from loopback clients (for local webmail and tests).
    pub plaintext_loopback: bool,
    /// Failed attempts per client address within 15 minutes before AUTH is refused.
    pub max_failures: u32,
    /// Addresses each user may use as envelope sender on submission, beyond the default
    /// (the user's own name at a local domain). `@domain` allows a whole domain.
    pub senders: BTreeMap<String, Vec<String>>,
}

#[derive(Clone, Debug)]
pub struct Scheduler {
    /// Seconds between full scans of a queue directory (the safety net behind inotify).
    pub scan_interval: u64,
    /// Seconds before a worker looks again at a job another worker had locked.
    pub busy_retry: u64,
    /// smtpd files mail that the router would pass on unchanged into one output queue
    /// straight into that queue (`router/src/direct.rs`).
    pub direct_routing: bool,
}

/// The whole configuration, with every relative path made absolute.
#[derive(Clone, Debug)]
pub struct Config {
    pub path: PathBuf,
    pub spool: PathBuf,
    pub hostname: String,
    /// This node's name in a fleet (`node`, default the host name): part of every tracking
    /// event and of the tracker's file keys in a shared database.
    pub node: String,
    pub user: Option<String>,
    pub postmaster: Address,
    pub trusted_users: Vec<String>,
    pub aliases: Option<PathBuf>,
    pub recipient_delimiter: Option<char>,
    pub smtp: Listener,
    pub mynetworks: Vec<Cidr>,
    pub submission: Listener,
    pub submissions: Listener,
    pub local_domains: Vec<String>,
    pub relay_domains: Vec<String>,
    /// Keys: an address, a domain, `.domain` for its subdomains, or `*` for the default route.
    pub routes: BTreeMap<String, Route>,
    /// The queue a route names (`"bulk.example" = "smtp@bulk"`), by the same keys.
    pub route_queues: BTreeMap<String, String>,
    pub mailboxes: BTreeMap<String, MailboxEntry>,
    pub queues: BTreeMap<String, usize>,
    /// Which agent delivers each queue: smtp for queues of SMTP routes, else local.
    pub queue_agents: BTreeMap<String, Agent>,
    /// `[queues.NAME]` settings beside `workers`.
    pub queue_overrides: BTreeMap<String, Overrides>,
    pub limits: Limits,
    pub outgoing: Outgoing,
    pub client: Client,
    pub scheduler: Scheduler,
    pub tls: Option<Tls>,
    pub auth: Auth,
    /// How log lines are written: key=value text, JSON objects or Postfix's shape.
    pub log_format: crate::log::Format,
    /// The name that starts every log line's tag (`[log] syslog_name`; `qms`).
    pub log_syslog_name: String,
    /// Where log lines go: `[log] target`.
    pub log_target: crate::log::Target,
    pub tracking: Tracking,
    pub msp: Msp,
    pub local: Local,
    /// `[sieve]`: the filters local delivery runs, and their limits.
    pub sieve: Sieve,
    /// `[metrics] listen`: where Prometheus scrapes `/metrics`; None: no metrics listener.
    pub metrics_listen: Option<SocketAddr>,
    /// `[dkim."DOMAIN"]`: the selectors and keys that sign mail from each domain.
    pub dkim: BTreeMap<String, Vec<DkimSelector>>,
    /// `[srs]`: the envelope sender of mail aliases forward elsewhere is rewritten.
    pub srs: Option<crate::srs::Srs>,
    /// `[relay_auth."HOST"]`: the login for a relay host of the routing table, by host name.
    pub relay_auth: BTreeMap<String, RelayAuth>,
    pub auth_checks: AuthChecks,
    /// `[arc]`: the key that seals mail forwarded to other domains.
    pub arc: Option<ArcSeal>,
}

/// `[auth_checks]`: what smtpd checks of mail from unauthenticated clients outside
/// mynetworks, and what it refuses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuthChecks {
    /// SPF, DKIM and DMARC are checked and an Authentication-Results field added.
    pub enabled: bool,
    /// What a DMARC failure of a domain with `p=reject` gets.
    pub dmarc_reject: DmarcReject,
    /// An SPF `fail` is refused at MAIL FROM.
    pub spf_reject: bool,
    /// Mail DMARC quarantines is put on hold (`qms queue release` lets it go), not only marked.
    pub quarantine_hold: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DmarcReject {
    /// Refused at the end of DATA with 550 5.7.1.
    #[default]
    Honour,
    /// Accepted, marked by the Authentication-Results field.
    Quarantine,
    /// Accepted, marked, never refused.
    Ignore,
}

impl DmarcReject {
    pub fn as_str(self) -> &'static str {
        match self {
            DmarcReject::Honour => "honour",
            DmarcReject::Quarantine => "quarantine",
            DmarcReject::Ignore => "ignore",
        }
    }
}

/// A relay host's login; the password is read from its file when it is used, and sent only
/// over TLS whose certificate is verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayAuth {
    pub user: String,
    pub password_file: PathBuf,
}

/// One DKIM selector of a domain and the file of its private key (PEM: RSA or Ed25519).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DkimSelector {
    pub selector: String,
    pub key: PathBuf,
}

/// `[msp]`: what trusted submitters may ask of the submission pipeline beyond headers.
#[derive(Clone, Debug, Default)]
pub struct Msp {
    /// SASL users and local login names that may send through a smarthost of their own
    /// choice (`BX-MTA-Rem-*`). Nobody by default.
    pub smarthost_users: Vec<String>,
    /// The plugin allow-list: the executables in this directory are what
    /// `BX-MTA-Submission-Pre-Plugins` and `-Post-Plugins` may name. None: no plugins.
    pub plugin_dir: Option<PathBuf>,
    /// Seconds a plugin may run before it is killed.
    pub plugin_timeout: u64,
    /// Certificates to trust for a smarthost, by host name, besides the system's roots.
    /// Credentials go only over TLS whose certificate these or the system's roots verify.
    pub ca_files: BTreeMap<String, PathBuf>,
}

/// Tracked sending: where returned reports arrive and what to do about them.
#[derive(Clone, Debug, Default)]
pub struct Tracking {
    /// The Maildir `qms dsnproc` reads (the envelope address's mailbox).
    pub envelope_maildir: Option<PathBuf>,
    /// Tell the other To/Cc recipients when one hard-fails, for every tracked message
    /// (otherwise only when the message asks with `X-B-Non-Delivery-Notification-Actions`).
    pub co_recipient_notices: bool,
    /// The dedicated envelope address: tracked mail goes out as `envelope+QID-SIG@domain`.
    pub envelope: Option<Address>,
    /// The key that signs VERP tokens (`key`, or the contents of `key_file`).
    pub key: Vec<u8>,
    /// The file `key` was read from, if it came from one.
    pub key_file: Option<PathBuf>,
    /// `[tracking.imap]`: a remote mailbox whose reports are fetched into `envelope_maildir`.
    pub imap: Option<Imap>,
    /// The reasons of hard failures ("user unknown", "has moved", …, and "complaint") that
    /// put a recipient on the suppression list by themselves; empty: only `qms suppress add`.
    pub suppress: Vec<String>,
    /// Seconds of tracking events kept (`keep = "90d"`); older ones are pruned by the tracker.
    /// None: all are kept.
    pub keep: Option<u64>,
    /// `database = "postgresql://…"`: a tracking database shared by a fleet; None: SQLite
    /// under the spool.
    pub database: Option<String>,
    /// The database password, read from this file when connecting (else `PGPASSWORD`).
    pub password_file: Option<PathBuf>,
    /// Certificates that the database server's must chain to (besides the system's), for a
    /// URL with `sslmode=require`.
    pub database_ca_file: Option<PathBuf>,
}

/// A remote IMAP mailbox, reached over TLS from the first byte (IMAPS).
#[derive(Clone, Debug)]
pub struct Imap {
    pub host: String,
    pub port: u16,
    pub user: String,
    /// Read when polling, so that only `dsnproc` needs to be able to read it.
    pub password_file: PathBuf,
    pub mailbox: String,
    /// Certificates to trust instead of the system's (a private CA or a self-signed server).
    pub ca_file: Option<PathBuf>,
    /// Seconds between polls.
    pub interval: u64,
}

/// The queues every instance has, whatever the config says, with their default worker counts.
pub const STANDARD_QUEUES: [(&str, usize); 4] =
    [("incoming", 1), ("local", 1), ("smtp", 2), ("pipe", 1)];

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: None,
            key: None,
            message: format!("cannot read: {e}"),
        })?;
        Config::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let raw: Raw = toml::from_str(text).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: e.span().map(|s| line_of(text, s.start)),
            key: e.span().and_then(|s| key_at(text, s.start)),
            message: e.message().trim().to_string(),
        })?;
        let err = |key: &str, message: String| ConfigError {
            file: path.to_path_buf(),
            line: find_key_line(text, key),
            key: Some(key.to_string()),
            message,
        };
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let resolve = |p: &str| -> PathBuf {
            let p = Path::new(p);
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                absolute(&base.join(p))
            }
        };

        if let Some(bad) = raw.tracking.suppress.iter().flatten().find(|r| {
            !r.eq_ignore_ascii_case("complaint") && crate::reason::Reason::parse(r).is_none()
        }) {
            let words: Vec<&str> = crate::reason::Reason::ALL
                .iter()
                .map(|r| r.as_str())
                .collect();
            return Err(err(
                "tracking.suppress",
                format!(
                    "{bad:?} is not \"complaint\" or a reason: {}",
                    words.join(", ")
                ),
            ));
        }
        let hostname = match raw.hostname {
            Some(h) => h,
            None => nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "localhost".into()),
        };
        if hostname.is_empty() || hostname.contains(char::is_whitespace) {
            return Err(err("hostname", format!("{hostname:?} is not a host name")));
        }
        let node = match raw.node {
            Some(n) => n,
            None => nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| hostname.clone()),
        };
        if node.is_empty()
            || !node
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        {
            return Err(err(
                "node",
                format!("{node:?} is not a node name (letters, digits, - . _)"),
            ));
        }
        if let Some(db) = &raw.tracking.database {
            if !db.starts_with("postgresql://") && !db.starts_with("postgres://") {
                return Err(err(
                    "tracking.database",
                    format!("{db:?} is not a postgresql:// URL"),
                ));
            }
        }
        let domain_part = raw
            .domains
            .local
            .first()
            .cloned()
            .unwrap_or_else(|| hostname.clone());
        let postmaster = match raw.postmaster {
            Some(p) => Address::parse(&p).map_err(|e| err("postmaster", e.to_string()))?,
            None => Address::new("postmaster", &domain_part)
                .map_err(|e| err("hostname", e.to_string()))?,
        };
        let recipient_delimiter = match raw.recipient_delimiter.as_deref() {
            None => Some('+'),
            Some("") => None,
            Some(s) if s.chars().count() == 1 => s.chars().next(),
            Some(s) => {
                return Err(err(
                    "recipient_delimiter",
                    format!("{s:?} must be one character"),
                ))
            }
        };

        let listeners =
            |raw: RawListener, key: &str| -> Result<(Listener, Vec<Cidr>), ConfigError> {
                let mut listen = Vec::new();
                for a in raw.listen.map(OneOrMany::into_vec).unwrap_or_default() {
                    let sa = a.parse::<SocketAddr>().map_err(|_| {
                        err(
                            &format!("{key}.listen"),
                            format!("{a:?} is not an address:port such as 127.0.0.1:25"),
                        )
                    })?;
                    listen.push(sa);
                }
                if key != "smtp" && raw.mynetworks.is_some() {
                    return Err(err(
                    &format!("{key}.mynetworks"),
                    "mynetworks belongs in [smtp]: submission relays for authenticated users only"
                        .into(),
                ));
                }
                let mut nets = Vec::new();
                for n in raw.mynetworks.unwrap_or_default() {
                    nets.push(Cidr::parse(&n).map_err(|e| err(&format!("{key}.mynetworks"), e))?);
                }
                Ok((Listener { listen }, nets))
            };
        let (smtp, mynetworks) = listeners(raw.smtp, "smtp")?;
        let (submission, _) = listeners(raw.submission.into(), "submission")?;
        let (submissions, _) = listeners(raw.submissions.into(), "submissions")?;

        let domain_list = |v: Vec<String>, key: &str| -> Result<Vec<String>, ConfigError> {
            v.into_iter()
                .map(|d| {
                    let d = d.trim().to_ascii_lowercase();
                    Address::new("x", &d)
                        .map(|_| d.clone())
                        .map_err(|_| err(key, format!("{d:?} is not a domain")))
                })
                .collect()
        };
        let local_domains = domain_list(raw.domains.local, "domains.local")?;
        let relay_domains = domain_list(raw.domains.relay, "domains.relay")?;

        let mut routes = BTreeMap::new();
        let mut route_queues = BTreeMap::new();
        for (k, v) in raw.routes {
            let (spec, queue) = queues::split(&v);
            let route = Route::parse(spec).map_err(|e| err(&format!("routes.{k:?}"), e))?;
            let key = normalise_route_key(&k).map_err(|e| err(&format!("routes.{k:?}"), e))?;
            if let Some(q) = queue {
                route_queues.insert(key.clone(), q.to_string());
            }
            routes.insert(key, route);
        }

        let mut mailboxes = BTreeMap::new();
        for (k, v) in raw.mailboxes {
            let key = format!("mailboxes.{k:?}");
            let addr = Address::parse(&k).map_err(|e| err(&key, e.to_string()))?;
            let mailbox = match (v.maildir, v.mbox) {
                (Some(m), None) => Mailbox::Maildir(resolve(&m)),
                (None, Some(m)) => Mailbox::Mbox(resolve(&m)),
                _ => {
                    return Err(err(
                        &key,
                        "a mailbox needs exactly one of maildir = PATH or mbox = PATH".into(),
                    ))
                }
            };
            mailboxes.insert(
                addr.lookup_key(),
                MailboxEntry {
                    sieve: match (&mailbox, v.sieve) {
                        (_, None) => None,
                        (Mailbox::Maildir(_), Some(p)) => Some(resolve(&p)),
                        (Mailbox::Mbox(_), Some(_)) => {
                            return Err(err(
                                &key,
                                "a Sieve script needs a maildir (fileinto files into its folders)"
                                    .into(),
                            ))
                        }
                    },
                    mailbox,
                    user: v.user,
                },
            );
        }

        let mut queues: BTreeMap<String, usize> = STANDARD_QUEUES
            .iter()
            .map(|(q, n)| (q.to_string(), *n))
            .collect();
        let mut queue_overrides = BTreeMap::new();
        for (name, q) in raw.queues {
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(err(
                    &format!("queues.{name}"),
                    "a queue name is letters, digits, - and _".into(),
                ));
            }
            if q.workers > 64 {
                return Err(err(
                    &format!("queues.{name}.workers"),
                    format!("{} workers is more than 64", q.workers),
                ));
            }
            if let (Some(min), Some(max)) = (q.min_backoff, q.max_backoff) {
                if max.get() < min.get() {
                    return Err(err(
                        &format!("queues.{name}.max_backoff"),
                        "max_backoff must be at least min_backoff".into(),
                    ));
                }
            }
            queue_overrides.insert(
                name.clone(),
                Overrides {
                    destination_concurrency: q.destination_concurrency,
                    recipient_limit: q.recipient_limit,
                    min_backoff: q.min_backoff.map(Secs::signed),
                    max_backoff: q.max_backoff.map(Secs::signed),
                },
            );
            queues.insert(name, q.workers);
        }
        let queue_agents = queues::agents(&queues, &routes, &route_queues)
            .map_err(|(key, message)| err(&key, message))?;

        let l = raw.limits;
        let limits = Limits {
            message_size: l.message_size.unwrap_or(50 * 1024 * 1024),
            recipients: l.recipients.unwrap_or(1000),
            // RFC 5321 4.5.3.1: at least 512 octets for a command line, 1000 for a text line.
            command_line: l.command_line.unwrap_or(2048).max(512),
            text_line: l.text_line.unwrap_or(64 * 1024).max(1000),
            connections: l.connections.unwrap_or(2000),
            connections_per_client: l.connections_per_client.unwrap_or(50),
            connections_per_network: l.connections_per_network.unwrap_or(100),
            session_lifetime: l.session_lifetime.map(Secs::get).unwrap_or(1800).max(1),
            command_timeout: l.command_timeout.map(Secs::get).unwrap_or(300),
            data_timeout: l.data_timeout.map(Secs::get).unwrap_or(600),
            errors: l.errors.unwrap_or(20),
            hops: l.hops.unwrap_or(50),
            pipe_timeout: l.pipe_timeout.map(Secs::get).unwrap_or(600).max(1),
            spool_min_free: l.spool_min_free,
            spool_min_free_inodes: l.spool_min_free_inodes,
        };
        let o = raw.outgoing;
        let outgoing = Outgoing {
            min_backoff: o.min_backoff.map(Secs::signed).unwrap_or(300),
            max_backoff: o.max_backoff.map(Secs::signed).unwrap_or(4000),
            delay_warning: o.delay_warning.map(Secs::signed).unwrap_or(4 * 3600),
            max_queue_lifetime: o.max_queue_lifetime.map(Secs::signed).unwrap_or(5 * 86_400),
        };
        let policy = |v: &str, key: &str| {
            TlsPolicy::parse(v).ok_or_else(|| {
                err(
                    key,
                    format!("{v:?} is not none, may, encrypt, verify, secure, dane or dane-only"),
                )
            })
        };
        let mut tls_routes = BTreeMap::new();
        for (k, v) in o.tls_routes {
            let key = format!("outgoing.tls_routes.{k:?}");
            let rule = match v {
                raw::RawTlsRoute::Level(l) => TlsRule {
                    level: policy(&l, &key)?,
                    ca_file: None,
                    names: Vec::new(),
                },
                raw::RawTlsRoute::Rule(r) => TlsRule {
                    level: policy(&r.level, &key)?,
                    ca_file: r.ca_file.as_deref().map(resolve),
                    names: r.names.iter().map(|n| n.to_ascii_lowercase()).collect(),
                },
            };
            tls_routes.insert(k.to_ascii_lowercase(), rule);
        }
        let dns_server = match raw.dns.server.as_deref() {
            None => None,
            Some(s) => {
                let with_port = if s.parse::<IpAddr>().is_ok() {
                    format!("{s}:53")
                } else {
                    s.to_string()
                };
                Some(with_port.parse::<SocketAddr>().map_err(|_| {
                    err(
                        "dns.server",
                        format!("{s:?} is not an IP address (with an optional :port)"),
                    )
                })?)
            }
        };
        let client = Client {
            port: o.port.unwrap_or(25),
            tls: policy(o.tls.as_deref().unwrap_or("may"), "outgoing.tls")?,
            tls_routes,
            ca_file: o.ca_file.as_deref().map(resolve),
            recipient_limit: o.recipient_limit.unwrap_or(50).max(1),
            destination_concurrency: o.destination_concurrency.unwrap_or(20).max(1),
            connect_timeout: o.connect_timeout.map(Secs::get).unwrap_or(30).max(1),
            command_timeout: o.command_timeout.map(Secs::get).unwrap_or(300).max(1),
            data_timeout: o.data_timeout.map(Secs::get).unwrap_or(600).max(1),
            connection_reuse: o.connection_reuse.map(Secs::get).unwrap_or(10),
            dns_server,
            mta_sts: o.mta_sts.unwrap_or(true),
            mta_sts_port: o.mta_sts_port.unwrap_or(443),
            tls_reports: o.tls_reports.unwrap_or(true),
        };
        if outgoing.max_backoff < outgoing.min_backoff {
            return Err(err(
                "outgoing.max_backoff",
                "max_backoff must be at least min_backoff".into(),
            ));
        }
        let scheduler = Scheduler {
            scan_interval: raw
                .scheduler
                .scan_interval
                .map(Secs::get)
                .unwrap_or(60)
                .max(1),
            busy_retry: raw.scheduler.busy_retry.map(Secs::get).unwrap_or(10).max(1),
            direct_routing: raw.scheduler.direct_routing.unwrap_or(true),
        };

        let log_target = match raw.log.target.as_deref() {
            None | Some("stderr") => crate::log::Target::Stderr,
            Some("syslog") => crate::log::Target::Syslog,
            Some(p) if p.starts_with('/') || p.starts_with('.') || p.contains('/') => {
                crate::log::Target::File(resolve(p))
            }
            Some(other) => {
                return Err(err(
                    "log.target",
                    format!("{other:?} is not stderr, syslog or a file path"),
                ))
            }
        };
        let log_format = match raw.log.format.as_deref() {
            None => crate::log::Format::Text,
            Some(f) => crate::log::Format::parse(f)
                .ok_or_else(|| err("log.format", format!("{f:?} is not text, json or postfix")))?,
        };
        let log_syslog_name = raw.log.syslog_name.unwrap_or_else(|| "qms".into());
        if log_syslog_name.is_empty()
            || !log_syslog_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return Err(err(
                "log.syslog_name",
                format!("{log_syslog_name:?} is not a name of letters, digits, -, _ and ."),
            ));
        }
        let tls = match raw.tls {
            Some(t) => {
                if !t.relay_clients.is_empty() && t.client_ca.is_none() {
                    return Err(err(
                        "tls.relay_clients",
                        "needs tls.client_ca: a client certificate is trusted only when it verifies"
                            .into(),
                    ));
                }
                Some(Tls {
                    cert: resolve(&t.cert),
                    key: resolve(&t.key),
                    sni: t
                        .sni
                        .iter()
                        .map(|(name, p)| {
                            let name = name.trim_end_matches('.').to_ascii_lowercase();
                            (name, (resolve(&p.cert), resolve(&p.key)))
                        })
                        .collect(),
                    client_ca: t.client_ca.as_deref().map(&resolve),
                    relay_clients: t
                        .relay_clients
                        .iter()
                        .map(|n| n.trim_end_matches('.').to_ascii_lowercase())
                        .collect(),
                })
            }
            None => None,
        };
        let envelope = match raw.tracking.envelope.as_deref() {
            Some(a) => {
                Some(Address::parse(a).map_err(|e| err("tracking.envelope", e.to_string()))?)
            }
            None => None,
        };
        let key = match (&raw.tracking.key, &raw.tracking.key_file) {
            (_, Some(f)) => std::fs::read(resolve(f))
                .map_err(|e| err("tracking.key_file", format!("cannot read {f}: {e}")))?,
            (Some(k), None) => k.as_bytes().to_vec(),
            (None, None) => Vec::new(),
        };
        if envelope.is_some() && key.len() < 16 {
            return Err(err(
                "tracking.key",
                "a VERP envelope needs a key (key or key_file) of at least 16 bytes".into(),
            ));
        }
        let imap = match raw.tracking.imap {
            Some(i) => {
                // IMAPS: port 993 unless the server names another.
                let has_port = i
                    .server
                    .rsplit_once(':')
                    .is_some_and(|(_, p)| !p.contains(']'));
                let server = if has_port {
                    i.server.clone()
                } else {
                    format!("{}:993", i.server)
                };
                let (host, port) =
                    parse_hop(&server, 993).map_err(|e| err("tracking.imap.server", e))?;
                if raw.tracking.envelope_maildir.is_none() {
                    return Err(err(
                        "tracking.imap",
                        "IMAP polling fetches into envelope_maildir, which is not set".into(),
                    ));
                }
                Some(Imap {
                    host,
                    port,
                    user: i.user,
                    password_file: resolve(&i.password_file),
                    mailbox: i.mailbox.unwrap_or_else(|| "INBOX".into()),
                    ca_file: i.ca_file.as_deref().map(resolve),
                    interval: i.interval.map(Secs::get).unwrap_or(60).max(1),
                })
            }
            None => None,
        };
        let auth = Auth {
            users: raw.auth.users.as_deref().map(resolve),
            dovecot: raw.auth.dovecot.as_deref().map(resolve),
            plaintext_loopback: raw.auth.plaintext_loopback.unwrap_or(false),
            max_failures: raw.auth.max_failures.unwrap_or(5).max(1),
            senders: raw.auth.senders,
        };

        let local = raw
            .local
            .build(&resolve)
            .map_err(|(key, message)| err(&key, message))?;
        let sieve = raw
            .sieve
            .build(&resolve)
            .map_err(|(key, message)| err(&key, message))?;
        let arc = match raw.arc {
            Some(a) => Some(
                a.build(&resolve)
                    .map_err(|(key, message)| err(&key, message))?,
            ),
            None => None,
        };
        let mut dkim = BTreeMap::new();
        for (domain, entry) in raw.dkim {
            let list = match entry {
                raw::RawDkimEntry::One(d) => vec![d],
                raw::RawDkimEntry::Many(v) => v,
            };
            let d = domain.to_ascii_lowercase();
            if Address::new("x", &d).is_err() {
                return Err(err(
                    &format!("dkim.{domain:?}"),
                    format!("{domain:?} is not a domain"),
                ));
            }
            let mut selectors = Vec::new();
            for s in list {
                let ok = !s.selector.is_empty()
                    && s.selector.split('.').all(|l| {
                        !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                    });
                if !ok {
                    return Err(err(
                        &format!("dkim.{domain:?}.selector"),
                        format!(
                            "{:?} is not a selector (letters, digits, - and dots)",
                            s.selector
                        ),
                    ));
                }
                selectors.push(DkimSelector {
                    selector: s.selector,
                    key: resolve(&s.key),
                });
            }
            dkim.insert(d, selectors);
        }
        let dmarc_reject = match raw.auth_checks.dmarc_reject.as_deref() {
            None | Some("honour") | Some("honor") => DmarcReject::Honour,
            Some("quarantine") => DmarcReject::Quarantine,
            Some("ignore") => DmarcReject::Ignore,
            Some(o) => {
                return Err(err(
                    "auth_checks.dmarc_reject",
                    format!("{o:?} is not honour, quarantine or ignore"),
                ))
            }
        };
        let srs = match &raw.srs {
            Some(s) => Some(
                crate::srs::Srs::load(&s.domain, &resolve(&s.secret_file))
                    .map_err(|e| err("srs.secret_file", e))?,
            ),
            None => None,
        };
        let quarantine_hold = match raw.auth_checks.quarantine.as_deref() {
            None | Some("mark") => false,
            Some("hold") => true,
            Some(o) => {
                return Err(err(
                    "auth_checks.quarantine",
                    format!("{o:?} is not mark or hold"),
                ))
            }
        };
        let auth_checks = AuthChecks {
            enabled: raw.auth_checks.enabled.unwrap_or(false),
            dmarc_reject,
            spf_reject: raw.auth_checks.spf_reject.unwrap_or(false),
            quarantine_hold,
        };
        let metrics_listen = match raw.metrics.listen.as_deref() {
            None => None,
            Some(a) => {
                let sa = a.parse::<SocketAddr>().map_err(|_| {
                    err(
                        "metrics.listen",
                        format!("{a:?} is not an address:port such as 127.0.0.1:9725"),
                    )
                })?;
                // The metrics role binds it as the mail system's user, never as root.
                if sa.port() < 1024 {
                    return Err(err(
                        "metrics.listen",
                        format!("port {} is privileged: use 1024 or more", sa.port()),
                    ));
                }
                Some(sa)
            }
        };
        Ok(Config {
            path: absolute(path),
            spool: resolve(&raw.spool),
            hostname,
            node,
            user: raw.user,
            postmaster,
            trusted_users: raw.trusted_users.unwrap_or_else(|| vec!["root".into()]),
            aliases: raw.aliases.as_deref().map(resolve),
            recipient_delimiter,
            smtp,
            mynetworks,
            submission,
            submissions,
            local_domains,
            relay_domains,
            routes,
            mailboxes,
            route_queues,
            queues,
            queue_agents,
            queue_overrides,
            limits,
            outgoing,
            client,
            scheduler,
            tls,
            auth,
            log_format,
            log_syslog_name,
            log_target,
            tracking: Tracking {
                envelope_maildir: raw.tracking.envelope_maildir.as_deref().map(resolve),
                co_recipient_notices: raw.tracking.co_recipient_notices.unwrap_or(false),
                envelope,
                key,
                key_file: raw.tracking.key_file.as_deref().map(resolve),
                imap,
                keep: raw.tracking.keep.map(Secs::get).filter(|k| *k > 0),
                suppress: raw.tracking.suppress.unwrap_or_else(|| {
                    ["user unknown", "has moved", "complaint"]
                        .map(String::from)
                        .to_vec()
                }),
                database: raw.tracking.database.clone(),
                password_file: raw.tracking.password_file.as_deref().map(resolve),
                database_ca_file: raw.tracking.database_ca_file.as_deref().map(resolve),
            },
            msp: Msp {
                smarthost_users: raw.msp.smarthost_users,
                plugin_dir: raw.msp.plugin_dir.as_deref().map(resolve),
                plugin_timeout: raw.msp.plugin_timeout.map(Secs::get).unwrap_or(60).max(1),
                ca_files: raw
                    .msp
                    .ca_files
                    .iter()
                    .map(|(h, p)| (h.to_ascii_lowercase(), resolve(p)))
                    .collect(),
            },
            local,
            sieve,
            arc,
            metrics_listen,
            dkim,
            srs,
            auth_checks,
            relay_auth: raw
                .relay_auth
                .into_iter()
                .map(|(h, a)| {
                    let auth = RelayAuth {
                        user: a.user,
                        password_file: resolve(&a.password_file),
                    };
                    (h.to_ascii_lowercase(), auth)
                })
                .collect(),
        })
    }

    /// What the spool keeps free for mail already accepted.
    pub fn reserve(&self) -> (Option<u64>, Option<u64>, u64) {
        (
            self.limits.spool_min_free,
            self.limits.spool_min_free_inodes,
            self.limits.message_size,
        )
    }

    pub fn is_local_domain(&self, domain: &str) -> bool {
        self.local_domains
            .iter()
            .any(|d| d.eq_ignore_ascii_case(domain))
    }

    pub fn is_relay_domain(&self, domain: &str) -> bool {
        self.relay_domains
            .iter()
            .any(|d| d.eq_ignore_ascii_case(domain))
    }

    /// The route for an exact address, if the table names it.
    pub fn address_route(&self, addr: &Address) -> Option<&Route> {
        self.address_routing(addr).map(|r| r.route)
    }

    /// The route for a domain: exact, then `.parent` entries, then the default `*`.
    pub fn domain_route(&self, domain: &str) -> Option<&Route> {
        self.domain_routing(domain).map(|r| r.route)
    }

    /// [`Config::address_route`] with the queue the route names.
    pub fn address_routing(&self, addr: &Address) -> Option<Routing<'_>> {
        self.routing(&addr.lookup_key())
    }

    /// [`Config::domain_route`] with the queue the route names.
    pub fn domain_routing(&self, domain: &str) -> Option<Routing<'_>> {
        let domain = domain.to_ascii_lowercase();
        if let Some(r) = self.routing(&domain) {
            return Some(r);
        }
        let mut rest = domain.as_str();
        while let Some(i) = rest.find('.') {
            if let Some(r) = self.routing(&rest[i..]) {
                return Some(r);
            }
            rest = &rest[i + 1..];
        }
        self.routing("*")
    }

    fn routing(&self, key: &str) -> Option<Routing<'_>> {
        self.routes.get(key).map(|route| Routing {
            route,
            queue: self.route_queues.get(key).map(String::as_str),
        })
    }

    /// The agent that delivers a queue's jobs.
    pub fn agent_of(&self, queue: &str) -> Agent {
        self.queue_agents
            .get(queue)
            .copied()
            .unwrap_or(Agent::Local)
    }

    /// Every queue that has a directory and workers: the standard ones plus `[queues.*]`.
    pub fn queue_names(&self) -> Vec<String> {
        self.queues.keys().cloned().collect()
    }
}

fn normalise_route_key(k: &str) -> Result<String, String> {
    let k = k.trim();
    if k == "*" {
        return Ok(k.into());
    }
    if k.contains('@') {
        return Address::parse(k)
            .map(|a| a.lookup_key())
            .map_err(|e| e.to_string());
    }
    let d = k.to_ascii_lowercase();
    let bare = d.strip_prefix('.').unwrap_or(&d);
    Address::new("x", bare)
        .map(|_| d.clone())
        .map_err(|_| format!("{k:?} is not a domain, address or *"))
}

fn absolute(p: &Path) -> PathBuf {
    let p = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(p)
    };
    // Lexical clean-up of `.` and `..`, so paths in logs read well; symlinks are left alone.
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

/// The dotted key set on the line at `offset` (`outgoing.min_backoff`), for errors that
/// the TOML reader reports by position only.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line = text[start..].lines().next().unwrap_or("");
    let name = line.split_once('=')?.0.trim().trim_matches('"');
    if name.is_empty() || name.starts_with('[') {
        return None;
    }
    let table = text[..start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('[') && l.ends_with(']'))
        .map(|l| l.trim_matches(['[', ']']).trim().to_string());
    Some(match table {
        Some(t) => format!("{t}.{name}"),
        None => name.to_string(),
    })
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// The line where a dotted key is set, found well enough for an error message.
fn find_key_line(text: &str, key: &str) -> Option<usize> {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in key.chars() {
        match c {
            '"' => quoted = !quoted,
            '.' if !quoted => parts.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    parts.push(cur);
    let last = parts.last()?.clone();
    let section = parts[..parts.len() - 1].join(".");
    let mut in_section = section.is_empty();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('[') {
            let name = t.trim_matches(|c| c == '[' || c == ']').trim();
            in_section = name == section;
            continue;
        }
        let lhs = t.split('=').next().unwrap_or("").trim().trim_matches('"');
        if in_section && lhs == last {
            return Some(i + 1);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_routes() {
        assert_eq!(
            Route::parse("smtp:[127.0.0.1]:2526").unwrap(),
            Route::Relay {
                host: "127.0.0.1".into(),
                port: 2526
            }
        );
        assert_eq!(
            Route::parse("smtp:relay.example.net").unwrap(),
            Route::Relay {
                host: "relay.example.net".into(),
                port: 25
            }
        );
        assert_eq!(
            Route::parse("pipe:/usr/bin/cat").unwrap(),
            Route::Pipe("/usr/bin/cat".into())
        );
        assert!(Route::parse("smtp:[x").is_err());
        assert!(Route::parse("carrier-pigeon").is_err());
    }

    #[test]
    fn cidr_matches() {
        let n = Cidr::parse("127.0.0.0/8").unwrap();
        assert!(n.contains("127.1.2.3".parse().unwrap()));
        assert!(n.contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!n.contains("10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn errors_name_line_and_key() {
        let text =
            "spool = \"s\"\n[routes]\n\"example.test\" = \"local\"\n\"bad.test\" = \"teleport\"\n";
        let e = Config::parse(Path::new("/x/qms.toml"), text).unwrap_err();
        assert_eq!(e.line, Some(4), "{e}");
        assert!(e.to_string().contains("bad.test"), "{e}");
        let e = Config::parse(Path::new("/x/qms.toml"), "spool = \"s\"\nspoool = 1\n").unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
    }

    #[test]
    fn durations_take_units_and_errors_name_their_key() {
        let p = Path::new("/x/qms.toml");
        let text = "spool = \"s\"\n[outgoing]\nmin_backoff = \"5m\"\nmax_queue_lifetime = \"5d\"\n[tracking]\nkeep = \"90d\"\n";
        let c = Config::parse(p, text).unwrap();
        assert_eq!(
            (
                c.outgoing.min_backoff,
                c.outgoing.max_queue_lifetime,
                c.tracking.keep
            ),
            (300, 5 * 86_400, Some(90 * 86_400))
        );
        // Issue #14: `min_backoff = -5` was reported against max_backoff; a type error
        // named no key.
        let e = Config::parse(p, "spool = \"s\"\n[outgoing]\nmin_backoff = -5\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("outgoing.min_backoff"), "{e}");
        let e = Config::parse(p, "spool = \"s\"\n[limits]\nrecipients = \"many\"\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("limits.recipients"), "{e}");
        let e = Config::parse(
            p,
            "spool = \"s\"\n[outgoing]\nmax_backoff = \"4 fortnights\"\n",
        )
        .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("outgoing.max_backoff"), "{e}");
    }

    #[test]
    fn a_queue_overrides_the_outgoing_values() {
        let text = "spool = \"s\"\n[routes]\n\"bulk.example\" = \"smtp@bulk\"\n[outgoing]\nmin_backoff = 300\n[queues.bulk]\nworkers = 1\nmin_backoff = \"1h\"\nmax_backoff = \"1d\"\ndestination_concurrency = 40\n";
        let c = Config::parse(Path::new("/x/qms.toml"), text).unwrap();
        assert_eq!(c.backoff_range("bulk"), (3600, 86_400));
        assert_eq!(c.backoff_range("smtp").0, 300);
        assert_eq!(c.destination_concurrency("bulk"), 40);
        assert_eq!(c.agent_of("bulk"), Agent::Smtp);
    }

    #[test]
    fn domain_route_order() {
        let text = "spool = \"s\"\n[routes]\n\"*\" = \"smtp\"\n\".example.net\" = \"discard\"\n\"a.example.net\" = \"local\"\n";
        let c = Config::parse(Path::new("/x/qms.toml"), text).unwrap();
        assert_eq!(c.domain_route("a.example.net"), Some(&Route::Local));
        assert_eq!(c.domain_route("b.example.net"), Some(&Route::Discard));
        assert_eq!(c.domain_route("other.org"), Some(&Route::Smtp));
        assert_eq!(c.spool, PathBuf::from("/x/s"));
    }
}
