//! `qms config`: the configuration in force, every key with its value (postconf for qms), as
//! TOML that `check-config` reads back; `qms config -n` only what differs from the defaults.
//!
//! A key without a value (an optional path, a section not set) is written as a comment, so
//! that every key the parser takes is named and `qms.toml(5)` can be checked against it.

use super::{Config, Mailbox, Route};
use std::path::{Path, PathBuf};
use toml::Value;

/// One key: its value, or None when it is not set.
type Entry = (String, Option<Value>);

/// Stands for a secret's value: the key is named, its value never printed.
const HIDDEN: &str = "\u{0}hidden";

/// The effective configuration, section by section (`""` is the top level).
pub struct Effective {
    sections: Vec<(String, Vec<Entry>)>,
}

#[derive(Default)]
struct Section(Vec<Entry>);

impl Section {
    fn set(&mut self, key: &str, v: impl Into<Value>) -> &mut Self {
        self.0.push((key.into(), Some(v.into())));
        self
    }

    fn maybe(&mut self, key: &str, v: Option<Value>) -> &mut Self {
        self.0.push((key.into(), v));
        self
    }

    fn secs(&mut self, key: &str, s: u64) -> &mut Self {
        self.set(key, duration(s))
    }

    fn path(&mut self, key: &str, p: Option<&Path>) -> &mut Self {
        self.maybe(key, p.map(path))
    }

    fn list<T: ToString>(&mut self, key: &str, v: &[T]) -> &mut Self {
        self.set(key, strings(v))
    }
}

fn path(p: &Path) -> Value {
    Value::String(p.display().to_string())
}

fn strings<T: ToString>(v: &[T]) -> Value {
    Value::Array(v.iter().map(|s| Value::String(s.to_string())).collect())
}

fn int(n: impl TryInto<i64>) -> Value {
    Value::Integer(n.try_into().unwrap_or(i64::MAX))
}

/// Seconds, in the largest unit that divides them: `300` is `"5m"`, `90` stays `90`.
fn duration(s: u64) -> Value {
    for (unit, n) in [("w", 7 * 86_400), ("d", 86_400), ("h", 3600), ("m", 60)] {
        if s > 0 && s.is_multiple_of(n) {
            return Value::String(format!("{}{unit}", s / n));
        }
    }
    int(s)
}

impl Effective {
    pub fn of(c: &Config) -> Effective {
        let mut e = Effective {
            sections: Vec::new(),
        };
        let mut top = Section::default();
        top.set("spool", path(&c.spool))
            .set("hostname", c.hostname.clone())
            .set("node", c.node.clone())
            .maybe("user", c.user.clone().map(Value::String))
            .set("postmaster", c.postmaster.to_string())
            .list("trusted_users", &c.trusted_users)
            .path("aliases", c.aliases.as_deref())
            .set(
                "recipient_delimiter",
                c.recipient_delimiter.map(String::from).unwrap_or_default(),
            );
        e.push("", top);
        e.listeners(c);
        let mut d = Section::default();
        d.list("local", &c.local_domains)
            .list("relay", &c.relay_domains);
        e.push("domains", d);
        let mut routes = Section::default();
        for (k, r) in &c.routes {
            routes.set(k, route(r, c.route_queues.get(k)));
        }
        e.push("routes", routes);
        let mut mailboxes = Section::default();
        for (k, m) in &c.mailboxes {
            let mut t = toml::Table::new();
            match &m.mailbox {
                Mailbox::Maildir(p) => t.insert("maildir".into(), path(p)),
                Mailbox::Mbox(p) => t.insert("mbox".into(), path(p)),
            };
            if let Some(u) = &m.user {
                t.insert("user".into(), Value::String(u.clone()));
            }
            if let Some(p) = &m.sieve {
                t.insert("sieve".into(), path(p));
            }
            mailboxes.set(k, Value::Table(t));
        }
        e.push("mailboxes", mailboxes);
        e.queues(c);
        e.limits(c);
        e.outgoing(c);
        e.service(c);
        e.delivery(c);
        e.authentication(c);
        e.tracking(c);
        e
    }

    fn push(&mut self, name: &str, s: Section) {
        self.sections.push((name.into(), s.0));
    }

    fn listeners(&mut self, c: &Config) {
        for (name, l) in [
            ("smtp", &c.smtp),
            ("submission", &c.submission),
            ("submissions", &c.submissions),
        ] {
            let mut s = Section::default();
            s.list("listen", &l.listen);
            if name == "smtp" {
                s.list("mynetworks", &c.mynetworks);
            }
            self.push(name, s);
        }
    }

    fn queues(&mut self, c: &Config) {
        for (name, workers) in &c.queues {
            let o = c.queue_overrides.get(name).cloned().unwrap_or_default();
            let mut s = Section::default();
            s.set("workers", int(*workers))
                .maybe(
                    "destination_concurrency",
                    o.destination_concurrency.map(int),
                )
                .maybe("recipient_limit", o.recipient_limit.map(int))
                .maybe("min_backoff", o.min_backoff.map(|b| duration(b as u64)))
                .maybe("max_backoff", o.max_backoff.map(|b| duration(b as u64)));
            self.push(&format!("queues.{name}"), s);
        }
    }

    fn limits(&mut self, c: &Config) {
        let l = &c.limits;
        let mut s = Section::default();
        s.set("message_size", int(l.message_size))
            .set("recipients", int(l.recipients))
            .set("command_line", int(l.command_line))
            .set("text_line", int(l.text_line))
            .set("connections", int(l.connections))
            .set("connections_per_client", int(l.connections_per_client))
            .set("connections_per_network", int(l.connections_per_network))
            .secs("session_lifetime", l.session_lifetime)
            .secs("command_timeout", l.command_timeout)
            .secs("data_timeout", l.data_timeout)
            .set("errors", int(l.errors))
            .set("hops", int(l.hops))
            .secs("pipe_timeout", l.pipe_timeout);
        s.maybe("spool_min_free", l.spool_min_free.map(int))
            .maybe("spool_min_free_inodes", l.spool_min_free_inodes.map(int));
        self.push("limits", s);
    }

    fn outgoing(&mut self, c: &Config) {
        let (o, k) = (&c.outgoing, &c.client);
        let mut s = Section::default();
        s.secs("min_backoff", o.min_backoff as u64)
            .secs("max_backoff", o.max_backoff as u64)
            .secs("delay_warning", o.delay_warning as u64)
            .secs("max_queue_lifetime", o.max_queue_lifetime as u64)
            .set("port", int(k.port))
            .set("tls", k.tls.as_str())
            .path("ca_file", k.ca_file.as_deref())
            .set("recipient_limit", int(k.recipient_limit))
            .set("destination_concurrency", int(k.destination_concurrency))
            .secs("connect_timeout", k.connect_timeout)
            .secs("command_timeout", k.command_timeout)
            .secs("data_timeout", k.data_timeout)
            .secs("connection_reuse", k.connection_reuse)
            .set("mta_sts", Value::Boolean(k.mta_sts))
            .set("mta_sts_port", int(k.mta_sts_port))
            .set("tls_reports", Value::Boolean(k.tls_reports));
        self.push("outgoing", s);
        let mut t = Section::default();
        for (dest, r) in &k.tls_routes {
            if r.ca_file.is_none() && r.names.is_empty() {
                t.set(dest, r.level.as_str());
                continue;
            }
            let mut rule = toml::Table::new();
            rule.insert("level".into(), Value::String(r.level.as_str().into()));
            if let Some(ca) = &r.ca_file {
                rule.insert("ca_file".into(), path(ca));
            }
            if !r.names.is_empty() {
                rule.insert("match".into(), strings(&r.names));
            }
            t.set(dest, Value::Table(rule));
        }
        self.push("outgoing.tls_routes", t);
    }

    /// `[scheduler]`, `[dns]`, `[tls]`, `[auth]` and the log.
    fn service(&mut self, c: &Config) {
        let mut s = Section::default();
        s.secs("scan_interval", c.scheduler.scan_interval)
            .secs("busy_retry", c.scheduler.busy_retry)
            .set("direct_routing", c.scheduler.direct_routing);
        self.push("scheduler", s);
        let mut s = Section::default();
        s.maybe(
            "server",
            c.client.dns_server.map(|a| Value::String(a.to_string())),
        );
        self.push("dns", s);
        let mut s = Section::default();
        let t = c.tls.as_ref();
        s.path("cert", t.map(|t| t.cert.as_path()))
            .path("key", t.map(|t| t.key.as_path()))
            .path("client_ca", t.and_then(|t| t.client_ca.as_deref()))
            .maybe("relay_clients", t.map(|t| strings(&t.relay_clients)));
        self.push("tls", s);
        let a = &c.auth;
        let mut s = Section::default();
        s.path("users", a.users.as_deref())
            .path("dovecot", a.dovecot.as_deref())
            .set("plaintext_loopback", a.plaintext_loopback)
            .set("max_failures", int(a.max_failures));
        self.push("auth", s);
        let mut s = Section::default();
        for (user, addrs) in &a.senders {
            s.list(user, addrs);
        }
        self.push("auth.senders", s);
        let mut s = Section::default();
        s.set("format", c.log_format.as_str())
            .set("target", log_target(&c.log_target))
            .set("syslog_name", c.log_syslog_name.clone());
        self.push("log", s);
    }

    /// `[msp]` (tracked sending), `[local]` delivery and `[sieve]`.
    fn delivery(&mut self, c: &Config) {
        let m = &c.msp;
        let mut s = Section::default();
        s.list("smarthost_users", &m.smarthost_users)
            .path("plugin_dir", m.plugin_dir.as_deref())
            .secs("plugin_timeout", m.plugin_timeout);
        self.push("msp", s);
        let mut s = Section::default();
        for (host, p) in &m.ca_files {
            s.path(host, Some(p));
        }
        self.push("msp.ca_files", s);
        let l = &c.local;
        let origins =
            |v: &[super::Origin]| -> Vec<&'static str> { v.iter().map(|o| o.as_str()).collect() };
        let mut s = Section::default();
        s.path("postdrop", l.postdrop.as_deref())
            .set("default_privs", l.default_privs.clone())
            .list(
                "allow_mail_to_commands",
                &origins(&l.allow_mail_to_commands),
            )
            .list("allow_mail_to_files", &origins(&l.allow_mail_to_files));
        self.push("local", s);
        let v = &c.sieve;
        let mut s = Section::default();
        s.path("before", v.before.as_deref())
            .path("after", v.after.as_deref())
            .set(
                "user_script",
                v.user_script
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
            )
            .set("global_dir", path(&v.global_dir))
            .set("max_script_size", int(v.max_script_size))
            .set("max_instructions", int(v.max_instructions))
            .secs("cpu_time", v.cpu_time)
            .set("max_redirects", int(v.max_redirects))
            .set("max_vacation_replies", int(v.max_vacation_replies));
        self.push("sieve", s);
    }

    /// `[metrics]`, and the keys and checks of sender authentication: `[dkim]`,
    /// `[relay_auth]`, `[auth_checks]`, `[srs]`, `[arc]`.
    fn authentication(&mut self, c: &Config) {
        let mut s = Section::default();
        s.maybe(
            "listen",
            c.metrics_listen.map(|a| Value::String(a.to_string())),
        );
        self.push("metrics", s);
        let mut s = Section::default();
        for (domain, selectors) in &c.dkim {
            let list = selectors
                .iter()
                .map(|d| {
                    let mut t = toml::Table::new();
                    t.insert("selector".into(), Value::String(d.selector.clone()));
                    t.insert("key".into(), path(&d.key));
                    Value::Table(t)
                })
                .collect();
            s.set(domain, Value::Array(list));
        }
        self.push("dkim", s);
        let mut s = Section::default();
        for (host, a) in &c.relay_auth {
            let mut t = toml::Table::new();
            t.insert("user".into(), Value::String(a.user.clone()));
            t.insert("password_file".into(), path(&a.password_file));
            s.set(host, Value::Table(t));
        }
        self.push("relay_auth", s);
        let a = &c.auth_checks;
        let mut s = Section::default();
        s.set("enabled", a.enabled)
            .set("dmarc_reject", a.dmarc_reject.as_str())
            .set("spf_reject", a.spf_reject)
            .set(
                "quarantine",
                if a.quarantine_hold { "hold" } else { "mark" },
            );
        self.push("auth_checks", s);
        let mut s = Section::default();
        s.maybe(
            "domain",
            c.srs.as_ref().map(|r| Value::String(r.domain.clone())),
        )
        .path(
            "secret_file",
            c.srs.as_ref().map(|r| r.secret_file.as_path()),
        );
        self.push("srs", s);
        let mut s = Section::default();
        let a = c.arc.as_ref();
        s.maybe("domain", a.map(|a| Value::String(a.domain.clone())))
            .maybe("selector", a.map(|a| Value::String(a.selector.clone())))
            .path("key", a.map(|a| a.key.as_path()));
        self.push("arc", s);
    }

    fn tracking(&mut self, c: &Config) {
        let t = &c.tracking;
        let mut s = Section::default();
        s.path("envelope_maildir", t.envelope_maildir.as_deref())
            .set("co_recipient_notices", t.co_recipient_notices)
            .maybe(
                "envelope",
                t.envelope.as_ref().map(|a| Value::String(a.to_string())),
            )
            .path("key_file", t.key_file.as_deref())
            // A key written in the file is a secret: named, never shown.
            .maybe(
                "key",
                (t.key_file.is_none() && !t.key.is_empty()).then(|| Value::from(HIDDEN)),
            )
            .list("suppress", &t.suppress)
            .maybe("keep", t.keep.map(duration))
            // The URL may carry a password: shown without it.
            .maybe(
                "database",
                t.database
                    .as_deref()
                    .map(|d| Value::String(without_password(d))),
            )
            .path("password_file", t.password_file.as_deref())
            .path("database_ca_file", t.database_ca_file.as_deref());
        self.push("tracking", s);
        let i = t.imap.as_ref();
        let mut s = Section::default();
        s.maybe(
            "server",
            i.map(|i| Value::String(format!("{}:{}", i.host, i.port))),
        )
        .maybe("user", i.map(|i| Value::String(i.user.clone())))
        .path("password_file", i.map(|i| i.password_file.as_path()))
        .maybe("mailbox", i.map(|i| Value::String(i.mailbox.clone())))
        .path("ca_file", i.and_then(|i| i.ca_file.as_deref()))
        .maybe("interval", i.map(|i| duration(i.interval)));
        self.push("tracking.imap", s);
    }

    /// Only what differs from the defaults: what the same file would give with nothing but
    /// `spool` set (`qms config -n`).
    pub fn non_default(c: &Config) -> Result<Effective, super::ConfigError> {
        let bare = format!("spool = {}\n", path(&c.spool));
        let defaults = Config::parse(&c.path, &bare)?;
        Ok(Effective::of(c).differing(&Effective::of(&defaults)))
    }

    /// Only what differs from `defaults`; `spool` always stays, as the one key every
    /// config needs.
    fn differing(&self, defaults: &Effective) -> Effective {
        let mut sections = Vec::new();
        for (name, entries) in &self.sections {
            let base = defaults
                .sections
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, e)| e.as_slice())
                .unwrap_or_default();
            let kept: Vec<Entry> = entries
                .iter()
                .filter(|(k, v)| {
                    v.is_some()
                        && ((name.is_empty() && k == "spool")
                            || !base.iter().any(|(bk, bv)| bk == k && bv == v))
                })
                .cloned()
                .collect();
            if !kept.is_empty() {
                sections.push((name.clone(), kept));
            }
        }
        Effective { sections }
    }

    /// The TOML text: `key = value`, and `# key (not set)` for a key without a value.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (name, entries) in &self.sections {
            let all_unset = !entries.is_empty() && entries.iter().all(|(_, v)| v.is_none());
            if !name.is_empty() {
                let comment = if all_unset { "# " } else { "" };
                out.push_str(&format!("\n{comment}[{}]\n", section_name(name)));
            }
            for (k, v) in entries {
                match v {
                    Some(Value::String(h)) if h == HIDDEN => {
                        out.push_str(&format!("# {} = (set in the file, not shown)\n", key(k)))
                    }
                    Some(v) => out.push_str(&format!("{} = {v}\n", key(k))),
                    None => out.push_str(&format!("# {} (not set)\n", key(k))),
                }
            }
        }
        out
    }
}

fn route(r: &Route, queue: Option<&String>) -> String {
    match queue {
        Some(q) => format!("{r}@{q}"),
        None => r.to_string(),
    }
}

fn log_target(t: &crate::log::Target) -> String {
    match t {
        crate::log::Target::Stderr => "stderr".into(),
        crate::log::Target::Syslog => "syslog".into(),
        crate::log::Target::File(p) => PathBuf::from(p).display().to_string(),
    }
}

/// A key as TOML writes it: bare when it can be, else quoted.
fn key(k: &str) -> String {
    let bare = !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        k.to_string()
    } else {
        Value::String(k.to_string()).to_string()
    }
}

/// `queues.bulk` stays dotted; a part that needs quotes gets them.
fn section_name(name: &str) -> String {
    name.split('.').map(key).collect::<Vec<_>>().join(".")
}

/// `postgresql://user:secret@host/db` shown as `postgresql://user@host/db`.
fn without_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.split_once('@') {
        Some((cred, host)) => {
            let user = cred.split(':').next().unwrap_or("");
            format!("{scheme}://{user}@{host}")
        }
        None => url.to_string(),
    }
}
