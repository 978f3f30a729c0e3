//! Outgoing SMTP delivery (`qms deliver --queue smtp`): recipients grouped by destination,
//! destinations served in parallel (so a dead or slow one holds up only itself), one
//! connection carrying many transactions, a reply per recipient, retries and error mail
//! through `delivery::settle`.

mod client;
mod connect;
mod dane;
mod dead;
mod destination;
pub mod dns;
mod dnssec;
mod peer;
mod policy;
mod sts;
mod threads;
mod tls;
pub mod tlsreport;
pub mod tlsrpt;
mod transaction;

use client::{Client, Settings};
use destination::Res;
use peer::Peer;
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
    /// The threads destinations and lanes run on, kept from batch to batch.
    threads: threads::Threads,
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
            threads: Default::default(),
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

/// A batch's jobs while their transactions end, and the results not yet recorded.
struct Unsettled {
    slots: Vec<Option<Claimed>>,
    /// Recipients each job still waits for.
    waiting: Vec<usize>,
    /// Each job's recipients relayed to a server without DSN that asked for success notices.
    relayed: Vec<Vec<qms_spool::Recipient>>,
}

/// Records results as transactions end, from any lane's thread: whichever thread gets the
/// lock records what has been put so far (the others leave theirs to it), so each result
/// is written as soon as it can be, and what ended together is settled in one write.
struct Settler<'a> {
    agent: &'a SmtpAgent,
    queue: Mutex<Vec<Res>>,
    state: Mutex<Unsettled>,
}

impl Settler<'_> {
    fn put(&self, res: Vec<Res>) {
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(res);
        loop {
            let mut state = match self.state.try_lock() {
                Ok(g) => g,
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                // The holder takes ours before it lets go (it looks again after).
                Err(std::sync::TryLockError::WouldBlock) => return,
            };
            loop {
                let batch =
                    std::mem::take(&mut *self.queue.lock().unwrap_or_else(|e| e.into_inner()));
                if batch.is_empty() {
                    break;
                }
                self.settle(&mut state, batch);
            }
            drop(state);
            // Put while this thread was letting go: take them, unless another thread does.
            if self
                .queue
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty()
            {
                return;
            }
        }
    }

    fn settle(&self, state: &mut Unsettled, batch: Vec<Res>) {
        let mut done = Vec::new();
        for res in batch {
            let ji = res.ji;
            if let Some(c) = state.slots[ji].as_mut() {
                self.agent.record(c, res, &mut state.relayed[ji]);
            }
            state.waiting[ji] -= 1;
            if state.waiting[ji] == 0 {
                if let Some(c) = state.slots[ji].take() {
                    done.push((c, std::mem::take(&mut state.relayed[ji])));
                }
            }
        }
        self.agent.finish(done);
    }
}

impl qms_delivery::Agent for SmtpAgent {
    /// Destinations are served in parallel; each job is settled as soon as all of its own
    /// destinations have answered, so a slow host delays only the jobs that go to it.
    fn deliver(&mut self, batch: Vec<Claimed>) {
        let start = Instant::now();
        let bodies: Vec<Result<Vec<u8>, String>> = batch
            .iter()
            .map(|c| self.spool.message(c).map_err(|e| e.to_string()))
            .collect();
        let groups = self.by_destination(&batch);
        // How many recipients each job still waits for: a job is settled, and its results
        // are on disk, as soon as its last transaction ends.
        let mut waiting: Vec<usize> = vec![0; batch.len()];
        for &(ji, _) in groups.values().flatten() {
            waiting[ji] += 1;
        }
        let jobs: Vec<Job> = batch.iter().map(|c| c.job.clone()).collect();
        let mut slots: Vec<Option<Claimed>> = batch.into_iter().map(Some).collect();
        let idle: Vec<Claimed> = waiting
            .iter()
            .enumerate()
            .filter(|(_, w)| **w == 0)
            .filter_map(|(ji, _)| slots[ji].take())
            .collect();
        self.finish(idle.into_iter().map(|c| (c, Vec::new())).collect());
        let relayed = vec![Vec::new(); slots.len()];
        let settler = Settler {
            agent: self,
            queue: Mutex::new(Vec::new()),
            state: Mutex::new(Unsettled {
                slots,
                waiting,
                relayed,
            }),
        };
        let refs: Vec<&Job> = jobs.iter().collect();
        let (refs, bodies, this) = (&refs, &bodies, &*self);
        let results = |res: Vec<Res>| settler.put(res);
        let results: destination::Results = &results;
        // One destination's delivery runs on this thread, the others' on the agent's kept
        // threads (see `threads`).
        this.threads.scope(|s| {
            let mut dests = groups.iter();
            let first = dests.next();
            for (dest, items) in dests {
                s.spawn(move || this.deliver_dest(dest, items, refs, bodies, start, results));
            }
            if let Some((dest, items)) = first {
                this.deliver_dest(dest, items, refs, bodies, start, results);
            }
        });
        settler.put(Vec::new());
        // A destination thread that died (it should not) leaves its jobs here: retry later.
        let left = settler
            .state
            .into_inner()
            .unwrap_or_else(|e| e.into_inner());
        self.finish(
            left.slots
                .into_iter()
                .flatten()
                .map(|c| (c, Vec::new()))
                .collect(),
        );
    }
}

impl SmtpAgent {
    /// The batch's open recipients, as (job, recipient) indexes, by destination.
    fn by_destination(&self, batch: &[Claimed]) -> BTreeMap<Dest, Vec<(usize, usize)>> {
        let mut groups: BTreeMap<Dest, Vec<(usize, usize)>> = BTreeMap::new();
        for (ji, c) in batch.iter().enumerate() {
            let open = c.job.recipients.iter().enumerate();
            for (ri, r) in open.filter(|(_, r)| !r.state.is_final()) {
                let dest = Dest {
                    debug: c.job.debug.then(|| c.job.id.to_string()),
                    ..self.destination(&c.job, r)
                };
                groups.entry(dest).or_default().push((ji, ri));
            }
        }
        groups
    }

    /// Where one recipient's copy goes, and under which TLS rule: the message's own
    /// smarthost, else its route (a relay, a post office by LMTP), else the MX hosts of its
    /// domain.
    fn destination(&self, job: &Job, r: &qms_spool::Recipient) -> Dest {
        let tls = self.policy(r.address.domain());
        // A post office on this host or a trusted network: plain, as Postfix's lmtp client
        // by default.
        let post_office = |target| Dest {
            target,
            tls: TlsRule {
                level: TlsPolicy::None,
                ca_file: None,
                names: Vec::new(),
            },
            debug: None,
        };
        match (&job.smarthost, r.route.as_deref().map(Route::parse)) {
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
            (None, Some(Ok(Route::Lmtp { host, port }))) => {
                post_office(Target::Lmtp { host, port })
            }
            (None, Some(Ok(Route::LmtpUnix(path)))) => post_office(Target::LmtpUnix { path }),
            _ => Dest {
                target: Target::Mx {
                    domain: r.address.domain().to_string(),
                },
                tls,
                debug: None,
            },
        }
    }
}
