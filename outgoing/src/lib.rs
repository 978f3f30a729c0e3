//! Outgoing SMTP delivery (`qms deliver --queue smtp`): recipients grouped by destination,
//! destinations served in parallel (so a dead or slow one holds up only itself), one
//! connection carrying many transactions, a reply per recipient, retries and error mail
//! through `delivery::settle`.

mod client;
mod dane;
mod dead;
mod destination;
pub mod dns;
mod dnssec;
mod peer;
mod policy;
mod sts;
mod tls;
pub mod tlsreport;
pub mod tlsrpt;
mod transaction;

use client::{Client, Failure, Settings};
use destination::Res;
use peer::Peer;
use policy::{Hop, HostRule};
use qms_common::config::{Route, TlsPolicy, TlsRule};
use qms_common::{qlog, Config};
use qms_delivery::dsn;
use qms_spool::{Claimed, Job, LinkSecurity, Notify, RcptState, Smarthost, Spool};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use transaction::Verdict;

/// New connections being set up to one address at once, per process: a burst of connects
/// can overflow a small server's accept queue and leave us waiting for a greeting.
const CONNECTS_IN_FLIGHT: usize = 4;

pub struct SmtpAgent {
    cfg: Arc<Config>,
    spool: Spool,
    /// The queue this agent's worker serves (`smtp`, or a named queue of SMTP routes).
    queue: String,
    dns: Result<dns::Dns, String>,
    /// Idle connections by address, for the next jobs to the same host.
    cache: Mutex<HashMap<Peer, Vec<Client>>>,
    /// Slow start: how many connections a destination gets at once, grown on success.
    window: Mutex<HashMap<Dest, usize>>,
    /// Connection attempts in progress per address (see CONNECTS_IN_FLIGHT).
    connecting: (Mutex<HashMap<Peer, usize>>, std::sync::Condvar),
    /// Destinations no host of which answered: their mail waits without new attempts.
    /// Keyed by target and TLS rule: a certificate refused under one rule says nothing of
    /// the host under another.
    dead: dead::Dead<Dest>,
    /// DNSSEC-aware lookups for DANE.
    resolver: dnssec::Resolver,
    /// MTA-STS policies.
    sts: sts::Cache,
    /// TLS reporting: sessions under a policy, counted.
    reports: tlsrpt::Recorder,
}

/// Where a group of recipients goes, and with which TLS policy (recipients whose domains
/// ask for different policies travel apart even to the same host).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Dest {
    target: Target,
    tls: TlsRule,
    /// A job whose dialogue is logged (`debug` run control) travels on its own connections.
    debug: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Target {
    /// `smtp:[host]:port`: no MX lookup.
    Relay { host: String, port: u16 },
    /// MX lookup for the domain.
    Mx { domain: String },
    /// The message's own smarthost (`BX-MTA-Rem-*`), with its credentials.
    Smarthost(Smarthost),
    /// `lmtp:[host]:port`: a post office, over LMTP.
    Lmtp { host: String, port: u16 },
    /// `lmtp:unix:PATH`: a post office on this host, over LMTP on its socket.
    LmtpUnix { path: PathBuf },
}

impl Dest {
    /// Connections that are not shared with other messages: authenticated as the message's
    /// submitter, or logged line by line.
    fn private(&self) -> bool {
        self.debug.is_some() || matches!(self.target, Target::Smarthost(_))
    }

    fn smarthost(&self) -> Option<&Smarthost> {
        match &self.target {
            Target::Smarthost(h) => Some(h),
            _ => None,
        }
    }
}

impl SmtpAgent {
    pub fn new(cfg: Arc<Config>, spool: Spool, queue: &str) -> SmtpAgent {
        let dns = dns::Dns::new(cfg.client.dns_server);
        if let Err(e) = &dns {
            qlog!("status=warning reason={}", qms_common::log::quote(e));
        }
        let resolver = dnssec::Resolver::new(cfg.client.dns_server);
        let sts = sts::Cache::new(
            spool.root(),
            cfg.client.mta_sts_port,
            cfg.client.ca_file.clone(),
        );
        let reports = tlsrpt::Recorder::new(spool.root(), cfg.client.tls_reports);
        SmtpAgent {
            cfg,
            spool,
            queue: queue.to_string(),
            dns,
            cache: Mutex::new(HashMap::new()),
            window: Mutex::new(HashMap::new()),
            connecting: (Mutex::new(HashMap::new()), std::sync::Condvar::new()),
            dead: dead::Dead::default(),
            resolver,
            sts,
            reports,
        }
    }

    fn settings(&self) -> Settings<'_> {
        let c = &self.cfg.client;
        Settings {
            helo: &self.cfg.hostname,
            tls: c.tls,
            connect_timeout: c.connect_timeout,
            command_timeout: c.command_timeout,
            data_timeout: c.data_timeout,
            implicit_tls: false,
            client_cert: None,
            verify: None,
            debug: None,
            lmtp: false,
        }
    }

    /// The TLS policy for a recipient domain: `[outgoing.tls_routes]` by domain, then by
    /// `.parent` domain, then `*`, then `[outgoing] tls`; `[outgoing] ca_file` where the
    /// rule names none.
    fn policy(&self, domain: &str) -> TlsRule {
        let c = &self.cfg.client;
        let domain = domain.to_ascii_lowercase();
        let mut rest = domain.as_str();
        let mut found = c.tls_routes.get(rest);
        while found.is_none() {
            let Some(i) = rest.find('.') else { break };
            found = c.tls_routes.get(&rest[i..]);
            rest = &rest[i + 1..];
        }
        let mut rule = found
            .or_else(|| c.tls_routes.get("*"))
            .cloned()
            .unwrap_or(TlsRule {
                level: c.tls,
                ca_file: None,
                names: Vec::new(),
            });
        if rule.ca_file.is_none() {
            rule.ca_file = c.ca_file.clone();
        }
        rule
    }

    /// A connection to the first host that answers: a cached one, else a new one (logged in
    /// to a relay or smarthost that wants credentials).
    fn client(
        &self,
        route: &policy::Route,
        dest: &Dest,
        fresh: bool,
    ) -> Result<(Client, f64), Failure> {
        let reuse = std::time::Duration::from_secs(self.cfg.client.connection_reuse);
        let login = self.login(dest);
        let lmtp = matches!(dest.target, Target::Lmtp { .. } | Target::LmtpUnix { .. });
        // A connection is reused only under the same rule: one opened at `may` proves
        // nothing to a `verify` destination or a host that DANE covers.
        let made_for = |hop: &Hop| {
            format!(
                "{:?} {:?} {lmtp} {:?}",
                dest.tls,
                login.map(|l| &l.user),
                hop.rule
            )
        };
        if let (false, Ok(mut cache)) = (fresh || dest.private(), self.cache.lock()) {
            for hop in &route.hops {
                if let Some(list) = cache.get_mut(&hop.peer) {
                    list.retain(|c| c.idle_since.elapsed() < reuse);
                    let want = made_for(hop);
                    if let Some(i) = list.iter().rposition(|c| c.made_for == want) {
                        return Ok((list.remove(i), 0.0));
                    }
                }
            }
        }
        let mut last = Failure {
            text: "no host to try".into(),
            permanent: false,
        };
        let start = Instant::now();
        for hop in &route.hops {
            let names = self.check_names(dest, hop);
            let settings = self.settings_for(dest, hop, login.is_some(), lmtp, &names);
            self.gate(&hop.peer, true);
            let mut attempt = Client::connect(&hop.name, &hop.peer, &settings);
            self.gate(&hop.peer, false);
            self.report_session(route, hop, &attempt);
            if let Ok(c) = &mut attempt {
                self.log_in(c, dest, login)?;
            }
            match attempt {
                Ok(mut c) => {
                    c.made_for = made_for(hop);
                    return Ok((c, start.elapsed().as_secs_f64()));
                }
                Err(f) => {
                    qlog!(
                        "relay={}{} status=connect-failed reason={}",
                        hop.name,
                        hop.peer.place(),
                        qms_common::log::quote(&f.text)
                    );
                    last = f;
                }
            }
        }
        Err(last)
    }

    /// `[relay_auth]`: a relay host of the routing table that wants a login.
    fn login(&self, dest: &Dest) -> Option<&qms_common::config::RelayAuth> {
        match &dest.target {
            Target::Relay { host, .. } => self.cfg.relay_auth.get(&host.to_ascii_lowercase()),
            _ => None,
        }
    }

    /// The names a certificate may carry: for `secure`, the configured names or the next
    /// hop; for DANE-TA, the MX host and the next-hop domain (RFC 7672 3.2.2).
    fn check_names(&self, dest: &Dest, hop: &Hop) -> Vec<String> {
        let next_hop = match &dest.target {
            Target::Mx { domain } => vec![domain.to_ascii_lowercase()],
            Target::Relay { host, .. } | Target::Lmtp { host, .. } => {
                vec![host.to_ascii_lowercase()]
            }
            Target::Smarthost(_) => Vec::new(),
            Target::LmtpUnix { .. } => vec!["localhost".to_string()],
        };
        match (&hop.rule, dest.tls.level) {
            (HostRule::Dane(_), _) => std::iter::once(hop.name.to_ascii_lowercase())
                .chain(next_hop)
                .collect(),
            (_, TlsPolicy::Secure) if dest.tls.names.is_empty() => next_hop,
            (_, TlsPolicy::Secure) => dest.tls.names.clone(),
            _ => Vec::new(),
        }
    }

    /// How to connect to one host: the destination's level, then what DANE or MTA-STS
    /// says of the host, then a smarthost's own TLS and client certificate.
    fn settings_for<'a>(
        &'a self,
        dest: &'a Dest,
        hop: &'a Hop,
        login: bool,
        lmtp: bool,
        names: &'a [String],
    ) -> Settings<'a> {
        let mut s = self.settings();
        s.tls = match dest.tls.level {
            TlsPolicy::Dane | TlsPolicy::DaneOnly => TlsPolicy::May,
            level => level,
        };
        s.debug = dest.debug.as_deref();
        s.lmtp = lmtp;
        let check = |why, ca, names, tlsa: &'a [dane::Tlsa], report_only| {
            Some(client::Verify {
                ca,
                names,
                why,
                tlsa,
                report_only,
            })
        };
        let level = dest.tls.level;
        if level.authenticates() {
            s.verify = check(
                level.as_str(),
                dest.tls.ca_file.as_deref(),
                names,
                &[],
                false,
            );
        } else if login {
            // A password goes only to a server whose certificate is verified.
            s.verify = check("credentials", dest.tls.ca_file.as_deref(), &[], &[], false);
        }
        let ca = self.cfg.client.ca_file.as_deref();
        match &hop.rule {
            HostRule::Level => {}
            HostRule::Dane(records) => {
                s.verify = check(level.as_str(), None, names, records, false)
            }
            HostRule::Encrypt => s.tls = TlsPolicy::Encrypt,
            HostRule::StsEnforce => s.verify = check("mta-sts", ca, &[], &[], false),
            HostRule::StsTesting if s.verify.is_none() => {
                s.verify = check("mta-sts", ca, &[], &[], true)
            }
            HostRule::StsTesting => {}
        }
        if let Some(h) = dest.smarthost() {
            s.implicit_tls = h.security == LinkSecurity::Ssl;
            s.client_cert = h.cert_file.as_deref().zip(h.key_file.as_deref());
            if h.user.is_some() || h.password.is_some() {
                let ca = self.cfg.msp.ca_files.get(&h.host.to_ascii_lowercase());
                s.verify = check("credentials", ca.map(|p| p.as_path()), &[], &[], false);
            }
        }
        s
    }

    /// Logs in where the destination wants it: the message's smarthost, or `[relay_auth]`.
    fn log_in(
        &self,
        c: &mut Client,
        dest: &Dest,
        login: Option<&qms_common::config::RelayAuth>,
    ) -> Result<(), Failure> {
        let done = match (dest.smarthost(), login) {
            (
                Some(Smarthost {
                    user: Some(u),
                    password: Some(p),
                    ..
                }),
                _,
            ) => c.authenticate(u, p),
            (_, Some(l)) => relay_login(c, l),
            _ => Ok(()),
        };
        if let Err(f) = &done {
            qlog!(
                "relay={}{} status=auth-failed reason={}",
                c.name,
                c.peer.place(),
                qms_common::log::quote(&f.text)
            );
        }
        done
    }

    /// Counts a new session under a DANE or MTA-STS policy for the TLS report.
    fn report_session(&self, route: &policy::Route, hop: &Hop, attempt: &Result<Client, Failure>) {
        if route.applied.kind.is_empty() || hop.rule == HostRule::Level {
            return;
        }
        let dane = matches!(hop.rule, HostRule::Dane(_) | HostRule::Encrypt);
        let result = match attempt {
            Ok(c) if c.tls.is_none() => ("starttls-not-supported".to_string(), String::new()),
            Ok(c) if c.verified || hop.rule == HostRule::Encrypt => {
                ("success".to_string(), String::new())
            }
            Ok(c) => {
                let why = c.tls_problem.clone().unwrap_or_default();
                (tlsrpt::result_type(&why, dane).to_string(), why)
            }
            Err(f) if f.text.contains("TLS") || f.text.contains("certificate") => (
                tlsrpt::result_type(&f.text, dane).to_string(),
                f.text.clone(),
            ),
            Err(_) => return,
        };
        let ip = match &hop.peer {
            Peer::Inet(a) => a.ip().to_string(),
            Peer::Unix(_) => String::new(),
        };
        self.reports.record(tlsrpt::Line {
            time: qms_common::time::now(),
            policy: route.applied.clone(),
            result: result.0,
            mx_host: hop.name.clone(),
            ip,
            detail: result.1,
        });
    }

    /// Waits for a free connection slot to `peer` (enter) or gives one back (leave).
    fn gate(&self, peer: &Peer, enter: bool) {
        let (lock, cv) = &self.connecting;
        let Ok(mut map) = lock.lock() else { return };
        if enter {
            while map.get(peer).copied().unwrap_or(0) >= CONNECTS_IN_FLIGHT {
                map = match cv.wait(map) {
                    Ok(m) => m,
                    Err(_) => return,
                };
            }
            *map.entry(peer.clone()).or_insert(0) += 1;
        } else {
            if let Some(n) = map.get_mut(peer) {
                *n = n.saturating_sub(1);
            }
            cv.notify_all();
        }
    }

    fn keep(&self, c: Client) {
        if let Ok(mut cache) = self.cache.lock() {
            let list = cache.entry(c.peer.clone()).or_default();
            if list.len() < self.cfg.destination_concurrency(&self.queue) {
                list.push(c);
                return;
            }
        }
        c.quit();
    }
}

impl SmtpAgent {
    /// Writes one recipient's result into its job and logs the attempt.
    fn record(&self, c: &mut Claimed, res: Res, relayed: &mut Vec<qms_spool::Recipient>) {
        let (id, sender, arrival) = (
            c.job.id.clone(),
            qms_common::address::logged_sender(&c.job.sender),
            c.job.arrival,
        );
        let r = &mut c.job.recipients[res.ri];
        let (state, status, kind) = match res.verdict {
            Verdict::Sent { peer_dsn } => {
                if !peer_dsn && r.notify.contains(&Notify::Success) {
                    relayed.push(r.clone());
                }
                (RcptState::Delivered, "sent", dsn::Kind::Success)
            }
            Verdict::Deferred => (RcptState::Deferred, "deferred", dsn::Kind::Delay),
            Verdict::Failed => (RcptState::Failed, "bounced", dsn::Kind::Failure),
        };
        let d = res.delays;
        qlog!(
            "qid={id} from={sender} to={} relay={} delay={} delays={:.2}/{:.2}/{:.2}/{:.2} dsn={} tls={} status={status} ({})",
            qms_common::address::logged(&r.address),
            res.relay,
            qms_common::time::now() - arrival,
            d[0],
            d[1],
            d[2],
            d[3],
            dsn::status_of(&res.reply, kind),
            qms_common::log::quote(res.tls.as_deref().unwrap_or("none")),
            res.reply
        );
        qms_delivery::settle::count_attempt(&c.job.queue, &c.job.id, &r.address, status);
        // Handed to the next hop: "relayed", not "delivered" (that is the final host's word).
        let event = match state {
            RcptState::Delivered => "relayed",
            s => s.as_str(),
        };
        // Tracking keeps the TLS of the attempt with the host it went to.
        let relay = match &res.tls {
            Some(t) => format!("{} ({t})", res.relay),
            None => res.relay.clone(),
        };
        let ev = qms_delivery::settle::attempt_event(
            &c.job,
            &c.job.recipients[res.ri],
            event,
            &res.reply,
            &relay,
        );
        qms_common::track::emit(ev);
        let r = &mut c.job.recipients[res.ri];
        r.state = state;
        r.reply = Some(res.reply);
    }

    /// Settles jobs whose destinations have all answered, after the "relayed" notices their
    /// NOTIFY=SUCCESS recipients asked for.
    fn finish(&self, done: Vec<(Claimed, Vec<qms_spool::Recipient>)>) {
        if done.is_empty() {
            return;
        }
        let mut jobs = Vec::with_capacity(done.len());
        for (c, relayed) in done {
            if !relayed.is_empty() {
                if let Err(e) =
                    dsn::bounce(&self.cfg, &self.spool, &c.job, &relayed, dsn::Kind::Relayed)
                {
                    qlog!(
                        "qid={} status=dsn-error reason={}",
                        c.job.id,
                        qms_common::log::quote(&e)
                    );
                }
            }
            jobs.push(c);
        }
        qms_delivery::settle::settle_all(&self.cfg, &self.spool, jobs);
    }
}

impl qms_delivery::Agent for SmtpAgent {
    /// Destinations are served in parallel; each job is settled as soon as all of its own
    /// destinations have answered, so a slow host delays only the jobs that go to it.
    fn deliver(&mut self, batch: Vec<Claimed>) {
        let start = Instant::now();
        let bodies: Vec<Result<Vec<u8>, String>> = batch
            .iter()
            .map(|c| self.spool.read_body(&c.job).map_err(|e| e.to_string()))
            .collect();
        let mut groups: BTreeMap<Dest, Vec<(usize, usize)>> = BTreeMap::new();
        let post_office = |target| Dest {
            target,
            tls: TlsRule {
                level: TlsPolicy::None,
                ca_file: None,
                names: Vec::new(),
            },
            debug: None,
        };
        for (ji, c) in batch.iter().enumerate() {
            for (ri, r) in c
                .job
                .recipients
                .iter()
                .enumerate()
                .filter(|(_, r)| !r.state.is_final())
            {
                let tls = self.policy(r.address.domain());
                let dest = match (&c.job.smarthost, r.route.as_deref().map(Route::parse)) {
                    (Some(h), _) => Dest {
                        target: Target::Smarthost(h.clone()),
                        tls: TlsRule {
                            level: match h.security {
                                LinkSecurity::May => TlsPolicy::May,
                                LinkSecurity::Tls | LinkSecurity::Ssl => TlsPolicy::Encrypt,
                            },
                            ca_file: None,
                            names: Vec::new(),
                        },
                        debug: None,
                    },
                    (None, Some(Ok(Route::Relay { host, port }))) => Dest {
                        target: Target::Relay { host, port },
                        tls,
                        debug: None,
                    },
                    // A post office on this host or a trusted network: plain, as Postfix's
                    // lmtp client by default.
                    (None, Some(Ok(Route::Lmtp { host, port }))) => {
                        post_office(Target::Lmtp { host, port })
                    }
                    (None, Some(Ok(Route::LmtpUnix(path)))) => {
                        post_office(Target::LmtpUnix { path })
                    }
                    _ => Dest {
                        target: Target::Mx {
                            domain: r.address.domain().to_string(),
                        },
                        tls,
                        debug: None,
                    },
                };
                let dest = Dest {
                    debug: c.job.debug.then(|| c.job.id.to_string()),
                    ..dest
                };
                groups.entry(dest).or_default().push((ji, ri));
            }
        }
        // How many recipients each job still waits for: a job is settled, and its results
        // are on disk, as soon as its last transaction ends.
        let mut waiting: Vec<usize> = vec![0; batch.len()];
        for &(ji, _) in groups.values().flatten() {
            waiting[ji] += 1;
        }
        let jobs: Vec<Job> = batch.iter().map(|c| c.job.clone()).collect();
        let mut slots: Vec<Option<Claimed>> = batch.into_iter().map(Some).collect();
        let mut relayed: Vec<Vec<qms_spool::Recipient>> = vec![Vec::new(); slots.len()];
        let idle: Vec<Claimed> = waiting
            .iter()
            .enumerate()
            .filter(|(_, w)| **w == 0)
            .filter_map(|(ji, _)| slots[ji].take())
            .collect();
        self.finish(idle.into_iter().map(|c| (c, Vec::new())).collect());
        let (tx, rx) = std::sync::mpsc::channel::<Vec<Res>>();
        let refs: Vec<&Job> = jobs.iter().collect();
        let (refs, bodies, this) = (&refs, &bodies, &*self);
        std::thread::scope(|s| {
            for (dest, items) in &groups {
                let tx = tx.clone();
                s.spawn(move || this.deliver_dest(dest, items, refs, bodies, start, &tx));
            }
            drop(tx);
            while let Ok(first) = rx.recv() {
                // What else has ended meanwhile is settled in the same write.
                let mut done = Vec::new();
                for res in std::iter::once(first).chain(rx.try_iter()).flatten() {
                    let ji = res.ji;
                    if let Some(c) = slots[ji].as_mut() {
                        this.record(c, res, &mut relayed[ji]);
                    }
                    waiting[ji] -= 1;
                    if waiting[ji] == 0 {
                        if let Some(c) = slots[ji].take() {
                            done.push((c, std::mem::take(&mut relayed[ji])));
                        }
                    }
                }
                this.finish(done);
            }
        });
        // A destination thread that died (it should not) leaves its jobs here: retry later.
        self.finish(
            slots
                .into_iter()
                .flatten()
                .map(|c| (c, Vec::new()))
                .collect(),
        );
    }
}

/// Logs in to a relay host with its `[relay_auth]` login; the password is read from its file
/// now, so a changed password needs no restart.
fn relay_login(c: &mut Client, l: &qms_common::config::RelayAuth) -> Result<(), Failure> {
    let password = std::fs::read_to_string(&l.password_file).map_err(|e| Failure {
        text: format!("cannot read {}: {e}", l.password_file.display()),
        permanent: false,
    })?;
    let password = password.lines().next().unwrap_or("");
    c.authenticate(&l.user, password)
}
