//! After an attempt: delivered and failed recipients are final, the rest wait with
//! exponential backoff; past the expiry time they fail; failures go back as error mail.

use crate::dsn;
use qms_common::log::quote;
use qms_common::{qlog, Config};
use qms_spool::{Claimed, RcptState, Spool};

/// Seconds to wait after the `attempts`-th failed attempt of a job of `queue`.
pub fn backoff(cfg: &Config, queue: &str, attempts: u32) -> i64 {
    let (min, max) = cfg.backoff_range(queue);
    let shift = attempts.saturating_sub(1).min(20);
    min.saturating_mul(1i64 << shift).clamp(min, max)
}

/// Sends error mail for the job's failed recipients (as their NOTIFY allows) and records
/// `bounce-sent` for them. Used after delivery attempts and by the router.
pub fn report_failures(cfg: &Config, spool: &Spool, job: &qms_spool::Job) -> Result<(), String> {
    let failed: Vec<_> = job
        .recipients
        .iter()
        .filter(|r| r.state == RcptState::Failed)
        .cloned()
        .collect();
    if failed.is_empty() {
        return Ok(());
    }
    dsn::bounce(cfg, spool, job, &failed, dsn::Kind::Failure)?;
    for r in &failed {
        qms_common::track::emit(job.track(&r.address, "bounce-sent", "failed", "failed"));
    }
    Ok(())
}

/// Sends the success reports that recipients delivered here asked for with NOTIFY=SUCCESS:
/// the MTA that makes the final delivery is the one that reports it (RFC 3461 4.1).
/// `kind_of(index)` says which report a recipient earns (a filter's redirect is relayed,
/// its discard none).
pub fn report_deliveries(
    cfg: &Config,
    spool: &Spool,
    job: &qms_spool::Job,
    kind_of: &dyn Fn(usize) -> Option<dsn::Kind>,
) {
    for kind in [dsn::Kind::Success, dsn::Kind::Relayed] {
        let due: Vec<_> = job
            .recipients
            .iter()
            .enumerate()
            .filter(|(i, r)| {
                r.state == RcptState::Delivered
                    && r.notify.contains(&qms_spool::Notify::Success)
                    && kind_of(*i) == Some(kind)
            })
            .map(|(_, r)| r.clone())
            .collect();
        if due.is_empty() {
            continue;
        }
        if let Err(e) = dsn::bounce(cfg, spool, job, &due, kind) {
            qlog!("qid={} status=dsn-error reason={}", job.id, quote(&e));
        }
    }
}

/// Counts one recipient's attempt for `[metrics]`: by queue and result (sent, deferred,
/// bounced), by destination domain, and for a delivery the time since the message arrived.
pub fn count_attempt(
    queue: &str,
    id: &qms_spool::QueueId,
    to: &qms_common::address::Address,
    status: &str,
) {
    use qms_common::metrics;
    metrics::count(
        "qms_deliveries_total",
        &[("queue", queue), ("status", status)],
        1.0,
    );
    let domain = to.domain().to_ascii_lowercase();
    metrics::count(
        "qms_destination_deliveries_total",
        &[("domain", &domain), ("status", status)],
        1.0,
    );
    if status == "sent" {
        let now = qms_common::time::now_micros();
        let delay = now.saturating_sub(id.arrival_micros()) as f64 / 1e6;
        metrics::observe("qms_delivery_delay_seconds", &[("queue", queue)], delay);
    }
}

/// The tracking event of one delivery attempt for recipient `r` of `job`.
pub fn attempt_event(
    job: &qms_spool::Job,
    r: &qms_spool::Recipient,
    event: &str,
    reply: &str,
    relay: &str,
) -> qms_common::track::Event {
    job.track(&r.address, event, crate::track_state(r), event)
        .reply(Some(reply))
        .relay(relay)
        .attempt(job.attempts + 1)
}

/// Writes the outcome of an attempt on `c` (whose recipients' states are already set):
/// bounces the failures, then finishes the job or reschedules it.
pub fn settle(cfg: &Config, spool: &Spool, c: Claimed) {
    settle_all(cfg, spool, vec![c]);
}

/// [`settle`] for many jobs: the ones that wait for another attempt are written together,
/// with one sync.
pub fn settle_all(cfg: &Config, spool: &Spool, batch: Vec<Claimed>) {
    let mut later: Vec<Claimed> = batch
        .into_iter()
        .filter_map(|c| settle_one(cfg, spool, c))
        .collect();
    if later.is_empty() {
        return;
    }
    if let Err(e) = spool.update_many(&mut later) {
        let ids: Vec<String> = later.iter().map(|c| c.job.id.to_string()).collect();
        qlog!(
            "qids={} status=error reason={}",
            ids.join(","),
            quote(&e.to_string())
        );
    }
}

/// Settles one job: finished jobs are finished here; a job to try again is returned, ready
/// to be written.
fn settle_one(cfg: &Config, spool: &Spool, mut c: Claimed) -> Option<Claimed> {
    let now = qms_common::time::now();
    let id = c.job.id.clone();
    if now >= c.job.expires_at {
        expire(&mut c, now);
    }
    crate::plugin::post(cfg, &c.job, &c.job.recipients);
    // Failures that have not been reported yet are reported now, then dropped from the job.
    if let Err(e) = report_failures(cfg, spool, &c.job) {
        // Keep the failures in the job: the bounce is tried again at the next attempt.
        qlog!("qid={id} status=bounce-error reason={}", quote(&e));
        c.job.next_attempt = now + 60;
        return Some(c);
    }
    warn_if_due(cfg, spool, &mut c, now);
    c.job.recipients.retain(|r| !r.state.is_final());
    if c.job.recipients.is_empty() {
        let queue = c.job.queue.clone();
        match spool.finish(c) {
            Ok(()) => qlog!("qid={id} queue={queue} status=removed"),
            Err(e) => qlog!("qid={id} status=error reason={}", quote(&e.to_string())),
        }
        return None;
    }
    c.job.attempts += 1;
    c.job.next_attempt = now + backoff(cfg, &c.job.queue, c.job.attempts);
    for r in c.job.recipients.iter_mut() {
        r.state = RcptState::Deferred;
    }
    Some(c)
}

/// Fails the recipients still pending of a job past its lifetime.
fn expire(c: &mut Claimed, now: i64) {
    let id = c.job.id.clone();
    for r in c.job.recipients.iter_mut().filter(|r| !r.state.is_final()) {
        let last = r
            .reply
            .clone()
            .unwrap_or_else(|| "no attempt succeeded".into());
        r.reply = Some(format!(
            "message expired after {} in the queue; last error: {last}",
            qms_common::time::short_duration(now - c.job.arrival)
        ));
        qms_common::track::emit(
            qms_common::track::Event::new(
                id.as_str(),
                c.job.message_id.as_deref(),
                &r.address.to_string(),
                "expired",
                "deferred",
                "failed",
            )
            .reply(r.reply.as_deref()),
        );
        r.state = RcptState::Failed;
        qlog!(
            "qid={id} to={} status=expired reply={}",
            r.address,
            quote(r.reply.as_deref().unwrap_or(""))
        );
    }
}

/// Sends the sender the delay warning of a job's deferred recipients, once, when it is due.
fn warn_if_due(cfg: &Config, spool: &Spool, c: &mut Claimed, now: i64) {
    if c.job.warned || now < c.job.warn_at || cfg.outgoing.delay_warning <= 0 {
        return;
    }
    let delayed: Vec<_> = c
        .job
        .recipients
        .iter()
        .filter(|r| r.state == RcptState::Deferred)
        .cloned()
        .collect();
    if delayed.is_empty() {
        return;
    }
    match dsn::bounce(cfg, spool, &c.job, &delayed, dsn::Kind::Delay) {
        Ok(()) => {
            c.job.warned = true;
            for r in &delayed {
                qms_common::track::emit(c.job.track(
                    &r.address,
                    "delay-warned",
                    "deferred",
                    "deferred",
                ));
            }
        }
        Err(e) => qlog!("qid={} status=warning-error reason={}", c.job.id, quote(&e)),
    }
}
