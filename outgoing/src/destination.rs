//! Delivering to one destination: its hosts from DNS, a slow-start window of lanes, each
//! lane one connection carrying many transactions, and every transaction's results sent to
//! be recorded as soon as it ends (so a crash repeats only what was on the wire). A
//! destination no host of which answers is marked dead (see `dead`).

use crate::client::{Client, Transaction};
use crate::transaction::{judge, mail_command, rcpt_command, refuse_before_sending, Verdict};
use crate::{dns, Dest, SmtpAgent};
use qms_spool::Job;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

/// What happened to one recipient, with what the log line needs.
pub(crate) struct Res {
    pub(crate) ji: usize,
    pub(crate) ri: usize,
    pub(crate) verdict: Verdict,
    pub(crate) reply: String,
    pub(crate) relay: String,
    /// The TLS of the connection: version, cipher, the peer's certificate, whether verified.
    pub(crate) tls: Option<String>,
    pub(crate) delays: [f64; 4],
}

/// How a lane's connections went.
#[derive(Default)]
struct Reach {
    /// A connection was made (or reused).
    connected: bool,
    /// Why the last connection attempt failed, when it failed for now (not for good).
    failure: Option<String>,
}

/// Where a lane's results go to be recorded, one transaction at a time.
pub(crate) type Results<'a> = &'a (dyn Fn(Vec<Res>) + Sync);

struct Out<'a> {
    tx: Results<'a>,
    buf: Vec<Res>,
}

impl Out<'_> {
    fn flush(&mut self) {
        if !self.buf.is_empty() {
            (self.tx)(std::mem::take(&mut self.buf));
        }
    }
}

impl Drop for Out<'_> {
    fn drop(&mut self) {
        self.flush();
    }
}

/// A transaction to send: one job's recipients (at most `recipient_limit`).
pub(crate) struct Tx {
    ji: usize,
    ris: Vec<usize>,
}

/// What the lanes of one destination share.
struct Lane<'a> {
    agent: &'a SmtpAgent,
    route: &'a crate::policy::Route,
    dest: &'a Dest,
    jobs: &'a [&'a Job],
    bodies: &'a [Result<Vec<u8>, String>],
    /// When the batch started, and how long the destination's DNS lookup took.
    start: Instant,
    dns_time: f64,
}

impl SmtpAgent {
    /// Delivers everything for one destination, sending the results of each transaction to
    /// `results` as soon as it ends.
    pub(crate) fn deliver_dest(
        &self,
        dest: &Dest,
        items: &[(usize, usize)],
        jobs: &[&Job],
        bodies: &[Result<Vec<u8>, String>],
        start: Instant,
        results: Results,
    ) {
        if let Some(why) = self.dead.check(dest) {
            let reply = format!("4.4.1 delivery temporarily suspended: {why}");
            results(each(items, Verdict::Deferred, &reply, |_| [0.0; 4]));
            return;
        }
        let t0 = Instant::now();
        let looked_up = self.route(dest);
        let dns_time = t0.elapsed().as_secs_f64();
        let route = match hops_or_refusal(looked_up) {
            Ok(r) => r,
            Err((verdict, reply)) => {
                let delays = |ji: usize| [queued(jobs[ji], start), dns_time, 0.0, 0.0];
                results(each(items, verdict, &reply, delays));
                return;
            }
        };
        let txs = self.transactions(items);
        let (window, limit) = self.window(dest);
        let lane = Lane {
            agent: self,
            route: &route,
            dest,
            jobs,
            bodies,
            start,
            dns_time,
        };
        let reached = self.run_lanes(&lane, txs, window, results);
        self.learn(dest, &reached, window, limit);
    }

    /// One transaction per job and chunk of at most `recipient_limit` recipients.
    fn transactions(&self, items: &[(usize, usize)]) -> Vec<Tx> {
        let mut by_job: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for &(ji, ri) in items {
            by_job.entry(ji).or_default().push(ri);
        }
        let limit = self.cfg.recipient_limit(&self.queue);
        by_job
            .into_iter()
            .flat_map(|(ji, ris)| {
                ris.chunks(limit)
                    .map(|chunk| Tx {
                        ji,
                        ris: chunk.to_vec(),
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// How many connections this worker opens to `dest` now (its slow-start window), and
    /// the most it may: `destination_concurrency` shared by the queue's worker processes.
    fn window(&self, dest: &Dest) -> (usize, usize) {
        let workers = self
            .cfg
            .queues
            .get(&self.queue)
            .copied()
            .unwrap_or(1)
            .max(1);
        let limit = self
            .cfg
            .destination_concurrency(&self.queue)
            .div_ceil(workers)
            .max(1);
        let window = self
            .window
            .lock()
            .ok()
            .and_then(|w| w.get(dest).copied())
            .unwrap_or(2)
            .clamp(1, limit);
        (window, limit)
    }

    /// Deals the transactions to `window` lanes and runs them: the first on this thread,
    /// the others on the agent's kept threads (see `threads`). A lane that panics (it should
    /// not) counts as one that reached nothing.
    fn run_lanes(&self, lane: &Lane, txs: Vec<Tx>, window: usize, results: Results) -> Vec<Reach> {
        let lanes = window.min(txs.len()).max(1);
        let mut per_lane: Vec<Vec<Tx>> = (0..lanes).map(|_| Vec::new()).collect();
        for (i, tx) in txs.into_iter().enumerate() {
            per_lane[i % lanes].push(tx);
        }
        let out = || Out {
            tx: results,
            buf: Vec::new(),
        };
        let (first, rest): (&[Tx], &[Vec<Tx>]) = match per_lane.split_first() {
            Some((f, r)) => (f, r),
            None => (&[], &[]),
        };
        let others: Vec<Mutex<Reach>> = rest.iter().map(|_| Default::default()).collect();
        let here = self.threads.scope(|s| {
            for (txs, slot) in rest.iter().zip(&others) {
                let out = out();
                s.spawn(move || {
                    let r = lane.run(txs, out);
                    if let Ok(mut slot) = slot.lock() {
                        *slot = r;
                    }
                });
            }
            lane.run(first, out())
        });
        std::iter::once(here)
            .chain(
                others
                    .into_iter()
                    .map(|m| m.into_inner().unwrap_or_default()),
            )
            .collect()
    }

    /// What the lanes teach about `dest`: dead when no lane reached a host; the window
    /// grows while connections work and falls back to one when not (slow start, as
    /// Postfix).
    fn learn(&self, dest: &Dest, reached: &[Reach], window: usize, limit: usize) {
        let connected = reached.iter().all(|r| r.failure.is_none());
        if !reached.iter().any(|r| r.connected) {
            if let Some(why) = reached.iter().find_map(|r| r.failure.clone()) {
                self.dead.mark(dest, why, self.cfg.outgoing.min_backoff);
            }
        }
        if let Ok(mut w) = self.window.lock() {
            let next = if connected {
                (window * 2).min(limit)
            } else {
                1
            };
            w.insert(dest.clone(), next);
        }
    }
}

/// The hops of a route looked up, or the verdict and reply for every recipient when there
/// are none to try. A destination whose hosts have no address is still tried: its lanes
/// find no host, and it is marked dead.
fn hops_or_refusal(
    looked_up: Result<crate::policy::Route, dns::Lookup>,
) -> Result<crate::policy::Route, (Verdict, String)> {
    match looked_up {
        Ok(r) => Ok(r),
        Err(dns::Lookup::Permanent(t)) => {
            let code = if t.contains("null MX") {
                "5.1.10"
            } else {
                "5.1.2"
            };
            Err((Verdict::Failed, format!("{code} {t}")))
        }
        Err(dns::Lookup::Temporary(t)) => Err((Verdict::Deferred, format!("4.4.3 {t}"))),
        Err(dns::Lookup::Policy(t)) => Err((Verdict::Deferred, format!("4.7.5 {t}"))),
        Err(dns::Lookup::Hosts(_)) => Ok(crate::policy::Route {
            hops: Vec::new(),
            applied: Default::default(),
        }),
    }
}

/// The same result for every recipient in `items`, sent through no relay.
fn each(
    items: &[(usize, usize)],
    verdict: Verdict,
    reply: &str,
    delays: impl Fn(usize) -> [f64; 4],
) -> Vec<Res> {
    items
        .iter()
        .map(|&(ji, ri)| Res {
            ji,
            ri,
            verdict,
            reply: reply.to_string(),
            relay: "none".into(),
            tls: None,
            delays: delays(ji),
        })
        .collect()
}

/// How long `job` had waited in the queue when its batch started, in seconds.
fn queued(job: &Job, start: Instant) -> f64 {
    ((qms_common::time::now() - job.arrival) as f64 - start.elapsed().as_secs_f64()).max(0.0)
}

impl Lane<'_> {
    /// Sends a lane's transactions over one connection (reconnecting when it breaks), each
    /// one's results to `out` as soon as it ends.
    fn run(&self, txs: &[Tx], mut out: Out) -> Reach {
        let mut client: Option<Client> = None;
        let mut reach = Reach::default();
        let mut i = 0;
        let mut retried = false;
        while i < txs.len() {
            // The last transaction's results go to be recorded before the next one starts.
            out.flush();
            let tx = &txs[i];
            let queued = queued(self.jobs[tx.ji], self.start);
            let body = match &self.bodies[tx.ji] {
                Ok(b) => b,
                Err(e) => {
                    let d = [queued, self.dns_time, 0.0, 0.0];
                    all_of(
                        &mut out,
                        tx,
                        Verdict::Deferred,
                        &format!("4.3.0 {e}"),
                        "none",
                        d,
                    );
                    i += 1;
                    continue;
                }
            };
            let (c, conn_time, reused) = match client.take() {
                Some(c) => (c, 0.0, true),
                None => match self.agent.client(self.route, self.dest, retried) {
                    Ok((c, t)) => {
                        reach.connected = true;
                        (c, t, t == 0.0)
                    }
                    Err(f) => {
                        reach.failure = Some(f.text.clone());
                        // Nothing more can go to this destination now: defer (or fail) the rest.
                        let d = [queued, self.dns_time, 0.0, 0.0];
                        let (verdict, code) = match f.permanent {
                            true => (Verdict::Failed, "5.4.0"),
                            false => (Verdict::Deferred, "4.4.1"),
                        };
                        let reply = format!("{code} {}", f.text);
                        for rest in &txs[i..] {
                            all_of(&mut out, rest, verdict, &reply, "none", d);
                        }
                        return reach;
                    }
                },
            };
            let times = [queued, self.dns_time, conn_time];
            match self.send(tx, body, c, times, reused && !retried, &mut out) {
                Sent::Kept(c) => {
                    client = Some(*c);
                    retried = false;
                    i += 1;
                }
                // A cached connection the server had closed: once more on a fresh one.
                Sent::Stale => retried = true,
                Sent::Lost => {
                    retried = false;
                    i += 1;
                }
            }
        }
        match client {
            Some(c) if self.dest.private() => c.quit(),
            Some(c) => self.agent.keep(c),
            None => {}
        }
        reach
    }

    /// Sends one transaction over `c`, its results to `out`; `times` are the delays so
    /// far (queued, DNS, connection). With `may_retry`, a connection found closed is not
    /// a result: the caller tries again on a fresh one.
    fn send(
        &self,
        tx: &Tx,
        body: &[u8],
        mut c: Client,
        times: [f64; 3],
        may_retry: bool,
        out: &mut Out,
    ) -> Sent {
        let job = self.jobs[tx.ji];
        let [queued, dns, conn] = times;
        let relay = format!("{}{}", c.name, c.peer.place());
        if let Some(reason) = refuse_before_sending(job, &tx.ris, &c, body.len()) {
            let d = [queued, dns, conn, 0.0];
            all_of(out, tx, Verdict::Failed, &reason, &relay, d);
            return Sent::Kept(Box::new(c));
        }
        let t = Instant::now();
        let transaction = Transaction {
            mail: mail_command(job, &c, body.len()),
            rcpts: tx.ris.iter().map(|&ri| rcpt_command(job, ri, &c)).collect(),
            message: body,
        };
        match c.send(&transaction) {
            Ok(o) => {
                let d = [queued, dns, conn, t.elapsed().as_secs_f64()];
                for (k, &ri) in tx.ris.iter().enumerate() {
                    let (verdict, reply) = judge(
                        &o.mail,
                        o.rcpts.get(k),
                        o.each.get(k).map_or(o.data.as_ref(), Option::as_ref),
                        c.ext.dsn,
                    );
                    out.buf.push(Res {
                        ji: tx.ji,
                        ri,
                        verdict,
                        reply,
                        relay: relay.clone(),
                        tls: c.tls_summary(),
                        delays: d,
                    });
                }
                Sent::Kept(Box::new(c))
            }
            Err(_) if may_retry => {
                // The others cached to that address are likely gone too.
                if let Ok(mut cache) = self.agent.cache.lock() {
                    cache.remove(&c.peer);
                }
                Sent::Stale
            }
            Err(e) => {
                let d = [queued, dns, conn, t.elapsed().as_secs_f64()];
                let reply =
                    format!("4.4.2 lost connection with {relay} while sending the message: {e}");
                all_of(out, tx, Verdict::Deferred, &reply, &relay, d);
                Sent::Lost
            }
        }
    }
}

/// How a transaction's connection ended up.
enum Sent {
    /// Still open: the next transaction may use it.
    Kept(Box<Client>),
    /// A cached connection the server had closed; nothing was recorded.
    Stale,
    /// Lost while sending; the transaction is deferred.
    Lost,
}

/// The same result for every recipient of one transaction.
fn all_of(out: &mut Out, tx: &Tx, verdict: Verdict, reply: &str, relay: &str, d: [f64; 4]) {
    for &ri in &tx.ris {
        out.buf.push(Res {
            ji: tx.ji,
            ri,
            verdict,
            reply: reply.to_string(),
            relay: relay.to_string(),
            tls: None,
            delays: d,
        });
    }
}
