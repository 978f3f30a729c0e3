//! The qms configuration: one TOML file, read into typed values and checked as a whole,
//! so a mistake is reported once, with file, line and key, before any process starts.

use crate::address::Address;
mod arc;
mod build;
mod error;
mod local;
mod queues;
mod raw;
mod route;
mod sender_auth;
mod show;
mod sieve;
mod tls;
mod tracking;

pub use arc::Arc as ArcSeal;
pub use error::ConfigError;
use error::{find_key_line, key_at, line_of};
pub use local::{Local, Origin};
pub use queues::{Agent, Overrides, Routing};
pub use route::{network_of, Cidr, Route};
pub use sender_auth::{AuthChecks, DkimSelector, DmarcReject, RelayAuth};
pub use show::Effective;
pub use sieve::Sieve;
pub use tls::{Tls, TlsPolicy, TlsRule};
pub use tracking::{Imap, Msp, Tracking};

use raw::Raw;
use std::collections::BTreeMap;
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

/// The queues every instance has, whatever the config says, with their default worker counts.
pub const STANDARD_QUEUES: [(&str, usize); 4] =
    [("incoming", 1), ("local", 1), ("smtp", 2), ("pipe", 1)];

/// The file's TOML as written, or where and why it is not valid.
fn read_raw(path: &Path, text: &str) -> Result<Raw, ConfigError> {
    toml::from_str(text).map_err(|e: toml::de::Error| ConfigError {
        file: path.to_path_buf(),
        line: e.span().map(|s| line_of(text, s.start)),
        key: e.span().and_then(|s| key_at(text, s.start)),
        message: e.message().trim().to_string(),
    })
}

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
        let mut raw = read_raw(path, text)?;
        let cx = build::Cx {
            path,
            text,
            base: path.parent().map(Path::to_path_buf).unwrap_or_default(),
        };
        tracking::checks(&raw.tracking, &cx)?;
        let id = build::identity(&mut raw, &cx)?;
        let (smtp, mynetworks) = build::listeners(raw.smtp, "smtp", &cx)?;
        let (submission, _) = build::listeners(raw.submission.into(), "submission", &cx)?;
        let (submissions, _) = build::listeners(raw.submissions.into(), "submissions", &cx)?;
        let local_domains = build::domain_list(raw.domains.local, "domains.local", &cx)?;
        let relay_domains = build::domain_list(raw.domains.relay, "domains.relay", &cx)?;
        let build::Routes {
            routes,
            queues: route_queues,
        } = build::routes(raw.routes, &cx)?;
        let mailboxes = build::mailboxes(raw.mailboxes, &cx)?;
        let build::Queues {
            workers: queues,
            overrides: queue_overrides,
        } = build::queues(raw.queues, &cx)?;
        let queue_agents = queues::agents(&queues, &routes, &route_queues)
            .map_err(|(key, message)| cx.err(&key, message))?;
        let limits = build::limits(raw.limits);
        let (outgoing, client) = build::outgoing(raw.outgoing, raw.dns, &cx)?;
        let (log_target, log_format, log_syslog_name) = build::log(raw.log, &cx)?;
        let tls = tls::section(raw.tls, &cx)?;
        let tracking = tracking::section(raw.tracking, &cx)?;
        let resolve = |p: &str| cx.resolve(p);
        let section = |(key, message): (String, String)| cx.err(&key, message);
        let local = raw.local.build(&resolve).map_err(section)?;
        let sieve = raw.sieve.build(&resolve).map_err(section)?;
        let arc = raw
            .arc
            .map(|a| a.build(&resolve))
            .transpose()
            .map_err(section)?;
        let dkim = sender_auth::dkim(raw.dkim, &cx)?;
        let auth_checks = sender_auth::auth_checks(raw.auth_checks, &cx)?;
        let srs = build::srs(raw.srs.as_ref(), &cx)?;
        Ok(Config {
            path: absolute(path),
            spool: resolve(&raw.spool),
            hostname: id.hostname,
            node: id.node,
            user: raw.user,
            postmaster: id.postmaster,
            trusted_users: raw.trusted_users.unwrap_or_else(|| vec!["root".into()]),
            aliases: raw.aliases.as_deref().map(resolve),
            recipient_delimiter: id.recipient_delimiter,
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
            scheduler: build::scheduler(raw.scheduler),
            tls,
            auth: build::auth(raw.auth, &cx),
            log_format,
            log_syslog_name,
            log_target,
            tracking,
            msp: build::msp(raw.msp, &cx),
            local,
            sieve,
            arc,
            metrics_listen: build::metrics_listen(raw.metrics, &cx)?,
            dkim,
            srs,
            auth_checks,
            relay_auth: build::relay_auth(raw.relay_auth, &cx),
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
