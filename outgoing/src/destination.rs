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
            let all = items.iter().map(|&(ji, ri)| Res {
                ji,
                ri,
                verdict: Verdict::Deferred,
                reply: format!("4.4.1 delivery temporarily suspended: {why}"),
                relay: "none".into(),
                tls: None,
                delays: [0.0; 4],
            });
            results(all.collect());
            return;
        }
        let t0 = Instant::now();
        let route = self.route(dest);
        let dns_time = t0.elapsed().as_secs_f64();
        let queued = |ji: usize| {
            (qms_common::time::now() - jobs[ji].arrival) as f64 - start.elapsed().as_secs_f64()
        };
        let all = |verdict: fn() -> Verdict, reply: String| -> Vec<Res> {
            items
                .iter()
                .map(|&(ji, ri)| Res {
                    ji,
                    ri,
                    verdict: verdict(),
                    reply: reply.clone(),
                    relay: "none".into(),
                    tls: None,
                    delays: [queued(ji).max(0.0), dns_time, 0.0, 0.0],
                })
                .collect()
        };
        let route = match route {
            Ok(r) => r,
            Err(dns::Lookup::Permanent(t)) => {
                let code = if t.contains("null MX") {
                    "5.1.10"
                } else {
                    "5.1.2"
                };
                results(all(|| Verdict::Failed, format!("{code} {t}")));
                return;
            }
            Err(dns::Lookup::Temporary(t)) => {
                results(all(|| Verdict::Deferred, format!("4.4.3 {t}")));
                return;
            }
            Err(dns::Lookup::Policy(t)) => {
                results(all(|| Verdict::Deferred, format!("4.7.5 {t}")));
                return;
            }
            Err(dns::Lookup::Hosts(_)) => crate::policy::Route {
                hops: Vec::new(),
                applied: Default::default(),
            },
        };
        // One transaction per job and recipient chunk.
        let mut txs: Vec<Tx> = Vec::new();
        let mut by_job: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for &(ji, ri) in items {
            by_job.entry(ji).or_default().push(ri);
        }
        for (ji, ris) in by_job {
            for chunk in ris.chunks(self.cfg.recipient_limit(&self.queue)) {
                txs.push(Tx {
                    ji,
                    ris: chunk.to_vec(),
                });
            }
        }
        // `destination_concurrency` is shared by the worker processes of the queue.
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
        let lanes = window.min(txs.len()).max(1);
        let mut per_lane: Vec<Vec<Tx>> = (0..lanes).map(|_| Vec::new()).collect();
        for (i, tx) in txs.into_iter().enumerate() {
            per_lane[i % lanes].push(tx);
        }
        let out = || Out {
            tx: results,
            buf: Vec::new(),
        };
        // The first lane runs on this thread, the others on the agent's kept threads (see
        // `threads`); a lane that panics (it should not) counts as one that reached nothing.
        let (first, rest): (&[Tx], &[Vec<Tx>]) = match per_lane.split_first() {
            Some((f, r)) => (f, r),
            None => (&[], &[]),
        };
        let others: Vec<Mutex<Reach>> = rest.iter().map(|_| Default::default()).collect();
        let route = &route;
        let here = self.threads.scope(|s| {
            for (lane, slot) in rest.iter().zip(&others) {
                let out = out();
                s.spawn(move || {
                    let r = self.lane(lane, route, dest, jobs, bodies, start, dns_time, out);
                    if let Ok(mut slot) = slot.lock() {
                        *slot = r;
                    }
                });
            }
            self.lane(first, route, dest, jobs, bodies, start, dns_time, out())
        });
        let reached: Vec<Reach> = std::iter::once(here)
            .chain(
                others
                    .into_iter()
                    .map(|m| m.into_inner().unwrap_or_default()),
            )
            .collect();
        let connected = reached.iter().all(|r| r.failure.is_none());
        if !reached.iter().any(|r| r.connected) {
            if let Some(why) = reached.iter().find_map(|r| r.failure.clone()) {
                self.dead.mark(dest, why, self.cfg.outgoing.min_backoff);
            }
        }
        if let Ok(mut w) = self.window.lock() {
            // Slow start as Postfix: grow while connections work, fall back to one when not.
            let next = if connected {
                (window * 2).min(limit)
            } else {
                1
            };
            w.insert(dest.clone(), next);
        }
    }

    /// Sends a lane's transactions over one connection (reconnecting when it breaks), each
    /// one's results to `out` as soon as it ends.
    #[allow(clippy::too_many_arguments)]
    fn lane(
        &self,
        txs: &[Tx],
        route: &crate::policy::Route,
        dest: &Dest,
        jobs: &[&Job],
        bodies: &[Result<Vec<u8>, String>],
        start: Instant,
        dns_time: f64,
        mut out: Out,
    ) -> Reach {
        let mut client: Option<Client> = None;
        let mut reach = Reach::default();
        let mut i = 0;
        let mut retried = false;
        while i < txs.len() {
            // The last transaction's results go to be recorded before the next one starts.
            out.flush();
            let tx = &txs[i];
            let job = jobs[tx.ji];
            let queued = ((qms_common::time::now() - job.arrival) as f64
                - start.elapsed().as_secs_f64())
            .max(0.0);
            let push_all = |out: &mut Out,
                            verdict: &dyn Fn() -> Verdict,
                            reply: &str,
                            relay: &str,
                            d: [f64; 4]| {
                for &ri in &tx.ris {
                    out.buf.push(Res {
                        ji: tx.ji,
                        ri,
                        verdict: verdict(),
                        reply: reply.to_string(),
                        relay: relay.to_string(),
                        tls: None,
                        delays: d,
                    });
                }
            };
            let body = match &bodies[tx.ji] {
                Ok(b) => b,
                Err(e) => {
                    push_all(
                        &mut out,
                        &|| Verdict::Deferred,
                        &format!("4.3.0 {e}"),
                        "none",
                        [queued, dns_time, 0.0, 0.0],
                    );
                    i += 1;
                    continue;
                }
            };
            let (mut c, conn_time, reused) = match client.take() {
                Some(c) => (c, 0.0, true),
                None => match self.client(route, dest, retried) {
                    Ok((c, t)) => {
                        reach.connected = true;
                        (c, t, t == 0.0)
                    }
                    Err(f) => {
                        reach.failure = Some(f.text.clone());
                        // Nothing more can go to this destination now: defer (or fail) the rest.
                        for rest in &txs[i..] {
                            for &ri in &rest.ris {
                                let verdict = if f.permanent {
                                    Verdict::Failed
                                } else {
                                    Verdict::Deferred
                                };
                                let code = if f.permanent { "5.4.0" } else { "4.4.1" };
                                out.buf.push(Res {
                                    ji: rest.ji,
                                    ri,
                                    verdict,
                                    reply: format!("{code} {}", f.text),
                                    relay: "none".into(),
                                    tls: None,
                                    delays: [queued, dns_time, 0.0, 0.0],
                                });
                            }
                        }
                        return reach;
                    }
                },
            };
            let relay = format!("{}{}", c.name, c.peer.place());
            if let Some(reason) = refuse_before_sending(job, &tx.ris, &c, body.len()) {
                push_all(
                    &mut out,
                    &|| Verdict::Failed,
                    &reason,
                    &relay,
                    [queued, dns_time, conn_time, 0.0],
                );
                client = Some(c);
                i += 1;
                continue;
            }
            let t = Instant::now();
            let transaction = Transaction {
                mail: mail_command(job, &c, body.len()),
                rcpts: tx.ris.iter().map(|&ri| rcpt_command(job, ri, &c)).collect(),
                message: body,
            };
            match c.send(&transaction) {
                Ok(o) => {
                    let d = [queued, dns_time, conn_time, t.elapsed().as_secs_f64()];
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
                    client = Some(c);
                    retried = false;
                    i += 1;
                }
                Err(_) if reused && !retried => {
                    // A cached connection the server had closed; the others to that address
                    // are likely gone too. Try once more on a fresh connection.
                    if let Ok(mut cache) = self.cache.lock() {
                        cache.remove(&c.peer);
                    }
                    retried = true;
                }
                Err(e) => {
                    let d = [queued, dns_time, conn_time, t.elapsed().as_secs_f64()];
                    push_all(
                        &mut out,
                        &|| Verdict::Deferred,
                        &format!(
                            "4.4.2 lost connection with {relay} while sending the message: {e}"
                        ),
                        &relay,
                        d,
                    );
                    retried = false;
                    i += 1;
                }
            }
        }
        match client {
            Some(c) if dest.private() => c.quit(),
            Some(c) => self.keep(c),
            None => {}
        }
        reach
    }
}
