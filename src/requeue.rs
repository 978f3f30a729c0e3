//! `qms queue requeue` (Postfix's `postsuper -r`): sends waiting jobs through the router
//! again, so that a changed routing table, queue or alias takes effect on mail already
//! routed.
//!
//! Each job's unfinished recipients become a new incoming job for the same message, with
//! a new queue id, keeping the message's arrival, warning and expiry times; the old job is
//! removed once the new one is on disk. Held jobs stay held. A crash between the two leaves
//! both, and the recipients may get the message twice: an administrator's command, never
//! the daemon's path.

use crate::queuetool::{parse_id, Select};
use qms_common::log::quote;
use qms_common::{qlog, time};
use qms_spool::{Claim, Claimed, QueueId, RcptState, Spool};
use std::process::ExitCode;
use std::time::Duration;

pub fn run(spool: &Spool, sel: &Select, by: &str) -> ExitCode {
    let wanted: Vec<QueueId> = match sel.ids.iter().map(|s| parse_id(s).ok_or(s)).collect() {
        Ok(w) => w,
        Err(s) => {
            eprintln!("qms: {s:?} is not a queue id");
            return ExitCode::from(64);
        }
    };
    if wanted.is_empty() && !sel.all {
        eprintln!("qms: name queue ids, or --all");
        return ExitCode::from(64);
    }
    let (mut done, mut failed) = (0, false);
    let mut seen = Vec::new();
    for q in spool.queues() {
        // Jobs in `incoming` have not been routed yet.
        if q == "incoming" || sel.queue.as_ref().is_some_and(|want| *want != q) {
            continue;
        }
        for (area, id) in areas_jobs(spool, &q) {
            if !sel.all && !wanted.contains(&id) {
                continue;
            }
            seen.push(id.clone());
            match one(spool, area, &q, &id, by) {
                Ok(true) => done += 1,
                Ok(false) => {}
                Err(e) => {
                    eprintln!("qms: {id}: {e}");
                    failed = true;
                }
            }
        }
    }
    for id in wanted.iter().filter(|id| !seen.contains(id)) {
        eprintln!("qms: {id}: not found among routed jobs (held jobs stay held)");
        failed = true;
    }
    println!("qms: {done} message(s) requeued");
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// A queue's routed jobs: new ones, and those waiting in `deferred/`.
fn areas_jobs(spool: &Spool, queue: &str) -> Vec<(&'static str, QueueId)> {
    let new = spool
        .list("queue", queue)
        .into_iter()
        .map(|id| ("queue", id));
    new.chain(
        spool
            .list("deferred", queue)
            .into_iter()
            .map(|id| ("deferred", id)),
    )
    .collect()
}

fn one(spool: &Spool, area: &str, queue: &str, id: &QueueId, by: &str) -> Result<bool, String> {
    let c = match spool
        .claim_wait(area, queue, id, Duration::from_secs(30))
        .map_err(|e| e.to_string())?
    {
        Claim::Got(c) => c,
        Claim::Gone => return Ok(false),
        Claim::Busy => return Err("busy: a worker holds it; try again".into()),
    };
    let body = spool.read_body(&c.job).map_err(|e| e.to_string())?;
    let job = incoming_job(&c);
    let events: Vec<_> = job
        .recipients
        .iter()
        .map(|r| c.job.track(&r.address, "requeued", "deferred", "queued"))
        .collect();
    // The new job is on disk before the old one goes: a crash between them repeats, never loses.
    let new = spool
        .enqueue(job, &|_| body.clone())
        .map_err(|e| e.to_string())?;
    spool.finish(*c).map_err(|e| e.to_string())?;
    events.into_iter().for_each(qms_common::track::emit);
    qlog!(
        "qid={id} queue={queue} status=requeued new_qid={new} by={}",
        quote(by)
    );
    Ok(true)
}

/// The job's unfinished recipients as the router first saw them after expansion: no route,
/// no reply, no attempts, the message's own times kept.
fn incoming_job(c: &Claimed) -> qms_spool::Job {
    let mut job = c.job.clone();
    job.queue = "incoming".into();
    job.recipients.retain(|r| !r.state.is_final());
    for r in &mut job.recipients {
        r.state = RcptState::Pending;
        r.reply = None;
        r.route = None;
        r.user = None;
    }
    job.attempts = 0;
    job.next_attempt = time::now();
    job
}
