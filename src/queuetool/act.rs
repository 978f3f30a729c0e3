//! `qms queue hold|release|delete|retry`: each selected job changed under its lock, the
//! change logged with the daemons' lines and tracked.

use super::*;

#[derive(Clone, Copy, PartialEq)]
pub(super) enum Action {
    Hold,
    Release,
    Delete,
    Retry,
}

pub(super) fn act(spool: &Spool, sel: &Select, action: Action, by: &str) -> ExitCode {
    if sel.ids.is_empty() && !sel.all {
        eprintln!("qms: name queue ids, or --all");
        return ExitCode::from(64);
    }
    let mut wanted = Vec::new();
    for s in &sel.ids {
        match parse_id(s) {
            Some(id) => wanted.push(id),
            None => {
                eprintln!("qms: {s:?} is not a queue id");
                return ExitCode::from(64);
            }
        }
    }
    // Which area each action starts from.
    let from = if action == Action::Release {
        "hold"
    } else {
        "queue"
    };
    let mut done = 0;
    let mut failed = false;
    let mut seen = std::collections::HashSet::new();
    for q in spool.queues() {
        if sel.queue.as_ref().is_some_and(|want| want != &q) {
            continue;
        }
        let areas: &[&str] = match (action, from) {
            (Action::Delete, _) => &qms_spool::JOB_AREAS,
            (_, "queue") => &["queue", "deferred"],
            _ => &[from],
        };
        for area in areas {
            for id in spool.list(area, &q) {
                if !sel.all && !wanted.contains(&id) {
                    continue;
                }
                seen.insert(id.clone());
                match one(spool, area, &q, &id, action, by) {
                    Ok(true) => done += 1,
                    Ok(false) => {}
                    Err(e) => {
                        eprintln!("qms: {id}: {e}");
                        failed = true;
                    }
                }
            }
        }
    }
    for id in wanted.iter().filter(|id| !seen.contains(*id)) {
        let held = action != Action::Release
            && spool
                .queues()
                .iter()
                .any(|q| spool.list("hold", q).contains(id));
        match action {
            Action::Release => eprintln!("qms: {id}: not found on hold"),
            _ if held => {
                eprintln!("qms: {id}: it is on hold; release it first (qms queue release {id})")
            }
            _ => eprintln!("qms: {id}: not found"),
        }
        failed = true;
    }
    let verb = match action {
        Action::Hold => "held",
        Action::Release => "released",
        Action::Delete => "deleted",
        Action::Retry => "scheduled for retry",
    };
    println!("qms: {done} message(s) {verb}");
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn one(
    spool: &Spool,
    area: &str,
    queue: &str,
    id: &QueueId,
    action: Action,
    by: &str,
) -> Result<bool, String> {
    let mut c = match spool
        .claim_wait(area, queue, id, Duration::from_secs(30))
        .map_err(|e| e.to_string())?
    {
        Claim::Got(c) => c,
        Claim::Gone => return Ok(false),
        Claim::Busy => return Err("busy: a worker holds it; try again".into()),
    };
    let events: Vec<qms_common::track::Event> = c
        .job
        .recipients
        .iter()
        .map(|r| {
            let state = r.state.as_str();
            match action {
                Action::Hold => c.job.track(&r.address, "held", state, "held"),
                Action::Release => c.job.track(&r.address, "released", "held", state),
                Action::Delete => c.job.track(&r.address, "deleted", state, "deleted"),
                Action::Retry => c.job.track(&r.address, "retry", state, state),
            }
        })
        .collect();
    let now = time::now();
    match action {
        Action::Hold => spool.move_to(*c, "hold").map_err(|e| e.to_string())?,
        Action::Release => {
            c.job.next_attempt = now;
            spool.update(&mut c).map_err(|e| e.to_string())?;
            spool.move_to(*c, "queue").map_err(|e| e.to_string())?
        }
        Action::Delete => spool.finish(*c).map_err(|e| e.to_string())?,
        Action::Retry => {
            c.job.next_attempt = now;
            spool.update(&mut c).map_err(|e| e.to_string())?
        }
    }
    let status = match action {
        Action::Hold => "held",
        Action::Release => "released",
        Action::Delete => "deleted",
        Action::Retry => "retry",
    };
    events.into_iter().for_each(qms_common::track::emit);
    qlog!("qid={id} queue={queue} status={status} by={}", quote(by));
    Ok(true)
}
