//! Turns the raw TOML sections into checked settings: one function a section, each reporting
//! a mistake with the key it is under (`Cx::err`) and reading paths relative to the file.
//! The sections with types of their own module are read there (`tls`, `tracking`,
//! `sender_auth`).

use super::raw::{self, OneOrMany, Raw, RawListener, Secs};
use super::*;

/// What every section needs: where the file is and its text, to name a mistake's line.
pub(super) struct Cx<'a> {
    pub(super) path: &'a Path,
    pub(super) text: &'a str,
    pub(super) base: PathBuf,
}

impl Cx<'_> {
    pub(super) fn err(&self, key: &str, message: String) -> ConfigError {
        ConfigError {
            file: self.path.to_path_buf(),
            line: find_key_line(self.text, key),
            key: Some(key.to_string()),
            message,
        }
    }

    /// A path of the config, relative to the config file's directory.
    pub(super) fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            absolute(&self.base.join(p))
        }
    }
}

/// The names the system goes by: host, node, postmaster, and the recipient delimiter.
pub(super) struct Identity {
    pub(super) hostname: String,
    pub(super) node: String,
    pub(super) postmaster: Address,
    pub(super) recipient_delimiter: Option<char>,
}

pub(super) fn identity(raw: &mut Raw, cx: &Cx) -> Result<Identity, ConfigError> {
    let hostname = match raw.hostname.take() {
        Some(h) => h,
        None => nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "localhost".into()),
    };
    if hostname.is_empty() || hostname.contains(char::is_whitespace) {
        return Err(cx.err("hostname", format!("{hostname:?} is not a host name")));
    }
    let node = match raw.node.take() {
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
        return Err(cx.err(
            "node",
            format!("{node:?} is not a node name (letters, digits, - . _)"),
        ));
    }
    let domain_part = raw
        .domains
        .local
        .first()
        .cloned()
        .unwrap_or_else(|| hostname.clone());
    let postmaster = match raw.postmaster.take() {
        Some(p) => Address::parse(&p).map_err(|e| cx.err("postmaster", e.to_string()))?,
        None => Address::new("postmaster", &domain_part)
            .map_err(|e| cx.err("hostname", e.to_string()))?,
    };
    let recipient_delimiter = match raw.recipient_delimiter.as_deref() {
        None => Some('+'),
        Some("") => None,
        Some(s) if s.chars().count() == 1 => s.chars().next(),
        Some(s) => {
            return Err(cx.err(
                "recipient_delimiter",
                format!("{s:?} must be one character"),
            ))
        }
    };

    Ok(Identity {
        hostname,
        node,
        postmaster,
        recipient_delimiter,
    })
}

/// A listener's addresses, and for `[smtp]` the networks that may relay.
pub(super) fn listeners(
    raw: RawListener,
    key: &str,
    cx: &Cx,
) -> Result<(Listener, Vec<Cidr>), ConfigError> {
    let mut listen = Vec::new();
    for a in raw.listen.map(OneOrMany::into_vec).unwrap_or_default() {
        let sa = a.parse::<SocketAddr>().map_err(|_| {
            cx.err(
                &format!("{key}.listen"),
                format!("{a:?} is not an address:port such as 127.0.0.1:25"),
            )
        })?;
        listen.push(sa);
    }
    if key != "smtp" && raw.mynetworks.is_some() {
        return Err(cx.err(
            &format!("{key}.mynetworks"),
            "mynetworks belongs in [smtp]: submission relays for authenticated users only".into(),
        ));
    }
    let mut nets = Vec::new();
    for n in raw.mynetworks.unwrap_or_default() {
        nets.push(Cidr::parse(&n).map_err(|e| cx.err(&format!("{key}.mynetworks"), e))?);
    }
    Ok((Listener { listen }, nets))
}

pub(super) fn domain_list(v: Vec<String>, key: &str, cx: &Cx) -> Result<Vec<String>, ConfigError> {
    v.into_iter()
        .map(|d| {
            let d = d.trim().to_ascii_lowercase();
            Address::new("x", &d)
                .map(|_| d.clone())
                .map_err(|_| cx.err(key, format!("{d:?} is not a domain")))
        })
        .collect()
}

/// Destination (address or domain) to route, and to the named queue of those that give one.
pub(super) struct Routes {
    pub(super) routes: BTreeMap<String, Route>,
    pub(super) queues: BTreeMap<String, String>,
}

/// `[routes]`.
pub(super) fn routes(raw: BTreeMap<String, String>, cx: &Cx) -> Result<Routes, ConfigError> {
    let mut routes = BTreeMap::new();
    let mut route_queues = BTreeMap::new();
    for (k, v) in raw {
        let (spec, queue) = queues::split(&v);
        let route = Route::parse(spec).map_err(|e| cx.err(&format!("routes.{k:?}"), e))?;
        let key = normalise_route_key(&k).map_err(|e| cx.err(&format!("routes.{k:?}"), e))?;
        if let Some(q) = queue {
            route_queues.insert(key.clone(), q.to_string());
        }
        routes.insert(key, route);
    }
    Ok(Routes {
        routes,
        queues: route_queues,
    })
}

pub(super) fn mailboxes(
    raw: BTreeMap<String, raw::RawMailbox>,
    cx: &Cx,
) -> Result<BTreeMap<String, MailboxEntry>, ConfigError> {
    let resolve = |p: &str| cx.resolve(p);
    let mut mailboxes = BTreeMap::new();
    for (k, v) in raw {
        let key = format!("mailboxes.{k:?}");
        let addr = Address::parse(&k).map_err(|e| cx.err(&key, e.to_string()))?;
        let mailbox = match (v.maildir, v.mbox) {
            (Some(m), None) => Mailbox::Maildir(resolve(&m)),
            (None, Some(m)) => Mailbox::Mbox(resolve(&m)),
            _ => {
                return Err(cx.err(
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
                        return Err(cx.err(
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

    Ok(mailboxes)
}

/// Each queue's workers, and its overrides of `[outgoing]`.
pub(super) struct Queues {
    pub(super) workers: BTreeMap<String, usize>,
    pub(super) overrides: BTreeMap<String, Overrides>,
}

/// `[queues.NAME]`, over the standard queues.
pub(super) fn queues(raw: BTreeMap<String, raw::RawQueue>, cx: &Cx) -> Result<Queues, ConfigError> {
    let mut queues: BTreeMap<String, usize> = STANDARD_QUEUES
        .iter()
        .map(|(q, n)| (q.to_string(), *n))
        .collect();
    let mut queue_overrides = BTreeMap::new();
    for (name, q) in raw {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(cx.err(
                &format!("queues.{name}"),
                "a queue name is letters, digits, - and _".into(),
            ));
        }
        if q.workers > 64 {
            return Err(cx.err(
                &format!("queues.{name}.workers"),
                format!("{} workers is more than 64", q.workers),
            ));
        }
        if let (Some(min), Some(max)) = (q.min_backoff, q.max_backoff) {
            if max.get() < min.get() {
                return Err(cx.err(
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
    Ok(Queues {
        workers: queues,
        overrides: queue_overrides,
    })
}

pub(super) fn limits(l: raw::RawLimits) -> Limits {
    Limits {
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
    }
}

/// `[outgoing]` and `[dns]`: retry timing, and how the SMTP client connects.
pub(super) fn outgoing(
    o: raw::RawOutgoing,
    dns: raw::RawDns,
    cx: &Cx,
) -> Result<(Outgoing, Client), ConfigError> {
    let resolve = |p: &str| cx.resolve(p);
    let outgoing = Outgoing {
        min_backoff: o.min_backoff.map(Secs::signed).unwrap_or(300),
        max_backoff: o.max_backoff.map(Secs::signed).unwrap_or(4000),
        delay_warning: o.delay_warning.map(Secs::signed).unwrap_or(4 * 3600),
        max_queue_lifetime: o.max_queue_lifetime.map(Secs::signed).unwrap_or(5 * 86_400),
    };
    let policy = |v: &str, key: &str| {
        TlsPolicy::parse(v).ok_or_else(|| {
            cx.err(
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
    let dns_server = match dns.server.as_deref() {
        None => None,
        Some(s) => {
            let with_port = if s.parse::<IpAddr>().is_ok() {
                format!("{s}:53")
            } else {
                s.to_string()
            };
            Some(with_port.parse::<SocketAddr>().map_err(|_| {
                cx.err(
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
        return Err(cx.err(
            "outgoing.max_backoff",
            "max_backoff must be at least min_backoff".into(),
        ));
    }
    Ok((outgoing, client))
}

pub(super) fn scheduler(s: raw::RawScheduler) -> Scheduler {
    Scheduler {
        scan_interval: s.scan_interval.map(Secs::get).unwrap_or(60).max(1),
        busy_retry: s.busy_retry.map(Secs::get).unwrap_or(10).max(1),
        direct_routing: s.direct_routing.unwrap_or(true),
    }
}

/// `[log]`: where lines go, in which format, under which name.
pub(super) fn log(
    l: raw::RawLog,
    cx: &Cx,
) -> Result<(crate::log::Target, crate::log::Format, String), ConfigError> {
    let resolve = |p: &str| cx.resolve(p);
    let log_target = match l.target.as_deref() {
        None | Some("stderr") => crate::log::Target::Stderr,
        Some("syslog") => crate::log::Target::Syslog,
        Some(p) if p.starts_with('/') || p.starts_with('.') || p.contains('/') => {
            crate::log::Target::File(resolve(p))
        }
        Some(other) => {
            return Err(cx.err(
                "log.target",
                format!("{other:?} is not stderr, syslog or a file path"),
            ))
        }
    };
    let log_format = match l.format.as_deref() {
        None => crate::log::Format::Text,
        Some(f) => crate::log::Format::parse(f)
            .ok_or_else(|| cx.err("log.format", format!("{f:?} is not text, json or postfix")))?,
    };
    let log_syslog_name = l.syslog_name.unwrap_or_else(|| "qms".into());
    if log_syslog_name.is_empty()
        || !log_syslog_name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        return Err(cx.err(
            "log.syslog_name",
            format!("{log_syslog_name:?} is not a name of letters, digits, -, _ and ."),
        ));
    }
    Ok((log_target, log_format, log_syslog_name))
}

pub(super) fn metrics_listen(
    m: raw::RawMetrics,
    cx: &Cx,
) -> Result<Option<SocketAddr>, ConfigError> {
    let listen = match m.listen.as_deref() {
        None => None,
        Some(a) => {
            let sa = a.parse::<SocketAddr>().map_err(|_| {
                cx.err(
                    "metrics.listen",
                    format!("{a:?} is not an address:port such as 127.0.0.1:9725"),
                )
            })?;
            // The metrics role binds it as the mail system's user, never as root.
            if sa.port() < 1024 {
                return Err(cx.err(
                    "metrics.listen",
                    format!("port {} is privileged: use 1024 or more", sa.port()),
                ));
            }
            Some(sa)
        }
    };
    Ok(listen)
}

/// `[auth]`: where passwords are checked, and who may send as whom.
pub(super) fn auth(a: raw::RawAuth, cx: &Cx) -> Auth {
    Auth {
        users: a.users.as_deref().map(|p| cx.resolve(p)),
        dovecot: a.dovecot.as_deref().map(|p| cx.resolve(p)),
        plaintext_loopback: a.plaintext_loopback.unwrap_or(false),
        max_failures: a.max_failures.unwrap_or(5).max(1),
        senders: a.senders,
    }
}

/// `[msp]`: tracked sending's smarthost users, plugins and CA files.
pub(super) fn msp(m: raw::RawMsp, cx: &Cx) -> Msp {
    Msp {
        smarthost_users: m.smarthost_users,
        plugin_dir: m.plugin_dir.as_deref().map(|p| cx.resolve(p)),
        plugin_timeout: m.plugin_timeout.map(Secs::get).unwrap_or(60).max(1),
        ca_files: m
            .ca_files
            .iter()
            .map(|(h, p)| (h.to_ascii_lowercase(), cx.resolve(p)))
            .collect(),
    }
}

/// `[relay_auth]`: the credentials for each smarthost, by lower-case host name.
pub(super) fn relay_auth(
    r: BTreeMap<String, raw::RawRelayAuth>,
    cx: &Cx,
) -> BTreeMap<String, RelayAuth> {
    r.into_iter()
        .map(|(h, a)| {
            let auth = RelayAuth {
                user: a.user,
                password_file: cx.resolve(&a.password_file),
            };
            (h.to_ascii_lowercase(), auth)
        })
        .collect()
}

/// `[srs]`: the domain and its secret, read now.
pub(super) fn srs(
    s: Option<&raw::RawSrs>,
    cx: &Cx,
) -> Result<Option<crate::srs::Srs>, ConfigError> {
    let Some(s) = s else {
        return Ok(None);
    };
    crate::srs::Srs::load(&s.domain, &cx.resolve(&s.secret_file))
        .map(Some)
        .map_err(|e| cx.err("srs.secret_file", e))
}
